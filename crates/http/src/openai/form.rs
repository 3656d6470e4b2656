//! An edit's `multipart/form-data` body, already read within the body limit, as named fields:
//! a part with a file name is a file, any other part is UTF-8 text.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use sdserve_protocol::openai::{Given, ParamError};

/// More parts than any edit needs; a body of thousands of tiny parts is refused.
pub const MAX_PARTS: usize = 64;

fn refused(message: impl Into<String>) -> ParamError {
    ParamError {
        param: None,
        message: message.into(),
    }
}

/// The fields of `body`, in order.
pub async fn fields(
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Result<Vec<(String, Given)>, ParamError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        refused(format!(
            "an edit is a multipart/form-data request with a boundary; the Content-Type is '{content_type}'"
        ))
    })?;
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(Bytes::from(body)) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut fields = Vec::new();
    while let Some(part) = form.next_field().await.map_err(malformed)? {
        if fields.len() == MAX_PARTS {
            return Err(refused(format!("the form has more than {MAX_PARTS} parts")));
        }
        let Some(name) = part.name().map(str::to_owned) else {
            return Err(refused("a form part has no name"));
        };
        let is_file = part.file_name().is_some();
        let bytes = part.bytes().await.map_err(malformed)?;
        let value = if is_file {
            Given::File(bytes.to_vec())
        } else {
            Given::Text(String::from_utf8(bytes.to_vec()).map_err(|_| ParamError {
                param: Some(name.clone()),
                message: format!("form field '{name}' is not UTF-8 text"),
            })?)
        };
        fields.push((name, value));
    }
    Ok(fields)
}

fn malformed(e: multer::Error) -> ParamError {
    refused(format!("the multipart form cannot be read: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> (HeaderMap, Vec<u8>) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        (headers, body.replace('\n', "\r\n").into_bytes())
    }

    #[tokio::test]
    async fn files_and_text_fields_are_told_apart() {
        let (headers, body) = form(
            "--XyZ\nContent-Disposition: form-data; name=\"prompt\"\n\na cat\n\
             --XyZ\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\nContent-Type: image/png\n\n\u{1}\u{2}\n\
             --XyZ--\n",
        );
        let f = fields(&headers, body).await.unwrap();
        assert_eq!(
            f,
            vec![
                ("prompt".to_owned(), Given::Text("a cat".into())),
                ("image".to_owned(), Given::File(vec![1, 2])),
            ]
        );
    }

    #[tokio::test]
    async fn bad_forms_are_refused() {
        let (_, body) = form("--XyZ--\n");
        assert!(fields(&HeaderMap::new(), body).await.is_err());
        let (headers, body) = form("--XyZ\nContent-Disposition: form-data; name=\"p\"\n\nno end");
        assert!(fields(&headers, body).await.is_err());
        let many: String = (0..=MAX_PARTS)
            .map(|i| format!("--XyZ\nContent-Disposition: form-data; name=\"f{i}\"\n\nx\n"))
            .collect();
        let (headers, body) = form(&format!("{many}--XyZ--\n"));
        let e = fields(&headers, body).await.unwrap_err();
        assert!(e.message.contains("more than 64 parts"), "{e}");
    }
}
