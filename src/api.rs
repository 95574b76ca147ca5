//! The proxy's HTTP surface: routes the bulk endpoints to their handlers and everything else upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use url::Url;

mod grant;
mod status;

use crate::auth::{access, Auth, AuthError, Principal};
use crate::cohort::forward::Forwarder;
use crate::cohort::handlers::{self as cohort_handlers, Endpoints};
use crate::cohort::membership::Limits as CohortLimits;
use crate::cohort::{is_cohort_id, Cohorts};
use crate::config::{Config, PassThroughAuth};
use crate::export::associated;
use crate::export::kickoff::{self, is_fhir_id, KickoffHeaders};
use crate::export::manifest;
use crate::export::model::{Job, JobState, Level, TypeSelection};
use crate::export::runner::{now_secs, AdmitError, Runner};
use crate::files;
use crate::http::{self, json, ApiError, Body};
use crate::metrics::METRICS;
use crate::outcome::outcome;
use crate::proxy::affinity::Affinity;
use crate::proxy::PassThrough;
use crate::route::{PathError, Route, Router};
use crate::storage::Storage;
use crate::store::Store;
use crate::upstream::limiter::clinical_kind;
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
    /// Held while a poll adds manifest pages, so that two polls never store pages over each other.
    pub manifest_pages_lock: tokio::sync::Mutex<()>,
    /// Authorization.
    pub auth: Arc<Auth>,
    /// Where finished files are kept.
    pub storage: Arc<Storage>,
    /// Cohort Groups (the Bulk Cohort API).
    pub cohorts: Arc<Cohorts>,
    /// Sends on a `POST Group` read to tell whether it is a cohort, when it is not.
    group_forwarder: Forwarder,
    /// Routing of normalised request paths.
    router: Router,
}

impl App {
    /// Builds the shared state.
    pub fn new(
        config: Config,
        public_base: Url,
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        runner: Arc<Runner>,
        auth: Arc<Auth>,
        storage: Arc<Storage>,
    ) -> Result<Self, crate::upstream::UpstreamError> {
        let cohorts = Cohorts::new(
            store.clone(),
            upstream.clone(),
            CohortLimits {
                max_members: config.cohort.max_members,
                page_size: config.cohort.page_size,
            },
        );
        let group_forwarder = Forwarder::new(
            config.upstream.base_url.clone(),
            public_base.clone(),
            Duration::from_secs(config.upstream.timeout_secs),
        )?;
        let security = auth.enabled().then(|| auth.capability_security());
        let pass_through = PassThrough::new(
            config.upstream.base_url.clone(),
            public_base.clone(),
            security,
        );
        let router = Router::new(
            public_base.path(),
            auth.enabled(),
            config.server.forward_outside_base,
        );
        let poll_window = Duration::from_millis(config.export.min_poll_interval_ms.max(1));
        Ok(Self {
            cohorts,
            group_forwarder,
            manifest_pages_lock: tokio::sync::Mutex::new(()),
            recent_polls: moka::sync::Cache::builder()
                .time_to_live(poll_window)
                .build(),
            config,
            public_base,
            store,
            upstream,
            runner,
            pass_through,
            auth,
            storage,
            router,
        })
    }

    /// Answers one request; never fails (errors become OperationOutcome responses). Pass-through uses
    /// the inbound connection's own upstream connection, `affinity`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
    ) -> Response<Body> {
        let limit = self.config.server.max_header_bytes;
        if head_size(&req) > limit {
            return ApiError::HeaderTooLarge(limit).into_response();
        }
        let (route, rewritten, needs) = match self.router.resolve(req.uri().path()) {
            Ok(resolved) => {
                let needs = match resolved.route {
                    Route::PassThrough | Route::Metadata | Route::Groups
                        if self.requires_token() =>
                    {
                        access::needs(req.method(), &resolved.segments)
                    }
                    _ => Vec::new(),
                };
                (resolved.route, resolved.rewritten, needs)
            }
            Err(e) => return ApiError::from(e).into_response(),
        };
        let result = match route {
            Route::Kickoff(level) => self.kickoff(level, req).await,
            Route::Status(id) => {
                let plain_json = http::accepts_plain_json(req.headers());
                let response = self
                    .status(&id, req)
                    .await
                    .unwrap_or_else(ApiError::into_response);
                Ok(if plain_json {
                    http::as_plain_json(response)
                } else {
                    response
                })
            }
            Route::File(id, name) => self.file(&id, &name, &req).await,
            Route::Metadata if req.method() == Method::GET => {
                self.forward(req, peer, affinity, Forward::metadata(rewritten, needs))
                    .await
            }
            Route::SmartConfiguration if req.method() == Method::GET => Ok(json(
                StatusCode::OK,
                "application/json",
                &self.auth.smart_configuration(),
            )),
            Route::Token if req.method() == Method::POST => self.token(req).await,
            Route::SmartConfiguration | Route::Token => {
                Err(ApiError::MethodNotAllowed(req.method().clone()))
            }
            Route::Refused => Err(ApiError::NotFound(format!(
                "{} is not an endpoint of this server",
                req.uri().path()
            ))),
            Route::Groups => self.groups(req, peer, affinity, rewritten, needs).await,
            Route::CohortStatus(_) | Route::Cohort(_) | Route::CohortRefresh(_) => {
                self.cohort(route, &req).await
            }
            Route::Metadata | Route::PassThrough => {
                self.forward(req, peer, affinity, Forward::plain(rewritten, needs))
                    .await
            }
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    /// Whether pass-through requests need a proxy token and the scopes for what they do.
    fn requires_token(&self) -> bool {
        self.auth.enabled() && self.auth.config().pass_through == PassThroughAuth::RequireToken
    }

    /// For `require-token` mode: checks that a pass-through request's token allows it, and puts the
    /// proxy's own upstream credentials (if any) in place of the token.
    async fn authorize_forward(
        &self,
        parts: &mut hyper::http::request::Parts,
        needs: &[access::Need],
    ) -> Result<(), ApiError> {
        {
            let principal = self.auth.authenticate(&parts.headers).await?;
            if let Some(need) = access::unmet(&principal.grant, needs) {
                return Err(AuthError::Forbidden(format!(
                    "the access token's scopes do not include {}, which {} {} needs",
                    access::describe(need),
                    parts.method,
                    parts.uri.path()
                ))
                .into());
            }
            self.check_search_reads(&principal, needs, parts.uri.query())
                .await?;
            // The proxy's token means nothing upstream and must not leak there; the proxy's own
            // upstream credentials (if any) stand in for it.
            parts.headers.remove(hyper::header::AUTHORIZATION);
            if let Some(authorization) = self.upstream.authorization().await? {
                parts
                    .headers
                    .insert(hyper::header::AUTHORIZATION, authorization);
            }
        }
        Ok(())
    }

    /// Passes a request through, on its normalised path, once its token allows it.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
        forward: Forward,
    ) -> Result<Response<Body>, ApiError> {
        if self.requires_token() {
            let (mut parts, body) = req.into_parts();
            self.authorize_forward(&mut parts, &forward.needs).await?;
            req = Request::from_parts(parts, body);
        }
        if let Some(path) = forward.rewritten {
            let target = match req.uri().query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            *req.uri_mut() = target.parse().map_err(|_| PathError::NotAPath)?;
        }
        let started = std::time::Instant::now();
        // Export requests yield while clinical ones wait for the upstream (src/upstream/limiter.rs).
        let kind = clinical_kind(req.method().as_str(), req.uri().path(), req.uri().query());
        let clinical = self.upstream.limiter().clinical(kind);
        let result = if forward.capability_statement {
            self.pass_through.metadata(req, peer, affinity).await
        } else {
            self.pass_through.forward(req, peer, affinity).await
        };
        drop(clinical);
        let status = result
            .as_ref()
            .map_or(StatusCode::BAD_GATEWAY, |r| r.status());
        METRICS.passthrough(status, started.elapsed());
        result
    }

    /// `[base]/Group`: an asynchronous `POST` of a Group with member-filters creates a cohort, a `GET`
    /// whose `_id`s all name cohorts searches them; everything else is the upstream's.
    async fn groups(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
        rewritten: Option<String>,
        needs: Vec<access::Need>,
    ) -> Result<Response<Body>, ApiError> {
        if req.method() == Method::POST && cohort_handlers::prefers_async(req.headers()) {
            let (mut parts, body) = req.into_parts();
            let body = self.read_body(body).await?;
            if let Some(group) = cohort_handlers::cohort_request(&body) {
                let principal = self.principal(&parts.headers).await?;
                let capability = self.upstream.capability().await?;
                return self
                    .cohort_endpoints(principal.as_ref())
                    .create(&group, &capability);
            }
            if self.requires_token() {
                self.authorize_forward(&mut parts, &needs).await?;
            }
            let started = std::time::Instant::now();
            let result = self
                .group_forwarder
                .post_group(parts.uri.query(), &parts.headers, body, peer)
                .await;
            let status = result
                .as_ref()
                .map_or(StatusCode::BAD_GATEWAY, |r| r.status());
            METRICS.passthrough(status, started.elapsed());
            return result;
        }
        if req.method() == Method::GET {
            if let Some(ids) = cohort_handlers::search_ids(req.uri().query()) {
                let principal = self.principal(req.headers()).await?;
                return self.cohort_endpoints(principal.as_ref()).search(&ids);
            }
        }
        self.forward(req, peer, affinity, Forward::plain(rewritten, needs))
            .await
    }

    /// The cohort endpoints the proxy serves itself.
    async fn cohort(
        &self,
        route: Route,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let principal = self.principal(req.headers()).await?;
        let endpoints = self.cohort_endpoints(principal.as_ref());
        match route {
            Route::CohortStatus(id) => endpoints.status(&id, req.method()),
            Route::Cohort(id) => endpoints.group(&id, req.method()),
            Route::CohortRefresh(id) => endpoints.refresh(&id, req.method()),
            _ => unreachable!("only cohort routes are sent here"),
        }
    }

    fn cohort_endpoints<'a>(&'a self, principal: Option<&'a Principal>) -> Endpoints<'a> {
        Endpoints {
            cohorts: &self.cohorts,
            public_base: &self.public_base,
            principal,
            retry_after: self.config.export.retry_after_secs,
        }
    }

    /// A pass-through search's parameters may read only types the token allows: a chain or `_include`
    /// reveals the resources it reaches.
    async fn check_search_reads(
        &self,
        principal: &Principal,
        needs: &[access::Need],
        query: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return Ok(());
        };
        // Without chains, `_has` or includes a search reads nothing else, and the upstream's
        // CapabilityStatement (reference targets) is not needed.
        let plain = crate::export::filters::query_reads(query, "", &Default::default())
            .iter()
            .all(|(_, r)| *r == crate::export::filters::Reads::Types(Default::default()));
        if plain {
            return Ok(());
        }
        let searched = needs.iter().filter_map(|n| {
            let searches = n.permissions & crate::auth::scopes::SEARCH != 0;
            n.resource_type.as_deref().filter(|_| searches)
        });
        let mut capability = None;
        for t in searched {
            let capability = match &capability {
                Some(c) => c,
                None => capability.insert(self.upstream.capability().await?),
            };
            if let Some((name, denied)) =
                grant::reads_beyond_grant(t, query, &principal.grant, capability)
            {
                return Err(AuthError::Forbidden(format!(
                    "search parameter {name:?} of {t} reads {denied}, which the access token does not allow reading"
                ))
                .into());
            }
        }
        Ok(())
    }

    async fn token(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let form = self.read_body(req.into_body()).await?;
        let body = self.auth.token(&form).await.map_err(AuthError::from)?;
        let mut response = json(StatusCode::OK, "application/json", &body);
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        headers.insert(hyper::header::PRAGMA, HeaderValue::from_static("no-cache"));
        Ok(response)
    }

    /// The caller, when authorization is on.
    async fn principal(&self, headers: &hyper::HeaderMap) -> Result<Option<Principal>, ApiError> {
        if !self.auth.enabled() {
            return Ok(None);
        }
        Ok(Some(self.auth.authenticate(headers).await?))
    }

    async fn kickoff(
        &self,
        level: Level,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let principal = self.principal(req.headers()).await?;
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
        let mut kickoff = kickoff::parse(
            level,
            &headers,
            parts.uri.query(),
            body.as_deref(),
            &capability,
            self.config.export.unsearchable_type,
        )?;
        if let Some(principal) = &principal {
            grant::restrict_to_grant(&mut kickoff, principal, &capability)?;
            associated::restrict_to_grant(&mut kickoff, &principal.grant)
                .map_err(AuthError::Forbidden)?;
        }
        if let Level::Group { id } = &kickoff.spec.level {
            self.check_group(id, principal.as_ref()).await?;
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
        let job = Job::new(
            kickoff,
            request,
            principal.map(|p| p.client_id),
            self.config.export.gzip,
            chrono::Utc::now(),
        );
        let (id, notes, separate_status) =
            (job.id.clone(), job.notes.join("; "), job.separate_status);
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
        if separate_status {
            response.headers_mut().insert(
                "preference-applied",
                HeaderValue::from_static("respond-async, separate-export-status"),
            );
        }
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

    /// A Group export of a Group the upstream does not have is refused at kick-off, not later; a cohort
    /// must have computed members and belong to the caller.
    async fn check_group(&self, id: &str, principal: Option<&Principal>) -> Result<(), ApiError> {
        let missing = || ApiError::NotFound(format!("Group/{id} was not found"));
        if !is_fhir_id(id) {
            return Err(missing());
        }
        if is_cohort_id(id) {
            let cohort = self.cohorts.find(id)?.filter(|c| c.ready.is_some());
            let visible = cohort.is_some_and(|c| match principal {
                Some(p) => c.owner.as_deref() == Some(p.client_id.as_str()),
                None => true,
            });
            return if visible { Ok(()) } else { Err(missing()) };
        }
        let url = self.upstream.url(&format!("Group/{id}"));
        match self.upstream.fetch(url.as_str(), |_| Ok(())).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => Err(missing()),
            Err(e) => Err(e.into()),
        }
    }

    /// The job `id`, if it exists and belongs to the caller (another client's job is "not found").
    fn job(&self, id: &str, principal: Option<&Principal>) -> Result<Job, ApiError> {
        let missing = || ApiError::NotFound(format!("no export job {id}"));
        let job = self.runner.find(id)?.ok_or_else(missing)?;
        match principal {
            Some(p) if job.owner.as_deref() != Some(p.client_id.as_str()) => Err(missing()),
            _ => Ok(job),
        }
    }

    /// Status, cancel and manifest need a token with a scope on at least one type the job exports: an
    /// owner's token for other types learns nothing of it (403).
    fn check_job_scope(&self, job: &Job, principal: Option<&Principal>) -> Result<(), ApiError> {
        let Some(grant) = principal.map(|p| &p.grant) else {
            return Ok(());
        };
        // No `_type`: the job exports what planning found, or, before that, every type there is.
        let types: Vec<String> = match &job.spec.types {
            TypeSelection::All => {
                let slices = self.store.slices(&job.id)?;
                let types = slices.iter().flat_map(|s| s.types());
                types.map(str::to_owned).collect()
            }
            TypeSelection::Only(types) => types.clone(),
        };
        let covered = if types.is_empty() {
            grant.exports_anything()
        } else {
            types.iter().any(|t| grant.allows(t))
        };
        if !covered {
            return Err(AuthError::Forbidden(format!(
                "the access token's scopes cover none of the types export job {} exports",
                job.id
            ))
            .into());
        }
        Ok(())
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
        let principal = self.principal(req.headers()).await?;
        let job = self.job(id, principal.as_ref())?;
        let missing = || ApiError::NotFound(format!("export job {id} has no file {name:?}"));
        if job.expires.is_some_and(|e| e <= now_secs()) {
            return Err(missing());
        }
        // A running job's files may be read once a partial manifest has listed them: they are complete.
        let listed_early = || -> Result<bool, ApiError> {
            let pages = self.store.manifest_pages(id)?;
            Ok(pages.iter().flatten().any(|n| n == name))
        };
        match job.state {
            JobState::Completed => {}
            JobState::Accepted | JobState::Running if job.partial_manifests && listed_early()? => {}
            _ => return Err(missing()),
        }
        let slices = self.store.slices(id)?;
        // Only names the job recorded are served: a client-chosen path never reaches the file system.
        let part = manifest::find_file(&job, &slices, name).ok_or_else(missing)?;
        let file_types = slices
            .iter()
            .find(|s| s.files.iter().any(|f| f.name == name))
            .map(|s| s.types())
            .unwrap_or_default();
        if let Some(principal) = &principal {
            if let Some(denied) = file_types.iter().find(|t| !principal.grant.allows(t)) {
                return Err(AuthError::Forbidden(format!(
                    "the access token's scopes do not allow reading {denied}"
                ))
                .into());
            }
        }
        let gzip = files::accepts_gzip(
            req.headers()
                .get(ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        );
        let encoding = files::Encoding::of(part, gzip);
        match self.storage.bucket().filter(|_| job.stored_remotely) {
            Some(bucket) => {
                let (reader, len) = bucket
                    .open(id, &part.name)
                    .await
                    .map_err(|e| ApiError::Gateway(e.to_string()))?;
                Ok(files::respond(reader, len, encoding))
            }
            None => files::serve(&self.runner.job_dir(id).join(&part.name), encoding).await,
        }
    }
}

/// The slices whose resources the caller's token may read: a job's owner may hold several tokens, and the
/// one it polls or downloads with sees only the types its own scopes allow.
pub(crate) fn visible(
    mut slices: Vec<crate::export::model::Slice>,
    principal: Option<&Principal>,
) -> Vec<crate::export::model::Slice> {
    if let Some(principal) = principal {
        slices.retain(|s| s.types().iter().all(|t| principal.grant.allows(t)));
    }
    slices
}

/// How one pass-through request is sent.
struct Forward {
    /// `GET [base]/metadata`, whose body is augmented.
    capability_statement: bool,
    /// The normalised path, when it differs from the request's.
    rewritten: Option<String>,
    /// What the token must allow (require-token mode).
    needs: Vec<access::Need>,
}

impl Forward {
    fn plain(rewritten: Option<String>, needs: Vec<access::Need>) -> Self {
        Self {
            capability_statement: false,
            rewritten,
            needs,
        }
    }

    fn metadata(rewritten: Option<String>, needs: Vec<access::Need>) -> Self {
        Self {
            capability_statement: true,
            rewritten,
            needs,
        }
    }
}

/// Bytes of the request line and headers, as `max_header_bytes` counts them.
fn head_size(req: &Request<Incoming>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + headers
}
