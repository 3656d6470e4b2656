//! What the UNet is conditioned on besides the timestep, one row per UNet batch item: the
//! prompt stage produces it, the denoising loop hands it to every UNet pass.
//!
//! SD 1.x / 2.x condition on the text encoder's hidden states only; SDXL adds the pooled text
//! embedding and the size/crop time ids here, so the stages around it do not change.

use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The cross-attention context, `(rows, S, D)`.
    pub context: Tensor,
}

impl Conditioning {
    pub fn new(context: Tensor) -> Self {
        Self { context }
    }

    /// UNet batch items this conditions.
    pub fn rows(&self) -> Result<usize> {
        self.context.dim(0)
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            context: self.context.narrow(0, start, len)?,
        })
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
        })
    }
}
