//! Diffusers folders with seeded random weights at the real model sizes, for benchmarks that
//! must not depend on a download.
//!
//! The tensor list is not written down anywhere: the text encoder, UNet and VAE are built by the
//! same constructors [`StableDiffusion::load`](crate::StableDiffusion::load) uses, over a
//! [`SimpleBackend`] that records every name and shape asked for. A folder written here therefore
//! loads in sdserve by construction, and because those names are the diffusers / transformers
//! names, it loads in diffusers too.
//!
//! Values are drawn per tensor from a ChaCha20 stream keyed by the seed, the component and the
//! tensor name, in fixed blocks, so they do not depend on file order or thread count. The scales
//! keep activations near unit size through the whole network, so long F16 generations stay finite
//! and images are not flat: weights `N(0, 1/fan_in)` (`q`/`k` projections `N(0, 1.4²/fan_in)`, so
//! attention is not uniform), biases `N(0, 0.02²)`, norm weights `1 + N(0, 0.1²)` and biases
//! `N(0, 0.1²)`, token embeddings `N(0, 1)`, position embeddings `N(0, 0.5²)`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::{Value, json};

use crate::config::{TextEncoderConfig, UNetConfig, VaeConfig};
use crate::error::PipelineError;
use crate::noise::NormalStream;
use crate::text_encoder::TextEncoder;
use crate::unet::UNet;

type Result<T> = std::result::Result<T, PipelineError>;

/// A named model configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Stable Diffusion 1.5 (`stable-diffusion-v1-5`): UNet 860M, CLIP ViT-L/14 text encoder.
    Sd15,
    /// Stable Diffusion 2.1 (`stable-diffusion-2-1`, 768 px, v-prediction), OpenCLIP ViT-H text.
    Sd21,
    /// The SD 1.x architecture at toy size (the sizes of `models/tiny-sd1`), for tests and dry runs.
    Tiny,
    /// Stable Diffusion XL base 1.0 (1024 px): UNet 2.6B with `text_time` conditioning, CLIP
    /// ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection) text encoders.
    Sdxl,
    /// The SDXL architecture at toy size (the sizes of `models/tiny-sdxl`), for dry runs.
    TinySdxl,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::Sd15,
        Preset::Sd21,
        Preset::Tiny,
        Preset::Sdxl,
        Preset::TinySdxl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15",
            Preset::Sd21 => "sd21",
            Preset::Tiny => "tiny",
            Preset::Sdxl => "sdxl",
            Preset::TinySdxl => "tiny-sdxl",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The published `config.json` / `scheduler_config.json` contents of each component.
    pub fn configs(self) -> PresetConfigs {
        match self {
            Preset::Sd15 => PresetConfigs {
                unet: unet_config(json!(8), &[320, 640, 1280, 1280], 768, 64, false, "0.6.0"),
                vae: vae_config(&[128, 256, 512, 512], 2, 512),
                text_encoder: text_encoder_config(768, 3072, 12, 12, "quick_gelu", 768),
                text_encoder_2: None,
                scheduler: json!({
                    "_class_name": "PNDMScheduler",
                    "_diffusers_version": "0.6.0",
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": false,
                    "num_train_timesteps": 1000,
                    "set_alpha_to_one": false,
                    "skip_prk_steps": true,
                    "steps_offset": 1,
                    "trained_betas": null
                }),
            },
            Preset::Sd21 => PresetConfigs {
                unet: unet_config(
                    json!([5, 10, 20, 20]),
                    &[320, 640, 1280, 1280],
                    1024,
                    96,
                    true,
                    "0.10.0.dev0",
                ),
                vae: vae_config(&[128, 256, 512, 512], 2, 768),
                text_encoder: text_encoder_config(1024, 4096, 23, 16, "gelu", 512),
                text_encoder_2: None,
                scheduler: json!({
                    "_class_name": "DDIMScheduler",
                    "_diffusers_version": "0.8.0",
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085,
                    "clip_sample": false,
                    "num_train_timesteps": 1000,
                    "prediction_type": "v_prediction",
                    "set_alpha_to_one": false,
                    "skip_prk_steps": true,
                    "steps_offset": 1,
                    "trained_betas": null
                }),
            },
            Preset::Tiny => {
                let mut unet = unet_config(json!(8), &[32, 64], 32, 8, false, "0.6.0");
                unet["down_block_types"] = json!(["CrossAttnDownBlock2D", "DownBlock2D"]);
                unet["up_block_types"] = json!(["UpBlock2D", "CrossAttnUpBlock2D"]);
                PresetConfigs {
                    unet,
                    vae: vae_config(&[32, 32, 64, 64], 1, 64),
                    text_encoder: text_encoder_config(32, 64, 4, 4, "quick_gelu", 32),
                    text_encoder_2: None,
                    scheduler: Preset::Sd15.configs().scheduler,
                }
            }
            Preset::Sdxl => sdxl_configs(),
            Preset::TinySdxl => tiny_sdxl_configs(),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The JSON configs of one preset.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetConfigs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`).
    pub text_encoder_2: Option<Value>,
    pub scheduler: Value,
}

/// SDXL's structure at the sizes of `models/tiny-sdxl`: two 32-wide encoders, UNet channels
/// (32, 64), `transformer_layers_per_block` [1, 2], `addition_time_embed_dim` 8.
fn tiny_sdxl_configs() -> PresetConfigs {
    let mut c = sdxl_configs();
    let unet = c.unet.as_object_mut().expect("object literal");
    for (key, value) in [
        ("attention_head_dim", json!([2, 4])),
        ("block_out_channels", json!([32, 64])),
        ("cross_attention_dim", json!(64)),
        ("sample_size", json!(8)),
        ("layers_per_block", json!(1)),
        (
            "down_block_types",
            json!(["DownBlock2D", "CrossAttnDownBlock2D"]),
        ),
        ("up_block_types", json!(["CrossAttnUpBlock2D", "UpBlock2D"])),
        ("transformer_layers_per_block", json!([1, 2])),
        ("addition_time_embed_dim", json!(8)),
        ("projection_class_embeddings_input_dim", json!(80)),
    ] {
        unet.insert(key.into(), value);
    }
    c.vae = sdxl_vae_config(&[32, 32, 64, 64], 1, 64);
    c.text_encoder = text_encoder_config(32, 64, 4, 4, "quick_gelu", 32);
    c.text_encoder_2 = Some(projected_text_encoder_config(32, 64, 4, 4, 32));
    c
}

/// SDXL's VAE: its scaling factor, and too large activations for F16.
fn sdxl_vae_config(channels: &[usize], layers_per_block: usize, sample_size: usize) -> Value {
    let mut vae = vae_config(channels, layers_per_block, sample_size);
    vae["scaling_factor"] = json!(0.13025);
    vae["force_upcast"] = json!(true);
    vae
}

/// SDXL's second text encoder: OpenCLIP's (gelu), with its pooled projection.
fn projected_text_encoder_config(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    projection_dim: usize,
) -> Value {
    let mut c = text_encoder_config(hidden, intermediate, layers, heads, "gelu", projection_dim);
    c["architectures"] = json!(["CLIPTextModelWithProjection"]);
    c
}

/// SDXL base 1.0's published configs.
fn sdxl_configs() -> PresetConfigs {
    let mut unet = unet_config(
        json!([5, 10, 20]),
        &[320, 640, 1280],
        2048,
        128,
        true,
        "0.19.0.dev0",
    );
    let map = unet.as_object_mut().expect("object literal");
    for (key, value) in [
        (
            "down_block_types",
            json!([
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D"
            ]),
        ),
        (
            "up_block_types",
            json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        ),
        ("transformer_layers_per_block", json!([1, 2, 10])),
        ("addition_embed_type", json!("text_time")),
        ("addition_embed_type_num_heads", json!(64)),
        ("addition_time_embed_dim", json!(256)),
        ("projection_class_embeddings_input_dim", json!(2816)),
        ("upcast_attention", Value::Null),
    ] {
        map.insert(key.into(), value);
    }
    PresetConfigs {
        unet,
        vae: sdxl_vae_config(&[128, 256, 512, 512], 2, 1024),
        text_encoder: text_encoder_config(768, 3072, 12, 12, "quick_gelu", 768),
        text_encoder_2: Some(projected_text_encoder_config(1280, 5120, 32, 20, 1280)),
        scheduler: json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.19.0.dev0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "use_karras_sigmas": false
        }),
    }
}

fn unet_config(
    heads: Value,
    channels: &[usize],
    cross_attention_dim: usize,
    sample_size: usize,
    v2: bool,
    version: &str,
) -> Value {
    let mut c = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": version,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": false,
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": sample_size,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    });
    if v2 {
        let map = c.as_object_mut().expect("object literal");
        map.insert("dual_cross_attention".into(), json!(false));
        map.insert("num_class_embeds".into(), Value::Null);
        map.insert("only_cross_attention".into(), json!(false));
        map.insert("upcast_attention".into(), json!(true));
        map.insert("use_linear_projection".into(), json!(true));
    }
    c
}

fn vae_config(channels: &[usize], layers_per_block: usize, sample_size: usize) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": layers_per_block,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "up_block_types": vec!["UpDecoderBlock2D"; channels.len()]
    })
}

fn text_encoder_config(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    act: &str,
    projection_dim: usize,
) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection_dim,
        "torch_dtype": "float32",
        "vocab_size": 49408
    })
}

fn model_index(scheduler_class: &str, sdxl: bool) -> Value {
    if sdxl {
        return json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": true,
            "image_encoder": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
    }
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// One tensor a component's loader asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of a folder, per component, in the order the loader asks for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTensors {
    pub text_encoder: Vec<TensorSpec>,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<Vec<TensorSpec>>,
    pub unet: Vec<TensorSpec>,
    pub vae: Vec<TensorSpec>,
}

/// Records what is asked for and answers with a zero-stride view of one zero, so building a
/// full-size model costs no memory.
#[derive(Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<TensorSpec>>>,
    /// Answer as a text encoder saved with the `text_model.` prefix (transformers 5 keeps it
    /// for `CLIPTextModelWithProjection`).
    text_model_prefix: bool,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.iter().find(|t| t.name == name) {
            Some(t) if t.shape != s.dims() => candle_core::bail!(
                "tensor `{name}` asked for with shape {:?} and {:?}",
                t.shape,
                s.dims()
            ),
            Some(_) => {}
            None => seen.push(TensorSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
            }),
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` was asked for without a shape")
    }

    /// Answers the loaders' format probes as a current diffusers / transformers 5 checkpoint
    /// would: VAE attention named `to_q`/`to_k`/`to_v`/`to_out.0` (not the deprecated
    /// `query`/`key`/`value`/`proj_attn`), the text encoder without the `text_model.` prefix,
    /// norms as `weight`/`bias`.
    fn contains_tensor(&self, name: &str) -> bool {
        name == "to_q.weight"
            || name.ends_with(".to_q.weight")
            || (self.text_model_prefix && name == "text_model.embeddings.token_embedding.weight")
    }
}

fn record(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
    component: &str,
) -> Result<Vec<TensorSpec>> {
    record_with(build, component, Recorder::default())
}

fn record_with(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
    component: &str,
    recorder: Recorder,
) -> Result<Vec<TensorSpec>> {
    let seen = recorder.seen.clone();
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu);
    build(vb).map_err(|e| PipelineError::model(component, e))?;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(seen)
}

/// The tensors the loader needs for the configs in `dir` (`text_encoder/config.json`,
/// `unet/config.json`, `vae/config.json`), found by building each component.
pub fn tensor_specs(dir: &Path) -> Result<ModelTensors> {
    let text_config = TextEncoderConfig::read(&dir.join("text_encoder/config.json"))?;
    let unet_config = UNetConfig::read(&dir.join("unet/config.json"))?;
    let vae_config = VaeConfig::read(&dir.join("vae/config.json"))?;
    let second = dir.join("text_encoder_2/config.json");
    let text_encoder_2 = if second.is_file() {
        let config = TextEncoderConfig::read(&second)?;
        let recorder = Recorder {
            text_model_prefix: true,
            ..Default::default()
        };
        let build = |vb| TextEncoder::new(vb, &config).map(drop);
        Some(record_with(build, "text_encoder_2", recorder)?)
    } else {
        None
    };
    Ok(ModelTensors {
        text_encoder: record(
            |vb| TextEncoder::new(vb, &text_config).map(drop),
            "text encoder",
        )?,
        text_encoder_2,
        unet: record(|vb| UNet::new(vb, &unet_config).map(drop), "unet")?,
        // The whole autoencoder, encoder included, as diffusers saves it.
        vae: record(
            |vb| {
                let config = AutoEncoderKLConfig {
                    block_out_channels: vae_config.block_out_channels.clone(),
                    layers_per_block: vae_config.layers_per_block,
                    latent_channels: vae_config.latent_channels,
                    norm_num_groups: vae_config.norm_num_groups,
                    use_quant_conv: vae_config.use_quant_conv,
                    use_post_quant_conv: vae_config.use_post_quant_conv,
                };
                let (i, o) = (vae_config.in_channels, vae_config.out_channels);
                AutoEncoderKL::new(vb, i, o, config).map(drop)
            },
            "vae",
        )?,
    })
}

/// What to write.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModelOptions {
    pub preset: Preset,
    /// F32, F16 or BF16; every component is stored in it.
    pub dtype: DType,
    pub seed: u64,
    /// A CLIP tokenizer folder (`vocab.json`, `merges.txt`, ...) copied as `tokenizer/`.
    pub tokenizer: PathBuf,
}

/// `f32`, `f16` or `bf16` (also `float32`, `float16`, `fp16`, `bfloat16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(PipelineError::Options(format!(
            "dtype {other:?} is not one of f32, f16, bf16"
        ))),
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenModel {
    pub tensors: usize,
    pub parameters: usize,
    /// Bytes of the safetensors files.
    pub weight_bytes: u64,
}

/// Writes a complete diffusers `StableDiffusionPipeline` (or, for SDXL, `StableDiffusionXLPipeline`) folder with seeded random weights to
/// `out`, which must not exist or be empty. `model_index.json` is written last, so an interrupted
/// run leaves a folder no loader mistakes for a model.
pub fn write_random_model(out: &Path, options: &RandomModelOptions) -> Result<WrittenModel> {
    let st_dtype = match options.dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        other => {
            return Err(PipelineError::Options(format!(
                "dtype {other:?} is not one of f32, f16, bf16"
            )));
        }
    };
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| PipelineError::io(out, e))?;
        if entries.next().is_some() {
            return Err(PipelineError::config(
                out,
                "output folder exists and is not empty",
            ));
        }
    }
    let tokenizer_files = tokenizer_files(&options.tokenizer)?;

    let configs = options.preset.configs();
    for (sub, file, value) in [
        ("unet", "config.json", Some(&configs.unet)),
        ("vae", "config.json", Some(&configs.vae)),
        ("text_encoder", "config.json", Some(&configs.text_encoder)),
        (
            "text_encoder_2",
            "config.json",
            configs.text_encoder_2.as_ref(),
        ),
        (
            "scheduler",
            "scheduler_config.json",
            Some(&configs.scheduler),
        ),
    ] {
        if let Some(value) = value {
            write_json(&out.join(sub).join(file), value)?;
        }
    }
    copy_tokenizer(&tokenizer_files, &out.join("tokenizer"), None)?;
    if configs.text_encoder_2.is_some() {
        // SDXL's second tokenizer pads with "!" (OpenCLIP's), the first with <|endoftext|>.
        copy_tokenizer(&tokenizer_files, &out.join("tokenizer_2"), Some("!"))?;
    }

    let specs = tensor_specs(out)?;
    let mut written = WrittenModel {
        tensors: 0,
        parameters: 0,
        weight_bytes: 0,
    };
    let components = [
        (
            "text_encoder",
            "model.safetensors",
            Some(&specs.text_encoder),
        ),
        (
            "text_encoder_2",
            "model.safetensors",
            specs.text_encoder_2.as_ref(),
        ),
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            Some(&specs.unet),
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            Some(&specs.vae),
        ),
    ];
    for (sub, file, tensors) in components {
        let Some(tensors) = tensors else { continue };
        let path = out.join(sub).join(file);
        let views = tensors.iter().map(|spec| {
            let view = RandomTensor {
                spec,
                dtype: st_dtype,
                seed: tensor_seed(options.seed, sub, &spec.name),
                init: init_for(&spec.name, &spec.shape),
            };
            (spec.name.clone(), view)
        });
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| PipelineError::weights(&path, format!("cannot write: {e}")))?;
        written.tensors += tensors.len();
        written.parameters += tensors.iter().map(TensorSpec::elements).sum::<usize>();
        written.weight_bytes += std::fs::metadata(&path)
            .map_err(|e| PipelineError::io(&path, e))?
            .len();
    }
    let scheduler_class = configs.scheduler["_class_name"]
        .as_str()
        .unwrap_or("PNDMScheduler");
    let index = model_index(scheduler_class, configs.text_encoder_2.is_some());
    write_json(&out.join("model_index.json"), &index)?;
    Ok(written)
}

/// [`write_random_model`] from command-line words (`--config`, `--dtype`, ...); returns the
/// one-line summary to print.
pub fn write_named(
    config: &str,
    dtype: &str,
    seed: u64,
    tokenizer: PathBuf,
    out: &Path,
) -> Result<String> {
    let preset = Preset::from_name(config).ok_or_else(|| {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        PipelineError::Options(format!(
            "--config {config:?} is not one of {}",
            names.join(", ")
        ))
    })?;
    let dtype = parse_dtype(dtype)?;
    let started = std::time::Instant::now();
    let w = write_random_model(
        out,
        &RandomModelOptions {
            preset,
            dtype,
            seed,
            tokenizer,
        },
    )?;
    Ok(format!(
        "{}: {preset} {dtype:?} seed {seed}: {} tensors, {} parameters, {:.1} MB of weights in {:.1} s",
        out.display(),
        w.tensors,
        w.parameters,
        w.weight_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    std::fs::write(path, text).map_err(|e| PipelineError::io(path, e))
}

/// Copies a tokenizer's files into `dest`, with `pad` as its pad token if given (in
/// `tokenizer_config.json` and `special_tokens_map.json`, where present).
fn copy_tokenizer(files: &[PathBuf], dest: &Path, pad: Option<&str>) -> Result<()> {
    create_dir(dest)?;
    for src in files {
        let name = src.file_name().expect("listed from a directory");
        let dst = dest.join(name);
        let padded = matches!(
            name.to_str(),
            Some("tokenizer_config.json" | "special_tokens_map.json")
        );
        match pad {
            Some(pad) if padded => {
                let text = std::fs::read_to_string(src).map_err(|e| PipelineError::io(src, e))?;
                let mut value: Value = serde_json::from_str(&text)
                    .map_err(|e| PipelineError::config(src, format!("invalid JSON: {e}")))?;
                value["pad_token"] = json!(pad);
                write_json(&dst, &value)?;
            }
            _ => {
                std::fs::copy(src, &dst).map_err(|e| PipelineError::io(src, e))?;
            }
        }
    }
    Ok(())
}

/// The regular files of a tokenizer folder, which must hold at least the BPE vocabulary.
fn tokenizer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for required in ["vocab.json", "merges.txt"] {
        if !dir.join(required).is_file() {
            return Err(PipelineError::config(
                &dir.join(required),
                "not found: the tokenizer folder to copy needs vocab.json and merges.txt",
            ));
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PipelineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// How one tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
struct InitRule {
    mean: f32,
    std: f32,
}

fn init_for(name: &str, shape: &[usize]) -> InitRule {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let owner = name.rsplit('.').nth(1).unwrap_or("");
    let is_norm = owner.contains("norm");
    if name.ends_with("token_embedding.weight") {
        return InitRule {
            mean: 0.0,
            std: 1.0,
        };
    }
    if name.ends_with("position_embedding.weight") {
        return InitRule {
            mean: 0.0,
            std: 0.5,
        };
    }
    match (shape.len(), leaf) {
        (1, "weight") if is_norm => InitRule {
            mean: 1.0,
            std: 0.1,
        },
        (1, "bias") if is_norm => InitRule {
            mean: 0.0,
            std: 0.1,
        },
        (1, _) => InitRule {
            mean: 0.0,
            std: 0.02,
        },
        _ => {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let gain = if matches!(owner, "to_q" | "to_k" | "q_proj" | "k_proj") {
                1.4
            } else {
                1.0
            };
            InitRule {
                mean: 0.0,
                std: gain / (fan_in as f32).sqrt(),
            }
        }
    }
}

/// FNV-1a over the seed, the component and the tensor name.
fn tensor_seed(seed: u64, component: &str, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed
        .to_le_bytes()
        .iter()
        .chain(component.as_bytes())
        .chain(b"/")
        .chain(name.as_bytes())
    {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Values are drawn in blocks of this many, each from its own stream, so blocks can be filled in
/// parallel and the result does not depend on the number of threads.
const BLOCK: usize = 1 << 20;

/// A tensor whose bytes are generated when the writer asks for them.
struct RandomTensor<'a> {
    spec: &'a TensorSpec,
    dtype: safetensors::Dtype,
    seed: u64,
    init: InitRule,
}

impl RandomTensor<'_> {
    fn fill_block(&self, block: usize, out: &mut [u8]) {
        let width = self.dtype.bitsize() / 8;
        let mut stream = NormalStream::new(
            self.seed
                .wrapping_add((block as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        for chunk in out.chunks_exact_mut(width) {
            let x = self.init.mean + self.init.std * stream.sample();
            match self.dtype {
                safetensors::Dtype::F16 => {
                    chunk.copy_from_slice(&half::f16::from_f32(x).to_le_bytes())
                }
                safetensors::Dtype::BF16 => {
                    chunk.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                }
                _ => chunk.copy_from_slice(&x.to_le_bytes()),
            }
        }
    }
}

impl safetensors::View for RandomTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let width = self.dtype.bitsize() / 8;
        let mut bytes = vec![0u8; self.data_len()];
        let blocks: Vec<(usize, &mut [u8])> = bytes.chunks_mut(BLOCK * width).enumerate().collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(blocks.len())
            .max(1);
        let mut per_thread: Vec<Vec<(usize, &mut [u8])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, block) in blocks {
            per_thread[i % threads].push((i, block));
        }
        std::thread::scope(|scope| {
            for work in per_thread {
                scope.spawn(move || {
                    for (i, block) in work {
                        self.fill_block(i, block);
                    }
                });
            }
        });
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.spec.elements() * (self.dtype.bitsize() / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadOptions, StableDiffusion};
    use sdserve_generation::{Generator, ImageSpec, Job, JobSettings, RunToEnd};

    fn tokenizer() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-sd1/tokenizer")
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sdserve-random-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn options(dtype: DType, seed: u64) -> RandomModelOptions {
        RandomModelOptions {
            preset: Preset::Tiny,
            dtype,
            seed,
            tokenizer: tokenizer(),
        }
    }

    fn load_all(path: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    #[test]
    fn tiny_sdxl_folder_loads_and_generates() {
        let d = tmp("tiny-sdxl");
        let mut o = options(DType::F32, 5);
        o.preset = Preset::TinySdxl;
        write_random_model(&d, &o).unwrap();
        let model = StableDiffusion::load(&d, LoadOptions::cpu()).unwrap();
        assert_eq!(model.description().family, "sdxl");
        assert_eq!(
            model.text_towers()[1].tokenizer.encode_padded("a")[3],
            0,
            "pads with '!'"
        );
        let job = Job {
            settings: JobSettings {
                num_inference_steps: 2,
                guidance_scale: 5.0,
                height: 64,
                width: 64,
                scheduler: model.description().default_scheduler.clone(),
                eta: 0.0,
                time_ids: Some(sdserve_generation::TimeIds::defaults(64, 64)),
                image_to_image: None,
                adapters: sdserve_generation::AdapterChoice::none(),
            },
            images: vec![ImageSpec::new("a red circle", 1)],
        };
        let image = model.generate_float(&job, &mut RunToEnd).unwrap();
        assert!(image.data.iter().all(|x| x.is_finite()));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn tiny_folder_loads_and_is_seeded() {
        let a = tmp("a");
        let written = write_random_model(&a, &options(DType::F16, 3)).unwrap();
        assert!(
            written.tensors > 100 && written.parameters > 1_000_000,
            "{written:?}"
        );

        // Exactly the tensors the loader asks for, in the requested dtype, with sane statistics.
        let specs = tensor_specs(&a).unwrap();
        let unet = load_all(&a.join("unet/diffusion_pytorch_model.safetensors"));
        assert_eq!(unet.len(), specs.unet.len());
        for s in &specs.unet {
            assert_eq!(unet[&s.name].dims(), s.shape.as_slice(), "{}", s.name);
            assert_eq!(unet[&s.name].dtype(), DType::F16);
        }
        let conv = unet["conv_in.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap();
        let std = conv
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let expected = 1.0 / (4.0f32 * 9.0).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.15,
            "conv_in std {std}, expected about {expected}"
        );
        let vae = load_all(&a.join("vae/diffusion_pytorch_model.safetensors"));
        assert!(vae.contains_key("decoder.mid_block.attentions.0.to_out.0.weight"));
        assert!(
            !vae.keys()
                .any(|k| k.contains("proj_attn") || k.contains(".query."))
        );
        let te = load_all(&a.join("text_encoder/model.safetensors"));
        assert!(te.contains_key("embeddings.token_embedding.weight"));
        let norm = unet["conv_norm_out.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((norm.to_scalar::<f32>().unwrap() - 1.0).abs() < 0.1);

        // Same seed, same bytes; another seed, other values.
        let b = tmp("b");
        write_random_model(&b, &options(DType::F16, 3)).unwrap();
        let c = tmp("c");
        write_random_model(&c, &options(DType::F16, 4)).unwrap();
        let file = "vae/diffusion_pytorch_model.safetensors";
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap()
        );
        assert_ne!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(c.join(file)).unwrap()
        );

        // The folder is a model sdserve loads, and a refilled folder is refused.
        let model = StableDiffusion::load(&a, LoadOptions::cpu()).unwrap();
        assert_eq!(model.unet().config().blocks.len(), 2);
        // The scales give a real picture: finite, not flat, not saturated.
        let job = Job {
            settings: JobSettings {
                num_inference_steps: 5,
                guidance_scale: 7.5,
                height: 64,
                width: 64,
                scheduler: model.description().default_scheduler.clone(),
                eta: 0.0,
                time_ids: None,
                image_to_image: None,
                adapters: sdserve_generation::AdapterChoice::none(),
            },
            images: vec![ImageSpec::new("a red circle", 1)],
        };
        let image = model.generate_float(&job, &mut RunToEnd).unwrap();
        let n = image.data.len() as f32;
        assert!(image.data.iter().all(|x| x.is_finite()));
        let mean = image.data.iter().sum::<f32>() / n;
        let std = (image.data.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        let saturated = image.data.iter().filter(|&&x| x <= 0.0 || x >= 1.0).count() as f32 / n;
        assert!(
            std > 0.1 && saturated < 0.5,
            "std {std}, saturated {saturated}"
        );
        let err = write_random_model(&a, &options(DType::F16, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not empty"), "{err}");
        for d in [a, b, c] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn blocks_do_not_depend_on_threads_and_f32_matches_f16() {
        let spec = TensorSpec {
            name: "w".into(),
            shape: vec![3, BLOCK / 2 + 5],
        };
        let init = InitRule {
            mean: 0.0,
            std: 1.0,
        };
        let f32_view = RandomTensor {
            spec: &spec,
            dtype: safetensors::Dtype::F32,
            seed: 9,
            init,
        };
        let f16_view = RandomTensor {
            spec: &spec,
            dtype: safetensors::Dtype::F16,
            seed: 9,
            init,
        };
        use safetensors::View;
        let wide = f32_view.data();
        let narrow = f16_view.data();
        // Block 1 filled alone equals block 1 of the whole tensor.
        let mut alone = vec![0u8; 4 * (spec.elements() - BLOCK)];
        f32_view.fill_block(1, &mut alone);
        assert_eq!(&wide[4 * BLOCK..], alone.as_slice());
        for i in [0, BLOCK - 1, BLOCK, spec.elements() - 1] {
            let x = f32::from_le_bytes(wide[4 * i..4 * i + 4].try_into().unwrap());
            let h = half::f16::from_le_bytes(narrow[2 * i..2 * i + 2].try_into().unwrap());
            assert_eq!(half::f16::from_f32(x), h);
        }
    }

    #[test]
    fn init_rules_by_name() {
        assert_eq!(
            init_for("encoder.layers.0.layer_norm1.weight", &[32]),
            InitRule {
                mean: 1.0,
                std: 0.1
            }
        );
        assert_eq!(
            init_for("down_blocks.0.resnets.0.norm1.bias", &[32]),
            InitRule {
                mean: 0.0,
                std: 0.1
            }
        );
        assert_eq!(
            init_for("conv_in.bias", &[32]),
            InitRule {
                mean: 0.0,
                std: 0.02
            }
        );
        assert_eq!(init_for("conv_in.weight", &[32, 4, 3, 3]).std, 1.0 / 6.0);
        assert_eq!(
            init_for("x.attn1.to_q.weight", &[320, 320]).std,
            1.4 / 320f32.sqrt()
        );
        assert_eq!(
            init_for("embeddings.token_embedding.weight", &[49408, 32]).std,
            1.0
        );
    }

    #[test]
    fn bad_options_are_named() {
        let d = tmp("bad");
        let mut o = options(DType::F16, 0);
        o.tokenizer = d.join("nowhere");
        let err = write_random_model(&d, &o).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        let err = write_random_model(&d, &options(DType::U8, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("U8"), "{err}");
        assert_eq!(parse_dtype("FP16").unwrap(), DType::F16);
        let err = write_named("sdxl-refiner", "f16", 0, tokenizer(), &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sdxl-refiner") && err.contains("sd15"),
            "{err}"
        );
        assert!(
            parse_dtype("int8")
                .unwrap_err()
                .to_string()
                .contains("int8")
        );
    }

    #[test]
    fn full_size_presets_parse_and_count() {
        // Building the real-size models costs no memory with the recorder.
        let d = tmp("sd15-configs");
        let configs = Preset::Sd15.configs();
        for (sub, value) in [
            ("unet", &configs.unet),
            ("vae", &configs.vae),
            ("text_encoder", &configs.text_encoder),
        ] {
            write_json(&d.join(sub).join("config.json"), value).unwrap();
        }
        let specs = tensor_specs(&d).unwrap();
        let count = |t: &[TensorSpec]| t.iter().map(TensorSpec::elements).sum::<usize>();
        // The published parameter counts of SD 1.5's components.
        assert_eq!(count(&specs.unet), 859_520_964);
        assert_eq!(count(&specs.vae), 83_653_863);
        assert_eq!(count(&specs.text_encoder), 123_060_480);
        std::fs::remove_dir_all(d).unwrap();

        let d = tmp("sdxl-configs");
        let configs = Preset::Sdxl.configs();
        for (sub, value) in [
            ("unet", &configs.unet),
            ("vae", &configs.vae),
            ("text_encoder", &configs.text_encoder),
            ("text_encoder_2", configs.text_encoder_2.as_ref().unwrap()),
        ] {
            write_json(&d.join(sub).join("config.json"), value).unwrap();
        }
        let specs = tensor_specs(&d).unwrap();
        // The published parameter counts of SDXL base 1.0's components.
        assert_eq!(count(&specs.unet), 2_567_463_684);
        assert_eq!(count(specs.text_encoder_2.as_ref().unwrap()), 694_659_840);
        assert_eq!(count(&specs.text_encoder), 123_060_480);
        assert_eq!(count(&specs.vae), 83_653_863);
        std::fs::remove_dir_all(d).unwrap();
    }
}
