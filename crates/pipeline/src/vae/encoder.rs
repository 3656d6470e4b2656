//! The VAE encoder (`AutoencoderKL.encode`): images to the diagonal Gaussian over latents that
//! image-to-image starts from, with diffusers' tensor names.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::{AttentionBlock, EPS, resnet_config};
use crate::config::VaeConfig;
use crate::conv::{Conv2d, conv2d};
use crate::layers::{GroupNorm, ResnetBlock, group_norm};

/// diffusers' `DownEncoderBlock2D`: resnets, then (except in the last block) a stride-2
/// convolution after padding one zero column and row on the right and bottom.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.downsample {
            Some(conv) => conv.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(xs),
        }
    }
}

pub(super) struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: AttentionBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// `vb` is the VAE's root (the encoder's tensors are under `encoder.`, `quant_conv` beside).
    pub(super) fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let moments = 2 * config.latent_channels;
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let stride2 = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let quant_conv = config
            .use_quant_conv
            .then(|| conv2d(moments, moments, 1, Default::default(), vb.pp("quant_conv")))
            .transpose()?;
        let vb = vb.pp("encoder");
        let bottom = channels[0];
        let top = *channels.last().unwrap_or(&bottom);
        let conv_in = conv2d(config.in_channels, bottom, 3, conv3, vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(channels.len());
        let mut in_ch = bottom;
        for (i, &out_ch) in channels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let res_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::new(
                        vb.pp(format!("resnets.{j}")),
                        res_in,
                        &resnet_config(out_ch, groups),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = (i + 1 < channels.len())
                .then(|| conv2d(out_ch, out_ch, 3, stride2, vb.pp("downsamplers.0.conv")))
                .transpose()?;
            down.push(DownBlock {
                resnets,
                downsample,
            });
            in_ch = out_ch;
        }
        let mid = vb.pp("mid_block");
        Ok(Self {
            conv_in,
            down,
            mid_resnets: [
                ResnetBlock::new(mid.pp("resnets.0"), top, &resnet_config(top, groups))?,
                ResnetBlock::new(mid.pp("resnets.1"), top, &resnet_config(top, groups))?,
            ],
            mid_attention: AttentionBlock::new(mid.pp("attentions.0"), top, groups)?,
            conv_norm_out: group_norm(groups, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(top, moments, 3, conv3, vb.pp("conv_out"))?,
            quant_conv,
        })
    }

    /// The moments `(1, 2C, h, w)` of one image `(1, 3, H, W)` in `[-1, 1]`.
    pub(super) fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(image)?;
        for block in &self.down {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_resnets[0].forward(&xs, None)?;
        let xs = self.mid_attention.forward(&xs)?;
        let xs = self.mid_resnets[1].forward(&xs, None)?;
        let xs = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// The encoder's diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`),
/// `(B, C, h, w)` each, not yet multiplied by the scaling factor.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDistribution {
    /// Splits moments into mean and log-variance (clamped to `[-30, 20]` as diffusers does).
    pub(super) fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self {
            mean,
            std: (logvar * 0.5)?.exp()?,
        })
    }

    /// `mean + std · eps`: a draw with standard-normal `eps` of the same shape.
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * eps)?
    }
}
