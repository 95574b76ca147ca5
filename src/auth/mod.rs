//! SMART Backend Services: discovery, the token endpoint, and access-token checks on requests.

pub mod access;
pub mod clients;
pub mod scopes;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::auth::clients::{Client, Registry};
use crate::auth::scopes::{grantable, Grant};
use crate::config::{AuthConfig, ClientConfig, ExternalAuthConfig};

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Longest client assertion lifetime the spec allows.
const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

/// Clock skew tolerated on client assertions and external tokens.
const LEEWAY_SECS: u64 = 5;

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

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    exp: i64,
    jti: Option<String>,
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
    seen_jti: moka::sync::Cache<String, ()>,
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

fn unverified_claims(jwt: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Auth {
    /// Sets up keys and clients; `public_base` is the proxy's FHIR base URL.
    pub fn new(cfg: &AuthConfig, public_base: &Url, data_dir: &Path) -> Result<Self, AuthError> {
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
            // Assertions live at most 5 minutes, so a jti needs remembering no longer than that.
            seen_jti: moka::sync::Cache::builder()
                .time_to_live(Duration::from_secs(
                    MAX_ASSERTION_LIFETIME_SECS as u64 + 2 * LEEWAY_SECS,
                ))
                .build(),
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

    /// Replaces the client registry (SIGHUP).
    pub fn reload(&self, clients: &[ClientConfig]) -> Result<usize, AuthError> {
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
        let granted = grantable(scope, &client.allowed);
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
        let claims = unverified_claims(assertion)
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
        let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
            .map_err(|e| TokenError::client(format!("assertion rejected: {e}")))?;
        let now = chrono::Utc::now().timestamp();
        if data.claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS as i64 {
            return Err(TokenError::client(
                "exp is more than 5 minutes in the future",
            ));
        }
        let jti = data
            .claims
            .jti
            .filter(|j| !j.is_empty())
            .ok_or_else(|| TokenError::client("the assertion has no jti"))?;
        let replay_key = format!("{}\u{0}{jti}", client.id);
        // One atomic insert-if-absent: two racing requests with the same jti cannot both pass.
        if !self.seen_jti.entry(replay_key).or_insert(()).is_fresh() {
            return Err(TokenError::client("jti was already used"));
        }
        Ok(client)
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
                Ok(Principal {
                    client_id: data.claims.sub,
                    grant: Grant::from_scope_string(&data.claims.scope),
                })
            }
        }
    }

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
        Auth::new(&cfg, &Url::parse("http://127.0.0.1:1/fhir").unwrap(), dir).unwrap()
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
