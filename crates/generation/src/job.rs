//! A validated generation, split into what its images must share and what each image owns.
//!
//! The split is the batching rule: jobs whose [`JobSettings`] are equal may run as one batch
//! (the engine's batch key is the model plus these settings), and nothing else may differ
//! between the images of a batch but their [`ImageSpec`]s. A new setting therefore has to be
//! put on one side or the other; the engine's batch-key tests list both sides exhaustively,
//! so a field added to either struct does not compile there until its test case is written.

/// The scheduler whose `eta` a request may set (others are deterministic or draw their own
/// noise).
pub const ETA_SCHEDULER: &str = "ddim";

/// Settings every image of a job (and of a batch) shares: they shape the denoising loop.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    pub num_inference_steps: usize,
    /// Classifier-free guidance is off when `<= 1`.
    pub guidance_scale: f64,
    pub height: usize,
    pub width: usize,
    /// One of the model's [`crate::ModelDescription::schedulers`].
    pub scheduler: String,
    /// DDIM's eta (0 = deterministic DDIM); always 0 for other schedulers.
    pub eta: f64,
    /// SDXL's micro-conditioning; `None` for models without it.
    pub time_ids: Option<TimeIds>,
    /// Image-to-image (every image of the job has an input image); `None` for text-to-image.
    pub image_to_image: Option<ImageToImage>,
    /// The LoRA adapters applied to the model's weights for this job.
    pub adapters: crate::adapters::AdapterChoice,
}

/// Image-to-image: the input image is encoded, noised to a timestep part-way down the
/// schedule, and denoised from there; inpainting redraws only where the mask is white.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageToImage {
    /// In (0, 1]: 1 starts from pure noise, small values stay close to the image.
    pub strength: f64,
    pub task: ImageTask,
}

/// Which of diffusers' image pipelines a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTask {
    /// `StableDiffusion(XL)Img2ImgPipeline`: the whole image is redrawn.
    Img2Img,
    /// `StableDiffusionInpaintPipeline`: every image has a mask.
    Inpaint,
}

impl ImageToImage {
    /// The index of the first timestep that runs out of `steps` (diffusers' `get_timesteps`:
    /// `steps - min(int(steps * strength), steps)`; every scheduler here has order 1).
    pub fn first_step(&self, steps: usize) -> usize {
        let kept = ((steps as f64 * self.strength) as usize).min(steps);
        steps - kept
    }
}

/// SDXL's `add_time_ids` of one batch, each `[original height, original width, crop top,
/// crop left, target height, target width]`: for the prompt rows and for the negative rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeIds {
    pub positive: [u32; TIME_IDS],
    pub negative: [u32; TIME_IDS],
    /// Refiners (`requires_aesthetics_score`): the aesthetic scores, which take the target
    /// size's place (five ids per row).
    pub aesthetic: Option<AestheticScores>,
}

/// A refiner's aesthetic scores: of the prompt rows (diffusers' default 6) and of the negative
/// rows (2.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AestheticScores {
    pub positive: f32,
    pub negative: f32,
}

/// SDXL's time ids per UNet row: original size, crop top-left, target size.
pub const TIME_IDS: usize = 6;

impl JobSettings {
    /// The scheduler steps that run: all of them for text-to-image, those `strength` keeps for
    /// image-to-image (diffusers' adjusted `num_inference_steps`). Progress counts these.
    pub fn steps_to_run(&self) -> usize {
        let steps = self.num_inference_steps;
        match self.image_to_image {
            Some(mode) => steps - mode.first_step(steps),
            None => steps,
        }
    }

    /// Whether `eta` means anything for this job's scheduler (and is reported back).
    pub fn uses_eta(&self) -> bool {
        self.scheduler == ETA_SCHEDULER
    }
}

impl TimeIds {
    /// diffusers' defaults for an output of `height × width`: that size as original and target
    /// size, no crop, the same ids for the negative rows.
    pub fn defaults(height: usize, width: usize) -> Self {
        let (h, w) = (height as u32, width as u32);
        let ids = [h, w, 0, 0, h, w];
        Self {
            positive: ids,
            negative: ids,
            aesthetic: None,
        }
    }

    /// One UNet row's ids as the UNet embeds them: six, or five for a refiner.
    pub fn row(&self, negative: bool) -> Vec<f32> {
        let sizes = if negative {
            self.negative
        } else {
            self.positive
        };
        let as_f32 = |ids: &[u32]| ids.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        match self.aesthetic {
            None => as_f32(&sizes),
            Some(a) => {
                let mut row = as_f32(&sizes[..4]);
                row.push(if negative { a.negative } else { a.positive });
                row
            }
        }
    }
}

/// Exact initial latents for one image, `(channels, height / f, width / f)` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Latents {
    pub shape: [usize; 3],
    pub data: Vec<f32>,
}

use std::sync::Arc;

use crate::image_input::RgbImage;

/// One image to produce: everything in which images of one batch may differ.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub prompt: String,
    /// `None` when the request gave none: SD 1.x / 2.x encode the empty prompt, SDXL models
    /// with `force_zeros_for_empty_prompt` condition on zeros (as diffusers does).
    pub negative_prompt: Option<String>,
    /// SDXL's second text encoder's prompts; `None` = the same as the first.
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// Seeds this image's own host-side RNG: initial latents (unless given) and any
    /// per-step noise of ancestral schedulers.
    pub seed: u64,
    pub latents: Option<Latents>,
    /// Image-to-image: the input image, already at the job's size.
    pub image: Option<RgbImage>,
    /// Inpainting: which pixels to repaint, at the job's size.
    pub mask: Option<Mask>,
    /// Explicit draws for the VAE encoder's latent samples, in the order the image is encoded
    /// (the image, then for a 9-channel inpainting UNet the masked image); empty: drawn from
    /// the seed.
    pub encoder_noise: Vec<Latents>,
}

/// An inpainting mask binarised as diffusers' mask processor does: the image resized like the
/// input image, converted to grey as Pillow's `convert("L")`, and `L / 255 ≥ 0.5` repainted.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    /// Row-major, one per pixel: `true` = repaint.
    pub repaint: Arc<[bool]>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mask({}×{})", self.width, self.height)
    }
}

impl Mask {
    /// The mask of an RGB image already at the job's size. Pillow's `L = (19595 R + 38470 G
    /// + 7471 B + 2^15) >> 16`, then diffusers' float32 `L / 255 ≥ 0.5`.
    pub fn from_rgb(image: &RgbImage) -> Self {
        let repaint = image
            .rgb
            .chunks_exact(3)
            .map(|p| {
                let l = (19595 * u32::from(p[0])
                    + 38470 * u32::from(p[1])
                    + 7471 * u32::from(p[2])
                    + 0x8000)
                    >> 16;
                l as f32 / 255.0 >= 0.5
            })
            .collect();
        Self {
            width: image.width,
            height: image.height,
            repaint,
        }
    }
}

impl ImageSpec {
    /// An image of `prompt` from `seed`, everything else as the request left it out.
    pub fn new(prompt: impl Into<String>, seed: u64) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            seed,
            latents: None,
            image: None,
            mask: None,
            encoder_noise: Vec::new(),
        }
    }
}

/// A validated generation: every field is within the model's bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub settings: JobSettings,
    /// In output order: prompt 0 image 0, prompt 0 image 1, ..., prompt 1 image 0, ...
    pub images: Vec<ImageSpec>,
}

impl Job {
    /// One job made of several with the same settings, images in the order given.
    pub fn merge<'a>(settings: &JobSettings, jobs: impl IntoIterator<Item = &'a Job>) -> Job {
        let images = jobs
            .into_iter()
            .inspect(|j| debug_assert_eq!(&j.settings, settings, "merged jobs share settings"))
            .flat_map(|j| j.images.iter().cloned())
            .collect();
        Job {
            settings: settings.clone(),
            images,
        }
    }
}
