//! SMART Backend Services: discovery, the token endpoint, and access-token checks on requests.
//!
//! It passes 700 lines only with its tests; pass-through needs, clients and their keys, scopes and the
//! replay cache are the modules beside it.

pub mod access;
pub mod clients;
pub mod replay;
pub mod scopes;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::auth::clients::{Client, Registry, Reloaded};
use crate::auth::replay::SeenJtis;
use crate::auth::scopes::{grantable, Grant, Scope};
use crate::config::{AuthConfig, ClientConfig, ExternalAuthConfig};

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Longest client assertion lifetime the spec allows.
const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

/// Clock skew tolerated on client assertions and external tokens.
const LEEWAY_SECS: u64 = 5;

/// How much longer than an assertion can be accepted its jti stays in memory: the entry, not its
/// eviction, decides, so this only has to cover the system clock being stepped back meanwhile.
const JTI_RETENTION_MARGIN_SECS: u64 = 60;

/// Algorithms accepted for client assertions and external tokens: asymmetric only, so a public key
/// can never be misused as an HMAC secret.
const ASYMMETRIC: [Algorithm; 4] = [
    Algorithm::RS384,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::ES256,
];

/// Scopes advertised in smart-configuration.
const SCOPES_SUPPORTED: [&str; 2] = ["system/*.rs", "system/*.read"];

/// Errors of the token endpoint, as OAuth 2.0 error codes (RFC 6749 §5.2).
#[derive(Debug, thiserror::Error)]
#[error("{code}: {description}")]
pub struct TokenError {
    /// `invalid_client`, `invalid_request`, `invalid_scope`, `unsupported_grant_type`…
    pub code: &'static str,
    /// Human-readable detail (never containing the assertion).
    pub description: String,
}

impl TokenError {
    fn new(code: &'static str, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }

    fn client(description: impl Into<String>) -> Self {
        Self::new("invalid_client", description)
    }
}

/// Errors of authorization.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No valid access token: 401.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token that does not allow the request: 403.
    #[error("{0}")]
    Forbidden(String),
    /// The token endpoint refuses.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Keys or clients could not be set up.
    #[error("authorization setup: {0}")]
    Setup(String),
}

/// Who is calling, and what the token lets them export.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The client, owner of the jobs it starts.
    pub client_id: String,
    /// The token's scopes.
    pub grant: Grant,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    sub: String,
    scope: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// The claims of a client assertion checked against the clock; NumericDates may have fractions.
#[derive(Debug, Deserialize)]
struct AssertionClaims {
    exp: f64,
    nbf: Option<f64>,
    jti: Option<String>,
}

/// Unix time in seconds, with fractions: whole seconds would accept an assertion up to a second
/// longer than its jti is held.
type Clock = Box<dyn Fn() -> f64 + Send + Sync>;

fn system_clock() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The authorization service.
pub struct Auth {
    cfg: AuthConfig,
    registry: Registry,
    /// Keys of the external authorization server, as a pseudo-client.
    external: Option<(ExternalAuthConfig, Registry)>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    token_url: String,
    seen_jti: SeenJtis,
    clock: Clock,
}

/// Reads the access-token signing secret, creating one (0600) on first start.
fn signing_secret(cfg: &AuthConfig, data_dir: &Path) -> Result<Vec<u8>, AuthError> {
    let setup = |what: &str, e: std::io::Error| AuthError::Setup(format!("{what}: {e}"));
    let path = match &cfg.signing_key_file {
        Some(p) => p.clone(),
        None => data_dir.join("auth").join("token-key"),
    };
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= 32 => Ok(secret),
        Ok(_) => Err(AuthError::Setup(format!(
            "signing key {} is shorter than 32 bytes",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cfg.signing_key_file.is_none() => {
            use rand::RngCore;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut secret = vec![0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let dir = path.parent().expect("under the data directory");
            std::fs::create_dir_all(dir).map_err(|e| setup("creating the auth directory", e))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| setup("creating the token signing key", e))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .map_err(|e| setup("writing the token signing key", e))?;
            Ok(secret)
        }
        Err(e) => Err(setup(&format!("reading signing key {}", path.display()), e)),
    }
}

/// Segment `index` of a compact JWS (0: header, 1: claims) as JSON, unverified.
fn json_segment(jwt: &str, index: usize) -> Option<serde_json::Value> {
    let segment = jwt.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the JWS header has `crit` (RFC 7515 §4.1.11): the proxy implements no extension header
/// parameter, so any it lists makes the JWS invalid. jsonwebtoken's `Header` drops the field.
fn has_crit(jwt: &str) -> bool {
    json_segment(jwt, 0).is_some_and(|header| header.get("crit").is_some())
}

impl Auth {
    /// Sets up keys and clients; `public_base` is the proxy's FHIR base URL.
    pub fn new(cfg: &AuthConfig, public_base: &Url, data_dir: &Path) -> Result<Self, AuthError> {
        Self::with_clock(cfg, public_base, data_dir, Box::new(system_clock))
    }

    fn with_clock(
        cfg: &AuthConfig,
        public_base: &Url,
        data_dir: &Path,
        clock: Clock,
    ) -> Result<Self, AuthError> {
        let secret = signing_secret(cfg, data_dir)?;
        let min_refetch = Duration::from_secs(cfg.jwks_min_refetch_secs);
        let registry = Registry::new(&cfg.clients, min_refetch)
            .map_err(|e| AuthError::Setup(e.to_string()))?;
        let external = match &cfg.external {
            Some(ext) => {
                let pseudo = ClientConfig {
                    client_id: ext.issuer.clone(),
                    scopes: Vec::new(),
                    jwks: None,
                    jwks_url: Some(ext.jwks_url.clone()),
                };
                let keys = Registry::new(&[pseudo], min_refetch)
                    .map_err(|e| AuthError::Setup(e.to_string()))?;
                Some((ext.clone(), keys))
            }
            None => None,
        };
        let base = public_base.as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            cfg: cfg.clone(),
            registry,
            external,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            token_url: format!("{base}/auth/token"),
            issuer: base,
            // An assertion is accepted at most its lifetime plus the leeway on either end.
            seen_jti: SeenJtis::new(Duration::from_secs(
                MAX_ASSERTION_LIFETIME_SECS as u64 + 2 * LEEWAY_SECS + JTI_RETENTION_MARGIN_SECS,
            )),
            clock,
        })
    }

    /// Whether requests need tokens.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// The configured authorization settings.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Replaces the client registry (SIGHUP); from then on tokens of a removed client are refused and
    /// tokens of the others carry no more than the client's new scopes.
    pub fn reload(&self, clients: &[ClientConfig]) -> Result<Reloaded, AuthError> {
        self.registry
            .reload(clients)
            .map_err(|e| AuthError::Setup(e.to_string()))
    }

    /// The token endpoint clients use: the built-in one or the external server's.
    pub fn token_endpoint(&self) -> String {
        match &self.external {
            Some((ext, _)) => ext.token_endpoint.to_string(),
            None => self.token_url.clone(),
        }
    }

    /// `.well-known/smart-configuration` (SMART App Launch 2.x).
    pub fn smart_configuration(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.external.as_ref().map_or(self.issuer.clone(), |(e, _)| e.issuer.clone()),
            "token_endpoint": self.token_endpoint(),
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": SCOPES_SUPPORTED,
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        })
    }

    /// `CapabilityStatement.rest.security` naming the SMART service and its token endpoint.
    pub fn capability_security(&self) -> serde_json::Value {
        serde_json::json!({
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": self.token_endpoint()}]
            }],
            "description": "SMART Backend Services (client_credentials with private_key_jwt) for bulk export"
        })
    }

    /// The token endpoint: a form-encoded client credentials request in, a token response out.
    pub async fn token(&self, form: &[u8]) -> Result<serde_json::Value, TokenError> {
        if self.external.is_some() {
            return Err(TokenError::new(
                "unsupported_grant_type",
                "tokens are issued by the external authorization server",
            ));
        }
        let mut fields = std::collections::HashMap::new();
        for (k, v) in url::form_urlencoded::parse(form) {
            if fields.insert(k.clone(), v).is_some() {
                return Err(TokenError::new(
                    "invalid_request",
                    format!("{k} given more than once"),
                ));
            }
        }
        let field = |name: &str| fields.get(name).map(|v| v.as_ref());
        match field("grant_type") {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(TokenError::new(
                    "unsupported_grant_type",
                    format!("grant_type {other:?} is not supported; use client_credentials"),
                ))
            }
            None => return Err(TokenError::new("invalid_request", "grant_type is required")),
        }
        if field("client_assertion_type") != Some(JWT_BEARER) {
            return Err(TokenError::new(
                "invalid_request",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        let assertion = field("client_assertion")
            .ok_or_else(|| TokenError::new("invalid_request", "client_assertion is required"))?;
        let scope = field("scope")
            .ok_or_else(|| TokenError::new("invalid_request", "scope is required"))?;
        let client = self.verify_assertion(assertion).await?;
        // A registration of `system/*` covers `system/Foo.rs` too, but no type Foo exists to grant.
        let granted: Vec<&str> = grantable(scope, &client.allowed)
            .into_iter()
            .filter(|s| Scope::parse(s).is_some_and(|s| s.names_real_type()))
            .collect();
        if granted.is_empty() {
            return Err(TokenError::new(
                "invalid_scope",
                format!(
                    "client {} may not be granted any of the requested scopes",
                    client.id
                ),
            ));
        }
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.issuer.clone(),
            sub: client.id.clone(),
            scope: granted.join(" "),
            iat: now,
            exp: now + self.cfg.token_lifetime_secs as i64,
            jti: uuid::Uuid::new_v4().simple().to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::new("server_error", e.to_string()))?;
        tracing::info!(client = %client.id, scope = %claims.scope, "access token issued");
        Ok(serde_json::json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.cfg.token_lifetime_secs,
            "scope": claims.scope,
        }))
    }

    /// Verifies a client assertion exactly as SMART Backend Services requires; returns its client.
    async fn verify_assertion(&self, assertion: &str) -> Result<Client, TokenError> {
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
            TokenError::client("client_assertion is not a signed JWT with a supported alg")
        })?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(TokenError::client(format!(
                "alg {:?} is not accepted; use RS384 or ES384",
                header.alg
            )));
        }
        if has_crit(assertion) {
            return Err(TokenError::client(
                "the assertion header lists crit extensions, which the proxy does not implement",
            ));
        }
        let claims = json_segment(assertion, 1)
            .ok_or_else(|| TokenError::client("unreadable assertion claims"))?;
        let iss = claims["iss"].as_str().unwrap_or_default();
        let client = self
            .registry
            .client(iss)
            .ok_or_else(|| TokenError::client(format!("unknown client {iss:?}")))?;
        if claims["sub"].as_str() != Some(iss) {
            return Err(TokenError::client("iss and sub must both be the client_id"));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| TokenError::client("the assertion header has no kid"))?;
        if let Some(jku) = &header.jku {
            if client.jwks_url.as_ref().map(Url::as_str) != Some(jku.as_str()) {
                return Err(TokenError::client(
                    "jku is not the client's registered JWKS URL",
                ));
            }
        }
        let jwk = self
            .registry
            .key(&client, kid)
            .await
            .map_err(|e| TokenError::client(e.to_string()))?
            .ok_or_else(|| {
                TokenError::client(format!(
                    "no key {kid:?} registered for client {}",
                    client.id
                ))
            })?;
        if jwk
            .common
            .key_algorithm
            .is_some_and(|a| a.to_string() != format!("{:?}", header.alg))
        {
            return Err(TokenError::client(format!(
                "key {kid:?} is not for {:?}",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| TokenError::client(format!("key {kid:?} unusable: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.set_audience(&[&self.token_url]);
        validation.set_issuer(&[&client.id]);
        validation.sub = Some(client.id.clone());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        // Times are checked by `admit`, on the same clock that holds the jti.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
            .map_err(|e| TokenError::client(format!("assertion rejected: {e}")))?;
        self.admit(&client.id, data.claims)?;
        Ok(client)
    }

    /// Checks a verified assertion's times and its jti: it is accepted while now < exp + leeway, and
    /// its jti is held exactly that long.
    fn admit(&self, client_id: &str, claims: AssertionClaims) -> Result<(), TokenError> {
        let now = (self.clock)();
        let leeway = LEEWAY_SECS as f64;
        let until = claims.exp + leeway;
        if now >= until {
            return Err(TokenError::client("the assertion has expired (exp)"));
        }
        if claims.exp > now + (MAX_ASSERTION_LIFETIME_SECS as f64) + leeway {
            return Err(TokenError::client(
                "exp is more than 5 minutes in the future",
            ));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(TokenError::client("the assertion is not valid yet (nbf)"));
        }
        let jti = claims
            .jti
            .filter(|j| !j.is_empty())
            .ok_or_else(|| TokenError::client("the assertion has no jti"))?;
        if !self
            .seen_jti
            .first_use(format!("{client_id}\u{0}{jti}"), until, now)
        {
            return Err(TokenError::client("jti was already used"));
        }
        Ok(())
    }

    /// Checks the request's bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or_else(|| AuthError::Unauthorized("a bearer access token is required".into()))?;
        match &self.external {
            Some((ext, keys)) => self.verify_external(token, ext, keys).await,
            None => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = 0;
                validation.set_issuer(&[&self.issuer]);
                validation.set_audience(&[&self.issuer]);
                let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation)
                    .map_err(|e| AuthError::Unauthorized(format!("invalid access token: {e}")))?;
                // Checked against the live registry so that a reload revokes at once, not when the
                // token expires.
                let client = self.registry.client(&data.claims.sub).ok_or_else(|| {
                    AuthError::Unauthorized(
                        "invalid access token: its client is no longer registered".into(),
                    )
                })?;
                Ok(Principal {
                    client_id: data.claims.sub,
                    grant: Grant::from_scope_string(&data.claims.scope).within(&client.allowed),
                })
            }
        }
    }

    /// An external issuer's token is trusted for as long as it is valid: the proxy has no registry of
    /// its clients, so revoking one is the issuer's business (short token lifetimes there).
    async fn verify_external(
        &self,
        token: &str,
        ext: &ExternalAuthConfig,
        keys: &Registry,
    ) -> Result<Principal, AuthError> {
        let invalid = |why: String| AuthError::Unauthorized(format!("invalid access token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(invalid(format!("alg {:?} is not accepted", header.alg)));
        }
        if has_crit(token) {
            return Err(invalid("crit extensions are not implemented".into()));
        }
        let kid = header.kid.ok_or_else(|| invalid("no kid".into()))?;
        let issuer = keys
            .client(&ext.issuer)
            .expect("the external issuer is registered");
        let jwk = keys
            .key(&issuer, &kid)
            .await
            .map_err(|e| invalid(e.to_string()))?
            .ok_or_else(|| invalid(format!("unknown kid {kid:?}")))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| invalid(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.set_issuer(&[&ext.issuer]);
        validation.set_audience(&[&ext.audience]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|e| invalid(e.to_string()))?;
        let scope = match &data.claims[&ext.scope_claim] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        let client_id = data.claims[&ext.client_claim]
            .as_str()
            .ok_or_else(|| invalid(format!("no {} claim", ext.client_claim)))?
            .to_owned();
        Ok(Principal {
            client_id,
            grant: Grant::from_scope_string(&scope),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &Path) -> Auth {
        auth_with_clock(dir, Box::new(system_clock))
    }

    fn auth_with_clock(dir: &Path, clock: Clock) -> Auth {
        let cfg = AuthConfig {
            enabled: true,
            clients: vec![ClientConfig {
                client_id: "c1".into(),
                scopes: vec!["system/*.rs".into()],
                jwks: Some(serde_json::json!({"keys": []})),
                jwks_url: None,
            }],
            ..AuthConfig::default()
        };
        let base = Url::parse("http://127.0.0.1:1/fhir").unwrap();
        Auth::with_clock(&cfg, &base, dir, clock).unwrap()
    }

    /// An `Auth` whose clock reads the returned cell (Unix seconds).
    fn auth_at(dir: &Path) -> (Auth, std::sync::Arc<std::sync::Mutex<f64>>) {
        let now = std::sync::Arc::new(std::sync::Mutex::new(0.0));
        let clock = now.clone();
        let a = auth_with_clock(dir, Box::new(move || *clock.lock().unwrap()));
        (a, now)
    }

    fn assertion(exp: f64, nbf: Option<f64>, jti: &str) -> AssertionClaims {
        AssertionClaims {
            exp,
            nbf,
            jti: Some(jti.into()),
        }
    }

    /// A used assertion is refused at every moment after its first use, also within the last second
    /// in which exp + leeway (in whole seconds) still accepts it; a new jti with the same exp is
    /// accepted until exactly then, so the refusals before it were for the jti.
    #[test]
    fn a_used_assertion_is_refused_for_as_long_as_its_exp_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, now) = auth_at(dir.path());
        let leeway = LEEWAY_SECS as f64;
        for (n, first) in [1e9, 1e9 + 0.5, 1e9 + 0.95].into_iter().enumerate() {
            *now.lock().unwrap() = first;
            // The latest exp accepted at the first use.
            let exp = (first + MAX_ASSERTION_LIFETIME_SECS as f64 + leeway).floor();
            let used = format!("used-{n}");
            a.admit("c1", assertion(exp, None, &used)).unwrap();
            for step in 1..=320 * 20 {
                let t = first + f64::from(step) * 0.05;
                *now.lock().unwrap() = t;
                assert!(
                    a.admit("c1", assertion(exp, None, &used)).is_err(),
                    "replay {:.2} s after the first use at {first} (exp {exp}) was accepted",
                    t - first
                );
            }
            *now.lock().unwrap() = exp + leeway - 0.01;
            a.admit("c1", assertion(exp, None, &format!("fresh-{n}")))
                .unwrap();
            *now.lock().unwrap() = exp + leeway;
            let late = a.admit("c1", assertion(exp, None, &format!("late-{n}")));
            assert!(late.is_err(), "accepted at exp + leeway");
        }
    }

    #[test]
    fn nbf_past_the_leeway_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, now) = auth_at(dir.path());
        *now.lock().unwrap() = 1e9;
        let leeway = LEEWAY_SECS as f64;
        let err = a
            .admit("c1", assertion(1e9 + 60.0, Some(1e9 + leeway + 1.0), "a"))
            .unwrap_err();
        assert_eq!(err.code, "invalid_client");
        assert!(err.description.contains("nbf"), "{err}");
        a.admit("c1", assertion(1e9 + 60.0, Some(1e9 + leeway), "b"))
            .unwrap();
        a.admit("c1", assertion(1e9 + 60.0, Some(1e9 - 30.0), "c"))
            .unwrap();
    }

    #[test]
    fn any_crit_header_is_found() {
        let jws = |header: serde_json::Value| {
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!("{}.e30.sig", b64.encode(header.to_string()))
        };
        assert!(has_crit(&jws(
            serde_json::json!({"alg": "RS384", "crit": ["x-unknown"], "x-unknown": 1})
        )));
        assert!(has_crit(&jws(
            serde_json::json!({"alg": "RS384", "crit": []})
        )));
        assert!(!has_crit(&jws(
            serde_json::json!({"alg": "RS384", "kid": "k"})
        )));
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[tokio::test]
    async fn own_tokens_verify_and_forgeries_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            iss: a.issuer.clone(),
            aud: a.issuer.clone(),
            sub: "c1".into(),
            scope: "system/Patient.rs".into(),
            iat: now,
            exp: now + 60,
            jti: "j".into(),
        };
        let good =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap();
        let p = a.authenticate(&bearer(&good)).await.unwrap();
        assert_eq!(p.client_id, "c1");
        assert!(p.grant.allows("Patient") && !p.grant.allows("Observation"));

        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert!(matches!(
            a.authenticate(&bearer(&forged)).await,
            Err(AuthError::Unauthorized(_))
        ));
        let expired = AccessClaims {
            exp: now - 1,
            ..claims
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &a.encoding).unwrap();
        assert!(matches!(
            a.authenticate(&bearer(&expired)).await,
            Err(AuthError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authenticate(&HeaderMap::new()).await,
            Err(AuthError::Unauthorized(_))
        ));
    }

    fn issue(a: &Auth, sub: &str, scope: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            iss: a.issuer.clone(),
            aud: a.issuer.clone(),
            sub: sub.into(),
            scope: scope.into(),
            iat: now,
            exp: now + 60,
            jti: "j".into(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap()
    }

    fn client(id: &str, scopes: &[&str]) -> ClientConfig {
        ClientConfig {
            client_id: id.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            jwks: Some(serde_json::json!({"keys": []})),
            jwks_url: None,
        }
    }

    #[tokio::test]
    async fn a_reload_revokes_removed_clients_and_narrows_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let token = issue(&a, "c1", "system/*.rs");
        assert!(a
            .authenticate(&bearer(&token))
            .await
            .unwrap()
            .grant
            .all_types());

        let r = a
            .reload(&[client("c1", &["system/Observation.rs"]), client("c2", &[])])
            .unwrap();
        assert_eq!((r.clients, r.removed.is_empty()), (2, true));
        let grant = a.authenticate(&bearer(&token)).await.unwrap().grant;
        assert!(grant.allows("Observation") && !grant.allows("Patient") && !grant.all_types());

        assert_eq!(a.reload(&[client("c2", &[])]).unwrap().removed, ["c1"]);
        assert!(matches!(
            a.authenticate(&bearer(&token)).await,
            Err(AuthError::Unauthorized(_))
        ));
        // A token naming a client that was never registered is refused the same way.
        let ghost = issue(&a, "ghost", "system/*.rs");
        assert!(matches!(
            a.authenticate(&bearer(&ghost)).await,
            Err(AuthError::Unauthorized(_))
        ));
    }

    #[tokio::test]
    async fn secret_is_persisted_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = signing_secret(&AuthConfig::default(), dir.path()).unwrap();
        let second = signing_secret(&AuthConfig::default(), dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 32);
    }

    #[tokio::test]
    async fn token_requests_are_checked_before_assertions() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let code = |form: &'static str| {
            let a = &a;
            async move { a.token(form.as_bytes()).await.unwrap_err().code }
        };
        assert_eq!(code("grant_type=password").await, "unsupported_grant_type");
        assert_eq!(code("scope=x").await, "invalid_request");
        assert_eq!(
            code("grant_type=client_credentials&client_assertion_type=x").await,
            "invalid_request"
        );
        let none = "grant_type=client_credentials&scope=system/*.rs&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion=eyJhbGciOiJub25lIn0.eyJpc3MiOiJjMSJ9.";
        assert_eq!(code(none).await, "invalid_client");
    }
}
