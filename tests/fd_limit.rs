//! Running out of file descriptors and the connection cap: the real binary under a low open-file limit
//! must wait for a descriptor instead of spinning in its accept loop, and past `server.max_connections`
//! it must leave new clients in the listen backlog until a connection closes.
//!
//! Only the proxy's own endpoints are used (a `$bulk-status` of an unknown job is its own 404), so the
//! upstream is an address nobody listens on.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{prom_value, scrape, Proxy};

/// A base URL on 127.0.0.1 where nothing listens.
fn no_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/fhir", listener.local_addr().unwrap())
}

/// `host:port` of a proxy base URL.
fn authority(base: &str) -> String {
    base.strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned()
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name start at field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// The status line of the proxy's own answer to `GET $bulk-status/unknown` on a fresh connection.
fn own_answer(stream: &mut TcpStream, authority: &str) -> std::io::Result<String> {
    write!(
        stream,
        "GET /fhir/$bulk-status/unknown HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn at_the_open_file_limit_the_accept_loop_waits_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.log");
    // The cap is well above what 128 descriptors allow, so accept itself hits EMFILE.
    let proxy = Proxy::builder(&no_upstream())
        .server_toml("max_connections = 10000")
        .open_files(128)
        .log_to(&log)
        .rust_log("fhir_bulk_proxy=info")
        .start();
    let authority = authority(&proxy.base);
    // More than the process has descriptors: the rest wait in the listen queue.
    let held: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&authority).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (wall_start, cpu_start) = (Instant::now(), cpu_time(proxy.child_pid()));
    std::thread::sleep(Duration::from_secs(2));
    let wall = wall_start.elapsed();
    let cpu = cpu_time(proxy.child_pid()) - cpu_start;
    let failures = count_lines(&log, "accept failed");
    assert!(
        failures >= 1,
        "the proxy never hit its open-file limit (no `accept failed` line)"
    );
    assert!(
        cpu < wall.mul_f64(0.3),
        "the proxy used {cpu:?} of CPU in {wall:?} at the open-file limit"
    );
    assert!(
        failures <= 5,
        "{failures} `accept failed` lines in {wall:?}: the log line is not rate-limited\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(held);
    let mut stream = TcpStream::connect(&authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let status = own_answer(&mut stream, &authority).unwrap();
    assert!(
        status.starts_with("HTTP/1.1 404"),
        "after the held connections closed: {status:?}"
    );
}

#[test]
fn past_max_connections_a_client_waits_until_a_connection_closes() {
    let proxy = Proxy::builder(&no_upstream())
        .server_toml("max_connections = 4")
        .admin()
        .start();
    let admin = proxy.admin_url();
    let authority = authority(&proxy.base);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&authority).unwrap())
        .collect();
    let mut fifth = TcpStream::connect(&authority).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    match own_answer(&mut fifth, &authority) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the fifth of four allowed connections was served: {other:?}"),
    }
    assert_eq!(
        prom_value(&scrape(&admin), "fbp_connections"),
        Some(4.0),
        "connections open at the cap"
    );
    drop(held.pop());
    fifth
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    fifth.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 404"),
        "once a connection closed the fifth was to be served: {answer:?}"
    );
}
