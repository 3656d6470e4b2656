//! The model families of one inference request (the metrics contract, `docs/metrics.md`):
//! success or failure, and the seconds from queueing to result.

use std::sync::Arc;
use std::time::Instant;

use crate::error::EngineError;
use crate::telemetry::EngineMetrics;

/// Counts one inference request in the contract's model families: success or failure,
/// and the seconds from queueing to result. Dropped without [`InferObserver::finish`] it
/// counts as a failure (the client went away).
pub struct InferObserver {
    metrics: Arc<EngineMetrics>,
    model: String,
    version: String,
    queued_at: Option<Instant>,
    done: bool,
}

impl InferObserver {
    pub(crate) fn new(metrics: Arc<EngineMetrics>, model: &str, version: &str) -> Self {
        Self {
            metrics,
            model: model.to_owned(),
            version: version.to_owned(),
            queued_at: None,
            done: false,
        }
    }

    pub(crate) fn mark_queued(&mut self) {
        self.queued_at = Some(Instant::now());
    }

    pub fn finish(mut self, result: Result<usize, &EngineError>) {
        self.record(result.map_err(|e| e.reason()));
    }

    /// A failure before the engine saw the request (unreadable body, broken contract).
    pub fn fail(mut self, reason: &'static str) {
        self.record(Err(reason));
    }

    fn record(&mut self, result: Result<usize, &'static str>) {
        if self.done {
            return;
        }
        self.done = true;
        let labels = [self.model.as_str(), self.version.as_str()];
        let seconds = self
            .queued_at
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.duration.observe(&labels, seconds);
        self.metrics
            .request_seconds
            .observe(&[&self.model], seconds);
        match result {
            Ok(images) => {
                self.metrics.success.inc(&labels);
                self.metrics.failure.touch(&labels);
                self.metrics.images.add(&[&self.model], images as f64);
            }
            Err(reason) => {
                self.metrics.failure.inc(&labels);
                self.metrics.success.touch(&labels);
                self.metrics.failures_by_reason.inc(&[&self.model, reason]);
            }
        }
    }
}

impl Drop for InferObserver {
    fn drop(&mut self) {
        self.record(Err("disconnected"));
    }
}
