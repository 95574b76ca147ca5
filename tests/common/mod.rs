//! Shared harness of the integration tests: runs the real binary against the real upstream.
#![allow(dead_code)]

pub mod auth;
mod proxy;

pub use proxy::Proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Base URL of the read-only upstream loaded with synthetic patients (set by `tests/run`).
pub fn upstream() -> String {
    std::env::var("FBP_TEST_UPSTREAM")
        .expect("FBP_TEST_UPSTREAM is not set: run the integration tests through tests/run")
}

/// Base URL of the upstream that tests may write to (set by `tests/run`).
pub fn upstream_rw() -> String {
    std::env::var("FBP_TEST_UPSTREAM_RW")
        .expect("FBP_TEST_UPSTREAM_RW is not set: run the integration tests through tests/run")
}

/// Reads one HTTP/1.1 request head from `reader`, for the tests' own small servers: its request line
/// and its `Content-Length` (0 when absent); `None` once the peer has closed.
pub fn read_request_head(reader: &mut impl BufRead) -> Option<(String, usize)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return None;
        }
        if header == "\r\n" {
            return Some((line, length));
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().expect("a numeric Content-Length");
            }
        }
    }
}

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

/// `(id, meta.versionId)` of a resource: what an export must reproduce exactly.
pub type Key = (String, String);

/// Resources per type, each keyed by `(id, versionId)`.
pub type Expected = BTreeMap<String, BTreeMap<Key, Value>>;

pub fn key_of(resource: &Value) -> Key {
    let id = resource["id"].as_str().unwrap_or_default().to_owned();
    let version = resource["meta"]["versionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (id, version)
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// GETs a JSON document from the upstream, insisting on 200.
pub fn get_json(url: &str) -> Value {
    let resp = client()
        .get(url)
        .header("Accept", "application/fhir+json")
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let body = resp.text().unwrap();
    assert_eq!(status, 200, "GET {url} answered {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// Every resource of a direct search, following `Bundle.link[relation=next]`.
pub fn search_all(url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut next = Some(url.to_owned());
    while let Some(url) = next.take() {
        let bundle = get_json(&url);
        if let Some(entries) = bundle["entry"].as_array() {
            out.extend(entries.iter().map(|e| e["resource"].clone()));
        }
        next = bundle["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str().map(str::to_owned))
        });
    }
    out
}

/// Adds the resources of a direct search (`query` without `_count`) of `ty` to `expected`.
pub fn add_search(expected: &mut Expected, upstream: &str, ty: &str, query: &str) {
    let sep = if query.is_empty() { "" } else { "&" };
    for resource in search_all(&format!("{upstream}/{ty}?_count=500{sep}{query}")) {
        assert_eq!(
            resource["resourceType"], ty,
            "direct search of {ty} returned another type"
        );
        expected
            .entry(ty.to_owned())
            .or_default()
            .insert(key_of(&resource), resource);
    }
}

/// Types the upstream's CapabilityStatement declares searchable, with their search parameters.
pub fn searchable_types(upstream: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cap = get_json(&format!("{upstream}/metadata"));
    let mut out = BTreeMap::new();
    for rest in cap["rest"].as_array().unwrap() {
        for resource in rest["resource"].as_array().unwrap() {
            let searchable = resource["interaction"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["code"] == "search-type"));
            if searchable {
                let params = resource["searchParam"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| p["name"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert(resource["type"].as_str().unwrap().to_owned(), params);
            }
        }
    }
    out
}

/// What a system export of `types` (all searchable types when `None`) must contain.
pub fn direct_system(upstream: &str, types: Option<&[&str]>) -> Expected {
    let all: Vec<String> = match types {
        Some(types) => types.iter().map(|t| t.to_string()).collect(),
        None => searchable_types(upstream).into_keys().collect(),
    };
    let mut expected = Expected::new();
    for ty in &all {
        add_search(&mut expected, upstream, ty, "");
    }
    expected
}

/// The ids of all Patients of the upstream.
pub fn all_patient_ids(upstream: &str) -> Vec<String> {
    search_all(&format!("{upstream}/Patient?_count=500"))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The patient ids of a Group's `member.entity`.
pub fn group_member_ids(upstream: &str, group: &str) -> Vec<String> {
    let group = get_json(&format!("{upstream}/Group/{group}"));
    group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let reference = m["entity"]["reference"].as_str().unwrap();
            reference.strip_prefix("Patient/").unwrap().to_owned()
        })
        .collect()
}

/// The FHIR R4 Patient CompartmentDefinition: type and the parameters that tie it to a patient.
/// `Group` (by `member`) and `Patient` (by `link`) are left out: the proxy exports the patients
/// themselves and treats a Group as a roster, not part of a patient's record.
const PATIENT_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["patient"]),
    ("Basic", &["patient", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["patient", "performer"]),
    ("CareTeam", &["patient", "participant"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester"]),
    ("Condition", &["patient", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["patient"]),
    ("EnrollmentRequest", &["subject"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["patient"]),
    ("Goal", &["patient"]),
    ("ImagingStudy", &["patient"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "patient", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["patient"]),
    ("Media", &["subject"]),
    (
        "MedicationAdministration",
        &["patient", "performer", "subject"],
    ),
    ("MedicationDispense", &["subject", "patient", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Person", &["patient"]),
    ("Procedure", &["patient", "performer"]),
    ("Provenance", &["patient"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["subject"]),
    ("VisionPrescription", &["patient"]),
];

/// R4 types outside the compartment that R4 ties to a patient by their `patient` search parameter.
pub const PATIENT_LINKED: &[&str] = &["Contract", "Device", "GuidanceResponse", "Task"];

/// The types a Patient or Group export adds when its resources reference them.
pub const REFERENCED_TYPES: [&str; 5] = [
    "Location",
    "Medication",
    "Organization",
    "Practitioner",
    "PractitionerRole",
];

/// The resources of `types` that `resources` reference relatively (`Type/id`, anywhere a `reference`
/// is), each read directly from the upstream; references the upstream cannot resolve are left out.
pub fn referenced<'a>(
    upstream: &str,
    resources: impl IntoIterator<Item = &'a Value>,
    types: &[&str],
) -> Expected {
    fn walk(value: &Value, types: &[&str], found: &mut BTreeSet<(String, String)>) {
        match value {
            Value::Object(members) => {
                for (k, v) in members {
                    match (k.as_str(), v.as_str()) {
                        ("reference", Some(r)) => {
                            let parts: Vec<&str> = r.split('/').collect();
                            let versioned = parts.len() == 4 && parts[2] == "_history";
                            if (parts.len() == 2 || versioned) && types.contains(&parts[0]) {
                                found.insert((parts[0].to_owned(), parts[1].to_owned()));
                            }
                        }
                        _ => walk(v, types, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, types, found)),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    for resource in resources {
        walk(resource, types, &mut found);
    }
    let mut expected = Expected::new();
    for (ty, id) in found {
        let resp = client()
            .get(format!("{upstream}/{ty}/{id}"))
            .header("Accept", "application/fhir+json")
            .send()
            .unwrap();
        if resp.status() == 200 {
            let resource: Value = serde_json::from_str(&resp.text().unwrap()).unwrap();
            expected
                .entry(ty)
                .or_default()
                .insert(key_of(&resource), resource);
        }
    }
    expected
}

/// What a Patient-level export over `patient_ids` must contain: the Patients themselves, every
/// resource of their compartment, searched with each compartment parameter the upstream supports,
/// the patient-linked types by `patient`, and the [`REFERENCED_TYPES`] resources all these reference.
pub fn direct_compartment(upstream: &str, patient_ids: &[String]) -> Expected {
    let searchable = searchable_types(upstream);
    let mut expected = Expected::new();
    for chunk in patient_ids.chunks(20) {
        let refs: Vec<String> = chunk.iter().map(|id| format!("Patient/{id}")).collect();
        let refs = enc(&refs.join(","));
        add_search(
            &mut expected,
            upstream,
            "Patient",
            &format!("_id={}", enc(&chunk.join(","))),
        );
        for (ty, params) in PATIENT_COMPARTMENT {
            let Some(supported) = searchable.get(*ty) else {
                continue;
            };
            for param in params.iter().filter(|p| supported.contains(**p)) {
                add_search(&mut expected, upstream, ty, &format!("{param}={refs}"));
            }
        }
        for ty in PATIENT_LINKED {
            if searchable.get(*ty).is_some_and(|p| p.contains("patient")) {
                add_search(&mut expected, upstream, ty, &format!("patient={refs}"));
            }
        }
    }
    let wanted: Vec<&str> = REFERENCED_TYPES
        .into_iter()
        .filter(|t| searchable.contains_key(*t))
        .collect();
    let references = referenced(
        upstream,
        expected.values().flat_map(|r| r.values()),
        &wanted,
    );
    expected.extend(references);
    expected
}

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

/// Checks a kick-off answer is 202 with a well-formed `Content-Location` on `base`; returns that URL.
pub fn accepted_status_url(base: &str, resp: reqwest::blocking::Response) -> String {
    let status = resp.status();
    let location = resp
        .headers()
        .get("Content-Location")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.text().unwrap();
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

/// Resources per type from downloaded files.
pub fn resources_by_type(files: &[OutputFile]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in files {
        let resources = file.lines.iter().map(|l| serde_json::from_str(l).unwrap());
        out.entry(file.ty.clone()).or_default().extend(resources);
    }
    out
}

/// Asserts the export holds, per type, exactly the resources of `expected`, byte-for-byte equal
/// as JSON, with no resource twice (not even in two versions).
pub fn assert_same(exported: &BTreeMap<String, Vec<Value>>, expected: &Expected) {
    let mut problems = Vec::new();
    let types: BTreeSet<&String> = exported.keys().chain(expected.keys()).collect();
    for ty in types {
        let got = exported.get(ty).map(Vec::as_slice).unwrap_or_default();
        let empty = BTreeMap::new();
        let want = expected.get(ty).unwrap_or(&empty);
        let mut seen_ids = BTreeMap::new();
        for resource in got {
            let (id, version) = key_of(resource);
            if let Some(before) = seen_ids.insert(id.clone(), version.clone()) {
                problems.push(format!(
                    "{ty}/{id}: exported twice (versions {before} and {version})"
                ));
            }
        }
        let got_keys: BTreeSet<Key> = got.iter().map(key_of).collect();
        let want_keys: BTreeSet<&Key> = want.keys().collect();
        let missing: Vec<_> = want_keys
            .iter()
            .filter(|k| !got_keys.contains(**k))
            .collect();
        let extra: Vec<_> = got_keys.iter().filter(|k| !want_keys.contains(k)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "{ty}: exported {} (distinct {}), direct search {}; missing {} e.g. {:?}; unexpected {} e.g. {:?}",
                got.len(),
                got_keys.len(),
                want.len(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>()
            ));
        }
        for resource in got {
            if let Some(direct) = want.get(&key_of(resource)) {
                if direct != resource {
                    problems.push(format!(
                        "{ty}/{}: exported content differs from upstream",
                        resource["id"]
                    ));
                    break;
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "export differs from the direct search:\n{}",
        problems.join("\n")
    );
}

/// Total resources of an `Expected`.
pub fn total(expected: &Expected) -> usize {
    expected.values().map(BTreeMap::len).sum()
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
    let resp = get_with_token(url, token).send().unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("Content-Type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.text().unwrap();
    assert_eq!(status, 200, "GET {url} answered {status}: {body}");
    assert!(
        content_type.starts_with("application/fhir+ndjson"),
        "GET {url}: Content-Type {content_type:?}, expected application/fhir+ndjson"
    );
    body.lines().map(str::to_owned).collect()
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
    let resp = client().get(format!("{admin}/metrics")).send().unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("Content-Type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.text().unwrap();
    assert_eq!(status, 200, "GET {admin}/metrics answered {status}: {body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "metrics Content-Type {content_type:?}"
    );
    body
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

/// A response as read off the socket (tests that must send bytes reqwest would normalise).
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    /// The first header called `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A fixed-seed xorshift: reproducible "random" choices without another dependency.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs the `openssl` CLI (key generation for SMART clients) and returns its stdout.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

// ---- Oracles for Patient- and Group-level types, filtered or not. ----

/// The parameters tying `ty` to a patient that the upstream can search: those of the Patient compartment,
/// `patient` for a type outside it (Device); none when the upstream cannot search `ty` by patient.
pub fn patient_params(
    searchable: &BTreeMap<String, BTreeSet<String>>,
    ty: &str,
) -> Vec<&'static str> {
    let params = PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == ty)
        .map_or(&["patient"][..], |(_, params)| *params);
    let supported = searchable.get(ty);
    params
        .iter()
        .copied()
        .filter(|p| supported.is_some_and(|s| s.contains(*p)))
        .collect()
}

/// What a Patient- or Group-level export over `patient_ids` must hold of `ty` (not `Patient`) with
/// `_typeFilter=ty?filter` (no filter when `filter` is empty): one direct search per patient parameter,
/// the filter added to each; empty when the upstream cannot search `ty` by patient.
pub fn direct_patient_linked(
    upstream: &str,
    patient_ids: &[String],
    ty: &str,
    filter: &str,
) -> Expected {
    let params = patient_params(&searchable_types(upstream), ty);
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("&{filter}")
    };
    let mut expected = Expected::new();
    for chunk in patient_ids.chunks(20) {
        let refs: Vec<String> = chunk.iter().map(|id| format!("Patient/{id}")).collect();
        let refs = enc(&refs.join(","));
        for param in &params {
            add_search(
                &mut expected,
                upstream,
                ty,
                &format!("{param}={refs}{filter}"),
            );
        }
    }
    expected
}

// ---- One registered backend client (ES384, inline JWKS) and its tokens. ----

/// A SMART backend client with a fresh P-384 key, registered by the `[auth]` tables of
/// [`BackendClient::auth_toml`].
pub struct BackendClient {
    /// Its `client_id`.
    pub client_id: String,
    private_pem: String,
    x: String,
    y: String,
}

impl BackendClient {
    /// Generates the client's key with the `openssl` CLI.
    pub fn new(client_id: &str) -> BackendClient {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let p = path.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            p,
        ]);
        let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
        let point = &der[der.len() - 97..];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        BackendClient {
            client_id: client_id.to_owned(),
            private_pem: std::fs::read_to_string(&path).unwrap(),
            x: b64.encode(&point[1..49]),
            y: b64.encode(&point[49..97]),
        }
    }

    /// `[auth]` on, `auth_extra` added to it, with this client allowed `scopes` (to follow the
    /// `[export]` table).
    pub fn auth_toml(&self, auth_extra: &str, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "\n[auth]\nenabled = true\n{auth_extra}\n\n[[auth.clients]]\nclient_id = {:?}\nscopes = [{}]\n\
             jwks = {{ keys = [{{ kty = \"EC\", kid = \"k1\", alg = \"ES384\", use = \"sig\", crv = \"P-384\", x = {:?}, y = {:?} }}] }}\n",
            self.client_id,
            scopes.join(", "),
            self.x,
            self.y
        )
    }

    /// An access token for `scope` from the token endpoint of the proxy at `base`, insisting that
    /// all of `scope` is granted.
    pub fn token(&self, base: &str, scope: &str) -> String {
        let aud = format!("{base}/auth/token");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.client_id, "sub": self.client_id, "aud": aud,
            "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.private_pem.as_bytes()).unwrap();
        let assertion = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let form = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", scope),
            ])
            .finish();
        let resp = client()
            .post(&aud)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().unwrap();
        assert_eq!(status, 200, "token request for {scope:?}: {body}");
        let granted: BTreeSet<&str> = body["scope"].as_str().unwrap().split(' ').collect();
        assert_eq!(
            granted,
            scope.split(' ').collect(),
            "token for {scope:?}: {body}"
        );
        body["access_token"].as_str().unwrap().to_owned()
    }
}
