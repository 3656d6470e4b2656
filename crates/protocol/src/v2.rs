//! V2 / Open Inference Protocol wire types, shaped as MLServer 1.7.1 serialises them
//! (compact JSON, `None` fields omitted).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tensor::TensorData;

/// Free-form `parameters` object (`content_type`, `headers`, and any extra key).
pub type Parameters = Map<String, Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    pub const ALL: [Datatype; 13] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            Datatype::Uint8
                | Datatype::Uint16
                | Datatype::Uint32
                | Datatype::Uint64
                | Datatype::Int8
                | Datatype::Int16
                | Datatype::Int32
                | Datatype::Int64
        )
    }

    pub fn is_float(self) -> bool {
        matches!(self, Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64)
    }
}

/// A V2 inference request as every transport decodes it: JSON bodies (checked by
/// [`crate::schema`]), Triton's binary tensor data, and gRPC messages.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub id: Option<String>,
    /// Request-level `parameters` (empty when there are none).
    pub parameters: Parameters,
    pub inputs: Vec<RequestInput>,
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: Datatype,
    pub parameters: Option<Parameters>,
    /// Elements of the kind `datatype` names; whether there are as many as `shape` holds is
    /// checked where the input is read (the contract names the input that breaks it).
    pub data: TensorData,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    pub model_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always present on infer responses, as MLServer does (`{}` at least).
    pub parameters: Parameters,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseOutput {
    pub name: String,
    pub shape: Vec<u64>,
    pub datatype: Datatype,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    /// `null` (left out) when the tensor travels as binary data after the JSON
    /// (`parameters.binary_data_size`, Triton's binary tensor data extension).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataServerResponse {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataTensor {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataModelResponse {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<String>>,
    pub platform: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<MetadataTensor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<MetadataTensor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

/// `POST /v2/repository/index` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepositoryIndexRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModelState {
    Unknown,
    Ready,
    Unavailable,
    Loading,
    Unloading,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryIndexItem {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub state: ModelState,
    pub reason: String,
}

/// Error body of every failed call: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
