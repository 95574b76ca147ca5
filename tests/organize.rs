//! Bulk Data 3.0.0 `organizeOutputBy=Patient`, against the real upstream: the files are resource blocks
//! (a header `Parameters` naming the Patient, then the Patient and its resources), every block's
//! resources belong to its patient, every patient has exactly one block across file splits (a split
//! block repeats its header and the file before says `continuesInFile`), and the resources are exactly
//! what direct searches of the upstream find, also when the proxy is killed mid-export.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::Value;

const GROUP_ID: &str = "bulk-test-group";

/// The patient a block header names, if `resource` is one.
fn header_patient(resource: &Value) -> Option<String> {
    if resource["resourceType"] != "Parameters" {
        return None;
    }
    let parameter = &resource["parameter"][0];
    assert_eq!(
        parameter["name"], "header",
        "not a block header: {resource}"
    );
    let reference = parameter["valueReference"]["reference"].as_str().unwrap();
    Some(reference.strip_prefix("Patient/").unwrap().to_owned())
}

/// Whether `value` holds a reference to `Patient/{id}` anywhere.
fn references_patient(value: &Value, id: &str) -> bool {
    match value {
        Value::Object(map) => {
            map.get("reference")
                .and_then(Value::as_str)
                .is_some_and(|r| {
                    r == format!("Patient/{id}") || r.ends_with(&format!("/Patient/{id}"))
                })
                || map.values().any(|v| references_patient(v, id))
        }
        Value::Array(items) => items.iter().any(|v| references_patient(v, id)),
        _ => false,
    }
}

/// Reads an organized export's files in manifest order, checks their block structure, and returns
/// its resources by type (headers left out) and the number of files that continue in the next.
fn read_blocks(manifest: &Value) -> (BTreeMap<String, Vec<Value>>, usize) {
    assert_eq!(manifest["outputOrganizedBy"], "Patient", "{manifest}");
    let items = manifest["output"].as_array().unwrap();
    let mut resources: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut blocks: BTreeSet<String> = BTreeSet::new();
    let mut continuing: Option<(String, String)> = None;
    let mut continued = 0;
    let mut after_blocks = false;
    for item in items {
        assert!(
            item.get("type").is_none(),
            "an organized item has a type: {item}"
        );
        let url = item["url"].as_str().unwrap();
        let lines = download_lines(url, None);
        assert_eq!(item["count"].as_u64(), Some(lines.len() as u64), "{url}");
        let lines: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut current: Option<String> = None;
        for (i, resource) in lines.iter().enumerate() {
            if let Some(patient) = header_patient(resource) {
                assert!(
                    !after_blocks,
                    "{url}: a block after the files of referenced resources"
                );
                let resumed = i == 0
                    && continuing
                        .as_ref()
                        .is_some_and(|(next, p)| next == url && *p == patient);
                assert!(
                    blocks.insert(patient.clone()) || resumed,
                    "{url}: Patient/{patient} has a second block"
                );
                current = Some(patient);
                continue;
            }
            let ty = resource["resourceType"].as_str().unwrap().to_owned();
            match &current {
                Some(patient) => {
                    let own = ty == "Patient" && resource["id"] == patient.as_str();
                    assert!(
                        own || references_patient(resource, patient),
                        "{url}: {ty}/{} in the block of Patient/{patient} does not belong to it",
                        resource["id"]
                    );
                }
                // A file without a header holds the referenced resources, after every block.
                None => {
                    assert!(i > 0 || !blocks.is_empty(), "{url} starts without a header");
                    assert!(
                        REFERENCED_TYPES.contains(&ty.as_str()),
                        "{url}: {ty} outside any block"
                    );
                    after_blocks = true;
                }
            }
            resources.entry(ty).or_default().push(resource.clone());
        }
        continuing = match item.get("continuesInFile").and_then(Value::as_str) {
            Some(next) => {
                continued += 1;
                Some((
                    next.to_owned(),
                    current.clone().expect("a continued file has a block"),
                ))
            }
            None => None,
        };
    }
    assert!(continuing.is_none(), "the last file says it continues");
    let patients: BTreeSet<String> = resources["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(blocks, patients, "blocks and exported Patients differ");
    (resources, continued)
}

/// A Group export organized by patient holds exactly the members' compartments, as blocks; with files
/// smaller than a block, blocks are split with their header repeated.
#[test]
fn a_group_export_organized_by_patient_is_one_block_per_member() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "resources_per_file = 30\npatient_batch_size = 7");
    let resp = kickoff_get(
        &proxy.base,
        &format!("Group/{GROUP_ID}/$export?organizeOutputBy=Patient"),
        None,
    );
    let (manifest, _) = wait_manifest(&accepted_status_url(&proxy.base, resp), None);
    let (resources, continued) = read_blocks(&manifest);
    assert!(continued > 0, "no block was larger than a file of 30");
    let members = group_member_ids(&upstream, GROUP_ID);
    let patients: BTreeSet<String> = resources["Patient"].iter().map(|p| key_of(p).0).collect();
    assert_eq!(patients, members.iter().cloned().collect::<BTreeSet<_>>());
    assert_same(&resources, &direct_compartment(&upstream, &members));
}

/// Without `organizeOutputBy` the same export is by type (2.0.0 clients see no change).
#[test]
fn without_organize_output_by_the_files_are_by_type() {
    let proxy = Proxy::start(&upstream(), "");
    let resp = kickoff_get(
        &proxy.base,
        &format!("Group/{GROUP_ID}/$export?_type=Patient,Condition"),
        None,
    );
    let (manifest, _) = wait_manifest(&accepted_status_url(&proxy.base, resp), None);
    assert!(manifest.get("outputOrganizedBy").is_none(), "{manifest}");
    let files = download_all(&manifest, "output", None);
    assert!(!files.is_empty());
}

/// Killed with SIGKILL twice while batches are being fetched and organized, the proxy resumes and the
/// organized Patient-level export still holds every resource once, in one block per patient.
#[test]
fn an_organized_export_survives_kill_9() {
    let upstream = upstream();
    let mut proxy = Proxy::builder(&upstream)
        .export_toml("page_size = 10\nresources_per_file = 25\npatient_batch_size = 2\nslice_concurrency = 2")
        .upstream_toml("requests_per_second = 6")
        .start();
    let types = "Patient,Condition,Observation,Encounter";
    let resp = kickoff_get(
        &proxy.base,
        &format!("Patient/$export?organizeOutputBy=Patient&_type={types}"),
        None,
    );
    let status_path = url_path(&accepted_status_url(&proxy.base, resp));
    let status = |proxy: &Proxy| format!("{}{status_path}", origin(&proxy.base));
    for wait_ms in [1700, 2300] {
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        let resp = client().get(status(&proxy)).send().unwrap();
        assert_eq!(resp.status(), 202, "the export ended before the kill");
        eprintln!("killed at {:?}", resp.headers().get("x-progress"));
        proxy.kill9();
        proxy.restart();
    }
    let (manifest, _) = wait_manifest(&status(&proxy), None);
    let (resources, _) = read_blocks(&manifest);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    let wanted: BTreeSet<&str> = types.split(',').collect();
    expected.retain(|ty, _| wanted.contains(ty.as_str()));
    assert_same(&resources, &expected);
}
