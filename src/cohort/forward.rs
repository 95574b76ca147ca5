//! A `POST Group` with `Prefer: respond-async` whose body turned out not to be a cohort, sent on to the
//! upstream as it came.
//!
//! Its body had to be read to tell, and the pass-through path ([`crate::proxy`]) only forwards request
//! bodies still streaming from the client; this sends the bytes read instead, with the same header
//! treatment (hop-by-hop headers dropped, forwarding headers the proxy's own, `Location` and
//! `Content-Location` rewritten to the public base). It is the only such request: every other one goes
//! the ordinary pass-through way.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LOCATION, HOST, LOCATION};
use hyper::{HeaderMap, Response};
use url::Url;

use crate::http::{ApiError, Body, BoxError};
use crate::upstream::{error_chain, UpstreamError};

/// Headers that belong to one connection, never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwarding headers a client may not claim: the proxy, at the edge, sets them from what it saw.
const FORWARDING: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Sends already-read requests to the upstream.
pub struct Forwarder {
    http: reqwest::Client,
    upstream: Url,
    public: Url,
}

impl Forwarder {
    /// A forwarder from the public base `public` to the upstream base `upstream`.
    pub fn new(
        upstream: Url,
        public: Url,
        timeout: std::time::Duration,
    ) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(UpstreamError::Client)?;
        Ok(Self {
            http,
            upstream,
            public,
        })
    }

    /// POSTs `body` to `[upstream]/Group` (with the request's query) and streams the answer back.
    pub async fn post_group(
        &self,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Bytes,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ApiError> {
        let mut url = self.upstream.clone();
        url.set_path(&format!(
            "{}/Group",
            self.upstream.path().trim_end_matches('/')
        ));
        url.set_query(query);
        let mut sent = headers.clone();
        strip(&mut sent);
        let original_host = sent.remove(HOST);
        for name in FORWARDING {
            sent.remove(name);
        }
        sent.remove(hyper::header::CONTENT_LENGTH);
        if let Ok(ip) = HeaderValue::try_from(peer.ip().to_string()) {
            sent.insert("x-forwarded-for", ip);
        }
        let proto = if self.public.scheme() == "https" {
            "https"
        } else {
            "http"
        };
        sent.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Some(original) = original_host {
            sent.insert("x-forwarded-host", original);
        }
        let answer = self
            .http
            .post(url)
            .headers(sent)
            .body(body)
            .send()
            .await
            .map_err(|e| ApiError::Gateway(error_chain(&e)))?;
        let mut response = Response::builder().status(answer.status());
        let mut received = answer.headers().clone();
        strip(&mut received);
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(rewritten) = received
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.rewrite(v))
            {
                received.insert(name, rewritten);
            }
        }
        if let Some(h) = response.headers_mut() {
            *h = received;
        }
        let stream = http_body_util::StreamBody::new(futures_util::TryStreamExt::map_ok(
            answer.bytes_stream(),
            hyper::body::Frame::data,
        ));
        let body = stream.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
        response
            .body(body)
            .map_err(|e| ApiError::Gateway(e.to_string()))
    }

    /// `value` with the upstream base replaced by the public base, if it starts with it.
    fn rewrite(&self, value: &str) -> Option<HeaderValue> {
        let upstream = self.upstream.as_str().trim_end_matches('/');
        let rest = value.strip_prefix(upstream)?;
        if !(rest.is_empty() || rest.starts_with(['/', '?'])) {
            return None;
        }
        let public = self.public.as_str().trim_end_matches('/');
        HeaderValue::from_str(&format!("{public}{rest}")).ok()
    }
}

/// Removes hop-by-hop headers, those the `Connection` header names included.
fn strip(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}
