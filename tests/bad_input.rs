//! Malformed kick-offs and hostile status and file URLs: each must get a 4xx with an
//! OperationOutcome naming the problem, never a 5xx, and the proxy must keep serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use serde_json::{json, Value};

/// Sends one HTTP/1.1 request byte for byte: reqwest would add `Accept: */*` and resolve `..`
/// segments, hiding exactly what these tests need the proxy to see.
fn raw(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Raw {
    let host = origin(base).strip_prefix("http://").unwrap().to_owned();
    let mut stream = TcpStream::connect(&host).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    Raw::parse(&response).unwrap()
}

const FHIR_JSON: (&str, &str) = ("Accept", "application/fhir+json");
const ASYNC: (&str, &str) = ("Prefer", "respond-async");

/// Asserts a 4xx (exactly `status` when given) with an OperationOutcome whose first issue has a
/// severity, a code and diagnostics mentioning `mention` (case-insensitive).
fn assert_rejected(what: &str, resp: &Raw, status: u16, mention: &str) {
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        resp.status < 500,
        "{what}: server error {}: {body}",
        resp.status
    );
    assert_eq!(resp.status, status, "{what}: {body}");
    let oo: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"));
    assert_eq!(oo["resourceType"], "OperationOutcome", "{what}: {body}");
    let issue = &oo["issue"][0];
    assert!(
        issue["severity"].is_string(),
        "{what}: issue without severity: {body}"
    );
    assert!(
        issue["code"].is_string(),
        "{what}: issue without code: {body}"
    );
    let diagnostics = issue["diagnostics"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no diagnostics: {body}"));
    assert!(
        diagnostics.to_lowercase().contains(&mention.to_lowercase()),
        "{what}: diagnostics {diagnostics:?} do not mention {mention:?}"
    );
}

fn get(proxy: &Proxy, path_and_query: &str, headers: &[(&str, &str)]) -> Raw {
    raw(
        &proxy.base,
        "GET",
        &format!("{}/{path_and_query}", url_path(&proxy.base)),
        headers,
        b"",
    )
}

fn post(proxy: &Proxy, path: &str, content_type: &str, body: &[u8]) -> Raw {
    let headers = [FHIR_JSON, ASYNC, ("Content-Type", content_type)];
    raw(
        &proxy.base,
        "POST",
        &format!("{}/{path}", url_path(&proxy.base)),
        &headers,
        body,
    )
}

/// The proxy still answers status polls and passes requests through after the abuse.
fn assert_alive(proxy: &Proxy, status_url: &str) {
    let resp = client().get(status_url).send().unwrap();
    assert_eq!(
        resp.status(),
        200,
        "status of a finished job after bad input"
    );
    let resp = client()
        .get(format!("{}/metadata", proxy.base))
        .header("Accept", "application/fhir+json")
        .send();
    assert_eq!(
        resp.unwrap().status(),
        200,
        "passthrough /metadata after bad input"
    );
}

#[test]
fn bad_kickoff_headers() {
    let proxy = Proxy::start(&upstream(), "");
    let no_accept = get(&proxy, "$export", &[ASYNC]);
    assert_rejected("kick-off without Accept", &no_accept, 400, "accept");
    let html = get(&proxy, "$export", &[("Accept", "text/html"), ASYNC]);
    assert!(
        html.status == 400 || html.status == 406,
        "Accept: text/html answered {}",
        html.status
    );
    assert_rejected(
        "kick-off with Accept: text/html",
        &html,
        html.status,
        "accept",
    );
    let no_prefer = get(&proxy, "$export", &[FHIR_JSON]);
    assert_rejected("kick-off without Prefer", &no_prefer, 400, "prefer");
    let sync = get(
        &proxy,
        "Patient/$export",
        &[FHIR_JSON, ("Prefer", "return=representation")],
    );
    assert_rejected(
        "kick-off with Prefer but no respond-async",
        &sync,
        400,
        "respond-async",
    );
    let status_url = finished_job(&proxy);
    assert_alive(&proxy, &status_url);
}

#[test]
fn bad_kickoff_parameters() {
    let proxy = Proxy::start(&upstream(), "");
    let cases: &[(&str, u16, &str)] = &[
        ("$export?_type=Foo", 400, "Foo"),
        ("$export?_type=Patient,Foo", 400, "Foo"),
        ("$export?_since=yesterday", 400, "_since"),
        ("$export?_since=2020-13-45", 400, "_since"),
        ("$export?_since=2020-13-45T00:00:00Z", 400, "_since"),
        ("$export?_outputFormat=text/csv", 400, "_outputFormat"),
        (
            "$export?_outputFormat=application/fhir%2Bjson",
            400,
            "_outputFormat",
        ),
        ("$export?foo=bar", 400, "foo"),
        ("$export?_typeFilter=Observation", 400, "_typeFilter"),
        ("Patient/$export?patient=Patient/123", 400, "patient"),
        ("Group/no-such-group-id/$export", 404, "no-such-group-id"),
    ];
    for (path, status, mention) in cases {
        let resp = get(&proxy, path, &[FHIR_JSON, ASYNC]);
        assert_rejected(&format!("GET {path}"), &resp, *status, mention);
    }
    let status_url = finished_job(&proxy);
    assert_alive(&proxy, &status_url);
}

#[test]
fn lenient_handling_ignores_unknown_parameters() {
    let proxy = Proxy::start(&upstream(), "");
    let resp = client()
        .get(format!("{}/$export?_type=Patient&foo=bar", proxy.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async, handling=lenient")
        .send()
        .unwrap();
    let status_url = accepted_status_url(&proxy.base, resp);
    let (manifest, _) = wait_manifest(&status_url, None);
    let upstream = upstream();
    assert_same(
        &resources_by_type(&download_all(&manifest, "output", None)),
        &direct_system(&upstream, Some(&["Patient"])),
    );
}

#[test]
fn bad_post_bodies() {
    let proxy = Proxy::start(&upstream(), "");
    let fhir = "application/fhir+json";
    let not_json = post(&proxy, "$export", fhir, b"_type=Patient");
    assert_rejected("POST body not JSON", &not_json, 400, "body");
    let patient = json!({"resourceType": "Patient", "id": "x"}).to_string();
    let not_parameters = post(&proxy, "$export", fhir, patient.as_bytes());
    assert_rejected(
        "POST body not a Parameters",
        &not_parameters,
        400,
        "Parameters",
    );
    let bad_type = json!({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Foo"}]});
    let bad_type = post(&proxy, "$export", fhir, bad_type.to_string().as_bytes());
    assert_rejected("POST _type=Foo", &bad_type, 400, "Foo");
    let unknown =
        json!({"resourceType": "Parameters", "parameter": [{"name": "foo", "valueString": "bar"}]});
    let unknown = post(&proxy, "$export", fhir, unknown.to_string().as_bytes());
    assert_rejected("POST unknown parameter", &unknown, 400, "foo");
    let status_url = finished_job(&proxy);
    assert_alive(&proxy, &status_url);
}

#[test]
fn bad_status_and_file_urls_get_404() {
    let proxy = Proxy::start(&upstream(), "");
    let status_url = finished_job(&proxy);
    let job_id = status_url.rsplit('/').next().unwrap().to_owned();
    let base_path = url_path(&proxy.base);
    let (manifest, _) = wait_manifest(&status_url, None);
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .expect("finished job has no file")
        .to_owned();
    let real_name = file_url.rsplit('/').next().unwrap().to_owned();
    let cases = [
        "$bulk-status/zzz".to_owned(),
        "$bulk-status/0123456789abcdef0123456789abcdef".to_owned(),
        format!("$bulk-status/{}", job_id.to_uppercase()),
        "$bulk-status/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "$bulk-status/%2e%2e/%2e%2e/etc/passwd".to_owned(),
        "$bulk-status/../../etc/passwd".to_owned(),
        format!("$bulk-files/{job_id}/..%2F..%2Fproxy.toml"),
        format!("$bulk-files/{job_id}/..%2Fproxy.toml"),
        format!("$bulk-files/{job_id}/../x"),
        format!("$bulk-files/{job_id}/%2e%2e/x"),
        format!("$bulk-files/{job_id}/no-such-file.ndjson"),
        format!("$bulk-files/{job_id}/{real_name}%00"),
        format!("$bulk-files/0123456789abcdef0123456789abcdef/{real_name}"),
        format!("$bulk-files/zzz/{real_name}"),
        format!("$bulk-files/..%2F..%2F/{real_name}"),
    ];
    for path in &cases {
        let resp = get(&proxy, path, &[]);
        let body = String::from_utf8_lossy(&resp.body);
        assert!(
            !body.contains("[export]"),
            "GET {path} leaked the config file: {body}"
        );
        assert!(
            !body.contains("root:"),
            "GET {path} leaked /etc/passwd: {body}"
        );
        assert_rejected(&format!("GET {base_path}/{path}"), &resp, 404, "");
    }
    let resp = raw(
        &proxy.base,
        "DELETE",
        &format!("{base_path}/$bulk-status/zzz"),
        &[],
        b"",
    );
    assert_rejected("DELETE $bulk-status/zzz", &resp, 404, "");
    assert_eq!(
        client().get(&file_url).send().unwrap().status(),
        200,
        "the real file after the bad names"
    );
    assert_alive(&proxy, &status_url);
}

/// A small completed job, for its real id and file names.
fn finished_job(proxy: &Proxy) -> String {
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    wait_manifest(&status_url, None);
    status_url
}

const LENIENT: (&str, &str) = ("Prefer", "respond-async, handling=lenient");

/// A POST kick-off with lenient handling and a `Parameters` body naming `patients`.
fn lenient_post_patients(proxy: &Proxy, path: &str, patients: &[&str]) -> Raw {
    let parameters: Vec<Value> = patients
        .iter()
        .map(|p| json!({"name": "patient", "valueReference": {"reference": p}}))
        .collect();
    let body = json!({"resourceType": "Parameters", "parameter": parameters}).to_string();
    raw(
        &proxy.base,
        "POST",
        &format!("{}/{path}", url_path(&proxy.base)),
        &[
            FHIR_JSON,
            LENIENT,
            ("Content-Type", "application/fhir+json"),
        ],
        body.as_bytes(),
    )
}

/// Lenient handling drops what it cannot use; when that leaves no type or no patient, the export
/// would have meant everything, so it is refused instead.
#[test]
fn lenient_handling_never_widens_to_everything() {
    let proxy = Proxy::start(&upstream(), "");
    let cases: &[(&str, &str)] = &[
        ("$export?_type=MissingType", "_type"),
        ("Patient/$export?_type=MissingType", "_type"),
        ("Group/bulk-test-group/$export?_type=MissingType", "_type"),
        (
            "$export?_type=Observation&_typeFilter=Observation%3F_count%3D5",
            "_typeFilter",
        ),
        ("Patient/$export?patient=Patient/x", "patient"),
        ("$export?_type=Patient&_since=yesterday", "_since"),
        ("$export?_type=Patient&_elements=Bad!", "_elements"),
    ];
    let mut answers: Vec<(String, Raw, &str)> = cases
        .iter()
        .map(|(path, mention)| {
            let resp = get(&proxy, path, &[FHIR_JSON, LENIENT]);
            (format!("lenient GET {path}"), resp, *mention)
        })
        .collect();
    for path in ["Patient/$export", "Group/bulk-test-group/$export"] {
        let resp = lenient_post_patients(&proxy, path, &["https://evil.example/Patient/x"]);
        answers.push((
            format!("lenient POST {path} with a foreign patient"),
            resp,
            "patient",
        ));
    }
    // Every case is asked before any is judged, so a failure lists all the kick-offs that widened.
    let accepted: Vec<&str> = answers
        .iter()
        .filter(|(_, resp, _)| resp.status != 400)
        .map(|(what, _, _)| what.as_str())
        .collect();
    assert!(accepted.is_empty(), "not refused: {accepted:#?}");
    for (what, resp, mention) in &answers {
        assert_rejected(what, resp, 400, mention);
    }
    let status_url = finished_job(&proxy);
    assert_alive(&proxy, &status_url);
}

/// What lenient handling keeps is exported, and only that: a type whose only filter was dropped is
/// left out (with a note in the error file), not exported unfiltered.
#[test]
fn lenient_handling_narrows_to_what_is_usable() {
    let proxy = Proxy::start(&upstream(), "");
    let upstream = upstream();
    let run = |path: &str| {
        let resp = client()
            .get(format!("{}/{path}", proxy.base))
            .header("Accept", "application/fhir+json")
            .header("Prefer", "respond-async, handling=lenient")
            .send()
            .unwrap();
        wait_manifest(&accepted_status_url(&proxy.base, resp), None).0
    };

    let manifest = run("$export?_type=Patient,Observation&_typeFilter=Observation%3F_count%3D5");
    assert_same(
        &resources_by_type(&download_all(&manifest, "output", None)),
        &direct_system(&upstream, Some(&["Patient"])),
    );
    let errors: Vec<String> = manifest["error"]
        .as_array()
        .expect("manifest without error array")
        .iter()
        .flat_map(|e| download_lines(e["url"].as_str().unwrap(), None))
        .collect();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("not exported: Observation")),
        "the error file does not say Observation was left out: {errors:?}"
    );

    let manifest = run("Patient/$export?_type=MissingType,Observation");
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    expected.retain(|t, _| t == "Observation");
    assert_same(
        &resources_by_type(&download_all(&manifest, "output", None)),
        &expected,
    );
}
