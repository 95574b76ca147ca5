//! Crash safety: the proxy is killed with SIGKILL while an export runs, restarted on the same data
//! directory, and the job must still complete with exactly the direct-search set.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Small pages and files and a slow upstream rate, so that an export lasts several seconds and a
/// kill lands inside it.
fn slow_proxy() -> Proxy {
    Proxy::builder(&upstream())
        .export_toml("page_size = 20\nresources_per_file = 50")
        .upstream_toml("requests_per_second = 10")
        .start()
}

fn kickoff(proxy: &Proxy, path_and_query: &str) -> String {
    url_path(&accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, path_and_query, None),
    ))
}

/// Restarts on the same data directory and waits for the job under its new base.
fn restart_and_finish(proxy: &mut Proxy, status_path: &str) -> Vec<OutputFile> {
    proxy.restart();
    let (manifest, _) = wait_manifest(&format!("{}{status_path}", origin(&proxy.base)), None);
    let files = download_all(&manifest, "output", None);
    for file in &files {
        assert!(
            file.url.starts_with(&proxy.base),
            "file URL {} is not on the restarted proxy {}",
            file.url,
            proxy.base
        );
    }
    files
}

/// `restart_and_finish`, then the files must equal a direct search of every type.
fn restart_and_match_system(proxy: &mut Proxy, status_path: &str) {
    let files = restart_and_finish(proxy, status_path);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream(), None),
    );
}

/// A kill after the job finished would test nothing: the export must still be running.
fn assert_running(proxy: &Proxy, status_path: &str) {
    let status_url = format!("{}{status_path}", origin(&proxy.base));
    assert!(
        poll_once(&status_url, None).is_none(),
        "the export finished before the kill: slow the upstream down further"
    );
}

/// NDJSON files the proxy has started under its data directory.
fn ndjson_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                ndjson_files(&path)
            } else {
                usize::from(
                    path.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .contains(".ndjson"),
                )
            }
        })
        .sum()
}

#[test]
fn kill_right_after_kickoff() {
    let mut proxy = slow_proxy();
    let status_path = kickoff(&proxy, "$export");
    proxy.kill9();
    restart_and_match_system(&mut proxy, &status_path);
}

#[test]
fn kill_mid_page_at_seeded_delays() {
    let mut rng = XorShift(0x5eed_f00d_cafe_2024);
    let mut proxy = slow_proxy();
    let status_path = kickoff(&proxy, "$export");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        assert_running(&proxy, &status_path);
        proxy.kill9();
        proxy.restart();
    }
    proxy.kill9();
    restart_and_match_system(&mut proxy, &status_path);
}

#[test]
fn kill_between_files() {
    let mut proxy = slow_proxy();
    let status_path = kickoff(&proxy, "$export?_type=Patient,Observation,DiagnosticReport");
    for seen in [2, 5] {
        // The data directory is watched rather than the status, to kill right when a file rolls over.
        let deadline = Instant::now() + Duration::from_secs(60);
        while ndjson_files(&proxy.data_dir) < seen {
            assert!(
                Instant::now() < deadline,
                "no {seen}th NDJSON file under {} within 60 s",
                proxy.data_dir.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        proxy.kill9();
        proxy.restart();
    }
    proxy.kill9();
    let files = restart_and_finish(&mut proxy, &status_path);
    let expected = direct_system(
        &upstream(),
        Some(&["Patient", "Observation", "DiagnosticReport"]),
    );
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn kill_during_patient_export() {
    let mut rng = XorShift(0x0b5e_55ed_1234_5678);
    let mut proxy = Proxy::builder(&upstream())
        .export_toml("page_size = 20\nresources_per_file = 50\npatient_batch_size = 3")
        .upstream_toml("requests_per_second = 10")
        .start();
    let status_path = kickoff(&proxy, "Patient/$export");
    std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
    assert_running(&proxy, &status_path);
    proxy.kill9();
    let files = restart_and_finish(&mut proxy, &status_path);
    let upstream = upstream();
    assert_same(
        &resources_by_type(&files),
        &direct_compartment(&upstream, &all_patient_ids(&upstream)),
    );
}

/// The `X-Progress` of a running job.
fn progress(proxy: &Proxy, status_path: &str) -> String {
    let resp = client()
        .get(format!("{}{status_path}", origin(&proxy.base)))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 202, "the export is not running");
    resp.headers()["X-Progress"].to_str().unwrap().to_owned()
}

/// Planning alone takes many seconds here: every type's `_lastUpdated` split is probed at a few
/// requests a second. Killed every 1.5-2.5 s, a planner that started over on every restart would
/// never finish; one that resumes where it stopped finishes, with neither a slice lost nor one twice.
#[test]
fn kill_repeatedly_during_planning() {
    const SLOW: &str = "requests_per_second = 8";
    let mut rng = XorShift(0x91a2_b3c4_d5e6_f708);
    let mut proxy = Proxy::builder(&upstream())
        .export_toml("page_size = 5\ntime_slices = 8\nslice_concurrency = 4")
        .upstream_toml(SLOW)
        .start();
    let status_path = kickoff(&proxy, "$export");
    let mut kills = 0;
    while progress(&proxy, &status_path).contains("(planning)") {
        assert!(kills < 60, "planning had not finished after {kills} kills");
        proxy.kill9();
        proxy.restart();
        kills += 1;
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1000)));
    }
    assert!(
        kills >= 3,
        "planning ended after {kills} kills: slow the upstream down further"
    );
    println!("planning finished after {kills} kills");
    // Fetching the pages at the planning rate would take minutes; the plan is what this test is about.
    let config = std::fs::read_to_string(proxy.config_path()).unwrap();
    std::fs::write(
        proxy.config_path(),
        config.replace(SLOW, "requests_per_second = 200"),
    )
    .unwrap();
    proxy.kill9();
    restart_and_match_system(&mut proxy, &status_path);
}

/// Whether a file whose name starts with `prefix` exists under `dir`.
fn has_file(dir: &Path, prefix: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            has_file(&path, prefix)
        } else {
            e.file_name().to_string_lossy().starts_with(prefix)
        }
    })
}

/// Killed as soon as the referenced Practitioners' first file appears (their `_id=` searches planned
/// after the data, and under way), a Patient export still ends with each referenced Practitioner once.
#[test]
fn kill_while_referenced_resources_are_fetched() {
    let upstream = upstream();
    let mut proxy = Proxy::builder(&upstream)
        .export_toml("page_size = 5\npatient_batch_size = 20")
        .upstream_toml("requests_per_second = 5")
        .start();
    let status_path = kickoff(
        &proxy,
        "Patient/$export?_type=DiagnosticReport,Practitioner",
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !has_file(&proxy.data_dir, "Practitioner.") {
        assert!(
            Instant::now() < deadline,
            "no Practitioner file within 90 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_running(&proxy, &status_path);
    proxy.kill9();
    let files = restart_and_finish(&mut proxy, &status_path);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    expected.retain(|t, _| t == "DiagnosticReport");
    let practitioners = referenced(
        &upstream,
        expected["DiagnosticReport"].values(),
        &["Practitioner"],
    );
    assert!(
        practitioners
            .get("Practitioner")
            .is_some_and(|p| p.len() > 5),
        "too few referenced Practitioners for more than one page"
    );
    expected.extend(practitioners);
    assert_same(&resources_by_type(&files), &expected);
}
