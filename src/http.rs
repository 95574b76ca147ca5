//! HTTP plumbing shared by the handlers, and the one place where errors become responses.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Response, StatusCode};

use crate::auth::AuthError;
use crate::cohort::CohortFailure;
use crate::export::failure::JobFailure;
use crate::export::kickoff::KickoffError;
use crate::outcome::outcome;
use crate::route::PathError;
use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every response the proxy sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Whether an I/O failure means the local disk, or the proxy's quota on it, is full (ENOSPC, EDQUOT):
/// what was being written cannot be until space is freed, which is 507 Insufficient Storage.
pub fn storage_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// What a client is told when the local disk is full, whatever was being written.
pub fn storage_full_message(e: &dyn std::fmt::Display) -> String {
    format!(
        "the proxy's local disk is full ({e}); an operator must free space before exports can run"
    )
}

/// The status a poll of a job that failed for `failure` answers.
pub fn failure_status(failure: &JobFailure) -> StatusCode {
    match failure {
        JobFailure::TooManyResources { .. } | JobFailure::RequestBudget { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        JobFailure::DiskLimit { .. } | JobFailure::StorageFull { .. } => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        JobFailure::UpstreamUnreachable { .. } => StatusCode::GATEWAY_TIMEOUT,
        JobFailure::GroupNotFound { .. } => StatusCode::NOT_FOUND,
        JobFailure::PlanningFailed { .. }
        | JobFailure::ReferencesUnplanned { .. }
        | JobFailure::UploadFailed { .. } => StatusCode::BAD_GATEWAY,
        JobFailure::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        JobFailure::Legacy { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// A JSON response with the given content type.
pub fn json(
    status: StatusCode,
    content_type: &'static str,
    value: &serde_json::Value,
) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A status poll's answer under 3.0.0's `Prefer: separate-export-status`: the poll itself succeeded (200),
/// and the job's status (202, 200, or its failure) moves to `X-Export-Status`; headers and body stay.
pub fn separate_status(mut response: Response<Body>) -> Response<Body> {
    let job_status = response.status();
    response
        .headers_mut()
        .insert("x-export-status", HeaderValue::from(job_status.as_u16()));
    *response.status_mut() = StatusCode::OK;
    response
}

/// Whether `Accept` asks for `application/json` rather than `application/fhir+json` (Bulk Data clients
/// poll the status endpoint with either).
pub fn accepts_plain_json(headers: &hyper::HeaderMap) -> bool {
    let ranges: Vec<String> = headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|range| !range.split(';').skip(1).any(|p| p.trim() == "q=0"))
        .map(|range| {
            range
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    ranges.iter().any(|r| r == "application/json")
        && !ranges.iter().any(|r| r == "application/fhir+json")
}

/// `response` labelled `application/json` where it was `application/fhir+json` (same JSON body).
pub fn as_plain_json(mut response: Response<Body>) -> Response<Body> {
    let fhir_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/fhir+json"));
    if fhir_json {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

/// Everything a request to the proxy's own endpoints can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The kick-off request is invalid.
    #[error(transparent)]
    Kickoff(#[from] KickoffError),
    /// No such job, file or Group (for this client).
    #[error("{0}")]
    NotFound(String),
    /// The endpoint exists but not for this method.
    #[error("{0} is not supported on this endpoint")]
    MethodNotAllowed(Method),
    /// Too many jobs run already.
    #[error("{message}")]
    Busy { message: String, retry_after: u64 },
    /// The client polls faster than `Retry-After` allows.
    #[error("status polled too often; wait {0} s between polls")]
    PollTooSoon(u64),
    /// The request body exceeds the configured limit.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The request line and headers exceed `max_header_bytes`.
    #[error("request line and headers are larger than {0} bytes")]
    HeaderTooLarge(usize),
    /// The request body could not be read.
    #[error("reading the request body failed: {0}")]
    BodyRead(String),
    /// The export job failed as a whole.
    #[error(transparent)]
    JobFailed(JobFailure),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An upstream call of the proxy's own failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Pass-through could not reach the upstream.
    #[error("the upstream FHIR server could not be reached: {0}")]
    Gateway(String),
    /// A local file could not be read.
    #[error("reading an export file failed: {0}")]
    Io(#[from] std::io::Error),
    /// Authorization failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The request path cannot be routed safely.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A cohort cannot be created, or its members could not be computed.
    #[error(transparent)]
    Cohort(#[from] CohortFailure),
}

impl ApiError {
    /// The I/O failure underneath, if the error is one.
    fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            ApiError::Io(e) => Some(e),
            ApiError::Store(e) => e.io_error(),
            _ => None,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        if self.io_error().is_some_and(storage_full) {
            return (StatusCode::INSUFFICIENT_STORAGE, "no-store");
        }
        match self {
            ApiError::Kickoff(KickoffError::Param { .. }) => {
                (StatusCode::BAD_REQUEST, "not-supported")
            }
            ApiError::Kickoff(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            ApiError::Busy { .. } | ApiError::PollTooSoon(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "throttled")
            }
            ApiError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            ApiError::HeaderTooLarge(_) => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too-long")
            }
            ApiError::BodyRead(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::JobFailed(failure) => (failure_status(failure), "exception"),
            ApiError::Store(_) | ApiError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "exception")
            }
            ApiError::Upstream(e) => match e.status().map(|s| s.as_u16()) {
                Some(404 | 410) => (StatusCode::NOT_FOUND, "not-found"),
                _ => (StatusCode::BAD_GATEWAY, "transient"),
            },
            ApiError::Gateway(_) => (StatusCode::BAD_GATEWAY, "transient"),
            ApiError::Auth(AuthError::Unauthorized(_)) => (StatusCode::UNAUTHORIZED, "login"),
            ApiError::Auth(AuthError::Forbidden(_)) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Auth(AuthError::Token(e)) if e.code == "invalid_client" => {
                (StatusCode::UNAUTHORIZED, "security")
            }
            ApiError::Auth(AuthError::Token(_)) => (StatusCode::BAD_REQUEST, "security"),
            ApiError::Auth(AuthError::Setup(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
            // No resource has such a path, whatever the upstream would have made of it.
            ApiError::Path(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Cohort(CohortFailure::Invalid(_)) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::Cohort(CohortFailure::Unsupported(_)) => {
                (StatusCode::BAD_REQUEST, "not-supported")
            }
            ApiError::Cohort(CohortFailure::TooManyMembers(_)) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too-costly")
            }
            ApiError::Cohort(CohortFailure::Upstream(_)) => (StatusCode::BAD_GATEWAY, "transient"),
        }
    }

    /// The response: status, OperationOutcome body, and `Retry-After` where waiting helps.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else if matches!(self, ApiError::Upstream(_)) {
            tracing::warn!(error = %self, "request failed upstream");
        }
        // The token endpoint speaks OAuth (RFC 6749 §5.2), not FHIR.
        if let ApiError::Auth(AuthError::Token(e)) = &self {
            let mut response = json(
                status,
                "application/json",
                &serde_json::json!({"error": e.code, "error_description": e.description}),
            );
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return response;
        }
        let diagnostics = match (&self, self.io_error()) {
            (_, Some(e)) if storage_full(e) => storage_full_message(&self),
            (ApiError::Upstream(e), _) => e.public_message(),
            (ApiError::Gateway(_), _) => "the upstream FHIR server could not be reached".to_owned(),
            _ => self.to_string(),
        };
        let mut response = json(
            status,
            "application/fhir+json",
            &outcome("error", code, &diagnostics),
        );
        let retry_after = match &self {
            ApiError::Busy { retry_after, .. } => Some(*retry_after),
            ApiError::PollTooSoon(secs) => Some(*secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_become_operation_outcomes() {
        let r = ApiError::Kickoff(KickoffError::Param {
            name: "_since".into(),
            reason: "bad".into(),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert!(v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("_since"));
        let r = ApiError::Upstream(UpstreamError::Status {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            url: "http://10.1.2.3:8090/fhir/Group/g".into(),
            detail: "database at db.internal:5432 is down".into(),
        })
        .into_response();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("answered 500"), "{body}");
        assert!(
            !body.contains("10.1.2.3") && !body.contains("db.internal"),
            "{body}"
        );
        let r = ApiError::PollTooSoon(3).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[RETRY_AFTER], "3");
    }

    /// A store write that finds the disk full (a kick-off's job record) is 507 with an
    /// OperationOutcome saying so; so is a quota, and other I/O failures stay 500.
    #[tokio::test]
    async fn a_full_disk_is_insufficient_storage() {
        let io = std::io::Error::from_raw_os_error;
        for (error, status) in [
            (
                ApiError::Store(StoreError::Sled(io(libc::ENOSPC).into())),
                507,
            ),
            (
                ApiError::Store(StoreError::Sled(io(libc::EDQUOT).into())),
                507,
            ),
            (ApiError::Io(io(libc::ENOSPC)), 507),
            (ApiError::Store(StoreError::Sled(io(libc::EIO).into())), 500),
        ] {
            let what = error.to_string();
            let r = error.into_response();
            assert_eq!(r.status().as_u16(), status, "{what}");
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["resourceType"], "OperationOutcome", "{what}");
            let text = v["issue"][0]["diagnostics"].as_str().unwrap();
            assert_eq!(text.contains("disk is full"), status == 507, "{text}");
        }
    }
}
