//! A first generation at load, on a GPU, before the model reports ready: the driver compiles
//! candle's PTX kernels (and cuBLAS picks its kernels) then, not during the first request.

use std::time::{Duration, Instant};

use sdserve_generation::{
    GenerateError, GenerationDefaults, GenerationRequest, Generator, Limits, MaskInput, RunToEnd,
};

use crate::image::encode_png;
use crate::pipeline::StableDiffusion;

impl StableDiffusion {
    /// One denoising step with guidance (the CFG pair) on the smallest image the model takes,
    /// through every stage a request can reach: prompt encoding, the VAE encoder where the
    /// model has one (an image-to-image start, with a mask where the UNet needs one), the UNet,
    /// the scheduler, the decoder and PNG encoding. Returns how long it took.
    pub fn warm_up(&self) -> Result<Duration, GenerateError> {
        let started = Instant::now();
        let description = self.description();
        let side = 8 * description.vae_scale_factor;
        let file = |value: u8| {
            encode_png(side, side, &vec![value; 3 * side * side]).map_err(|message| {
                GenerateError::Internal {
                    stage: "warm-up".into(),
                    message,
                }
            })
        };
        let image = match description.default_strength {
            Some(_) => Some(vec![file(128)?]),
            None => None,
        };
        let mask = match description.masks {
            MaskInput::Required => Some(vec![file(255)?]),
            MaskInput::Optional | MaskInput::NotServed => None,
        };
        let request = GenerationRequest {
            prompts: vec!["warm-up".into()],
            num_inference_steps: Some(1),
            guidance_scale: Some(2.0),
            height: Some(side as i64),
            width: Some(side as i64),
            seeds: Some(vec![0]),
            strength: image.is_some().then_some(1.0),
            images: image,
            mask_images: mask,
            ..GenerationRequest::default()
        };
        let job = request
            .resolve(
                description,
                &GenerationDefaults::default(),
                &Limits::default(),
                || 0,
            )
            .map_err(|e| GenerateError::Invalid(format!("warm-up request: {e}")))?;
        self.generate(&job, &mut RunToEnd)?;
        Ok(started.elapsed())
    }
}
