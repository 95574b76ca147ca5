//! `includeAssociatedData` against the real upstream: the Provenance a Patient or Group export adds are
//! exactly those that direct `Provenance?target=Type/id` searches of the upstream find for its resources
//! (`RelevantProvenanceResources`), or the newest of them per resource (`LatestProvenanceResources`),
//! each once, also when the export holds Provenance of its own; the token must grant Provenance; other
//! codes are 400, or ignored and noted with lenient handling; without the parameter nothing is added.
//!
//! The read-only upstream's patients have no Provenance, so one patient with 150 Observations (more
//! targets than one search takes) and Provenance of theirs is created on the writable one, once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

/// Small pages, so Provenance searches page through `next` links too.
const EXPORT_TOML: &str = "page_size = 3";

/// The test data on the writable upstream.
struct Data {
    patient: String,
    group: String,
    /// A Provenance of another patient's Observation: no export here has it.
    foreign: String,
}

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let id = |v: Value| v["id"].as_str().unwrap().to_owned();
        let patient = id(create_rw(
            &json!({"resourceType": "Patient", "name": [{"family": unique("Provenance")}]}),
        ));
        let observation = |patient: &str, i: usize| {
            id(create_rw(
                &json!({"resourceType": "Observation", "status": "final",
                "code": {"text": format!("associated {i}")},
                "subject": {"reference": format!("Patient/{patient}")}}),
            ))
        };
        let observations: Vec<String> = (0..150).map(|i| observation(&patient, i)).collect();
        let provenance = |targets: &[String], recorded: &str| {
            let target: Vec<Value> = targets.iter().map(|t| json!({"reference": t})).collect();
            id(create_rw(
                &json!({"resourceType": "Provenance", "target": target,
                "recorded": recorded, "agent": [{"who": {"display": "associated.rs"}}]}),
            ))
        };
        let o = |i: usize| format!("Observation/{}", observations[i]);
        let p = format!("Patient/{patient}");
        provenance(&[o(0), p.clone()], "2024-01-01T00:00:00Z");
        provenance(&[o(0)], "2025-01-01T00:00:00Z");
        // Recorded at the same instant: the later update is the newer.
        provenance(&[o(1)], "2023-06-01T00:00:00Z");
        provenance(&[o(1)], "2023-06-01T00:00:00+00:00");
        // Targets in the first and the last batch of targets.
        provenance(&[o(2), o(149)], "2022-01-01T00:00:00Z");
        provenance(&[o(149)], "2021-01-01T00:00:00Z");
        provenance(&[p], "2020-01-01T00:00:00Z");
        let other = id(create_rw(
            &json!({"resourceType": "Patient", "name": [{"family": unique("Other")}]}),
        ));
        let foreign = provenance(
            &[format!("Observation/{}", observation(&other, 0))],
            "2026-01-01T00:00:00Z",
        );
        let group = id(create_rw(
            &json!({"resourceType": "Group", "type": "person",
            "actual": true, "member": [{"entity": {"reference": format!("Patient/{patient}")}}]}),
        ));
        Data {
            patient,
            group,
            foreign,
        }
    })
}

/// A Patient-level POST kick-off for the test patient, with `extra` parameters.
fn patient_export(base: &str, extra: &[Value]) -> reqwest::blocking::Response {
    let mut parameter = vec![json!({"name": "patient",
        "valueReference": {"reference": format!("Patient/{}", data().patient)}})];
    parameter.extend(extra.iter().cloned());
    kickoff_post(
        base,
        "Patient/$export",
        &json!({"resourceType": "Parameters", "parameter": parameter}),
    )
}

fn string_param(name: &str, value: &str) -> Value {
    json!({"name": name, "valueString": value})
}

/// The manifest and output files of an accepted kick-off.
fn finish(
    base: &str,
    resp: reqwest::blocking::Response,
    token: Option<&str>,
) -> (Value, Vec<OutputFile>) {
    let status = accepted_status_url(base, resp);
    let (manifest, _) = wait_manifest(&status, token);
    let files = download_all(&manifest, "output", token);
    (manifest, files)
}

/// What an export holds: the `Type/id` of every resource but Provenance, and the Provenance ids in
/// file order (repeats kept).
fn split(files: &[OutputFile]) -> (BTreeSet<String>, Vec<String>) {
    let mut exported = BTreeSet::new();
    let mut provenance = Vec::new();
    for line in files.iter().flat_map(|f| f.lines.iter()) {
        let r: Value = serde_json::from_str(line).unwrap();
        let (t, id) = (
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap(),
        );
        if t == "Provenance" {
            provenance.push(id.to_owned());
        } else {
            assert!(
                exported.insert(format!("{t}/{id}")),
                "{t}/{id} is exported twice"
            );
        }
    }
    (exported, provenance)
}

/// Each of `ids` once, as a set.
fn once(ids: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        set.len(),
        ids.len(),
        "a Provenance is exported twice: {ids:?}"
    );
    set
}

/// The oracle: per exported resource, the Provenance a direct `Provenance?target=` search finds.
fn direct_targeting(exported: &BTreeSet<String>) -> BTreeMap<String, Vec<Value>> {
    exported
        .iter()
        .map(|key| {
            let url = format!(
                "{}/Provenance?target={}&_count=100",
                upstream_rw(),
                enc(key)
            );
            (key.clone(), search_all(&url))
        })
        .collect()
}

fn ids_of(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every Provenance the direct searches found.
fn relevant(exported: &BTreeSet<String>) -> BTreeSet<String> {
    direct_targeting(exported)
        .values()
        .flat_map(|found| ids_of(found))
        .collect()
}

/// Per exported resource, the newest Provenance the direct search found: by `recorded`, then
/// `meta.lastUpdated` (instants compared as points in time).
fn latest(exported: &BTreeSet<String>) -> BTreeSet<String> {
    let instant = |v: &Value| {
        v.as_str()
            .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap())
    };
    direct_targeting(exported)
        .values()
        .filter_map(|found| {
            found
                .iter()
                .max_by_key(|p| {
                    (
                        instant(&p["recorded"]),
                        instant(&p["meta"]["lastUpdated"]),
                        p["id"].as_str().unwrap().to_owned(),
                    )
                })
                .map(|p| p["id"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// The messages of the manifest's error file.
fn error_text(manifest: &Value, token: Option<&str>) -> String {
    download_all(manifest, "error", token)
        .iter()
        .flat_map(|f| f.lines.iter())
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

fn provenance_outputs(manifest: &Value) -> usize {
    manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "Provenance")
        .count()
}

#[test]
fn relevant_provenance_is_what_direct_target_searches_find_each_once() {
    let proxy = Proxy::start(&upstream_rw(), EXPORT_TOML);
    let types = string_param("_type", "Patient,Observation");
    let resp = patient_export(
        &proxy.base,
        &[
            types.clone(),
            string_param("includeAssociatedData", "RelevantProvenanceResources"),
        ],
    );
    let (manifest, files) = finish(&proxy.base, resp, None);
    let (exported, provenance) = split(&files);
    assert_eq!(exported.len(), 151, "the patient and its 150 Observations");
    assert!(
        provenance_outputs(&manifest) > 0,
        "no Provenance output: {manifest}"
    );
    let expected = relevant(&exported);
    assert!(
        expected.len() >= 7 && !expected.contains(&data().foreign),
        "the oracle found {expected:?}"
    );
    assert_eq!(
        once(&provenance),
        expected,
        "the export differs from the direct searches"
    );

    // A 2.0.0 client, which does not send the parameter, gets the same export without Provenance.
    let (manifest, files) = finish(&proxy.base, patient_export(&proxy.base, &[types]), None);
    let (plain, provenance) = split(&files);
    assert_eq!(plain, exported);
    assert!(
        provenance.is_empty() && provenance_outputs(&manifest) == 0,
        "{manifest}"
    );
}

#[test]
fn provenance_the_export_holds_anyway_is_not_repeated() {
    // No `_type`: the Patient compartment's own Provenance (those targeting the Patient) are data.
    let proxy = Proxy::start(&upstream_rw(), EXPORT_TOML);
    let resp = patient_export(
        &proxy.base,
        &[
            string_param("includeAssociatedData", "LatestProvenanceResources"),
            string_param("includeAssociatedData", "RelevantProvenanceResources"),
        ],
    );
    let (_, files) = finish(&proxy.base, resp, None);
    let (exported, provenance) = split(&files);
    let compartment = ids_of(&search_all(&format!(
        "{}/Provenance?patient=Patient/{}",
        upstream_rw(),
        data().patient
    )));
    assert!(!compartment.is_empty(), "no Provenance in the compartment");
    let mut expected = relevant(&exported);
    assert!(
        compartment.is_subset(&expected),
        "the compartment's Provenance target the patient"
    );
    expected.extend(compartment);
    assert_eq!(once(&provenance), expected);
}

#[test]
fn latest_provenance_is_the_newest_per_exported_resource() {
    let proxy = Proxy::start(&upstream_rw(), EXPORT_TOML);
    let resp = kickoff_get(
        &proxy.base,
        &format!(
            "Group/{}/$export?_type=Patient,Observation&includeAssociatedData=LatestProvenanceResources",
            data().group
        ),
        None,
    );
    let (_, files) = finish(&proxy.base, resp, None);
    let (exported, provenance) = split(&files);
    let expected = latest(&exported);
    assert!(
        expected.len() >= 4 && expected.len() < relevant(&exported).len(),
        "the oracle found {expected:?}"
    );
    assert_eq!(
        once(&provenance),
        expected,
        "the export differs from the newest per resource"
    );
}

#[test]
fn associated_provenance_needs_a_provenance_scope() {
    let client = BackendClient::new("associated");
    let proxy = Proxy::builder(&upstream_rw())
        .export_toml(&format!(
            "{EXPORT_TOML}\n{}",
            client.auth_toml(
                "",
                &[
                    "system/Patient.rs",
                    "system/Observation.rs",
                    "system/Group.rs",
                    "system/Provenance.rs"
                ],
            )
        ))
        .start();
    let url = format!(
        "{}/Group/{}/$export?_type=Patient,Observation&includeAssociatedData=RelevantProvenanceResources",
        proxy.base,
        data().group
    );
    let kickoff = |token: &str, prefer: &str| {
        get_with_token(&url, Some(token))
            .header("Accept", "application/fhir+json")
            .header("Prefer", prefer)
            .send()
            .unwrap()
    };
    let narrow = client.token(&proxy.base, "system/Patient.rs system/Observation.rs");
    let (status, _, body) = status_header_body(kickoff(&narrow, "respond-async"), "Content-Type");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Provenance"), "{body}");

    let lenient = kickoff(&narrow, "respond-async, handling=lenient");
    let (manifest, files) = finish(&proxy.base, lenient, Some(&narrow));
    let (exported, provenance) = split(&files);
    assert_eq!(exported.len(), 151);
    assert!(
        provenance.is_empty(),
        "Provenance exported without a scope for it"
    );
    let errors = error_text(&manifest, Some(&narrow));
    assert!(errors.contains("includeAssociatedData"), "{errors}");

    let wide = client.token(
        &proxy.base,
        "system/Patient.rs system/Observation.rs system/Provenance.rs",
    );
    let (_, files) = finish(&proxy.base, kickoff(&wide, "respond-async"), Some(&wide));
    let (exported, provenance) = split(&files);
    assert_eq!(once(&provenance), relevant(&exported));
}

#[test]
fn other_codes_are_refused_or_with_lenient_handling_noted() {
    let proxy = Proxy::start(&upstream_rw(), EXPORT_TOML);
    let group_export = |codes: &str, prefer: &str| {
        client()
            .get(format!(
                "{}/Group/{}/$export?_type=Patient,Observation&includeAssociatedData={codes}",
                proxy.base,
                data().group
            ))
            .header("Accept", "application/fhir+json")
            .header("Prefer", prefer)
            .send()
            .unwrap()
    };
    for codes in [
        "_foo",
        "LatestProvenanceResources,Other",
        "relevantProvenanceResources",
    ] {
        let (status, _, body) =
            status_header_body(group_export(codes, "respond-async"), "Content-Type");
        assert_eq!(status, 400, "{codes}: {body}");
        let outcome: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        let bad = codes.rsplit(',').next().unwrap();
        assert!(
            body.contains(bad),
            "{codes}: the refusal does not name {bad}: {body}"
        );
    }
    let resp = group_export(
        "_foo,RelevantProvenanceResources",
        "respond-async, handling=lenient",
    );
    let (manifest, files) = finish(&proxy.base, resp, None);
    let errors = error_text(&manifest, None);
    assert!(errors.contains("_foo"), "{errors}");
    let (exported, provenance) = split(&files);
    assert_eq!(
        once(&provenance),
        relevant(&exported),
        "the known code still applies"
    );
}

#[test]
fn a_kill_after_the_provenance_are_planned_neither_loses_nor_repeats_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.log");
    // Slow upstream requests, so the kill comes while the planned Provenance slices still run.
    let mut proxy = Proxy::builder(&upstream_rw())
        .upstream_toml("requests_per_second = 4")
        .export_toml("page_size = 2")
        .log_to(&log)
        .start();
    let resp = patient_export(
        &proxy.base,
        &[
            string_param("_type", "Patient"),
            string_param("includeAssociatedData", "RelevantProvenanceResources"),
        ],
    );
    let status = accepted_status_url(&proxy.base, resp);
    let status_path = status
        .strip_prefix(&origin(&proxy.base))
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + EXPORT_DEADLINE;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("associated Provenance planned")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the Provenance were never planned"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    proxy.kill9();
    proxy.restart();
    let (manifest, _) = wait_manifest(&format!("{}{status_path}", origin(&proxy.base)), None);
    let files = download_all(&manifest, "output", None);
    let (exported, provenance) = split(&files);
    assert_eq!(exported.len(), 1, "the patient alone");
    let expected = relevant(&exported);
    assert!(expected.len() >= 2, "the oracle found {expected:?}");
    assert_eq!(once(&provenance), expected);
}
