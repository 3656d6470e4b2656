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
];

const TOKENIZERS: &[&str] = &["CLIPTokenizer", "CLIPTokenizerFast"];

const SD_COMPONENTS: &[(&str, &[&str])] = &[
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", TOKENIZERS),
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
        refuse_refiner(&file)?;
        for (key, classes) in *components {
            check_component(&file, key, classes)?;
        }
        if file.get("scheduler").is_none() {
            return Err(file.err("scheduler", "missing component"));
        }
        let kind = if components.iter().any(|(key, _)| *key == "text_encoder_2") {
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt: file.bool("force_zeros_for_empty_prompt", true)?,
            }
        } else {
            PipelineKind::StableDiffusion
        };
        Ok(Self { class_name, kind })
    }
}

/// An SDXL refiner (no first text encoder, aesthetic-score time ids) refines images: it is an
/// image-to-image model, which this server does not run yet.
fn refuse_refiner(file: &JsonFile) -> Result<()> {
    let without_first_encoder = matches!(
        file.get("text_encoder"),
        Some(Value::Array(pair)) if pair.iter().all(Value::is_null)
    );
    if file.bool("requires_aesthetics_score", false)? || without_first_encoder {
        return Err(PipelineError::Unsupported(format!(
            "{}: an SDXL refiner folder (component `text_encoder` is null, `requires_aesthetics_score` is {}): refiners only refine images, and image-to-image is not served yet",
            file.path.display(),
            file.bool("requires_aesthetics_score", false)?
        )));
    }
    Ok(())
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
