//! Loading a diffusers folder into a [`StableDiffusion`]: every config read and checked
//! against the others first, then the weights of each component onto the chosen device.

use std::path::Path;

use candle_core::DType;
use sdserve_generation::ModelDescription;

use crate::config::{Activation, ModelIndex, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::device::{LoadOptions, Placement};
use crate::error::PipelineError;
use crate::pipeline::StableDiffusion;
use crate::prompt::PromptEncoder;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text_encoder::TextEncoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::weights::{WeightStore, find_weights};

/// Every config of a folder, each checked against the others.
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: TextEncoderConfig,
    scheduler: SchedulerConfig,
    default_scheduler: SchedulerKind,
    tokenizer: ClipTokenizer,
}

impl Configs {
    fn read(dir: &Path) -> Result<Self, PipelineError> {
        ModelIndex::read(dir)?;
        let unet = UNetConfig::read(&dir.join("unet/config.json"))?;
        let vae = VaeConfig::read(&dir.join("vae/config.json"))?;
        let text = TextEncoderConfig::read(&dir.join("text_encoder/config.json"))?;
        check_compatible(dir, &unet, &vae, &text)?;
        let mut scheduler =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        // StableDiffusionPipeline.__init__ normalises outdated scheduler configs the same way.
        scheduler.apply_pipeline_fixups();
        let default_scheduler = scheduler.default_kind()?;
        let tokenizer_dir = dir.join("tokenizer");
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        if tokenizer.max_length() > text.max_position_embeddings {
            return Err(PipelineError::config(
                &tokenizer_dir,
                format!(
                    "model_max_length {} exceeds the text encoder's max_position_embeddings {}",
                    tokenizer.max_length(),
                    text.max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            unet,
            vae,
            text,
            scheduler,
            default_scheduler,
            tokenizer,
        })
    }

    fn describe(&self, placement: &Placement) -> ModelDescription {
        let scale = self.vae.scale_factor();
        let v2 = self.text.hidden_act != Activation::QuickGelu || self.unet.use_linear_projection;
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
            family: if v2 { "sd2" } else { "sd1" }.to_string(),
            dtype: placement.dtype_name().to_string(),
            device: placement.device_name.clone(),
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
        let description = configs.describe(&placement);
        let dtype = placement.dtype;
        let device = &placement.device;
        // Reduced-precision runs prefer the folder's `.fp16` weights where it has them.
        let reduced = dtype != DType::F32;

        // The text encoder runs in F32 everywhere; its output is cast to the UNet dtype.
        let te_store =
            WeightStore::open(&find_weights(&dir.join("text_encoder"), "model", false)?)?;
        let text_encoder =
            TextEncoder::new(te_store.var_builder(DType::F32, device), &configs.text)
                .map_err(|e| PipelineError::model("text encoder", e))?;
        let unet_store = component_weights(dir, "unet", reduced)?;
        let unet = UNet::new(unet_store.var_builder(dtype, device), &configs.unet)
            .map_err(|e| PipelineError::model("unet", e))?;
        let vae_store = component_weights(dir, "vae", reduced)?;
        let vae = Vae::new(vae_store.var_builder(dtype, device), &configs.vae)
            .map_err(|e| PipelineError::model("vae", e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            description,
            prompts: PromptEncoder {
                tokenizer: configs.tokenizer,
                text_encoder,
                dtype,
            },
            unet,
            vae,
            scheduler_config: configs.scheduler,
            placement,
        })
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
