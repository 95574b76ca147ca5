//! US Core-complete Patient and Group exports (issue #19 item 2): every type the upstream can search by
//! patient, smart-fetch's type list included, and the Practitioner, PractitionerRole, Organization,
//! Location and Medication resources the exported data references.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{json, Value};

const GROUP_ID: &str = "bulk-test-group";

fn run(proxy: &Proxy, resp: reqwest::blocking::Response) -> Value {
    wait_manifest(&accepted_status_url(&proxy.base, resp), None).0
}

/// What each of `types` holds for `patients` by a direct search of the upstream: Patient by `_id`, every
/// other type by its `patient` search parameter, or `subject` where the upstream has no `patient`.
fn direct_by_patient(upstream: &str, types: &[&str], patients: &[String]) -> Expected {
    let searchable = searchable_types(upstream);
    let mut expected = Expected::new();
    for chunk in patients.chunks(20) {
        let refs: Vec<String> = chunk.iter().map(|id| format!("Patient/{id}")).collect();
        for ty in types {
            let params = &searchable[*ty];
            let query = if *ty == "Patient" {
                format!("_id={}", enc(&chunk.join(",")))
            } else if params.contains("patient") {
                format!("patient={}", enc(&refs.join(",")))
            } else {
                assert!(params.contains("subject"), "{ty} has no patient parameter");
                format!("subject={}", enc(&refs.join(",")))
            };
            add_search(&mut expected, upstream, ty, &query);
        }
    }
    expected
}

/// Lines of every file of the manifest's `error` array.
fn error_lines(manifest: &Value) -> Vec<Value> {
    manifest["error"]
        .as_array()
        .expect("manifest without error array")
        .iter()
        .flat_map(|e| download_lines(e["url"].as_str().unwrap(), None))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect()
}

#[test]
fn smart_fetch_types_export_as_direct_searches_at_group_and_patient_level() {
    let upstream = upstream();
    let searchable = searchable_types(&upstream);
    assert!(
        searchable
            .get("Device")
            .is_some_and(|p| p.contains("patient")),
        "the upstream must list Device as searchable by patient"
    );
    let proxy = Proxy::start(&upstream, "patient_batch_size = 3");
    let query = format!("_type={}", SMART_FETCH_TYPES.join(","));
    let members = group_member_ids(&upstream, GROUP_ID);
    for (path, patients) in [
        (format!("Group/{GROUP_ID}/$export"), members),
        ("Patient/$export".to_owned(), all_patient_ids(&upstream)),
    ] {
        let manifest = run(
            &proxy,
            kickoff_get(&proxy.base, &format!("{path}?{query}"), None),
        );
        let expected = direct_by_patient(&upstream, &SMART_FETCH_TYPES, &patients);
        assert!(total(&expected) > 0, "{path}: nothing to compare");
        assert_same(
            &resources_by_type(&download_all(&manifest, "output", None)),
            &expected,
        );
    }
}

#[test]
fn a_type_the_upstream_cannot_search_by_patient_is_exported_empty_with_a_note() {
    let upstream = upstream();
    let searchable = searchable_types(&upstream);
    let endpoint = &searchable["Endpoint"];
    assert!(
        !endpoint.contains("patient") && !endpoint.contains("subject"),
        "the test needs an R4 type the upstream cannot search by patient"
    );
    let proxy = Proxy::start(&upstream, "");
    let manifest = run(
        &proxy,
        kickoff_get(
            &proxy.base,
            "Patient/$export?_type=Observation,Endpoint",
            None,
        ),
    );
    assert_same(
        &resources_by_type(&download_all(&manifest, "output", None)),
        &direct_by_patient(&upstream, &["Observation"], &all_patient_ids(&upstream)),
    );
    let outcomes = error_lines(&manifest);
    let notes: Vec<&Value> = outcomes
        .iter()
        .flat_map(|o| o["issue"].as_array().into_iter().flatten())
        .filter(|i| {
            i["diagnostics"]
                .as_str()
                .is_some_and(|d| d.contains("Endpoint"))
        })
        .collect();
    assert!(
        !notes.is_empty(),
        "the error file does not mention Endpoint"
    );
    assert!(
        notes.iter().all(|i| i["severity"] == "information"),
        "the note on Endpoint is not informational: {notes:?}"
    );

    let not_a_type = kickoff_get(
        &proxy.base,
        "Group/bulk-test-group/$export?_type=NotAType",
        None,
    );
    assert_eq!(not_a_type.status(), 400, "_type=NotAType");

    let strict = Proxy::start(&upstream, "unsearchable_type = \"reject\"");
    for path in [
        "Patient/$export?_type=Observation,Endpoint",
        "Group/bulk-test-group/$export?_type=Endpoint",
        "Patient/$export?_type=NotAType",
    ] {
        let resp = kickoff_get(&strict.base, path, None);
        let status = resp.status();
        let body = resp.text().unwrap();
        assert_eq!(status, 400, "reject mode, {path}: {body}");
        assert!(
            body.contains("_type"),
            "{path}: the 400 does not name _type: {body}"
        );
    }
}

/// Resources of the export other than the referenced types, the data that references them.
fn data_of(exported: &BTreeMap<String, Vec<Value>>) -> Vec<&Value> {
    exported
        .iter()
        .filter(|(t, _)| !REFERENCED_TYPES.contains(&t.as_str()))
        .flat_map(|(_, r)| r.iter())
        .collect()
}

#[test]
fn referenced_resources_come_with_the_data_once_and_only_within_type() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "patient_batch_size = 4");
    for path in ["Patient/$export", "Group/bulk-test-group/$export"] {
        let manifest = run(&proxy, kickoff_get(&proxy.base, path, None));
        let exported = resources_by_type(&download_all(&manifest, "output", None));
        let expected = referenced(&upstream, data_of(&exported), &REFERENCED_TYPES);
        assert!(
            expected.contains_key("Practitioner"),
            "{path}: the data references no Practitioner; the test would prove nothing"
        );
        let mut got = exported.clone();
        got.retain(|t, _| REFERENCED_TYPES.contains(&t.as_str()));
        assert_same(&got, &expected);
    }

    let manifest = run(
        &proxy,
        kickoff_get(
            &proxy.base,
            "Patient/$export?_type=Observation,Patient",
            None,
        ),
    );
    let types: BTreeSet<String> = download_all(&manifest, "output", None)
        .into_iter()
        .map(|f| f.ty)
        .collect();
    assert_eq!(
        types,
        ["Observation", "Patient"].map(String::from).into(),
        "_type=Observation,Patient exported other types"
    );

    let manifest = run(
        &proxy,
        kickoff_get(
            &proxy.base,
            "Patient/$export?_type=Observation,Practitioner",
            None,
        ),
    );
    let exported = resources_by_type(&download_all(&manifest, "output", None));
    let mut expected = direct_by_patient(&upstream, &["Observation"], &all_patient_ids(&upstream));
    let practitioners = referenced(
        &upstream,
        expected["Observation"].values(),
        &["Practitioner"],
    );
    expected.extend(practitioners);
    assert_same(&exported, &expected);
}

/// PUTs `resource` to the read-write upstream.
fn put(upstream: &str, resource: Value) {
    let url = format!(
        "{upstream}/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let resp = client()
        .put(&url)
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    assert!(
        matches!(status, 200 | 201),
        "PUT {url}: {status} {}",
        resp.text().unwrap()
    );
}

/// Ids per type of the resources of `types` in an export.
fn ids_of(
    exported: &BTreeMap<String, Vec<Value>>,
    types: &[&str],
) -> BTreeMap<String, Vec<String>> {
    types
        .iter()
        .filter_map(|t| {
            let mut ids: Vec<String> = exported.get(*t)?.iter().map(|r| key_of(r).0).collect();
            ids.sort();
            Some((t.to_string(), ids))
        })
        .collect()
}

#[test]
fn every_referenced_type_is_fetched_once_and_devices_by_patient() {
    let upstream = upstream_rw();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let id = |name: &str| format!("{name}-{}", &run_id[..12]);
    let reference = |t: &str, name: &str| json!({"reference": format!("{t}/{}", id(name))});
    let patient = id("pat");
    for (t, name) in [
        ("Organization", "org1"),
        ("Organization", "org2"),
        ("Location", "loc"),
        ("Medication", "med"),
        ("Practitioner", "doc"),
    ] {
        put(&upstream, json!({"resourceType": t, "id": id(name)}));
    }
    put(
        &upstream,
        json!({"resourceType": "PractitionerRole", "id": id("role"),
               "practitioner": reference("Practitioner", "doc"),
               "organization": reference("Organization", "org2")}),
    );
    put(
        &upstream,
        json!({"resourceType": "Patient", "id": patient,
               "managingOrganization": reference("Organization", "org1"),
               "generalPractitioner": [reference("Practitioner", "doc"), reference("Practitioner", "doc")]}),
    );
    let subject = reference("Patient", "pat");
    put(
        &upstream,
        json!({"resourceType": "Observation", "id": id("obs"), "status": "final",
               "code": {"text": "x"}, "subject": subject,
               "performer": [reference("Practitioner", "doc"), reference("Organization", "org1"),
                             reference("Organization", "missing")]}),
    );
    put(
        &upstream,
        json!({"resourceType": "MedicationRequest", "id": id("mr"), "status": "active",
               "intent": "order", "subject": subject,
               "medicationReference": reference("Medication", "med"),
               "requester": reference("PractitionerRole", "role")}),
    );
    put(
        &upstream,
        json!({"resourceType": "Encounter", "id": id("enc"), "status": "finished",
               "class": {"code": "AMB"}, "subject": subject,
               "location": [{"location": reference("Location", "loc")}],
               "serviceProvider": reference("Organization", "org1")}),
    );
    put(
        &upstream,
        json!({"resourceType": "Device", "id": id("dev"), "patient": subject,
               "owner": reference("Organization", "org2")}),
    );
    put(
        &upstream,
        json!({"resourceType": "Group", "id": id("group"), "type": "person", "actual": true,
               "member": [{"entity": subject}]}),
    );

    let proxy = Proxy::start(&upstream, "");
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}}]});
    let patient_manifest = run(
        &proxy,
        kickoff_post(&proxy.base, "Patient/$export", &parameters),
    );
    let group_manifest = run(
        &proxy,
        kickoff_get(&proxy.base, &format!("Group/{}/$export", id("group")), None),
    );
    let ids = |names: &[&str]| {
        let mut v: Vec<String> = names.iter().map(|n| id(n)).collect();
        v.sort();
        v
    };
    let want: BTreeMap<String, Vec<String>> = [
        ("Device", ids(&["dev"])),
        ("Location", ids(&["loc"])),
        ("Medication", ids(&["med"])),
        ("Organization", ids(&["org1", "org2"])),
        ("Practitioner", ids(&["doc"])),
        ("PractitionerRole", ids(&["role"])),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v))
    .collect();
    let types: Vec<&str> = want.keys().map(String::as_str).collect();
    for (what, manifest) in [("Patient", patient_manifest), ("Group", group_manifest)] {
        let exported = resources_by_type(&download_all(&manifest, "output", None));
        assert_eq!(ids_of(&exported, &types), want, "{what} export");
        let mut expected = direct_by_patient(
            &upstream,
            &[
                "Patient",
                "Observation",
                "MedicationRequest",
                "Encounter",
                "Device",
            ],
            std::slice::from_ref(&patient),
        );
        expected.extend(referenced(&upstream, data_of(&exported), &REFERENCED_TYPES));
        assert_same(&exported, &expected);
    }
}
