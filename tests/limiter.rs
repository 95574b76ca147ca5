//! Clinical traffic first: an export through the real binary shares an upstream that serves two requests
//! at once (a "capacity upstream" in front of the real read-only one: each request waits for one of two
//! places, holds it for its service time, and is answered by the real upstream) with a steady stream of
//! pass-through requests. The proxy's own requests are told apart by the `Prefer: handling=strict` it
//! sends on every export search, which pass-through requests do not carry.
//!
//! The oracle is the capacity upstream's own record of how many export requests it held at once, and how
//! long the pass-through requests that came while export requests were there waited for a place: with `adaptive_concurrency = false`
//! the export fills the upstream and clinicians wait behind it (the demand check that makes the test
//! able to fail); with the default, the export leaves them room. The export must stay exact either way.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::mock::{After, Mock, Reply};
use common::*;

/// Requests the capacity upstream serves at once.
const CAPACITY: usize = 2;
/// How long each request holds its place.
const SERVICE: Duration = Duration::from_millis(40);
/// One type in four time slices: four searches that page side by side for the whole export.
const TYPES: &[&str] = &["Observation"];
const QUERY: &str = "$export?_type=Observation";

/// The capacity upstream's places and its record.
#[derive(Default)]
struct Places {
    /// Export requests and pass-through requests holding a place or waiting for one.
    export: usize,
    clinical: usize,
    serving: usize,
    /// The most export requests it held at once.
    export_peak: usize,
    /// How long each pass-through request that came while export requests were there waited for a place.
    clinical_waits: Vec<Duration>,
}

struct CapacityUpstream {
    base: String,
    places: Arc<(Mutex<Places>, Condvar)>,
    _mock: Mock,
}

impl CapacityUpstream {
    fn start() -> CapacityUpstream {
        let real_base = upstream();
        let real_origin = origin(&real_base);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let own_origin = format!("http://{}", listener.local_addr().unwrap());
        let own_base = format!("{own_origin}{}", url_path(&real_base));
        let places: Arc<(Mutex<Places>, Condvar)> = Arc::default();
        let http = reqwest::blocking::Client::new();
        let (serving, links_from, links_to) = (places.clone(), real_base.clone(), own_base.clone());
        let mock = Mock::routes()
            .any(move |request| {
                let export = request.header("prefer") == Some("handling=strict");
                let (lock, freed) = &*serving;
                let arrived = Instant::now();
                let mut p = lock.lock().unwrap();
                let beside_export = !export && p.export > 0;
                if export {
                    p.export += 1;
                    p.export_peak = p.export_peak.max(p.export);
                } else {
                    p.clinical += 1;
                }
                while p.serving >= CAPACITY {
                    p = freed.wait(p).unwrap();
                }
                p.serving += 1;
                if beside_export {
                    p.clinical_waits.push(arrived.elapsed());
                }
                drop(p);
                let started = Instant::now();
                let answer = http
                    .get(format!("{real_origin}{}", request.target()))
                    .header("Accept", "application/fhir+json")
                    .send()
                    .unwrap();
                let status = answer.status().as_u16();
                let body = answer
                    .text()
                    .unwrap()
                    .replace(&links_from, &links_to)
                    .into_bytes();
                if let Some(rest) = SERVICE.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
                let mut p = lock.lock().unwrap();
                p.serving -= 1;
                if export {
                    p.export -= 1;
                } else {
                    p.clinical -= 1;
                }
                freed.notify_all();
                Reply::new(status, "application/fhir+json", body).then(After::KeepAlive)
            })
            .start_on(listener);
        CapacityUpstream {
            base: own_base,
            places,
            _mock: mock,
        }
    }

    fn export_peak(&self) -> usize {
        self.places.0.lock().unwrap().export_peak
    }

    /// The mean wait of pass-through requests that came while export requests were there, and how many.
    fn clinical_wait(&self) -> (Duration, usize) {
        let p = self.places.0.lock().unwrap();
        let n = p.clinical_waits.len();
        let sum: Duration = p.clinical_waits.iter().sum();
        (sum / n.max(1) as u32, n)
    }
}

/// What one export beside the clinical load showed.
struct Run {
    export_peak: usize,
    /// Mean wait upstream of the pass-through requests sent while export requests were there.
    clinical_wait: Duration,
    clinical: usize,
    metrics: String,
}

/// Exports through a proxy with `upstream_toml` while a client sends `Patient?_count=1` through it
/// every 30 ms; checks the export is exact.
fn export_beside_clinical_load(upstream_toml: &str) -> Run {
    let capacity = CapacityUpstream::start();
    let proxy = Proxy::builder(&capacity.base)
        .upstream_toml(upstream_toml)
        .export_toml("page_size = 10\nslice_concurrency = 4\ntime_slices = 4")
        .admin()
        .start();
    let stop = Arc::new(AtomicBool::new(false));
    let load = std::thread::spawn({
        let (stop, url) = (stop.clone(), format!("{}/Patient?_count=1", proxy.base));
        move || {
            let http = client();
            while !stop.load(Ordering::Relaxed) {
                let status = http.get(&url).send().unwrap().status();
                assert_eq!(status, 200, "pass-through beside the export");
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    });
    // The load runs first, as clinicians are there before any export starts.
    std::thread::sleep(Duration::from_millis(300));
    let status_url = accepted_status_url(&proxy.base, kickoff_get(&proxy.base, QUERY, None));
    let (manifest, _) = wait_manifest(&status_url, None);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(
        manifest["error"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "{manifest}"
    );
    assert_same(
        &resources_by_type(&download_all(&manifest, "output", None)),
        &direct_system(&upstream(), Some(TYPES)),
    );
    let (clinical_wait, clinical) = capacity.clinical_wait();
    Run {
        export_peak: capacity.export_peak(),
        clinical_wait,
        clinical,
        metrics: scrape(proxy.admin.as_deref().unwrap()),
    }
}

#[test]
fn an_adaptive_export_leaves_clinical_requests_room_a_fixed_one_does_not() {
    let fixed =
        export_beside_clinical_load("max_concurrent_requests = 8\nadaptive_concurrency = false");
    let adaptive = export_beside_clinical_load("max_concurrent_requests = 8");
    println!(
        "fixed: {} export requests at once, pass-through waited {:?} on average ({} requests beside \
         the export); adaptive: {} at once, waited {:?} ({} requests)",
        fixed.export_peak,
        fixed.clinical_wait,
        fixed.clinical,
        adaptive.export_peak,
        adaptive.clinical_wait,
        adaptive.clinical
    );
    assert!(
        fixed.export_peak > CAPACITY + 1,
        "the export's demand must exceed the upstream's capacity for this test to mean anything: \
         the fixed export held {} requests at once",
        fixed.export_peak
    );
    assert!(
        adaptive.export_peak <= CAPACITY + 1,
        "the adaptive export held {} requests at once on an upstream serving {CAPACITY}",
        adaptive.export_peak
    );
    assert!(
        fixed.clinical >= 10 && adaptive.clinical >= 10,
        "too few pass-through requests came while the exports ran"
    );
    assert!(
        fixed.clinical_wait >= SERVICE / 10,
        "beside the fixed export pass-through requests waited only {:?}: the test would not see a difference",
        fixed.clinical_wait
    );
    assert!(
        adaptive.clinical_wait * 2 < fixed.clinical_wait,
        "pass-through waited {:?} beside the adaptive export, not well under {:?} beside the fixed one",
        adaptive.clinical_wait,
        fixed.clinical_wait
    );
    let decreases = prom_value(&adaptive.metrics, "fbp_export_limit_decreases_total").unwrap();
    assert!(
        decreases >= 1.0,
        "the limit never fell:\n{}",
        adaptive.metrics
    );
    for series in [
        "fbp_export_concurrency_limit",
        "fbp_export_concurrency_allowed",
        "fbp_export_requests_in_flight",
        "fbp_passthrough_requests_in_flight",
    ] {
        assert!(
            prom_value(&adaptive.metrics, series).is_some(),
            "{series} missing from /metrics"
        );
    }
    assert_eq!(
        prom_value(&fixed.metrics, "fbp_export_limit_decreases_total"),
        Some(0.0),
        "a fixed limit never moves"
    );
}
