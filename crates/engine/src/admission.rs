//! The admission gate: a counter of admitted requests (decoding, queued or running), checked
//! before a request's body is read, so that `parallel_workers + max_queue_size` bounds the
//! work the server holds. An [`Admission`] is one unit of it; dropping it frees the slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::error::EngineError;
use crate::telemetry::EngineMetrics;

pub(crate) struct Gate {
    admitted: AtomicUsize,
    capacity: usize,
    /// Woken when the last admission is dropped (drain waits for it).
    idle: Notify,
    metrics: Arc<EngineMetrics>,
    /// Orders gauge updates, so that concurrent admissions and releases leave the gauge at the
    /// counter's latest value rather than at whichever update was set last.
    publish: Mutex<()>,
}

impl Gate {
    pub(crate) fn new(capacity: usize, metrics: Arc<EngineMetrics>) -> Self {
        Self {
            admitted: AtomicUsize::new(0),
            capacity,
            idle: Notify::new(),
            metrics,
            publish: Mutex::new(()),
        }
    }

    fn publish(&self) {
        let _order = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics
            .in_flight
            .set(&[], self.admitted.load(Ordering::SeqCst) as f64);
    }

    /// Takes a slot, or refuses at once when every slot is taken.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Admission, EngineError> {
        let mut current = self.admitted.load(Ordering::SeqCst);
        loop {
            if current >= self.capacity {
                return Err(EngineError::Overloaded {
                    in_flight: current,
                    capacity: self.capacity,
                });
            }
            match self.admitted.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.publish();
        Ok(Admission {
            gate: self.clone(),
            arrived: Instant::now(),
        })
    }

    /// Resolves when no admission is held.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.admitted.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Permission to run one request. Dropping it frees the slot.
pub struct Admission {
    gate: Arc<Gate>,
    arrived: Instant,
}

impl Admission {
    pub fn arrived(&self) -> Instant {
        self.arrived
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let left = self.gate.admitted.fetch_sub(1, Ordering::SeqCst) - 1;
        self.gate.publish();
        if left == 0 {
            self.gate.idle.notify_waiters();
        }
    }
}
