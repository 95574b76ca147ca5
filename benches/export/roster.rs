//! The roster upstream: a fast FHIR R4 server holding `patients` patients, each with the same record of
//! [`RECORD`] resources across US Core types, and Groups of them; for the Group and Patient export runs.
//!
//! Resource `j` of patient `p` of a type is its resource `p * per_patient + j`, and `meta.lastUpdated`
//! grows with that index, so a patient's resources of a type are one run of the type's rendered entries
//! and `_lastUpdated` bounds are index bounds by arithmetic. The CapabilityStatement declares the
//! Patient compartment's US Core types and as many more of the compartment's types, which hold nothing
//! (an upstream's usual shape: most types empty): [`TYPES`] in all. It serves:
//!
//! - `GET /fhir/metadata`;
//! - `GET /fhir/Group/roster-{n}`: a Group of `n` patients spread evenly over all of them;
//! - `GET /fhir/{Type}?patient=|subject=` (a list of `Patient/{id}` or `{id}`), `Patient?_id=`, or neither
//!   (the whole type), with `_count`, `_offset` (the `next` links), `_lastUpdated` (`gt|ge|lt|le`),
//!   `_summary=count`, `_elements` (accepted, not applied) and `_sort=_lastUpdated`; any other parameter
//!   is refused with 400, as a strict server does;
//! - `GET /stats`: what it answered so far, as JSON (`requests`, `searches`, `empty`, `counts`,
//!   `resources`), the benchmark's own count of upstream requests, independent of the proxy's.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use crate::upstream::{
    chunked, json, outcome, parse_instant, write_instant, Entries, Handler, Resp, FAMILY, GIVEN,
    T0_MS,
};

/// Each patient's resources of each type that holds data (with the Patient itself: 45 resources).
pub const RECORD: [(&str, u64); 8] = [
    ("Observation", 20),
    ("Encounter", 8),
    ("Condition", 5),
    ("Procedure", 4),
    ("MedicationRequest", 3),
    ("DiagnosticReport", 2),
    ("Immunization", 1),
    ("AllergyIntolerance", 1),
];

/// Patient compartment types the server declares searchable by `patient` and holds none of.
const EMPTY: [&str; 24] = [
    "CarePlan",
    "CareTeam",
    "Claim",
    "ClinicalImpression",
    "Communication",
    "Consent",
    "Coverage",
    "DetectedIssue",
    "DocumentReference",
    "EpisodeOfCare",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "ImagingStudy",
    "List",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationStatement",
    "NutritionOrder",
    "QuestionnaireResponse",
    "RiskAssessment",
    "ServiceRequest",
];

/// Types the server declares: Patient, the record's and the empty ones.
pub const TYPES: usize = 1 + RECORD.len() + EMPTY.len();

/// Resources each patient has, the Patient included.
pub fn per_patient_total() -> u64 {
    1 + RECORD.iter().map(|(_, n)| n).sum::<u64>()
}

/// The members of `Group/roster-{n}` out of `patients`: `n` patients spread evenly.
pub fn members(n: u64, patients: u64) -> impl Iterator<Item = u64> {
    let n = n.clamp(1, patients);
    (0..n).map(move |k| k * patients / n)
}

/// The first-page URLs a plain client searches a Group's patients with: every declared type, `batch`
/// patients per search (Patient by `_id`), `page_size` per page.
pub fn client_searches(base: &str, group: &[u64], batch: usize, page_size: u32) -> Vec<String> {
    let names = std::iter::once("Patient")
        .chain(RECORD.iter().map(|(t, _)| *t))
        .chain(EMPTY);
    let mut urls = Vec::new();
    for t in names {
        for chunk in group.chunks(batch.max(1)) {
            let ids: Vec<String> = chunk.iter().map(|p| format!("pat-{p:08}")).collect();
            let (param, list) = if t == "Patient" {
                ("_id", ids.join(","))
            } else {
                let refs: Vec<String> = ids.iter().map(|id| format!("Patient/{id}")).collect();
                ("patient", refs.join(","))
            };
            urls.push(format!("{base}/{t}?_count={page_size}&{param}={list}"));
        }
    }
    urls
}

/// One declared type: its name, resources per patient (0: empty) and rendered entries.
struct Type {
    name: &'static str,
    per_patient: u64,
    count: u64,
    step_ms: i64,
    entries: Entries,
}

impl Type {
    fn new(name: &'static str, per_patient: u64, patients: u64, base: &str) -> Type {
        let count = per_patient * patients;
        let step_ms = (5 * 365 * 24 * 3600 * 1000 / count.max(1) as i64).max(1);
        let entries = Entries::render_with(
            name,
            count,
            base,
            450,
            |i, out| write_id(name, i, out),
            |i, out| write_resource(name, per_patient, i, T0_MS + i as i64 * step_ms, out),
        );
        Type {
            name,
            per_patient,
            count,
            step_ms,
            entries,
        }
    }

    /// Resources with `lastUpdated` before (`strict`) or at or before `t_ns`.
    fn up_to(&self, t_ns: i128, strict: bool) -> u64 {
        let t0 = T0_MS as i128 * 1_000_000;
        let step = self.step_ms as i128 * 1_000_000;
        let d = t_ns - t0;
        let n = if strict {
            if d <= 0 {
                0
            } else {
                (d + step - 1) / step
            }
        } else if d < 0 {
            0
        } else {
            d / step + 1
        };
        n.min(self.count as i128) as u64
    }
}

fn write_id(name: &str, i: u64, out: &mut String) {
    let prefix = match name {
        "Patient" => "pat",
        _ => name,
    };
    let _ = write!(out, "{prefix}-{i:08}");
}

fn write_resource(name: &str, per_patient: u64, i: u64, last_updated: i64, out: &mut String) {
    let _ = write!(out, r#"{{"resourceType":"{name}","id":""#);
    write_id(name, i, out);
    out.push_str(r#"","meta":{"versionId":"1","lastUpdated":""#);
    write_instant(last_updated, out);
    out.push_str(r#""},"#);
    if name == "Patient" {
        let _ = write!(
            out,
            r#""identifier":[{{"system":"http://hospital.example.org/mrn","value":"MRN{i:010}"}}],"active":true,"name":[{{"family":"{}","given":["{}"]}}],"gender":"{}","birthDate":"{}-{:02}-{:02}","address":[{{"line":["{} Main Street"],"city":"Springfield","state":"MA","postalCode":"0{:04}"}}]}}"#,
            FAMILY[(i / 8 % 8) as usize],
            GIVEN[(i % 8) as usize],
            if i.is_multiple_of(2) {
                "male"
            } else {
                "female"
            },
            1930 + i % 90,
            1 + i % 12,
            1 + i % 28,
            1 + i % 999,
            1000 + i % 9000,
        );
        return;
    }
    let patient = i / per_patient;
    let field = match name {
        "Observation" | "DiagnosticReport" | "MedicationRequest" | "Encounter" | "Condition"
        | "Procedure" => "subject",
        _ => "patient",
    };
    let _ = write!(
        out,
        r#""status":"{}","code":{{"coding":[{{"system":"http://snomed.info/sct","code":"{}","display":"{name} code {}"}}],"text":"{name} {}"}},"{field}":{{"reference":"Patient/pat-{patient:08}"}},"note":[{{"text":"Recorded at the clinic visit."}}]}}"#,
        if name == "Condition" {
            "active"
        } else {
            "final"
        },
        100_000 + i % 977,
        i % 977,
        i % 977,
    );
}

/// The roster server.
pub struct Roster {
    base: String,
    patients: u64,
    types: Vec<Type>,
    metadata: Bytes,
    requests: AtomicU64,
    searches: AtomicU64,
    empty: AtomicU64,
    counts: AtomicU64,
    resources: AtomicU64,
}

impl Roster {
    /// `patients` patients, rendered with full URLs under `base`.
    pub fn new(patients: u64, base: &str) -> Roster {
        let mut types = vec![Type::new("Patient", 1, patients, base)];
        types.extend(RECORD.iter().map(|(t, n)| Type::new(t, *n, patients, base)));
        types.extend(EMPTY.iter().map(|t| Type::new(t, 0, patients, base)));
        let resources: Vec<String> = types
            .iter()
            .map(|t| {
                let by = if t.name == "Patient" { "_id" } else { "patient" };
                format!(
                    r#"{{"type":"{}","interaction":[{{"code":"read"}},{{"code":"search-type"}}],"searchParam":[{{"name":"_id","type":"token"}},{{"name":"_lastUpdated","type":"date"}},{{"name":"{by}","type":"{}"}}]}}"#,
                    t.name,
                    if by == "_id" { "token" } else { "reference" }
                )
            })
            .collect();
        let metadata = format!(
            r#"{{"resourceType":"CapabilityStatement","status":"active","date":"2020-01-01","kind":"instance","fhirVersion":"4.0.1","format":["application/fhir+json"],"rest":[{{"mode":"server","resource":[{},{{"type":"Group","interaction":[{{"code":"read"}}]}}]}}]}}"#,
            resources.join(",")
        );
        Roster {
            base: base.to_owned(),
            patients,
            types,
            metadata: Bytes::from(metadata),
            requests: AtomicU64::new(0),
            searches: AtomicU64::new(0),
            empty: AtomicU64::new(0),
            counts: AtomicU64::new(0),
            resources: AtomicU64::new(0),
        }
    }

    fn group(&self, n: &str) -> Resp {
        let Ok(n) = n.parse::<u64>() else {
            return outcome(StatusCode::NOT_FOUND, "no such Group");
        };
        let mut body = format!(
            r#"{{"resourceType":"Group","id":"roster-{n}","type":"person","actual":true,"quantity":{},"member":["#,
            n.clamp(1, self.patients)
        );
        for (k, p) in members(n, self.patients).enumerate() {
            if k > 0 {
                body.push(',');
            }
            let _ = write!(body, r#"{{"entity":{{"reference":"Patient/pat-{p:08}"}}}}"#);
        }
        body.push_str("]}");
        json(StatusCode::OK, body)
    }

    fn search(&self, t: &Type, query: &str) -> (Resp, u64) {
        let mut count: u64 = 100;
        let mut offset: u64 = 0;
        let mut summary_count = false;
        let (mut lo, mut hi) = (0u64, t.count);
        let mut patients: Option<Vec<u64>> = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "_count" => match v.parse() {
                    Ok(n) => count = n,
                    Err(_) => return (outcome(StatusCode::BAD_REQUEST, "bad _count"), 0),
                },
                "_offset" => match v.parse() {
                    Ok(n) => offset = n,
                    Err(_) => return (outcome(StatusCode::BAD_REQUEST, "bad _offset"), 0),
                },
                "_summary" if v == "count" => summary_count = true,
                "_elements" => {}
                "_sort" if v == "_lastUpdated" => {}
                "_lastUpdated" => {
                    let (prefix, value) = v.split_at(v.len().min(2));
                    let Some(at) = parse_instant(value) else {
                        return (outcome(StatusCode::BAD_REQUEST, "bad _lastUpdated"), 0);
                    };
                    match prefix {
                        "gt" => lo = lo.max(t.up_to(at, false)),
                        "ge" => lo = lo.max(t.up_to(at, true)),
                        "le" => hi = hi.min(t.up_to(at, false)),
                        "lt" => hi = hi.min(t.up_to(at, true)),
                        _ => return (outcome(StatusCode::BAD_REQUEST, "unsupported prefix"), 0),
                    }
                }
                "_id" if t.name == "Patient" => patients = Some(self.ids(&v, false)),
                "patient" | "subject" if t.name != "Patient" => {
                    patients = Some(self.ids(&v, true));
                }
                other => {
                    return (
                        outcome(
                            StatusCode::BAD_REQUEST,
                            &format!("unknown parameter {other}"),
                        ),
                        0,
                    )
                }
            }
        }
        if summary_count {
            count = 0;
        }
        // The matches as runs of entry indexes, in ascending order.
        let runs: Vec<(u64, u64)> = match patients {
            None => vec![(lo, hi.max(lo))],
            Some(mut ps) => {
                ps.sort_unstable();
                ps.dedup();
                ps.into_iter()
                    .map(|p| {
                        let (a, b) = (p * t.per_patient, (p + 1) * t.per_patient);
                        (a.max(lo), b.min(hi))
                    })
                    .filter(|(a, b)| a < b)
                    .collect()
            }
        };
        let total: u64 = runs.iter().map(|(a, b)| b - a).sum();
        let count = count.min(10_000);
        let start = offset.min(total);
        let end = (offset + count).min(total);
        let mut head = format!(
            r#"{{"resourceType":"Bundle","type":"searchset","total":{total},"link":[{{"relation":"self","url":"{}/{}?{query}"}}"#,
            self.base, t.name
        );
        if count > 0 && end < total {
            let next: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(
                    url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != "_offset"),
                )
                .append_pair("_offset", &end.to_string())
                .finish();
            let _ = write!(
                head,
                r#",{{"relation":"next","url":"{}/{}?{next}"}}"#,
                self.base, t.name
            );
        }
        head.push(']');
        if count == 0 {
            self.counts.fetch_add(1, Ordering::Relaxed);
            head.push('}');
            return (json(StatusCode::OK, head), 0);
        }
        self.searches.fetch_add(1, Ordering::Relaxed);
        if start == end {
            self.empty.fetch_add(1, Ordering::Relaxed);
        }
        self.resources.fetch_add(end - start, Ordering::Relaxed);
        head.push_str(r#","entry":["#);
        let mut chunks = VecDeque::from([Bytes::from(head)]);
        let mut skip = start;
        let mut left = end - start;
        for (a, b) in runs {
            if left == 0 {
                break;
            }
            let n = b - a;
            if skip >= n {
                skip -= n;
                continue;
            }
            let from = a + skip;
            let to = (from + left).min(b);
            skip = 0;
            if chunks.len() > 1 {
                chunks.push_back(Bytes::from_static(b","));
            }
            chunks.push_back(t.entries.range(from, to));
            left -= to - from;
        }
        chunks.push_back(Bytes::from_static(b"]}"));
        (chunked(StatusCode::OK, chunks), end - start)
    }

    /// The patient indexes a comma-separated list names (`Patient/pat-…` with `references`, else `pat-…`).
    fn ids(&self, list: &str, references: bool) -> Vec<u64> {
        list.split(',')
            .filter_map(|r| {
                let id = if references {
                    r.strip_prefix("Patient/").unwrap_or(r)
                } else {
                    r
                };
                id.strip_prefix("pat-")?.parse::<u64>().ok()
            })
            .filter(|p| *p < self.patients)
            .collect()
    }

    fn stats(&self) -> Resp {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json(
            StatusCode::OK,
            format!(
                r#"{{"requests":{},"searches":{},"empty":{},"counts":{},"resources":{}}}"#,
                n(&self.requests),
                n(&self.searches),
                n(&self.empty),
                n(&self.counts),
                n(&self.resources)
            ),
        )
    }
}

impl Handler for Roster {
    fn handle(&self, req: &Request<Incoming>) -> (Resp, u64) {
        let path = req.uri().path();
        if path == "/stats" {
            return (self.stats(), 0);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let Some(rest) = path.strip_prefix("/fhir/") else {
            return (outcome(StatusCode::NOT_FOUND, "unknown path"), 0);
        };
        if req.method() != hyper::Method::GET {
            return (
                outcome(StatusCode::METHOD_NOT_ALLOWED, "read-only server"),
                0,
            );
        }
        if rest == "metadata" {
            return (json(StatusCode::OK, self.metadata.clone()), 0);
        }
        if let Some(n) = rest.strip_prefix("Group/roster-") {
            return (self.group(n), 0);
        }
        match self.types.iter().find(|t| t.name == rest) {
            Some(t) => self.search(t, req.uri().query().unwrap_or("")),
            None => (outcome(StatusCode::NOT_FOUND, "unknown resource"), 0),
        }
    }

    fn is_search(&self, path: &str) -> bool {
        path.strip_prefix("/fhir/")
            .is_some_and(|t| self.types.iter().any(|k| k.name == t))
    }
}
