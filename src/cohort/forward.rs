//! A `POST Group` with `Prefer: respond-async` whose body turned out not to be a cohort, sent on to the
//! upstream as it came.
//!
//! Its body had to be read to tell, and the pass-through path ([`crate::proxy`]) only forwards request
//! bodies still streaming from the client; this sends the bytes read instead, with the same header
//! treatment, by the proxy's own functions (hop-by-hop headers dropped, forwarding headers the proxy's own, `Location` and
//! `Content-Location` rewritten to the public base). It is the only such request: every other one goes
//! the ordinary pass-through way.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{CONTENT_LOCATION, LOCATION};
use hyper::{HeaderMap, Response};
use url::Url;

use crate::http::{ApiError, Body, BoxError};
use crate::proxy::{prepare_request_headers, rewrite_base, strip_hop_by_hop};
use crate::upstream::{error_chain, UpstreamError};

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
        // The client sets Host and the length of the bytes it sends.
        prepare_request_headers(&mut sent, peer, None, &self.public);
        sent.remove(hyper::header::CONTENT_LENGTH);
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
        strip_hop_by_hop(&mut received);
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(rewritten) = received
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| rewrite_base(&self.upstream, &self.public, v))
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
}
