//! What the proxy logs under `[auth]`: no secret (assertions, access tokens, keys) ever reaches the logs.
//! The helpers are in tests/common/auth.rs.

mod common;

use std::path::PathBuf;

use common::auth::*;
use common::*;

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
