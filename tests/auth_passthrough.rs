//! Pass-through requests under `[auth]`: the `forward` and `require-token` modes, the scope a request
//! needs, and the headers the proxy sends upstream in the caller's place. The upstream is the `Stub` of
//! tests/common/auth.rs, which records what it was sent.

mod common;

use common::auth::*;
use common::*;

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
