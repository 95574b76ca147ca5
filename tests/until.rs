//! Bulk Data 3.0.0 `_until`: only resources changed before it are exported, at system and Patient level,
//! exactly as a direct search of the real upstream bounded the same way returns them.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

/// Creates `resource` on the writable upstream; returns its id and `meta.lastUpdated`.
fn create(resource: Value) -> (String, String) {
    let base = upstream_rw();
    let resource_type = resource["resourceType"].as_str().unwrap().to_owned();
    let resp = client()
        .post(format!("{base}/{resource_type}"))
        .header("Content-Type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .unwrap();
    assert!(
        resp.status().is_success(),
        "create {resource_type}: {}",
        resp.status()
    );
    let created: Value = resp.json().unwrap();
    (
        created["id"].as_str().unwrap().to_owned(),
        created["meta"]["lastUpdated"].as_str().unwrap().to_owned(),
    )
}

/// The ids a direct search of the writable upstream returns (every page).
fn direct_ids(path_and_query: &str) -> BTreeSet<String> {
    let mut next = Some(format!("{}/{path_and_query}", upstream_rw()));
    let mut ids = BTreeSet::new();
    while let Some(url) = next {
        let page: Value = client().get(&url).send().unwrap().json().unwrap();
        for entry in page["entry"].as_array().into_iter().flatten() {
            ids.insert(entry["resource"]["id"].as_str().unwrap().to_owned());
        }
        next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
    }
    ids
}

fn exported_ids(proxy: &Proxy, resp: reqwest::blocking::Response) -> BTreeSet<String> {
    let status = accepted_status_url(&proxy.base, resp);
    let (manifest, _) = wait_manifest(&status, None);
    download_all(&manifest, "output", None)
        .iter()
        .flat_map(|f| f.lines.iter())
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[test]
fn until_exports_what_changed_before_it_at_system_level() {
    let (before, _) = create(json!({"resourceType": "Basic", "code": {"text": "until test"}}));
    let (at, until) = create(json!({"resourceType": "Basic", "code": {"text": "until test"}}));
    let proxy = Proxy::builder(&upstream_rw()).start();
    let filter = enc(&format!("Basic?_id={before},{at}"));
    let got = exported_ids(
        &proxy,
        kickoff_get(
            &proxy.base,
            &format!(
                "$export?_type=Basic&_typeFilter={filter}&_until={}",
                enc(&until)
            ),
            None,
        ),
    );
    // The resource changed exactly at `_until` is not before it.
    assert_eq!(got, BTreeSet::from([before.clone()]));
    let oracle = direct_ids(&format!(
        "Basic?_id={before},{at}&_lastUpdated=lt{}",
        enc(&until)
    ));
    assert_eq!(got, oracle, "the export differs from the direct search");
    let unbounded = exported_ids(
        &proxy,
        kickoff_get(
            &proxy.base,
            &format!("$export?_type=Basic&_typeFilter={filter}"),
            None,
        ),
    );
    assert_eq!(
        unbounded,
        BTreeSet::from([before, at]),
        "without _until both are exported"
    );
}

#[test]
fn until_bounds_a_patient_export() {
    let (patient, _) = create(json!({"resourceType": "Patient", "name": [{"family": "Until"}]}));
    let observation = |text: &str| {
        create(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": text},
                      "subject": {"reference": format!("Patient/{patient}")}}),
        )
    };
    let (first, _) = observation("first");
    let (_second, until) = observation("second");
    let (_third, _) = observation("third");
    let proxy = Proxy::builder(&upstream_rw()).start();
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "_until", "valueInstant": until},
        {"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}}]});
    let got = exported_ids(
        &proxy,
        kickoff_post(&proxy.base, "Patient/$export", &parameters),
    );
    assert_eq!(got, BTreeSet::from([patient.clone(), first]));
    let mut oracle = direct_ids(&format!(
        "Patient?_id={patient}&_lastUpdated=lt{}",
        enc(&until)
    ));
    oracle.extend(direct_ids(&format!(
        "Observation?patient=Patient/{patient}&_lastUpdated=lt{}",
        enc(&until)
    )));
    assert_eq!(got, oracle, "the export differs from the direct searches");
}
