//! A job's adapters applied without touching the shared model: every adapted layer's weight
//! is merged (`W + Σ s · (α / r) · up · down`: the request's scale `s`, the file's alpha over
//! rank; in F32, cast back to the layer's dtype) into a copy private to the job, and the
//! adapted network is built again from the recorded base weights with those copies in place.
//! Layers no adapter touches are shared with the base model, so an adapted network costs the
//! adapted layers' bytes and lives only while its stage runs: workers running different
//! adapters never see each other's weights.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdserve_generation::{AdapterChoice, AdapterDeclaration, AdapterInfo, GenerateError};

use crate::error::{PipelineError, internal};
use crate::lora::adapter::{AdaptableLayers, Adapter, read};
use crate::lora::base::BaseWeights;
use crate::lora::keys::Network;
use crate::prompt::{PromptEncoder, TextTower};
use crate::text_encoder::TextEncoder;
use crate::unet::UNet;

const STAGE: &str = "lora merge";

/// One declared adapter, read at load, its pairs on the model's device.
struct LoadedAdapter {
    info: AdapterInfo,
    adapter: Adapter,
    /// Bytes of the merged copies of its layers, in their networks' dtypes.
    merged_bytes: u64,
    /// Elements of its largest layer: a merge holds a few F32 tensors of that size at once.
    largest_layer: usize,
}

/// A model's adapters and the base weights they merge into.
pub struct Adapters {
    loaded: Vec<LoadedAdapter>,
    unet: BaseWeights,
    /// One per text tower, in tower order.
    texts: Vec<(Network, BaseWeights)>,
}

impl Adapters {
    /// Reads every declared adapter against the model's `networks` (their layers as the files
    /// have them, `unet` and `texts` as the networks read them), moves the pairs to `device`
    /// and adds their bytes to `loaded`.
    pub fn load(
        declared: &[AdapterDeclaration],
        networks: &[AdaptableLayers],
        unet: BaseWeights,
        texts: Vec<(Network, BaseWeights)>,
        device: &Device,
        loaded: &AtomicU64,
    ) -> Result<Self, PipelineError> {
        let mut adapters = Self {
            loaded: Vec::with_capacity(declared.len()),
            unet,
            texts,
        };
        for d in declared {
            let start = Instant::now();
            let mut adapter = read(&d.path, networks)?;
            let (mut merged_bytes, mut largest_layer) = (0, 0);
            for ((network, module), pair) in &mut adapter.layers {
                let Some(weight) = adapters.base(*network).and_then(|b| b.weight(module)) else {
                    return Err(PipelineError::key(
                        &d.path,
                        module,
                        format!(
                            "adapts a tensor the model's {} does not use as a layer",
                            network.component()
                        ),
                    ));
                };
                let to_device = |t: &Tensor| {
                    t.to_device(device)
                        .map_err(|e| PipelineError::model("lora", e))
                };
                pair.down = to_device(&pair.down)?;
                pair.up = to_device(&pair.up)?;
                let pair_bytes = (pair.down.elem_count() + pair.up.elem_count()) * 4;
                loaded.fetch_add(pair_bytes as u64, Ordering::Relaxed);
                merged_bytes += (weight.elem_count() * weight.dtype().size_in_bytes()) as u64;
                largest_layer = largest_layer.max(weight.elem_count());
            }
            tracing::info!(
                adapter = %d.name,
                path = %d.path.display(),
                layers = adapter.layers.len(),
                seconds = start.elapsed().as_secs_f64(),
                "LoRA adapter loaded"
            );
            adapters.loaded.push(LoadedAdapter {
                info: AdapterInfo::from(d),
                adapter,
                merged_bytes,
                largest_layer,
            });
        }
        Ok(adapters)
    }

    pub fn infos(&self) -> Vec<AdapterInfo> {
        self.loaded.iter().map(|a| a.info.clone()).collect()
    }

    fn base(&self, network: Network) -> Option<&BaseWeights> {
        match network {
            Network::Unet => Some(&self.unet),
            _ => self
                .texts
                .iter()
                .find(|(n, _)| *n == network)
                .map(|(_, b)| b),
        }
    }

    /// At most the bytes the adapted networks of `choice` hold beyond the base model: every
    /// merged copy, and the F32 weight, delta and sum of the largest layer being merged.
    pub fn variant_bytes(&self, choice: &AdapterChoice) -> u64 {
        let Ok(chosen) = self.chosen(choice) else {
            return 0;
        };
        let copies: u64 = chosen.iter().map(|(a, _)| a.merged_bytes).sum();
        let largest = chosen
            .iter()
            .map(|(a, _)| a.largest_layer)
            .max()
            .unwrap_or(0);
        copies + (3 * 4 * largest) as u64
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

    /// The text encoders of `choice` beside `prompts`; `None` when it adapts none of them.
    pub fn prompts(
        &self,
        choice: &AdapterChoice,
        prompts: &PromptEncoder,
    ) -> Result<Option<PromptEncoder>, GenerateError> {
        let chosen = self.chosen(choice)?;
        let mut replaced = Vec::with_capacity(self.texts.len());
        for (network, base) in &self.texts {
            replaced.push(merged(base, *network, &chosen)?);
        }
        if replaced.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut towers = Vec::with_capacity(self.texts.len());
        for (((_, base), replaced), tower) in self.texts.iter().zip(replaced).zip(&prompts.towers) {
            let vb = base.with(replaced.unwrap_or_default());
            let encoder = TextEncoder::new(vb, tower.encoder.config()).map_err(internal(STAGE))?;
            towers.push(TextTower {
                tokenizer: tower.tokenizer.clone(),
                encoder,
            });
        }
        Ok(Some(PromptEncoder {
            towers,
            kind: prompts.kind,
            dtype: prompts.dtype,
        }))
    }

    /// The UNet of `choice` beside `unet`; `None` when it adapts no UNet layer.
    pub fn unet(&self, choice: &AdapterChoice, unet: &UNet) -> Result<Option<UNet>, GenerateError> {
        let chosen = self.chosen(choice)?;
        match merged(&self.unet, Network::Unet, &chosen)? {
            Some(replaced) => UNet::new(self.unet.with(replaced), unet.config())
                .map(Some)
                .map_err(internal(STAGE)),
            None => Ok(None),
        }
    }
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
        // Checked at load: every adapted layer has its weight.
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
        let merged = Tensor::cat(&ups, 1)
            .and_then(|up| up.matmul(&Tensor::cat(&downs, 0)?))
            .and_then(|delta| weight.to_dtype(DType::F32)? + delta.reshape(weight.dims())?)
            .and_then(|w| w.to_dtype(weight.dtype()))
            .map_err(internal(STAGE))?;
        out.insert(format!("{module}.weight"), merged);
    }
    Ok(Some(out))
}
