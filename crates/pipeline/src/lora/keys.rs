//! The two key layouts of LoRA files, and which network, layer and part of the low-rank pair
//! each tensor names.
//!
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` (down), `.lora_B.weight` (up), modules in
//!   diffusers' dotted paths, `text_encoder.` / `text_encoder_2.` for the text encoders;
//! - kohya / A1111: `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
//!   `lora_te_` (SD 1.x / 2.x) or `lora_te1_` / `lora_te2_` (SDXL), where `<name>` is a module
//!   path with dots written as underscores: diffusers' path for SD 1.x / 2.x, the SGM UNet's
//!   for SDXL (see [`sgm_path`]). An underscore name is ambiguous as text, so it is resolved by
//!   exact lookup among the base model's own layers, never by rewriting.

use crate::config::UNetConfig;

/// The network a tensor adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Network {
    /// The network's folder in a diffusers pipeline (and its key prefix in PEFT files).
    pub fn component(self) -> &'static str {
        match self {
            Network::Unet => "unet",
            Network::TextEncoder => "text_encoder",
            Network::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Which part of a layer's adapter a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `(rank, in[, kh, kw])`: PEFT's `lora_A`, kohya's `lora_down`.
    Down,
    /// `(out, rank[, 1, 1])`: PEFT's `lora_B`, kohya's `lora_up`.
    Up,
    /// kohya's scalar `alpha` (scale = alpha / rank).
    Alpha,
}

/// How a key names its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Module {
    /// A dotted diffusers module path (PEFT).
    Path(String),
    /// A kohya underscore name, resolved against the base model's layers.
    Underscored(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraKey {
    pub network: Network,
    pub module: Module,
    pub part: Part,
}

const PEFT_NETWORKS: [(&str, Network); 3] = [
    ("unet.", Network::Unet),
    ("text_encoder_2.", Network::TextEncoder2),
    ("text_encoder.", Network::TextEncoder),
];
const PEFT_PARTS: [(&str, Part); 2] =
    [(".lora_A.weight", Part::Down), (".lora_B.weight", Part::Up)];
const KOHYA_NETWORKS: [(&str, Network); 4] = [
    ("lora_unet_", Network::Unet),
    ("lora_te1_", Network::TextEncoder),
    ("lora_te2_", Network::TextEncoder2),
    ("lora_te_", Network::TextEncoder),
];
const KOHYA_PARTS: [(&str, Part); 3] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// The layer and part `key` names, or `None` for a key of neither layout.
pub fn parse(key: &str) -> Option<LoraKey> {
    let split = |networks: &[(&str, Network)], parts: &[(&str, Part)]| {
        let (prefix, network) = networks.iter().find(|(p, _)| key.starts_with(p))?;
        let (suffix, part) = parts.iter().find(|(s, _)| key.ends_with(s))?;
        let module = key.get(prefix.len()..key.len().checked_sub(suffix.len())?)?;
        (!module.is_empty()).then(|| (*network, module.to_string(), *part))
    };
    if let Some((network, module, part)) = split(&PEFT_NETWORKS, &PEFT_PARTS) {
        return Some(LoraKey {
            network,
            module: Module::Path(module),
            part,
        });
    }
    let (network, module, part) = split(&KOHYA_NETWORKS, &KOHYA_PARTS)?;
    Some(LoraKey {
        network,
        module: Module::Underscored(module),
        part,
    })
}

/// The kohya name of a diffusers module path: its dots as underscores.
pub fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// The path of UNet module `path` (diffusers' naming) in the original SGM UNet that kohya
/// trains SDXL on, or `None` for a module that has no counterpart there.
///
/// The SGM UNet numbers its blocks in one sequence: `input_blocks.0.0` is `conv_in`, then each
/// down level's resnets (with their attention at `.1`) and its downsampler (`.0.op`);
/// `middle_block.0/1/2` is resnet, attention, resnet; `output_blocks` each up level's resnets
/// (attention at `.1`) with its upsampler after the last (`.1.conv`, or `.2.conv` behind an
/// attention). Inside a resnet: `in_layers.2` (conv1), `emb_layers.1` (time_emb_proj),
/// `out_layers.3` (conv2), `skip_connection` (conv_shortcut).
pub fn sgm_path(path: &str, unet: &UNetConfig) -> Option<String> {
    const TOP: [(&str, &str); 6] = [
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ];
    if let Some((_, sgm)) = TOP.iter().find(|(d, _)| *d == path) {
        return Some(sgm.to_string());
    }
    let parts: Vec<&str> = path.split('.').collect();
    let number = |i: usize| parts.get(i)?.parse::<usize>().ok();
    let rest = |from: usize| parts.get(from..).map(|r| r.join("."));
    let levels = &unet.blocks;
    match *parts.first()? {
        "down_blocks" => {
            let b = number(1)?;
            let first = 1 + levels.get(..b)?.iter().map(|l| l.layers + 1).sum::<usize>();
            let layers = levels.get(b)?.layers;
            match *parts.get(2)? {
                "downsamplers" if path.ends_with("downsamplers.0.conv") => {
                    Some(format!("input_blocks.{}.0.op", first + layers))
                }
                kind => level_layer("input_blocks", first, layers, kind, number(3)?, &rest(4)?),
            }
        }
        "mid_block" => match (*parts.get(1)?, number(2)?) {
            ("resnets", j @ (0 | 1)) => {
                Some(format!("middle_block.{}.{}", 2 * j, resnet(&rest(3)?)?))
            }
            ("attentions", 0) => Some(format!("middle_block.1.{}", rest(3)?)),
            _ => None,
        },
        "up_blocks" => {
            // Up block u mirrors down level n - 1 - u and has one more resnet.
            let u = number(1)?;
            let n = levels.len();
            let level = |v: usize| levels.get(n.checked_sub(1 + v)?);
            let first = (0..u)
                .map(|v| level(v).map(|l| l.layers + 1))
                .sum::<Option<usize>>()?;
            let this = level(u)?;
            let layers = this.layers + 1;
            match *parts.get(2)? {
                "upsamplers" if path.ends_with("upsamplers.0.conv") => {
                    let inner = if this.up_cross_attn { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{inner}.conv", first + layers - 1))
                }
                kind => level_layer("output_blocks", first, layers, kind, number(3)?, &rest(4)?),
            }
        }
        _ => None,
    }
}

/// Resnet `j` (at `.0`) or its attention (at `.1`) of a level whose layers start at index
/// `first` of the SGM UNet's `blocks`.
fn level_layer(
    blocks: &str,
    first: usize,
    layers: usize,
    kind: &str,
    j: usize,
    rest: &str,
) -> Option<String> {
    if j >= layers {
        return None;
    }
    match kind {
        "resnets" => Some(format!("{blocks}.{}.0.{}", first + j, resnet(rest)?)),
        "attentions" => Some(format!("{blocks}.{}.1.{rest}", first + j)),
        _ => None,
    }
}

/// A resnet's layer in the SGM UNet's naming.
fn resnet(layer: &str) -> Option<&'static str> {
    Some(match layer {
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::tests::root;
    use crate::weights::{WeightFiles, WeightStore};

    #[test]
    fn both_layouts_parse_and_others_do_not() {
        let peft =
            parse("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight").unwrap();
        assert_eq!(peft.network, Network::TextEncoder2);
        assert_eq!(peft.part, Part::Up);
        assert_eq!(
            peft.module,
            Module::Path("text_model.encoder.layers.0.mlp.fc1".into())
        );
        let kohya = parse("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").unwrap();
        assert_eq!(kohya.network, Network::TextEncoder);
        assert_eq!(kohya.part, Part::Alpha);
        assert_eq!(
            kohya.module,
            Module::Underscored("text_model_encoder_layers_0_self_attn_q_proj".into())
        );
        for other in [
            "unet.conv_in.weight",
            "lora_unet_.alpha",
            "lora_unet_x.hada_w1_a",
            "unet.lora_A.weight",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    /// Every kohya key the conversion script wrote for tiny-sdxl names an SGM module this
    /// mapping produces from a diffusers path of the PEFT file, and the other way round.
    #[test]
    fn sgm_paths_match_the_converted_sdxl_file() {
        let unet = UNetConfig::read(&root().join("models/tiny-sdxl/unet/config.json")).unwrap();
        let names = |file: &str| -> Vec<String> {
            let path = root().join("models/lora/sdxl").join(file);
            let store = WeightStore::open(&WeightFiles {
                files: vec![path],
                index: None,
            })
            .unwrap();
            store.shapes().map(|(n, _)| n.to_string()).collect()
        };
        let mut from_peft: Vec<String> = names("style.safetensors")
            .iter()
            .filter_map(|k| parse(k))
            .filter(|k| k.network == Network::Unet && k.part == Part::Down)
            .map(|k| match k.module {
                Module::Path(p) => {
                    underscored(&sgm_path(&p, &unet).unwrap_or_else(|| panic!("{p}")))
                }
                Module::Underscored(_) => unreachable!(),
            })
            .collect();
        let mut from_kohya: Vec<String> = names("style.kohya.safetensors")
            .iter()
            .filter_map(|k| parse(k))
            .filter(|k| k.network == Network::Unet && k.part == Part::Down)
            .map(|k| match k.module {
                Module::Underscored(u) => u,
                Module::Path(_) => unreachable!(),
            })
            .collect();
        from_peft.sort();
        from_kohya.sort();
        assert!(!from_peft.is_empty());
        assert_eq!(from_peft, from_kohya);
    }
}
