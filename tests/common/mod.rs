//! Shared harness of the integration tests: runs the real binary against the real upstream.
#![allow(dead_code)]

pub mod auth;
mod client;
mod expect;
pub mod mock;
mod proxy;

// Each test binary uses a part of the harness, so some of these re-exports go unused in each.
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use expect::*;
#[allow(unused_imports)]
pub use proxy::wait_or_kill;
pub use proxy::Proxy;

use std::collections::BTreeSet;
use std::io::BufRead;

use serde_json::Value;

/// Base URL of the read-only upstream loaded with synthetic patients (set by `tests/run`).
pub fn upstream() -> String {
    std::env::var("FBP_TEST_UPSTREAM")
        .expect("FBP_TEST_UPSTREAM is not set: run the integration tests through tests/run")
}

/// A token unique to this test run, for names written to shared upstreams and buckets.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Creates `resource` on the writable upstream, insisting on 201; returns the resource as created.
pub fn create_rw(resource: &Value) -> Value {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let resp = client()
        .post(format!("{}/{resource_type}", upstream_rw()))
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201, "creating a {resource_type} upstream");
    resp.json().unwrap()
}

/// Applies `edit` to every string in `value`, at any depth.
pub fn edit_strings(value: &mut Value, edit: &dyn Fn(&mut String)) {
    match value {
        Value::String(s) => edit(s),
        Value::Array(items) => items.iter_mut().for_each(|v| edit_strings(v, edit)),
        Value::Object(map) => map.values_mut().for_each(|v| edit_strings(v, edit)),
        _ => {}
    }
}

/// Base URL of the upstream that tests may write to (set by `tests/run`).
pub fn upstream_rw() -> String {
    std::env::var("FBP_TEST_UPSTREAM_RW")
        .expect("FBP_TEST_UPSTREAM_RW is not set: run the integration tests through tests/run")
}

/// Reads one HTTP/1.1 request head from `reader`, for the tests' own small servers: its request line and
/// header lines (without the blank line) and its `Content-Length` (0 when absent); `None` once the peer has closed.
pub fn read_request_head(reader: &mut impl BufRead) -> Option<(String, usize)> {
    let mut head = String::new();
    if reader.read_line(&mut head).unwrap_or(0) == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return None;
        }
        if header == "\r\n" {
            return Some((head, length));
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().expect("a numeric Content-Length");
            }
        }
        head.push_str(&header);
    }
}

/// A response as read off the socket (tests that must send bytes reqwest would normalise).
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    /// Parses a whole HTTP/1.1 answer as read off the socket, undoing chunked transfer coding;
    /// `Err` describes what is malformed.
    pub fn parse(response: &[u8]) -> Result<Raw, String> {
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| {
                format!(
                    "answer without end of headers: {:?}",
                    String::from_utf8_lossy(&response[..response.len().min(300)])
                )
            })?;
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut raw = Raw {
            status,
            headers,
            body: response[split + 4..].to_vec(),
        };
        if raw
            .header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            raw.body = dechunk(&raw.body).ok_or("malformed chunked body")?;
        }
        Ok(raw)
    }

    /// The first header called `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The data of a chunked body; `None` when the chunking is malformed.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// A fixed-seed xorshift: reproducible "random" choices without another dependency.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs the `openssl` CLI (key generation for SMART clients) and returns its stdout.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The types smart-fetch 1.0.3 asks for when given no `--type` (`smart_fetch.resources.PATIENT_TYPES`,
/// US Core's), as its Group exports send them.
pub const SMART_FETCH_TYPES: [&str; 15] = [
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "EpisodeOfCare",
    "Immunization",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Patient",
    "Procedure",
    "ServiceRequest",
    "Specimen",
];

/// A SMART backend client with a fresh P-384 key, registered by the `[auth]` tables of
/// [`BackendClient::auth_toml`].
pub struct BackendClient {
    /// Its `client_id`.
    pub client_id: String,
    key: auth::EcKey,
}

impl BackendClient {
    /// Generates the client's key with the `openssl` CLI.
    pub fn new(client_id: &str) -> BackendClient {
        let dir = tempfile::tempdir().unwrap();
        BackendClient {
            client_id: client_id.to_owned(),
            key: auth::ec_key(dir.path(), "key"),
        }
    }

    /// `[auth]` on, `auth_extra` added to it, with this client allowed `scopes` (to follow the
    /// `[export]` table).
    pub fn auth_toml(&self, auth_extra: &str, scopes: &[&str]) -> String {
        format!(
            "\n[auth]\nenabled = true\n{auth_extra}\n\n{}",
            self.client_toml(scopes)
        )
    }

    /// This client's `[[auth.clients]]` table, allowed `scopes`, for an `[auth]` table that registers several.
    pub fn client_toml(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "[[auth.clients]]\nclient_id = {:?}\nscopes = [{}]\n\
             jwks = {{ keys = [{{ kty = \"EC\", kid = \"k1\", alg = \"ES384\", use = \"sig\", crv = \"P-384\", x = {:?}, y = {:?} }}] }}\n",
            self.client_id,
            scopes.join(", "),
            self.key.x,
            self.key.y
        )
    }

    /// An access token for `scope` from the token endpoint of the proxy at `base`, insisting that
    /// all of `scope` is granted.
    pub fn token(&self, base: &str, scope: &str) -> String {
        let aud = format!("{base}/auth/token");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.client_id, "sub": self.client_id, "aud": aud,
            "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.key.private_pem.as_bytes()).unwrap();
        let assertion = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", scope),
            ])
            .finish();
        let resp = client()
            .post(&aud)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().unwrap();
        assert_eq!(status, 200, "token request for {scope:?}: {body}");
        let granted: BTreeSet<&str> = body["scope"].as_str().unwrap().split(' ').collect();
        assert_eq!(
            granted,
            scope.split(' ').collect(),
            "token for {scope:?}: {body}"
        );
        body["access_token"].as_str().unwrap().to_owned()
    }
}
