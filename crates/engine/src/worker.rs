//! The worker threads: each takes the next batch from the queue, runs it on its model's
//! generator, and answers every member. Model work never runs on a tokio thread.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use sdserve_generation::{GenerateError, GeneratedImage, Job};

use crate::batch_control::BatchControl;
use crate::control::{GENERATING, JobControl, QUEUED, stop_error};
use crate::engine::{Inner, Shared};
use crate::error::EngineError;
use crate::memory::{Fit, Ledger, human};
use crate::panics::catch;
use crate::queue::{Memory, Take};
use crate::queued::Queued;

pub(crate) fn worker_loop(inner: &Inner) {
    let mut gathering = None;
    loop {
        let mut shared = inner.lock();
        let batch = loop {
            let now = Instant::now();
            for stopped in shared.queue.expire(now) {
                stopped.answer_stopped(QUEUED);
            }
            let next = {
                let mut ledger = inner.memory.lock();
                shared
                    .queue
                    .take(&mut gathering, now, &mut LedgerMemory(&mut ledger))
            };
            inner.publish_queue_depth(&shared);
            match next {
                Take::Batch(batch) => break batch,
                Take::Refused { entry, for_batches } => {
                    let err = EngineError::Invalid(format!(
                        "the request no longer fits the memory budget: batches on {} now get at most {}",
                        entry.model.description().device,
                        human(for_batches)
                    ));
                    entry.answer(Err(err));
                }
                Take::Closed => return,
                Take::Wait(None) => shared = inner.wait(shared, None),
                Take::Wait(Some(at)) => shared = inner.wait(shared, Some(at - now)),
            }
        };
        start(inner, &mut shared, &batch.members);
        drop(shared);
        let reservation = Reservation {
            inner,
            device: batch.members[0].model.description().device.clone(),
            bytes: batch.reserved,
        };
        run_batch(inner, batch.members, reservation);
    }
}

/// A running batch's memory: given back when the generation ends, before its members are
/// answered, so that a client's next request finds it free.
struct Reservation<'a> {
    inner: &'a Inner,
    device: String,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.inner.memory.lock().release(&self.device, self.bytes);
        // A batch that waited for this memory may start now.
        self.inner.wake.notify_all();
    }
}

/// The queue's view of the engine's memory ledger.
struct LedgerMemory<'a>(&'a mut Ledger);

impl Memory<Queued> for LedgerMemory<'_> {
    fn need(&self, entry: &Queued, images: usize) -> u64 {
        entry
            .model
            .generator
            .working_set(&entry.key.settings, images)
    }

    fn fits(&mut self, entry: &Queued, bytes: u64) -> Fit {
        self.0.fits(&entry.model.description().device, bytes)
    }

    fn reserve(&mut self, entry: &Queued, bytes: u64) {
        self.0.reserve(&entry.model.description().device, bytes);
    }
}

/// Marks the batch's members as generating (a deadline now expires "while generating").
fn start(inner: &Inner, shared: &mut MutexGuard<'_, Shared>, batch: &[Queued]) {
    for job in batch {
        job.control
            .started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        shared.running.push(job.control.clone());
    }
    inner.publish_running(shared);
}

fn finish(inner: &Inner, batch: &[Queued]) {
    let mut shared = inner.lock();
    shared
        .running
        .retain(|c| !batch.iter().any(|j| Arc::ptr_eq(c, &j.control)));
    inner.publish_running(&shared);
}

fn run_batch(inner: &Inner, batch: Vec<Queued>, reservation: Reservation<'_>) {
    let batch = leave_if_stopped(inner, batch);
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let name = batch[0].model.spec.name.clone();
    for job in &batch {
        let wait = (started - job.enqueued).as_secs_f64();
        inner.metrics.queue_wait.observe(&[], wait);
        inner.metrics.queue_wait_long.observe(&[], wait);
    }
    let merged = Job::merge(&batch[0].key.settings, batch.iter().map(|q| &q.job));
    inner
        .metrics
        .batch_images
        .observe(&[&name], merged.images.len() as f64);
    let result = generate(inner, &batch, &merged, &name);
    let generation = started.elapsed();
    inner
        .metrics
        .generation_seconds
        .observe(&[&name], generation.as_secs_f64());
    drop(reservation);
    finish(inner, &batch);
    fan_out(batch, result, merged.images.len(), started, generation);
}

/// Members that stopped while the batch gathered (deadline, client gone) leave before it
/// starts, so that their slots are free at once.
fn leave_if_stopped(inner: &Inner, batch: Vec<Queued>) -> Vec<Queued> {
    let (live, stopped): (Vec<Queued>, Vec<Queued>) = batch
        .into_iter()
        .partition(|j| j.control.stopped().is_none());
    if !stopped.is_empty() {
        finish(inner, &stopped);
        for job in stopped {
            job.answer_stopped(QUEUED);
        }
    }
    live
}

/// Runs the merged job; a panic inside model code fails this batch, not the worker.
fn generate(
    inner: &Inner,
    batch: &[Queued],
    merged: &Job,
    name: &str,
) -> Result<Vec<GeneratedImage>, GenerateError> {
    let controls: Vec<Arc<JobControl>> = batch.iter().map(|j| j.control.clone()).collect();
    let mut control = BatchControl::new(
        &controls,
        batch.iter().map(|j| j.job.images.len()),
        &inner.metrics.step_seconds,
        name,
    );
    let model = &batch[0].model;
    catch(|| model.generator.generate(merged, &mut control)).unwrap_or_else(|p| {
        let at = p.location.as_deref().unwrap_or("unknown");
        tracing::error!(model = %name, stage = %"generation", cause = %p.message, at = %at, "the model panicked; the batch fails");
        Err(GenerateError::Internal {
            stage: "generation".into(),
            message: p.message,
        })
    })
}

/// Gives every member its own images, or its error.
fn fan_out(
    batch: Vec<Queued>,
    result: Result<Vec<GeneratedImage>, GenerateError>,
    expected: usize,
    started: Instant,
    generation: Duration,
) {
    match result {
        Ok(images) if images.len() == expected => {
            let mut images = images.into_iter();
            for job in batch {
                let mine: Vec<GeneratedImage> =
                    images.by_ref().take(job.job.images.len()).collect();
                // Sent even if the job was cancelled meanwhile: a finished image is never
                // thrown away while someone still waits for it.
                let waited = started - job.enqueued;
                job.answer(Ok((mine, waited, generation)));
            }
        }
        Ok(images) => {
            let err = EngineError::Internal {
                stage: "generation".into(),
                message: format!(
                    "model returned {} images for {expected} requested",
                    images.len()
                ),
            };
            for job in batch {
                job.answer(Err(err.clone()));
            }
        }
        Err(e) => {
            for job in batch {
                let err = match job.control.stopped() {
                    Some(r) => stop_error(r, job.timeout_ms, GENERATING),
                    None => EngineError::from_generate(e.clone(), job.timeout_ms),
                };
                job.answer(Err(err));
            }
        }
    }
}
