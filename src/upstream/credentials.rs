//! How the proxy authorizes its own upstream calls: nothing, a static bearer token, or an OAuth 2.0
//! client credentials grant (client secret or SMART Backend Services key) with a cached token.
//!
//! It passes 700 lines only with its tests, which run each grant against a token endpoint of their own.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Serialize;
use url::form_urlencoded;
use url::Url;

use super::error_chain;
use crate::config::{UpstreamConfig, UpstreamOAuthConfig, UpstreamOAuthMethod};

/// Environment variable whose client secret wins over `upstream.oauth.client_secret_file`.
pub const CLIENT_SECRET_ENV: &str = "FBP_UPSTREAM_CLIENT_SECRET";

/// Lifetime assumed when the token endpoint omits `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// SMART Backend Services caps assertions at five minutes; a margin absorbs clock skew.
const ASSERTION_LIFETIME_SECS: i64 = 240;
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A token response is a few kilobytes; more means something else answered.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Why upstream credentials could not be set up or obtained; never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The configuration is incomplete or contradictory.
    #[error("upstream credentials misconfigured: {0}")]
    Config(String),
    /// A secret or key file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The private key does not parse or does not fit the algorithm.
    #[error("{} is not a usable {algorithm} private key (PKCS#8 PEM): {reason}", path.display())]
    Key {
        path: PathBuf,
        algorithm: String,
        reason: String,
    },
    /// Signing the client assertion failed.
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
    /// The token endpoint could not be reached or the answer was cut.
    #[error("token request to {url} failed: {detail}")]
    Transport { url: String, detail: String },
    /// The token endpoint refused, with its OAuth `error` code when it gave one.
    #[error("token endpoint {url} answered {status}{}", error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Rejected {
        url: String,
        status: StatusCode,
        error: Option<String>,
    },
    /// The token endpoint answered 2xx with something that is not a usable bearer token.
    #[error("token endpoint {url} gave an unusable answer: {reason}")]
    InvalidResponse { url: String, reason: &'static str },
}

impl CredentialsError {
    /// Whether trying again later may succeed (the token endpoint was down or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            CredentialsError::Transport { .. } => true,
            CredentialsError::Rejected { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            _ => false,
        }
    }
}

/// The `Authorization` the proxy sends upstream, renewed as needed.
pub struct Credentials {
    kind: Kind,
}

enum Kind {
    None,
    Static(HeaderValue),
    OAuth(Box<OAuth>),
}

struct OAuth {
    http: reqwest::Client,
    token_url: Url,
    scope: String,
    renew_before: Duration,
    client: ClientAuth,
    cached: Mutex<Option<Cached>>,
    /// Held while a token request is in flight so concurrent callers wait for it instead of
    /// each asking the token endpoint.
    renewal: tokio::sync::Mutex<()>,
}

enum ClientAuth {
    /// The ready `Authorization: Basic` header.
    Basic(HeaderValue),
    Jwt {
        client_id: String,
        header: Box<Header>,
        key: EncodingKey,
    },
}

struct Cached {
    authorization: HeaderValue,
    renew_at: Instant,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

impl Credentials {
    /// Reads secrets and keys now, so a missing or bad file stops start-up rather than the first export.
    pub fn from_config(
        cfg: &UpstreamConfig,
        http: reqwest::Client,
    ) -> Result<Self, CredentialsError> {
        let env_secret = std::env::var(CLIENT_SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty());
        Self::build(cfg, http, env_secret)
    }

    fn build(
        cfg: &UpstreamConfig,
        http: reqwest::Client,
        env_secret: Option<String>,
    ) -> Result<Self, CredentialsError> {
        let kind = match (&cfg.bearer_token, &cfg.oauth) {
            (Some(_), Some(_)) => {
                return Err(CredentialsError::Config(
                    "set either upstream.bearer_token or upstream.oauth, not both".into(),
                ))
            }
            (Some(token), None) => Kind::Static(bearer(token).ok_or_else(|| {
                CredentialsError::Config(
                    "upstream.bearer_token has characters not allowed in an HTTP header".into(),
                )
            })?),
            (None, Some(oauth)) => Kind::OAuth(Box::new(OAuth::new(oauth, http, env_secret)?)),
            (None, None) => Kind::None,
        };
        Ok(Self { kind })
    }

    /// The `Authorization` header value for the next upstream request, if any.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, CredentialsError> {
        match &self.kind {
            Kind::None => Ok(None),
            Kind::Static(value) => Ok(Some(value.clone())),
            Kind::OAuth(oauth) => oauth.authorization().await.map(Some),
        }
    }

    /// Drops the cached token if it is `rejected` (the upstream answered 401 to it); returns whether
    /// asking again can bring a different token, i.e. whether one retry is worth it.
    pub fn invalidate(&self, rejected: &HeaderValue) -> bool {
        match &self.kind {
            Kind::None | Kind::Static(_) => false,
            Kind::OAuth(oauth) => {
                let mut cached = oauth.cached.lock().unwrap_or_else(PoisonError::into_inner);
                // Requests that were sent with the old token keep failing after another one
                // renewed it; only the token actually rejected may be dropped.
                if cached.as_ref().is_some_and(|c| c.authorization == rejected) {
                    *cached = None;
                }
                true
            }
        }
    }
}

impl OAuth {
    fn new(
        cfg: &UpstreamOAuthConfig,
        http: reqwest::Client,
        env_secret: Option<String>,
    ) -> Result<Self, CredentialsError> {
        let client = match cfg.method {
            UpstreamOAuthMethod::ClientSecretBasic => {
                let secret = match (env_secret, &cfg.client_secret_file) {
                    (Some(secret), _) => secret,
                    (None, Some(path)) => read_secret(path)?,
                    (None, None) => {
                        return Err(CredentialsError::Config(format!(
                            "client_secret_basic needs upstream.oauth.client_secret_file or {CLIENT_SECRET_ENV}"
                        )))
                    }
                };
                ClientAuth::Basic(basic(&cfg.client_id, &secret)?)
            }
            UpstreamOAuthMethod::PrivateKeyJwt => {
                let path = cfg.private_key_file.as_ref().ok_or_else(|| {
                    CredentialsError::Config(
                        "private_key_jwt needs upstream.oauth.private_key_file".into(),
                    )
                })?;
                // SMART Backend Services servers pick the verification key by `kid`.
                let kid = cfg.key_id.clone().ok_or_else(|| {
                    CredentialsError::Config("private_key_jwt needs upstream.oauth.key_id".into())
                })?;
                let algorithm = parse_algorithm(&cfg.algorithm)?;
                let key = load_key(path, &cfg.algorithm, algorithm)?;
                let mut header = Header::new(algorithm);
                header.kid = Some(kid);
                header.typ = Some("JWT".into());
                ClientAuth::Jwt {
                    client_id: cfg.client_id.clone(),
                    header: Box::new(header),
                    key,
                }
            }
        };
        Ok(Self {
            http,
            token_url: cfg.token_url.clone(),
            scope: cfg.scope.clone(),
            renew_before: Duration::from_secs(cfg.renew_before_secs),
            client,
            cached: Mutex::new(None),
            renewal: tokio::sync::Mutex::new(()),
        })
    }

    async fn authorization(&self) -> Result<HeaderValue, CredentialsError> {
        if let Some(value) = self.fresh() {
            return Ok(value);
        }
        let _renewing = self.renewal.lock().await;
        // Whoever held the lock before may just have renewed.
        if let Some(value) = self.fresh() {
            return Ok(value);
        }
        let (authorization, lifetime) = self.request_token().await?;
        tracing::debug!(token_url = %self.token_url, lifetime_secs = lifetime.as_secs(), "obtained an upstream access token");
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
            authorization: authorization.clone(),
            renew_at: Instant::now() + renew_after(lifetime, self.renew_before),
        });
        Ok(authorization)
    }

    fn fresh(&self) -> Option<HeaderValue> {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|c| Instant::now() < c.renew_at)
            .map(|c| c.authorization.clone())
    }

    async fn request_token(&self) -> Result<(HeaderValue, Duration), CredentialsError> {
        let url = self.token_url.to_string();
        let mut request = self
            .http
            .post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if let ClientAuth::Basic(value) = &self.client {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let request = request.body(self.form()?);
        let transport = |e: reqwest::Error| CredentialsError::Transport {
            url: url.clone(),
            detail: error_chain(&e.without_url()),
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
                return Err(CredentialsError::InvalidResponse {
                    url,
                    reason: "response body too large",
                });
            }
            body.extend_from_slice(&chunk);
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let error = json
                .as_ref()
                .and_then(|j| j["error"].as_str())
                .map(error_code);
            return Err(CredentialsError::Rejected { url, status, error });
        }
        let invalid = |reason| CredentialsError::InvalidResponse {
            url: url.clone(),
            reason,
        };
        // serde error messages can quote field values, so the body is read by hand and
        // failures named without content.
        let json = json.ok_or_else(|| invalid("not JSON"))?;
        let token = json["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("no access_token"))?;
        if json["token_type"]
            .as_str()
            .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(invalid("token_type is not bearer"));
        }
        let lifetime = match &json["expires_in"] {
            serde_json::Value::Null => DEFAULT_LIFETIME,
            value => value
                .as_u64()
                .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
                .map(Duration::from_secs)
                .ok_or_else(|| invalid("expires_in is not a number of seconds"))?,
        };
        let authorization =
            bearer(token).ok_or_else(|| invalid("access_token is not a valid header value"))?;
        Ok((authorization, lifetime))
    }
    /// The token request body; for `private_key_jwt` with a freshly signed assertion.
    fn form(&self) -> Result<String, CredentialsError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !self.scope.is_empty() {
            form.append_pair("scope", &self.scope);
        }
        if let ClientAuth::Jwt {
            client_id,
            header,
            key,
        } = &self.client
        {
            let now = chrono::Utc::now().timestamp();
            let claims = AssertionClaims {
                iss: client_id,
                sub: client_id,
                aud: self.token_url.as_str(),
                exp: now + ASSERTION_LIFETIME_SECS,
                iat: now,
                jti: uuid::Uuid::new_v4().to_string(),
            };
            let assertion = jsonwebtoken::encode(header, &claims, key)
                .map_err(|e| CredentialsError::Sign(e.to_string()))?;
            form.append_pair("client_assertion_type", ASSERTION_TYPE);
            form.append_pair("client_assertion", &assertion);
        }
        Ok(form.finish())
    }
}

/// How long a token is used before renewal: `renew_before` short of its lifetime, but at least
/// half of it, so a short-lived token is not fetched again for every request.
fn renew_after(lifetime: Duration, renew_before: Duration) -> Duration {
    lifetime - renew_before.min(lifetime / 2)
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined and encoded.
fn basic(client_id: &str, secret: &str) -> Result<HeaderValue, CredentialsError> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials = STANDARD.encode(format!("{}:{}", encode(client_id), encode(secret)));
    let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
        .map_err(|_| CredentialsError::Config("cannot build the Basic header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_secret(path: &Path) -> Result<String, CredentialsError> {
    let secret = std::fs::read_to_string(path).map_err(|source| CredentialsError::File {
        what: "client secret file",
        path: path.to_owned(),
        source,
    })?;
    // Editors and `echo` leave a trailing newline that is not part of the secret.
    let secret = secret.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(CredentialsError::Config(format!(
            "client secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_owned())
}

fn parse_algorithm(name: &str) -> Result<Algorithm, CredentialsError> {
    match name {
        "RS384" => Ok(Algorithm::RS384),
        "ES384" => Ok(Algorithm::ES384),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(CredentialsError::Config(format!(
            "upstream.oauth.algorithm {other:?} is not one of RS384, ES384, RS256, ES256"
        ))),
    }
}

fn load_key(
    path: &Path,
    name: &str,
    algorithm: Algorithm,
) -> Result<EncodingKey, CredentialsError> {
    let pem = std::fs::read(path).map_err(|source| CredentialsError::File {
        what: "private key file",
        path: path.to_owned(),
        source,
    })?;
    let bad = |e: jsonwebtoken::errors::Error| CredentialsError::Key {
        path: path.to_owned(),
        algorithm: name.to_owned(),
        reason: e.to_string(),
    };
    let key = match algorithm {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .map_err(bad)?;
    // The key is only parsed for real when signing; a trial signature catches a key of the wrong
    // type or curve at start-up instead of at the first export.
    jsonwebtoken::encode(&Header::new(algorithm), &serde_json::json!({}), &key).map_err(bad)?;
    Ok(key)
}

/// RFC 6749 §5.2 allows only printable ASCII without `"` and `\` in `error`; anything else is not
/// repeated, and the length is bounded.
fn error_code(raw: &str) -> String {
    raw.chars()
        .filter(|c| matches!(c, ' '..='~') && !matches!(c, '"' | '\\'))
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{DecodingKey, Validation};

    const CLIENT_ID: &str = "bulk proxy";
    const SECRET: &str = "p@ss:w rd/+é";

    /// What the test token endpoint demands of the client.
    enum Check {
        Basic { secret: String },
        Jwt { key: DecodingKey, alg: Algorithm },
        Refuse,
    }

    struct State {
        check: Check,
        expires_in: Option<u64>,
        delay: Duration,
        calls: AtomicUsize,
        jtis: std::sync::Mutex<HashSet<String>>,
        token_url: String,
        /// Tokens the test FHIR endpoint refuses, as if revoked.
        revoked: std::sync::Mutex<HashSet<String>>,
        fhir_calls: AtomicUsize,
    }

    struct Server {
        addr: SocketAddr,
        state: Arc<State>,
    }

    impl Server {
        async fn start(check: Check, expires_in: Option<u64>, delay: Duration) -> Server {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let state = Arc::new(State {
                check,
                expires_in,
                delay,
                calls: AtomicUsize::new(0),
                jtis: Default::default(),
                token_url: format!("http://{addr}/auth/token"),
                revoked: Default::default(),
                fhir_calls: AtomicUsize::new(0),
            });
            let served = state.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let state = served.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| handle(state.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Server { addr, state }
        }

        fn calls(&self) -> usize {
            self.state.calls.load(Ordering::SeqCst)
        }

        fn config(&self, method: &str, extra: &str, renew_before_secs: u64) -> UpstreamConfig {
            toml::from_str(&format!(
                "base_url = \"http://{addr}/fhir\"\nmax_retries = 0\n[oauth]\ntoken_url = \"{url}\"\n\
                 client_id = \"{CLIENT_ID}\"\nmethod = \"{method}\"\nscope = \"system/*.rs\"\n\
                 renew_before_secs = {renew_before_secs}\n{extra}",
                addr = self.addr,
                url = self.state.token_url,
            ))
            .unwrap()
        }
    }

    type Response = hyper::Response<Full<Bytes>>;

    fn answer(status: u16, body: serde_json::Value) -> Response {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    async fn handle(
        state: Arc<State>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        if req.uri().path().starts_with("/fhir/") {
            return Ok(fhir(&state, &req));
        }
        let authorization = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&body).into_owned().collect();
        let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(state.delay).await;
        let refused = |code: &str| Ok(answer(400, serde_json::json!({ "error": code })));
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return refused("bad_grant_type");
        }
        if form.get("scope").map(String::as_str) != Some("system/*.rs") {
            return refused("bad_scope");
        }
        match &state.check {
            Check::Basic { secret } => {
                let Some(encoded) = authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Basic "))
                else {
                    return refused("no_basic_auth");
                };
                let decoded = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
                let (id, given) = decoded.split_once(':').unwrap();
                let form_decode = |s: &str| {
                    form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .unwrap()
                        .1
                        .into_owned()
                };
                if form_decode(id) != CLIENT_ID || form_decode(given) != *secret {
                    return refused("bad_basic_auth");
                }
            }
            Check::Jwt { key, alg } => {
                if authorization.is_some() {
                    return refused("unexpected_authorization");
                }
                if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
                    return refused("bad_assertion_type");
                }
                let assertion = form.get("client_assertion").cloned().unwrap_or_default();
                let header = jsonwebtoken::decode_header(&assertion).unwrap();
                if header.kid.as_deref() != Some("key-1")
                    || header.typ.as_deref() != Some("JWT")
                    || header.alg != *alg
                {
                    return refused("bad_header");
                }
                let mut validation = Validation::new(*alg);
                validation.set_audience(&[&state.token_url]);
                validation.set_issuer(&[CLIENT_ID]);
                validation.sub = Some(CLIENT_ID.into());
                validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
                let Ok(data) =
                    jsonwebtoken::decode::<serde_json::Value>(&assertion, key, &validation)
                else {
                    return refused("bad_signature_or_claims");
                };
                let claims = data.claims;
                let (iat, exp) = (
                    claims["iat"].as_i64().unwrap(),
                    claims["exp"].as_i64().unwrap(),
                );
                let now = chrono::Utc::now().timestamp();
                if exp - iat > 300 || exp <= now || (iat - now).abs() > 5 {
                    return refused("bad_times");
                }
                let jti = claims["jti"].as_str().unwrap_or_default();
                if uuid::Uuid::parse_str(jti).is_err()
                    || !state.jtis.lock().unwrap().insert(jti.to_owned())
                {
                    return refused("bad_jti");
                }
            }
            Check::Refuse => {
                return Ok(answer(
                    400,
                    serde_json::json!({"error": "invalid_client", "error_description": format!("secret {SECRET} is wrong")}),
                ))
            }
        }
        let mut token =
            serde_json::json!({"access_token": format!("t-{n}"), "token_type": "bearer"});
        if let Some(secs) = state.expires_in {
            token["expires_in"] = secs.into();
        }
        Ok(answer(200, token))
    }

    /// A FHIR endpoint that accepts any bearer token not revoked.
    fn fhir(state: &State, req: &hyper::Request<hyper::body::Incoming>) -> Response {
        state.fhir_calls.fetch_add(1, Ordering::SeqCst);
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if token.is_empty() || state.revoked.lock().unwrap().contains(token) {
            return answer(401, serde_json::json!({"resourceType": "OperationOutcome"}));
        }
        answer(
            200,
            serde_json::json!({"resourceType": "CapabilityStatement", "token": token}),
        )
    }

    fn basic_credentials(server: &Server, dir: &Path, renew_before_secs: u64) -> Credentials {
        let file = dir.join("secret");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        let extra = format!("client_secret_file = '{}'", file.display());
        let cfg = server.config("client_secret_basic", &extra, renew_before_secs);
        Credentials::build(&cfg, reqwest::Client::new(), None).unwrap()
    }

    fn basic_server(
        expires_in: Option<u64>,
        delay: Duration,
    ) -> impl std::future::Future<Output = Server> {
        Server::start(
            Check::Basic {
                secret: SECRET.into(),
            },
            expires_in,
            delay,
        )
    }

    async fn header(credentials: &Credentials) -> String {
        let value = credentials.authorization().await.unwrap().unwrap();
        assert!(value.is_sensitive());
        value.to_str().unwrap().to_owned()
    }

    fn openssl(args: &[&str]) {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl {args:?}");
    }

    #[tokio::test]
    async fn token_is_reused_while_valid() {
        let server = basic_server(Some(3600), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let credentials = basic_credentials(&server, dir.path(), 30);
        for _ in 0..10 {
            assert_eq!(header(&credentials).await, "Bearer t-1");
        }
        assert_eq!(server.calls(), 1);
    }

    #[tokio::test]
    async fn env_secret_wins_over_file() {
        let server = Server::start(
            Check::Basic {
                secret: "from env".into(),
            },
            None,
            Duration::ZERO,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from file").unwrap();
        let extra = format!("client_secret_file = '{}'", file.display());
        let cfg = server.config("client_secret_basic", &extra, 30);
        let credentials =
            Credentials::build(&cfg, reqwest::Client::new(), Some("from env".into())).unwrap();
        assert_eq!(header(&credentials).await, "Bearer t-1");
    }

    #[tokio::test]
    async fn token_is_renewed_before_it_expires() {
        // Expires after 2 s, renewed 1 s before that.
        let server = basic_server(Some(2), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let credentials = basic_credentials(&server, dir.path(), 1);
        assert_eq!(header(&credentials).await, "Bearer t-1");
        assert_eq!(header(&credentials).await, "Bearer t-1");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(header(&credentials).await, "Bearer t-2");
        assert_eq!(header(&credentials).await, "Bearer t-2");
        assert_eq!(server.calls(), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_renewal() {
        let server = basic_server(None, Duration::from_millis(200)).await;
        let dir = tempfile::tempdir().unwrap();
        let credentials = Arc::new(basic_credentials(&server, dir.path(), 30));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let credentials = credentials.clone();
                tokio::spawn(async move { header(&credentials).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "Bearer t-1");
        }
        assert_eq!(server.calls(), 1);
    }

    #[tokio::test]
    async fn invalidating_the_current_token_forces_one_renewal() {
        let server = basic_server(Some(3600), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let credentials = basic_credentials(&server, dir.path(), 30);
        let first = credentials.authorization().await.unwrap().unwrap();
        assert!(credentials.invalidate(&first));
        assert_eq!(header(&credentials).await, "Bearer t-2");
        // A late 401 to the token already replaced must not throw away the new one.
        assert!(credentials.invalidate(&first));
        assert_eq!(header(&credentials).await, "Bearer t-2");
        assert_eq!(server.calls(), 2);
    }

    #[tokio::test]
    async fn token_endpoint_error_names_the_code_but_no_secret() {
        let server = Server::start(Check::Refuse, None, Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let credentials = basic_credentials(&server, dir.path(), 30);
        let err = credentials.authorization().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("400") && text.contains("(invalid_client)"),
            "{text}"
        );
        assert!(!text.contains(SECRET) && !text.contains("wrong"), "{text}");
        assert!(!format!("{err:?}").contains(SECRET));
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn rs384_and_es384_assertions_verify() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "RS384",
                Algorithm::RS384,
                vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
            (
                "ES384",
                Algorithm::ES384,
                vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            ),
        ];
        for (name, alg, keygen) in cases {
            let private = dir.path().join(format!("{name}.pem"));
            let public = dir.path().join(format!("{name}.pub.pem"));
            let (private_s, public_s) = (private.to_str().unwrap(), public.to_str().unwrap());
            openssl(&[&["genpkey"], &keygen[..], &["-out", private_s]].concat());
            openssl(&["pkey", "-in", private_s, "-pubout", "-out", public_s]);
            let pem = std::fs::read(&public).unwrap();
            let key = match alg {
                Algorithm::RS384 => DecodingKey::from_rsa_pem(&pem),
                _ => DecodingKey::from_ec_pem(&pem),
            }
            .unwrap();
            let server = Server::start(Check::Jwt { key, alg }, Some(3600), Duration::ZERO).await;
            let extra = format!(
                "private_key_file = '{private_s}'\nkey_id = \"key-1\"\nalgorithm = \"{name}\""
            );
            let cfg = server.config("private_key_jwt", &extra, 30);
            let credentials = Credentials::build(&cfg, reqwest::Client::new(), None).unwrap();
            let first = credentials.authorization().await.unwrap().unwrap();
            assert_eq!(first, "Bearer t-1", "{name}");
            credentials.invalidate(&first);
            assert_eq!(header(&credentials).await, "Bearer t-2", "{name}");
            // Two assertions, two distinct jti, both accepted.
            assert_eq!(server.state.jtis.lock().unwrap().len(), 2, "{name}");

            // The same key under the other family's algorithm fails at start-up.
            let other = if name == "RS384" { "ES384" } else { "RS384" };
            let extra = format!(
                "private_key_file = '{private_s}'\nkey_id = \"key-1\"\nalgorithm = \"{other}\""
            );
            let cfg = server.config("private_key_jwt", &extra, 30);
            let err = Credentials::build(&cfg, reqwest::Client::new(), None)
                .err()
                .unwrap();
            assert!(
                matches!(err, CredentialsError::Key { .. }),
                "{name} as {other}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn missing_files_and_settings_fail_at_start() {
        let server = basic_server(None, Duration::ZERO).await;
        let cases = [
            (
                "client_secret_basic",
                "client_secret_file = '/nonexistent/secret'",
                "client secret file /nonexistent/secret",
            ),
            ("client_secret_basic", "", "client_secret_file"),
            (
                "private_key_jwt",
                "private_key_file = '/nonexistent/key.pem'\nkey_id = \"k\"",
                "private key file /nonexistent/key.pem",
            ),
            ("private_key_jwt", "key_id = \"k\"", "private_key_file"),
            (
                "private_key_jwt",
                "private_key_file = '/nonexistent/key.pem'",
                "key_id",
            ),
            (
                "private_key_jwt",
                "private_key_file = '/x'\nkey_id = \"k\"\nalgorithm = \"HS256\"",
                "HS256",
            ),
        ];
        for (method, extra, expected) in cases {
            let cfg = server.config(method, extra, 30);
            let err = Credentials::build(&cfg, reqwest::Client::new(), None)
                .err()
                .unwrap();
            assert!(
                err.to_string().contains(expected),
                "{method} {extra}: {err}"
            );
        }
        assert_eq!(server.calls(), 0);
    }

    #[tokio::test]
    async fn no_credentials_or_a_static_token() {
        let parse = |extra: &str| -> UpstreamConfig {
            toml::from_str(&format!("base_url = \"http://127.0.0.1:1/fhir\"\n{extra}")).unwrap()
        };
        let none = Credentials::build(&parse(""), reqwest::Client::new(), None).unwrap();
        assert_eq!(none.authorization().await.unwrap(), None);
        let fixed = Credentials::build(
            &parse("bearer_token = \"abc\""),
            reqwest::Client::new(),
            None,
        )
        .unwrap();
        let value = fixed.authorization().await.unwrap().unwrap();
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
        assert!(!fixed.invalidate(&value));
        let bad = Credentials::build(
            &parse("bearer_token = \"a\\nb\""),
            reqwest::Client::new(),
            None,
        );
        assert!(matches!(bad, Err(CredentialsError::Config(_))));
    }

    #[test]
    fn renewal_leaves_at_least_half_the_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(renew_after(s(3600), s(30)), s(3570));
        assert_eq!(renew_after(s(60), s(300)), s(30));
        assert_eq!(renew_after(s(0), s(30)), s(0));
    }

    #[test]
    fn error_codes_are_sanitized() {
        assert_eq!(error_code("invalid_client"), "invalid_client");
        assert_eq!(error_code("a\"b\\c\nd"), "abcd");
        assert_eq!(error_code(&"x".repeat(100)).len(), 64);
    }

    #[tokio::test]
    async fn upstream_renews_once_after_a_401() {
        let server = basic_server(Some(3600), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, SECRET).unwrap();
        let extra = format!("client_secret_file = '{}'", file.display());
        let upstream =
            super::super::Upstream::new(&server.config("client_secret_basic", &extra, 30)).unwrap();
        let metadata = upstream.url("metadata");
        let token = |b: &[u8]| -> Result<String, super::super::ParseError> {
            let v: serde_json::Value = serde_json::from_slice(b)?;
            Ok(v["token"].as_str().unwrap_or_default().to_owned())
        };

        assert_eq!(
            upstream.fetch(metadata.as_str(), token).await.unwrap(),
            "t-1"
        );
        server.state.revoked.lock().unwrap().insert("t-1".into());
        assert_eq!(
            upstream.fetch(metadata.as_str(), token).await.unwrap(),
            "t-2"
        );
        assert_eq!(server.calls(), 2);
        assert_eq!(server.state.fhir_calls.load(Ordering::SeqCst), 3);

        // A token refused even when fresh: one renewal and one retry, then the 401 stands.
        server
            .state
            .revoked
            .lock()
            .unwrap()
            .extend(["t-2".into(), "t-3".into()]);
        let err = upstream.fetch(metadata.as_str(), token).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(server.calls(), 3);
        assert_eq!(server.state.fhir_calls.load(Ordering::SeqCst), 5);
    }
}
