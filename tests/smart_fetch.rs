//! smart-fetch (PyPI `smart-fetch` 1.0.3, the SMART team's bulk exporter that Cumulus ETL builds on, installed
//! by tests/run) exporting through the real binary with SMART Backend Services on: what it writes must hold,
//! type by type, exactly the `(id, versionId)`s and bytes that direct searches of the upstream return.
//!
//! smart-fetch is run as users run it: it gets its ES384 key as a JWKS file, finds the token endpoint in
//! the proxy's `.well-known/smart-configuration`, drops the types the proxy's CapabilityStatement lacks,
//! polls, downloads (gzipping each file itself) and DELETEs the job. Each test also checks the kick-off
//! smart-fetch logged asked for the types and filters the expectation is computed for, so that a type
//! smart-fetch skipped is reported as such rather than as missing resources.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::auth::{ec_jwk, ec_key};
use common::*;
use serde_json::{json, Value};

const CLIENT_ID: &str = "smart-fetch";
const KID: &str = "smart-fetch-1";
const GROUP: &str = "bulk-test-group";

/// smart-fetch's Observation filter when given none for it (`smart_fetch.filtering`, servers other
/// than Epic). Every Observation of the test data is `laboratory` or `vital-signs`, so it keeps them
/// all: `explicit_filter` is the test that a filter is applied.
const DEFAULT_OBSERVATION_FILTER: &str =
    "category=social-history,vital-signs,imaging,laboratory,survey,exam,procedure,therapy,activity";

/// A filter that keeps some Observations of the test data and drops others; its comma is one smart-fetch
/// quotes (`%2C`) to tell it from the commas between filters.
const EXPLICIT_OBSERVATION_FILTER: &str = "category=vital-signs,survey";

/// smart-fetch retries 5xx and 429 for up to 15 minutes and waits out `Retry-After` (5 minutes at most
/// each time); a run still going after this is stuck and is killed, so that the test reports why.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// The smart-fetch executable tests/run installed.
fn smart_fetch_program() -> PathBuf {
    let program = std::env::var_os("FBP_TEST_SMART_FETCH").map(PathBuf::from).expect(
        "FBP_TEST_SMART_FETCH is not set: run this suite through tests/run, which installs smart-fetch",
    );
    assert!(
        program.is_file(),
        "FBP_TEST_SMART_FETCH={} does not exist: run this suite through tests/run, which installs smart-fetch",
        program.display()
    );
    program
}

/// A proxy with auth on and smart-fetch's client registered (`system/*.rs`, its public ES384 key inline),
/// and the client's private key as the JWKS file smart-fetch reads.
struct Setup {
    proxy: Proxy,
    key_file: PathBuf,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let program = smart_fetch_program();
    let version = Command::new(&program).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "smart-fetch 1.0.3",
        "tests/run installs smart-fetch 1.0.3; {} is another",
        program.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let key = ec_key(dir.path(), "smart-fetch");
    // smart-fetch signs with the first key that has `kid`, `alg` and `key_ops: ["sign"]`.
    let private = json!({"keys": [{"kty": "EC", "crv": "P-384", "kid": KID, "alg": "ES384",
        "key_ops": ["sign"], "x": key.x, "y": key.y, "d": key.d}]});
    let key_file = dir.path().join("smart-fetch.jwks");
    std::fs::write(&key_file, private.to_string()).unwrap();
    let auth = json!({"auth": {"enabled": true, "clients": [{"client_id": CLIENT_ID,
        "scopes": ["system/*.rs"], "jwks": {"keys": [ec_jwk(&key, KID)]}}]}});
    // The `[auth]` tables follow the `[export]` table the harness writes.
    let auth = format!("\n{}", toml::to_string(&auth).unwrap());
    let proxy = Proxy::builder(&upstream()).export_toml(&auth).start();
    Setup {
        proxy,
        key_file,
        dir,
    }
}

/// What one `smart-fetch bulk` run left: the resources of its output files per type, and the request
/// parameters of its kick-off (from its `log.ndjson`).
struct Run {
    resources: BTreeMap<String, Vec<Value>>,
    kickoff_params: Value,
}

/// The events of smart-fetch's bulk log (`OUT/log.ndjson`), empty when it wrote none.
fn log_events(out: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(out.join("log.ndjson")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log.ndjson line ({e}): {l}")))
        .collect()
}

/// The failures smart-fetch logged: a kick-off answered with an error, status and download errors.
fn logged_failures(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            let id = e["eventId"].as_str().unwrap_or_default();
            id.ends_with("_error") || (id == "kickoff" && !e["eventDetail"]["errorCode"].is_null())
        })
        .map(|e| {
            let d = &e["eventDetail"];
            format!(
                "{} {}: {} {}",
                e["eventId"].as_str().unwrap_or_default(),
                d["exportUrl"]
                    .as_str()
                    .or(d["fileUrl"].as_str())
                    .unwrap_or_default(),
                d["errorCode"]
                    .as_u64()
                    .or(d["code"].as_u64())
                    .map_or("-".into(), |c| c.to_string()),
                if d["errorBody"].is_null() {
                    &d["body"]
                } else {
                    &d["errorBody"]
                },
            )
        })
        .collect()
}

/// The resources of the `Type.NNN.ndjson.gz` files directly in `folder`, per type; each line must be a
/// resource of its file's type.
fn read_output(folder: &Path) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".ndjson.gz") else {
            continue;
        };
        let ty = stem.split('.').next().unwrap().to_owned();
        let file = std::fs::File::open(&path).unwrap();
        for line in BufReader::new(flate2::read::MultiGzDecoder::new(file)).lines() {
            let line = line.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let resource: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: a line is not JSON ({e}): {line}", path.display()));
            assert_eq!(
                resource["resourceType"],
                ty.as_str(),
                "{} holds another type",
                path.display()
            );
            out.entry(ty.clone()).or_default().push(resource);
        }
    }
    out
}

/// Runs `smart-fetch bulk --fhir-url PROXY --smart-client-id .. --smart-key .. ARGS OUT`; fails the test,
/// with the kick-off answer and the errors smart-fetch logged, unless it exits with 0 having been told of
/// no errors and no deletions.
fn run_smart_fetch(setup: &Setup, name: &str, args: &[&str]) -> Run {
    let out = setup.dir.path().join(name);
    let stdout = setup.dir.path().join(format!("{name}.stdout"));
    let stderr = setup.dir.path().join(format!("{name}.stderr"));
    let mut command = Command::new(smart_fetch_program());
    command
        .args(["bulk", "--fhir-url", &setup.proxy.base])
        .args(["--smart-client-id", CLIENT_ID, "--smart-key"])
        .arg(&setup.key_file)
        .args(args)
        .arg(&out)
        // rich would wrap its messages at 80 columns and colour them.
        .env("COLUMNS", "400")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let what = format!("smart-fetch bulk {}", args.join(" "));
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = wait_or_kill(&mut child, RUN_DEADLINE);
    let events = log_events(&out);
    let report = || {
        format!(
            "\nsmart-fetch logged:\n  {}\nstderr:\n{}\nstdout (tail):\n{}",
            logged_failures(&events).join("\n  "),
            std::fs::read_to_string(&stderr).unwrap_or_default().trim(),
            tail(&std::fs::read_to_string(&stdout).unwrap_or_default(), 15),
        )
    };
    match status {
        None => panic!(
            "{what}: still running after {RUN_DEADLINE:?}, killed{}",
            report()
        ),
        Some(status) if !status.success() => panic!("{what}: exited with {status}{}", report()),
        Some(_) => {}
    }
    for sub in ["error", "deleted"] {
        let found = read_output(&out.join(sub));
        assert!(
            found.is_empty(),
            "{what}: the manifest listed {sub} files: {}",
            serde_json::to_string(&found).unwrap()
        );
    }
    let kickoff = events
        .iter()
        .find(|e| e["eventId"] == "kickoff")
        .unwrap_or_else(|| panic!("{what}: no kickoff event in log.ndjson{}", report()));
    Run {
        resources: read_output(&out),
        kickoff_params: kickoff["eventDetail"]["requestParameters"].clone(),
    }
}

/// The last `lines` lines of `text`, without rich's horizontal rules.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !l.chars().all(|c| c == '─'))
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Checks smart-fetch asked for exactly `types` and, as `_typeFilter`, exactly `Observation?filter`.
fn assert_requested(run: &Run, types: &[&str], observation_filter: &str) {
    let params = &run.kickoff_params;
    let asked: BTreeSet<&str> = params["_type"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .collect();
    let wanted: BTreeSet<&str> = types.iter().copied().collect();
    assert_eq!(
        asked, wanted,
        "smart-fetch did not ask for the types the test expects (it drops those missing from the \
         proxy's CapabilityStatement): {params}"
    );
    // smart-fetch quotes the commas inside a filter once more than the URL does.
    assert_eq!(
        params["_typeFilter"]
            .as_str()
            .map(|f| f.replace("%2C", ",")),
        Some(format!("Observation?{observation_filter}")),
        "smart-fetch's _typeFilter is not the one the test expects: {params}"
    );
}

#[test]
fn system_export_with_an_explicit_filter() {
    let setup = setup();
    let upstream = upstream();
    let types = ["Patient", "Condition", "MedicationRequest", "Observation"];
    let filter = format!("Observation?{EXPLICIT_OBSERVATION_FILTER}");
    let run = run_smart_fetch(
        &setup,
        "system",
        &["--type", &types.join(","), "--type-filter", &filter],
    );
    assert_requested(&run, &types, EXPLICIT_OBSERVATION_FILTER);
    let mut expected = direct_system(&upstream, Some(&types[..3]));
    add_search(
        &mut expected,
        &upstream,
        "Observation",
        EXPLICIT_OBSERVATION_FILTER,
    );
    let kept = expected.get("Observation").map_or(0, BTreeMap::len);
    let all = total(&direct_system(&upstream, Some(&["Observation"])));
    assert!(
        kept > 0 && kept < all,
        "test data: {EXPLICIT_OBSERVATION_FILTER} keeps {kept} of {all} Observations, so it shows nothing"
    );
    assert_same(&run.resources, &expected);
}

#[test]
fn group_export_with_the_default_types_and_filters() {
    let setup = setup();
    let upstream = upstream();
    let run = run_smart_fetch(&setup, "group", &["--group", GROUP]);
    assert_requested(&run, &SMART_FETCH_TYPES, DEFAULT_OBSERVATION_FILTER);
    let members = group_member_ids(&upstream, GROUP);
    let mut expected = Expected::new();
    add_search(
        &mut expected,
        &upstream,
        "Patient",
        &format!("_id={}", enc(&members.join(","))),
    );
    for ty in SMART_FETCH_TYPES.iter().filter(|ty| **ty != "Patient") {
        let filter = if *ty == "Observation" {
            DEFAULT_OBSERVATION_FILTER
        } else {
            ""
        };
        expected.extend(direct_patient_linked(&upstream, &members, ty, filter));
    }
    assert_eq!(
        expected.get("Patient").map(BTreeMap::len),
        Some(members.len()),
        "test data: Group/{GROUP} members are not all Patients of the upstream"
    );
    assert_same(&run.resources, &expected);
}

#[test]
fn since_export_holds_only_later_changes() {
    let setup = setup();
    let upstream = upstream();
    let types = ["Patient", "Condition", "MedicationRequest", "Observation"];
    // The middle of the load: about half of the resources are later.
    let mut updated: Vec<String> = search_all(&format!("{upstream}/Patient?_count=500"))
        .iter()
        .map(|p| p["meta"]["lastUpdated"].as_str().unwrap().to_owned())
        .collect();
    updated.sort();
    let since = updated[updated.len() / 2].clone();
    let run = run_smart_fetch(
        &setup,
        "since",
        &["--type", &types.join(","), "--since", &since],
    );
    assert_requested(&run, &types, DEFAULT_OBSERVATION_FILTER);
    assert_eq!(
        run.kickoff_params["_since"].as_str(),
        Some(since.as_str()),
        "smart-fetch did not send --since as _since: {}",
        run.kickoff_params
    );
    let later = format!("_lastUpdated=gt{}", enc(&since));
    let mut expected = Expected::new();
    for ty in &types[..3] {
        add_search(&mut expected, &upstream, ty, &later);
    }
    add_search(
        &mut expected,
        &upstream,
        "Observation",
        &format!("{DEFAULT_OBSERVATION_FILTER}&{later}"),
    );
    let all = total(&direct_system(&upstream, Some(&types)));
    assert!(
        total(&expected) > 0 && total(&expected) < all,
        "test data: _since={since} keeps {} of {all} resources, so it shows nothing",
        total(&expected)
    );
    assert_same(&run.resources, &expected);
}
