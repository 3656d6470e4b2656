//! The VAE (`AutoencoderKL`): its decoder here, its encoder in [`encoder`], built from
//! `vae/config.json` with the same tensor names as diffusers. Assembled here rather than with
//! candle's `AutoEncoderKL` so that its convolutions and group norms run the fused CPU kernels
//! of [`crate::layers`].

mod encoder;

pub use encoder::LatentDistribution;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::attention::{Scores, attention};
use crate::config::VaeConfig;
use crate::conv::{Conv2d, conv2d};
use crate::device::CudaTuning;
use crate::layers::{GroupNorm, Linear, ResnetBlock, ResnetConfig, group_norm, linear};

/// diffusers' `Encoder` and `Decoder` resnets and norms use eps 1e-6 whatever the config says.
const EPS: f64 = 1e-6;

/// The VAE's resnets: no time embedding, unit output scale.
fn resnet_config(out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        out_channels,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
    }
}

/// The single-head self-attention of the mid block (diffusers' `Attention` with
/// `residual_connection=True`, group norm, no rescale).
struct AttentionBlock {
    group_norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    proj: Linear,
    scale: f64,
}

/// A `(C, C)` projection; some checkpoints store it as a `(C, C, 1, 1)` convolution.
fn projection(channels: usize, vb: VarBuilder) -> Result<Linear> {
    if vb.get((channels, channels), "weight").is_ok() {
        return linear(channels, channels, vb);
    }
    let weight = vb
        .get((channels, channels, 1, 1), "weight")?
        .reshape((channels, channels))?;
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let (q, k, v, out) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, EPS, vb.pp("group_norm"))?,
            query: projection(channels, vb.pp(q))?,
            key: projection(channels, vb.pp(k))?,
            value: projection(channels, vb.pp(v))?,
            proj: projection(channels, vb.pp(out))?,
            scale: (channels as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // One head: the batch is the attention batch.
        let q = self.query.forward(&tokens)?;
        let k = self.key.forward(&tokens)?;
        let v = self.value.forward(&tokens)?;
        let attended = attention(&q, &k, &v, 1, self.scale, false, Scores::Operands)?;
        let out = self.proj.forward(&attended)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + xs
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(xs),
        }
    }
}

pub struct Vae {
    encoder: Option<encoder::Encoder>,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: AttentionBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: VaeConfig,
    /// The weights' dtype, which decoding runs in.
    dtype: DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let latent = config.latent_channels;
        let top = *channels.last().unwrap_or(&latent);
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let resnet_cfg = |out_channels| resnet_config(out_channels, groups);
        // Folders made for decoding only may lack the encoder: such a model takes no images.
        let encoder = vb
            .contains_tensor("encoder.conv_in.weight")
            .then(|| encoder::Encoder::new(vb.clone(), config))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| {
                conv2d(
                    latent,
                    latent,
                    1,
                    Default::default(),
                    vb.pp("post_quant_conv"),
                )
            })
            .transpose()?;

        let vb = vb.pp("decoder");
        let conv_in = conv2d(latent, top, 3, conv3, vb.pp("conv_in"))?;
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(mid.pp("resnets.0"), top, &resnet_cfg(top))?,
            ResnetBlock::new(mid.pp("resnets.1"), top, &resnet_cfg(top))?,
        ];
        let mid_attention = AttentionBlock::new(mid.pp("attentions.0"), top, groups)?;

        let mut up = Vec::with_capacity(channels.len());
        let mut in_ch = top;
        for (i, &out_ch) in channels.iter().rev().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let res_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::new(vb.pp(format!("resnets.{j}")), res_in, &resnet_cfg(out_ch))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = (i + 1 < channels.len())
                .then(|| conv2d(out_ch, out_ch, 3, conv3, vb.pp("upsamplers.0.conv")))
                .transpose()?;
            up.push(UpBlock { resnets, upsample });
            in_ch = out_ch;
        }
        let bottom = channels.first().copied().unwrap_or(top);
        Ok(Self {
            encoder,
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: group_norm(groups, bottom, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(bottom, config.out_channels, 3, conv3, vb.pp("conv_out"))?,
            config: config.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the folder has the encoder, which image inputs need.
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The latent distribution of images `(B, 3, H, W)` in `[-1, 1]`, one image at a time
    /// (which bounds peak memory).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let Some(encoder) = &self.encoder else {
            return Err(candle_core::Error::Msg(
                "this VAE has no encoder weights".into(),
            ));
        };
        let moments = (0..images.dim(0)?)
            .map(|i| encoder.moments(&images.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        LatentDistribution::from_moments(&Tensor::cat(&moments, 0)?)
    }

    /// Denoised latents `(B, C, h, w)` (still multiplied by `scaling_factor`) to images in about
    /// `[-1, 1]`: on a GPU the whole batch at once (`batched_vae`), elsewhere one image at a
    /// time, which bounds peak memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.config.scaling_factor)?;
        if CudaTuning::on(scaled.device()).batched_vae {
            return self.decode_batch(&scaled);
        }
        // Image by image: the CPU kernels are parallel within one image, and the activations
        // of the largest layers are held for one image only.
        let images = (0..scaled.dim(0)?)
            .map(|i| self.decode_batch(&scaled.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }

    fn decode_batch(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let xs = self.mid_resnets[0].forward(&self.conv_in.forward(&xs)?, None)?;
        let xs = self.mid_attention.forward(&xs)?;
        let mut xs = self.mid_resnets[1].forward(&xs, None)?;
        for block in &self.up {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
