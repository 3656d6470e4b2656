//! Text-to-image and image-to-image generation, step for step as diffusers'
//! `StableDiffusion(XL)Pipeline` and `StableDiffusion(XL)Img2ImgPipeline`, in three stages:
//! prompt encoding ([`crate::prompt`]) into a [`Conditioning`], the denoising loop over a
//! scheduler ([`crate::denoise`]) from noise or from the noised input image
//! ([`crate::image_to_image`]), and VAE decode. Loading lives in
//! [`crate::load`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_generation::{
    GenerateError, GeneratedImage, Generator, ImageTask, Job, JobSettings, MaskInput,
    ModelDescription, StepControl,
};

use crate::conditioning::Conditioning;
use crate::denoise::{Denoiser, Guidance, StepOutput};
use crate::device::Placement;
use crate::error::internal;
use crate::image::{FloatImages, encode_png};
use crate::image_to_image::image_latents;
use crate::inpaint::Inpainting;
use crate::lora::variant::Adapters;
use crate::noise::{NoiseSource, PerImageNoise};
use crate::profile;
use crate::prompt::{PromptEncoder, TextTower};
use crate::schedulers::{DenoisedEstimate, Scheduler, SchedulerConfig, SchedulerKind};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::working_set::{MemoryEstimate, WorkingSet};

/// A loaded diffusers Stable Diffusion 1.x / 2.x or SDXL folder.
pub struct StableDiffusion {
    pub(crate) dir: PathBuf,
    pub(crate) description: ModelDescription,
    pub(crate) prompts: PromptEncoder,
    pub(crate) unet: UNet,
    /// LoRA adapters, applied per job ([`crate::lora::variant`]).
    pub(crate) adapters: Adapters,
    pub(crate) vae: Vae,
    pub(crate) scheduler_config: SchedulerConfig,
    pub(crate) placement: Placement,
    /// Bytes of the loaded weights.
    pub(crate) weights_bytes: u64,
}

impl StableDiffusion {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> &Device {
        &self.placement.device
    }

    /// Dtype of the UNet and VAE.
    pub fn dtype(&self) -> DType {
        self.placement.dtype
    }

    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// The first text encoder.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.prompts.towers[0].encoder
    }

    /// The first tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.prompts.towers[0].tokenizer
    }

    /// Every text encoder with its tokenizer: one, or SDXL's two.
    pub fn text_towers(&self) -> &[TextTower] {
        &self.prompts.towers
    }

    /// Stage 1 alone: the conditioning of `job`'s UNet rows, through the text encoders its
    /// adapters adapt (built for the stage and dropped after it).
    pub fn conditioning(&self, job: &Job) -> Result<Conditioning, GenerateError> {
        let guidance = Guidance {
            scale: job.settings.guidance_scale,
        };
        let adapted = self
            .adapters
            .prompts(&job.settings.adapters, &self.prompts)?;
        adapted.as_ref().unwrap_or(&self.prompts).conditioning(
            &job.images,
            guidance,
            job.settings.time_ids,
        )
    }

    /// The memory a batch of `images` images with `settings` needs at its peak beyond the
    /// weights ([`Generator::working_set`] is its total).
    pub fn memory_estimate(&self, settings: &JobSettings, images: usize) -> MemoryEstimate {
        let working_set = WorkingSet {
            unet: self.unet.config(),
            vae: self.vae.config(),
            texts: &self.prompts.towers,
            unet_bytes: self.placement.dtype.size_in_bytes() as u64,
            vae_bytes: self.vae.dtype().size_in_bytes() as u64,
            cpu: self.placement.device.is_cpu(),
            scale: self.description.vae_scale_factor,
        };
        let mut estimate = working_set.estimate(settings, images, rayon::current_num_threads());
        estimate.adapters = self.adapters.variant_bytes(&settings.adapters);
        estimate
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Tokenizes (padded to the tokenizer's max length) and encodes the distinct prompts in one
    /// batched forward of the first text encoder; returns `(prompts.len(), S, D)` in the UNet
    /// dtype.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor, GenerateError> {
        self.prompts.encode(prompts)
    }

    /// The standard-normal initial latents of every image, `(B, C, h, w)`: the job's explicit
    /// latents where given, otherwise drawn from the image's own stream in `noise`.
    pub fn initial_latents(
        &self,
        job: &Job,
        noise: &mut PerImageNoise,
    ) -> Result<Tensor, GenerateError> {
        let [c, h, w] = self.latent_shape(job)?;
        let per_image = c * h * w;
        let mut data = Vec::with_capacity(per_image * job.images.len());
        for (i, (spec, stream)) in job.images.iter().zip(noise.streams_mut()).enumerate() {
            match &spec.latents {
                Some(l) => {
                    if l.shape != [c, h, w] || l.data.len() != per_image {
                        return Err(GenerateError::Invalid(format!(
                            "image {i}: latents of shape {:?} ({} values), the model needs {:?}",
                            l.shape,
                            l.data.len(),
                            [c, h, w]
                        )));
                    }
                    data.extend_from_slice(&l.data);
                }
                None => data.extend(stream.fill(per_image)),
            }
        }
        Tensor::from_vec(data, (job.images.len(), c, h, w), &self.placement.device)
            .map_err(internal("initial latents"))
    }

    fn latent_shape(&self, job: &Job) -> Result<[usize; 3], GenerateError> {
        let f = self.description.vae_scale_factor;
        let s = &job.settings;
        if s.height == 0
            || s.width == 0
            || !s.height.is_multiple_of(f)
            || !s.width.is_multiple_of(f)
        {
            return Err(GenerateError::Invalid(format!(
                "height {} and width {} must be positive multiples of {f}",
                s.height, s.width
            )));
        }
        Ok([self.description.latent_channels, s.height / f, s.width / f])
    }

    /// Denoises `initial_latents` (standard normal, `(B, C, h, w)`, not yet multiplied by the
    /// scheduler's `init_noise_sigma`) and decodes them. Every stochastic scheduler draw comes
    /// from `noise`, so recorded noise can be replayed. Returns the float images before 8-bit
    /// conversion.
    pub fn run(
        &self,
        job: &Job,
        initial_latents: &Tensor,
        noise: &mut dyn NoiseSource,
        control: &mut dyn StepControl,
    ) -> Result<FloatImages, GenerateError> {
        self.check_job(job, initial_latents)?;
        let (kind, mut scheduler) = self.scheduler(job)?;
        let guidance = Guidance {
            scale: job.settings.guidance_scale,
        };
        let device = self.device();
        // Stage 1: prompts.
        let conditioning = profile::stage(device, || "prompt".into(), || self.conditioning(job))?;
        // Stage 2: denoising, by the UNet the job's adapters adapt where they do (its own
        // copies of the adapted layers, dropped before the decode). Scheduler arithmetic stays
        // in F32; only the UNet runs in the model dtype.
        let start = profile::stage(
            device,
            || "start".into(),
            || self.start(job, initial_latents, scheduler.as_mut(), noise),
        )?;
        let adapted = self.adapters.unet(&job.settings.adapters, &self.unet)?;
        let denoiser = Denoiser {
            unet: adapted.as_ref().unwrap_or(&self.unet),
            dtype: self.placement.dtype,
            guidance,
            conditioning: &conditioning,
            inpainting: start.inpainting.as_ref(),
        };
        let mut previews = Previews {
            model: self,
            kind,
            estimate: None,
        };
        let latents = profile::stage(
            device,
            || "denoise".into(),
            || {
                denoiser.run(
                    scheduler.as_mut(),
                    start.first,
                    start.latents,
                    noise,
                    control,
                    &mut |step| previews.make(step),
                )
            },
        )?;
        drop(adapted);
        // Stage 3: VAE decode.
        profile::stage(device, || "vae decode".into(), || self.decode(&latents))
    }

    /// Where the denoising starts: for text-to-image the initial noise times
    /// `init_noise_sigma` at index 0; for image-to-image the encoded input images noised with
    /// the initial noise to the first step `strength` keeps (the scheduler is started there);
    /// inpainting as diffusers' inpaint pipeline (pure noise at strength 1) with what its
    /// loop needs.
    fn start(
        &self,
        job: &Job,
        initial_latents: &Tensor,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
    ) -> Result<Start, GenerateError> {
        let stage = "initial latents";
        let device = &self.placement.device;
        let initial = initial_latents
            .to_device(device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(internal(stage))?;
        let sigma = scheduler.init_noise_sigma();
        let from_noise = |initial: &Tensor| (initial * sigma).map_err(internal(stage));
        let Some(mode) = job.settings.image_to_image else {
            return Ok(Start {
                first: 0,
                latents: from_noise(&initial)?,
                inpainting: None,
            });
        };
        let first = mode.first_step(job.settings.num_inference_steps);
        scheduler
            .start_at(first)
            .map_err(|e| GenerateError::Invalid(e.to_string()))?;
        let noised = |clean: &Tensor| {
            scheduler
                .add_noise(clean, &initial, first)
                .map_err(internal(stage))
        };
        let full_strength = mode.strength == 1.0;
        let (latents, inpainting) = match mode.task {
            ImageTask::Img2Img => {
                let clean = image_latents(&self.vae, job, device, noise)?;
                (noised(&clean)?, None)
            }
            // A 9-channel UNet: the image's latents only where the start needs them.
            ImageTask::Inpaint if self.description.masks == MaskInput::Required => {
                let latents = if full_strength {
                    from_noise(&initial)?
                } else {
                    noised(&image_latents(&self.vae, job, device, noise)?)?
                };
                let conditioned = Inpainting::conditioned(&self.vae, job, device, noise)?;
                (latents, Some(conditioned))
            }
            ImageTask::Inpaint => {
                let clean = image_latents(&self.vae, job, device, noise)?;
                let latents = if full_strength {
                    from_noise(&initial)?
                } else {
                    noised(&clean)?
                };
                let blended = Inpainting::blended(&self.vae, job, device, clean, initial.clone())?;
                (latents, Some(blended))
            }
        };
        Ok(Start {
            first,
            latents,
            inpainting,
        })
    }

    /// The job has images and steps, and the initial latents fit it.
    fn check_job(&self, job: &Job, initial_latents: &Tensor) -> Result<(), GenerateError> {
        let b = job.images.len();
        if b == 0 {
            return Err(GenerateError::Invalid(
                "a job needs at least one image".into(),
            ));
        }
        if job.settings.num_inference_steps == 0 {
            return Err(GenerateError::Invalid(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let [c, h, w] = self.latent_shape(job)?;
        if initial_latents.dims() != [b, c, h, w] {
            return Err(GenerateError::Invalid(format!(
                "initial latents have shape {:?}, expected {:?}",
                initial_latents.dims(),
                [b, c, h, w]
            )));
        }
        Ok(())
    }

    /// The job's scheduler, built from the model's config for its steps.
    fn scheduler(&self, job: &Job) -> Result<(SchedulerKind, Box<dyn Scheduler>), GenerateError> {
        let s = &job.settings;
        let kind = SchedulerKind::from_name(&s.scheduler).ok_or_else(|| {
            GenerateError::Invalid(format!("unknown scheduler {:?}", s.scheduler))
        })?;
        let scheduler = self
            .scheduler_config
            .build(kind, s.num_inference_steps, s.eta)
            .map_err(|e| GenerateError::Invalid(e.to_string()))?;
        Ok((kind, scheduler))
    }

    /// VAE-decodes final latents `(B, C, h, w)` and post-processes them like diffusers.
    pub fn decode(&self, latents: &Tensor) -> Result<FloatImages, GenerateError> {
        let stage = "vae decode";
        let decoded = latents
            .to_dtype(self.vae.dtype())
            .and_then(|x| self.vae.decode(&x))
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(internal(stage))?;
        FloatImages::from_vae_output(&decoded).map_err(internal(stage))
    }

    /// The whole request with host-seeded noise: each image's initial latents and ancestral
    /// noise come from its own seed, so an image does not depend on its batch mates.
    pub fn generate_float(
        &self,
        job: &Job,
        control: &mut dyn StepControl,
    ) -> Result<FloatImages, GenerateError> {
        let seeds: Vec<u64> = job.images.iter().map(|i| i.seed).collect();
        let mut noise = PerImageNoise::new(&seeds);
        let initial = self.initial_latents(job, &mut noise)?;
        // The encoder's draws, where the request gave them, come before the seeded ones.
        for (spec, stream) in job.images.iter().zip(noise.streams_mut()) {
            stream.queue_explicit(spec.encoder_noise.iter().map(|l| l.data.clone()));
        }
        self.run(job, &initial, &mut noise, control)
    }
}

/// Where a run starts: the first timestep index, its latents (F32) and, for inpainting, what
/// the loop does besides.
struct Start {
    first: usize,
    latents: Tensor,
    inpainting: Option<Inpainting>,
}

/// Preview images of a step: the clean image the model predicts there, decoded. The estimate
/// is built on the first preview: most requests ask for none.
struct Previews<'a> {
    model: &'a StableDiffusion,
    kind: SchedulerKind,
    estimate: Option<DenoisedEstimate>,
}

impl Previews<'_> {
    fn make(&mut self, step: &StepOutput) -> Result<Vec<GeneratedImage>, GenerateError> {
        let estimate = match self.estimate.take() {
            Some(e) => e,
            None => self
                .model
                .scheduler_config
                .denoised_estimate(self.kind)
                .map_err(|e| GenerateError::Invalid(e.to_string()))?,
        };
        let x0 = estimate
            .x0(step.guided, step.input, step.timestep)
            .map_err(internal(format!("preview {}", step.pass)));
        self.estimate = Some(estimate);
        png_files(&self.model.decode(&x0?)?)
    }
}

impl Generator for StableDiffusion {
    fn description(&self) -> &ModelDescription {
        &self.description
    }

    fn generate(
        &self,
        job: &Job,
        control: &mut dyn StepControl,
    ) -> Result<Vec<GeneratedImage>, GenerateError> {
        let files = self.generate_float(job, control).and_then(|images| {
            profile::stage(&Device::Cpu, || "png".into(), || png_files(&images))
        });
        // Taken whatever the outcome, so a failed generation's stages are not the next one's.
        if let Some(stages) = profile::take_report() {
            tracing::info!(
                model = %self.dir.display(),
                images = job.images.len(),
                steps = job.settings.num_inference_steps,
                height = job.settings.height,
                width = job.settings.width,
                stages = %stages,
                "stage profile"
            );
        }
        files
    }

    fn weights_bytes(&self) -> u64 {
        self.weights_bytes
    }

    fn working_set(&self, settings: &JobSettings, images: usize) -> u64 {
        self.memory_estimate(settings, images).total()
    }
}

/// 8-bit PNG files of every image, in batch order.
fn png_files(images: &FloatImages) -> Result<Vec<GeneratedImage>, GenerateError> {
    (0..images.batch)
        .map(|i| {
            encode_png(images.width, images.height, &images.rgb8(i))
                .map(|png| GeneratedImage { png })
                .map_err(|message| GenerateError::Internal {
                    stage: "png".into(),
                    message,
                })
        })
        .collect()
}
