//! SMART Backend Services authorization of the proxy's own endpoints, end to end against the real binary
//! and the real upstream.
//!
//! The test client generates its keys with the `openssl` CLI (RS384 on RSA 2048, ES384 on P-384), registers
//! them with the proxy (one client with an inline JWKS, one with a `jwks_url` served by a small HTTP server
//! thread of the test) and signs its assertions with `jsonwebtoken`. Every rejection test first shows that a
//! well-formed request of the same client succeeds, so that a rejection is for the one thing the test breaks.
//!
//! Expired access tokens are forged rather than waited for: the proxy is given a known `signing_key_file`,
//! the test checks that it reproduces the signature of a token the proxy issued byte for byte (so it knows
//! the format and the key), then re-signs the same claims with `exp` an hour in the past. That holds whatever
//! clock leeway the proxy allows (up to an hour) and costs no waiting, whereas a 1 s lifetime followed by a
//! 2 s sleep fails on any leeway above a second (jsonwebtoken's default `Validation` allows 60 s).

//!
//! The helpers (keys, signers, `Fixture`, token requests, token forging) are in tests/common/auth.rs, shared
//! with tests/attacks.rs.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::auth::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------------------

#[test]
fn discovery_advertises_backend_services() {
    let f = Fixture::start(&upstream(), "");
    let url = format!("{}/.well-known/smart-configuration", f.base());
    let resp = client().get(&url).send().unwrap();
    let body = assert_status(
        resp,
        200,
        "GET .well-known/smart-configuration without a token",
    );
    let config: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("smart-configuration is not JSON ({e}): {body}"));
    assert_eq!(config["token_endpoint"], f.token_endpoint(), "{config}");
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"]),
        "{config}"
    );
    let algs = config["token_endpoint_auth_signing_alg_values_supported"]
        .as_array()
        .unwrap_or_else(|| panic!("no signing algs: {config}"));
    for alg in ["RS384", "ES384"] {
        assert!(algs.contains(&json!(alg)), "{alg} not advertised: {config}");
    }
    assert_eq!(
        config["grant_types_supported"],
        json!(["client_credentials"]),
        "{config}"
    );
    assert!(
        config["scopes_supported"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "scopes_supported missing or empty: {config}"
    );
    assert!(
        config["capabilities"]
            .as_array()
            .is_some_and(|c| c.contains(&json!("client-confidential-asymmetric"))),
        "capabilities lack client-confidential-asymmetric: {config}"
    );

    let cap = get_json(&format!("{}/metadata", f.base()));
    let security = &cap["rest"][0]["security"];
    assert_eq!(
        security["service"][0]["coding"][0]["code"], "SMART-on-FHIR",
        "CapabilityStatement security: {security}"
    );
    let token_uri = security["extension"]
        .as_array()
        .and_then(|exts| exts.iter().find(|e| e["url"] == OAUTH_URIS))
        .and_then(|e| e["extension"].as_array())
        .and_then(|subs| subs.iter().find(|s| s["url"] == "token"))
        .map(|s| s["valueUri"].clone());
    assert_eq!(
        token_uri,
        Some(json!(f.token_endpoint())),
        "oauth-uris token extension: {security}"
    );
}

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
// Assertion rejections (token endpoint)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn assertion_with_alg_none_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    for alg in ["none", "None", "NONE"] {
        let jwt = format!(
            "{}.{}.",
            b64_json(&json!({"alg": alg, "typ": "JWT", "kid": RS_KID})),
            b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("alg {alg:?} assertion"));
    }
}

#[test]
fn assertion_hmac_signed_with_the_public_key_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let keys = keys();
    let secrets = [
        ("SPKI PEM", keys.rs.public_spki_pem.as_bytes().to_vec()),
        ("PKCS#1 PEM", keys.rs.public_pkcs1_pem.as_bytes().to_vec()),
        ("JWK n", keys.rs.n.as_bytes().to_vec()),
        (
            "JWKS JSON",
            rsa_jwk(&keys.rs, RS_KID).to_string().into_bytes(),
        ),
    ];
    for (name, secret) in secrets {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(RS_KID.into());
        let jwt = sign(
            &h,
            &claims(RS_CLIENT, &f.token_endpoint()),
            &EncodingKey::from_secret(&secret),
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("HS256 assertion keyed with the client's {name}"));
    }
}

#[test]
fn assertion_with_a_bad_signature_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    // A valid RS384 assertion whose claims were changed after signing.
    let good = assertion(&rs_signer(), &f.token_endpoint());
    let (h, _, s) = jwt_parts(&good);
    let tampered = format!(
        "{h}.{}.{s}",
        b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
    );
    f.send(&tampered, "system/*.rs")
        .expect_invalid_client("RS384 assertion with claims changed after signing");
    // An ES384 assertion under the registered kid, signed by a key nobody registered.
    f.send(
        &assertion(&attacker_signer(), &f.token_endpoint()),
        "system/Patient.rs",
    )
    .expect_invalid_client("ES384 assertion signed by an unregistered key");
}

#[test]
fn assertion_with_wrong_aud_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    for aud in [
        f.base().to_owned(),
        format!("{}/", f.token_endpoint()),
        "https://auth.example.org/token".to_owned(),
    ] {
        let jwt = sign(
            &header(&rs_signer()),
            &claims(RS_CLIENT, &aud),
            &rs_signer().key,
        );
        f.send(&jwt, "system/*.rs")
            .expect_invalid_client(&format!("assertion with aud {aud:?}"));
    }
}

#[test]
fn assertion_expiring_too_late_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["exp"] = json!(now() + 600);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion with exp 10 minutes ahead");
}

#[test]
fn expired_assertion_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["exp"] = json!(now() - 600);
    c["iat"] = json!(now() - 700);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion expired 10 minutes ago");
}

#[test]
fn assertion_with_iss_not_sub_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["sub"] = json!(EC_CLIENT);
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("assertion with iss client-rs, sub client-ec");
}

#[test]
fn replayed_assertion_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let c = claims(RS_CLIENT, &f.token_endpoint());
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .grant("first use of an assertion");
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("the same assertion a second time");
    // Another assertion (new iat and exp, so a new signature) that reuses the jti.
    let mut again = claims(RS_CLIENT, &f.token_endpoint());
    again["jti"] = c["jti"].clone();
    again["exp"] = json!(now() + 200);
    let jwt = sign(&header(&rs_signer()), &again, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("a new assertion reusing a jti");
    // No jti at all: nothing to guard against replay with.
    let mut no_jti = claims(RS_CLIENT, &f.token_endpoint());
    no_jti.as_object_mut().unwrap().remove("jti");
    let jwt = sign(&header(&rs_signer()), &no_jti, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("an assertion without jti");
}

#[test]
fn unknown_client_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let stranger = Signer {
        client_id: "client-unknown".into(),
        ..rs_signer()
    };
    f.send(&assertion(&stranger, &f.token_endpoint()), "system/*.rs")
        .expect_invalid_client("assertion of an unregistered client_id");
}

#[test]
fn unknown_kid_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let rs = Signer {
        kid: "rs-unknown".into(),
        ..rs_signer()
    };
    f.send(&assertion(&rs, &f.token_endpoint()), "system/*.rs")
        .expect_invalid_client("RS384 assertion with an unregistered kid (inline JWKS)");
    let ec = Signer {
        kid: "ec-unknown".into(),
        ..ec_signer(EC_CLIENT)
    };
    f.send(&assertion(&ec, &f.token_endpoint()), "system/Patient.rs")
        .expect_invalid_client("ES384 assertion with an unregistered kid (jwks_url)");
    let mut no_kid = header(&rs_signer());
    no_kid.kid = None;
    let jwt = sign(
        &no_kid,
        &claims(RS_CLIENT, &f.token_endpoint()),
        &rs_signer().key,
    );
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("RS384 assertion without a kid");
}

#[test]
fn foreign_jku_is_rejected_without_fetching_it() {
    let f = Fixture::start(&upstream(), "");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let foreign = format!("{}/jwks.json", f.attacker_jwks.origin);
    // The attacker's key, published at the attacker's URL.
    let mut h = header(&attacker_signer());
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &attacker_signer().key,
    );
    f.send(&jwt, "system/Patient.rs")
        .expect_invalid_client("client-ec assertion signed by a key at a foreign jku");
    // The client's own key, but naming a jku other than the registered one.
    let mut h = header(&ec_signer(EC_CLIENT));
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(EC_CLIENT, &f.token_endpoint()),
        &ec_signer(EC_CLIENT).key,
    );
    f.send(&jwt, "system/Patient.rs")
        .expect_invalid_client("client-ec assertion with a jku other than its jwks_url");
    // A client registered with an inline JWKS has no JWKS URL that a jku could match.
    let mut h = header(&rs_signer());
    h.jku = Some(foreign.clone());
    let jwt = sign(
        &h,
        &claims(RS_CLIENT, &f.token_endpoint()),
        &rs_signer().key,
    );
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("client-rs (inline JWKS) assertion with a jku");
    assert_eq!(
        f.attacker_jwks.hits(),
        0,
        "the proxy fetched an unregistered jku {foreign}: {:?}",
        f.attacker_jwks.heads()
    );
}

#[test]
fn malformed_token_requests_are_rejected() {
    let f = Fixture::start(&upstream(), "");
    let endpoint = f.token_endpoint();
    let jwt = || assertion(&rs_signer(), &endpoint);
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("grant_type", "password"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "unsupported_grant_type", "grant_type=password");
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            ),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "wrong client_assertion_type");
    post_form(
        &endpoint,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "no client_assertion");
    let a = jwt();
    post_form(
        &endpoint,
        &[
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .expect_error(400, "invalid_request", "no grant_type");
    // After all that, the endpoint still works.
    f.token(&rs_signer(), "system/*.rs");
}

#[test]
fn token_response_is_not_cacheable() {
    // RFC 6749 §5.1: a response holding tokens MUST carry `Cache-Control: no-store`.
    let f = Fixture::start(&upstream(), "");
    let resp = f.send(&assertion(&rs_signer(), &f.token_endpoint()), "system/*.rs");
    resp.grant("client-rs");
    let cache_control = resp
        .headers
        .get("Cache-Control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        cache_control.contains("no-store"),
        "token response Cache-Control {cache_control:?} lacks no-store (RFC 6749 §5.1)"
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

// ---------------------------------------------------------------------------------------------------------
// Pass-through
// ---------------------------------------------------------------------------------------------------------

const FAKE_BUNDLE: &str = r#"{"resourceType":"Bundle","type":"searchset","total":0}"#;

/// The Authorization values of the requests the fake upstream got for `path_prefix`.
fn upstream_authorizations(stub: &Stub, path_prefix: &str) -> Vec<Vec<String>> {
    stub.heads()
        .iter()
        .filter(|head| {
            head.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .is_some_and(|target| target.starts_with(path_prefix))
        })
        .map(|head| header_values(head, "authorization"))
        .collect()
}

#[test]
fn pass_through_forwards_the_callers_authorization() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"forward\"",
    );
    let url = format!("{}/Patient?name=anon", f.base());
    let body = assert_status(
        client().get(&url).send().unwrap(),
        200,
        "pass-through, no token",
    );
    assert_eq!(body, FAKE_BUNDLE, "pass-through changed the body");
    assert_eq!(
        upstream_authorizations(&fake, "/fhir/Patient"),
        vec![Vec::<String>::new()],
        "pass-through without Authorization"
    );
    let url = format!("{}/Patient?name=upstream-token", f.base());
    let body = assert_status(
        client()
            .get(&url)
            .header("Authorization", "Bearer upstream-secret-1234")
            .send()
            .unwrap(),
        200,
        "pass-through with the upstream's token",
    );
    assert_eq!(body, FAKE_BUNDLE);
    let seen = upstream_authorizations(&fake, "/fhir/Patient");
    assert_eq!(
        seen.last(),
        Some(&vec!["Bearer upstream-secret-1234".to_owned()]),
        "the caller's Authorization must reach the upstream unchanged: {seen:?}"
    );
}

#[test]
fn pass_through_with_require_token() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"require-token\"",
    );
    let url = format!("{}/Patient?name=x", f.base());
    assert_unauthorized(
        client().get(&url).send().unwrap(),
        "pass-through without a token",
    );
    assert_unauthorized(
        client()
            .get(&url)
            .header("Authorization", "Bearer upstream-secret-1234")
            .send()
            .unwrap(),
        "pass-through with a token that is not the proxy's",
    );
    assert!(
        upstream_authorizations(&fake, "/fhir/Patient").is_empty(),
        "unauthorized pass-through requests reached the upstream: {:?}",
        fake.heads()
    );
    // Discovery stays open.
    assert_status(
        client()
            .get(format!("{}/.well-known/smart-configuration", f.base()))
            .send()
            .unwrap(),
        200,
        "smart-configuration without a token",
    );
    let grant = f.token(&rs_signer(), "system/*.rs");
    let body = assert_status(
        get_with_token(&url, Some(&grant.access_token))
            .send()
            .unwrap(),
        200,
        "pass-through with a proxy token",
    );
    assert_eq!(body, FAKE_BUNDLE, "pass-through changed the body");
    let seen = upstream_authorizations(&fake, "/fhir/Patient");
    assert_eq!(seen.len(), 1, "{:?}", fake.heads());
    // config.rs: "Require a valid proxy token too (it is not forwarded)".
    assert!(
        seen[0].iter().all(|v| !v.contains(&grant.access_token)),
        "the proxy's access token was forwarded to the upstream: {seen:?}"
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

/// Issue #22 item 2: in require-token mode a pass-through request needs a scope covering its type and its
/// interaction; the proxy's own upstream credentials must not read or write what the token may not.
#[test]
fn pass_through_with_require_token_needs_the_scope_of_the_interaction() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"require-token\"",
    );
    let send = |method: reqwest::Method, path: &str, token: &str| {
        client()
            .request(method, format!("{}/{path}", f.base()))
            .bearer_auth(token)
            .header("Content-Type", "application/fhir+json")
            .body("{}")
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    use reqwest::Method as M;
    let patient = f
        .token(&ec_signer(EC_CLIENT), "system/Patient.rs")
        .access_token;
    let encounter = f
        .token(&ec_signer(CRUDS_CLIENT), "system/Encounter.cruds")
        .access_token;
    let cases = [
        (M::GET, "Patient?name=x", &patient, 200),
        (M::GET, "Patient/p1", &patient, 200),
        (M::GET, "Patient/p1/_history", &patient, 200),
        (M::GET, "Observation?code=x", &patient, 403),
        (M::GET, "Observation/o1", &patient, 403),
        (M::GET, "Patient/p1/Observation", &patient, 403),
        (M::POST, "Observation/_search", &patient, 403),
        (M::DELETE, "Basic/b1", &patient, 403),
        (M::PUT, "Patient/p1", &patient, 403),
        (M::POST, "", &patient, 403),
        (M::GET, "_history", &patient, 403),
        (M::GET, "Patient/p1/$everything", &patient, 403),
        (M::GET, "Patient/p1/Observation", &encounter, 403),
        (M::DELETE, "Encounter/e1", &encounter, 200),
        (M::PUT, "Encounter/e1", &encounter, 200),
        (M::POST, "Encounter", &encounter, 200),
        (M::GET, "Encounter?patient=p1", &encounter, 200),
        (M::GET, "Patient/p1", &encounter, 403),
        (M::GET, "metadata", &encounter, 200),
    ];
    let mut wrong = Vec::new();
    for (method, path, token, want) in &cases {
        let before = fake.heads().len();
        let got = send(method.clone(), path, token);
        let reached = fake.heads().len() > before;
        if got != *want || reached != (*want == 200) {
            wrong.push(format!(
                "{method} {path}: {got} (upstream reached: {reached}), want {want}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "scopes not enforced on pass-through: {wrong:#?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------------------

#[test]
fn secrets_never_reach_the_logs() {
    let upstream = upstream();
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("proxy.log");
    let f = Fixture::start_logged(&upstream, "", "trace", &log);
    let endpoint = f.token_endpoint();
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut remember = |name: &str, jwt: &str| {
        let (_, _, signature) = jwt_parts(jwt);
        secrets.push((name.to_owned(), jwt.to_owned()));
        secrets.push((format!("{name} signature"), signature));
    };

    let good = assertion(&ec_signer(EC_CLIENT), &endpoint);
    let grant = f
        .send(&good, "system/Patient.rs system/Observation.rs")
        .grant("client-ec");
    remember("client assertion", &good);
    remember("access token", &grant.access_token);
    // Error paths: a replay and a wrong audience.
    f.send(&good, "system/Patient.rs")
        .expect_invalid_client("replayed assertion");
    let wrong_aud = assertion(&ec_signer(EC_CLIENT), f.base());
    f.send(&wrong_aud, "system/Patient.rs")
        .expect_invalid_client("assertion with the FHIR base as aud");
    remember("wrong-aud assertion", &wrong_aud);
    let rs_grant = f.token(&rs_signer(), "system/*.rs");
    remember("second access token", &rs_grant.access_token);

    let token = grant.access_token.as_str();
    let (manifest, _) = export_with_token(f.base(), "$export", token);
    // Another client's token on the job, and a forwarded request carrying the proxy token.
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    assert_status(
        get_with_token(&file_url, Some(&rs_grant.access_token))
            .send()
            .unwrap(),
        404,
        "another client's file URL",
    );
    assert_status(
        get_with_token(&format!("{}/Patient?_count=1", f.base()), Some(token))
            .send()
            .unwrap(),
        200,
        "pass-through with the proxy token",
    );
    let secret_key = String::from_utf8(f.signing_key.clone()).unwrap();
    drop(f);

    let text = std::fs::read_to_string(&log).unwrap();
    let job_id = manifest["output"][0]["url"]
        .as_str()
        .and_then(|u| u.split("/$bulk-files/").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    assert!(
        text.contains(&job_id),
        "the captured log does not mention job {job_id}: logging was not captured ({} bytes)",
        text.len()
    );
    secrets.push(("access token signing key".into(), secret_key));
    let leaked: Vec<String> = secrets
        .iter()
        .filter(|(_, secret)| text.contains(secret.as_str()))
        .map(|(name, secret)| {
            let line = text.lines().find(|l| l.contains(secret.as_str())).unwrap();
            format!("{name} in: {line}")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "secrets in the proxy's log:\n{}",
        leaked.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------------
// Assertion times and headers (issue #22)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn assertion_not_valid_yet_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c["nbf"] = json!(now() - 60);
    f.send(
        &sign(&header(&rs_signer()), &c, &rs_signer().key),
        "system/*.rs",
    )
    .grant("assertion with nbf a minute ago");
    c["nbf"] = json!(now() + 120);
    c["jti"] = json!(new_jti());
    f.send(
        &sign(&header(&rs_signer()), &c, &rs_signer().key),
        "system/*.rs",
    )
    .expect_invalid_client("assertion with nbf 2 minutes ahead");
}

/// jsonwebtoken's `Header` has no `crit`, so the header is written and signed by hand; the same
/// hand-made assertion without `crit` is accepted, so the rejection is for `crit`.
#[test]
fn assertion_with_unknown_crit_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let signer = rs_signer();
    let hand_signed = |header: Value| {
        let input = format!(
            "{}.{}",
            b64_json(&header),
            b64_json(&claims(RS_CLIENT, &f.token_endpoint()))
        );
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &signer.key, signer.alg).unwrap();
        format!("{input}.{signature}")
    };
    let plain = json!({"alg": "RS384", "typ": "JWT", "kid": RS_KID});
    f.send(&hand_signed(plain.clone()), "system/*.rs")
        .grant("hand-signed assertion without crit");
    let mut critical = plain;
    critical["crit"] = json!(["x-unknown"]);
    critical["x-unknown"] = json!(true);
    f.send(&hand_signed(critical), "system/*.rs")
        .expect_invalid_client("assertion with crit [\"x-unknown\"]");
}

#[test]
fn pass_through_replaces_client_forwarding_headers() {
    let fake = Stub::start(FAKE_BUNDLE.into(), "application/fhir+json");
    let f = Fixture::start(
        &format!("{}/fhir", fake.origin),
        "pass_through = \"forward\"",
    );
    let url = format!("{}/Patient?name=forwarded", f.base());
    assert_status(
        client()
            .get(&url)
            .header("X-Forwarded-For", "6.6.6.6")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "evil.example")
            .header("Forwarded", "for=evil")
            .send()
            .unwrap(),
        200,
        "pass-through with client forwarding headers",
    );
    let head = fake
        .heads()
        .into_iter()
        .find(|h| h.contains("name=forwarded"))
        .unwrap_or_else(|| panic!("the request did not reach the upstream: {:?}", fake.heads()));
    let proxy_authority = url::Url::parse(f.base()).unwrap();
    let proxy_host = format!(
        "{}:{}",
        proxy_authority.host_str().unwrap(),
        proxy_authority.port().unwrap()
    );
    let seen = |name: &str| header_values(&head, name);
    assert_eq!(seen("x-forwarded-for"), ["127.0.0.1"], "{head}");
    assert_eq!(seen("x-forwarded-proto"), ["http"], "{head}");
    assert_eq!(seen("x-forwarded-host"), [proxy_host], "{head}");
    assert!(seen("forwarded").is_empty(), "{head}");
}
