//! OpenAI's Images API as a second request contract over the same generation
//! (`docs/openai-images.md`): `POST /v1/images/generations` (a JSON body) and
//! `POST /v1/images/edits` (form fields), decoded into the one [`GenerationRequest`] every
//! transport produces, and the answers OpenAI's clients parse. Range checks against the model
//! happen later, as for V2 requests; this layer decodes, type-checks and refuses what sdserve
//! cannot honour, naming OpenAI's parameter.

use std::collections::BTreeMap;

use sdserve_generation::{GenerationRequest, MaskMeaning};
use serde::Serialize;
use serde_json::Value;

use crate::diffusers::{Decoded, RequestOptions};

/// The only `response_format`: sdserve stores no files to link to.
pub const B64_JSON: &str = "b64_json";

/// A parameter that cannot be taken: OpenAI answers these with 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// OpenAI's name of the parameter, when one is at fault.
    pub param: Option<String>,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        param: Some(param.to_owned()),
        message: message.into(),
    }
}

/// One field as it came: a JSON value (generations), a form text or a file (edits).
#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    Json(Value),
    Text(String),
    File(Vec<u8>),
}

/// An Images API request, decoded: the model it names (if any) and the generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagesRequest {
    pub model: Option<String>,
    pub decoded: Decoded,
}

/// The fields of a request, taken one by one; whatever is left at the end is unknown.
struct Fields {
    given: BTreeMap<String, Vec<Given>>,
}

impl Fields {
    /// Every field but one holding files appears at most once.
    fn new(parts: Vec<(String, Given)>) -> Result<Self, ParamError> {
        let mut given: BTreeMap<String, Vec<Given>> = BTreeMap::new();
        for (name, value) in parts {
            // gpt-image clients send several images as `image[]`.
            let name = match name.as_str() {
                "image[]" => "image".to_owned(),
                _ => name,
            };
            if matches!(value, Given::Json(Value::Null)) {
                continue;
            }
            let values = given.entry(name.clone()).or_default();
            if !values.is_empty() && !matches!(value, Given::File(_)) {
                return Err(bad(&name, format!("'{name}' is given more than once")));
            }
            values.push(value);
        }
        Ok(Self { given })
    }

    fn take(&mut self, name: &str) -> Result<Option<Given>, ParamError> {
        match self.given.remove(name) {
            None => Ok(None),
            Some(mut v) if v.len() == 1 => Ok(v.pop()),
            Some(_) => Err(bad(name, format!("'{name}' is given more than once"))),
        }
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ParamError> {
        match self.take(name)? {
            None => Ok(None),
            Some(Given::Json(Value::String(s)) | Given::Text(s)) => Ok(Some(s)),
            Some(_) => Err(bad(name, format!("'{name}' must be a string"))),
        }
    }

    fn integer(&mut self, name: &str) -> Result<Option<i64>, ParamError> {
        self.whole(name, serde_json::Number::as_i64, "an integer")
    }

    fn seed(&mut self, name: &str) -> Result<Option<u64>, ParamError> {
        self.whole(
            name,
            serde_json::Number::as_u64,
            "an integer from 0 to 2^64 - 1",
        )
    }

    /// A whole number: a JSON number `from_json` takes, or form text that parses as one.
    fn whole<T: std::str::FromStr>(
        &mut self,
        name: &str,
        from_json: fn(&serde_json::Number) -> Option<T>,
        what: &str,
    ) -> Result<Option<T>, ParamError> {
        let wrong = || bad(name, format!("'{name}' must be {what}"));
        match self.take(name)? {
            None => Ok(None),
            Some(Given::Json(Value::Number(n))) => from_json(&n).map(Some).ok_or_else(wrong),
            Some(Given::Text(t)) => t.trim().parse().map(Some).map_err(|_| wrong()),
            Some(_) => Err(wrong()),
        }
    }

    fn number(&mut self, name: &str) -> Result<Option<f64>, ParamError> {
        let wrong = || bad(name, format!("'{name}' must be a number"));
        match self.take(name)? {
            None => Ok(None),
            Some(Given::Json(Value::Number(n))) => n.as_f64().map(Some).ok_or_else(wrong),
            Some(Given::Text(t)) => match t.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(wrong()),
            },
            Some(_) => Err(wrong()),
        }
    }

    fn boolean(&mut self, name: &str) -> Result<Option<bool>, ParamError> {
        match self.take(name)? {
            None => Ok(None),
            Some(Given::Json(Value::Bool(b))) => Ok(Some(b)),
            Some(Given::Text(t)) if t == "true" || t == "false" => Ok(Some(t == "true")),
            Some(_) => Err(bad(name, format!("'{name}' must be true or false"))),
        }
    }

    fn files(&mut self, name: &str) -> Result<Option<Vec<Vec<u8>>>, ParamError> {
        let Some(values) = self.given.remove(name) else {
            return Ok(None);
        };
        values
            .into_iter()
            .map(|v| match v {
                Given::File(bytes) => Ok(bytes),
                _ => Err(bad(name, format!("'{name}' must be a file"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// OpenAI's answer to a field it does not know.
    fn finish(self) -> Result<(), ParamError> {
        match self.given.into_keys().next() {
            None => Ok(()),
            Some(name) => Err(bad(
                &name,
                format!("Unrecognized request argument supplied: {name}"),
            )),
        }
    }
}

/// Decodes a `POST /v1/images/generations` body (a JSON object).
pub fn decode_generation(body: &[u8]) -> Result<ImagesRequest, ParamError> {
    let object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Err(ParamError {
                param: None,
                message: "the request body must be a JSON object".into(),
            });
        }
        Err(e) => {
            return Err(ParamError {
                param: None,
                message: format!("the request body is not valid JSON: {e}"),
            });
        }
    };
    let parts = object
        .into_iter()
        .map(|(k, v)| (k, Given::Json(v)))
        .collect();
    let mut f = Fields::new(parts)?;
    let request = common(&mut f)?;
    f.finish()?;
    Ok(request)
}

/// Decodes the form fields of a `POST /v1/images/edits` request: `image` (one file, or one per
/// prompt) and `mask` (transparent pixels are repainted) beside the fields of a generation.
pub fn decode_edit(parts: Vec<(String, Given)>) -> Result<ImagesRequest, ParamError> {
    let mut f = Fields::new(parts)?;
    let images = f.files("image")?.ok_or_else(|| {
        bad(
            "image",
            "'image' is required: the image to edit, as a PNG, JPEG or WebP file",
        )
    })?;
    let masks = f.files("mask")?;
    if masks.as_ref().is_some_and(|m| m.len() > 1) {
        return Err(bad("mask", "give at most one 'mask' file"));
    }
    let mut request = common(&mut f)?;
    let g = &mut request.decoded.generation;
    g.strength = f.number("strength")?;
    g.images = Some(images);
    g.mask_images = masks;
    g.mask_meaning = MaskMeaning::Transparent;
    f.finish()?;
    Ok(request)
}

/// The fields both routes share: OpenAI's, then sdserve's extensions.
fn common(f: &mut Fields) -> Result<ImagesRequest, ParamError> {
    let model = f.string("model")?;
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| bad("prompt", "'prompt' is required"))?;
    let (width, height) = match f.string("size")? {
        None => (None, None),
        Some(s) => parse_size(&s)?,
    };
    check_choice(f, "response_format", &[B64_JSON], URL_REFUSED)?;
    check_choice(
        f,
        "output_format",
        &["png"],
        "sdserve writes PNG files only",
    )?;
    check_choice(
        f,
        "quality",
        &["auto", "standard"],
        "sdserve has one quality; set num_inference_steps instead",
    )?;
    check_choice(
        f,
        "background",
        &["auto", "opaque"],
        "sdserve's images are opaque",
    )?;
    check_choice(
        f,
        "moderation",
        &["auto", "low"],
        "sdserve runs no content moderation",
    )?;
    for (name, why) in REFUSED {
        if f.take(name)?.is_some() {
            return Err(bad(name, format!("'{name}' is not supported: {why}")));
        }
    }
    const NO_STREAMING: &str = "streaming is not supported on this route; the V2 route generate_stream sends progress events and previews";
    if f.boolean("stream")? == Some(true) {
        return Err(bad("stream", NO_STREAMING));
    }
    if f.integer("partial_images")?.is_some_and(|n| n != 0) {
        return Err(bad("partial_images", NO_STREAMING));
    }
    // An end-user id for abuse tracking at OpenAI; nothing here uses it.
    let _user = f.string("user")?;
    let generation = GenerationRequest {
        prompts: vec![prompt],
        negative_prompts: f.string("negative_prompt")?.map(|n| vec![n]),
        num_inference_steps: f.integer("num_inference_steps")?,
        guidance_scale: f.number("guidance_scale")?,
        height,
        width,
        seeds: f.seed("seed")?.map(|s| vec![s]),
        num_images_per_prompt: f.integer("n")?,
        scheduler: f.string("scheduler")?,
        ..GenerationRequest::default()
    };
    Ok(ImagesRequest {
        model,
        decoded: Decoded {
            generation,
            options: RequestOptions::default(),
        },
    })
}

/// OpenAI's fields that sdserve cannot honour, refused whenever given, and why.
const REFUSED: &[(&str, &str)] = &[
    ("style", "describe the style in the prompt"),
    (
        "output_compression",
        "it applies to JPEG and WebP, and sdserve writes PNG",
    ),
    (
        "input_fidelity",
        "image-to-image follows 'strength' instead",
    ),
];

const URL_REFUSED: &str =
    "sdserve stores no files, so it has no URLs to give; ask for response_format 'b64_json'";

/// A string field that, when given, must be one of `allowed`.
fn check_choice(f: &mut Fields, name: &str, allowed: &[&str], why: &str) -> Result<(), ParamError> {
    match f.string(name)? {
        Some(v) if !allowed.contains(&v.as_str()) => Err(bad(
            name,
            format!(
                "'{name}' is '{v}'; it must be one of {}: {why}",
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        _ => Ok(()),
    }
}

/// `"WxH"` (OpenAI writes width first) or `"auto"` (the model's own size).
fn parse_size(s: &str) -> Result<(Option<i64>, Option<i64>), ParamError> {
    if s == "auto" {
        return Ok((None, None));
    }
    let side = |t: &str| {
        (!t.is_empty() && t.len() <= 6 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<i64>().ok())
            .flatten()
            .filter(|&v| v > 0)
    };
    match s.split_once('x').map(|(w, h)| (side(w), side(h))) {
        Some((Some(w), Some(h))) => Ok((Some(w), Some(h))),
        _ => Err(bad(
            "size",
            format!(
                "'size' is '{s}'; give it as WIDTHxHEIGHT in pixels (e.g. '512x512') or 'auto'"
            ),
        )),
    }
}

/// A message of the generation's validation in OpenAI's terms: the contract's fields it quotes
/// renamed as an OpenAI client set them, and the first of them as `param`.
pub fn in_openai_terms(message: &str) -> (String, Option<String>) {
    // (as the contract quotes it, as an OpenAI client knows it, OpenAI's parameter)
    const NAMES: &[(&str, &str, &str)] = &[
        ("'height'", "the height of 'size'", "size"),
        ("'width'", "the width of 'size'", "size"),
        ("'num_images_per_prompt'", "'n'", "n"),
        ("'mask_image'", "'mask'", "mask"),
        ("'prompt'", "'prompt'", "prompt"),
        ("'negative_prompt'", "'negative_prompt'", "negative_prompt"),
        (
            "'num_inference_steps'",
            "'num_inference_steps'",
            "num_inference_steps",
        ),
        ("'guidance_scale'", "'guidance_scale'", "guidance_scale"),
        ("'scheduler'", "'scheduler'", "scheduler"),
        ("'seed'", "'seed'", "seed"),
        ("'strength'", "'strength'", "strength"),
        ("'image'", "'image'", "image"),
    ];
    let param = NAMES
        .iter()
        .filter_map(|(quoted, _, param)| message.find(quoted).map(|at| (at, *param)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, param)| param.to_owned());
    let renamed = NAMES
        .iter()
        .fold(message.to_owned(), |m, (quoted, known, _)| {
            m.replace(quoted, known)
        });
    (renamed, param)
}

/// The answer of both image routes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    pub output_format: &'static str,
    /// `"WxH"` of every image.
    pub size: String,
}

/// One image: OpenAI's `b64_json`, and the seed that makes it again (an sdserve extension).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageData {
    pub b64_json: String,
    pub seed: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds when the model was loaded.
    pub created: u64,
    pub owned_by: String,
}

impl ModelObject {
    pub fn new(id: String, created: u64, owned_by: String) -> Self {
        Self {
            id,
            object: "model",
            created,
            owned_by,
        }
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn generation(body: Value) -> Result<ImagesRequest, ParamError> {
        decode_generation(body.to_string().as_bytes())
    }

    fn param_of(body: Value) -> Option<String> {
        generation(body).unwrap_err().param
    }

    #[test]
    fn a_generation_maps_onto_the_contract() {
        let r = generation(json!({
            "model": "tiny", "prompt": "a red circle", "n": 2, "size": "128x64",
            "response_format": "b64_json", "user": "u-1", "quality": "standard",
            "moderation": "low", "stream": false, "partial_images": 0,
            "negative_prompt": "blue", "seed": 7, "num_inference_steps": 4,
            "guidance_scale": 5.5, "scheduler": "ddim", "style": null
        }))
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("tiny"));
        let g = r.decoded.generation;
        assert_eq!(g.prompts, ["a red circle"]);
        assert_eq!(g.negative_prompts, Some(vec!["blue".to_owned()]));
        assert_eq!((g.width, g.height), (Some(128), Some(64)));
        assert_eq!(g.num_images_per_prompt, Some(2));
        assert_eq!(g.seeds, Some(vec![7]));
        assert_eq!(g.num_inference_steps, Some(4));
        assert_eq!(g.guidance_scale, Some(5.5));
        assert_eq!(g.scheduler.as_deref(), Some("ddim"));
        assert_eq!(g.images, None);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_parameter() {
        let cases = [
            (
                json!({"prompt": "x", "response_format": "url"}),
                "response_format",
            ),
            (json!({"prompt": "x", "size": "512"}), "size"),
            (json!({"prompt": "x", "size": "0x512"}), "size"),
            (json!({"prompt": "x", "size": "99999999x8"}), "size"),
            (json!({"prompt": "x", "size": 512}), "size"),
            (json!({"prompt": "x", "n": "two"}), "n"),
            (json!({"prompt": "x", "n": 1.5}), "n"),
            (json!({"prompt": "x", "seed": -1}), "seed"),
            (json!({"prompt": "x", "style": "vivid"}), "style"),
            (json!({"prompt": "x", "quality": "hd"}), "quality"),
            (
                json!({"prompt": "x", "output_format": "jpeg"}),
                "output_format",
            ),
            (
                json!({"prompt": "x", "background": "transparent"}),
                "background",
            ),
            (json!({"prompt": "x", "stream": true}), "stream"),
            (
                json!({"prompt": "x", "partial_images": 2}),
                "partial_images",
            ),
            (
                json!({"prompt": "x", "partial_images": -1}),
                "partial_images",
            ),
            (
                json!({"prompt": "x", "output_compression": 80}),
                "output_compression",
            ),
            (json!({"prompt": "x", "moderation": "strict"}), "moderation"),
            (json!({"prompt": "x", "temperature": 1}), "temperature"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"n": 1}), "prompt"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(body.clone()).as_deref(), Some(param), "{body}");
        }
        let not_json = decode_generation(b"{").unwrap_err();
        assert_eq!(not_json.param, None);
        assert!(not_json.message.contains("not valid JSON"), "{not_json}");
        assert!(decode_generation(b"[1]").is_err());
    }

    #[test]
    fn an_edit_takes_files_and_form_text() {
        let text = |s: &str| Given::Text(s.to_owned());
        let parts = vec![
            ("image".to_owned(), Given::File(vec![1, 2])),
            ("mask".to_owned(), Given::File(vec![3])),
            ("prompt".to_owned(), text("a cat")),
            ("n".to_owned(), text("3")),
            ("strength".to_owned(), text("0.5")),
            ("seed".to_owned(), text("11")),
        ];
        let g = decode_edit(parts).unwrap().decoded.generation;
        assert_eq!(g.images, Some(vec![vec![1, 2]]));
        assert_eq!(g.mask_images, Some(vec![vec![3]]));
        assert_eq!(g.mask_meaning, MaskMeaning::Transparent);
        assert_eq!(g.num_images_per_prompt, Some(3));
        assert_eq!(g.strength, Some(0.5));
        assert_eq!(g.seeds, Some(vec![11]));

        let several = vec![
            ("image[]".to_owned(), Given::File(vec![1])),
            ("image[]".to_owned(), Given::File(vec![2])),
            ("prompt".to_owned(), text("x")),
        ];
        assert_eq!(
            decode_edit(several).unwrap().decoded.generation.images,
            Some(vec![vec![1], vec![2]])
        );
        let refused = [
            (vec![("prompt", text("x"))], "image"),
            (
                vec![("image", text("not a file")), ("prompt", text("x"))],
                "image",
            ),
            (
                vec![
                    ("image", Given::File(vec![1])),
                    ("prompt", text("x")),
                    ("prompt", text("y")),
                ],
                "prompt",
            ),
            (
                vec![
                    ("image", Given::File(vec![1])),
                    ("prompt", text("x")),
                    ("strength", text("strong")),
                ],
                "strength",
            ),
        ];
        for (parts, param) in refused {
            let parts: Vec<_> = parts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let e = decode_edit(parts).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e}");
        }
    }

    #[test]
    fn validation_messages_speak_of_openai_parameters() {
        let cases = [
            (
                "'height' is 60; it must be a multiple of 8",
                "the height of 'size' is 60; it must be a multiple of 8",
                Some("size"),
            ),
            (
                "'num_images_per_prompt' is 99; it must be between 1 and 8",
                "'n' is 99; it must be between 1 and 8",
                Some("n"),
            ),
            (
                "input 'mask_image' element 0 declares 9×9 pixels",
                "input 'mask' element 0 declares 9×9 pixels",
                Some("mask"),
            ),
            ("the model is busy", "the model is busy", None),
        ];
        for (message, renamed, param) in cases {
            let (m, p) = in_openai_terms(message);
            assert_eq!((m.as_str(), p.as_deref()), (renamed, param), "{message}");
        }
    }
}
