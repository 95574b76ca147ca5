//! The FHIR R4 Patient compartment: which types belong to a patient, and by which search parameter.

use std::collections::BTreeSet;

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

/// The parameter that finds a type's resources by patient, given what the upstream supports.
///
/// `patient`, then `subject`, are preferred wherever the upstream has them: they are the record's own
/// patient (e.g. `Observation.subject`), whereas `performer`, `author`… would pull in records where the
/// patient only acted. `None` when the type is outside the compartment or the upstream has no
/// linking parameter for it.
pub fn patient_param<'a>(
    resource_type: &str,
    upstream_params: &'a BTreeSet<String>,
) -> Option<&'a str> {
    let (_, params) = PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == resource_type)?;
    ["patient", "subject"]
        .iter()
        .chain(params.iter())
        .find_map(|p| upstream_params.get(*p).map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
