//! Pass-through: every request the proxy does not own goes to the upstream and back, streamed.

pub mod affinity;

use std::net::SocketAddr;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH,
    CONTENT_LOCATION, CONTENT_TYPE, FORWARDED, HOST, LOCATION,
};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower_service::Service;
use url::Url;

use crate::http::{full, ApiError, Body, BoxError};
use crate::upstream::error_chain;
use affinity::{Affinity, Taken};

/// Largest CapabilityStatement the proxy will rewrite.
const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// Bulk Data Access canonical URLs advertised in the CapabilityStatement: unversioned (as 2.0.0 clients
/// match it), and per version the proxy implements.
const BULK_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const BULK_VERSIONS: [&str; 2] = ["2.0.0", "3.0.0"];
const OPERATION_BASE: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/";

/// The kick-off parameters every export level takes, as its operation's documentation lists them.
const EXPORT_PARAMETERS: &str = "_outputFormat, _since, _until, _type, _elements, _typeFilter, \
     includeAssociatedData (LatestProvenanceResources, RelevantProvenanceResources), allowPartialManifests";

/// What an operation's `documentation` says the proxy supports at a level.
fn operation_documentation(definition: &str) -> String {
    let per_patient = match definition {
        "export" => "",
        _ => ", patient (POST), organizeOutputBy=Patient",
    };
    format!(
        "Served by fhir-bulk-proxy. Parameters: {EXPORT_PARAMETERS}{per_patient}. \
         Prefer: respond-async (required), handling=lenient, separate-export-status."
    )
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The forwarding client and the two base URLs it translates between.
pub struct PassThrough {
    connector: Connector,
    client: Client<Connector, Incoming>,
    upstream: Url,
    /// `scheme://authority` of the upstream, what new connections connect to.
    origin: Uri,
    /// `Host` sent upstream.
    host: Option<HeaderValue>,
    public: Url,
    security: Option<serde_json::Value>,
}

impl PassThrough {
    /// A pass-through from `public` (what clients see) to `upstream`; `security` replaces
    /// `rest.security` in the CapabilityStatement when the proxy enforces authorization.
    pub fn new(upstream: Url, public: Url, security: Option<serde_json::Value>) -> Self {
        let mut http = HttpConnector::new();
        // Small request/response exchanges must not wait for Nagle's algorithm.
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https.clone());
        let origin = upstream
            .origin()
            .ascii_serialization()
            .parse()
            .expect("a URL's origin is a valid URI");
        let host = upstream.host_str().and_then(|authority| {
            let host = match upstream.port() {
                Some(port) => format!("{authority}:{port}"),
                None => authority.to_owned(),
            };
            HeaderValue::from_str(&host).ok()
        });
        Self {
            connector: https,
            client,
            upstream,
            origin,
            host,
            public,
            security,
        }
    }

    /// Forwards `req` and streams the upstream's answer back, on the inbound connection's own upstream
    /// connection unless that one is busy.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
    ) -> Result<Response<Body>, ApiError> {
        let response = self.send(req, peer, affinity).await?;
        Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
    }

    async fn send(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
    ) -> Result<Response<Incoming>, ApiError> {
        prepare_request_headers(req.headers_mut(), peer, self.host.as_ref(), &self.public);
        // Upstream connections are HTTP/1.1 whatever the client spoke to the proxy (HTTP/2 included).
        *req.version_mut() = Version::HTTP_11;
        let mut response = self.send_affine(req, affinity).await?;
        strip_hop_by_hop(response.headers_mut());
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(v) = response.headers().get(&name).and_then(|v| v.to_str().ok()) {
                if let Some(rewritten) = self.rewrite(v) {
                    response.headers_mut().insert(name, rewritten);
                }
            }
        }
        Ok(response)
    }

    async fn send_pooled(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ApiError> {
        *req.uri_mut() = self.upstream_uri(req.uri(), true)?;
        self.client
            .request(req)
            .await
            .map_err(|e| ApiError::Gateway(error_chain(&e)))
    }

    async fn send_affine(
        &self,
        mut req: Request<Incoming>,
        affinity: &Affinity,
    ) -> Result<Response<Incoming>, ApiError> {
        let taken = affinity.take();
        if let Taken::Busy = taken {
            return self.send_pooled(req).await;
        }
        let mut lease = Lease {
            affinity,
            sender: None,
            released: false,
        };
        let sender = match taken {
            Taken::Ready(sender) => lease.sender.insert(sender),
            _ => lease.sender.insert(self.connect(affinity).await?),
        };
        *req.uri_mut() = self.upstream_uri(req.uri(), false)?;
        let response = match sender.try_send_request(req).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // The upstream closed the idle connection as the request went out, before any of it was
                // written: it is safe to send on a fresh connection whatever its method.
                Some(req) => {
                    lease.sender = None;
                    let sender = lease.sender.insert(self.connect(affinity).await?);
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| ApiError::Gateway(error_chain(&e)))?
                }
                None => return Err(ApiError::Gateway(error_chain(&e.into_error()))),
            },
        };
        lease.release();
        Ok(response)
    }

    /// A new HTTP/1 connection to the upstream, run by the inbound connection's task.
    async fn connect(&self, affinity: &Affinity) -> Result<SendRequest<Incoming>, ApiError> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(|e| ApiError::Gateway(error_chain(&*e)))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| ApiError::Gateway(error_chain(&e)))?;
        affinity.adopt(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// `GET [base]/metadata`: the upstream's CapabilityStatement with the export operations added.
    pub async fn metadata(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
    ) -> Result<Response<Body>, ApiError> {
        // The body is rewritten, so ask for it uncompressed.
        req.headers_mut().remove(ACCEPT_ENCODING);
        let response = self.send(req, peer, affinity).await?;
        let is_json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        if response.status() != StatusCode::OK || !is_json {
            return Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()));
        }
        let (mut parts, body) = response.into_parts();
        let bytes = Limited::new(body, MAX_METADATA_BYTES)
            .collect()
            .await
            .map_err(|e| ApiError::Gateway(format!("reading the CapabilityStatement: {e}")))?
            .to_bytes();
        let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(mut statement) if statement["resourceType"] == "CapabilityStatement" => {
                add_export_operations(&mut statement, self.security.as_ref());
                bytes::Bytes::from(statement.to_string())
            }
            _ => bytes,
        };
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        Ok(Response::from_parts(parts, full(body)))
    }

    /// The upstream URI of a request: the public base path swapped for the upstream's; with the
    /// upstream's origin (`absolute`, for the pool) or without it (origin-form, for a connection).
    fn upstream_uri(&self, uri: &Uri, absolute: bool) -> Result<Uri, ApiError> {
        let path = uri.path();
        let public_path = self.public.path().trim_end_matches('/');
        let upstream_path = self.upstream.path().trim_end_matches('/');
        if !absolute && (public_path == upstream_path || !path.starts_with(public_path)) {
            // The common sidecar case (the same base path on both sides): the request's own target.
            let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
            return target
                .parse()
                .map_err(|e| ApiError::Gateway(format!("cannot build upstream URI: {e}")));
        }
        let mapped = match path.strip_prefix(public_path) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                format!("{upstream_path}{rest}")
            }
            _ => path.to_owned(),
        };
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let origin = if absolute {
            self.upstream.origin().ascii_serialization()
        } else {
            String::new()
        };
        format!("{origin}{mapped}{query}")
            .parse()
            .map_err(|e| ApiError::Gateway(format!("cannot build upstream URI: {e}")))
    }

    /// `value` with the upstream base replaced by the public base, if it starts with it.
    fn rewrite(&self, value: &str) -> Option<HeaderValue> {
        rewrite_base(&self.upstream, &self.public, value)
    }
}

/// `value` with the `upstream` base replaced by the `public` base, if it starts with it.
pub(crate) fn rewrite_base(upstream: &Url, public: &Url, value: &str) -> Option<HeaderValue> {
    let upstream = upstream.as_str().trim_end_matches('/');
    let rest = value.strip_prefix(upstream)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?'])) {
        return None;
    }
    let public = public.as_str().trim_end_matches('/');
    HeaderValue::from_str(&format!("{public}{rest}")).ok()
}

/// The affinity's connection while one request uses it; dropped unreleased (the request failed or was
/// abandoned), the connection is closed and the next request connects afresh.
struct Lease<'a> {
    affinity: &'a Affinity,
    sender: Option<SendRequest<Incoming>>,
    released: bool,
}

impl Lease<'_> {
    fn release(mut self) {
        self.affinity.give_back(self.sender.take());
        self.released = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.affinity.give_back(None);
        }
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present costs less than nine lookups.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
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

// Named once: a header name given as a string is parsed and hashed again on every use.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Readies a client's request headers for the upstream, `host` being the upstream's `Host` and
/// `public` the base URL clients use.
///
/// The proxy is the edge in front of the upstream, so forwarding headers a client sent are its own
/// claims, not a trusted hop's: they are replaced by what the proxy saw, and `Forwarded` is dropped.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    host: Option<&HeaderValue>,
    public: &Url,
) {
    strip_hop_by_hop(headers);
    let original_host = headers.remove(HOST);
    for name in [
        FORWARDED,
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
    ] {
        headers.remove(name);
    }
    if let Ok(ip) = HeaderValue::try_from(peer.ip().to_string()) {
        headers.insert(X_FORWARDED_FOR, ip);
    }
    // TLS, if any, ends in front of the proxy; the public base says whether clients use it.
    let proto = if public.scheme() == "https" {
        "https"
    } else {
        "http"
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(original) = original_host {
        headers.insert(X_FORWARDED_HOST, original);
    }
    if let Some(host) = host {
        headers.insert(HOST, host.clone());
    }
}

/// Adds the Bulk Data operations and canonical to a CapabilityStatement, replacing any `export` the
/// upstream lists (idempotent).
pub fn add_export_operations(
    statement: &mut serde_json::Value,
    security: Option<&serde_json::Value>,
) {
    fn add_operation(target: &mut serde_json::Value, definition: &str) {
        let Some(obj) = target.as_object_mut() else {
            return;
        };
        let ops = obj
            .entry("operation")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let Some(ops) = ops.as_array_mut() {
            // The upstream may advertise an `export` it cannot run; the proxy's is the one that works.
            ops.retain(|o| o["name"] != "export");
            let documentation = operation_documentation(definition);
            let definition = format!("{OPERATION_BASE}{definition}");
            ops.push(serde_json::json!({
                "name": "export",
                "definition": definition,
                "documentation": documentation,
            }));
        }
    }
    if let Some(obj) = statement.as_object_mut() {
        let instantiates = obj
            .entry("instantiates")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let Some(list) = instantiates.as_array_mut() {
            let versioned = BULK_VERSIONS.map(|v| format!("{BULK_CAPABILITY}|{v}"));
            for canonical in std::iter::once(BULK_CAPABILITY.to_owned()).chain(versioned) {
                if !list.iter().any(|v| *v == *canonical) {
                    list.push(canonical.into());
                }
            }
        }
    }
    let Some(rests) = statement["rest"].as_array_mut() else {
        return;
    };
    let Some(rest) = rests.iter_mut().find(|r| r["mode"] == "server") else {
        return;
    };
    add_operation(rest, "export");
    if let (Some(security), Some(rest)) = (security, rest.as_object_mut()) {
        // Keep what the upstream says about CORS; the rest describes the proxy's authorization.
        let cors = rest.get("security").and_then(|s| s.get("cors")).cloned();
        let mut security = security.clone();
        if let (Some(cors), Some(obj)) = (cors, security.as_object_mut()) {
            obj.insert("cors".into(), cors);
        }
        rest.insert("security".into(), security);
    }
    for resource in rest["resource"].as_array_mut().into_iter().flatten() {
        match resource["type"].as_str() {
            Some("Patient") => add_operation(resource, "patient-export"),
            Some("Group") => add_operation(resource, "group-export"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> PassThrough {
        PassThrough::new(
            Url::parse("http://127.0.0.1:8090/fhir").unwrap(),
            Url::parse("http://127.0.0.1:7000/r4").unwrap(),
            None,
        )
    }

    #[test]
    fn maps_paths_and_rewrites_locations() {
        let p = pass();
        let request = "/r4/Patient/1/_history?_count=2".parse().unwrap();
        assert_eq!(
            p.upstream_uri(&request, true).unwrap().to_string(),
            "http://127.0.0.1:8090/fhir/Patient/1/_history?_count=2"
        );
        assert_eq!(
            p.upstream_uri(&request, false).unwrap().to_string(),
            "/fhir/Patient/1/_history?_count=2"
        );
        let outside = "/r4x/Patient".parse().unwrap();
        assert_eq!(
            p.upstream_uri(&outside, true).unwrap().to_string(),
            "http://127.0.0.1:8090/r4x/Patient"
        );
        assert_eq!(
            p.upstream_uri(&outside, false).unwrap().to_string(),
            "/r4x/Patient"
        );
        let same_base = PassThrough::new(
            Url::parse("http://127.0.0.1:8090/fhir").unwrap(),
            Url::parse("http://127.0.0.1:7000/fhir/").unwrap(),
            None,
        );
        assert_eq!(
            same_base
                .upstream_uri(&"/fhir/Patient?name=a%20b".parse().unwrap(), false)
                .unwrap()
                .to_string(),
            "/fhir/Patient?name=a%20b"
        );
        assert_eq!(
            p.rewrite("http://127.0.0.1:8090/fhir/Patient/1/_history/1")
                .unwrap(),
            "http://127.0.0.1:7000/r4/Patient/1/_history/1"
        );
        assert!(p.rewrite("http://127.0.0.1:8090/fhirx/Patient").is_none());
        assert!(p.rewrite("http://elsewhere/fhir/Patient").is_none());
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(HOST, HeaderValue::from_static("proxy.example:443"));
        let p = pass();
        prepare_request_headers(
            &mut h,
            "10.0.0.1:5000".parse().unwrap(),
            p.host.as_ref(),
            &p.public,
        );
        assert!(
            h.get("x-secret").is_none()
                && h.get(CONNECTION).is_none()
                && h.get("keep-alive").is_none()
        );
        assert_eq!(h["x-kept"], "1");
        assert_eq!(h[HOST], "127.0.0.1:8090");
        assert_eq!(h["x-forwarded-host"], "proxy.example:443");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn client_forwarding_headers_are_replaced_by_the_proxys() {
        for (public, proto) in [
            ("http://127.0.0.1:7000/r4", "http"),
            ("https://fhir.example/r4", "https"),
        ] {
            let p = PassThrough::new(
                Url::parse("http://127.0.0.1:8090/fhir").unwrap(),
                Url::parse(public).unwrap(),
                None,
            );
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static("proxy.example"));
            h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
            h.append("x-forwarded-for", HeaderValue::from_static("7.7.7.7"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            h.insert("forwarded", HeaderValue::from_static("for=evil"));
            h.append("forwarded", HeaderValue::from_static("host=evil.example"));
            prepare_request_headers(
                &mut h,
                "10.0.0.1:5000".parse().unwrap(),
                p.host.as_ref(),
                &p.public,
            );
            let all = |name: &str| -> Vec<&str> {
                h.get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect()
            };
            assert_eq!(all("x-forwarded-for"), ["10.0.0.1"], "{public}");
            assert_eq!(all("x-forwarded-proto"), [proto], "{public}");
            assert_eq!(all("x-forwarded-host"), ["proxy.example"], "{public}");
            assert!(all("forwarded").is_empty(), "{public}");
        }
    }

    #[test]
    fn capability_statement_gains_export_operations_once() {
        let mut cs = serde_json::json!({"resourceType":"CapabilityStatement","rest":[{"mode":"server",
            "resource":[{"type":"Patient"},{"type":"Group","operation":[{"name":"export","definition":"x"}]},{"type":"Observation"}]}]});
        add_export_operations(&mut cs, None);
        add_export_operations(&mut cs, Some(&serde_json::json!({"service": []})));
        assert_eq!(
            cs["instantiates"],
            serde_json::json!([
                BULK_CAPABILITY,
                "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data|2.0.0",
                "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data|3.0.0"
            ])
        );
        let group_docs = cs["rest"][0]["resource"][1]["operation"][0]["documentation"]
            .as_str()
            .unwrap();
        assert!(group_docs.contains("organizeOutputBy"), "{group_docs}");
        let system_docs = cs["rest"][0]["operation"][0]["documentation"]
            .as_str()
            .unwrap();
        assert!(system_docs.contains("_until") && !system_docs.contains("organizeOutputBy"));
        assert_eq!(
            cs["rest"][0]["security"],
            serde_json::json!({"service": []})
        );
        assert_eq!(cs["rest"][0]["operation"].as_array().unwrap().len(), 1);
        assert_eq!(
            cs["rest"][0]["resource"][0]["operation"][0]["definition"],
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
        );
        assert_eq!(
            cs["rest"][0]["resource"][1]["operation"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(cs["rest"][0]["resource"][2].get("operation").is_none());
    }
}
