//! SMART Backend Services authorization of the proxy's own endpoints, end to end against the real binary
//! and the real upstream.
//!
//! The test client generates its keys with the `openssl` CLI (RS384 on RSA 2048, ES384 on P-384), registers
//! them with the proxy (one client with an inline JWKS, one with a `jwks_url` served by a small HTTP server
//! thread of the test) and signs its assertions with `jsonwebtoken`. Every rejection test first shows that a
//! well-formed request of the same client succeeds, so that a rejection is for the one thing the test breaks.
//!
//! Expired access tokens are forged rather than waited for: the proxy is given a known `signing_key_file`,
//! the test checks that it reproduces the signature of a token the proxy issued byte for byte (so it knows
//! the format and the key), then re-signs the same claims with `exp` an hour in the past. That holds whatever
//! clock leeway the proxy allows (up to an hour) and costs no waiting, whereas a 1 s lifetime followed by a
//! 2 s sleep fails on any leeway above a second (jsonwebtoken's default `Validation` allows 60 s).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

const RS_CLIENT: &str = "client-rs";
const EC_CLIENT: &str = "client-ec";
const CRUDS_CLIENT: &str = "client-cruds";
const RS_KID: &str = "rs-1";
const EC_KID: &str = "ec-1";

// ---------------------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------------------

struct RsaKey {
    private_pem: String,
    /// SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    public_spki_pem: String,
    /// PKCS#1 PEM (`BEGIN RSA PUBLIC KEY`).
    public_pkcs1_pem: String,
    n: String,
}

struct EcKey {
    private_pem: String,
    x: String,
    y: String,
}

struct Keys {
    rs: RsaKey,
    ec: EcKey,
    /// A P-384 key nobody registered.
    attacker_ec: EcKey,
    _dir: tempfile::TempDir,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        Keys {
            rs: rsa_key(dir.path(), "rs"),
            ec: ec_key(dir.path(), "ec"),
            attacker_ec: ec_key(dir.path(), "attacker"),
            _dir: dir,
        }
    })
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn rsa_key(dir: &Path, name: &str) -> RsaKey {
    let path = dir.join(format!("{name}.pem"));
    let p = path.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        p,
    ]);
    let modulus = String::from_utf8(openssl(&["rsa", "-in", p, "-noout", "-modulus"])).unwrap();
    let hex = modulus
        .trim()
        .strip_prefix("Modulus=")
        .unwrap_or_else(|| panic!("unexpected openssl -modulus output: {modulus}"));
    let mut n = hex_bytes(hex);
    while n.first() == Some(&0) {
        n.remove(0);
    }
    assert_eq!(n.len(), 256, "RSA 2048 modulus is not 256 bytes");
    RsaKey {
        private_pem: std::fs::read_to_string(&path).unwrap(),
        public_spki_pem: String::from_utf8(openssl(&["pkey", "-in", p, "-pubout"])).unwrap(),
        public_pkcs1_pem: String::from_utf8(openssl(&["rsa", "-in", p, "-RSAPublicKey_out"]))
            .unwrap(),
        n: B64.encode(n),
    }
}

fn ec_key(dir: &Path, name: &str) -> EcKey {
    let path = dir.join(format!("{name}.pem"));
    let p = path.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-out",
        p,
    ]);
    let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 97..];
    assert_eq!(point[0], 4, "EC public key is not an uncompressed point");
    EcKey {
        private_pem: std::fs::read_to_string(&path).unwrap(),
        x: B64.encode(&point[1..49]),
        y: B64.encode(&point[49..97]),
    }
}

fn rsa_jwk(key: &RsaKey, kid: &str) -> Value {
    json!({"kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig", "n": key.n, "e": "AQAB"})
}

fn ec_jwk(key: &EcKey, kid: &str) -> Value {
    json!({"kty": "EC", "kid": kid, "alg": "ES384", "use": "sig", "crv": "P-384", "x": key.x, "y": key.y})
}

/// A client's signing identity: who it claims to be, which `kid` and key it signs with.
#[derive(Clone)]
struct Signer {
    client_id: String,
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

fn rs_signer() -> Signer {
    Signer {
        client_id: RS_CLIENT.into(),
        kid: RS_KID.into(),
        alg: Algorithm::RS384,
        key: EncodingKey::from_rsa_pem(keys().rs.private_pem.as_bytes()).unwrap(),
    }
}

fn ec_signer(client_id: &str) -> Signer {
    Signer {
        client_id: client_id.into(),
        kid: EC_KID.into(),
        alg: Algorithm::ES384,
        key: EncodingKey::from_ec_pem(keys().ec.private_pem.as_bytes()).unwrap(),
    }
}

fn attacker_signer() -> Signer {
    Signer {
        key: EncodingKey::from_ec_pem(keys().attacker_ec.private_pem.as_bytes()).unwrap(),
        ..ec_signer(EC_CLIENT)
    }
}

// ---------------------------------------------------------------------------------------------------------
// JWTs
// ---------------------------------------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn new_jti() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Claims of a well-formed assertion of `client_id` for `aud`.
fn claims(client_id: &str, aud: &str) -> Value {
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now() + 240,
        "iat": now(),
        "jti": new_jti(),
    })
}

fn header(signer: &Signer) -> Header {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.clone());
    header
}

fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

/// A well-formed assertion of `signer` for the token endpoint `aud`.
fn assertion(signer: &Signer, aud: &str) -> String {
    sign(
        &header(signer),
        &claims(&signer.client_id, aud),
        &signer.key,
    )
}

fn b64_json(value: &Value) -> String {
    B64.encode(value.to_string())
}

fn decode_part(part: &str) -> Value {
    let bytes = B64
        .decode(part)
        .unwrap_or_else(|e| panic!("JWT part {part:?} is not base64url ({e})"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part {part:?} is not JSON ({e})"))
}

fn jwt_parts(token: &str) -> (String, String, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "token {token:?} is not a JWS compact serialization (header.claims.signature)"
    );
    (parts[0].into(), parts[1].into(), parts[2].into())
}

fn hmac_alg(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "HS384" => Some(Algorithm::HS384),
        "HS512" => Some(Algorithm::HS512),
        _ => None,
    }
}

/// Renders JSON as a TOML inline value (objects as inline tables).
fn toml_inline(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{} = {}", Value::String(k.clone()), toml_inline(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_inline).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// A tiny HTTP server (JWKS URL, fake upstream), recording every request head
// ---------------------------------------------------------------------------------------------------------

struct Stub {
    /// `http://127.0.0.1:PORT`
    origin: String,
    /// Request heads (request line and headers) in arrival order.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    /// Serves `body` with `content_type` and status 200 to every request.
    fn start(body: String, content_type: &'static str) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (body, recorded) = (body.clone(), recorded.clone());
                std::thread::spawn(move || serve_one(stream, &body, content_type, &recorded));
            }
        });
        Stub { origin, requests }
    }

    fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn heads(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(stream: TcpStream, body: &str, content_type: &str, recorded: &Mutex<Vec<String>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        head.push_str(&line);
    }
    let mut request_body = vec![0; content_length];
    let _ = reader.read_exact(&mut request_body);
    recorded.lock().unwrap().push(head);
    let mut stream = reader.into_inner();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

/// The values of header `name` in a recorded request head.
fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// A proxy with auth enabled and three registered clients
// ---------------------------------------------------------------------------------------------------------

/// - `client-rs`: `system/*.rs`, inline JWKS with the RSA key (`rs-1`, RS384);
/// - `client-ec`: `system/Patient.rs` and `system/Observation.read`, JWKS (EC key `ec-1`, ES384) at `jwks_url`;
/// - `client-cruds`: `system/Encounter.cruds`, inline JWKS with the same EC key.
struct Fixture {
    proxy: Proxy,
    /// Serves `client-ec`'s JWKS.
    jwks: Stub,
    /// Serves a JWKS holding the attacker's key under `ec-1`; registered for nobody.
    attacker_jwks: Stub,
    /// Contents of the proxy's `signing_key_file`.
    signing_key: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Auth on, `auth_extra` added to the `[auth]` table (before the clients).
    fn start(upstream: &str, auth_extra: &str) -> Fixture {
        Fixture::start_inner(upstream, auth_extra, None)
    }

    /// Like `start`, with the proxy's stderr captured to `log` at level `rust_log`.
    fn start_logged(upstream: &str, auth_extra: &str, rust_log: &str, log: &Path) -> Fixture {
        Fixture::start_inner(upstream, auth_extra, Some((rust_log, log)))
    }

    fn start_inner(upstream: &str, auth_extra: &str, log: Option<(&str, &Path)>) -> Fixture {
        let keys = keys();
        let dir = tempfile::tempdir().unwrap();
        let jwks = Stub::start(
            json!({"keys": [ec_jwk(&keys.ec, EC_KID)]}).to_string(),
            "application/json",
        );
        let attacker_jwks = Stub::start(
            json!({"keys": [ec_jwk(&keys.attacker_ec, EC_KID)]}).to_string(),
            "application/json",
        );
        let signing_key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
        .into_bytes();
        let key_file = dir.path().join("signing.key");
        std::fs::write(&key_file, &signing_key).unwrap();
        let rs_jwks = json!({"keys": [rsa_jwk(&keys.rs, RS_KID)]});
        let ec_jwks = json!({"keys": [ec_jwk(&keys.ec, EC_KID)]});
        // The `[auth]` tables follow the `[export]` table the harness writes.
        let auth = format!(
            "\n[auth]\nenabled = true\nsigning_key_file = \"{}\"\n{auth_extra}\n\n\
             [[auth.clients]]\nclient_id = \"{RS_CLIENT}\"\nscopes = [\"system/*.rs\"]\njwks = {}\n\n\
             [[auth.clients]]\nclient_id = \"{EC_CLIENT}\"\nscopes = [\"system/Patient.rs\", \"system/Observation.read\"]\n\
             jwks_url = \"{}/jwks.json\"\n\n\
             [[auth.clients]]\nclient_id = \"{CRUDS_CLIENT}\"\nscopes = [\"system/Encounter.cruds\"]\njwks = {}\n",
            key_file.display(),
            toml_inline(&rs_jwks),
            jwks.origin,
            toml_inline(&ec_jwks),
        );
        let proxy = match log {
            None => Proxy::start_with_config(upstream, &auth, ""),
            Some((rust_log, path)) => Proxy::start_logged(upstream, &auth, "", rust_log, path),
        };
        Fixture {
            proxy,
            jwks,
            attacker_jwks,
            signing_key,
            _dir: dir,
        }
    }

    fn base(&self) -> &str {
        &self.proxy.base
    }

    fn token_endpoint(&self) -> String {
        format!("{}/auth/token", self.proxy.base)
    }

    fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.jwks.origin)
    }

    /// A token request with a well-formed assertion of `signer`; insists on success.
    fn token(&self, signer: &Signer, scope: &str) -> TokenGrant {
        let assertion = assertion(signer, &self.token_endpoint());
        let resp = request_token(&self.token_endpoint(), &assertion, scope);
        resp.grant(&format!("{} asking for {scope:?}", signer.client_id))
    }

    /// A token request with `assertion`.
    fn send(&self, assertion: &str, scope: &str) -> TokenResp {
        request_token(&self.token_endpoint(), assertion, scope)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------------------------

struct TokenResp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

struct TokenGrant {
    access_token: String,
    body: Value,
}

impl TokenResp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("token endpoint answered non-JSON ({e}): {}", self.text))
    }

    /// Insists on 200 with a bearer token.
    fn grant(&self, what: &str) -> TokenGrant {
        assert_eq!(
            self.status, 200,
            "token request ({what}) answered {}: {}",
            self.status, self.text
        );
        let body = self.json();
        let access_token = body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("token response without access_token: {body}"))
            .to_owned();
        assert!(!access_token.is_empty(), "empty access_token: {body}");
        assert!(
            body["token_type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("bearer")),
            "token_type is not bearer: {body}"
        );
        TokenGrant { access_token, body }
    }

    /// Insists on an OAuth error answer `status` with `error` = `code`.
    fn expect_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(
            (self.status, self.json()["error"].as_str()),
            (status, Some(code)),
            "{what}: expected {status} {code}, got {}: {}",
            self.status,
            self.text
        );
        assert!(
            self.json()["error_description"].is_string(),
            "{what}: error answer without error_description: {}",
            self.text
        );
        let content_type = self
            .headers
            .get("Content-Type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{what}: error Content-Type {content_type:?}"
        );
    }

    fn expect_invalid_client(&self, what: &str) {
        self.expect_error(401, "invalid_client", what);
    }
}

fn post_form(url: &str, fields: &[(&str, &str)]) -> TokenResp {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let resp = client()
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .body(body)
        .send()
        .unwrap();
    TokenResp {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().unwrap(),
    }
}

fn request_token(endpoint: &str, assertion: &str, scope: &str) -> TokenResp {
    post_form(
        endpoint,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
}

fn scope_set(scope: &str) -> BTreeSet<String> {
    scope.split_whitespace().map(str::to_owned).collect()
}

/// Insists on the granted scope being exactly `want`.
fn assert_granted(grant: &TokenGrant, want: &str, what: &str) {
    let got = grant.body["scope"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: token response without scope: {}", grant.body));
    assert_eq!(
        scope_set(got),
        scope_set(want),
        "{what}: granted scope {got:?}, expected {want:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Bulk endpoints with tokens
// ---------------------------------------------------------------------------------------------------------

/// Insists on 401 with `WWW-Authenticate: Bearer...` and an OperationOutcome.
fn assert_unauthorized(resp: reqwest::blocking::Response, what: &str) {
    let status = resp.status();
    let challenge = resp
        .headers()
        .get("WWW-Authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.text().unwrap();
    assert_eq!(status, 401, "{what}: expected 401, got {status}: {body}");
    let challenge =
        challenge.unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate: {body}"));
    assert!(
        challenge.to_ascii_lowercase().starts_with("bearer"),
        "{what}: WWW-Authenticate {challenge:?} is not a Bearer challenge"
    );
    assert_outcome(&body, what);
}

fn assert_outcome(body: &str, what: &str) -> Value {
    let outcome: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"));
    assert_eq!(
        outcome["resourceType"], "OperationOutcome",
        "{what}: body is not an OperationOutcome: {body}"
    );
    outcome
}

fn assert_status(resp: reqwest::blocking::Response, want: u16, what: &str) -> String {
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(
        status, want,
        "{what}: expected {want}, got {status}: {body}"
    );
    body
}

fn delete(url: &str, token: Option<&str>) -> reqwest::blocking::Response {
    with_token(client().delete(url), token).send().unwrap()
}

/// Kick-off (GET) with `token`, wait, check the manifest, download every output file.
fn export_with_token(base: &str, path_and_query: &str, token: &str) -> (Value, Vec<OutputFile>) {
    let status_url = accepted_status_url(base, kickoff_get_auth(base, path_and_query, Some(token)));
    let (manifest, _) = wait_manifest_auth(&status_url, Some(token));
    check_auth_manifest(&manifest, &format!("{base}/{path_and_query}"));
    let files = download_all_auth(&manifest, "output", Some(token));
    (manifest, files)
}

fn check_auth_manifest(manifest: &Value, request: &str) {
    assert_eq!(
        manifest["requiresAccessToken"], true,
        "manifest of an authorized export must say requiresAccessToken: true: {manifest}"
    );
    assert_eq!(manifest["request"], request, "manifest request: {manifest}");
}

fn exported_types(files: &[OutputFile]) -> BTreeSet<String> {
    files.iter().map(|f| f.ty.clone()).collect()
}

// ---------------------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------------------

#[test]
fn discovery_advertises_backend_services() {
    let f = Fixture::start(&upstream(), "");
    let url = format!("{}/.well-known/smart-configuration", f.base());
    let resp = client().get(&url).send().unwrap();
    let body = assert_status(
        resp,
        200,
        "GET .well-known/smart-configuration without a token",
    );
    let config: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("smart-configuration is not JSON ({e}): {body}"));
    assert_eq!(config["token_endpoint"], f.token_endpoint(), "{config}");
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"]),
        "{config}"
    );
    let algs = config["token_endpoint_auth_signing_alg_values_supported"]
        .as_array()
        .unwrap_or_else(|| panic!("no signing algs: {config}"));
    for alg in ["RS384", "ES384"] {
        assert!(algs.contains(&json!(alg)), "{alg} not advertised: {config}");
    }
    assert_eq!(
        config["grant_types_supported"],
        json!(["client_credentials"]),
        "{config}"
    );
    assert!(
        config["scopes_supported"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "scopes_supported missing or empty: {config}"
    );
    assert!(
        config["capabilities"]
            .as_array()
            .is_some_and(|c| c.contains(&json!("client-confidential-asymmetric"))),
        "capabilities lack client-confidential-asymmetric: {config}"
    );

    let cap = get_json(&format!("{}/metadata", f.base()));
    let security = &cap["rest"][0]["security"];
    assert_eq!(
        security["service"][0]["coding"][0]["code"], "SMART-on-FHIR",
        "CapabilityStatement security: {security}"
    );
    let token_uri = security["extension"]
        .as_array()
        .and_then(|exts| exts.iter().find(|e| e["url"] == OAUTH_URIS))
        .and_then(|e| e["extension"].as_array())
        .and_then(|subs| subs.iter().find(|s| s["url"] == "token"))
        .map(|s| s["valueUri"].clone());
    assert_eq!(
        token_uri,
        Some(json!(f.token_endpoint())),
        "oauth-uris token extension: {security}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Whole exports with each kind of client
// ---------------------------------------------------------------------------------------------------------

#[test]
fn rs384_client_with_inline_jwks_exports_everything() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let discovered = get_json(&format!("{}/.well-known/smart-configuration", f.base()));
    let endpoint = discovered["token_endpoint"].as_str().unwrap().to_owned();
    let grant = request_token(
        &endpoint,
        &assertion(&rs_signer(), &endpoint),
        "system/*.rs",
    )
    .grant("client-rs asking for system/*.rs");
    assert_granted(&grant, "system/*.rs", "client-rs");
    assert_eq!(
        grant.body["expires_in"], 300,
        "expires_in is not token_lifetime_secs: {}",
        grant.body
    );
    let (_, files) = export_with_token(f.base(), "$export", &grant.access_token);
    let expected = direct_system(&upstream, None);
    assert!(total(&expected) > 0, "the upstream holds no data");
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn es384_client_with_jwks_url_exports_its_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    // The v2 form of the configured `system/Observation.read`; `jku` is the registered URL, which is allowed.
    let mut h = header(&ec_signer(EC_CLIENT));
    h.jku = Some(f.jwks_url());
    let assertion = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &ec_signer(EC_CLIENT).key,
    );
    let scope = "system/Patient.rs system/Observation.rs";
    let grant = f.send(&assertion, scope).grant("client-ec with jku");
    assert_granted(&grant, scope, "client-ec");
    assert!(
        f.jwks.hits() > 0,
        "the proxy accepted an ES384 assertion without fetching the client's jwks_url"
    );
    // No `_type`: the export holds the types the token allows, and only those.
    let (_, files) = export_with_token(f.base(), "$export", &grant.access_token);
    assert_eq!(
        exported_types(&files),
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()]),
        "types exported for a Patient+Observation token"
    );
    let exported = resources_by_type(&files);
    let expected = direct_system(&upstream, Some(&["Patient", "Observation"]));
    assert!(
        total(&expected) > 0,
        "the upstream holds no Patients or Observations"
    );
    assert_same(&exported, &expected);
}

#[test]
fn patient_export_is_limited_to_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let grant = f.token(
        &ec_signer(EC_CLIENT),
        "system/Patient.read system/Observation.read",
    );
    let (_, files) = export_with_token(f.base(), "Patient/$export", &grant.access_token);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    assert!(
        expected
            .keys()
            .any(|t| t != "Patient" && t != "Observation"),
        "the compartment holds no other types, the test would prove nothing"
    );
    expected.retain(|ty, _| ty == "Patient" || ty == "Observation");
    assert_same(&resources_by_type(&files), &expected);
}

/// Referenced resources come only within the token's scopes: a Practitioner scope brings the
/// Practitioners the exported Observations reference, a token without one gets none.
#[test]
fn referenced_resources_are_limited_to_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let rs = rs_signer();
    let with = f.token(
        &rs,
        "system/Patient.rs system/Observation.rs system/Practitioner.rs",
    );
    let (_, files) = export_with_token(f.base(), "Patient/$export", &with.access_token);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    expected.retain(|ty, _| ty == "Patient" || ty == "Observation");
    let practitioners = referenced(
        &upstream,
        expected["Observation"].values(),
        &["Practitioner"],
    );
    assert!(
        !practitioners.is_empty(),
        "the Observations reference no Practitioner; the test would prove nothing"
    );
    expected.extend(practitioners);
    assert_same(&resources_by_type(&files), &expected);

    let without = f.token(&rs, "system/Patient.rs system/Observation.rs");
    let (_, files) = export_with_token(f.base(), "Patient/$export", &without.access_token);
    assert_eq!(
        exported_types(&files),
        ["Observation", "Patient"].map(String::from).into(),
        "a token without Practitioner scope got other types"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------------------

#[test]
fn granted_scope_is_the_covered_subset() {
    let f = Fixture::start(&upstream(), "");
    let rs = rs_signer();
    let ec = ec_signer(EC_CLIENT);
    let cruds = ec_signer(CRUDS_CLIENT);
    let cases: [(&Signer, &str, &str); 7] = [
        (&rs, "system/*.read", "system/*.read"),
        (
            &rs,
            "system/Observation.rs system/Patient.read",
            "system/Observation.rs system/Patient.read",
        ),
        (&ec, "system/Observation.read", "system/Observation.read"),
        (
            &ec,
            "system/Patient.read system/Observation.rs",
            "system/Patient.read system/Observation.rs",
        ),
        (
            &ec,
            "system/Patient.rs system/Condition.rs",
            "system/Patient.rs",
        ),
        (&cruds, "system/Encounter.rs", "system/Encounter.rs"),
        (
            &cruds,
            "system/Encounter.read system/Patient.rs",
            "system/Encounter.read",
        ),
    ];
    for (signer, requested, granted) in cases {
        let what = format!("{} asking for {requested:?}", signer.client_id);
        let grant = f.token(signer, requested);
        assert_granted(&grant, granted, &what);
    }
}

#[test]
fn scope_not_allowed_is_invalid_scope() {
    let f = Fixture::start(&upstream(), "");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    for (signer, scope) in [
        (ec_signer(EC_CLIENT), "system/Condition.rs"),
        (ec_signer(EC_CLIENT), "system/*.rs"),
        (ec_signer(EC_CLIENT), "system/Patient.cruds"),
        (ec_signer(CRUDS_CLIENT), "system/Patient.rs"),
        (rs_signer(), "system/*.cruds"),
    ] {
        let resp = f.send(&assertion(&signer, &f.token_endpoint()), scope);
        resp.expect_error(
            400,
            "invalid_scope",
            &format!("{} asking for {scope:?}", signer.client_id),
        );
    }
}

#[test]
fn type_outside_the_grant_is_forbidden() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let grant = f.token(
        &ec_signer(EC_CLIENT),
        "system/Patient.rs system/Observation.rs",
    );
    let token = Some(grant.access_token.as_str());
    for query in ["$export?_type=Condition", "$export?_type=Patient,Condition"] {
        let body = assert_status(
            kickoff_get_auth(f.base(), query, token),
            403,
            &format!("kick-off {query} with a Patient+Observation token"),
        );
        assert_outcome(&body, query);
    }
    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "_type", "valueString": "Condition"}],
    });
    let resp = with_token(client().post(format!("{}/$export", f.base())), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .header("Content-Type", "application/fhir+json")
        .body(parameters.to_string())
        .send()
        .unwrap();
    let body = assert_status(resp, 403, "POST kick-off with _type=Condition");
    assert_outcome(&body, "POST kick-off with _type=Condition");
    // Control: a token that allows Condition may export it.
    let all = f.token(&rs_signer(), "system/*.rs");
    accepted_status_url(
        f.base(),
        kickoff_get_auth(f.base(), "$export?_type=Condition", Some(&all.access_token)),
    );
    // Lenient: accepted, narrowed to the granted types, and the error file says so.
    let path = "$export?_type=Patient,Condition";
    let resp = get_with_token(&format!("{}/{path}", f.base()), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async, handling=lenient")
        .send()
        .unwrap();
    let status_url = accepted_status_url(f.base(), resp);
    let (manifest, _) = wait_manifest_auth(&status_url, token);
    check_auth_manifest(&manifest, &format!("{}/{path}", f.base()));
    let files = download_all_auth(&manifest, "output", token);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient"])),
    );
    let errors = download_all_auth(&manifest, "error", token);
    let said_so = errors
        .iter()
        .flat_map(|f| &f.lines)
        .any(|line| line.contains("Condition"));
    assert!(
        said_so,
        "lenient export left out Condition without an OperationOutcome naming it: {manifest}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Assertion rejections (token endpoint)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn assertion_with_alg_none_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    for alg in ["none", "None", "NONE"] {
        let jwt = format!(
            "{}.{}.",
            b64_json(&json!({"alg": alg, "typ": "JWT", "kid": RS_KID})),
            b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("alg {alg:?} assertion"));
    }
}

#[test]
fn assertion_hmac_signed_with_the_public_key_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let keys = keys();
    let secrets = [
        ("SPKI PEM", keys.rs.public_spki_pem.as_bytes().to_vec()),
        ("PKCS#1 PEM", keys.rs.public_pkcs1_pem.as_bytes().to_vec()),
        ("JWK n", keys.rs.n.as_bytes().to_vec()),
        (
            "JWKS JSON",
            rsa_jwk(&keys.rs, RS_KID).to_string().into_bytes(),
        ),
    ];
    for (name, secret) in secrets {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(RS_KID.into());
        let jwt = sign(
            &h,
            &claims(RS_CLIENT, &f.token_endpoint()),
            &EncodingKey::from_secret(&secret),
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("HS256 assertion keyed with the client's {name}"));
    }
}

#[test]
fn assertion_with_a_bad_signature_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    // A valid RS384 assertion whose claims were changed after signing.
    let good = assertion(&rs_signer(), &f.token_endpoint());
    let (h, _, s) = jwt_parts(&good);
    let tampered = format!(
        "{h}.{}.{s}",
        b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
    );
    f.send(&tampered, "system/*.rs")
        .expect_invalid_client("RS384 assertion with claims changed after signing");
    // An ES384 assertion under the registered kid, signed by a key nobody registered.
    f.send(
        &assertion(&attacker_signer(), &f.token_endpoint()),
        "system/Patient.rs",
    )
    .expect_invalid_client("ES384 assertion signed by an unregistered key");
}

#[test]
fn assertion_with_wrong_aud_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    for aud in [
        f.base().to_owned(),
        format!("{}/", f.token_endpoint()),
        "https://auth.example.org/token".to_owned(),
    ] {
        let jwt = sign(
            &header(&rs_signer()),
            &claims(RS_CLIENT, &aud),
            &rs_signer().key,
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("assertion with aud {aud:?}"));
    }
}

#[test]
fn assertion_expiring_too_late_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["exp"] = json!(now() + 600);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion with exp 10 minutes ahead");
}

#[test]
fn expired_assertion_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["exp"] = json!(now() - 600);
    c["iat"] = json!(now() - 700);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion expired 10 minutes ago");
}

#[test]
fn assertion_with_iss_not_sub_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["sub"] = json!(EC_CLIENT);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion with iss client-rs, sub client-ec");
}

#[test]
fn replayed_assertion_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let c = claims(RS_CLIENT, &f.token_endpoint());
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .grant("first use of an assertion");
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("the same assertion a second time");
    // Another assertion (new iat and exp, so a new signature) that reuses the jti.
    let mut again = claims(RS_CLIENT, &f.token_endpoint());
    again["jti"] = c["jti"].clone();
    again["exp"] = json!(now() + 200);
    let jwt = sign(&header(&rs_signer()), &again, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("a new assertion reusing a jti");
    // No jti at all: nothing to guard against replay with.
    let mut no_jti = claims(RS_CLIENT, &f.token_endpoint());
    no_jti.as_object_mut().unwrap().remove("jti");
    let jwt = sign(&header(&rs_signer()), &no_jti, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("an assertion without jti");
}

#[test]
fn unknown_client_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let stranger = Signer {
        client_id: "client-unknown".into(),
        ..rs_signer()
    };
    f.send(&assertion(&stranger, &f.token_endpoint()), "system/*.rs")
        .expect_invalid_client("assertion of an unregistered client_id");
}

#[test]
fn unknown_kid_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let rs = Signer {
        kid: "rs-unknown".into(),
        ..rs_signer()
    };
    f.send(&assertion(&rs, &f.token_endpoint()), "system/*.rs")
        .expect_invalid_client("RS384 assertion with an unregistered kid (inline JWKS)");
    let ec = Signer {
        kid: "ec-unknown".into(),
        ..ec_signer(EC_CLIENT)
    };
    f.send(&assertion(&ec, &f.token_endpoint()), "system/Patient.rs")
        .expect_invalid_client("ES384 assertion with an unregistered kid (jwks_url)");
    let mut no_kid = header(&rs_signer());
    no_kid.kid = None;
    let jwt = sign(
        &no_kid,
        &claims(RS_CLIENT, &f.token_endpoint()),
        &rs_signer().key,
    );
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("RS384 assertion without a kid");
}

#[test]
fn foreign_jku_is_rejected_without_fetching_it() {
    let f = Fixture::start(&upstream(), "");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let foreign = format!("{}/jwks.json", f.attacker_jwks.origin);
    // The attacker's key, published at the attacker's URL.
    let mut h = header(&attacker_signer());
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &attacker_signer().key,
    );
    f.send(&jwt, "system/Patient.rs")
        .expect_invalid_client("client-ec assertion signed by a key at a foreign jku");
    // The client's own key, but naming a jku other than the registered one.
    let mut h = header(&ec_signer(EC_CLIENT));
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &ec_signer(EC_CLIENT).key,
    );
    f.send(&jwt, "system/Patient.rs")
        .expect_invalid_client("client-ec assertion with a jku other than its jwks_url");
    // A client registered with an inline JWKS has no JWKS URL that a jku could match.
    let mut h = header(&rs_signer());
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(RS_CLIENT, &f.token_endpoint()),
        &rs_signer().key,
    );
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("client-rs (inline JWKS) assertion with a jku");
    assert_eq!(
        f.attacker_jwks.hits(),
        0,
        "the proxy fetched an unregistered jku {foreign}: {:?}",
        f.attacker_jwks.heads()
    );
}

#[test]
fn malformed_token_requests_are_rejected() {
    let f = Fixture::start(&upstream(), "");
    let endpoint = f.token_endpoint();
    let jwt = || assertion(&rs_signer(), &endpoint);
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("grant_type", "password"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "unsupported_grant_type", "grant_type=password");
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            ),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "wrong client_assertion_type");
    post_form(
        &endpoint,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "no client_assertion");
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "no grant_type");
    // After all that, the endpoint still works.
    f.token(&rs_signer(), "system/*.rs");
}

#[test]
fn token_response_is_not_cacheable() {
    // RFC 6749 §5.1: a response holding tokens MUST carry `Cache-Control: no-store`.
    let f = Fixture::start(&upstream(), "");
    let resp = f.send(&assertion(&rs_signer(), &f.token_endpoint()), "system/*.rs");
    resp.grant("client-rs");
    let cache_control = resp
        .headers
        .get("Cache-Control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        cache_control.contains("no-store"),
        "token response Cache-Control {cache_control:?} lacks no-store (RFC 6749 §5.1)"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Access token rejections (bulk endpoints)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn bulk_endpoints_without_a_token_are_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", None),
        "kick-off without a token",
    );
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some("not-a-token")),
        "kick-off with a garbage token",
    );
    let grant = f.token(&rs_signer(), "system/*.rs");
    let token = Some(grant.access_token.as_str());
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get_auth(f.base(), "$export?_type=Patient", token),
    );
    assert_unauthorized(
        get_with_token(&status_url, None).send().unwrap(),
        "status poll without a token",
    );
    let (manifest, _) = wait_manifest_auth(&status_url, token);
    check_auth_manifest(&manifest, &format!("{}/$export?_type=Patient", f.base()));
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output file: {manifest}"))
        .to_owned();
    assert_unauthorized(
        get_with_token(&file_url, None).send().unwrap(),
        "file download without a token",
    );
    assert_unauthorized(delete(&status_url, None), "DELETE without a token");
    // The job survived all that and is still its owner's.
    download_lines_auth(&file_url, token);
    assert_status(delete(&status_url, token), 202, "DELETE by the owner");
}

/// Re-signs the claims of a token the proxy issued, edited by `edit`, with `secret` and the token's own
/// HMAC algorithm.
fn resign(token: &str, secret: &[u8], edit: impl FnOnce(&mut Value)) -> String {
    let (h, c, _) = jwt_parts(token);
    let header = decode_part(&h);
    let alg = header["alg"]
        .as_str()
        .and_then(hmac_alg)
        .unwrap_or_else(|| {
            panic!("access token header {header}: not HMAC-signed, this test cannot forge it")
        });
    let mut claims = decode_part(&c);
    edit(&mut claims);
    let message = format!("{h}.{}", b64_json(&claims));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(secret), alg)
            .unwrap();
    format!("{message}.{signature}")
}

/// The key bytes the proxy signs access tokens with, found by reproducing the signature of `token`
/// from the contents of `signing_key_file` (used raw, trimmed or hex-decoded).
fn proxy_hmac_key(f: &Fixture, token: &str) -> Vec<u8> {
    let (h, c, s) = jwt_parts(token);
    let header = decode_part(&h);
    let alg = header["alg"]
        .as_str()
        .and_then(hmac_alg)
        .unwrap_or_else(|| {
            panic!("access token header {header}: not HMAC-signed, this test cannot forge it")
        });
    let text = String::from_utf8(f.signing_key.clone()).unwrap();
    let candidates = [
        f.signing_key.clone(),
        text.trim().as_bytes().to_vec(),
        hex_bytes(text.trim()),
    ];
    let message = format!("{h}.{c}");
    candidates
        .into_iter()
        .find(|key| {
            jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(key), alg)
                .unwrap()
                == s
        })
        .unwrap_or_else(|| {
            panic!(
                "cannot reproduce the access token's {alg:?} signature from signing_key_file: \
                 the proxy does not sign with the configured key, or this test's assumption is wrong"
            )
        })
}

#[test]
fn expired_access_token_is_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    let grant = f.token(&rs_signer(), "system/*.rs");
    let key = proxy_hmac_key(&f, &grant.access_token);
    // Control: the same claims re-signed by the test are accepted, so the forging is faithful.
    let same = resign(&grant.access_token, &key, |_| {});
    assert_status(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some(&same)),
        202,
        "kick-off with the issued claims re-signed by the test",
    );
    let expired = resign(&grant.access_token, &key, |claims| {
        let past = now() - 3600;
        claims["exp"] = json!(past);
        for field in ["iat", "nbf"] {
            if claims.get(field).is_some() {
                claims[field] = json!(past - 300);
            }
        }
    });
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some(&expired)),
        "kick-off with an access token expired an hour ago",
    );
}

#[test]
fn access_token_signed_by_another_key_is_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    let grant = f.token(&rs_signer(), "system/*.rs");
    let token = Some(grant.access_token.as_str());
    assert_status(
        kickoff_get_auth(f.base(), "$export?_type=Patient", token),
        202,
        "kick-off with the issued token",
    );
    let random: [u8; 32] = rand::random();
    let forged = resign(&grant.access_token, &random, |_| {});
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some(&forged)),
        "kick-off with the issued claims signed by a random HMAC key",
    );
    let (h, c, _) = jwt_parts(&grant.access_token);
    let mut none_header = decode_part(&h);
    none_header["alg"] = json!("none");
    let unsigned = format!("{}.{c}.", b64_json(&none_header));
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some(&unsigned)),
        "kick-off with the issued claims and alg none",
    );
    let assertion = assertion(&rs_signer(), &f.token_endpoint());
    assert_unauthorized(
        kickoff_get_auth(f.base(), "$export?_type=Patient", Some(&assertion)),
        "kick-off with a client assertion as the bearer token",
    );
}

#[test]
fn another_clients_job_is_not_found() {
    let f = Fixture::start(&upstream(), "");
    let owner = f.token(&rs_signer(), "system/*.rs");
    let other = f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let (owner, other) = (
        Some(owner.access_token.as_str()),
        Some(other.access_token.as_str()),
    );
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get_auth(f.base(), "$export?_type=Patient", owner),
    );
    assert_status(
        get_with_token(&status_url, other).send().unwrap(),
        404,
        "another client's status URL",
    );
    assert_status(
        delete(&status_url, other),
        404,
        "DELETE of another client's job",
    );
    let (manifest, _) = wait_manifest_auth(&status_url, owner);
    assert_status(
        get_with_token(&status_url, other).send().unwrap(),
        404,
        "another client's status URL, job complete",
    );
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output file: {manifest}"))
        .to_owned();
    assert_status(
        get_with_token(&file_url, other).send().unwrap(),
        404,
        "another client's file URL",
    );
    assert_status(
        delete(&status_url, other),
        404,
        "DELETE of another client's complete job",
    );
    // The owner still has it all, and can delete it.
    assert!(!download_lines_auth(&file_url, owner).is_empty());
    assert_status(delete(&status_url, owner), 202, "DELETE by the owner");
    assert_status(
        get_with_token(&status_url, owner).send().unwrap(),
        404,
        "status after the owner's DELETE",
    );
}

// ---------------------------------------------------------------------------------------------------------
// Pass-through
// ---------------------------------------------------------------------------------------------------------

const FAKE_BUNDLE: &str = r#"{"resourceType":"Bundle","type":"searchset","total":0}"#;

/// The Authorization values of the requests the fake upstream got for `path_prefix`.
fn upstream_authorizations(stub: &Stub, path_prefix: &str) -> Vec<Vec<String>> {
    stub.heads()
        .iter()
        .filter(|head| {
            head.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .is_some_and(|target| target.starts_with(path_prefix))
        })
        .map(|head| header_values(head, "authorization"))
        .collect()
}

#[test]
fn pass_through_forwards_the_callers_authorization() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"forward\"",
    );
    let url = format!("{}/Patient?name=anon", f.base());
    let body = assert_status(
        client().get(&url).send().unwrap(),
        200,
        "pass-through, no token",
    );
    assert_eq!(body, FAKE_BUNDLE, "pass-through changed the body");
    assert_eq!(
        upstream_authorizations(&fake, "/fhir/Patient"),
        vec![Vec::<String>::new()],
        "pass-through without Authorization"
    );
    let url = format!("{}/Patient?name=upstream-token", f.base());
    let body = assert_status(
        client()
            .get(&url)
            .header("Authorization", "Bearer upstream-secret-1234")
            .send()
            .unwrap(),
        200,
        "pass-through with the upstream's token",
    );
    assert_eq!(body, FAKE_BUNDLE);
    let seen = upstream_authorizations(&fake, "/fhir/Patient");
    assert_eq!(
        seen.last(),
        Some(&vec!["Bearer upstream-secret-1234".to_owned()]),
        "the caller's Authorization must reach the upstream unchanged: {seen:?}"
    );
}

#[test]
fn pass_through_with_require_token() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"require-token\"",
    );
    let url = format!("{}/Patient?name=x", f.base());
    assert_unauthorized(
        client().get(&url).send().unwrap(),
        "pass-through without a token",
    );
    assert_unauthorized(
        client()
            .get(&url)
            .header("Authorization", "Bearer upstream-secret-1234")
            .send()
            .unwrap(),
        "pass-through with a token that is not the proxy's",
    );
    assert!(
        upstream_authorizations(&fake, "/fhir/Patient").is_empty(),
        "unauthorized pass-through requests reached the upstream: {:?}",
        fake.heads()
    );
    // Discovery stays open.
    assert_status(
        client()
            .get(format!("{}/.well-known/smart-configuration", f.base()))
            .send()
            .unwrap(),
        200,
        "smart-configuration without a token",
    );
    let grant = f.token(&rs_signer(), "system/*.rs");
    let body = assert_status(
        get_with_token(&url, Some(&grant.access_token))
            .send()
            .unwrap(),
        200,
        "pass-through with a proxy token",
    );
    assert_eq!(body, FAKE_BUNDLE, "pass-through changed the body");
    let seen = upstream_authorizations(&fake, "/fhir/Patient");
    assert_eq!(seen.len(), 1, "{:?}", fake.heads());
    // config.rs: "Require a valid proxy token too (it is not forwarded)".
    assert!(
        seen[0].iter().all(|v| !v.contains(&grant.access_token)),
        "the proxy's access token was forwarded to the upstream: {seen:?}"
    );
}

/// A job's owner may hold several tokens: the one it polls or downloads with sees only what its own scopes
/// allow (the manifest lists only those types; another type's file is 403).
#[test]
fn status_and_files_are_limited_to_the_polling_tokens_scopes() {
    let f = Fixture::start(&upstream(), "");
    let wide = f.token(&rs_signer(), "system/*.rs").access_token;
    let narrow = f.token(&rs_signer(), "system/Patient.rs").access_token;
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get_auth(f.base(), "$export?_type=Patient,Observation", Some(&wide)),
    );
    let (manifest, _) = wait_manifest_auth(&status_url, Some(&wide));
    let files = download_all_auth(&manifest, "output", Some(&wide));
    assert_eq!(
        exported_types(&files),
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()])
    );
    let (seen, _) = wait_manifest_auth(&status_url, Some(&narrow));
    let types: BTreeSet<&str> = seen["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["type"].as_str())
        .collect();
    assert_eq!(types, BTreeSet::from(["Patient"]), "{seen}");
    for output in manifest["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap();
        let want = if output["type"] == "Patient" {
            200
        } else {
            403
        };
        let status = get_with_token(url, Some(&narrow)).send().unwrap().status();
        assert_eq!(
            status.as_u16(),
            want,
            "{url} with a system/Patient.rs token"
        );
    }
}

/// Issue #22 item 2: in require-token mode a pass-through request needs a scope covering its type and its
/// interaction; the proxy's own upstream credentials must not read or write what the token may not.
#[test]
fn pass_through_with_require_token_needs_the_scope_of_the_interaction() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"require-token\"",
    );
    let send = |method: reqwest::Method, path: &str, token: &str| {
        client()
            .request(method, format!("{}/{path}", f.base()))
            .bearer_auth(token)
            .header("Content-Type", "application/fhir+json")
            .body("{}")
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    use reqwest::Method as M;
    let patient = f
        .token(&ec_signer(EC_CLIENT), "system/Patient.rs")
        .access_token;
    let encounter = f
        .token(&ec_signer(CRUDS_CLIENT), "system/Encounter.cruds")
        .access_token;
    let cases = [
        (M::GET, "Patient?name=x", &patient, 200),
        (M::GET, "Patient/p1", &patient, 200),
        (M::GET, "Patient/p1/_history", &patient, 200),
        (M::GET, "Observation?code=x", &patient, 403),
        (M::GET, "Observation/o1", &patient, 403),
        (M::GET, "Patient/p1/Observation", &patient, 403),
        (M::POST, "Observation/_search", &patient, 403),
        (M::DELETE, "Basic/b1", &patient, 403),
        (M::PUT, "Patient/p1", &patient, 403),
        (M::POST, "", &patient, 403),
        (M::GET, "_history", &patient, 403),
        (M::GET, "Patient/p1/$everything", &patient, 403),
        (M::GET, "Patient/p1/Observation", &encounter, 403),
        (M::DELETE, "Encounter/e1", &encounter, 200),
        (M::PUT, "Encounter/e1", &encounter, 200),
        (M::POST, "Encounter", &encounter, 200),
        (M::GET, "Encounter?patient=p1", &encounter, 200),
        (M::GET, "Patient/p1", &encounter, 403),
        (M::GET, "metadata", &encounter, 200),
    ];
    let mut wrong = Vec::new();
    for (method, path, token, want) in &cases {
        let before = fake.heads().len();
        let got = send(method.clone(), path, token);
        let reached = fake.heads().len() > before;
        if got != *want || reached != (*want == 200) {
            wrong.push(format!(
                "{method} {path}: {got} (upstream reached: {reached}), want {want}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "scopes not enforced on pass-through: {wrong:#?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------------------

#[test]
fn secrets_never_reach_the_logs() {
    let upstream = upstream();
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("proxy.log");
    let f = Fixture::start_logged(&upstream, "", "trace", &log);
    let endpoint = f.token_endpoint();
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut remember = |name: &str, jwt: &str| {
        let (_, _, signature) = jwt_parts(jwt);
        secrets.push((name.to_owned(), jwt.to_owned()));
        secrets.push((format!("{name} signature"), signature));
    };

    let good = assertion(&ec_signer(EC_CLIENT), &endpoint);
    let grant = f
        .send(&good, "system/Patient.rs system/Observation.rs")
        .grant("client-ec");
    remember("client assertion", &good);
    remember("access token", &grant.access_token);
    // Error paths: a replay and a wrong audience.
    f.send(&good, "system/Patient.rs")
        .expect_invalid_client("replayed assertion");
    let wrong_aud = assertion(&ec_signer(EC_CLIENT), f.base());
    f.send(&wrong_aud, "system/Patient.rs")
        .expect_invalid_client("assertion with the FHIR base as aud");
    remember("wrong-aud assertion", &wrong_aud);
    let rs_grant = f.token(&rs_signer(), "system/*.rs");
    remember("second access token", &rs_grant.access_token);

    let token = grant.access_token.as_str();
    let (manifest, _) = export_with_token(f.base(), "$export", token);
    // Another client's token on the job, and a forwarded request carrying the proxy token.
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    assert_status(
        get_with_token(&file_url, Some(&rs_grant.access_token))
            .send()
            .unwrap(),
        404,
        "another client's file URL",
    );
    assert_status(
        get_with_token(&format!("{}/Patient?_count=1", f.base()), Some(token))
            .send()
            .unwrap(),
        200,
        "pass-through with the proxy token",
    );
    let secret_key = String::from_utf8(f.signing_key.clone()).unwrap();
    drop(f);

    let text = std::fs::read_to_string(&log).unwrap();
    let job_id = manifest["output"][0]["url"]
        .as_str()
        .and_then(|u| u.split("/$bulk-files/").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    assert!(
        text.contains(&job_id),
        "the captured log does not mention job {job_id}: logging was not captured ({} bytes)",
        text.len()
    );
    secrets.push(("access token signing key".into(), secret_key));
    let leaked: Vec<String> = secrets
        .iter()
        .filter(|(_, secret)| text.contains(secret.as_str()))
        .map(|(name, secret)| {
            let line = text.lines().find(|l| l.contains(secret.as_str())).unwrap();
            format!("{name} in: {line}")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "secrets in the proxy's log:\n{}",
        leaked.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------------
// Assertion times and headers (issue #22)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn assertion_not_valid_yet_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["nbf"] = json!(now() - 60);
    f.send(
        &sign(&header(&rs_signer()), &c, &rs_signer().key),
        "system/*.rs",
    )
    .grant("assertion with nbf a minute ago");
    c["nbf"] = json!(now() + 120);
    c["jti"] = json!(new_jti());
    f.send(
        &sign(&header(&rs_signer()), &c, &rs_signer().key),
        "system/*.rs",
    )
    .expect_invalid_client("assertion with nbf 2 minutes ahead");
}

/// jsonwebtoken's `Header` has no `crit`, so the header is written and signed by hand; the same
/// hand-made assertion without `crit` is accepted, so the rejection is for `crit`.
#[test]
fn assertion_with_unknown_crit_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let signer = rs_signer();
    let hand_signed = |header: Value| {
        let input = format!(
            "{}.{}",
            b64_json(&header),
            b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
        );
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &signer.key, signer.alg).unwrap();
        format!("{input}.{signature}")
    };
    let plain = json!({"alg": "RS384", "typ": "JWT", "kid": RS_KID});
    f.send(&hand_signed(plain.clone()), "system/*.rs")
        .grant("hand-signed assertion without crit");
    let mut critical = plain;
    critical["crit"] = json!(["x-unknown"]);
    critical["x-unknown"] = json!(true);
    f.send(&hand_signed(critical), "system/*.rs")
        .expect_invalid_client("assertion with crit [\"x-unknown\"]");
}

#[test]
fn pass_through_replaces_client_forwarding_headers() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"forward\"",
    );
    let url = format!("{}/Patient?name=forwarded", f.base());
    assert_status(
        client()
            .get(&url)
            .header("X-Forwarded-For", "6.6.6.6")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "evil.example")
            .header("Forwarded", "for=evil")
            .send()
            .unwrap(),
        200,
        "pass-through with client forwarding headers",
    );
    let head = fake
        .heads()
        .into_iter()
        .find(|h| h.contains("name=forwarded"))
        .unwrap_or_else(|| panic!("the request did not reach the upstream: {:?}", fake.heads()));
    let proxy_authority = url::Url::parse(f.base()).unwrap();
    let proxy_host = format!(
        "{}:{}",
        proxy_authority.host_str().unwrap(),
        proxy_authority.port().unwrap()
    );
    let seen = |name: &str| header_values(&head, name);
    assert_eq!(seen("x-forwarded-for"), ["127.0.0.1"], "{head}");
    assert_eq!(seen("x-forwarded-proto"), ["http"], "{head}");
    assert_eq!(seen("x-forwarded-host"), [proxy_host], "{head}");
    assert!(seen("forwarded").is_empty(), "{head}");
}
