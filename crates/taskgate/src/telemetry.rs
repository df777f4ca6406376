//! The process's tracing subscriber: log lines on stderr (text or JSON, `RUST_LOG` filters
//! them) and, in a build with the `otel` feature, spans exported over OTLP/HTTP when an endpoint
//! is configured (docs/logs-and-traces.md).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The variables that name an OTLP endpoint, most specific first.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// What must outlive the server: the trace exporter, flushed by [`Telemetry::shutdown`].
#[must_use]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered. The SDK's flush blocks, so it runs off the async threads.
    pub async fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "cannot flush the last spans to the OTLP endpoint");
            }
        }
    }
}

/// Installs the subscriber. `otlp_endpoint` is `serve --otlp-endpoint` (the base URL, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` takes it); without it the standard variables decide whether
/// spans are exported.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: in a file or a pipe the escape codes are noise.
    // NO_COLOR (https://no-color.org) turns it off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // JSON lines carry the fields of every span they are in (`span`, the innermost, and `spans`,
    // outermost first): that is where a task's `taskId` and `model` are (the attempt's span).
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let env_endpoint = ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    if otlp_endpoint.is_none() && !env_endpoint {
        // No exporter: one global filter, as cheap as before traces existed.
        Registry::default().with(fmt).with(filter).try_init()?;
        return Ok(Telemetry {
            #[cfg(feature = "otel")]
            provider: None,
        });
    }
    export(fmt, filter, otlp_endpoint)
}

#[cfg(not(feature = "otel"))]
fn export(
    fmt: Box<dyn Layer<Registry> + Send + Sync>,
    filter: EnvFilter,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Telemetry> {
    // A flag asks for something this binary cannot do: refuse rather than run untraced. A
    // variable may be meant for other programs in the same environment: only a warning.
    if otlp_endpoint.is_some() {
        anyhow::bail!(
            "--otlp-endpoint was given, but this taskgate was built without trace export \
             (the `otel` cargo feature); rebuild with `cargo build --release --features otel` \
             or drop the flag"
        );
    }
    Registry::default().with(fmt).with(filter).try_init()?;
    tracing::warn!(
        "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this taskgate was built without trace export \
         (the `otel` cargo feature): no spans are sent"
    );
    Ok(Telemetry {})
}

#[cfg(feature = "otel")]
fn export(
    fmt: Box<dyn Layer<Registry> + Send + Sync>,
    filter: EnvFilter,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Telemetry> {
    use anyhow::Context;
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::filter::Targets;

    // The SDK leaves OTEL_EXPORTER_OTLP_PROTOCOL to the application.
    let protocol = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    let protocol = match protocol.as_deref() {
        None | Some("http/protobuf") => Protocol::HttpBinary,
        Some("http/json") => Protocol::HttpJson,
        Some(other) => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: taskgate exports over HTTP, \
             `http/protobuf` (the default) or `http/json`"
        ),
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol);
    if let Some(base) = otlp_endpoint {
        // The flag means what OTEL_EXPORTER_OTLP_ENDPOINT means: the signal's path is added.
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = exporter
        .build()
        .context("cannot set up the OTLP trace exporter")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|v| v.is_empty()) {
        resource = resource.with_service_name("taskgate");
    }
    // The batch processor exports from a thread of its own; OTEL_BSP_* tune it.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("taskgate");
    // Spans (and events, as span events) of taskgate's own code at info, and the per-request
    // span, which is a debug span so that logging alone never pays for it.
    let spans = Targets::new()
        .with_target("taskgate", LevelFilter::INFO)
        .with_target(taskgate_server::telemetry::HTTP_TARGET, LevelFilter::DEBUG);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(spans);
    Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}
