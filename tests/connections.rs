//! Pass-through connection handling: each inbound connection forwards on an upstream connection of its
//! own, and whatever the upstream does with that connection (keep it, close it after an answer with or
//! without saying so, go away) must not change what the client gets.
//!
//! The upstream here is a small HTTP/1.1 server on 127.0.0.1 that counts the connections it accepts and
//! answers every request with its own request line and the connection's request count, so a test sees
//! which connection served which request.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::mock::{After, Mock, Reply};
use common::Proxy;
use serde_json::Value;

/// Starts the test upstream on a free port; every answer waits `delay` first.
fn upstream(after: After, delay: Duration) -> Mock {
    serve_on(TcpListener::bind("127.0.0.1:0").unwrap(), after, delay)
}

/// Runs the test upstream on `listener`: each answer names its request and the connection that carried it.
fn serve_on(listener: TcpListener, after: After, delay: Duration) -> Mock {
    Mock::routes()
        .any(move |request| {
            let answer = serde_json::json!({
                "resourceType": "Basic",
                "request": request.line(),
                "body": String::from_utf8_lossy(&request.body),
                "connection": request.connection,
                "n": request.n,
            });
            Reply::fhir(answer.to_string()).delay(delay).then(after)
        })
        .start_on(listener)
}

/// Sends `count` GETs one after another on one keep-alive connection to the proxy; returns the answers.
fn sequential_on_one_connection(proxy: &Proxy, count: usize) -> Vec<Value> {
    let authority = proxy
        .base
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let stream = TcpStream::connect(&authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    (0..count)
        .map(|i| {
            write!(
                writer,
                "GET /fhir/Basic/{i} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
            )
            .unwrap();
            let (headers, body) = read_response(&mut reader, &format!("request {i}: "));
            assert!(
                !headers
                    .iter()
                    .any(|(name, value)| name.eq_ignore_ascii_case("connection")
                        && value.eq_ignore_ascii_case("close")),
                "the upstream's Connection: close must not close the client's connection"
            );
            content_length(&headers).expect("a Content-Length");
            let answer: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                answer["request"],
                format!("GET /fhir/Basic/{i} HTTP/1.1"),
                "request {i} got another request's answer"
            );
            answer
        })
        .collect()
}

#[test]
fn an_inbound_connection_keeps_one_upstream_connection() {
    let up = upstream(After::KeepAlive, Duration::ZERO);
    let proxy = Proxy::start(&up.base(), "");
    let first = sequential_on_one_connection(&proxy, 20);
    let second = sequential_on_one_connection(&proxy, 20);
    for (answers, connection) in [
        (&first, &first[0]["connection"]),
        (&second, &second[0]["connection"]),
    ] {
        let served_by: Vec<&Value> = answers.iter().map(|a| &a["connection"]).collect();
        assert!(
            served_by.iter().all(|c| *c == connection),
            "one inbound connection was served by several upstream connections: {served_by:?}"
        );
        let counts: Vec<u64> = answers.iter().map(|a| a["n"].as_u64().unwrap()).collect();
        assert_eq!(counts, (1..=20).collect::<Vec<u64>>());
    }
    assert_ne!(first[0]["connection"], second[0]["connection"]);
    assert_eq!(up.connections(), 2);
}

#[test]
fn upstream_closing_after_every_answer_is_invisible_to_the_client() {
    for after in [After::SayClose, After::SilentClose] {
        let up = upstream(after, Duration::ZERO);
        let proxy = Proxy::start(&up.base(), "");
        let answers = sequential_on_one_connection(&proxy, 30);
        assert!(
            answers.iter().all(|a| a["n"] == 1),
            "a closed connection was reused"
        );
        assert_eq!(up.connections(), 30);
    }
}

#[test]
fn concurrent_http2_streams_on_one_connection_are_each_answered() {
    let up = upstream(After::KeepAlive, Duration::from_millis(200));
    let proxy = Proxy::start(&up.base(), "");
    let client = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // Streams that overlap in time: all but one find the connection's own upstream connection busy.
    let answers: Vec<(usize, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (client, base) = (&client, &proxy.base);
                scope.spawn(move || {
                    let response = client
                        .post(format!("{base}/Basic/_search"))
                        .body(format!("stream={i}"))
                        .send()
                        .unwrap();
                    assert_eq!(response.version(), reqwest::Version::HTTP_2);
                    assert_eq!(response.status(), 200);
                    (i, response.json::<Value>().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, answer) in answers {
        assert_eq!(answer["request"], "POST /fhir/Basic/_search HTTP/1.1");
        assert_eq!(answer["body"], format!("stream={i}"));
    }
    let accepted = up.connections();
    assert!(
        accepted > 1,
        "12 overlapping streams were serialised on one upstream connection"
    );
}

#[test]
fn upstream_gone_between_requests_is_a_bad_gateway_then_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::start(&format!("http://{addr}/fhir"), "");
    let basic = |id: u32| {
        common::client()
            .get(format!("{}/Basic/{id}", proxy.base))
            .send()
            .unwrap()
    };
    let response = basic(1);
    assert_eq!(response.status(), 502);
    let outcome: Value = response.json().unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    // The same address comes back: the next request connects afresh and is answered.
    serve_on(
        TcpListener::bind(addr).unwrap(),
        After::KeepAlive,
        Duration::ZERO,
    );
    let response = basic(2);
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().unwrap();
    assert_eq!(answer["request"], "GET /fhir/Basic/2 HTTP/1.1");
}

/// `host:port` of the proxy.
fn authority(proxy: &Proxy) -> String {
    proxy
        .base
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned()
}

/// Waits until `deadline` for the proxy to close `stream`; `false` if it is still open then.
fn closed_by(stream: &mut TcpStream, deadline: std::time::Instant) -> bool {
    let mut buf = [0; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Reads one 200 response off `reader` (`what` names it in failures); returns its header lines and
/// its body of `Content-Length` bytes (none when the header is absent).
fn read_response(
    reader: &mut BufReader<TcpStream>,
    what: &str,
) -> (Vec<(String, String)>, Vec<u8>) {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{what}{status}");
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header == "\r\n" {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let length = content_length(&headers).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (headers, body)
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.parse().unwrap())
}

#[test]
fn connections_that_never_finish_a_request_head_are_closed_after_the_header_timeout() {
    let up = upstream(After::KeepAlive, Duration::ZERO);
    let proxy = Proxy::builder(&up.base())
        .server_toml("header_read_timeout_secs = 1")
        .start();
    let authority = authority(&proxy);
    let start = std::time::Instant::now();
    // A partial head; a few bytes too few to tell HTTP/1 from HTTP/2; nothing at all.
    let sent: Vec<&[u8]> = [&b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n"[..]; 50]
        .into_iter()
        .chain([&b"GET /fhir"[..]; 5])
        .chain([&b""[..]; 5])
        .collect();
    let mut slow: Vec<TcpStream> = sent
        .iter()
        .map(|bytes| {
            let mut s = TcpStream::connect(&authority).unwrap();
            s.write_all(bytes).unwrap();
            s
        })
        .collect();
    let answer: Value = common::client()
        .get(format!("{}/Basic/1", proxy.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(answer["request"], "GET /fhir/Basic/1 HTTP/1.1");
    let deadline = start + Duration::from_secs(8);
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_by(stream, deadline),
            "connection {i} (sent {:?}) still open after {:?}",
            String::from_utf8_lossy(sent[i]),
            start.elapsed()
        );
    }
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = upstream(After::KeepAlive, Duration::ZERO);
    let proxy = Proxy::builder(&up.base())
        .server_toml("header_read_timeout_secs = 60\nidle_timeout_secs = 1")
        .start();
    let authority = authority(&proxy);
    let stream = TcpStream::connect(&authority).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..2 {
        write!(
            writer,
            "GET /fhir/Basic/{i} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        )
        .unwrap();
        let answer: Value = serde_json::from_slice(&read_response(&mut reader, "").1).unwrap();
        assert_eq!(answer["request"], format!("GET /fhir/Basic/{i} HTTP/1.1"));
    }
    let idle_since = std::time::Instant::now();
    assert!(
        closed_by(reader.get_mut(), idle_since + Duration::from_secs(8)),
        "an idle connection is still open after {:?} (idle timeout 1 s, header timeout 60 s)",
        idle_since.elapsed()
    );
}

/// An upstream whose one answer is `chunks` chunks of `chunk` bytes, `pause` apart.
fn trickling_upstream(chunks: usize, chunk: usize, pause: Duration) -> Mock {
    Mock::routes()
        .any(move |_| {
            Reply::new(200, "application/octet-stream", vec![b'x'; chunks * chunk])
                .drip(chunk, pause)
                .then(After::SilentClose)
        })
        .start()
}

#[test]
fn a_slow_answer_in_flight_outlasts_the_header_and_idle_timeouts() {
    // 3.2 s of an answer trickling in from the upstream, with both timeouts at 1 s.
    let up = trickling_upstream(8, 1000, Duration::from_millis(400));
    let proxy = Proxy::builder(&up.base())
        .server_toml("header_read_timeout_secs = 1\nidle_timeout_secs = 1")
        .start();
    let body = common::client()
        .get(format!("{}/Binary/slow", proxy.base))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(body.len(), 8000);
}

#[test]
fn a_download_read_slowly_outlasts_the_header_and_idle_timeouts() {
    // Far more than the socket buffers hold, read at about 12 MB/s: the proxy writes for seconds.
    let size = 48 << 20;
    let up = trickling_upstream(48, 1 << 20, Duration::ZERO);
    let proxy = Proxy::builder(&up.base())
        .server_toml("header_read_timeout_secs = 1\nidle_timeout_secs = 1")
        .start();
    let authority = authority(&proxy);
    let mut stream = TcpStream::connect(&authority).unwrap();
    write!(
        stream,
        "GET /fhir/Binary/big HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut received = 0;
    let mut buf = vec![0; 256 << 10];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let before = received;
        received += n;
        if received >= size {
            break;
        }
        if received >> 20 > before >> 20 {
            std::thread::sleep(Duration::from_millis(80));
        }
    }
    assert!(
        received >= size,
        "the download was cut after {received} of {size} bytes and {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_sent_away_after_the_idle_timeout() {
    use http_body_util::BodyExt;
    let up = upstream(After::KeepAlive, Duration::ZERO);
    let proxy = Proxy::builder(&up.base())
        .server_toml("header_read_timeout_secs = 60\nidle_timeout_secs = 1")
        .start();
    let stream = tokio::net::TcpStream::connect(authority(&proxy))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("{}/Basic/1", proxy.base))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_since = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), connection)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "an idle HTTP/2 connection is still open after {:?}",
                idle_since.elapsed()
            )
        });
    // A GOAWAY ends the client's connection cleanly; a dropped socket would be an error.
    ended.unwrap().unwrap();
}
