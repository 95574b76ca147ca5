//! Restart storm: one export of 20 000 resources, the proxy killed with SIGKILL at seeded random
//! moments at least 20 times and restarted on the same data directory each time. The job must end
//! with exactly the direct-search set, and every file must hold exactly its committed lines.
//!
//! The resources are `Basic` resources with a code of their own, loaded (idempotently, by PUT with
//! fixed ids) into the read-write upstream; the export selects them with `_typeFilter`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SYSTEM: &str = "http://example.org/fhir-bulk-proxy/storm";
const CODE: &str = "storm-20k-v1";
const RESOURCES: usize = 20_000;
const BATCH: usize = 500;
const KILLS: usize = 20;

fn count(rw: &str) -> usize {
    let bundle = get_json(&format!(
        "{rw}/Basic?code={}&_summary=count",
        enc(&format!("{SYSTEM}|{CODE}"))
    ));
    bundle["total"].as_u64().expect("count without total") as usize
}

/// Loads the storm resources unless they are all there already.
fn load(rw: &str) {
    let have = count(rw);
    if have == RESOURCES {
        return;
    }
    let started = Instant::now();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    for start in (0..RESOURCES).step_by(BATCH) {
        let entries: Vec<Value> = (start..start + BATCH)
            .map(|i| {
                let id = format!("fbp-storm-{i:05}");
                json!({
                    "fullUrl": format!("{rw}/Basic/{id}"),
                    "resource": {
                        "resourceType": "Basic",
                        "id": id,
                        "identifier": [{"system": SYSTEM, "value": format!("{i}")}],
                        "code": {"coding": [{"system": SYSTEM, "code": CODE}], "text": "restart storm"},
                        "created": "2024-01-01",
                    },
                    "request": {"method": "PUT", "url": format!("Basic/{id}")},
                })
            })
            .collect();
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let resp = http
            .post(rw)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json")
            .body(bundle.to_string())
            .send()
            .unwrap();
        let status = resp.status();
        let body = resp.text().unwrap();
        assert!(
            status.is_success(),
            "loading batch {start}: {status}: {}",
            &body[..body.len().min(500)]
        );
    }
    let have = count(rw);
    assert_eq!(
        have, RESOURCES,
        "after loading, the upstream counts {have} storm resources"
    );
    println!(
        "loaded {RESOURCES} Basic resources in {:?}",
        started.elapsed()
    );
}

/// Every `.ndjson` file under `dir`, recursively.
fn ndjson_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            ndjson_files(&path, out);
        } else if path.to_string_lossy().ends_with(".ndjson") {
            out.push(path);
        }
    }
}

#[test]
fn twenty_kills_during_one_20k_export() {
    let rw = upstream_rw();
    load(&rw);
    let seed: u64 = std::env::var("FBP_STORM_SEED")
        .ok()
        .map(|s| s.parse().expect("FBP_STORM_SEED is a u64"))
        .unwrap_or(0x5707_2024_dead_beef);
    let mut rng = XorShift(seed);
    // Small pages and files, and a slow request rate so that the export outlives 20 kills.
    let mut proxy = Proxy::builder(&rw)
        .export_toml("page_size = 200\nresources_per_file = 1000")
        .upstream_toml("requests_per_second = 2")
        .start();
    let filter = enc(&format!("Basic?code={}", enc(&format!("{SYSTEM}|{CODE}"))));
    let query = format!("$export?_type=Basic&_typeFilter={filter}");
    let status_path = url_path(&accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, &query, None),
    ));
    let started = Instant::now();
    let mut kills = 0;
    let mut delays = Vec::new();
    while kills < KILLS {
        let delay = Duration::from_millis(300 + rng.below(1700));
        delays.push(delay.as_millis());
        std::thread::sleep(delay);
        let status_url = format!("{}{status_path}", origin(&proxy.base));
        assert!(
            poll_once(&status_url, None).is_none(),
            "the export finished after only {kills} kills (seed {seed:#x}): slow it down"
        );
        proxy.kill9();
        kills += 1;
        proxy.restart();
    }
    println!("kills survived: {kills} (seed {seed:#x}, delays ms {delays:?})");
    let status_url = format!("{}{status_path}", origin(&proxy.base));
    let (manifest, _) = wait_manifest(&status_url, None);
    println!("export finished {:?} after kick-off", started.elapsed());
    assert_eq!(
        manifest["error"].as_array().map(Vec::len),
        Some(0),
        "errors after the storm: {manifest}"
    );
    let files = download_all(&manifest, "output", None);
    let mut expected = Expected::new();
    add_search(
        &mut expected,
        &rw,
        "Basic",
        &format!("code={}", enc(&format!("{SYSTEM}|{CODE}"))),
    );
    assert_eq!(total(&expected), RESOURCES);
    assert_same(&resources_by_type(&files), &expected);

    // On disk: each file of the manifest holds exactly its count of complete lines, nothing more.
    let mut on_disk = Vec::new();
    ndjson_files(&proxy.data_dir, &mut on_disk);
    for out in manifest["output"].as_array().unwrap() {
        let url = out["url"].as_str().unwrap();
        let name = url.rsplit('/').next().unwrap();
        let path = on_disk
            .iter()
            .find(|p| p.file_name().unwrap().to_string_lossy() == name)
            .unwrap_or_else(|| panic!("{name} of the manifest is not under the data directory"));
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.is_empty() || bytes.ends_with(b"\n"),
            "{name} ends in a partial line"
        );
        let lines: Vec<&[u8]> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            Some(lines.len() as u64),
            out["count"].as_u64(),
            "{name} on disk holds {} lines, the manifest says {}",
            lines.len(),
            out["count"]
        );
        for line in lines {
            serde_json::from_slice::<Value>(line)
                .unwrap_or_else(|e| panic!("{name}: a line on disk is not JSON ({e})"));
        }
    }
    let listed = manifest["output"].as_array().unwrap().len();
    let stray: Vec<_> = on_disk
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("Basic")
                && !manifest["output"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|o| o["url"].as_str().unwrap().ends_with(&format!("/{name}")))
        })
        .collect();
    assert!(
        stray.is_empty(),
        "NDJSON files on disk not in the manifest ({listed} listed): {stray:?}"
    );
}
