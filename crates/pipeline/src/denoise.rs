//! Stage 2 of a generation: the denoising loop. At every scheduler timestep one UNet pass
//! predicts the noise (with classifier-free guidance, on the unconditional and conditional
//! rows at once, then [`Guidance::combine`]), the scheduler steps, previews are made where
//! asked for, and the control may stop the run.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use sdserve_generation::{GenerateError, GeneratedImage, StepControl};

use crate::conditioning::Conditioning;
use crate::error::internal;
use crate::inpaint::Inpainting;
use crate::noise::NoiseSource;
use crate::profile;
use crate::schedulers::Scheduler;
use crate::unet::UNet;

/// Classifier-free guidance: on when the scale is above 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    pub scale: f64,
}

impl Guidance {
    pub fn enabled(self) -> bool {
        self.scale > 1.0
    }

    /// `uncond + scale · (cond − uncond)` from a UNet output over `2b` rows (unconditional
    /// first); the output itself when guidance is off.
    pub fn combine(self, out: Tensor, b: usize) -> candle_core::Result<Tensor> {
        if !self.enabled() {
            return Ok(out);
        }
        let uncond = out.narrow(0, 0, b)?;
        let cond = out.narrow(0, b, b)?;
        &uncond + ((&cond - &uncond)? * self.scale)?
    }
}

/// One step's UNet output and input, from which a preview's clean image is estimated.
pub struct StepOutput<'a> {
    /// The guided model output.
    pub guided: &'a Tensor,
    /// The UNet input (in the scheduler's parameterisation).
    pub input: &'a Tensor,
    pub timestep: f64,
    /// 1-based pass number.
    pub pass: usize,
}

/// Makes preview images of a step when the control asks for them.
pub type MakePreview<'a> =
    dyn FnMut(&StepOutput) -> Result<Vec<GeneratedImage>, GenerateError> + 'a;

/// The loop's fixed parts: the model, how it is guided, and what it is conditioned on.
pub struct Denoiser<'a> {
    pub unet: &'a UNet,
    /// The UNet's dtype; scheduler arithmetic stays in F32.
    pub dtype: DType,
    pub guidance: Guidance,
    pub conditioning: &'a Conditioning,
    /// Inpainting's extra UNet channels or blending.
    pub inpainting: Option<&'a Inpainting>,
}

impl Denoiser<'_> {
    /// Runs the timesteps of `scheduler` from index `first` on (0 for text-to-image; the
    /// scheduler already started there) from `latents` (F32, already scaled by the scheduler's
    /// `init_noise_sigma` or noised to the first timestep) and returns the final latents.
    /// Progress counts the passes that run.
    pub fn run(
        &self,
        scheduler: &mut dyn Scheduler,
        first: usize,
        mut latents: Tensor,
        noise: &mut dyn NoiseSource,
        control: &mut dyn StepControl,
        preview: &mut MakePreview,
    ) -> Result<Tensor, GenerateError> {
        let timesteps: Vec<f64> = scheduler.timesteps().get(first..).unwrap_or(&[]).to_vec();
        let total = timesteps.len();
        for (k, &t) in timesteps.iter().enumerate() {
            let (i, pass) = (first + k, k + 1);
            let stage = || format!("unet step {pass}");
            let input = scheduler
                .scale_model_input(&latents, i)
                .map_err(internal(stage()))?;
            let unet_input = match self.inpainting {
                Some(inpainting) => inpainting.unet_input(&input),
                None => Ok(input.clone()),
            };
            let device = latents.device().clone();
            let guided = unet_input
                .and_then(|x| profile::stage(&device, || "unet".into(), || self.predict(&x, t)))
                .map_err(internal(stage()))?;
            latents = profile::stage(
                &device,
                || "scheduler".into(),
                || scheduler.step(&guided, i, &latents, noise),
            )
            .map_err(internal(format!("scheduler step {pass}")))?;
            if let Some(inpainting) = self.inpainting {
                let next = (pass < total).then_some(i + 1);
                latents = inpainting
                    .after_step(scheduler, latents, next)
                    .map_err(internal(format!("inpainting blend {pass}")))?;
            }
            if control.wants_preview(pass, total) {
                control.preview(preview(&StepOutput {
                    guided: &guided,
                    input: &input,
                    timestep: t,
                    pass,
                })?);
            }
            if let ControlFlow::Break(reason) = control.after_step(pass, total) {
                return Err(GenerateError::Stopped(reason));
            }
        }
        Ok(latents)
    }

    /// The guided model output (F32) for UNet input `input` at timestep `t`.
    fn predict(&self, input: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        let b = input.dim(0)?;
        let batch = if self.guidance.enabled() {
            Tensor::cat(&[input, input], 0)?
        } else {
            input.clone()
        };
        let out = self
            .unet
            .forward(&batch.to_dtype(self.dtype)?, t, self.conditioning)?
            .to_dtype(DType::F32)?;
        self.guidance.combine(out, b)
    }
}
