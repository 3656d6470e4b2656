//! Reading request bodies: size limit, gzip/deflate decoding with the same limit on the
//! decoded size (so a small gzip bomb cannot expand into gigabytes).

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// An over-limit body is read on and thrown away, up to this much, before the 413 goes out:
/// closing a socket with unread data resets it, and the client would see a broken connection
/// instead of the answer. Bodies announced larger than this are refused without reading.
const DISCARD_BYTES: u64 = 256 * 1024 * 1024;
/// Longest time spent throwing an over-limit body away.
const DISCARD_TIME: Duration = Duration::from_secs(10);
/// A client that sends no body bytes for this long loses its request (and its queue slot).
const BODY_IDLE: Duration = Duration::from_secs(30);

/// Reads the whole body, refusing more than `limit` bytes before or after decompression.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    read_within(headers, body, limit, BODY_IDLE).await
}

async fn read_within(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    idle: Duration,
) -> Result<Vec<u8>, ApiError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced
        && len > limit as u64
    {
        if len <= DISCARD_BYTES {
            discard(&mut body).await;
        }
        return Err(ApiError::payload_too_large(limit));
    }
    // The announced length is only a hint: a client may announce much and send little.
    let mut raw = Vec::with_capacity(announced.unwrap_or(0).min(1 << 20) as usize);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "no request body data arrived for {:.0} s",
                        idle.as_secs_f64()
                    ),
                ));
            }
        };
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if raw.len() + data.len() > limit {
            discard(&mut body).await;
            return Err(ApiError::payload_too_large(limit));
        }
        raw.extend_from_slice(&data);
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(raw),
        "gzip" | "x-gzip" => inflate(flate2::read::GzDecoder::new(&raw[..]), limit, "gzip"),
        "deflate" => inflate(flate2::read::ZlibDecoder::new(&raw[..]), limit, "deflate"),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding '{other}' is not supported; use gzip, deflate or none"),
        )),
    }
}

/// Reads and drops the body of a request refused before reading it (overloaded, draining), so
/// that the client gets the answer rather than a reset connection. Bodies announced larger than
/// [`DISCARD_BYTES`] are left unread.
pub async fn drain(headers: &HeaderMap, mut body: Body) {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_none_or(|len| len <= DISCARD_BYTES) {
        discard(&mut body).await;
    }
}

/// Reads and drops the rest of a body, within [`DISCARD_BYTES`] and [`DISCARD_TIME`].
async fn discard(body: &mut Body) {
    let deadline = tokio::time::Instant::now() + DISCARD_TIME;
    let mut left = DISCARD_BYTES;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        left = left.saturating_sub(n);
        if left == 0 {
            return;
        }
    }
}

fn inflate(reader: impl Read, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    // One byte more than allowed tells "exactly at the limit" from "over it".
    let read = reader.take(limit as u64 + 1).read_to_end(&mut out);
    match read {
        Ok(_) if out.len() > limit => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "decompressed request body is larger than the limit of {limit} bytes (max_request_body_bytes)"
            ),
        )),
        Ok(_) => Ok(out),
        Err(e) => Err(ApiError::bad_request(format!(
            "request body is not valid {what} data: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
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
        assert_eq!(
            read(&headers(None), Body::from("abc"), 10).await.unwrap(),
            b"abc"
        );
        let packed = gzip(b"hello");
        assert_eq!(
            read(&headers(Some("gzip")), Body::from(packed), 100)
                .await
                .unwrap(),
            b"hello"
        );
        assert_eq!(
            read(&headers(None), Body::from("x".repeat(11)), 10)
                .await
                .unwrap_err()
                .status,
            413
        );
        let bomb = gzip(&vec![0u8; 10_000_000]);
        assert!(bomb.len() < 20_000);
        let err = read(&headers(Some("gzip")), Body::from(bomb), 1_000_000)
            .await
            .unwrap_err();
        assert_eq!(err.status, 413);
        assert_eq!(
            read(&headers(Some("gzip")), Body::from("nope"), 100)
                .await
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            read(&headers(Some("br")), Body::from("x"), 100)
                .await
                .unwrap_err()
                .status,
            415
        );
    }

    /// A body that sends its one chunk and then nothing, ever.
    struct Stalled(Option<Bytes>);

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None => std::task::Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let body = Body::new(Stalled(Some(Bytes::from_static(b"{\"inputs\""))));
        let err = read_within(&headers(None), body, 100, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.status, 408);
        assert!(
            err.message.contains("no request body data"),
            "{}",
            err.message
        );
    }

    /// `left` chunks of 1000 bytes, counting how many were taken.
    struct Counted {
        left: usize,
        taken: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl http_body::Body for Counted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            self.left -= 1;
            self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                b'x';
                1000
            ])))))
        }
    }

    #[tokio::test]
    async fn over_limit_bodies_are_read_to_the_end_before_refusing() {
        // No length announced: the refusal comes once the whole body was consumed, so the
        // client is not cut off while it still sends.
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = Body::new(Counted {
            left: 50,
            taken: taken.clone(),
        });
        assert_eq!(
            read(&headers(None), body, 10_000).await.unwrap_err().status,
            413
        );
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 50);
    }
}
