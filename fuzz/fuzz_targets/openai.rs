//! OpenAI's Images API: a generation body (JSON) or an edit's form fields, decoded, then the
//! same validation and job invariants as the V2 targets. The first byte picks the route; for an
//! edit the rest is split at `&` into fields, `name=value` text or `@name=bytes` files.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sdserve_protocol::openai::{self, Given};

fuzz_target!(|data: &[u8]| {
    let Some((route, body)) = data.split_first() else {
        return;
    };
    let decoded = if route % 2 == 0 {
        openai::decode_generation(body)
    } else {
        let parts = body
            .split(|&b| b == b'&')
            .filter_map(|field| {
                let at = field.iter().position(|&b| b == b'=')?;
                let (name, value) = (&field[..at], &field[at + 1..]);
                let name = String::from_utf8(name.to_vec()).ok()?;
                Some(match name.strip_prefix('@') {
                    Some(file) => (file.to_owned(), Given::File(value.to_vec())),
                    None => (name, Given::Text(String::from_utf8_lossy(value).into_owned())),
                })
            })
            .collect();
        openai::decode_edit(parts)
    };
    if let Ok(request) = decoded {
        assert!(request.decoded.generation.prompts.len() == 1);
        common::check_job(request.decoded.generation);
    }
});
