//! Spans that cross the queue: the per-request span of the HTTP layer, and the trace context a
//! submit leaves with its task so the attempt's span can link back to it
//! (docs/logs-and-traces.md).
//!
//! Without the `otel` feature the context functions are no-ops that the compiler removes, so the
//! default build pays nothing. With it, they read and write the OpenTelemetry context that
//! `tracing-opentelemetry` keeps on each span; when the binary installed no exporter that
//! context is empty and nothing is written either, so a submit stores `NULL` unless traces are
//! really exported.

use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnRequest, MakeSpan, OnResponse, TraceLayer};
use tracing::Span;

/// The target of the per-request span. It is a `debug` span, so that the text and JSON logs at
/// the default `info` level do not pay for a span per request; the binary's trace exporter
/// enables this target alone at `debug`.
pub const HTTP_TARGET: &str = "taskgate::http";

/// The router's trace layer: one span per request, named `METHOD route` and carrying the route
/// pattern (not the path, which holds ids) and the response status, as OpenTelemetry's HTTP
/// server conventions name them.
pub fn http_trace_layer(
) -> TraceLayer<SharedClassifier<ServerErrorsAsFailures>, RequestSpan, DefaultOnRequest, RecordStatus>
{
    TraceLayer::new_for_http()
        .make_span_with(RequestSpan)
        .on_response(RecordStatus)
}

#[derive(Clone, Copy, Debug)]
pub struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        // The route pattern is known here: `Router::layer` wraps each route after matching. A
        // request that matched none (a 404 or 405 from the fallback) has no pattern.
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str());
        let method = request.method().as_str();
        let span = tracing::debug_span!(
            target: HTTP_TARGET,
            "request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        continue_callers_trace(&span, request.headers());
        span
    }
}

/// A caller that sent a W3C `traceparent` gets the request's span in its own trace.
#[cfg(feature = "otel")]
fn continue_callers_trace(span: &Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if span.is_disabled() {
        return;
    }
    let mut carrier = std::collections::HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = headers.get("tracestate").and_then(|v| v.to_str().ok()) {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let parent = opentelemetry::propagation::TextMapPropagator::extract(
        &opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        &carrier,
    );
    // Only fails when no OpenTelemetry layer is installed: then there is no trace to join.
    let _ = span.set_parent(parent);
}

#[cfg(not(feature = "otel"))]
#[inline(always)]
fn continue_callers_trace(_span: &Span, _headers: &axum::http::HeaderMap) {}

#[derive(Clone, Copy, Debug)]
pub struct RecordStatus;

impl<B> OnResponse<B> for RecordStatus {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &Span) {
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        // Server conventions: only a 5xx is an error of this span; a 4xx is the caller's.
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        tracing::debug!(
            target: HTTP_TARGET,
            status = status.as_u16(),
            latency_ms = latency.as_millis() as u64,
            "finished processing request"
        );
    }
}

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
