//! Files kept gzip-compressed at rest, downloaded by real HTTP clients: curl, Python (httpx), Node's
//! fetch, and a client that does not accept gzip. Clients that decode a single gzip member must get
//! every line, not only those of the file's first page.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Pages of 7 into files of 40: every file spans several pages and most files roll over mid-page.
const EXPORT_TOML: &str = "gzip = true\npage_size = 7\nresources_per_file = 40";

/// Gets `url` with Python's httpx (stdlib urllib and a single-member zlib decoder where httpx is
/// missing); prints `{"client", "encoding", "text"}`.
const PYTHON_GET: &str = r#"
import json, sys
url = sys.argv[1]
try:
    import httpx
    r = httpx.get(url, timeout=60)
    r.raise_for_status()
    out = {"client": "httpx", "encoding": r.headers.get("content-encoding"), "text": r.text}
except ImportError:
    import urllib.request, zlib
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=60) as r:
        encoding = r.headers.get("Content-Encoding")
        body = r.read()
    if encoding == "gzip":
        body = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body)
    out = {"client": "zlib", "encoding": encoding, "text": body.decode()}
json.dump(out, sys.stdout)
"#;

/// Gets `process.argv[1]` with Node's global fetch (which asks for and decodes gzip); prints
/// `{"encoding", "text"}`.
const NODE_GET: &str = r#"
fetch(process.argv[1]).then(async (r) => {
  if (!r.ok) { console.error(`status ${r.status}`); process.exit(2); }
  const text = await r.text();
  process.stdout.write(JSON.stringify({ encoding: r.headers.get("content-encoding"), text }));
}).catch((e) => { console.error(e); process.exit(3); });
"#;

/// What a client got: its lines and the response's Content-Encoding, or why it failed.
type Got = Result<(Vec<String>, String), String>;

/// Runs `command`; its stdout if it exited with 0.
fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    if !out.status.success() {
        return Err(format!(
            "exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

fn lines_of(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

/// `curl --compressed --fail`.
fn curl(url: &str) -> Got {
    let body = tempfile::NamedTempFile::new().unwrap();
    let encoding = run(Command::new("curl")
        .args(["--compressed", "-sS", "--fail", "-o"])
        .arg(body.path())
        .args(["-w", "%header{content-encoding}", url]))?;
    let text = std::fs::read_to_string(body.path()).map_err(|e| e.to_string())?;
    Ok((lines_of(&text), encoding))
}

/// A client run as `program args... url` that prints `{"encoding", "text"}` (and `client`, checked
/// against `client` when given).
fn json_client(program: &str, args: &[&str], url: &str, client: Option<&str>) -> Got {
    let out: Value = serde_json::from_str(&run(Command::new(program).args(args).arg(url))?)
        .map_err(|e| e.to_string())?;
    if let Some(client) = client {
        assert_eq!(out["client"], client, "{program} ran another client");
    }
    let field = |name: &str| out[name].as_str().unwrap_or_default().to_owned();
    Ok((lines_of(&field("text")), field("encoding")))
}

#[test]
fn every_client_gets_every_line_of_a_gzip_file() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, EXPORT_TOML);
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Observation", None),
    );
    let (manifest, _) = wait_manifest(&status_url, None);
    // Without Accept-Encoding: inflated by the proxy; `download_all` checks each count and type.
    let files = download_all(&manifest, "output", None);
    assert_same(
        &resources_by_type(&files),
        &direct_system(&upstream, Some(&["Observation"])),
    );
    assert!(
        files.len() > 1 && files.iter().any(|f| f.lines.len() > 7),
        "the export did not span pages and files: {manifest}"
    );
    // tests/run installs httpx; run by hand, the stdlib stand-in may do.
    let python = std::env::var("FBP_TEST_PYTHON").ok();
    let (python_program, python_client) = match &python {
        Some(program) => (program.as_str(), Some("httpx")),
        None => ("python3", None),
    };
    let mut problems = Vec::new();
    for file in &files {
        let url = &file.url;
        assert!(url.ends_with(".ndjson.gz"), "{url} is not kept gzip");
        let clients = [
            ("curl --compressed", curl(url)),
            (
                "python",
                json_client(python_program, &["-c", PYTHON_GET], url, python_client),
            ),
            (
                "node fetch",
                json_client("node", &["-e", NODE_GET], url, None),
            ),
        ];
        for (client, got) in clients {
            match got {
                Ok((lines, encoding)) if encoding == "gzip" && lines == file.lines => {}
                Ok((lines, encoding)) => problems.push(format!(
                    "{client}: {url}: {} of {} lines (Content-Encoding {encoding:?}){}",
                    lines.len(),
                    file.lines.len(),
                    if lines.iter().zip(&file.lines).all(|(a, b)| a == b) {
                        ""
                    } else {
                        ", and they differ"
                    },
                )),
                Err(e) => problems.push(format!("{client}: {url}: {e}")),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "clients did not get the files whole:\n{}",
        problems.join("\n")
    );
}
