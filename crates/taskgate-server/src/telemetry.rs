//! Spans that cross the queue: the trace context a submit leaves with its task so the attempt's
//! span can link back to it (docs/logs-and-traces.md). The per-request span is the HTTP
//! layer's (`api::trace`), under [`HTTP_TARGET`].
//!
//! Without the `otel` feature the context functions are no-ops that the compiler removes, so the
//! default build pays nothing. With it, they read and write the OpenTelemetry context that
//! `tracing-opentelemetry` keeps on each span; when the binary installed no exporter that
//! context is empty and nothing is written either, so a submit stores `NULL` unless traces are
//! really exported.

use tracing::Span;

/// The target of the per-request span. It is a `debug` span, so that the text and JSON logs at
/// the default `info` level do not pay for a span per request; the binary's trace exporter
/// enables this target alone at `debug`.
pub const HTTP_TARGET: &str = "taskgate::http";

/// The W3C `traceparent` of the current span (the submit request's), to store with the task;
/// `None` when no trace is being recorded.
#[cfg(feature = "otel")]
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::with_capacity(1);
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

#[cfg(not(feature = "otel"))]
#[inline(always)]
pub fn current_traceparent() -> Option<String> {
    None
}

/// Links `span` (an attempt's) to the submit whose `traceparent` the task kept. A malformed or
/// missing value adds no link: the attempt's span is still exported, only unlinked.
#[cfg(feature = "otel")]
pub fn link_to_submit(span: &Span, traceparent: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

#[cfg(not(feature = "otel"))]
#[inline(always)]
pub fn link_to_submit(_span: &Span, _traceparent: Option<&str>) {}
