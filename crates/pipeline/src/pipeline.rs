//! Text-to-image generation, step for step as diffusers' `StableDiffusionPipeline.__call__`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_engine::{
    GenerateError, GeneratedImage, GenerationJob, Generator, ModelDescription, StepControl,
};

use crate::config::{Activation, ModelIndex, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::device::{LoadOptions, Placement};
use crate::error::{PipelineError, candle_message};
use crate::image::{FloatImages, encode_png};
use crate::noise::{NoiseSource, PerImageNoise};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::weights::{WeightStore, find_weights};

/// A loaded diffusers Stable Diffusion 1.x / 2.x folder.
pub struct StableDiffusion {
    dir: PathBuf,
    description: ModelDescription,
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    unet: UNet,
    vae: Vae,
    scheduler_config: SchedulerConfig,
    placement: Placement,
}

fn internal(stage: impl Into<String>) -> impl FnOnce(candle_core::Error) -> GenerateError {
    let stage = stage.into();
    move |e| GenerateError::Internal {
        stage,
        message: candle_message(&e),
    }
}

impl StableDiffusion {
    /// Reads every config, validates it, and loads the weights onto the chosen device.
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Self, PipelineError> {
        if !dir.is_dir() {
            return Err(PipelineError::config(dir, "not a directory"));
        }
        ModelIndex::read(dir)?;
        let unet_config = UNetConfig::read(&dir.join("unet/config.json"))?;
        let vae_config = VaeConfig::read(&dir.join("vae/config.json"))?;
        let text_config = TextEncoderConfig::read(&dir.join("text_encoder/config.json"))?;
        check_compatible(dir, &unet_config, &vae_config, &text_config)?;

        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let mut scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        // StableDiffusionPipeline.__init__ normalises outdated scheduler configs the same way.
        scheduler_config.apply_pipeline_fixups();
        let default_scheduler = scheduler_config.default_kind()?;
        let tokenizer_dir = dir.join("tokenizer");
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        if tokenizer.max_length() > text_config.max_position_embeddings {
            return Err(PipelineError::config(
                &tokenizer_dir,
                format!(
                    "model_max_length {} exceeds the text encoder's max_position_embeddings {}",
                    tokenizer.max_length(),
                    text_config.max_position_embeddings
                ),
            ));
        }

        let placement = Placement::resolve(&options)?;
        let reduced = placement.dtype != DType::F32;
        let device = &placement.device;

        // The text encoder runs in F32 everywhere; its output is cast to the UNet dtype.
        let te_dir = dir.join("text_encoder");
        let te_store = WeightStore::open(&find_weights(&te_dir, "model", false)?)?;
        let text_encoder = TextEncoder::new(te_store.var_builder(DType::F32, device), &text_config)
            .map_err(|e| PipelineError::model("text encoder", e))?;

        let unet_dir = dir.join("unet");
        let unet_store = WeightStore::open(&find_weights(
            &unet_dir,
            "diffusion_pytorch_model",
            reduced,
        )?)?;
        let unet = UNet::new(
            unet_store.var_builder(placement.dtype, device),
            &unet_config,
        )
        .map_err(|e| PipelineError::model("unet", e))?;

        let vae_dir = dir.join("vae");
        let vae_store =
            WeightStore::open(&find_weights(&vae_dir, "diffusion_pytorch_model", reduced)?)?;
        let vae = Vae::new(vae_store.var_builder(placement.dtype, device), &vae_config)
            .map_err(|e| PipelineError::model("vae", e))?;

        let scale = vae_config.scale_factor();
        let v2 =
            text_config.hidden_act != Activation::QuickGelu || unet_config.use_linear_projection;
        let description = ModelDescription {
            native_height: unet_config.sample_size.0 * scale,
            native_width: unet_config.sample_size.1 * scale,
            vae_scale_factor: scale,
            latent_channels: vae_config.latent_channels,
            default_scheduler: default_scheduler.name().to_string(),
            schedulers: SchedulerKind::all()
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            family: if v2 { "sd2" } else { "sd1" }.to_string(),
            dtype: placement.dtype_name().to_string(),
            device: placement.device_name.clone(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            description,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            placement,
        })
    }

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

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text_encoder
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Tokenizes (padded to the tokenizer's max length) and encodes the distinct prompts in one
    /// batched forward; returns `(prompts.len(), S, D)` in the UNet dtype.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor, GenerateError> {
        let mut unique: Vec<&str> = Vec::new();
        let mut row: HashMap<&str, u32> = HashMap::new();
        let rows: Vec<u32> = prompts
            .iter()
            .map(|p| {
                *row.entry(p).or_insert_with(|| {
                    unique.push(p);
                    (unique.len() - 1) as u32
                })
            })
            .collect();
        let max_len = self.tokenizer.max_length();
        let mut ids = Vec::with_capacity(unique.len() * max_len);
        for p in &unique {
            let tokens = self.tokenizer.encode_padded(p);
            if tokens.len() != max_len {
                return Err(GenerateError::Internal {
                    stage: "tokenizer".into(),
                    message: format!("{} tokens for a {max_len}-token context", tokens.len()),
                });
            }
            ids.extend(tokens);
        }
        let stage = "text encoder";
        let device = self.text_encoder.device();
        let ids =
            Tensor::from_vec(ids, (unique.len(), max_len), device).map_err(internal(stage))?;
        let encoded = self.text_encoder.forward(&ids).map_err(internal(stage))?;
        let rows = Tensor::new(rows.as_slice(), device).map_err(internal(stage))?;
        encoded
            .index_select(&rows, 0)
            .and_then(|t| t.to_dtype(self.placement.dtype))
            .map_err(internal(stage))
    }

    /// The standard-normal initial latents of every image, `(B, C, h, w)`: the job's explicit
    /// latents where given, otherwise drawn from the image's own stream in `noise`.
    pub fn initial_latents(
        &self,
        job: &GenerationJob,
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

    fn latent_shape(&self, job: &GenerationJob) -> Result<[usize; 3], GenerateError> {
        let f = self.description.vae_scale_factor;
        if job.height == 0
            || job.width == 0
            || !job.height.is_multiple_of(f)
            || !job.width.is_multiple_of(f)
        {
            return Err(GenerateError::Invalid(format!(
                "height {} and width {} must be positive multiples of {f}",
                job.height, job.width
            )));
        }
        Ok([
            self.description.latent_channels,
            job.height / f,
            job.width / f,
        ])
    }

    /// Denoises `initial_latents` (standard normal, `(B, C, h, w)`, not yet multiplied by the
    /// scheduler's `init_noise_sigma`) and decodes them. Every stochastic scheduler draw comes
    /// from `noise`, so recorded noise can be replayed. Returns the float images before 8-bit
    /// conversion.
    pub fn run(
        &self,
        job: &GenerationJob,
        initial_latents: &Tensor,
        noise: &mut dyn NoiseSource,
        control: &mut dyn StepControl,
    ) -> Result<FloatImages, GenerateError> {
        let b = job.images.len();
        if b == 0 {
            return Err(GenerateError::Invalid(
                "a job needs at least one image".into(),
            ));
        }
        if job.num_inference_steps == 0 {
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
        let kind = SchedulerKind::from_name(&job.scheduler).ok_or_else(|| {
            GenerateError::Invalid(format!("unknown scheduler {:?}", job.scheduler))
        })?;
        let mut scheduler = self
            .scheduler_config
            .build(kind, job.num_inference_steps, job.eta)
            .map_err(|e| GenerateError::Invalid(e.to_string()))?;
        // Built on the first preview: most requests ask for none.
        let mut estimate = None;

        let cfg = job.guidance_scale > 1.0;
        let prompts: Vec<&str> = job.images.iter().map(|i| i.prompt.as_str()).collect();
        let context = if cfg {
            let mut all: Vec<&str> = job
                .images
                .iter()
                .map(|i| i.negative_prompt.as_str())
                .collect();
            all.extend(&prompts);
            self.encode_prompts(&all)?
        } else {
            self.encode_prompts(&prompts)?
        };

        // Scheduler arithmetic stays in F32; only the UNet runs in the model dtype.
        let device = &self.placement.device;
        let mut latents = (initial_latents
            .to_device(device)
            .and_then(|t| t.to_dtype(DType::F32)))
        .and_then(|t| t * scheduler.init_noise_sigma())
        .map_err(internal("initial latents"))?;
        let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let stage = format!("unet step {}", i + 1);
            let scaled = scheduler
                .scale_model_input(&latents, i)
                .map_err(internal(stage.clone()))?;
            let input = if cfg {
                Tensor::cat(&[&scaled, &scaled], 0)
            } else {
                Ok(scaled.clone())
            };
            let out = input
                .and_then(|x| x.to_dtype(self.placement.dtype))
                .and_then(|x| self.unet.forward(&x, t, &context))
                .and_then(|x| x.to_dtype(DType::F32))
                .map_err(internal(stage.clone()))?;
            let guided = if cfg {
                let uncond = out.narrow(0, 0, b).map_err(internal(stage.clone()))?;
                let cond = out.narrow(0, b, b).map_err(internal(stage.clone()))?;
                ((&cond - &uncond).and_then(|d| d * job.guidance_scale))
                    .and_then(|d| &uncond + d)
                    .map_err(internal(stage))?
            } else {
                out
            };
            latents = scheduler
                .step(&guided, i, &latents, noise)
                .map_err(internal(format!("scheduler step {}", i + 1)))?;
            if control.wants_preview(i + 1, total) {
                let est = match estimate.take() {
                    Some(e) => e,
                    None => self
                        .scheduler_config
                        .denoised_estimate(kind)
                        .map_err(|e| GenerateError::Invalid(e.to_string()))?,
                };
                let x0 = est
                    .x0(&guided, &scaled, t)
                    .map_err(internal(format!("preview {}", i + 1)))?;
                estimate = Some(est);
                control.preview(png_files(&self.decode(&x0)?)?);
            }
            if let ControlFlow::Break(reason) = control.after_step(i + 1, total) {
                return Err(GenerateError::Stopped(reason));
            }
        }
        self.decode(&latents)
    }

    /// VAE-decodes final latents `(B, C, h, w)` and post-processes them like diffusers.
    pub fn decode(&self, latents: &Tensor) -> Result<FloatImages, GenerateError> {
        let stage = "vae decode";
        let decoded = latents
            .to_dtype(self.placement.dtype)
            .and_then(|x| self.vae.decode(&x))
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(internal(stage))?;
        FloatImages::from_vae_output(&decoded).map_err(internal(stage))
    }

    /// The whole request with host-seeded noise: each image's initial latents and ancestral
    /// noise come from its own seed, so an image does not depend on its batch mates.
    pub fn generate_float(
        &self,
        job: &GenerationJob,
        control: &mut dyn StepControl,
    ) -> Result<FloatImages, GenerateError> {
        let seeds: Vec<u64> = job.images.iter().map(|i| i.seed).collect();
        let mut noise = PerImageNoise::new(&seeds);
        let initial = self.initial_latents(job, &mut noise)?;
        self.run(job, &initial, &mut noise, control)
    }
}

fn check_compatible(
    dir: &Path,
    unet: &UNetConfig,
    vae: &VaeConfig,
    text: &TextEncoderConfig,
) -> Result<(), PipelineError> {
    let unet_path = dir.join("unet/config.json");
    if unet.in_channels != vae.latent_channels || unet.out_channels != vae.latent_channels {
        return Err(PipelineError::config(
            &unet_path,
            format!(
                "in_channels {} / out_channels {} must both equal the VAE's latent_channels {} (inpainting UNets are not supported)",
                unet.in_channels, unet.out_channels, vae.latent_channels
            ),
        ));
    }
    if let Some(dim) = unet.context_dims().find(|&d| d != text.hidden_size) {
        return Err(PipelineError::config(
            &unet_path,
            format!(
                "key `cross_attention_dim`: {dim} differs from the text encoder's hidden_size {}",
                text.hidden_size
            ),
        ));
    }
    if vae.out_channels != 3 {
        return Err(PipelineError::config(
            &dir.join("vae/config.json"),
            format!(
                "key `out_channels`: {} is not supported, images are RGB",
                vae.out_channels
            ),
        ));
    }
    Ok(())
}

impl Generator for StableDiffusion {
    fn description(&self) -> &ModelDescription {
        &self.description
    }

    fn generate(
        &self,
        job: &GenerationJob,
        control: &mut dyn StepControl,
    ) -> Result<Vec<GeneratedImage>, GenerateError> {
        png_files(&self.generate_float(job, control)?)
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
