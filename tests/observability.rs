//! Observability end to end: the admin listener (liveness, readiness, Prometheus metrics), metrics that
//! follow a real export and real pass-through traffic, the `jobs` command line, and JSON logs.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mock::{After, Mock, Reply};
use common::*;
use serde_json::Value;

const EXPORT_TYPES: &[&str] = &["Patient", "Observation", "Condition", "DiagnosticReport"];

fn get(url: &str) -> (u16, String) {
    let resp = client()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().unwrap())
}

fn metric(text: &str, series: &str) -> f64 {
    prom_value(text, series).unwrap_or(0.0)
}

/// The sum of every sample of `name` (all label values).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn admin_endpoints_answer_and_are_never_forwarded() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream).admin().start();
    let admin = proxy.admin_url();

    let (status, body) = get(&format!("{admin}/healthz"));
    assert_eq!(status, 200, "healthz: {body}");
    let (status, body) = get(&format!("{admin}/readyz"));
    assert_eq!(status, 200, "readyz with the upstream up: {body}");

    let before = scrape(&admin);
    for name in [
        "fbp_exported_resources_total",
        "fbp_exported_bytes_total",
        "fbp_jobs",
        "fbp_upstream_retries_total",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} ")),
            "metrics lack {name}:\n{before}"
        );
    }
    assert_eq!(
        prom_value(&before, "fbp_jobs{state=\"running\"}"),
        Some(0.0),
        "fbp_jobs of a fresh proxy:\n{before}"
    );

    // FHIR paths on the admin listener are not passed through to the upstream.
    for path in [
        "metadata",
        "fhir/metadata",
        "fhir/Patient",
        "Patient",
        "jobs/x/y",
    ] {
        let (status, body) = get(&format!("{admin}/{path}"));
        assert_eq!(status, 404, "admin GET /{path} answered {status}: {body}");
        assert!(
            !body.contains("CapabilityStatement") && !body.contains("\"Bundle\""),
            "admin GET /{path} looks forwarded upstream: {body}"
        );
    }
    let resp = client()
        .post(format!("{admin}/metrics"))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 405, "POST /metrics on the admin listener");
    let after = scrape(&admin);
    assert_eq!(
        metric_sum(&after, "fbp_passthrough_requests_total"),
        metric_sum(&before, "fbp_passthrough_requests_total"),
        "admin requests were counted as pass-through:\n{after}"
    );

    // The main listener does not serve the admin endpoints, under its base or at its root.
    let root = origin(&proxy.base);
    for url in [
        format!("{root}/metrics"),
        format!("{root}/healthz"),
        format!("{root}/readyz"),
        format!("{root}/jobs"),
        format!("{}/metrics", proxy.base),
        format!("{}/healthz", proxy.base),
        format!("{}/jobs", proxy.base),
    ] {
        let (status, body) = get(&url);
        assert!(
            !body.contains("fbp_") && body.trim() != "ok" && body.trim() != "ready",
            "main listener serves an admin endpoint at {url} ({status}): {body}"
        );
        assert_ne!(status, 200, "main listener answers 200 at {url}: {body}");
    }
}

/// Serves on `listener`, answering every request with 200 and a tiny CapabilityStatement.
fn fake_upstream(listener: TcpListener) -> Mock {
    let body = r#"{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["json"]}"#;
    Mock::routes()
        .any(move |_| Reply::fhir(body))
        .start_on(listener)
}

#[test]
fn readyz_follows_the_upstream() {
    let port = closed_port();
    let dead = format!("http://127.0.0.1:{port}/fhir");
    let proxy = Proxy::builder(&dead).admin().start();
    let admin = proxy.admin_url();

    let (status, body) = get(&format!("{admin}/healthz"));
    assert_eq!(
        status, 200,
        "healthz must not depend on the upstream: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(&format!("{admin}/readyz"));
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz still {status} ({body}) with the upstream at a closed port"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // The upstream comes up on that port: readiness recovers once the cached answer expires.
    let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) else {
        eprintln!("port {port} was taken meanwhile; skipping the recovery half");
        return;
    };
    let _upstream = fake_upstream(listener);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(&format!("{admin}/readyz"));
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "readyz answered {status}: {body}");
        assert!(
            Instant::now() < deadline,
            "readyz still 503 15 s after the upstream came up"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One scrape taken while the export ran.
struct Sample {
    active: f64,
    resources: f64,
}

#[test]
fn metrics_follow_an_export() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream)
        .upstream_toml("requests_per_second = 5")
        .export_toml("page_size = 20")
        .admin()
        .start();
    let admin = proxy.admin_url();
    let start = scrape(&admin);
    assert_eq!(metric(&start, "fbp_exported_resources_total"), 0.0);
    assert_eq!(metric(&start, "fbp_exported_bytes_total"), 0.0);

    let query = format!("$export?_type={}", EXPORT_TYPES.join(","));
    let status_url = accepted_status_url(&proxy.base, kickoff_get(&proxy.base, &query, None));
    let mut samples = Vec::new();
    let deadline = Instant::now() + EXPORT_DEADLINE;
    let manifest = loop {
        let text = scrape(&admin);
        samples.push(Sample {
            active: metric(&text, "fbp_jobs{state=\"running\"}")
                + metric(&text, "fbp_jobs{state=\"accepted\"}"),
            resources: metric(&text, "fbp_exported_resources_total"),
        });
        if let Some((manifest, _)) = poll_once(&status_url, None) {
            break manifest;
        }
        assert!(Instant::now() < deadline, "export not complete in time");
        std::thread::sleep(Duration::from_millis(250));
    };

    // Raw bytes of every file, so that the byte counter can be compared exactly.
    let mut bytes = 0u64;
    let mut counted = 0u64;
    let mut files = Vec::new();
    for out in manifest["output"].as_array().unwrap() {
        let url = out["url"].as_str().unwrap();
        let (status, body) = get_bytes(url);
        assert_eq!(status, 200, "GET {url}");
        bytes += body.len() as u64;
        counted += out["count"].as_u64().unwrap();
        let text = String::from_utf8(body).unwrap();
        files.push(OutputFile {
            ty: out["type"].as_str().unwrap().to_owned(),
            url: url.to_owned(),
            lines: text.lines().map(str::to_owned).collect(),
        });
    }
    let expected = direct_system(&upstream, Some(EXPORT_TYPES));
    assert_same(&resources_by_type(&files), &expected);
    assert_eq!(counted as usize, total(&expected));

    let end = scrape(&admin);
    assert_eq!(
        metric(&end, "fbp_exported_resources_total"),
        counted as f64,
        "fbp_exported_resources_total differs from the manifest counts:\n{end}"
    );
    assert_eq!(
        metric(&end, "fbp_exported_bytes_total"),
        bytes as f64,
        "fbp_exported_bytes_total differs from the downloaded bytes:\n{end}"
    );
    let pages: usize = EXPORT_TYPES
        .iter()
        .map(|ty| {
            expected
                .get(*ty)
                .map_or(0, BTreeMap::len)
                .div_ceil(20)
                .max(1)
        })
        .sum();
    let ok_requests = metric(&end, "fbp_upstream_requests_total{status=\"200\"}");
    assert!(
        ok_requests >= pages as f64,
        "fbp_upstream_requests_total{{status=\"200\"}} = {ok_requests}, fewer than the {pages} pages:\n{end}"
    );
    assert_eq!(metric(&end, "fbp_jobs{state=\"completed\"}"), 1.0, "{end}");
    assert_eq!(metric(&end, "fbp_jobs{state=\"running\"}"), 0.0, "{end}");
    assert_eq!(metric(&end, "fbp_jobs{state=\"accepted\"}"), 0.0, "{end}");
    assert_eq!(metric(&end, "fbp_jobs{state=\"failed\"}"), 0.0, "{end}");
    assert_eq!(
        metric(
            &end,
            "fbp_export_duration_seconds_count{state=\"completed\"}"
        ),
        1.0,
        "{end}"
    );

    let during: Vec<_> = samples
        .iter()
        .filter(|s| s.active == 1.0 && s.resources > 0.0 && s.resources < counted as f64)
        .collect();
    assert!(
        !during.is_empty(),
        "no scrape during the export showed one active job and a partial resource count; samples \
         (active, resources): {:?}",
        samples
            .iter()
            .map(|s| (s.active, s.resources))
            .collect::<Vec<_>>()
    );
    let mut last = 0.0;
    for s in &samples {
        assert!(s.resources >= last, "resource counter went down");
        last = s.resources;
    }
}

#[test]
fn passthrough_counter_counts_each_request() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream).admin().start();
    let admin = proxy.admin_url();
    let before = scrape(&admin);
    const N: usize = 7;
    for i in 0..N {
        let url = format!("{}/Patient?_count={}", proxy.base, i + 1);
        let (status, body) = get(&url);
        assert_eq!(status, 200, "pass-through GET {url}: {body}");
    }
    let (status, _) = get(&format!("{}/Patient/no-such-patient-xyz", proxy.base));
    assert_eq!(status, 404);
    let after = scrape(&admin);
    let ok = |t: &str| metric(t, "fbp_passthrough_requests_total{status=\"200\"}");
    let missing = |t: &str| metric(t, "fbp_passthrough_requests_total{status=\"404\"}");
    assert_eq!(ok(&after) - ok(&before), N as f64, "{after}");
    assert_eq!(missing(&after) - missing(&before), 1.0, "{after}");
    assert_eq!(
        metric(
            &after,
            "fbp_passthrough_duration_seconds_count{status=\"200\"}"
        ) - metric(
            &before,
            "fbp_passthrough_duration_seconds_count{status=\"200\"}"
        ),
        N as f64,
        "{after}"
    );
    // Pass-through requests are not the proxy's own upstream requests.
    assert_eq!(
        metric_sum(&after, "fbp_upstream_requests_total"),
        metric_sum(&before, "fbp_upstream_requests_total"),
        "{after}"
    );
}

/// Runs `fhir-bulk-proxy jobs --admin ADMIN args...`; returns success, stdout and stderr.
fn jobs_cli(admin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Proxy::command(&["jobs", "--admin", admin])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn jobs_cli_lists_shows_and_cancels() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream)
        .upstream_toml("requests_per_second = 2")
        .export_toml("page_size = 5")
        .admin()
        .start();
    let admin = proxy.admin_url();
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Observation,Patient", None),
    );
    let id = job_id_of(&status_url);

    let (ok, stdout, stderr) = jobs_cli(&admin, &["list"]);
    assert!(ok, "jobs list failed: {stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("jobs list lacks {id}:\n{stdout}"));
    let state = line.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        state == "running" || state == "accepted",
        "state of a fresh slow job: {line}"
    );

    // `show` prints JSON with the job's slices once it is planned.
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let (ok, stdout, stderr) = jobs_cli(&admin, &["show", &id]);
        assert!(ok, "jobs show failed: {stderr}");
        let shown: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("jobs show is not JSON ({e}):\n{stdout}"));
        if shown["slices"].as_array().is_some_and(|s| !s.is_empty()) {
            break shown;
        }
        assert!(shown["slices"].is_array(), "show without slices: {shown}");
        assert!(Instant::now() < deadline, "no slices after 20 s: {shown}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(shown["id"], id.as_str(), "{shown}");
    assert_eq!(shown["state"], "running", "{shown}");
    let types: Vec<&str> = shown["slices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["type"].as_str())
        .collect();
    assert!(
        types.contains(&"Observation") && types.contains(&"Patient"),
        "slice types {types:?}: {shown}"
    );

    // Through the environment variable instead of the flag.
    let out = Proxy::command(&["jobs", "list"])
        .env("FBP_ADMIN_URL", &admin)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));

    let (ok, stdout, stderr) = jobs_cli(&admin, &["cancel", &id]);
    assert!(ok, "jobs cancel failed: {stderr}");
    let cancelled: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("jobs cancel is not JSON ({e}):\n{stdout}"));
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");

    let (status, body) = get(&status_url);
    assert_eq!(status, 404, "status after an operator cancel: {body}");
    let (ok, stdout, _) = jobs_cli(&admin, &["list"]);
    assert!(ok);
    assert!(
        !stdout.contains(&id),
        "cancelled job still listed:\n{stdout}"
    );
    let (ok, _, stderr) = jobs_cli(&admin, &["show", &id]);
    assert!(!ok, "show of a cancelled job succeeded");
    assert!(stderr.contains("404"), "show of a cancelled job: {stderr}");
    assert!(
        !proxy.data_dir.join("files").join(&id).exists(),
        "files of a cancelled job remain"
    );
    let (ok, _, stderr) = jobs_cli(&admin, &["cancel", "0123456789abcdef0123456789abcdef"]);
    assert!(!ok, "cancel of an unknown job succeeded");
    assert!(stderr.contains("404"), "cancel of an unknown job: {stderr}");

    // An admin listener that is not there: a clear failure, not a hang.
    let (ok, _, stderr) = jobs_cli(&format!("http://127.0.0.1:{}", closed_port()), &["list"]);
    assert!(!ok && !stderr.is_empty(), "list against nothing: {stderr}");
}

fn read_json_lines(path: &std::path::Path) -> Vec<Value> {
    let mut text = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(!text.trim().is_empty(), "nothing logged to stderr");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "a log line is not a JSON object: {l}");
            v
        })
        .collect()
}

fn job_of(line: &Value) -> Option<&str> {
    line["span"]["job"]
        .as_str()
        .or_else(|| line["fields"]["job"].as_str())
}

#[test]
fn json_logs_carry_the_job_id() {
    let upstream = upstream();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut proxy = Proxy::builder(&upstream)
        .global_args(&["--log-format", "json"])
        .log_to(&log)
        .rust_log("info,fhir_bulk_proxy=debug")
        .start();
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient,Condition", None),
    );
    let id = job_id_of(&status_url);
    let (manifest, _) = wait_manifest(&status_url, None);
    download_all(&manifest, "output", None);
    let (status, _) = get(&format!("{}/Patient?_count=1", proxy.base));
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(300));
    proxy.kill9();

    let lines = read_json_lines(&log);
    let mine: Vec<&Value> = lines
        .iter()
        .filter(|l| job_of(l) == Some(id.as_str()))
        .collect();
    assert!(
        mine.len() >= 3,
        "fewer than 3 log lines carry job {id}:\n{}",
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let finished = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job finished")
        .unwrap_or_else(|| panic!("no `job finished` line"));
    assert_eq!(job_of(finished), Some(id.as_str()), "{finished}");
    assert!(
        mine.iter().any(|l| l["span"]["job"] == id.as_str()),
        "no line logged inside the job's span"
    );
    for line in &lines {
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "log line without level or timestamp: {line}"
        );
    }
    // No other job id leaks into this export's span.
    for line in mine.iter().filter(|l| l["span"]["job"].is_string()) {
        if let Some(field) = line["fields"]["job"].as_str() {
            assert_eq!(field, id.as_str(), "{line}");
        }
    }
}

#[test]
fn json_logs_by_environment_variable() {
    let upstream = upstream();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut proxy = Proxy::builder(&upstream)
        .admin()
        .envs(&[("FBP_LOG_FORMAT", "json")])
        .log_to(&log)
        .rust_log("debug")
        .start();
    let admin = proxy.admin_url();
    let (status, _) = get(&format!("{}/metadata", proxy.base));
    assert_eq!(status, 200);
    scrape(&admin);
    std::thread::sleep(Duration::from_millis(300));
    proxy.kill9();
    let lines = read_json_lines(&log);
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "listening"),
        "no `listening` line in JSON"
    );

    // The variable is really read: `pretty` gives lines that are not JSON.
    let pretty_log = dir.path().join("pretty.log");
    let mut proxy = Proxy::builder(&upstream)
        .envs(&[("FBP_LOG_FORMAT", "pretty")])
        .log_to(&pretty_log)
        .start();
    std::thread::sleep(Duration::from_millis(300));
    proxy.kill9();
    let text = std::fs::read_to_string(&pretty_log).unwrap();
    let first = text.lines().next().expect("nothing logged with pretty");
    assert!(
        serde_json::from_str::<Value>(first).is_err(),
        "FBP_LOG_FORMAT=pretty still logs JSON: {first}"
    );
    assert!(first.contains("INFO") || first.contains("DEBUG"), "{first}");
}

/// Collects the bodies POSTed to an OTLP/HTTP traces endpoint.
fn otlp_sink() -> Mock {
    Mock::routes()
        .record_bodies()
        .any(|_| Reply::empty(200).then(After::SayClose))
        .start()
}

#[test]
fn traces_go_to_the_configured_otlp_endpoint() {
    let upstream = upstream();
    let sink = otlp_sink();
    let tables = format!(
        "[telemetry]\notlp_endpoint = \"{}/v1/traces\"\n",
        sink.origin()
    );
    let mut proxy = Proxy::builder(&upstream)
        .tables(&tables)
        .rust_log("info")
        .start();
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    let id = job_id_of(&status_url);
    wait_manifest(&status_url, None);
    // SIGTERM: a clean exit flushes the spans still batched.
    Command::new("kill")
        .args(["-TERM", &proxy.child_pid().to_string()])
        .status()
        .unwrap();
    assert!(proxy
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    // `"{path} {content type}"` and the body of each request the sink received.
    let bodies: Vec<(String, Vec<u8>)> = sink
        .requests()
        .into_iter()
        .map(|r| {
            let what = format!(
                "{} {}",
                r.target(),
                r.header("content-type").unwrap_or_default()
            );
            (what, r.body)
        })
        .collect();
    assert!(!bodies.is_empty(), "no OTLP request arrived");
    assert!(
        bodies
            .iter()
            .all(|(what, _)| what == "/v1/traces application/x-protobuf"),
        "unexpected OTLP requests: {:?}",
        bodies.iter().map(|(w, _)| w).collect::<Vec<_>>()
    );
    let contains = |needle: &[u8]| {
        bodies
            .iter()
            .any(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
    };
    assert!(contains(id.as_bytes()), "no exported span carries job {id}");
    assert!(
        contains(b"upstream_request"),
        "no upstream request span was exported"
    );
    assert!(contains(b"fhir-bulk-proxy"), "spans lack the service name");
}
