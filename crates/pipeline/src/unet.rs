//! The denoising UNet (`UNet2DConditionModel`), built from `unet/config.json`.
//!
//! The timestep layers are candle's (`stable_diffusion::embeddings`), resnets, convolutions,
//! norms and GEGLU come from [`crate::layers`] (fused CPU kernels); attention and the blocks are
//! assembled here rather than with candle's `UNet2DConditionModel`, because that model computes
//! something else than diffusers for common configs: its GEGLU feed-forward uses
//! tanh-approximated GELU (up to 3/255 off on the reference images, where diffusers uses the
//! exact erf GELU), and its down/up resnets always use 32 GroupNorm groups whatever
//! `norm_num_groups` says. Assembling the blocks also lets per-block `layers_per_block` /
//! `cross_attention_dim` lists and independent up block types run as diffusers runs them.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::attention::{Scores, attention};
use crate::conditioning::{Conditioning, TextTime};
use crate::config::{UNetBlock, UNetConfig};
use crate::conv::{Conv2d, conv2d};
use crate::layers::{
    Geglu, GroupNorm, Linear, ResnetBlock, ResnetConfig, geglu, group_norm, linear, linear_no_bias,
};
use crate::profile;

/// GEGLU feed-forward with exact GELU, as diffusers' `FeedForward(activation_fn="geglu")`.
struct FeedForward {
    proj_in: Geglu,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: geglu(dim, inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&self.proj_in.forward(xs)?)
    }
}

/// diffusers' multi-head `Attention` (no biases on q/k/v), self-attention without `context`.
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    scores: Scores,
}

impl CrossAttention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        scores: Scores,
    ) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
            scores,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention(&q, &k, &v, self.heads, self.scale, false, self.scores)?;
        self.to_out.forward(&out)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, feed-forward, pre-norm.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        scores: Scores,
    ) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, dim, heads, scores)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, context_dim, heads, scores)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` on continuous inputs.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    /// A block's `attentions.0`, `attentions.1`, ... (`count` of them when the block has
    /// cross-attention, else none).
    fn stack(
        vb: &VarBuilder,
        count: usize,
        cross_attn: bool,
        channels: usize,
        level: &UNetBlock,
        c: &UNetConfig,
    ) -> Result<Vec<Self>> {
        if !cross_attn {
            return Ok(Vec::new());
        }
        (0..count)
            .map(|j| Self::new(vb.pp(format!("attentions.{j}")), channels, level, c))
            .collect()
    }

    fn new(vb: VarBuilder, channels: usize, level: &UNetBlock, c: &UNetConfig) -> Result<Self> {
        let norm = group_norm(c.norm_num_groups, channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(linear(channels, channels, vb.pp("proj_in"))?),
                Projection::Linear(linear(channels, channels, vb.pp("proj_out"))?),
            )
        } else {
            let cfg = Conv2dConfig::default();
            (
                Projection::Conv(conv2d(channels, channels, 1, cfg, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(channels, channels, 1, cfg, vb.pp("proj_out"))?),
            )
        };
        let scores = if c.upcast_attention {
            Scores::F32
        } else {
            Scores::Operands
        };
        let blocks = (0..level.transformer_layers)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    channels,
                    level.heads,
                    level.cross_attention_dim,
                    scores,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?.contiguous()?)?,
            Projection::Linear(linear) => to_image(&linear.forward(&tokens)?)?,
        };
        out + xs
    }
}

fn resnet(
    vb: VarBuilder,
    in_ch: usize,
    out_ch: usize,
    temb: usize,
    c: &UNetConfig,
    scale: f64,
) -> Result<ResnetBlock> {
    let cfg = ResnetConfig {
        out_channels: out_ch,
        temb_channels: Some(temb),
        groups: c.norm_num_groups,
        eps: c.norm_eps,
        output_scale_factor: scale,
    };
    ResnetBlock::new(vb, in_ch, &cfg)
}

struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            // diffusers pads (0, 1, 0, 1) when downsample_padding is 0.
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }

    fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsample {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                return Err(candle_core::Error::Msg(
                    "UNet skip connections exhausted".into(),
                ));
            };
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsample {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// `down_blocks.{i}`: resnets (and attentions), then a downsampler on all but the last level.
fn down_blocks(vb: &VarBuilder, temb: usize, c: &UNetConfig) -> Result<Vec<DownBlock>> {
    let n = c.blocks.len();
    let mut out_ch = c.blocks[0].out_channels;
    let mut down = Vec::with_capacity(n);
    for (i, level) in c.blocks.iter().enumerate() {
        let in_ch = out_ch;
        out_ch = level.out_channels;
        let vb = vb.pp(format!("down_blocks.{i}"));
        let resnets = (0..level.layers)
            .map(|j| {
                let res_in = if j == 0 { in_ch } else { out_ch };
                resnet(vb.pp(format!("resnets.{j}")), res_in, out_ch, temb, c, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions =
            SpatialTransformer::stack(&vb, level.layers, level.down_cross_attn, out_ch, level, c)?;
        let downsample = (i + 1 < n)
            .then(|| Downsample::new(vb.pp("downsamplers.0"), out_ch, c.downsample_padding))
            .transpose()?;
        down.push(DownBlock {
            resnets,
            attentions,
            downsample,
        });
    }
    Ok(down)
}

/// `mid_block`: resnet, attention, resnet at the last level's width.
fn mid_block(
    vb: &VarBuilder,
    temb: usize,
    c: &UNetConfig,
) -> Result<([ResnetBlock; 2], SpatialTransformer)> {
    let mid = c.mid_block();
    let ch = mid.out_channels;
    let scale = c.mid_block_scale_factor;
    let resnets = [
        resnet(vb.pp("resnets.0"), ch, ch, temb, c, scale)?,
        resnet(vb.pp("resnets.1"), ch, ch, temb, c, scale)?,
    ];
    let attention = SpatialTransformer::new(vb.pp("attentions.0"), ch, mid, c)?;
    Ok((resnets, attention))
}

/// `up_blocks.{i}`, mirroring the down blocks: one more resnet per level, each taking a skip
/// connection, then an upsampler on all but the last.
fn up_blocks(vb: &VarBuilder, temb: usize, c: &UNetConfig) -> Result<Vec<UpBlock>> {
    let n = c.blocks.len();
    let mut out_ch = c.mid_block().out_channels;
    let mut up = Vec::with_capacity(n);
    for i in 0..n {
        let level = &c.blocks[n - 1 - i];
        let prev_ch = out_ch;
        out_ch = level.out_channels;
        let skip_in_ch = c.blocks[(n - 1 - i).saturating_sub(1)].out_channels;
        let vb = vb.pp(format!("up_blocks.{i}"));
        let layers = level.layers + 1;
        let resnets = (0..layers)
            .map(|j| {
                let res_skip = if j == layers - 1 { skip_in_ch } else { out_ch };
                let res_in = if j == 0 { prev_ch } else { out_ch };
                resnet(
                    vb.pp(format!("resnets.{j}")),
                    res_in + res_skip,
                    out_ch,
                    temb,
                    c,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions =
            SpatialTransformer::stack(&vb, layers, level.up_cross_attn, out_ch, level, c)?;
        let upsample = (i + 1 < n)
            .then(|| Upsample::new(vb.pp("upsamplers.0"), out_ch))
            .transpose()?;
        up.push(UpBlock {
            resnets,
            attentions,
            upsample,
        });
    }
    Ok(up)
}

/// SDXL's added conditioning: time-id sinusoids after the pooled text embedding, through an
/// MLP, added to the time embedding (diffusers' `add_time_proj` and `add_embedding`).
struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

impl TextTimeEmbedding {
    /// `(rows, temb)` for `text_embeds (rows, P)` and `time_ids (rows, n)` (F32).
    fn forward(&self, text_time: &TextTime, dtype: DType) -> Result<Tensor> {
        let rows = text_time.time_ids.dim(0)?;
        let sinusoids = self
            .time_proj
            .forward(&text_time.time_ids.flatten_all()?)?
            .reshape((rows, ()))?;
        let text = text_time.text_embeds.to_dtype(DType::F32)?;
        let added = Tensor::cat(&[&text, &sinusoids], 1)?.to_dtype(dtype)?;
        self.embedding.forward(&added)
    }
}

pub struct UNet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    pub fn new(vb: VarBuilder, c: &UNetConfig) -> Result<Self> {
        let ch0 = c.blocks[0].out_channels;
        let temb = ch0 * 4;
        let conv = |cin, cout, kernel: usize, name| {
            let cfg = Conv2dConfig {
                padding: kernel / 2,
                ..Default::default()
            };
            conv2d(cin, cout, kernel, cfg, vb.pp(name))
        };
        // In the order of the weights, so that a mismatch names the first tensor that differs.
        let conv_in = conv(c.in_channels, ch0, c.conv_in_kernel, "conv_in")?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch0, temb)?;
        let text_time = c
            .text_time
            .map(|t| {
                Ok::<_, candle_core::Error>(TextTimeEmbedding {
                    time_proj: Timesteps::new(t.time_embed_dim, c.flip_sin_to_cos, c.freq_shift),
                    embedding: TimestepEmbedding::new(vb.pp("add_embedding"), t.input_dim, temb)?,
                })
            })
            .transpose()?;
        let down = down_blocks(&vb, temb, c)?;
        let (mid_resnets, mid_attention) = mid_block(&vb.pp("mid_block"), temb, c)?;
        Ok(Self {
            conv_in,
            time_proj: Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift),
            time_embedding,
            text_time,
            down,
            mid_resnets,
            mid_attention,
            up: up_blocks(&vb, temb, c)?,
            conv_norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch0, c.out_channels, c.conv_out_kernel, "conv_out")?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// `latents` `(B, C, h, w)`, one timestep for the whole batch, one conditioning row per
    /// latent.
    ///
    /// On the CPU the batch items run in parallel, one per thread: at these sizes candle's
    /// per-op threading (split matmuls, worker wake-ups) costs more than it gains, while whole
    /// independent forwards keep every core busy. They start a thread's worth at a time, so
    /// that at most that many items' activations are alive at once, whatever the batch (the
    /// memory budget's estimate counts on it).
    pub fn forward(&self, latents: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        let b = latents.dim(0)?;
        let threads = rayon::current_num_threads();
        if !latents.device().is_cpu() || b < 2 || threads < 2 {
            return self.forward_batch(latents, timestep, cond);
        }
        let mut outputs = Vec::with_capacity(b);
        for first in (0..b).step_by(threads) {
            let items = (first..b.min(first + threads))
                .into_par_iter()
                .map(|i| {
                    self.forward_batch(&latents.narrow(0, i, 1)?, timestep, &cond.narrow(i, 1)?)
                })
                .collect::<Result<Vec<_>>>()?;
            outputs.extend(items);
        }
        Tensor::cat(&outputs, 0)
    }

    fn forward_batch(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        let dtype = latents.dtype();
        let cond = cond.to_dtype(dtype)?;
        let context = &cond.context;
        let xs = if self.config.center_input_sample {
            ((latents * 2.0)? - 1.0)?
        } else {
            latents.clone()
        };

        let device = latents.device();
        let temb = profile::stage(
            device,
            || "unet.time".into(),
            || self.time_embedding(b, timestep, dtype, &cond),
        )?;

        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for (i, block) in self.down.iter().enumerate() {
            xs = profile::stage(
                device,
                || format!("unet.down.{i}"),
                || block.forward(&xs, &temb, context, &mut skips),
            )?;
        }

        xs = profile::stage(
            device,
            || "unet.mid".into(),
            || {
                let xs = self.mid_resnets[0].forward(&xs, Some(&temb))?;
                let xs = self.mid_attention.forward(&xs, context)?;
                self.mid_resnets[1].forward(&xs, Some(&temb))
            },
        )?;

        // Sizes that do not halve evenly need the skip's size on the way up.
        let factor = 1usize << (self.up.len() - 1).min(usize::BITS as usize - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        for (i, block) in self.up.iter().enumerate() {
            let upsample_size = if forward_upsample_size && block.upsample.is_some() {
                let skip = skips
                    .len()
                    .checked_sub(block.resnets.len() + 1)
                    .and_then(|i| skips.get(i));
                skip.map(|s| s.dims4())
                    .transpose()?
                    .map(|(_, _, sh, sw)| (sh, sw))
            } else {
                None
            };
            xs = profile::stage(
                device,
                || format!("unet.up.{i}"),
                || block.forward(&xs, &temb, context, &mut skips, upsample_size),
            )?;
        }

        profile::stage(
            device,
            || "unet.out".into(),
            || {
                self.conv_out
                    .forward(&self.conv_norm_out.forward_silu(&xs)?)
            },
        )
    }

    /// The time embedding, with SDXL's text-time embedding added where the UNet has one.
    fn time_embedding(
        &self,
        b: usize,
        timestep: f64,
        dtype: DType,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        // The sinusoidal embedding is computed in F32, then cast, as diffusers does.
        let t = Tensor::full(timestep as f32, b, cond.context.device())?;
        let temb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&temb)?;
        match (&self.text_time, &cond.text_time) {
            (Some(embedding), Some(text_time)) => temb + embedding.forward(text_time, dtype)?,
            (None, None) => Ok(temb),
            (Some(_), None) => {
                candle_core::bail!("this UNet needs SDXL's text embeds and time ids")
            }
            (None, Some(_)) => candle_core::bail!("this UNet takes no text embeds or time ids"),
        }
    }
}
