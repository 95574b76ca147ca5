//! Clinical traffic beside an export: pass-through latency at a steady request rate with no export, with
//! an export at fixed concurrency (`adaptive_concurrency = false`) and with adaptive concurrency, and the
//! export's throughput alone and beside the traffic, against an upstream that serves a few requests at once.
//!
//! The load is open loop: requests are due at a fixed rate whatever the answers do, and each latency runs
//! from when its request was due, so a request that waited for a free client counts that wait (no
//! coordinated omission). Exports run back to back for the whole part, so that every latency sample of
//! an "export running" part was taken while one ran.
//!
//! The floor part runs the load beside a loop of the cheapest search there is (one resource of the
//! clinicians' type, asked straight of the upstream, one at a time): on an upstream that serves one
//! request at a time, no export that sends anything at all while the load runs can do better than that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{export, http_client, start_proxy_with, Proxy, Result, Settings};

/// Clients the load keeps; more than the rate ever has in flight against a healthy upstream.
const LOAD_CLIENTS: usize = 16;

/// Latencies of one part of the run, in ms.
#[derive(Clone, Debug)]
pub(super) struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub errors: usize,
}

impl Latency {
    fn of(mut ms: Vec<f64>, errors: usize) -> Latency {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if ms.is_empty() {
                return f64::NAN;
            }
            let i = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[i]
        };
        Latency {
            n: ms.len(),
            p50: at(0.50),
            p99: at(0.99),
            errors,
        }
    }
}

/// An export mode's throughput, alone and beside the clinical load, and the load's latency then.
pub(super) struct Mode {
    pub name: &'static str,
    /// Resources per second of the exports run with nobody else on the upstream.
    pub alone_rate: f64,
    pub alone_exports: usize,
    /// Resources per second of the exports run beside the clinical load.
    pub loaded_rate: f64,
    pub loaded_exports: usize,
    pub loaded: Latency,
}

/// The whole clinical-traffic run against one upstream: its rounds, each of every part.
pub(super) struct Runs {
    pub upstream: String,
    pub clinical_path: String,
    pub kickoff: String,
    pub rate: f64,
    pub secs: f64,
    pub rounds: Vec<Round>,
}

/// One round: the load alone, beside the floor's searches, and beside each export mode.
pub(super) struct Round {
    pub idle: Latency,
    pub floor: Floor,
    pub modes: Vec<Mode>,
}

impl Round {
    /// p99 beside `mode`'s export over p99 with no export, within this round.
    fn ratio(&self, mode: &str) -> Option<f64> {
        let m = self.modes.iter().find(|m| m.name == mode)?;
        Some(m.loaded.p99 / self.idle.p99)
    }

    /// p99 beside the floor's searches over p99 with no export, within this round.
    fn floor_ratio(&self) -> f64 {
        self.floor.loaded.p99 / self.idle.p99
    }
}

impl Runs {
    /// The round whose adaptive ratio is the median, the one the table shows.
    fn median_round(&self) -> Option<&Round> {
        let mut by_ratio: Vec<&Round> = self.rounds.iter().collect();
        by_ratio.sort_by(|a, b| {
            let (a, b) = (a.ratio("adaptive"), b.ratio("adaptive"));
            a.unwrap_or(f64::NAN).total_cmp(&b.unwrap_or(f64::NAN))
        });
        by_ratio.get(by_ratio.len() / 2).copied()
    }

    /// `f` of every round, as a comma-separated list.
    fn by_round(&self, f: impl Fn(&Round) -> Option<f64>) -> String {
        let all: Vec<String> = self
            .rounds
            .iter()
            .map(|r| f(r).map_or("–".into(), |v| format!("{v:.2}")))
            .collect();
        all.join(", ")
    }
}

/// The load's latency beside back-to-back one-resource searches, and those searches' count, failures
/// and median.
pub(super) struct Floor {
    pub path: String,
    pub loaded: Latency,
    pub searches: usize,
    pub failed: usize,
    pub median_ms: f64,
}

/// Whether a GET of `url` answered 2xx with its whole body read.
fn fetched(client: &reqwest::blocking::Client, url: &str) -> bool {
    client
        .get(url)
        .header("Accept", "application/fhir+json")
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .is_ok()
}

/// Asks `url` one request after another until `stop`: each answered one's latency in ms, and how
/// many failed.
fn back_to_back(url: String, stop: Arc<AtomicBool>) -> JoinHandle<(Vec<f64>, usize)> {
    std::thread::spawn(move || {
        let client = http_client();
        let (mut ms, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            if fetched(&client, &url) {
                ms.push(sent.elapsed().as_secs_f64() * 1000.0);
            } else {
                failed += 1;
            }
        }
        (ms, failed)
    })
}

/// Steady pass-through requests to `url` until stopped: their latencies (ms) and errors.
struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<f64>, usize)>,
}

impl Load {
    fn start(url: String, rate: f64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            let (tx, rx) = mpsc::channel::<Instant>();
            let rx = Arc::new(Mutex::new(rx));
            let seen = Arc::new(Mutex::new((Vec::new(), 0usize)));
            let clients: Vec<_> = (0..LOAD_CLIENTS)
                .map(|_| {
                    let (rx, seen, url) = (rx.clone(), seen.clone(), url.clone());
                    std::thread::spawn(move || {
                        let client = http_client();
                        loop {
                            let Ok(due) = rx.lock().expect("load queue").recv() else {
                                return;
                            };
                            let ok = fetched(&client, &url);
                            let took = due.elapsed().as_secs_f64() * 1000.0;
                            let mut seen = seen.lock().expect("load samples");
                            if ok {
                                seen.0.push(took);
                            } else {
                                seen.1 += 1;
                            }
                        }
                    })
                })
                .collect();
            let start = Instant::now();
            let mut k = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send(due).is_err() {
                    break;
                }
                k += 1;
            }
            drop(tx);
            for c in clients {
                let _ = c.join();
            }
            let seen = seen.lock().expect("load samples");
            (seen.0.clone(), seen.1)
        });
        Load { stop, handle }
    }

    fn finish(self) -> Latency {
        self.stop.store(true, Ordering::Relaxed);
        let (ms, errors) = self.handle.join().expect("load thread");
        Latency::of(ms, errors)
    }
}

/// Exports `kickoff` back to back for at least `secs` (at least one): resources per second, exports.
fn exports_for(proxy: &Proxy, kickoff: &str, secs: f64) -> Result<(f64, usize)> {
    let client = http_client();
    let start = Instant::now();
    let (mut resources, mut busy, mut n) = (0u64, 0.0, 0);
    while n == 0 || start.elapsed().as_secs_f64() < secs {
        let m = export(&client, proxy, kickoff, None)?;
        if !m.note.is_empty() {
            return Err(format!("export through {}: {}", proxy.base, m.note));
        }
        resources += m.resources;
        busy += m.secs;
        n += 1;
    }
    Ok((resources as f64 / busy, n))
}

/// Runs the clinical parts against `upstream`: `clinical_path` (e.g. `Patient?_count=10`) is the
/// clinicians' request, `kickoff` (e.g. `$export?_type=Observation`) the export; `export_extra` goes
/// into `[export]` of both proxies. Every part runs once per round, so that each round's ratios compare
/// parts measured minutes apart at most on a machine whose load drifts.
pub(super) fn run(
    s: &Settings,
    label: &str,
    upstream: &str,
    clinical_path: &str,
    kickoff: &str,
    export_extra: &str,
) -> Result<Runs> {
    let secs = super::env_or("BENCH_CLINICAL_SECS", if s.small { 4.0 } else { 10.0 });
    let rate = super::env_or("BENCH_CLINICAL_RATE", 50.0);
    let rounds: usize = super::env_or("BENCH_CLINICAL_ROUNDS", if s.small { 1 } else { 3 });
    let fixed = start_proxy_with(
        s,
        upstream,
        &format!("clinical-{label}-fixed"),
        "adaptive_concurrency = false",
        export_extra,
    )?;
    let adaptive = start_proxy_with(
        s,
        upstream,
        &format!("clinical-{label}-adaptive"),
        "adaptive_concurrency = true",
        export_extra,
    )?;
    // Warm both proxies' connections and the upstream's caches before anything is measured.
    exports_for(&fixed, kickoff, 0.0)?;
    exports_for(&adaptive, kickoff, 0.0)?;
    let url = |p: &Proxy| format!("{}/{clinical_path}", p.base);
    let floor_path = format!(
        "{}?_count=1",
        clinical_path.split('?').next().unwrap_or(clinical_path)
    );
    let mut all = Vec::new();
    for round in 1..=rounds.max(1) {
        eprintln!(
            "bench: clinical [{label}] round {round}: pass-through alone, {secs} s at {rate}/s"
        );
        let idle = Load::start(url(&adaptive), rate);
        std::thread::sleep(Duration::from_secs_f64(secs));
        let idle = idle.finish();
        eprintln!(
            "bench: clinical [{label}] round {round}: beside `{floor_path}` back to back (floor)"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let searches = back_to_back(format!("{upstream}/{floor_path}"), stop.clone());
        let load = Load::start(url(&adaptive), rate);
        std::thread::sleep(Duration::from_secs_f64(secs));
        let loaded = load.finish();
        stop.store(true, Ordering::Relaxed);
        let (ms, failed) = searches.join().expect("floor searches");
        let searches = Latency::of(ms, failed);
        let floor = Floor {
            path: floor_path.clone(),
            loaded,
            searches: searches.n,
            failed: searches.errors,
            median_ms: searches.p50,
        };
        let mut modes = Vec::new();
        for (name, proxy) in [("fixed", &fixed), ("adaptive", &adaptive)] {
            eprintln!("bench: clinical [{label}] round {round}: {name} export alone, then beside the load");
            let (alone_rate, alone_exports) = exports_for(proxy, kickoff, secs)?;
            let load = Load::start(url(proxy), rate);
            let exported = exports_for(proxy, kickoff, secs);
            let loaded = load.finish();
            let (loaded_rate, loaded_exports) = exported?;
            modes.push(Mode {
                name,
                alone_rate,
                alone_exports,
                loaded_rate,
                loaded_exports,
                loaded,
            });
        }
        all.push(Round { idle, floor, modes });
    }
    Ok(Runs {
        upstream: label.to_owned(),
        clinical_path: clinical_path.to_owned(),
        kickoff: kickoff.to_owned(),
        rate,
        secs,
        rounds: all,
    })
}

/// The targets of one run: pass-through p99 beside an adaptive export within 1.25× of idle (the median
/// of the rounds' ratios), and the adaptive export alone at ≥ 80 % of the fixed one's throughput (the
/// ratio of the medians).
pub(super) fn targets(r: &Runs) -> Vec<(String, String, &'static str, bool)> {
    let mut t = Vec::new();
    let ratios: Vec<f64> = r
        .rounds
        .iter()
        .filter_map(|x| x.ratio("adaptive"))
        .collect();
    if ratios.is_empty() {
        return t;
    }
    let ratio = super::median(ratios);
    let floor = super::median(r.rounds.iter().map(Round::floor_ratio).collect());
    t.push((
        format!(
            "pass-through p99 during an adaptive export vs none ({})",
            r.upstream
        ),
        format!(
            "{ratio:.2}× (median of rounds {}; floor {floor:.2}×)",
            r.by_round(|x| x.ratio("adaptive"))
        ),
        "≤ 1.25×",
        ratio <= 1.25,
    ));
    let alone = |name: &str| {
        super::median(
            r.rounds
                .iter()
                .flat_map(|x| x.modes.iter().filter(|m| m.name == name))
                .map(|m| m.alone_rate)
                .collect(),
        )
    };
    let (a, f) = (alone("adaptive"), alone("fixed"));
    t.push((
        format!(
            "adaptive export alone vs fixed maximum concurrency ({})",
            r.upstream
        ),
        format!(
            "{:.0} % ({a:.0} vs {f:.0} resources/s, medians of the rounds)",
            a / f * 100.0
        ),
        "≥ 80 %",
        a / f >= 0.8,
    ));
    t
}

/// The report's table of one run: the median round's parts, and every round's ratios.
pub(super) fn table(md: &mut String, heading: &str, runs: &std::result::Result<Runs, String>) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "## {heading}\n");
    let (r, round) = match runs {
        Ok(r) => match r.median_round() {
            Some(round) => (r, round),
            None => {
                let _ = writeln!(md, "Not measured: no round ran\n");
                return;
            }
        },
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        md,
        "`GET {}` through the proxy at {} requests/s (open loop, latency from when each request was due), \
         {} s per part, {} round(s) of every part; the export is `{}`, run back to back through each part. \
         The floor is the load beside `{}` asked straight of the upstream, one after another: the cheapest \
         search there is, which no export sending anything beside the load can undercut on an upstream \
         that serves one request at a time. The table is the round with the median adaptive ratio.\n",
        r.clinical_path,
        r.rate,
        r.secs,
        r.rounds.len(),
        r.kickoff,
        round.floor.path
    );
    let _ = writeln!(
        md,
        "| Export | Pass-through p50 (ms) | p99 (ms) | p99 × idle | Requests | Errors | Export resources/s | Exports |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| none | {:.1} | {:.1} | 1.00 | {} | {} | – | – |",
        round.idle.p50, round.idle.p99, round.idle.n, round.idle.errors
    );
    let f = &round.floor;
    let _ = writeln!(
        md,
        "| floor: `{}` back to back ({} searches, {} failed, median {:.1} ms) | {:.1} | {:.1} | {:.2} | {} | {} | – | – |",
        f.path,
        f.searches,
        f.failed,
        f.median_ms,
        f.loaded.p50,
        f.loaded.p99,
        round.floor_ratio(),
        f.loaded.n,
        f.loaded.errors
    );
    for m in &round.modes {
        let _ = writeln!(
            md,
            "| {} alone | – | – | – | – | – | {:.0} | {} |",
            m.name, m.alone_rate, m.alone_exports
        );
        let _ = writeln!(
            md,
            "| {} beside the load | {:.1} | {:.1} | {:.2} | {} | {} | {:.0} | {} |",
            m.name,
            m.loaded.p50,
            m.loaded.p99,
            m.loaded.p99 / round.idle.p99,
            m.loaded.n,
            m.loaded.errors,
            m.loaded_rate,
            m.loaded_exports
        );
    }
    let _ = writeln!(
        md,
        "\np99 × idle by round: adaptive {}; fixed {}; floor {}.\n",
        r.by_round(|x| x.ratio("adaptive")),
        r.by_round(|x| x.ratio("fixed")),
        r.by_round(|x| Some(x.floor_ratio())),
    );
}
