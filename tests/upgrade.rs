//! A job store written by the previous release opens under this code and its jobs go on.
//!
//! `tests/fixtures/store-7c8410e/` holds what release 7c8410e wrote, killed with SIGKILL mid-work against the
//! mock upstream below: every record of its sled trees (`records.json`, the upstream's origin replaced by
//! `{{UPSTREAM}}`, since the mock listens on a new port each run) and its job files. It holds three jobs:
//! one completed (with the manifest that release served, `manifest-completed.json`), one running with
//! committed cursors part-way through its searches, and one still being planned. The fixture was made by
//! `write_fixture` below, at that commit: `FBP_FIXTURE_OUT=DIR cargo test --test upgrade -- --ignored`.
//!
//! Needs no real upstream: the mock's data are fixed, so "exactly what a direct search returns" is known.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::mock::{Mock, Reply, Request};
use common::*;
use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-7c8410e");
const TREES: [&str; 4] = ["jobs", "slices", "seen", "planning"];
const PATIENTS: usize = 12;
const OBSERVATIONS: usize = 60;

/// The mock's resources of `resource_type`, in id order.
fn resources(resource_type: &str) -> Vec<Value> {
    let meta = json!({"lastUpdated": "2024-01-01T00:00:00.000Z"});
    match resource_type {
        "Patient" => (1..=PATIENTS)
            .map(|i| json!({"resourceType": "Patient", "id": format!("p{i:02}"), "meta": meta}))
            .collect(),
        "Observation" => (1..=OBSERVATIONS)
            .map(|i| {
                json!({"resourceType": "Observation", "id": format!("o{i:03}"), "meta": meta,
                       "status": "final", "code": {"text": "x"},
                       "subject": {"reference": format!("Patient/p{:02}", (i - 1) % PATIENTS + 1)}})
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn capability() -> Value {
    let params = |extra: &[&str]| -> Vec<Value> {
        ["_id", "_lastUpdated"]
            .iter()
            .chain(extra)
            .map(
                |n| json!({"name": n, "type": if *n == "_lastUpdated" { "date" } else { "token" }}),
            )
            .collect()
    };
    let search = json!([{"code": "search-type"}, {"code": "read"}]);
    json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
           "fhirVersion": "4.0.1", "format": ["json"],
           "rest": [{"mode": "server", "resource": [
               {"type": "Patient", "interaction": search, "searchParam": params(&[])},
               {"type": "Observation", "interaction": search,
                "searchParam": params(&["patient", "subject"])}]}]})
}

/// A search of the mock: `_id`, `patient`/`subject` honoured, paged by `_offset`; the self link is the
/// request as sent, so the proxy sees every parameter honoured.
fn search(origin: &str, request: &Request, resource_type: &str) -> Reply {
    let target = request.target();
    let url = url::Url::parse(&format!("{origin}{target}")).unwrap();
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let get = |name: &str| {
        query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let count: usize = get("_count").and_then(|c| c.parse().ok()).unwrap_or(10);
    let offset: usize = get("_offset").and_then(|c| c.parse().ok()).unwrap_or(0);
    let ids: Option<BTreeSet<String>> =
        get("_id").map(|v| v.split(',').map(str::to_owned).collect());
    let owners: Option<BTreeSet<String>> = get("patient")
        .or_else(|| get("subject"))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let matches: Vec<Value> = resources(resource_type)
        .into_iter()
        .filter(|r| {
            ids.as_ref()
                .is_none_or(|ids| ids.contains(r["id"].as_str().unwrap()))
        })
        .filter(|r| {
            owners
                .as_ref()
                .is_none_or(|o| o.contains(r["subject"]["reference"].as_str().unwrap_or_default()))
        })
        .collect();
    let elements_only_id = get("_elements").as_deref() == Some("id");
    let page: Vec<Value> = matches
        .iter()
        .skip(offset)
        .take(count)
        .map(|r| {
            let resource = if elements_only_id {
                json!({"resourceType": resource_type, "id": r["id"]})
            } else {
                r.clone()
            };
            json!({"fullUrl": format!("{origin}/fhir/{resource_type}/{}", r["id"].as_str().unwrap()),
                   "resource": resource, "search": {"mode": "match"}})
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": url.as_str()})];
    if offset + count < matches.len() {
        let mut next = url.clone();
        let kept: Vec<(String, String)> = query
            .iter()
            .filter(|(n, _)| n != "_offset")
            .cloned()
            .collect();
        next.query_pairs_mut()
            .clear()
            .extend_pairs(kept)
            .append_pair("_offset", &(offset + count).to_string());
        links.push(json!({"relation": "next", "url": next.as_str()}));
    }
    Reply::fhir(
        json!({"resourceType": "Bundle", "type": "searchset", "total": matches.len(),
               "link": links, "entry": page})
        .to_string(),
    )
}

/// The mock upstream; while `slow` is set, Observation pages take 400 ms and listing patient ids hangs.
fn mock(slow: Arc<AtomicBool>) -> Mock {
    let origin: Arc<std::sync::OnceLock<String>> = Arc::default();
    let seen = origin.clone();
    let mock = Mock::routes()
        .route(
            Some("GET"),
            |p| p == "/fhir/metadata",
            |_| Reply::fhir(capability().to_string()),
        )
        .route(
            Some("GET"),
            |p| p == "/fhir/Patient" || p == "/fhir/Observation",
            move |request| {
                let resource_type = request.path().trim_start_matches("/fhir/").to_owned();
                if slow.load(Ordering::SeqCst) {
                    if request.target().contains("_elements=id") {
                        return Reply::hang();
                    }
                    if resource_type == "Observation" {
                        std::thread::sleep(Duration::from_millis(400));
                    }
                }
                search(seen.get().unwrap(), request, &resource_type)
            },
        )
        .start();
    origin.set(mock.origin().to_owned()).unwrap();
    mock
}

fn proxy(mock: &Mock) -> Proxy {
    Proxy::builder(&mock.base())
        .export_toml("page_size = 5\nresources_per_file = 8\nslice_concurrency = 1")
        .start()
}

fn status_path(proxy: &Proxy, resp: reqwest::blocking::Response) -> String {
    url_path(&accepted_status_url(&proxy.base, resp))
}

/// Every line of every output file of a manifest, by type, as (id, line) pairs.
fn by_type(files: &[OutputFile]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        for line in &file.lines {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_eq!(resource["resourceType"], file.ty.as_str(), "{line}");
            out.entry(file.ty.clone())
                .or_default()
                .push(resource["id"].as_str().unwrap().to_owned());
        }
    }
    out
}

fn ids(resource_type: &str) -> Vec<String> {
    resources(resource_type)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Replaces every `from` in the strings of `value` with `to`.
fn replace_strings(value: &mut Value, from: &str, to: &str) {
    edit_strings(value, &|s| *s = s.replace(from, to));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The jobs of a store by what they were doing when it was written: "completed", "running", "planning"
/// (accepted, not planned yet).
fn jobs_by_role(records: &Value) -> BTreeMap<String, String> {
    records["jobs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, job)| {
            let role = match job["state"]["state"].as_str().unwrap() {
                "completed" => "completed",
                "running" => "running",
                "accepted" => "planning",
                other => panic!("job {id} of the fixture is {other}"),
            };
            (role.to_owned(), id.clone())
        })
        .collect()
}

#[test]
fn a_store_of_the_previous_release_resumes_its_jobs() {
    let mock = mock(Arc::new(AtomicBool::new(false)));
    let fixture = Path::new(FIXTURE);
    let mut records: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("records.json")).unwrap())
            .unwrap();
    replace_strings(&mut records, "{{UPSTREAM}}", mock.origin());
    // A finished job expires an hour after it finished, so the fixture's would long be reaped: only the
    // date moves, to an hour from now.
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    for job in records["jobs"].as_object_mut().unwrap().values_mut() {
        if job["expires"].is_i64() {
            job["expires"] = in_an_hour.into();
        }
    }
    let roles = jobs_by_role(&records);
    assert_eq!(
        roles.keys().map(String::as_str).collect::<Vec<_>>(),
        ["completed", "planning", "running"],
        "the fixture holds one job of each kind"
    );

    // A fresh proxy makes the directories; the fixture then takes the place of its store and files.
    let mut proxy = proxy(&mock);
    proxy.kill9();
    let store_dir = proxy.data_dir.join("store");
    std::fs::remove_dir_all(&store_dir).unwrap();
    {
        let db = sled::open(&store_dir).unwrap();
        for tree in TREES {
            let tree_db = db.open_tree(tree).unwrap();
            for (key, value) in records[tree].as_object().unwrap() {
                tree_db
                    .insert(key.as_bytes(), serde_json::to_vec(value).unwrap())
                    .unwrap();
            }
        }
        db.flush().unwrap();
    }
    copy_dir(&fixture.join("files"), &proxy.data_dir.join("files"));
    proxy.restart();
    let base = proxy.base.clone();
    let status = |role: &str| format!("{base}/$bulk-status/{}", roles[role]);

    // The completed job: the same manifest, the same bytes in its files.
    let (manifest, _) = wait_manifest(&status("completed"), None);
    let mut expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("manifest-completed.json")).unwrap(),
    )
    .unwrap();
    replace_strings(&mut expected, "{{PROXY}}", &base);
    assert_eq!(manifest, expected, "the completed job's manifest changed");
    for item in manifest["output"].as_array().unwrap() {
        let url = item["url"].as_str().unwrap();
        let name = url.rsplit('/').next().unwrap();
        let served = client().get(url).send().unwrap().bytes().unwrap();
        let stored =
            std::fs::read(fixture.join("files").join(&roles["completed"]).join(name)).unwrap();
        assert_eq!(served.as_ref(), stored.as_slice(), "{name} changed");
    }

    // The interrupted jobs finish with exactly the mock's resources: none lost, none twice.
    let finished = |role: &str| {
        let (manifest, _) = wait_manifest(&status(role), None);
        by_type(&download_all(&manifest, "output", None))
    };
    let all = |types: &[&str]| -> BTreeMap<String, Vec<String>> {
        types.iter().map(|t| (t.to_string(), ids(t))).collect()
    };
    assert_eq!(
        finished("running"),
        all(&["Patient", "Observation"]),
        "running job"
    );
    assert_eq!(finished("planning"), all(&["Observation"]), "planned job");
}

/// Writes the fixture into `$FBP_FIXTURE_OUT` with the code at hand (run at the release it stands for).
#[test]
#[ignore = "writes the fixture; run by hand at the release the fixture stands for"]
fn write_fixture() {
    let out = std::path::PathBuf::from(std::env::var("FBP_FIXTURE_OUT").expect("FBP_FIXTURE_OUT"));
    let slow = Arc::new(AtomicBool::new(false));
    let mock = mock(slow.clone());
    let mut proxy = proxy(&mock);
    let base = proxy.base.clone();

    // Completed: all Patients, at system level.
    let completed = status_path(&proxy, kickoff_get(&base, "$export?_type=Patient", None));
    let completed_url = format!("{}{completed}", origin(&base));
    let (manifest, _) = wait_manifest(&completed_url, None);
    slow.store(true, Ordering::SeqCst);
    // Running: named patients (no id listing), so it plans at once and then crawls through Observations.
    let patients: Vec<Value> = ids("Patient")
        .iter()
        .map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
        .collect();
    let mut parameters = vec![json!({"name": "_type", "valueString": "Patient,Observation"})];
    parameters.extend(patients);
    let running = status_path(
        &proxy,
        kickoff_post(
            &base,
            "Patient/$export",
            &json!({"resourceType": "Parameters", "parameter": parameters}),
        ),
    );
    // Planning: all patients, whose id listing hangs.
    status_path(
        &proxy,
        kickoff_get(&base, "Patient/$export?_type=Observation", None),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        poll_once(&format!("{}{running}", origin(&base)), None).is_none(),
        "running job ended"
    );
    proxy.kill9();

    let db = sled::open(proxy.data_dir.join("store")).unwrap();
    let mut records = serde_json::Map::new();
    for tree in TREES {
        let tree_db = db.open_tree(tree).unwrap();
        let mut map = serde_json::Map::new();
        for kv in tree_db.iter() {
            let (k, v) = kv.unwrap();
            map.insert(
                String::from_utf8(k.to_vec()).unwrap(),
                serde_json::from_slice(&v).unwrap(),
            );
        }
        records.insert(tree.into(), map.into());
    }
    let mut records = Value::Object(records);
    assert_eq!(
        jobs_by_role(&records).len(),
        3,
        "one job of each kind: {records}"
    );
    replace_strings(&mut records, mock.origin(), "{{UPSTREAM}}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("records.json"),
        serde_json::to_string_pretty(&records).unwrap(),
    )
    .unwrap();
    let mut manifest = manifest;
    replace_strings(
        &mut manifest,
        &format!("{base}/$bulk-files"),
        "{{PROXY}}/$bulk-files",
    );
    std::fs::write(
        out.join("manifest-completed.json"),
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
    copy_dir(&proxy.data_dir.join("files"), &out.join("files"));
}
