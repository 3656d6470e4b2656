//! Triton's binary tensor data extension on REST: request bodies made of a JSON header followed
//! by raw tensor bytes (`Inference-Header-Content-Length`, `parameters.binary_data_size`), raw
//! binary requests (header length 0: the whole body is the prompt), and binary outputs
//! (`binary_data` on an output, `binary_data_output` on the request).
//!
//! Binary inputs decode into the same typed request a plain JSON body does (BYTES elements
//! stay bytes), so one contract decoder gives the same answers and messages for both forms.
//! Tensor bytes are little-endian and row-major; a BYTES element is a 4-byte little-endian
//! length and its bytes.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use sdserve_protocol::raw::{self, RawError};
use sdserve_protocol::{
    Datatype, IMAGE_OUTPUT, InferenceRequest, Parameters, RequestInput, TensorData,
};
use sdserve_serving::{Generated, ServeError};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::response;

/// The name `GET /v2` reports for this extension.
pub const EXTENSION: &str = "binary_tensor_data";
/// Length of the JSON header at the start of a binary body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// Content type of binary responses, as Triton sends them.
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// A request body read as a V2 request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub request: InferenceRequest,
    /// Whether the image output goes back as binary data.
    pub binary_output: bool,
}

/// `Inference-Header-Content-Length`, if the request has it.
pub fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "header Inference-Header-Content-Length is {:?}; it must be a non-negative integer (the length of the JSON header in bytes)",
                String::from_utf8_lossy(value.as_bytes())
            ))
        })
}

/// Reads a (decompressed) infer body: plain JSON when `header_length` is `None`, a JSON header
/// of that many bytes followed by tensor bytes, or (`Some(0)`) a raw binary request.
pub fn decode(header_length: Option<usize>, body: &[u8]) -> Result<Decoded, ApiError> {
    let (request, raw) = match header_length {
        None => {
            let value = parse_json(body)?;
            if let Some(name) = binary_inputs(&value).next() {
                return Err(ApiError::bad_request(format!(
                    "input '{name}' has parameters.binary_data_size, but the request has no Inference-Header-Content-Length header"
                )));
            }
            (InferenceRequest::from_value(&value)?, false)
        }
        Some(0) => (raw_request(body)?, true),
        Some(n) if n > body.len() => {
            return Err(ApiError::bad_request(format!(
                "header Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => {
            let (header, tensors) = body.split_at(n);
            let mut value = parse_json(header)?;
            let attached = detach_tensors(&mut value, tensors)?;
            (InferenceRequest::from_json(&value, attached)?, false)
        }
    };
    let binary_output = raw || wants_binary_output(&request, header_length.is_some())?;
    Ok(Decoded {
        request,
        binary_output,
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::schema(&[sdserve_protocol::schema::json_error(&e, bytes)]))
}

fn input_name(input: &Map<String, Value>) -> String {
    input
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

/// Names of the inputs that declare `binary_data_size`.
fn binary_inputs(request: &Value) -> impl Iterator<Item = String> + '_ {
    request
        .get("inputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .filter(|i| {
            i.get("parameters")
                .and_then(|p| p.get("binary_data_size"))
                .is_some()
        })
        .map(input_name)
}

/// Cuts the data of every input that declares `binary_data_size` from `tensors`, in input
/// order (every byte must belong to exactly one input), keyed by the input's index; the
/// parameter itself is removed.
fn detach_tensors(
    request: &mut Value,
    tensors: &[u8],
) -> Result<BTreeMap<usize, TensorData>, ApiError> {
    let mut rest = tensors;
    let mut attached = BTreeMap::new();
    let inputs = request.get_mut("inputs").and_then(Value::as_array_mut);
    for (index, input) in inputs.into_iter().flatten().enumerate() {
        let Some(input) = input.as_object_mut() else {
            continue;
        };
        let Some(size) = binary_data_size(input)? else {
            continue;
        };
        let name = input_name(input);
        if input.contains_key("data") {
            return Err(ApiError::bad_request(format!(
                "input '{name}' has both data and parameters.binary_data_size; give one of them"
            )));
        }
        if size > rest.len() {
            return Err(ApiError::bad_request(format!(
                "input '{name}': parameters.binary_data_size is {size}, but only {} bytes of binary data remain after the earlier inputs",
                rest.len()
            )));
        }
        let (bytes, tail) = rest.split_at(size);
        rest = tail;
        // An unknown or missing datatype is left for the schema check to report.
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .and_then(Datatype::parse);
        if let Some(d) = datatype {
            attached.insert(index, tensor_data(&name, d, bytes)?);
        }
    }
    if !rest.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the body has {} bytes after the JSON header, but the inputs' binary_data_size values account for only {}",
            tensors.len(),
            tensors.len() - rest.len()
        )));
    }
    Ok(attached)
}

/// Takes `parameters.binary_data_size` out of an input, if it has one.
fn binary_data_size(input: &mut Map<String, Value>) -> Result<Option<usize>, ApiError> {
    let name = input_name(input);
    let Some(params) = input.get_mut("parameters").and_then(Value::as_object_mut) else {
        return Ok(None);
    };
    let Some(size) = params.remove("binary_data_size") else {
        return Ok(None);
    };
    size.as_u64()
        .and_then(|s| usize::try_from(s).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "input '{name}': parameters.binary_data_size is {size}; it must be a non-negative integer"
            ))
        })
}

/// One input's tensor bytes as typed elements (flat, row-major). The element count is checked
/// against the shape later, by the contract, with the same message as for JSON data.
fn tensor_data(name: &str, d: Datatype, bytes: &[u8]) -> Result<TensorData, ApiError> {
    raw::decode(d, bytes).map_err(|e| {
        ApiError::bad_request(match e {
            RawError::PartialElement {
                len,
                datatype,
                size,
            } => format!(
                "input '{name}': parameters.binary_data_size is {len} bytes, which is not a whole number of {} elements ({size} bytes each)",
                datatype.as_str()
            ),
            e => format!("input '{name}': BYTES {e}"),
        })
    })
}

/// A raw binary request: the whole body is the one `prompt` (BYTES, shape [1]). A body that is
/// a serialised BYTES element (4-byte length prefix) is accepted too; text cannot be mistaken
/// for one, since a prompt may not contain NUL and any length below 16 MiB has a zero fourth byte.
fn raw_request(body: &[u8]) -> Result<InferenceRequest, ApiError> {
    let prompt = match body.split_first_chunk::<4>() {
        Some((len, rest)) if u32::from_le_bytes(*len) as usize == rest.len() && len[3] == 0 => rest,
        _ => body,
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "raw binary request (Inference-Header-Content-Length: 0): the body must be the prompt, but it is empty",
        ));
    }
    Ok(InferenceRequest {
        id: None,
        parameters: Parameters::new(),
        inputs: vec![RequestInput {
            name: "prompt".into(),
            shape: vec![1],
            datatype: Datatype::Bytes,
            parameters: None,
            data: TensorData::Bytes(vec![prompt.to_vec()]),
        }],
        outputs: None,
    })
}

fn flag(value: Option<&Value>, what: &str) -> Result<Option<bool>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{what} is {other}; it must be true or false"
        ))),
    }
}

/// Triton's rule: `binary_data` on the output wins over the request's `binary_data_output`.
/// The request-level flag counts only when the body uses the extension's framing
/// (`framed`): tritonclient sets it on every request that names no outputs, and MLServer,
/// which ignores it, answers such JSON requests in JSON (`mlserver infer` relies on that).
fn wants_binary_output(request: &InferenceRequest, framed: bool) -> Result<bool, ApiError> {
    let default = flag(
        request.parameters.get("binary_data_output"),
        "parameter 'binary_data_output'",
    )?;
    let mut chosen = None;
    for output in request.outputs.iter().flatten() {
        let own = flag(
            output
                .parameters
                .as_ref()
                .and_then(|p| p.get("binary_data")),
            &format!("output '{}': parameter 'binary_data'", output.name),
        )?;
        if output.name == IMAGE_OUTPUT {
            chosen = own;
        }
    }
    Ok(chosen.or(default.filter(|_| framed)).unwrap_or(false))
}

/// A binary response body and the length of its JSON header.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryBody {
    pub bytes: Vec<u8>,
    pub header_length: usize,
}

/// The response of a finished request with the image output in binary: the JSON header (the
/// output has `binary_data_size` and no `data`), then one serialised BYTES element per PNG.
pub fn encode_response(generated: &Generated) -> Result<BinaryBody, ServeError> {
    let tensor = raw::join_bytes(generated.pngs())
        .map_err(|e| ServeError::internal("response", e.to_string()))?;
    let mut params = Parameters::new();
    params.insert("binary_data_size".into(), json!(tensor.len()));
    let response = response::image_response(generated, Value::Null, params);
    let mut bytes = serde_json::to_vec(&response)
        .map_err(|e| ServeError::internal("response", format!("response encoding failed: {e}")))?;
    let header_length = bytes.len();
    bytes.extend_from_slice(&tensor);
    Ok(BinaryBody {
        bytes,
        header_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_protocol::diffusers;
    use sdserve_protocol::raw::{f16_to_f32, join_bytes, split_bytes};

    /// Decodes a body and checks it against the contract, as the handler does.
    fn decode_and_check(header_length: Option<usize>, body: &[u8]) -> Result<Decoded, ApiError> {
        let d = decode(header_length, body)?;
        diffusers::decode(&d.request).map_err(|e| ApiError::bad_request(e.0))?;
        Ok(d)
    }

    fn bytes_tensor(items: &[&[u8]]) -> Vec<u8> {
        join_bytes(items.iter().copied()).unwrap()
    }

    fn body(header: &Value, tensors: &[u8]) -> (usize, Vec<u8>) {
        let mut b = header.to_string().into_bytes();
        let n = b.len();
        b.extend_from_slice(tensors);
        (n, b)
    }

    fn tritonclient_style(steps: i64) -> (usize, Vec<u8>) {
        let prompt = bytes_tensor(&[b"a red circle"]);
        let mut tensors = prompt.clone();
        tensors.extend_from_slice(&steps.to_le_bytes());
        body(
            &json!({"inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": prompt.len()}},
                {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}}
            ], "outputs": [{"name": "image", "parameters": {"binary_data": true}}]}),
            &tensors,
        )
    }

    #[test]
    fn binary_inputs_become_json_data() {
        let (n, b) = tritonclient_style(3);
        let d = decode(Some(n), &b).unwrap();
        assert!(d.binary_output);
        assert_eq!(
            d.request.inputs[0].data,
            TensorData::Bytes(vec![b"a red circle".to_vec()])
        );
        assert_eq!(d.request.inputs[1].data, TensorData::Int(vec![3]));
        assert_eq!(d.request.inputs[0].parameters, Some(Parameters::new()));
        let decoded = diffusers::decode(&d.request).unwrap();
        assert_eq!(decoded.generation.num_inference_steps, Some(3));
    }

    #[test]
    fn every_fixed_size_datatype_decodes_little_endian() {
        let cases: Vec<(&str, Vec<u8>, TensorData)> = vec![
            ("BOOL", vec![1, 0], TensorData::Bool(vec![true, false])),
            ("UINT8", vec![255], TensorData::Int(vec![255])),
            ("INT8", vec![255], TensorData::Int(vec![-1])),
            (
                "INT16",
                (-2i16).to_le_bytes().to_vec(),
                TensorData::Int(vec![-2]),
            ),
            (
                "UINT16",
                513u16.to_le_bytes().to_vec(),
                TensorData::Int(vec![513]),
            ),
            (
                "INT32",
                (-70000i32).to_le_bytes().to_vec(),
                TensorData::Int(vec![-70000]),
            ),
            (
                "UINT32",
                u32::MAX.to_le_bytes().to_vec(),
                TensorData::Int(vec![u32::MAX.into()]),
            ),
            (
                "UINT64",
                u64::MAX.to_le_bytes().to_vec(),
                TensorData::Int(vec![u64::MAX.into()]),
            ),
            (
                "FP16",
                0x3e00u16.to_le_bytes().to_vec(),
                TensorData::Float(vec![1.5]),
            ),
            (
                "FP32",
                [0.25f32, -2.0]
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect(),
                TensorData::Float(vec![0.25, -2.0]),
            ),
            (
                "FP64",
                0.1f64.to_le_bytes().to_vec(),
                TensorData::Float(vec![0.1]),
            ),
        ];
        for (dt, tensor, expected) in cases {
            let (n, b) = body(
                &json!({"inputs": [{"name": "x", "shape": [-1], "datatype": dt, "parameters": {"binary_data_size": tensor.len()}}]}),
                &tensor,
            );
            let d = decode(Some(n), &b).unwrap_or_else(|e| panic!("{dt}: {}", e.message));
            assert_eq!(d.request.inputs[0].data, expected, "{dt}");
            assert!(!d.binary_output);
        }
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn json_only_bodies_and_output_flags() {
        let plain = json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]});
        let d = decode(None, plain.to_string().as_bytes()).unwrap();
        assert!(!d.binary_output);
        // A header that covers the whole body is a JSON request with no binary inputs.
        let text = plain.to_string();
        assert!(
            !decode(Some(text.len()), text.as_bytes())
                .unwrap()
                .binary_output
        );

        // `framed`: sent with Inference-Header-Content-Length (here covering the whole body).
        let with = |framed: bool, params: Value, outputs: Value| {
            let mut v = plain.clone();
            v["parameters"] = params;
            v["outputs"] = outputs;
            let text = v.to_string();
            decode(framed.then_some(text.len()), text.as_bytes()).map(|d| d.binary_output)
        };
        let request_flag = json!({"binary_data_output": true});
        assert_eq!(with(true, request_flag.clone(), Value::Null), Ok(true));
        assert_eq!(
            with(true, request_flag.clone(), json!([{"name": "image"}])),
            Ok(true)
        );
        // A plain JSON body: MLServer's answer (JSON), whatever tritonclient added.
        assert_eq!(with(false, request_flag.clone(), Value::Null), Ok(false));
        for framed in [true, false] {
            assert_eq!(
                with(
                    framed,
                    request_flag.clone(),
                    json!([{"name": "image", "parameters": {"binary_data": false}}])
                ),
                Ok(false)
            );
            assert_eq!(
                with(
                    framed,
                    json!({}),
                    json!([{"name": "image", "parameters": {"binary_data": true}}])
                ),
                Ok(true)
            );
            let e = with(framed, json!({"binary_data_output": "yes"}), Value::Null).unwrap_err();
            assert!(e.message.contains("'binary_data_output'"), "{}", e.message);
        }
        let e = with(
            false,
            json!({}),
            json!([{"name": "image", "parameters": {"binary_data": 1}}]),
        )
        .unwrap_err();
        assert!(e.message.contains("output 'image'"), "{}", e.message);
    }

    #[test]
    fn malformed_bodies_are_400s_naming_the_input() {
        let prompt = |size: Value| json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]});
        let steps = |size: usize| {
            json!({"inputs": [{"name": "num_inference_steps", "shape": [1], "datatype": "INT64",
                               "parameters": {"binary_data_size": size}}]})
        };
        let mut huge = vec![0xff, 0xff, 0xff, 0x7f];
        huge.extend_from_slice(b"abc");
        let cases: Vec<(Value, Vec<u8>, &str)> = vec![
            (
                prompt(json!(100)),
                bytes_tensor(&[b"abc"]),
                "input 'prompt': parameters.binary_data_size is 100",
            ),
            (
                prompt(json!(7)),
                [bytes_tensor(&[b"abc"]), vec![9, 9]].concat(),
                "account for only 7",
            ),
            (
                prompt(json!(-1)),
                Vec::new(),
                "input 'prompt': parameters.binary_data_size is -1",
            ),
            (
                prompt(json!(7)),
                huge,
                "input 'prompt': BYTES element 0 declares 2147483647 bytes",
            ),
            (
                prompt(json!(2)),
                vec![1, 0],
                "input 'prompt': BYTES element 0 has a truncated",
            ),
            (
                prompt(json!(5)),
                vec![1, 0, 0, 0, 0xff],
                "input 'prompt' element 0 is not valid UTF-8",
            ),
            (
                steps(7),
                vec![0; 7],
                "input 'num_inference_steps': parameters.binary_data_size is 7 bytes",
            ),
            (
                json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                                  {"name": "guidance_scale", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}),
                f32::NAN.to_le_bytes().to_vec(),
                "input 'guidance_scale' element 0 is NaN",
            ),
            (
                json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"],
                                   "parameters": {"binary_data_size": 0}}]}),
                Vec::new(),
                "has both data and parameters.binary_data_size",
            ),
            (
                json!({"inputs": []}),
                vec![1, 2, 3],
                "the body has 3 bytes after the JSON header",
            ),
        ];
        for (header, tensors, needle) in cases {
            let (n, b) = body(&header, &tensors);
            let e = decode_and_check(Some(n), &b).unwrap_err();
            assert_eq!(e.status, 400, "{header}: {}", e.message);
            assert!(
                e.message.contains(needle),
                "{header}: {:?} lacks {needle:?}",
                e.message
            );
        }
        let e = decode(Some(1000), b"{}").unwrap_err();
        assert!(
            e.message.contains("is 1000, but the body has only 2 bytes"),
            "{}",
            e.message
        );
        let e = decode(None, prompt(json!(3)).to_string().as_bytes()).unwrap_err();
        assert!(
            e.message
                .contains("input 'prompt' has parameters.binary_data_size, but"),
            "{}",
            e.message
        );
        // Not JSON, or not a V2 request: the 422 layer, as for plain bodies.
        assert_eq!(decode(Some(3), b"{x}abc").unwrap_err().status, 422);
        let (n, b) = body(
            &json!({"inputs": [{"name": "p", "parameters": {"binary_data_size": 0}}]}),
            &[],
        );
        assert_eq!(decode(Some(n), &b).unwrap_err().status, 422);
    }

    #[test]
    fn raw_binary_requests_carry_one_prompt() {
        for body in [b"a red circle".to_vec(), bytes_tensor(&[b"a red circle"])] {
            let d = decode(Some(0), &body).unwrap();
            assert!(d.binary_output);
            assert_eq!(d.request.inputs[0].name, "prompt");
            assert_eq!(
                d.request.inputs[0].data,
                TensorData::Bytes(vec![b"a red circle".to_vec()])
            );
        }
        assert!(decode(Some(0), b"").unwrap_err().message.contains("empty"));
        assert!(
            decode_and_check(Some(0), &[0xc3])
                .unwrap_err()
                .message
                .contains("not valid UTF-8")
        );
    }

    #[test]
    fn header_length_must_be_a_number() {
        let mut h = HeaderMap::new();
        assert_eq!(header_length(&h).unwrap(), None);
        h.insert(HEADER_LENGTH, " 12 ".parse().unwrap());
        assert_eq!(header_length(&h).unwrap(), Some(12));
        h.insert(HEADER_LENGTH, "-1".parse().unwrap());
        assert!(header_length(&h).unwrap_err().message.contains("\"-1\""));
    }

    #[test]
    fn bytes_elements_round_trip() {
        let joined = join_bytes([b"".as_slice(), b"\x89PNG", b"xy"]).unwrap();
        assert_eq!(&joined[..4], &[0, 0, 0, 0]);
        assert_eq!(&joined[4..8], &[4, 0, 0, 0]);
        assert_eq!(
            split_bytes(&joined).unwrap(),
            [b"".as_slice(), b"\x89PNG", b"xy"]
        );
    }
}
