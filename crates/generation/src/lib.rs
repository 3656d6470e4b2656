//! What a generation is, independent of transports, queues and tensors: the request every
//! transport decodes into, its validation against a model into a [`Job`], and the
//! [`Generator`] seam a model implements.
//!
//! # Layout
//! - [`request`]: [`GenerationRequest`], what the client asked for (`None` = default).
//! - [`limits`]: a model's [`GenerationDefaults`] and [`Limits`].
//! - [`resolve`]: request + model → [`Job`], or a [`ValidationError`] naming the field.
//! - [`job`]: [`Job`] = [`JobSettings`] (shared by a batch) + one [`ImageSpec`] per image.
//! - [`sdxl`]: SDXL's second prompts and size/crop time ids, resolved for the job.
//! - [`image_input`]: input images decoded under a size guard; [`resize`]: Pillow's Lanczos.
//! - [`adapters`]: LoRA adapters declared for a model and the [`AdapterChoice`] of a job.
//! - [`generator`]: the synchronous [`Generator`] trait, [`ModelDescription`], [`StepControl`].

pub mod adapters;
pub mod generator;
pub mod image_input;
pub mod job;
pub mod limits;
pub mod request;
pub mod resize;
pub mod resolve;
pub mod sdxl;

pub use adapters::{AdapterChoice, AdapterDeclaration, AdapterInfo, MAX_ADAPTERS};
pub use generator::{
    ConditioningInputs, DefaultStrength, GenerateError, GeneratedImage, Generator, MaskInput,
    ModelDescription, RunToEnd, StepControl, StopReason,
};
pub use image_input::{ImageError, RgbImage, decode_rgb, decode_transparency};
pub use job::{
    AestheticScores, ETA_SCHEDULER, ImageSpec, ImageTask, ImageToImage, Job, JobSettings, Latents,
    Mask, TIME_IDS, TimeIds,
};
pub use limits::{GenerationDefaults, Limits};
pub use request::{GenerationRequest, LatentsInput, MaskMeaning, SizeConditioningInput};
pub use resolve::{ValidationError, random_seed};
