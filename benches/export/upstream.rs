//! The fast upstream: a tiny FHIR R4 server over a synthetic data set, serving pre-built pages.
//!
//! Resource `i` of a type is a pure function of `i` (ids, `meta.versionId`, `meta.lastUpdated` strictly
//! increasing with `i`, millisecond precision). Every search entry is rendered once at start, back to back
//! in one buffer, so a search resolves its `_lastUpdated` bounds to an index range by arithmetic and
//! answers with a slice of that buffer between a formatted head and tail: the upstream spends next to no
//! CPU of its own, and the proxy is what the benchmark measures. It serves:
//!
//! - `GET /fhir/metadata`: a CapabilityStatement (Patient, Observation; `search-type`; `_lastUpdated`, `_id`,
//!   `patient`);
//! - `GET /fhir/{Patient|Observation}?_count&_offset&_lastUpdated=(gt|ge|lt|le)X...&_sort=(-)_lastUpdated`:
//!   searchset pages with `Bundle.total` and an absolute `link[next]` (`_offset`); `_count=0`: total only;
//! - `GET /fhir/Patient/1`: a small fixed JSON, the cheap endpoint of the pass-through load.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// 2020-01-01T00:00:00Z in milliseconds since the epoch: the oldest `lastUpdated`.
pub const T0_MS: i64 = 1_577_836_800_000;
/// The data set's `lastUpdated` values spread over five years from [`T0_MS`].
const SPAN_MS: i64 = 5 * 365 * 24 * 3600 * 1000;

/// The small fixed resource of the pass-through load.
pub const PATIENT_1: &str = r#"{"resourceType":"Patient","id":"1","meta":{"versionId":"1","lastUpdated":"2020-01-01T00:00:00.000Z"},"active":true,"name":[{"family":"Bench","given":["Pat"]}],"gender":"female","birthDate":"1970-01-01"}"#;

/// One searchable type of the data set.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    /// FHIR type name.
    pub name: &'static str,
    /// Resources of the type.
    pub count: u64,
    /// Milliseconds between the `lastUpdated` of two consecutive resources.
    pub step_ms: i64,
}

impl Kind {
    /// A type of `count` resources spread over the span.
    pub fn new(name: &'static str, count: u64) -> Kind {
        let step_ms = (SPAN_MS / count.max(1) as i64).max(1);
        Kind {
            name,
            count,
            step_ms,
        }
    }

    /// `meta.lastUpdated` of resource `i`, in ms.
    fn last_updated(&self, i: u64) -> i64 {
        T0_MS + i as i64 * self.step_ms
    }

    /// Number of resources with `lastUpdated <= t` (t in ns since the epoch).
    fn at_or_before(&self, t_ns: i128) -> u64 {
        let t0 = T0_MS as i128 * 1_000_000;
        if t_ns < t0 {
            return 0;
        }
        let step = self.step_ms as i128 * 1_000_000;
        (((t_ns - t0) / step) + 1).min(self.count as i128) as u64
    }

    /// Number of resources with `lastUpdated < t` (t in ns since the epoch).
    fn before(&self, t_ns: i128) -> u64 {
        let t0 = T0_MS as i128 * 1_000_000;
        if t_ns <= t0 {
            return 0;
        }
        let step = self.step_ms as i128 * 1_000_000;
        // ceil((t - t0) / step)
        (((t_ns - t0) + step - 1) / step).min(self.count as i128) as u64
    }

    /// Appends resource `i` as compact JSON.
    pub fn write_resource(&self, i: u64, out: &mut String) {
        match self.name {
            "Patient" => write_patient(self, i, out),
            _ => write_observation(self, i, out),
        }
    }

    fn id(&self, i: u64, out: &mut String) {
        let prefix = if self.name == "Patient" { "pat" } else { "obs" };
        let _ = write!(out, "{prefix}-{i:08}");
    }
}

/// The data set: Observation with `observations` resources, Patient with a twentieth of that, each type
/// with its rendered search entries.
pub struct Dataset {
    kinds: Vec<(Kind, Entries)>,
}

/// The search entries of one type, rendered once: entry `i` is `buf[at[i]..at[i + 1] - 1]`, each
/// followed by a comma, so that the entries `a..b` in ascending order are one slice.
pub struct Entries {
    buf: Bytes,
    at: Vec<usize>,
}

impl Entries {
    /// Renders every entry of `kind`, with full URLs under `base`.
    fn render(kind: &Kind, base: &str) -> Entries {
        Entries::render_with(
            kind.name,
            kind.count,
            base,
            1700,
            |i, out| kind.id(i, out),
            |i, out| kind.write_resource(i, out),
        )
    }

    /// Renders `count` entries of type `name` (about `size` bytes each), entry `i` with the id `id`
    /// writes and the resource `resource` writes.
    pub fn render_with(
        name: &str,
        count: u64,
        base: &str,
        size: usize,
        mut id: impl FnMut(u64, &mut String),
        mut resource: impl FnMut(u64, &mut String),
    ) -> Entries {
        let mut buf = String::with_capacity(count as usize * size);
        let mut at = Vec::with_capacity(count as usize + 1);
        for i in 0..count {
            at.push(buf.len());
            let _ = write!(buf, r#"{{"fullUrl":"{base}/{name}/"#);
            id(i, &mut buf);
            buf.push_str(r#"","resource":"#);
            resource(i, &mut buf);
            buf.push_str(r#","search":{"mode":"match"}},"#);
        }
        at.push(buf.len());
        Entries {
            buf: Bytes::from(buf),
            at,
        }
    }

    /// Entry `i`, without its comma.
    fn one(&self, i: u64) -> Bytes {
        let i = i as usize;
        self.buf.slice(self.at[i]..self.at[i + 1] - 1)
    }

    /// Entries `a..b` (`a < b`), comma-separated, without copying.
    pub fn range(&self, a: u64, b: u64) -> Bytes {
        self.buf.slice(self.at[a as usize]..self.at[b as usize] - 1)
    }
}

impl Dataset {
    /// `observations` Observations and `observations / 20` (at least 10) Patients, rendered with full
    /// URLs under `base`.
    pub fn new(observations: u64, base: &str) -> Dataset {
        let kinds = [
            Kind::new("Observation", observations),
            Kind::new("Patient", (observations / 20).max(10)),
        ];
        Dataset {
            kinds: kinds
                .into_iter()
                .map(|k| (k, Entries::render(&k, base)))
                .collect(),
        }
    }

    fn kind(&self, name: &str) -> Option<&(Kind, Entries)> {
        self.kinds.iter().find(|(k, _)| k.name == name)
    }
}

/// Formats ms since the epoch as `YYYY-MM-DDThh:mm:ss.sssZ`.
pub fn write_instant(ms: i64, out: &mut String) {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses a FHIR instant/dateTime/date to ns since the epoch (a date alone is its midnight, UTC).
pub fn parse_instant(s: &str) -> Option<i128> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp() as i128 * 1_000_000_000 + t.timestamp_subsec_nanos() as i128);
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let t = d.and_hms_opt(0, 0, 0)?.and_utc();
    Some(t.timestamp() as i128 * 1_000_000_000)
}

const LABS: [(&str, &str, &str, u32, u32); 6] = [
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70, 100),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        120,
        200,
    ),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12, 17),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        1,
        2,
    ),
    (
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        3,
        5,
    ),
    (
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        135,
        145,
    ),
];

pub const FAMILY: [&str; 8] = [
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
];
pub const GIVEN: [&str; 8] = [
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda",
];

fn write_observation(kind: &Kind, i: u64, out: &mut String) {
    let (loinc, name, unit, low, high) = LABS[(i % LABS.len() as u64) as usize];
    let patient = i / 20;
    let value = low as u64 * 10 + (i * 7919) % ((high - low + 1) as u64 * 10);
    let last_updated = kind.last_updated(i);
    out.push_str(r#"{"resourceType":"Observation","id":""#);
    kind.id(i, out);
    let _ = write!(
        out,
        r#"","meta":{{"versionId":"{}","lastUpdated":""#,
        1 + i % 3
    );
    write_instant(last_updated, out);
    out.push_str(r##"","source":"#lab-system","profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory","display":"Laboratory"}],"text":"Laboratory"}],"code":{"coding":[{"system":"http://loinc.org","code":""##);
    let _ = write!(
        out,
        r#"{loinc}","display":"{name}"}}],"text":"{name}"}},"subject":{{"reference":"Patient/pat-{patient:08}","display":"{} {}"}},"encounter":{{"reference":"Encounter/enc-{:08}"}},"effectiveDateTime":""#,
        GIVEN[(patient % 8) as usize],
        FAMILY[(patient / 8 % 8) as usize],
        i / 4
    );
    write_instant(last_updated - 3_600_000, out);
    out.push_str(r#"","issued":""#);
    write_instant(last_updated - 60_000, out);
    let _ = write!(
        out,
        r#"","performer":[{{"reference":"Practitioner/prac-{:04}","display":"Dr. {} {}"}}],"valueQuantity":{{"value":{}.{},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}},"interpretation":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"N","display":"Normal"}}],"text":"Normal"}}],"referenceRange":[{{"low":{{"value":{low},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}},"high":{{"value":{high},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}},"text":"{low}-{high} {unit}"}}],"note":[{{"text":"Specimen collected after an overnight fast; result verified by the laboratory."}}]}}"#,
        i % 997,
        GIVEN[(i / 3 % 8) as usize],
        FAMILY[(i / 5 % 8) as usize],
        value / 10,
        value % 10,
    );
}

fn write_patient(kind: &Kind, i: u64, out: &mut String) {
    out.push_str(r#"{"resourceType":"Patient","id":""#);
    kind.id(i, out);
    let _ = write!(
        out,
        r#"","meta":{{"versionId":"{}","lastUpdated":""#,
        1 + i % 2
    );
    write_instant(kind.last_updated(i), out);
    let _ = write!(
        out,
        r#"","profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]}},"identifier":[{{"use":"usual","type":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical Record Number"}}],"text":"Medical Record Number"}},"system":"http://hospital.example.org/mrn","value":"MRN{i:010}"}}],"active":true,"name":[{{"use":"official","family":"{}","given":["{}"]}}],"telecom":[{{"system":"phone","value":"555-{:04}","use":"home"}}],"gender":"{}","birthDate":"{}-{:02}-{:02}","address":[{{"use":"home","line":["{} Main Street"],"city":"Springfield","state":"MA","postalCode":"0{:04}","country":"US"}}],"communication":[{{"language":{{"coding":[{{"system":"urn:ietf:bcp:47","code":"en-US","display":"English (United States)"}}],"text":"English"}}}}]}}"#,
        FAMILY[(i / 8 % 8) as usize],
        GIVEN[(i % 8) as usize],
        i % 10_000,
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
}

fn capability_statement() -> String {
    let resource = |name: &str, params: &[(&str, &str)]| {
        let params: Vec<String> = params
            .iter()
            .map(|(n, t)| format!(r#"{{"name":"{n}","type":"{t}"}}"#))
            .collect();
        format!(
            r#"{{"type":"{name}","interaction":[{{"code":"read"}},{{"code":"search-type"}}],"searchParam":[{}]}}"#,
            params.join(",")
        )
    };
    format!(
        r#"{{"resourceType":"CapabilityStatement","status":"active","date":"2020-01-01","kind":"instance","fhirVersion":"4.0.1","format":["application/fhir+json"],"rest":[{{"mode":"server","resource":[{},{}]}}]}}"#,
        resource("Patient", &[("_id", "token"), ("_lastUpdated", "date")]),
        resource(
            "Observation",
            &[
                ("_id", "token"),
                ("_lastUpdated", "date"),
                ("patient", "reference")
            ]
        ),
    )
}

struct Server {
    dataset: Dataset,
    base: String,
    metadata: Bytes,
}

/// A response body sent as the chunks it is made of (a page: head, entries, tail), with its length known.
pub struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

/// An answer of a bench upstream.
pub type Resp = Response<Chunks>;

/// A one-chunk FHIR JSON answer.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    chunked(status, VecDeque::from([body.into()]))
}

/// A FHIR JSON answer sent as `chunks`.
pub fn chunked(status: StatusCode, chunks: VecDeque<Bytes>) -> Resp {
    let mut r = Response::new(Chunks(chunks));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    r
}

/// An OperationOutcome answer.
pub fn outcome(status: StatusCode, text: &str) -> Resp {
    json(
        status,
        format!(
            r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"processing","diagnostics":"{}"}}]}}"#,
            text.replace('"', "'")
        ),
    )
}

impl Server {
    /// The answer to `req` and the entries it holds (what a search costs a real server).
    fn handle(&self, req: &Request<Incoming>) -> (Resp, u64) {
        let path = req.uri().path();
        let Some(rest) = path.strip_prefix("/fhir/") else {
            return (outcome(StatusCode::NOT_FOUND, "unknown path"), 0);
        };
        if req.method() != hyper::Method::GET {
            return (
                outcome(StatusCode::METHOD_NOT_ALLOWED, "read-only server"),
                0,
            );
        }
        match rest {
            "metadata" => (json(StatusCode::OK, self.metadata.clone()), 0),
            "Patient/1" => (
                json(StatusCode::OK, Bytes::from_static(PATIENT_1.as_bytes())),
                1,
            ),
            _ => match self.dataset.kind(rest) {
                Some((kind, entries)) => {
                    self.search(kind, entries, req.uri().query().unwrap_or(""))
                }
                None => (outcome(StatusCode::NOT_FOUND, "unknown resource"), 0),
            },
        }
    }

    fn search(&self, kind: &Kind, entries: &Entries, query: &str) -> (Resp, u64) {
        let mut count: u64 = 100;
        let mut offset: u64 = 0;
        let mut desc = false;
        let (mut lo, mut hi) = (0u64, kind.count);
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
                "_sort" => match &*v {
                    "_lastUpdated" => desc = false,
                    "-_lastUpdated" => desc = true,
                    _ => return (outcome(StatusCode::BAD_REQUEST, "unsupported _sort"), 0),
                },
                "_lastUpdated" => {
                    if v.len() < 3 {
                        return (outcome(StatusCode::BAD_REQUEST, "bad _lastUpdated"), 0);
                    }
                    let (prefix, value) = v.split_at(2);
                    let Some(t) = parse_instant(value) else {
                        return (
                            outcome(StatusCode::BAD_REQUEST, "bad _lastUpdated value"),
                            0,
                        );
                    };
                    match prefix {
                        "gt" => lo = lo.max(kind.at_or_before(t)),
                        "ge" => lo = lo.max(kind.before(t)),
                        "le" => hi = hi.min(kind.at_or_before(t)),
                        "lt" => hi = hi.min(kind.before(t)),
                        _ => return (outcome(StatusCode::BAD_REQUEST, "unsupported prefix"), 0),
                    }
                }
                _ => {}
            }
        }
        let count = count.min(10_000);
        let total = hi.saturating_sub(lo);
        let start = offset.min(total);
        let end = (offset + count).min(total);
        let mut head = String::with_capacity(512);
        let self_url = format!("{}/{}?{}", self.base, kind.name, query);
        let _ = write!(
            head,
            r#"{{"resourceType":"Bundle","id":"{}-{lo}-{hi}-{}-{start}-{count}","type":"searchset","total":{total},"link":[{{"relation":"self","url":"{}"}}"#,
            kind.name, desc as u8, self_url
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
                r#",{{"relation":"next","url":"{}/{}?{}"}}"#,
                self.base, kind.name, next
            );
        }
        head.push(']');
        if count == 0 {
            head.push('}');
            return (json(StatusCode::OK, head), 0);
        }
        head.push_str(r#","entry":["#);
        let mut chunks = VecDeque::from([Bytes::from(head)]);
        if start < end {
            chunks.push_back(if desc {
                // The proxy only pages oldest first; newest first is kept working by copying the entries.
                let mut body = Vec::with_capacity(entries.range(hi - end, hi - start).len());
                for k in start..end {
                    if k > start {
                        body.push(b',');
                    }
                    body.extend_from_slice(&entries.one(hi - 1 - k));
                }
                Bytes::from(body)
            } else {
                entries.range(lo + start, lo + end)
            });
        }
        chunks.push_back(Bytes::from_static(b"]}"));
        (chunked(StatusCode::OK, chunks), end - start)
    }
}

fn is_search(path: &str) -> bool {
    matches!(path, "/fhir/Patient" | "/fhir/Observation")
}

/// What serving costs the fast upstream, to mimic a real server.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    /// Latency every search answers after.
    pub delay: std::time::Duration,
    /// Requests served at once; the rest wait their turn (0: no limit).
    pub capacity: usize,
    /// Time per resource answered, added to the delay while a request holds its place.
    pub per_entry: std::time::Duration,
}

/// A bench upstream's request handling: the answer to a request and the resources it holds (what a
/// search costs a real server), and whether a path is a search (which pays the per-search cost).
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req`, and the resources in it.
    fn handle(&self, req: &Request<Incoming>) -> (Resp, u64);
    /// Whether `path` is a search.
    fn is_search(&self, path: &str) -> bool;
}

impl Handler for Server {
    fn handle(&self, req: &Request<Incoming>) -> (Resp, u64) {
        Server::handle(self, req)
    }

    fn is_search(&self, path: &str) -> bool {
        is_search(path)
    }
}

/// Serves the data set of `observations` Observations on 127.0.0.1 (random port) until killed; prints
/// `listening {base}` on stdout once bound. Searches answer after `cost.delay` (zero: at once); with a
/// capacity, every request waits for one of `cost.capacity` places and holds it for its delay and
/// `cost.per_entry` per resource it answers, as a server with that many workers does.
pub fn serve(observations: u64, cost: Cost) {
    serve_with(cost, |base| Server {
        dataset: Dataset::new(observations, base),
        base: base.to_owned(),
        metadata: Bytes::from(capability_statement()),
    });
}

/// Serves what `make` builds for the base URL on 127.0.0.1 (random port) until killed, at `cost`
/// (see [`serve`]); prints `listening {base}` on stdout once bound.
pub fn serve_with<H: Handler>(cost: Cost, make: impl FnOnce(&str) -> H) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let base = format!("http://{addr}/fhir");
        let server = Arc::new(make(&base));
        let places =
            (cost.capacity > 0).then(|| Arc::new(tokio::sync::Semaphore::new(cost.capacity)));
        println!("listening {base}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = server.clone();
            let places = places.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let server = server.clone();
                    let places = places.clone();
                    async move {
                        let _place = match &places {
                            Some(p) => Some(p.clone().acquire_owned().await.expect("never closed")),
                            None => None,
                        };
                        let (resp, entries) = server.handle(&req);
                        let mut wait = cost.per_entry * entries as u32;
                        if server.is_search(req.uri().path()) {
                            wait += cost.delay;
                        }
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
