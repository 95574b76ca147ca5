//! Clinical traffic first: an export through the real binary shares an upstream that serves two requests
//! at once (a "capacity upstream" in front of the real read-only one: each request waits for one of two
//! places, holds it for its service time, and is answered by the real upstream) with a steady stream of
//! pass-through requests. The proxy's own requests are told apart by the `Prefer: handling=strict` it
//! sends on every export search, which pass-through requests do not carry.
//!
//! The oracle is the capacity upstream's own record: for how much of the export's time export requests held
//! every place, and how long the pass-through requests that came while export requests were there waited
//! for one. With `adaptive_concurrency = false` the export fills the upstream and clinicians wait behind it
//! (the demand check that makes the test able to fail); with the default, the export leaves them room.
//! Both are shares of the whole export, not peaks: the adaptive limiter starts at one and probes upwards,
//! so a moment at four places while it learns says nothing, and on a loaded machine its first rounds last
//! longer. The export is long (pages of five) so that those rounds are a small part of it. The export must
//! stay exact either way.

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
    /// Export requests holding a place or waiting for one.
    export: usize,
    /// Requests holding a place, and the export requests among them.
    serving: usize,
    export_serving: usize,
    /// When the first export request came and the last one left.
    export_span: Option<(Instant, Instant)>,
    /// Since when export requests hold every place, and for how long they held them so far.
    full_since: Option<Instant>,
    full: Duration,
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
                    p.export_span.get_or_insert((arrived, arrived));
                }
                while p.serving >= CAPACITY {
                    p = freed.wait(p).unwrap();
                }
                p.serving += 1;
                if export {
                    p.export_serving += 1;
                    if p.export_serving == CAPACITY {
                        p.full_since = Some(Instant::now());
                    }
                }
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
                    if let Some(since) = p.full_since.take() {
                        p.full += since.elapsed();
                    }
                    p.export -= 1;
                    p.export_serving -= 1;
                    if let Some(span) = p.export_span.as_mut() {
                        span.1 = Instant::now();
                    }
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

    /// The share of the export's time during which export requests held every place.
    fn full_share(&self) -> f64 {
        let p = self.places.0.lock().unwrap();
        let (first, last) = p.export_span.expect("the export sent requests");
        p.full.as_secs_f64() / (last - first).as_secs_f64()
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
    /// The share of the export's time during which export requests held every place upstream.
    full_share: f64,
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
        .export_toml("page_size = 5\nslice_concurrency = 4\ntime_slices = 4")
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
        full_share: capacity.full_share(),
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
        "fixed: the export held every place {:.0} % of its time, pass-through waited {:?} on average \
         ({} requests beside the export); adaptive: {:.0} %, waited {:?} ({} requests)",
        fixed.full_share * 100.0,
        fixed.clinical_wait,
        fixed.clinical,
        adaptive.full_share * 100.0,
        adaptive.clinical_wait,
        adaptive.clinical
    );
    assert!(
        fixed.full_share > 0.15,
        "the export's demand must exceed the upstream's capacity for this test to mean anything: \
         the fixed export held every place only {:.0} % of its time",
        fixed.full_share * 100.0
    );
    assert!(
        adaptive.full_share * 3.0 < fixed.full_share,
        "the adaptive export held every place {:.0} % of its time, not well under the fixed one's {:.0} %",
        adaptive.full_share * 100.0,
        fixed.full_share * 100.0
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
