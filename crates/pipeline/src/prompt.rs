//! Stage 1 of a generation: prompts → [`Conditioning`]. Each distinct prompt is tokenized
//! (padded to the tokenizer's length) and encoded once per text encoder, in one batched
//! forward; the rows are laid out as the denoising loop batches the UNet: with
//! classifier-free guidance, every image's negative prompt first, then every image's prompt.
//!
//! SD 1.x / 2.x condition on their one encoder's final hidden state. SDXL, as diffusers'
//! `StableDiffusionXLPipeline.encode_prompt`: each encoder's penultimate hidden state, the
//! two concatenated along the features; the second encoder's pooled projection; the second
//! encoder reads `prompt_2` (an absent or empty one is the prompt) and `negative_prompt_2`
//! (likewise the negative prompt); with `force_zeros_for_empty_prompt`, an image whose request
//! gave no negative prompt has zeros for its negative rows.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use sdserve_generation::{GenerateError, ImageSpec, TimeIds};

use crate::conditioning::{Conditioning, TextTime};
use crate::config::PipelineKind;
use crate::denoise::Guidance;
use crate::error::internal;
use crate::text_encoder::{Encoded, HiddenState, TextEncoder};
use crate::tokenizer::ClipTokenizer;

/// One text encoder with its tokenizer.
pub struct TextTower {
    /// Shared with the towers of adapter variants.
    pub tokenizer: Arc<ClipTokenizer>,
    pub encoder: TextEncoder,
}

pub struct PromptEncoder {
    /// One tower for SD 1.x / 2.x, two for SDXL.
    pub(crate) towers: Vec<TextTower>,
    pub(crate) kind: PipelineKind,
    /// The UNet's dtype: the encoders run in F32 everywhere, their output is cast to this.
    pub(crate) dtype: DType,
}

/// The texts of one UNet row, per tower; `None`: the row conditions on zeros.
struct RowTexts<'a> {
    first: Option<&'a str>,
    second: Option<&'a str>,
}

const STAGE: &str = "text encoder";

impl PromptEncoder {
    /// The conditioning of `images`' UNet rows; `time_ids` for SDXL models.
    pub fn conditioning(
        &self,
        images: &[ImageSpec],
        guidance: Guidance,
        time_ids: Option<TimeIds>,
    ) -> Result<Conditioning, GenerateError> {
        let mut rows: Vec<RowTexts> = Vec::with_capacity(2 * images.len());
        if guidance.enabled() {
            rows.extend(images.iter().map(|i| self.negative_texts(i)));
        }
        rows.extend(images.iter().map(|i| RowTexts {
            first: Some(&i.prompt),
            second: Some(or_first(&i.prompt_2, &i.prompt)),
        }));
        match self.kind {
            PipelineKind::StableDiffusion => {
                let texts: Vec<&str> = rows.iter().map(|r| r.first.unwrap_or("")).collect();
                Ok(Conditioning::new(self.encode(&texts)?))
            }
            PipelineKind::StableDiffusionXl { .. } => {
                let ids = time_ids.ok_or_else(|| GenerateError::Internal {
                    stage: STAGE.into(),
                    message: "an SDXL job without time ids".into(),
                })?;
                let negatives = if guidance.enabled() { images.len() } else { 0 };
                self.sdxl_conditioning(&rows, negatives, ids)
            }
        }
    }

    /// An image's negative texts; both `None` for zeros.
    fn negative_texts<'a>(&self, image: &'a ImageSpec) -> RowTexts<'a> {
        let zeros = matches!(
            self.kind,
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt: true,
                ..
            }
        ) && image.negative_prompt.is_none();
        if zeros {
            return RowTexts {
                first: None,
                second: None,
            };
        }
        let negative = image.negative_prompt.as_deref().unwrap_or("");
        RowTexts {
            first: Some(negative),
            second: Some(or_first(&image.negative_prompt_2, negative)),
        }
    }

    /// `(prompts.len(), S, D)` hidden states of the first encoder in the UNet dtype (final for
    /// SD 1.x / 2.x, penultimate for SDXL), each distinct prompt encoded once.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor, GenerateError> {
        let rows: Vec<Option<&str>> = prompts.iter().map(|p| Some(*p)).collect();
        let tower = &self.towers[0];
        let (hidden, _) = self.encode_rows(tower, &rows, self.hidden_state())?;
        hidden.to_dtype(self.dtype).map_err(internal(STAGE))
    }

    fn hidden_state(&self) -> HiddenState {
        match self.kind {
            PipelineKind::StableDiffusion => HiddenState::Final,
            PipelineKind::StableDiffusionXl { .. } => HiddenState::Penultimate,
        }
    }

    /// SDXL: both towers' penultimate states side by side, the second's pooled projection,
    /// and the time ids (negative rows first). A refiner has the second tower alone, which
    /// reads the prompt and the negative prompt (diffusers pairs prompts with the encoders
    /// present, so `prompt_2` goes unread).
    fn sdxl_conditioning(
        &self,
        rows: &[RowTexts],
        negatives: usize,
        ids: TimeIds,
    ) -> Result<Conditioning, GenerateError> {
        let firsts: Vec<Option<&str>> = rows.iter().map(|r| r.first).collect();
        let seconds: Vec<Option<&str>> = rows.iter().map(|r| r.second).collect();
        let (hidden, pooled, second) = match self.towers.as_slice() {
            [first, second] => {
                let (h1, _) = self.encode_rows(first, &firsts, HiddenState::Penultimate)?;
                let (h2, pooled) = self.encode_rows(second, &seconds, HiddenState::Penultimate)?;
                (vec![h1, h2], pooled, second)
            }
            [only] => {
                let (h, pooled) = self.encode_rows(only, &firsts, HiddenState::Penultimate)?;
                (vec![h], pooled, only)
            }
            towers => {
                return Err(GenerateError::Internal {
                    stage: STAGE.into(),
                    message: format!(
                        "SDXL needs one or two text encoders, the model has {}",
                        towers.len()
                    ),
                });
            }
        };
        let pooled = pooled.ok_or_else(|| GenerateError::Internal {
            stage: STAGE.into(),
            message: "text_encoder_2 has no projection".into(),
        })?;
        let device = second.encoder.device();
        let per_row = ids.row(false).len();
        let time_ids: Vec<f32> = (0..rows.len())
            .flat_map(|r| ids.row(r < negatives))
            .collect();
        let build = || -> candle_core::Result<Conditioning> {
            let context = Tensor::cat(&hidden, 2)?.to_dtype(self.dtype)?;
            let time_ids = Tensor::from_vec(time_ids, (rows.len(), per_row), device)?;
            Ok(Conditioning {
                context,
                text_time: Some(TextTime {
                    text_embeds: pooled.to_dtype(self.dtype)?,
                    time_ids,
                }),
            })
        };
        build().map_err(internal(STAGE))
    }

    /// One tower's `which` state `(rows, S, D)` and pooled output `(rows, P)` in F32, each
    /// distinct text encoded once; rows without text are zeros.
    fn encode_rows(
        &self,
        tower: &TextTower,
        rows: &[Option<&str>],
        which: HiddenState,
    ) -> Result<(Tensor, Option<Tensor>), GenerateError> {
        let mut unique: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::new();
        let at: Vec<Option<u32>> = rows
            .iter()
            .map(|text| {
                text.map(|t| {
                    *index.entry(t).or_insert_with(|| {
                        unique.push(t);
                        (unique.len() - 1) as u32
                    })
                })
            })
            .collect();
        if unique.is_empty() {
            // Every row is zeros: encode the empty prompt once for the shapes.
            unique.push("");
        }
        let ids = token_ids(&tower.tokenizer, &unique)?;
        let device = tower.encoder.device();
        let gather = || -> candle_core::Result<(Tensor, Option<Tensor>)> {
            let ids = Tensor::from_vec(ids, (unique.len(), tower.tokenizer.max_length()), device)?;
            let Encoded { hidden, pooled } = tower.encoder.encode(&ids, which)?;
            let picks: Vec<u32> = at.iter().map(|a| a.unwrap_or(0)).collect();
            let picks = Tensor::new(picks.as_slice(), device)?;
            let keep: Vec<f32> = at.iter().map(|a| f32::from(a.is_some() as u8)).collect();
            let keep = Tensor::new(keep.as_slice(), device)?;
            let hidden = hidden
                .index_select(&picks, 0)?
                .broadcast_mul(&keep.reshape((rows.len(), 1, 1))?)?;
            let pooled = pooled
                .map(|p| {
                    p.index_select(&picks, 0)?
                        .broadcast_mul(&keep.reshape((rows.len(), 1))?)
                })
                .transpose()?;
            Ok((hidden, pooled))
        };
        gather().map_err(internal(STAGE))
    }
}

/// `own` unless it is absent or empty (diffusers' `prompt_2 or prompt`), else `first`.
fn or_first<'a>(own: &'a Option<String>, first: &'a str) -> &'a str {
    match own.as_deref() {
        Some(s) if !s.is_empty() => s,
        _ => first,
    }
}

/// Every prompt's padded token ids, one after the other.
fn token_ids(tokenizer: &ClipTokenizer, prompts: &[&str]) -> Result<Vec<u32>, GenerateError> {
    let max_len = tokenizer.max_length();
    let mut ids = Vec::with_capacity(prompts.len() * max_len);
    for p in prompts {
        let tokens = tokenizer.encode_padded(p);
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
