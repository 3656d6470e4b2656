//! Structural validation of V2 request bodies (the 422 layer).
//!
//! MLServer validates bodies with pydantic and answers 422 with FastAPI's
//! `{"detail": [{"type", "loc", "msg", "input"}]}`. We check the same schema by hand so every
//! problem is reported with its location, and never by panicking on odd JSON. A body that
//! passes becomes the typed [`InferenceRequest`]; data that cannot be read as its datatype is
//! then a [`DataError`] (the 400 layer), naming the input and element.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::tensor::{DataError, TensorData};
use crate::v2::{
    Datatype, InferenceRequest, Parameters, RepositoryIndexRequest, RequestInput, RequestOutput,
};

/// Why a body is not a usable V2 request.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Not a V2 request (422), every violation with its location.
    Schema(Vec<SchemaError>),
    /// A V2 request whose data does not fit its datatype or shape (400).
    Data(DataError),
}

impl From<DataError> for DecodeError {
    fn from(e: DataError) -> Self {
        DecodeError::Data(e)
    }
}

/// An input that passed the schema check; its data is read once the whole body has.
struct CheckedInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: Datatype,
    parameters: Option<Parameters>,
    /// `None` when the data came as binary tensor data instead.
    data: Option<&'a Value>,
}

/// One location element: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loc {
    Key(String),
    Index(usize),
}

/// One schema violation, FastAPI style.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError {
    /// FastAPI/pydantic error type, e.g. `missing`, `string_type`, `enum`, `json_invalid`.
    pub kind: &'static str,
    /// Path from the body root, always starting with `body`.
    pub loc: Vec<Loc>,
    pub msg: String,
}

impl SchemaError {
    fn new(kind: &'static str, loc: &[Loc], msg: impl Into<String>) -> Self {
        let mut full = vec![Loc::Key("body".into())];
        full.extend_from_slice(loc);
        Self {
            kind,
            loc: full,
            msg: msg.into(),
        }
    }

    /// Dotted location without the leading `body`, e.g. `inputs.0.datatype`.
    pub fn path(&self) -> String {
        let parts: Vec<String> = self
            .loc
            .iter()
            .skip(1)
            .map(|l| match l {
                Loc::Key(k) => k.clone(),
                Loc::Index(i) => i.to_string(),
            })
            .collect();
        if parts.is_empty() {
            "body".into()
        } else {
            parts.join(".")
        }
    }

    /// FastAPI's detail entry.
    pub fn to_detail(&self) -> Value {
        let loc: Vec<Value> = self
            .loc
            .iter()
            .map(|l| match l {
                Loc::Key(k) => Value::String(k.clone()),
                Loc::Index(i) => Value::from(*i),
            })
            .collect();
        serde_json::json!({"type": self.kind, "loc": loc, "msg": self.msg})
    }
}

/// A body that is not valid JSON: FastAPI's `json_invalid` at the byte offset.
pub fn json_error(err: &serde_json::Error, body: &[u8]) -> SchemaError {
    let offset = byte_offset(body, err.line(), err.column());
    SchemaError {
        kind: "json_invalid",
        loc: vec![Loc::Key("body".into()), Loc::Index(offset)],
        msg: format!("JSON decode error: {err}"),
    }
}

fn byte_offset(body: &[u8], line: usize, column: usize) -> usize {
    if line == 0 {
        return 0;
    }
    let mut current = 1;
    let mut start = 0;
    for (i, b) in body.iter().enumerate() {
        if current == line {
            break;
        }
        if *b == b'\n' {
            current += 1;
            start = i + 1;
        }
    }
    (start + column.saturating_sub(1)).min(body.len())
}

/// Human summary of a list of schema errors, for the `error` field.
pub fn summarize(errors: &[SchemaError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.path(), e.msg))
        .collect();
    format!("invalid request body: {}", parts.join("; "))
}

struct Checker {
    errors: Vec<SchemaError>,
}

impl Checker {
    fn err(&mut self, kind: &'static str, loc: &[Loc], msg: impl Into<String>) {
        self.errors.push(SchemaError::new(kind, loc, msg));
    }

    fn with(loc: &[Loc], next: Loc) -> Vec<Loc> {
        let mut v = loc.to_vec();
        v.push(next);
        v
    }

    fn object<'a>(
        &mut self,
        v: &'a Value,
        loc: &[Loc],
        what: &str,
    ) -> Option<&'a Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            _ => {
                self.err(
                    "model_attributes_type",
                    loc,
                    format!("{what} must be a JSON object"),
                );
                None
            }
        }
    }

    fn string(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        loc: &[Loc],
        required: bool,
    ) -> Option<String> {
        let at = Self::with(loc, Loc::Key(key.into()));
        match obj.get(key) {
            None | Some(Value::Null) if !required => None,
            None => {
                self.err("missing", &at, "Field required");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err("string_type", &at, "Input should be a valid string");
                None
            }
        }
    }

    fn parameters(&mut self, obj: &Map<String, Value>, loc: &[Loc]) -> Option<Parameters> {
        match obj.get("parameters") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => {
                self.err(
                    "model_attributes_type",
                    &Self::with(loc, Loc::Key("parameters".into())),
                    "parameters must be a JSON object",
                );
                None
            }
        }
    }

    /// `attached`: the input's data arrived outside the JSON (binary tensor data).
    fn input<'a>(&mut self, v: &'a Value, loc: &[Loc], attached: bool) -> Option<CheckedInput<'a>> {
        let obj = self.object(v, loc, "an input")?;
        let name = self.string(obj, "name", loc, true);
        let shape_loc = Self::with(loc, Loc::Key("shape".into()));
        let shape = match obj.get("shape") {
            None => {
                self.err("missing", &shape_loc, "Field required");
                None
            }
            Some(Value::Array(items)) => {
                let mut dims = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, d) in items.iter().enumerate() {
                    match d.as_i64() {
                        Some(n) => dims.push(n),
                        None => {
                            ok = false;
                            self.err(
                                "int_type",
                                &Self::with(&shape_loc, Loc::Index(i)),
                                "Input should be a valid integer",
                            );
                        }
                    }
                }
                ok.then_some(dims)
            }
            Some(_) => {
                self.err("list_type", &shape_loc, "Input should be a valid list");
                None
            }
        };
        let dt_loc = Self::with(loc, Loc::Key("datatype".into()));
        let datatype = match obj.get("datatype") {
            None => {
                self.err("missing", &dt_loc, "Field required");
                None
            }
            Some(Value::String(s)) => match Datatype::parse(s) {
                Some(d) => Some(d),
                None => {
                    let allowed: Vec<&str> = Datatype::ALL.iter().map(|d| d.as_str()).collect();
                    self.err(
                        "enum",
                        &dt_loc,
                        format!("Input should be {} (got '{s}')", allowed.join(", ")),
                    );
                    None
                }
            },
            Some(_) => {
                self.err("string_type", &dt_loc, "Input should be a valid string");
                None
            }
        };
        let parameters = self.parameters(obj, loc);
        let data = match obj.get("data") {
            None if attached => Some(None),
            None => {
                self.err(
                    "missing",
                    &Self::with(loc, Loc::Key("data".into())),
                    "Field required",
                );
                None
            }
            Some(d) => Some(Some(d)),
        };
        Some(CheckedInput {
            name: name?,
            shape: shape?,
            datatype: datatype?,
            parameters,
            data: data?,
        })
    }

    fn output(&mut self, v: &Value, loc: &[Loc]) -> Option<RequestOutput> {
        let obj = self.object(v, loc, "an output")?;
        let name = self.string(obj, "name", loc, true);
        let parameters = self.parameters(obj, loc);
        Some(RequestOutput {
            name: name?,
            parameters,
        })
    }
}

impl InferenceRequest {
    /// Checks the V2 schema (every violation is reported, not only the first), then reads
    /// each input's data as its datatype.
    pub fn from_value(v: &Value) -> Result<Self, DecodeError> {
        Self::from_json(v, BTreeMap::new())
    }

    /// As [`InferenceRequest::from_value`], where the inputs at the keys of `attached` carry
    /// no JSON `data`: their elements came as binary tensor data.
    pub fn from_json(
        v: &Value,
        mut attached: BTreeMap<usize, TensorData>,
    ) -> Result<Self, DecodeError> {
        let mut c = Checker { errors: Vec::new() };
        let Some(obj) = c.object(v, &[], "the request body") else {
            return Err(DecodeError::Schema(c.errors));
        };
        let id = c.string(obj, "id", &[], false);
        let parameters = c.parameters(obj, &[]);
        let inputs = c.inputs(obj, &attached);
        let outputs = c.outputs(obj);
        if !c.errors.is_empty() {
            return Err(DecodeError::Schema(c.errors));
        }
        let (Some(inputs), Some(outputs)) = (inputs, outputs) else {
            return Err(DecodeError::Schema(vec![SchemaError::new(
                "value_error",
                &[],
                "invalid request",
            )]));
        };
        let inputs = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| {
                let data = match input.data {
                    Some(json) => TensorData::from_json(&input.name, input.datatype, json)?,
                    None => attached
                        .remove(&i)
                        .unwrap_or_else(|| TensorData::empty(input.datatype)),
                };
                Ok(RequestInput {
                    name: input.name,
                    shape: input.shape,
                    datatype: input.datatype,
                    parameters: input.parameters,
                    data,
                })
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(Self {
            id,
            parameters: parameters.unwrap_or_default(),
            inputs,
            outputs,
        })
    }

    /// Parses and checks raw JSON bytes.
    pub fn from_slice(body: &[u8]) -> Result<Self, DecodeError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| DecodeError::Schema(vec![json_error(&e, body)]))?;
        Self::from_value(&value)
    }
}

impl Checker {
    fn inputs<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        attached: &BTreeMap<usize, TensorData>,
    ) -> Option<Vec<CheckedInput<'a>>> {
        let loc = [Loc::Key("inputs".into())];
        match obj.get("inputs") {
            None => {
                self.err("missing", &loc, "Field required");
                None
            }
            Some(Value::Array(items)) => {
                let parsed: Vec<Option<CheckedInput>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let at = Checker::with(&loc, Loc::Index(i));
                        self.input(item, &at, attached.contains_key(&i))
                    })
                    .collect();
                parsed.into_iter().collect()
            }
            Some(_) => {
                self.err("list_type", &loc, "Input should be a valid list");
                None
            }
        }
    }

    /// `Some(None)` when the request names no outputs.
    fn outputs(&mut self, obj: &Map<String, Value>) -> Option<Option<Vec<RequestOutput>>> {
        let loc = [Loc::Key("outputs".into())];
        match obj.get("outputs") {
            None | Some(Value::Null) => Some(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.output(item, &Checker::with(&loc, Loc::Index(i))))
                .collect::<Option<Vec<_>>>()
                .map(Some),
            Some(_) => {
                self.err("list_type", &loc, "Input should be a valid list");
                None
            }
        }
    }
}

impl RepositoryIndexRequest {
    /// MLServer requires a JSON object body here (an empty body is a 422).
    pub fn from_slice(body: &[u8]) -> Result<Self, Vec<SchemaError>> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(vec![SchemaError::new("missing", &[], "Field required")]);
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| vec![json_error(&e, body)])?;
        let mut c = Checker { errors: Vec::new() };
        let Some(obj) = c.object(&value, &[], "the request body") else {
            return Err(c.errors);
        };
        let ready = match obj.get("ready") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                c.err(
                    "bool_type",
                    &[Loc::Key("ready".into())],
                    "Input should be a valid boolean",
                );
                None
            }
        };
        if c.errors.is_empty() {
            Ok(Self { ready })
        } else {
            Err(c.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_minimal_request() {
        let r = InferenceRequest::from_value(&json!({
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}]
        }))
        .unwrap();
        assert_eq!(r.inputs[0].datatype, Datatype::Bytes);
        assert_eq!(r.id, None);
    }

    fn schema_errors(r: Result<InferenceRequest, DecodeError>) -> Vec<SchemaError> {
        match r {
            Err(DecodeError::Schema(errs)) => errs,
            other => panic!("expected schema errors, got {other:?}"),
        }
    }

    #[test]
    fn reports_every_problem_with_its_location() {
        let errs = schema_errors(InferenceRequest::from_value(&json!({
            "id": 5,
            "inputs": [{"name": "prompt", "shape": [1, "x"], "datatype": "STRING"}]
        })));
        let paths: Vec<String> = errs.iter().map(|e| e.path()).collect();
        assert_eq!(
            paths,
            [
                "id",
                "inputs.0.shape.1",
                "inputs.0.datatype",
                "inputs.0.data"
            ]
        );
        assert_eq!(errs[2].kind, "enum");
        assert!(errs[2].msg.contains("STRING"));
    }

    #[test]
    fn missing_inputs_and_non_object_bodies() {
        let errs = schema_errors(InferenceRequest::from_value(&json!({})));
        assert_eq!(
            errs[0].to_detail(),
            json!({"type": "missing", "loc": ["body", "inputs"], "msg": "Field required"})
        );
        assert!(InferenceRequest::from_value(&json!([1, 2])).is_err());
        assert!(InferenceRequest::from_value(&json!("x")).is_err());
    }

    #[test]
    fn invalid_json_points_at_the_byte() {
        let body = b"{\"inputs\": [";
        let errs = schema_errors(InferenceRequest::from_slice(body));
        assert_eq!(errs[0].kind, "json_invalid");
        assert!(matches!(errs[0].loc[1], Loc::Index(n) if (10..=12).contains(&n)));
    }

    #[test]
    fn data_is_read_as_its_datatype_once_the_schema_holds() {
        let r = InferenceRequest::from_value(&json!({
            "inputs": [{"name": "prompt", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}]
        }))
        .unwrap();
        assert_eq!(
            r.inputs[0].data,
            TensorData::Bytes(vec![b"a".to_vec(), b"b".to_vec()])
        );
        let e = InferenceRequest::from_value(&json!({
            "inputs": [{"name": "steps", "shape": [1], "datatype": "INT64", "data": ["2"]}]
        }))
        .unwrap_err();
        assert_eq!(
            e,
            DecodeError::Data(DataError(
                "input 'steps' element 0 must be an integer, got \"2\"".into()
            ))
        );
        // Attached (binary) data stands in for a missing `data`.
        let attached = BTreeMap::from([(0, TensorData::Bytes(vec![vec![0xff]]))]);
        let r = InferenceRequest::from_json(
            &json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES"}]}),
            attached,
        )
        .unwrap();
        assert_eq!(r.inputs[0].data, TensorData::Bytes(vec![vec![0xff]]));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = "[".repeat(100_000);
        assert!(InferenceRequest::from_slice(body.as_bytes()).is_err());
    }

    #[test]
    fn repository_index_body() {
        assert_eq!(
            RepositoryIndexRequest::from_slice(b"{}").unwrap().ready,
            None
        );
        assert_eq!(
            RepositoryIndexRequest::from_slice(b"{\"ready\":true}")
                .unwrap()
                .ready,
            Some(true)
        );
        assert_eq!(
            RepositoryIndexRequest::from_slice(b"").unwrap_err()[0].kind,
            "missing"
        );
        assert!(RepositoryIndexRequest::from_slice(b"{\"ready\":3}").is_err());
    }
}
