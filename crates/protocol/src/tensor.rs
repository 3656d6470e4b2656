//! Typed tensor data: what every transport decodes an input's elements into. JSON `data`
//! (nested lists or a bare scalar), Triton's binary tensor data and gRPC contents all arrive
//! here as the element type their datatype names; BYTES elements stay bytes, so a PNG
//! travels as well as a prompt.

use serde_json::Value;

use crate::v2::Datatype;

/// The elements of one input, flat and row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    /// Every integer datatype (INT8 … UINT64): i128 holds all their values.
    Int(Vec<i128>),
    /// FP16, FP32 and FP64 (f64 holds all their values, non-finite ones included).
    Float(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Tensor data that cannot be read; the text names the input and the element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DataError(pub String);

fn bad(msg: impl Into<String>) -> DataError {
    DataError(msg.into())
}

/// JSON lists deeper than this are refused (a shape has far fewer dimensions).
const MAX_DEPTH: usize = 32;

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::Int(v) => v.len(),
            TensorData::Float(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No elements, of the kind datatype `d` holds.
    pub fn empty(d: Datatype) -> Self {
        match d {
            Datatype::Bool => TensorData::Bool(Vec::new()),
            Datatype::Bytes => TensorData::Bytes(Vec::new()),
            d if d.is_float() => TensorData::Float(Vec::new()),
            _ => TensorData::Int(Vec::new()),
        }
    }

    /// JSON `data` of input `name`: nested lists (row-major) or a bare scalar, each element
    /// of the kind `d` names.
    pub fn from_json(name: &str, d: Datatype, data: &Value) -> Result<Self, DataError> {
        let mut flat = Vec::new();
        flatten(name, data, &mut flat, 0)?;
        let element = |i: usize| format!("input '{name}' element {i}");
        Ok(match d {
            Datatype::Bool => TensorData::Bool(collect(&flat, |i, v| {
                v.as_bool()
                    .ok_or_else(|| bad(format!("{} is not a boolean", element(i))))
            })?),
            Datatype::Bytes => TensorData::Bytes(collect(&flat, |i, v| match v {
                Value::String(s) => Ok(s.clone().into_bytes()),
                _ => Err(bad(format!("{} is not a string", element(i)))),
            })?),
            d if d.is_float() => TensorData::Float(collect(&flat, |i, v| {
                v.as_f64()
                    .ok_or_else(|| bad(format!("{} must be a finite number, got {v}", element(i))))
            })?),
            _ => TensorData::Int(collect(&flat, |i, v| {
                json_integer(v)
                    .ok_or_else(|| bad(format!("{} must be an integer, got {v}", element(i))))
            })?),
        })
    }
}

/// A JSON integer, or a float with no fractional part small enough to be exact.
fn json_integer(v: &Value) -> Option<i128> {
    if let Some(n) = v.as_i64() {
        return Some(i128::from(n));
    }
    if let Some(n) = v.as_u64() {
        return Some(i128::from(n));
    }
    v.as_f64()
        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
        .map(|f| f as i128)
}

fn collect<T>(
    flat: &[&Value],
    one: impl Fn(usize, &Value) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    flat.iter().enumerate().map(|(i, v)| one(i, v)).collect()
}

/// Flattens nested lists (row-major); a bare scalar is a one-element tensor.
fn flatten<'a>(
    name: &str,
    v: &'a Value,
    out: &mut Vec<&'a Value>,
    depth: usize,
) -> Result<(), DataError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!(
            "input '{name}': tensor data is nested too deeply"
        )));
    }
    match v {
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| flatten(name, item, out, depth + 1)),
        other => {
            out.push(other);
            Ok(())
        }
    }
}

/// How many elements `shape` holds; negative and overflowing shapes are refused.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize, DataError> {
    shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| {
            bad(format!(
                "input '{name}': shape {shape:?} has a negative dimension"
            ))
        })?;
        n.checked_mul(d)
            .ok_or_else(|| bad(format!("input '{name}': shape {shape:?} is too large")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_data_takes_the_kind_of_its_datatype() {
        let read = |d, v: Value| TensorData::from_json("x", d, &v);
        assert_eq!(
            read(Datatype::Bytes, json!([["a"], ["é"]])),
            Ok(TensorData::Bytes(vec![
                b"a".to_vec(),
                "é".as_bytes().to_vec()
            ]))
        );
        assert_eq!(
            read(Datatype::Int32, json!([4.0, -2, 18446744073709551615u64])),
            Ok(TensorData::Int(vec![4, -2, u64::MAX as i128]))
        );
        assert_eq!(
            read(Datatype::Fp32, json!(3)),
            Ok(TensorData::Float(vec![3.0]))
        );
        assert_eq!(
            read(Datatype::Bool, json!([true, false])),
            Ok(TensorData::Bool(vec![true, false]))
        );
        let err = |d, v| read(d, v).unwrap_err().0;
        assert_eq!(
            err(Datatype::Bytes, json!([5])),
            "input 'x' element 0 is not a string"
        );
        assert_eq!(
            err(Datatype::Int64, json!([1, 2.5])),
            "input 'x' element 1 must be an integer, got 2.5"
        );
        assert!(err(Datatype::Fp32, json!(["NaN"])).contains("finite number"));
        let deep = (0..40).fold(json!("a"), |v, _| json!([v]));
        assert!(err(Datatype::Bytes, deep).contains("nested too deeply"));
    }

    #[test]
    fn shapes_count_their_elements() {
        assert_eq!(element_count("x", &[2, 3]), Ok(6));
        assert_eq!(element_count("x", &[]), Ok(1));
        assert!(
            element_count("x", &[-1])
                .unwrap_err()
                .0
                .contains("negative")
        );
        assert!(
            element_count("x", &[i64::MAX, i64::MAX])
                .unwrap_err()
                .0
                .contains("too large")
        );
    }
}
