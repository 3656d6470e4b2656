//! Reading one LoRA file into low-rank pairs per base layer, every key checked against the
//! base model: a key of neither layout, a layer the model lacks (an adapter for another
//! family), a missing half or a shape that does not fit is a load error naming the file and
//! the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::UNetConfig;
use crate::error::PipelineError;
use crate::lora::keys::{LoraKey, Module, Network, Part, parse, sgm_path, underscored};
use crate::weights::{PICKLE_EXTENSIONS, WeightFiles, WeightStore};

type Result<T> = std::result::Result<T, PipelineError>;

/// The layers of one base network an adapter may adapt: every linear or convolution weight,
/// by module path, and the kohya names that reach them.
pub struct AdaptableLayers {
    network: Network,
    /// Module path → weight shape: `(out, in)` or `(out, in, kh, kw)`.
    shapes: HashMap<String, Vec<usize>>,
    /// kohya underscore name → module path (diffusers' and, for a UNet, the SGM UNet's).
    kohya: HashMap<String, String>,
}

impl AdaptableLayers {
    /// The layers of `store`'s network; `unet` gives a UNet's SGM names.
    pub fn of(network: Network, store: &WeightStore, unet: Option<&UNetConfig>) -> Self {
        let mut shapes = HashMap::new();
        let mut kohya = HashMap::new();
        for (name, shape) in store.shapes() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            // Embedding tables are matrices too, but not layers a LoRA pair adapts.
            if (shape.len() != 2 && shape.len() != 4) || module.ends_with("_embedding") {
                continue;
            }
            kohya.insert(underscored(module), module.to_string());
            // kohya names text-encoder modules from CLIPTextModel's root, which a folder
            // saved by newer transformers leaves out of its tensor names.
            if network != Network::Unet && !module.starts_with("text_model.") {
                let rooted = format!("text_model.{module}");
                kohya.insert(underscored(&rooted), module.to_string());
            }
            if let Some(sgm) = unet.and_then(|c| sgm_path(module, c)) {
                kohya.insert(underscored(&sgm), module.to_string());
            }
            shapes.insert(module.to_string(), shape.to_vec());
        }
        Self {
            network,
            shapes,
            kohya,
        }
    }

    /// The module path a key names, if this network has it. PEFT files written by newer
    /// transformers name text-encoder modules without CLIPTextModel's `text_model.` root.
    fn resolve(&self, module: &Module) -> Option<&str> {
        let path = match module {
            Module::Path(p) => p.clone(),
            Module::Underscored(u) => self.kohya.get(u)?.clone(),
        };
        let rooted = format!("text_model.{path}");
        [path, rooted]
            .into_iter()
            .find_map(|p| self.shapes.get_key_value(&p).map(|(k, _)| k.as_str()))
    }
}

/// One layer's adapter: `W + scale · weight · (up · down)`, reshaped to `W`'s shape.
pub struct LowRank {
    /// `(rank, in · kh · kw)`, F32.
    pub down: Tensor,
    /// `(out, rank)`, F32.
    pub up: Tensor,
    /// alpha / rank (alpha / √rank for rsLoRA).
    pub scale: f64,
}

/// An adapter file's pairs by network and module path.
pub struct Adapter {
    pub path: PathBuf,
    pub layers: HashMap<(Network, String), LowRank>,
}

/// The halves and alpha of one layer as the file has them.
#[derive(Default)]
struct Halves {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Reads the adapter at `path` for a model with `networks`.
pub fn read(path: &Path, networks: &[AdaptableLayers]) -> Result<Adapter> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if PICKLE_EXTENSIONS.contains(&ext) {
        return Err(PipelineError::weights(
            path,
            "a pickle file is refused (loading one can run arbitrary code); convert the adapter to .safetensors",
        ));
    }
    let store = WeightStore::open(&WeightFiles {
        files: vec![path.to_path_buf()],
        index: None,
    })?;
    let bad = |key: &str, what: String| PipelineError::key(path, key, what);
    // Each layer's halves, with the base weight's shape they must fit.
    let mut found: HashMap<(Network, String), (Halves, &[usize])> = HashMap::new();
    let mut names: Vec<&str> = store.shapes().map(|(n, _)| n).collect();
    names.sort();
    for name in names {
        let Some(LoraKey {
            network,
            module,
            part,
        }) = parse(name)
        else {
            return Err(bad(
                name,
                "not a LoRA key of the PEFT (unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down.weight) layout".into(),
            ));
        };
        let Some(layers) = networks.iter().find(|l| l.network == network) else {
            return Err(bad(
                name,
                format!(
                    "adapts {}, which this model does not have (an adapter for another model family?)",
                    network.component()
                ),
            ));
        };
        let Some(module) = layers.resolve(&module) else {
            return Err(bad(
                name,
                format!(
                    "no such linear or convolution layer in the model's {} (an adapter for another model family?)",
                    network.component()
                ),
            ));
        };
        let (halves, _) = found
            .entry((network, module.to_string()))
            .or_insert_with(|| (Halves::default(), &layers.shapes[module]));
        let slot = match part {
            Part::Down => &mut halves.down,
            Part::Up => &mut halves.up,
            Part::Alpha => &mut halves.alpha,
        };
        *slot = Some(name.to_string());
    }
    let alphas = PeftAlphas::read(&store, path)?;
    let mut layers = HashMap::with_capacity(found.len());
    for ((network, module), (halves, base)) in found {
        let pair = low_rank(&store, path, base, &halves, |rank| {
            alphas.alpha(network, &module, rank)
        })?;
        layers.insert((network, module), pair);
    }
    Ok(Adapter {
        path: path.to_path_buf(),
        layers,
    })
}

/// One layer's pair, its shapes checked against the base weight's `base`.
fn low_rank(
    store: &WeightStore,
    path: &Path,
    base: &[usize],
    halves: &Halves,
    peft_alpha: impl Fn(usize) -> (f64, bool),
) -> Result<LowRank> {
    let any = halves
        .down
        .as_deref()
        .or(halves.up.as_deref())
        .or(halves.alpha.as_deref())
        .unwrap_or("");
    let (Some(down_key), Some(up_key)) = (&halves.down, &halves.up) else {
        return Err(PipelineError::key(
            path,
            any,
            "has no matching lora_A/lora_down or lora_B/lora_up half",
        ));
    };
    let shape = |key: &str| store.shape(key).unwrap_or_default();
    let (down_shape, up_shape) = (shape(down_key), shape(up_key));
    let out = base[0];
    let fan_in: usize = base[1..].iter().product();
    let rank = down_shape.first().copied().unwrap_or(0);
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let fits = rank > 0
        && numel(&down_shape) == rank * fan_in
        && up_shape.first() == Some(&out)
        && up_shape.get(1) == Some(&rank)
        && numel(&up_shape) == out * rank;
    if !fits {
        return Err(PipelineError::key(
            path,
            down_key,
            format!(
                "shapes {down_shape:?} (down) and {up_shape:?} (up) do not fit the model's layer of shape {base:?}"
            ),
        ));
    }
    let load = |key: &str| store.tensor(key, DType::F32, &Device::Cpu);
    let (alpha, rs) = match &halves.alpha {
        Some(key) => {
            let value = load(key)?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| PipelineError::key(path, key, e.to_string()))?;
            match value.as_slice() {
                [a] if a.is_finite() => (f64::from(*a), false),
                _ => {
                    return Err(PipelineError::key(
                        path,
                        key,
                        "alpha must be one finite number",
                    ));
                }
            }
        }
        None => peft_alpha(rank),
    };
    let scale = if rs {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    let reshape = |key: &str, dims: (usize, usize)| {
        load(key)?
            .reshape(dims)
            .map_err(|e| PipelineError::key(path, key, e.to_string()))
    };
    Ok(LowRank {
        down: reshape(down_key, (rank, fan_in))?,
        up: reshape(up_key, (out, rank))?,
        scale,
    })
}

/// diffusers' `lora_adapter_metadata` (PEFT's LoraConfig per network, keys prefixed with the
/// network): `lora_alpha`, `alpha_pattern`, `use_rslora`. Without it alpha = rank (scale 1).
struct PeftAlphas(HashMap<String, Value>);

impl PeftAlphas {
    fn read(store: &WeightStore, path: &Path) -> Result<Self> {
        let Some(text) = store.metadata("lora_adapter_metadata") else {
            return Ok(Self(HashMap::new()));
        };
        let map: HashMap<String, Value> = serde_json::from_str(text).map_err(|e| {
            PipelineError::key(
                path,
                "__metadata__.lora_adapter_metadata",
                format!("invalid JSON: {e}"),
            )
        })?;
        Ok(Self(map))
    }

    /// `(alpha, rsLoRA)` of `module` of `network` with `rank`.
    fn alpha(&self, network: Network, module: &str, rank: usize) -> (f64, bool) {
        let get = |key: &str| self.0.get(&format!("{}.{key}", network.component()));
        let rs = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        // PEFT matches a pattern against the module path's end.
        let patterned = get("alpha_pattern")
            .and_then(Value::as_object)
            .and_then(|patterns| {
                patterns.iter().find_map(|(p, a)| {
                    let matches = module == p
                        || module.ends_with(&format!(".{p}"))
                        || module.strip_prefix("text_model.").is_some_and(|m| m == p);
                    matches.then(|| a.as_f64()).flatten()
                })
            });
        let alpha = patterned
            .or_else(|| get("lora_alpha").and_then(Value::as_f64))
            .unwrap_or(rank as f64);
        (alpha, rs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::tests::root;
    use crate::weights::find_weights;

    /// The adaptable layers of a tiny model, as the loader will build them.
    fn networks(model: &str) -> Vec<AdaptableLayers> {
        let dir = root().join("models").join(model);
        let unet = UNetConfig::read(&dir.join("unet/config.json")).unwrap();
        let open = |folder: &str, stem: &str| {
            WeightStore::open(&find_weights(&dir.join(folder), stem, false).unwrap()).unwrap()
        };
        let mut out = vec![AdaptableLayers::of(
            Network::Unet,
            &open("unet", "diffusion_pytorch_model"),
            Some(&unet),
        )];
        out.push(AdaptableLayers::of(
            Network::TextEncoder,
            &open("text_encoder", "model"),
            None,
        ));
        if dir.join("text_encoder_2").is_dir() {
            out.push(AdaptableLayers::of(
                Network::TextEncoder2,
                &open("text_encoder_2", "model"),
                None,
            ));
        }
        out
    }

    fn deltas(adapter: &Adapter) -> Vec<((Network, String), Vec<f32>)> {
        let mut out: Vec<_> = adapter
            .layers
            .iter()
            .map(|(k, l)| {
                let d = (l.up.matmul(&l.down).unwrap() * l.scale).unwrap();
                (
                    k.clone(),
                    d.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.1.cmp(&b.0.1).then((a.0.0 as u8).cmp(&(b.0.0 as u8))));
        out
    }

    #[test]
    fn the_peft_and_kohya_files_give_the_same_layers_and_deltas() {
        for model in ["sd1", "sd2", "sdxl"] {
            let nets = networks(&format!("tiny-{model}"));
            let dir = root().join("models/lora").join(model);
            let peft = read(&dir.join("style.safetensors"), &nets).unwrap();
            let kohya = read(&dir.join("style.kohya.safetensors"), &nets).unwrap();
            let (p, k) = (deltas(&peft), deltas(&kohya));
            assert_eq!(p.len(), k.len(), "{model}");
            for ((pk, pd), (kk, kd)) in p.iter().zip(&k) {
                assert_eq!(pk, kk);
                assert_eq!(pd, kd, "{model} {pk:?}");
            }
            // r 4 / alpha 8 in the UNet, r 2 / alpha 2 in the text encoders.
            let scale = |n: Network| peft.layers.iter().find(|(k, _)| k.0 == n).unwrap().1.scale;
            assert_eq!(scale(Network::Unet), 2.0);
            assert_eq!(scale(Network::TextEncoder), 1.0);
            let detail = read(&dir.join("detail.safetensors"), &nets).unwrap();
            assert!(detail.layers.values().all(|l| l.scale == 0.5));
        }
    }

    #[test]
    fn hostile_files_name_the_file_and_the_key() {
        let sd1 = networks("tiny-sd1");
        let message = |path: &Path| match read(path, &sd1) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded", path.display()),
        };
        // An SDXL adapter on an SD 1.x model: its second text encoder has nowhere to go.
        let sdxl = root().join("models/lora/sdxl/style.safetensors");
        let m = message(&sdxl);
        assert!(
            m.contains("style.safetensors") && m.contains("text_encoder_2"),
            "{m}"
        );
        let tmp = std::env::temp_dir().join(format!("sdserve-lora-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let bytes = std::fs::read(root().join("models/lora/sd1/style.safetensors")).unwrap();
        let truncated = tmp.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        assert!(message(&truncated).contains("truncated.safetensors"));
        let pickle = tmp.join("adapter.bin");
        std::fs::write(&pickle, b"\x80\x04K\x01.").unwrap();
        assert!(message(&pickle).contains("pickle"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
