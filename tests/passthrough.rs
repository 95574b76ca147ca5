//! Pass-through: every request the proxy does not own must reach the upstream and come back unchanged.
//!
//! Each test makes the same request directly to the read-write upstream and through the proxy and compares
//! status, headers and body bytes. What may differ:
//! - hop-by-hop headers (Connection, Keep-Alive, Transfer-Encoding, TE, Trailer, Upgrade, Proxy-*);
//! - `Date`, and any header whose value the upstream itself changes between two identical direct requests
//!   (found at run time by making the direct request twice);
//! - `Location` / `Content-Location`, which the proxy rewrites from the upstream base to its public base;
//! - body fields that the upstream generates afresh on every request (named at each call site, and checked to
//!   be the only difference between the two direct answers).
//!
//! Requests with side effects (create, update, delete) cannot be repeated, so their answer through the proxy is
//! compared with a direct read of what they wrote, and with the answer to the same request on a twin resource
//! made directly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use common::{client, upstream_rw, Proxy};
use reqwest::blocking::{Body, Client};
use reqwest::Method;
use serde_json::{json, Value};

const BULK_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_DEF: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_DEF: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_DEF: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// Body fields of a search or history Bundle that the upstream generates per request.
const BUNDLE_VOLATILE: &[&str] = &["/id", "/meta/lastUpdated"];
/// The upstream gives every OperationOutcome it answers with a fresh `id`.
const OUTCOME_VOLATILE: &[&str] = &["/id"];

/// One HTTP answer, headers keyed by lower-case name.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.body);
        if s.chars().count() > 2000 {
            let head: String = s.chars().take(2000).collect();
            format!("{head}... ({} bytes)", self.body.len())
        } else {
            s.into_owned()
        }
    }
}

/// A request that can be sent to the upstream and to the proxy alike: `path` is relative to the FHIR base.
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Req {
    fn new(method: Method, path: impl Into<String>) -> Req {
        Req {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn get(path: impl Into<String>) -> Req {
        Req::new(Method::GET, path)
    }

    fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn fhir_json(mut self, body: &Value) -> Req {
        self.body = Some(serde_json::to_vec(body).unwrap());
        self.header("Content-Type", "application/fhir+json")
    }

    fn send(&self, http: &Client, base: &str) -> Resp {
        let url = format!("{base}{}", self.path);
        let mut rb = http.request(self.method.clone(), &url);
        for (k, v) in &self.headers {
            rb = rb.header(k, v);
        }
        if let Some(body) = &self.body {
            rb = rb.body(body.clone());
        }
        let resp = rb
            .send()
            .unwrap_or_else(|e| panic!("{} {url}: {e}", self.method));
        collect(resp)
    }
}

fn collect(resp: reqwest::blocking::Response) -> Resp {
    let status = resp.status().as_u16();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in resp.headers() {
        headers
            .entry(k.as_str().to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let body = resp.bytes().expect("read response body").to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// The two bases, and the proxy process (kept alive as long as the test runs).
struct Env {
    upstream: String,
    proxy: Proxy,
    http: Client,
}

impl Env {
    fn start() -> Env {
        let upstream = upstream_rw();
        let proxy = Proxy::start(&upstream, "");
        Env {
            upstream,
            proxy,
            http: client(),
        }
    }

    fn direct(&self, req: &Req) -> Resp {
        req.send(&self.http, &self.upstream)
    }

    fn via_proxy(&self, req: &Req) -> Resp {
        req.send(&self.http, &self.proxy.base)
    }

    /// What a `Location` the upstream sent must look like after the proxy's rewrite.
    fn rewrite(&self, value: &str) -> String {
        match value.strip_prefix(&self.upstream) {
            Some(rest) => format!("{}{rest}", self.proxy.base),
            None => value.to_owned(),
        }
    }

    /// Sends `req` directly twice and through the proxy once, and compares (see the module comment).
    /// `body_volatile`: JSON pointers of body fields the upstream generates per request.
    #[track_caller]
    fn assert_passthrough(&self, what: &str, req: &Req, body_volatile: &[&str]) -> Resp {
        let d1 = self.direct(req);
        let d2 = self.direct(req);
        let p = self.via_proxy(req);
        self.compare(what, [&d1, &d2], &p, body_volatile);
        p
    }

    #[track_caller]
    fn compare(&self, what: &str, direct: [&Resp; 2], p: &Resp, body_volatile: &[&str]) {
        let [d1, d2] = direct;
        assert_eq!(
            d1.status, d2.status,
            "{what}: the upstream answers the same request differently; the test cannot compare"
        );
        assert_eq!(
            p.status,
            d1.status,
            "{what}: status through the proxy differs from the upstream's\nproxy body: {}\nupstream body: {}",
            p.text(),
            d1.text()
        );
        let mut volatile: BTreeSet<String> = BTreeSet::from(["date".to_owned()]);
        for name in d1.headers.keys().chain(d2.headers.keys()) {
            if d1.headers.get(name) != d2.headers.get(name) {
                volatile.insert(name.clone());
            }
        }
        let expected = self.comparable_headers(d1, &volatile, true);
        let got = self.comparable_headers(p, &volatile, false);
        assert_eq!(
            got, expected,
            "{what}: headers through the proxy (left) differ from the upstream's (right), \
             ignoring hop-by-hop and per-request ones {volatile:?}"
        );
        self.compare_bodies(what, [d1, d2], p, body_volatile);
    }

    /// Headers that must pass unchanged: hop-by-hop and `volatile` ones removed; with `rewrite`, the upstream's
    /// `Location`/`Content-Location` are turned into what the proxy must send.
    fn comparable_headers(
        &self,
        r: &Resp,
        volatile: &BTreeSet<String>,
        rewrite: bool,
    ) -> BTreeMap<String, Vec<String>> {
        r.headers
            .iter()
            .filter(|(k, _)| !is_hop_by_hop(k) && !volatile.contains(*k))
            .map(|(k, v)| {
                let v = if rewrite && (k == "location" || k == "content-location") {
                    v.iter().map(|x| self.rewrite(x)).collect()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    #[track_caller]
    fn compare_bodies(&self, what: &str, direct: [&Resp; 2], p: &Resp, body_volatile: &[&str]) {
        let [d1, d2] = direct;
        if d1.body == d2.body {
            assert!(
                p.body == d1.body,
                "{what}: body through the proxy differs from the upstream's\nproxy:    {}\nupstream: {}",
                p.text(),
                d1.text()
            );
            return;
        }
        // The upstream's own body changed between the two direct requests: compare byte for byte with the
        // per-request fields masked, after checking that those fields are the only difference.
        let (m1, m2) = (mask(&d1.body, body_volatile), mask(&d2.body, body_volatile));
        assert!(
            m1 == m2,
            "{what}: the upstream's body varies per request beyond {body_volatile:?}:\n{}\n{}",
            String::from_utf8_lossy(&m1),
            String::from_utf8_lossy(&m2)
        );
        let mp = mask(&p.body, body_volatile);
        assert!(
            mp == m1,
            "{what}: body through the proxy differs from the upstream's (ignoring {body_volatile:?})\n\
             proxy:    {}\nupstream: {}",
            String::from_utf8_lossy(&mp),
            String::from_utf8_lossy(&m1)
        );
    }

    /// Checks the answer to a create or update sent through the proxy for the resource at `path`
    /// (e.g. `/Patient/abc`): `twin` is the answer to the same kind of request, made directly, for `twin_path`.
    /// The status and header names must be the twin's, `Location` the twin's with the id swapped and the base
    /// rewritten, and the body and the remaining headers those of a direct read of what was written.
    #[track_caller]
    fn assert_write_like_twin(
        &self,
        what: &str,
        p: &Resp,
        path: &str,
        twin: &Resp,
        twin_path: &str,
    ) {
        assert_eq!(
            p.status,
            twin.status,
            "{what}: status through the proxy differs from the upstream's for the same request\n\
             proxy body: {}\nupstream body: {}",
            p.text(),
            twin.text()
        );
        let names = |r: &Resp| -> BTreeSet<String> {
            r.headers
                .keys()
                .filter(|k| !is_hop_by_hop(k))
                .cloned()
                .collect()
        };
        assert_eq!(
            names(p),
            names(twin),
            "{what}: header names through the proxy (left) differ from the upstream's (right)"
        );
        let twin_location = twin
            .header("location")
            .unwrap_or_else(|| panic!("{what}: the upstream sent no Location"));
        assert!(
            twin_location.contains(twin_path),
            "{what}: unexpected upstream Location {twin_location}"
        );
        let expected_location = self.rewrite(&twin_location.replacen(twin_path, path, 1));
        assert!(
            expected_location.starts_with(&self.proxy.base),
            "{what}: upstream Location {twin_location} is not under the upstream base {}",
            self.upstream
        );
        assert_eq!(
            p.header("location"),
            Some(expected_location.as_str()),
            "{what}: Location must be the upstream's, rewritten to the proxy base"
        );
        let read = self.direct(&Req::get(path));
        assert_eq!(read.status, 200, "{what}: direct read of {path}");
        assert!(
            p.body == read.body,
            "{what}: body through the proxy differs from a direct read of what was written\n\
             proxy:       {}\ndirect read: {}",
            p.text(),
            read.text()
        );
        let volatile = BTreeSet::from(["date".to_owned(), "location".to_owned()]);
        assert_eq!(
            self.comparable_headers(p, &volatile, false),
            self.comparable_headers(&read, &volatile, false),
            "{what}: headers through the proxy (left) differ from those of a direct read (right)"
        );
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Replaces, in the raw body, the first occurrence of the value at each JSON pointer with a placeholder, so
/// that everything else can still be compared byte for byte. Pointers absent from the body are ignored.
fn mask(body: &[u8], pointers: &[&str]) -> Vec<u8> {
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    let mut text = String::from_utf8_lossy(body).into_owned();
    for ptr in pointers {
        if let Some(v) = doc.pointer(ptr) {
            let needle = serde_json::to_string(v).unwrap();
            text = text.replacen(&needle, &format!("\"<{ptr} varies per request>\""), 1);
        }
    }
    text.into_bytes()
}

/// A FHIR id that no other test (or earlier run) uses.
fn unique_id(prefix: &str) -> String {
    format!("fbp-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn patient(id: Option<&str>, family: &str) -> Value {
    let mut p = json!({
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Pass", "Through"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01"
    });
    if let Some(id) = id {
        p["id"] = json!(id);
    }
    p
}

/// Creates (or replaces) `Type/id` directly on the upstream.
#[track_caller]
fn put_direct(env: &Env, path: &str, body: &Value) -> Resp {
    let r = env.direct(&Req::new(Method::PUT, path).fhir_json(body));
    assert!(
        r.status == 200 || r.status == 201,
        "direct PUT {path}: {} {}",
        r.status,
        r.text()
    );
    r
}

fn created_id(what: &str, r: &Resp) -> String {
    r.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: created resource has no id: {}", r.text()))
        .to_owned()
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, expected) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), expected);
    }
}

#[test]
fn read_and_vread_pass_through() {
    let env = Env::start();
    let id = unique_id("read");
    put_direct(
        &env,
        &format!("/Patient/{id}"),
        &patient(Some(&id), "Reader"),
    );
    env.assert_passthrough("read", &Req::get(format!("/Patient/{id}")), &[]);
    env.assert_passthrough(
        "read with _format",
        &Req::get(format!("/Patient/{id}?_format=json")),
        &[],
    );
    env.assert_passthrough("vread", &Req::get(format!("/Patient/{id}/_history/1")), &[]);
}

#[test]
fn search_passes_through() {
    let env = Env::start();
    let family = unique_id("search").replace('-', "");
    let system = format!("urn:fbp-test:{family}");
    for i in 0..3 {
        let id = format!("{family}-{i}");
        let mut p = patient(Some(&id), &family);
        p["identifier"] = json!([{"system": system, "value": format!("v{i}")}]);
        put_direct(&env, &format!("/Patient/{id}"), &p);
    }
    // Search Bundles carry an `id` and `meta.lastUpdated` that the upstream generates per request: those two
    // fields are masked, the rest of the body (links, total, entries) must be byte-identical.
    let p = env.assert_passthrough(
        "search by family",
        &Req::get(format!("/Patient?family={family}&_count=2")),
        BUNDLE_VOLATILE,
    );
    assert_eq!(p.json()["total"], 3, "search by family: {}", p.text());
    // The query string must reach the upstream unchanged, percent-encoding included.
    let p = env.assert_passthrough(
        "search by token with an encoded |",
        &Req::get(format!("/Patient?identifier={system}%7Cv1")),
        BUNDLE_VOLATILE,
    );
    assert_eq!(p.json()["total"], 1, "search by identifier: {}", p.text());
    // An encoded `&` inside a value: decoding it on the way would split the parameter and match both.
    let amp = format!("{family}x");
    put_direct(
        &env,
        &format!("/Patient/{family}-amp1"),
        &patient(Some(&format!("{family}-amp1")), &format!("{amp}&y")),
    );
    put_direct(
        &env,
        &format!("/Patient/{family}-amp2"),
        &patient(Some(&format!("{family}-amp2")), &amp),
    );
    let p = env.assert_passthrough(
        "search with an encoded & in a value",
        &Req::get(format!("/Patient?family={amp}%26y")),
        BUNDLE_VOLATILE,
    );
    assert_eq!(
        p.json()["total"],
        1,
        "search by family with &: {}",
        p.text()
    );
}

#[test]
fn search_post_form_body_passes_through() {
    let env = Env::start();
    let family = unique_id("form").replace('-', "");
    put_direct(
        &env,
        &format!("/Patient/{family}"),
        &patient(Some(&family), &family),
    );
    let mut req = Req::new(Method::POST, "/Patient/_search")
        .header("Content-Type", "application/x-www-form-urlencoded");
    req.body = Some(format!("family={family}").into_bytes());
    let p = env.assert_passthrough("POST _search with a form body", &req, BUNDLE_VOLATILE);
    assert_eq!(p.json()["total"], 1, "POST _search: {}", p.text());
}

#[test]
fn create_rewrites_location_to_the_proxy_base() {
    let env = Env::start();
    let family = unique_id("create");
    let req = Req::new(Method::POST, "/Patient").fhir_json(&patient(None, &family));
    let twin = env.direct(&req);
    assert_eq!(twin.status, 201, "direct create: {}", twin.text());
    let twin_id = created_id("direct create", &twin);
    let p = env.via_proxy(&req);
    assert_eq!(p.status, 201, "create through the proxy: {}", p.text());
    let id = created_id("create through the proxy", &p);
    assert_ne!(id, twin_id);
    env.assert_write_like_twin(
        "create",
        &p,
        &format!("/Patient/{id}"),
        &twin,
        &format!("/Patient/{twin_id}"),
    );
    // And what was created reads the same through the proxy.
    env.assert_passthrough(
        "read after create",
        &Req::get(format!("/Patient/{id}")),
        &[],
    );
}

#[test]
fn update_passes_through() {
    let env = Env::start();
    let id = unique_id("update");
    let twin_id = unique_id("update-twin");
    put_direct(
        &env,
        &format!("/Patient/{id}"),
        &patient(Some(&id), "Before"),
    );
    put_direct(
        &env,
        &format!("/Patient/{twin_id}"),
        &patient(Some(&twin_id), "Before"),
    );
    let twin = env.direct(
        &Req::new(Method::PUT, format!("/Patient/{twin_id}"))
            .fhir_json(&patient(Some(&twin_id), "After")),
    );
    let p = env.via_proxy(
        &Req::new(Method::PUT, format!("/Patient/{id}")).fhir_json(&patient(Some(&id), "After")),
    );
    env.assert_write_like_twin(
        "update",
        &p,
        &format!("/Patient/{id}"),
        &twin,
        &format!("/Patient/{twin_id}"),
    );
    assert_eq!(p.json()["name"][0]["family"], "After");
    assert_eq!(p.json()["meta"]["versionId"], "2");
    // Update-as-create of a new id (201) goes through the same way.
    let new_id = unique_id("update-create");
    let new_twin_id = unique_id("update-create-twin");
    let twin = env.direct(
        &Req::new(Method::PUT, format!("/Patient/{new_twin_id}"))
            .fhir_json(&patient(Some(&new_twin_id), "New")),
    );
    let p = env.via_proxy(
        &Req::new(Method::PUT, format!("/Patient/{new_id}"))
            .fhir_json(&patient(Some(&new_id), "New")),
    );
    env.assert_write_like_twin(
        "update as create",
        &p,
        &format!("/Patient/{new_id}"),
        &twin,
        &format!("/Patient/{new_twin_id}"),
    );
}

#[test]
fn delete_passes_through() {
    let env = Env::start();
    let id = unique_id("delete");
    let path = format!("/Patient/{id}");
    put_direct(&env, &path, &patient(Some(&id), "Deleted"));
    let req = Req::new(Method::DELETE, &path);
    let p = env.via_proxy(&req);
    // The upstream answers a repeated delete exactly like the first one (200 and an informational
    // OperationOutcome), so the proxy's answer is compared with two direct repeats.
    let d1 = env.direct(&req);
    let d2 = env.direct(&req);
    env.compare("delete", [&d1, &d2], &p, OUTCOME_VOLATILE);
    let gone = env.direct(&Req::get(&path));
    assert_eq!(
        gone.status, 410,
        "direct read after delete through the proxy"
    );
    env.assert_passthrough(
        "read of a deleted resource",
        &Req::get(&path),
        OUTCOME_VOLATILE,
    );
}

#[test]
fn conditional_create_passes_through() {
    let env = Env::start();
    let value = unique_id("cond");
    let mut body = patient(None, "Conditional");
    body["identifier"] = json!([{"system": "urn:fbp-test:conditional", "value": value}]);
    let req = Req::new(Method::POST, "/Patient").fhir_json(&body).header(
        "If-None-Exist",
        &format!("identifier=urn:fbp-test:conditional|{value}"),
    );
    // A twin that does not match anything yet, created directly, for the status and headers of a create.
    let twin_value = unique_id("cond-twin");
    let mut twin_body = body.clone();
    twin_body["identifier"][0]["value"] = json!(twin_value);
    let twin = env.direct(
        &Req::new(Method::POST, "/Patient")
            .fhir_json(&twin_body)
            .header(
                "If-None-Exist",
                &format!("identifier=urn:fbp-test:conditional|{twin_value}"),
            ),
    );
    assert_eq!(
        twin.status,
        201,
        "direct conditional create: {}",
        twin.text()
    );
    let twin_id = created_id("direct conditional create", &twin);

    let first = env.via_proxy(&req);
    assert_eq!(
        first.status,
        201,
        "conditional create (no match) through the proxy: {}",
        first.text()
    );
    let id = created_id("conditional create", &first);
    env.assert_write_like_twin(
        "conditional create (no match)",
        &first,
        &format!("/Patient/{id}"),
        &twin,
        &format!("/Patient/{twin_id}"),
    );
    // Now it matches: the upstream answers without creating anything, which can be repeated and compared.
    let p = env.assert_passthrough("conditional create (match)", &req, &[]);
    assert_eq!(created_id("conditional create (match)", &p), id);
    let search = env.direct(&Req::get(format!(
        "/Patient?identifier=urn:fbp-test:conditional%7C{value}"
    )));
    assert_eq!(
        search.json()["total"],
        1,
        "the proxy must not have created a duplicate: {}",
        search.text()
    );
}

#[test]
fn history_passes_through() {
    let env = Env::start();
    let id = unique_id("history");
    let path = format!("/Patient/{id}");
    put_direct(&env, &path, &patient(Some(&id), "First"));
    put_direct(&env, &path, &patient(Some(&id), "Second"));
    // History Bundles carry a per-request `id` (and `meta.lastUpdated` when present): masked.
    let p = env.assert_passthrough(
        "instance history",
        &Req::get(format!("{path}/_history")),
        BUNDLE_VOLATILE,
    );
    assert_eq!(p.json()["total"], 2, "instance history: {}", p.text());
    env.assert_passthrough(
        "instance history with _count",
        &Req::get(format!("{path}/_history?_count=1")),
        BUNDLE_VOLATILE,
    );
}

#[test]
fn binary_passes_through() {
    let env = Env::start();
    // The upstream (sekmet-fhir) stores Binary as a FHIR resource only: it rejects raw (non-JSON) bodies and
    // cannot produce a raw Binary for `Accept: application/octet-stream`. So the Binary is created as JSON with
    // a non-JSON `contentType`, read back as raw bytes and compared byte for byte, and the raw-content
    // requests are checked to pass the upstream's own answers through unchanged.
    let content = random_bytes(4096);
    let resource = json!({
        "resourceType": "Binary",
        "contentType": "application/octet-stream",
        "data": base64(&content),
    });
    let req = Req::new(Method::POST, "/Binary").fhir_json(&resource);
    let twin = env.direct(&req);
    assert_eq!(twin.status, 201, "direct Binary create: {}", twin.text());
    let twin_id = created_id("direct Binary create", &twin);
    let p = env.via_proxy(&req);
    let id = created_id("Binary create through the proxy", &p);
    env.assert_write_like_twin(
        "Binary create",
        &p,
        &format!("/Binary/{id}"),
        &twin,
        &format!("/Binary/{twin_id}"),
    );
    let read = env.assert_passthrough("Binary read", &Req::get(format!("/Binary/{id}")), &[]);
    assert_eq!(read.json()["data"], json!(base64(&content)));
    assert_eq!(read.json()["contentType"], "application/octet-stream");
    env.assert_passthrough(
        "Binary read asking for the raw content",
        &Req::get(format!("/Binary/{id}")).header("Accept", "application/octet-stream"),
        OUTCOME_VOLATILE,
    );
    let mut raw =
        Req::new(Method::POST, "/Binary").header("Content-Type", "application/octet-stream");
    raw.body = Some(b"\x00\x01\x02 raw bytes, not JSON".to_vec());
    env.assert_passthrough("raw Binary create", &raw, OUTCOME_VOLATILE);
}

#[test]
fn error_responses_pass_through() {
    let env = Env::start();
    let missing = unique_id("missing");
    env.assert_passthrough(
        "read of an unknown id",
        &Req::get(format!("/Patient/{missing}")),
        OUTCOME_VOLATILE,
    );
    env.assert_passthrough(
        "unknown resource type",
        &Req::get(format!("/NotAResourceType/{missing}")),
        OUTCOME_VOLATILE,
    );
    let mut bad =
        Req::new(Method::POST, "/Patient").header("Content-Type", "application/fhir+json");
    bad.body = Some(b"{not json".to_vec());
    env.assert_passthrough("invalid JSON body", &bad, OUTCOME_VOLATILE);
    let p = env.via_proxy(&Req::get(format!("/Patient/{missing}")));
    assert_eq!(p.status, 404);
}

/// Hands out a body in small pieces, so that the request is sent chunked, without a Content-Length.
struct Trickle {
    data: std::io::Cursor<Vec<u8>>,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(16 * 1024);
        self.data.read(&mut buf[..n])
    }
}

#[test]
fn large_request_body_is_streamed_intact() {
    let env = Env::start();
    let content = random_bytes(1536 * 1024); // 2 MiB of base64 in the JSON body
    let data = base64(&content);
    let resource = json!({
        "resourceType": "Binary",
        "contentType": "application/octet-stream",
        "data": data,
    });
    let body = serde_json::to_vec(&resource).unwrap();
    assert!(body.len() >= 2 * 1024 * 1024);
    let resp = env
        .http
        .post(format!("{}/Binary", env.proxy.base))
        .header("Content-Type", "application/fhir+json")
        .body(Body::new(Trickle {
            data: std::io::Cursor::new(body),
        }))
        .send()
        .expect("POST a 2 MiB Binary through the proxy");
    let p = collect(resp);
    assert_eq!(p.status, 201, "2 MiB Binary create: {}", p.text());
    let created = p.json();
    assert!(
        created["data"] == json!(data),
        "the upstream stored something other than what was sent"
    );
    let id = created_id("2 MiB Binary", &p);
    let read = env.direct(&Req::get(format!("/Binary/{id}")));
    assert_eq!(read.status, 200);
    assert!(read.json()["data"] == json!(data));
    // The 2 MiB answer comes back through the proxy intact as well.
    assert!(
        p.body == read.body,
        "create answer through the proxy differs from a direct read"
    );
    env.assert_passthrough("2 MiB Binary read", &Req::get(format!("/Binary/{id}")), &[]);
}

/// Removes every operation named `export` from `ops`, and the array itself when it becomes empty.
fn drop_export_ops(holder: &mut Value) {
    if let Some(ops) = holder.get_mut("operation").and_then(Value::as_array_mut) {
        ops.retain(|o| o["name"] != "export");
        if ops.is_empty() {
            holder.as_object_mut().unwrap().remove("operation");
        }
    }
}

fn export_ops<'a>(holder: &'a Value, what: &str) -> Vec<&'a Value> {
    holder["operation"]
        .as_array()
        .unwrap_or_else(|| panic!("{what} has no operation array: {holder}"))
        .iter()
        .filter(|o| o["name"] == "export")
        .collect()
}

fn resource_entry<'a>(cs: &'a Value, ty: &str) -> &'a Value {
    cs["rest"][0]["resource"]
        .as_array()
        .expect("rest[0].resource")
        .iter()
        .find(|r| r["type"] == ty)
        .unwrap_or_else(|| panic!("no {ty} in rest[0].resource"))
}

#[test]
fn metadata_advertises_bulk_export_and_keeps_the_rest() {
    let env = Env::start();
    let direct = env.direct(&Req::get("/metadata"));
    assert_eq!(direct.status, 200);
    let p = env.via_proxy(&Req::get("/metadata"));
    assert_eq!(p.status, 200, "metadata through the proxy: {}", p.text());
    let ct = p.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/fhir+json"),
        "metadata content type {ct}"
    );
    let mut got = p.json();
    let mut expected = direct.json();

    // What the proxy adds.
    let instantiates: Vec<&str> = got["instantiates"]
        .as_array()
        .expect("instantiates")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for canonical in [
        BULK_CAPABILITY.to_owned(),
        format!("{BULK_CAPABILITY}|2.0.0"),
        format!("{BULK_CAPABILITY}|3.0.0"),
    ] {
        assert!(
            instantiates.contains(&canonical.as_str()),
            "instantiates {instantiates:?} lacks {canonical}"
        );
    }
    for (what, holder, definition) in [
        ("rest[0]", &got["rest"][0], EXPORT_DEF),
        (
            "Patient",
            resource_entry(&got, "Patient"),
            PATIENT_EXPORT_DEF,
        ),
        ("Group", resource_entry(&got, "Group"), GROUP_EXPORT_DEF),
    ] {
        let ops = export_ops(holder, what);
        assert_eq!(
            ops.len(),
            1,
            "{what}: exactly one `export` operation expected (the upstream's own, if any, replaced): {ops:?}"
        );
        assert_eq!(ops[0]["definition"], definition, "{what}: {ops:?}");
    }

    // Everything else as the upstream says it; `date` is the upstream's per-request timestamp.
    for cs in [&mut got, &mut expected] {
        let obj = cs.as_object_mut().unwrap();
        obj.remove("date");
        if let Some(list) = obj.get_mut("instantiates").and_then(Value::as_array_mut) {
            list.retain(|v| !v.as_str().is_some_and(|c| c.starts_with(BULK_CAPABILITY)));
            if list.is_empty() {
                obj.remove("instantiates");
            }
        }
        drop_export_ops(&mut cs["rest"][0]);
        for r in cs["rest"][0]["resource"].as_array_mut().unwrap() {
            drop_export_ops(r);
        }
    }
    assert!(
        got == expected,
        "metadata through the proxy differs from the upstream's beyond the bulk export additions:\n\
         proxy:    {got}\nupstream: {expected}"
    );
}
