//! Streams export files to clients, gzip-compressed on the fly when they accept it.

use std::path::Path;

use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY};
use hyper::Response;
use tokio::io::BufReader;
use tokio_util::io::ReaderStream;

use crate::http::{ApiError, Body, BoxError};
use crate::storage::FileReader;

/// Whether an `Accept-Encoding` value allows gzip (and does not refuse it with `q=0`).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding.is_some_and(|v| {
        v.split(',').any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused =
                parts.any(|p| p.replace(' ', "") == "q=0" || p.replace(' ', "") == "q=0.0");
            name.eq_ignore_ascii_case("gzip") && !refused
        })
    })
}

/// How a file is stored and how the client wants it.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// The file is gzip at rest.
    pub stored_gzip: bool,
    /// The client sent `Accept-Encoding: gzip`.
    pub client_gzip: bool,
}

/// A streaming `application/fhir+ndjson` response of the local file at `path`.
pub async fn serve(path: &Path, encoding: Encoding) -> Result<Response<Body>, ApiError> {
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    Ok(respond(Box::new(file), len, encoding))
}

/// A streaming `application/fhir+ndjson` response of `reader` (`len` bytes as stored).
///
/// Gzip at rest goes out as is to clients that accept it and is inflated on the fly for the others;
/// plain files are compressed on the fly for clients that accept gzip.
pub fn respond(reader: FileReader, len: u64, encoding: Encoding) -> Response<Body> {
    let to_frame = |chunk: bytes::Bytes| Frame::data(chunk);
    let reader: FileReader = match (encoding.stored_gzip, encoding.client_gzip) {
        (true, false) => {
            let mut decoder = GzipDecoder::new(BufReader::new(reader));
            decoder.multiple_members(true);
            Box::new(decoder)
        }
        (false, true) => Box::new(GzipEncoder::new(BufReader::new(reader))),
        _ => reader,
    };
    let stream = ReaderStream::with_capacity(reader, 64 * 1024);
    let body: Body = StreamBody::new(stream.map_ok(to_frame).map_err(|e| Box::new(e) as BoxError))
        .boxed_unsync();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if encoding.client_gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if encoding.stored_gzip == encoding.client_gzip {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("br, GZIP;q=0.5")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(None));
    }
}
