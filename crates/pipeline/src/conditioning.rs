//! What the UNet is conditioned on besides the timestep, one row per UNet batch item: the
//! prompt stage produces it, the denoising loop hands it to every UNet pass.
//!
//! SD 1.x / 2.x condition on the text encoder's hidden states only; SDXL adds the pooled text
//! embedding and the size/crop time ids ([`TextTime`]), so the stages around it do not change.

use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The cross-attention context, `(rows, S, D)`.
    pub context: Tensor,
    /// SDXL's added conditioning; `None` for SD 1.x / 2.x.
    pub text_time: Option<TextTime>,
}

/// SDXL's `added_cond_kwargs`, one row per UNet batch item.
#[derive(Debug, Clone)]
pub struct TextTime {
    /// `(rows, projection_dim)`: the second text encoder's pooled projection.
    pub text_embeds: Tensor,
    /// `(rows, 6)` F32: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

impl Conditioning {
    pub fn new(context: Tensor) -> Self {
        Self {
            context,
            text_time: None,
        }
    }

    /// UNet batch items this conditions.
    pub fn rows(&self) -> Result<usize> {
        self.context.dim(0)
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            context: self.context.narrow(0, start, len)?,
            text_time: self
                .text_time
                .as_ref()
                .map(|t| {
                    Ok::<_, candle_core::Error>(TextTime {
                        text_embeds: t.text_embeds.narrow(0, start, len)?,
                        time_ids: t.time_ids.narrow(0, start, len)?,
                    })
                })
                .transpose()?,
        })
    }

    /// The context and pooled embedding in `dtype`; the time ids stay F32 (the UNet embeds
    /// them in F32, as diffusers does).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
            text_time: self
                .text_time
                .as_ref()
                .map(|t| {
                    Ok::<_, candle_core::Error>(TextTime {
                        text_embeds: t.text_embeds.to_dtype(dtype)?,
                        time_ids: t.time_ids.clone(),
                    })
                })
                .transpose()?,
        })
    }
}
