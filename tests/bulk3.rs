//! Bulk Data 3.0.0's additions, against the real upstream: `_until` (only resources changed before it, at
//! system and Patient level, exactly as a direct search bounded the same way returns them) and
//! `Prefer: separate-export-status` (polls answer 200; the job's status is in `X-Export-Status`).

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
    search_all(&format!("{}/{path_and_query}", upstream_rw()))
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
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

/// A kick-off asking for separate export status.
fn kickoff_separate(proxy: &Proxy, path_and_query: &str) -> reqwest::blocking::Response {
    client()
        .get(format!("{}/{path_and_query}", proxy.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async, separate-export-status")
        .send()
        .unwrap()
}

/// Polls until `X-Export-Status` is no longer 202; every poll must itself answer 200.
fn poll_separate(status_url: &str) -> (String, reqwest::header::HeaderMap, String) {
    let deadline = std::time::Instant::now() + EXPORT_DEADLINE;
    loop {
        let resp = client().get(status_url).send().unwrap();
        assert_eq!(
            resp.status(),
            200,
            "a poll with separate export status answered {}",
            resp.status()
        );
        let headers = resp.headers().clone();
        let body = resp.text().unwrap();
        let job = headers["x-export-status"].to_str().unwrap().to_owned();
        if job != "202" {
            return (job, headers, body);
        }
        assert!(
            headers.contains_key("x-progress"),
            "running job without X-Progress: {headers:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "export did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn separate_export_status_moves_the_job_status_to_a_header() {
    let proxy = Proxy::builder(&upstream()).start();
    let resp = kickoff_separate(&proxy, "$export?_type=Patient");
    assert_eq!(
        resp.headers()
            .get("preference-applied")
            .map(|v| v.to_str().unwrap()),
        Some("respond-async, separate-export-status")
    );
    let status = accepted_status_url(&proxy.base, resp);
    let (job, _, body) = poll_separate(&status);
    assert_eq!(job, "200");
    let manifest: Value = serde_json::from_str(&body).unwrap();
    let lines: usize = download_all(&manifest, "output", None)
        .iter()
        .map(|f| f.lines.len())
        .sum();
    assert_eq!(
        lines,
        all_patient_ids(&upstream()).len(),
        "every Patient, as without the preference"
    );

    // Without the preference nothing changes.
    let plain = kickoff_get(&proxy.base, "$export?_type=Patient", None);
    assert!(plain.headers().get("preference-applied").is_none());
    let (manifest, headers) = wait_manifest(&accepted_status_url(&proxy.base, plain), None);
    assert!(headers.get("x-export-status").is_none());
    assert_eq!(
        manifest["output"].as_array().map(Vec::len).map(|n| n > 0),
        Some(true)
    );
}

#[test]
fn separate_export_status_reports_a_failed_job_in_the_header() {
    let proxy = Proxy::builder(&upstream())
        .export_toml("max_resources_per_job = 1")
        .start();
    let status = accepted_status_url(
        &proxy.base,
        kickoff_separate(&proxy, "$export?_type=Patient"),
    );
    let (job, _, body) = poll_separate(&status);
    assert_eq!(job, "413", "{body}");
    let outcome: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
}
