//! Per-stage times of generations, for the benchmarks: with `SDSERVE_PROFILE=1` every stage
//! synchronises its device before and after it runs, so its wall time is its device time, and
//! [`take_report`] hands out what was measured since the last report. Off (the default), a
//! stage is a plain call: synchronising would stop the host from queueing work ahead of the GPU.
//!
//! Stages nest (`unet` holds `unet.down.0`, ...); times are summed per name over the calls
//! since the last report. The record is process-wide: profile with one worker. On the CPU the
//! UNet's batch items run on several threads, whose stage times add up.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;

/// The variable that turns profiling on (`1`).
pub const PROFILE_VARIABLE: &str = "SDSERVE_PROFILE";

/// Whether this process profiles, read from the environment once.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(PROFILE_VARIABLE).is_ok_and(|v| v.trim() == "1"))
}

/// Calls and summed time per stage name, in first-seen order.
static RECORD: Mutex<Vec<(String, u32, Duration)>> = Mutex::new(Vec::new());

/// Runs `f` as stage `name` on `device`: timed between two device synchronisations when
/// profiling, a plain call otherwise. `name` is only built when profiling. A failed
/// synchronisation is left to the next operation on the device to report.
pub fn stage<T, E>(
    device: &Device,
    name: impl FnOnce() -> String,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if !enabled() {
        return f();
    }
    let _ = device.synchronize();
    let started = Instant::now();
    let out = f()?;
    let _ = device.synchronize();
    record(name(), started.elapsed());
    Ok(out)
}

fn record(name: String, took: Duration) {
    let mut record = RECORD.lock().unwrap_or_else(|e| e.into_inner());
    match record.iter_mut().find(|(n, _, _)| *n == name) {
        Some((_, calls, total)) => {
            *calls += 1;
            *total += took;
        }
        None => record.push((name, 1, took)),
    }
}

/// What was measured since the last report, as a JSON array of `{"stage", "calls", "ms"}` in
/// the order the stages first ran; `None` when nothing was (profiling off).
pub fn take_report() -> Option<String> {
    let taken = std::mem::take(&mut *RECORD.lock().unwrap_or_else(|e| e.into_inner()));
    if taken.is_empty() {
        return None;
    }
    let stages: Vec<serde_json::Value> = taken
        .into_iter()
        .map(|(name, calls, total)| {
            let ms = (total.as_secs_f64() * 1e6).round() / 1e3;
            serde_json::json!({"stage": name, "calls": calls, "ms": ms})
        })
        .collect();
    Some(serde_json::Value::Array(stages).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_per_name_in_first_seen_order() {
        for (name, ms) in [("b", 3), ("a", 1), ("b", 2)] {
            record(name.to_string(), Duration::from_millis(ms));
        }
        let report: serde_json::Value = serde_json::from_str(&take_report().unwrap()).unwrap();
        assert_eq!(
            report,
            serde_json::json!([
                {"stage": "b", "calls": 2, "ms": 5.0},
                {"stage": "a", "calls": 1, "ms": 1.0},
            ])
        );
        assert_eq!(take_report(), None, "a report empties the record");
    }
}
