//! CLIP text transformer (HF `CLIPTextModel` tensor names, with or without the `text_model.`
//! prefix), batched.
//!
//! Sizes, activation and LayerNorm epsilon all come from `text_encoder/config.json`, and a batch
//! of prompts runs in one forward (attention is causal: each token sees the tokens before it).
//! SD 1.x and 2.x feed the UNet the last hidden state after the final LayerNorm; SDXL feeds it
//! the penultimate layer's output without it, and takes the pooled, projected output of its
//! second encoder (`CLIPTextModelWithProjection`) as well ([`HiddenState`], [`Encoded`]).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{
    Embedding, LayerNorm, Linear, VarBuilder, embedding, layer_norm, linear, linear_no_bias,
};

use crate::attention::{Scores, attention};
use crate::config::{Activation, TextEncoderConfig};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, c: &TextEncoderConfig) -> Result<Self> {
        let h = c.hidden_size;
        let head_dim = h / c.num_attention_heads;
        Ok(Self {
            q: linear(h, h, vb.pp("q_proj"))?,
            k: linear(h, h, vb.pp("k_proj"))?,
            v: linear(h, h, vb.pp("v_proj"))?,
            out: linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let q = self.q.forward(xs)?;
        let k = self.k.forward(xs)?;
        let v = self.v.forward(xs)?;
        let out = attention(&q, &k, &v, self.heads, self.scale, true, Scores::Operands)?;
        self.out.forward(&out)
    }
}

struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(vb: VarBuilder, c: &TextEncoderConfig) -> Result<Self> {
        Ok(Self {
            ln1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp.fc2"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln1.forward(xs)?)?)?;
        let hidden = self.fc1.forward(&self.ln2.forward(&xs)?)?;
        let hidden = match self.act {
            Activation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            Activation::Gelu => hidden.gelu_erf()?,
            Activation::GeluTanh => hidden.gelu()?,
        };
        xs + self.fc2.forward(&hidden)?
    }
}

/// Which hidden state a pipeline conditions its UNet on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenState {
    /// The last layer's output after the final LayerNorm (SD 1.x / 2.x).
    Final,
    /// The input of the last layer, without the final LayerNorm: transformers'
    /// `hidden_states[-2]`, what SDXL conditions on.
    Penultimate,
}

/// One forward's outputs.
pub struct Encoded {
    /// `(B, S, hidden_size)`: the [`HiddenState`] asked for.
    pub hidden: Tensor,
    /// `(B, projection_dim)`: `text_embeds` of a `CLIPTextModelWithProjection`, the final
    /// normalised state at each row's end-of-text token, projected; `None` without projection.
    pub pooled: Option<Tensor>,
}

/// The CLIP text transformer of an SD folder.
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` of a `CLIPTextModelWithProjection`.
    projection: Option<Linear>,
    config: TextEncoderConfig,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, config: &TextEncoderConfig) -> Result<Self> {
        let root = vb.clone();
        // transformers 4.x saves `text_model.`-prefixed names, 5.x saves them bare.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(
            config.vocab_size,
            config.hidden_size,
            emb.pp("token_embedding"),
        )?;
        let position_embedding = emb.pp("position_embedding").get(
            (config.max_position_embeddings, config.hidden_size),
            "weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(vb.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(
            config.hidden_size,
            config.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        // The projection sits beside `text_model`, at the root of the file.
        let projection = config
            .projection_dim
            .map(|dim| linear_no_bias(config.hidden_size, dim, root.pp("text_projection")))
            .transpose()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// `ids` is `(B, S)` token ids; returns `(B, S, hidden_size)`, the final hidden state.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(ids, HiddenState::Final)?.hidden)
    }

    /// `ids` is `(B, S)` token ids: the `which` hidden state, and the pooled projection if the
    /// encoder has one.
    pub fn encode(&self, ids: &Tensor, which: HiddenState) -> Result<Encoded> {
        let (_, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            return Err(candle_core::Error::Msg(format!(
                "{s} tokens exceed the text encoder's max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let max_id = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(candle_core::Error::Msg(format!(
                "token id {max_id} is outside the text encoder's vocab_size {}",
                self.config.vocab_size
            )));
        }
        let positions = self.position_embedding.narrow(0, 0, s)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&positions)?;
        // Without a projection the penultimate state needs every layer but the last.
        let needed = match (which, &self.projection) {
            (HiddenState::Penultimate, None) => self.layers.len().saturating_sub(1),
            _ => self.layers.len(),
        };
        let mut penultimate = None;
        for (i, layer) in self.layers[..needed].iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = Some(xs.clone());
            }
            xs = layer.forward(&xs)?;
        }
        if which == HiddenState::Penultimate && self.projection.is_none() {
            return Ok(Encoded {
                hidden: xs,
                pooled: None,
            });
        }
        let last = self.final_layer_norm.forward(&xs)?;
        let pooled = match &self.projection {
            Some(projection) => Some(projection.forward(&self.at_end_of_text(&last, ids)?)?),
            None => None,
        };
        let hidden = match which {
            HiddenState::Final => last,
            // With no layers at all, transformers' hidden_states[-2] does not exist either.
            HiddenState::Penultimate => penultimate.ok_or_else(|| {
                candle_core::Error::Msg(
                    "a text encoder without layers has no penultimate state".into(),
                )
            })?,
        };
        Ok(Encoded { hidden, pooled })
    }

    /// `(B, hidden)`: row b of `states` at row b's end-of-text token, found as transformers
    /// finds it: the largest id of the row when `eos_token_id` is CLIP's legacy 2, else the first
    /// `eos_token_id` (the first position if there is none).
    fn at_end_of_text(&self, states: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let eos = self.config.eos_token_id as u32;
        let positions: Vec<u32> = rows
            .iter()
            .map(|row| {
                let first = |pred: &dyn Fn(u32) -> bool| row.iter().position(|&t| pred(t));
                let at = if eos == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    first(&|t| t == max)
                } else {
                    first(&|t| t == eos)
                };
                at.unwrap_or(0) as u32
            })
            .collect();
        let (b, s, hidden) = states.dims3()?;
        let flat = states.reshape((b * s, hidden))?;
        let index: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| row as u32 * s as u32 + p)
            .collect();
        flat.index_select(&Tensor::new(index.as_slice(), states.device())?, 0)
    }
}
