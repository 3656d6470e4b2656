//! Structural validation of V2 request bodies (the 422 layer).
//!
//! MLServer validates bodies with pydantic and answers 422 with FastAPI's
//! `{"detail": [{"type", "loc", "msg", "input"}]}`. We check the same schema by hand so every
//! problem is reported with its location, and never by panicking on odd JSON.

use serde_json::{Map, Value};

use crate::v2::{
    Datatype, InferenceRequest, Parameters, RepositoryIndexRequest, RequestInput, RequestOutput,
};

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

    fn input(&mut self, v: &Value, loc: &[Loc]) -> Option<RequestInput> {
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
            None => {
                self.err(
                    "missing",
                    &Self::with(loc, Loc::Key("data".into())),
                    "Field required",
                );
                None
            }
            Some(d) => Some(d.clone()),
        };
        Some(RequestInput {
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
    /// Checks the V2 schema; every violation is reported, not only the first.
    pub fn from_value(v: &Value) -> Result<Self, Vec<SchemaError>> {
        let mut c = Checker { errors: Vec::new() };
        let Some(obj) = c.object(v, &[], "the request body") else {
            return Err(c.errors);
        };
        let id = c.string(obj, "id", &[], false);
        let parameters = c.parameters(obj, &[]);
        let inputs_loc = [Loc::Key("inputs".into())];
        let inputs = match obj.get("inputs") {
            None => {
                c.err("missing", &inputs_loc, "Field required");
                None
            }
            Some(Value::Array(items)) => {
                let parsed: Vec<Option<RequestInput>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| c.input(item, &Checker::with(&inputs_loc, Loc::Index(i))))
                    .collect();
                parsed.into_iter().collect::<Option<Vec<_>>>()
            }
            Some(_) => {
                c.err("list_type", &inputs_loc, "Input should be a valid list");
                None
            }
        };
        let outputs_loc = [Loc::Key("outputs".into())];
        let outputs = match obj.get("outputs") {
            None | Some(Value::Null) => Some(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| c.output(item, &Checker::with(&outputs_loc, Loc::Index(i))))
                .collect::<Option<Vec<_>>>()
                .map(Some),
            Some(_) => {
                c.err("list_type", &outputs_loc, "Input should be a valid list");
                None
            }
        };
        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        match (inputs, outputs) {
            (Some(inputs), Some(outputs)) => Ok(Self {
                id,
                parameters,
                inputs,
                outputs,
            }),
            _ => Err(vec![SchemaError::new(
                "value_error",
                &[],
                "invalid request",
            )]),
        }
    }

    /// Parses and checks raw JSON bytes.
    pub fn from_slice(body: &[u8]) -> Result<Self, Vec<SchemaError>> {
        let value: Value = serde_json::from_slice(body).map_err(|e| vec![json_error(&e, body)])?;
        Self::from_value(&value)
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

    #[test]
    fn reports_every_problem_with_its_location() {
        let errs = InferenceRequest::from_value(&json!({
            "id": 5,
            "inputs": [{"name": "prompt", "shape": [1, "x"], "datatype": "STRING"}]
        }))
        .unwrap_err();
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
        let errs = InferenceRequest::from_value(&json!({})).unwrap_err();
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
        let errs = InferenceRequest::from_slice(body).unwrap_err();
        assert_eq!(errs[0].kind, "json_invalid");
        assert!(matches!(errs[0].loc[1], Loc::Index(n) if (10..=12).contains(&n)));
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
