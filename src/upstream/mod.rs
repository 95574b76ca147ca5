//! The proxy's own calls to the upstream FHIR server: rate-limited, bounded, retried.
//!
//! It passes 700 lines only with its tests; what can stand alone is in the modules beside it (batch
//! Bundles, searchset reading, credentials, the limiter).

pub mod batch;
pub mod bundle;
pub mod credentials;
pub mod limiter;

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Response;
use reqwest::StatusCode;
use tokio::sync::RwLock;
use url::Url;

use tracing::Instrument;

use crate::config::UpstreamConfig;
use crate::metrics::METRICS;
use credentials::{Credentials, CredentialsError};
use limiter::{ExportPermit, Limiter, Slot};

/// How long a fetched CapabilityStatement is trusted.
const CAPABILITY_TTL: Duration = Duration::from_secs(300);

/// Errors of upstream calls, after retries.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream answered with a status that retrying does not fix (or retries ran out).
    #[error("upstream answered {status} for {url}: {detail}")]
    Status {
        status: StatusCode,
        url: String,
        detail: String,
    },
    /// Connection, timeout or body errors, after the last retry.
    #[error("upstream request to {url} failed: {detail}")]
    Transport { url: String, detail: String },
    /// The body arrived but is not what FHIR promised (not JSON, not a Bundle, too large…).
    #[error("upstream response from {url} is unusable: {detail}")]
    Invalid { url: String, detail: String },
    /// The upstream could not be reached for longer than `give_up_after_secs`.
    #[error("the upstream has been unreachable for {secs} s: {detail}")]
    Unreachable { secs: u64, detail: String },
    /// The job's upstream request budget is spent.
    #[error("the export needs more than max_requests_per_job ({0}) upstream requests")]
    Budget(u64),
    /// A URL (a `next` link, a reference) points outside the upstream: never followed.
    #[error("refusing to follow {url}: it is not under the upstream base {base}")]
    Foreign { url: String, base: String },
    /// No access token could be had for the upstream, or its credentials are unusable.
    #[error("cannot authenticate to the upstream: {0}")]
    Credentials(#[from] CredentialsError),
    /// The HTTP client itself could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(reqwest::Error),
}

impl UpstreamError {
    /// What a client may be told: the kind of failure, without the upstream's URLs, addresses or answers,
    /// which are for the operator's log.
    pub fn public_message(&self) -> String {
        match self {
            UpstreamError::Status { status, .. } => {
                format!("the upstream FHIR server answered {status}")
            }
            UpstreamError::Transport { .. } => {
                "the upstream FHIR server could not be reached".to_owned()
            }
            UpstreamError::Invalid { .. } => {
                "the upstream FHIR server's response was unusable".to_owned()
            }
            UpstreamError::Unreachable { secs, .. } => {
                format!("the upstream FHIR server has been unreachable for {secs} s")
            }
            UpstreamError::Foreign { .. } => {
                "the upstream FHIR server linked outside its base; the link was not followed"
                    .to_owned()
            }
            UpstreamError::Credentials(_) => {
                "the proxy cannot authenticate to the upstream".to_owned()
            }
            UpstreamError::Budget(_) | UpstreamError::Client(_) => self.to_string(),
        }
    }

    /// The upstream's own HTTP status, when it gave one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What the upstream's CapabilityStatement says the export can search.
#[derive(Debug, Default, Clone)]
pub struct Capability {
    /// Searchable resource types and their search parameters.
    pub types: BTreeMap<String, BTreeSet<String>>,
    /// Types with type-level `_history` (where deletions can be found).
    pub history: BTreeSet<String>,
    /// The `target` types of reference search parameters, per type and parameter, where the statement
    /// gives them (R4 does not require it; some servers do).
    pub targets: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Whether the server declares the `batch` interaction (`rest.interaction`).
    pub batch: bool,
}

impl Capability {
    /// Reads `rest[mode=server].resource[]` with a `search-type` interaction.
    pub fn from_statement(statement: &serde_json::Value) -> Capability {
        let mut cap = Capability::default();
        let rests = statement["rest"].as_array().into_iter().flatten();
        for rest in rests.filter(|r| r["mode"] == "server") {
            let interactions = rest["interaction"].as_array().into_iter().flatten();
            cap.batch |= interactions.into_iter().any(|i| i["code"] == "batch");
            for resource in rest["resource"].as_array().into_iter().flatten() {
                let Some(name) = resource["type"].as_str() else {
                    continue;
                };
                let has = |code: &str| {
                    resource["interaction"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|i| i["code"] == code)
                };
                if has("search-type") {
                    let search_params = resource["searchParam"].as_array().into_iter().flatten();
                    let mut params = BTreeSet::new();
                    for p in search_params {
                        let Some(param) = p["name"].as_str() else {
                            continue;
                        };
                        params.insert(param.to_owned());
                        let targets: BTreeSet<String> = p["target"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect();
                        if !targets.is_empty() {
                            cap.targets
                                .entry(name.to_owned())
                                .or_default()
                                .insert(param.to_owned(), targets);
                        }
                    }
                    cap.types.insert(name.to_owned(), params);
                }
                if has("history-type") {
                    cap.history.insert(name.to_owned());
                }
            }
        }
        cap
    }
}

/// Client for the proxy's own upstream requests.
pub struct Upstream {
    http: reqwest::Client,
    base: Url,
    credentials: Credentials,
    rate: DefaultDirectRateLimiter,
    concurrency: Arc<Limiter>,
    max_retries: u32,
    retry_base: Duration,
    retry_max: Duration,
    give_up_after: Duration,
    max_page_bytes: usize,
    capability: RwLock<Option<(Instant, Arc<Capability>)>>,
}

impl Upstream {
    /// Builds the client from config, reading the credentials' secret and key files.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.timeout_secs.min(10)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(cfg.max_concurrent_requests)
            .build()
            .map_err(UpstreamError::Client)?;
        let credentials = Credentials::from_config(cfg, http.clone())?;
        let rps = NonZeroU32::new(cfg.requests_per_second).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            http,
            base: cfg.base_url.clone(),
            credentials,
            rate: RateLimiter::direct(Quota::per_second(rps)),
            concurrency: Limiter::new(cfg.max_concurrent_requests, cfg.adaptive_concurrency),
            max_retries: cfg.max_retries,
            retry_base: Duration::from_millis(cfg.retry_base_ms),
            retry_max: Duration::from_millis(cfg.retry_max_ms),
            give_up_after: Duration::from_secs(cfg.give_up_after_secs),
            max_page_bytes: cfg.max_page_bytes,
            capability: RwLock::new(None),
        })
    }

    /// The concurrency limiter of export requests, which pass-through requests are counted by.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.concurrency
    }

    /// The upstream FHIR base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `[base]/{path}` with no query.
    pub fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}/{}",
            self.base.path().trim_end_matches('/'),
            path
        ));
        url
    }

    /// One quick request to `[base]/metadata`, no retries: whether the upstream answers at all. The
    /// statement it brings renews the cached one once that is half its age: a proxy probed for
    /// readiness then never makes an export wait for it.
    pub async fn probe(&self) -> bool {
        let url = self.url("metadata");
        let probed = async {
            let (response, _) = self.send(&url, None).await.ok()?;
            if !response.status().is_success() {
                return Some(false);
            }
            if self
                .capability_age()
                .await
                .is_none_or(|age| age >= CAPABILITY_TTL / 2)
            {
                let statement = response.bytes().await.ok();
                let statement = statement.and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(statement) = statement {
                    self.keep_capability(&statement).await;
                }
            }
            Some(true)
        };
        let probed = tokio::time::timeout(Duration::from_secs(2), probed).await;
        probed.ok().flatten().unwrap_or(false)
    }

    /// How long ago the cached CapabilityStatement was read, if one is.
    async fn capability_age(&self) -> Option<Duration> {
        self.capability
            .read()
            .await
            .as_ref()
            .map(|(at, _)| at.elapsed())
    }

    /// Caches the digest of `statement`, and returns it.
    async fn keep_capability(&self, statement: &serde_json::Value) -> Arc<Capability> {
        let cap = Arc::new(Capability::from_statement(statement));
        *self.capability.write().await = Some((Instant::now(), cap.clone()));
        cap
    }

    /// The proxy's own `Authorization` for the upstream, if it has credentials.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        Ok(self.credentials.authorization().await?)
    }

    /// Checks that `url` is under the upstream base, so the proxy's credentials never leave it.
    pub fn check_own(&self, url: &str) -> Result<Url, UpstreamError> {
        let foreign = || UpstreamError::Foreign {
            url: url.to_owned(),
            base: self.base.to_string(),
        };
        let parsed = Url::parse(url).map_err(|_| foreign())?;
        let base_path = self.base.path().trim_end_matches('/');
        let under_base =
            parsed.path() == base_path || parsed.path().starts_with(&format!("{base_path}/"));
        if parsed.origin() != self.base.origin() || !under_base {
            return Err(foreign());
        }
        Ok(parsed)
    }

    /// The upstream's CapabilityStatement digest, cached for a few minutes.
    pub async fn capability(&self) -> Result<Arc<Capability>, UpstreamError> {
        if let Some((at, cap)) = self.capability.read().await.as_ref() {
            if at.elapsed() < CAPABILITY_TTL {
                return Ok(cap.clone());
            }
        }
        let url = self.url("metadata");
        let statement: serde_json::Value = self
            .fetch(url.as_str(), |b| Ok(serde_json::from_slice(b)?))
            .await?;
        Ok(self.keep_capability(&statement).await)
    }

    /// GETs `url` and parses the whole body with `parse`, retrying transient failures.
    ///
    /// Retried: 429, 5xx, connection errors, timeouts, truncated bodies and bodies `parse` rejects
    /// (a proxy in between may have cut them). `Retry-After` is honoured up to `retry_max_ms`.
    pub async fn fetch<T>(
        &self,
        url: &str,
        parse: impl Fn(&[u8]) -> Result<T, ParseError>,
    ) -> Result<T, UpstreamError> {
        let whole = || Whole {
            body: Vec::new(),
            parse: &parse,
        };
        self.fetch_streamed(url, None, whole, || Ok(())).await
    }

    /// [`Upstream::fetch`] with the body handed to a fresh `sink()` chunk by chunk as it arrives, asking
    /// `before_attempt` before every request (a job's request budget); `prefetched` (an attempt at `url`
    /// already made and counted) is its first attempt, and its failure is retried like any other.
    ///
    /// An unreachable upstream (connection refused, timeouts) is retried past `max_retries` until it
    /// has been unreachable for `give_up_after_secs`: a restarting server should not fail an export,
    /// one that is gone for good should not keep it waiting forever.
    pub async fn fetch_streamed<S: PageSink>(
        &self,
        url: &str,
        prefetched: Option<Prefetched>,
        sink: impl Fn() -> S,
        before_attempt: impl Fn() -> Result<(), UpstreamError>,
    ) -> Result<S::Page, UpstreamError> {
        let target = self.check_own(url)?;
        self.exchange(target, None, prefetched, sink, before_attempt)
            .await
    }

    /// Reads `urls` (searches under the base) in one `batch` request: each one's Bundle, in order,
    /// `None` for one the batch did not answer with a Bundle. Retried like a fetch, which is safe:
    /// its reads change nothing.
    pub async fn read_batch(&self, urls: &[String]) -> Result<Vec<Option<Vec<u8>>>, UpstreamError> {
        let bundle =
            batch::bundle(self.base.as_str(), urls).ok_or_else(|| UpstreamError::Foreign {
                url: urls
                    .iter()
                    .find(|u| self.check_own(u).is_err())
                    .cloned()
                    .unwrap_or_default(),
                base: self.base.to_string(),
            })?;
        let body = Some(bytes::Bytes::from(bundle));
        let sink = || batch::Answers::new(urls.len());
        let answers = (self.exchange(self.base.clone(), body, None, sink, || Ok(()))).await?;
        METRICS
            .batched_reads
            .inc_by(answers.iter().flatten().count() as u64);
        Ok(answers)
    }

    /// One request (a GET, or a POST of `body`) with its retries, its body handed to `sink()`.
    async fn exchange<S: PageSink>(
        &self,
        target: Url,
        body: Option<bytes::Bytes>,
        mut prefetched: Option<Prefetched>,
        sink: impl Fn() -> S,
        before_attempt: impl Fn() -> Result<(), UpstreamError>,
    ) -> Result<S::Page, UpstreamError> {
        // A span per request (retries included): inside a job's span, so traces group by job.
        let span = tracing::info_span!("upstream_request", url = %target);
        async move {
        let mut attempt = 0;
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let opened = match prefetched.take() {
                Some(Prefetched(opened)) => opened,
                None => {
                    before_attempt()?;
                    self.open(&target, None, body.as_ref()).await
                }
            };
            let (err, retry_after) = match self.read(&target, opened, sink()).await {
                Ok(page) => return Ok(page),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry(e, retry_after)) => (e, retry_after),
            };
            if matches!(err, UpstreamError::Transport { .. }) {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.give_up_after {
                    return Err(UpstreamError::Unreachable {
                        secs: since.elapsed().as_secs(),
                        detail: err.to_string(),
                    });
                }
            } else {
                unreachable_since = None;
                if attempt >= self.max_retries {
                    return Err(err);
                }
            }
            let delay = self.backoff(attempt, retry_after);
            tracing::warn!(url = %target, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying upstream request");
            METRICS.upstream_retries.inc();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
        }
        .instrument(span)
        .await
    }

    /// One attempt at `url` in the background, for a page wanted next, to be handed to
    /// [`Upstream::fetch_streamed`]; `None` for a URL not under the base. It goes as far as the response
    /// head: the body waits in the connection until the page is read, so memory holds no page ahead.
    /// It takes over `after`, the slot of the page still arriving (see [`limiter`]).
    pub fn prefetch(
        self: &Arc<Self>,
        url: &str,
        after: Slot,
    ) -> Option<tokio::task::JoinHandle<Prefetched>> {
        let target = self.check_own(url).ok()?;
        let upstream = self.clone();
        Some(tokio::spawn(async move {
            Prefetched(upstream.open(&target, Some(after), None).await)
        }))
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.retry_base.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.retry_max);
        // Full jitter over the upper half keeps clients that failed together from retrying together.
        let jittered = capped / 2 + capped.mul_f64(rand::thread_rng().gen::<f64>() / 2.0);
        match retry_after {
            Some(ra) => ra.min(self.retry_max).max(jittered),
            None => jittered,
        }
    }

    /// Sends a GET (a POST of `body` if there is one) and waits for a successful response head; the body
    /// is left to [`Upstream::read`]. A request for the page after one still arriving goes in that
    /// page's slot, `after`.
    async fn open(
        &self,
        url: &Url,
        after: Option<Slot>,
        body: Option<&bytes::Bytes>,
    ) -> Result<Opened, Attempt> {
        if self.rate.check().is_err() {
            METRICS.rate_limiter_waits.inc();
            self.rate.until_ready().await;
        }
        let kind = limiter::kind_of(url);
        let mut permit = match after {
            Some(slot) => self.concurrency.acquire_after(&kind, &slot).await,
            None => self.concurrency.acquire(&kind).await,
        };
        let (mut response, sent) = self.send(url, body).await?;
        permit.answered();
        // A token can be revoked or expire early; one renewal is worth a try, a loop is not.
        if response.status() == StatusCode::UNAUTHORIZED
            && sent.is_some_and(|rejected| self.credentials.invalidate(&rejected))
        {
            tracing::info!(%url, "upstream refused the access token; renewing it");
            self.rate.until_ready().await;
            response = self.send(url, body).await?.0;
        }
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let detail = response
                .text()
                .await
                .map(|t| t.chars().take(500).collect())
                .unwrap_or_default();
            let err = UpstreamError::Status {
                status,
                url: url.to_string(),
                detail,
            };
            return Err(
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    Attempt::Retry(err, retry_after)
                } else {
                    Attempt::Final(err)
                },
            );
        }
        Ok(Opened { response, permit })
    }

    /// Hands an opened response's body to `sink` as it arrives.
    async fn read<S: PageSink>(
        &self,
        url: &Url,
        opened: Result<Opened, Attempt>,
        mut sink: S,
    ) -> Result<S::Page, Attempt> {
        let mut opened = opened?;
        let invalid = |detail: String| UpstreamError::Invalid {
            url: url.to_string(),
            detail,
        };
        if let Some(expected) = opened.response.content_length() {
            sink.expect(expected.min(self.max_page_bytes as u64) as usize);
        }
        sink.opened(opened.permit.slot());
        let mut read = 0;
        while let Some(chunk) = opened
            .response
            .chunk()
            .await
            .map_err(|e| transport(url, e))?
        {
            read += chunk.len();
            if read > self.max_page_bytes {
                return Err(Attempt::Final(invalid(format!(
                    "body larger than max_page_bytes ({})",
                    self.max_page_bytes
                ))));
            }
            sink.chunk(&chunk)
                .map_err(|e| Attempt::Retry(invalid(e.to_string()), None))?;
        }
        opened.permit.read(read);
        sink.finish()
            .map_err(|e| Attempt::Retry(invalid(e.to_string()), None))
    }

    /// Sends one GET (a POST of `body`) with the current credentials; returns the `Authorization` it
    /// carried.
    async fn send(
        &self,
        url: &Url,
        body: Option<&bytes::Bytes>,
    ) -> Result<(Response, Option<HeaderValue>), Attempt> {
        let authorization = self.credentials.authorization().await.map_err(|e| {
            if e.is_transient() {
                Attempt::Retry(e.into(), None)
            } else {
                Attempt::Final(e.into())
            }
        })?;
        // Strict handling: a server that honours it refuses a parameter it does not know instead of
        // ignoring it, which would widen the search.
        let mut request = match body {
            Some(body) => self
                .http
                .post(url.clone())
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(body.clone()),
            None => self.http.get(url.clone()),
        }
        .header(ACCEPT, "application/fhir+json")
        .header("prefer", "handling=strict");
        if let Some(value) = &authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let started = Instant::now();
        let sent = request.send().await;
        METRICS.upstream(
            sent.as_ref().ok().map(|r| r.status().as_u16()),
            started.elapsed(),
        );
        let response = sent.map_err(|e| transport(url, e))?;
        Ok((response, authorization))
    }
}

/// An error with its chain of sources, `: `-separated: what went wrong talking to the upstream, in full.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn transport(url: &Url, e: reqwest::Error) -> Attempt {
    Attempt::Retry(
        UpstreamError::Transport {
            url: url.to_string(),
            detail: e.to_string(),
        },
        None,
    )
}

enum Attempt {
    Retry(UpstreamError, Option<Duration>),
    Final(UpstreamError),
}

/// `Retry-After` as delay-seconds or an HTTP-date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let delta = when.signed_duration_since(chrono::Utc::now());
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// An attempt made ahead of time by [`Upstream::prefetch`]: the response, or how the attempt failed.
pub struct Prefetched(Result<Opened, Attempt>);

/// A response whose head said success, and the request permit it holds until its body is read.
struct Opened {
    response: Response,
    permit: ExportPermit,
}

/// Why a whole body handed to [`Upstream::fetch`] could not be parsed; the fetch retries it.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not a usable searchset Bundle.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// Not the JSON the caller expects.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Valid, but without what the caller needs from it.
    #[error("{0}")]
    Content(&'static str),
}

impl From<&'static str> for ParseError {
    fn from(missing: &'static str) -> Self {
        ParseError::Content(missing)
    }
}

/// Takes a page body chunk by chunk as it arrives; a new one serves every attempt.
pub trait PageSink {
    /// What a complete body gives.
    type Page;
    /// Why a body is unusable; it fails the attempt, which is retried.
    type Error: std::fmt::Display;
    /// The body's announced length (at most `max_page_bytes`), before its first chunk.
    fn expect(&mut self, _bytes: usize) {}
    /// The slot the request holds, for the request of the page after it ([`Upstream::prefetch`]).
    fn opened(&mut self, _slot: Slot) {}
    /// The next chunk of the body; an error fails the attempt, which is retried.
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// The body has ended; an error fails the attempt, which is retried.
    fn finish(self) -> Result<Self::Page, Self::Error>;
}

/// The whole body, parsed once it is in: for small responses (metadata, the planner's probes).
struct Whole<'p, F> {
    body: Vec<u8>,
    parse: &'p F,
}

impl<T, F: Fn(&[u8]) -> Result<T, ParseError>> PageSink for Whole<'_, F> {
    type Page = T;
    type Error = ParseError;
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), ParseError> {
        self.body.extend_from_slice(bytes);
        Ok(())
    }
    fn finish(self) -> Result<T, ParseError> {
        (self.parse)(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn upstream(base: &str) -> Upstream {
        let cfg: crate::config::Config =
            toml::from_str(&format!("[upstream]\nbase_url = \"{base}\"\n")).unwrap();
        Upstream::new(&cfg.upstream).unwrap()
    }

    #[test]
    fn only_urls_under_the_base_are_own() {
        let u = upstream("http://127.0.0.1:8090/fhir");
        assert!(u
            .check_own("http://127.0.0.1:8090/fhir/Patient?_offset=5")
            .is_ok());
        for foreign in [
            "http://127.0.0.1:8091/fhir/Patient",
            "https://127.0.0.1:8090/fhir/Patient",
            "http://localhost:8090/fhir/Patient",
            "http://127.0.0.1:8090/fhirx/Patient",
            "http://127.0.0.1:8090/other",
            "/fhir/Patient",
        ] {
            assert!(u.check_own(foreign).is_err(), "{foreign} accepted");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn capability_lists_searchable_types_with_params() {
        let cs = serde_json::json!({"rest":[{"mode":"server","resource":[
            {"type":"Patient","interaction":[{"code":"history-type"},{"code":"search-type"}],"searchParam":[{"name":"_id"}]},
            {"type":"Binary","interaction":[{"code":"read"}]}]}]});
        let cap = Capability::from_statement(&cs);
        assert_eq!(cap.types.keys().collect::<Vec<_>>(), ["Patient"]);
        assert!(cap.types["Patient"].contains("_id"));
        assert_eq!(cap.history.iter().collect::<Vec<_>>(), ["Patient"]);
    }

    #[test]
    fn capability_keeps_declared_reference_targets() {
        let cs = serde_json::json!({"rest":[{"mode":"server","resource":[
            {"type":"Observation","interaction":[{"code":"search-type"}],"searchParam":[
                {"name":"subject","type":"reference","target":["Patient","Group"]},{"name":"code"}]}]}]});
        let cap = Capability::from_statement(&cs);
        assert_eq!(
            cap.targets["Observation"]["subject"]
                .iter()
                .collect::<Vec<_>>(),
            ["Group", "Patient"]
        );
        assert!(!cap.targets["Observation"].contains_key("code"));
        assert!(cap.types["Observation"].contains("code"));
    }

    #[test]
    fn batch_is_read_from_the_servers_interactions() {
        let declares = |interactions: serde_json::Value| {
            let cs = serde_json::json!({"rest":[
                {"mode":"client","interaction":[{"code":"batch"}]},
                {"mode":"server","interaction":interactions,"resource":[]}]});
            Capability::from_statement(&cs).batch
        };
        assert!(declares(
            serde_json::json!([{"code":"transaction"},{"code":"batch"}])
        ));
        assert!(!declares(serde_json::json!([{"code":"transaction"}])));
        assert!(
            !declares(serde_json::Value::Null),
            "a client's batch is not the server's"
        );
    }

    /// An upstream answering every request with `statement`, counting them.
    async fn statement_server(statement: &'static str) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8];
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{statement}",
                        statement.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (base, requests)
    }

    #[tokio::test]
    async fn a_readiness_probe_leaves_the_statement_it_read_for_the_next_export() {
        let statement = r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","interaction":[{"code":"batch"}],"resource":[{"type":"Patient","interaction":[{"code":"search-type"}]}]}]}"#;
        let (base, requests) = statement_server(statement).await;
        let upstream = upstream(&base);
        assert!(upstream.probe().await);
        let cap = upstream.capability().await.unwrap();
        assert!(cap.batch && cap.types.contains_key("Patient"));
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "the export read it again"
        );
    }
}
