//! OpenAI's Images API on the inference port (`docs/openai-images.md`), over the same service,
//! queue, limits, metrics and token as the V2 routes.
//!
//! - [`handlers`]: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.
//! - [`form`]: the multipart form of an edit, read into fields.
//! - [`error`]: failures in OpenAI's error shape and status codes.

pub mod error;
pub mod form;
pub mod handlers;

pub use error::OpenAiError;
