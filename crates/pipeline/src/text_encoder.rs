//! CLIP text transformer (HF `CLIPTextModel` tensor names, with or without the `text_model.`
//! prefix), batched.
//!
//! Sizes, activation and LayerNorm epsilon all come from `text_encoder/config.json`, and a batch
//! of prompts runs in one forward (attention is causal: each token sees the tokens before it).
//! The output is the last hidden state after the final LayerNorm, which is what the SD 1.x and
//! 2.x pipelines feed the UNet.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder, embedding, layer_norm, linear};

use crate::attention::attention;
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
        let out = attention(&q, &k, &v, self.heads, self.scale, true)?;
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

/// The CLIP text transformer of an SD folder.
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    config: TextEncoderConfig,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, config: &TextEncoderConfig) -> Result<Self> {
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
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// `ids` is `(B, S)` token ids; returns `(B, S, hidden_size)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
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
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
