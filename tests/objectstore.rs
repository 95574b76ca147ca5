//! Export files kept in an S3-compatible bucket (`[storage] kind = "s3"`), against the real object
//! store `tests/run` starts (SeaweedFS): files served through the proxy or by presigned URLs, their
//! objects under `{prefix}{job_id}/`, and their removal with the job.
//!
//! The bucket is inspected with signed requests made by `curl --aws-sigv4`, independent of the proxy.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TYPES: &str = "Patient,Observation,Condition";
const TYPE_LIST: &[&str] = &["Patient", "Observation", "Condition"];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests through tests/run")
    })
}

fn endpoint() -> String {
    env("FBP_TEST_S3_ENDPOINT")
}

fn bucket() -> String {
    env("FBP_TEST_S3_BUCKET")
}

/// A key prefix of its own for each test, so tests sharing the bucket never see each other's objects.
fn unique_prefix(test: &str) -> String {
    format!("{}/bulk/", unique(&format!("fbp-{test}")))
}

fn storage_toml(bucket: &str, prefix: &str, serve: &str) -> String {
    format!(
        "[storage]\nkind = \"s3\"\n\n[storage.s3]\nendpoint = \"{}\"\nbucket = \"{bucket}\"\n\
         prefix = \"{prefix}\"\nregion = \"us-east-1\"\nserve = \"{serve}\"\npresign_expiry_secs = 3600\n",
        endpoint()
    )
}

/// A request to the bucket signed with the test credentials; returns status and body.
fn signed(method: &str, path_and_query: &str) -> (u16, Vec<u8>) {
    let url = format!("{}/{path_and_query}", endpoint());
    let out = Command::new("curl")
        .args(["-sS", "-X", method, "-w", "\n%{http_code}"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY")
        ))
        .arg(&url)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {method} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&body[split + 1..]).parse().unwrap();
    body.truncate(split);
    (status, body)
}

/// Keys and sizes of the objects under `prefix` (ListObjectsV2, signed).
fn list_objects(prefix: &str) -> BTreeMap<String, u64> {
    let (status, body) = signed(
        "GET",
        &format!(
            "{}?list-type=2&max-keys=1000&prefix={}",
            bucket(),
            enc(prefix)
        ),
    );
    let xml = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "ListObjectsV2 {prefix}: {xml}");
    assert!(
        !xml.contains("<IsTruncated>true</IsTruncated>"),
        "more than 1000 objects under {prefix}"
    );
    let tag = |s: &str, name: &str| -> String {
        let open = format!("<{name}>");
        let start = s.find(&open).unwrap() + open.len();
        let end = s[start..].find(&format!("</{name}>")).unwrap();
        s[start..start + end].to_owned()
    };
    xml.split("<Contents>")
        .skip(1)
        .map(|c| {
            let key = tag(c, "Key").replace("&amp;", "&");
            let size = tag(c, "Size").parse().unwrap();
            (key, size)
        })
        .collect()
}

/// The file name at the end of a manifest URL (before any query).
fn file_name(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    path.rsplit('/').next().unwrap().to_owned()
}

/// `.ndjson` files left in the job's local directory.
fn local_ndjson(proxy: &Proxy, id: &str) -> Vec<String> {
    let dir = proxy.data_dir.join("files").join(id);
    match std::fs::read_dir(&dir) {
        Err(_) => Vec::new(),
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".ndjson"))
            .collect(),
    }
}

/// The downloaded files must hold exactly what a direct search of `TYPE_LIST` finds.
fn assert_same_as_system(files: &[(OutputFile, Vec<u8>)], upstream: &str) {
    let only: Vec<OutputFile> = files
        .iter()
        .map(|(f, _)| OutputFile {
            ty: f.ty.clone(),
            url: f.url.clone(),
            lines: f.lines.clone(),
        })
        .collect();
    assert_same(
        &resources_by_type(&only),
        &direct_system(upstream, Some(TYPE_LIST)),
    );
}

/// Raw download of every output file with no headers at all; checks status, `count` and types.
fn download_raw(manifest: &Value) -> Vec<(OutputFile, Vec<u8>)> {
    manifest["output"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest without output: {manifest}"))
        .iter()
        .map(|out| {
            let ty = out["type"].as_str().unwrap().to_owned();
            let url = out["url"].as_str().unwrap().to_owned();
            let (status, body) = get_bytes(&url);
            let text = String::from_utf8(body.clone()).unwrap();
            assert_eq!(status, 200, "GET {url} answered {status}: {text}");
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            assert_eq!(
                out["count"].as_u64(),
                Some(lines.len() as u64),
                "count of {url} differs from its lines"
            );
            for line in &lines {
                let resource: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{url}: a line is not JSON ({e}): {line}"));
                assert_eq!(resource["resourceType"], ty.as_str(), "{url}: {line}");
            }
            (OutputFile { ty, url, lines }, body)
        })
        .collect()
}

fn start(prefix: &str, serve: &str, export_toml: &str) -> (Proxy, String) {
    let tables = storage_toml(&bucket(), prefix, serve);
    let proxy = Proxy::builder(&upstream())
        .export_toml(export_toml)
        .admin()
        .tables(&tables)
        .start();
    let admin = proxy.admin_url();
    (proxy, admin)
}

/// Waits until nothing is left under `prefix` in the bucket.
fn wait_no_objects(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = list_objects(prefix);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "objects under {prefix} 15 s after DELETE: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn proxy_serve_streams_files_from_the_bucket() {
    let upstream = upstream();
    let prefix = unique_prefix("proxy");
    // Small files, so that one type spans several objects.
    let (proxy, _admin) = start(&prefix, "proxy", "resources_per_file = 250");
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, &format!("$export?_type={TYPES}"), None),
    );
    let id = job_id_of(&status_url);
    let (manifest, _) = wait_manifest(&status_url, None);
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    let files_base = format!("{}/$bulk-files/{id}/", proxy.base);
    for out in manifest["output"].as_array().unwrap() {
        let url = out["url"].as_str().unwrap();
        assert!(
            url.starts_with(&files_base),
            "with serve = proxy, file URL {url} is not under {files_base}"
        );
    }

    let files = download_raw(&manifest);
    assert_same_as_system(&files, &upstream);
    assert!(
        files.iter().filter(|(f, _)| f.ty == "Observation").count() > 1,
        "expected Observation over several files of 250"
    );
    // The usual download helper (content type application/fhir+ndjson) works the same.
    download_all(&manifest, "output", None);

    // Every file is one object `{prefix}{id}/{name}` of the same bytes; nothing else is there.
    let job_prefix = format!("{prefix}{id}/");
    let objects = list_objects(&job_prefix);
    let want: BTreeMap<String, u64> = files
        .iter()
        .map(|(f, body)| {
            (
                format!("{job_prefix}{}", file_name(&f.url)),
                body.len() as u64,
            )
        })
        .collect();
    assert_eq!(
        objects, want,
        "objects in the bucket differ from the manifest's files"
    );
    for (f, body) in &files {
        let key = format!("{job_prefix}{}", file_name(&f.url));
        let (status, stored) = signed("GET", &format!("{}/{key}", bucket()));
        assert_eq!(status, 200, "signed GET of {key}");
        assert!(
            stored == *body,
            "object {key} differs from the proxy's download"
        );
    }
    assert!(
        local_ndjson(&proxy, &id).is_empty(),
        "local copies remain after upload: {:?}",
        local_ndjson(&proxy, &id)
    );

    // Compressed download through the proxy still yields the same bytes.
    let (first, body) = &files[0];
    let resp = client()
        .get(&first.url)
        .header("Accept-Encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let gzipped = resp
        .headers()
        .get("Content-Encoding")
        .is_some_and(|v| v == "gzip");
    let raw = resp.bytes().unwrap().to_vec();
    let plain = if gzipped {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    };
    assert!(plain == *body, "gzip download differs from the plain one");

    // DELETE removes the job's objects; its file URLs and status are gone.
    let resp = client().delete(&status_url).send().unwrap();
    assert_eq!(resp.status(), 202, "DELETE of a completed job");
    wait_no_objects(&job_prefix);
    let (status, _) = get_bytes(&status_url);
    assert_eq!(status, 404, "status after DELETE");
    let (status, _) = get_bytes(&first.url);
    assert_eq!(status, 404, "file URL after DELETE");
}

#[test]
fn presigned_urls_serve_files_without_the_proxy() {
    let upstream = upstream();
    let prefix = unique_prefix("presigned");
    // The job lives 600 s, less than presign_expiry_secs: URLs must not outlive it.
    let (proxy, _admin) = start(&prefix, "presigned", "expire_after_secs = 600");
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, &format!("$export?_type={TYPES}"), None),
    );
    let id = job_id_of(&status_url);
    let (manifest, _) = wait_manifest(&status_url, None);
    assert_eq!(
        manifest["requiresAccessToken"], false,
        "presigned URLs need no token: {manifest}"
    );
    let endpoint = endpoint();
    let job_prefix = format!("{prefix}{id}/");
    for out in manifest["output"].as_array().unwrap() {
        let url = out["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("{endpoint}/")),
            "presigned URL {url} is not on the S3 endpoint {endpoint}"
        );
        let parsed = url::Url::parse(url).unwrap();
        let query: BTreeMap<String, String> = parsed.query_pairs().into_owned().collect();
        for key in ["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Expires"] {
            assert!(
                query.contains_key(key),
                "presigned URL without {key}: {url}"
            );
        }
        let expires: u64 = query["X-Amz-Expires"].parse().unwrap();
        assert!(
            expires > 0 && expires <= 600,
            "X-Amz-Expires {expires} outlives the job's 600 s: {url}"
        );
        assert!(
            parsed.path().contains(&job_prefix),
            "presigned URL {url} is not under {job_prefix}"
        );
    }

    // A plain GET with no credentials at all returns the NDJSON.
    let files = download_raw(&manifest);
    assert_same_as_system(&files, &upstream);
    let objects = list_objects(&job_prefix);
    assert_eq!(
        objects.len(),
        files.len(),
        "objects {objects:?} vs {} files",
        files.len()
    );
    assert!(local_ndjson(&proxy, &id).is_empty(), "local copies remain");

    // The signature is what grants access: the bare object URL or a tampered signature is refused.
    let url = &files[0].0.url;
    let bare = url.split('?').next().unwrap();
    let (status, _) = get_bytes(bare);
    assert!(
        status == 403 || status == 401,
        "unsigned GET {bare} answered {status}"
    );
    let parsed = url::Url::parse(url).unwrap();
    let mut tampered = parsed.clone();
    tampered.query_pairs_mut().clear().extend_pairs(
        parsed
            .query_pairs()
            .map(|(k, v)| {
                if k == "X-Amz-Signature" {
                    let flipped = if v.starts_with('0') { "1" } else { "0" };
                    (k.into_owned(), format!("{flipped}{}", &v[1..]))
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect::<Vec<_>>(),
    );
    let (status, _) = get_bytes(tampered.as_str());
    assert_eq!(status, 403, "tampered signature answered {status}");
}

#[test]
fn delete_removes_the_objects() {
    let prefix = unique_prefix("delete");
    let (proxy, _admin) = start(&prefix, "presigned", "");
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient,Condition", None),
    );
    let id = job_id_of(&status_url);
    let (manifest, _) = wait_manifest(&status_url, None);
    let urls: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap().to_owned())
        .collect();
    assert!(!urls.is_empty(), "nothing exported: {manifest}");
    for url in &urls {
        let (status, _) = get_bytes(url);
        assert_eq!(status, 200, "presigned GET {url} before DELETE");
    }
    let job_prefix = format!("{prefix}{id}/");
    assert_eq!(list_objects(&job_prefix).len(), urls.len());

    let resp = client().delete(&status_url).send().unwrap();
    assert_eq!(resp.status(), 202, "DELETE of a completed job");
    let (status, body) = get_bytes(&status_url);
    assert_eq!(
        status,
        404,
        "status after DELETE: {}",
        String::from_utf8_lossy(&body)
    );
    wait_no_objects(&job_prefix);
    for url in &urls {
        let (status, body) = get_bytes(url);
        assert!(
            status == 404 || status == 403,
            "presigned GET {url} after DELETE answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn operator_cancel_removes_the_objects_too() {
    let prefix = unique_prefix("cancel");
    let (proxy, admin) = start(&prefix, "proxy", "");
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(&proxy.base, "$export?_type=Patient", None),
    );
    let id = job_id_of(&status_url);
    wait_manifest(&status_url, None);
    let job_prefix = format!("{prefix}{id}/");
    assert!(!list_objects(&job_prefix).is_empty(), "no objects uploaded");
    let resp = client()
        .delete(format!("{admin}/jobs/{id}"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "admin cancel");
    wait_no_objects(&job_prefix);
    let (status, _) = get_bytes(&status_url);
    assert_eq!(status, 404);
}

#[test]
fn a_missing_bucket_never_yields_a_manifest() {
    let prefix = unique_prefix("missing");
    let missing = format!("fbp-no-such-bucket-{}", std::process::id());
    let tables = storage_toml(&missing, &prefix, "proxy");
    // Refusing to start is fine; so is failing the job. Completing it is not.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Proxy::builder(&upstream()).tables(&tables).start()
    }));
    let Ok(proxy) = started else {
        return;
    };
    let resp = kickoff_get(&proxy.base, "$export?_type=Patient", None);
    if resp.status() != 202 {
        assert!(
            resp.status().is_server_error(),
            "kick-off answered {}",
            resp.status()
        );
        return;
    }
    let status_url = accepted_status_url(&proxy.base, resp);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let resp = client().get(&status_url).send().unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().unwrap();
        match status {
            202 => {}
            200 => panic!("export into a missing bucket completed: {body}"),
            _ => {
                assert!(status >= 400, "status answered {status}: {body}");
                let outcome: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("failure is not JSON ({e}): {body}"));
                assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "export into a missing bucket still running after 45 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
