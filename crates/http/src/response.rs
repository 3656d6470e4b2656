//! A finished request as V2 JSON: one BYTES element per image, base64 PNG, in prompt order,
//! and the effective settings in `parameters`.

use base64::Engine as _;
use sdserve_protocol::{Datatype, IMAGE_OUTPUT, InferenceResponse, Parameters, ResponseOutput};
use sdserve_serving::Generated;
use serde_json::{Value, json};

/// The JSON response: images as base64 strings.
pub fn to_response(generated: &Generated) -> InferenceResponse {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = generated
        .pngs()
        .map(|png| Value::String(b64.encode(png)))
        .collect();
    let mut out_params = Parameters::new();
    out_params.insert("content_type".into(), json!("base64"));
    image_response(generated, Value::Array(data), out_params)
}

/// The response with the image output (BYTES `[images, 1]`) holding `data` and `out_params`.
pub(crate) fn image_response(
    generated: &Generated,
    data: Value,
    out_params: Parameters,
) -> InferenceResponse {
    InferenceResponse {
        model_name: generated.model.clone(),
        model_version: generated.model_version().map(str::to_owned),
        id: Some(generated.id.clone()),
        parameters: generated.parameters(),
        outputs: vec![ResponseOutput {
            name: IMAGE_OUTPUT.into(),
            shape: vec![generated.image_count() as u64, 1],
            datatype: Datatype::Bytes,
            parameters: Some(out_params),
            data,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_engine::InferOutcome;
    use sdserve_generation::{GeneratedImage, ImageSpec, Job, JobSettings};
    use std::time::Duration;

    #[test]
    fn response_has_one_base64_element_per_image() {
        let image = |prompt: &str, seed| ImageSpec::new(prompt, seed);
        let job = Job {
            settings: JobSettings {
                num_inference_steps: 5,
                guidance_scale: 7.5,
                height: 64,
                width: 64,
                scheduler: "pndm".into(),
                eta: 0.0,
                time_ids: None,
                image_to_image: None,
                adapters: sdserve_generation::AdapterChoice::none(),
            },
            images: vec![image("a", 3), image("b", 4)],
        };
        let generated = Generated {
            id: "id-1".into(),
            model: "m".into(),
            outcome: InferOutcome {
                images: vec![
                    GeneratedImage { png: vec![1, 2, 3] },
                    GeneratedImage { png: vec![4] },
                ],
                job,
                model_version: None,
                queue_wait: Duration::from_millis(1500),
                generation: Duration::from_millis(20),
            },
        };
        let v = serde_json::to_value(to_response(&generated)).unwrap();
        assert_eq!(v["outputs"][0]["shape"], json!([2, 1]));
        assert_eq!(v["outputs"][0]["data"], json!(["AQID", "BA=="]));
        assert_eq!(v["parameters"]["seeds"], json!([3, 4]));
        assert_eq!(v["parameters"]["queue_seconds"], json!(1.5));
        assert!(v.get("model_version").is_none());
    }
}
