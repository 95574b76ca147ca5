//! The attacks of issues #20 and #22 against the real binary with SMART Backend Services on, each as a
//! test named after the attack, so that a later change cannot quietly reopen one.
//!
//! Attacks tested elsewhere, not repeated here:
//! - alg none: auth_token.rs::assertion_with_alg_none_is_rejected
//! - HS256 keyed with the public key: auth_token.rs::assertion_hmac_signed_with_the_public_key_is_rejected
//! - tampered assertion payload, unregistered key under a registered kid:
//!   auth_token.rs::assertion_with_a_bad_signature_is_rejected
//! - wrong or missing kid: auth_token.rs::unknown_kid_is_rejected
//! - expired assertion: auth_token.rs::expired_assertion_is_rejected
//! - exp too far ahead (10 minutes, so an hour too): auth_token.rs::assertion_expiring_too_late_is_rejected
//! - iss ≠ sub: auth_token.rs::assertion_with_iss_not_sub_is_rejected
//! - wrong aud: auth_token.rs::assertion_with_wrong_aud_is_rejected
//! - jku injection: auth_token.rs::foreign_jku_is_rejected_without_fetching_it
//! - replay, and no jti: auth_token.rs::replayed_assertion_is_rejected
//! - nbf ahead, crit: auth_token.rs::assertion_not_valid_yet_is_rejected, auth_token.rs::assertion_with_unknown_crit_is_rejected
//! - unknown client: auth_token.rs::unknown_client_is_rejected
//! - expired or foreign-key access token: auth_export.rs::expired_access_token_is_unauthorized,
//!   auth_export.rs::access_token_signed_by_another_key_is_unauthorized
//! - another client's jobs 404: auth_export.rs::another_clients_job_is_not_found
//! - a narrow token downloading other types, the manifest listing them:
//!   auth_export.rs::status_and_files_are_limited_to_the_polling_tokens_scopes
//! - require-token pass-through scopes: auth_passthrough.rs::pass_through_with_require_token_needs_the_scope_of_the_interaction
//! - client X-Forwarded-*/Forwarded: auth_passthrough.rs::pass_through_replaces_client_forwarding_headers
//! - export path spellings reaching the upstream: bypass.rs (every test)
//! - disk full: limits.rs::export_over_max_disk_bytes_fails_with_507
//! - `_typeFilter` chains as an oracle (#20 item 1): with src/export/kickoff.rs, not here.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::auth::*;
use common::*;
use serde_json::{json, Value};

/// A job id that exists nowhere: a valid token gets 404 for it, an invalid one 401.
const NO_JOB: &str = "00000000000000000000000000000000";

/// The status of an authenticated request that needs no job: 404 when the token is accepted, 401 when not.
fn token_check(f: &Fixture, token: &str) -> u16 {
    let url = format!("{}/$bulk-status/{NO_JOB}", f.base());
    get_with_token(&url, Some(token))
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Kicks off `query` with `token` and waits for the manifest; returns the status URL and the manifest.
fn finished(f: &Fixture, query: &str, token: &str) -> (String, Value) {
    let status_url = accepted_status_url(f.base(), kickoff_get(f.base(), query, Some(token)));
    let (manifest, _) = wait_manifest(&status_url, Some(token));
    (status_url, manifest)
}

/// The first output file URL of `manifest`.
fn first_file(manifest: &Value) -> String {
    manifest["output"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest without output: {manifest}"))
        .to_owned()
}

/// Removes `signer`'s client from the config, reloads, and waits until the token endpoint refuses it.
fn remove_client(f: &Fixture, signer: &Signer, scope: &str) {
    f.reload(|config| without_client(config, &signer.client_id));
    wait_until(
        &format!("{} refused a token after the reload", signer.client_id),
        || f.ask(signer, scope).status == 401,
    );
}

/// Puts the config `original` back, reloads, and waits until client-rs gets tokens again.
fn register_again(f: &Fixture, original: &str) {
    f.reload(|_| original.to_owned());
    wait_until("client-rs registered again", || {
        f.ask(&rs_signer(), "system/*.rs").status == 200
    });
}

/// The files directory of the job behind `status_url`.
fn job_dir(f: &Fixture, status_url: &str) -> std::path::PathBuf {
    f.proxy.data_dir.join("files").join(job_id_of(status_url))
}

// ---------------------------------------------------------------------------------------------------------
// Client assertions (held before #20; the ones tests/auth_token.rs does not already try)
// ---------------------------------------------------------------------------------------------------------

/// A header `jwk` naming the attacker's own key must not be used to verify the assertion it comes with.
#[test]
fn assertion_with_embedded_jwk_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
    let attacker = attacker_signer();
    let jwk = ec_jwk(&keys().attacker_ec, EC_KID);
    for kid in [Some(EC_KID), Some("attacker-1"), None] {
        let mut head = json!({"alg": "ES384", "typ": "JWT", "jwk": jwk});
        if let Some(kid) = kid {
            head["kid"] = json!(kid);
        }
        let message = format!(
            "{}.{}",
            b64_json(&head),
            b64_json(&claims(EC_CLIENT, &f.token_endpoint()))
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &attacker.key, attacker.alg).unwrap();
        f.send(&format!("{message}.{signature}"), "system/Patient.rs")
            .expect_invalid_client(&format!("assertion with an embedded jwk, kid {kid:?}"));
    }
}

#[test]
fn garbage_assertions_are_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let header = b64_json(&json!({"alg": "RS384", "kid": RS_KID}));
    let claims = b64_json(&claims(RS_CLIENT, &f.token_endpoint()));
    for garbage in [
        "".to_owned(),
        "garbage".to_owned(),
        "a.b.c".to_owned(),
        "...".to_owned(),
        header.clone(),
        format!("{header}.{claims}"),
        format!("{header}.{claims}."),
        format!("{header}.{claims}.!!!not-base64!!!"),
        format!("{header}.{}.c2ln", B64.encode("not json")),
        format!("{}.{claims}.c2ln", B64.encode("[1,2,3]")),
        "\u{0}\u{1}\u{2}".to_owned(),
    ] {
        f.send(&garbage, "system/*.rs")
            .expect_invalid_client(&format!("garbage assertion {garbage:?}"));
    }
    f.token(&rs_signer(), "system/*.rs");
}

/// A 0.9 MB assertion is read and refused; one past the request body limit is refused unread. Either way
/// the endpoint goes on working.
#[test]
fn megabyte_assertion_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    let header = b64_json(&json!({"alg": "RS384", "kid": RS_KID}));
    for (pad, status) in [(650_000, 401), (2_000_000, 413)] {
        let mut c = claims(RS_CLIENT, &f.token_endpoint());
        c["pad"] = json!("x".repeat(pad));
        let jwt = format!("{header}.{}.{}", b64_json(&c), B64.encode([7u8; 384]));
        let resp = f.send(&jwt, "system/*.rs");
        assert_eq!(
            resp.status,
            status,
            "{} byte assertion: {}",
            jwt.len(),
            &resp.text[..resp.text.len().min(300)]
        );
        assert!(!resp.text.contains("access_token"), "{}", resp.text);
    }
    f.token(&rs_signer(), "system/*.rs");
}

#[test]
fn assertion_without_exp_is_rejected() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    let mut c = claims(RS_CLIENT, &f.token_endpoint());
    c.as_object_mut().unwrap().remove("exp");
    let jwt = sign(&header(&rs_signer()), &c, &rs_signer().key);
    f.send(&jwt, "system/*.rs")
        .expect_invalid_client("an assertion without exp");
}

// ---------------------------------------------------------------------------------------------------------
// Access tokens
// ---------------------------------------------------------------------------------------------------------

/// Widening the scope (or changing the client) of an issued token breaks its signature.
#[test]
fn access_token_with_tampered_payload_is_unauthorized() {
    let f = Fixture::start(&upstream(), "");
    let token = f
        .token(&ec_signer(EC_CLIENT), "system/Patient.rs")
        .access_token;
    assert_eq!(token_check(&f, &token), 404, "the untouched token");
    let (h, c, s) = jwt_parts(&token);
    for (field, value) in [("scope", "system/*.rs"), ("sub", RS_CLIENT)] {
        let mut claims = decode_part(&c);
        claims[field] = json!(value);
        let tampered = format!("{h}.{}.{s}", b64_json(&claims));
        assert_eq!(
            token_check(&f, &tampered),
            401,
            "token with {field} = {value}"
        );
    }
}

/// Tokens are HMAC-signed with `signing_key_file`: a new key makes every token signed before it invalid.
/// The proxy restarts on the same port (so with the same issuer), first with the same key, which must keep
/// the token valid, so that the refusal after the key change is for the key.
#[test]
fn new_signing_key_invalidates_earlier_tokens() {
    let mut f = Fixture::start(&upstream(), "");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    assert_eq!(token_check(&f, &token), 404, "token before the restart");
    let port = url::Url::parse(f.base()).unwrap().port().unwrap();
    let config = std::fs::read_to_string(f.proxy.config_path()).unwrap();
    let pinned = config.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert_ne!(pinned, config, "the config sets no listen address to pin");
    std::fs::write(f.proxy.config_path(), pinned).unwrap();
    let base = f.base().to_owned();
    f.proxy.kill9();
    f.proxy.restart();
    assert_eq!(f.base(), base, "the restarted proxy has another base");
    assert_eq!(
        token_check(&f, &token),
        404,
        "token after a restart with the same key"
    );
    std::fs::write(
        f.signing_key_file(),
        "another key of at least thirty-two bytes!",
    )
    .unwrap();
    f.proxy.kill9();
    f.proxy.restart();
    assert_eq!(
        token_check(&f, &token),
        401,
        "token after the signing key changed"
    );
    let fresh = f.token(&rs_signer(), "system/*.rs").access_token;
    assert_eq!(
        token_check(&f, &fresh),
        404,
        "a token signed with the new key"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Revocation (#20 item 2): a reload that removes a client or narrows its scopes takes effect at once
// ---------------------------------------------------------------------------------------------------------

#[test]
fn revoked_client_cannot_renew_its_token() {
    let f = Fixture::start(&upstream(), "");
    f.token(&rs_signer(), "system/*.rs");
    remove_client(&f, &rs_signer(), "system/*.rs");
    f.ask(&rs_signer(), "system/*.rs")
        .expect_invalid_client("token request of a removed client");
    f.token(&ec_signer(EC_CLIENT), "system/Patient.rs");
}

#[test]
fn revoked_client_token_cannot_kick_off() {
    let f = Fixture::start(&upstream(), "");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    remove_client(&f, &rs_signer(), "system/*.rs");
    let resp = kickoff_get(f.base(), "$export?_type=Patient", Some(&token));
    assert_unauthorized(resp, "kick-off with the token of a removed client");
}

#[test]
fn revoked_client_token_cannot_poll() {
    let f = Fixture::start(&upstream(), "on_client_removed = \"keep\"");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (status_url, _) = finished(&f, "$export?_type=Patient", &token);
    remove_client(&f, &rs_signer(), "system/*.rs");
    let resp = get_with_token(&status_url, Some(&token)).send().unwrap();
    assert_unauthorized(resp, "status with the token of a removed client");
}

#[test]
fn revoked_client_token_cannot_cancel() {
    let f = Fixture::start(&upstream(), "on_client_removed = \"keep\"");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (status_url, _) = finished(&f, "$export?_type=Patient", &token);
    remove_client(&f, &rs_signer(), "system/*.rs");
    assert_unauthorized(
        delete(&status_url, Some(&token)),
        "DELETE with the token of a removed client",
    );
    assert!(
        job_dir(&f, &status_url).is_dir(),
        "the kept job's files are gone"
    );
}

#[test]
fn revoked_client_token_cannot_download() {
    let f = Fixture::start(&upstream(), "on_client_removed = \"keep\"");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (_, manifest) = finished(&f, "$export?_type=Patient", &token);
    let file = first_file(&manifest);
    download_lines(&file, Some(&token));
    remove_client(&f, &rs_signer(), "system/*.rs");
    let resp = get_with_token(&file, Some(&token)).send().unwrap();
    assert_unauthorized(resp, "download with the token of a removed client");
}

/// A client narrowed from `system/*.rs` to `system/Patient.rs` keeps only Patient with its old token:
/// no Observation kick-off, no Observation file, no status of an Observation-only job.
#[test]
fn narrowed_client_token_loses_what_the_client_lost() {
    let f = Fixture::start(&upstream(), "");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (both_url, both) = finished(&f, "$export?_type=Patient,Observation", &token);
    let (obs_url, _) = finished(&f, "$export?_type=Observation", &token);
    f.reload(|config| with_client_scopes(config, RS_CLIENT, &["system/Patient.rs"]));
    wait_until("client-rs refused Observation after the reload", || {
        f.ask(&rs_signer(), "system/Observation.rs").status == 400
    });
    let resp = kickoff_get(f.base(), "$export?_type=Observation", Some(&token));
    assert_eq!(
        resp.status(),
        403,
        "Observation kick-off with the narrowed token"
    );
    for output in both["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap();
        let want = if output["type"] == "Patient" {
            200
        } else {
            403
        };
        let status = get_with_token(url, Some(&token)).send().unwrap().status();
        assert_eq!(status.as_u16(), want, "{url} with the narrowed token");
    }
    let (seen, _) = wait_manifest(&both_url, Some(&token));
    let types: Vec<&str> = seen["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["type"].as_str())
        .collect();
    assert!(
        !types.is_empty() && types.iter().all(|t| *t == "Patient"),
        "manifest for the narrowed token: {seen}"
    );
    let status = get_with_token(&obs_url, Some(&token))
        .send()
        .unwrap()
        .status();
    assert_eq!(
        status, 403,
        "status of an Observation-only job with the narrowed token"
    );
}

#[test]
fn removed_clients_jobs_are_cancelled_and_their_files_removed() {
    let f = Fixture::start(&upstream(), "");
    let original = std::fs::read_to_string(f.proxy.config_path()).unwrap();
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (status_url, _) = finished(&f, "$export?_type=Patient", &token);
    let other = f
        .token(&ec_signer(EC_CLIENT), "system/Patient.rs")
        .access_token;
    let (other_url, _) = finished(&f, "$export?_type=Patient", &other);
    let dir = job_dir(&f, &status_url);
    assert!(dir.is_dir(), "no files at {}", dir.display());
    remove_client(&f, &rs_signer(), "system/*.rs");
    wait_until("the removed client's job files are removed", || {
        !dir.exists()
    });
    assert!(
        job_dir(&f, &other_url).is_dir(),
        "another client's job was removed too"
    );
    wait_manifest(&other_url, Some(&other));
    // Registered again, the client finds no job: it was cancelled, not merely out of reach.
    register_again(&f, &original);
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let status = get_with_token(&status_url, Some(&token))
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 404, "status of the cancelled job");
}

/// With `on_client_removed = "keep"` the jobs stay: a client registered again finds them complete.
#[test]
fn removed_clients_jobs_are_kept_with_on_client_removed_keep() {
    let f = Fixture::start(&upstream(), "on_client_removed = \"keep\"");
    let original = std::fs::read_to_string(f.proxy.config_path()).unwrap();
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (status_url, manifest) = finished(&f, "$export?_type=Patient", &token);
    remove_client(&f, &rs_signer(), "system/*.rs");
    // Reloads are handled one after the other: the removal's job handling is over once this one is seen.
    register_again(&f, &original);
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    let (again, _) = wait_manifest(&status_url, Some(&token));
    assert_eq!(again["output"], manifest["output"]);
    download_lines(&first_file(&manifest), Some(&token));
}

// ---------------------------------------------------------------------------------------------------------
// Scopes on every endpoint (#20 item 3)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn token_for_other_types_cannot_poll_the_job() {
    let f = Fixture::start(&upstream(), "");
    let wide = f.token(&rs_signer(), "system/*.rs").access_token;
    let other = f.token(&rs_signer(), "system/Encounter.rs").access_token;
    let (status_url, _) = finished(&f, "$export?_type=Patient,Observation", &wide);
    let resp = get_with_token(&status_url, Some(&other)).send().unwrap();
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(
        status, 403,
        "status with a system/Encounter.rs token: {body}"
    );
    assert_outcome(&body, "403 status");
    let patient = f.token(&rs_signer(), "system/Patient.rs").access_token;
    wait_manifest(&status_url, Some(&patient));
}

#[test]
fn token_for_other_types_cannot_cancel_the_job() {
    let f = Fixture::start(&upstream(), "");
    let wide = f.token(&rs_signer(), "system/*.rs").access_token;
    let other = f.token(&rs_signer(), "system/Encounter.rs").access_token;
    let (status_url, _) = finished(&f, "$export?_type=Observation", &wide);
    assert_status(
        delete(&status_url, Some(&other)),
        403,
        "DELETE with a system/Encounter.rs token",
    );
    wait_manifest(&status_url, Some(&wide));
    assert!(
        job_dir(&f, &status_url).is_dir(),
        "the job's files are gone"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Only real types granted (#20 item 4)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn unknown_type_scope_is_not_granted() {
    let f = Fixture::start(&upstream(), "");
    for scope in [
        "system/Foo.read",
        "system/Foo.rs",
        "system/Foo.cruds",
        "system/Resource.rs",
    ] {
        f.ask(&rs_signer(), scope)
            .expect_error(400, "invalid_scope", &format!("{scope} alone"));
    }
    let grant = f.token(
        &rs_signer(),
        "system/Foo.read system/Patient.rs system/Bar.rs",
    );
    assert_granted(
        &grant,
        "system/Patient.rs",
        "unknown types beside a real one",
    );
    let grant = f.token(&rs_signer(), "system/*.rs system/Foo.rs");
    assert_granted(&grant, "system/*.rs", "an unknown type beside the wildcard");
}

/// A typo in a client's registered scopes is a configuration error: the proxy does not start.
#[test]
fn client_scope_on_an_unknown_type_is_a_config_error() {
    let upstream = upstream();
    let exited = Proxy::builder(&upstream)
        .tables(
            "[auth]\nenabled = true\n\n\
             [[auth.clients]]\nclient_id = \"typo\"\nscopes = [\"system/Patient.rs\", \"system/Obervation.read\"]\n\
             jwks = { keys = [] }\n",
        )
        .start_expecting_exit(Duration::from_secs(15));
    let log = exited.log;
    let status = exited
        .status
        .unwrap_or_else(|| panic!("the proxy ran with a scope on Obervation: {log}"));
    assert!(!status.success(), "exit {status}: {log}");
    assert!(
        log.contains("Obervation"),
        "the error does not name the type: {log}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// _typeFilter (held before #20)
// ---------------------------------------------------------------------------------------------------------

#[test]
fn typefilter_with_include_or_revinclude_is_refused() {
    let f = Fixture::start(&upstream(), "");
    let token = f.token(&rs_signer(), "system/*.rs").access_token;
    for filter in [
        "Observation?_include=Observation:subject",
        "Observation?_revinclude=Provenance:target",
    ] {
        let query = format!("$export?_type=Observation&_typeFilter={}", enc(filter));
        let resp = kickoff_get(f.base(), &query, Some(&token));
        let status = resp.status();
        let body = resp.text().unwrap();
        assert_eq!(status, 400, "_typeFilter={filter}: {body}");
        assert_outcome(&body, filter);
    }
}

/// `_include:iterate` slips past the kick-off's check of reserved names (it compares whole names), but the
/// resources it includes are not search matches, so they are never written: an Observation-only token gets
/// Observations only. Refusing it at kick-off (400) passes too.
#[test]
fn typefilter_include_with_a_modifier_reads_no_included_resources() {
    let f = Fixture::start(&upstream(), "");
    let token = f.token(&rs_signer(), "system/Observation.rs").access_token;
    for filter in [
        "Observation?_include:iterate=Observation:patient",
        "Observation?_revinclude:iterate=Provenance:target",
    ] {
        let query = format!("$export?_type=Observation&_typeFilter={}", enc(filter));
        let resp = kickoff_get(f.base(), &query, Some(&token));
        if resp.status() == 400 {
            continue;
        }
        let status_url = accepted_status_url(f.base(), resp);
        let (manifest, _) = wait_manifest(&status_url, Some(&token));
        let files = download_all(&manifest, "output", Some(&token));
        assert!(
            files.iter().all(|file| file.ty == "Observation"),
            "_typeFilter={filter} exported {:?}",
            exported_types(&files)
        );
    }
}

/// CR LF in a `_typeFilter` value never becomes a header or a request of its own upstream: the kick-off
/// is refused, or the value travels percent-encoded inside the query.
#[test]
fn typefilter_header_injection_reaches_no_upstream_header() {
    let resource = |ty: &str| {
        json!({"type": ty, "interaction": [{"code": "read"}, {"code": "search-type"}],
               "searchParam": [{"name": "code", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]})
    };
    let capability = json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": [resource("Patient"), resource("Observation")]}]});
    // Every request gets the CapabilityStatement, so the job fails at its first search: enough to see it.
    let upstream = Stub::start(capability.to_string(), "application/fhir+json");
    let proxy = Proxy::start(&format!("{}/fhir", upstream.origin), "");
    let filter = "Observation?code=x\r\nX-Injected: yes\r\n\r\nGET /evil HTTP/1.1";
    let query = format!("$export?_type=Observation&_typeFilter={}", enc(filter));
    let resp = kickoff_get(&proxy.base, &query, None);
    match resp.status().as_u16() {
        400 => {}
        202 => {
            let status_url = accepted_status_url(&proxy.base, resp);
            wait_until("the job to end", || {
                client().get(&status_url).send().unwrap().status() != 202
            });
            let searched = upstream
                .heads()
                .iter()
                .any(|h| h.starts_with("GET /fhir/Observation?") && h.contains("code=x"));
            assert!(
                searched,
                "the filter never reached the upstream: {:?}",
                upstream.heads()
            );
        }
        other => panic!("kick-off answered {other}: {}", resp.text().unwrap()),
    }
    for head in upstream.heads() {
        assert!(
            header_values(&head, "X-Injected").is_empty(),
            "injected header: {head}"
        );
        assert!(!head.contains("/evil"), "injected request: {head}");
    }
}
