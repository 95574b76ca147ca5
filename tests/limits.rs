//! Limits, graceful shutdown, deleted resources and retention, end to end against the real binary.
//!
//! Every limit is set in the config of its own proxy and shown to bite: a request or export over it
//! fails the way the configuration documents, and (where cheap) one under it still succeeds, so that a
//! limit that is ignored, or one that refuses everything, both fail the test.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::mock::{After, Mock, Reply};
use common::*;
use serde_json::{json, Value};

/// Slow enough that a job is still running seconds after kick-off.
const SLOW_UPSTREAM: &str = "requests_per_second = 2";

fn start(server: &str, upstream_toml: &str, export: &str) -> Proxy {
    Proxy::builder(&upstream())
        .server_toml(server)
        .upstream_toml(upstream_toml)
        .export_toml(export)
        .start()
}

/// The job id at the end of a status URL.
fn job_id(status_url: &str) -> String {
    status_url.rsplit('/').next().unwrap().to_owned()
}

/// `{data_dir}/files/{job_id}`.
fn job_dir(proxy: &Proxy, status_url: &str) -> PathBuf {
    proxy.data_dir.join("files").join(job_id(status_url))
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Polls until the job answers something else than 202; returns that status and body. A manifest
/// (200) is returned too, so that the caller can say it should not have come.
fn wait_end(status_url: &str) -> (u16, String) {
    let deadline = Instant::now() + EXPORT_DEADLINE;
    loop {
        let resp = client().get(status_url).send().unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().unwrap();
        if status != 202 {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "export {status_url} still running after {EXPORT_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses an OperationOutcome and returns its diagnostics joined.
fn outcome_text(body: &str, what: &str) -> String {
    let outcome: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"));
    assert_eq!(
        outcome["resourceType"], "OperationOutcome",
        "{what}: body is not an OperationOutcome: {body}"
    );
    let issues = outcome["issue"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: OperationOutcome without issue: {body}"));
    assert!(!issues.is_empty(), "{what}: OperationOutcome without issue");
    issues
        .iter()
        .map(|i| i["diagnostics"].as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The job must end failed with `status` and an OperationOutcome naming `key`, never with a manifest,
/// and its files must be gone from the data directory.
fn assert_job_failed(proxy: &Proxy, status_url: &str, status: u16, key: &str) {
    let (got, body) = wait_end(status_url);
    assert_ne!(
        got, 200,
        "export over {key} completed with a manifest instead of failing: {body}"
    );
    assert_eq!(
        got, status,
        "export over {key}: status answered {got}: {body}"
    );
    let text = outcome_text(&body, &format!("failed job over {key}"));
    assert!(
        text.contains(key),
        "the OperationOutcome of a job failed over {key} does not name it: {text}"
    );
    // A failed job stays failed: no later poll turns it into a manifest.
    let again = client().get(status_url).send().unwrap();
    assert_eq!(
        again.status().as_u16(),
        status,
        "second poll of the failed job"
    );
    let dir = job_dir(proxy, status_url);
    let left = files_under(&dir);
    assert!(
        left.is_empty(),
        "files of the job failed over {key} are still in {}: {left:?}",
        dir.display()
    );
}

/// Resources of an export, all types together.
fn exported_count(files: &[OutputFile]) -> usize {
    files.iter().map(|f| f.lines.len()).sum()
}

fn run_export(proxy: &Proxy, path_and_query: &str) -> (Value, Vec<OutputFile>) {
    let status_url =
        accepted_status_url(&proxy.base, kickoff_get(&proxy.base, path_and_query, None));
    let (manifest, _) = wait_manifest(&status_url, None);
    let files = download_all(&manifest, "output", None);
    (manifest, files)
}

// ---------------------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------------------

// `[export] max_concurrent_jobs` is covered by tests/export.rs (max_concurrent_jobs_is_enforced).

#[test]
fn max_jobs_per_client_refuses_only_that_client() {
    let a = BackendClient::new("lim-client-a");
    let b = BackendClient::new("lim-client-b");
    let export = format!(
        "page_size = 5\nmax_jobs_per_client = 1\nmax_concurrent_jobs = 4\n\n\
         [auth]\nenabled = true\n\n{}\n{}",
        a.client_toml(&["system/*.rs"]),
        b.client_toml(&["system/*.rs"])
    );
    let proxy = start("", SLOW_UPSTREAM, &export);
    let (token_a, token_b) = (
        a.token(&proxy.base, "system/*.rs"),
        b.token(&proxy.base, "system/*.rs"),
    );

    let first = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export", Some(&token_a)),
    );
    assert!(
        poll_once(&first, Some(&token_a)).is_none(),
        "client A's first export finished at once: slow the upstream down further"
    );

    let resp = kickoff_get(&proxy.base, "$export?_type=Patient", Some(&token_a));
    let (status, retry_after, body) = status_header_body(resp, "Retry-After");
    assert_eq!(
        status, 429,
        "client A's second kick-off over max_jobs_per_client = 1: {body}"
    );
    assert!(
        retry_after
            .as_deref()
            .is_some_and(|r| r.parse::<u64>().is_ok()),
        "429 kick-off without Retry-After in seconds: {retry_after:?}"
    );
    outcome_text(&body, "429 kick-off of client A");

    // Another client is not held back by A's job.
    accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", Some(&token_b)),
    );
    assert!(
        poll_once(&first, Some(&token_a)).is_none(),
        "client A's export finished during the test: the 429 proved nothing"
    );
}

#[test]
fn kickoff_body_over_max_kickoff_body_bytes_is_413() {
    let proxy = start("max_kickoff_body_bytes = 2048", "", "");
    let small = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
    ]});
    accepted_status_url(&proxy.base, kickoff_post(&proxy.base, "$export", &small));

    let filter = format!("Patient?name={}", "x".repeat(5000));
    let large = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_typeFilter", "valueString": filter},
    ]});
    let resp = kickoff_post(&proxy.base, "$export", &large);
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(
        status,
        413,
        "POST $export with a {}-byte body over max_kickoff_body_bytes = 2048: {body}",
        large.to_string().len()
    );
    outcome_text(&body, "413 kick-off");
}

/// Sends `head` (request line and headers, ending with the blank line) on a fresh connection and
/// returns the status line of the answer.
fn raw_status_line(addr: &str, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no answer to a {}-byte request head: {e}", head.len()));
    line.trim_end().to_owned()
}

#[test]
fn request_head_over_max_header_bytes_is_431() {
    let proxy = start("max_header_bytes = 8192", "", "");
    let origin = origin(&proxy.base);
    let addr = origin.strip_prefix("http://").unwrap();
    let path = url_path(&proxy.base);
    let head = |header_len: usize| {
        format!(
            "GET {path}/metadata HTTP/1.1\r\nHost: {addr}\r\nAccept: application/fhir+json\r\n\
             X-Filler: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(header_len)
        )
    };
    let small = raw_status_line(addr, &head(2_000));
    assert!(
        small.starts_with("HTTP/1.1 200"),
        "a 2 KB header under max_header_bytes = 8192 answered {small:?}"
    );
    let large = raw_status_line(addr, &head(20_000));
    assert!(
        large.starts_with("HTTP/1.1 431"),
        "a 20 KB header over max_header_bytes = 8192 answered {large:?}"
    );
    let after = client()
        .get(format!("{}/metadata", proxy.base))
        .header("Accept", "application/fhir+json")
        .send()
        .unwrap();
    assert_eq!(after.status(), 200, "a normal request after the 431");
}

#[test]
fn export_over_max_resources_per_job_fails_with_413() {
    let proxy = start("", "", "page_size = 10\nmax_resources_per_job = 30");
    let (_, files) = run_export(&proxy, "$export?_type=Patient");
    assert_eq!(
        exported_count(&files),
        20,
        "an export of 20 Patients under max_resources_per_job = 30"
    );
    // 20 Patients and 35 Conditions: 55 resources.
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient,Condition", None),
    );
    assert_job_failed(&proxy, &status_url, 413, "max_resources_per_job");
}

#[test]
fn export_over_max_disk_bytes_fails_with_507() {
    // 20 Patients take about 15 KB, 680 Observations about 890 KB.
    let proxy = start("", "", "page_size = 50\nmax_disk_bytes = 100000");
    let (_, files) = run_export(&proxy, "$export?_type=Patient");
    assert_eq!(
        exported_count(&files),
        20,
        "an export of 20 Patients (15 KB) under max_disk_bytes = 100000"
    );
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Observation", None),
    );
    assert_job_failed(&proxy, &status_url, 507, "max_disk_bytes");
}

#[test]
fn export_over_max_requests_per_job_fails_with_413() {
    let proxy = start("", "max_requests_per_job = 3", "page_size = 5");
    let (_, files) = run_export(&proxy, "$export?_type=Group");
    assert!(
        exported_count(&files) >= 1,
        "a one-page Group export under max_requests_per_job = 3 exported nothing"
    );
    // 20 Patients at 5 a page: 4 pages at least.
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    assert_job_failed(&proxy, &status_url, 413, "max_requests_per_job");
}

// ---------------------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------------------

fn sigterm(proxy: &Proxy) {
    let status = Command::new("kill")
        .args(["-TERM", &proxy.child_pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed: {status}");
}

#[test]
fn sigterm_during_an_export_stops_cleanly_and_the_job_resumes() {
    let upstream = upstream();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("proxy.log");
    let mut proxy = Proxy::builder(&upstream)
        .server_toml("shutdown_grace_secs = 5")
        .upstream_toml(SLOW_UPSTREAM)
        .export_toml("page_size = 5")
        .log_to(&log)
        .rust_log("fhir_bulk_proxy=info")
        .start();
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient,Condition", None),
    );
    let status_path = url_path(&status_url);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        poll_once(&status_url, None).is_none(),
        "the export finished before SIGTERM: slow the upstream down further"
    );

    sigterm(&proxy);
    let sent = Instant::now();
    let exit = proxy.wait_exit(Duration::from_secs(6));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let exit =
        exit.unwrap_or_else(|| panic!("still running 6 s after SIGTERM (grace 5 s); log:\n{text}"));
    assert!(
        exit.success(),
        "exit status after SIGTERM: {exit}; log:\n{text}"
    );
    assert!(
        sent.elapsed() <= Duration::from_secs(6),
        "exit took {:?}",
        sent.elapsed()
    );
    assert!(
        text.contains("stopped cleanly"),
        "the log does not say \"stopped cleanly\":\n{text}"
    );

    proxy.restart();
    let (manifest, _) = wait_manifest(&format!("{}{status_path}", origin(&proxy.base)), None);
    let files = download_all(&manifest, "output", None);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient", "Condition"])),
    );
}

/// A mock upstream: `GET .../slow...` is answered after `delay`, anything else at once; the first
/// request for the slow path is reported on `arrived`.
fn slow_upstream(delay: Duration) -> (Mock, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let up = Mock::routes()
        .any(move |request| {
            if request.target().contains("slow") {
                let _ = tx.send(());
                std::thread::sleep(delay);
            }
            let body = json!({"resourceType": "Patient", "id": "slow", "active": true}).to_string();
            Reply::fhir(body).then(After::SayClose)
        })
        .start();
    (up, rx)
}

#[test]
fn sigterm_lets_a_slow_pass_through_request_finish_and_refuses_new_connections() {
    let (upstream, arrived) = slow_upstream(Duration::from_secs(3));
    let mut proxy = Proxy::builder(&upstream.base())
        .server_toml("shutdown_grace_secs = 10")
        .start();
    let addr: SocketAddr = origin(&proxy.base)
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let slow = {
        let url = format!("{}/Patient/slow", proxy.base);
        let done = done.clone();
        std::thread::spawn(move || {
            let resp = client()
                .get(&url)
                .header("Accept", "application/fhir+json")
                .send();
            done.store(true, Ordering::SeqCst);
            resp.map(|r| {
                let status = r.status().as_u16();
                (status, r.text().unwrap_or_default())
            })
        })
    };
    arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow request never reached the upstream");
    sigterm(&proxy);

    // The listener closes at once; the slow request is still in flight meanwhile.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            // Refused, or reset when the connection raced the listener's close: not accepted either way.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break
            }
            Err(e) => panic!("connecting after SIGTERM: unexpected error {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "new connections still accepted 2 s after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(
        !done.load(Ordering::SeqCst),
        "the slow request ended before new connections were refused: nothing was shown"
    );

    let (status, body) = slow
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed after SIGTERM: {e}"));
    assert_eq!(status, 200, "in-flight request after SIGTERM: {body}");
    let resource: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resource["id"], "slow", "in-flight response body: {body}");
    let exit = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("still running after the grace period");
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
}

// ---------------------------------------------------------------------------------------------------------
// Deleted resources
// ---------------------------------------------------------------------------------------------------------

fn rw_send(request: reqwest::blocking::RequestBuilder, want: &[u16], what: &str) -> Option<Value> {
    let resp = request
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json")
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().unwrap();
    assert!(want.contains(&status), "{what} answered {status}: {body}");
    serde_json::from_str(&body).ok()
}

fn put_basic(upstream: &str, id: &str, text: &str) -> Value {
    let body = json!({"resourceType": "Basic", "id": id, "code": {"text": text}});
    rw_send(
        client()
            .put(format!("{upstream}/Basic/{id}"))
            .body(body.to_string()),
        &[200, 201],
        &format!("PUT Basic/{id}"),
    )
    .unwrap_or_else(|| panic!("PUT Basic/{id} returned no resource"))
}

#[test]
fn since_export_reports_deleted_resources_as_transaction_bundles() {
    let upstream = upstream_rw();
    let tag = unique("lim-del");
    let [gone, changed, kept] = ["a", "b", "c"].map(|n| format!("{tag}-{n}"));
    let mut last = Value::Null;
    for id in [&gone, &changed, &kept] {
        last = put_basic(&upstream, id, "before");
    }
    let since = last["meta"]["lastUpdated"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    rw_send(
        client().delete(format!("{upstream}/Basic/{gone}")),
        &[200, 202, 204],
        &format!("DELETE Basic/{gone}"),
    );
    let updated = put_basic(&upstream, &changed, "after");

    let proxy = Proxy::start(&upstream, "");
    let (manifest, files) = run_export(
        &proxy,
        &format!("$export?_type=Basic&_since={}", enc(&since)),
    );

    let deleted = manifest["deleted"]
        .as_array()
        .unwrap_or_else(|| panic!("_since manifest without a deleted array: {manifest}"));
    let mut mine = Vec::new();
    for entry in deleted {
        assert_eq!(entry["type"], "Bundle", "deleted entry type: {entry}");
        let url = entry["url"].as_str().unwrap();
        let lines = download_lines(url, None);
        if let Some(count) = entry.get("count") {
            assert_eq!(count.as_u64(), Some(lines.len() as u64), "count of {url}");
        }
        for line in lines {
            let bundle: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{url}: a line is not JSON ({e}): {line}"));
            let target = bundle["entry"][0]["request"]["url"]
                .as_str()
                .unwrap_or_else(|| panic!("deleted line without entry.request.url: {line}"))
                .to_owned();
            assert_eq!(
                bundle,
                json!({"resourceType": "Bundle", "type": "transaction",
                       "entry": [{"request": {"method": "DELETE", "url": target}}]}),
                "a deleted line is not a one-entry DELETE transaction Bundle"
            );
            if target.starts_with(&format!("Basic/{tag}-")) {
                mine.push(target);
            }
        }
    }
    assert_eq!(
        mine,
        vec![format!("Basic/{gone}")],
        "deleted lines of this test's Basics (manifest {manifest})"
    );

    let exported: BTreeSet<Key> = files
        .iter()
        .filter(|f| f.ty == "Basic")
        .flat_map(|f| f.lines.iter())
        .map(|l| key_of(&serde_json::from_str(l).unwrap()))
        .filter(|(id, _)| id.starts_with(&format!("{tag}-")))
        .collect();
    assert_eq!(
        exported,
        BTreeSet::from([key_of(&updated)]),
        "output Basics of this test: only the one updated after _since, in its new version"
    );
}

#[test]
fn patient_export_with_since_says_deletions_are_not_reported() {
    let proxy = Proxy::start(&upstream(), "");
    let (manifest, _) = run_export(
        &proxy,
        &format!(
            "Patient/$export?_type=Patient&_since={}",
            enc("2000-01-01T00:00:00Z")
        ),
    );
    let errors = download_all(&manifest, "error", None);
    let texts: Vec<String> = errors
        .iter()
        .flat_map(|f| f.lines.iter())
        .map(|l| outcome_text(l, "error file line"))
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("deleted resources are not reported")),
        "no error-file OperationOutcome says deleted resources are not reported: {texts:?} (manifest {manifest})"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------------------

/// Files the test puts in the data directory, which the proxy must never touch.
fn plant_foreign_files(proxy: &Proxy) -> Vec<PathBuf> {
    let keep = proxy.data_dir.join("keep-me.txt");
    let other = proxy.data_dir.join("files").join("not-a-job");
    std::fs::create_dir_all(&other).unwrap();
    let x = other.join("x");
    std::fs::write(&keep, "keep").unwrap();
    std::fs::write(&x, "x").unwrap();
    vec![keep, x]
}

fn assert_untouched(paths: &[PathBuf], when: &str) {
    for path in paths {
        assert!(path.is_file(), "{} was removed {when}", path.display());
    }
}

fn get_status(url: &str) -> u16 {
    client().get(url).send().unwrap().status().as_u16()
}

/// Waits for a manifest polling every 50 ms (the job may expire soon after it completes).
fn wait_manifest_fast(status_url: &str) -> Value {
    let deadline = Instant::now() + EXPORT_DEADLINE;
    loop {
        let resp = client().get(status_url).send().unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().unwrap();
        match status {
            202 => {}
            200 => return serde_json::from_str(&body).unwrap(),
            _ => panic!("status {status_url} answered {status}: {body}"),
        }
        assert!(Instant::now() < deadline, "export not complete in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn expired_jobs_are_reaped_and_foreign_files_are_kept() {
    // Expiry is stamped in whole seconds, so `expire_after_secs = 1` leaves between 0 and 1 s to see
    // the manifest; 2 s keeps at least 1 s and still expires within ~3 s with a 1 s reaper.
    let mut proxy = start("", "", "expire_after_secs = 2\nreaper_interval_secs = 1");
    let foreign = plant_foreign_files(&proxy);

    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    let manifest = wait_manifest_fast(&status_url);
    let finished = Instant::now();
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest without output: {manifest}"))
        .to_owned();
    let dir = job_dir(&proxy, &status_url);
    loop {
        let (status, file) = (get_status(&status_url), get_status(&file_url));
        if status == 404 && file == 404 && !dir.exists() {
            break;
        }
        assert!(
            finished.elapsed() < Duration::from_secs(5),
            "5 s after completion (expire_after_secs = 2, reaper_interval_secs = 1): status {status}, \
             file {file}, directory exists: {}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give the reaper a couple more rounds to misbehave.
    std::thread::sleep(Duration::from_millis(2200));
    assert_untouched(&foreign, "by the reaper");

    // Stopped before expiry, started after it: the job goes at start-up.
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    wait_manifest_fast(&status_url);
    proxy.kill9();
    let status_path = url_path(&status_url);
    let dir = job_dir(&proxy, &status_url);
    assert!(
        !files_under(&dir).is_empty(),
        "the completed job had no files in {} when the proxy stopped",
        dir.display()
    );
    std::thread::sleep(Duration::from_secs(3));
    proxy.restart();
    let status_url = format!("{}{status_path}", origin(&proxy.base));
    assert_eq!(
        get_status(&status_url),
        404,
        "status of a job that expired while the proxy was down"
    );
    assert!(
        !dir.exists(),
        "{} still exists after a start-up past the job's expiry",
        dir.display()
    );
    assert_untouched(&foreign, "by a restart");
}
