//! What decides whether two queued jobs may run as one batch.

use sdserve_generation::{Job, JobSettings};

/// Jobs with equal keys may share a batch: the same loaded model and the same
/// [`JobSettings`]. Everything else about a job is per image ([`sdserve_generation::ImageSpec`]),
/// so a merged batch runs every member with exactly its own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    /// Identifies one load of one model (a reload is another model).
    pub model: u64,
    pub settings: JobSettings,
}

impl BatchKey {
    pub fn new(model: u64, job: &Job) -> Self {
        Self {
            model,
            settings: job.settings.clone(),
        }
    }
}
