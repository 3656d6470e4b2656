//! One module per API area; each handler is extract → validate → engine → encode.

pub mod docs;
pub mod health;
pub mod infer;
pub mod metadata;
pub mod repository;
