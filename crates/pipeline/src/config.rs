//! The JSON configs of a diffusers Stable Diffusion folder.
//!
//! Every dimension comes from the files. A key whose value changes the computation in a way the
//! candle models cannot reproduce is refused with an error naming the file and the key, so a
//! folder is either run as diffusers runs it or not at all.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::PipelineError;

mod model_index;

pub use model_index::{ModelIndex, PipelineKind};

type Result<T> = std::result::Result<T, PipelineError>;

/// Largest config file read; real ones are a few KiB.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
/// Largest integer any component config may hold: far above every real value (CLIP's vocabulary
/// is 49408 tokens, SD's widest block 1280 channels), far below sizes that could exhaust memory
/// or overflow shape arithmetic.
const MAX_CONFIG_INT: u64 = 1 << 20;
/// Most resolution levels of a UNet, and of a VAE (whose scale factor is 2^(levels - 1)).
const MAX_UNET_BLOCKS: usize = 16;
const MAX_VAE_BLOCKS: usize = 8;
/// Most layers in one block, and in the text encoder.
const MAX_BLOCK_LAYERS: usize = 64;
const MAX_TEXT_LAYERS: usize = 256;
/// Largest latent height or width a UNet may declare as its training size.
const MAX_SAMPLE_SIZE: usize = 1024;

/// One parsed JSON object plus the path it came from, for key-naming errors.
pub(crate) struct JsonFile {
    pub path: PathBuf,
    pub map: Map<String, Value>,
}

impl JsonFile {
    pub fn read(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|e| PipelineError::io(path, e))?
            .len();
        if len > MAX_CONFIG_BYTES {
            return Err(PipelineError::config(
                path,
                format!("is {len} bytes; a config file may be at most {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| PipelineError::config(path, format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(PipelineError::config(
                path,
                "expected a JSON object at the top level",
            )),
        }
    }

    /// The value of `key`, treating an explicit `null` like an absent key.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: impl std::fmt::Display) -> PipelineError {
        PipelineError::key(&self.path, key, message)
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        let n = v
            .as_u64()
            .ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}")))?;
        if n > MAX_CONFIG_INT {
            return Err(self.err(
                key,
                format!("{n} is implausibly large (at most {MAX_CONFIG_INT})"),
            ));
        }
        usize::try_from(n).map_err(|_| self.err(key, format!("{n} does not fit this machine")))
    }

    /// `n` read from `key`, refused above `max`.
    fn at_most(&self, key: &str, n: usize, max: usize) -> Result<usize> {
        if n > max {
            return Err(self.err(key, format!("{n} is more than the {max} supported")));
        }
        Ok(n)
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key).map_or(Ok(default), |v| self.usize_of(key, v))
    }

    pub fn positive(&self, key: &str, default: usize) -> Result<usize> {
        let n = self.usize(key, default)?;
        if n == 0 {
            return Err(self.err(key, "must be greater than 0"));
        }
        Ok(n)
    }

    /// A positive integer the file must hold.
    pub fn positive_required(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(self.err(key, "missing")),
            Some(_) => self.positive(key, 0),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let list = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list, found {v}")))?;
        list.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(key, format!("expected a list of strings, found {x}")))
            })
            .collect()
    }

    fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        let list = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list, found {v}")))?;
        list.iter().map(|x| self.usize_of(key, x)).collect()
    }

    /// An int applied to every block, or a list with one int per block.
    fn per_block(&self, key: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>> {
        match self.get(key) {
            None => match default {
                Some(d) => Ok(vec![d; n]),
                None => Err(self.err(key, "missing")),
            },
            Some(Value::Array(list)) => {
                if list.len() != n {
                    return Err(self.err(
                        key,
                        format!("has {} entries but there are {n} down blocks", list.len()),
                    ));
                }
                list.iter()
                    .map(|x| {
                        if x.is_array() {
                            Err(self.err(key, "nested per-layer lists are not supported"))
                        } else {
                            self.usize_of(key, x)
                        }
                    })
                    .collect()
            }
            Some(v) => Ok(vec![self.usize_of(key, v)?; n]),
        }
    }

    /// Refuses any value other than absent/null.
    pub fn require_null(&self, key: &str, why: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(self.err(key, format!("value {v} is not supported ({why})"))),
        }
    }

    /// Refuses a present value that differs from `expected`.
    pub fn require(&self, key: &str, expected: Value, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if *v != expected && !numbers_equal(v, &expected) => Err(self.err(
                key,
                format!("value {v} is not supported, only {expected} ({why})"),
            )),
            _ => Ok(()),
        }
    }

    fn class_name(&self) -> Option<&str> {
        self.get("_class_name").and_then(Value::as_str)
    }
}

fn numbers_equal(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

/// One UNet resolution level: down block `i` and the up block that mirrors it (up block
/// `n - 1 - i`), which diffusers builds from the same per-block values reversed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetBlock {
    pub out_channels: usize,
    /// Resnets in the down block; the mirroring up block has one more.
    pub layers: usize,
    /// `CrossAttnDownBlock2D` (else `DownBlock2D`).
    pub down_cross_attn: bool,
    /// The mirroring up block is `CrossAttnUpBlock2D` (else `UpBlock2D`).
    pub up_cross_attn: bool,
    /// Transformer layers per attention of this level.
    pub transformer_layers: usize,
    /// Attention heads (diffusers' `num_attention_heads or attention_head_dim`).
    pub heads: usize,
    pub cross_attention_dim: usize,
}

/// `unet/config.json` (`UNet2DConditionModel`).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent height and width the model was trained at.
    pub sample_size: (usize, usize),
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub blocks: Vec<UNetBlock>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    /// Attention scores in F32 even when the UNet runs in F16 (SD 2.x: they overflow F16).
    pub upcast_attention: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// SDXL's added conditioning (`addition_embed_type: "text_time"`).
    pub text_time: Option<TextTimeEmbedding>,
}

/// SDXL's added conditioning: the time ids' sinusoids (`addition_time_embed_dim` each),
/// concatenated after the pooled text embedding, through a two-layer MLP added to the time
/// embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeEmbedding {
    /// `addition_time_embed_dim`: sinusoid width per time id.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled width + time ids × `time_embed_dim`.
    pub input_dim: usize,
}

impl UNetConfig {
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&JsonFile::read(path)?)
    }

    /// The mid block uses the last level's heads, depth and context size, as diffusers does.
    pub fn mid_block(&self) -> &UNetBlock {
        self.blocks.last().expect("validated non-empty")
    }

    pub(crate) fn from_json(f: &JsonFile) -> Result<Self> {
        if let Some(class) = f.class_name()
            && class != "UNet2DConditionModel"
        {
            return Err(f.err(
                "_class_name",
                format!("{class} is not a UNet2DConditionModel"),
            ));
        }
        refuse_unmodelled(f)?;
        let conv_in_kernel = odd_kernel(f, "conv_in_kernel")?;
        let conv_out_kernel = odd_kernel(f, "conv_out_kernel")?;
        let (down, up, channels) = block_lists(f)?;
        let norm_num_groups = norm_groups(f, &channels)?;
        let blocks = unet_blocks(f, &down, &up, &channels)?;
        Ok(Self {
            sample_size: sample_size(f)?,
            in_channels: f.positive("in_channels", 4)?,
            out_channels: f.positive("out_channels", 4)?,
            center_input_sample: f.bool("center_input_sample", false)?,
            flip_sin_to_cos: f.bool("flip_sin_to_cos", true)?,
            freq_shift: f.f64("freq_shift", 0.0)?,
            blocks,
            downsample_padding: f.usize("downsample_padding", 1)?,
            mid_block_scale_factor: f.f64("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: f.f64("norm_eps", 1e-5)?,
            use_linear_projection: f.bool("use_linear_projection", false)?,
            upcast_attention: f.bool("upcast_attention", false)?,
            conv_in_kernel,
            conv_out_kernel,
            text_time: text_time(f)?,
        })
    }

    /// Cross-attention context sizes the model uses (levels with attention and the mid block).
    pub fn context_dims(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks
            .iter()
            .filter(|b| b.down_cross_attn || b.up_cross_attn)
            .chain(std::iter::once(self.mid_block()))
            .map(|b| b.cross_attention_dim)
    }
}

const NOT_MODELLED: &str = "this layer is not implemented";

/// UNet keys whose values add layers or change the computation, and which must therefore be
/// absent (or null); none is used by SD 1.x / 2.x checkpoints.
const UNET_ABSENT: &[(&str, &str)] = &[
    ("class_embed_type", NOT_MODELLED),
    ("num_class_embeds", NOT_MODELLED),
    (
        "time_cond_proj_dim",
        "timestep conditioning (LCM) is not implemented",
    ),
    ("encoder_hid_dim", NOT_MODELLED),
    ("encoder_hid_dim_type", NOT_MODELLED),
    ("time_embedding_dim", NOT_MODELLED),
    ("time_embedding_act_fn", NOT_MODELLED),
    ("timestep_post_act", NOT_MODELLED),
    ("reverse_transformer_layers_per_block", NOT_MODELLED),
];

/// UNet keys that may only hold the value implemented here: `(key, value, why)`.
const UNET_FIXED: &[(&str, Fixed, &str)] = &[
    (
        "time_embedding_type",
        Fixed::Str("positional"),
        NOT_MODELLED,
    ),
    (
        "resnet_time_scale_shift",
        Fixed::Str("default"),
        NOT_MODELLED,
    ),
    (
        "mid_block_type",
        Fixed::Str("UNetMidBlock2DCrossAttn"),
        "only the cross-attention mid block is implemented",
    ),
    ("attention_type", Fixed::Str("default"), NOT_MODELLED),
    ("dual_cross_attention", Fixed::Bool(false), NOT_MODELLED),
    ("class_embeddings_concat", Fixed::Bool(false), NOT_MODELLED),
];

/// A config value written in a table.
#[derive(Debug, Clone, Copy)]
enum Fixed {
    Str(&'static str),
    Bool(bool),
}

impl From<Fixed> for Value {
    fn from(f: Fixed) -> Value {
        match f {
            Fixed::Str(s) => s.into(),
            Fixed::Bool(b) => b.into(),
        }
    }
}

/// Refuses every UNet setting this implementation does not compute as diffusers would.
fn refuse_unmodelled(f: &JsonFile) -> Result<()> {
    for (key, why) in UNET_ABSENT {
        f.require_null(key, why)?;
    }
    for (key, value, why) in UNET_FIXED {
        f.require(key, (*value).into(), why)?;
    }
    if !matches!(f.string("act_fn", "silu")?.as_str(), "silu" | "swish") {
        return Err(f.err("act_fn", "only silu is supported"));
    }
    if let Some(Value::Null) = f.map.get("mid_block_type") {
        return Err(f.err(
            "mid_block_type",
            "a UNet without a mid block is not supported",
        ));
    }
    match f.get("only_cross_attention") {
        None | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Array(list)) if list.iter().all(|v| *v == Value::Bool(false)) => Ok(()),
        Some(v) => Err(f.err(
            "only_cross_attention",
            format!("value {v} is not supported (transformer blocks always self-attend here)"),
        )),
    }
}

/// `addition_embed_type`: none, or SDXL's `text_time` with its two sizes.
fn text_time(f: &JsonFile) -> Result<Option<TextTimeEmbedding>> {
    match f.get("addition_embed_type") {
        None => Ok(None),
        Some(Value::String(kind)) if kind == "text_time" => Ok(Some(TextTimeEmbedding {
            time_embed_dim: f.positive_required("addition_time_embed_dim")?,
            input_dim: f.positive_required("projection_class_embeddings_input_dim")?,
        })),
        Some(v) => Err(f.err(
            "addition_embed_type",
            format!("{v} is not supported (only SDXL's \"text_time\")"),
        )),
    }
}

fn odd_kernel(f: &JsonFile, key: &str) -> Result<usize> {
    let k = f.usize(key, 3)?;
    if k % 2 == 0 {
        return Err(f.err(key, format!("{k} is not supported, only odd kernel sizes")));
    }
    Ok(k)
}

/// `down_block_types`, `up_block_types` and `block_out_channels`, one entry per level each.
fn block_lists(f: &JsonFile) -> Result<(Vec<String>, Vec<String>, Vec<usize>)> {
    let down = f.strings("down_block_types")?;
    let up = f.strings("up_block_types")?;
    let channels = f.usizes("block_out_channels")?;
    let n = down.len();
    if n == 0 {
        return Err(f.err("down_block_types", "is empty"));
    }
    f.at_most("down_block_types", n, MAX_UNET_BLOCKS)?;
    if up.len() != n {
        return Err(f.err(
            "up_block_types",
            format!("has {} entries, down_block_types has {n}", up.len()),
        ));
    }
    if channels.len() != n {
        return Err(f.err(
            "block_out_channels",
            format!("has {} entries, down_block_types has {n}", channels.len()),
        ));
    }
    if channels.contains(&0) {
        return Err(f.err(
            "block_out_channels",
            "channel counts must be greater than 0",
        ));
    }
    Ok((down, up, channels))
}

/// `norm_num_groups`, which must divide every level's channels.
fn norm_groups(f: &JsonFile, channels: &[usize]) -> Result<usize> {
    let groups = match f.map.get("norm_num_groups") {
        Some(Value::Null) => {
            return Err(f.err("norm_num_groups", "null (no output norm) is not supported"));
        }
        _ => f.positive("norm_num_groups", 32)?,
    };
    match channels.iter().enumerate().find(|(_, c)| *c % groups != 0) {
        Some((i, c)) => Err(f.err(
            "block_out_channels",
            format!("block {i} has {c} channels, not a multiple of norm_num_groups {groups}"),
        )),
        None => Ok(groups),
    }
}

/// The per-level lists of a UNet config, read for `n` levels.
struct PerBlock {
    heads_key: &'static str,
    heads: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_dims: Vec<usize>,
}

fn unet_blocks(
    f: &JsonFile,
    down: &[String],
    up: &[String],
    channels: &[usize],
) -> Result<Vec<UNetBlock>> {
    let n = down.len();
    let heads_key = if f.get("num_attention_heads").is_some() {
        "num_attention_heads"
    } else {
        "attention_head_dim"
    };
    let per = PerBlock {
        heads_key,
        heads: f.per_block(heads_key, n, Some(8))?,
        layers: f.per_block("layers_per_block", n, Some(2))?,
        transformer_layers: f.per_block("transformer_layers_per_block", n, Some(1))?,
        cross_dims: f.per_block("cross_attention_dim", n, Some(1280))?,
    };
    (0..n)
        .map(|i| {
            unet_block(
                f,
                i,
                &down[i],
                &up[n - 1 - i],
                channels[i],
                i == n - 1,
                &per,
            )
        })
        .collect()
}

/// Level `i`: its down block type, the type of the up block that mirrors it, its channels.
fn unet_block(
    f: &JsonFile,
    i: usize,
    down: &str,
    up: &str,
    channels: usize,
    last: bool,
    per: &PerBlock,
) -> Result<UNetBlock> {
    let down_cross_attn = match down {
        "CrossAttnDownBlock2D" => true,
        "DownBlock2D" => false,
        other => {
            return Err(f.err(
                "down_block_types",
                format!("block type {other} is not supported"),
            ));
        }
    };
    let up_cross_attn = match up {
        "CrossAttnUpBlock2D" => true,
        "UpBlock2D" => false,
        other => {
            return Err(f.err(
                "up_block_types",
                format!("block type {other} is not supported"),
            ));
        }
    };
    let (heads, layers) = (per.heads[i], per.layers[i]);
    let (transformer_layers, cross_dim) = (per.transformer_layers[i], per.cross_dims[i]);
    if layers == 0 {
        return Err(f.err("layers_per_block", "must be greater than 0"));
    }
    f.at_most("layers_per_block", layers, MAX_BLOCK_LAYERS)?;
    f.at_most(
        "transformer_layers_per_block",
        transformer_layers,
        MAX_BLOCK_LAYERS,
    )?;
    // The last level's attention settings also configure the mid block.
    if down_cross_attn || up_cross_attn || last {
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(f.err(
                per.heads_key,
                format!("{heads} heads do not divide the {channels} channels of block {i}"),
            ));
        }
        if transformer_layers == 0 {
            return Err(f.err("transformer_layers_per_block", "must be greater than 0"));
        }
        if cross_dim == 0 {
            return Err(f.err("cross_attention_dim", "must be greater than 0"));
        }
    }
    Ok(UNetBlock {
        out_channels: channels,
        layers,
        down_cross_attn,
        up_cross_attn,
        transformer_layers,
        heads,
        cross_attention_dim: cross_dim,
    })
}

/// `sample_size`: one number, or `[height, width]`.
fn sample_size(f: &JsonFile) -> Result<(usize, usize)> {
    let size = match f.get("sample_size") {
        None => return Err(f.err("sample_size", "missing")),
        Some(Value::Array(list)) if list.len() == 2 => (
            f.usize_of("sample_size", &list[0])?,
            f.usize_of("sample_size", &list[1])?,
        ),
        Some(v) => {
            let s = f.usize_of("sample_size", v)?;
            (s, s)
        }
    };
    if size.0 == 0 || size.1 == 0 {
        return Err(f.err("sample_size", "must be greater than 0"));
    }
    f.at_most("sample_size", size.0.max(size.1), MAX_SAMPLE_SIZE)?;
    Ok(size)
}

/// `vae/config.json` (`AutoencoderKL`).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    /// The VAE overflows in F16 (SDXL's does): SDXL pipelines decode in F32 when the model
    /// runs in F16. An "fp16-fix" VAE says `false`.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&JsonFile::read(path)?)
    }

    pub(crate) fn from_json(f: &JsonFile) -> Result<Self> {
        if let Some(class) = f.class_name()
            && class != "AutoencoderKL"
        {
            return Err(f.err("_class_name", format!("{class} is not an AutoencoderKL")));
        }
        let channels = f.usizes("block_out_channels")?;
        if channels.is_empty() || channels.contains(&0) {
            return Err(f.err(
                "block_out_channels",
                "must be a non-empty list of positive integers",
            ));
        }
        let n = f.at_most("block_out_channels", channels.len(), MAX_VAE_BLOCKS)?;
        for (key, expected) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types = match f.get(key) {
                None => vec![expected.to_string(); n],
                Some(_) => f.strings(key)?,
            };
            if types.len() != n {
                return Err(f.err(
                    key,
                    format!("has {} entries, block_out_channels has {n}", types.len()),
                ));
            }
            if let Some(other) = types.iter().find(|t| *t != expected) {
                return Err(f.err(
                    key,
                    format!("block type {other} is not supported (only {expected})"),
                ));
            }
        }
        if !matches!(f.string("act_fn", "silu")?.as_str(), "silu" | "swish") {
            return Err(f.err("act_fn", "only silu is supported"));
        }
        f.require_null("shift_factor", "latent shift is not modelled")?;
        f.require_null("latents_mean", "latent normalisation is not modelled")?;
        f.require_null("latents_std", "latent normalisation is not modelled")?;
        f.require(
            "mid_block_add_attention",
            true.into(),
            "candle's VAE mid block always has attention",
        )?;
        let norm_num_groups = f.positive("norm_num_groups", 32)?;
        for (i, c) in channels.iter().enumerate() {
            if c % norm_num_groups != 0 {
                return Err(f.err(
                    "block_out_channels",
                    format!("block {i} has {c} channels, not a multiple of norm_num_groups {norm_num_groups}"),
                ));
            }
        }
        let scaling_factor = f.f64("scaling_factor", 0.18215)?;
        if scaling_factor == 0.0 {
            return Err(f.err("scaling_factor", "must not be 0"));
        }
        Ok(Self {
            force_upcast: f.bool("force_upcast", true)?,
            in_channels: f.positive("in_channels", 3)?,
            out_channels: f.positive("out_channels", 3)?,
            block_out_channels: channels,
            layers_per_block: f.at_most(
                "layers_per_block",
                f.positive("layers_per_block", 1)?,
                MAX_BLOCK_LAYERS,
            )?,
            latent_channels: f.positive("latent_channels", 4)?,
            norm_num_groups,
            scaling_factor,
            use_quant_conv: f.bool("use_quant_conv", true)?,
            use_post_quant_conv: f.bool("use_post_quant_conv", true)?,
        })
    }

    /// Spatial downscale between image and latents: one factor 2 per down block but the last.
    pub fn scale_factor(&self) -> usize {
        1usize << (self.block_out_channels.len() - 1).min(usize::BITS as usize - 1)
    }
}

/// The text encoder's activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU, as PyTorch's default `gelu`.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `text_encoder/config.json` (`CLIPTextModel`), or SDXL's `text_encoder_2/config.json`
/// (`CLIPTextModelWithProjection`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `CLIPTextModelWithProjection`: the width of its pooled projection (`text_embeds`).
    pub projection_dim: Option<usize>,
    /// Where the pooled output is read: the first token with this id, or with CLIP's legacy
    /// value 2, the largest id of the row (transformers' rule, which finds the same
    /// `<|endoftext|>`).
    pub eos_token_id: usize,
}

impl TextEncoderConfig {
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&JsonFile::read(path)?)
    }

    pub(crate) fn from_json(f: &JsonFile) -> Result<Self> {
        let with_projection = match f.get("architectures") {
            Some(Value::Array(archs)) if archs.iter().any(|a| a == "CLIPTextModel") => false,
            Some(Value::Array(archs))
                if archs.iter().any(|a| a == "CLIPTextModelWithProjection") =>
            {
                true
            }
            Some(archs) => {
                return Err(f.err(
                    "architectures",
                    format!("{archs} names neither CLIPTextModel nor CLIPTextModelWithProjection"),
                ));
            }
            None => false,
        };
        f.require(
            "use_attention_mask",
            false.into(),
            "padding masks are not modelled",
        )?;
        let hidden_act = match f.string("hidden_act", "quick_gelu")?.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(f.err(
                    "hidden_act",
                    format!("activation {other:?} is not supported"),
                ));
            }
        };
        let hidden_size = f.positive("hidden_size", 512)?;
        let num_attention_heads = f.positive("num_attention_heads", 8)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!("{num_attention_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        Ok(Self {
            vocab_size: f.positive("vocab_size", 49408)?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size", 2048)?,
            num_hidden_layers: f.at_most(
                "num_hidden_layers",
                f.usize("num_hidden_layers", 12)?,
                MAX_TEXT_LAYERS,
            )?,
            num_attention_heads,
            max_position_embeddings: f.positive("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: f.f64("layer_norm_eps", 1e-5)?,
            projection_dim: with_projection
                .then(|| f.positive("projection_dim", 512))
                .transpose()?,
            eos_token_id: f.usize("eos_token_id", 2)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(v: Value) -> JsonFile {
        match v {
            Value::Object(map) => JsonFile {
                path: PathBuf::from("unet/config.json"),
                map,
            },
            _ => unreachable!(),
        }
    }

    fn sd15_unet() -> Value {
        json!({
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "sample_size": 64,
            "layers_per_block": 2,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "upcast_attention": false,
            "addition_embed_type": null
        })
    }

    #[test]
    fn full_size_sd15_unet_parses() {
        let c = UNetConfig::from_json(&file(sd15_unet())).unwrap();
        assert_eq!(c.blocks.len(), 4);
        assert_eq!(
            c.blocks[0],
            UNetBlock {
                out_channels: 320,
                layers: 2,
                down_cross_attn: true,
                up_cross_attn: true,
                transformer_layers: 1,
                heads: 8,
                cross_attention_dim: 768
            }
        );
        assert!(!c.blocks[3].down_cross_attn && !c.blocks[3].up_cross_attn);
        assert_eq!(c.context_dims().collect::<Vec<_>>(), [768, 768, 768, 768]);
        assert_eq!(c.sample_size, (64, 64));
    }

    #[test]
    fn sd21_head_lists_and_precedence() {
        let mut v = sd15_unet();
        v["attention_head_dim"] = json!([5, 10, 20, 20]);
        v["use_linear_projection"] = json!(true);
        let c = UNetConfig::from_json(&file(v.clone())).unwrap();
        assert_eq!(
            c.blocks.iter().map(|b| b.heads).collect::<Vec<_>>(),
            [5, 10, 20, 20]
        );
        v["num_attention_heads"] = json!(4);
        let c = UNetConfig::from_json(&file(v)).unwrap();
        assert!(c.blocks.iter().all(|b| b.heads == 4));
    }

    #[test]
    fn unsupported_keys_are_named() {
        for (key, value) in [
            ("addition_embed_type", json!("image")),
            ("class_embed_type", json!("timestep")),
            ("time_cond_proj_dim", json!(256)),
            ("only_cross_attention", json!(true)),
            ("resnet_time_scale_shift", json!("scale_shift")),
            ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
            ("mid_block_type", json!(null)),
            ("conv_out_kernel", json!(2)),
            ("layers_per_block", json!([1, 2, 2])),
            ("transformer_layers_per_block", json!([[1], [2], [3], [4]])),
            ("norm_num_groups", json!(null)),
            ("block_out_channels", json!([320, 640, 1280, 1000])),
            ("attention_head_dim", json!([8, 8, 8, 7])),
            (
                "down_block_types",
                json!([
                    "SimpleCrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D"
                ]),
            ),
        ] {
            let mut v = sd15_unet();
            v[key] = value.clone();
            let err = UNetConfig::from_json(&file(v)).unwrap_err().to_string();
            assert!(
                err.contains("unet/config.json") && err.contains(key),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn sdxl_text_time_needs_both_sizes() {
        let mut v = sd15_unet();
        v["addition_embed_type"] = json!("text_time");
        v["addition_time_embed_dim"] = json!(256);
        let err = UNetConfig::from_json(&file(v.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("projection_class_embeddings_input_dim"),
            "{err}"
        );
        v["projection_class_embeddings_input_dim"] = json!(2816);
        let c = UNetConfig::from_json(&file(v)).unwrap();
        assert_eq!(
            c.text_time,
            Some(TextTimeEmbedding {
                time_embed_dim: 256,
                input_dim: 2816
            })
        );
    }

    #[test]
    fn per_block_lists_and_other_kernels_are_supported() {
        let mut v = sd15_unet();
        v["layers_per_block"] = json!([1, 2, 2, 3]);
        v["cross_attention_dim"] = json!([768, 768, 768, 768]);
        v["norm_num_groups"] = json!(16);
        v["conv_in_kernel"] = json!(7);
        let c = UNetConfig::from_json(&file(v)).unwrap();
        assert_eq!(
            c.blocks.iter().map(|b| b.layers).collect::<Vec<_>>(),
            [1, 2, 2, 3]
        );
        assert_eq!((c.norm_num_groups, c.conv_in_kernel), (16, 7));
    }

    #[test]
    fn vae_scale_factor_and_defaults() {
        let f = JsonFile {
            path: PathBuf::from("vae/config.json"),
            map: json!({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2})
                .as_object()
                .unwrap()
                .clone(),
        };
        let c = VaeConfig::from_json(&f).unwrap();
        assert_eq!(c.scale_factor(), 8);
        assert_eq!(c.scaling_factor, 0.18215);
        assert_eq!(c.latent_channels, 4);
    }
}
