//! Where image-to-image starts: the input images as diffusers' `VaeImageProcessor.preprocess`
//! makes them (`2 · (u8 / 255) − 1`, channels first), encoded by the VAE, a latent drawn from
//! the encoder's distribution and multiplied by the scaling factor (diffusers'
//! `retrieve_latents` with `sample_mode="sample"`), then noised to the first timestep that runs.

use candle_core::{DType, Device, Tensor};
use sdserve_generation::{GenerateError, Job};

use crate::error::internal;
use crate::noise::NoiseSource;
use crate::vae::Vae;

/// The job's input images as one `(B, 3, H, W)` F32 tensor in `[-1, 1]`.
pub fn image_tensor(job: &Job, device: &Device) -> Result<Tensor, GenerateError> {
    let (h, w) = (job.settings.height, job.settings.width);
    let plane = h * w;
    let mut data = Vec::with_capacity(job.images.len() * 3 * plane);
    for (i, spec) in job.images.iter().enumerate() {
        let image = spec.image.as_ref().ok_or_else(|| {
            GenerateError::Invalid(format!("image {i}: image-to-image needs an input image"))
        })?;
        if (image.width, image.height) != (w, h) {
            return Err(GenerateError::Invalid(format!(
                "image {i}: the input image is {}×{}, the job is {w}×{h}",
                image.width, image.height
            )));
        }
        for c in 0..3 {
            data.extend(
                image.rgb[c..]
                    .iter()
                    .step_by(3)
                    .map(|&v| 2.0f32 * (f32::from(v) / 255.0) - 1.0),
            );
        }
    }
    Tensor::from_vec(data, (job.images.len(), 3, h, w), device).map_err(internal("input images"))
}

/// The clean latents `(B, C, h, w)` (F32, times the scaling factor) of the job's input images:
/// one draw per image from the encoder's distribution, taken from `noise`.
pub fn image_latents(
    vae: &Vae,
    job: &Job,
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, GenerateError> {
    encode_latents(vae, &image_tensor(job, device)?, device, noise)
}

/// The same for images `(B, 3, H, W)` in `[-1, 1]` (diffusers' `_encode_vae_image`).
pub fn encode_latents(
    vae: &Vae,
    images: &Tensor,
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, GenerateError> {
    let stage = "vae encode";
    let dist = images
        .to_dtype(vae.dtype())
        .and_then(|x| vae.encode(&x))
        .map_err(internal(stage))?;
    let eps = noise
        .randn(dist.mean.shape(), device)
        .and_then(|e| e.to_dtype(dist.mean.dtype()))
        .map_err(internal(stage))?;
    dist.sample(&eps)
        .and_then(|z| z.to_dtype(DType::F32))
        .and_then(|z| z * vae.config().scaling_factor)
        .map_err(internal(stage))
}
