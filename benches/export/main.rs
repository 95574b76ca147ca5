//! `cargo bench --bench export` (run it through `bench/run`): export throughput, peak RSS and pass-through
//! latency of the release proxy binary, against a fast in-process upstream and, when `BENCH_REAL_UPSTREAM`
//! is set, a real FHIR server. Prints the results and (re)writes `BENCHMARKS.md`.
//!
//! Environment (all optional):
//!
//! | Variable | Default | Meaning |
//! |---|---|---|
//! | `BENCH_SMALL` | unset | `1`: a one-minute smoke run (10k/50k resources, short load runs) |
//! | `BENCH_SIZES` | `100000,1000000` | Data set sizes of the export runs; targets use the first and last |
//! | `BENCH_PAGE_SIZE` | `1000` | `_count` of the proxy's and the pager's searches |
//! | `BENCH_RESOURCES_PER_FILE` | `100000` | `[export] resources_per_file` |
//! | `BENCH_SLICES` | `4` | `[export] time_slices` of the sliced run (the other run uses 1) |
//! | `BENCH_LOAD_SECS` | `5` | Seconds of each wrk run |
//! | `BENCH_LOAD_ROUNDS` | `3` | wrk rounds (direct, proxy, nginx interleaved); the median is reported |
//! | `BENCH_EXPORT_ROUNDS` | `3` | Export rounds (pager, 1 slice, N slices interleaved); the median is reported |
//! | `BENCH_LOAD_CONNECTIONS` | `32` | Connections of the throughput wrk runs (the latency runs use 1) |
//! | `BENCH_ONLY` | unset | Comma-separated parts to run: `export`, `load`, `real`, `clinical`, `group` (all when unset) |
//! | `BENCH_LATENCY_MS` | `10` | Per-search latency of an extra export run at the largest size (0: none) |
//! | `BENCH_UPSTREAM_DELAY_MS` | `0` | Latency the fast upstream adds to every search (mimics a real server) |
//! | `BENCH_CLINICAL_SECS` | `10` (`4` small) | Seconds of each part of the clinical-traffic run (idle, export alone, export with traffic) |
//! | `BENCH_CLINICAL_RATE` | `50` | Pass-through requests per second of the clinical load (open loop) |
//! | `BENCH_CLINICAL_ROUNDS` | `3` (`1` small) | Rounds of every clinical part; the targets take the median of the rounds' ratios |
//! | `BENCH_CAPACITY` | `4` | Requests the capacity-limited fast upstream serves at once (clinical run) |
//! | `BENCH_SEARCH_COST_MS` | `10` | Its cost per search, plus `BENCH_ENTRY_COST_US` (default 20) per resource answered |
//! | `BENCH_GROUP_PATIENTS` | `10000` (`2000` small) | Patients of the roster upstream; the Group part exports a tenth of them and all of them |
//! | `BENCH_SMART_FETCH` | set by `bench/run` | smart-fetch executable for the Group part's crawl (none: no crawl row) |
//! | `BENCH_SMART_FETCH_MAX_PATIENTS` | `1000` | Largest Group smart-fetch crawls (it makes one request per patient and type) |
//! | `BENCH_REAL_UPSTREAM` | unset | Base URL of a real FHIR upstream (`bench/run` starts and loads one) |
//! | `BENCH_REAL_NOTE` | unset | What that upstream holds, for the report |
//! | `BENCH_PROXY_BIN` | `target/release/fhir-bulk-proxy` (built by `cargo bench`) | The proxy binary |
//! | `BENCH_OUT` | `BENCHMARKS.md` | Report written; `-` writes none |
//! | `BENCH_POLL_MS` | `5` | How often the export client polls a job's status |
//! | `BENCH_COMMAND` | `cargo bench --bench export` | Command named in the report |

mod roster;
mod run;
mod upstream;

fn main() {
    let env = |name: &str| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let cost = || upstream::Cost {
        delay: std::time::Duration::from_millis(env("FBP_BENCH_DELAY_MS")),
        capacity: env("FBP_BENCH_CAPACITY") as usize,
        per_entry: std::time::Duration::from_micros(env("FBP_BENCH_ENTRY_US")),
    };
    match std::env::var("FBP_BENCH_ROLE").as_deref() {
        Ok("upstream") => {
            let n = Some(env("FBP_BENCH_OBSERVATIONS"))
                .filter(|n| *n > 0)
                .unwrap_or(100_000);
            upstream::serve(n, cost());
            return;
        }
        Ok("roster") => {
            let patients = env("FBP_BENCH_PATIENTS").max(1);
            upstream::serve_with(cost(), |base| roster::Roster::new(patients, base));
            return;
        }
        _ => {}
    }
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    if let Err(e) = run::main() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
