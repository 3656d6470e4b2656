//! The engine facade: admission, validation into a job, queueing and awaiting a result,
//! draining and shutdown. The parts live next door: `admission` (the gate), `queue` (the
//! queue as state), `worker` (the threads that run batches), `lifecycle` (model load and
//! unload), `observer` (model metrics).
//!
//! A request is *admitted* first (a cheap counter check, before its body is read), then
//! validated, then queued. The admission travels with the job and is released only when a
//! worker is really done with it, so `parallel_workers + max_queue_size` bounds the work the
//! server holds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sdserve_generation::{GeneratedImage, GenerationRequest, Job, StopReason, random_seed};
use tokio::sync::{mpsc, oneshot};

use crate::admission::{Admission, Gate};
use crate::batch_key::BatchKey;
use crate::control::{GENERATING, JobControl, QUEUED};
use crate::error::EngineError;
use crate::memory::system::SystemMemory;
use crate::memory::{DeviceMemory, Fit, Ledger, MemoryBudget, SharedLedger, human};
use crate::metrics::Registry as MetricsRegistry;
use crate::models::{LoadedModel, ModelLoader, Registry};
use crate::observer::InferObserver;
use crate::progress::Progress;
use crate::queue::Queue;
use crate::queued::Queued;
use crate::telemetry::EngineMetrics;
use crate::worker::worker_loop;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Worker threads; each runs one (possibly batched) generation at a time.
    pub parallel_workers: usize,
    /// Requests that may wait for a worker; more are refused at once.
    pub max_queue_size: usize,
    /// Server-wide deadline, counted from arrival; `None` = no deadline.
    pub request_timeout: Option<Duration>,
    /// How much memory the weights and running batches of a device may take.
    pub memory_budget: MemoryBudget,
}

impl EngineConfig {
    pub fn capacity(&self) -> usize {
        self.parallel_workers.max(1) + self.max_queue_size
    }
}

/// The result of a successful request.
#[derive(Debug, Clone)]
pub struct InferOutcome {
    pub images: Vec<GeneratedImage>,
    /// The effective settings (defaults filled in), echoed to the client.
    pub job: Job,
    /// The served model's own version (`parameters.version`).
    pub model_version: Option<String>,
    pub queue_wait: Duration,
    pub generation: Duration,
}

/// A validated request holding its admission, ready to queue.
pub struct Prepared {
    admission: Admission,
    model: Arc<LoadedModel>,
    job: Job,
    timeout: Option<Duration>,
    preview_every: Option<usize>,
}

impl Prepared {
    /// The effective settings (defaults filled in).
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Asks for preview images every `k` steps in the progress events (`parameters.preview_every`);
    /// `k` must be between 1 and the request's steps.
    pub fn with_preview_every(mut self, k: Option<i64>) -> Result<Self, EngineError> {
        let Some(k) = k else { return Ok(self) };
        let steps = self.job.settings.steps_to_run();
        if k < 1 || k as u64 > steps as u64 {
            return Err(EngineError::Invalid(format!(
                "parameter 'preview_every' is {k}; it must be between 1 and the steps that run ({steps})"
            )));
        }
        self.preview_every = Some(k as usize);
        Ok(self)
    }
}

/// What the workers share under one lock.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) queue: Queue<Queued>,
    /// Controls of jobs being generated, for shutdown.
    pub(crate) running: Vec<Arc<JobControl>>,
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) metrics: Arc<EngineMetrics>,
    pub(crate) registry: RwLock<Registry>,
    pub(crate) loader: Arc<dyn ModelLoader>,
    pub(crate) memory: SharedLedger,
    shared: Mutex<Shared>,
    pub(crate) wake: Condvar,
    gate: Arc<Gate>,
    draining: AtomicBool,
    /// Tells one load of a model from the next (part of the batch key).
    pub(crate) next_model_id: AtomicU64,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until woken, or until `timeout` passes.
    pub(crate) fn wait<'a>(
        &self,
        shared: MutexGuard<'a, Shared>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, Shared> {
        match timeout {
            None => self.wake.wait(shared).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                self.wake
                    .wait_timeout(shared, t)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        }
    }

    pub(crate) fn publish_queue_depth(&self, shared: &Shared) {
        self.metrics.queue_depth.set(&[], shared.queue.len() as f64);
    }

    pub(crate) fn publish_running(&self, shared: &Shared) {
        self.metrics.running.set(&[], shared.running.len() as f64);
    }
}

/// Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        loader: Arc<dyn ModelLoader>,
        metrics: &MetricsRegistry,
    ) -> Self {
        let metrics = Arc::new(EngineMetrics::register(metrics));
        metrics.capacity.set(&[], config.capacity() as f64);
        for gauge in [
            &metrics.queue_depth,
            &metrics.in_flight,
            &metrics.running,
            &metrics.draining,
        ] {
            gauge.set(&[], 0.0);
        }
        metrics.queue_wait.touch(&[]);
        let inner = Arc::new(Inner {
            config: config.clone(),
            gate: Arc::new(Gate::new(config.capacity(), metrics.clone())),
            metrics,
            registry: RwLock::new(Registry::default()),
            loader,
            memory: SharedLedger::new(Ledger::new(
                config.memory_budget,
                match config.memory_budget {
                    MemoryBudget::Auto => SystemMemory::read().capacity(),
                    _ => None,
                },
            )),
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
            draining: AtomicBool::new(false),
            next_model_id: AtomicU64::new(1),
        });
        let workers = (0..config.parallel_workers.max(1))
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("sdserve-worker-{i}"))
                    .spawn(move || worker_loop(&inner))
                    .expect("spawning a worker thread")
            })
            .collect();
        Self {
            inner,
            workers: Arc::new(Mutex::new(workers)),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// What `device`'s memory budget holds now.
    pub fn memory(&self, device: &str) -> DeviceMemory {
        self.inner.memory.lock().state(device)
    }

    // ---- admission and inference -------------------------------------------------------

    /// Takes a slot, or refuses at once when the server is full or draining.
    pub fn admit(&self) -> Result<Admission, EngineError> {
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        self.inner.gate.admit()
    }

    /// Starts the model metrics of one inference request (see [`InferObserver`]).
    pub fn observer(&self, model: &str, version_label: &str) -> InferObserver {
        InferObserver::new(self.inner.metrics.clone(), model, version_label)
    }

    /// Validates, queues and awaits one request (see [`Engine::prepare`] and [`Engine::run`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn infer(
        &self,
        admission: Admission,
        observer: &mut InferObserver,
        name: &str,
        version: Option<&str>,
        request: &GenerationRequest,
        timeout: Option<Duration>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<InferOutcome, EngineError> {
        let prepared = self.prepare(admission, name, version, request, timeout)?;
        self.run(prepared, observer, progress).await
    }

    /// Finds the model and validates the request against it; nothing is queued yet.
    pub fn prepare(
        &self,
        admission: Admission,
        name: &str,
        version: Option<&str>,
        request: &GenerationRequest,
        timeout: Option<Duration>,
    ) -> Result<Prepared, EngineError> {
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        let model = self
            .inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ready(name, version)?;
        let job = request
            .resolve(
                model.description(),
                &model.spec.defaults,
                &model.spec.limits,
                random_seed,
            )
            .map_err(|e| EngineError::Invalid(e.0))?;
        self.check_memory(&model, &job)?;
        let timeout = match (self.inner.config.request_timeout, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Prepared {
            admission,
            model,
            job,
            timeout,
            preview_every: None,
        })
    }

    /// Refuses a job whose batch could never fit its device's memory budget.
    fn check_memory(&self, model: &LoadedModel, job: &Job) -> Result<(), EngineError> {
        let images = job.images.len();
        let need = model.generator.working_set(&job.settings, images);
        let device = &model.description().device;
        let mut ledger = self.inner.memory.lock();
        let Fit::Never { for_batches } = ledger.fits(device, need) else {
            return Ok(());
        };
        let state = ledger.state(device);
        let s = &job.settings;
        Err(EngineError::Invalid(format!(
            "height {} × width {} with {images} image(s) needs an estimated {} of memory, more \
             than the {} the memory budget leaves for generations on {device} (memory_budget {} \
             less {} of loaded weights); ask for a smaller height and width or fewer images \
             (num_images_per_prompt, prompts)",
            s.height,
            s.width,
            human(need),
            human(for_batches),
            human(state.capacity.unwrap_or(0)),
            human(state.weights),
        )))
    }

    /// Queues a prepared request and awaits its result. Dropping the future cancels it: a
    /// queued request leaves the queue, a running one stops at its next denoising step.
    pub async fn run(
        &self,
        prepared: Prepared,
        observer: &mut InferObserver,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<InferOutcome, EngineError> {
        let Prepared {
            admission,
            model,
            job,
            timeout,
            preview_every,
        } = prepared;
        // A deadline too far away to represent is no deadline.
        let deadline = timeout.and_then(|t| admission.arrived().checked_add(t));
        let timeout_ms = timeout.map(|t| t.as_millis() as u64).unwrap_or(0);
        let steps = job.settings.steps_to_run();
        let control = Arc::new(JobControl::new(deadline, progress, preview_every, steps));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::DeadlineExceeded {
                timeout_ms,
                phase: QUEUED,
            });
        }
        let (reply, answer) = oneshot::channel();
        observer.mark_queued();
        let id = self.enqueue(Queued {
            key: BatchKey::new(model.id, &job),
            model: model.clone(),
            job: job.clone(),
            control: control.clone(),
            enqueued: Instant::now(),
            timeout_ms,
            reply,
            admission,
        })?;
        let mut guard = CancelOnDrop {
            inner: &self.inner,
            id,
            control: &control,
            armed: true,
        };
        let received = match deadline {
            None => answer.await,
            Some(d) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(d), answer).await {
                    Ok(r) => r,
                    Err(_) => {
                        guard.armed = false;
                        return Err(self.expire(id, &control, timeout_ms));
                    }
                }
            }
        };
        guard.armed = false;
        let (images, queue_wait, generation) = received.map_err(|_| EngineError::Internal {
            stage: "worker".into(),
            message: "the worker dropped the request".into(),
        })??;
        Ok(InferOutcome {
            images,
            job,
            model_version: model.spec.version.clone(),
            queue_wait,
            generation,
        })
    }

    fn enqueue(&self, queued: Queued) -> Result<u64, EngineError> {
        let mut shared = self.inner.lock();
        let id = shared
            .queue
            .admit(queued)
            .map_err(|_| EngineError::Shutdown)?;
        self.inner.publish_queue_depth(&shared);
        drop(shared);
        self.inner.wake.notify_all();
        Ok(id)
    }

    /// The request's deadline passed while its future waited: stop it wherever it is.
    fn expire(&self, id: u64, control: &JobControl, timeout_ms: u64) -> EngineError {
        control.stop(StopReason::Deadline);
        let phase = if control.started.load(Ordering::SeqCst) {
            GENERATING
        } else {
            self.remove_queued(id);
            QUEUED
        };
        EngineError::DeadlineExceeded { timeout_ms, phase }
    }

    fn remove_queued(&self, id: u64) {
        let mut shared = self.inner.lock();
        let removed = shared.queue.remove(id);
        self.inner.publish_queue_depth(&shared);
        drop(shared);
        // Answered (and its slot freed) outside the lock; its future is gone already.
        drop(removed);
    }

    // ---- draining -----------------------------------------------------------------------

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// From now on: not ready, and new requests are refused.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.metrics.draining.set(&[], 1.0);
    }

    /// Waits for admitted requests to finish, up to `timeout`; then cancels what is left
    /// (queued requests at once, running ones at their next step) and waits for the workers
    /// to let go. Returns true when everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.begin_drain();
        let gate = &self.inner.gate;
        let clean = tokio::time::timeout(timeout, gate.wait_idle())
            .await
            .is_ok();
        if !clean {
            self.cancel_everything(StopReason::Shutdown);
            let _ = tokio::time::timeout(Duration::from_secs(30), gate.wait_idle()).await;
        }
        clean
    }

    fn cancel_everything(&self, reason: StopReason) {
        let mut shared = self.inner.lock();
        for c in &shared.running {
            c.stop(reason);
        }
        let waiting = shared.queue.drain();
        self.inner.publish_queue_depth(&shared);
        drop(shared);
        for job in waiting {
            job.control.stop(reason);
            job.answer_stopped(QUEUED);
        }
    }

    /// Stops the worker threads (after [`Engine::drain`]).
    pub fn shutdown(&self) {
        let waiting = self.inner.lock().queue.close();
        for job in waiting {
            job.control.stop(StopReason::Shutdown);
            job.answer_stopped(QUEUED);
        }
        self.cancel_everything(StopReason::Shutdown);
        self.inner.wake.notify_all();
        let workers: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// Cancels the request when the awaiting future is dropped (client went away).
struct CancelOnDrop<'a> {
    inner: &'a Inner,
    id: u64,
    control: &'a JobControl,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.control.stop(StopReason::Disconnected);
        let mut shared = self.inner.lock();
        let removed = shared.queue.remove(self.id);
        self.inner.publish_queue_depth(&shared);
        drop(shared);
        drop(removed);
    }
}
