//! Bulk Data 3.0.0's additions, against the real upstream: `_until` (only resources changed before it, at
//! system and Patient level, exactly as a direct search bounded the same way returns them) and
//! `Prefer: separate-export-status` (polls answer 200; the job's status is in `X-Export-Status`).

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

/// Creates `resource` on the writable upstream; returns its id and `meta.lastUpdated`.
fn create(resource: Value) -> (String, String) {
    let created = create_rw(&resource);
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

/// A proxy on the read-only upstream with `export_toml`, and the status URL of the export `kickoff` starts.
fn export_on(
    export_toml: &str,
    kickoff: impl FnOnce(&Proxy) -> reqwest::blocking::Response,
) -> (Proxy, String) {
    let proxy = Proxy::builder(&upstream()).export_toml(export_toml).start();
    let status = accepted_status_url(&proxy.base, kickoff(&proxy));
    (proxy, status)
}

#[test]
fn separate_export_status_reports_a_failed_job_in_the_header() {
    let (_proxy, status) = export_on("max_resources_per_job = 1", |p| {
        kickoff_separate(p, "$export?_type=Patient")
    });
    let (job, _, body) = poll_separate(&status);
    assert_eq!(job, "413", "{body}");
    let outcome: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
}

/// Every manifest of a chain, from the first (the status response) along its `next` links.
fn manifest_chain(first: Value) -> Vec<Value> {
    let mut chain = vec![first];
    while let Some(next) = chain.last().unwrap()["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .map(|l| l["url"].as_str().unwrap().to_owned())
    {
        let resp = client().get(&next).send().unwrap();
        assert!(
            resp.status().is_success(),
            "{next} answered {}",
            resp.status()
        );
        chain.push(resp.json().unwrap());
    }
    chain
}

/// The `output` items of a chain of manifests, as one manifest.
fn joined(chain: &[Value]) -> Value {
    let output: Vec<Value> = chain
        .iter()
        .flat_map(|m| m["output"].as_array().unwrap().clone())
        .collect();
    json!({ "output": output })
}

#[test]
fn a_long_file_list_is_paged_into_linked_manifests() {
    let (_proxy, status) = export_on("resources_per_file = 25\nmanifest_page_files = 2", |p| {
        kickoff_get(&p.base, "$export?_type=Patient,Observation", None)
    });
    let (first, _) = wait_manifest(&status, None);
    let chain = manifest_chain(first);
    assert!(
        chain.len() > 2,
        "expected several manifests, got {}",
        chain.len()
    );
    for manifest in &chain {
        assert!(
            manifest["output"].as_array().unwrap().len() <= 2,
            "{manifest}"
        );
        for field in ["transactionTime", "request", "requiresAccessToken", "error"] {
            assert_eq!(
                manifest[field], chain[0][field],
                "{field} differs between linked manifests"
            );
        }
    }
    let files = download_all(&joined(&chain), "output", None);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream(), Some(&["Patient", "Observation"])),
    );
}

#[test]
fn partial_manifests_list_complete_files_early_and_never_change_them() {
    let mut proxy = Proxy::builder(&upstream())
        .export_toml("page_size = 10\nresources_per_file = 10\nslice_concurrency = 1")
        .upstream_toml("requests_per_second = 8")
        .start();
    let resp = kickoff_get(
        &proxy.base,
        "$export?_type=Observation&allowPartialManifests=true",
        None,
    );
    let status_path = url_path(&accepted_status_url(&proxy.base, resp));
    let status = |proxy: &Proxy| format!("{}{status_path}", origin(&proxy.base));
    // Poll until a running job's 202 carries a manifest; keep it and its files as served.
    let deadline = std::time::Instant::now() + EXPORT_DEADLINE;
    let early = loop {
        let resp = client().get(status(&proxy)).send().unwrap();
        assert_eq!(
            resp.status(),
            202,
            "the export ended before a partial manifest was seen"
        );
        assert!(resp.headers().contains_key("x-progress"));
        let body = resp.text().unwrap();
        if !body.is_empty() {
            let manifest: Value = serde_json::from_str(&body).unwrap();
            if !manifest["output"].as_array().unwrap().is_empty() {
                break manifest;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no partial manifest");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let early_files = download_all(&early, "output", None);
    // What was served survives a crash: the restarted proxy serves the same manifest (on its new port).
    let old_base = proxy.base.clone();
    proxy.kill9();
    proxy.restart();
    let (first, _) = wait_manifest(&status(&proxy), None);
    let chain = manifest_chain(first);
    let mut again = chain[0].clone();
    again.as_object_mut().unwrap().remove("link");
    let mut early_now = early.clone();
    early_now.as_object_mut().unwrap().remove("link");
    // File URLs move to the new port; the kick-off URL in `request` stays as the job recorded it.
    let files = format!("{old_base}/$bulk-files/");
    edit_strings(&mut early_now, &|s| {
        if s.starts_with(&files) {
            *s = s.replacen(old_base.as_str(), &proxy.base, 1);
        }
    });
    assert_eq!(
        again, early_now,
        "the first manifest changed after it was served"
    );
    assert!(
        chain.len() > 1,
        "the files completed later are in linked manifests"
    );
    for (before, after) in early_files
        .iter()
        .zip(download_all(&chain[0], "output", None))
    {
        assert_eq!(
            before.lines, after.lines,
            "{} changed after it was listed",
            before.url
        );
    }
    let files = download_all(&joined(&chain), "output", None);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream(), Some(&["Observation"])),
    );
}
