//! `_typeFilter` parameters judged against the grant and the upstream, end to end against the real
//! binary and the real upstream (sekmet-fhir, which does apply chains and `_has`).
//!
//! The oracle attack: a token that may read only Observation filters its Observation export by the
//! contents of Patients or DiagnosticReports (`subject:Patient.gender`, `patient.birthdate`,
//! `_has:DiagnosticReport:result:status`), and so learns those. The widening: a filter parameter the
//! upstream does not know is ignored there, and the export would hold everything.

mod common;

use common::*;
use serde_json::Value;

/// The three oracle filters of issue #20, each with the parameter name the refusal must give.
const ORACLES: [(&str, &str); 3] = [
    ("subject:Patient.gender=female", "subject:Patient.gender"),
    ("patient.birthdate=lt1980-01-01", "patient.birthdate"),
    (
        "_has:DiagnosticReport:result:status=final",
        "_has:DiagnosticReport:result:status",
    ),
];

const LENIENT: &str = "respond-async, handling=lenient";

/// A GET kick-off with `prefer` and an optional token: status and body.
fn kickoff(base: &str, query: &str, prefer: &str, token: Option<&str>) -> (u16, String) {
    let resp = get_with_token(&format!("{base}/$export?{query}"), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", prefer)
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

/// The diagnostics of an OperationOutcome body.
fn diagnostics(body: &str) -> String {
    let outcome: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not an OperationOutcome ({e}): {body}"));
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn observation_filter(filter: &str) -> String {
    format!(
        "_type=Observation&_typeFilter={}",
        enc(&format!("Observation?{filter}"))
    )
}

#[test]
fn filters_that_read_types_outside_the_grant_are_forbidden_also_when_lenient() {
    let upstream = upstream();
    let client = BackendClient::new("oracle");
    let proxy = Proxy::builder(&upstream)
        .export_toml(&client.auth_toml(
            "",
            &[
                "system/Observation.read",
                "system/Patient.read",
                "system/DiagnosticReport.read",
            ],
        ))
        .start();
    let token = client.token(&proxy.base, "system/Observation.read");
    // The same token may filter by Observation's own elements: the refusals are for what the filters read.
    let (status, body) = kickoff(
        &proxy.base,
        &observation_filter("status=final"),
        "respond-async",
        Some(&token),
    );
    assert_eq!(status, 202, "{body}");
    for (filter, name) in ORACLES {
        for prefer in ["respond-async", LENIENT] {
            let (status, body) = kickoff(
                &proxy.base,
                &observation_filter(filter),
                prefer,
                Some(&token),
            );
            assert_eq!(status, 403, "{filter} ({prefer}): {body}");
            let said = diagnostics(&body);
            assert!(
                said.contains(&format!("{name:?}")),
                "{filter} ({prefer}): the refusal does not name {name}: {said}"
            );
        }
    }
}

#[test]
fn filters_within_the_grant_export_exactly_what_they_select() {
    let upstream = upstream();
    let client = BackendClient::new("chains");
    let scope = "system/Observation.read system/Patient.read system/DiagnosticReport.read";
    let proxy = Proxy::builder(&upstream)
        .export_toml(&client.auth_toml("", &scope.split(' ').collect::<Vec<_>>()))
        .start();
    let token = client.token(&proxy.base, scope);
    let all = search_all(&format!("{upstream}/Observation?_count=500")).len();
    for (filter, _) in ORACLES {
        let resp = get_with_token(
            &format!("{}/$export?{}", proxy.base, observation_filter(filter)),
            Some(&token),
        )
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .unwrap();
        let status_url = accepted_status_url(&proxy.base, resp);
        let (manifest, _) = wait_manifest(&status_url, Some(&token));
        let files = download_all(&manifest, "output", Some(&token));
        let mut expected = Expected::new();
        let (name, value) = filter.split_once('=').unwrap();
        add_search(
            &mut expected,
            &upstream,
            "Observation",
            &format!("{}={}", enc(name), enc(value)),
        );
        let selected = total(&expected);
        assert!(
            selected > 0 && selected < all,
            "{filter}: the direct search selects {selected} of {all}, so it proves nothing"
        );
        assert_same(&resources_by_type(&files), &expected);
    }
}

#[test]
fn a_filter_parameter_the_upstream_does_not_list_is_refused_or_dropped_never_ignored() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let unknown = format!("_type=Patient&_typeFilter={}", enc("Patient?status=active"));
    let (status, body) = kickoff(&proxy.base, &unknown, "respond-async", None);
    assert_eq!(status, 400, "{body}");
    let said = diagnostics(&body);
    assert!(said.contains("\"status\""), "does not name status: {said}");

    // Lenient: the unknown filter goes, the valid one stays, and the export is not every patient.
    let query = format!(
        "_type=Patient&_typeFilter={}",
        enc("Patient?status=active,Patient?gender=female")
    );
    let resp = client()
        .get(format!("{}/$export?{query}", proxy.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", LENIENT)
        .send()
        .unwrap();
    let status_url = accepted_status_url(&proxy.base, resp);
    let (manifest, _) = wait_manifest(&status_url, None);
    let exported = resources_by_type(&download_all(&manifest, "output", None));
    let mut expected = Expected::new();
    add_search(&mut expected, &upstream, "Patient", "gender=female");
    let everyone = all_patient_ids(&upstream).len();
    assert!(
        total(&expected) < everyone,
        "gender=female selects every patient"
    );
    assert_same(&exported, &expected);
    let errors: Vec<String> = download_all(&manifest, "error", None)
        .into_iter()
        .flat_map(|f| f.lines)
        .collect();
    assert!(
        errors.iter().any(|l| l.contains("status")),
        "the error file does not say the status filter was dropped: {errors:?}"
    );

    // Lenient with the unknown filter alone: refused, rather than all patients exported.
    let (status, body) = kickoff(&proxy.base, &unknown, LENIENT, None);
    assert_eq!(status, 400, "{body}");
}

#[test]
fn since_in_the_future_is_refused() {
    let proxy = Proxy::start(&upstream(), "");
    for prefer in ["respond-async", LENIENT] {
        let (status, body) = kickoff(
            &proxy.base,
            &format!("_since={}", enc("2099-01-01T00:00:00Z")),
            prefer,
            None,
        );
        assert_eq!(status, 400, "{prefer}: {body}");
        assert!(diagnostics(&body).contains("_since"), "{body}");
    }
}

#[test]
fn pass_through_searches_may_read_only_granted_types() {
    let upstream = upstream();
    let client = BackendClient::new("searcher");
    let proxy = Proxy::builder(&upstream)
        .export_toml(&client.auth_toml(
            "pass_through = \"require-token\"",
            &["system/Observation.read", "system/Patient.read"],
        ))
        .start();
    let observations = client.token(&proxy.base, "system/Observation.read");
    let both = client.token(&proxy.base, "system/Observation.read system/Patient.read");
    let search = |query: &str, token: &str| {
        let resp = get_with_token(&format!("{}/Observation?{query}", proxy.base), Some(token))
            .header("Accept", "application/fhir+json")
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    let (status, body) = search("status=final&_count=1", &observations);
    assert_eq!(status, 200, "{body}");
    for (query, name) in [
        (
            format!("{}=female", enc("subject:Patient.gender")),
            "subject:Patient.gender",
        ),
        (
            "patient.birthdate=lt1980-01-01".to_owned(),
            "patient.birthdate",
        ),
        (
            format!("{}=final", enc("_has:DiagnosticReport:result:status")),
            "_has:DiagnosticReport:result:status",
        ),
        (
            format!("_include={}", enc("Observation:patient")),
            "_include",
        ),
    ] {
        let (status, body) = search(&query, &observations);
        assert_eq!(status, 403, "{query}: {body}");
        assert!(
            diagnostics(&body).contains(&format!("{name:?}")),
            "{query}: the refusal does not name {name}: {body}"
        );
    }
    // With Patient granted too, the chained search is the upstream's own answer.
    let query = format!("{}=female&_count=500", enc("subject:Patient.gender"));
    let (status, body) = search(&query, &both);
    assert_eq!(status, 200, "{body}");
    let ids = |bundle: &Value| -> Vec<String> {
        let mut ids: Vec<String> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let via_proxy: Value = serde_json::from_str(&body).unwrap();
    let direct = get_json(&format!("{upstream}/Observation?{query}"));
    assert!(!ids(&direct).is_empty());
    assert_eq!(ids(&via_proxy), ids(&direct));
}
