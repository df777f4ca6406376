//! `GET /metrics` (the exposition of `crate::metrics`, behind the optional bearer token) and
//! [`HttpMetricsLayer`], which counts every request by route and status.
//!
//! The layer is a hand-written tower `Layer`/`Service` whose future polls the inner one in
//! place: no box, no allocation per request. A `from_fn` middleware around the router cost
//! statusTask a third of its throughput (docs/BENCHMARKS.md, "Issue 9"); per request this does
//! one read-locked lookup of the route template (axum's `MatchedPath`, shared with the router,
//! so nothing is copied), two clock reads, a histogram observation and a counter increment.
//! It shares one `Router::layer` call with the panic catcher (api/mod.rs): each such call wraps
//! every route in one more boxed service. Being inside the router is what makes the route
//! template (`MatchedPath`, axum's `matched-path` feature) available to it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, Response};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use sha2::Digest;
use subtle::ConstantTimeEq;
use taskgate_proto::ErrorCode;

use crate::error::ApiError;
use crate::metrics::{HttpMetrics, RouteHandles, UNMATCHED_ROUTE};
use crate::state::AppState;

/// The content type of `prometheus_client`'s text encoding (OpenMetrics 1.0, which Prometheus
/// scrapes natively).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

/// The node's metrics in the OpenMetrics text format, for Prometheus (taskgate extension).
///
/// Not under `/api/v1` and not tenant-scoped: it shows the whole node (and the cluster's queue
/// depths) and names no tenant and no task.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses((status = 200, description = "The metrics of this node (and the cluster's queue depths), in the OpenMetrics 1.0 text format (`application/openmetrics-text; version=1.0.0; charset=utf-8`).", content_type = "application/openmetrics-text", body = String)),
    // No credential unless the server was started with --metrics-token.
    security((), ("metricsToken" = [])),
)]
async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(token) = state.metrics.token() {
        check_token(&headers, token)?;
    }
    let body = state.metrics.render(state.store.as_ref()).await;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
        body,
    ))
}

/// `Authorization: Bearer <token>`, compared in constant time: as SHA-256 digests, so not even
/// the token's length shows in the timing. The refusals reuse the API key's codes (401 either
/// way): a scraper's credential is a bearer token like a key.
fn check_token(headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            ErrorCode::MissingApiKey,
            "GET /metrics needs an `Authorization: Bearer <metrics token>` header (the server's --metrics-token)",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110), as for API keys.
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .unwrap_or_default();
    let digest = |s: &str| sha2::Sha256::digest(s.as_bytes());
    if bool::from(digest(given).ct_eq(&digest(token))) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "the metrics token is wrong: send `Authorization: Bearer <metrics token>` with the server's --metrics-token",
        ))
    }
}

/// Counts requests by route and status, with their latency (see the module's docs).
#[derive(Clone)]
pub struct HttpMetricsLayer {
    metrics: Arc<crate::metrics::Metrics>,
}

impl HttpMetricsLayer {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        HttpMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HttpMetricsService<S> {
    inner: S,
    metrics: Arc<crate::metrics::Metrics>,
}

impl<S> HttpMetricsService<S> {
    fn http(&self) -> &HttpMetrics {
        &self.metrics.http
    }
}

impl<S, B, ResBody> tower::Service<Request<B>> for HttpMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
        let handles = self.http().handles_of(route);
        ResponseFuture {
            inner: self.inner.call(req),
            handles: Some(handles),
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future, and what to record when it answers.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        handles: Option<Arc<RouteHandles>>,
        started: Instant,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let (Some(handles), Ok(resp)) = (this.handles.take(), &out) {
            handles.answered(resp.status().as_u16(), this.started.elapsed());
        }
        Poll::Ready(out)
    }
}
