//! Host-side schedule arithmetic reproducing what diffusers computes with torch and numpy.
//!
//! Values diffusers stores as float32 tensors (betas, `alphas_cumprod`, sigmas) are rebuilt with
//! the same float32 operations, so they come out bit-equal; timesteps follow numpy's own
//! `linspace`/`arange`/`round` formulas for the same reason. Per-step coefficients are then
//! computed in f64 from those values.

use super::config::Params;
use super::{SchedulerError, step_error};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: the step is a float32, the
/// first half counts up from `start` and the second half down from `end`, each with one fused
/// multiply-add.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut y: Vec<f64> = if step == 0.0 {
                (0..num).map(|i| i as f64 / div * delta + start).collect()
            } else {
                (0..num).map(|i| i as f64 * step + start).collect()
            };
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for float64: the length is `ceil((stop - start) / step)` and
/// element `i >= 2` is `start + i * (x1 - start)` with `x1 = start + step`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let next = start + step;
        out.push(next);
        let delta = next - start;
        out.extend((2..len).map(|i| start + i as f64 * delta));
    }
    out
}

/// `np.interp(x, np.arange(len(fp)), fp)`.
pub fn np_interp_unit(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    let last = (n - 1) as f64;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// Which beta schedule a class reads, and what it does with `rescale_betas_zero_snr`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// The class has no such parameter (PNDM, LMS).
    NotAParameter,
    /// Rescales the betas only (DDIM): the last `alphas_cumprod` is exactly 0.
    Betas,
    /// Rescales, then sets the last `alphas_cumprod` to 2^-24 so sigmas stay finite.
    BetasAndClampLast,
}

/// The training noise schedule every class starts from.
pub struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f32>,
    pub beta_schedule: String,
}

impl TrainSchedule {
    pub fn from_params(p: &Params, rescale: Rescale) -> std::result::Result<Self, SchedulerError> {
        let t = p.num_train_timesteps()?;
        let beta_schedule = p.string("beta_schedule", "linear")?;
        let trained = p.opt_f64_list("trained_betas")?;
        let beta_key = if trained.is_some() {
            "trained_betas"
        } else {
            "beta_start"
        };
        let mut betas = match trained {
            Some(list) => {
                if list.len() != t {
                    return Err(p.err(
                        "trained_betas",
                        format!("has {} values but num_train_timesteps is {t}", list.len()),
                    ));
                }
                list.iter().map(|&b| b as f32).collect()
            }
            None => {
                let start = p.f64("beta_start", 0.0001)?;
                let end = p.f64("beta_end", 0.02)?;
                match beta_schedule.as_str() {
                    "linear" => torch_linspace_f32(start, end, t),
                    "scaled_linear" => torch_linspace_f32(start.powf(0.5), end.powf(0.5), t)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    "squaredcos_cap_v2" => betas_for_alpha_bar(t),
                    other => {
                        return Err(p.err(
                            "beta_schedule",
                            format!("`{other}` is not one of `linear`, `scaled_linear`, `squaredcos_cap_v2`"),
                        ));
                    }
                }
            }
        };
        let rescaling =
            rescale != Rescale::NotAParameter && p.bool("rescale_betas_zero_snr", false)?;
        if rescaling {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod_alphas(&betas);
        if rescaling && rescale == Rescale::BetasAndClampLast {
            alphas_cumprod[t - 1] = 2f32.powi(-24);
        }
        if alphas_cumprod
            .iter()
            .any(|a| !a.is_finite() || *a < 0.0 || *a > 1.0)
        {
            return Err(p.err(beta_key, "the betas give alphas_cumprod outside [0, 1]"));
        }
        Ok(Self {
            num_train_timesteps: t,
            alphas_cumprod,
            beta_schedule,
        })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by train timestep.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
    }

    /// `alphas_cumprod[t]` with Python's negative-index wrap (diffusers' trailing spacing can
    /// yield timestep -1); `None` past either end.
    pub fn alpha_at(&self, t: i64) -> Option<f32> {
        let n = self.num_train_timesteps as i64;
        let idx = if t < 0 { t + n } else { t };
        (0..n)
            .contains(&idx)
            .then(|| self.alphas_cumprod[idx as usize])
    }

    /// DDIM's and PNDM's `final_alpha_cumprod`: what stands before the first train timestep.
    pub fn final_alpha_cumprod(&self, set_alpha_to_one: bool) -> f32 {
        if set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// `alphas_cumprod` at `t` and at `prev_t`, where a negative `prev_t` takes
    /// `final_alpha_cumprod` (DDIM's and PNDM's step).
    pub fn alphas_at(
        &self,
        class: &str,
        t: i64,
        prev_t: i64,
        final_alpha_cumprod: f32,
    ) -> candle_core::Result<(f64, f64)> {
        let at = |t: i64| {
            self.alpha_at(t).ok_or_else(|| {
                step_error(format!(
                    "{class}: timestep {t} is outside the train timesteps"
                ))
            })
        };
        let a_t = at(t)?;
        let a_prev = if prev_t >= 0 {
            at(prev_t)?
        } else {
            final_alpha_cumprod
        };
        Ok((a_t as f64, a_prev as f64))
    }

    /// Rejects integer timesteps that `alphas_cumprod` cannot be indexed with (diffusers fails
    /// on them mid-run).
    pub fn check_timesteps(
        &self,
        class: &'static str,
        steps: usize,
        spacing: &str,
        offset: i64,
        timesteps: &[i64],
    ) -> std::result::Result<(), SchedulerError> {
        match timesteps.iter().find(|&&t| self.alpha_at(t).is_none()) {
            None => Ok(()),
            Some(t) => Err(SchedulerError::InvalidSteps {
                class,
                steps,
                reason: format!(
                    "timestep {t} ({spacing} spacing, steps_offset {offset}) is outside the {} train timesteps",
                    self.num_train_timesteps
                ),
            }),
        }
    }
}

pub fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// Cumulative product as torch computes it on CPU: accumulated in f64, each output rounded.
fn cumprod_alphas(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Zero terminal SNR (arXiv 2305.08891, algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt: Vec<f32> = cumprod_alphas(betas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt[0];
    let last = sqrt[sqrt.len() - 1];
    let scale = first / (first - last);
    for s in &mut sqrt {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    (0..bar.len())
        .map(|i| 1.0 - if i == 0 { bar[0] } else { bar[i] / bar[i - 1] })
        .collect()
}

/// The `timestep_spacing` values every class accepts.
pub const SPACINGS: [&str; 3] = ["linspace", "leading", "trailing"];

/// Integer timesteps of DDIM (descending).
pub fn ddim_timesteps(spacing: &str, t: usize, n: usize, offset: i64) -> Vec<i64> {
    match spacing {
        "linspace" => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        "leading" => {
            let ratio = (t / n) as i64;
            (0..n as i64).rev().map(|i| i * ratio + offset).collect()
        }
        _ => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .map(|v| v.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// PNDM's `_timesteps` (ascending).
pub fn pndm_base_timesteps(spacing: &str, t: usize, n: usize, offset: i64) -> Vec<i64> {
    match spacing {
        "linspace" => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        "leading" => {
            let ratio = (t / n) as i64;
            (0..n as i64).map(|i| i * ratio + offset).collect()
        }
        _ => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .rev()
            .map(|v| v.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// Float32 timesteps of the Euler-family classes (descending), widened to f64.
pub fn k_timesteps(spacing: &str, t: usize, n: usize, offset: i64) -> Vec<f64> {
    let timesteps: Vec<f32> = match spacing {
        "linspace" => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .rev()
            .map(|&v| v as f32)
            .collect(),
        "leading" => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + offset as f32)
                .collect()
        }
        _ => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .map(|v| v.round_ties_even() as f32 - 1.0)
            .collect(),
    };
    timesteps.into_iter().map(f64::from).collect()
}

/// Integer timesteps of the multistep solvers (DPM-Solver, UniPC), as f64: `n + 1` points with
/// the last dropped, counted up to `last_timestep`.
pub fn multistep_timesteps(
    spacing: &str,
    t: usize,
    last_timestep: usize,
    n: usize,
    offset: i64,
) -> Vec<f64> {
    let timesteps: Vec<i64> = match spacing {
        "linspace" => {
            let pts = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
            pts[1..]
                .iter()
                .rev()
                .map(|v| v.round_ties_even() as i64)
                .collect()
        }
        "leading" => {
            let ratio = (last_timestep / (n + 1)) as i64;
            (1..=n as i64).rev().map(|i| i * ratio + offset).collect()
        }
        _ => np_arange(last_timestep as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .map(|v| v.round_ties_even() as i64 - 1)
            .collect(),
    };
    timesteps.into_iter().map(|t| t as f64).collect()
}

/// `np.log` of the float32 sigmas (rounded to float32).
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// diffusers' `_sigma_to_t`: the fractional train timestep whose log-sigma interpolates to `sigma`.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the running count of `log_sigma >= log_sigmas[i]`: the first index where the
    // count peaks.
    let (mut count, mut best, mut best_idx) = (0usize, 0usize, 0usize);
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = (low - log_sigma) / (low - high);
    let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// How diffusers stores the timesteps it recovers from sigmas.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TimestepCast {
    /// A float32 tensor (Euler, LMS).
    Float32,
    /// `np.round`, then int64.
    Round,
    /// Cast to int64 as they are (truncated).
    Truncate,
}

/// The train timesteps of `sigmas` (through [`sigma_to_t`]), stored as `cast` says.
pub fn sigmas_to_timesteps(sigmas: &[f64], log_sigmas: &[f32], cast: TimestepCast) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, log_sigmas);
            match cast {
                TimestepCast::Float32 => t as f32 as f64,
                TimestepCast::Round => t.round_ties_even(),
                TimestepCast::Truncate => t.trunc(),
            }
        })
        .collect()
}

/// The inference sigmas a class builds: `use_karras_sigmas`, `use_exponential_sigmas`, or
/// neither (the train sigmas at the timesteps).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SigmaKind {
    Train,
    Karras,
    Exponential,
}

impl SigmaKind {
    /// Reads the flags; beta sigmas are rejected, and so is more than one flag.
    pub fn read(p: &Params) -> std::result::Result<Self, SchedulerError> {
        let karras = p.opt_bool("use_karras_sigmas", false)?;
        let exponential = p.opt_bool("use_exponential_sigmas", false)?;
        p.reject_true(
            "use_beta_sigmas",
            "beta-distributed sigmas are not implemented",
        )?;
        match (karras, exponential) {
            (true, true) => Err(p.err(
                "use_karras_sigmas",
                "only one of use_karras_sigmas and use_exponential_sigmas can be set",
            )),
            (true, false) => Ok(Self::Karras),
            (false, true) => Ok(Self::Exponential),
            (false, false) => Ok(Self::Train),
        }
    }

    /// `n` sigmas from `sigma_max` down to `sigma_min`; `None` for [`SigmaKind::Train`].
    pub fn sigmas(self, sigma_min: f64, sigma_max: f64, n: usize) -> Option<Vec<f64>> {
        match self {
            Self::Train => None,
            Self::Karras => Some(karras_sigmas(sigma_min, sigma_max, n)),
            Self::Exponential => Some(exponential_sigmas(sigma_min, sigma_max, n)),
        }
    }
}

/// Karras et al. (2022) sigmas, rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .iter()
        .map(|x| x.exp())
        .collect()
}

/// `(sigma**2 + 1) ** 0.5` on a float32 sigma, as the scale of the model input.
pub fn input_scale_f32(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// `alpha_t, sigma_t` of the variance-preserving process at noise level `sigma`.
pub fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `log(alpha_t) - log(sigma_t)`.
pub fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Solves `a x = b` (small, dense) by Gaussian elimination with partial pivoting.
pub fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_and_linspace_follow_numpy() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        // 1000 / (1000 / 61) rounds up past 61: numpy yields 62 points, the last one ~0.
        let a = np_arange(1000.0, 0.0, -(1000.0 / 61.0));
        assert_eq!(a.len(), 62);
        assert!(a[61].abs() < 1e-9);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp_unit(-1.0, &fp), 1.0);
        assert_eq!(np_interp_unit(0.5, &fp), 2.0);
        assert_eq!(np_interp_unit(1.25, &fp), 4.0);
        assert_eq!(np_interp_unit(2.0, &fp), 7.0);
        assert_eq!(np_interp_unit(5.0, &fp), 7.0);
    }

    /// `alphas_cumprod` against diffusers: bit-equal, except after zero-SNR rescaling, which
    /// goes through torch's float32 sqrt (MKL, not correctly rounded).
    #[test]
    fn alphas_cumprod_match_diffusers() {
        use crate::schedulers::{SchedulerConfig, SchedulerKind, parse_python_json};
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
        let manifest =
            parse_python_json(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(
            dir.join("references.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let schedules = manifest["schedules"].as_array().unwrap();
        assert!(schedules.len() >= 6);
        for entry in schedules {
            let name = entry["name"].as_str().unwrap();
            let kind = SchedulerKind::from_class_name(entry["class"].as_str().unwrap()).unwrap();
            let rescale = kind.rescale();
            let cfg = SchedulerConfig::from_json(entry["config"].clone()).unwrap();
            let ours = TrainSchedule::from_params(&cfg.params(kind, &[]), rescale)
                .unwrap()
                .alphas_cumprod;
            let theirs: Vec<f32> = tensors[entry["tensor"].as_str().unwrap()]
                .to_vec1()
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{name}");
            if name.starts_with("zsnr") {
                // `sqrt(ac) - sqrt(ac_T)` cancels towards the end, amplifying the sqrt's ulp.
                let worst = ours
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| ((a - b) / b).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-5, "{name}: relative difference {worst:e}");
            } else {
                assert_eq!(ours, theirs, "{name}");
            }
        }
    }

    #[test]
    fn solve_small_system() {
        let x = solve(vec![vec![0.0, 2.0], vec![3.0, 1.0]], vec![4.0, 5.0]);
        assert!((x[0] - 1.0).abs() < 1e-15 && (x[1] - 2.0).abs() < 1e-15);
    }
}
