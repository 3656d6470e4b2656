//! The memory budget: how many bytes the batches running on a device may take together, so
//! that no request can make the process ask for more memory than it may use.
//!
//! Each model tells the engine what its weights take and what a batch needs at its peak
//! ([`sdserve_generation::Generator::working_set`]). A device's capacity is set once (the
//! setting, or what the process may use there); loaded weights and running batches reserve
//! parts of it. A request whose batch cannot fit even with nothing else running is refused
//! before it is queued; one that fits only later waits in the queue, and a gathering batch
//! takes no more members than fit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub mod system;

/// How the budget of a device is chosen (`memory_budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBudget {
    /// What the process may use: on the CPU the smallest of the cgroup memory limit, physical
    /// memory and the address-space limit, less what the process used when it started, less a
    /// tenth for the allocator and the server itself. Devices the engine cannot measure (GPUs)
    /// are not held to a budget.
    #[default]
    Auto,
    /// This many bytes per device, weights included.
    Bytes(u64),
    /// No budget: every valid request is admitted.
    Off,
}

/// What one device's budget holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes the weights and the running batches may take together; `None`: no budget.
    pub capacity: Option<u64>,
    /// Bytes of the loaded models' weights.
    pub weights: u64,
    /// Bytes reserved by running (or gathering) batches.
    pub reserved: u64,
}

impl DeviceMemory {
    /// Bytes a batch may take with nothing else running.
    pub fn for_batches(&self) -> Option<u64> {
        self.capacity.map(|c| c.saturating_sub(self.weights))
    }

    /// Bytes a batch may take now.
    pub fn free(&self) -> Option<u64> {
        self.for_batches().map(|b| b.saturating_sub(self.reserved))
    }
}

/// The budgets of every device models run on, by device name ("cpu", "cuda:0").
#[derive(Debug, Default)]
pub struct Ledger {
    budget: MemoryBudget,
    /// The CPU's capacity under [`MemoryBudget::Auto`], measured when the engine started.
    cpu_capacity: Option<u64>,
    devices: BTreeMap<String, DeviceMemory>,
}

/// Whether a batch needing some bytes may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// It fits now.
    Now,
    /// It fits once running batches finish.
    Later,
    /// It cannot fit even with nothing else running: this many bytes are all batches get.
    Never { for_batches: u64 },
}

impl Ledger {
    pub fn new(budget: MemoryBudget, cpu_capacity: Option<u64>) -> Self {
        Self {
            budget,
            cpu_capacity,
            devices: BTreeMap::new(),
        }
    }

    fn device(&mut self, device: &str) -> &mut DeviceMemory {
        let capacity = match self.budget {
            MemoryBudget::Off => None,
            MemoryBudget::Bytes(b) => Some(b),
            MemoryBudget::Auto if device == "cpu" => self.cpu_capacity,
            MemoryBudget::Auto => None,
        };
        self.devices
            .entry(device.to_string())
            .or_insert(DeviceMemory {
                capacity,
                weights: 0,
                reserved: 0,
            })
    }

    /// What `device`'s budget holds now.
    pub fn state(&mut self, device: &str) -> DeviceMemory {
        *self.device(device)
    }

    /// A model's weights were loaded onto `device` (or, with `loaded` false, freed).
    pub fn weights(&mut self, device: &str, bytes: u64, loaded: bool) {
        let d = self.device(device);
        d.weights = if loaded {
            d.weights + bytes
        } else {
            d.weights.saturating_sub(bytes)
        };
    }

    /// Whether `bytes` fit on `device` now, later or never.
    pub fn fits(&mut self, device: &str, bytes: u64) -> Fit {
        let d = self.device(device);
        match (d.for_batches(), d.free()) {
            (None, _) | (_, None) => Fit::Now,
            (Some(all), _) if bytes > all => Fit::Never { for_batches: all },
            (_, Some(free)) if bytes > free => Fit::Later,
            _ => Fit::Now,
        }
    }

    /// Reserves `bytes` on `device` for a batch (after [`Ledger::fits`] said `Now`).
    pub fn reserve(&mut self, device: &str, bytes: u64) {
        self.device(device).reserved += bytes;
    }

    pub fn release(&mut self, device: &str, bytes: u64) {
        let d = self.device(device);
        d.reserved = d.reserved.saturating_sub(bytes);
    }
}

/// The ledger, shared by the engine's workers and the models whose weights it counts.
#[derive(Debug, Clone)]
pub struct SharedLedger(Arc<Mutex<Ledger>>);

impl SharedLedger {
    pub fn new(ledger: Ledger) -> Self {
        Self(Arc::new(Mutex::new(ledger)))
    }

    /// Locked after the engine's queue lock when both are held, never before.
    pub fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A loaded model's weights, counted in its device's budget for as long as the model lives
/// (requests still queued for an unloaded model keep it alive).
#[derive(Debug)]
pub struct WeightsHeld {
    ledger: SharedLedger,
    device: String,
    bytes: u64,
}

impl WeightsHeld {
    pub fn new(ledger: &SharedLedger, device: &str, bytes: u64) -> Self {
        ledger.lock().weights(device, bytes, true);
        Self {
            ledger: ledger.clone(),
            device: device.to_string(),
            bytes,
        }
    }
}

impl Drop for WeightsHeld {
    fn drop(&mut self) {
        self.ledger.lock().weights(&self.device, self.bytes, false);
    }
}

/// `bytes` as a person reads them: "1.5 GiB", "640 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if unit == "bytes" {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_batches_share_the_capacity() {
        let mut l = Ledger::new(MemoryBudget::Bytes(1000), None);
        l.weights("cpu", 300, true);
        assert_eq!(l.fits("cpu", 700), Fit::Now);
        assert_eq!(l.fits("cpu", 701), Fit::Never { for_batches: 700 });
        l.reserve("cpu", 500);
        assert_eq!(l.fits("cpu", 200), Fit::Now);
        assert_eq!(l.fits("cpu", 201), Fit::Later);
        l.release("cpu", 500);
        assert_eq!(l.fits("cpu", 700), Fit::Now);
        l.weights("cpu", 300, false);
        assert_eq!(l.state("cpu").for_batches(), Some(1000));
    }

    #[test]
    fn auto_holds_the_cpu_to_its_measured_capacity_and_other_devices_to_none() {
        let mut l = Ledger::new(MemoryBudget::Auto, Some(100));
        assert_eq!(l.fits("cpu", 101), Fit::Never { for_batches: 100 });
        assert_eq!(l.fits("cuda:0", u64::MAX), Fit::Now);
        let mut off = Ledger::new(MemoryBudget::Off, Some(100));
        assert_eq!(off.fits("cpu", u64::MAX), Fit::Now);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(human(640 * 1024 * 1024), "640.0 MiB");
    }
}
