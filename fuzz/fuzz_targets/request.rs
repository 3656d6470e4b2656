//! Request decoding and validation, as the HTTP handler runs them for a JSON body: V2 schema
//! and typed data (`InferenceRequest::from_slice`), the diffusers contract and timeout
//! (`diffusers::decode`), then `GenerationRequest::resolve` against a fixed model. Any panic is a finding; so is a resolved
//! job that breaks the limits it was checked against.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sdserve_protocol::InferenceRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = InferenceRequest::from_slice(data) {
        common::check(&request);
    }
});
