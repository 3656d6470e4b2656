//! V2 / Open Inference Protocol types and the diffusers request contract.
//! Knows nothing of HTTP transports or models.
//!
//! # Layout
//! - [`v2`]: wire types (requests, responses, metadata, repository index, errors).
//! - [`schema`]: structural validation of request bodies, FastAPI-style (the 422 layer).
//! - [`diffusers`]: decoding a V2 request into a text-to-image request (the 400 layer).
//! - [`raw`]: tensor data as bytes (gRPC raw contents, REST binary tensor data).

pub mod diffusers;
pub mod raw;
pub mod schema;
pub mod v2;

pub use diffusers::{ContractError, DiffusersRequest, LatentsInput};
pub use schema::{Loc, SchemaError};
pub use v2::*;
