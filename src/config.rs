//! Configuration: a TOML file, overridden by environment variables and command-line flags.
//!
//! One file past 700 lines because it is one schema: each table's keys, defaults, environment and flag
//! overrides and checks sit side by side, so a setting is read, documented and validated in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use url::Url;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value is present but unusable.
    #[error("invalid config value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole configuration of one proxy process.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener clients talk to.
    #[serde(default)]
    pub server: ServerConfig,
    /// The FHIR server the proxy fronts.
    pub upstream: UpstreamConfig,
    /// Bulk export behaviour.
    #[serde(default)]
    pub export: ExportConfig,
    /// SMART Backend Services authorization of the proxy's own endpoints.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The operators' listener: health, metrics, jobs.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where finished export files are kept.
    #[serde(default)]
    pub storage: StorageConfig,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Cohort Groups (the Bulk Cohort API).
    #[serde(default)]
    pub cohort: CohortConfig,
}

/// Cohort Group settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct CohortConfig {
    /// Patients one member-filter may match; past it the cohort fails rather than being truncated.
    pub max_members: usize,
    /// `_count` of the upstream searches that compute members.
    pub page_size: u32,
}

impl Default for CohortConfig {
    fn default() -> Self {
        Self {
            max_members: 1_000_000,
            page_size: 1000,
        }
    }
}

/// OpenTelemetry settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces endpoint (e.g. `http://127.0.0.1:4318/v1/traces`); unset: no trace export.
    pub otlp_endpoint: Option<Url>,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "fhir-bulk-proxy".into(),
        }
    }
}

/// Kinds of file storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// The data directory (embedded default).
    #[default]
    Local,
    /// An S3-compatible bucket.
    S3,
}

/// How clients get files kept in a bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum S3Serve {
    /// Through the proxy's file URLs (access token checked, streamed from the bucket).
    #[default]
    Proxy,
    /// Presigned bucket URLs in the manifest (`requiresAccessToken: false`).
    Presigned,
}

/// File storage settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `local` or `s3`.
    pub kind: StorageKind,
    /// The bucket, for `s3`.
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket; credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint of an S3-compatible server; unset means AWS.
    #[serde(default)]
    pub endpoint: Option<Url>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix; objects are `{prefix}{job_id}/{file}`.
    #[serde(default)]
    pub prefix: String,
    /// Region.
    #[serde(default = "defaults::region")]
    pub region: String,
    /// `proxy` or `presigned`.
    #[serde(default)]
    pub serve: S3Serve,
    /// Lifetime of presigned URLs, in seconds (never past the job's expiry).
    #[serde(default = "defaults::presign_expiry_secs")]
    pub presign_expiry_secs: u64,
}

/// Admin listener settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz`, `/metrics` and `/jobs`; unset: no admin listener.
    pub listen: Option<SocketAddr>,
}

/// Listener settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (the chosen address is logged).
    pub listen: SocketAddr,
    /// The FHIR base URL clients use to reach the proxy; defaults to `http://{listen}` plus the upstream's path.
    pub public_base_url: Option<Url>,
    /// Largest accepted `$export` POST body, in bytes.
    pub max_kickoff_body_bytes: usize,
    /// Largest request head (request line and headers), in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// On SIGTERM, how long in-flight requests may take to finish, in seconds.
    pub shutdown_grace_secs: u64,
    /// Forward requests whose path is outside the public FHIR base (404 when off); export operations
    /// are refused wherever they appear.
    pub forward_outside_base: bool,
    /// Most client connections open at once; unset: derived from the open-file limit at start.
    pub max_connections: Option<u32>,
    /// How long a client may take to send a complete request head, in seconds.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed, in seconds.
    pub idle_timeout_secs: u64,
    /// Most concurrent HTTP/2 streams on one connection.
    pub http2_max_concurrent_streams: u32,
    /// Scheduling niceness (0–19) of the threads that run export jobs, accept connections and serve
    /// the admin listener: the threads serving requests keep the default, so export work yields the
    /// CPU to pass-through traffic. 0: one priority for all.
    pub background_nice: u8,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_base_url: None,
            max_kickoff_body_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            shutdown_grace_secs: 25,
            forward_outside_base: false,
            max_connections: None,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 90,
            http2_max_concurrent_streams: 128,
            background_nice: 10,
        }
    }
}

/// Upstream FHIR server settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// FHIR base URL of the upstream, e.g. `http://127.0.0.1:8090/fhir`.
    pub base_url: Url,
    /// Static bearer token sent on the proxy's own upstream calls (export searches), if any.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Timeout of one upstream request, in seconds.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u64,
    /// Most upstream requests the export workers have in flight at once.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Whether export concurrency adapts to the upstream's latency and yields to pass-through traffic
    /// (`max_concurrent_requests` is then the ceiling), rather than stay at `max_concurrent_requests`.
    #[serde(default = "defaults::yes")]
    pub adaptive_concurrency: bool,
    /// Most export requests per second sent upstream.
    #[serde(default = "defaults::requests_per_second")]
    pub requests_per_second: u32,
    /// Retries of one request on 429, 5xx, timeouts and connection errors.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First retry delay in milliseconds; doubles each retry, with jitter.
    #[serde(default = "defaults::retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest single retry delay in milliseconds, `Retry-After` included.
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// Largest upstream page body accepted, in bytes.
    #[serde(default = "defaults::max_page_bytes")]
    pub max_page_bytes: usize,
    /// A job whose upstream stays unreachable this long fails instead of retrying on, in seconds.
    #[serde(default = "defaults::give_up_after_secs")]
    pub give_up_after_secs: u64,
    /// Most upstream requests one job may make; past it the job fails (0: no limit).
    #[serde(default)]
    pub max_requests_per_job: u64,
    /// OAuth client credentials for the proxy's own upstream calls (instead of `bearer_token`).
    #[serde(default)]
    pub oauth: Option<UpstreamOAuthConfig>,
}

/// How the proxy authenticates to the upstream's token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum UpstreamOAuthMethod {
    /// HTTP Basic with client id and secret (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// A signed JWT assertion (SMART Backend Services, RFC 7523).
    PrivateKeyJwt,
}

/// OAuth 2.0 client credentials grant against the upstream's authorization server.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct UpstreamOAuthConfig {
    /// The upstream's token endpoint.
    pub token_url: Url,
    /// The proxy's client id there.
    pub client_id: String,
    /// `client_secret_basic` or `private_key_jwt`.
    pub method: UpstreamOAuthMethod,
    /// File holding the client secret (`client_secret_basic`); env `FBP_UPSTREAM_CLIENT_SECRET` wins.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// PEM private key (PKCS#8) signing the assertion (`private_key_jwt`).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `kid` of that key as registered with the upstream.
    #[serde(default)]
    pub key_id: Option<String>,
    /// `RS384` or `ES384` (also `RS256`, `ES256`).
    #[serde(default = "defaults::oauth_algorithm")]
    pub algorithm: String,
    /// Scope to request.
    #[serde(default = "defaults::oauth_scope")]
    pub scope: String,
    /// Renew the token this many seconds before it expires.
    #[serde(default = "defaults::renew_before_secs")]
    pub renew_before_secs: u64,
}

/// How pass-through requests are authorized when auth is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "kebab-case")]
pub enum PassThroughAuth {
    /// Forward the caller's `Authorization` unchanged; the upstream decides.
    #[default]
    Forward,
    /// Require a valid proxy token too (it is not forwarded).
    RequireToken,
}

/// What a reload that removes a client does with that client's export jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "kebab-case")]
pub enum OnClientRemoved {
    /// Cancel them and remove their files: nobody may fetch them any more.
    #[default]
    Cancel,
    /// Keep them (until they expire), for a client that is registered again.
    Keep,
}

/// SMART Backend Services settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require tokens on kick-off, status, cancel and files.
    pub enabled: bool,
    /// Lifetime of issued access tokens, in seconds.
    pub token_lifetime_secs: u64,
    /// Secret (at least 32 bytes) signing access tokens; generated under the data directory when unset.
    pub signing_key_file: Option<PathBuf>,
    /// A client's `jwks_url` is fetched again at most this often, in seconds.
    pub jwks_min_refetch_secs: u64,
    /// Pass-through authorization.
    pub pass_through: PassThroughAuth,
    /// Registered clients.
    pub clients: Vec<ClientConfig>,
    /// Jobs of a client a reload removed: cancelled or kept.
    pub on_client_removed: OnClientRemoved,
    /// Trust an existing authorization server instead of the built-in token endpoint.
    pub external: Option<ExternalAuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            token_lifetime_secs: 300,
            signing_key_file: None,
            jwks_min_refetch_secs: 60,
            pass_through: PassThroughAuth::Forward,
            clients: Vec::new(),
            on_client_removed: OnClientRemoved::Cancel,
            external: None,
        }
    }
}

/// One registered backend client.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's id (`iss` and `sub` of its assertions).
    pub client_id: String,
    /// Scopes the client may be granted, e.g. `system/*.rs`, `system/Observation.read`.
    pub scopes: Vec<String>,
    /// Inline JWKS (`{"keys": [...]}`) of the client's public keys.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// URL of the client's JWKS (HTTPS, or HTTP on loopback only).
    #[serde(default)]
    pub jwks_url: Option<Url>,
}

/// An external authorization server whose access tokens the proxy accepts.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ExternalAuthConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// The issuer's JWKS.
    pub jwks_url: Url,
    /// Expected `aud`.
    pub audience: String,
    /// The issuer's token endpoint, advertised in smart-configuration.
    pub token_endpoint: Url,
    /// Claim holding the granted scopes (space-separated string or array).
    #[serde(default = "defaults::scope_claim")]
    pub scope_claim: String,
    /// Claim naming the client, the owner of its jobs.
    #[serde(default = "defaults::client_claim")]
    pub client_claim: String,
}

/// Bulk export settings.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Directory holding the job store and the NDJSON files.
    pub data_dir: PathBuf,
    /// `_count` of each upstream search page.
    pub page_size: u32,
    /// Resources per NDJSON file before it is rolled over to the next.
    pub resources_per_file: u64,
    /// Files per manifest: a longer list is paged into manifests chained by `link` `next`.
    pub manifest_page_files: usize,
    /// Patients per `patient=` search in Patient and Group exports, at most.
    pub patient_batch_size: usize,
    /// Longest upstream search URL the planner makes when it batches patients into one search.
    pub max_search_url_bytes: usize,
    /// Exports first ask the upstream how many resources each type has and leave out the types that
    /// have none, largest first: Patient and Group exports of several patient batches always (one
    /// `_count=0` search per type), system exports where the upstream takes `batch` requests (all the
    /// counts in one).
    pub skip_empty_types: bool,
    /// From this share of the upstream's patients (0 to 1; 0: never), such exports page a type whole
    /// and keep their patients' resources, wherever that takes fewer requests than searching by patient.
    pub whole_type_share: f64,
    /// Jobs running at once; past it kick-off answers 429.
    pub max_concurrent_jobs: usize,
    /// Slices of one job fetched at once.
    pub slice_concurrency: usize,
    /// `_lastUpdated` ranges each type's search is split into at system level, fetched in parallel.
    pub time_slices: usize,
    /// Write NDJSON files gzip-compressed (served as they are to clients that accept gzip).
    pub gzip: bool,
    /// `Retry-After` given to status polls, in seconds.
    pub retry_after_secs: u64,
    /// Polls of one job closer together than this get 429, in milliseconds.
    pub min_poll_interval_ms: u64,
    /// How long a finished job and its files stay available, in seconds.
    pub expire_after_secs: u64,
    /// How often expired jobs are looked for, in seconds.
    pub reaper_interval_secs: u64,
    /// Jobs one client may have running at once (with authorization on).
    pub max_jobs_per_client: usize,
    /// Most resources one export may hold; past it the job fails (0: no limit).
    pub max_resources_per_job: u64,
    /// Most bytes all export files together may take; a job that would pass it fails (0: no limit).
    pub max_disk_bytes: u64,
    /// Progress of running jobs is logged this often, in seconds.
    pub progress_log_secs: u64,
    /// What a Patient or Group kick-off does with a requested type the upstream cannot search by patient.
    pub unsearchable_type: UnsearchableType,
}

/// A Patient or Group kick-off's answer to a requested R4 type the upstream cannot search by patient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum UnsearchableType {
    /// Accepted and exported empty; the manifest's error file says why.
    #[default]
    Note,
    /// Refused with 400, as the Bulk Data spec prefers.
    Reject,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            page_size: 500,
            resources_per_file: 100_000,
            manifest_page_files: 1000,
            patient_batch_size: 500,
            max_search_url_bytes: 6000,
            skip_empty_types: true,
            whole_type_share: 0.75,
            max_concurrent_jobs: 4,
            slice_concurrency: 2,
            time_slices: 1,
            gzip: false,
            retry_after_secs: 2,
            min_poll_interval_ms: 1000,
            expire_after_secs: 3600,
            reaper_interval_secs: 60,
            max_jobs_per_client: 2,
            max_resources_per_job: 0,
            max_disk_bytes: 0,
            progress_log_secs: 30,
            unsearchable_type: UnsearchableType::Note,
        }
    }
}

// The one place defaults live: a table whose every key has a default implements `Default` (and is
// `#[serde(default)]`); a table with a required key cannot, so its optional keys take these functions.
// `example_config_shows_the_defaults` and `configuration_reference_matches_the_code` hold
// config/example.toml and docs/configuration.md to them.
mod defaults {
    pub fn timeout_secs() -> u64 {
        60
    }
    pub fn max_concurrent_requests() -> usize {
        8
    }
    pub fn yes() -> bool {
        true
    }
    pub fn requests_per_second() -> u32 {
        50
    }
    pub fn max_retries() -> u32 {
        5
    }
    pub fn retry_base_ms() -> u64 {
        200
    }
    pub fn retry_max_ms() -> u64 {
        30_000
    }
    pub fn max_page_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn region() -> String {
        "us-east-1".into()
    }
    pub fn presign_expiry_secs() -> u64 {
        3600
    }
    pub fn give_up_after_secs() -> u64 {
        600
    }
    pub fn oauth_algorithm() -> String {
        "RS384".into()
    }
    pub fn oauth_scope() -> String {
        "system/*.rs".into()
    }
    pub fn renew_before_secs() -> u64 {
        30
    }
    pub fn scope_claim() -> String {
        "scope".into()
    }
    pub fn client_claim() -> String {
        "client_id".into()
    }
}

/// Values given on the command line or in the environment, which win over the file (the `serve` flags).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Address to listen on (server.listen).
    #[arg(long, env = "FBP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Upstream FHIR base URL (upstream.base_url).
    #[arg(long, env = "FBP_UPSTREAM_URL")]
    pub upstream_url: Option<Url>,
    /// Public FHIR base URL of the proxy (server.public_base_url).
    #[arg(long, env = "FBP_PUBLIC_BASE_URL")]
    pub public_base_url: Option<Url>,
    /// Data directory for the job store and files (export.data_dir).
    #[arg(long, env = "FBP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token for the proxy's own upstream requests (upstream.bearer_token).
    #[arg(long, env = "FBP_UPSTREAM_BEARER_TOKEN", hide_env_values = true)]
    pub upstream_bearer_token: Option<String>,
}

impl Config {
    /// Reads `path` (every setting at its default when there is none), applies `overrides` and checks the
    /// result.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let parse_error = |source| ConfigError::Parse {
            path: path.map_or_else(|| PathBuf::from("(none)"), Path::to_owned),
            source,
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
        // The one setting without a default may come from the command line alone.
        if let Some(url) = &overrides.upstream_url {
            let upstream = table
                .entry("upstream")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(upstream) = upstream.as_table_mut() {
                upstream.insert("base_url".into(), toml::Value::String(url.to_string()));
            }
        }
        if table
            .get("upstream")
            .and_then(|u| u.get("base_url"))
            .is_none()
        {
            return Err(ConfigError::Invalid {
                key: "upstream.base_url",
                reason: "not set: give it in the config file, with --upstream-url or in FBP_UPSTREAM_URL"
                    .into(),
            });
        }
        let mut config: Config = table.try_into().map_err(parse_error)?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.server.listen = v;
        }
        if let Some(v) = o.upstream_url {
            self.upstream.base_url = v;
        }
        if let Some(v) = o.public_base_url {
            self.server.public_base_url = Some(v);
        }
        if let Some(v) = o.data_dir {
            self.export.data_dir = v;
        }
        if let Some(v) = o.upstream_bearer_token {
            self.upstream.bearer_token = Some(v);
        }
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than 0".into(),
                });
            }
            Ok(())
        }
        if self.server.background_nice > 19 {
            return Err(ConfigError::Invalid {
                key: "server.background_nice",
                reason: "must be 0 to 19".into(),
            });
        }
        strip_trailing_slash(&mut self.upstream.base_url);
        if let Some(public) = self.server.public_base_url.as_mut() {
            strip_trailing_slash(public);
        }
        for (key, url) in [
            ("upstream.base_url", Some(&self.upstream.base_url)),
            (
                "server.public_base_url",
                self.server.public_base_url.as_ref(),
            ),
        ] {
            if let Some(url) = url {
                if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: format!("{url} is not an http(s) base URL without a query"),
                    });
                }
            }
        }
        if self.upstream.bearer_token.is_some() && self.upstream.oauth.is_some() {
            return Err(ConfigError::Invalid {
                key: "upstream.oauth",
                reason: "set either upstream.bearer_token or upstream.oauth, not both".into(),
            });
        }
        for client in &self.auth.clients {
            if client.jwks.is_some() == client.jwks_url.is_some() {
                return Err(ConfigError::Invalid {
                    key: "auth.clients",
                    reason: format!(
                        "client {:?} needs exactly one of jwks or jwks_url",
                        client.client_id
                    ),
                });
            }
            // A typo in a grant would otherwise grant nothing, silently.
            let unknown = client
                .scopes
                .iter()
                .filter_map(|s| crate::auth::scopes::Scope::parse(s))
                .find(|s| !s.names_real_type());
            if let Some(scope) = unknown {
                return Err(ConfigError::Invalid {
                    key: "auth.clients",
                    reason: format!(
                        "client {:?} has a scope on {}, which is not an R4 resource type",
                        client.client_id, scope.resource
                    ),
                });
            }
        }
        positive("auth.token_lifetime_secs", self.auth.token_lifetime_secs)?;
        if let Some(max) = self.server.max_connections {
            positive("server.max_connections", max.into())?;
        }
        positive(
            "server.header_read_timeout_secs",
            self.server.header_read_timeout_secs,
        )?;
        positive("server.idle_timeout_secs", self.server.idle_timeout_secs)?;
        positive(
            "server.http2_max_concurrent_streams",
            self.server.http2_max_concurrent_streams.into(),
        )?;
        positive("export.page_size", self.export.page_size.into())?;
        positive("export.resources_per_file", self.export.resources_per_file)?;
        positive(
            "export.manifest_page_files",
            self.export.manifest_page_files as u64,
        )?;
        positive(
            "export.patient_batch_size",
            self.export.patient_batch_size as u64,
        )?;
        positive(
            "export.max_search_url_bytes",
            self.export.max_search_url_bytes as u64,
        )?;
        positive(
            "export.max_concurrent_jobs",
            self.export.max_concurrent_jobs as u64,
        )?;
        if !(0.0..=1.0).contains(&self.export.whole_type_share) {
            return Err(ConfigError::Invalid {
                key: "export.whole_type_share",
                reason: "must be from 0 (never) to 1".into(),
            });
        }
        positive(
            "export.slice_concurrency",
            self.export.slice_concurrency as u64,
        )?;
        positive(
            "upstream.max_concurrent_requests",
            self.upstream.max_concurrent_requests as u64,
        )?;
        positive(
            "upstream.requests_per_second",
            self.upstream.requests_per_second.into(),
        )?;
        Ok(())
    }

    /// The public base URL, derived from the listen address when not configured.
    pub fn public_base(&self, bound: SocketAddr) -> Url {
        match &self.server.public_base_url {
            Some(url) => url.clone(),
            None => {
                let mut url = Url::parse(&format!("http://{bound}")).expect("socket address URL");
                url.set_path(self.upstream.base_url.path());
                url
            }
        }
    }
}

fn strip_trailing_slash(url: &mut Url) {
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), Overrides::default())
    }

    #[test]
    fn minimal_file_gets_defaults_and_trimmed_base() {
        let c = parse("[upstream]\nbase_url = \"http://127.0.0.1:9/fhir/\"\n").unwrap();
        assert_eq!(c.upstream.base_url.as_str(), "http://127.0.0.1:9/fhir");
        assert_eq!(c.export.page_size, 500);
        let public = c.public_base("127.0.0.1:7000".parse().unwrap());
        assert_eq!(public.as_str(), "http://127.0.0.1:7000/fhir");
    }

    #[test]
    fn overrides_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[upstream]\nbase_url = \"http://127.0.0.1:9/fhir\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            Overrides {
                data_dir: Some("/x".into()),
                upstream_url: Some(Url::parse("http://127.0.0.1:10/r4").unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.export.data_dir, PathBuf::from("/x"));
        assert_eq!(c.upstream.base_url.as_str(), "http://127.0.0.1:10/r4");
    }

    #[test]
    fn no_file_needs_only_the_upstream_url() {
        let url = Url::parse("http://127.0.0.1:9/fhir").unwrap();
        let c = Config::load(
            None,
            Overrides {
                upstream_url: Some(url.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.upstream.base_url, url);
        assert_eq!(c.server.listen, ServerConfig::default().listen);
        assert!(matches!(
            Config::load(None, Overrides::default()),
            Err(ConfigError::Invalid {
                key: "upstream.base_url",
                ..
            })
        ));
    }

    #[test]
    fn example_config_loads_with_auth_on() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let c = Config::load(Some(&path), Overrides::default()).unwrap();
        assert!(c.auth.enabled);
        assert_eq!(c.auth.clients.len(), 1);
    }

    /// Every required key, set, and every optional table present: parsed, it holds the code's default for
    /// every other key.
    const REQUIRED: &str = r#"
        [upstream]
        base_url = "http://127.0.0.1:1/fhir"
        [upstream.oauth]
        token_url = "http://127.0.0.1:1/token"
        client_id = "c"
        method = "private_key_jwt"
        [storage.s3]
        bucket = "b"
        [auth.external]
        issuer = "i"
        jwks_url = "http://127.0.0.1:1/jwks"
        audience = "a"
        token_endpoint = "http://127.0.0.1:1/token"
    "#;
    /// The same for one `[[auth.clients]]` entry.
    const REQUIRED_CLIENT: &str = "client_id = \"c\"\nscopes = []\n";

    type Keys = std::collections::BTreeMap<String, serde_json::Value>;

    /// Dotted key to value; a table inside an array of tables (`auth.clients`) is one value, and so is an
    /// inline JWKS, the one free-form value of the configuration.
    fn flatten(prefix: &str, value: serde_json::Value, out: &mut Keys) {
        match value {
            serde_json::Value::Object(map) if !prefix.ends_with(".jwks") => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf);
            }
        }
    }

    fn keys<T: serde::Serialize>(prefix: &str, value: &T) -> Keys {
        let mut out = Keys::new();
        flatten(prefix, serde_json::to_value(value).unwrap(), &mut out);
        out
    }

    /// Every key of the config structs with its default in code (`null`: unset), and the required ones.
    fn code_defaults() -> (Keys, std::collections::BTreeSet<String>) {
        let mut defaults = keys("", &toml::from_str::<Config>(REQUIRED).unwrap());
        let client: ClientConfig = toml::from_str(REQUIRED_CLIENT).unwrap();
        defaults.extend(keys("auth.clients[]", &client));
        let mut required = Keys::new();
        flatten(
            "",
            serde_json::to_value(toml::from_str::<toml::Table>(REQUIRED).unwrap()).unwrap(),
            &mut required,
        );
        let client: toml::Table = toml::from_str(REQUIRED_CLIENT).unwrap();
        flatten(
            "auth.clients[]",
            serde_json::to_value(client).unwrap(),
            &mut required,
        );
        (defaults, required.into_keys().collect())
    }

    fn example_text() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        std::fs::read_to_string(path).unwrap()
    }

    /// The example with its commented-out keys and tables (`# key = value`, `# [table]`) put in.
    fn uncomment(text: &str) -> String {
        let is_key = |rest: &str| {
            rest.split_once('=').is_some_and(|(k, _)| {
                let k = k.trim();
                !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
        };
        let is_table = |rest: &str| {
            let name = rest.split('#').next().unwrap_or("").trim();
            name.starts_with('[')
                && name.ends_with(']')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"[]_.".contains(&b))
        };
        text.lines()
            .map(|line| match line.strip_prefix('#').map(str::trim_start) {
                Some(rest) if is_key(rest) || is_table(rest) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn example_config_shows_the_defaults() {
        // The example deliberately sets these to something other than the default: a deployment's values.
        const DELIBERATE: [&str; 7] = [
            "upstream.base_url",
            "server.listen",
            "server.public_base_url",
            "export.data_dir",
            "admin.listen",
            "auth.enabled",
            "auth.clients",
        ];
        let text = example_text();
        let code = keys(
            "",
            &toml::from_str::<Config>("[upstream]\nbase_url = \"http://127.0.0.1:1/fhir\"\n")
                .unwrap(),
        );
        let shipped = keys("", &toml::from_str::<Config>(&text).unwrap());
        assert_eq!(
            code.keys().collect::<Vec<_>>(),
            shipped.keys().collect::<Vec<_>>()
        );
        for (key, default) in &code {
            if DELIBERATE.contains(&key.as_str()) {
                assert_ne!(
                    &shipped[key], default,
                    "{key} is listed as deliberate but is the default"
                );
            } else {
                assert_eq!(&shipped[key], default, "config/example.toml sets {key}");
            }
        }

        // Commented out, a key shows its default too, unless it has none (required, or unset).
        let (code, required) = code_defaults();
        let all: Config = toml::from_str(&uncomment(&text))
            .unwrap_or_else(|e| panic!("example with every key put in: {}", e.message()));
        let mut all = keys("", &all);
        let clients = all.remove("auth.clients").unwrap();
        let client: ClientConfig = serde_json::from_value(clients[0].clone()).unwrap();
        all.extend(keys("auth.clients[]", &client));
        all.insert("auth.clients".into(), serde_json::json!([]));
        assert_eq!(
            code.keys().collect::<Vec<_>>(),
            all.keys().collect::<Vec<_>>()
        );
        for (key, default) in &code {
            if default.is_null() || required.contains(key) || DELIBERATE.contains(&key.as_str()) {
                continue;
            }
            assert_eq!(&all[key], default, "config/example.toml shows {key}");
        }
    }

    #[test]
    fn configuration_reference_matches_the_code() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (code, required) = code_defaults();
        let mut listed = std::collections::BTreeSet::new();
        for row in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let key = cells[0].trim_start_matches("| ").trim_matches('`');
            let cell = cells.get(1).copied().unwrap_or("");
            let default = code
                .get(key)
                .unwrap_or_else(|| panic!("docs/configuration.md lists {key}, no such key"));
            assert!(listed.insert(key.to_owned()), "{key} listed twice");
            if required.contains(key) {
                assert!(cell.starts_with("required"), "{key} is required: {cell}");
            } else if default.is_null() {
                assert!(
                    cell.starts_with("unset"),
                    "{key} is unset by default: {cell}"
                );
            } else {
                let literal = cell
                    .strip_prefix('`')
                    .and_then(|c| c.split('`').next())
                    .unwrap_or_else(|| panic!("{key}: default {cell:?} is not `a TOML value`"));
                let value: toml::Table = toml::from_str(&format!("v = {literal}"))
                    .unwrap_or_else(|e| panic!("{key}: {literal}: {e}"));
                assert_eq!(
                    &serde_json::to_value(&value["v"]).unwrap(),
                    default,
                    "docs/configuration.md gives {key} the default {literal}"
                );
            }
        }
        let missing: Vec<_> = code.keys().filter(|k| !listed.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks {missing:?}"
        );
    }

    #[test]
    fn client_scopes_on_unknown_types_are_refused() {
        let client = |scopes: &str| {
            format!(
                "[upstream]\nbase_url = \"http://a/\"\n[auth]\n[[auth.clients]]\nclient_id = \"c\"\n\
                 scopes = {scopes}\njwks = {{ keys = [] }}\n"
            )
        };
        let err = parse(&client(
            r#"["system/Patient.rs", "system/Obervation.read"]"#,
        ))
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: "auth.clients", reason } if reason.contains("Obervation")),
            "{err}"
        );
        let c = parse(&client(r#"["system/*.rs", "system/Observation.read"]"#)).unwrap();
        assert_eq!(c.auth.clients[0].scopes.len(), 2);
        assert_eq!(c.auth.on_client_removed, OnClientRemoved::Cancel);
        let keep = "[upstream]\nbase_url = \"http://a/\"\n[auth]\non_client_removed = \"keep\"\n";
        assert_eq!(
            parse(keep).unwrap().auth.on_client_removed,
            OnClientRemoved::Keep
        );
    }

    #[test]
    fn rejects_unknown_keys_and_zero_values() {
        assert!(matches!(
            parse("[upstream]\nbase_url = \"http://a/\"\nbogus = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            parse("[upstream]\nbase_url = \"http://a/\"\n[export]\npage_size = 0\n"),
            Err(ConfigError::Invalid {
                key: "export.page_size",
                ..
            })
        ));
    }

    #[test]
    fn background_nice_is_a_niceness_and_defaults_to_yielding() {
        let nice = |v: &str| {
            parse(&format!(
                "[server]\nbackground_nice = {v}\n[upstream]\nbase_url = \"http://a/\"\n"
            ))
        };
        assert_eq!(
            parse("[upstream]\nbase_url = \"http://a/\"\n")
                .unwrap()
                .server
                .background_nice,
            10
        );
        assert_eq!(nice("0").unwrap().server.background_nice, 0);
        assert_eq!(nice("19").unwrap().server.background_nice, 19);
        assert!(matches!(
            nice("20"),
            Err(ConfigError::Invalid {
                key: "server.background_nice",
                ..
            })
        ));
        assert!(
            nice("-1").is_err(),
            "raising the priority takes privileges the proxy has no use for"
        );
    }
}
