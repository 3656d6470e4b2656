//! gRPC messages ⇄ the V2 types of `sdserve-protocol`. Pure functions.
//!
//! A `ModelInferRequest` becomes the same typed [`InferenceRequest`] a JSON body would (BYTES
//! contents stay bytes), so REST and gRPC share one contract decoder and give the same answers
//! (and messages) for the same request.

use std::collections::HashMap;

use bytes::Bytes;
use sdserve_protocol::raw::{self, RawError};
use sdserve_protocol::{
    Datatype, IMAGE_OUTPUT, InferenceRequest, Parameters, RequestInput, RequestOutput, TensorData,
};
use sdserve_serving::{Generated, ServeError};
use serde_json::{Number, Value};

use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::model_infer_request::InferInputTensor;
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};

/// A request that cannot be read as a V2 request; always INVALID_ARGUMENT, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError(pub String);

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConvertError {}

fn bad(msg: impl Into<String>) -> ConvertError {
    ConvertError(msg.into())
}

/// A request in V2 form, and whether its inputs came as `raw_input_contents` (then the answer
/// uses `raw_output_contents`, as MLServer and Triton do).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub request: InferenceRequest,
    pub raw: bool,
}

/// One gRPC parameter as the JSON value a REST client would have sent. An unset value is
/// `null`, which the contract treats as absent.
pub fn parameter_value(p: &InferParameter, what: &str) -> Result<Value, ConvertError> {
    Ok(match &p.parameter_choice {
        None => Value::Null,
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
        Some(ParameterChoice::DoubleParam(d)) => Number::from_f64(*d)
            .map(Value::Number)
            .ok_or_else(|| bad(format!("{what} is {d}, which is not a finite number")))?,
    })
}

/// A gRPC parameter map as a V2 `parameters` object (`None` when empty).
pub fn parameters_in(
    map: &HashMap<String, InferParameter>,
    whose: &str,
) -> Result<Option<Parameters>, ConvertError> {
    if map.is_empty() {
        return Ok(None);
    }
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut out = Parameters::new();
    for k in keys {
        out.insert(
            k.clone(),
            parameter_value(&map[k], &format!("{whose} parameter '{k}'"))?,
        );
    }
    Ok(Some(out))
}

/// A JSON value as a gRPC parameter: booleans, integers, floats and strings map to their own
/// kinds (integers above `i64::MAX` to `uint64_param`, other numbers to `double_param`);
/// arrays and objects (such as `seeds`) become their JSON text in `string_param`.
pub fn parameter_out(v: &Value) -> Option<InferParameter> {
    let choice = match v {
        Value::Null => return None,
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ParameterChoice::Int64Param(i)
            } else if let Some(u) = n.as_u64() {
                ParameterChoice::Uint64Param(u)
            } else {
                ParameterChoice::DoubleParam(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Array(_) | Value::Object(_) => ParameterChoice::StringParam(v.to_string()),
    };
    Some(InferParameter {
        parameter_choice: Some(choice),
    })
}

/// A V2 `parameters` object as a gRPC parameter map.
pub fn parameters_out(p: &Parameters) -> HashMap<String, InferParameter> {
    p.iter()
        .filter_map(|(k, v)| parameter_out(v).map(|p| (k.clone(), p)))
        .collect()
}

fn element_count(input: &InferInputTensor) -> Result<usize, ConvertError> {
    input.shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| {
            bad(format!(
                "input '{}': shape {:?} has a negative dimension",
                input.name, input.shape
            ))
        })?;
        n.checked_mul(d).ok_or_else(|| {
            bad(format!(
                "input '{}': shape {:?} is too large",
                input.name, input.shape
            ))
        })
    })
}

/// Raw tensor bytes of input `name` that cannot be read.
fn raw_error(name: &str, e: RawError) -> ConvertError {
    bad(format!("input '{name}': raw BYTES contents: {e}"))
}

/// The typed-contents field a datatype uses, and how many elements each field holds.
fn contents_field(d: Datatype) -> &'static str {
    match d {
        Datatype::Bool => "bool_contents",
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => "int_contents",
        Datatype::Int64 => "int64_contents",
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => "uint_contents",
        Datatype::Uint64 => "uint64_contents",
        Datatype::Fp32 => "fp32_contents",
        Datatype::Fp64 => "fp64_contents",
        Datatype::Bytes => "bytes_contents",
        Datatype::Fp16 => "raw_input_contents",
    }
}

fn filled_fields(c: &InferTensorContents) -> Vec<&'static str> {
    let fields = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    fields
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(f, _)| *f)
        .collect()
}

/// Elements of typed `contents`, from the one field the datatype allows.
fn from_contents(input: &InferInputTensor, d: Datatype) -> Result<TensorData, ConvertError> {
    let Some(c) = &input.contents else {
        return Ok(TensorData::empty(d));
    };
    let field = contents_field(d);
    if let Some(other) = filled_fields(c).into_iter().find(|f| *f != field) {
        return Err(bad(format!(
            "input '{}': datatype {} takes its data in {field}, but {other} is set",
            input.name,
            d.as_str()
        )));
    }
    let ints = |v: &[i64]| TensorData::Int(v.iter().map(|&x| i128::from(x)).collect());
    Ok(match d {
        Datatype::Bool => TensorData::Bool(c.bool_contents.clone()),
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => {
            TensorData::Int(c.int_contents.iter().map(|&x| i128::from(x)).collect())
        }
        Datatype::Int64 => ints(&c.int64_contents),
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => {
            TensorData::Int(c.uint_contents.iter().map(|&x| i128::from(x)).collect())
        }
        Datatype::Uint64 => {
            TensorData::Int(c.uint64_contents.iter().map(|&x| i128::from(x)).collect())
        }
        Datatype::Fp32 => {
            TensorData::Float(c.fp32_contents.iter().map(|&x| f64::from(x)).collect())
        }
        Datatype::Fp64 => TensorData::Float(c.fp64_contents.clone()),
        Datatype::Bytes => TensorData::Bytes(c.bytes_contents.iter().map(|b| b.to_vec()).collect()),
        Datatype::Fp16 => {
            return Err(bad(format!(
                "input '{}': FP16 data can only be sent in raw_input_contents",
                input.name
            )));
        }
    })
}

/// Elements of one `raw_input_contents` entry; fixed-size data must fill the input's shape.
fn from_raw(input: &InferInputTensor, d: Datatype, raw: &[u8]) -> Result<TensorData, ConvertError> {
    let name = &input.name;
    if let Some(size) = raw::element_size(d) {
        let count = element_count(input)?;
        if Some(raw.len()) != count.checked_mul(size) {
            return Err(bad(format!(
                "input '{name}': raw contents hold {} bytes, but shape {:?} of {} needs {count} × {size}",
                raw.len(),
                input.shape,
                d.as_str()
            )));
        }
    }
    raw::decode(d, raw).map_err(|e| raw_error(name, e))
}

fn datatype(input: &InferInputTensor) -> Result<Datatype, ConvertError> {
    Datatype::parse(&input.datatype).ok_or_else(|| {
        let all: Vec<&str> = Datatype::ALL.iter().map(|d| d.as_str()).collect();
        bad(format!(
            "input '{}': unknown datatype '{}'; use one of {}",
            input.name,
            input.datatype,
            all.join(", ")
        ))
    })
}

/// Reads a `ModelInferRequest` as a V2 request. Typed contents and raw contents may not be
/// mixed; raw contents need one entry per input.
pub fn to_inference_request(req: &ModelInferRequest) -> Result<Decoded, ConvertError> {
    let raw = !req.raw_input_contents.is_empty();
    if raw {
        if req.raw_input_contents.len() != req.inputs.len() {
            return Err(bad(format!(
                "raw_input_contents has {} entries but the request has {} inputs; give one entry per input, in input order",
                req.raw_input_contents.len(),
                req.inputs.len()
            )));
        }
        if let Some(i) = req.inputs.iter().find(|i| {
            i.contents
                .as_ref()
                .is_some_and(|c| !filled_fields(c).is_empty())
        }) {
            return Err(bad(format!(
                "input '{}' has contents, but the request uses raw_input_contents; use one form for all inputs",
                i.name
            )));
        }
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (k, input) in req.inputs.iter().enumerate() {
        let d = datatype(input)?;
        let data = match raw {
            true => from_raw(input, d, &req.raw_input_contents[k])?,
            false => from_contents(input, d)?,
        };
        inputs.push(RequestInput {
            name: input.name.clone(),
            shape: input.shape.clone(),
            datatype: d,
            parameters: parameters_in(&input.parameters, &format!("input '{}'", input.name))?,
            data,
        });
    }
    let outputs = if req.outputs.is_empty() {
        None
    } else {
        Some(
            req.outputs
                .iter()
                .map(|o| {
                    Ok(RequestOutput {
                        name: o.name.clone(),
                        parameters: parameters_in(&o.parameters, &format!("output '{}'", o.name))?,
                    })
                })
                .collect::<Result<Vec<_>, ConvertError>>()?,
        )
    };
    let request = InferenceRequest {
        id: Some(req.id.clone()).filter(|s| !s.is_empty()),
        parameters: parameters_in(&req.parameters, "request")?.unwrap_or_default(),
        inputs,
        outputs,
    };
    Ok(Decoded { request, raw })
}

/// PNG files as one BYTES output of shape `[N, 1]`: the files in `contents.bytes_contents`, or
/// (`raw`) in the returned `raw_output_contents` entry.
pub fn png_output<'a>(
    name: &str,
    pngs: impl ExactSizeIterator<Item = &'a [u8]>,
    raw: bool,
) -> Result<(InferOutputTensor, Option<Bytes>), ServeError> {
    let shape = vec![pngs.len() as i64, 1];
    let (contents, raw_contents) = if raw {
        let joined =
            raw::join_bytes(pngs).map_err(|e| ServeError::internal("response", e.to_string()))?;
        (None, Some(Bytes::from(joined)))
    } else {
        (
            Some(InferTensorContents {
                bytes_contents: pngs.map(Bytes::copy_from_slice).collect(),
                ..Default::default()
            }),
            None,
        )
    };
    let tensor = InferOutputTensor {
        name: name.into(),
        datatype: Datatype::Bytes.as_str().into(),
        shape,
        parameters: HashMap::new(),
        contents,
    };
    Ok((tensor, raw_contents))
}

/// The answer to a finished request: one BYTES element per image holding the PNG file itself
/// (see [`png_output`]); the effective settings in `parameters`, as over REST.
pub fn to_infer_response(
    generated: &Generated,
    raw: bool,
) -> Result<ModelInferResponse, ServeError> {
    let pngs: Vec<&[u8]> = generated.pngs().collect();
    let (output, raw_contents) = png_output(IMAGE_OUTPUT, pngs.into_iter(), raw)?;
    Ok(ModelInferResponse {
        model_name: generated.model.clone(),
        model_version: generated.model_version().unwrap_or_default().to_owned(),
        id: generated.id.clone(),
        parameters: parameters_out(&generated.parameters()),
        outputs: vec![output],
        raw_output_contents: raw_contents.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::model_infer_request::InferRequestedOutputTensor;
    use sdserve_protocol::diffusers;
    use serde_json::json;

    fn join_bytes_elements<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
        raw::join_bytes(elements).unwrap().into()
    }

    fn split_bytes_elements(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
        raw::split_bytes(raw).map_err(|e| e.to_string())
    }

    fn param(c: ParameterChoice) -> InferParameter {
        InferParameter {
            parameter_choice: Some(c),
        }
    }

    fn prompt_tensor(contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: "prompt".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            parameters: HashMap::from([(
                "content_type".into(),
                param(ParameterChoice::StringParam("str".into())),
            )]),
            contents,
        }
    }

    #[test]
    fn typed_contents_become_the_rest_request() {
        let req = ModelInferRequest {
            model_name: "m".into(),
            id: "req-1".into(),
            parameters: HashMap::from([
                (
                    "num_inference_steps".into(),
                    param(ParameterChoice::Int64Param(4)),
                ),
                (
                    "guidance_scale".into(),
                    param(ParameterChoice::DoubleParam(7.5)),
                ),
                ("seed".into(), param(ParameterChoice::Uint64Param(u64::MAX))),
                (
                    "scheduler".into(),
                    param(ParameterChoice::StringParam("ddim".into())),
                ),
            ]),
            inputs: vec![
                prompt_tensor(Some(InferTensorContents {
                    bytes_contents: vec![Bytes::from_static("a red circle".as_bytes())],
                    ..Default::default()
                })),
                InferInputTensor {
                    name: "height".into(),
                    datatype: "INT32".into(),
                    shape: vec![1],
                    contents: Some(InferTensorContents {
                        int_contents: vec![64],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            outputs: vec![InferRequestedOutputTensor {
                name: "image".into(),
                parameters: HashMap::new(),
            }],
            ..Default::default()
        };
        let d = to_inference_request(&req).unwrap();
        assert!(!d.raw);
        let rest = InferenceRequest::from_value(&json!({
            "id": "req-1",
            "parameters": {"guidance_scale": 7.5, "num_inference_steps": 4, "scheduler": "ddim",
                           "seed": 18446744073709551615u64},
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "str"},
                 "data": ["a red circle"]},
                {"name": "height", "shape": [1], "datatype": "INT32", "data": [64]}
            ],
            "outputs": [{"name": "image"}]
        }))
        .unwrap();
        assert_eq!(d.request, rest);
        let g = diffusers::decode(&d.request).unwrap().generation;
        assert_eq!(g.prompts, ["a red circle"]);
        assert_eq!(g.seeds, Some(vec![u64::MAX]));
    }

    #[test]
    fn raw_contents_are_little_endian_and_length_prefixed() {
        let mut latents = Vec::new();
        for f in [1.5f32, -2.0, 0.25, 4.0] {
            latents.extend_from_slice(&f.to_le_bytes());
        }
        let req = ModelInferRequest {
            inputs: vec![
                InferInputTensor {
                    name: "prompt".into(),
                    datatype: "BYTES".into(),
                    shape: vec![2],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "seed".into(),
                    datatype: "UINT64".into(),
                    shape: vec![1],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "latents".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 1, 2, 2],
                    ..Default::default()
                },
                InferInputTensor {
                    name: "eta".into(),
                    datatype: "FP16".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_input_contents: vec![
                join_bytes_elements([&b"a"[..], "é".as_bytes()]),
                Bytes::copy_from_slice(&7u64.to_le_bytes()),
                Bytes::from(latents),
                Bytes::copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes()),
            ],
            ..Default::default()
        };
        let d = to_inference_request(&req).unwrap();
        assert!(d.raw);
        let data: Vec<&TensorData> = d.request.inputs.iter().map(|i| &i.data).collect();
        assert_eq!(
            data,
            [
                &TensorData::Bytes(vec![b"a".to_vec(), "é".as_bytes().to_vec()]),
                &TensorData::Int(vec![7]),
                &TensorData::Float(vec![1.5, -2.0, 0.25, 4.0]),
                &TensorData::Float(vec![0.5])
            ]
        );
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let base = || ModelInferRequest {
            inputs: vec![prompt_tensor(None)],
            ..Default::default()
        };
        let mut r = base();
        r.raw_input_contents = vec![Bytes::new(), Bytes::new()];
        assert!(
            to_inference_request(&r)
                .unwrap_err()
                .0
                .contains("raw_input_contents has 2 entries but the request has 1 inputs")
        );

        let mut r = base();
        r.inputs[0].datatype = "STRING".into();
        assert!(
            to_inference_request(&r)
                .unwrap_err()
                .0
                .contains("input 'prompt': unknown datatype 'STRING'")
        );

        let mut r = base();
        r.inputs[0].contents = Some(InferTensorContents {
            int64_contents: vec![1],
            ..Default::default()
        });
        assert!(
            to_inference_request(&r)
                .unwrap_err()
                .0
                .contains("takes its data in bytes_contents, but int64_contents is set")
        );

        // Bytes reach the contract as bytes; it names the input that is not text.
        let mut r = base();
        r.inputs[0].contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::from_static(&[0xff])],
            ..Default::default()
        });
        let d = to_inference_request(&r).unwrap();
        assert!(
            diffusers::decode(&d.request)
                .unwrap_err()
                .0
                .contains("input 'prompt' element 0 is not valid UTF-8")
        );

        let mut r = base();
        r.raw_input_contents = vec![Bytes::from_static(&[5, 0, 0, 0, b'a'])];
        assert!(
            to_inference_request(&r)
                .unwrap_err()
                .0
                .contains("element 0 declares 5 bytes but only 1 remain")
        );

        let mut r = base();
        r.inputs.push(InferInputTensor {
            name: "seed".into(),
            datatype: "INT64".into(),
            shape: vec![2],
            ..Default::default()
        });
        r.raw_input_contents = vec![
            join_bytes_elements([&b"a"[..]]),
            Bytes::from_static(&[0; 8]),
        ];
        assert!(to_inference_request(&r).unwrap_err().0.contains(
            "input 'seed': raw contents hold 8 bytes, but shape [2] of INT64 needs 2 × 8"
        ));

        let mut r = base();
        r.inputs[0].contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"a")],
            ..Default::default()
        });
        r.parameters.insert(
            "guidance_scale".into(),
            param(ParameterChoice::DoubleParam(f64::NAN)),
        );
        assert!(
            to_inference_request(&r)
                .unwrap_err()
                .0
                .contains("request parameter 'guidance_scale' is NaN")
        );
    }

    #[test]
    fn parameters_out_keeps_kinds_and_writes_arrays_as_json() {
        let p = parameters_out(
            json!({"seeds": [1, 18446744073709551615u64], "steps": 4, "scale": 7.5, "name": "pndm", "ok": true, "big": 18446744073709551615u64})
                .as_object()
                .unwrap(),
        );
        let choice = |k: &str| p[k].parameter_choice.clone().unwrap();
        assert_eq!(
            choice("seeds"),
            ParameterChoice::StringParam("[1,18446744073709551615]".into())
        );
        assert_eq!(choice("steps"), ParameterChoice::Int64Param(4));
        assert_eq!(choice("scale"), ParameterChoice::DoubleParam(7.5));
        assert_eq!(choice("name"), ParameterChoice::StringParam("pndm".into()));
        assert_eq!(choice("ok"), ParameterChoice::BoolParam(true));
        assert_eq!(choice("big"), ParameterChoice::Uint64Param(u64::MAX));
    }

    #[test]
    fn bytes_elements_round_trip() {
        let joined = join_bytes_elements([&b""[..], &b"png"[..]]);
        assert_eq!(&joined[..], &[0, 0, 0, 0, 3, 0, 0, 0, b'p', b'n', b'g']);
        assert_eq!(
            split_bytes_elements(&joined).unwrap(),
            [&b""[..], &b"png"[..]]
        );
        assert!(
            split_bytes_elements(&[1, 0])
                .unwrap_err()
                .contains("truncated")
        );
    }
}
