//! Inpainting as diffusers' `StableDiffusionInpaintPipeline` runs it: the mask (1 = repaint)
//! at latent size is the full-size mask sampled at every `f`-th pixel (torch's nearest
//! `interpolate`). A 9-channel inpainting UNet reads the mask and the latents of the masked
//! image (the image with the repainted region set to 0) beside the latents at every step; a
//! plain 4-channel UNet denoises the whole image and after every step the known region is put
//! back, noised to the next step's level (clean after the last).

use candle_core::{DType, Device, Tensor};
use sdserve_generation::{GenerateError, Job};

use crate::error::internal;
use crate::image_to_image::{encode_latents, image_tensor};
use crate::noise::NoiseSource;
use crate::schedulers::Scheduler;
use crate::vae::Vae;

/// What the denoising loop does for an inpainting job.
pub enum Inpainting {
    /// A 9-channel UNet: `(B, 1 + C, h, w)` (mask, masked-image latents) appended to every
    /// UNet input.
    Conditioned { extra: Tensor },
    /// A 4-channel UNet: the image's clean latents, the noise the start used, and the latent
    /// mask with its complement, to blend the known region back after every step.
    Blended {
        image_latents: Tensor,
        noise: Tensor,
        mask: Tensor,
        keep: Tensor,
    },
}

impl Inpainting {
    /// The 9-channel UNet's inputs: the latent mask and the masked image's latents (one draw
    /// from `noise` per image for the encoder's sample).
    pub fn conditioned(
        vae: &Vae,
        job: &Job,
        device: &Device,
        noise: &mut dyn NoiseSource,
    ) -> Result<Self, GenerateError> {
        let mask = mask_tensor(job, device)?;
        let masked = image_tensor(job, device).and_then(|image| {
            let keep = mask.affine(-1.0, 1.0).map_err(internal("mask"))?;
            image.broadcast_mul(&keep).map_err(internal("masked image"))
        })?;
        let masked_latents = encode_latents(vae, &masked, device, noise)?;
        let f = vae.config().scale_factor();
        let extra = latent_mask(&mask, f)
            .and_then(|m| Tensor::cat(&[&m, &masked_latents], 1))
            .map_err(internal("mask latents"))?;
        Ok(Self::Conditioned { extra })
    }

    /// A 4-channel UNet's blending inputs.
    pub fn blended(
        vae: &Vae,
        job: &Job,
        device: &Device,
        image_latents: Tensor,
        noise: Tensor,
    ) -> Result<Self, GenerateError> {
        let stage = "mask latents";
        let mask = latent_mask(&mask_tensor(job, device)?, vae.config().scale_factor())
            .map_err(internal(stage))?;
        let keep = mask.affine(-1.0, 1.0).map_err(internal(stage))?;
        Ok(Self::Blended {
            image_latents,
            noise,
            mask,
            keep,
        })
    }

    /// The UNet input of a step: `input` itself, or with the conditioning channels appended.
    pub fn unet_input(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // Both F32: the scheduler's input and the encoder's latents.
            Self::Conditioned { extra } => Tensor::cat(&[input, extra], 1),
            Self::Blended { .. } => Ok(input.clone()),
        }
    }

    /// After a step: the known region put back into `latents`, noised to timestep index
    /// `next` (`None` after the last step: clean).
    pub fn after_step(
        &self,
        scheduler: &dyn Scheduler,
        latents: Tensor,
        next: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let Self::Blended {
            image_latents,
            noise,
            mask,
            keep,
        } = self
        else {
            return Ok(latents);
        };
        let known = match next {
            Some(index) => scheduler.add_noise(image_latents, noise, index)?,
            None => image_latents.clone(),
        };
        known.broadcast_mul(keep)? + latents.broadcast_mul(mask)?
    }
}

/// The job's masks, `(B, 1, H, W)` F32: 1 where the image is repainted.
fn mask_tensor(job: &Job, device: &Device) -> Result<Tensor, GenerateError> {
    let (h, w) = (job.settings.height, job.settings.width);
    let mut data = Vec::with_capacity(job.images.len() * h * w);
    for (i, spec) in job.images.iter().enumerate() {
        let mask = spec
            .mask
            .as_ref()
            .ok_or_else(|| GenerateError::Invalid(format!("image {i}: inpainting needs a mask")))?;
        if (mask.width, mask.height) != (w, h) {
            return Err(GenerateError::Invalid(format!(
                "image {i}: the mask is {}×{}, the job is {w}×{h}",
                mask.width, mask.height
            )));
        }
        data.extend(mask.repaint.iter().map(|&r| if r { 1.0f32 } else { 0.0 }));
    }
    Tensor::from_vec(data, (job.images.len(), 1, h, w), device).map_err(internal("mask"))
}

/// torch's nearest `interpolate` by an integer factor `f`: the pixel at `(f·i, f·j)`.
fn latent_mask(mask: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    mask.reshape((b, c, h / f, f, w / f, f))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h / f, w / f))?
        .to_dtype(DType::F32)
}
