//! The queue, workers, deadlines, cancellation, batching and drain, driven through the public
//! API with a generator that only sleeps per step (the engine must not care what a model does).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sdserve_engine::metrics::Registry;
use sdserve_engine::*;
use sdserve_generation::*;

struct SleepyModel {
    desc: ModelDescription,
    step: Duration,
    calls: Arc<Mutex<Vec<usize>>>,
    steps_run: Arc<AtomicUsize>,
    memory: MemoryUse,
}

/// What the fake model says about memory, and how many generations ran at once at most.
#[derive(Clone, Default)]
struct MemoryUse {
    per_image: u64,
    weights: u64,
    running: Arc<AtomicUsize>,
    most_running: Arc<AtomicUsize>,
}

impl Generator for SleepyModel {
    fn description(&self) -> &ModelDescription {
        &self.desc
    }

    fn generate(
        &self,
        job: &Job,
        control: &mut dyn StepControl,
    ) -> Result<Vec<GeneratedImage>, GenerateError> {
        self.calls.lock().unwrap().push(job.images.len());
        if job.images.iter().any(|i| i.prompt == "panic") {
            panic!("the model broke on purpose");
        }
        let m = &self.memory;
        let now = m.running.fetch_add(1, Ordering::SeqCst) + 1;
        m.most_running.fetch_max(now, Ordering::SeqCst);
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _done = Done(&m.running);
        for i in 0..job.settings.num_inference_steps {
            if i == 2 && job.images.iter().any(|i| i.prompt == "panic midway") {
                panic!("the model broke in the middle of a batch");
            }
            std::thread::sleep(self.step);
            self.steps_run.fetch_add(1, Ordering::SeqCst);
            if let ControlFlow::Break(r) =
                control.after_step(i + 1, job.settings.num_inference_steps)
            {
                return Err(GenerateError::Stopped(r));
            }
        }
        if job
            .images
            .iter()
            .any(|i| i.prompt == "device out of memory")
        {
            // What candle returns when a CUDA allocation fails: an error, not an abort.
            return Err(GenerateError::Internal {
                stage: "vae decode".into(),
                message: "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
            });
        }
        Ok(job
            .images
            .iter()
            .map(|im| GeneratedImage {
                png: format!("{}:{}", im.prompt, im.seed).into_bytes(),
            })
            .collect())
    }

    fn weights_bytes(&self) -> u64 {
        self.memory.weights
    }

    fn working_set(&self, _settings: &JobSettings, images: usize) -> u64 {
        self.memory.per_image * images as u64
    }
}

struct Loader {
    step: Duration,
    calls: Arc<Mutex<Vec<usize>>>,
    steps_run: Arc<AtomicUsize>,
    load_delay: Duration,
    memory: MemoryUse,
}

impl ModelLoader for Loader {
    fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Generator>, String> {
        std::thread::sleep(self.load_delay);
        if spec.name == "broken" {
            return Err("cannot read weights".into());
        }
        Ok(Arc::new(SleepyModel {
            desc: ModelDescription {
                native_height: 64,
                native_width: 64,
                vae_scale_factor: 8,
                latent_channels: 4,
                default_scheduler: "pndm".into(),
                schedulers: vec!["pndm".into(), "ddim".into()],
                family: "sd1".into(),
                conditioning: Default::default(),
                default_strength: None,
                masks: Default::default(),
                dtype: "f32".into(),
                device: "cpu".into(),
                adapters: Vec::new(),
            },
            step: self.step,
            calls: self.calls.clone(),
            steps_run: self.steps_run.clone(),
            memory: self.memory.clone(),
        }))
    }
}

struct Fixture {
    engine: Engine,
    registry: Arc<Registry>,
    calls: Arc<Mutex<Vec<usize>>>,
    steps_run: Arc<AtomicUsize>,
}

fn spec(name: &str) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version: None,
        uri: PathBuf::from("/nowhere"),
        extra: Default::default(),
        platform: String::new(),
        versions: vec![],
        content_type: None,
        max_batch_size: 0,
        max_batch_time: Duration::ZERO,
        defaults: GenerationDefaults {
            num_inference_steps: 4,
            ..Default::default()
        },
        limits: Limits::default(),
        adapters: Vec::new(),
    }
}

async fn fixture(
    workers: usize,
    queue: usize,
    step_ms: u64,
    timeout: Option<Duration>,
    model: ModelSpec,
) -> Fixture {
    let registry = Arc::new(Registry::new());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let steps_run = Arc::new(AtomicUsize::new(0));
    let loader = Arc::new(Loader {
        step: Duration::from_millis(step_ms),
        calls: calls.clone(),
        steps_run: steps_run.clone(),
        load_delay: Duration::ZERO,
        memory: MemoryUse::default(),
    });
    let engine = Engine::new(
        EngineConfig {
            parallel_workers: workers,
            max_queue_size: queue,
            request_timeout: timeout,
            memory_budget: sdserve_engine::MemoryBudget::Off,
        },
        loader,
        &registry,
    );
    engine.load(model).await.unwrap();
    Fixture {
        engine,
        registry,
        calls,
        steps_run,
    }
}

fn request(prompt: &str) -> GenerationRequest {
    GenerationRequest {
        prompts: vec![prompt.into()],
        seeds: Some(vec![1]),
        ..Default::default()
    }
}

async fn infer(
    engine: &Engine,
    req: GenerationRequest,
    timeout: Option<Duration>,
) -> Result<InferOutcome, EngineError> {
    let admission = engine.admit()?;
    let mut obs = engine.observer("m", "None");
    let r = engine
        .infer(admission, &mut obs, "m", None, &req, timeout, None)
        .await;
    obs.finish(r.as_ref().map(|o| o.images.len()));
    r
}

fn metric(registry: &Registry, line_start: &str) -> f64 {
    let text = registry.render();
    let line = text
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bound_refuses_at_once_and_waits_are_observed() {
    let f = fixture(1, 1, 40, None, spec("m")).await;
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let e = f.engine.clone();
            tokio::spawn(async move { infer(&e, request(&format!("p{i}")), None).await })
        })
        .collect();
    let mut ok = 0;
    let mut overloaded = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(o) => {
                assert_eq!(o.images.len(), 1);
                ok += 1;
            }
            Err(EngineError::Overloaded { capacity: 2, .. }) => overloaded += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, overloaded), (2, 3));
    assert_eq!(
        metric(
            &f.registry,
            "model_infer_request_success_total{model=\"m\",version=\"None\"}"
        ),
        2.0
    );
    assert_eq!(metric(&f.registry, "parallel_request_queue_count"), 2.0);
    // The second request waited for the first one's 4 steps of 40 ms.
    assert!(metric(&f.registry, "parallel_request_queue_sum") > 0.1);
    assert_eq!(metric(&f.registry, "sdserve_requests_in_flight"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_while_queued_and_while_running() {
    let f = fixture(1, 4, 50, None, spec("m")).await;
    let e = f.engine.clone();
    let long = tokio::spawn(async move {
        infer(
            &e,
            GenerationRequest {
                num_inference_steps: Some(20),
                ..request("long")
            },
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t0 = Instant::now();
    let queued = infer(&f.engine, request("q"), Some(Duration::from_millis(100))).await;
    assert!(
        matches!(
            queued,
            Err(EngineError::DeadlineExceeded {
                phase: "waiting in the queue",
                ..
            })
        ),
        "{queued:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(400));
    let running = long.await.unwrap();
    assert!(running.is_ok());

    let t0 = Instant::now();
    let r = infer(
        &f.engine,
        GenerationRequest {
            num_inference_steps: Some(50),
            ..request("r")
        },
        Some(Duration::from_millis(120)),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(EngineError::DeadlineExceeded {
                phase: "generating",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(400));
    // The worker stops within a step: a new request starts promptly.
    let t0 = Instant::now();
    infer(
        &f.engine,
        GenerationRequest {
            num_inference_steps: Some(1),
            ..request("after")
        },
        None,
    )
    .await
    .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        metric(
            &f.registry,
            "sdserve_request_failures_total{model=\"m\",reason=\"deadline\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_request_cancels_the_generation() {
    let f = fixture(1, 4, 30, None, spec("m")).await;
    let e = f.engine.clone();
    let running = tokio::spawn(async move {
        infer(
            &e,
            GenerationRequest {
                num_inference_steps: Some(100),
                ..request("gone")
            },
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.abort();
    let t0 = Instant::now();
    infer(
        &f.engine,
        GenerationRequest {
            num_inference_steps: Some(1),
            ..request("next")
        },
        None,
    )
    .await
    .unwrap();
    // 100 steps would take 3 s; the slot frees within about one step.
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert!(f.steps_run.load(Ordering::SeqCst) < 20);
    assert_eq!(
        metric(
            &f.registry,
            "model_infer_request_failure_total{model=\"m\",version=\"None\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_requests_share_a_batch() {
    let mut s = spec("m");
    s.max_batch_size = 4;
    s.max_batch_time = Duration::from_millis(300);
    let f = fixture(1, 8, 10, None, s).await;
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let e = f.engine.clone();
            tokio::spawn(async move { infer(&e, request(&format!("p{i}")), None).await })
        })
        .collect();
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(String::from_utf8(t.await.unwrap().unwrap().images[0].png.clone()).unwrap());
    }
    outputs.sort();
    assert_eq!(outputs, ["p0:1", "p1:1", "p2:1"]);
    assert_eq!(*f.calls.lock().unwrap(), vec![3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_refuses_new_work() {
    let f = fixture(1, 4, 40, None, spec("m")).await;
    let e = f.engine.clone();
    let in_flight = tokio::spawn(async move { infer(&e, request("a"), None).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    f.engine.begin_drain();
    assert!(!f.engine.is_ready());
    assert!(matches!(f.engine.admit(), Err(EngineError::Draining)));
    assert!(f.engine.drain(Duration::from_secs(5)).await);
    assert!(in_flight.await.unwrap().is_ok());
    f.engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cancels_what_is_left() {
    let f = fixture(1, 4, 50, None, spec("m")).await;
    let e = f.engine.clone();
    let running = tokio::spawn(async move {
        infer(
            &e,
            GenerationRequest {
                num_inference_steps: Some(100),
                ..request("a")
            },
            None,
        )
        .await
    });
    let e = f.engine.clone();
    let queued = tokio::spawn(async move { infer(&e, request("b"), None).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(!f.engine.drain(Duration::from_millis(100)).await);
    assert!(matches!(running.await.unwrap(), Err(EngineError::Shutdown)));
    assert!(matches!(queued.await.unwrap(), Err(EngineError::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_unready_and_invalid_requests() {
    let registry = Registry::new();
    let loader = Arc::new(Loader {
        step: Duration::from_millis(1),
        calls: Default::default(),
        steps_run: Default::default(),
        load_delay: Duration::from_millis(300),
        memory: MemoryUse::default(),
    });
    let engine = Engine::new(
        EngineConfig {
            parallel_workers: 1,
            max_queue_size: 2,
            request_timeout: None,
            memory_budget: sdserve_engine::MemoryBudget::Off,
        },
        loader,
        &registry,
    );
    assert!(!engine.is_ready());
    let e = engine.clone();
    let loading = tokio::spawn(async move { e.load(spec("m")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = infer(&engine, request("a"), None).await;
    assert_eq!(r.unwrap_err().to_string(), "Model m is not ready yet.");
    loading.await.unwrap().unwrap();
    assert!(engine.is_ready());
    let admission = engine.admit().unwrap();
    let mut obs = engine.observer("nope", "None");
    let r = engine
        .infer(admission, &mut obs, "nope", None, &request("a"), None, None)
        .await;
    assert_eq!(r.unwrap_err().to_string(), "Model nope not found");
    let r = infer(
        &engine,
        GenerationRequest {
            scheduler: Some("heun".into()),
            ..request("a")
        },
        None,
    )
    .await;
    assert!(matches!(r, Err(EngineError::Invalid(m)) if m.contains("heun")));
    assert!(
        engine
            .load(spec("broken"))
            .await
            .unwrap_err()
            .contains("cannot read weights")
    );
    assert!(matches!(
        engine.model("broken", None),
        Err(EngineError::ModelNotFound { .. })
    ));
    engine.unload("m").unwrap();
    assert!(matches!(
        engine.unload("m"),
        Err(EngineError::ModelNotFound { .. })
    ));
    assert!(!engine.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_expires_while_its_batch_gathers_never_runs() {
    let mut s = spec("m");
    s.max_batch_size = 4;
    s.max_batch_time = Duration::from_millis(400);
    let f = fixture(1, 4, 10, None, s).await;
    let r = infer(&f.engine, request("late"), Some(Duration::from_millis(100))).await;
    assert!(
        matches!(r, Err(EngineError::DeadlineExceeded { .. })),
        "{r:?}"
    );
    // The batch window closes; the expired member leaves before any generation starts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        f.calls.lock().unwrap().is_empty(),
        "{:?}",
        f.calls.lock().unwrap()
    );
    assert_eq!(metric(&f.registry, "sdserve_requests_in_flight"), 0.0);
    assert_eq!(metric(&f.registry, "sdserve_requests_running"), 0.0);
    infer(&f.engine, request("next"), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_too_far_to_represent_is_no_deadline() {
    let f = fixture(1, 1, 1, Some(Duration::MAX), spec("m")).await;
    let r = infer(
        &f.engine,
        request("patient"),
        Some(Duration::from_secs(u64::MAX / 2)),
    )
    .await;
    assert_eq!(r.unwrap().images.len(), 1);
}

/// Everything logged in this test process, once [`capture_logs`] has run.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

/// Routes this process's logs (every thread's) into a buffer.
fn capture_logs() -> LogBuffer {
    let buffer = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(buffer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("one log capture per process");
    buffer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_model_fails_its_request_is_logged_once_and_the_worker_goes_on() {
    let logs = capture_logs();
    sdserve_engine::panics::install_hook();
    let f = fixture(1, 2, 1, None, spec("m")).await;
    let r = infer(&f.engine, request("panic"), None).await;
    match r {
        Err(EngineError::Internal { stage, message }) => {
            assert_eq!(stage, "generation");
            assert_eq!(message, "the model broke on purpose");
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    // The worker survived: the next request is served.
    assert_eq!(
        infer(&f.engine, request("fine"), None)
            .await
            .unwrap()
            .images
            .len(),
        1
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // Only this test's panic (others in this process panic on purpose too).
    let logged: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("panicked") && l.contains("the model broke on purpose"))
        .collect();
    assert_eq!(logged.len(), 1, "{text}");
    for needle in [
        "model=m",
        "stage=generation",
        "the model broke on purpose",
        "at=crates/engine/tests/engine.rs:",
    ] {
        assert!(
            logged[0].contains(needle),
            "{needle:?} not in {:?}",
            logged[0]
        );
    }
    assert_eq!(
        metric(
            &f.registry,
            "sdserve_request_failures_total{model=\"m\",reason=\"internal\"}"
        ),
        1.0
    );
}

// ---- faults under load ----------------------------------------------------------------------

/// Three requests: the first running, two queued behind it.
fn three_in_flight(
    engine: &Engine,
) -> Vec<tokio::task::JoinHandle<Result<InferOutcome, EngineError>>> {
    (0..3)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move { infer(&e, request(&format!("r{i}")), None).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_a_model_lets_its_running_and_queued_requests_finish_and_refuses_new_ones() {
    let f = fixture(1, 4, 40, None, spec("m")).await;
    let pending = three_in_flight(&f.engine);
    wait_for(|| f.steps_run.load(Ordering::SeqCst) >= 1).await;
    f.engine.unload("m").unwrap();
    let refused = infer(&f.engine, request("late"), None).await;
    assert_eq!(
        refused.unwrap_err(),
        EngineError::ModelNotFound {
            name: "m".into(),
            version: None
        }
    );
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().images.len(), 1);
    }
    // Its weights leave the budget once the last request let go of the model.
    assert_eq!(f.engine.memory("cpu").weights, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_a_model_serves_what_was_queued_and_new_requests_go_to_the_new_load() {
    let f = fixture(1, 4, 40, None, spec("m")).await;
    let pending = three_in_flight(&f.engine);
    wait_for(|| f.steps_run.load(Ordering::SeqCst) >= 1).await;
    f.engine.load(spec("m")).await.unwrap();
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().images.len(), 1);
    }
    assert_eq!(
        infer(&f.engine, request("after"), None)
            .await
            .unwrap()
            .images
            .len(),
        1
    );
    assert_eq!(f.engine.models().len(), 1);
    assert!(f.engine.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_middle_of_a_batch_fails_that_batch_and_the_queue_behind_it_is_served() {
    sdserve_engine::panics::install_hook();
    let batched = ModelSpec {
        max_batch_size: 4,
        max_batch_time: Duration::from_millis(300),
        ..spec("m")
    };
    let f = fixture(1, 8, 20, None, batched).await;
    let mut batch = Vec::new();
    for prompt in ["panic midway", "mate"] {
        let e = f.engine.clone();
        batch.push(tokio::spawn(async move {
            infer(&e, request(prompt), None).await
        }));
    }
    // Behind it, once the pair has started, requests with other settings (another batch each
    // time); submitted earlier, one could reach the queue before the pair's second member.
    wait_for(|| !f.calls.lock().unwrap().is_empty()).await;
    let mut behind = Vec::new();
    for steps in [2, 3, 5] {
        let e = f.engine.clone();
        let req = GenerationRequest {
            num_inference_steps: Some(steps),
            ..request("behind")
        };
        behind.push(tokio::spawn(async move { infer(&e, req, None).await }));
    }
    for b in batch {
        match b.await.unwrap() {
            Err(EngineError::Internal { stage, message }) => {
                assert_eq!(stage, "generation");
                assert_eq!(message, "the model broke in the middle of a batch");
            }
            other => panic!("the broken batch's members fail: {other:?}"),
        }
    }
    for b in behind {
        assert_eq!(b.await.unwrap().unwrap().images.len(), 1);
    }
    assert_eq!(
        f.calls.lock().unwrap().first(),
        Some(&2),
        "the two shared a batch"
    );
}

/// An engine whose model takes 50 bytes of weights and 100 bytes per image, under a budget of
/// 200 bytes: 150 bytes for batches beside the weights, one image at a time.
async fn engine_on_a_budget(workers: usize, step: Duration) -> (Engine, MemoryUse) {
    let memory = MemoryUse {
        per_image: 100,
        weights: 50,
        ..Default::default()
    };
    let loader = Arc::new(Loader {
        step,
        calls: Default::default(),
        steps_run: Default::default(),
        load_delay: Duration::ZERO,
        memory: memory.clone(),
    });
    let engine = Engine::new(
        EngineConfig {
            parallel_workers: workers,
            max_queue_size: 4,
            request_timeout: None,
            memory_budget: MemoryBudget::Bytes(200),
        },
        loader,
        &Registry::new(),
    );
    engine.load(spec("m")).await.unwrap();
    (engine, memory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_runs_what_fits_one_at_a_time_and_refuses_what_never_fits() {
    let (engine, memory) = engine_on_a_budget(2, Duration::from_millis(30)).await;
    assert_eq!(engine.memory("cpu").weights, 50);
    let pending = three_in_flight(&engine);
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().images.len(), 1);
    }
    assert_eq!(
        memory.most_running.load(Ordering::SeqCst),
        1,
        "two workers, but memory for one batch"
    );
    assert_eq!(
        engine.memory("cpu").reserved,
        0,
        "every batch gave its memory back"
    );
    let two = GenerationRequest {
        num_images_per_prompt: Some(2),
        ..request("two")
    };
    match infer(&engine, two, None).await {
        Err(EngineError::Invalid(m)) => assert!(
            m.contains("2 image(s) needs an estimated 200 bytes") && m.contains("150 bytes"),
            "{m}"
        ),
        other => panic!("a request that can never fit is invalid: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_error_such_as_device_out_of_memory_fails_its_job_naming_the_stage_and_frees_its_reservation()
 {
    let (engine, _) = engine_on_a_budget(1, Duration::from_millis(5)).await;
    match infer(&engine, request("device out of memory"), None).await {
        Err(EngineError::Internal { stage, message }) => {
            assert_eq!(stage, "vae decode");
            assert!(message.contains("OUT_OF_MEMORY"), "{message}");
        }
        other => panic!("expected an internal error naming the stage, got {other:?}"),
    }
    assert_eq!(
        engine.memory("cpu").reserved,
        0,
        "the failed job's memory is free"
    );
    let next = infer(&engine, request("fine"), None).await.unwrap();
    assert_eq!(next.images.len(), 1, "the next request is served");
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
