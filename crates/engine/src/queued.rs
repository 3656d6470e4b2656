//! A request in the queue: its job, its batch key, its cancellation state, and where its
//! answer goes. It holds the request's admission until it is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sdserve_generation::{GeneratedImage, Job};
use tokio::sync::oneshot;

use crate::admission::Admission;
use crate::batch_key::BatchKey;
use crate::control::{JobControl, stop_error};
use crate::error::EngineError;
use crate::models::LoadedModel;
use crate::queue::{Batching, Entry};

/// Images, queue wait and generation time; or why there are none.
pub(crate) type Reply = Result<(Vec<GeneratedImage>, Duration, Duration), EngineError>;

pub(crate) struct Queued {
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) key: BatchKey,
    pub(crate) job: Job,
    pub(crate) control: Arc<JobControl>,
    pub(crate) enqueued: Instant,
    pub(crate) timeout_ms: u64,
    pub(crate) reply: oneshot::Sender<Reply>,
    pub(crate) admission: Admission,
}

impl Queued {
    /// Frees the request's slot, then answers it: a client holding its answer never sees its
    /// slot still counted in `sdserve_requests_in_flight`.
    pub(crate) fn answer(self, result: Reply) {
        let Queued {
            reply, admission, ..
        } = self;
        drop(admission);
        let _ = reply.send(result);
    }

    /// Answers a request that stopped (deadline, client gone, shutdown) during `phase`.
    pub(crate) fn answer_stopped(self, phase: &'static str) {
        let reason = self
            .control
            .stopped()
            .unwrap_or(sdserve_generation::StopReason::Disconnected);
        let timeout_ms = self.timeout_ms;
        self.answer(Err(stop_error(reason, timeout_ms, phase)));
    }
}

impl Entry for Queued {
    type Key = BatchKey;

    fn key(&self) -> &BatchKey {
        &self.key
    }

    fn images(&self) -> usize {
        self.job.images.len()
    }

    fn stopped(&self, now: Instant) -> bool {
        self.control.stopped_at(now).is_some()
    }

    fn batching(&self) -> Option<Batching> {
        let spec = &self.model.spec;
        spec.batching().then_some(Batching {
            max_images: spec.max_batch_size,
            window: spec.max_batch_time,
        })
    }
}
