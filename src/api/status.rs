//! Status requests: polls, the manifests a job's files are listed in (linked, and partial while it runs,
//! Bulk Data 3.0.0), cancellation, and `Prefer: separate-export-status`.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, EXPIRES, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};

use super::{visible, App};
use crate::auth::Principal;
use crate::export::manifest;
use crate::export::model::{Job, JobState, Slice};
use crate::export::runner::now_secs;
use crate::http::{self, json, ApiError, Body};
use crate::outcome::outcome;

impl App {
    /// `$bulk-status/{id}`: a poll (GET) or a cancellation (DELETE).
    pub(super) async fn status(
        &self,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let principal = self.principal(req.headers()).await?;
        match *req.method() {
            Method::GET => {}
            Method::DELETE => {
                let job = self.job(id, principal.as_ref())?;
                self.check_job_scope(&job, principal.as_ref())?;
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
        let job = self.job(id, principal.as_ref())?;
        self.check_job_scope(&job, principal.as_ref())?;
        let retry_after = self.config.export.retry_after_secs;
        let page = manifest_page_number(req.uri().query())?;
        // Following a manifest's `next` link is reading it, not polling.
        if self.config.export.min_poll_interval_ms > 0 && page == 0 {
            if self.recent_polls.contains_key(id) {
                return Err(ApiError::PollTooSoon(retry_after));
            }
            self.recent_polls.insert(id.to_owned(), ());
        }
        let answer = self.job_status(&job, principal.as_ref(), page).await;
        if job.separate_status {
            return Ok(http::separate_status(
                answer.unwrap_or_else(ApiError::into_response),
            ));
        }
        answer
    }

    /// The job's own status: 202 with progress (and, with partial manifests, the files complete so
    /// far), 200 with the manifest, or its failure; `page` is the manifest wanted (0: the first).
    async fn job_status(
        &self,
        job: &Job,
        principal: Option<&Principal>,
        page: usize,
    ) -> Result<Response<Body>, ApiError> {
        let (id, retry_after) = (job.id.as_str(), self.config.export.retry_after_secs);
        match &job.state {
            JobState::Accepted | JobState::Running => {
                let all = self.store.slices(id)?;
                let progress = manifest::progress(job, &all);
                let pages = match job.partial_manifests {
                    true => self.served_pages(job, &all).await?,
                    false => Vec::new(),
                };
                let mut response = match pages.is_empty() && page == 0 {
                    true => Response::new(crate::http::full(bytes::Bytes::new())),
                    false => {
                        let shown = visible(all, principal);
                        let body = self.manifest_page(job, &shown, &pages, page).await?;
                        json(StatusCode::OK, "application/json", &body)
                    }
                };
                *response.status_mut() = StatusCode::ACCEPTED;
                let headers = response.headers_mut();
                headers.insert(
                    "x-progress",
                    HeaderValue::from_str(&progress).expect("ASCII progress"),
                );
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
                Ok(response)
            }
            JobState::Completed => {
                let all = self.store.slices(id)?;
                let served = match job.partial_manifests {
                    true => Some(self.served_pages(job, &all).await?),
                    false => None,
                };
                let shown = visible(all, principal);
                let per_page = self.config.export.manifest_page_files;
                let pages = served.unwrap_or_else(|| manifest::pages(job, &shown, per_page));
                let body = self.manifest_page(job, &shown, &pages, page).await?;
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
            JobState::Failed(failure) => Err(ApiError::JobFailed(failure.clone())),
        }
    }

    /// The manifest pages of a job with partial manifests: those served before, and new ones for the
    /// files completed since, stored before they are served so that a restart serves them the same.
    async fn served_pages(
        &self,
        job: &Job,
        slices: &[Slice],
    ) -> Result<Vec<Vec<String>>, ApiError> {
        let _one_at_a_time = self.manifest_pages_lock.lock().await;
        let mut pages = self.store.manifest_pages(&job.id)?;
        let per_page = self.config.export.manifest_page_files;
        if manifest::extend_pages(&mut pages, job, slices, per_page) {
            self.store.put_manifest_pages(&job.id, &pages).await?;
        }
        Ok(pages)
    }

    /// Manifest `page` of `pages`, linked to the next one if there is one.
    async fn manifest_page(
        &self,
        job: &Job,
        slices: &[Slice],
        pages: &[Vec<String>],
        page: usize,
    ) -> Result<serde_json::Value, ApiError> {
        let names = pages.get(page).ok_or_else(|| {
            ApiError::NotFound(format!("export job {} has no manifest {page}", job.id))
        })?;
        let next = (page + 1 < pages.len()).then(|| {
            format!(
                "{}/$bulk-status/{}?page={}",
                self.public_base.as_str().trim_end_matches('/'),
                job.id,
                page + 1
            )
        });
        self.manifest(job, slices, names, next.as_deref()).await
    }

    /// The manifest listing `names`, with presigned bucket URLs when files are served from the bucket
    /// directly.
    async fn manifest(
        &self,
        job: &Job,
        slices: &[Slice],
        names: &[String],
        next: Option<&str>,
    ) -> Result<serde_json::Value, ApiError> {
        let bucket = self
            .storage
            .bucket()
            .filter(|b| job.stored_remotely && b.presigned());
        let Some(bucket) = bucket else {
            let url = |name: &str| manifest::file_url(&self.public_base, &job.id, name);
            let requires_token = self.auth.enabled();
            return Ok(manifest::manifest(
                job,
                slices,
                &url,
                requires_token,
                Some(names),
                next,
            ));
        };
        let remaining = std::time::Duration::from_secs(
            job.expires.map_or(1, |e| (e - now_secs()).max(1)) as u64,
        );
        let mut urls = std::collections::HashMap::new();
        for part in slices
            .iter()
            .flat_map(|s| s.files.iter())
            .chain(job.error_file.iter())
        {
            let url = bucket
                .presigned_url(&job.id, &part.name, remaining)
                .await
                .map_err(|e| ApiError::Gateway(e.to_string()))?;
            urls.insert(part.name.clone(), url);
        }
        let url = |name: &str| urls.get(name).cloned().unwrap_or_default();
        Ok(manifest::manifest(
            job,
            slices,
            &url,
            false,
            Some(names),
            next,
        ))
    }
}

/// The manifest a status request asks for: `?page=K` (from a manifest's `next` link), else the first.
fn manifest_page_number(query: Option<&str>) -> Result<usize, ApiError> {
    let page = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "page")
        .map(|(_, v)| v.into_owned());
    match page {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::NotFound(format!("no manifest {v:?}"))),
    }
}
