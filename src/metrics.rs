//! Prometheus metrics of the whole process, exposed on the admin listener.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the proxy keeps.
pub struct Metrics {
    registry: Registry,
    /// Pass-through requests by response status.
    pub passthrough_requests: IntCounterVec,
    /// Pass-through latency until the response head, by status.
    pub passthrough_seconds: HistogramVec,
    /// The proxy's own upstream requests (export searches) by status (`error` for no response).
    pub upstream_requests: IntCounterVec,
    /// Their latency, by status.
    pub upstream_seconds: HistogramVec,
    /// Upstream requests repeated after a transient failure.
    pub upstream_retries: IntCounter,
    /// Upstream requests that had to wait for the rate limiter.
    pub rate_limiter_waits: IntCounter,
    /// Searches answered inside `batch` requests instead of a request each.
    pub batched_reads: IntCounter,
    /// The adaptive limit of export requests in flight upstream.
    pub export_limit: IntGauge,
    /// Export requests allowed in flight now: the limit, less the slot kept for pass-through traffic.
    pub export_allowed: IntGauge,
    /// Export requests in flight upstream.
    pub export_in_flight: IntGauge,
    /// Pass-through requests waiting for their upstream response head.
    pub passthrough_in_flight: IntGauge,
    /// Times the export limit fell because an answer queued upstream.
    pub export_limit_decreases: IntCounter,
    /// Times the export left a one-at-a-time upstream idle for pass-through traffic.
    pub export_rests: IntCounter,
    /// Jobs by state, set at each scrape.
    pub jobs: IntGaugeVec,
    /// Client connections open on the main listener.
    pub connections: IntGauge,
    /// Resources written to export files.
    pub exported_resources: IntCounter,
    /// Bytes written to export files.
    pub exported_bytes: IntCounter,
    /// Time from kick-off to completion of finished jobs, by final state.
    pub export_seconds: HistogramVec,
    /// The pass-through counter and histogram of each status code (100–999), looked up once: a label
    /// lookup hashes the label under a lock, on every request.
    passthrough_by_status: Box<[OnceLock<(IntCounter, Histogram)>]>,
}

fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let histogram = |name: &str, help: &str, label: &str, buckets: Vec<f64>| {
            let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
                .expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let jobs = IntGaugeVec::new(Opts::new("fbp_jobs", "Export jobs by state."), &["state"])
            .expect("valid metric");
        registry
            .register(Box::new(jobs.clone()))
            .expect("unique metric");
        let connections = IntGauge::new(
            "fbp_connections",
            "Client connections open on the main listener.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        Self {
            export_limit: gauge(
                "fbp_export_concurrency_limit",
                "Adaptive limit of the proxy's own (export) requests in flight upstream.",
            ),
            export_allowed: gauge(
                "fbp_export_concurrency_allowed",
                "Export requests allowed in flight now: the limit less the slot kept for pass-through.",
            ),
            export_in_flight: gauge(
                "fbp_export_requests_in_flight",
                "The proxy's own (export) requests in flight upstream.",
            ),
            passthrough_in_flight: gauge(
                "fbp_passthrough_requests_in_flight",
                "Pass-through requests waiting for their upstream response head.",
            ),
            export_limit_decreases: counter(
                "fbp_export_limit_decreases_total",
                "Times the export concurrency limit fell because an answer had queued upstream.",
            ),
            export_rests: counter(
                "fbp_export_rests_total",
                "Times the export left an upstream that serves one request at a time idle for pass-through traffic.",
            ),
            passthrough_requests: counter_vec(
                "fbp_passthrough_requests_total",
                "Requests passed through to the upstream, by response status.",
                &["status"],
            ),
            passthrough_seconds: histogram(
                "fbp_passthrough_duration_seconds",
                "Pass-through latency until the response head, by status.",
                "status",
                latency_buckets(),
            ),
            upstream_requests: counter_vec(
                "fbp_upstream_requests_total",
                "The proxy's own upstream requests (export), by status; error means no response.",
                &["status"],
            ),
            upstream_seconds: histogram(
                "fbp_upstream_request_duration_seconds",
                "Latency of the proxy's own upstream requests, by status.",
                "status",
                latency_buckets(),
            ),
            upstream_retries: counter(
                "fbp_upstream_retries_total",
                "Upstream requests repeated after a transient failure.",
            ),
            rate_limiter_waits: counter(
                "fbp_rate_limiter_waits_total",
                "Upstream requests that waited for the rate limiter.",
            ),
            batched_reads: counter(
                "fbp_upstream_batched_reads_total",
                "Searches answered inside batch requests instead of a request each.",
            ),
            jobs,
            connections,
            exported_resources: counter(
                "fbp_exported_resources_total",
                "Resources written to export files.",
            ),
            exported_bytes: counter("fbp_exported_bytes_total", "Bytes written to export files."),
            export_seconds: histogram(
                "fbp_export_duration_seconds",
                "Time from kick-off to the end of finished jobs, by final state.",
                "state",
                exponential_buckets(0.5, 2.0, 16).expect("valid buckets"),
            ),
            passthrough_by_status: (100..1000).map(|_| OnceLock::new()).collect(),
            registry,
        }
    }

    /// Records one pass-through request.
    pub fn passthrough(&self, status: hyper::StatusCode, elapsed: Duration) {
        let (requests, seconds) = self.passthrough_by_status[usize::from(status.as_u16()) - 100]
            .get_or_init(|| {
                let status = [status.as_str()];
                (
                    self.passthrough_requests.with_label_values(&status),
                    self.passthrough_seconds.with_label_values(&status),
                )
            });
        requests.inc();
        seconds.observe(elapsed.as_secs_f64());
    }

    /// Records one upstream request of the proxy's own (`None`: no response).
    pub fn upstream(&self, status: Option<u16>, elapsed: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.upstream_requests.with_label_values(&[&status]).inc();
        self.upstream_seconds
            .with_label_values(&[&status])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_values() {
        let m = Metrics::new();
        m.passthrough(hyper::StatusCode::OK, Duration::from_millis(3));
        m.passthrough(hyper::StatusCode::OK, Duration::from_millis(3));
        m.passthrough(
            hyper::StatusCode::from_u16(999).unwrap(),
            Duration::from_millis(3),
        );
        m.upstream(None, Duration::from_millis(1));
        m.exported_resources.inc_by(7);
        let text = m.render();
        assert!(text.contains("fbp_passthrough_requests_total{status=\"200\"} 2"));
        assert!(text.contains("fbp_passthrough_requests_total{status=\"999\"} 1"));
        assert!(text.contains("fbp_upstream_requests_total{status=\"error\"} 1"));
        assert!(text.contains("fbp_exported_resources_total 7"));
    }
}
