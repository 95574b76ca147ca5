//! Turns a job into slices: the upstream searches that together return exactly the export.

use std::collections::BTreeSet;

use url::Url;

use crate::export::compartment;
use crate::export::ranges::{self, format_ms, parse_ms, Range};
use crate::store::{ExportSpec, Job, Level, Slice, SliceKind, SliceState, TypeSelection};
use crate::upstream::bundle::read_matches;
use crate::upstream::{Capability, Upstream, UpstreamError};

/// Page size used to list patient ids: only ids travel, so pages can be large.
const ID_PAGE_SIZE: u32 = 1000;

/// Why a job could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The upstream failed while the plan needed it.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The Group to export does not exist (any more).
    #[error("Group/{0} was not found on the upstream")]
    GroupNotFound(String),
}

/// Search settings the planner needs from config.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// `_count` of every search.
    pub page_size: u32,
    /// Patients per `patient=` search.
    pub patient_batch_size: usize,
    /// `_lastUpdated` ranges each type is split into at system level (1: no split).
    pub time_slices: usize,
}

/// A job's plan: its slices, and what the manifest should tell the client about it.
#[derive(Debug)]
pub struct Plan {
    /// Searches to run.
    pub slices: Vec<Slice>,
    /// Notes for the manifest's OperationOutcome (e.g. deletions that cannot be reported).
    pub notes: Vec<String>,
}

/// Plans `job`: lists the searches of every type, per patient batch below the system level, and with
/// `_since` the type histories that reveal deletions.
pub async fn plan(
    job: &Job,
    upstream: &Upstream,
    capability: &Capability,
    limits: PlanLimits,
) -> Result<Plan, PlanError> {
    let spec = &job.spec;
    let types = export_types(spec, capability);
    let bounds = Bounds {
        upstream,
        job,
        page_size: limits.page_size,
    };
    let mut slices = Vec::new();
    let mut notes = Vec::new();
    let mut push = |resource_type: &str, kind: SliceKind, searches: Vec<String>| {
        slices.push(Slice {
            job_id: job.id.clone(),
            index: slices.len() as u32,
            resource_type: resource_type.to_owned(),
            kind,
            searches,
            search_index: 0,
            next: None,
            state: SliceState::Pending,
            files: Vec::new(),
            pages: 0,
            total: None,
            visited: Vec::new(),
        })
    };
    match &spec.level {
        Level::System => {
            for t in &types {
                for range in bounds.time_ranges(t, limits.time_slices).await? {
                    push(t, SliceKind::Resources, bounds.searches(t, &[], range));
                }
            }
            if let Some(since) = &spec.since {
                let (with, without): (Vec<&String>, Vec<&String>) =
                    types.iter().partition(|t| capability.history.contains(*t));
                for t in with {
                    push(t, SliceKind::Deleted, vec![bounds.history(t, since)]);
                }
                if !without.is_empty() {
                    let list: Vec<&str> = without.iter().map(|t| t.as_str()).collect();
                    notes.push(format!(
                        "deleted resources are not reported for {}: the upstream offers no type history for them",
                        list.join(", ")
                    ));
                }
            }
        }
        Level::Patient | Level::Group { .. } => {
            let patients = patients(job, upstream).await?;
            for batch in patients.chunks(limits.patient_batch_size) {
                for t in &types {
                    let by_patient = if t == "Patient" {
                        ("_id".to_owned(), batch.join(","))
                    } else {
                        let param = compartment::patient_param(t, &capability.types[t])
                            .expect("export_types keeps compartment types only");
                        let refs: Vec<String> =
                            batch.iter().map(|id| format!("Patient/{id}")).collect();
                        (param.to_owned(), refs.join(","))
                    };
                    push(
                        t,
                        SliceKind::Resources,
                        bounds.searches(t, &[by_patient], None),
                    );
                }
            }
            if spec.since.is_some() {
                // A deleted resource's history entry no longer says whose compartment it was in.
                notes.push(
                    "deleted resources are not reported for Patient and Group exports: a deletion no longer shows which patient it belonged to"
                        .into(),
                );
            }
        }
    }
    Ok(Plan { slices, notes })
}

/// The types a job exports, in a stable order.
fn export_types(spec: &ExportSpec, capability: &Capability) -> Vec<String> {
    let in_level = |t: &str| match spec.level {
        Level::System => capability.types.contains_key(t),
        Level::Patient | Level::Group { .. } => {
            t == "Patient"
                || capability
                    .types
                    .get(t)
                    .is_some_and(|p| compartment::patient_param(t, p).is_some())
        }
    };
    match &spec.types {
        TypeSelection::All => capability
            .types
            .keys()
            .filter(|t| in_level(t))
            .cloned()
            .collect(),
        TypeSelection::Only(types) => types.iter().filter(|t| in_level(t)).cloned().collect(),
    }
}

struct Bounds<'a> {
    upstream: &'a Upstream,
    job: &'a Job,
    page_size: u32,
}

impl Bounds<'_> {
    /// The `_lastUpdated` ranges of a type's search: `[None]` (one plain search) unless splitting is
    /// configured and the type has resources to split.
    async fn time_ranges(
        &self,
        resource_type: &str,
        n: usize,
    ) -> Result<Vec<Option<Range>>, PlanError> {
        if n <= 1 {
            return Ok(vec![None]);
        }
        let spec = &self.job.spec;
        let Some(hi) = parse_ms(&self.job.transaction_time) else {
            return Ok(vec![None]);
        };
        let mut url = self.upstream.url(resource_type);
        url.query_pairs_mut()
            .append_pair("_sort", "_lastUpdated")
            .append_pair("_count", "1")
            .append_pair("_lastUpdated", &format!("le{}", self.job.transaction_time));
        if let Some(since) = &spec.since {
            url.query_pairs_mut()
                .append_pair("_lastUpdated", &format!("gt{since}"));
        }
        let (total, oldest) = self
            .upstream
            .fetch(url.as_str(), |body| {
                // The first match's `lastUpdated`; a resource that serde_json cannot take as a Value
                // (a number out of its range) only means no split, as before.
                let mut first = None;
                let page = read_matches(body, |resource| {
                    first.get_or_insert_with(|| {
                        serde_json::from_slice::<serde_json::Value>(resource.json)
                            .ok()
                            .and_then(|r| r["meta"]["lastUpdated"].as_str().and_then(parse_ms))
                    });
                    Ok(())
                })?;
                Ok((page.total, first.flatten()))
            })
            .await?;
        let (Some(total), Some(oldest)) = (total, oldest) else {
            return Ok(vec![None]);
        };
        let n = ranges::worth_splitting(total, self.page_size, n);
        if n <= 1 {
            return Ok(vec![None]);
        }
        let lo = spec
            .since
            .as_deref()
            .and_then(parse_ms)
            .unwrap_or(oldest - 1);
        let whole = Range { lo, hi };
        let ranges = ranges::split(whole, total, n, |r| self.count(resource_type, r)).await?;
        Ok(ranges.into_iter().map(Some).collect())
    }

    /// `Bundle.total` of a type's resources in a range.
    async fn count(&self, resource_type: &str, range: Range) -> Result<u64, UpstreamError> {
        let mut url = self.upstream.url(resource_type);
        url.query_pairs_mut()
            .append_pair("_count", "0")
            .append_pair("_lastUpdated", &format!("gt{}", format_ms(range.lo)))
            .append_pair("_lastUpdated", &format!("le{}", format_ms(range.hi)));
        self.upstream
            .fetch(url.as_str(), |body| {
                read_matches(body, |_| Ok(()))?
                    .total
                    .ok_or_else(|| "the upstream gives no Bundle.total".to_owned())
            })
            .await
    }

    /// First page of a type's history since `since` (deletions are filtered from it by the worker).
    fn history(&self, resource_type: &str, since: &str) -> String {
        let mut url: Url = self.upstream.url(&format!("{resource_type}/_history"));
        url.query_pairs_mut()
            .append_pair("_since", since)
            .append_pair("_count", &self.page_size.to_string());
        url.to_string()
    }

    /// First-page URLs of a type: one per `_typeFilter` of the type (OR), or one plain search.
    fn searches(
        &self,
        resource_type: &str,
        extra: &[(String, String)],
        range: Option<Range>,
    ) -> Vec<String> {
        let spec = &self.job.spec;
        let filters: Vec<&str> = spec
            .type_filters
            .iter()
            .filter(|(t, _)| t == resource_type)
            .map(|(_, q)| q.as_str())
            .collect();
        let elements = elements_for(&spec.elements, resource_type);
        let build = |filter: Option<&str>| {
            let mut url: Url = self.upstream.url(resource_type);
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("_count", &self.page_size.to_string());
                match range {
                    Some(r) => {
                        q.append_pair("_lastUpdated", &format!("gt{}", format_ms(r.lo)));
                        q.append_pair("_lastUpdated", &format!("le{}", format_ms(r.hi)));
                    }
                    None => {
                        q.append_pair("_lastUpdated", &format!("le{}", self.job.transaction_time));
                        if let Some(since) = &spec.since {
                            q.append_pair("_lastUpdated", &format!("gt{since}"));
                        }
                    }
                }
                if !elements.is_empty() {
                    q.append_pair("_elements", &elements.join(","));
                }
                for (k, v) in extra {
                    q.append_pair(k, v);
                }
                if let Some(filter) = filter {
                    q.extend_pairs(url::form_urlencoded::parse(filter.as_bytes()));
                }
            }
            url.to_string()
        };
        if filters.is_empty() {
            vec![build(None)]
        } else {
            filters.into_iter().map(|f| build(Some(f))).collect()
        }
    }
}

/// The `_elements` entries that apply to `resource_type`, without their type prefix.
pub fn elements_for(elements: &[String], resource_type: &str) -> Vec<String> {
    elements
        .iter()
        .filter_map(|e| match e.split_once('.') {
            Some((t, el)) if t == resource_type => Some(el.to_owned()),
            Some(_) => None,
            None => Some(e.clone()),
        })
        .collect()
}

/// The patient ids of a Patient or Group export, sorted and unique.
async fn patients(job: &Job, upstream: &Upstream) -> Result<Vec<String>, PlanError> {
    let mut ids: BTreeSet<String> = match &job.spec.level {
        Level::Group { id } => group_members(id, upstream).await?,
        _ if !job.spec.patients.is_empty() => return Ok(sorted(&job.spec.patients)),
        _ => all_patients(job, upstream).await?,
    };
    if !job.spec.patients.is_empty() {
        let wanted: BTreeSet<&String> = job.spec.patients.iter().collect();
        ids.retain(|id| wanted.contains(id));
    }
    Ok(ids.into_iter().collect())
}

fn sorted(ids: &[String]) -> Vec<String> {
    ids.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Active `Patient` members of a Group (`member.entity`, skipping `inactive` ones).
async fn group_members(id: &str, upstream: &Upstream) -> Result<BTreeSet<String>, PlanError> {
    let url = upstream.url(&format!("Group/{id}"));
    let group: serde_json::Value = match upstream
        .fetch(url.as_str(), |b| {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        })
        .await
    {
        Ok(g) => g,
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
            return Err(PlanError::GroupNotFound(id.to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    let members = group["member"].as_array().into_iter().flatten();
    Ok(members
        .filter(|m| m["inactive"] != true)
        .filter_map(|m| m["entity"]["reference"].as_str())
        .filter_map(patient_id)
        .collect())
}

/// The id of a `Patient/[id]` reference, relative or absolute.
fn patient_id(reference: &str) -> Option<String> {
    let path = reference.split(['?', '#']).next()?;
    let mut parts = path.rsplit('/');
    let id = parts.next()?;
    let id = match id {
        // A versioned reference: `Patient/x/_history/2`.
        _ if parts.clone().next() == Some("_history") => {
            parts.next();
            parts.next()?
        }
        id => id,
    };
    (parts.next() == Some("Patient") && super::kickoff::is_fhir_id(id)).then(|| id.to_owned())
}

/// Every patient that existed at the job's transaction time.
async fn all_patients(job: &Job, upstream: &Upstream) -> Result<BTreeSet<String>, PlanError> {
    let mut url = upstream.url("Patient");
    url.query_pairs_mut()
        .append_pair("_count", &ID_PAGE_SIZE.to_string())
        .append_pair("_lastUpdated", &format!("le{}", job.transaction_time))
        .append_pair("_elements", "id");
    let mut next = Some(url.to_string());
    let mut ids = BTreeSet::new();
    while let Some(page_url) = next {
        let (page_ids, page_next) = upstream
            .fetch(&page_url, |body| {
                let mut ids = Vec::new();
                let page = read_matches(body, |resource| {
                    let id = resource.id.ok_or("a Patient without id")?;
                    ids.push(id.into_owned());
                    Ok(())
                })?;
                Ok((ids, page.next))
            })
            .await?;
        ids.extend(page_ids);
        if page_next.as_deref() == Some(page_url.as_str()) {
            return Err(UpstreamError::Invalid {
                url: page_url,
                detail: "next link points at the same page".into(),
            }
            .into());
        }
        next = page_next;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_ids_from_references() {
        assert_eq!(patient_id("Patient/abc").as_deref(), Some("abc"));
        assert_eq!(
            patient_id("http://x/fhir/Patient/a-1").as_deref(),
            Some("a-1")
        );
        assert_eq!(patient_id("Patient/a/_history/3").as_deref(), Some("a"));
        assert_eq!(patient_id("Practitioner/abc"), None);
        assert_eq!(patient_id("Patient/"), None);
        assert_eq!(patient_id("abc"), None);
    }

    #[test]
    fn elements_apply_per_type() {
        let e = vec![
            "Observation.status".to_string(),
            "id".into(),
            "Patient.name".into(),
        ];
        assert_eq!(elements_for(&e, "Observation"), ["status", "id"]);
        assert_eq!(elements_for(&e, "Encounter"), ["id"]);
    }
}
