//! V2 / Open Inference Protocol types and the diffusers request contract.
//! Knows nothing of HTTP transports or models.
//!
//! # Layout
//! - [`v2`]: wire types (requests, responses, metadata, repository index, errors).
//! - [`tensor`]: typed tensor data, read from JSON `data`.
//! - [`schema`]: structural validation of JSON request bodies, FastAPI-style (the 422 layer),
//!   into the typed [`InferenceRequest`].
//! - [`raw`]: tensor data as bytes (gRPC raw contents, REST binary tensor data).
//! - [`diffusers`]: the contract: a typed request → [`sdserve_generation::GenerationRequest`]
//!   and its options (the 400 layer).
//! - [`openai`]: OpenAI's Images API, a second contract onto the same generation request, and
//!   its answers and error body.

pub mod diffusers;
pub mod openai;
pub mod raw;
pub mod schema;
pub mod tensor;
pub mod v2;

pub use diffusers::{ContractError, Decoded, IMAGE_OUTPUT, RequestOptions};
pub use schema::{DecodeError, Loc, SchemaError};
pub use tensor::{DataError, TensorData};
pub use v2::*;
