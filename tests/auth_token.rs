//! SMART Backend Services token endpoint, end to end against the real binary: discovery, and the
//! client assertions it must refuse (algorithm, signature, audience, lifetime, replay, keys, `crit`).
//!
//! The test client generates its keys with the `openssl` CLI (RS384 on RSA 2048, ES384 on P-384), registers
//! them with the proxy (one client with an inline JWKS, one with a `jwks_url` served by a small HTTP server
//! thread of the test) and signs its assertions with `jsonwebtoken`. Every rejection test first shows that a
//! well-formed request of the same client succeeds, so that a rejection is for the one thing the test breaks.
//!
//! The helpers (keys, signers, `Fixture`, token requests, token forging) are in tests/common/auth.rs, shared
//! with the other tests/auth_*.rs and tests/attacks.rs.

mod common;

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
