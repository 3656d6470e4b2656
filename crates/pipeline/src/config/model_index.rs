//! `model_index.json`: which pipeline a folder is, and which component classes it holds.

use std::path::Path;

use serde_json::Value;

use super::{JsonFile, Result};
use crate::error::PipelineError;

/// The pipelines served, by what their text conditioning needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// SD 1.x / 2.x (`StableDiffusionPipeline`): one text encoder, its final hidden state.
    StableDiffusion,
    /// SDXL (`StableDiffusionXLPipeline`): two text encoders, their penultimate hidden states,
    /// the second one's pooled projection and the size/crop time ids.
    StableDiffusionXl {
        /// An absent negative prompt conditions on zeros rather than on the empty prompt.
        force_zeros_for_empty_prompt: bool,
        /// A refiner (`StableDiffusionXLImg2ImgPipeline` without `text_encoder`, with
        /// `requires_aesthetics_score`): the second encoder alone, aesthetic-score time ids,
        /// image-to-image only.
        refiner: bool,
    },
}

#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    pub kind: PipelineKind,
}

/// Pipeline classes served, with the components (key, accepted classes) each must name.
const PIPELINES: &[(&str, &[(&str, &[&str])])] = &[
    ("StableDiffusionPipeline", SD_COMPONENTS),
    ("StableDiffusionImg2ImgPipeline", SD_COMPONENTS),
    ("StableDiffusionInpaintPipeline", SD_COMPONENTS),
    ("StableDiffusionXLPipeline", SDXL_COMPONENTS),
    ("StableDiffusionXLImg2ImgPipeline", SDXL_COMPONENTS),
    ("StableDiffusionXLInpaintPipeline", SDXL_COMPONENTS),
];

const TOKENIZERS: &[&str] = &["CLIPTokenizer", "CLIPTokenizerFast"];

const SD_COMPONENTS: &[(&str, &[&str])] = &[
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", TOKENIZERS),
];

const REFINER_COMPONENTS: &[(&str, &[&str])] = &[
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder_2", &["CLIPTextModelWithProjection"]),
    ("tokenizer_2", TOKENIZERS),
];

const SDXL_COMPONENTS: &[(&str, &[&str])] = &[
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", TOKENIZERS),
    ("text_encoder_2", &["CLIPTextModelWithProjection"]),
    ("tokenizer_2", TOKENIZERS),
];

impl ModelIndex {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        if !path.is_file() {
            return Err(PipelineError::config(
                &path,
                "not found: a diffusers pipeline folder needs a model_index.json",
            ));
        }
        let file = JsonFile::read(&path)?;
        let class_name = file.string("_class_name", "")?;
        let Some((_, components)) = PIPELINES.iter().find(|(c, _)| *c == class_name) else {
            let served: Vec<&str> = PIPELINES.iter().map(|(c, _)| *c).collect();
            return Err(PipelineError::Unsupported(format!(
                "{}: `_class_name` is {class_name:?}: only {} folders are supported",
                path.display(),
                served.join(", ")
            )));
        };
        let refiner = is_refiner(&file, &class_name)?;
        let components = if refiner {
            REFINER_COMPONENTS
        } else {
            components
        };
        for (key, classes) in components {
            check_component(&file, key, classes)?;
        }
        if file.get("scheduler").is_none() {
            return Err(file.err("scheduler", "missing component"));
        }
        let kind = if components.iter().any(|(key, _)| *key == "text_encoder_2") {
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt: file.bool("force_zeros_for_empty_prompt", true)?,
                refiner,
            }
        } else {
            PipelineKind::StableDiffusion
        };
        Ok(Self { class_name, kind })
    }
}

/// Whether the folder is an SDXL refiner: an image-to-image folder without the first text
/// encoder whose time ids carry aesthetic scores. Half of that (one without the other) is a
/// folder no diffusers pipeline runs as it stands, refused naming the keys.
fn is_refiner(file: &JsonFile, class_name: &str) -> Result<bool> {
    let without_first_encoder = matches!(
        file.get("text_encoder"),
        Some(Value::Array(pair)) if pair.iter().all(Value::is_null)
    );
    let aesthetic = file.bool("requires_aesthetics_score", false)?;
    match (without_first_encoder, aesthetic) {
        (false, false) => Ok(false),
        (true, true) if class_name == "StableDiffusionXLImg2ImgPipeline" => Ok(true),
        _ => Err(PipelineError::Unsupported(format!(
            "{}: `text_encoder` is {} and `requires_aesthetics_score` is {aesthetic}: only SDXL refiners (StableDiffusionXLImg2ImgPipeline with neither the first text encoder nor size time ids) come without the first encoder or with aesthetic scores",
            file.path.display(),
            if without_first_encoder {
                "null"
            } else {
                "present"
            },
        ))),
    }
}

fn check_component(file: &JsonFile, key: &str, classes: &[&str]) -> Result<()> {
    let entry = file
        .get(key)
        .ok_or_else(|| file.err(key, "missing component"))?;
    let class = entry
        .as_array()
        .and_then(|pair| pair.get(1))
        .and_then(Value::as_str);
    match class {
        Some(c) if classes.contains(&c) => Ok(()),
        _ => Err(file.err(
            key,
            format!("component {entry} is not supported (expected one of {classes:?})"),
        )),
    }
}
