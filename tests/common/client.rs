//! Requests to the proxy under test: kick-off, status polls, downloads and metrics, each with an optional
//! bearer token where the endpoint may need one.

use std::time::{Duration, Instant};

use serde_json::Value;

/// A blocking HTTP client with no redirects and a generous timeout.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// How long any export may take before a test gives up.
pub const EXPORT_DEADLINE: Duration = Duration::from_secs(120);

/// POST kick-off with a `Parameters` body.
pub fn kickoff_post(base: &str, path: &str, parameters: &Value) -> reqwest::blocking::Response {
    client()
        .post(format!("{base}/{path}"))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .header("Content-Type", "application/fhir+json")
        .body(parameters.to_string())
        .send()
        .unwrap()
}

/// A response read whole: its status, the value of header `name` if any, and its body.
pub fn status_header_body(
    resp: reqwest::blocking::Response,
    name: &str,
) -> (reqwest::StatusCode, Option<String>, String) {
    let status = resp.status();
    let header = resp
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned());
    (status, header, resp.text().unwrap())
}

/// Checks a kick-off answer is 202 with a well-formed `Content-Location` on `base`; returns that URL.
pub fn accepted_status_url(base: &str, resp: reqwest::blocking::Response) -> String {
    let (status, location, body) = status_header_body(resp, "Content-Location");
    assert_eq!(status, 202, "kick-off answered {status}: {body}");
    let location =
        location.unwrap_or_else(|| panic!("kick-off 202 without Content-Location: {body}"));
    let id = location
        .strip_prefix(&format!("{base}/$bulk-status/"))
        .unwrap_or_else(|| panic!("Content-Location {location} is not {base}/$bulk-status/ID"));
    assert!(
        id.len() == 32
            && id
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "job id {id:?} is not 32 lowercase hex digits"
    );
    location
}

/// The path of a status URL (`/fhir/$bulk-status/ID`), which survives a restart on a new port.
pub fn url_path(url: &str) -> String {
    let after_scheme = url.split_once("://").unwrap().1;
    after_scheme[after_scheme.find('/').unwrap()..].to_owned()
}

/// `http://host:port` of a base URL.
pub fn origin(base: &str) -> String {
    base[..base.len() - url_path(base).len()].to_owned()
}

/// One file of a manifest: its type, URL and lines.
pub struct OutputFile {
    pub ty: String,
    pub url: String,
    pub lines: Vec<String>,
}

pub fn get_with_token(url: &str, token: Option<&str>) -> reqwest::blocking::RequestBuilder {
    with_token(client().get(url), token)
}

/// Adds `Authorization: Bearer <token>` when `token` is given.
pub fn with_token(
    request: reqwest::blocking::RequestBuilder,
    token: Option<&str>,
) -> reqwest::blocking::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// GET kick-off, with `Authorization: Bearer <token>` when `token` is given.
pub fn kickoff_get(
    base: &str,
    path_and_query: &str,
    token: Option<&str>,
) -> reqwest::blocking::Response {
    get_with_token(&format!("{base}/{path_and_query}"), token)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .unwrap()
}

/// One status poll: `Some((manifest, headers))` once complete, `None` while the job runs. A running
/// job must answer 202 with `X-Progress` and `Retry-After`; anything else fails the test.
pub fn poll_once(
    status_url: &str,
    token: Option<&str>,
) -> Option<(Value, reqwest::header::HeaderMap)> {
    let resp = get_with_token(status_url, token).send().unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().unwrap();
    match status.as_u16() {
        202 => {
            assert!(
                headers.contains_key("X-Progress"),
                "202 status without X-Progress: {headers:?}"
            );
            let retry_after = headers
                .get("Retry-After")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| panic!("202 status without Retry-After: {headers:?}"));
            assert!(
                retry_after.parse::<u64>().is_ok(),
                "Retry-After {retry_after:?} is not seconds"
            );
            None
        }
        200 => {
            let manifest = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("manifest is not JSON ({e}): {body}"));
            Some((manifest, headers))
        }
        _ => panic!("status {status_url} answered {status}: {body}"),
    }
}

/// Polls every 200 ms until the job completes; panics after `EXPORT_DEADLINE`.
pub fn wait_manifest(status_url: &str, token: Option<&str>) -> (Value, reqwest::header::HeaderMap) {
    let deadline = Instant::now() + EXPORT_DEADLINE;
    loop {
        if let Some(done) = poll_once(status_url, token) {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "export {status_url} not complete after {EXPORT_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Downloads one file without compression, checking its content type; returns its lines.
pub fn download_lines(url: &str, token: Option<&str>) -> Vec<String> {
    let body = get_typed(url, token, "application/fhir+ndjson");
    body.lines().map(str::to_owned).collect()
}

/// GETs `url`, insisting on 200 and a Content-Type starting with `content_type`; returns the body.
fn get_typed(url: &str, token: Option<&str>, content_type: &str) -> String {
    let resp = get_with_token(url, token).send().unwrap();
    let status = resp.status();
    let got = resp
        .headers()
        .get("Content-Type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.text().unwrap();
    assert_eq!(status, 200, "GET {url} answered {status}: {body}");
    assert!(
        got.starts_with(content_type),
        "GET {url}: Content-Type {got:?}, expected {content_type}"
    );
    body
}

/// Downloads every file of the manifest array `field` (`output` or `error`), checking each `count`
/// equals its lines and each line is a resource of the declared type.
pub fn download_all(manifest: &Value, field: &str, token: Option<&str>) -> Vec<OutputFile> {
    let outputs = manifest[field]
        .as_array()
        .unwrap_or_else(|| panic!("manifest without {field}: {manifest}"));
    outputs
        .iter()
        .map(|out| {
            let ty = out["type"]
                .as_str()
                .unwrap_or_else(|| panic!("{field} entry without type: {out}"))
                .to_owned();
            let url = out["url"]
                .as_str()
                .unwrap_or_else(|| panic!("{field} entry without url: {out}"))
                .to_owned();
            let lines = download_lines(&url, token);
            if let Some(count) = out.get("count") {
                assert_eq!(
                    count.as_u64(),
                    Some(lines.len() as u64),
                    "count of {url} differs from its lines"
                );
            }
            for line in &lines {
                let resource: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{url}: a line is not JSON ({e}): {line}"));
                assert_eq!(
                    resource["resourceType"],
                    ty.as_str(),
                    "{url} holds another type: {line}"
                );
            }
            OutputFile { ty, url, lines }
        })
        .collect()
}

/// The value of one sample of a Prometheus text exposition: `series` is the metric name with its
/// labels exactly as exposed, e.g. `fbp_jobs{state="running"}` (`None` when absent).
pub fn prom_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// GETs `{admin}/metrics`, insisting on 200 and the Prometheus text content type.
pub fn scrape(admin: &str) -> String {
    get_typed(
        &format!("{admin}/metrics"),
        None,
        "text/plain; version=0.0.4",
    )
}

/// The job id at the end of a status URL.
pub fn job_id_of(status_url: &str) -> String {
    status_url.rsplit('/').next().unwrap().to_owned()
}

/// GET with no headers at all, returning status and body bytes.
pub fn get_bytes(url: &str) -> (u16, Vec<u8>) {
    let resp = client()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.bytes().unwrap().to_vec())
}
