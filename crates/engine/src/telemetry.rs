//! The engine's metric families: the model and queue families of the metrics contract
//! (`docs/metrics.md`, from the monitoring document) plus our `sdserve_*` extras.

use std::sync::Arc;

use crate::metrics::{DEFAULT_BUCKETS, Family, LONG_BUCKETS, Registry};

/// Buckets for one denoising step (milliseconds on GPU, seconds on CPU).
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

pub struct EngineMetrics {
    pub success: Arc<Family>,
    pub failure: Arc<Family>,
    pub duration: Arc<Family>,
    pub queue_wait: Arc<Family>,
    pub queue_depth: Arc<Family>,
    pub in_flight: Arc<Family>,
    pub running: Arc<Family>,
    pub capacity: Arc<Family>,
    pub failures_by_reason: Arc<Family>,
    pub request_seconds: Arc<Family>,
    pub queue_wait_long: Arc<Family>,
    pub generation_seconds: Arc<Family>,
    pub step_seconds: Arc<Family>,
    pub images: Arc<Family>,
    pub batch_images: Arc<Family>,
    pub model_load_seconds: Arc<Family>,
    pub model_ready: Arc<Family>,
    pub draining: Arc<Family>,
}

impl EngineMetrics {
    pub fn register(r: &Registry) -> Self {
        let mv = &["model", "version"][..];
        Self {
            success: r.counter("model_infer_request_success_total", "Model infer request success count", mv),
            failure: r.counter("model_infer_request_failure_total", "Model infer request failure count", mv),
            duration: r.summary("model_infer_request_duration", "Model infer request duration", mv),
            queue_wait: r.histogram(
                "parallel_request_queue",
                "Seconds each generation request waited in the parallel request queue",
                &[],
                DEFAULT_BUCKETS,
            ),
            queue_depth: r.gauge("sdserve_queue_depth", "Generation requests waiting in the queue", &[]),
            in_flight: r.gauge(
                "sdserve_requests_in_flight",
                "Generation requests admitted: queued, running, or being decoded",
                &[],
            ),
            running: r.gauge("sdserve_requests_running", "Generation requests being generated right now", &[]),
            capacity: r.gauge(
                "sdserve_queue_capacity",
                "Most generation requests admitted at once (parallel_workers + max_queue_size)",
                &[],
            ),
            failures_by_reason: r.counter(
                "sdserve_request_failures_total",
                "Failed inference requests by reason",
                &["model", "reason"],
            ),
            request_seconds: r.histogram(
                "sdserve_request_duration_seconds",
                "Seconds from queueing to result, like model_infer_request_duration but with buckets up to 20 minutes",
                &["model"],
                LONG_BUCKETS,
            ),
            queue_wait_long: r.histogram(
                "sdserve_queue_wait_seconds",
                "Seconds waited in the queue, with buckets up to 20 minutes",
                &[],
                LONG_BUCKETS,
            ),
            generation_seconds: r.histogram(
                "sdserve_generation_seconds",
                "Seconds a worker spent generating one request (text encoding to PNG)",
                &["model"],
                LONG_BUCKETS,
            ),
            step_seconds: r.histogram(
                "sdserve_denoise_step_seconds",
                "Seconds per denoising step (one UNet pass for the whole batch)",
                &["model"],
                STEP_BUCKETS,
            ),
            images: r.counter("sdserve_images_generated_total", "Images generated", &["model"]),
            batch_images: r.histogram(
                "sdserve_batch_images",
                "Images per batch handed to the model",
                &["model"],
                BATCH_BUCKETS,
            ),
            model_load_seconds: r.gauge(
                "sdserve_model_load_seconds",
                "Seconds the last load of the model took",
                &["model", "version"],
            ),
            model_ready: r.gauge("sdserve_model_ready", "1 when the model is loaded and ready", &["model", "version"]),
            draining: r.gauge("sdserve_draining", "1 while the server drains before shutting down", &[]),
        }
    }
}
