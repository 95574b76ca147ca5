//! The operators' listener: liveness, readiness, Prometheus metrics and a jobs API, never forwarded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::export::manifest;
use crate::export::model::JobState;
use crate::export::runner::Runner;
use crate::http::{full, json, ApiError, Body};
use crate::metrics::METRICS;
use crate::server::accept::Acceptor;
use crate::store::Store;
use crate::upstream::Upstream;

/// Most admin connections open at once (probes and scrapes need few).
const MAX_CONNECTIONS: u32 = 64;

/// How long a readiness answer is reused, so probes do not hammer the upstream.
const READY_CACHE: Duration = Duration::from_secs(5);

/// What the admin endpoints read.
pub struct Admin {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    runner: Arc<Runner>,
    upstream_ok: moka::sync::Cache<(), bool>,
}

fn state_name(state: &JobState) -> &'static str {
    match state {
        JobState::Accepted => "accepted",
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed(_) => "failed",
    }
}

impl Admin {
    /// The admin endpoints over the process's store, upstream client and runner.
    pub fn new(store: Arc<Store>, upstream: Arc<Upstream>, runner: Arc<Runner>) -> Arc<Self> {
        Arc::new(Self {
            store,
            upstream,
            runner,
            upstream_ok: moka::sync::Cache::builder()
                .time_to_live(READY_CACHE)
                .build(),
        })
    }

    /// Serves the admin endpoints on `listener` until the process ends.
    pub fn spawn(self: Arc<Self>, listener: TcpListener) {
        tokio::spawn(async move {
            // The same accept loop as the main listener's: no spinning when file descriptors run out.
            let mut acceptor = Acceptor::with_gauge(listener, MAX_CONNECTIONS, None);
            loop {
                let (stream, _, slot) = acceptor.accept().await;
                let admin = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let admin = admin.clone();
                        async move { Ok::<_, std::convert::Infallible>(admin.handle(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    drop(slot);
                });
            }
        });
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
        let result = match (req.method(), path.as_slice()) {
            (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
            (&Method::GET, ["readyz"]) => Ok(self.ready().await),
            (&Method::GET, ["metrics"]) => self.metrics(),
            (&Method::GET, ["jobs"]) => self.jobs(),
            (&Method::GET, ["jobs", id]) => self.job(id),
            (&Method::DELETE, ["jobs", id]) => self.cancel(id).await,
            (_, ["healthz" | "readyz" | "metrics" | "jobs"] | ["jobs", _]) => {
                Err(ApiError::MethodNotAllowed(req.method().clone()))
            }
            _ => Err(ApiError::NotFound(format!(
                "no admin endpoint {}",
                req.uri().path()
            ))),
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    /// Ready when the store answers and the upstream did within the last few seconds.
    async fn ready(&self) -> Response<Body> {
        if let Err(e) = self.store.jobs() {
            return text(StatusCode::SERVICE_UNAVAILABLE, &format!("store: {e}\n"));
        }
        let upstream_ok = match self.upstream_ok.get(&()) {
            Some(ok) => ok,
            None => {
                let ok = self.upstream.probe().await;
                self.upstream_ok.insert((), ok);
                ok
            }
        };
        if upstream_ok {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable\n")
        }
    }

    fn metrics(&self) -> Result<Response<Body>, ApiError> {
        let jobs = self.store.jobs()?;
        for state in ["accepted", "running", "completed", "failed"] {
            let n = jobs
                .iter()
                .filter(|j| state_name(&j.state) == state)
                .count();
            METRICS.jobs.with_label_values(&[state]).set(n as i64);
        }
        let mut response = Response::new(full(METRICS.render()));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        Ok(response)
    }

    fn summary(&self, job: &crate::export::model::Job) -> Result<serde_json::Value, ApiError> {
        let slices = self.store.slices(&job.id)?;
        let mut summary = serde_json::json!({
            "id": job.id,
            "state": state_name(&job.state),
            "owner": job.owner,
            "request": job.request,
            "transactionTime": job.transaction_time,
            "created": job.created,
            "expires": job.expires,
            "progress": manifest::progress(job, &slices),
            "resources": slices.iter().map(|s| s.lines()).sum::<u64>(),
        });
        if let JobState::Failed(failure) = &job.state {
            let status = crate::http::failure_status(failure).as_u16();
            summary["failure"] =
                serde_json::json!({"status": status, "message": failure.to_string()});
        }
        Ok(summary)
    }

    fn jobs(&self) -> Result<Response<Body>, ApiError> {
        let list: Result<Vec<_>, _> = self.store.jobs()?.iter().map(|j| self.summary(j)).collect();
        Ok(json(
            StatusCode::OK,
            "application/json",
            &serde_json::Value::Array(list?),
        ))
    }

    fn job(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let job = self.find(id)?;
        let mut body = self.summary(&job)?;
        let slices: Vec<serde_json::Value> = self
            .store
            .slices(id)?
            .iter()
            .map(|s| {
                serde_json::json!({
                    "index": s.index,
                    "type": s.resource_type,
                    "kind": s.kind,
                    "state": s.state,
                    "pages": s.pages,
                    "resources": s.lines(),
                    "total": s.total,
                    "files": s.files.len(),
                })
            })
            .collect();
        body["slices"] = slices.into();
        Ok(json(StatusCode::OK, "application/json", &body))
    }

    async fn cancel(&self, id: &str) -> Result<Response<Body>, ApiError> {
        self.find(id)?;
        self.runner.remove(id).await?;
        tracing::info!(job = %id, "export cancelled by an operator");
        Ok(json(
            StatusCode::OK,
            "application/json",
            &serde_json::json!({"id": id, "cancelled": true}),
        ))
    }

    fn find(&self, id: &str) -> Result<crate::export::model::Job, ApiError> {
        self.runner
            .find(id)?
            .ok_or_else(|| ApiError::NotFound(format!("no export job {id}")))
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds the admin listener when configured.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(TcpListener::bind(addr).await?)),
        None => Ok(None),
    }
}
