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

use crate::export::model::FilePart;
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
    /// The gzip file is a series of members (written by the previous release), not one stream.
    pub members: bool,
    /// The client sent `Accept-Encoding: gzip`.
    pub client_gzip: bool,
}

impl Encoding {
    /// How `part` is stored, for a client that accepts gzip or not.
    pub fn of(part: &FilePart, client_gzip: bool) -> Self {
        Self {
            stored_gzip: part.gzip,
            members: part.gzip && part.stream.is_none(),
            client_gzip,
        }
    }

    /// Whether the bytes at rest are what the client gets.
    fn as_stored(self) -> bool {
        self.stored_gzip == self.client_gzip && !self.members
    }
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
/// plain files are compressed on the fly for clients that accept gzip. A series of gzip members goes to
/// no client as is, since many decode only the first member and take it for the whole file: it is
/// inflated, and compressed again as one stream for clients that accept gzip.
pub fn respond(reader: FileReader, len: u64, encoding: Encoding) -> Response<Body> {
    let to_frame = |chunk: bytes::Bytes| Frame::data(chunk);
    let reader = if encoding.as_stored() {
        reader
    } else if !encoding.stored_gzip {
        compress(reader)
    } else if encoding.client_gzip {
        rejoin_members(reader)
    } else {
        inflate(reader, encoding.members)
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
    if encoding.as_stored() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    response
}

/// `reader`'s bytes gzip-compressed on the fly.
fn compress(reader: FileReader) -> FileReader {
    Box::new(GzipEncoder::new(BufReader::new(reader)))
}

/// The bytes a gzip `reader` holds, inflated on the fly; `members`: all of a series of members.
fn inflate(reader: FileReader, members: bool) -> FileReader {
    let mut decoder = GzipDecoder::new(BufReader::new(reader));
    decoder.multiple_members(members);
    Box::new(decoder)
}

/// A series of gzip members (the previous release's files) as one gzip stream, for clients that decode
/// only one member: inflated and compressed again on the fly.
pub fn rejoin_members(reader: FileReader) -> FileReader {
    compress(inflate(reader, true))
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

    fn gzip(text: &str) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    fn encoding(stored_gzip: bool, members: bool, client_gzip: bool) -> Encoding {
        Encoding {
            stored_gzip,
            members,
            client_gzip,
        }
    }

    /// The response to `stored` as `encoding` says, with its body decoded by a single-member gzip
    /// decoder when it is sent gzip-encoded, as most HTTP clients decode it.
    async fn download(stored: Vec<u8>, encoding: Encoding) -> (Option<u64>, String) {
        use std::io::Read;
        let len = stored.len() as u64;
        let response = respond(Box::new(std::io::Cursor::new(stored)), len, encoding);
        let length = response
            .headers()
            .get(CONTENT_LENGTH)
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let gzipped = response.headers().get(CONTENT_ENCODING).is_some();
        assert_eq!(gzipped, encoding.client_gzip);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if let Some(length) = length {
            assert_eq!(length, body.len() as u64);
        }
        let mut text = String::new();
        if gzipped {
            let mut decoder = flate2::bufread::GzDecoder::new(&body[..]);
            decoder.read_to_string(&mut text).unwrap();
            assert!(decoder.into_inner().is_empty(), "bytes after one member");
        } else {
            text = String::from_utf8(body.to_vec()).unwrap();
        }
        (length, text)
    }

    #[tokio::test]
    async fn every_stored_form_reaches_every_client_whole() {
        let (first, second) = ("{\"id\":\"1\"}\n", "{\"id\":\"2\"}\n");
        let whole = format!("{first}{second}");
        let members = [gzip(first), gzip(second)].concat();
        let stream = gzip(&whole);
        let plain = whole.as_bytes().to_vec();
        let cases = [
            (plain.clone(), encoding(false, false, false), true),
            (plain, encoding(false, false, true), false),
            (stream.clone(), encoding(true, false, true), true),
            (stream, encoding(true, false, false), false),
            (members.clone(), encoding(true, true, true), false),
            (members, encoding(true, true, false), false),
        ];
        for (stored, encoding, as_stored) in cases {
            let len = stored.len() as u64;
            let (length, text) = download(stored, encoding).await;
            assert_eq!(text, whole, "{encoding:?}");
            assert_eq!(length, as_stored.then_some(len), "{encoding:?}");
        }
    }
}
