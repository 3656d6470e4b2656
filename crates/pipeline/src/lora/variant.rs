//! A job's adapters applied without touching the shared model: every adapted layer's weight
//! is merged (`W + Σ scale · weight · up · down`, in F32, cast back to the layer's dtype) into
//! a copy private to the job, and the adapted networks are built again from the recorded base
//! weights with those copies in place. Layers no adapter touches are shared with the base
//! model, so a variant costs the adapted layers' bytes and lives as long as its job: workers
//! running different adapters never see each other's weights.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use sdserve_generation::{AdapterChoice, AdapterDeclaration, AdapterInfo, GenerateError};

use crate::config::UNetConfig;
use crate::error::{PipelineError, internal};
use crate::lora::adapter::{AdaptableLayers, Adapter, read};
use crate::lora::base::BaseWeights;
use crate::lora::keys::Network;
use crate::prompt::{PromptEncoder, TextTower};
use crate::text_encoder::TextEncoder;
use crate::unet::UNet;

const STAGE: &str = "lora merge";

/// One declared adapter, read at load.
pub struct LoadedAdapter {
    pub info: AdapterInfo,
    pub adapter: Adapter,
    /// Bytes of the merged copies of its layers, in their networks' dtypes.
    pub merged_bytes: u64,
}

/// A model's adapters and the base weights they merge into.
pub struct Adapters {
    pub(crate) loaded: Vec<LoadedAdapter>,
    pub(crate) unet: BaseWeights,
    /// One per text tower, in tower order.
    pub(crate) texts: Vec<(Network, BaseWeights)>,
}

/// The networks a job runs with adapters applied; `None` where no chosen adapter adapts it
/// (the base model's network runs).
pub struct Variant {
    pub unet: Option<UNet>,
    pub prompts: Option<PromptEncoder>,
}

impl Adapters {
    /// Reads every declared adapter against the model's `networks`; `unet_dtype` sizes the
    /// merged copies of UNet layers (text encoders run in F32).
    pub fn load(
        declared: &[AdapterDeclaration],
        networks: &[AdaptableLayers],
        unet: BaseWeights,
        texts: Vec<(Network, BaseWeights)>,
        unet_dtype: DType,
    ) -> Result<Self, PipelineError> {
        let mut loaded = Vec::with_capacity(declared.len());
        for d in declared {
            let start = Instant::now();
            let adapter = read(&d.path, networks)?;
            let merged_bytes = adapter
                .layers
                .iter()
                .map(|((network, _), pair)| {
                    let numel = pair.up.dims()[0] * pair.down.dims()[1];
                    let dtype = match network {
                        Network::Unet => unet_dtype,
                        _ => DType::F32,
                    };
                    // The merged copy (one layer's F32 sum at a time is left out).
                    (numel * dtype.size_in_bytes()) as u64
                })
                .sum();
            tracing::info!(
                adapter = %d.name,
                path = %d.path.display(),
                layers = adapter.layers.len(),
                seconds = start.elapsed().as_secs_f64(),
                "LoRA adapter loaded"
            );
            loaded.push(LoadedAdapter {
                info: AdapterInfo::from(d),
                adapter,
                merged_bytes,
            });
        }
        Ok(Self {
            loaded,
            unet,
            texts,
        })
    }

    pub fn infos(&self) -> Vec<AdapterInfo> {
        self.loaded.iter().map(|a| a.info.clone()).collect()
    }

    /// At most the bytes a variant for `choice` holds beyond the base model.
    pub fn variant_bytes(&self, choice: &AdapterChoice) -> u64 {
        self.chosen(choice)
            .map(|chosen| chosen.iter().map(|(a, _)| a.merged_bytes).sum())
            .unwrap_or(0)
    }

    fn chosen(&self, choice: &AdapterChoice) -> Result<Vec<(&LoadedAdapter, f64)>, GenerateError> {
        choice
            .entries()
            .iter()
            .map(|(name, scale)| {
                let a = self
                    .loaded
                    .iter()
                    .find(|a| &a.info.name == name)
                    .ok_or_else(|| GenerateError::Invalid(format!("unknown adapter '{name}'")))?;
                Ok((a, *scale))
            })
            .collect()
    }

    /// The networks of `choice` (`None` for no adapters), built beside `unet` and `prompts`.
    pub fn variant(
        &self,
        choice: &AdapterChoice,
        unet: &UNet,
        prompts: &PromptEncoder,
    ) -> Result<Option<Variant>, GenerateError> {
        if choice.is_empty() {
            return Ok(None);
        }
        let chosen = self.chosen(choice)?;
        let unet = match merged(&self.unet, Network::Unet, &chosen)? {
            Some(replaced) => Some(rebuild_unet(&self.unet, replaced, unet.config())?),
            None => None,
        };
        let mut text_replaced = Vec::with_capacity(self.texts.len());
        for (network, base) in &self.texts {
            text_replaced.push(merged(base, *network, &chosen)?);
        }
        let prompts = if text_replaced.iter().all(Option::is_none) {
            None
        } else {
            let mut towers = Vec::with_capacity(self.texts.len());
            for (((_, base), replaced), tower) in
                self.texts.iter().zip(text_replaced).zip(&prompts.towers)
            {
                let vb = base.with(replaced.unwrap_or_default());
                let encoder =
                    TextEncoder::new(vb, tower.encoder.config()).map_err(internal(STAGE))?;
                towers.push(TextTower {
                    tokenizer: tower.tokenizer.clone(),
                    encoder,
                });
            }
            Some(PromptEncoder {
                towers,
                kind: prompts.kind,
                dtype: prompts.dtype,
            })
        };
        Ok(Some(Variant { unet, prompts }))
    }
}

fn rebuild_unet(
    base: &BaseWeights,
    replaced: HashMap<String, Tensor>,
    config: &UNetConfig,
) -> Result<UNet, GenerateError> {
    UNet::new(base.with(replaced), config).map_err(internal(STAGE))
}

/// The merged weights (by tensor name) of `network`'s layers that `chosen` adapts; `None`
/// when it adapts none. Layer by layer, so that only one layer's F32 sum is alive at once;
/// the chosen adapters' pairs of a layer are one product (ups side by side, scales folded in,
/// downs stacked).
fn merged(
    base: &BaseWeights,
    network: Network,
    chosen: &[(&LoadedAdapter, f64)],
) -> Result<Option<HashMap<String, Tensor>>, GenerateError> {
    let mut modules: Vec<&str> = chosen
        .iter()
        .flat_map(|(a, _)| a.adapter.layers.keys())
        .filter(|(n, _)| *n == network)
        .map(|(_, m)| m.as_str())
        .collect();
    if modules.is_empty() {
        return Ok(None);
    }
    modules.sort_unstable();
    modules.dedup();
    let mut out = HashMap::with_capacity(modules.len());
    for module in modules {
        let weight = base.weight(module).ok_or_else(|| GenerateError::Internal {
            stage: STAGE.into(),
            message: format!("{}: no weight for {module}", network.component()),
        })?;
        let key = (network, module.to_string());
        let (mut ups, mut downs) = (Vec::new(), Vec::new());
        for (loaded, scale) in chosen {
            if let Some(pair) = loaded.adapter.layers.get(&key) {
                ups.push((&pair.up * (scale * pair.scale)).map_err(internal(STAGE))?);
                downs.push(pair.down.clone());
            }
        }
        let device = weight.device();
        let merged = Tensor::cat(&ups, 1)
            .and_then(|up| up.to_device(device))
            .and_then(|up| up.matmul(&Tensor::cat(&downs, 0)?.to_device(device)?))
            .and_then(|delta| weight.to_dtype(DType::F32)? + delta.reshape(weight.dims())?)
            .and_then(|w| w.to_dtype(weight.dtype()))
            .map_err(internal(STAGE))?;
        out.insert(format!("{module}.weight"), merged);
    }
    Ok(Some(out))
}
