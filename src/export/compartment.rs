//! The FHIR R4 Patient compartment: which types belong to a patient, and by which search parameter; and
//! from it the one rule of which types each export level exports ([`level_types`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::export::model::Level;
use crate::upstream::Capability;

/// R4 CompartmentDefinition `patient`: each member type with its linking search parameters, in the
/// definition's order. `Patient` itself (by `_id`) and `Group` (a roster, not a record) are handled apart.
const PATIENT_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["patient"]),
    ("Basic", &["patient", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["patient", "performer"]),
    ("CareTeam", &["patient", "participant"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester"]),
    ("Condition", &["patient", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["patient"]),
    ("EnrollmentRequest", &["subject"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["patient"]),
    ("Goal", &["patient"]),
    ("ImagingStudy", &["patient"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "patient", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["patient"]),
    ("Media", &["subject"]),
    (
        "MedicationAdministration",
        &["patient", "performer", "subject"],
    ),
    ("MedicationDispense", &["subject", "patient", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Person", &["patient"]),
    ("Procedure", &["patient", "performer"]),
    ("Provenance", &["patient"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["requester"]),
    ("VisionPrescription", &["patient"]),
];

/// R4 types outside the compartment that R4 still links to a patient by a `patient` search parameter
/// (each "the patient the resource is about"): `Device.patient` (a device affixed to the patient, which
/// US Core exports), `Task.patient`, `Contract.patient` and `GuidanceResponse.patient`.
const PATIENT_LINKED: &[&str] = &["Contract", "Device", "GuidanceResponse", "Task"];

/// Types a Patient or Group export adds when its resources reference them (US Core and ONC (g)(10) expect
/// them, to read the data): they are fetched by id, not searched by patient.
pub const REFERENCED_TYPES: [&str; 5] = [
    "Location",
    "Medication",
    "Organization",
    "Practitioner",
    "PractitionerRole",
];

/// The id of a `Patient/[id]` reference, relative or absolute, versioned or not.
pub fn patient_id(reference: &str) -> Option<&str> {
    let path = reference.split(['?', '#']).next()?;
    let path = match path.split_once("/_history/") {
        Some((unversioned, _)) => unversioned,
        None => path,
    };
    let (rest, id) = path.rsplit_once('/')?;
    let is_patient = rest == "Patient" || rest.ends_with("/Patient");
    (is_patient && !id.is_empty()).then_some(id)
}

/// The parameter that finds a type's resources by patient, given what the upstream supports.
///
/// `patient`, then `subject`, are preferred wherever the upstream has them: they are the record's own
/// patient (e.g. `Observation.subject`), whereas `performer`, `author`… would pull in records where the
/// patient only acted. For a `PATIENT_LINKED` type only `patient` qualifies: R4 defines no other
/// parameter of it that means the patient. `None` when the type is not linked to a patient or the
/// upstream has no linking parameter for it.
pub fn patient_param<'a>(
    resource_type: &str,
    upstream_params: &'a BTreeSet<String>,
) -> Option<&'a str> {
    let params: &[&str] = match PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == resource_type)
    {
        Some((_, params)) => params,
        None if PATIENT_LINKED.contains(&resource_type) => &[],
        None => return None,
    };
    let preferred: &[&str] = if params.is_empty() {
        &["patient"]
    } else {
        &["patient", "subject"]
    };
    preferred
        .iter()
        .chain(params.iter())
        .find_map(|p| upstream_params.get(*p).map(String::as_str))
}

/// How an export reaches the resources of a type it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Searched whole: every resource of the type (system level).
    Whole,
    /// Searched by patient: `Patient` by `_id`, any other type by its [`patient_param`].
    ByPatient,
    /// Fetched by id, once the resources that reference it are written ([`REFERENCED_TYPES`]).
    ByReference,
}

/// The types a level may export, each with how it is reached: every searchable type at system level;
/// at Patient and Group level the types the upstream can search by patient, and the
/// [`REFERENCED_TYPES`] it can search by id. Kick-off validates against it and the planner plans by it.
pub fn level_types(level: &Level, capability: &Capability) -> BTreeMap<String, Reach> {
    capability
        .types
        .iter()
        .filter_map(|(t, params)| {
            let reach = match level {
                Level::System => Reach::Whole,
                Level::Patient | Level::Group { .. } => {
                    if t == "Patient" || patient_param(t, params).is_some() {
                        Reach::ByPatient
                    } else if REFERENCED_TYPES.contains(&t.as_str()) {
                        Reach::ByReference
                    } else {
                        return None;
                    }
                }
            };
            Some((t.clone(), reach))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_ids_come_from_relative_absolute_and_versioned_references() {
        assert_eq!(patient_id("Patient/x"), Some("x"));
        assert_eq!(patient_id("https://h/fhir/Patient/x/_history/2"), Some("x"));
        assert_eq!(patient_id("Patient/a?x#y"), Some("a"));
        assert_eq!(patient_id("Group/x"), None);
        assert_eq!(patient_id("Patient/"), None);
        assert_eq!(patient_id("NotPatient/x"), None);
        assert_eq!(patient_id("abc"), None);
    }

    fn params(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_patient_then_definition_order() {
        assert_eq!(
            patient_param("Observation", &params(&["subject", "patient"])),
            Some("patient")
        );
        assert_eq!(
            patient_param("Observation", &params(&["performer", "subject"])),
            Some("subject")
        );
        assert_eq!(
            patient_param("Coverage", &params(&["beneficiary", "payor"])),
            Some("beneficiary")
        );
        assert_eq!(patient_param("Observation", &params(&["code"])), None);
        assert_eq!(patient_param("Practitioner", &params(&["patient"])), None);
        assert_eq!(patient_param("Patient", &params(&["_id"])), None);
    }

    #[test]
    fn patient_linked_types_outside_the_compartment_go_by_patient() {
        assert_eq!(
            patient_param("Device", &params(&["_id", "patient", "type"])),
            Some("patient")
        );
        assert_eq!(patient_param("Device", &params(&["_id", "subject"])), None);
        assert_eq!(
            patient_param("Task", &params(&["patient"])),
            Some("patient")
        );
        // In the compartment by `subject`; R4's `Specimen.patient` is preferred where the upstream has it.
        assert_eq!(
            patient_param("Specimen", &params(&["subject", "patient"])),
            Some("patient")
        );
        assert_eq!(
            patient_param("Specimen", &params(&["subject"])),
            Some("subject")
        );
        for t in REFERENCED_TYPES {
            assert_eq!(patient_param(t, &params(&["_id", "patient"])), None, "{t}");
        }
    }
}
