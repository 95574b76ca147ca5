//! The command line: `serve` runs with no config file, from flags alone.

mod common;

use common::*;

#[test]
fn serve_runs_from_flags_alone() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream).flags_only().start();
    let status = client()
        .get(format!("{}/metadata", proxy.base))
        .send()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200, "serve without --config");
    assert!(proxy.data_dir.exists(), "--data-dir was not used");
}

#[test]
fn serve_without_an_upstream_url_says_what_is_missing() {
    let output = Proxy::command(&["serve", "--listen", "127.0.0.1:0"])
        .env_remove("FBP_CONFIG")
        .env_remove("FBP_UPSTREAM_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("upstream.base_url"), "{stderr}");
}
