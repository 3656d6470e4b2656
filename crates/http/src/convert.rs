//! V2 request ⇄ engine request/outcome. Pure functions, shared by every transport.

use std::time::Duration;

use base64::Engine as _;
use sdserve_engine::{GenerationRequest, InferOutcome, Progress};
use sdserve_protocol::{
    Datatype, DiffusersRequest, InferenceRequest, InferenceResponse, Parameters, ResponseOutput,
};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The only output this server produces.
pub const IMAGE_OUTPUT: &str = "image";

/// What a request asks for beyond the generation itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestOptions {
    /// Per-request deadline (`parameters.timeout`).
    pub timeout: Option<Duration>,
    /// `parameters.preview_every` (validated against the steps by the engine).
    pub preview_every: Option<i64>,
}

/// Decodes the diffusers contract into the engine request and its options.
pub fn to_generation_request(
    req: &InferenceRequest,
) -> Result<(GenerationRequest, RequestOptions), ApiError> {
    if let Some(outputs) = &req.outputs
        && let Some(o) = outputs.iter().find(|o| o.name != IMAGE_OUTPUT)
    {
        return Err(ApiError::bad_request(format!(
            "unknown output '{}'; this model produces only '{IMAGE_OUTPUT}'",
            o.name
        )));
    }
    let d = DiffusersRequest::from_v2(req).map_err(|e| ApiError::bad_request(e.0))?;
    let timeout = match d.timeout_ms {
        None => None,
        Some(ms) if ms > 0.0 && ms <= 86_400_000.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
        Some(ms) => {
            return Err(ApiError::bad_request(format!(
                "parameter 'timeout' is {ms}; it must be a positive number of milliseconds up to 86400000"
            )));
        }
    };
    let request = GenerationRequest {
        prompts: d.prompts,
        negative_prompts: d.negative_prompts,
        num_inference_steps: d.num_inference_steps,
        guidance_scale: d.guidance_scale,
        height: d.height,
        width: d.width,
        seeds: d.seeds,
        num_images_per_prompt: d.num_images_per_prompt,
        scheduler: d.scheduler,
        eta: d.eta,
        latents: d.latents.map(|l| (l.shape, l.data)),
        output_format: d.output_format,
    };
    let options = RequestOptions {
        timeout,
        preview_every: d.preview_every,
    };
    Ok((request, options))
}

/// The effective settings of a finished request, echoed in the response `parameters`.
pub fn effective_parameters(outcome: &InferOutcome) -> Parameters {
    let job = &outcome.job;
    let seeds: Vec<u64> = job.images.iter().map(|i| i.seed).collect();
    let mut p = Parameters::new();
    p.insert("seeds".into(), json!(seeds));
    p.insert("num_inference_steps".into(), json!(job.num_inference_steps));
    p.insert("guidance_scale".into(), json!(job.guidance_scale));
    p.insert("scheduler".into(), json!(job.scheduler));
    p.insert("height".into(), json!(job.height));
    p.insert("width".into(), json!(job.width));
    if job.scheduler == "ddim" {
        p.insert("eta".into(), json!(job.eta));
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

/// Builds the V2 response: one BYTES element per image, base64 PNG, in prompt order.
pub fn to_response(model_name: &str, id: String, outcome: &InferOutcome) -> InferenceResponse {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = outcome
        .images
        .iter()
        .map(|img| Value::String(b64.encode(&img.png)))
        .collect();
    let mut out_params = Parameters::new();
    out_params.insert("content_type".into(), json!("base64"));
    image_response(model_name, id, outcome, Value::Array(data), out_params)
}

/// The response with the image output (BYTES `[images, 1]`) holding `data` and `out_params`.
pub(crate) fn image_response(
    model_name: &str,
    id: String,
    outcome: &InferOutcome,
    data: Value,
    out_params: Parameters,
) -> InferenceResponse {
    InferenceResponse {
        model_name: model_name.to_owned(),
        model_version: outcome.model_version.clone(),
        id: Some(id),
        parameters: effective_parameters(outcome),
        outputs: vec![ResponseOutput {
            name: IMAGE_OUTPUT.into(),
            shape: vec![outcome.images.len() as u64, 1],
            datatype: Datatype::Bytes,
            parameters: Some(out_params),
            data,
        }],
    }
}

/// Turns the engine's progress, which counts UNet passes, into scheduler steps: one event per
/// step, `step` 1..=`num_inference_steps`, `total` = `num_inference_steps`. The two differ only
/// for PNDM (N+1 passes for N steps, more with its Runge-Kutta warm-up): pass `p` of `P`
/// completes step ⌊p·N/P⌋, so the last step is reported at the last pass.
#[derive(Debug, Clone)]
pub struct StepProgress {
    steps: usize,
    reported: usize,
}

impl StepProgress {
    pub fn new(num_inference_steps: usize) -> Self {
        Self {
            steps: num_inference_steps,
            reported: 0,
        }
    }

    /// The event for this pass, or `None` when it completes no new step.
    pub fn step(&mut self, p: &Progress) -> Option<Progress> {
        if p.total == 0 || self.steps == 0 {
            return None;
        }
        let step = (p.step.min(p.total) * self.steps) / p.total;
        if step <= self.reported {
            return None;
        }
        self.reported = step;
        Some(Progress {
            step,
            total: self.steps,
            elapsed: p.elapsed,
            preview: p.preview.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_engine::{GeneratedImage, GenerationJob, ImageSpec};

    #[test]
    fn response_has_one_base64_element_per_image() {
        let job = GenerationJob {
            images: vec![
                ImageSpec {
                    prompt: "a".into(),
                    negative_prompt: String::new(),
                    seed: 3,
                    latents: None,
                },
                ImageSpec {
                    prompt: "b".into(),
                    negative_prompt: String::new(),
                    seed: 4,
                    latents: None,
                },
            ],
            num_inference_steps: 5,
            guidance_scale: 7.5,
            height: 64,
            width: 64,
            scheduler: "pndm".into(),
            eta: 0.0,
        };
        let outcome = InferOutcome {
            images: vec![
                GeneratedImage { png: vec![1, 2, 3] },
                GeneratedImage { png: vec![4] },
            ],
            job,
            model_version: None,
            queue_wait: Duration::from_millis(1500),
            generation: Duration::from_millis(20),
        };
        let r = to_response("m", "id-1".into(), &outcome);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outputs"][0]["shape"], json!([2, 1]));
        assert_eq!(v["outputs"][0]["data"], json!(["AQID", "BA=="]));
        assert_eq!(v["parameters"]["seeds"], json!([3, 4]));
        assert_eq!(v["parameters"]["queue_seconds"], json!(1.5));
        assert!(v.get("model_version").is_none());
    }

    #[test]
    fn progress_counts_scheduler_steps() {
        let run = |steps: usize, passes: usize| -> Vec<(usize, usize)> {
            let mut s = StepProgress::new(steps);
            (1..=passes)
                .filter_map(|p| {
                    s.step(&Progress {
                        step: p,
                        total: passes,
                        elapsed: Duration::ZERO,
                        preview: Vec::new(),
                    })
                })
                .map(|p| (p.step, p.total))
                .collect()
        };
        assert_eq!(run(3, 3), [(1, 3), (2, 3), (3, 3)]);
        // PNDM without the warm-up: the first step takes two passes.
        assert_eq!(run(3, 4), [(1, 3), (2, 3), (3, 3)]);
        // PNDM's Runge-Kutta warm-up: many passes, still one event per step, the last at the end.
        for (steps, passes) in [(1, 2), (5, 14), (20, 21), (50, 51), (7, 7)] {
            let events = run(steps, passes);
            let expected: Vec<(usize, usize)> = (1..=steps).map(|k| (k, steps)).collect();
            assert_eq!(events, expected, "{steps} steps in {passes} passes");
        }
        assert!(run(0, 3).is_empty());
    }

    #[test]
    fn unknown_outputs_and_bad_timeouts_are_rejected() {
        let req = InferenceRequest::from_value(&json!({
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            "outputs": [{"name": "images"}]
        }))
        .unwrap();
        assert!(
            to_generation_request(&req)
                .unwrap_err()
                .message
                .contains("unknown output 'images'")
        );
        let req = InferenceRequest::from_value(&json!({
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            "parameters": {"timeout": -5}
        }))
        .unwrap();
        assert!(
            to_generation_request(&req)
                .unwrap_err()
                .message
                .contains("'timeout'")
        );
    }
}
