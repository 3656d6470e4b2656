//! A finished request and the effective settings every answer echoes in `parameters`.

use std::time::Duration;

use sdserve_engine::InferOutcome;
use sdserve_protocol::Parameters;
use serde_json::json;

/// A request's images and how they were made.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: String,
    pub model: String,
    pub outcome: InferOutcome,
}

impl Generated {
    /// The PNG files, in prompt order.
    pub fn pngs(&self) -> impl Iterator<Item = &[u8]> {
        self.outcome.images.iter().map(|i| i.png.as_slice())
    }

    pub fn image_count(&self) -> usize {
        self.outcome.images.len()
    }

    pub fn model_version(&self) -> Option<&str> {
        self.outcome.model_version.as_deref()
    }

    pub fn parameters(&self) -> Parameters {
        effective_parameters(&self.outcome)
    }
}

/// The effective settings of a finished request (defaults filled in), and its timings.
pub fn effective_parameters(outcome: &InferOutcome) -> Parameters {
    let s = &outcome.job.settings;
    let seeds: Vec<u64> = outcome.job.images.iter().map(|i| i.seed).collect();
    let mut p = Parameters::new();
    p.insert("seeds".into(), json!(seeds));
    p.insert("num_inference_steps".into(), json!(s.num_inference_steps));
    p.insert("guidance_scale".into(), json!(s.guidance_scale));
    p.insert("scheduler".into(), json!(s.scheduler));
    p.insert("height".into(), json!(s.height));
    p.insert("width".into(), json!(s.width));
    if s.uses_eta() {
        p.insert("eta".into(), json!(s.eta));
    }
    if let Some(mode) = s.image_to_image {
        p.insert("strength".into(), json!(mode.strength));
        p.insert("steps_run".into(), json!(s.steps_to_run()));
    }
    p.insert("queue_seconds".into(), json!(round_ms(outcome.queue_wait)));
    p.insert(
        "generation_seconds".into(),
        json!(round_ms(outcome.generation)),
    );
    p
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
