//! The diffusers request contract (`docs/infer-contract.md`): which inputs and parameters a
//! text-to-image request may carry, with which datatypes and shapes, decoded from a typed V2
//! request into the one [`GenerationRequest`] every transport produces. Range checks against a
//! model's limits happen later ([`GenerationRequest::resolve`]); this layer only decodes and
//! type-checks.

use std::collections::HashSet;
use std::time::Duration;

pub use sdserve_generation::{ConditioningInputs, MaskInput, ModelDescription};
use sdserve_generation::{GenerationRequest, LatentsInput, MaskMeaning, SizeConditioningInput};
use serde_json::Value;

use crate::tensor::{TensorData, element_count};
use crate::v2::{Datatype, InferenceRequest, Parameters, RequestInput};

/// The only output this server produces.
pub const IMAGE_OUTPUT: &str = "image";

/// A request that breaks the contract: always a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ContractError(pub String);

fn bad(msg: impl Into<String>) -> ContractError {
    ContractError(msg.into())
}

impl From<crate::tensor::DataError> for ContractError {
    fn from(e: crate::tensor::DataError) -> Self {
        ContractError(e.0)
    }
}

/// What a request asks for beyond the generation itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestOptions {
    /// Per-request deadline (`parameters.timeout`, milliseconds on the wire).
    pub timeout: Option<Duration>,
    /// `parameters.preview_every` (checked against the steps once they are known).
    pub preview_every: Option<i64>,
}

/// A request decoded under the contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub generation: GenerationRequest,
    pub options: RequestOptions,
}

/// Where a field of the contract may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Input,
    Parameter,
    /// As an input or as a request parameter (both must agree when both are given).
    Either,
}

/// Every field of the contract, and where it may be given.
const FIELDS: &[(&str, Place)] = &[
    ("prompt", Place::Input),
    ("negative_prompt", Place::Either),
    ("num_inference_steps", Place::Either),
    ("guidance_scale", Place::Either),
    ("height", Place::Either),
    ("width", Place::Either),
    ("seed", Place::Either),
    ("num_images_per_prompt", Place::Either),
    ("scheduler", Place::Either),
    ("eta", Place::Either),
    ("latents", Place::Input),
    ("encoder_noise", Place::Input),
    ("prompt_2", Place::Either),
    ("negative_prompt_2", Place::Either),
    ("original_size", Place::Either),
    ("crops_coords_top_left", Place::Either),
    ("target_size", Place::Either),
    ("negative_original_size", Place::Either),
    ("negative_crops_coords_top_left", Place::Either),
    ("negative_target_size", Place::Either),
    ("aesthetic_score", Place::Either),
    ("negative_aesthetic_score", Place::Either),
    ("image", Place::Input),
    ("mask_image", Place::Input),
    ("strength", Place::Either),
    ("lora", Place::Parameter),
    ("output_format", Place::Parameter),
    ("timeout", Place::Parameter),
    ("preview_every", Place::Parameter),
];

fn names_at(place: Place) -> impl Iterator<Item = &'static str> {
    FIELDS
        .iter()
        .filter(move |(_, p)| *p == place || *p == Place::Either)
        .map(|(name, _)| *name)
}

/// Input names a request may use.
pub fn input_names() -> Vec<&'static str> {
    names_at(Place::Input).collect()
}

/// Request-level `parameters` keys with a meaning for generation.
pub fn parameter_names() -> Vec<&'static str> {
    names_at(Place::Parameter).collect()
}

/// Keys clients and libraries send that carry no generation meaning; accepted and ignored.
/// (`content_type`/`headers`: MLServer codecs; the rest: Triton's reserved parameters.)
pub const PASSTHROUGH_PARAMETERS: &[&str] = &[
    "content_type",
    "headers",
    "binary_data_output",
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
];

/// The layouts of the noise inputs.
const LATENTS: &str = "batch, channels, height/8, width/8";
const ENCODER_NOISE: &str = "batch, encodings, channels, height/8, width/8";

/// Most latents elements accepted (guards memory before the engine's size checks).
const MAX_LATENT_ELEMENTS: usize = 64 * 1024 * 1024;

/// The longest `parameters.timeout`: a day, in milliseconds.
const MAX_TIMEOUT_MS: f64 = 86_400_000.0;

const INTEGERS: &[Datatype] = &[
    Datatype::Int8,
    Datatype::Int16,
    Datatype::Int32,
    Datatype::Int64,
    Datatype::Uint8,
    Datatype::Uint16,
    Datatype::Uint32,
    Datatype::Uint64,
];
const FLOATS: &[Datatype] = &[Datatype::Fp32, Datatype::Fp64];
const SEEDS: &[Datatype] = &[
    Datatype::Int64,
    Datatype::Uint64,
    Datatype::Int32,
    Datatype::Uint32,
];

/// Decodes a V2 request under the diffusers contract.
pub fn decode(req: &InferenceRequest) -> Result<Decoded, ContractError> {
    check_outputs(req)?;
    check_names(req)?;
    let f = Fields {
        inputs: &req.inputs,
        params: &req.parameters,
    };
    let prompts = f.prompts()?;
    let n = prompts.len();
    let negative_prompts = f.prompt_list("negative_prompt", n)?;
    let prompts_2 = f.prompt_list("prompt_2", n)?;
    let negative_prompts_2 = f.prompt_list("negative_prompt_2", n)?;
    let sizes = SizeConditioningInput {
        original_size: f.pair("original_size")?,
        crops_coords_top_left: f.pair("crops_coords_top_left")?,
        target_size: f.pair("target_size")?,
        negative_original_size: f.pair("negative_original_size")?,
        negative_crops_coords_top_left: f.pair("negative_crops_coords_top_left")?,
        negative_target_size: f.pair("negative_target_size")?,
    };
    let seeds = f.seeds()?;
    let scheduler = f.text("scheduler")?;
    let latents = f.noise("latents", LATENTS)?;
    let encoder_noise = f.noise("encoder_noise", ENCODER_NOISE)?;
    let images = f.files("image")?;
    let mask_images = f.files("mask_image")?;
    let output_format = f.param_as("output_format", json_text)?;
    let options = RequestOptions {
        timeout: f.timeout()?,
        preview_every: f.param_as("preview_every", json_integer)?,
    };
    let generation = GenerationRequest {
        prompts,
        negative_prompts,
        num_inference_steps: f.int("num_inference_steps")?,
        guidance_scale: f.float("guidance_scale")?,
        height: f.int("height")?,
        width: f.int("width")?,
        seeds,
        num_images_per_prompt: f.int("num_images_per_prompt")?,
        scheduler,
        eta: f.float("eta")?,
        latents,
        encoder_noise,
        output_format,
        prompts_2,
        negative_prompts_2,
        sizes,
        images,
        mask_images,
        mask_meaning: MaskMeaning::White,
        strength: f.float("strength")?,
        lora: f.param_as("lora", json_lora)?,
        aesthetic_score: f.float("aesthetic_score")?,
        negative_aesthetic_score: f.float("negative_aesthetic_score")?,
    };
    Ok(Decoded {
        generation,
        options,
    })
}

fn check_outputs(req: &InferenceRequest) -> Result<(), ContractError> {
    match req
        .outputs
        .iter()
        .flatten()
        .find(|o| o.name != IMAGE_OUTPUT)
    {
        Some(o) => Err(bad(format!(
            "unknown output '{}'; this model produces only '{IMAGE_OUTPUT}'",
            o.name
        ))),
        None => Ok(()),
    }
}

/// Every input and parameter name is known, and no input is given twice.
fn check_names(req: &InferenceRequest) -> Result<(), ContractError> {
    let mut seen = HashSet::new();
    let inputs = input_names();
    for input in &req.inputs {
        if !inputs.contains(&input.name.as_str()) {
            return Err(bad(format!(
                "unknown input '{}'; allowed inputs: {}",
                input.name,
                inputs.join(", ")
            )));
        }
        if !seen.insert(input.name.as_str()) {
            return Err(bad(format!(
                "input '{}' is given more than once",
                input.name
            )));
        }
    }
    let parameters = parameter_names();
    let known = |k: &str| parameters.contains(&k) || PASSTHROUGH_PARAMETERS.contains(&k);
    match req.parameters.keys().find(|k| !known(k)) {
        Some(key) => Err(bad(format!(
            "unknown parameter '{key}'; allowed parameters: {}",
            parameters.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A request's inputs and parameters, read field by field.
struct Fields<'a> {
    inputs: &'a [RequestInput],
    params: &'a Parameters,
}

impl Fields<'_> {
    fn input(&self, name: &str) -> Option<&RequestInput> {
        self.inputs.iter().find(|i| i.name == name)
    }

    fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name).filter(|v| !v.is_null())
    }

    fn prompts(&self) -> Result<Vec<String>, ContractError> {
        let prompt = self
            .input("prompt")
            .ok_or_else(|| bad("missing input 'prompt' (BYTES, shape [N])"))?;
        let prompts = strings(prompt)?;
        if prompts.is_empty() {
            return Err(bad("input 'prompt' must hold at least one prompt"));
        }
        Ok(prompts)
    }

    /// Texts given once for all `n_prompts` prompts or once per prompt.
    fn prompt_list(
        &self,
        name: &str,
        n_prompts: usize,
    ) -> Result<Option<Vec<String>>, ContractError> {
        let from_input = self.input(name).map(strings).transpose()?;
        let from_param = one_or_list(self.param(name), name, json_text)?;
        let negatives = merge(name, from_input, from_param)?;
        match &negatives {
            Some(neg) if neg.len() != 1 && neg.len() != n_prompts => Err(bad(format!(
                "'{name}' has {} element(s); give one for all prompts or one per prompt ({n_prompts})",
                neg.len()
            ))),
            _ => Ok(negatives),
        }
    }

    /// One value given as an input (shape `[1]`, of an `allowed` datatype, its element read by
    /// `element`) or as a parameter (read by `param`); both must agree.
    fn scalar<T: PartialEq + std::fmt::Debug>(
        &self,
        name: &str,
        allowed: &[Datatype],
        element: impl Fn(&RequestInput, usize) -> Result<T, ContractError>,
        param: impl Fn(&Value, &str) -> Result<T, ContractError>,
    ) -> Result<Option<T>, ContractError> {
        let from_input = self
            .input(name)
            .map(|i| {
                check_datatype(i, allowed)?;
                element(i, single(i)?)
            })
            .transpose()?;
        merge(name, from_input, self.param_as(name, param)?)
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ContractError> {
        self.scalar(name, INTEGERS, int_element, json_integer)
    }

    fn float(&self, name: &str) -> Result<Option<f64>, ContractError> {
        self.scalar(name, FLOATS, float_element, json_float)
    }

    fn text(&self, name: &str) -> Result<Option<String>, ContractError> {
        self.scalar(name, &[Datatype::Bytes], text_element, json_text)
    }

    /// Parameter `name`, if given, read by `read`.
    fn param_as<T>(
        &self,
        name: &str,
        read: impl Fn(&Value, &str) -> Result<T, ContractError>,
    ) -> Result<Option<T>, ContractError> {
        self.param(name)
            .map(|v| read(v, &format!("parameter '{name}'")))
            .transpose()
    }

    /// Two integers (`[height, width]`, `[top, left]`): an input of shape `[2]` or a parameter
    /// list of two.
    fn pair(&self, name: &str) -> Result<Option<[i64; 2]>, ContractError> {
        let need = |what: &str| bad(format!("{what} must hold two integers, e.g. [1024, 1024]"));
        let from_input = self
            .input(name)
            .map(|i| {
                check_datatype(i, INTEGERS)?;
                counted(i)?;
                if i.data.len() != 2 {
                    return Err(need(&format!("input '{name}'")));
                }
                Ok([int_element(i, 0)?, int_element(i, 1)?])
            })
            .transpose()?;
        let from_param = match self.param(name) {
            None => None,
            Some(Value::Array(items)) if items.len() == 2 => {
                let what = format!("parameter '{name}'");
                Some([
                    json_integer(&items[0], &what)?,
                    json_integer(&items[1], &what)?,
                ])
            }
            Some(_) => return Err(need(&format!("parameter '{name}'"))),
        };
        merge(name, from_input, from_param)
    }

    fn seeds(&self) -> Result<Option<Vec<u64>>, ContractError> {
        let from_input = self
            .input("seed")
            .map(|i| {
                check_datatype(i, SEEDS)?;
                counted(i)?;
                let TensorData::Int(v) = &i.data else {
                    return Err(wrong_kind(i));
                };
                v.iter()
                    .enumerate()
                    .map(|(k, &n)| seed(n, &format!("input 'seed' element {k}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let from_param = one_or_list(self.param("seed"), "seed", json_seed)?;
        let seeds = merge("seed", from_input, from_param)?;
        if seeds.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(bad("'seed' must hold at least one seed"));
        }
        Ok(seeds)
    }

    /// An FP32 noise tensor of the shape `layout` describes (`latents`, `encoder_noise`).
    fn noise(&self, name: &str, layout: &str) -> Result<Option<LatentsInput>, ContractError> {
        let Some(i) = self.input(name) else {
            return Ok(None);
        };
        check_datatype(i, &[Datatype::Fp32])?;
        if i.shape.len() != layout.split(',').count() {
            return Err(bad(format!(
                "input '{name}' must have shape [{layout}], got {:?}",
                i.shape
            )));
        }
        let n = element_count(&i.name, &i.shape)?;
        if n > MAX_LATENT_ELEMENTS {
            return Err(bad(format!("input '{name}' has too many elements ({n})")));
        }
        counted(i)?;
        let TensorData::Float(values) = &i.data else {
            return Err(wrong_kind(i));
        };
        let data = values
            .iter()
            .enumerate()
            .map(|(k, &v)| finite(i, k, v).map(|f| f as f32))
            .collect::<Result<Vec<f32>, _>>()?;
        if data.iter().any(|f| !f.is_finite()) {
            return Err(bad(format!(
                "input '{name}' holds a value outside the FP32 range"
            )));
        }
        Ok(Some(LatentsInput {
            shape: i.shape.iter().map(|&d| d as usize).collect(),
            data,
        }))
    }

    /// Encoded files (BYTES, shape `[N]` or `[N, 1]`): raw bytes, or base64 text where the
    /// input's `content_type` parameter says `base64` (MLServer's codec).
    fn files(&self, name: &str) -> Result<Option<Vec<Vec<u8>>>, ContractError> {
        let Some(i) = self.input(name) else {
            return Ok(None);
        };
        check_datatype(i, &[Datatype::Bytes])?;
        if !matches!(i.shape.as_slice(), [_] | [_, 1]) {
            return Err(bad(format!(
                "input '{name}': shape {:?} is not allowed; use [N] or [N, 1] (one file per element)",
                i.shape
            )));
        }
        counted(i)?;
        let TensorData::Bytes(elements) = &i.data else {
            return Err(wrong_kind(i));
        };
        if elements.is_empty() {
            return Err(bad(format!("input '{name}' must hold at least one file")));
        }
        let content_type = i
            .parameters
            .as_ref()
            .and_then(|p| p.get("content_type"))
            .and_then(Value::as_str);
        match content_type {
            Some("base64") => elements
                .iter()
                .enumerate()
                .map(|(k, e)| {
                    decode_base64(e).map_err(|why| {
                        bad(format!(
                            "input '{name}' element {k} is not valid base64: {why}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            None | Some("bytes") => Ok(Some(elements.clone())),
            Some(other) => Err(bad(format!(
                "input '{name}': content_type '{other}' is not supported; use 'base64' or raw bytes"
            ))),
        }
    }

    fn timeout(&self) -> Result<Option<Duration>, ContractError> {
        let Some(v) = self.param("timeout") else {
            return Ok(None);
        };
        match json_float(v, "parameter 'timeout'")? {
            ms if ms > 0.0 && ms <= MAX_TIMEOUT_MS => {
                Ok(Some(Duration::from_secs_f64(ms / 1000.0)))
            }
            ms => Err(bad(format!(
                "parameter 'timeout' is {ms}; it must be a positive number of milliseconds up to 86400000"
            ))),
        }
    }
}

fn check_datatype(input: &RequestInput, allowed: &[Datatype]) -> Result<(), ContractError> {
    if allowed.contains(&input.datatype) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|d| d.as_str()).collect();
    Err(bad(format!(
        "input '{}': datatype {} is not allowed; use {}",
        input.name,
        input.datatype.as_str(),
        names.join(" or ")
    )))
}

fn int_element(input: &RequestInput, k: usize) -> Result<i64, ContractError> {
    let TensorData::Int(v) = &input.data else {
        return Err(wrong_kind(input));
    };
    i64::try_from(v[k]).map_err(|_| {
        bad(format!(
            "input '{}' is {}, which is out of range",
            input.name, v[k]
        ))
    })
}

fn float_element(input: &RequestInput, k: usize) -> Result<f64, ContractError> {
    let TensorData::Float(v) = &input.data else {
        return Err(wrong_kind(input));
    };
    finite(input, k, v[k])
}

fn text_element(input: &RequestInput, k: usize) -> Result<String, ContractError> {
    let TensorData::Bytes(v) = &input.data else {
        return Err(wrong_kind(input));
    };
    utf8(&v[k], &format!("input '{}'", input.name))
}

/// Data of another kind than the datatype holds: only a transport bug can make one.
fn wrong_kind(input: &RequestInput) -> ContractError {
    bad(format!(
        "input '{}': its data does not hold {} elements",
        input.name,
        input.datatype.as_str()
    ))
}

/// The input's data fills its shape exactly.
fn counted(input: &RequestInput) -> Result<(), ContractError> {
    let expected = element_count(&input.name, &input.shape)?;
    if input.data.len() != expected {
        return Err(bad(format!(
            "input '{}': shape {:?} needs {expected} element(s) but data has {}",
            input.name,
            input.shape,
            input.data.len()
        )));
    }
    Ok(())
}

/// The index of the one element (shape `[1]`, `[1, 1]` or `[]`).
fn single(input: &RequestInput) -> Result<usize, ContractError> {
    counted(input)?;
    if input.data.len() != 1 {
        return Err(bad(format!(
            "input '{}' must hold exactly one value (shape [1]), got shape {:?}",
            input.name, input.shape
        )));
    }
    Ok(0)
}

/// Standard base64 with or without padding; ASCII whitespace (the line breaks of `base64`'s
/// output) is skipped.
fn decode_base64(text: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    ENGINE.decode(compact).map_err(|e| e.to_string())
}

/// A BYTES input of shape `[N]` or `[N, 1]` as UTF-8 text without NUL.
fn strings(input: &RequestInput) -> Result<Vec<String>, ContractError> {
    check_datatype(input, &[Datatype::Bytes])?;
    if !matches!(input.shape.as_slice(), [_] | [_, 1]) {
        return Err(bad(format!(
            "input '{}': shape {:?} is not allowed; use [N] or [N, 1]",
            input.name, input.shape
        )));
    }
    counted(input)?;
    let TensorData::Bytes(elements) = &input.data else {
        return Err(wrong_kind(input));
    };
    elements
        .iter()
        .enumerate()
        .map(|(i, bytes)| utf8(bytes, &format!("input '{}' element {i}", input.name)))
        .collect()
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, ContractError> {
    let s =
        std::str::from_utf8(bytes).map_err(|_| bad(format!("{what} is not valid UTF-8 text")))?;
    without_nul(s, what)
}

fn without_nul(s: &str, what: &str) -> Result<String, ContractError> {
    if s.contains('\0') {
        return Err(bad(format!("{what} contains a NUL character")));
    }
    Ok(s.to_owned())
}

fn finite(input: &RequestInput, element: usize, v: f64) -> Result<f64, ContractError> {
    if v.is_finite() {
        return Ok(v);
    }
    Err(bad(format!(
        "input '{}' element {element} is {v}, which is not a finite number",
        input.name
    )))
}

fn seed(n: i128, what: &str) -> Result<u64, ContractError> {
    u64::try_from(n).map_err(|_| bad(format!("{what} must be between 0 and 2^64-1, got {n}")))
}

fn json_integer(v: &Value, what: &str) -> Result<i64, ContractError> {
    if let Some(n) = v.as_i64() {
        return Ok(n);
    }
    if let Some(f) = v.as_f64()
        && f.fract() == 0.0
        && f.abs() < 9.0e15
    {
        return Ok(f as i64);
    }
    Err(bad(format!("{what} must be an integer, got {v}")))
}

fn json_float(v: &Value, what: &str) -> Result<f64, ContractError> {
    match v.as_f64() {
        Some(f) if f.is_finite() => Ok(f),
        _ => Err(bad(format!("{what} must be a finite number, got {v}"))),
    }
}

fn json_seed(v: &Value, what: &str) -> Result<u64, ContractError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(n) = v.as_i64() {
        return Err(bad(format!("{what} must be between 0 and 2^64-1, got {n}")));
    }
    Err(bad(format!("{what} must be an integer, got {v}")))
}

fn json_text(v: &Value, what: &str) -> Result<String, ContractError> {
    match v {
        Value::String(s) => without_nul(s, what),
        _ => Err(bad(format!("{what} must be a string, got {v}"))),
    }
}

/// LoRA adapters as `{"name": scale, ...}` (a scale of `null`: the declared one); gRPC
/// clients, whose parameters are scalars, send the same object as JSON text.
fn json_lora(v: &Value, what: &str) -> Result<Vec<(String, Option<f64>)>, ContractError> {
    let shape = || {
        bad(format!(
            "{what} must be an object of adapter names to scales, e.g. {{\"style\": 0.8}}, got {v}"
        ))
    };
    let parsed;
    let object = match v {
        Value::Object(m) => m,
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|_| shape())?;
            parsed.as_object().ok_or_else(shape)?
        }
        _ => return Err(shape()),
    };
    object
        .iter()
        .map(|(name, scale)| {
            let scale = match scale {
                Value::Null => None,
                s => Some(json_float(s, &format!("{what}: the scale of '{name}'"))?),
            };
            Ok((name.clone(), scale))
        })
        .collect()
}

/// Parameter `name`, one value or a list of them, each read by `one`.
fn one_or_list<T>(
    value: Option<&Value>,
    name: &str,
    one: impl Fn(&Value, &str) -> Result<T, ContractError>,
) -> Result<Option<Vec<T>>, ContractError> {
    Ok(match value {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| one(v, &format!("parameter '{name}' element {i}")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(v) => Some(vec![one(v, &format!("parameter '{name}'"))?]),
    })
}

/// Sets a field that may come as an input or a parameter; both must agree.
fn merge<T: PartialEq + std::fmt::Debug>(
    name: &str,
    from_input: Option<T>,
    from_param: Option<T>,
) -> Result<Option<T>, ContractError> {
    match (from_input, from_param) {
        (Some(a), Some(b)) if a != b => Err(bad(format!(
            "'{name}' is given both as an input ({a:?}) and as a parameter ({b:?}) with different values"
        ))),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// The contract's inputs for a model conditioned on `conditioning`, as model metadata reports
/// them.
/// The inputs a model takes; `None` (a model still loading) lists the text-to-image ones.
pub fn input_metadata(model: Option<&ModelDescription>) -> Vec<crate::v2::MetadataTensor> {
    let conditioning = model.map(|m| m.conditioning).unwrap_or_default();
    let takes_images = model.is_some_and(|m| m.default_strength.is_some());
    let t = |name: &str, datatype: Datatype, shape: &[i64], content_type: Option<&str>| {
        crate::v2::MetadataTensor {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
            parameters: content_type.map(|c| {
                let mut p = crate::v2::Parameters::new();
                p.insert("content_type".into(), Value::String(c.into()));
                p
            }),
        }
    };
    let mut inputs = vec![
        t("prompt", Datatype::Bytes, &[-1], Some("str")),
        t("negative_prompt", Datatype::Bytes, &[-1], Some("str")),
        t("num_inference_steps", Datatype::Int64, &[1], None),
        t("guidance_scale", Datatype::Fp32, &[1], None),
        t("height", Datatype::Int64, &[1], None),
        t("width", Datatype::Int64, &[1], None),
        t("seed", Datatype::Uint64, &[-1], None),
        t("num_images_per_prompt", Datatype::Int64, &[1], None),
        t("scheduler", Datatype::Bytes, &[1], Some("str")),
        t("eta", Datatype::Fp32, &[1], None),
        t("latents", Datatype::Fp32, &[-1, -1, -1, -1], None),
    ];
    if takes_images {
        // Files: base64 text in JSON, raw bytes in binary tensors and gRPC.
        inputs.push(t("image", Datatype::Bytes, &[-1], Some("base64")));
        inputs.push(t("strength", Datatype::Fp32, &[1], None));
        inputs.push(t(
            "encoder_noise",
            Datatype::Fp32,
            &[-1, -1, -1, -1, -1],
            None,
        ));
    }
    if model.is_some_and(|m| m.masks != MaskInput::NotServed) {
        inputs.push(t("mask_image", Datatype::Bytes, &[-1], Some("base64")));
    }
    if conditioning == ConditioningInputs::Refiner {
        inputs.push(t("aesthetic_score", Datatype::Fp32, &[1], None));
        inputs.push(t("negative_aesthetic_score", Datatype::Fp32, &[1], None));
    }
    if conditioning.has_time_ids() {
        inputs.push(t("prompt_2", Datatype::Bytes, &[-1], Some("str")));
        inputs.push(t("negative_prompt_2", Datatype::Bytes, &[-1], Some("str")));
        for name in SIZE_FIELDS {
            inputs.push(t(name, Datatype::Int64, &[2], None));
        }
    }
    inputs
}

/// SDXL's micro-conditioning fields, each a pair of integers.
const SIZE_FIELDS: [&str; 6] = [
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
];

/// The contract's single output: base64 PNG files, one per image.
pub fn output_metadata() -> Vec<crate::v2::MetadataTensor> {
    let mut p = crate::v2::Parameters::new();
    p.insert("content_type".into(), Value::String("base64".into()));
    vec![crate::v2::MetadataTensor {
        name: "image".into(),
        datatype: Datatype::Bytes,
        shape: vec![-1, 1],
        parameters: Some(p),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_json(body: Value) -> Result<Decoded, ContractError> {
        match InferenceRequest::from_value(&body) {
            Ok(req) => decode(&req),
            Err(crate::schema::DecodeError::Data(e)) => Err(e.into()),
            Err(e) => panic!("schema: {e:?}"),
        }
    }

    fn prompt(data: Value, shape: Value) -> Value {
        json!({"name": "prompt", "datatype": "BYTES", "shape": shape, "data": data})
    }

    #[test]
    fn decodes_the_contract_example() {
        let r = decode_json(json!({
            "id": "req-42",
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red circle"],
                 "parameters": {"content_type": "str"}},
                {"name": "negative_prompt", "shape": [1], "datatype": "BYTES", "data": ["blurry"]}
            ],
            "parameters": {"num_inference_steps": 20, "guidance_scale": 7.5, "seed": 1234,
                           "height": 512, "width": 512, "scheduler": "dpmpp_2m"}
        }))
        .unwrap();
        assert_eq!(r.generation.prompts, ["a red circle"]);
        assert_eq!(r.generation.negative_prompts.unwrap(), ["blurry"]);
        assert_eq!(r.generation.num_inference_steps, Some(20));
        assert_eq!(r.generation.guidance_scale, Some(7.5));
        assert_eq!(r.generation.seeds, Some(vec![1234]));
        assert_eq!(r.generation.scheduler.as_deref(), Some("dpmpp_2m"));
    }

    #[test]
    fn sdxl_fields_decode_as_inputs_or_parameters() {
        let r = decode_json(json!({
            "inputs": [
                prompt(json!(["a", "b"]), json!([2])),
                {"name": "prompt_2", "datatype": "BYTES", "shape": [1], "data": ["c"]},
                {"name": "original_size", "datatype": "INT64", "shape": [2], "data": [1024, 768]}
            ],
            "parameters": {"negative_prompt_2": ["n1", "n2"], "target_size": [512, 512],
                           "crops_coords_top_left": [0, 16]}
        }))
        .unwrap();
        let g = &r.generation;
        assert_eq!(g.prompts_2.as_deref(), Some(&["c".to_string()][..]));
        assert_eq!(g.negative_prompts_2.as_ref().unwrap(), &["n1", "n2"]);
        assert_eq!(g.sizes.original_size, Some([1024, 768]));
        assert_eq!(g.sizes.target_size, Some([512, 512]));
        assert_eq!(g.sizes.crops_coords_top_left, Some([0, 16]));
        assert_eq!(g.sizes.negative_target_size, None);

        for (body, needle) in [
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1]))],
                       "parameters": {"target_size": 512}}),
                "parameter 'target_size' must hold two integers",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                    {"name": "original_size", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]}),
                "input 'original_size' must hold two integers",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                    {"name": "original_size", "datatype": "INT64", "shape": [2], "data": [1, 2]}],
                    "parameters": {"original_size": [2, 1]}}),
                "'original_size' is given both as an input",
            ),
            (
                json!({"inputs": [prompt(json!(["a", "b"]), json!([2]))],
                       "parameters": {"prompt_2": ["x", "y", "z"]}}),
                "'prompt_2' has 3 element(s)",
            ),
        ] {
            let err = decode_json(body).unwrap_err().0;
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn lora_is_an_object_or_its_json_text() {
        let with = |lora: Value| {
            decode_json(json!({"inputs": [prompt(json!(["a"]), json!([1]))],
                               "parameters": {"lora": lora}}))
        };
        let want = Some(vec![
            ("detail".to_string(), None),
            ("style".to_string(), Some(0.8)),
        ]);
        let mut object = with(json!({"style": 0.8, "detail": null}))
            .unwrap()
            .generation
            .lora;
        object.as_mut().unwrap().sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(object, want);
        let mut text = with(json!(r#"{"style": 0.8, "detail": null}"#))
            .unwrap()
            .generation
            .lora;
        text.as_mut().unwrap().sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(text, want);
        assert_eq!(with(json!({})).unwrap().generation.lora, Some(vec![]));
        for (bad, needle) in [
            (json!(["style"]), "parameter 'lora' must be an object"),
            (json!("style:0.8"), "parameter 'lora' must be an object"),
            (json!("[1]"), "parameter 'lora' must be an object"),
            (
                json!({"style": "high"}),
                "the scale of 'style' must be a finite number",
            ),
        ] {
            let err = with(bad).unwrap_err().0;
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn mlserver_string_codec_shape_and_inputs_form() {
        let r = decode_json(json!({"inputs": [
            prompt(json!([["a"], ["b"]]), json!([2, 1])),
            {"name": "num_inference_steps", "datatype": "INT32", "shape": [1], "data": [4]},
            {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": 3.0},
            {"name": "seed", "datatype": "UINT64", "shape": [2], "data": [1, 18446744073709551615u64]}
        ]}))
        .unwrap();
        assert_eq!(r.generation.prompts, ["a", "b"]);
        assert_eq!(r.generation.num_inference_steps, Some(4));
        assert_eq!(r.generation.guidance_scale, Some(3.0));
        assert_eq!(r.generation.seeds, Some(vec![1, u64::MAX]));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"inputs": []}), "missing input 'prompt'"),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                   {"name": "promt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}),
                "unknown input 'promt'",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])), prompt(json!(["b"]), json!([1]))]}),
                "input 'prompt' is given more than once",
            ),
            (
                json!({"inputs": [prompt(json!(["a", "b"]), json!([1]))]}),
                "needs 1 element(s) but data has 2",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([-1]))]}),
                "negative dimension",
            ),
            (
                json!({"inputs": [prompt(json!([1]), json!([1]))]}),
                "element 0 is not a string",
            ),
            (
                json!({"inputs": [prompt(json!(["a\u{0}b"]), json!([1]))]}),
                "NUL",
            ),
            (
                json!({"inputs": [{"name": "prompt", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
                "datatype FP32 is not allowed",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                   {"name": "num_inference_steps", "datatype": "FP32", "shape": [1], "data": [4.0]}]}),
                "input 'num_inference_steps': datatype FP32",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1]))], "parameters": {"num_inference_steps": 2.5}}),
                "parameter 'num_inference_steps' must be an integer",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                   {"name": "num_inference_steps", "datatype": "INT32", "shape": [1], "data": [4]}],
                   "parameters": {"num_inference_steps": 5}}),
                "different values",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1]))], "parameters": {"steps": 5}}),
                "unknown parameter 'steps'",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1]))], "parameters": {"seed": -1}}),
                "between 0 and 2^64-1",
            ),
            (
                json!({"inputs": [prompt(json!(["a", "b"]), json!([2]))], "parameters": {"negative_prompt": ["x", "y", "z"]}}),
                "'negative_prompt' has 3 element(s)",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                   {"name": "latents", "datatype": "FP32", "shape": [1, 4, 8], "data": [0.0]}]}),
                "input 'latents' must have shape",
            ),
            (
                json!({"inputs": [prompt(json!(["a"]), json!([1])),
                   {"name": "latents", "datatype": "FP32", "shape": [4611686018427387904i64, 4, 4611686018427387904i64, 2], "data": [0.0]}]}),
                "too large",
            ),
        ];
        for (body, expected) in cases {
            let err = decode_json(body.clone()).unwrap_err();
            assert!(
                err.0.contains(expected),
                "{body} -> {err} (expected '{expected}')"
            );
        }
    }

    #[test]
    fn passthrough_parameters_are_accepted() {
        let r = decode_json(json!({"inputs": [prompt(json!(["a"]), json!([1]))],
                              "parameters": {"content_type": "str", "headers": {"x": "y"}, "timeout": 1500}}))
        .unwrap();
        assert_eq!(r.options.timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn latents_are_flattened_row_major() {
        let r = decode_json(json!({"inputs": [prompt(json!(["a"]), json!([1])),
            {"name": "latents", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [[[[1.0, 2.0], [3.0, 4.0]]]]}]}))
        .unwrap();
        let l = r.generation.latents.unwrap();
        assert_eq!(l.shape, [1, 1, 2, 2]);
        assert_eq!(l.data, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn unknown_outputs_and_bad_timeouts_are_rejected() {
        let err = decode_json(json!({
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            "outputs": [{"name": "images"}]
        }))
        .unwrap_err();
        assert!(err.0.contains("unknown output 'images'"), "{err}");
        let err = decode_json(json!({
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            "parameters": {"timeout": -5}
        }))
        .unwrap_err();
        assert!(err.0.contains("'timeout'"), "{err}");
    }

    #[test]
    fn bytes_that_are_not_text_reach_the_contract_as_bytes() {
        let png = b"\x89PNG\r\n\x1a\n\xff".to_vec();
        let input = |name: &str| RequestInput {
            name: name.into(),
            shape: vec![1],
            datatype: Datatype::Bytes,
            parameters: None,
            data: TensorData::Bytes(vec![png.clone()]),
        };
        let request = |inputs| InferenceRequest {
            id: None,
            parameters: Parameters::new(),
            inputs,
            outputs: None,
        };
        let err = decode(&request(vec![input("prompt")])).unwrap_err();
        assert_eq!(err.0, "input 'prompt' element 0 is not valid UTF-8 text");
        // An image input keeps its bytes as they are.
        let mut inputs = vec![input("prompt")];
        inputs[0].data = TensorData::Bytes(vec![b"a cat".to_vec()]);
        inputs.push(input("image"));
        let decoded = decode(&request(inputs.clone())).unwrap();
        assert_eq!(decoded.generation.images, Some(vec![png.clone()]));
        // An input the contract does not know is refused by name, whatever its bytes.
        inputs[1].name = "picture".into();
        let err = decode(&request(inputs)).unwrap_err();
        assert!(err.0.starts_with("unknown input 'picture'"), "{err}");
    }

    #[test]
    fn base64_images_are_decoded_where_the_content_type_says_so() {
        let image = |data: &[u8], content_type: Option<&str>| {
            let mut req = json!({"inputs": [
                {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
                {"name": "image", "datatype": "BYTES", "shape": [1],
                 "data": [String::from_utf8(data.to_vec()).unwrap()]}]});
            if let Some(ct) = content_type {
                req["inputs"][1]["parameters"] = json!({"content_type": ct});
            }
            decode_json(req)
        };
        // "\x89PNG" in base64, wrapped as the base64 tool wraps lines, padding left out.
        let got = image(b"iVBO\nRw", Some("base64"))
            .unwrap()
            .generation
            .images;
        assert_eq!(got, Some(vec![b"\x89PNG".to_vec()]));
        assert_eq!(
            image(b"raw", None).unwrap().generation.images,
            Some(vec![b"raw".to_vec()])
        );
        let err = image(b"not base64!", Some("base64")).unwrap_err();
        assert!(
            err.0
                .starts_with("input 'image' element 0 is not valid base64"),
            "{err}"
        );
        let err = image(b"x", Some("pil")).unwrap_err();
        assert!(
            err.0.contains("content_type 'pil' is not supported"),
            "{err}"
        );
    }
}
