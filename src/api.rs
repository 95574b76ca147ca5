//! The proxy's HTTP surface: routes the bulk endpoints to their handlers and everything else upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_LOCATION, EXPIRES, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use url::Url;

use crate::config::Config;
use crate::export::kickoff::{self, is_fhir_id, KickoffHeaders};
use crate::export::manifest;
use crate::export::runner::{is_job_id, now_secs, AdmitError, Runner};
use crate::files;
use crate::http::{json, ApiError, Body};
use crate::outcome::outcome;
use crate::proxy::PassThrough;
use crate::store::{Job, JobState, Level, Store};
use crate::upstream::Upstream;

/// Everything the handlers share.
pub struct App {
    /// Configuration as loaded.
    pub config: Config,
    /// Base URL clients use.
    pub public_base: Url,
    /// Job store.
    pub store: Arc<Store>,
    /// The proxy's own upstream client.
    pub upstream: Arc<Upstream>,
    /// Job engine.
    pub runner: Arc<Runner>,
    /// Forwarding of everything else.
    pub pass_through: PassThrough,
    /// Jobs polled within the last `min_poll_interval_ms`.
    pub recent_polls: moka::sync::Cache<String, ()>,
}

/// What a request is for, decided from its path alone.
enum Route {
    Kickoff(Level),
    Status(String),
    File(String, String),
    Metadata,
    /// Under an owned prefix but of no known shape.
    Unknown,
    PassThrough,
}

impl App {
    /// Builds the shared state.
    pub fn new(
        config: Config,
        public_base: Url,
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        runner: Arc<Runner>,
    ) -> Self {
        let pass_through = PassThrough::new(config.upstream.base_url.clone(), public_base.clone());
        let poll_window = Duration::from_millis(config.export.min_poll_interval_ms.max(1));
        Self {
            recent_polls: moka::sync::Cache::builder()
                .time_to_live(poll_window)
                .build(),
            config,
            public_base,
            store,
            upstream,
            runner,
            pass_through,
        }
    }

    /// Answers one request; never fails (errors become OperationOutcome responses).
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let result = match self.route(req.uri().path()) {
            Route::Kickoff(level) => self.kickoff(level, req).await,
            Route::Status(id) => self.status(&id, req.method()).await,
            Route::File(id, name) => self.file(&id, &name, &req).await,
            Route::Metadata if req.method() == Method::GET => {
                self.pass_through.metadata(req, peer).await
            }
            Route::Unknown => Err(ApiError::NotFound(format!(
                "no such bulk data resource: {}",
                req.uri().path()
            ))),
            Route::Metadata | Route::PassThrough => self.pass_through.forward(req, peer).await,
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    fn route(&self, path: &str) -> Route {
        let base = self.public_base.path().trim_end_matches('/');
        let Some(rel) = path
            .strip_prefix(base)
            .filter(|r| r.is_empty() || r.starts_with('/'))
        else {
            return Route::PassThrough;
        };
        let decoded: Option<Vec<String>> = rel
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                percent_decode_str(s)
                    .decode_utf8()
                    .ok()
                    .map(|c| c.into_owned())
            })
            .collect();
        let Some(segments) = decoded else {
            return Route::PassThrough;
        };
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match segments.as_slice() {
            ["$export"] => Route::Kickoff(Level::System),
            ["Patient", "$export"] => Route::Kickoff(Level::Patient),
            ["Group", id, "$export"] => Route::Kickoff(Level::Group { id: id.to_string() }),
            ["$bulk-status", id] => Route::Status(id.to_string()),
            ["$bulk-files", id, name] => Route::File(id.to_string(), name.to_string()),
            ["metadata"] => Route::Metadata,
            ["$bulk-status" | "$bulk-files", ..] => Route::Unknown,
            _ => Route::PassThrough,
        }
    }

    async fn kickoff(
        &self,
        level: Level,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let (parts, body) = req.into_parts();
        let body = match parts.method {
            Method::GET => None,
            Method::POST => Some(self.read_body(body).await?),
            other => return Err(ApiError::MethodNotAllowed(other)),
        };
        fn text(v: &HeaderValue) -> Option<&str> {
            v.to_str().ok()
        }
        let headers = KickoffHeaders {
            accept: parts.headers.get(ACCEPT).and_then(text),
            prefer: parts
                .headers
                .get_all("prefer")
                .iter()
                .filter_map(text)
                .collect(),
        };
        let capability = self.upstream.capability().await?;
        let kickoff = kickoff::parse(
            level,
            &headers,
            parts.uri.query(),
            body.as_deref(),
            &capability,
        )?;
        if let Level::Group { id } = &kickoff.spec.level {
            self.check_group(id).await?;
        }
        let request = format!(
            "{}{}",
            self.public_base.origin().ascii_serialization(),
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        let now = chrono::Utc::now();
        let job = Job {
            id: uuid::Uuid::new_v4().simple().to_string(),
            request,
            spec: kickoff.spec,
            state: JobState::Accepted,
            transaction_time: now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            created: now.timestamp(),
            expires: None,
            owner: None,
            notes: kickoff.notes,
            error_file: None,
        };
        let (id, notes) = (job.id.clone(), job.notes.join("; "));
        self.runner.submit(job).await.map_err(|e| match e {
            AdmitError::Busy(_) => ApiError::Busy {
                message: e.to_string(),
                retry_after: self.config.export.retry_after_secs,
            },
            AdmitError::Store(e) => e.into(),
        })?;
        tracing::info!(job = %id, "export accepted");
        let message = if notes.is_empty() {
            "export accepted".to_owned()
        } else {
            format!("export accepted; {notes}")
        };
        let mut response = json(
            StatusCode::ACCEPTED,
            "application/fhir+json",
            &outcome("information", "informational", &message),
        );
        let status_url = format!(
            "{}/$bulk-status/{id}",
            self.public_base.as_str().trim_end_matches('/')
        );
        response.headers_mut().insert(
            CONTENT_LOCATION,
            HeaderValue::from_str(&status_url).expect("URL is a header value"),
        );
        Ok(response)
    }

    async fn read_body(&self, body: Incoming) -> Result<bytes::Bytes, ApiError> {
        let limit = self.config.server.max_kickoff_body_bytes;
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ApiError::BodyTooLarge(limit))
            }
            Err(e) => Err(ApiError::BodyRead(e.to_string())),
        }
    }

    /// A Group export of a Group the upstream does not have is refused at kick-off, not later.
    async fn check_group(&self, id: &str) -> Result<(), ApiError> {
        let missing = || ApiError::NotFound(format!("Group/{id} was not found"));
        if !is_fhir_id(id) {
            return Err(missing());
        }
        let url = self.upstream.url(&format!("Group/{id}"));
        match self.upstream.fetch(url.as_str(), |_| Ok(())).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => Err(missing()),
            Err(e) => Err(e.into()),
        }
    }

    fn job(&self, id: &str) -> Result<Job, ApiError> {
        let missing = || ApiError::NotFound(format!("no export job {id}"));
        if !is_job_id(id) {
            return Err(missing());
        }
        self.store.job(id)?.ok_or_else(missing)
    }

    async fn status(&self, id: &str, method: &Method) -> Result<Response<Body>, ApiError> {
        match *method {
            Method::GET => {}
            Method::DELETE => {
                self.job(id)?;
                if !self.runner.remove(id).await? {
                    return Err(ApiError::NotFound(format!("no export job {id}")));
                }
                tracing::info!(job = %id, "export deleted");
                return Ok(json(
                    StatusCode::ACCEPTED,
                    "application/fhir+json",
                    &outcome(
                        "information",
                        "informational",
                        "export job cancelled and its files removed",
                    ),
                ));
            }
            ref other => return Err(ApiError::MethodNotAllowed(other.clone())),
        }
        let job = self.job(id)?;
        let retry_after = self.config.export.retry_after_secs;
        if self.config.export.min_poll_interval_ms > 0 {
            if self.recent_polls.contains_key(id) {
                return Err(ApiError::PollTooSoon(retry_after));
            }
            self.recent_polls.insert(id.to_owned(), ());
        }
        match &job.state {
            JobState::Accepted | JobState::Running => {
                let slices = self.store.slices(id)?;
                let mut response = Response::new(crate::http::full(bytes::Bytes::new()));
                *response.status_mut() = StatusCode::ACCEPTED;
                let progress = manifest::progress(&job, &slices);
                let headers = response.headers_mut();
                headers.insert(
                    "x-progress",
                    HeaderValue::from_str(&progress).expect("ASCII progress"),
                );
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
                Ok(response)
            }
            JobState::Completed => {
                let slices = self.store.slices(id)?;
                let body = manifest::manifest(&job, &slices, &self.public_base, false);
                let mut response = json(StatusCode::OK, "application/json", &body);
                if let Some(expires) = job
                    .expires
                    .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
                {
                    let date = expires.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                    response
                        .headers_mut()
                        .insert(EXPIRES, HeaderValue::from_str(&date).expect("HTTP date"));
                }
                Ok(response)
            }
            JobState::Failed { status, message } => Err(ApiError::JobFailed {
                status: *status,
                message: message.clone(),
            }),
        }
    }

    async fn file(
        &self,
        id: &str,
        name: &str,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        if req.method() != Method::GET {
            return Err(ApiError::MethodNotAllowed(req.method().clone()));
        }
        let job = self.job(id)?;
        let missing = || ApiError::NotFound(format!("export job {id} has no file {name:?}"));
        if job.state != JobState::Completed || job.expires.is_some_and(|e| e <= now_secs()) {
            return Err(missing());
        }
        let slices = self.store.slices(id)?;
        // Only names the job recorded are served: a client-chosen path never reaches the file system.
        let part = manifest::find_file(&job, &slices, name).ok_or_else(missing)?;
        let gzip = files::accepts_gzip(
            req.headers()
                .get(ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        );
        files::serve(&self.runner.job_dir(id).join(&part.name), gzip).await
    }
}
