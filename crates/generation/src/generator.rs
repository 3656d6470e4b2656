//! The one synchronous seam between the engine and a model implementation.
//!
//! The engine never sees tensors: it hands a fully validated [`Job`] to a [`Generator`] on a
//! worker thread and gets PNG bytes back. The candle pipeline implements this trait; tests may
//! implement it with anything that honours the contract.

use std::ops::ControlFlow;

use crate::job::{Job, JobSettings};

/// What a loaded model tells the engine about itself, used to fill defaults and to
/// validate requests before anything is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    /// Image size the model was trained at (UNet `sample_size` × VAE scale factor).
    pub native_height: usize,
    pub native_width: usize,
    /// Spatial downscale between image and latents (8 for every SD VAE).
    pub vae_scale_factor: usize,
    /// Channels of the latent tensor (4 for SD 1.x / 2.x).
    pub latent_channels: usize,
    /// Scheduler used when the request names none (from `scheduler/scheduler_config.json`).
    pub default_scheduler: String,
    /// Every scheduler name a request may ask for.
    pub schedulers: Vec<String>,
    /// "sd1" (epsilon), "sd2" (v-prediction), "sdxl", informational.
    pub family: String,
    /// Which conditioning inputs beyond the prompt the model takes.
    pub conditioning: ConditioningInputs,
    /// `Some` when the model takes input images (image-to-image): the strength of a request
    /// that gives none.
    pub default_strength: Option<DefaultStrength>,
    /// Whether the model inpaints (`mask_image`), and whether it needs a mask.
    pub masks: MaskInput,
    /// "f32" / "f16" / "bf16", informational.
    pub dtype: String,
    /// "cpu" / "cuda:0", informational.
    pub device: String,
    /// The LoRA adapters a request may name (`parameter 'lora'`).
    pub adapters: Vec<crate::adapters::AdapterInfo>,
}

/// What a model is conditioned on besides its prompt, which decides the request fields it
/// accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConditioningInputs {
    /// SD 1.x / 2.x: the prompt and the negative prompt.
    #[default]
    Prompt,
    /// SDXL: also a second prompt per text encoder and the size/crop time ids.
    PromptsAndSizes,
    /// An SDXL refiner: the size/crop time ids with aesthetic scores in the target size's
    /// place; it only refines images (image-to-image).
    Refiner,
}

impl ConditioningInputs {
    /// Whether the model is conditioned on SDXL's time ids.
    pub fn has_time_ids(self) -> bool {
        self != Self::Prompt
    }
}

/// The strengths of diffusers' pipelines when a request gives none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefaultStrength {
    /// `StableDiffusionImg2ImgPipeline`: 0.8; `StableDiffusionXLImg2ImgPipeline`: 0.3.
    pub image_to_image: f64,
    /// `StableDiffusionInpaintPipeline`: 1.0; `StableDiffusionXLInpaintPipeline`: 0.9999.
    pub inpainting: f64,
}

impl DefaultStrength {
    pub const SD: Self = Self {
        image_to_image: 0.8,
        inpainting: 1.0,
    };
    pub const SDXL: Self = Self {
        image_to_image: 0.3,
        inpainting: 0.9999,
    };
}

/// How a model takes inpainting masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaskInput {
    /// No inpainting (SDXL refiners; models whose VAE has no encoder).
    #[default]
    NotServed,
    /// A 4-channel UNet inpaints by blending the known region back after every step.
    Optional,
    /// A 9-channel inpainting UNet (latents, mask, masked image): every request needs a mask.
    Required,
}

/// One generated image.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    /// A complete PNG file (8-bit RGB).
    pub png: Vec<u8>,
}

/// Why a generation stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The request's deadline passed.
    Deadline,
    /// The client went away.
    Disconnected,
    /// The server is shutting down and the drain deadline passed.
    Shutdown,
}

/// Called by the generator between denoising passes; also the progress feed for streaming.
pub trait StepControl {
    /// `done` passes of `total` are complete. Return `Break` to stop at once.
    fn after_step(&mut self, done: usize, total: usize) -> ControlFlow<StopReason>;

    /// Whether the generator should make previews after pass `done` of `total`; if so it
    /// calls [`StepControl::preview`] before `after_step(done, total)`.
    fn wants_preview(&self, _done: usize, _total: usize) -> bool {
        false
    }

    /// Previews of every image of the job, in job order: the clean image the model predicts
    /// at this step.
    fn preview(&mut self, _images: Vec<GeneratedImage>) {}
}

/// A `StepControl` that never stops, for callers outside the engine (benches, tools).
pub struct RunToEnd;

impl StepControl for RunToEnd {
    fn after_step(&mut self, _done: usize, _total: usize) -> ControlFlow<StopReason> {
        ControlFlow::Continue(())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error("generation stopped: {0:?}")]
    Stopped(StopReason),
    /// A request the description said was fine turned out not to be (a bug if it happens).
    #[error("{0}")]
    Invalid(String),
    /// Failure inside the model, naming the stage ("text encoder", "unet step 3", "vae decode", "png").
    #[error("{stage} failed: {message}")]
    Internal { stage: String, message: String },
}

/// A loaded model. Implementations must be shareable between worker threads; all
/// per-request state (scheduler, RNG) lives inside `generate`.
pub trait Generator: Send + Sync {
    fn description(&self) -> &ModelDescription;
    fn generate(
        &self,
        job: &Job,
        control: &mut dyn StepControl,
    ) -> Result<Vec<GeneratedImage>, GenerateError>;

    /// Bytes the loaded weights occupy on the model's device; 0 when unknown.
    fn weights_bytes(&self) -> u64 {
        0
    }

    /// At most how many bytes one batch of `images` images with `settings` needs on the
    /// model's device besides the weights, at its peak; the engine's memory budget admits
    /// batches by it. 0 when unknown (such a model is not held to the budget).
    fn working_set(&self, _settings: &JobSettings, _images: usize) -> u64 {
        0
    }
}
