//! The per-request span: tower-http's `TraceLayer` with a span named `METHOD route`, joined to
//! the caller's trace when it sent a W3C `traceparent` (docs/logs-and-traces.md). Here, not in
//! `telemetry`, because it reads HTTP requests: only the api module knows HTTP.

use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnRequest, MakeSpan, OnResponse, TraceLayer};
use tracing::Span;

use crate::telemetry::HTTP_TARGET;

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
