//! What the request targets share: a fixed model, small limits, and the checks of a request
//! that passed the schema.

use sdserve_engine::{GenerationDefaults, Limits, ModelDescription};
use sdserve_http::convert::to_generation_request;
use sdserve_protocol::{DiffusersRequest, InferenceRequest};

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
        family: "sd1".into(),
        dtype: "f32".into(),
        device: "cpu".into(),
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

/// The contract decoder, the timeout and `resolve`, with the invariants of an accepted job.
pub fn check(request: &InferenceRequest) {
    let direct = DiffusersRequest::from_v2(request);
    let Ok((generation, options)) = to_generation_request(request) else {
        return;
    };
    assert!(
        direct.is_ok(),
        "to_generation_request accepted what from_v2 refused"
    );
    if let Ok(d) = &direct {
        assert_eq!(options.preview_every, d.preview_every);
    }
    if let Some(t) = options.timeout {
        assert!(
            !t.is_zero() && t.as_secs() <= 86_400,
            "timeout {t:?} out of range"
        );
    }
    let model = model();
    let limits = limits();
    let defaults = GenerationDefaults::default();
    let Ok(job) = generation.resolve(&model, &defaults, &limits, || 42) else {
        return;
    };

    assert!(!job.images.is_empty() && job.images.len() <= limits.max_images);
    assert!((1..=limits.max_num_inference_steps).contains(&job.num_inference_steps));
    assert!(job.height * job.width <= limits.max_pixels);
    assert!(job.height <= limits.max_height && job.width <= limits.max_width);
    assert!(job.height % model.vae_scale_factor == 0 && job.width % model.vae_scale_factor == 0);
    assert!(
        job.guidance_scale.is_finite()
            && (0.0..=limits.max_guidance_scale).contains(&job.guidance_scale)
    );
    assert!(model.schedulers.contains(&job.scheduler));
    let latent = [
        model.latent_channels,
        job.height / model.vae_scale_factor,
        job.width / model.vae_scale_factor,
    ];
    for image in &job.images {
        assert!(image.prompt.len() <= limits.max_prompt_bytes && !image.prompt.contains('\0'));
        assert!(image.negative_prompt.len() <= limits.max_prompt_bytes);
        if let Some(l) = &image.latents {
            assert_eq!(l.shape, latent);
            assert_eq!(l.data.len(), latent.iter().product::<usize>());
            assert!(l.data.iter().all(|x| x.is_finite()));
        }
    }
}
