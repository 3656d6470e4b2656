//! Stage 1 of a generation: prompts → [`Conditioning`]. Each distinct prompt is tokenized
//! (padded to the tokenizer's length) and encoded once, in one batched forward; the rows are
//! laid out as the denoising loop batches the UNet: with classifier-free guidance, every
//! image's negative prompt first, then every image's prompt.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use sdserve_generation::{GenerateError, ImageSpec};

use crate::conditioning::Conditioning;
use crate::denoise::Guidance;
use crate::error::internal;
use crate::text_encoder::TextEncoder;
use crate::tokenizer::ClipTokenizer;

pub struct PromptEncoder {
    pub(crate) tokenizer: ClipTokenizer,
    pub(crate) text_encoder: TextEncoder,
    /// The UNet's dtype: the encoder runs in F32 everywhere, its output is cast to this.
    pub(crate) dtype: DType,
}

impl PromptEncoder {
    /// The conditioning of `images`' UNet rows.
    pub fn conditioning(
        &self,
        images: &[ImageSpec],
        guidance: Guidance,
    ) -> Result<Conditioning, GenerateError> {
        let mut prompts: Vec<&str> = Vec::with_capacity(2 * images.len());
        if guidance.enabled() {
            prompts.extend(images.iter().map(|i| i.negative_prompt.as_str()));
        }
        prompts.extend(images.iter().map(|i| i.prompt.as_str()));
        Ok(Conditioning::new(self.encode(&prompts)?))
    }

    /// `(prompts.len(), S, D)` hidden states in the UNet dtype, each distinct prompt encoded
    /// once.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor, GenerateError> {
        let mut unique: Vec<&str> = Vec::new();
        let mut row: HashMap<&str, u32> = HashMap::new();
        let rows: Vec<u32> = prompts
            .iter()
            .map(|p| {
                *row.entry(p).or_insert_with(|| {
                    unique.push(p);
                    (unique.len() - 1) as u32
                })
            })
            .collect();
        let ids = self.token_ids(&unique)?;
        let stage = "text encoder";
        let device = self.text_encoder.device();
        let ids = Tensor::from_vec(ids, (unique.len(), self.tokenizer.max_length()), device)
            .map_err(internal(stage))?;
        let encoded = self.text_encoder.forward(&ids).map_err(internal(stage))?;
        let rows = Tensor::new(rows.as_slice(), device).map_err(internal(stage))?;
        encoded
            .index_select(&rows, 0)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(internal(stage))
    }

    /// Every prompt's padded token ids, one after the other.
    fn token_ids(&self, prompts: &[&str]) -> Result<Vec<u32>, GenerateError> {
        let max_len = self.tokenizer.max_length();
        let mut ids = Vec::with_capacity(prompts.len() * max_len);
        for p in prompts {
            let tokens = self.tokenizer.encode_padded(p);
            if tokens.len() != max_len {
                return Err(GenerateError::Internal {
                    stage: "tokenizer".into(),
                    message: format!("{} tokens for a {max_len}-token context", tokens.len()),
                });
            }
            ids.extend(tokens);
        }
        Ok(ids)
    }
}
