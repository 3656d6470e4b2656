//! The binary tensor data extension's body decoder (`Inference-Header-Content-Length`), then
//! the same contract and validation as the JSON target. The first two bytes give the header
//! length (`0xFFFF`: no header, a plain JSON body); the rest is the body.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sdserve_http::binary;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = u16::from_le_bytes(*head);
    // Mostly within the body, sometimes one past it.
    let header_length = (n != u16::MAX).then(|| n as usize % (body.len() + 2));
    if let Ok(decoded) = binary::decode(header_length, body) {
        common::check(&decoded.request);
    }
});
