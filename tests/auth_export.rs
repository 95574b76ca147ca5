//! Authorized exports end to end against the real binary and the real upstream: what each kind of client
//! may export, the scopes it is granted, and the access tokens the bulk endpoints refuse.
//!
//! Expired access tokens are forged rather than waited for: the proxy is given a known `signing_key_file`,
//! the test checks that it reproduces the signature of a token the proxy issued byte for byte (so it knows
//! the format and the key), then re-signs the same claims with `exp` an hour in the past. That holds whatever
//! clock leeway the proxy allows (up to an hour) and costs no waiting, whereas a 1 s lifetime followed by a
//! 2 s sleep fails on any leeway above a second (jsonwebtoken's default `Validation` allows 60 s).
//!
//! The helpers are in tests/common/auth.rs.

mod common;

use std::collections::BTreeSet;

use common::auth::*;
use common::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------------------
// Whole exports with each kind of client
// ---------------------------------------------------------------------------------------------------------

#[test]
fn rs384_client_with_inline_jwks_exports_everything() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let discovered = get_json(&format!("{}/.well-known/smart-configuration", f.base()));
    let endpoint = discovered["token_endpoint"].as_str().unwrap().to_owned();
    let grant = request_token(
        &endpoint,
        &assertion(&rs_signer(), &endpoint),
        "system/*.rs",
    )
    .grant("client-rs asking for system/*.rs");
    assert_granted(&grant, "system/*.rs", "client-rs");
    assert_eq!(
        grant.body["expires_in"], 300,
        "expires_in is not token_lifetime_secs: {}",
        grant.body
    );
    let (_, files) = export_with_token(f.base(), "$export", &grant.access_token);
    let expected = direct_system(&upstream, None);
    assert!(total(&expected) > 0, "the upstream holds no data");
    assert_same(&resources_by_type(&files), &expected);
}

#[test]
fn es384_client_with_jwks_url_exports_its_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    // The v2 form of the configured `system/Observation.read`; `jku` is the registered URL, which is allowed.
    let mut h = header(&ec_signer(EC_CLIENT));
    h.jku = Some(f.jwks_url());
    let assertion = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &ec_signer(EC_CLIENT).key,
    );
    let scope = "system/Patient.rs system/Observation.rs";
    let grant = f.send(&assertion, scope).grant("client-ec with jku");
    assert_granted(&grant, scope, "client-ec");
    assert!(
        f.jwks.hits() > 0,
        "the proxy accepted an ES384 assertion without fetching the client's jwks_url"
    );
    // No `_type`: the export holds the types the token allows, and only those.
    let (_, files) = export_with_token(f.base(), "$export", &grant.access_token);
    assert_eq!(
        exported_types(&files),
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()]),
        "types exported for a Patient+Observation token"
    );
    let exported = resources_by_type(&files);
    let expected = direct_system(&upstream, Some(&["Patient", "Observation"]));
    assert!(
        total(&expected) > 0,
        "the upstream holds no Patients or Observations"
    );
    assert_same(&exported, &expected);
}

#[test]
fn patient_export_is_limited_to_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let grant = f.token(
        &ec_signer(EC_CLIENT),
        "system/Patient.read system/Observation.read",
    );
    let (_, files) = export_with_token(f.base(), "Patient/$export", &grant.access_token);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    assert!(
        expected
            .keys()
            .any(|t| t != "Patient" && t != "Observation"),
        "the compartment holds no other types, the test would prove nothing"
    );
    expected.retain(|ty, _| ty == "Patient" || ty == "Observation");
    assert_same(&resources_by_type(&files), &expected);
}

/// Referenced resources come only within the token's scopes: a Practitioner scope brings the
/// Practitioners the exported Observations reference, a token without one gets none.
#[test]
fn referenced_resources_are_limited_to_granted_types() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let rs = rs_signer();
    let with = f.token(
        &rs,
        "system/Patient.rs system/Observation.rs system/Practitioner.rs",
    );
    let (_, files) = export_with_token(f.base(), "Patient/$export", &with.access_token);
    let mut expected = direct_compartment(&upstream, &all_patient_ids(&upstream));
    expected.retain(|ty, _| ty == "Patient" || ty == "Observation");
    let practitioners = referenced(
        &upstream,
        expected["Observation"].values(),
        &["Practitioner"],
    );
    assert!(
        !practitioners.is_empty(),
        "the Observations reference no Practitioner; the test would prove nothing"
    );
    expected.extend(practitioners);
    assert_same(&resources_by_type(&files), &expected);

    let without = f.token(&rs, "system/Patient.rs system/Observation.rs");
    let (_, files) = export_with_token(f.base(), "Patient/$export", &without.access_token);
    assert_eq!(
        exported_types(&files),
        ["Observation", "Patient"].map(String::from).into(),
        "a token without Practitioner scope got other types"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------------------

#[test]
fn granted_scope_is_the_covered_subset() {
    let f = Fixture::start(&upstream(), "");
    let rs = rs_signer();
    let ec = ec_signer(EC_CLIENT);
    let cruds = ec_signer(CRUDS_CLIENT);
    let cases: [(&Signer, &str, &str); 7] = [
        (&rs, "system/*.read", "system/*.read"),
        (
            &rs,
            "system/Observation.rs system/Patient.read",
            "system/Observation.rs system/Patient.read",
        ),
        (&ec, "system/Observation.read", "system/Observation.read"),
        (
            &ec,
            "system/Patient.read system/Observation.rs",
            "system/Patient.read system/Observation.rs",
        ),
        (
            &ec,
            "system/Patient.rs system/Condition.rs",
            "system/Patient.rs",
        ),
        (&cruds, "system/Encounter.rs", "system/Encounter.rs"),
        (
            &cruds,
            "system/Encounter.read system/Patient.rs",
            "system/Encounter.read",
        ),
    ];
    for (signer, requested, granted) in cases {
        let what = format!("{} asking for {requested:?}", signer.client_id);
        let grant = f.token(signer, requested);
        assert_granted(&grant, granted, &what);
    }
}

#[test]
fn scope_not_allowed_is_invalid_scope() {
    let f = Fixture::start(&upstream(), "");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    for (signer, scope) in [
        (ec_signer(EC_CLIENT), "system/Condition.rs"),
        (ec_signer(EC_CLIENT), "system/*.rs"),
        (ec_signer(EC_CLIENT), "system/Patient.cruds"),
        (ec_signer(CRUDS_CLIENT), "system/Patient.rs"),
        (rs_signer(), "system/*.cruds"),
    ] {
        let resp = f.send(&assertion(&signer, &f.token_endpoint()), scope);
        resp.expect_error(
            400,
            "invalid_scope",
            &format!("{} asking for {scope:?}", signer.client_id),
        );
    }
}

#[test]
fn type_outside_the_grant_is_forbidden() {
    let upstream = upstream();
    let f = Fixture::start(&upstream, "");
    let grant = f.token(
        &ec_signer(EC_CLIENT),
        "system/Patient.rs system/Observation.rs",
    );
    let token = Some(grant.access_token.as_str());
    for query in ["$export?_type=Condition", "$export?_type=Patient,Condition"] {
        let body = assert_status(
            kickoff_get(f.base(), query, token),
            403,
            &format!("kick-off {query} with a Patient+Observation token"),
        );
        assert_outcome(&body, query);
    }
    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "_type", "valueString": "Condition"}],
    });
    let resp = with_token(client().post(format!("{}/$export", f.base())), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .header("Content-Type", "application/fhir+json")
        .body(parameters.to_string())
        .send()
        .unwrap();
    let body = assert_status(resp, 403, "POST kick-off with _type=Condition");
    assert_outcome(&body, "POST kick-off with _type=Condition");
    // Control: a token that allows Condition may export it.
    let all = f.token(&rs_signer(), "system/*.rs");
    accepted_status_url(
        f.base(),
        kickoff_get(f.base(), "$export?_type=Condition", Some(&all.access_token)),
    );
    // Lenient: accepted, narrowed to the granted types, and the error file says so.
    let path = "$export?_type=Patient,Condition";
    let resp = get_with_token(&format!("{}/{path}", f.base()), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async, handling=lenient")
        .send()
        .unwrap();
    let status_url = accepted_status_url(f.base(), resp);
    let (manifest, _) = wait_manifest(&status_url, token);
    check_auth_manifest(&manifest, &format!("{}/{path}", f.base()));
    let files = download_all(&manifest, "output", token);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Patient"])),
    );
    let errors = download_all(&manifest, "error", token);
    let said_so = errors
        .iter()
        .flat_map(|f| &f.lines)
        .any(|line| line.contains("Condition"));
    assert!(
        said_so,
        "lenient export left out Condition without an OperationOutcome naming it: {manifest}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Access token rejections (bulk endpoints)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn bulk_endpoints_without_a_token_are_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", None),
        "kick-off without a token",
    );
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", Some("not-a-token")),
        "kick-off with a garbage token",
    );
    let grant = f.token(&rs_signer(), "system/*.rs");
    let token = Some(grant.access_token.as_str());
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get(f.base(), "$export?_type=Patient", token),
    );
    assert_unauthorized(
        get_with_token(&status_url, None).send().unwrap(),
        "status poll without a token",
    );
    let (manifest, _) = wait_manifest(&status_url, token);
    check_auth_manifest(&manifest, &format!("{}/$export?_type=Patient", f.base()));
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output file: {manifest}"))
        .to_owned();
    assert_unauthorized(
        get_with_token(&file_url, None).send().unwrap(),
        "file download without a token",
    );
    assert_unauthorized(delete(&status_url, None), "DELETE without a token");
    // The job survived all that and is still its owner's.
    download_lines(&file_url, token);
    assert_status(delete(&status_url, token), 202, "DELETE by the owner");
}

#[test]
fn expired_access_token_is_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    let grant = f.token(&rs_signer(), "system/*.rs");
    let key = proxy_hmac_key(&f, &grant.access_token);
    // Control: the same claims re-signed by the test are accepted, so the forging is faithful.
    let same = resign(&grant.access_token, &key, |_| {});
    assert_status(
        kickoff_get(f.base(), "$export?_type=Patient", Some(&same)),
        202,
        "kick-off with the issued claims re-signed by the test",
    );
    let expired = resign(&grant.access_token, &key, |claims| {
        let past = now() - 3600;
        claims["exp"] = json!(past);
        for field in ["iat", "nbf"] {
            if claims.get(field).is_some() {
                claims[field] = json!(past - 300);
            }
        }
    });
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", Some(&expired)),
        "kick-off with an access token expired an hour ago",
    );
}

#[test]
fn access_token_signed_by_another_key_is_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    let grant = f.token(&rs_signer(), "system/*.rs");
    let token = Some(grant.access_token.as_str());
    assert_status(
        kickoff_get(f.base(), "$export?_type=Patient", token),
        202,
        "kick-off with the issued token",
    );
    let random: [u8; 32] = rand::random();
    let forged = resign(&grant.access_token, &random, |_| {});
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", Some(&forged)),
        "kick-off with the issued claims signed by a random HMAC key",
    );
    let (h, c, _) = jwt_parts(&grant.access_token);
    let mut none_header = decode_part(&h);
    none_header["alg"] = json!("none");
    let unsigned = format!("{}.{c}.", b64_json(&none_header));
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", Some(&unsigned)),
        "kick-off with the issued claims and alg none",
    );
    let assertion = assertion(&rs_signer(), &f.token_endpoint());
    assert_unauthorized(
        kickoff_get(f.base(), "$export?_type=Patient", Some(&assertion)),
        "kick-off with a client assertion as the bearer token",
    );
}

#[test]
fn another_clients_job_is_not_found() {
    let f = Fixture::start(&upstream(), "");
    let owner = f.token(&rs_signer(), "system/*.rs");
    let other = f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let (owner, other) = (
        Some(owner.access_token.as_str()),
        Some(other.access_token.as_str()),
    );
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get(f.base(), "$export?_type=Patient", owner),
    );
    assert_status(
        get_with_token(&status_url, other).send().unwrap(),
        404,
        "another client's status URL",
    );
    assert_status(
        delete(&status_url, other),
        404,
        "DELETE of another client's job",
    );
    let (manifest, _) = wait_manifest(&status_url, owner);
    assert_status(
        get_with_token(&status_url, other).send().unwrap(),
        404,
        "another client's status URL, job complete",
    );
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no output file: {manifest}"))
        .to_owned();
    assert_status(
        get_with_token(&file_url, other).send().unwrap(),
        404,
        "another client's file URL",
    );
    assert_status(
        delete(&status_url, other),
        404,
        "DELETE of another client's complete job",
    );
    // The owner still has it all, and can delete it.
    assert!(!download_lines(&file_url, owner).is_empty());
    assert_status(delete(&status_url, owner), 202, "DELETE by the owner");
    assert_status(
        get_with_token(&status_url, owner).send().unwrap(),
        404,
        "status after the owner's DELETE",
    );
}

/// A job's owner may hold several tokens: the one it polls or downloads with sees only what its own scopes
/// allow (the manifest lists only those types; another type's file is 403).
#[test]
fn status_and_files_are_limited_to_the_polling_tokens_scopes() {
    let f = Fixture::start(&upstream(), "");
    let wide = f.token(&rs_signer(), "system/*.rs").access_token;
    let narrow = f.token(&rs_signer(), "system/Patient.rs").access_token;
    let status_url = accepted_status_url(
        f.base(),
        kickoff_get(f.base(), "$export?_type=Patient,Observation", Some(&wide)),
    );
    let (manifest, _) = wait_manifest(&status_url, Some(&wide));
    let files = download_all(&manifest, "output", Some(&wide));
    assert_eq!(
        exported_types(&files),
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()])
    );
    let (seen, _) = wait_manifest(&status_url, Some(&narrow));
    let types: BTreeSet<&str> = seen["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["type"].as_str())
        .collect();
    assert_eq!(types, BTreeSet::from(["Patient"]), "{seen}");
    for output in manifest["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap();
        let want = if output["type"] == "Patient" {
            200
        } else {
            403
        };
        let status = get_with_token(url, Some(&narrow)).send().unwrap().status();
        assert_eq!(
            status.as_u16(),
            want,
            "{url} with a system/Patient.rs token"
        );
    }
}
