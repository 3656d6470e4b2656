//! What the request targets share: a fixed model, small limits, and the checks of a request
//! that passed the schema.

use sdserve_generation::{
    ConditioningInputs, GenerationDefaults, GenerationRequest, Limits, ModelDescription,
};
use sdserve_protocol::{InferenceRequest, TensorData, diffusers};

pub fn model() -> ModelDescription {
    ModelDescription {
        native_height: 64,
        native_width: 64,
        vae_scale_factor: 8,
        latent_channels: 4,
        default_scheduler: "pndm".into(),
        schedulers: [
            "pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "lms", "unipc",
        ]
        .map(String::from)
        .to_vec(),
        // SDXL's conditioning, so that its extra fields are fuzzed too.
        family: "sdxl".into(),
        conditioning: ConditioningInputs::PromptsAndSizes,
        default_strength: Some(sdserve_generation::DefaultStrength::SD),
        masks: sdserve_generation::MaskInput::Optional,
        dtype: "f32".into(),
        device: "cpu".into(),
        adapters: Vec::new(),
    }
}

pub fn limits() -> Limits {
    // Small limits, so that the checks at the edges are reachable from short inputs.
    Limits {
        max_num_inference_steps: 50,
        max_prompts: 4,
        max_images: 6,
        max_height: 256,
        max_width: 512,
        max_pixels: 256 * 256,
        max_prompt_bytes: 64,
        max_guidance_scale: 30.0,
    }
}

/// The contract decoder (with the timeout) and `resolve`, with the invariants of an accepted
/// request and job.
#[allow(dead_code)] // the OpenAI target decodes its own contract
pub fn check(request: &InferenceRequest) {
    for input in &request.inputs {
        if let TensorData::Bytes(elements) = &input.data {
            assert!(elements.iter().all(|e| e.len() <= u32::MAX as usize));
        }
    }
    let Ok(decoded) = diffusers::decode(request) else {
        return;
    };
    if let Some(t) = decoded.options.timeout {
        assert!(
            !t.is_zero() && t.as_secs() <= 86_400,
            "timeout {t:?} out of range"
        );
    }
    check_job(decoded.generation);
}

/// `resolve` of a decoded request, with the invariants of an accepted job.
pub fn check_job(generation: GenerationRequest) {
    let model = model();
    let limits = limits();
    let defaults = GenerationDefaults::default();
    let Ok(job) = generation.resolve(&model, &defaults, &limits, || 42) else {
        return;
    };

    assert!(!job.images.is_empty() && job.images.len() <= limits.max_images);
    let s = &job.settings;
    assert!((1..=limits.max_num_inference_steps).contains(&s.num_inference_steps));
    assert!(s.height * s.width <= limits.max_pixels);
    assert!(s.height <= limits.max_height && s.width <= limits.max_width);
    assert!(s.height % model.vae_scale_factor == 0 && s.width % model.vae_scale_factor == 0);
    assert!(
        s.guidance_scale.is_finite() && (0.0..=limits.max_guidance_scale).contains(&s.guidance_scale)
    );
    assert!(model.schedulers.contains(&s.scheduler));
    let latent = [
        model.latent_channels,
        s.height / model.vae_scale_factor,
        s.width / model.vae_scale_factor,
    ];
    for image in &job.images {
        assert!(image.prompt.len() <= limits.max_prompt_bytes && !image.prompt.contains('\0'));
        for text in [&image.negative_prompt, &image.prompt_2, &image.negative_prompt_2]
            .into_iter()
            .flatten()
        {
            assert!(text.len() <= limits.max_prompt_bytes);
        }
        if let Some(l) = &image.latents {
            assert_eq!(l.shape, latent);
            assert_eq!(l.data.len(), latent.iter().product::<usize>());
            assert!(l.data.iter().all(|x| x.is_finite()));
        }
    }
}
