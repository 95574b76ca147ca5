//! The cohort endpoints: create (`POST Group` with member-filters), `$cohort-status/[id]`,
//! `GET`/`DELETE Group/[id]`, `Group/[id]/$cohort-refresh` and `GET Group?_id=`.
//!
//! With authorization on, each needs a token whose scopes give the interaction on `Group` (create `c`,
//! read and status `r`, search `s`, delete `d`, refresh `u`), and a cohort is visible to the client that
//! created it only: to any other it does not exist (404).

use hyper::header::{HeaderValue, CONTENT_LOCATION, LOCATION, RETRY_AFTER};
use hyper::{HeaderMap, Method, Response, StatusCode};
use serde_json::{json, Value};
use url::Url;

use super::{validate, Cohort, Cohorts, State, MEMBERS_REFRESHED_URL, PROFILE_URL};
use crate::auth::scopes::{CREATE, DELETE, READ, SEARCH, UPDATE};
use crate::auth::{AuthError, Principal};
use crate::http::{json as respond, ApiError, Body};
use crate::outcome::outcome;
use crate::upstream::Capability;

/// What the cohort endpoints share with the rest of the proxy.
pub struct Endpoints<'a> {
    /// The cohort service.
    pub cohorts: &'a std::sync::Arc<Cohorts>,
    /// The base URL clients use.
    pub public_base: &'a Url,
    /// The caller, when authorization is on.
    pub principal: Option<&'a Principal>,
    /// `Retry-After` of a status poll while members are computed.
    pub retry_after: u64,
}

/// Whether a request's `Prefer` headers ask for the asynchronous pattern.
pub fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// The body of a `POST Group`, if it is a cohort to create (a Group with member-filters).
pub fn cohort_request(body: &[u8]) -> Option<Value> {
    let group: Value = serde_json::from_slice(body).ok()?;
    validate::is_cohort_request(&group).then_some(group)
}

/// The ids of a `Group` search that only names cohorts by `_id` (`_id=a,b`, repeated or not), which the
/// proxy answers; `None` for any other search, which the upstream answers.
pub fn search_ids(query: Option<&str>) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query?.as_bytes()) {
        match name.as_ref() {
            "_id" => ids.extend(value.split(',').map(str::to_owned)),
            "_format" | "_pretty" => {}
            _ => return None,
        }
    }
    (!ids.is_empty() && ids.iter().all(|id| super::is_cohort_id(id))).then_some(ids)
}

impl Endpoints<'_> {
    fn check_scope(&self, permission: u8, what: &str) -> Result<(), ApiError> {
        match self.principal {
            Some(p) if !p.grant.permits(Some("Group"), permission) => Err(AuthError::Forbidden(
                format!("the access token's scopes do not allow {what} Groups (cohorts)"),
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// The cohort `id`, if it exists and belongs to the caller.
    fn owned(&self, id: &str) -> Result<Cohort, ApiError> {
        let missing = || ApiError::NotFound(format!("Group/{id} was not found"));
        let cohort = self.cohorts.find(id)?.ok_or_else(missing)?;
        match self.principal {
            Some(p) if cohort.owner.as_deref() != Some(p.client_id.as_str()) => Err(missing()),
            _ => Ok(cohort),
        }
    }

    fn status_url(&self, id: &str) -> String {
        format!(
            "{}/$cohort-status/{id}",
            self.public_base.as_str().trim_end_matches('/')
        )
    }

    fn group_url(&self, id: &str) -> String {
        format!(
            "{}/Group/{id}",
            self.public_base.as_str().trim_end_matches('/')
        )
    }

    /// `POST Group`: validates the cohort, stores it and starts computing its members; 202 with the
    /// status URL in `Content-Location`.
    pub fn create(
        &self,
        group: &Value,
        capability: &Capability,
    ) -> Result<Response<Body>, ApiError> {
        self.check_scope(CREATE, "creating")?;
        let (definition, filters) = validate::definition(group, capability)?;
        let owner = self.principal.map(|p| p.client_id.clone());
        let cohort = self.cohorts.create(definition, filters, owner)?;
        tracing::info!(cohort = %cohort.id, filters = cohort.filters.len(), "cohort accepted");
        let mut response = respond(
            StatusCode::ACCEPTED,
            "application/fhir+json",
            &outcome(
                "information",
                "informational",
                &format!(
                    "cohort Group/{} accepted; its members are being computed",
                    cohort.id
                ),
            ),
        );
        response.headers_mut().insert(
            CONTENT_LOCATION,
            HeaderValue::from_str(&self.status_url(&cohort.id)).expect("URL is a header value"),
        );
        Ok(response)
    }

    /// `GET $cohort-status/[id]`: 202 while members are computed, then the Group (200), or the failure.
    pub fn status(&self, id: &str, method: &Method) -> Result<Response<Body>, ApiError> {
        if method != Method::GET {
            return Err(ApiError::MethodNotAllowed(method.clone()));
        }
        self.check_scope(READ, "reading")?;
        let cohort = self.owned(id)?;
        match &cohort.state {
            State::Computing => {
                let mut response = respond(
                    StatusCode::ACCEPTED,
                    "application/fhir+json",
                    &outcome(
                        "information",
                        "informational",
                        "computing the cohort's members",
                    ),
                );
                let headers = response.headers_mut();
                headers.insert("x-progress", HeaderValue::from_static("computing members"));
                headers.insert(RETRY_AFTER, HeaderValue::from(self.retry_after));
                Ok(response)
            }
            State::Failed(failure) => Err(ApiError::Cohort(failure.clone())),
            State::Ready => self.read_cohort(&cohort),
        }
    }

    /// `GET`/`DELETE Group/[id]` of a cohort.
    pub fn group(&self, id: &str, method: &Method) -> Result<Response<Body>, ApiError> {
        match *method {
            Method::GET | Method::HEAD => {
                self.check_scope(READ, "reading")?;
                let cohort = self.owned(id)?;
                self.read_cohort(&cohort)
            }
            Method::DELETE => {
                self.check_scope(DELETE, "deleting")?;
                self.owned(id)?;
                self.cohorts.delete(id)?;
                tracing::info!(cohort = %id, "cohort deleted");
                let mut response = Response::new(crate::http::full(bytes::Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok(response)
            }
            ref other => Err(ApiError::MethodNotAllowed(other.clone())),
        }
    }

    /// `POST Group/[id]/$cohort-refresh`: computes the members again; the status URL tells when.
    pub fn refresh(&self, id: &str, method: &Method) -> Result<Response<Body>, ApiError> {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed(method.clone()));
        }
        self.check_scope(UPDATE, "refreshing")?;
        let cohort = self.owned(id)?;
        let message = if self.cohorts.refresh(cohort)? {
            "the cohort's members are being computed again"
        } else {
            "the cohort's members are already being computed"
        };
        let mut response = respond(
            StatusCode::ACCEPTED,
            "application/fhir+json",
            &outcome("information", "informational", message),
        );
        response.headers_mut().insert(
            CONTENT_LOCATION,
            HeaderValue::from_str(&self.status_url(id)).expect("URL is a header value"),
        );
        Ok(response)
    }

    /// `GET Group?_id=` naming cohorts only: a searchset of those the caller may see.
    pub fn search(&self, ids: &[String]) -> Result<Response<Body>, ApiError> {
        self.check_scope(SEARCH, "searching")?;
        let mut entries = Vec::new();
        for id in ids {
            let cohort = match self.owned(id) {
                Ok(cohort) => cohort,
                Err(ApiError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if cohort.ready.is_some() {
                entries.push(json!({
                    "fullUrl": self.group_url(id),
                    "resource": self.served(&cohort)?,
                    "search": {"mode": "match"},
                }));
            }
        }
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": entries.len(),
            "entry": entries,
        });
        Ok(respond(StatusCode::OK, "application/fhir+json", &bundle))
    }

    fn read_cohort(&self, cohort: &Cohort) -> Result<Response<Body>, ApiError> {
        if cohort.ready.is_none() {
            return Err(ApiError::NotFound(format!(
                "Group/{} has no computed members yet; its status is at {}",
                cohort.id,
                self.status_url(&cohort.id)
            )));
        }
        let mut response = respond(
            StatusCode::OK,
            "application/fhir+json",
            &self.served(cohort)?,
        );
        response.headers_mut().insert(
            LOCATION,
            HeaderValue::from_str(&self.group_url(&cohort.id)).expect("URL is a header value"),
        );
        Ok(response)
    }

    /// The Group as served: the definition with the last computed members.
    fn served(&self, cohort: &Cohort) -> Result<Value, ApiError> {
        let members = self.cohorts.members(cohort)?;
        let refreshed = cohort.ready.as_ref().map(|r| r.refreshed.clone());
        let mut group = cohort.definition.clone();
        let fields = group
            .as_object_mut()
            .expect("a stored definition is an object");
        fields.insert("id".into(), json!(cohort.id));
        fields.insert(
            "meta".into(),
            json!({"lastUpdated": cohort.last_updated, "profile": [PROFILE_URL]}),
        );
        let mut extensions: Vec<Value> = fields
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e["url"] != MEMBERS_REFRESHED_URL)
            .cloned()
            .collect();
        if let Some(refreshed) = refreshed {
            extensions.push(json!({"url": MEMBERS_REFRESHED_URL, "valueDateTime": refreshed}));
        }
        fields.insert("extension".into(), Value::Array(extensions));
        // The profile: `actual` is true exactly when `member` is populated (grp-1).
        fields.insert("actual".into(), json!(!members.is_empty()));
        fields.insert("quantity".into(), json!(members.len()));
        if members.is_empty() {
            fields.remove("member");
        } else {
            let listed: Vec<Value> = members
                .iter()
                .map(|m| json!({"entity": {"reference": format!("Patient/{m}")}}))
                .collect();
            fields.insert("member".into(), Value::Array(listed));
        }
        Ok(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_searches_naming_nothing_but_cohorts_are_the_proxys() {
        let ids = |q: &str| search_ids(Some(q));
        assert_eq!(ids("_id=cohort-1a"), Some(vec!["cohort-1a".to_owned()]));
        assert_eq!(
            ids("_id=cohort-1a,cohort-2b&_format=json"),
            Some(vec!["cohort-1a".to_owned(), "cohort-2b".to_owned()])
        );
        assert_eq!(ids("_id=cohort-1a,g1"), None);
        assert_eq!(ids("_id=cohort-1a&name=x"), None);
        assert_eq!(ids("name=x"), None);
        assert_eq!(search_ids(None), None);
    }

    #[test]
    fn respond_async_is_found_among_preferences() {
        let mut headers = HeaderMap::new();
        assert!(!prefers_async(&headers));
        headers.insert(
            "prefer",
            HeaderValue::from_static("handling=lenient, respond-async"),
        );
        assert!(prefers_async(&headers));
    }
}
