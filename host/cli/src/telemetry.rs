//! Logs and, when asked for, traces. Logs go to stderr, filtered by `DIV_LOG` (default `info`).
//! With `div serve --otlp-endpoint URL` every request is also a trace sent over OTLP/HTTP
//! (protobuf, to `URL/v1/traces`, the OpenTelemetry collector's default receiver): a `request`
//! span (ids, method, path) with one child per stage — `gate` (who calls, may they, can they
//! pay), `sandbox` (the plugin's fresh instance) with `backend` (the wasi-nn inference) inside,
//! and `ledger` (the charge made durable). Off by default; spans are batched on a thread of
//! their own and an unreachable collector costs requests nothing (the batch is dropped).

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What must be flushed before the process exits.
pub struct Telemetry(Option<SdkTracerProvider>);

/// Installs the log (and, with `otlp_endpoint`, the trace) subscriber for the whole process.
pub fn init(otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = || EnvFilter::try_from_env("DIV_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        tracing_subscriber::registry().with(logs).with(filter()).init();
        return Ok(Telemetry(None));
    };
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/').trim_end_matches("/v1/traces"));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("the OTLP endpoint {url}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("div-host").build())
        .build();
    let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer("div"));
    tracing_subscriber::registry().with(logs).with(traces).with(filter()).init();
    tracing::info!(%url, "sending traces over OTLP/HTTP");
    Ok(Telemetry(Some(provider)))
}

impl Telemetry {
    /// Sends what is still batched (bounded: a collector that does not answer is given up on).
    pub async fn flush(self) {
        if let Some(provider) = self.0 {
            // the exporter's client blocks: off the async threads
            let done =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5)));
            if let Ok(Err(e)) = done.await {
                eprintln!("traces not all sent: {e}");
            }
        }
    }
}
