//! The VAE decoder: candle's `AutoEncoderKL` built from `vae/config.json`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

use crate::config::VaeConfig;

pub struct Vae {
    model: AutoEncoderKL,
    config: VaeConfig,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let candle_config = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, candle_config)?;
        Ok(Self {
            model,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Denoised latents `(B, C, h, w)` (still multiplied by `scaling_factor`) to images in about
    /// `[-1, 1]`.
    ///
    /// Images are decoded one at a time: candle 0.11.1's single-head VAE attention reads batch
    /// items after the first with a wrong stride (its matmul mis-handles the size-1 head axis), so
    /// a batched decode corrupts every image but the first. One at a time also bounds peak memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.config.scaling_factor)?;
        let images = (0..scaled.dim(0)?)
            .map(|i| self.model.decode(&scaled.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }
}
