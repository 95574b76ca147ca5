//! Logs to stderr (JSON lines or human-readable) and, when configured, traces over OTLP/HTTP.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: `json` or human-readable logs, plus an OTLP layer when
/// `cfg.otlp_endpoint` is set. Must run outside any tokio runtime (the exporter has its own thread).
pub fn init(json: bool, cfg: &TelemetryConfig) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    let provider = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.as_str())
                .build()
                .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("fhir-bulk-proxy")));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .with(filter)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Sends the spans still buffered; call after the runtime has stopped.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("fhir-bulk-proxy: flushing traces failed: {e}");
            }
        }
    }
}
