//! The engine: admission, the bounded FIFO queue, worker threads, deadlines, cancellation,
//! draining and the model registry.
//!
//! A request is *admitted* first (a cheap counter check, before its body is read), then
//! validated, then queued. Workers are OS threads: model work never runs on a tokio thread.
//! The admission travels with the job and is released only when a worker is really done with
//! it, so `parallel_workers + max_queue_size` bounds the work the server holds.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::EngineError;
use crate::generator::{GeneratedImage, GenerationJob, StepControl, StopReason};
use crate::metrics::Registry as MetricsRegistry;
use crate::models::{LoadedModel, ModelLoader, ModelSpec, ModelStatus, Registry};
use crate::request::{GenerationRequest, random_seed};
use crate::telemetry::EngineMetrics;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Worker threads; each runs one (possibly batched) generation at a time.
    pub parallel_workers: usize,
    /// Requests that may wait for a worker; more are refused at once.
    pub max_queue_size: usize,
    /// Server-wide deadline, counted from arrival; `None` = no deadline.
    pub request_timeout: Option<Duration>,
}

impl EngineConfig {
    pub fn capacity(&self) -> usize {
        self.parallel_workers.max(1) + self.max_queue_size
    }
}

/// A progress event for streaming clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
    /// Preview PNGs of the request's images at this step (empty when none was asked for).
    pub preview: Vec<Vec<u8>>,
}

/// The result of a successful request.
#[derive(Debug, Clone)]
pub struct InferOutcome {
    pub images: Vec<GeneratedImage>,
    /// The effective settings (defaults filled in), echoed to the client.
    pub job: GenerationJob,
    /// The served model's own version (`parameters.version`).
    pub model_version: Option<String>,
    pub queue_wait: Duration,
    pub generation: Duration,
}

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

/// Per-request cancellation state shared by the async side and the worker.
struct JobControl {
    stop: AtomicU8,
    deadline: Option<Instant>,
    started: AtomicBool,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    /// A preview every this many steps (only with `progress`).
    preview_every: Option<usize>,
    /// The request's `num_inference_steps` (passes are mapped onto them for previews).
    steps: usize,
}

impl JobControl {
    fn stop(&self, reason: StopReason) {
        let _ = self.stop.compare_exchange(
            STOP_NONE,
            reason_code(reason),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    fn stopped(&self) -> Option<StopReason> {
        if let Some(r) = code_reason(self.stop.load(Ordering::SeqCst)) {
            return Some(r);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.stop(StopReason::Deadline);
            return code_reason(self.stop.load(Ordering::SeqCst));
        }
        None
    }
}

/// The in-flight counter; an [`Admission`] holds one unit of it.
struct Gate {
    admitted: AtomicUsize,
    capacity: usize,
    idle: Notify,
    metrics: Arc<EngineMetrics>,
    /// Orders gauge updates, so that concurrent admissions and releases leave the gauge at the
    /// counter's latest value rather than at whichever update was set last.
    publish: Mutex<()>,
}

impl Gate {
    fn publish(&self) {
        let _order = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics
            .in_flight
            .set(&[], self.admitted.load(Ordering::SeqCst) as f64);
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

/// A validated request holding its admission, ready to queue.
pub struct Prepared {
    admission: Admission,
    model: Arc<LoadedModel>,
    job: GenerationJob,
    timeout: Option<Duration>,
    preview_every: Option<usize>,
}

impl Prepared {
    /// The effective settings (defaults filled in).
    pub fn job(&self) -> &GenerationJob {
        &self.job
    }

    /// Asks for preview images every `k` steps in the progress events (`parameters.preview_every`);
    /// `k` must be between 1 and the request's steps.
    pub fn with_preview_every(mut self, k: Option<i64>) -> Result<Self, EngineError> {
        let Some(k) = k else { return Ok(self) };
        let steps = self.job.num_inference_steps;
        if k < 1 || k as u64 > steps as u64 {
            return Err(EngineError::Invalid(format!(
                "parameter 'preview_every' is {k}; it must be between 1 and num_inference_steps ({steps})"
            )));
        }
        self.preview_every = Some(k as usize);
        Ok(self)
    }
}

type Reply = Result<(Vec<GeneratedImage>, Duration, Duration), EngineError>;

struct Queued {
    id: u64,
    model: Arc<LoadedModel>,
    job: GenerationJob,
    control: Arc<JobControl>,
    enqueued: Instant,
    timeout_ms: u64,
    reply: oneshot::Sender<Reply>,
    _admission: Admission,
}

impl Queued {
    /// Frees the request's slot, then answers it: a client holding its answer never sees its
    /// slot still counted in `sdserve_requests_in_flight`.
    fn answer(self, result: Reply) {
        let Queued {
            reply, _admission, ..
        } = self;
        drop(_admission);
        let _ = reply.send(result);
    }
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Queued>,
    /// Controls of jobs being generated, for shutdown.
    running: Vec<(u64, Arc<JobControl>)>,
    shutdown: bool,
}

struct Inner {
    config: EngineConfig,
    metrics: Arc<EngineMetrics>,
    registry: RwLock<Registry>,
    loader: Arc<dyn ModelLoader>,
    queue: Mutex<QueueState>,
    wake: Condvar,
    gate: Arc<Gate>,
    draining: AtomicBool,
    next_id: std::sync::atomic::AtomicU64,
}

/// Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
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
        metrics.queue_depth.set(&[], 0.0);
        metrics.in_flight.set(&[], 0.0);
        metrics.running.set(&[], 0.0);
        metrics.draining.set(&[], 0.0);
        metrics.queue_wait.touch(&[]);
        let gate = Arc::new(Gate {
            admitted: AtomicUsize::new(0),
            capacity: config.capacity(),
            idle: Notify::new(),
            metrics: metrics.clone(),
            publish: Mutex::new(()),
        });
        let inner = Arc::new(Inner {
            config: config.clone(),
            metrics,
            registry: RwLock::new(Registry::default()),
            loader,
            queue: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            gate,
            draining: AtomicBool::new(false),
            next_id: std::sync::atomic::AtomicU64::new(1),
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

    // ---- admission and inference -------------------------------------------------------

    /// Takes a slot, or refuses at once when the server is full or draining.
    pub fn admit(&self) -> Result<Admission, EngineError> {
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        let gate = &self.inner.gate;
        let mut current = gate.admitted.load(Ordering::SeqCst);
        loop {
            if current >= gate.capacity {
                return Err(EngineError::Overloaded {
                    in_flight: current,
                    capacity: gate.capacity,
                });
            }
            match gate.admitted.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        gate.publish();
        Ok(Admission {
            gate: gate.clone(),
            arrived: Instant::now(),
        })
    }

    /// Starts the model metrics of one inference request (see [`InferObserver`]).
    pub fn observer(&self, model: &str, version_label: &str) -> InferObserver {
        InferObserver {
            metrics: self.inner.metrics.clone(),
            model: model.to_owned(),
            version: version_label.to_owned(),
            queued_at: None,
            done: false,
        }
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
        let control = Arc::new(JobControl {
            stop: AtomicU8::new(STOP_NONE),
            deadline,
            started: AtomicBool::new(false),
            preview_every: preview_every.filter(|_| progress.is_some()),
            progress,
            steps: job.num_inference_steps,
        });
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::DeadlineExceeded {
                timeout_ms,
                phase: "waiting in the queue",
            });
        }

        let (tx, rx) = oneshot::channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        observer.mark_queued();
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.shutdown {
                return Err(EngineError::Shutdown);
            }
            q.jobs.push_back(Queued {
                id,
                model: model.clone(),
                job: job.clone(),
                control: control.clone(),
                enqueued: Instant::now(),
                timeout_ms,
                reply: tx,
                _admission: admission,
            });
            self.inner.metrics.queue_depth.set(&[], q.jobs.len() as f64);
        }
        self.inner.wake.notify_all();

        let mut guard = CancelOnDrop {
            inner: &self.inner,
            id,
            control: &control,
            armed: true,
        };
        let received = match deadline {
            Some(d) => match tokio::time::timeout_at(tokio::time::Instant::from_std(d), rx).await {
                Ok(r) => r,
                Err(_) => {
                    guard.armed = false;
                    control.stop(StopReason::Deadline);
                    let phase = if control.started.load(Ordering::SeqCst) {
                        "generating"
                    } else {
                        self.remove_queued(id);
                        "waiting in the queue"
                    };
                    return Err(EngineError::DeadlineExceeded { timeout_ms, phase });
                }
            },
            None => rx.await,
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

    fn remove_queued(&self, id: u64) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.retain(|j| j.id != id);
        self.inner.metrics.queue_depth.set(&[], q.jobs.len() as f64);
    }

    // ---- models -------------------------------------------------------------------------

    /// Loads (or reloads) a model on a blocking thread. A failed load leaves no entry,
    /// except that a reload failure keeps the previously loaded version.
    pub async fn load(&self, spec: ModelSpec) -> Result<(), String> {
        let previous = {
            let mut reg = self
                .inner
                .registry
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let previous = reg
                .get(&spec.name, spec.version.as_deref())
                .ok()
                .cloned()
                .filter(|s| spec.version.is_some() || s.spec().version.is_none());
            if previous.is_none() {
                reg.insert(ModelStatus::Loading(Box::new(spec.clone())));
            }
            previous
        };
        let version_label = spec.version.clone().unwrap_or_default();
        self.inner
            .metrics
            .model_ready
            .set(&[&spec.name, &version_label], 0.0);
        let loader = self.inner.loader.clone();
        let started = Instant::now();
        let spec_for_load = spec.clone();
        // A thread of its own, not the runtime's blocking pool: a load stuck on its files must
        // not hold up the runtime's shutdown when the server stops meanwhile.
        let (tx, rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("sdserve-load-{}", spec.name))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    loader.load(&spec_for_load)
                }))
                .unwrap_or_else(|p| {
                    Err(format!(
                        "model loading panicked: {}",
                        panic_message(p.as_ref())
                    ))
                });
                let _ = tx.send(result);
            });
        let result = match spawned {
            Ok(_) => rx
                .await
                .unwrap_or_else(|_| Err("the model loading thread ended without a result".into())),
            Err(e) => Err(format!("cannot start a model loading thread: {e}")),
        };
        let mut reg = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(generator) => {
                self.inner.metrics.model_load_seconds.set(
                    &[&spec.name, &version_label],
                    started.elapsed().as_secs_f64(),
                );
                self.inner
                    .metrics
                    .model_ready
                    .set(&[&spec.name, &version_label], 1.0);
                reg.insert(ModelStatus::Ready(Arc::new(LoadedModel {
                    spec,
                    generator,
                })));
                Ok(())
            }
            Err(e) => {
                match previous {
                    Some(prev) => {
                        let ready = prev.is_ready();
                        reg.insert(prev);
                        self.inner
                            .metrics
                            .model_ready
                            .set(&[&spec.name, &version_label], if ready { 1.0 } else { 0.0 });
                    }
                    None => reg.remove(&spec.name, spec.version.as_deref()),
                }
                Err(e)
            }
        }
    }

    /// Removes every version of a model; requests already running finish.
    pub fn unload(&self, name: &str) -> Result<(), EngineError> {
        let mut reg = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let versions: Vec<Option<String>> = reg
            .all()
            .filter(|s| s.spec().name == name)
            .map(|s| s.spec().version.clone())
            .collect();
        if !reg.remove_all(name) {
            return Err(EngineError::ModelNotFound {
                name: name.into(),
                version: None,
            });
        }
        for v in versions {
            self.inner
                .metrics
                .model_ready
                .set(&[name, v.as_deref().unwrap_or("")], 0.0);
        }
        Ok(())
    }

    /// Status of one model (newest version when `version` is `None`).
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name, version)
            .cloned()
    }

    /// Every registered model version.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .all()
            .cloned()
            .collect()
    }

    /// Ready for traffic: not draining, at least one model, and every model loaded.
    pub fn is_ready(&self) -> bool {
        let reg = self
            .inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner());
        !self.is_draining() && !reg.is_empty() && reg.all_ready()
    }

    // ---- draining -----------------------------------------------------------------------

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// From now on: not ready, and new requests are refused with 503.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.metrics.draining.set(&[], 1.0);
    }

    /// Waits for admitted requests to finish, up to `timeout`; then cancels what is left
    /// (queued requests at once, running ones at their next step) and waits for the workers
    /// to let go. Returns true when everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.begin_drain();
        let clean = tokio::time::timeout(timeout, self.wait_idle())
            .await
            .is_ok();
        if !clean {
            self.cancel_everything(StopReason::Shutdown);
            let _ = tokio::time::timeout(Duration::from_secs(30), self.wait_idle()).await;
        }
        clean
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.inner.gate.idle.notified();
            if self.inner.gate.admitted.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn cancel_everything(&self, reason: StopReason) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        for (_, c) in &q.running {
            c.stop(reason);
        }
        for job in q.jobs.drain(..) {
            job.control.stop(reason);
            let timeout_ms = job.timeout_ms;
            job.answer(Err(stop_error(reason, timeout_ms, "waiting in the queue")));
        }
        self.inner.metrics.queue_depth.set(&[], 0.0);
    }

    /// Stops the worker threads (after [`Engine::drain`]).
    pub fn shutdown(&self) {
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.shutdown = true;
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

fn stop_error(reason: StopReason, timeout_ms: u64, phase: &'static str) -> EngineError {
    match reason {
        StopReason::Deadline => EngineError::DeadlineExceeded { timeout_ms, phase },
        StopReason::Disconnected => EngineError::Disconnected,
        StopReason::Shutdown => EngineError::Shutdown,
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
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.retain(|j| j.id != self.id);
        self.inner.metrics.queue_depth.set(&[], q.jobs.len() as f64);
    }
}

/// Counts one inference request in the document's model families: success or failure,
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
    fn mark_queued(&mut self) {
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

/// The text of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

// ---- workers ----------------------------------------------------------------------------

fn worker_loop(inner: &Inner) {
    while let Some(batch) = next_batch(inner) {
        run_batch(inner, batch);
    }
}

/// Same model and same per-step shape: such jobs can share one UNet batch.
fn compatible(a: &Queued, b: &Queued) -> bool {
    Arc::ptr_eq(&a.model, &b.model)
        && a.job.num_inference_steps == b.job.num_inference_steps
        && a.job.guidance_scale == b.job.guidance_scale
        && a.job.height == b.job.height
        && a.job.width == b.job.width
        && a.job.scheduler == b.job.scheduler
        && a.job.eta == b.job.eta
}

/// Blocks for the next job, then (with adaptive batching) gathers compatible jobs until the
/// batch is full or `max_batch_time` has passed. `None` on shutdown.
fn next_batch(inner: &Inner) -> Option<Vec<Queued>> {
    let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
    let first = loop {
        if q.shutdown {
            return None;
        }
        if let Some(job) = q.jobs.pop_front() {
            if job.control.stopped().is_some() {
                let reason = job.control.stopped().unwrap_or(StopReason::Disconnected);
                let timeout_ms = job.timeout_ms;
                job.answer(Err(stop_error(reason, timeout_ms, "waiting in the queue")));
                continue;
            }
            break job;
        }
        q = inner.wake.wait(q).unwrap_or_else(|e| e.into_inner());
    };
    let mut batch = vec![first];
    let spec = &batch[0].model.spec;
    if spec.batching() {
        let max_images = spec.max_batch_size;
        let until = Instant::now() + spec.max_batch_time;
        loop {
            let mut images: usize = batch.iter().map(|j| j.job.images.len()).sum();
            let mut i = 0;
            while i < q.jobs.len() && images < max_images {
                let fits = compatible(&batch[0], &q.jobs[i])
                    && images + q.jobs[i].job.images.len() <= max_images;
                if fits && q.jobs[i].control.stopped().is_none() {
                    let job = q.jobs.remove(i).expect("index checked");
                    images += job.job.images.len();
                    batch.push(job);
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if images >= max_images || now >= until || q.shutdown {
                break;
            }
            q = inner
                .wake
                .wait_timeout(q, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    inner.metrics.queue_depth.set(&[], q.jobs.len() as f64);
    for job in &batch {
        job.control.started.store(true, Ordering::SeqCst);
        q.running.push((job.id, job.control.clone()));
    }
    inner.metrics.running.set(&[], q.running.len() as f64);
    Some(batch)
}

/// Stops the batch only when every member has stopped; reports progress (and previews) to
/// each member.
struct BatchControl<'a> {
    members: &'a [Arc<JobControl>],
    /// Where each member's images start in the merged job, and how many it has.
    images: Vec<(usize, usize)>,
    /// The last step each member got a preview for.
    previewed: Vec<usize>,
    previews: Option<Vec<GeneratedImage>>,
    started: Instant,
    last_step: Instant,
    step_seconds: &'a crate::metrics::Family,
    model: &'a str,
}

impl BatchControl<'_> {
    /// The step a member is at after pass `done` of `total`, if it wants a preview there
    /// (never at its last step: the result follows at once).
    fn preview_step(&self, member: usize, done: usize, total: usize) -> Option<usize> {
        let m = &self.members[member];
        let every = m.preview_every?;
        if total == 0 || m.stopped().is_some() {
            return None;
        }
        let step = done.min(total) * m.steps / total;
        (step > self.previewed[member] && step < m.steps && step.is_multiple_of(every))
            .then_some(step)
    }
}

impl StepControl for BatchControl<'_> {
    fn wants_preview(&self, done: usize, total: usize) -> bool {
        (0..self.members.len()).any(|i| self.preview_step(i, done, total).is_some())
    }

    fn preview(&mut self, images: Vec<GeneratedImage>) {
        self.previews = Some(images);
    }

    fn after_step(&mut self, done: usize, total: usize) -> ControlFlow<StopReason> {
        let now = Instant::now();
        self.step_seconds
            .observe(&[self.model], (now - self.last_step).as_secs_f64());
        self.last_step = now;
        let previews = self.previews.take();
        let mut first_reason = None;
        let mut all_stopped = true;
        for (i, m) in self.members.iter().enumerate() {
            match m.stopped() {
                Some(r) => {
                    first_reason.get_or_insert(r);
                }
                None => {
                    all_stopped = false;
                    let mut preview = Vec::new();
                    if let (Some(step), Some(images)) =
                        (self.preview_step(i, done, total), &previews)
                    {
                        let (start, count) = self.images[i];
                        preview = images
                            .iter()
                            .skip(start)
                            .take(count)
                            .map(|img| img.png.clone())
                            .collect();
                        self.previewed[i] = step;
                    }
                    if let Some(p) = &m.progress {
                        let _ = p.send(Progress {
                            step: done,
                            total,
                            elapsed: self.started.elapsed(),
                            preview,
                        });
                    }
                }
            }
        }
        match (all_stopped, first_reason) {
            (true, Some(r)) => ControlFlow::Break(r),
            _ => ControlFlow::Continue(()),
        }
    }
}

fn run_batch(inner: &Inner, batch: Vec<Queued>) {
    // Members that stopped while the batch gathered (deadline, client gone) leave before it
    // starts, so that their slots are free at once.
    let (batch, stopped): (Vec<Queued>, Vec<Queued>) = batch
        .into_iter()
        .partition(|j| j.control.stopped().is_none());
    if !stopped.is_empty() {
        let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.running
            .retain(|(id, _)| !stopped.iter().any(|j| j.id == *id));
        inner.metrics.running.set(&[], q.running.len() as f64);
        drop(q);
        for job in stopped {
            let reason = job.control.stopped().unwrap_or(StopReason::Disconnected);
            let timeout_ms = job.timeout_ms;
            job.answer(Err(stop_error(reason, timeout_ms, "waiting in the queue")));
        }
    }
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let model = batch[0].model.clone();
    let name = model.spec.name.clone();
    for job in &batch {
        let wait = (started - job.enqueued).as_secs_f64();
        inner.metrics.queue_wait.observe(&[], wait);
        inner.metrics.queue_wait_long.observe(&[], wait);
    }
    let mut merged = batch[0].job.clone();
    merged.images = batch
        .iter()
        .flat_map(|j| j.job.images.iter().cloned())
        .collect();
    inner
        .metrics
        .batch_images
        .observe(&[&name], merged.images.len() as f64);

    let controls: Vec<Arc<JobControl>> = batch.iter().map(|j| j.control.clone()).collect();
    let mut offset = 0;
    let images = batch
        .iter()
        .map(|j| {
            let n = j.job.images.len();
            offset += n;
            (offset - n, n)
        })
        .collect();
    let mut control = BatchControl {
        members: &controls,
        images,
        previewed: vec![0; controls.len()],
        previews: None,
        started,
        last_step: started,
        step_seconds: &inner.metrics.step_seconds,
        model: &name,
    };
    // A panic inside model code must fail this batch, not kill the worker.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.generator.generate(&merged, &mut control)
    }))
    .unwrap_or_else(|p| {
        Err(crate::generator::GenerateError::Internal {
            stage: "generation".into(),
            message: panic_message(p.as_ref()),
        })
    });
    let generation = started.elapsed();
    inner
        .metrics
        .generation_seconds
        .observe(&[&name], generation.as_secs_f64());

    {
        let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.running
            .retain(|(id, _)| !batch.iter().any(|j| j.id == *id));
        inner.metrics.running.set(&[], q.running.len() as f64);
    }

    match result {
        Ok(images) if images.len() == merged.images.len() => {
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
                    "model returned {} images for {} requested",
                    images.len(),
                    merged.images.len()
                ),
            };
            for job in batch {
                job.answer(Err(err.clone()));
            }
        }
        Err(e) => {
            for job in batch {
                let err = match (&e, job.control.stopped()) {
                    (_, Some(r)) => stop_error(r, job.timeout_ms, "generating"),
                    (e, None) => EngineError::from_generate(e.clone(), job.timeout_ms),
                };
                job.answer(Err(err));
            }
        }
    }
}
