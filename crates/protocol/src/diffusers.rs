//! The diffusers request contract: which inputs and parameters a text-to-image request may
//! carry, with which datatypes and shapes (`spec/infer-contract.md`). Range checks against a
//! model's limits happen later, in the engine; this layer only decodes and type-checks.

use std::collections::HashSet;

use serde_json::Value;

use crate::v2::{Datatype, InferenceRequest, RequestInput};

/// A decoded text-to-image request. `None` means "not given": the engine fills defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffusersRequest {
    pub prompts: Vec<String>,
    /// One for all prompts, or one per prompt.
    pub negative_prompts: Option<Vec<String>>,
    pub num_inference_steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub height: Option<i64>,
    pub width: Option<i64>,
    /// One seed, or one per generated image.
    pub seeds: Option<Vec<u64>>,
    pub num_images_per_prompt: Option<i64>,
    pub scheduler: Option<String>,
    pub eta: Option<f64>,
    pub latents: Option<LatentsInput>,
    pub output_format: Option<String>,
    /// Per-request deadline in milliseconds (`parameters.timeout`).
    pub timeout_ms: Option<f64>,
    /// Preview images every this many steps (`parameters.preview_every`; stream routes only).
    pub preview_every: Option<i64>,
}

/// Explicit initial latents, `[B, C, H/f, W/f]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentsInput {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A request that breaks the contract: always a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ContractError(pub String);

fn bad(msg: impl Into<String>) -> ContractError {
    ContractError(msg.into())
}

/// Input names a request may use.
pub const INPUT_NAMES: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "num_images_per_prompt",
    "scheduler",
    "eta",
    "latents",
];

/// Request-level `parameters` keys with a meaning for generation.
pub const PARAMETER_NAMES: &[&str] = &[
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "num_images_per_prompt",
    "scheduler",
    "eta",
    "output_format",
    "timeout",
    "preview_every",
];

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

/// Most latents elements accepted (guards memory before the engine's size checks).
const MAX_LATENT_ELEMENTS: usize = 64 * 1024 * 1024;

fn element_count(input: &RequestInput) -> Result<usize, ContractError> {
    let mut n: usize = 1;
    for &d in &input.shape {
        if d < 0 {
            return Err(bad(format!(
                "input '{}': shape {:?} has a negative dimension",
                input.name, input.shape
            )));
        }
        n = n.checked_mul(d as usize).ok_or_else(|| {
            bad(format!(
                "input '{}': shape {:?} is too large",
                input.name, input.shape
            ))
        })?;
    }
    Ok(n)
}

/// Flattens nested lists (row-major); a bare scalar is a one-element tensor.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, depth: usize) -> Result<(), ContractError> {
    if depth > 32 {
        return Err(bad("tensor data is nested too deeply"));
    }
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, depth + 1)?;
            }
            Ok(())
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

fn elements(input: &RequestInput) -> Result<Vec<&Value>, ContractError> {
    let expected = element_count(input)?;
    let mut out = Vec::new();
    flatten(&input.data, &mut out, 0)?;
    if out.len() != expected {
        return Err(bad(format!(
            "input '{}': shape {:?} needs {expected} element(s) but data has {}",
            input.name,
            input.shape,
            out.len()
        )));
    }
    Ok(out)
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

fn strings(input: &RequestInput) -> Result<Vec<String>, ContractError> {
    check_datatype(input, &[Datatype::Bytes])?;
    let shape_ok = matches!(input.shape.as_slice(), [_] | [_, 1]);
    if !shape_ok {
        return Err(bad(format!(
            "input '{}': shape {:?} is not allowed; use [N] or [N, 1]",
            input.name, input.shape
        )));
    }
    elements(input)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => text(s, &format!("input '{}' element {i}", input.name)),
            _ => Err(bad(format!(
                "input '{}' element {i} is not a string",
                input.name
            ))),
        })
        .collect()
}

fn text(s: &str, what: &str) -> Result<String, ContractError> {
    if s.contains('\0') {
        return Err(bad(format!("{what} contains a NUL character")));
    }
    Ok(s.to_owned())
}

/// Exactly one element (shape `[1]`, `[1, 1]` or `[]`).
fn single(input: &RequestInput) -> Result<&Value, ContractError> {
    let els = elements(input)?;
    if els.len() != 1 {
        return Err(bad(format!(
            "input '{}' must hold exactly one value (shape [1]), got shape {:?}",
            input.name, input.shape
        )));
    }
    Ok(els[0])
}

fn as_integer(v: &Value, what: &str) -> Result<i64, ContractError> {
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

fn as_float(v: &Value, what: &str) -> Result<f64, ContractError> {
    match v.as_f64() {
        Some(f) if f.is_finite() => Ok(f),
        _ => Err(bad(format!("{what} must be a finite number, got {v}"))),
    }
}

fn as_seed(v: &Value, what: &str) -> Result<u64, ContractError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(n) = v.as_i64() {
        return Err(bad(format!("{what} must be between 0 and 2^64-1, got {n}")));
    }
    Err(bad(format!("{what} must be an integer, got {v}")))
}

fn as_text(v: &Value, what: &str) -> Result<String, ContractError> {
    match v {
        Value::String(s) => text(s, what),
        _ => Err(bad(format!("{what} must be a string, got {v}"))),
    }
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

impl DiffusersRequest {
    /// Decodes a V2 request under the diffusers contract.
    pub fn from_v2(req: &InferenceRequest) -> Result<Self, ContractError> {
        let mut seen = HashSet::new();
        for input in &req.inputs {
            if !INPUT_NAMES.contains(&input.name.as_str()) {
                return Err(bad(format!(
                    "unknown input '{}'; allowed inputs: {}",
                    input.name,
                    INPUT_NAMES.join(", ")
                )));
            }
            if !seen.insert(input.name.as_str()) {
                return Err(bad(format!(
                    "input '{}' is given more than once",
                    input.name
                )));
            }
        }
        let find = |name: &str| req.inputs.iter().find(|i| i.name == name);
        let params = req.parameters.clone().unwrap_or_default();
        for key in params.keys() {
            if !PARAMETER_NAMES.contains(&key.as_str())
                && !PASSTHROUGH_PARAMETERS.contains(&key.as_str())
            {
                return Err(bad(format!(
                    "unknown parameter '{key}'; allowed parameters: {}",
                    PARAMETER_NAMES.join(", ")
                )));
            }
        }
        let param = |name: &str| params.get(name).filter(|v| !v.is_null());

        let prompt =
            find("prompt").ok_or_else(|| bad("missing input 'prompt' (BYTES, shape [N])"))?;
        let prompts = strings(prompt)?;
        if prompts.is_empty() {
            return Err(bad("input 'prompt' must hold at least one prompt"));
        }

        let neg_input = find("negative_prompt").map(strings).transpose()?;
        let neg_param = one_or_list(param("negative_prompt"), "negative_prompt", as_text)?;
        let negative_prompts = merge("negative_prompt", neg_input, neg_param)?;
        if let Some(neg) = &negative_prompts
            && neg.len() != 1
            && neg.len() != prompts.len()
        {
            return Err(bad(format!(
                "'negative_prompt' has {} element(s); give one for all prompts or one per prompt ({})",
                neg.len(),
                prompts.len()
            )));
        }

        let int_field = |name: &str| -> Result<Option<i64>, ContractError> {
            let from_input = match find(name) {
                Some(i) => {
                    check_datatype(i, INTEGERS)?;
                    Some(as_integer(single(i)?, &format!("input '{name}'"))?)
                }
                None => None,
            };
            let from_param = param(name)
                .map(|v| as_integer(v, &format!("parameter '{name}'")))
                .transpose()?;
            merge(name, from_input, from_param)
        };
        let float_field = |name: &str| -> Result<Option<f64>, ContractError> {
            let from_input = match find(name) {
                Some(i) => {
                    check_datatype(i, FLOATS)?;
                    Some(as_float(single(i)?, &format!("input '{name}'"))?)
                }
                None => None,
            };
            let from_param = param(name)
                .map(|v| as_float(v, &format!("parameter '{name}'")))
                .transpose()?;
            merge(name, from_input, from_param)
        };

        let seeds_input = match find("seed") {
            Some(i) => {
                check_datatype(
                    i,
                    &[
                        Datatype::Int64,
                        Datatype::Uint64,
                        Datatype::Int32,
                        Datatype::Uint32,
                    ],
                )?;
                Some(
                    elements(i)?
                        .into_iter()
                        .enumerate()
                        .map(|(k, v)| as_seed(v, &format!("input 'seed' element {k}")))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            None => None,
        };
        let seeds_param = one_or_list(param("seed"), "seed", as_seed)?;
        let seeds = merge("seed", seeds_input, seeds_param)?;
        if seeds.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(bad("'seed' must hold at least one seed"));
        }

        let scheduler_input = match find("scheduler") {
            Some(i) => {
                check_datatype(i, &[Datatype::Bytes])?;
                Some(as_text(single(i)?, "input 'scheduler'")?)
            }
            None => None,
        };
        let scheduler_param = param("scheduler")
            .map(|v| as_text(v, "parameter 'scheduler'"))
            .transpose()?;
        let scheduler = merge("scheduler", scheduler_input, scheduler_param)?;

        let latents = match find("latents") {
            Some(i) => {
                check_datatype(i, &[Datatype::Fp32])?;
                if i.shape.len() != 4 {
                    return Err(bad(format!(
                        "input 'latents' must have shape [batch, channels, height/8, width/8], got {:?}",
                        i.shape
                    )));
                }
                let n = element_count(i)?;
                if n > MAX_LATENT_ELEMENTS {
                    return Err(bad(format!("input 'latents' has too many elements ({n})")));
                }
                let data = elements(i)?
                    .into_iter()
                    .enumerate()
                    .map(|(k, v)| {
                        as_float(v, &format!("input 'latents' element {k}")).map(|f| f as f32)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if data.iter().any(|f| !f.is_finite()) {
                    return Err(bad("input 'latents' holds a value outside the FP32 range"));
                }
                Some(LatentsInput {
                    shape: i.shape.iter().map(|&d| d as usize).collect(),
                    data,
                })
            }
            None => None,
        };

        let output_format = param("output_format")
            .map(|v| as_text(v, "parameter 'output_format'"))
            .transpose()?;
        let timeout_ms = param("timeout")
            .map(|v| as_float(v, "parameter 'timeout'"))
            .transpose()?;
        let preview_every = param("preview_every")
            .map(|v| as_integer(v, "parameter 'preview_every'"))
            .transpose()?;

        Ok(Self {
            prompts,
            negative_prompts,
            num_inference_steps: int_field("num_inference_steps")?,
            guidance_scale: float_field("guidance_scale")?,
            height: int_field("height")?,
            width: int_field("width")?,
            seeds,
            num_images_per_prompt: int_field("num_images_per_prompt")?,
            scheduler,
            eta: float_field("eta")?,
            latents,
            output_format,
            timeout_ms,
            preview_every,
        })
    }
}

/// The contract's inputs, as model metadata reports them.
pub fn input_metadata() -> Vec<crate::v2::MetadataTensor> {
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
    vec![
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
    ]
}

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

    fn decode(body: Value) -> Result<DiffusersRequest, ContractError> {
        let req = InferenceRequest::from_value(&body).expect("schema");
        DiffusersRequest::from_v2(&req)
    }

    fn prompt(data: Value, shape: Value) -> Value {
        json!({"name": "prompt", "datatype": "BYTES", "shape": shape, "data": data})
    }

    #[test]
    fn decodes_the_contract_example() {
        let r = decode(json!({
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
        assert_eq!(r.prompts, ["a red circle"]);
        assert_eq!(r.negative_prompts.unwrap(), ["blurry"]);
        assert_eq!(r.num_inference_steps, Some(20));
        assert_eq!(r.guidance_scale, Some(7.5));
        assert_eq!(r.seeds, Some(vec![1234]));
        assert_eq!(r.scheduler.as_deref(), Some("dpmpp_2m"));
    }

    #[test]
    fn mlserver_string_codec_shape_and_inputs_form() {
        let r = decode(json!({"inputs": [
            prompt(json!([["a"], ["b"]]), json!([2, 1])),
            {"name": "num_inference_steps", "datatype": "INT32", "shape": [1], "data": [4]},
            {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": 3.0},
            {"name": "seed", "datatype": "UINT64", "shape": [2], "data": [1, 18446744073709551615u64]}
        ]}))
        .unwrap();
        assert_eq!(r.prompts, ["a", "b"]);
        assert_eq!(r.num_inference_steps, Some(4));
        assert_eq!(r.guidance_scale, Some(3.0));
        assert_eq!(r.seeds, Some(vec![1, u64::MAX]));
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
            let err = decode(body.clone()).unwrap_err();
            assert!(
                err.0.contains(expected),
                "{body} -> {err} (expected '{expected}')"
            );
        }
    }

    #[test]
    fn passthrough_parameters_are_accepted() {
        let r = decode(json!({"inputs": [prompt(json!(["a"]), json!([1]))],
                              "parameters": {"content_type": "str", "headers": {"x": "y"}, "timeout": 1500}}))
        .unwrap();
        assert_eq!(r.timeout_ms, Some(1500.0));
    }

    #[test]
    fn latents_are_flattened_row_major() {
        let r = decode(json!({"inputs": [prompt(json!(["a"]), json!([1])),
            {"name": "latents", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [[[[1.0, 2.0], [3.0, 4.0]]]]}]}))
        .unwrap();
        let l = r.latents.unwrap();
        assert_eq!(l.shape, [1, 1, 2, 2]);
        assert_eq!(l.data, [1.0, 2.0, 3.0, 4.0]);
    }
}
