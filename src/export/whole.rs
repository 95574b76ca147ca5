//! Paging a type whole for a Patient or Group export whose patients are most of the upstream's, keeping
//! only their resources.
//!
//! Searching by patient costs a search per type and batch of patients, and every batch ends in a page
//! that is part full: with thousands of patients the partial pages add up to a good share of the
//! requests. When the export's patients are at least `whole_type_share` of the upstream's, a type is
//! instead paged whole (one search, every page full) and each resource kept only if the element that
//! its patient search matches on references one of the export's patients, wherever that takes fewer
//! requests by the counts the planner's probe found. The element is R4's for the type's `patient`
//! search (`Observation.subject`, `Immunization.patient`, …); a type whose patient search is on anything
//! else, or not a single reference, is always searched by patient. A reference to a patient on another
//! server with the same id would be kept where a search by patient would not find it: such references
//! are not expected in one server's records.

use std::collections::HashSet;

use crate::export::compartment::patient_id;
use crate::upstream::bundle::Resource;

/// Types whose `patient` search (R4) matches a single `subject` reference.
const BY_SUBJECT: &[&str] = &[
    "CarePlan",
    "CareTeam",
    "ClinicalImpression",
    "Communication",
    "Condition",
    "DeviceRequest",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Flag",
    "Goal",
    "ImagingStudy",
    "List",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRequest",
    "MedicationStatement",
    "Observation",
    "Procedure",
    "QuestionnaireResponse",
    "RiskAssessment",
    "ServiceRequest",
    "Specimen",
];

/// Types whose `patient` search (R4) matches a single `patient` reference.
const BY_PATIENT: &[&str] = &[
    "AllergyIntolerance",
    "Claim",
    "Consent",
    "DetectedIssue",
    "Device",
    "EpisodeOfCare",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Immunization",
    "NutritionOrder",
];

/// The element that ties a resource of `resource_type` to its patient, when the type is searched by
/// `param`; `None` where the type cannot be paged whole.
pub fn member_element(resource_type: &str, param: &str) -> Option<&'static str> {
    if resource_type == "Patient" {
        return Some("id");
    }
    if BY_SUBJECT.contains(&resource_type) && matches!(param, "patient" | "subject") {
        return Some("subject");
    }
    (BY_PATIENT.contains(&resource_type) && param == "patient").then_some("patient")
}

/// Whether paging a type of `total` resources whole at `page_size` takes fewer requests than searching
/// it for `batches` (each batch's share of the upstream's `patients`), assuming its resources spread
/// evenly over the patients.
pub fn fewer_requests(total: u64, batches: &[usize], patients: u64, page_size: u32) -> bool {
    let page = page_size.max(1) as f64;
    let whole = (total as f64 / page).ceil().max(1.0);
    let per_patient = total as f64 / patients.max(1) as f64;
    let batched: f64 = batches
        .iter()
        .map(|&n| (n as f64 * per_patient / page).ceil().max(1.0))
        .sum();
    whole < batched
}

/// Into how many `_lastUpdated` ranges each type paged whole is split, given its `pages` and the
/// `parallel` slices a job runs at once: a type paged whole is one chain of pages, one after another,
/// so the largest (a patient's Observations are often half their record) would alone take longer
/// than all the others together at full parallelism. Each type gets as many ranges as its share of
/// all the pages, times `parallel`, rounded up: no range is a longer chain than `1 / parallel` of the
/// pages (but for rounding), and a type no larger than that is not split (each range costs probes).
pub fn ranges_wanted(pages: &[u64], parallel: usize) -> Vec<usize> {
    let all: u64 = pages.iter().sum();
    let parallel = parallel.max(1) as u64;
    pages
        .iter()
        .map(|&p| (p * parallel).div_ceil(all.max(1)).clamp(1, parallel) as usize)
        .collect()
}

/// The patients of a job, for keeping a whole type's resources of them only.
pub struct Members(HashSet<String>);

/// Just the elements a member check reads.
#[derive(serde::Deserialize)]
struct Links {
    subject: Option<Reference>,
    patient: Option<Reference>,
}

#[derive(serde::Deserialize)]
struct Reference {
    reference: Option<String>,
}

impl Members {
    /// The job's patients.
    pub fn new(patients: HashSet<String>) -> Self {
        Self(patients)
    }

    /// Whether `resource` belongs to one of the patients by `element` ([`member_element`]).
    pub fn admits(
        &self,
        resource: &Resource<'_>,
        element: &str,
    ) -> Result<bool, serde_json::Error> {
        if element == "id" {
            return Ok(resource.id.as_deref().is_some_and(|id| self.0.contains(id)));
        }
        let links: Links = serde_json::from_slice(resource.json)?;
        let reference = match element {
            "subject" => links.subject,
            _ => links.patient,
        };
        Ok(reference
            .and_then(|r| r.reference)
            .as_deref()
            .and_then(patient_id)
            .is_some_and(|id| self.0.contains(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn resource(json: &str) -> Resource<'_> {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        Resource {
            json: json.as_bytes(),
            resource_type: Cow::Owned(value["resourceType"].as_str().unwrap().to_owned()),
            id: value["id"].as_str().map(|s| Cow::Owned(s.to_owned())),
            compact: true,
        }
    }

    #[test]
    fn elements_follow_the_types_patient_search() {
        assert_eq!(member_element("Patient", "_id"), Some("id"));
        assert_eq!(member_element("Observation", "patient"), Some("subject"));
        assert_eq!(member_element("Observation", "subject"), Some("subject"));
        assert_eq!(member_element("Immunization", "patient"), Some("patient"));
        assert_eq!(member_element("Observation", "performer"), None);
        assert_eq!(member_element("Coverage", "patient"), None);
        assert_eq!(member_element("Appointment", "actor"), None);
    }

    #[test]
    fn members_are_found_by_their_element_only() {
        let members = Members::new(["a".to_owned()].into());
        let obs = |subject: &str| {
            format!(
                r#"{{"resourceType":"Observation","id":"o","subject":{{"reference":"{subject}"}},"performer":[{{"reference":"Patient/a"}}]}}"#
            )
        };
        assert!(members
            .admits(&resource(&obs("Patient/a")), "subject")
            .unwrap());
        assert!(members
            .admits(
                &resource(&obs("http://h/fhir/Patient/a/_history/1")),
                "subject"
            )
            .unwrap());
        assert!(!members
            .admits(&resource(&obs("Patient/b")), "subject")
            .unwrap());
        assert!(!members
            .admits(&resource(&obs("Group/a")), "subject")
            .unwrap());
        let imm = r#"{"resourceType":"Immunization","id":"i","patient":{"reference":"Patient/a"}}"#;
        assert!(members.admits(&resource(imm), "patient").unwrap());
        assert!(!members.admits(&resource(imm), "subject").unwrap());
        let patient = r#"{"resourceType":"Patient","id":"a"}"#;
        assert!(members.admits(&resource(patient), "id").unwrap());
        let other = r#"{"resourceType":"Patient","id":"b"}"#;
        assert!(!members.admits(&resource(other), "id").unwrap());
    }

    #[test]
    fn whole_paging_pays_when_batches_end_in_part_full_pages() {
        // 10 batches of 100 patients out of 1,000, 20 resources each: 10 × ⌈2,000 / 1,000⌉ = 20 searches
        // by patient, 20 pages whole.
        assert!(!fewer_requests(20_000, &[100; 10], 1_000, 1000));
        // 5 resources each: 10 searches by patient, 5 pages whole.
        assert!(fewer_requests(5_000, &[100; 10], 1_000, 1000));
        // A tenth of the patients in one batch: one search beats paging everything.
        assert!(!fewer_requests(5_000, &[100], 1_000, 1000));
    }

    #[test]
    fn only_types_longer_than_their_share_of_the_parallel_work_are_split() {
        // A roster record's pages at 10,000 patients: Observation is 200 of 450, past 450 / 4.
        let pages = [10, 200, 80, 50, 40, 30, 20, 10, 10];
        assert_eq!(ranges_wanted(&pages, 4), [1, 2, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(ranges_wanted(&pages, 1), [1; 9]);
        // One type alone is split as widely as the job runs slices.
        assert_eq!(ranges_wanted(&[100], 4), [4]);
        assert_eq!(ranges_wanted(&[0, 0], 4), [1, 1]);
    }
}
