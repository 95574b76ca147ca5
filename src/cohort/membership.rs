//! A cohort's members: each member-filter paged through on the upstream (by the export's own rate-limited,
//! retried client), its matches turned into patient ids, and the filters ANDed.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{CohortFailure, Filter};
use crate::export::filters::dropped;
use crate::upstream::bundle::read_matches;
use crate::upstream::{Upstream, UpstreamError};

/// The `[cohort]` settings a computation needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Patients one filter may match at most.
    pub max_members: usize,
    /// `_count` of every filter page.
    pub page_size: u32,
}

/// The patients every filter of `filters` matches, sorted; more than `max_members` from one filter is a
/// failure, never a truncated cohort.
pub async fn compute(
    filters: &[Filter],
    upstream: &Upstream,
    limits: Limits,
) -> Result<BTreeSet<String>, CohortFailure> {
    let mut members: Option<BTreeSet<String>> = None;
    for filter in filters {
        let found = patients_of(filter, upstream, limits).await?;
        members = Some(match members {
            None => found,
            Some(before) => before.intersection(&found).cloned().collect(),
        });
        if members.as_ref().is_some_and(BTreeSet::is_empty) {
            break;
        }
    }
    Ok(members.unwrap_or_default())
}

/// The patients one filter's matches are or reference.
async fn patients_of(
    filter: &Filter,
    upstream: &Upstream,
    limits: Limits,
) -> Result<BTreeSet<String>, CohortFailure> {
    let max_members = limits.max_members;
    let upstream_failed = |e: UpstreamError| {
        CohortFailure::Upstream(format!(
            "computing member-filter {:?} failed: {}",
            filter.expression,
            e.public_message()
        ))
    };
    let mut url = upstream.url(&filter.resource_type);
    url.set_query(Some(&filter.query));
    url.query_pairs_mut()
        .append_pair("_count", &limits.page_size.to_string());
    let first = url.to_string();
    let mut next = Some(first.clone());
    let mut ids = BTreeSet::new();
    let is_patient = filter.resource_type == "Patient";
    while let Some(page_url) = next {
        let (page_ids, summary) = upstream
            .fetch(&page_url, |body| {
                let mut ids = Vec::new();
                let summary = read_matches(body, |resource| {
                    if is_patient {
                        ids.extend(resource.id.map(|id| id.into_owned()));
                    } else {
                        let value: Value = serde_json::from_slice(resource.json)?;
                        ids.extend(referenced_patients(&value));
                    }
                    Ok(())
                })?;
                Ok((ids, summary))
            })
            .await
            .map_err(upstream_failed)?;
        if page_url == first {
            let ignored: Vec<String> = dropped(&first, summary.self_link.as_deref());
            if !ignored.is_empty() {
                return Err(CohortFailure::Upstream(format!(
                    "the upstream ignored the search parameter(s) {} of member-filter {:?} (its self link leaves them out), so its matches cannot be trusted",
                    ignored.join(", "),
                    filter.expression
                )));
            }
        }
        ids.extend(page_ids);
        if ids.len() > max_members {
            return Err(CohortFailure::TooManyMembers(format!(
                "member-filter {:?} matches more than cohort.max_members ({max_members}) patients",
                filter.expression
            )));
        }
        if summary.next.as_deref() == Some(page_url.as_str()) {
            return Err(CohortFailure::Upstream(format!(
                "the upstream's paging of member-filter {:?} loops (a next link to the same page)",
                filter.expression
            )));
        }
        next = summary.next;
    }
    Ok(ids)
}

/// The ids of the patients a resource is about: its `patient` and `subject` references to `Patient`.
fn referenced_patients(resource: &Value) -> impl Iterator<Item = String> + '_ {
    ["patient", "subject"]
        .into_iter()
        .flat_map(|field| match &resource[field] {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            one => vec![one],
        })
        .filter_map(|r| r["reference"].as_str())
        .filter_map(patient_id)
}

/// The id of a `Patient/[id]` reference, relative or absolute, versioned or not.
pub fn patient_id(reference: &str) -> Option<String> {
    let path = reference.split(['?', '#']).next()?;
    let mut parts = path.rsplit('/');
    let id = parts.next()?;
    let id = if parts.clone().next() == Some("_history") {
        parts.next();
        parts.next()?
    } else {
        id
    };
    (parts.next() == Some("Patient") && crate::export::kickoff::is_fhir_id(id))
        .then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patients_come_from_patient_and_subject_references() {
        let condition =
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}});
        assert_eq!(referenced_patients(&condition).collect::<Vec<_>>(), ["p1"]);
        let immunization = json!({"patient": {"reference": "http://x/fhir/Patient/p2/_history/3"}});
        assert_eq!(
            referenced_patients(&immunization).collect::<Vec<_>>(),
            ["p2"]
        );
        let group_subject = json!({"subject": {"reference": "Group/g"}});
        assert_eq!(referenced_patients(&group_subject).count(), 0);
        let many = json!({"subject": [{"reference": "Patient/a"}, {"display": "x"}]});
        assert_eq!(referenced_patients(&many).collect::<Vec<_>>(), ["a"]);
    }
}
