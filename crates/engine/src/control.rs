//! One request's cancellation state, shared by the awaiting future and the worker: why it
//! stopped (first reason wins), its deadline, and where its progress goes.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use sdserve_generation::StopReason;
use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::progress::Progress;

const STOP_NONE: u8 = 0;

fn reason_code(r: StopReason) -> u8 {
    match r {
        StopReason::Deadline => 1,
        StopReason::Disconnected => 2,
        StopReason::Shutdown => 3,
    }
}

fn code_reason(c: u8) -> Option<StopReason> {
    match c {
        1 => Some(StopReason::Deadline),
        2 => Some(StopReason::Disconnected),
        3 => Some(StopReason::Shutdown),
        _ => None,
    }
}

pub(crate) struct JobControl {
    stop: AtomicU8,
    deadline: Option<Instant>,
    /// Set when a worker takes the job: a deadline then expires "while generating".
    pub(crate) started: AtomicBool,
    pub(crate) progress: Option<mpsc::UnboundedSender<Progress>>,
    /// A preview every this many steps (only with `progress`).
    pub(crate) preview_every: Option<usize>,
    /// The request's `num_inference_steps` (passes are mapped onto them).
    pub(crate) steps: usize,
}

impl JobControl {
    pub(crate) fn new(
        deadline: Option<Instant>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
        preview_every: Option<usize>,
        steps: usize,
    ) -> Self {
        Self {
            stop: AtomicU8::new(STOP_NONE),
            deadline,
            started: AtomicBool::new(false),
            preview_every: preview_every.filter(|_| progress.is_some()),
            progress,
            steps,
        }
    }

    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.stop.compare_exchange(
            STOP_NONE,
            reason_code(reason),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Why the job stopped, if it has by `now` (a passed deadline stops it).
    pub(crate) fn stopped_at(&self, now: Instant) -> Option<StopReason> {
        if let Some(r) = code_reason(self.stop.load(Ordering::SeqCst)) {
            return Some(r);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.stop(StopReason::Deadline);
            return code_reason(self.stop.load(Ordering::SeqCst));
        }
        None
    }

    pub(crate) fn stopped(&self) -> Option<StopReason> {
        self.stopped_at(Instant::now())
    }
}

/// The answer to a request that stopped for `reason` during `phase`.
pub(crate) fn stop_error(reason: StopReason, timeout_ms: u64, phase: &'static str) -> EngineError {
    match reason {
        StopReason::Deadline => EngineError::DeadlineExceeded { timeout_ms, phase },
        StopReason::Disconnected => EngineError::Disconnected,
        StopReason::Shutdown => EngineError::Shutdown,
    }
}

pub(crate) const QUEUED: &str = "waiting in the queue";
pub(crate) const GENERATING: &str = "generating";
