//! Property-based bad input against one running proxy: random kick-off query strings, headers,
//! `Parameters` bodies, `_typeFilter`s, status ids and file paths. Every answer must be a 2xx or 4xx
//! (never a 5xx, never a dropped connection), every 4xx must carry an OperationOutcome, and nothing
//! outside the data directory is ever served (a canary file sits next to it).
//!
//! Requests go out as raw HTTP/1.1 over a `TcpStream`, so paths reach the proxy byte for byte.
//! The runs are seeded (`FBP_FUZZ_SEED` overrides) and so reproducible.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

const CASES: u32 = 300;

/// What the fuzz run needs to know about the proxy under test.
struct Target {
    base: String,
    host: String,
    base_path: String,
    canary: String,
    job_id: String,
    file_name: String,
    requests: AtomicUsize,
    accepted: AtomicUsize,
    /// 4xx answers without an OperationOutcome to requests hyper itself rejects (not a failure).
    bare_4xx: AtomicUsize,
}

impl Target {
    /// Sends one request byte for byte; `Err` describes a dropped connection or garbage answer.
    fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Raw, String> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut stream = TcpStream::connect(&self.host).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.host
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "POST" || !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body);
        // A server may answer (413, 431) and close before reading everything: that is fine as long
        // as the answer arrives.
        let write_error = stream.write_all(&wire).err();
        let mut response = Vec::new();
        let read_error = stream.read_to_end(&mut response).err();
        if response.is_empty() {
            return Err(format!(
                "DROPPED CONNECTION: no answer (write error {write_error:?}, read error {read_error:?})"
            ));
        }
        Raw::parse(&response)
    }

    /// The properties every answer must have; `what` describes the request for the failure message.
    fn check(&self, raw: &Raw, what: &str) -> Result<(), TestCaseError> {
        self.check_with(raw, what, true)
    }

    /// `check`, with the OperationOutcome of a 4xx only counted (in `bare_4xx`) when not `strict`.
    fn check_with(&self, raw: &Raw, what: &str, strict: bool) -> Result<(), TestCaseError> {
        let body = String::from_utf8_lossy(&raw.body);
        let shown = || body.chars().take(400).collect::<String>();
        prop_assert!(
            !body.contains(&self.canary),
            "SERVED A FILE OUTSIDE THE DATA DIRECTORY: {what}"
        );
        prop_assert!(!body.contains("root:x:0:0"), "served /etc/passwd: {what}");
        prop_assert!(
            (200..300).contains(&raw.status) || (400..500).contains(&raw.status),
            "answered {} (neither 2xx nor 4xx) to {what}: {}",
            raw.status,
            shown()
        );
        if (400..500).contains(&raw.status) && !strict {
            let ok = serde_json::from_slice::<Value>(&raw.body)
                .is_ok_and(|o| o["resourceType"] == "OperationOutcome");
            if !ok {
                self.bare_4xx.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        if (400..500).contains(&raw.status) {
            let outcome: Value = serde_json::from_slice(&raw.body).map_err(|e| {
                TestCaseError::fail(format!(
                    "{} without a JSON OperationOutcome ({e}) to {what}: {:?}",
                    raw.status,
                    shown()
                ))
            })?;
            prop_assert_eq!(
                &outcome["resourceType"],
                "OperationOutcome",
                "{} body is not an OperationOutcome, to {}: {}",
                raw.status,
                what,
                shown()
            );
            let issue = &outcome["issue"][0];
            prop_assert!(
                issue["severity"].is_string() && issue["code"].is_string(),
                "{} OperationOutcome without issue[0].severity/code, to {what}: {}",
                raw.status,
                shown()
            );
        }
        Ok(())
    }

    /// Sends, checks, and deletes a job the request happened to start.
    fn probe(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(), TestCaseError> {
        let what = format!(
            "{method} {} headers {headers:?} body {:?}",
            cut(target, 300),
            cut(&String::from_utf8_lossy(body), 300)
        );
        let raw = self
            .send(method, target, headers, body)
            .map_err(|e| TestCaseError::fail(format!("{e}: {what}")))?;
        self.check(&raw, &what)?;
        if raw.status == 202 && method != "DELETE" {
            if let Some(location) = raw.header("Content-Location") {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                let path = url_path(location);
                let deleted = self
                    .send("DELETE", &path, &[], b"")
                    .map_err(|e| TestCaseError::fail(format!("DELETE {path}: {e}")))?;
                self.check(&deleted, &format!("DELETE {path} after {what}"))?;
            }
        }
        Ok(())
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_owned()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…({} bytes)", &s[..end], s.len())
    }
}

// ---- Strategies ----

const KNOWN_PARAMS: &[&str] = &[
    "_type",
    "_since",
    "_outputFormat",
    "_elements",
    "_typeFilter",
    "patient",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
    "_count",
    "_format",
    "_lastUpdated",
];

/// A query value already in wire form.
fn wire_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop_oneof![
            Just("Patient".to_owned()),
            Just("Patient,Observation".to_owned()),
            Just("Observation,,".to_owned()),
            Just("application/fhir+ndjson".to_owned()),
            Just("2024-01-01T00:00:00Z".to_owned()),
            Just("Patient.id,name".to_owned()),
            Just("Patient/abc".to_owned()),
            "[A-Z][a-z]{0,14}",
            "[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2}))?",
        ]
        .prop_map(|v| enc(&v)),
        2 => any::<String>().prop_map(|v| enc(&v)),
        1 => (1usize..20_000).prop_map(|n| "a".repeat(n)),
        2 => "(%[0-9A-Fa-f]{2}|%|%G1|%00|%FF|%C0%AF|%2F|%2f|%2e%2e|\\.\\.|/|\\+|=|&|;|,|[a-z]){1,12}",
    ]
    .boxed()
}

fn param_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::sample::select(KNOWN_PARAMS).prop_map(str::to_owned),
        1 => "[A-Za-z_.:\\-]{1,16}",
        1 => any::<String>().prop_map(|v| enc(&v)),
    ]
    .boxed()
}

fn query() -> BoxedStrategy<String> {
    proptest::collection::vec((param_name(), wire_value(), any::<bool>()), 0..6)
        .prop_map(|pairs| {
            pairs
                .iter()
                .map(|(n, v, bare)| {
                    if *bare && v.len() < 5 {
                        n.clone()
                    } else {
                        format!("{n}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join("&")
        })
        .boxed()
}

fn header_value(valid: &'static [&'static str]) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        4 => proptest::sample::select(valid).prop_map(|v| Some(v.to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,60}".prop_map(|v| Some(v.trim().to_owned())),
    ]
    .boxed()
}

fn headers() -> BoxedStrategy<Vec<(String, String)>> {
    (
        header_value(&[
            "application/fhir+json",
            "application/fhir+json",
            "application/json",
            "*/*",
            "text/html",
            "application/fhir+json; q=0.5, */*;q=0.1",
        ]),
        header_value(&[
            "respond-async",
            "respond-async",
            "respond-async, handling=lenient",
            "handling=strict",
            "respond-async;handling=lenient",
            "return=minimal",
        ]),
    )
        .prop_map(|(accept, prefer)| {
            let mut h = Vec::new();
            if let Some(a) = accept {
                h.push(("Accept".to_owned(), a));
            }
            if let Some(p) = prefer {
                h.push(("Prefer".to_owned(), p));
            }
            h
        })
        .boxed()
}

fn kickoff_path(base_path: String) -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(format!("{base_path}/$export")),
        2 => Just(format!("{base_path}/Patient/$export")),
        1 => Just(format!("{base_path}/Group/bulk-test-group/$export")),
        1 => "[A-Za-z0-9\\-.]{1,70}".prop_map(move |g| format!("{base_path}/Group/{g}/$export")),
    ]
    .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        proptest::sample::select(KNOWN_PARAMS).prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    "[a-zA-Z]{1,12}",
                    proptest::sample::select(
                        &[
                            "resourceType",
                            "parameter",
                            "name",
                            "valueString",
                            "valueCode",
                            "valueInstant",
                            "valueReference",
                            "reference",
                            "resource",
                            "part",
                        ][..]
                    )
                    .prop_map(str::to_owned)
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn parameter() -> BoxedStrategy<Value> {
    (
        param_name(),
        proptest::sample::select(
            &[
                "valueString",
                "valueCode",
                "valueInstant",
                "valueReference",
                "valueInteger",
                "valueBoolean",
                "resource",
                "part",
            ][..],
        ),
        json_value(),
        wire_value(),
    )
        .prop_map(|(name, kind, random, text)| {
            let value = match kind {
                "valueString" | "valueCode" | "valueInstant" => Value::String(text),
                "valueReference" => serde_json::json!({"reference": text}),
                _ => random,
            };
            serde_json::json!({"name": name, kind: value})
        })
        .boxed()
}

fn post_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(parameter(), 0..6).prop_map(|ps| {
            serde_json::json!({"resourceType": "Parameters", "parameter": ps}).to_string().into_bytes()
        }),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => "[{}\\[\\]\",:a-z0-9 ]{0,200}".prop_map(String::into_bytes),
        1 => (500_000usize..1_600_000).prop_map(|n| {
            format!(
                r#"{{"resourceType":"Parameters","parameter":[{{"name":"_type","valueString":"{}"}}]}}"#,
                "P".repeat(n)
            )
            .into_bytes()
        }),
    ]
    .boxed()
}

fn type_filter() -> BoxedStrategy<String> {
    let ty = prop_oneof![
        proptest::sample::select(&["Patient", "Observation", "Condition", "Basic", "Group"][..])
            .prop_map(str::to_owned),
        "[A-Za-z]{0,12}",
        any::<String>(),
    ];
    let pair = (
        prop_oneof![
            proptest::sample::select(
                &[
                    "gender",
                    "code",
                    "_id",
                    "_count",
                    "_sort",
                    "_include",
                    "status",
                    "subject:missing",
                    "_lastUpdated"
                ][..]
            )
            .prop_map(str::to_owned),
            "[a-z_:\\-.]{0,12}",
        ],
        prop_oneof!["[a-zA-Z0-9|,:\\-]{0,20}", any::<String>()],
    );
    proptest::collection::vec(
        (ty, proptest::collection::vec(pair, 0..4), any::<bool>()),
        1..4,
    )
    .prop_map(|filters| {
        filters
            .iter()
            .map(|(ty, pairs, with_q)| {
                let q: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
                if *with_q {
                    format!("{ty}?{}", q.join("&"))
                } else {
                    format!("{ty}{}", q.join("&"))
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    })
    .boxed()
}

/// Path segments meant to escape a job directory.
fn hostile_segment(target_job: String, file: String) -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::sample::select(&[
            "..",
            "%2e%2e",
            "%2E%2E",
            ".%2e",
            "..%2F..%2F..%2Fcanary.txt",
            "..%2f..%2fcanary.txt",
            "%2e%2e%2fcanary.txt",
            "..%5C..%5Ccanary.txt",
            "canary.txt",
            "%00",
            "a%00.ndjson",
            "%2F",
            "%252e%252e",
            "%C0%AE%C0%AE",
            "~",
            ".",
            "",
            "sled",
            "db",
            "conf",
        ][..])
        .prop_map(str::to_owned),
        1 => "[0-9a-f]{32}",
        1 => "[A-Za-z0-9._~!$&'()*+,;=:@%\\-]{0,40}",
        1 => (1usize..5000).prop_map(|n| "x".repeat(n)),
        2 => Just(target_job),
        2 => Just(file),
    ]
    .boxed()
}

// ---- The run ----

fn runner(name: &str, cases: u32) -> TestRunner {
    let seed: u64 = std::env::var("FBP_FUZZ_SEED")
        .ok()
        .map(|s| s.parse().expect("FBP_FUZZ_SEED is a u64"))
        .unwrap_or(0xf022_2024);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    for (i, b) in name.bytes().enumerate() {
        bytes[8 + i % 24] ^= b;
    }
    println!("fuzz section {name}: seed {seed:#x}, {cases} cases");
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        max_shrink_time: 20_000,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
    total: &mut u32,
    failures: &mut Vec<String>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = runner(name, cases);
    let ran = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&strategy, |value| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(value)
    });
    // Cases run, shrinking attempts after a failure included.
    let ran = ran.into_inner();
    println!("fuzz section {name}: {ran} cases run");
    *total += ran;
    if let Err(e) = result {
        let e = e.to_string();
        println!("fuzz section {name} FAILED: {}", cut(&e, 3000));
        failures.push(format!("{name}: {}", cut(&e, 3000)));
    }
}

#[test]
fn bad_input_never_gets_5xx_and_never_escapes() {
    let proxy = Proxy::start(
        &upstream(),
        "max_concurrent_jobs = 64\nmax_jobs_per_client = 64",
    );
    let parent = proxy.data_dir.parent().unwrap();
    let canary = format!(
        "CANARY-{:016x}-do-not-serve",
        std::process::id() as u64 * 7919
    );
    std::fs::write(parent.join("canary.txt"), &canary).unwrap();
    std::fs::write(parent.join("canary.ndjson"), &canary).unwrap();
    std::fs::write(proxy.data_dir.join("canary.txt"), &canary).unwrap();

    // One real, complete job, so that file paths can start from a real job directory.
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    let (manifest, _) = wait_manifest(&status_url, None);
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let job_id = status_url.rsplit('/').next().unwrap().to_owned();
    let file_name = file_url.rsplit('/').next().unwrap().to_owned();
    let job_dir = std::fs::read_dir(&proxy.data_dir)
        .unwrap()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .find(|e| e.file_name().to_string_lossy() == job_id)
        .map(|e| e.path());
    if let Some(dir) = &job_dir {
        std::fs::write(dir.join("canary.txt"), &canary).ok();
        std::fs::write(dir.parent().unwrap().join("canary.txt"), &canary).ok();
    }
    // Files in the job directory that the manifest does not list must not be served either:
    // canary.txt just planted there is one.

    let target = Target {
        host: origin(&proxy.base)
            .strip_prefix("http://")
            .unwrap()
            .to_owned(),
        base_path: url_path(&proxy.base),
        base: proxy.base.clone(),
        canary,
        job_id,
        file_name,
        requests: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        bare_4xx: AtomicUsize::new(0),
    };
    let bp = target.base_path.clone();
    let mut total = 0;
    let mut failures = Vec::new();

    run(
        "kickoff-get",
        CASES,
        (kickoff_path(bp.clone()), query(), headers()),
        |(path, query, headers)| {
            let target_path = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            target.probe("GET", &target_path, &headers, b"")
        },
        &mut total,
        &mut failures,
    );

    run(
        "typefilter",
        CASES / 2,
        (type_filter(), any::<bool>(), headers()),
        |(filter, lenient, mut headers)| {
            headers.retain(|(n, _)| n != "Prefer");
            let prefer = if lenient {
                "respond-async, handling=lenient"
            } else {
                "respond-async"
            };
            headers.push(("Prefer".into(), prefer.into()));
            let q = format!(
                "{bp}/$export?_type=Patient,Observation&_typeFilter={}",
                enc(&filter)
            );
            target.probe("GET", &q, &headers, b"")
        },
        &mut total,
        &mut failures,
    );

    run(
        "kickoff-post",
        CASES,
        (
            kickoff_path(bp.clone()),
            post_body(),
            headers(),
            header_value(&[
                "application/fhir+json",
                "application/json",
                "text/plain",
                "application/x-www-form-urlencoded",
            ]),
        ),
        |(path, body, mut headers, content_type)| {
            if let Some(ct) = content_type {
                headers.push(("Content-Type".into(), ct));
            }
            target.probe("POST", &path, &headers, &body)
        },
        &mut total,
        &mut failures,
    );

    let seg = || hostile_segment(target.job_id.clone(), target.file_name.clone());
    run(
        "status-and-files",
        CASES,
        (
            proptest::sample::select(&["$bulk-status", "$bulk-files"][..]),
            proptest::collection::vec(seg(), 1..5),
            proptest::sample::select(&["GET", "DELETE", "GET"][..]),
        ),
        |(kind, segments, method)| {
            // Never DELETE the real job: the next cases need it.
            if method == "DELETE" && segments.len() == 1 && segments[0] == target.job_id {
                return Ok(());
            }
            let path = format!("{bp}/{kind}/{}", segments.join("/"));
            target.probe(method, &path, &[], b"")
        },
        &mut total,
        &mut failures,
    );

    // Request targets that are not valid URIs (characters RFC 3986 forbids, raw UTF-8, NUL): hyper
    // answers 400 before the proxy sees them, so a missing OperationOutcome is only counted here;
    // a 5xx, a dropped connection or a served canary still fail.
    run(
        "invalid-request-target",
        CASES / 2,
        (
            proptest::sample::select(&["$bulk-status", "$bulk-files", "$export"][..]),
            proptest::collection::vec(
                "[!-~&&[^?#]]{0,20}|[<>\"{}|\\^`]{1,3}|\\PC{1,6}|\\x00",
                1..4,
            ),
        ),
        |(kind, segments)| {
            let path = format!("{bp}/{kind}/{}", segments.join("/"));
            let what = format!("GET {:?}", cut(&path, 300));
            let raw = target
                .send("GET", &path, &[], b"")
                .map_err(|e| TestCaseError::fail(format!("{e}: {what}")))?;
            target.check_with(&raw, &what, false)
        },
        &mut total,
        &mut failures,
    );

    // A request head over `max_header_bytes` (64 KiB): 431, with an OperationOutcome like any 4xx.
    // A request-target over 65,534 bytes cannot even be parsed (the `http` crate's URI limit): hyper
    // answers 414 before the proxy sees it, so those are only counted, like invalid targets above.
    run(
        "oversized-head",
        8,
        (
            kickoff_path(bp.clone()),
            66_000usize..200_000,
            any::<bool>(),
        ),
        |(path, n, in_header)| {
            let mut headers = vec![
                ("Accept".to_owned(), "application/fhir+json".to_owned()),
                ("Prefer".to_owned(), "respond-async".to_owned()),
            ];
            let path = if in_header {
                headers.push(("X-Padding".to_owned(), "p".repeat(n)));
                path
            } else {
                format!("{path}?_type={}", "a".repeat(n))
            };
            if in_header {
                return target.probe("GET", &path, &headers, b"");
            }
            let raw = target
                .send("GET", &path, &headers, b"")
                .map_err(|e| TestCaseError::fail(format!("{e}: oversized target")))?;
            target.check_with(&raw, "GET with an oversized request-target", false)
        },
        &mut total,
        &mut failures,
    );

    // The real job and its file are still served (the proxy is alive and sane after all that).
    let (manifest_after, _) = wait_manifest(
        &format!("{}/$bulk-status/{}", target.base, target.job_id),
        None,
    );
    assert_eq!(manifest_after["output"], manifest["output"]);
    assert!(!download_lines(&file_url, None).is_empty());
    println!(
        "fuzz cases run: {total} ({} requests, {} kick-offs accepted and deleted, {} hyper-level 4xx without OperationOutcome)",
        target.requests.load(Ordering::Relaxed),
        target.accepted.load(Ordering::Relaxed),
        target.bare_4xx.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} fuzz section(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
