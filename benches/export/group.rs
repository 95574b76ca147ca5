//! Group-scale exports: Group exports of a tenth of the roster upstream's patients and of all of them,
//! and a Patient-level export, against an upstream that serves a few requests at once and pays per
//! search and per resource; beside them, in the same run, the proxy's earlier strategy (every type
//! searched, 50 patients per search), a plain sequential pager and smart-fetch `crawl` (PyPI, pinned)
//! against the upstream directly.
//!
//! Requests, empty searches and resources are counted by the roster upstream itself (`/stats`), not by
//! the proxy; each proxy run is a fresh process, so its peak RSS is that run's.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::{
    env_or, export, http_client, mib, pager, start_proxy_with, start_upstream, Proc, Result,
    Settings,
};
use crate::roster::{self, RECORD, TYPES};

/// The proxy's strategy before the Group work: no empty-type probe, 50 patients per search.
const OLD_STRATEGY: &str = "skip_empty_types = false\npatient_batch_size = 50";

/// One client's run of one export.
pub(super) struct Row {
    pub client: String,
    pub members: u64,
    pub secs: f64,
    pub resources: u64,
    pub rss: Option<u64>,
    /// Requests the upstream answered, searches of them that found nothing, and count-only searches.
    pub requests: u64,
    pub empty: u64,
    pub counts: u64,
    pub note: String,
}

/// The whole Group-scale run.
pub(super) struct Runs {
    pub patients: u64,
    pub page_size: u32,
    pub cost: String,
    pub rows: Vec<Row>,
}

/// What the roster upstream counted.
#[derive(serde::Deserialize, Default, Clone, Copy)]
struct Stats {
    requests: u64,
    empty: u64,
    counts: u64,
}

fn stats(base: &str) -> Result<Stats> {
    let url = format!("{}/stats", base.trim_end_matches("/fhir"));
    http_client()
        .get(&url)
        .send()
        .and_then(|r| r.json())
        .map_err(|e| format!("{url}: {e}"))
}

/// Resources a Group of `members` patients holds.
pub(super) fn expected(members: u64) -> u64 {
    members * roster::per_patient_total()
}

/// The fewest requests an export of `members` patients can make: every data page at `page_size`, and
/// one count probe per declared type.
pub(super) fn minimum_requests(members: u64, page_size: u32) -> u64 {
    let pages = |n: u64| n.div_ceil(page_size as u64);
    pages(members)
        + RECORD
            .iter()
            .map(|(_, per)| pages(members * per))
            .sum::<u64>()
        + TYPES as u64
}

/// Runs every client on Groups of a tenth of the patients and of all of them, and a Patient export.
pub(super) fn run(s: &Settings, smart_fetch: Option<&Path>) -> Result<Runs> {
    let patients: u64 = env_or("BENCH_GROUP_PATIENTS", if s.small { 2_000 } else { 10_000 });
    let capacity: u64 = env_or("BENCH_CAPACITY", 4);
    let cost_ms: u64 = env_or("BENCH_SEARCH_COST_MS", 10);
    let entry_us: u64 = env_or("BENCH_ENTRY_COST_US", 20);
    let smart_fetch_max: u64 = env_or("BENCH_SMART_FETCH_MAX_PATIENTS", 1_000);
    eprintln!("bench: roster upstream of {patients} patients");
    let (up, base) = start_upstream(
        "roster",
        &[
            ("FBP_BENCH_PATIENTS", patients.to_string()),
            ("FBP_BENCH_DELAY_MS", cost_ms.to_string()),
            ("FBP_BENCH_CAPACITY", capacity.to_string()),
            ("FBP_BENCH_ENTRY_US", entry_us.to_string()),
        ],
    )?;
    let mut rows = Vec::new();
    for members in [patients / 10, patients] {
        let kickoff = format!("Group/roster-{members}/$export");
        rows.push(proxy_row(s, &base, "proxy", "", members, &kickoff)?);
        rows.push(proxy_row(
            s,
            &base,
            "proxy, earlier strategy",
            OLD_STRATEGY,
            members,
            &kickoff,
        )?);
        rows.push(pager_row(s, &base, &up, members)?);
        match smart_fetch {
            Some(program) if members <= smart_fetch_max => {
                rows.push(smart_fetch_row(s, program, &base, patients, members)?)
            }
            _ => {}
        }
    }
    rows.push(proxy_row(
        s,
        &base,
        "proxy, Patient-level export",
        "",
        patients,
        "Patient/$export",
    )?);
    drop(up);
    Ok(Runs {
        patients,
        page_size: s.page_size,
        cost: format!(
            "{capacity} requests at once, {cost_ms} ms per search + {entry_us} µs per resource"
        ),
        rows,
    })
}

fn proxy_row(
    s: &Settings,
    base: &str,
    client: &str,
    export_extra: &str,
    members: u64,
    kickoff: &str,
) -> Result<Row> {
    let slug: String = client
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let name = format!("group-{slug}-{members}");
    let proxy = start_proxy_with(s, base, &name, "", export_extra)?;
    let before = stats(base)?;
    let m = export(&http_client(), &proxy, kickoff, None)?;
    let after = stats(base)?;
    eprintln!(
        "bench: {client}, {members} patients: {:.2} s, {} resources, {} requests",
        m.secs,
        m.resources,
        after.requests - before.requests
    );
    Ok(row(
        client,
        members,
        m.secs,
        m.resources,
        m.rss,
        before,
        after,
        m.note,
    ))
}

#[allow(clippy::too_many_arguments)]
fn row(
    client: &str,
    members: u64,
    secs: f64,
    resources: u64,
    rss: Option<u64>,
    before: Stats,
    after: Stats,
    note: String,
) -> Row {
    Row {
        client: client.to_owned(),
        members,
        secs,
        resources,
        rss,
        requests: after.requests - before.requests,
        empty: after.empty - before.empty,
        counts: after.counts - before.counts,
        note,
    }
}

fn group_members(members: u64, patients: u64) -> Vec<u64> {
    roster::members(members, patients).collect()
}

fn pager_row(s: &Settings, base: &str, up: &Proc, members: u64) -> Result<Row> {
    let patients = patient_count(base)?;
    let group = group_members(members, patients);
    let urls = roster::client_searches(base, &group, 100, s.page_size);
    let out = s.work.join(format!("group-pager-{members}.json"));
    let before = stats(base)?;
    let m = pager(&urls, &out, Some(up.pid()))?;
    let after = stats(base)?;
    let _ = std::fs::remove_file(&out);
    Ok(row(
        "sequential pager (100 patients per search)",
        members,
        m.secs,
        m.resources,
        None,
        before,
        after,
        String::new(),
    ))
}

fn patient_count(base: &str) -> Result<u64> {
    let url = format!("{base}/Patient?_count=0");
    let page: serde_json::Value = http_client()
        .get(&url)
        .send()
        .and_then(|r| r.json())
        .map_err(|e| format!("{url}: {e}"))?;
    page["total"]
        .as_u64()
        .ok_or_else(|| format!("{url}: no total"))
}

/// smart-fetch `crawl` of the Group's patients, given as an id file (the way to crawl a server without
/// bulk export), against the upstream directly; resources are the lines it wrote.
fn smart_fetch_row(
    s: &Settings,
    program: &Path,
    base: &str,
    patients: u64,
    members: u64,
) -> Result<Row> {
    let dir = s.work.join(format!("smart-fetch-{members}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ids = dir.join("ids.txt");
    let list: Vec<String> = group_members(members, patients)
        .iter()
        .map(|p| format!("pat-{p:08}"))
        .collect();
    std::fs::write(&ids, list.join("\n") + "\n").map_err(|e| e.to_string())?;
    let out = dir.join("out");
    let before = stats(base)?;
    let start = Instant::now();
    let run = Command::new(program)
        .args([
            "crawl",
            "--fhir-url",
            base,
            "--no-default-filters",
            "--id-file",
        ])
        .arg(&ids)
        .arg(&out)
        .env("NO_COLOR", "1")
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let after = stats(base)?;
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        return Err(format!(
            "smart-fetch crawl exited with {}: {}",
            run.status,
            err.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ));
    }
    let mut resources = 0;
    for entry in std::fs::read_dir(&out).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Its own log is `log.ndjson`; the resources are `{Type}.ndjson.gz`.
        if name.ends_with(".ndjson.gz") {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let lines = std::io::BufRead::lines(std::io::BufReader::new(
                flate2::read::GzDecoder::new(file),
            ));
            resources += lines
                .map_while(|l| l.ok())
                .filter(|l| !l.is_empty())
                .count() as u64;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row(
        "smart-fetch 1.0.3 crawl",
        members,
        secs,
        resources,
        None,
        before,
        after,
        String::new(),
    ))
}

fn find<'r>(runs: &'r Runs, client: &str, members: u64) -> Option<&'r Row> {
    runs.rows
        .iter()
        .find(|r| r.client.starts_with(client) && r.members == members)
}

/// The targets of the run: `(name, value, goal, pass)`.
pub(super) fn targets(runs: &Runs) -> Vec<(String, String, &'static str, bool)> {
    let mut t = Vec::new();
    let (small, large) = (runs.patients / 10, runs.patients);
    let Some(proxy) = find(runs, "proxy", large) else {
        return t;
    };
    for r in runs.rows.iter().filter(|r| r.client.starts_with("proxy")) {
        let want = expected(r.members);
        t.push((
            format!(
                "{} of {} patients exports every resource",
                r.client, r.members
            ),
            format!("{} of {want}", r.resources),
            "= the upstream's",
            r.resources == want && r.note.is_empty(),
        ));
    }
    if let Some(old) = find(runs, "proxy, earlier", large) {
        let ratio = old.secs / proxy.secs;
        t.push((
            format!("Group export of {large} patients vs the earlier strategy"),
            format!("{ratio:.2}× ({:.2} s vs {:.2} s)", proxy.secs, old.secs),
            "≥ 2×",
            ratio >= 2.0,
        ));
    }
    let crawled = find(runs, "smart-fetch", large).or_else(|| find(runs, "smart-fetch", small));
    if let (Some(sf), Some(p)) = (
        crawled,
        crawled.and_then(|sf| find(runs, "proxy", sf.members)),
    ) {
        let ratio = sf.secs / p.secs;
        t.push((
            format!(
                "Group export of {} patients vs smart-fetch crawl",
                sf.members
            ),
            format!("{ratio:.2}× ({:.2} s vs {:.2} s)", p.secs, sf.secs),
            "≥ 3× (10,000 patients)",
            ratio >= 3.0,
        ));
    }
    let minimum = minimum_requests(large, runs.page_size);
    let ratio = proxy.requests as f64 / minimum as f64;
    t.push((
        format!("Upstream requests of the Group export of {large} patients"),
        format!(
            "{ratio:.2}× the minimum ({} vs {minimum}; {} empty)",
            proxy.requests, proxy.empty
        ),
        "≤ 1.2×",
        ratio <= 1.2,
    ));
    if let Some(rss) = proxy.rss {
        t.push((
            format!("Peak RSS of the Group export of {large} patients"),
            mib(Some(rss)),
            "< 64 MiB",
            (rss as f64) < 64.0 * super::MIB,
        ));
        if let Some(small_rss) = find(runs, "proxy", small).and_then(|r| r.rss) {
            let ratio = rss as f64 / small_rss as f64;
            t.push((
                format!("Peak RSS, Group export of {small} → {large} patients"),
                format!(
                    "{ratio:.2}× ({} → {})",
                    mib(Some(small_rss)),
                    mib(Some(rss))
                ),
                "≤ 1.10×",
                ratio <= 1.10,
            ));
        }
    }
    t
}

/// The run's table, appended to the report.
pub(super) fn table(md: &mut String, runs: &std::result::Result<Runs, String>) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "\n## Group-scale exports (roster upstream)\n");
    let runs = match runs {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
            return;
        }
    };
    let _ = writeln!(
        md,
        "{} patients of {} resources each over {} types ({} holding data), `_count={}`; the upstream \
         serves {}. Requests, empty searches and count probes are the upstream's own count. Minimum \
         requests: every data page plus one count probe per type.\n",
        runs.patients,
        roster::per_patient_total(),
        TYPES,
        RECORD.len() + 1,
        runs.page_size,
        runs.cost
    );
    let _ = writeln!(
        md,
        "| Client | Patients | Time | Resources | Resources/s | Peak RSS | Requests | Requests per resource | Empty searches | Count probes | vs minimum |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &runs.rows {
        let minimum = minimum_requests(r.members, runs.page_size);
        let _ = writeln!(
            md,
            "| {}{} | {} | {:.2} s | {} | {:.0} | {} | {} | {:.4} | {} | {} | {:.2}× |",
            r.client,
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            },
            r.members,
            r.secs,
            r.resources,
            r.resources as f64 / r.secs.max(1e-9),
            mib(r.rss),
            r.requests,
            r.requests as f64 / r.resources.max(1) as f64,
            r.empty,
            r.counts,
            r.requests as f64 / minimum as f64,
        );
    }
}
