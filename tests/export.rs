//! Bulk `$export` end to end against the real upstream: every export is compared per type with a
//! direct paged search of the upstream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const GROUP_ID: &str = "bulk-test-group";
const SUBSETTED: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Slow enough that a job is still running seconds after kick-off.
const SLOW_UPSTREAM: &str = "requests_per_second = 1";
const SLOW_EXPORT: &str = "page_size = 5";

/// Kicks off with GET, waits, checks the manifest against the kick-off URL and downloads it all.
fn run_get(proxy: &Proxy, path_and_query: &str) -> (Value, Vec<OutputFile>) {
    let status_url =
        accepted_status_url(&proxy.base, kickoff_get(&proxy.base, path_and_query, None));
    let (manifest, headers) = wait_manifest(&status_url, None);
    check_manifest(
        &manifest,
        &headers,
        &proxy.base,
        &format!("{}/{path_and_query}", proxy.base),
    );
    let files = download_all(&manifest, "output", None);
    (manifest, files)
}

fn run_post(proxy: &Proxy, path: &str, parameters: &Value) -> (Value, Vec<OutputFile>) {
    let status_url = accepted_status_url(&proxy.base, kickoff_post(&proxy.base, path, parameters));
    let (manifest, headers) = wait_manifest(&status_url, None);
    check_manifest(
        &manifest,
        &headers,
        &proxy.base,
        &format!("{}/{path}", proxy.base),
    );
    let files = download_all(&manifest, "output", None);
    (manifest, files)
}

/// The fields the IG requires of a complete-status answer.
fn check_manifest(
    manifest: &Value,
    headers: &reqwest::header::HeaderMap,
    base: &str,
    request: &str,
) {
    let content_type = headers
        .get("Content-Type")
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "manifest Content-Type {content_type:?}"
    );
    assert!(
        headers.contains_key("Expires"),
        "complete status without Expires: {headers:?}"
    );
    let tt = manifest["transactionTime"]
        .as_str()
        .unwrap_or_else(|| panic!("no transactionTime: {manifest}"));
    assert!(
        is_instant(tt),
        "transactionTime {tt:?} is not a FHIR instant"
    );
    assert_eq!(
        manifest["request"], request,
        "manifest request is not the kick-off URL"
    );
    assert_eq!(
        manifest["requiresAccessToken"], false,
        "requiresAccessToken: {manifest}"
    );
    assert!(
        manifest["error"].is_array(),
        "manifest error is not an array: {manifest}"
    );
    for out in manifest["output"].as_array().unwrap() {
        assert!(out["count"].is_u64(), "output entry without count: {out}");
        let url = out["url"].as_str().unwrap();
        let job_files = format!("{base}/$bulk-files/");
        assert!(
            url.starts_with(&job_files),
            "file URL {url} is not under {job_files}"
        );
    }
}

/// `YYYY-MM-DDThh:mm:ss(.f+)?(Z|±hh:mm)`.
fn is_instant(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let head = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !head {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":")
}

/// Sortable form of an instant in UTC `Z` form: seconds part and nanoseconds, so that
/// `.25Z` and `.250Z` compare equal.
fn instant_key(s: &str) -> (String, u32) {
    let s = s
        .strip_suffix('Z')
        .unwrap_or_else(|| panic!("instant {s:?} is not in Z form"));
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let nanos = format!("{frac:0<9}")[..9].parse().unwrap();
    (secs.to_owned(), nanos)
}

#[test]
fn system_export_matches_direct_search() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let (_, files) = run_get(&proxy, "$export");
    let expected = direct_system(&upstream, None);
    assert!(total(&expected) > 0, "the upstream holds no data");
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn patient_export_matches_compartment_search() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "patient_batch_size = 7");
    let (_, files) = run_get(&proxy, "Patient/$export");
    let expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    assert!(
        expected.len() > 2,
        "the compartment search found too few types: {:?}",
        expected.keys()
    );
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn group_export_matches_member_compartments() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "patient_batch_size = 2");
    let (_, files) = run_get(&proxy, &format!("Group/{GROUP_ID}/$export"));
    let members = group_member_ids(&upstream, GROUP_ID);
    assert!(!members.is_empty(), "Group/{GROUP_ID} has no members");
    let expected = direct_compartment(&upstream, &members);
    let exported = resources_by_type(&files);
    let patients: BTreeSet<String> = exported["Patient"].iter().map(|p| key_of(p).0).collect();
    assert_eq!(
        patients,
        members.iter().cloned().collect(),
        "Group export Patients are not the members"
    );
    assert_same(&exported, &expected);
}

/// What an export cost upstream: its requests (`fbp_upstream_requests_total`) and the searches
/// answered inside batch requests (`fbp_upstream_batched_reads_total`).
struct Cost {
    requests: f64,
    batched: f64,
}

/// The upstream cost of the export `kickoff` starts, and its resources.
fn export_cost(kickoff: &str, export_toml: &str) -> (Cost, BTreeMap<String, Vec<Value>>) {
    let proxy = Proxy::builder(&upstream())
        .export_toml(export_toml)
        .admin()
        .start();
    let admin = proxy.admin.clone().unwrap();
    let sum = |prefix: &str| {
        let text = scrape(&admin);
        let samples = text.lines().filter(|l| l.starts_with(prefix));
        samples
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let cost = || Cost {
        requests: sum("fbp_upstream_requests_total{"),
        batched: sum("fbp_upstream_batched_reads_total "),
    };
    let before = cost();
    let (_, files) = run_get(&proxy, kickoff);
    let after = cost();
    let spent = Cost {
        requests: after.requests - before.requests,
        batched: after.batched - before.batched,
    };
    (spent, resources_by_type(&files))
}

/// Upstream requests a Group export makes, and its resources.
fn group_export_requests(export_toml: &str) -> (f64, BTreeMap<String, Vec<Value>>) {
    let (cost, resources) = export_cost(&format!("Group/{GROUP_ID}/$export"), export_toml);
    (cost.requests, resources)
}

/// sekmet-fhir declares `batch`: a system export counts every type in one request, leaves out those
/// it holds none of, and exports exactly what direct searches find, in fewer requests than one search
/// per type.
#[test]
fn a_system_export_counts_types_in_one_batch_and_skips_the_empty_ones() {
    let upstream = upstream();
    let expected = direct_system(&upstream, None);
    let (all, all_export) = export_cost("$export", "skip_empty_types = false");
    let (skipping, skipping_export) = export_cost("$export", "");
    assert_same(&all_export, &expected);
    assert_same(&skipping_export, &expected);
    assert_eq!(
        all.batched, 0.0,
        "nothing is counted without skip_empty_types"
    );
    let searchable = searchable_types(&upstream).len() as f64;
    assert!(
        skipping.batched >= searchable,
        "{} counts came in a batch, for {searchable} types",
        skipping.batched
    );
    assert!(
        expected.len() < searchable as usize,
        "the upstream holds every type: nothing to skip"
    );
    assert!(
        skipping.requests < all.requests,
        "skipping the empty types took {} requests, searching every type {}",
        skipping.requests,
        all.requests
    );
}

/// With several patient batches, a type the upstream holds none of costs one probe, not one search
/// per batch: fewer requests than searching every type per batch, and exactly the same export.
#[test]
fn empty_types_are_probed_once_instead_of_searched_per_batch() {
    let upstream = upstream();
    let (old, old_export) =
        group_export_requests("patient_batch_size = 2\nskip_empty_types = false");
    let (new, new_export) = group_export_requests("patient_batch_size = 2");
    let members = group_member_ids(&upstream, GROUP_ID);
    assert_same(&new_export, &direct_compartment(&upstream, &members));
    assert_same(&old_export, &direct_compartment(&upstream, &members));
    assert!(members.len() > 2, "one batch: nothing to probe for");
    assert!(
        new < old,
        "probing empty types made {new} requests, searching them per batch {old}"
    );
}

/// A Group export whose patients are a large enough share of the upstream's pages a type whole where
/// that takes fewer requests, and keeps only its patients' resources: exactly what searches by patient
/// find (the Group is a strict subset, so other patients' resources were left out), in fewer requests;
/// the same for a Patient-level export, its largest types split into time ranges.
#[test]
fn types_paged_whole_keep_exactly_the_patients_resources() {
    let upstream = upstream();
    let members = group_member_ids(&upstream, GROUP_ID);
    let everyone = all_patient_ids(&upstream);
    assert!(
        members.len() > 2 && members.len() < everyone.len(),
        "the Group must be a strict subset of several patients"
    );
    let (by_patient, by_patient_export) =
        group_export_requests("patient_batch_size = 2\nwhole_type_share = 0");
    let (whole, whole_export) =
        group_export_requests("patient_batch_size = 2\nwhole_type_share = 0.01");
    let expected = direct_compartment(&upstream, &members);
    assert_same(&by_patient_export, &expected);
    assert_same(&whole_export, &expected);
    assert!(
        whole < by_patient,
        "paging types whole made {whole} requests, searching them by patient {by_patient}"
    );
    // Small pages: the largest types are split into `_lastUpdated` ranges as well.
    let proxy = Proxy::start(
        &upstream,
        "patient_batch_size = 7\nwhole_type_share = 1\npage_size = 20\nslice_concurrency = 4",
    );
    let (_, files) = run_get(&proxy, "Patient/$export");
    assert_same(
        &resources_by_type(&files),
        &direct_compartment(&upstream, &everyone),
    );
}

#[test]
fn type_parameter_limits_types() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let (_, files) = run_get(&proxy, "$export?_type=Patient,Observation");
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient", "Observation"])),
    );
}

#[test]
fn output_format_aliases_are_accepted() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let expected = direct_system(&upstream, Some(&["Patient"]));
    for format in ["application/fhir+ndjson", "application/ndjson", "ndjson"] {
        let (_, files) = run_get(
            &proxy,
            &format!("$export?_type=Patient&_outputFormat={}", enc(format)),
        );
        assert_same(&resources_by_type(&files), &expected);
    }
}

#[test]
fn post_kickoff_with_parameters() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Condition"},
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"}
        ]
    });
    let (_, files) = run_post(&proxy, "$export", &parameters);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient", "Condition"])),
    );
}

#[test]
fn post_patient_parameter_limits_to_those_patients() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let patients: Vec<String> = all_patient_ids(&upstream)
        .into_iter()
        .rev()
        .take(2)
        .collect();
    let parameter: Vec<Value> = patients
        .iter()
        .map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
        .collect();
    let parameters = json!({"resourceType": "Parameters", "parameter": parameter});
    let (_, files) = run_post(&proxy, "Patient/$export", &parameters);
    assert_same(
        &resources_by_type(&files),
        &direct_compartment(&upstream, &patients),
    );
}

#[test]
fn type_filter_matches_direct_search() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let filter = "Observation?code=http://loinc.org|2951-2";
    let (_, files) = run_get(
        &proxy,
        &format!("$export?_type=Observation&_typeFilter={}", enc(filter)),
    );
    let mut expected = Expected::new();
    add_search(
        &mut expected,
        &upstream,
        "Observation",
        &format!("code={}", enc("http://loinc.org|2951-2")),
    );
    assert!(
        total(&expected) > 0,
        "no Observation with LOINC 2951-2 upstream"
    );
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn repeated_type_filters_are_ored_and_leave_other_types_whole() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let codes = ["http://loinc.org|2951-2", "http://loinc.org|2823-3"];
    let filters: Vec<String> = codes
        .iter()
        .map(|c| format!("_typeFilter={}", enc(&format!("Observation?code={c}"))))
        .collect();
    let (_, files) = run_get(
        &proxy,
        &format!("$export?_type=Patient,Observation&{}", filters.join("&")),
    );
    let mut expected = direct_system(&upstream, Some(&["Patient"]));
    for code in codes {
        add_search(
            &mut expected,
            &upstream,
            "Observation",
            &format!("code={}", enc(code)),
        );
    }
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn elements_subsets_only_the_named_type() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let (_, files) = run_get(
        &proxy,
        "$export?_type=Patient,Observation&_elements=Observation.status",
    );
    let mut exported = resources_by_type(&files);
    let expected = direct_system(&upstream, Some(&["Patient", "Observation"]));
    let allowed: BTreeSet<&str> = ["resourceType", "id", "meta", "status"].into();
    let observations = exported.remove("Observation").unwrap_or_default();
    for obs in &observations {
        let keys: BTreeSet<&str> = obs
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            keys.is_subset(&allowed),
            "subsetted Observation has other elements: {obs}"
        );
        assert!(
            obs["status"].is_string(),
            "subsetted Observation lost status: {obs}"
        );
        let subsetted = obs["meta"]["tag"].as_array().is_some_and(|tags| {
            tags.iter()
                .any(|t| t["system"] == SUBSETTED && t["code"] == "SUBSETTED")
        });
        assert!(
            subsetted,
            "subsetted Observation without the SUBSETTED tag: {obs}"
        );
    }
    let got: BTreeSet<Key> = observations.iter().map(key_of).collect();
    let want: BTreeSet<Key> = expected["Observation"].keys().cloned().collect();
    assert_eq!(
        observations.len(),
        got.len(),
        "duplicate Observations in the export"
    );
    assert_eq!(
        got, want,
        "subsetted Observations are not those of the direct search"
    );
    let mut patients_only = expected;
    patients_only.remove("Observation");
    assert_same(&exported, &patients_only);
}

#[test]
fn since_returns_only_later_changes() {
    let upstream = upstream_rw();
    let tag = unique("since");
    let identifier = |n: &str| json!([{"system": "urn:fbp-test", "value": format!("{tag}-{n}")}]);
    let early = create_rw(&json!({"resourceType": "Patient", "identifier": identifier("early")}));
    let early_id = early["id"].as_str().unwrap().to_owned();
    let early_obs = create_rw(
        &json!({"resourceType": "Observation", "status": "final", "identifier": identifier("early-obs"),
               "code": {"text": tag}, "subject": {"reference": format!("Patient/{early_id}")}}),
    );
    let since = early_obs["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(1100));

    let late = create_rw(&json!({"resourceType": "Patient", "identifier": identifier("late")}));
    let late_obs = create_rw(
        &json!({"resourceType": "Observation", "status": "final", "identifier": identifier("late-obs"),
               "code": {"text": tag}, "subject": {"reference": format!("Patient/{early_id}")}}),
    );
    let mut updated = early.clone();
    updated["active"] = json!(true);
    let resp = client()
        .put(format!("{upstream}/Patient/{early_id}"))
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json")
        .body(updated.to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "updating Patient/{early_id} upstream");
    let updated: Value = resp.json().unwrap();

    let proxy = Proxy::start(&upstream, "");
    let (manifest, files) = run_get(
        &proxy,
        &format!("$export?_type=Patient,Observation&_since={}", enc(&since)),
    );
    let tt = instant_key(manifest["transactionTime"].as_str().unwrap());
    let exported = resources_by_type(&files);
    let keys: BTreeSet<Key> = exported.values().flatten().map(key_of).collect();
    for resource in exported.values().flatten() {
        let updated_at = instant_key(resource["meta"]["lastUpdated"].as_str().unwrap());
        assert!(
            updated_at > instant_key(&since),
            "_since={since} exported an older resource: {resource}"
        );
        assert!(
            updated_at <= tt,
            "resource updated after transactionTime exported: {resource}"
        );
    }
    for wanted in [&late, &late_obs, &updated] {
        assert!(
            keys.contains(&key_of(wanted)),
            "_since export lacks a later change: {wanted}"
        );
    }
    assert!(
        !keys.contains(&key_of(&early)),
        "_since export holds the pre-_since version of Patient/{early_id}"
    );
    assert!(
        !keys.contains(&key_of(&early_obs)),
        "_since export holds an Observation older than _since"
    );
    let ids: Vec<String> = exported.values().flatten().map(|r| key_of(r).0).collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<BTreeSet<_>>().len(),
        "duplicates in the _since export"
    );
}

#[test]
fn gzip_download_decodes_to_the_plain_file() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let (_, files) = run_get(&proxy, "$export?_type=Patient,Condition");
    assert!(!files.is_empty(), "export has no files");
    for file in &files {
        let resp = client()
            .get(&file.url)
            .header("Accept-Encoding", "gzip")
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200, "gzip GET {}", file.url);
        let encoding = resp
            .headers()
            .get("Content-Encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            encoding.as_deref(),
            Some("gzip"),
            "GET {} with Accept-Encoding: gzip",
            file.url
        );
        let compressed = resp.bytes().unwrap();
        let mut plain = String::new();
        flate2::read::MultiGzDecoder::new(&compressed[..])
            .read_to_string(&mut plain)
            .unwrap_or_else(|e| panic!("{}: not gzip ({e})", file.url));
        let lines: Vec<String> = plain.lines().map(str::to_owned).collect();
        assert_eq!(
            lines, file.lines,
            "{}: gzip body differs from the plain one",
            file.url
        );
    }
}

#[test]
fn delete_cancels_the_job() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream)
        .export_toml(SLOW_EXPORT)
        .upstream_toml(SLOW_UPSTREAM)
        .start();
    let status_url = accepted_status_url(&proxy.base, kickoff_get(&proxy.base, "$export", None));
    assert!(
        poll_once(&status_url, None).is_none(),
        "slow export finished at once"
    );
    let resp = client().delete(&status_url).send().unwrap();
    assert_eq!(
        resp.status(),
        202,
        "DELETE {status_url}: {}",
        resp.text().unwrap()
    );
    let resp = client().get(&status_url).send().unwrap();
    let status = resp.status();
    let body: Value = resp.json().unwrap_or(Value::Null);
    assert_eq!(status, 404, "status after DELETE: {body}");
    assert_eq!(
        body["resourceType"], "OperationOutcome",
        "404 after DELETE without OperationOutcome"
    );
    // Status requests may ask for `application/json` (the spec's default for this endpoint); its errors
    // then come labelled so, and `application/fhir+json` still gets what it asks for.
    for (accept, want) in [
        ("application/json", "application/json"),
        ("application/fhir+json", "application/fhir+json"),
    ] {
        let resp = client()
            .get(&status_url)
            .header("Accept", accept)
            .send()
            .unwrap();
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(resp.status(), 404);
        assert!(
            content_type.starts_with(want),
            "Accept {accept}: {content_type}"
        );
    }
}

#[test]
fn polling_too_fast_gets_429_with_retry_after() {
    let upstream = upstream();
    let export = format!("{SLOW_EXPORT}\nmin_poll_interval_ms = 60000");
    let proxy = Proxy::builder(&upstream)
        .export_toml(&export)
        .upstream_toml(SLOW_UPSTREAM)
        .start();
    let status_url = accepted_status_url(&proxy.base, kickoff_get(&proxy.base, "$export", None));
    let first = client().get(&status_url).send().unwrap().status();
    assert!(first == 202 || first == 429, "first poll answered {first}");
    let resp = client().get(&status_url).send().unwrap();
    assert_eq!(resp.status(), 429, "immediate second poll");
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .map(|v| v.to_str().unwrap().to_owned());
    let retry_after = retry_after.expect("429 without Retry-After");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "Retry-After {retry_after:?}"
    );
}

#[test]
fn files_roll_at_resources_per_file() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "resources_per_file = 100");
    let (_, files) = run_get(&proxy, "$export?_type=Observation");
    let expected = direct_system(&upstream, Some(&["Observation"]));
    let n = total(&expected);
    assert!(
        n > 200,
        "need more than 200 Observations upstream to see rolling, have {n}"
    );
    for file in &files {
        assert!(
            file.lines.len() <= 100,
            "{} has {} lines, over resources_per_file",
            file.url,
            file.lines.len()
        );
    }
    assert!(
        files.len() >= n.div_ceil(100),
        "{} files for {n} Observations",
        files.len()
    );
    let urls: BTreeSet<&String> = files.iter().map(|f| &f.url).collect();
    assert_eq!(urls.len(), files.len(), "manifest lists a file twice");
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn max_concurrent_jobs_is_enforced() {
    let upstream = upstream();
    let export = format!("{SLOW_EXPORT}\nmax_concurrent_jobs = 1");
    let proxy = Proxy::builder(&upstream)
        .export_toml(&export)
        .upstream_toml(SLOW_UPSTREAM)
        .start();
    let first = accepted_status_url(&proxy.base, kickoff_get(&proxy.base, "$export", None));
    let resp = kickoff_get(&proxy.base, "$export?_type=Patient", None);
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = resp.json().unwrap_or(Value::Null);
    assert_eq!(
        status, 429,
        "second kick-off over max_concurrent_jobs = 1: {body}"
    );
    assert!(
        retry_after.is_some_and(|r| r.parse::<u64>().is_ok()),
        "429 kick-off without Retry-After"
    );
    assert_eq!(
        body["resourceType"], "OperationOutcome",
        "429 kick-off without OperationOutcome"
    );

    // Cancelling the running job must free its slot.
    assert_eq!(
        client().delete(&first).send().unwrap().status(),
        202,
        "DELETE {first}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = kickoff_get(&proxy.base, "$export?_type=Patient", None);
        if resp.status() == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kick-off still refused 15 s after cancelling: {}",
            resp.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn time_sliced_system_export_matches_direct_search() {
    let upstream = upstream();
    let proxy = Proxy::start(
        &upstream,
        "time_slices = 4\nslice_concurrency = 4\npage_size = 50",
    );
    let types = ["Observation", "DiagnosticReport", "Patient"];
    let (manifest, files) = run_get(&proxy, "$export?_type=Observation,DiagnosticReport,Patient");
    // One file per slice: several Observation files show the type was really split.
    let observation_files = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "Observation")
        .count();
    assert!(
        observation_files > 1,
        "Observation was not split into time ranges: {manifest}"
    );
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&types)),
    );
}

#[test]
fn gzip_at_rest_is_served_in_both_encodings() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "gzip = true");
    let (_, files) = run_get(&proxy, "$export?_type=Patient,Condition");
    // `download_all` asks without Accept-Encoding: the proxy inflated what it keeps compressed.
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient", "Condition"])),
    );
    for file in &files {
        assert!(
            file.url.ends_with(".ndjson.gz"),
            "{} is not a gzip file",
            file.url
        );
        let resp = client()
            .get(&file.url)
            .header("Accept-Encoding", "gzip")
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["Content-Encoding"], "gzip");
        let compressed = resp.bytes().unwrap();
        let mut plain = String::new();
        flate2::read::MultiGzDecoder::new(&compressed[..])
            .read_to_string(&mut plain)
            .unwrap();
        let lines: Vec<String> = plain.lines().map(str::to_owned).collect();
        assert_eq!(lines, file.lines, "{}: the stored gzip differs", file.url);
    }
}
