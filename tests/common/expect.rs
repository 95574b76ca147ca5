//! Oracles: what an export must hold, found by searching the upstream directly, and the checks that
//! compare an export with them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::*;

/// `(id, meta.versionId)` of a resource: what an export must reproduce exactly.
pub type Key = (String, String);

/// Resources per type, each keyed by `(id, versionId)`.
pub type Expected = BTreeMap<String, BTreeMap<Key, Value>>;

pub fn key_of(resource: &Value) -> Key {
    let id = resource["id"].as_str().unwrap_or_default().to_owned();
    let version = resource["meta"]["versionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (id, version)
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// GETs a JSON document from the upstream, insisting on 200.
pub fn get_json(url: &str) -> Value {
    let resp = client()
        .get(url)
        .header("Accept", "application/fhir+json")
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(status, 200, "GET {url} answered {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// Every resource of a direct search, following `Bundle.link[relation=next]`.
pub fn search_all(url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut next = Some(url.to_owned());
    while let Some(url) = next.take() {
        let bundle = get_json(&url);
        if let Some(entries) = bundle["entry"].as_array() {
            out.extend(entries.iter().map(|e| e["resource"].clone()));
        }
        next = bundle["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str().map(str::to_owned))
        });
    }
    out
}

/// Adds the resources of a direct search (`query` without `_count`) of `ty` to `expected`.
pub fn add_search(expected: &mut Expected, upstream: &str, ty: &str, query: &str) {
    let sep = if query.is_empty() { "" } else { "&" };
    for resource in search_all(&format!("{upstream}/{ty}?_count=500{sep}{query}")) {
        assert_eq!(
            resource["resourceType"], ty,
            "direct search of {ty} returned another type"
        );
        expected
            .entry(ty.to_owned())
            .or_default()
            .insert(key_of(&resource), resource);
    }
}

/// Types the upstream's CapabilityStatement declares searchable, with their search parameters.
pub fn searchable_types(upstream: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cap = get_json(&format!("{upstream}/metadata"));
    let mut out = BTreeMap::new();
    for rest in cap["rest"].as_array().unwrap() {
        for resource in rest["resource"].as_array().unwrap() {
            let searchable = resource["interaction"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["code"] == "search-type"));
            if searchable {
                let params = resource["searchParam"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| p["name"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert(resource["type"].as_str().unwrap().to_owned(), params);
            }
        }
    }
    out
}

/// What a system export of `types` (all searchable types when `None`) must contain.
pub fn direct_system(upstream: &str, types: Option<&[&str]>) -> Expected {
    let all: Vec<String> = match types {
        Some(types) => types.iter().map(|t| t.to_string()).collect(),
        None => searchable_types(upstream).into_keys().collect(),
    };
    let mut expected = Expected::new();
    for ty in &all {
        add_search(&mut expected, upstream, ty, "");
    }
    expected
}

/// The ids of all Patients of the upstream.
pub fn all_patient_ids(upstream: &str) -> Vec<String> {
    search_all(&format!("{upstream}/Patient?_count=500"))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The patient ids of a Group's `member.entity`.
pub fn group_member_ids(upstream: &str, group: &str) -> Vec<String> {
    let group = get_json(&format!("{upstream}/Group/{group}"));
    group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let reference = m["entity"]["reference"].as_str().unwrap();
            reference.strip_prefix("Patient/").unwrap().to_owned()
        })
        .collect()
}

/// The FHIR R4 Patient CompartmentDefinition: type and the parameters that tie it to a patient.
/// `Group` (by `member`) and `Patient` (by `link`) are left out: the proxy exports the patients
/// themselves and treats a Group as a roster, not part of a patient's record.
///
/// This is the oracle's own copy, written from the CompartmentDefinition and not imported from
/// `fhir_bulk_proxy::export::compartment`: a wrong entry in the library must make the direct searches
/// disagree with the export, not silently agree with it.
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
    ("SupplyRequest", &["subject"]),
    ("VisionPrescription", &["patient"]),
];

/// R4 types outside the compartment that R4 ties to a patient by their `patient` search parameter
/// (the oracle's own copy, as `PATIENT_COMPARTMENT` is).
pub const PATIENT_LINKED: &[&str] = &["Contract", "Device", "GuidanceResponse", "Task"];

/// The types a Patient or Group export adds when its resources reference them: the library's own list,
/// since which types it chose to add is its decision, not something a direct search can check.
pub use fhir_bulk_proxy::export::compartment::REFERENCED_TYPES;

/// The resources of `types` that `resources` reference relatively (`Type/id`, anywhere a `reference`
/// is), each read directly from the upstream; references the upstream cannot resolve are left out.
pub fn referenced<'a>(
    upstream: &str,
    resources: impl IntoIterator<Item = &'a Value>,
    types: &[&str],
) -> Expected {
    fn walk(value: &Value, types: &[&str], found: &mut BTreeSet<(String, String)>) {
        match value {
            Value::Object(members) => {
                for (k, v) in members {
                    match (k.as_str(), v.as_str()) {
                        ("reference", Some(r)) => {
                            let parts: Vec<&str> = r.split('/').collect();
                            let versioned = parts.len() == 4 && parts[2] == "_history";
                            if (parts.len() == 2 || versioned) && types.contains(&parts[0]) {
                                found.insert((parts[0].to_owned(), parts[1].to_owned()));
                            }
                        }
                        _ => walk(v, types, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, types, found)),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    for resource in resources {
        walk(resource, types, &mut found);
    }
    let mut expected = Expected::new();
    for (ty, id) in found {
        let resp = client()
            .get(format!("{upstream}/{ty}/{id}"))
            .header("Accept", "application/fhir+json")
            .send()
            .unwrap();
        if resp.status() == 200 {
            let resource: Value = serde_json::from_str(&resp.text().unwrap()).unwrap();
            expected
                .entry(ty)
                .or_default()
                .insert(key_of(&resource), resource);
        }
    }
    expected
}

/// What a Patient-level export over `patient_ids` must contain: the Patients themselves, every
/// resource of their compartment, searched with each compartment parameter the upstream supports,
/// the patient-linked types by `patient`, and the [`REFERENCED_TYPES`] resources all these reference.
pub fn direct_compartment(upstream: &str, patient_ids: &[String]) -> Expected {
    let searchable = searchable_types(upstream);
    let mut expected = Expected::new();
    for chunk in patient_ids.chunks(20) {
        let refs: Vec<String> = chunk.iter().map(|id| format!("Patient/{id}")).collect();
        let refs = enc(&refs.join(","));
        add_search(
            &mut expected,
            upstream,
            "Patient",
            &format!("_id={}", enc(&chunk.join(","))),
        );
        for (ty, params) in PATIENT_COMPARTMENT {
            let Some(supported) = searchable.get(*ty) else {
                continue;
            };
            for param in params.iter().filter(|p| supported.contains(**p)) {
                add_search(&mut expected, upstream, ty, &format!("{param}={refs}"));
            }
        }
        for ty in PATIENT_LINKED {
            if searchable.get(*ty).is_some_and(|p| p.contains("patient")) {
                add_search(&mut expected, upstream, ty, &format!("patient={refs}"));
            }
        }
    }
    let wanted: Vec<&str> = REFERENCED_TYPES
        .into_iter()
        .filter(|t| searchable.contains_key(*t))
        .collect();
    let references = referenced(
        upstream,
        expected.values().flat_map(|r| r.values()),
        &wanted,
    );
    expected.extend(references);
    expected
}

/// Resources per type from downloaded files.
pub fn resources_by_type(files: &[OutputFile]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in files {
        let resources = file.lines.iter().map(|l| serde_json::from_str(l).unwrap());
        out.entry(file.ty.clone()).or_default().extend(resources);
    }
    out
}

/// Asserts the export holds, per type, exactly the resources of `expected`, byte-for-byte equal
/// as JSON, with no resource twice (not even in two versions).
pub fn assert_same(exported: &BTreeMap<String, Vec<Value>>, expected: &Expected) {
    let mut problems = Vec::new();
    let types: BTreeSet<&String> = exported.keys().chain(expected.keys()).collect();
    for ty in types {
        let got = exported.get(ty).map(Vec::as_slice).unwrap_or_default();
        let empty = BTreeMap::new();
        let want = expected.get(ty).unwrap_or(&empty);
        let mut seen_ids = BTreeMap::new();
        for resource in got {
            let (id, version) = key_of(resource);
            if let Some(before) = seen_ids.insert(id.clone(), version.clone()) {
                problems.push(format!(
                    "{ty}/{id}: exported twice (versions {before} and {version})"
                ));
            }
        }
        let got_keys: BTreeSet<Key> = got.iter().map(key_of).collect();
        let want_keys: BTreeSet<&Key> = want.keys().collect();
        let missing: Vec<_> = want_keys
            .iter()
            .filter(|k| !got_keys.contains(**k))
            .collect();
        let extra: Vec<_> = got_keys.iter().filter(|k| !want_keys.contains(k)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "{ty}: exported {} (distinct {}), direct search {}; missing {} e.g. {:?}; unexpected {} e.g. {:?}",
                got.len(),
                got_keys.len(),
                want.len(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>()
            ));
        }
        for resource in got {
            if let Some(direct) = want.get(&key_of(resource)) {
                if direct != resource {
                    problems.push(format!(
                        "{ty}/{}: exported content differs from upstream",
                        resource["id"]
                    ));
                    break;
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "export differs from the direct search:\n{}",
        problems.join("\n")
    );
}

/// Total resources of an `Expected`.
pub fn total(expected: &Expected) -> usize {
    expected.values().map(BTreeMap::len).sum()
}

/// The parameters tying `ty` to a patient that the upstream can search: those of the Patient compartment,
/// `patient` for a type outside it (Device); none when the upstream cannot search `ty` by patient.
pub fn patient_params(
    searchable: &BTreeMap<String, BTreeSet<String>>,
    ty: &str,
) -> Vec<&'static str> {
    let params = PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == ty)
        .map_or(&["patient"][..], |(_, params)| *params);
    let supported = searchable.get(ty);
    params
        .iter()
        .copied()
        .filter(|p| supported.is_some_and(|s| s.contains(*p)))
        .collect()
}

/// What a Patient- or Group-level export over `patient_ids` must hold of `ty` (not `Patient`) with
/// `_typeFilter=ty?filter` (no filter when `filter` is empty): one direct search per patient parameter,
/// the filter added to each; empty when the upstream cannot search `ty` by patient.
pub fn direct_patient_linked(
    upstream: &str,
    patient_ids: &[String],
    ty: &str,
    filter: &str,
) -> Expected {
    let params = patient_params(&searchable_types(upstream), ty);
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("&{filter}")
    };
    let mut expected = Expected::new();
    for chunk in patient_ids.chunks(20) {
        let refs: Vec<String> = chunk.iter().map(|id| format!("Patient/{id}")).collect();
        let refs = enc(&refs.join(","));
        for param in &params {
            add_search(
                &mut expected,
                upstream,
                ty,
                &format!("{param}={refs}{filter}"),
            );
        }
    }
    expected
}
