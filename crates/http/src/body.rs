//! Reading request bodies: size limit, gzip/deflate decoding with the same limit on the
//! decoded size (so a small gzip bomb cannot expand into gigabytes).

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// Reads the whole body, refusing more than `limit` bytes before or after decompression.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::payload_too_large(limit));
    }
    let limited = http_body_util::Limited::new(body, limit);
    let raw = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(ApiError::payload_too_large(limit));
        }
        Err(e) => return Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(raw.to_vec()),
        "gzip" | "x-gzip" => inflate(flate2::read::GzDecoder::new(&raw[..]), limit, "gzip"),
        "deflate" => inflate(flate2::read::ZlibDecoder::new(&raw[..]), limit, "deflate"),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding '{other}' is not supported; use gzip, deflate or none"),
        )),
    }
}

fn inflate(reader: impl Read, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    // One byte more than allowed tells "exactly at the limit" from "over it".
    let read = reader.take(limit as u64 + 1).read_to_end(&mut out);
    match read {
        Ok(_) if out.len() > limit => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("decompressed request body is larger than the limit of {limit} bytes (max_request_body_bytes)"),
        )),
        Ok(_) => Ok(out),
        Err(e) => Err(ApiError::bad_request(format!("request body is not valid {what} data: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn headers(encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(e) = encoding {
            h.insert(header::CONTENT_ENCODING, e.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn plain_gzip_and_limits() {
        assert_eq!(read(&headers(None), Body::from("abc"), 10).await.unwrap(), b"abc");
        let packed = gzip(b"hello");
        assert_eq!(read(&headers(Some("gzip")), Body::from(packed), 100).await.unwrap(), b"hello");
        assert_eq!(read(&headers(None), Body::from("x".repeat(11)), 10).await.unwrap_err().status, 413);
        let bomb = gzip(&vec![0u8; 10_000_000]);
        assert!(bomb.len() < 20_000);
        let err = read(&headers(Some("gzip")), Body::from(bomb), 1_000_000).await.unwrap_err();
        assert_eq!(err.status, 413);
        assert_eq!(read(&headers(Some("gzip")), Body::from("nope"), 100).await.unwrap_err().status, 400);
        assert_eq!(read(&headers(Some("br")), Body::from("x"), 100).await.unwrap_err().status, 415);
    }
}
