//! The command line: `serve` runs with no config file, from flags alone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

#[test]
fn serve_runs_from_flags_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream-url"])
        .arg(upstream())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("FBP_CONFIG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("listening on "));
    let base = line
        .as_deref()
        .and_then(|l| l.split("public base ").nth(1))
        .map(|b| b.trim().to_owned());
    let status = base.as_ref().map(|base| {
        client()
            .get(format!("{base}/metadata"))
            .send()
            .unwrap()
            .status()
            .as_u16()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, Some(200), "serve without --config: {line:?}");
    assert!(dir.path().join("data").exists(), "--data-dir was not used");
}

#[test]
fn serve_without_an_upstream_url_says_what_is_missing() {
    let output = Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("FBP_CONFIG")
        .env_remove("FBP_UPSTREAM_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("upstream.base_url"), "{stderr}");
}
