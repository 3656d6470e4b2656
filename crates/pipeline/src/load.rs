//! Loading a diffusers folder into a [`StableDiffusion`]: every config read and checked
//! against the others first, then the weights of each component onto the chosen device.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::DType;
use sdserve_generation::{
    ConditioningInputs, DefaultStrength, MaskInput, ModelDescription, TIME_IDS,
};

use crate::config::{
    Activation, ModelIndex, PipelineKind, TextEncoderConfig, UNetConfig, VaeConfig,
};
use crate::device::{CudaTuning, LoadOptions, Placement};
use crate::error::PipelineError;
use crate::lora::adapter::AdaptableLayers;
use crate::lora::base::recording;
use crate::lora::keys::Network;
use crate::lora::variant::Adapters;
use crate::pipeline::StableDiffusion;
use crate::prompt::{PromptEncoder, TextTower};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::weights::{WeightStore, find_weights};

/// Every config of a folder, each checked against the others.
struct Configs {
    kind: PipelineKind,
    unet: UNetConfig,
    vae: VaeConfig,
    /// One text encoder (and tokenizer) per tower: `text_encoder`, then SDXL's
    /// `text_encoder_2`.
    texts: Vec<TowerConfig>,
    scheduler: SchedulerConfig,
    default_scheduler: SchedulerKind,
}

/// One text encoder (its network names its folder), its config and tokenizer.
struct TowerConfig {
    network: Network,
    config: TextEncoderConfig,
    tokenizer: ClipTokenizer,
}

/// The text encoder and tokenizer folder of each tower.
const TOWERS: [(Network, &str); 2] = [
    (Network::TextEncoder, "tokenizer"),
    (Network::TextEncoder2, "tokenizer_2"),
];

impl TowerConfig {
    fn read(
        dir: &Path,
        (network, tokenizer_folder): (Network, &str),
    ) -> Result<Self, PipelineError> {
        let folder = network.component();
        let config = TextEncoderConfig::read(&dir.join(folder).join("config.json"))?;
        let tokenizer_dir = dir.join(tokenizer_folder);
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        if tokenizer.max_length() > config.max_position_embeddings {
            return Err(PipelineError::config(
                &tokenizer_dir,
                format!(
                    "model_max_length {} exceeds the text encoder's max_position_embeddings {}",
                    tokenizer.max_length(),
                    config.max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            network,
            config,
            tokenizer,
        })
    }
}

impl Configs {
    fn read(dir: &Path) -> Result<Self, PipelineError> {
        let kind = ModelIndex::read(dir)?.kind;
        let unet = UNetConfig::read(&dir.join("unet/config.json"))?;
        let vae = VaeConfig::read(&dir.join("vae/config.json"))?;
        let towers = match kind {
            PipelineKind::StableDiffusion => &TOWERS[..1],
            PipelineKind::StableDiffusionXl { refiner: true, .. } => &TOWERS[1..],
            PipelineKind::StableDiffusionXl { .. } => &TOWERS[..],
        };
        let texts = towers
            .iter()
            .map(|&t| TowerConfig::read(dir, t))
            .collect::<Result<Vec<_>, _>>()?;
        check_compatible(dir, kind, &unet, &vae, &texts)?;
        let mut scheduler =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        // StableDiffusionPipeline.__init__ normalises outdated scheduler configs the same way.
        scheduler.apply_pipeline_fixups();
        let default_scheduler = scheduler.default_kind()?;
        Ok(Self {
            kind,
            unet,
            vae,
            texts,
            scheduler,
            default_scheduler,
        })
    }

    fn describe(&self, placement: &Placement) -> ModelDescription {
        let scale = self.vae.scale_factor();
        let v2 = self.texts[0].config.hidden_act != Activation::QuickGelu
            || self.unet.use_linear_projection;
        let (family, conditioning) = match self.kind {
            PipelineKind::StableDiffusionXl { refiner: true, .. } => {
                ("sdxl-refiner", ConditioningInputs::Refiner)
            }
            PipelineKind::StableDiffusionXl { .. } => ("sdxl", ConditioningInputs::PromptsAndSizes),
            PipelineKind::StableDiffusion if v2 => ("sd2", ConditioningInputs::Prompt),
            PipelineKind::StableDiffusion => ("sd1", ConditioningInputs::Prompt),
        };
        ModelDescription {
            native_height: self.unet.sample_size.0 * scale,
            native_width: self.unet.sample_size.1 * scale,
            vae_scale_factor: scale,
            latent_channels: self.vae.latent_channels,
            default_scheduler: self.default_scheduler.name().to_string(),
            schedulers: SchedulerKind::all()
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            family: family.to_string(),
            conditioning,
            // Set once the VAE is loaded: image inputs need its encoder.
            default_strength: None,
            masks: MaskInput::NotServed,
            dtype: placement.dtype_name().to_string(),
            device: placement.device_name.clone(),
            // Set once the adapters are read.
            adapters: Vec::new(),
        }
    }
}

impl StableDiffusion {
    /// Reads every config, validates it, and loads the weights onto the chosen device.
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Self, PipelineError> {
        if !dir.is_dir() {
            return Err(PipelineError::config(dir, "not a directory"));
        }
        let configs = Configs::read(dir)?;
        let placement = Placement::resolve(&options)?;
        let mut description = configs.describe(&placement);
        let dtype = placement.dtype;
        let device = &placement.device;
        // Reduced-precision runs prefer the folder's `.fp16` weights where it has them.
        let reduced = dtype != DType::F32;

        let loaded = Arc::new(AtomicU64::new(0));
        // The layers adapters may adapt (looked up only for a model with adapters), and the
        // weights each network is built from (kept to build a job's adapted networks).
        let adapting = !options.adapters.is_empty();
        let mut adaptable = Vec::with_capacity(configs.texts.len() + 1);
        let mut text_bases = Vec::with_capacity(configs.texts.len());
        // The text encoders run in F32 everywhere; their output is cast to the UNet dtype.
        let mut towers = Vec::with_capacity(configs.texts.len());
        for text in configs.texts {
            let folder = text.network.component();
            let store = WeightStore::open(&find_weights(&dir.join(folder), "model", false)?)?
                .counting(loaded.clone());
            if adapting {
                adaptable.push(AdaptableLayers::of(text.network, &store, None));
            }
            let (vb, recording) = recording(store, DType::F32, device);
            let encoder =
                TextEncoder::new(vb, &text.config).map_err(|e| PipelineError::model(folder, e))?;
            text_bases.push((text.network, recording.finish()));
            towers.push(TextTower {
                tokenizer: Arc::new(text.tokenizer),
                encoder,
            });
        }
        let unet_store = component_weights(dir, "unet", reduced)?.counting(loaded.clone());
        if adapting {
            adaptable.push(AdaptableLayers::of(
                Network::Unet,
                &unet_store,
                Some(&configs.unet),
            ));
        }
        let (vb, recording) = recording(unet_store, dtype, device);
        let unet = UNet::new(vb, &configs.unet).map_err(|e| PipelineError::model("unet", e))?;
        let adapters = Adapters::load(
            &options.adapters,
            &adaptable,
            recording.finish(),
            text_bases,
            device,
            &loaded,
        )?;
        description.adapters = adapters.infos();
        let vae_dtype = vae_dtype(configs.kind, &configs.vae, dtype);
        let vae_store =
            component_weights(dir, "vae", vae_dtype != DType::F32)?.counting(loaded.clone());
        let vae = Vae::new(vae_store.var_builder(vae_dtype, device), &configs.vae)
            .map_err(|e| PipelineError::model("vae", e))?;
        description.default_strength = vae.has_encoder().then_some(default_strength(configs.kind));
        description.masks = mask_input(
            configs.kind,
            configs.unet.in_channels == inpainting_channels(configs.vae.latent_channels),
            vae.has_encoder(),
        );
        let model = Self {
            dir: dir.to_path_buf(),
            description,
            prompts: PromptEncoder {
                towers,
                kind: configs.kind,
                dtype,
            },
            unet,
            adapters,
            vae,
            scheduler_config: configs.scheduler,
            weights_bytes: loaded.load(Ordering::Relaxed),
            placement,
        };
        if CudaTuning::on(model.device()).warm_up {
            let took = model.warm_up().map_err(|e| PipelineError::Model {
                component: "warm-up generation".into(),
                message: e.to_string(),
            })?;
            tracing::info!(
                model = %dir.display(),
                seconds = took.as_secs_f64(),
                "warmed up: one step at the smallest size"
            );
        }
        Ok(model)
    }
}

/// An inpainting UNet's input: the latents, the mask and the masked image's latents.
fn inpainting_channels(latent_channels: usize) -> usize {
    2 * latent_channels + 1
}

/// How the folder inpaints: a 9-channel UNet needs a mask; a plain UNet inpaints by blending
/// (diffusers' inpaint pipelines on a plain UNet); refiners do not inpaint.
fn mask_input(kind: PipelineKind, inpainting_unet: bool, has_encoder: bool) -> MaskInput {
    match kind {
        _ if !has_encoder => MaskInput::NotServed,
        PipelineKind::StableDiffusionXl { refiner: true, .. } => MaskInput::NotServed,
        _ if inpainting_unet => MaskInput::Required,
        _ => MaskInput::Optional,
    }
}

/// Strengths when a request gives none: those of diffusers' pipelines for the folder's kind.
fn default_strength(kind: PipelineKind) -> DefaultStrength {
    match kind {
        PipelineKind::StableDiffusionXl { .. } => DefaultStrength::SDXL,
        PipelineKind::StableDiffusion => DefaultStrength::SD,
    }
}

/// The VAE's dtype: the model's, except that SDXL pipelines run a `force_upcast` VAE in F32
/// when the model is in F16 (diffusers' `upcast_vae`); SD 1.x / 2.x pipelines never upcast.
fn vae_dtype(kind: PipelineKind, vae: &VaeConfig, dtype: DType) -> DType {
    match kind {
        PipelineKind::StableDiffusionXl { .. } if dtype == DType::F16 && vae.force_upcast => {
            DType::F32
        }
        _ => dtype,
    }
}

/// The weights of a diffusers component (`unet`, `vae`) of the folder.
fn component_weights(
    dir: &Path,
    component: &str,
    reduced: bool,
) -> Result<WeightStore, PipelineError> {
    WeightStore::open(&find_weights(
        &dir.join(component),
        "diffusion_pytorch_model",
        reduced,
    )?)
}

fn check_compatible(
    dir: &Path,
    kind: PipelineKind,
    unet: &UNetConfig,
    vae: &VaeConfig,
    texts: &[TowerConfig],
) -> Result<(), PipelineError> {
    let unet_path = dir.join("unet/config.json");
    let latent = vae.latent_channels;
    let inpainting = unet.in_channels == inpainting_channels(latent);
    if (unet.in_channels != latent && !inpainting) || unet.out_channels != latent {
        return Err(PipelineError::config(
            &unet_path,
            format!(
                "in_channels {} / out_channels {}: both must equal the VAE's latent_channels {latent} (in_channels {} for an inpainting UNet)",
                unet.in_channels,
                unet.out_channels,
                inpainting_channels(latent)
            ),
        ));
    }
    if inpainting && matches!(kind, PipelineKind::StableDiffusionXl { refiner: true, .. }) {
        return Err(PipelineError::Unsupported(format!(
            "{}: an inpainting UNet ({} input channels) in an SDXL refiner folder",
            unet_path.display(),
            unet.in_channels
        )));
    }
    // SDXL's context is both encoders' hidden states side by side.
    let context: usize = texts.iter().map(|t| t.config.hidden_size).sum();
    let encoders: Vec<&str> = texts.iter().map(|t| t.network.component()).collect();
    if let Some(dim) = unet.context_dims().find(|&d| d != context) {
        return Err(PipelineError::config(
            &unet_path,
            format!(
                "key `cross_attention_dim`: {dim} differs from the hidden_size of {} ({context})",
                encoders.join(" + ")
            ),
        ));
    }
    check_text_time(dir, kind, unet, texts)?;
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

/// SDXL folders need the UNet's `text_time` added conditioning, sized for the second
/// encoder's projection and the six time ids; other folders must not have it.
fn check_text_time(
    dir: &Path,
    kind: PipelineKind,
    unet: &UNetConfig,
    texts: &[TowerConfig],
) -> Result<(), PipelineError> {
    let unet_path = &dir.join("unet/config.json");
    let projection = texts.last().and_then(|t| t.config.projection_dim);
    match (kind, unet.text_time, projection) {
        (PipelineKind::StableDiffusion, None, _) => Ok(()),
        (PipelineKind::StableDiffusion, Some(_), _) => Err(PipelineError::config(
            unet_path,
            "key `addition_embed_type`: \"text_time\" needs an SDXL pipeline (model_index.json is StableDiffusionPipeline)",
        )),
        (PipelineKind::StableDiffusionXl { .. }, None, _) => Err(PipelineError::config(
            unet_path,
            "key `addition_embed_type`: an SDXL UNet needs \"text_time\"",
        )),
        (PipelineKind::StableDiffusionXl { .. }, Some(_), None) => Err(PipelineError::config(
            &dir.join("text_encoder_2/config.json"),
            "text_encoder_2 must be a CLIPTextModelWithProjection (key `architectures`)",
        )),
        (PipelineKind::StableDiffusionXl { refiner, .. }, Some(t), Some(p)) => {
            // A refiner's aesthetic score takes the target size's two ids.
            let ids = if refiner { TIME_IDS - 1 } else { TIME_IDS };
            let expected = p + ids * t.time_embed_dim;
            if t.input_dim == expected {
                Ok(())
            } else {
                Err(PipelineError::config(
                    unet_path,
                    format!(
                        "key `projection_class_embeddings_input_dim`: {} differs from text_encoder_2's projection_dim {p} + {ids} time ids × addition_time_embed_dim {} = {expected}",
                        t.input_dim, t.time_embed_dim
                    ),
                ))
            }
        }
    }
}
