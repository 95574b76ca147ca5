//! Interception cannot be bypassed: every spelling of an export path, sent over HTTP/1.1 and HTTP/2 with no
//! token (`pass_through = "forward"`, the most exposed mode), is answered by the proxy or refused, and none
//! reaches the upstream.
//!
//! The upstream here is a recorder: it answers every request (a CapabilityStatement, an empty searchset,
//! a Group) and keeps its request target exactly as it arrived. Its oracle is deliberately blunt: once fully
//! percent-decoded, no recorded path may mention `export` or `bulk` in any letter case. A second test runs
//! the same variants against the real upstream, which implements `$export` of its own: the answer is
//! never its export (whose status URLs say `bulk-status`, where the proxy's say `$bulk-status`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::mock::{Mock, Reply};
use common::*;

/// Owned operations, as paths after the FHIR base: the proxy's own endpoints, export operations it does
/// not serve, and the async endpoints of the upstream's own export.
const OWNED: [&str; 12] = [
    "$export",
    "Patient/$export",
    "Group/G/$export",
    "$bulk-status/0123456789abcdef",
    "$bulk-files/0123456789abcdef/Observation.000.ndjson",
    "Observation/$export",
    "Patient/p1/$export",
    "Group/$export",
    "$export-poll-status",
    "bulk-status/0123456789abcdef",
    "bulk-files/0123456789abcdef/Observation.ndjson",
    "_operations/export/1",
];

/// Ways of spelling `base` + `/` + `op` that some server reads as the same path.
fn variants(base: &str, op: &str) -> Vec<String> {
    let segments: Vec<&str> = op.split('/').collect();
    let (init, last) = segments.split_at(segments.len() - 1);
    let init = |sep: &str| init.iter().map(|s| format!("{s}{sep}")).collect::<String>();
    let last = last[0];
    let dollar_encoded = op.replace('$', "%24");
    vec![
        format!("{base}/{op}"),
        format!("{base}/{op}/"),
        format!("{base}/{op}//"),
        format!("{base}/{op}/."),
        format!("{base}/{op}/.."),
        format!("{base}/{op}/%2e"),
        format!("{base}/{op}/%2E%2E"),
        format!("{base}//{}", op.replace('/', "//")),
        format!("/{base}/{op}"),
        format!("{base}/%2F{op}"),
        format!("{base}/%2F%2F{op}"),
        format!("{base}%2F{}", op.replace('/', "%2F")),
        format!("{base}/{}", op.replace('/', "%2f")),
        format!("{base}/{dollar_encoded}"),
        format!("{base}/{}%2524{}", init("/"), last.trim_start_matches('$')),
        format!("{base}/{}{}", init("/"), last.to_uppercase()),
        format!("{base}/{};x", op),
        format!("{base}/{}{last};x", init(";y/")),
        format!("{base}/./{op}"),
        format!("{base}/x/../{op}"),
        format!("{base}/%2e/{op}"),
        format!("{base}/{}", op.replace('/', "\\")),
        format!("{base}/{op}%20"),
        format!("{base}/{op}%00"),
        format!("{base}/{op}%2F"),
        format!("{}/{op}", base.to_uppercase()),
    ]
}

/// Starts the recorder on a free port: it answers like a tiny FHIR server and records every request.
fn recorder() -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // The searchset's self link must name the recorder's own address, known once bound.
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    Mock::routes()
        .route(None, |p| p.ends_with("/metadata"), |_| {
            Reply::fhir(capability_statement().to_string())
        })
        .route(None, |p| p.ends_with("/Group/G"), |_| {
            Reply::fhir(
                serde_json::json!({"resourceType": "Group", "id": "G", "type": "person", "actual": true,
                    "member": [{"entity": {"reference": "Patient/p1"}}]})
                .to_string(),
            )
        })
        .any(move |request| {
            let target = request.target();
            let status = if request.path().ends_with("/Group/broken") { 500 } else { 200 };
            Reply::fhir(
                serde_json::json!({"resourceType": "Bundle", "type": "searchset", "total": 0,
                    "link": [{"relation": "self", "url": format!("{base}{}", target.strip_prefix("/fhir").unwrap_or(target))}]})
                .to_string(),
            )
            .status(status)
        })
        .start_on(listener)
}

/// The request targets that reached `recorder`, exactly as they arrived.
fn targets(recorder: &Mock) -> Vec<String> {
    recorder
        .requests()
        .iter()
        .map(|r| r.target().to_owned())
        .collect()
}

fn capability_statement() -> serde_json::Value {
    let resource = |ty: &str, params: &[&str]| {
        serde_json::json!({"type": ty, "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": params.iter().map(|p| serde_json::json!({"name": p, "type": "reference"}))
                .collect::<Vec<_>>()})
    };
    serde_json::json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": [
            resource("Patient", &["_id", "_lastUpdated"]),
            resource("Observation", &["patient", "subject", "_lastUpdated"]),
            resource("Group", &["_id", "member"]),
        ], "operation": [{"name": "export", "definition": "http://hl7.org/fhir/OperationDefinition/export"}]}]})
}

/// `target`'s path, percent-decoded until it no longer changes, in lower case.
fn decoded_path(target: &str) -> String {
    let mut path = target.split('?').next().unwrap_or_default().to_owned();
    loop {
        let next = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        if next == path {
            return path.to_lowercase();
        }
        path = next;
    }
}

/// Sends `GET target` over a raw HTTP/1.1 connection, exactly as spelled; returns status and head.
fn get_raw_http1(addr: &str, target: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/fhir+json\r\n\
         Prefer: respond-async\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    (status, head)
}

/// Sends `GET target` over HTTP/2 (prior knowledge), `:path` exactly as spelled.
async fn get_raw_http2(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    addr: &str,
    target: &str,
) -> (u16, String) {
    let uri: hyper::Uri = match format!("http://{addr}{target}").parse() {
        Ok(uri) => uri,
        // Not a URI the http crate accepts (a backslash, say): no HTTP/2 client can send it.
        Err(_) => return (0, String::new()),
    };
    let req = hyper::Request::get(uri)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let head = format!("{:?}", response.headers());
    (response.status().as_u16(), head)
}

fn http2_sender(
    addr: &str,
) -> (
    tokio::runtime::Runtime,
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sender = runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        sender
    });
    (runtime, sender)
}

fn all_variants(base_path: &str) -> Vec<String> {
    OWNED
        .iter()
        .flat_map(|op| variants(base_path, op))
        .collect()
}

#[test]
fn no_spelling_of_an_owned_operation_reaches_the_upstream() {
    let recorder = recorder();
    let proxy = Proxy::start(&recorder.base(), "");
    let addr = origin(&proxy.base).trim_start_matches("http://").to_owned();
    let variants = all_variants(&url_path(&proxy.base));
    let (runtime, mut h2) = http2_sender(&addr);
    let mut answered = std::collections::BTreeMap::<u16, usize>::new();
    for target in &variants {
        let (status, _) = get_raw_http1(&addr, target);
        *answered.entry(status).or_default() += 1;
        let (status, _) = runtime.block_on(get_raw_http2(&mut h2, &addr, target));
        *answered.entry(status).or_default() += 1;
    }
    // Kick-offs the proxy accepted plan searches upstream; give them time to be sent.
    std::thread::sleep(Duration::from_secs(2));
    let leaked: Vec<String> = targets(&recorder)
        .into_iter()
        .filter(|t| {
            let path = decoded_path(t);
            path.contains("export") || path.contains("bulk")
        })
        .collect();
    println!(
        "{} variants x HTTP/1.1 and HTTP/2; proxy answers by status: {answered:?}; {} requests reached the upstream",
        variants.len(),
        targets(&recorder).len()
    );
    assert!(
        leaked.is_empty(),
        "owned operations reached the upstream: {leaked:#?}"
    );
    assert!(
        !answered.contains_key(&502) && !answered.keys().any(|s| *s >= 500),
        "a variant made the proxy fail: {answered:?}"
    );
}

#[test]
fn the_real_upstreams_own_export_is_never_reached() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let addr = origin(&proxy.base).trim_start_matches("http://").to_owned();
    let (runtime, mut h2) = http2_sender(&addr);
    let mut reached = Vec::new();
    for target in all_variants(&url_path(&proxy.base)) {
        let (status1, head1) = get_raw_http1(&addr, &target);
        let (status2, head2) = runtime.block_on(get_raw_http2(&mut h2, &addr, &target));
        for (status, head) in [(status1, head1), (status2, head2)] {
            // The upstream's export answers 202 with a status URL of its own, `.../bulk-status/ID`, and
            // serves its manifests and files under `bulk-status` and `bulk-files`.
            let theirs = head.to_lowercase().contains("/bulk-status/")
                || (status == 200 && !target.to_lowercase().contains("metadata"));
            if theirs {
                reached.push(format!("{target} -> {status}"));
            }
        }
    }
    assert!(
        reached.is_empty(),
        "answered by the upstream's own export: {reached:#?}"
    );
}

#[test]
fn ordinary_requests_with_odd_spellings_are_forwarded_normalised() {
    let recorder = recorder();
    let proxy = Proxy::start(&recorder.base(), "");
    let addr = origin(&proxy.base).trim_start_matches("http://").to_owned();
    let base = url_path(&proxy.base);
    for (sent, expected) in [
        (format!("{base}/Patient/p1"), "/fhir/Patient/p1"),
        (format!("{base}//Patient//p1/"), "/fhir/Patient/p1"),
        (
            format!("{base}/Patient%2Fp1?x=%2F"),
            "/fhir/Patient/p1?x=%2F",
        ),
    ] {
        let before = targets(&recorder).len();
        let (status, _) = get_raw_http1(&addr, &sent);
        assert_eq!(status, 200, "{sent}");
        assert_eq!(
            targets(&recorder)[before..],
            [expected.to_owned()],
            "{sent}"
        );
    }
    let before = targets(&recorder).len();
    let (status, _) = get_raw_http1(&addr, "/elsewhere/Patient");
    assert_eq!(status, 404, "a path outside the base is not forwarded");
    assert_eq!(targets(&recorder).len(), before);
}

#[test]
fn group_ids_that_are_dot_segments_are_not_found_and_errors_name_no_upstream() {
    let recorder = recorder();
    let upstream = recorder.base();
    let proxy = Proxy::start(&upstream, "");
    let addr = origin(&proxy.base).trim_start_matches("http://").to_owned();
    let upstream_authority = origin(&upstream).trim_start_matches("http://").to_owned();
    let base = url_path(&proxy.base);
    for id in [".", "..", "%2e", "%2E%2e", "%2e%2e%2f"] {
        let before = targets(&recorder).len();
        let (status, head) = get_raw_http1(&addr, &format!("{base}/Group/{id}/$export"));
        assert_eq!(status, 404, "Group/{id}/$export: {head}");
        assert_eq!(
            targets(&recorder).len(),
            before,
            "Group/{id} reached the upstream"
        );
    }
    let resp = client()
        .get(format!("{}/Group/broken/$export", proxy.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        !body.contains(&upstream_authority) && !body.contains("/fhir/Group"),
        "the diagnostics name the upstream: {body}"
    );
}
