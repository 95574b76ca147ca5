//! SMART Backend Services helpers shared by tests/auth.rs and tests/attacks.rs: client keys made with the
//! `openssl` CLI, signers and assertions, a recording HTTP stub (JWKS URL, fake upstream), a proxy with auth on
//! and three registered clients (`Fixture`), token requests and the checks on their answers, and forging of
//! the proxy's own access tokens from its `signing_key_file`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::mock::{Mock, Reply};
use super::*;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const OAUTH_URIS: &str =
    "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

pub const RS_CLIENT: &str = "client-rs";
pub const EC_CLIENT: &str = "client-ec";
pub const CRUDS_CLIENT: &str = "client-cruds";
pub const RS_KID: &str = "rs-1";
pub const EC_KID: &str = "ec-1";

// ---------------------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------------------

pub struct RsaKey {
    pub private_pem: String,
    /// SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub public_spki_pem: String,
    /// PKCS#1 PEM (`BEGIN RSA PUBLIC KEY`).
    pub public_pkcs1_pem: String,
    pub n: String,
}

/// A P-384 key made with the `openssl` CLI: its PEM and its JWK members (base64url).
pub struct EcKey {
    pub private_pem: String,
    pub x: String,
    pub y: String,
    /// The private scalar, for clients that take a private JWKS (smart-fetch).
    pub d: String,
}

pub struct Keys {
    pub rs: RsaKey,
    pub ec: EcKey,
    /// A P-384 key nobody registered.
    pub attacker_ec: EcKey,
    _dir: tempfile::TempDir,
}

pub fn keys() -> &'static Keys {
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

pub fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Generates `dir/name.pem` with `openssl genpkey -algorithm ALGORITHM -pkeyopt OPTION`.
fn genpkey(dir: &Path, name: &str, algorithm: &str, option: &str) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    let out = path.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        algorithm,
        "-pkeyopt",
        option,
        "-out",
        out,
    ]);
    path
}

pub fn rsa_key(dir: &Path, name: &str) -> RsaKey {
    let path = genpkey(dir, name, "RSA", "rsa_keygen_bits:2048");
    let p = path.to_str().unwrap();
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

pub fn ec_key(dir: &Path, name: &str) -> EcKey {
    let path = genpkey(dir, name, "EC", "ec_paramgen_curve:P-384");
    let p = path.to_str().unwrap();
    let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 97..];
    assert_eq!(point[0], 4, "EC public key is not an uncompressed point");
    // ECPrivateKey (RFC 5915) starts `version 1, privateKey OCTET STRING (48 bytes)` whether OpenSSL
    // writes it bare or inside PKCS#8.
    let private = openssl(&["pkey", "-in", p, "-outform", "DER"]);
    let marker = [0x02, 0x01, 0x01, 0x04, 0x30];
    let at = private
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("no ECPrivateKey privateKey in openssl's DER")
        + marker.len();
    EcKey {
        private_pem: std::fs::read_to_string(&path).unwrap(),
        x: B64.encode(&point[1..49]),
        y: B64.encode(&point[49..97]),
        d: B64.encode(&private[at..at + 48]),
    }
}

pub fn rsa_jwk(key: &RsaKey, kid: &str) -> Value {
    json!({"kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig", "n": key.n, "e": "AQAB"})
}

pub fn ec_jwk(key: &EcKey, kid: &str) -> Value {
    json!({"kty": "EC", "kid": kid, "alg": "ES384", "use": "sig", "crv": "P-384", "x": key.x, "y": key.y})
}

/// A client's signing identity: who it claims to be, which `kid` and key it signs with.
#[derive(Clone)]
pub struct Signer {
    pub client_id: String,
    pub kid: String,
    pub alg: Algorithm,
    pub key: EncodingKey,
}

pub fn rs_signer() -> Signer {
    Signer {
        client_id: RS_CLIENT.into(),
        kid: RS_KID.into(),
        alg: Algorithm::RS384,
        key: EncodingKey::from_rsa_pem(keys().rs.private_pem.as_bytes()).unwrap(),
    }
}

pub fn ec_signer(client_id: &str) -> Signer {
    Signer {
        client_id: client_id.into(),
        kid: EC_KID.into(),
        alg: Algorithm::ES384,
        key: EncodingKey::from_ec_pem(keys().ec.private_pem.as_bytes()).unwrap(),
    }
}

pub fn attacker_signer() -> Signer {
    Signer {
        key: EncodingKey::from_ec_pem(keys().attacker_ec.private_pem.as_bytes()).unwrap(),
        ..ec_signer(EC_CLIENT)
    }
}

// ---------------------------------------------------------------------------------------------------------
// JWTs
// ---------------------------------------------------------------------------------------------------------

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn new_jti() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Claims of a well-formed assertion of `client_id` for `aud`.
pub fn claims(client_id: &str, aud: &str) -> Value {
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now() + 240,
        "iat": now(),
        "jti": new_jti(),
    })
}

pub fn header(signer: &Signer) -> Header {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.clone());
    header
}

pub fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

/// A well-formed assertion of `signer` for the token endpoint `aud`.
pub fn assertion(signer: &Signer, aud: &str) -> String {
    sign(
        &header(signer),
        &claims(&signer.client_id, aud),
        &signer.key,
    )
}

pub fn b64_json(value: &Value) -> String {
    B64.encode(value.to_string())
}

pub fn decode_part(part: &str) -> Value {
    let bytes = B64
        .decode(part)
        .unwrap_or_else(|e| panic!("JWT part {part:?} is not base64url ({e})"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part {part:?} is not JSON ({e})"))
}

pub fn jwt_parts(token: &str) -> (String, String, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "token {token:?} is not a JWS compact serialization (header.claims.signature)"
    );
    (parts[0].into(), parts[1].into(), parts[2].into())
}

pub fn hmac_alg(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "HS384" => Some(Algorithm::HS384),
        "HS512" => Some(Algorithm::HS512),
        _ => None,
    }
}

/// Renders JSON as a TOML inline value (objects as inline tables).
pub fn toml_inline(value: &Value) -> String {
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

/// A mock answering every request with 200 and one fixed body; the API `tests/auth.rs` was written against.
pub struct Stub {
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    mock: Mock,
}

impl Stub {
    /// Serves `body` with `content_type` and status 200 to every request.
    pub fn start(body: String, content_type: &'static str) -> Stub {
        let mock = Mock::routes()
            .any(move |_| Reply::new(200, content_type, body.clone()))
            .start();
        Stub {
            origin: mock.origin().to_owned(),
            mock,
        }
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.mock.hits()
    }

    /// Request heads (request line and headers) in arrival order.
    pub fn heads(&self) -> Vec<String> {
        self.mock.heads()
    }
}

/// The values of header `name` in a recorded request head.
pub fn header_values(head: &str, name: &str) -> Vec<String> {
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
pub struct Fixture {
    pub proxy: Proxy,
    /// Serves `client-ec`'s JWKS.
    pub jwks: Stub,
    /// Serves a JWKS holding the attacker's key under `ec-1`; registered for nobody.
    pub attacker_jwks: Stub,
    /// Contents of the proxy's `signing_key_file`.
    pub signing_key: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Auth on, `auth_extra` added to the `[auth]` table (before the clients).
    pub fn start(upstream: &str, auth_extra: &str) -> Fixture {
        Fixture::start_inner(upstream, auth_extra, None)
    }

    /// Like `start`, with the proxy's stderr captured to `log` at level `rust_log`.
    pub fn start_logged(upstream: &str, auth_extra: &str, rust_log: &str, log: &Path) -> Fixture {
        Fixture::start_inner(upstream, auth_extra, Some((rust_log, log)))
    }

    pub fn start_inner(upstream: &str, auth_extra: &str, log: Option<(&str, &Path)>) -> Fixture {
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
            None => Proxy::builder(upstream).export_toml(&auth).start(),
            Some((rust_log, path)) => Proxy::builder(upstream)
                .export_toml(&auth)
                .log_to(path)
                .rust_log(rust_log)
                .start(),
        };
        Fixture {
            proxy,
            jwks,
            attacker_jwks,
            signing_key,
            _dir: dir,
        }
    }

    pub fn base(&self) -> &str {
        &self.proxy.base
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/auth/token", self.proxy.base)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.jwks.origin)
    }

    /// A token request with a well-formed assertion of `signer`; insists on success.
    pub fn token(&self, signer: &Signer, scope: &str) -> TokenGrant {
        let assertion = assertion(signer, &self.token_endpoint());
        let resp = request_token(&self.token_endpoint(), &assertion, scope);
        resp.grant(&format!("{} asking for {scope:?}", signer.client_id))
    }

    /// A token request with `assertion`.
    pub fn send(&self, assertion: &str, scope: &str) -> TokenResp {
        request_token(&self.token_endpoint(), assertion, scope)
    }

    /// The proxy's `signing_key_file`.
    pub fn signing_key_file(&self) -> PathBuf {
        self._dir.path().join("signing.key")
    }

    /// Rewrites the proxy's config file with `edit` and sends SIGHUP, which reloads the clients. The reload
    /// is asynchronous: wait for its effect (`wait_until`) before relying on it.
    pub fn reload(&self, edit: impl FnOnce(&str) -> String) {
        let path = self.proxy.config_path();
        let config = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, edit(&config)).unwrap();
        let pid = self.proxy.child_pid().to_string();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP {pid} failed: {status}");
    }

    /// A fresh assertion of `signer` asking for `scope`, answered by the token endpoint.
    pub fn ask(&self, signer: &Signer, scope: &str) -> TokenResp {
        self.send(&assertion(signer, &self.token_endpoint()), scope)
    }
}

/// The config text without the `[[auth.clients]]` table of `client_id` (the client tables come last).
pub fn without_client(config: &str, client_id: &str) -> String {
    let marker = "[[auth.clients]]";
    let mut parts = config.split(marker);
    let mut out = parts.next().unwrap_or_default().to_owned();
    let mut found = false;
    for table in parts {
        if table
            .trim_start()
            .starts_with(&format!("client_id = \"{client_id}\""))
        {
            found = true;
        } else {
            out.push_str(marker);
            out.push_str(table);
        }
    }
    assert!(found, "no client {client_id} in the config:\n{config}");
    out
}

/// The config text with `client_id`'s `scopes` replaced by `scopes`.
pub fn with_client_scopes(config: &str, client_id: &str, scopes: &[&str]) -> String {
    let list: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    let table = without_client(config, client_id);
    let original = config
        .split("[[auth.clients]]")
        .find(|t| {
            t.trim_start()
                .starts_with(&format!("client_id = \"{client_id}\""))
        })
        .unwrap();
    let edited: String = original
        .lines()
        .map(|line| match line.starts_with("scopes = ") {
            true => format!("scopes = [{}]\n", list.join(", ")),
            false => format!("{line}\n"),
        })
        .collect();
    format!("{table}\n[[auth.clients]]{edited}")
}

/// Polls `done` every 100 ms until it holds; fails with `what` after 15 s.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "not within 15 s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------------------------

pub struct TokenResp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

pub struct TokenGrant {
    pub access_token: String,
    pub body: Value,
}

impl TokenResp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("token endpoint answered non-JSON ({e}): {}", self.text))
    }

    /// Insists on 200 with a bearer token.
    pub fn grant(&self, what: &str) -> TokenGrant {
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
    pub fn expect_error(&self, status: u16, code: &str, what: &str) {
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

    pub fn expect_invalid_client(&self, what: &str) {
        self.expect_error(401, "invalid_client", what);
    }
}

pub fn post_form(url: &str, fields: &[(&str, &str)]) -> TokenResp {
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

pub fn request_token(endpoint: &str, assertion: &str, scope: &str) -> TokenResp {
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

pub fn scope_set(scope: &str) -> BTreeSet<String> {
    scope.split_whitespace().map(str::to_owned).collect()
}

/// Insists on the granted scope being exactly `want`.
pub fn assert_granted(grant: &TokenGrant, want: &str, what: &str) {
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
pub fn assert_unauthorized(resp: reqwest::blocking::Response, what: &str) {
    let (status, challenge, body) = status_header_body(resp, "WWW-Authenticate");
    assert_eq!(status, 401, "{what}: expected 401, got {status}: {body}");
    let challenge =
        challenge.unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate: {body}"));
    assert!(
        challenge.to_ascii_lowercase().starts_with("bearer"),
        "{what}: WWW-Authenticate {challenge:?} is not a Bearer challenge"
    );
    assert_outcome(&body, what);
}

pub fn assert_outcome(body: &str, what: &str) -> Value {
    let outcome: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"));
    assert_eq!(
        outcome["resourceType"], "OperationOutcome",
        "{what}: body is not an OperationOutcome: {body}"
    );
    outcome
}

pub fn assert_status(resp: reqwest::blocking::Response, want: u16, what: &str) -> String {
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(
        status, want,
        "{what}: expected {want}, got {status}: {body}"
    );
    body
}

pub fn delete(url: &str, token: Option<&str>) -> reqwest::blocking::Response {
    with_token(client().delete(url), token).send().unwrap()
}

/// Kick-off (GET) with `token`, wait, check the manifest, download every output file.
pub fn export_with_token(
    base: &str,
    path_and_query: &str,
    token: &str,
) -> (Value, Vec<OutputFile>) {
    let status_url = accepted_status_url(base, kickoff_get(base, path_and_query, Some(token)));
    let (manifest, _) = wait_manifest(&status_url, Some(token));
    check_auth_manifest(&manifest, &format!("{base}/{path_and_query}"));
    let files = download_all(&manifest, "output", Some(token));
    (manifest, files)
}

pub fn check_auth_manifest(manifest: &Value, request: &str) {
    assert_eq!(
        manifest["requiresAccessToken"], true,
        "manifest of an authorized export must say requiresAccessToken: true: {manifest}"
    );
    assert_eq!(manifest["request"], request, "manifest request: {manifest}");
}

pub fn exported_types(files: &[OutputFile]) -> BTreeSet<String> {
    files.iter().map(|f| f.ty.clone()).collect()
}

/// The HMAC algorithm named by a token's encoded header `h`; panics when it is none, since the tests
/// that forge tokens depend on one.
fn token_hmac_alg(h: &str) -> Algorithm {
    let header = decode_part(h);
    header["alg"]
        .as_str()
        .and_then(hmac_alg)
        .unwrap_or_else(|| {
            panic!("access token header {header}: not HMAC-signed, this test cannot forge it")
        })
}

/// Re-signs the claims of a token the proxy issued, edited by `edit`, with `secret` and the token's own
/// HMAC algorithm.
pub fn resign(token: &str, secret: &[u8], edit: impl FnOnce(&mut Value)) -> String {
    let (h, c, _) = jwt_parts(token);
    let alg = token_hmac_alg(&h);
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
pub fn proxy_hmac_key(f: &Fixture, token: &str) -> Vec<u8> {
    let (h, c, s) = jwt_parts(token);
    let alg = token_hmac_alg(&h);
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
