//! The benchmark run: processes, measurements, targets and the report.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[path = "clinical.rs"]
mod clinical;
#[path = "group.rs"]
mod group;

type Result<T> = std::result::Result<T, String>;

const MIB: f64 = 1024.0 * 1024.0;
const MB: f64 = 1_000_000.0;

/// How often the export client polls a job's status: often, so that a run of under a second (the real
/// upstream's) does not lose much of itself between polls.
fn poll_ms() -> u64 {
    env_or("BENCH_POLL_MS", 5)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

struct Settings {
    small: bool,
    sizes: Vec<u64>,
    page_size: u32,
    per_file: u64,
    slices: usize,
    load_secs: u32,
    load_rounds: usize,
    export_rounds: usize,
    load_conns: u32,
    upstream_delay_ms: u64,
    /// Per-search latency of the extra latency run (`BENCH_LATENCY_MS`; 0: no such run).
    latency_ms: u64,
    /// Parts to run (`BENCH_ONLY`): `export`, `load`, `real`; empty: all.
    only: Vec<String>,
    real_upstream: Option<String>,
    real_note: String,
    proxy_bin: PathBuf,
    out: Option<PathBuf>,
    command: String,
    work: PathBuf,
    root: PathBuf,
}

impl Settings {
    /// Whether `part` is to run.
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }

    fn from_env() -> Result<Settings> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let small = std::env::var("BENCH_SMALL").is_ok_and(|v| v == "1");
        let sizes: Vec<u64> = std::env::var("BENCH_SIZES")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_else(|| {
                if small {
                    vec![10_000, 50_000]
                } else {
                    vec![100_000, 1_000_000]
                }
            });
        if sizes.is_empty() {
            return Err("BENCH_SIZES holds no size".into());
        }
        let proxy_bin = std::env::var("BENCH_PROXY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_fhir-bulk-proxy")));
        if !proxy_bin.is_file() {
            return Err(format!(
                "{} is missing: run `cargo bench --bench export` (bench/run does), which builds it",
                proxy_bin.display()
            ));
        }
        let out = match std::env::var("BENCH_OUT") {
            Ok(v) if v == "-" => None,
            Ok(v) => Some(PathBuf::from(v)),
            Err(_) => Some(root.join("BENCHMARKS.md")),
        };
        let work = root
            .join("target/bench")
            .join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        Ok(Settings {
            small,
            sizes,
            page_size: env_or("BENCH_PAGE_SIZE", 1000),
            per_file: env_or("BENCH_RESOURCES_PER_FILE", 100_000),
            slices: env_or("BENCH_SLICES", 4),
            load_secs: env_or("BENCH_LOAD_SECS", if small { 2 } else { 5 }),
            load_rounds: env_or("BENCH_LOAD_ROUNDS", if small { 1 } else { 3 }).max(1),
            export_rounds: env_or("BENCH_EXPORT_ROUNDS", if small { 1 } else { 3 }).max(1),
            load_conns: env_or("BENCH_LOAD_CONNECTIONS", 32),
            upstream_delay_ms: env_or("BENCH_UPSTREAM_DELAY_MS", 0),
            latency_ms: env_or("BENCH_LATENCY_MS", 10),
            only: std::env::var("BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            real_upstream: std::env::var("BENCH_REAL_UPSTREAM")
                .ok()
                .filter(|v| !v.is_empty()),
            real_note: std::env::var("BENCH_REAL_NOTE").unwrap_or_default(),
            proxy_bin,
            out,
            command: std::env::var("BENCH_COMMAND")
                .unwrap_or_else(|_| "cargo bench --bench export".into()),
            work,
            root,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Processes

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("bench: {} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for a stdout line starting with `prefix` (the rest of the line is returned).
fn wait_line(child: &mut Child, prefix: &'static str, timeout: Duration) -> Result<String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if !sent {
                if let Some(rest) = line.strip_prefix(prefix) {
                    let _ = tx.send(rest.to_owned());
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| format!("no `{prefix}` line within {timeout:?}"))
}

/// The fast upstream, serving `n` Observations (this same executable in its upstream role).
fn start_fast_upstream(n: u64, delay_ms: u64) -> Result<(Proc, String)> {
    start_costly_upstream(n, delay_ms, 0, 0)
}

/// The fast upstream serving `capacity` requests at once (0: any number), each search costing
/// `delay_ms` plus `entry_us` per resource answered.
fn start_costly_upstream(
    n: u64,
    delay_ms: u64,
    capacity: usize,
    entry_us: u64,
) -> Result<(Proc, String)> {
    start_upstream(
        "upstream",
        &[
            ("FBP_BENCH_OBSERVATIONS", n.to_string()),
            ("FBP_BENCH_DELAY_MS", delay_ms.to_string()),
            ("FBP_BENCH_CAPACITY", capacity.to_string()),
            ("FBP_BENCH_ENTRY_US", entry_us.to_string()),
        ],
    )
}

/// This same executable in an upstream `role` (see main.rs), with `vars` in its environment.
fn start_upstream(role: &str, vars: &[(&str, String)]) -> Result<(Proc, String)> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env("FBP_BENCH_ROLE", role)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the {role} upstream: {e}"))?;
    let base = wait_line(&mut child, "listening ", Duration::from_secs(120))?;
    Ok((
        Proc {
            child,
            name: "fast upstream",
        },
        base,
    ))
}

struct Proxy {
    proc: Proc,
    base: String,
    data_dir: PathBuf,
}

/// Starts the proxy in front of `upstream` with a fresh data directory; `export_extra` goes into `[export]`.
fn start_proxy(s: &Settings, upstream: &str, name: &str, export_extra: &str) -> Result<Proxy> {
    start_proxy_with(s, upstream, name, "", export_extra)
}

/// [`start_proxy`] with `upstream_extra` in `[upstream]`.
fn start_proxy_with(
    s: &Settings,
    upstream: &str,
    name: &str,
    upstream_extra: &str,
    export_extra: &str,
) -> Result<Proxy> {
    let dir = s.work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let data_dir = dir.join("data");
    let admin = free_port()?;
    let config = format!(
        r#"[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:{admin}"

[upstream]
base_url = "{upstream}"
max_concurrent_requests = 8
requests_per_second = 100000
timeout_secs = 300
{upstream_extra}

[export]
data_dir = "{data}"
page_size = {page}
resources_per_file = {per_file}
slice_concurrency = 4
max_concurrent_jobs = 4
min_poll_interval_ms = 0
progress_log_secs = 3600
{export_extra}
"#,
        data = data_dir.display(),
        page = s.page_size,
        per_file = s.per_file,
    );
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log_path = dir.join("proxy.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = Command::new(&s.proxy_bin)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .env_remove("FBP_CONFIG")
        .env_remove("FBP_LISTEN")
        .env_remove("FBP_UPSTREAM_URL")
        .env_remove("FBP_PUBLIC_BASE_URL")
        .env_remove("FBP_DATA_DIR")
        .env_remove("FBP_UPSTREAM_BEARER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", s.proxy_bin.display()))?;
    match wait_line(&mut child, "listening on ", Duration::from_secs(30)) {
        Ok(rest) => {
            let base = rest
                .split_once("public base ")
                .map(|(_, b)| b.trim().to_owned())
                .ok_or_else(|| format!("unexpected listening line: {rest}"))?;
            // As Kubernetes starts it: no traffic until it is ready.
            let ready = format!("http://127.0.0.1:{admin}/readyz");
            wait_http(&http_client(), &ready, Duration::from_secs(30))?;
            Ok(Proxy {
                proc: Proc {
                    child,
                    name: "proxy",
                },
                base,
                data_dir,
            })
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            Err(format!(
                "proxy did not start ({e}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    }
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_http(client: &reqwest::blocking::Client, url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send() {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------------------------------
// Export through the proxy, and the sequential pager

#[derive(Clone, Debug, Default)]
struct Measured {
    secs: f64,
    resources: u64,
    /// Bytes written: NDJSON for the proxy, page bodies for the pager.
    bytes: u64,
    /// Peak RSS of the proxy process.
    rss: Option<u64>,
    /// CPU seconds of the proxy (or pager) process during the run.
    cpu: Option<f64>,
    /// CPU seconds of the fast upstream during the run.
    upstream_cpu: Option<f64>,
    pages: u64,
    note: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    output: Vec<ManifestFile>,
    #[serde(default)]
    error: Vec<ManifestFile>,
    /// 3.0.0 manifest paging: `next` leads to the rest of the files.
    #[serde(default)]
    link: Vec<PagerLink>,
}

#[derive(Deserialize)]
struct ManifestFile {
    url: String,
    #[serde(default)]
    count: u64,
}

/// Kicks off `{kickoff}` (e.g. `$export?_type=Observation`), polls to the manifest, and measures.
fn export(
    client: &reqwest::blocking::Client,
    proxy: &Proxy,
    kickoff: &str,
    upstream_pid: Option<u32>,
) -> Result<Measured> {
    let url = format!("{}/{kickoff}", proxy.base);
    let cpu0 = cpu_secs(proxy.proc.pid());
    let up0 = upstream_pid.and_then(cpu_secs);
    let start = Instant::now();
    let r = client
        .get(&url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .map_err(|e| format!("kick-off: {e}"))?;
    if r.status().as_u16() != 202 {
        let status = r.status();
        return Err(format!(
            "kick-off answered {status}: {}",
            r.text().unwrap_or_default()
        ));
    }
    let status_url = r
        .headers()
        .get("Content-Location")
        .and_then(|v| v.to_str().ok())
        .ok_or("kick-off without Content-Location")?
        .to_owned();
    let job_id = status_url.rsplit('/').next().unwrap_or_default().to_owned();
    let manifest: Manifest = loop {
        let r = client
            .get(&status_url)
            .send()
            .map_err(|e| format!("status: {e}"))?;
        match r.status().as_u16() {
            202 => std::thread::sleep(Duration::from_millis(poll_ms())),
            200 => break r.json().map_err(|e| format!("manifest: {e}"))?,
            other => {
                return Err(format!(
                    "status answered {other}: {}",
                    r.text().unwrap_or_default()
                ))
            }
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let rss = peak_rss(proxy.proc.pid());
    let cpu = cpu_secs(proxy.proc.pid()).zip(cpu0).map(|(b, a)| b - a);
    let upstream_cpu = upstream_pid.and_then(cpu_secs).zip(up0).map(|(b, a)| b - a);
    let manifest = rest_of_manifest(client, manifest)?;
    let dir = proxy.data_dir.join("files").join(&job_id);
    let mut bytes = 0;
    for f in &manifest.output {
        let name = f.url.rsplit('/').next().unwrap_or_default();
        bytes += std::fs::metadata(dir.join(name))
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
    }
    let mut note = String::new();
    if !manifest.error.is_empty() {
        note = format!("{} error file(s) in the manifest", manifest.error.len());
    }
    Ok(Measured {
        secs,
        resources: manifest.output.iter().map(|f| f.count).sum(),
        bytes,
        rss,
        cpu,
        upstream_cpu,
        pages: 0,
        note,
    })
}

/// The whole manifest: `first` with the files of every page its `next` links lead to (an export of
/// thousands of slices has thousands of files; each page repeats the error files).
fn rest_of_manifest(client: &reqwest::blocking::Client, first: Manifest) -> Result<Manifest> {
    let mut whole = Manifest {
        output: first.output,
        error: first.error,
        link: Vec::new(),
    };
    let mut links = first.link;
    while let Some(next) = links
        .iter()
        .find(|l| l.relation == "next")
        .map(|l| l.url.clone())
    {
        let page: Manifest = client
            .get(&next)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .map_err(|e| format!("manifest page {next}: {e}"))?;
        whole.output.extend(page.output);
        for e in page.error {
            if !whole.error.iter().any(|f| f.url == e.url) {
                whole.error.push(e);
            }
        }
        links = page.link;
    }
    Ok(whole)
}

#[derive(Deserialize)]
struct PagerPage {
    #[serde(default)]
    link: Vec<PagerLink>,
    #[serde(default)]
    entry: Vec<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct PagerLink {
    relation: String,
    url: String,
}

/// The baseline: follows `next` links one request at a time from each first URL and appends the page
/// bodies to one file (fsynced once at the end).
fn pager(first_urls: &[String], out: &Path, upstream_pid: Option<u32>) -> Result<Measured> {
    let client = http_client();
    let mut file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let (mut bytes, mut resources, mut pages) = (0u64, 0u64, 0u64);
    let up0 = upstream_pid.and_then(cpu_secs);
    let cpu0 = cpu_secs(std::process::id());
    let start = Instant::now();
    for first in first_urls {
        let mut next = Some(first.clone());
        while let Some(url) = next.take() {
            let r = client
                .get(&url)
                .header("Accept", "application/fhir+json")
                .send()
                .map_err(|e| format!("pager: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("pager: {url} answered {}", r.status()));
            }
            let body = r.bytes().map_err(|e| format!("pager: {e}"))?;
            file.write_all(&body).map_err(|e| e.to_string())?;
            file.write_all(b"\n").map_err(|e| e.to_string())?;
            let page: PagerPage =
                serde_json::from_slice(&body).map_err(|e| format!("pager: {url}: {e}"))?;
            bytes += body.len() as u64 + 1;
            resources += page.entry.len() as u64;
            pages += 1;
            next = page
                .link
                .into_iter()
                .find(|l| l.relation == "next")
                .map(|l| l.url);
        }
    }
    file.sync_all().map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    Ok(Measured {
        secs,
        resources,
        bytes,
        rss: None,
        cpu: cpu_secs(std::process::id()).zip(cpu0).map(|(b, a)| b - a),
        upstream_cpu: upstream_pid.and_then(cpu_secs).zip(up0).map(|(b, a)| b - a),
        pages,
        note: String::new(),
    })
}

fn now_instant() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// One proxy export in a fresh proxy process. `slices` > 1 sets `time_slices`; when the binary refuses
/// the key, the run is repeated without it and says so.
fn proxy_run(
    s: &Settings,
    upstream: &str,
    upstream_pid: Option<u32>,
    name: &str,
    slices: usize,
    kickoff: &str,
) -> Result<Measured> {
    let client = http_client();
    let extra = format!("time_slices = {slices}");
    let (proxy, unsupported) = match start_proxy(s, upstream, name, &extra) {
        Ok(p) => (p, false),
        Err(e) if e.contains("time_slices") || e.contains("unknown field") => {
            eprintln!("bench: this build has no `time_slices` ({e}); running without it");
            (start_proxy(s, upstream, name, "")?, true)
        }
        Err(e) => return Err(e),
    };
    let result = export(&client, &proxy, kickoff, upstream_pid);
    let data_dir = proxy.data_dir.clone();
    drop(proxy);
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut m = result?;
    if unsupported {
        let note = if slices > 1 {
            "time_slices unsupported by this build: one search per type"
        } else {
            "time_slices unsupported by this build (1 search per type)"
        };
        m.note = join_notes(&m.note, note);
    }
    Ok(m)
}

fn join_notes(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}; {b}"),
    }
}

struct SizeResult {
    size: u64,
    pager: Measured,
    one: Measured,
    many: Measured,
}

fn fast_exports(s: &Settings) -> Result<Vec<SizeResult>> {
    s.sizes
        .iter()
        .map(|&size| fast_export(s, size, s.upstream_delay_ms))
        .collect()
}

/// The pager and the proxy with 1 and N slices, against a fast upstream of `size` Observations that
/// answers every search after `delay_ms`.
fn fast_export(s: &Settings, size: u64, delay_ms: u64) -> Result<SizeResult> {
    eprintln!("bench: fast upstream with {size} Observations, {delay_ms} ms per search");
    let (up, base) = start_fast_upstream(size, delay_ms)?;
    let up_pid = Some(up.pid());
    let first = format!(
        "{base}/Observation?_count={}&_lastUpdated=le{}",
        s.page_size,
        now_instant()
    );
    let pager_file = s.work.join("pager.out");
    let name = format!("export-{}", s.slices);
    // Rounds interleave the three clients, so that a change in the machine's state during the run (its
    // page cache, the other work on it) falls on all of them alike; each client's median round counts.
    let (mut pagers, mut ones, mut manys) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=s.export_rounds {
        let pager = pager(std::slice::from_ref(&first), &pager_file, up_pid)?;
        let _ = std::fs::remove_file(&pager_file);
        eprintln!(
            "bench:   round {round}: pager     {:>8} resources in {:>7.2}s",
            pager.resources, pager.secs
        );
        let one = proxy_run(s, &base, up_pid, "export-1", 1, "$export?_type=Observation")?;
        eprintln!(
            "bench:   round {round}: 1 slice   {:>8} resources in {:>7.2}s, peak RSS {:.1} MiB",
            one.resources,
            one.secs,
            one.rss.unwrap_or(0) as f64 / MIB
        );
        let many = proxy_run(
            s,
            &base,
            up_pid,
            &name,
            s.slices,
            "$export?_type=Observation",
        )?;
        eprintln!(
            "bench:   round {round}: {} slices  {:>8} resources in {:>7.2}s, peak RSS {:.1} MiB",
            s.slices,
            many.resources,
            many.secs,
            many.rss.unwrap_or(0) as f64 / MIB
        );
        pagers.push(pager);
        ones.push(one);
        manys.push(many);
    }
    let (pager, one, many) = (
        median_round(pagers),
        median_round(ones),
        median_round(manys),
    );
    drop(up);
    Ok(SizeResult {
        size,
        pager,
        one,
        many,
    })
}

/// The round with the median time, reporting the highest peak RSS of all rounds.
fn median_round(mut runs: Vec<Measured>) -> Measured {
    let rss = runs.iter().filter_map(|m| m.rss).max();
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mut m = runs.swap_remove(runs.len() / 2);
    m.rss = rss;
    m
}

struct RealResult {
    types: usize,
    pager: Measured,
    one: Measured,
    many: Option<std::result::Result<Measured, String>>,
    /// A Group export of every patient: by type, and organized by patient (3.0.0).
    group: std::result::Result<GroupRuns, String>,
}

/// A Group export of the real upstream's patients, by type and with `organizeOutputBy=Patient`.
struct GroupRuns {
    patients: usize,
    by_type: Measured,
    by_patient: Measured,
}

/// Puts a Group of every Patient of the real upstream there, and exports it both ways, alternating.
fn real_group_exports(s: &Settings, base: &str) -> Result<GroupRuns> {
    let client = http_client();
    let mut members = Vec::new();
    let mut next = Some(format!("{base}/Patient?_elements=id&_count=500"));
    while let Some(url) = next {
        let page: serde_json::Value = client
            .get(&url)
            .send()
            .and_then(|r| r.json())
            .map_err(|e| format!("{url}: {e}"))?;
        for entry in page["entry"].as_array().into_iter().flatten() {
            let id = entry["resource"]["id"].as_str().unwrap_or_default();
            members.push(serde_json::json!({"entity": {"reference": format!("Patient/{id}")}}));
        }
        next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str().map(str::to_owned));
    }
    let patients = members.len();
    let group = serde_json::json!({"resourceType": "Group", "id": "bench-all", "type": "person",
        "actual": true, "member": members});
    let put = client
        .put(format!("{base}/Group/bench-all"))
        .header("Content-Type", "application/fhir+json")
        .body(group.to_string())
        .send()
        .map_err(|e| format!("PUT Group/bench-all: {e}"))?;
    if !put.status().is_success() {
        return Err(format!("PUT Group/bench-all answered {}", put.status()));
    }
    let (mut by_type, mut by_patient) = (Vec::new(), Vec::new());
    for round in 0..s.export_rounds {
        let plain = "Group/bench-all/$export";
        by_type.push(proxy_run(
            s,
            base,
            None,
            &format!("group-{round}"),
            1,
            plain,
        )?);
        let organized = "Group/bench-all/$export?organizeOutputBy=Patient";
        by_patient.push(proxy_run(
            s,
            base,
            None,
            &format!("group-org-{round}"),
            1,
            organized,
        )?);
    }
    Ok(GroupRuns {
        patients,
        by_type: median_round(by_type),
        by_patient: median_round(by_patient),
    })
}

fn real_exports(s: &Settings, base: &str) -> Result<RealResult> {
    eprintln!("bench: real upstream {base}");
    let client = http_client();
    let cap: serde_json::Value = client
        .get(format!("{base}/metadata"))
        .header("Accept", "application/fhir+json")
        .send()
        .and_then(|r| r.json())
        .map_err(|e| format!("{base}/metadata: {e}"))?;
    let mut types: Vec<String> = Vec::new();
    for rest in cap["rest"].as_array().into_iter().flatten() {
        if rest["mode"] != "server" {
            continue;
        }
        for r in rest["resource"].as_array().into_iter().flatten() {
            let search = r["interaction"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["code"] == "search-type");
            if let (true, Some(t)) = (search, r["type"].as_str()) {
                types.push(t.to_owned());
            }
        }
    }
    types.sort();
    types.dedup();
    let now = now_instant();
    let firsts: Vec<String> = types
        .iter()
        .map(|t| format!("{base}/{t}?_count={}&_lastUpdated=le{now}", s.page_size))
        .collect();
    // Rounds interleaved, the median reported: a run takes under a second, so one round is noise.
    let pager_file = s.work.join("pager-real.out");
    let (mut pagers, mut ones, mut manys) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..s.export_rounds {
        let p = pager(&firsts, &pager_file, None)?;
        let _ = std::fs::remove_file(&pager_file);
        let one = proxy_run(s, base, None, &format!("real-1-{round}"), 1, "$export")?;
        let many = proxy_run(
            s,
            base,
            None,
            &format!("real-n-{round}"),
            s.slices,
            "$export",
        );
        eprintln!(
            "bench:   round {round}: pager {:.2}s, 1 slice {:.2}s, {} slices {}",
            p.secs,
            one.secs,
            s.slices,
            match &many {
                Ok(m) => format!("{:.2}s", m.secs),
                Err(e) => format!("failed: {e}"),
            }
        );
        pagers.push(p);
        ones.push(one);
        manys.push(many);
    }
    let (pager, one) = (median_round(pagers), median_round(ones));
    let many = manys
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .map(median_round);
    eprintln!(
        "bench:   median: pager {} resources in {:.2}s, 1 slice {} in {:.2}s",
        pager.resources, pager.secs, one.resources, one.secs
    );
    let group = real_group_exports(s, base);
    match &group {
        Ok(g) => eprintln!(
            "bench:   Group of {}: by type {:.2}s, by patient {:.2}s",
            g.patients, g.by_type.secs, g.by_patient.secs
        ),
        Err(e) => eprintln!("bench:   Group export failed: {e}"),
    }
    Ok(RealResult {
        types: types.len(),
        pager,
        one,
        many: Some(many),
        group,
    })
}

// ---------------------------------------------------------------------------------------------------
// Pass-through load (wrk) and nginx

#[derive(Clone, Debug, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    bad: u64,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn wrk(url: &str, conns: u32, secs: u32) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .map_err(|e| format!("wrk: {e} (install it: apt-get install wrk)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => w.p50_ms = parse_duration_ms(v).unwrap_or(f64::NAN),
            ["99%", v] => w.p99_ms = parse_duration_ms(v).unwrap_or(f64::NAN),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.bad += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                for n in rest
                    .iter()
                    .filter_map(|p| p.trim_end_matches(',').parse::<u64>().ok())
                {
                    w.bad += n;
                }
            }
            _ => {}
        }
    }
    if w.rps == 0.0 {
        return Err(format!(
            "wrk gave no result for {url}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(w)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_wrk(runs: &[Wrk]) -> Wrk {
    Wrk {
        rps: median(runs.iter().map(|w| w.rps).collect()),
        p50_ms: median(runs.iter().map(|w| w.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|w| w.p99_ms).collect()),
        bad: runs.iter().map(|w| w.bad).sum(),
    }
}

fn start_nginx(s: &Settings, upstream: &str) -> Result<(Proc, String)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("nginx is not installed (apt-get install nginx-light)")?;
    let dir = s.work.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let up = upstream
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .ok_or("upstream is not http")?;
    let user = if is_root() { "user root root;\n" } else { "" };
    let d = dir.display();
    let conf = format!(
        r#"{user}daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream fhir {{
        server {up};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fhir;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting nginx: {e}"))?;
    let proc = Proc {
        child,
        name: "nginx",
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            return Err(format!("nginx did not start: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, format!("http://127.0.0.1:{port}/fhir")))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

struct Load {
    conns: u32,
    throughput: Vec<(&'static str, Wrk)>,
    latency: Vec<(&'static str, Wrk)>,
    proxy_rss: Option<u64>,
}

fn pass_through(s: &Settings) -> Result<Load> {
    eprintln!("bench: pass-through load (wrk)");
    let (up, base) = start_fast_upstream(1000, 0)?;
    let proxy = start_proxy(s, &base, "passthrough", "")?;
    let (nginx, nginx_base) = start_nginx(s, &base)?;
    let client = http_client();
    let targets: [(&'static str, String); 3] = [
        ("direct", format!("{base}/Patient/1")),
        ("fhir-bulk-proxy", format!("{}/Patient/1", proxy.base)),
        ("nginx", format!("{nginx_base}/Patient/1")),
    ];
    for (_, url) in &targets {
        wait_http(&client, url, Duration::from_secs(10))?;
        // warm-up: connection pools, page cache
        wrk(url, s.load_conns, 1)?;
    }
    let mut tp: Vec<Vec<Wrk>> = vec![Vec::new(); 3];
    let mut lat: Vec<Vec<Wrk>> = vec![Vec::new(); 3];
    for round in 0..s.load_rounds {
        for (i, (name, url)) in targets.iter().enumerate() {
            let w = wrk(url, s.load_conns, s.load_secs)?;
            eprintln!(
                "bench:   round {} {name:<16} c={:<3} {:>9.0} req/s p50 {:.3} ms p99 {:.3} ms",
                round + 1,
                s.load_conns,
                w.rps,
                w.p50_ms,
                w.p99_ms
            );
            tp[i].push(w);
        }
        for (i, (name, url)) in targets.iter().enumerate() {
            let w = wrk(url, 1, s.load_secs)?;
            eprintln!(
                "bench:   round {} {name:<16} c=1   {:>9.0} req/s p50 {:.3} ms p99 {:.3} ms",
                round + 1,
                w.rps,
                w.p50_ms,
                w.p99_ms
            );
            lat[i].push(w);
        }
    }
    let proxy_rss = peak_rss(proxy.proc.pid());
    drop(nginx);
    drop(proxy);
    drop(up);
    let names = targets.map(|(n, _)| n);
    Ok(Load {
        conns: s.load_conns,
        throughput: names
            .iter()
            .zip(&tp)
            .map(|(n, r)| (*n, median_wrk(r)))
            .collect(),
        latency: names
            .iter()
            .zip(&lat)
            .map(|(n, r)| (*n, median_wrk(r)))
            .collect(),
        proxy_rss,
    })
}

// ---------------------------------------------------------------------------------------------------
// Report

struct Target {
    name: String,
    value: String,
    goal: String,
    pass: bool,
}

fn check(name: impl Into<String>, value: String, goal: &str, pass: bool) -> Target {
    Target {
        name: name.into(),
        value,
        goal: goal.into(),
        pass,
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    n as f64 / secs.max(1e-9)
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1}", b as f64 / MIB))
        .unwrap_or_else(|| "–".into())
}

fn opt_secs(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into())
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn targets(
    s: &Settings,
    sizes: &[SizeResult],
    latency: Option<&SizeResult>,
    load: Option<&Load>,
    real: Option<&RealResult>,
) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(r) = real {
        let ratio = rate(r.one.resources, r.one.secs) / rate(r.pager.resources, r.pager.secs);
        t.push(check(
            "system export on the real upstream, 1 slice vs sequential pager",
            format!(
                "{ratio:.2}× ({:.2} s vs {:.2} s, median of {} rounds)",
                r.one.secs, r.pager.secs, s.export_rounds
            ),
            "≥ 1.0×",
            ratio >= 1.0 && r.one.resources == r.pager.resources,
        ));
    }
    if let (Some(first), Some(last)) = (sizes.first(), sizes.last()) {
        export_targets(&mut t, s, first, last);
    }
    if let Some(r) = latency {
        let pager_rate = rate(r.pager.resources, r.pager.secs);
        for (label, m, goal) in [("1 slice", &r.one, 0.95), ("", &r.many, 2.0)] {
            let label = if label.is_empty() {
                format!("{} slices", s.slices)
            } else {
                label.to_owned()
            };
            let ratio = rate(m.resources, m.secs) / pager_rate;
            t.push(check(
                format!(
                    "export, {label} vs sequential pager ({} resources, {} ms per search)",
                    r.size, s.latency_ms
                ),
                format!("{ratio:.2}×"),
                if goal >= 2.0 { "≥ 2×" } else { "≥ 0.95×" },
                ratio >= goal,
            ));
        }
    }
    if let Some(load) = load {
        let get =
            |v: &[(&str, Wrk)], n: &str| v.iter().find(|(k, _)| *k == n).map(|(_, w)| w.clone());
        if let (Some(p), Some(n)) = (
            get(&load.throughput, "fhir-bulk-proxy"),
            get(&load.throughput, "nginx"),
        ) {
            let r = p.rps / n.rps;
            t.push(check(
                format!("pass-through requests/s vs nginx (c={})", load.conns),
                format!("{r:.2}× ({:.0} vs {:.0} req/s)", p.rps, n.rps),
                "≥ 0.9×",
                r >= 0.9,
            ));
        }
        if let (Some(p), Some(d)) = (
            get(&load.latency, "fhir-bulk-proxy"),
            get(&load.latency, "direct"),
        ) {
            let added = p.p50_ms - d.p50_ms;
            t.push(check(
                "added p50 latency, proxy − direct (c=1)",
                format!("{added:.3} ms ({:.3} − {:.3})", p.p50_ms, d.p50_ms),
                "≤ 0.2 ms",
                added <= 0.2,
            ));
        }
    }
    t
}

fn export_targets(t: &mut Vec<Target>, s: &Settings, first: &SizeResult, last: &SizeResult) {
    let pager_rate = rate(last.pager.resources, last.pager.secs);
    let r1 = rate(last.one.resources, last.one.secs) / pager_rate;
    let rn = rate(last.many.resources, last.many.secs) / pager_rate;
    t.push(check(
        format!(
            "export, 1 slice vs sequential pager ({} resources)",
            last.size
        ),
        format!("{r1:.2}×"),
        "≥ 0.95×",
        r1 >= 0.95,
    ));
    t.push(check(
        format!(
            "export, {} slices vs sequential pager ({} resources)",
            s.slices, last.size
        ),
        format!("{rn:.2}×"),
        "≥ 2×",
        rn >= 2.0,
    ));
    for (label, small, large) in [
        ("1 slice", &first.one, &last.one),
        (
            if s.slices == 4 {
                "4 slices"
            } else {
                "N slices"
            },
            &first.many,
            &last.many,
        ),
    ] {
        if let (Some(a), Some(b)) = (small.rss, large.rss) {
            t.push(check(
                format!("peak RSS at {} resources, {label}", last.size),
                format!("{:.1} MiB", b as f64 / MIB),
                "< 64 MiB",
                (b as f64) < 64.0 * MIB,
            ));
            let growth = b as f64 / a as f64;
            t.push(check(
                format!(
                    "peak RSS {} vs {} resources, {label}",
                    last.size, first.size
                ),
                format!(
                    "{growth:.2}× ({:.1} vs {:.1} MiB)",
                    b as f64 / MIB,
                    a as f64 / MIB
                ),
                "≤ 1.10×",
                growth <= 1.10,
            ));
        }
    }
}

fn export_table(md: &mut String, s: &Settings, rows: &[SizeResult], payload: &[u64]) {
    let _ = writeln!(
        md,
        "| Resources | Client | Time (s) | Resources/s | MB/s | × pager | Peak RSS (MiB) | Client CPU (s) | Upstream CPU (s) | Notes |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (r, &payload) in rows.iter().zip(payload) {
        let base = rate(r.pager.resources, r.pager.secs);
        let many = format!("proxy, {} slices", s.slices);
        for (name, m) in [
            ("sequential pager", &r.pager),
            ("proxy, 1 slice", &r.one),
            (many.as_str(), &r.many),
        ] {
            let mut note = m.note.clone();
            if m.resources != r.size {
                note = join_notes(&note, &format!("expected {} resources", r.size));
            }
            if name == "sequential pager" {
                note = join_notes(
                    &note,
                    &format!(
                        "{} pages, {:.0} MB of Bundles written",
                        m.pages,
                        m.bytes as f64 / MB
                    ),
                );
            }
            let _ = writeln!(
                md,
                "| {} | {name} | {:.2} | {:.0} | {:.1} | {:.2} | {} | {} | {} | {} |",
                r.size,
                m.secs,
                rate(m.resources, m.secs),
                payload as f64 / MB / m.secs.max(1e-9),
                rate(m.resources, m.secs) / base,
                mib(m.rss),
                opt_secs(m.cpu),
                opt_secs(m.upstream_cpu),
                note
            );
        }
    }
}

fn report(
    s: &Settings,
    sizes: &[SizeResult],
    latency: Option<&SizeResult>,
    load: &std::result::Result<Load, String>,
    real: &Option<std::result::Result<RealResult, String>>,
    targets: &[Target],
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let commit = shell("git rev-parse --short HEAD 2>/dev/null");
    let dirty =
        if shell("git status --porcelain --untracked-files=no -- src Cargo.toml 2>/dev/null")
            .is_empty()
        {
            ""
        } else {
            " (with uncommitted changes to src/)"
        };
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `bench/run` (`cargo bench --bench export`) from the numbers it measured; run it again to \
         replace them. One run, every number below from the same run. `BENCH_SMALL=1 bench/run` is a \
         one-minute smoke run; `benches/export/main.rs` lists the other knobs (sizes, page size, load duration, \
         upstream latency).\n"
    );
    let _ = writeln!(
        md,
        "- Date: {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(md, "- Command: `{}`", s.command);
    let _ = writeln!(md, "- Commit: {commit}{dirty}");
    let _ = writeln!(
        md,
        "- Machine: {} CPUs (`nproc`), {cpu}; `free -g`:\n\n```\n{}\n```",
        shell("nproc"),
        shell("free -g | sed '1s/^/x/'").trim_start_matches('x')
    );
    let _ = writeln!(
        md,
        "- Settings: `page_size = {}`, `resources_per_file = {}`, `slice_concurrency = 4`, \
         `[upstream] max_concurrent_requests = 8`, `requests_per_second = 100000`; wrk `-t1`, {} s per run, \
         {} round(s) (median); export rounds {} (median); total run time {:.0} s{}{}. Every proxy is \
         started as Kubernetes starts one: nothing is sent to it before its `/readyz` answers 200 (which \
         reads the upstream's CapabilityStatement)\n",
        s.page_size,
        s.per_file,
        s.load_secs,
        s.load_rounds,
        s.export_rounds,
        elapsed.as_secs_f64(),
        if s.upstream_delay_ms > 0 {
            format!(
                "; the fast upstream delays every search by {} ms (`BENCH_UPSTREAM_DELAY_MS`)",
                s.upstream_delay_ms
            )
        } else {
            String::new()
        },
        if s.small {
            "; **smoke run (`BENCH_SMALL=1`): small sizes, targets are defined at 100k/1M resources**"
        } else {
            ""
        }
    );

    let _ = writeln!(md, "## Targets (fast upstream)\n");
    let _ = writeln!(md, "| Target | Measured | Goal | Result |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.name,
            t.value,
            t.goal,
            if t.pass { "PASS" } else { "**FAIL**" }
        );
    }
    if let Err(e) = load {
        let _ = writeln!(md, "\nPass-through targets not measured: {e}");
    }

    let _ = writeln!(
        md,
        "\n## System export, fast upstream (`_type=Observation`)\n"
    );
    let payload: Vec<u64> = sizes.iter().map(|r| r.one.bytes).collect();
    export_table(&mut md, s, sizes, &payload);
    let _ = writeln!(
        md,
        "\nMB/s is the NDJSON payload (the 1-slice export's file bytes: {}) over each client's time, so it \
         compares like with like; the pager writes whole Bundles (larger). Time: kick-off to manifest for the \
         proxy (polled every {} ms), first request to fsync of its file for the pager. Each row is the median \
         of {} interleaved rounds (pager, 1 slice, N slices, then again), its time, CPU and rate from that round. \
         Peak RSS: `VmHWM` of a fresh proxy process read after the export, the highest of all rounds. CPU: user+system seconds of the client (the proxy process, or the pager's own process) and of the fast upstream during the run, from \
         `/proc/<pid>/stat`.",
        sizes
            .iter()
            .map(|r| format!("{:.1} MB at {}", r.one.bytes as f64 / MB, r.size))
            .collect::<Vec<_>>()
            .join(", "),
        poll_ms(),
        s.export_rounds
    );

    if let Some(r) = latency {
        let _ = writeln!(
            md,
            "\n## System export, fast upstream answering each search after {} ms (`BENCH_LATENCY_MS`)\n",
            s.latency_ms
        );
        export_table(&mut md, s, std::slice::from_ref(r), &[r.one.bytes]);
        let _ = writeln!(
            md,
            "\nThe same data and measurements as above; only the upstream's per-search latency differs. A real \
             server takes far longer per 1000-resource page (a database query and serialisation); this is the \
             case slicing is for: the pager waits for every page in turn, slices overlap the waits."
        );
    }

    let _ = writeln!(
        md,
        "\n## Pass-through, `GET /fhir/Patient/1` of the fast upstream\n"
    );
    match load {
        Ok(load) => {
            let _ = writeln!(
                md,
                "| Path | Requests/s (c={c}) | p50 (c={c}) ms | p99 (c={c}) ms | Requests/s (c=1) | p50 (c=1) ms | p99 (c=1) ms | Errors |",
                c = load.conns
            );
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for ((name, t), (_, l)) in load.throughput.iter().zip(&load.latency) {
                let _ = writeln!(
                    md,
                    "| {name} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {} |",
                    t.rps,
                    t.p50_ms,
                    t.p99_ms,
                    l.rps,
                    l.p50_ms,
                    l.p99_ms,
                    t.bad + l.bad
                );
            }
            let _ = writeln!(
                md,
                "\n`wrk -t1 -c{} -d{}s --latency` (throughput) and `wrk -t1 -c1 -d{}s --latency` (latency), no Lua; \
                 nginx {} with `worker_processes auto`, upstream keepalive 64, HTTP/1.1 to the upstream. \
                 Proxy peak RSS after the load: {} MiB.",
                load.conns,
                s.load_secs,
                s.load_secs,
                shell("nginx -v 2>&1 | sed 's/.*nginx\\///'"),
                mib(load.proxy_rss)
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }

    let _ = writeln!(md, "\n## System export, real upstream\n");
    match real {
        None => {
            let _ = writeln!(
                md,
                "Not measured (no `BENCH_REAL_UPSTREAM`; `bench/run` starts one when `../shared/upstream` exists)."
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(md, "Failed: {e}");
        }
        Some(Ok(r)) => {
            let _ = writeln!(
                md,
                "{}{} searchable types, all exported (no `_type`); the pager pages each type in turn.\n",
                if s.real_note.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", s.real_note)
                },
                r.types
            );
            let _ = writeln!(md, "| Client | Resources | Time (s) | Resources/s | MB/s | × pager | Peak RSS (MiB) | Notes |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
            let base = rate(r.pager.resources, r.pager.secs);
            let payload = r.one.bytes;
            let many_name = format!("proxy, {} slices", s.slices);
            let mut rows: Vec<(&str, std::result::Result<&Measured, &String>)> = vec![
                ("sequential pager", Ok(&r.pager)),
                ("proxy, 1 slice", Ok(&r.one)),
            ];
            if let Some(m) = &r.many {
                rows.push((many_name.as_str(), m.as_ref()));
            }
            for (name, m) in rows {
                match m {
                    Ok(m) => {
                        let _ = writeln!(
                            md,
                            "| {name} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} |",
                            m.resources,
                            m.secs,
                            rate(m.resources, m.secs),
                            payload as f64 / MB / m.secs.max(1e-9),
                            rate(m.resources, m.secs) / base,
                            mib(m.rss),
                            m.note
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(md, "| {name} | – | – | – | – | – | – | failed: {e} |");
                    }
                }
            }
            group_table(&mut md, &r.group);
        }
    }
    md
}

/// The real upstream's Group export by type beside the same export organized by patient.
fn group_table(md: &mut String, group: &std::result::Result<GroupRuns, String>) {
    let _ = writeln!(
        md,
        "\n## Group export, real upstream: by type and `organizeOutputBy=Patient`\n"
    );
    let g = match group {
        Ok(g) => g,
        Err(e) => {
            let _ = writeln!(md, "Failed: {e}");
            return;
        }
    };
    let _ = writeln!(
        md,
        "`Group/bench-all/$export` of a Group of all {} patients, each way in a fresh proxy (median of the rounds). \
         Organized output adds one header line per block (and per file a split block goes on in).\n",
        g.patients
    );
    let _ = writeln!(
        md,
        "| Output | Lines | Time (s) | Lines/s | Peak RSS (MiB) | × by type (time) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (name, m) in [("by type", &g.by_type), ("by patient", &g.by_patient)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.2} | {:.0} | {} | {:.2} |",
            m.resources,
            m.secs,
            rate(m.resources, m.secs),
            mib(m.rss),
            m.secs / g.by_type.secs.max(1e-9)
        );
    }
}

/// Keeps a hand-written notes section of the previous report (between the markers) across runs.
fn keep_notes(previous: &str) -> Option<&str> {
    let start = previous.find("<!-- notes -->")?;
    let end = previous.find("<!-- /notes -->")? + "<!-- /notes -->".len();
    (end > start).then(|| &previous[start..end])
}

/// Clinical traffic beside exports: the capacity-limited fast upstream, then the real one when given.
fn clinical_runs(s: &Settings) -> Vec<(String, std::result::Result<clinical::Runs, String>)> {
    let capacity = env_or("BENCH_CAPACITY", 4);
    let cost_ms = env_or("BENCH_SEARCH_COST_MS", 10);
    let entry_us = env_or("BENCH_ENTRY_COST_US", 20);
    let size = if s.small { 20_000 } else { 100_000 };
    let mut runs = Vec::new();
    let fast = start_costly_upstream(size, cost_ms, capacity, entry_us).and_then(|(up, base)| {
        let r = clinical::run(
            s,
            "fast upstream",
            &base,
            "Patient?_count=10",
            "$export?_type=Observation",
            &format!("time_slices = {}", s.slices),
        );
        drop(up);
        r
    });
    runs.push((
        format!(
            "Clinical traffic beside an export, fast upstream serving {capacity} requests at once \
             ({cost_ms} ms per search + {entry_us} µs per resource, {size} Observations)"
        ),
        fast,
    ));
    if let Some(base) = &s.real_upstream {
        let real = clinical::run(s, "real upstream", base, "Patient?_count=10", "$export", "");
        runs.push((
            format!(
                "Clinical traffic beside an export, real upstream ({})",
                if s.real_note.is_empty() {
                    base.as_str()
                } else {
                    s.real_note.as_str()
                }
            ),
            real,
        ));
    }
    for (heading, r) in &runs {
        if let Err(e) = r {
            eprintln!("bench: {heading}: {e}");
        }
    }
    runs
}

pub fn main() -> Result<()> {
    let started = Instant::now();
    let s = Settings::from_env()?;
    std::env::set_current_dir(&s.root).map_err(|e| e.to_string())?;
    let sizes = if s.runs("export") {
        fast_exports(&s)?
    } else {
        Vec::new()
    };
    // The same export against an upstream that takes time per search, as real servers do: what slicing
    // is for. Zero latency measures the proxy's own cost instead.
    let latency = match sizes.last() {
        Some(last) if s.latency_ms > 0 && s.upstream_delay_ms == 0 => {
            Some(fast_export(&s, last.size, s.latency_ms)?)
        }
        _ => None,
    };
    let load = if s.runs("load") {
        pass_through(&s)
    } else {
        Err("not run (BENCH_ONLY)".into())
    };
    if let Err(e) = &load {
        eprintln!("bench: pass-through load failed: {e}");
    }
    let real = match &s.real_upstream {
        Some(base) if s.runs("real") => Some(real_exports(&s, base)),
        _ => None,
    };
    let clinical = if s.runs("clinical") {
        clinical_runs(&s)
    } else {
        Vec::new()
    };
    let group = s.runs("group").then(|| {
        let smart_fetch = std::env::var_os("BENCH_SMART_FETCH").map(PathBuf::from);
        let runs = group::run(&s, smart_fetch.as_deref());
        if let Err(e) = &runs {
            eprintln!("bench: Group-scale run: {e}");
        }
        runs
    });
    let real_done = real.as_ref().and_then(|r| r.as_ref().ok());
    let mut targets = targets(&s, &sizes, latency.as_ref(), load.as_ref().ok(), real_done);
    for (_, runs) in &clinical {
        for (name, value, goal, pass) in runs.iter().flat_map(clinical::targets) {
            targets.push(check(name, value, goal, pass));
        }
    }
    for (name, value, goal, pass) in group.iter().flatten().flat_map(group::targets) {
        targets.push(check(name, value, goal, pass));
    }
    let mut md = report(
        &s,
        &sizes,
        latency.as_ref(),
        &load,
        &real,
        &targets,
        started.elapsed(),
    );
    for (heading, runs) in &clinical {
        clinical::table(&mut md, heading, runs);
    }
    if let Some(runs) = &group {
        group::table(&mut md, runs);
    }
    if let Some(out) = &s.out {
        let previous = std::fs::read_to_string(out).unwrap_or_default();
        if let Some(notes) = keep_notes(&previous) {
            md.push('\n');
            md.push_str(notes);
            md.push('\n');
        }
    }
    println!("\n{md}");
    println!("Targets:");
    for t in &targets {
        println!(
            "  {:<4} {}: {} (goal {})",
            if t.pass { "PASS" } else { "FAIL" },
            t.name,
            t.value,
            t.goal
        );
    }
    if let Some(out) = &s.out {
        std::fs::write(out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("wrote {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&s.work);
    Ok(())
}
