//! The HTTP API, one router per resource, merged here: APIXO's task endpoints (`tasks`), the
//! model list and input schemas (`models`), webhook secrets and deliveries (`webhooks`), result
//! files (`files`), the pull workers' API (`worker`), `GET /metrics` and the per-request
//! metrics layer (`metrics`), the task counts and operator view (`operator`), the OpenAPI
//! document and `/docs` (`openapi`), the web dashboard's files (`dashboard`), and health.
//!
//! Only this module and `error` know HTTP. Handlers take the caller as an extractor
//! (`extract`), so a handler cannot forget to authenticate, and they reach the store only
//! through its trait. No per-request middleware runs on the hot routes beyond what is layered
//! here: a `from_fn` layer around the router cost status a third of its throughput
//! (docs/BENCHMARKS.md, "Issue 9").

mod batch;
mod dashboard;
mod extract;
mod files;
mod idempotency;
mod live;
mod metrics;
mod models;
pub mod openapi;
mod operator;
mod stream;
mod task_list;
mod tasks;
mod trace;
mod usage;
mod wait;
mod webhooks;
mod worker;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use taskgate_proto::{Envelope, ErrorCode};
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::{envelope_response, ApiError};
use crate::state::AppState;

/// The request-body checks of generateTask and generateTasks, reachable from the fuzz targets
/// (`crates/taskgate-fuzz`), which cannot call private functions. Not an API: the HTTP routes are.
#[doc(hidden)]
pub mod fuzzing {
    use serde_json::{Map, Value};

    use crate::error::ApiError;

    /// Deepest nesting of arrays and objects a request body may have.
    pub const MAX_JSON_DEPTH: usize = super::tasks::MAX_JSON_DEPTH;
    /// Most values a request body may hold.
    pub const MAX_JSON_ELEMENTS: usize = super::tasks::MAX_JSON_ELEMENTS;

    /// What a submit keeps of an accepted body: the task's input and its callback URL.
    pub type Accepted = (Map<String, Value>, Option<String>);

    /// A generateTask body through the checks the handler runs before the model's own.
    pub fn generate_task(bytes: &[u8]) -> Result<Accepted, ApiError> {
        super::tasks::parse_submission(bytes, false).map(|s| (s.input, s.callback_url))
    }

    /// A generateTasks body through the checks the handler runs before the model's own.
    pub fn generate_tasks(bytes: &[u8]) -> Result<Vec<Accepted>, ApiError> {
        super::batch::parse_batch(bytes)?
            .into_iter()
            .map(|item| {
                super::tasks::submission_from_object(item, false).map(|s| (s.input, s.callback_url))
            })
            .collect()
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let http_metrics = metrics::HttpMetricsLayer::new(state.metrics.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics::router())
        .merge(tasks::router())
        .merge(models::router())
        .merge(stream::router())
        .merge(task_list::router())
        .merge(batch::router())
        .merge(webhooks::router())
        .merge(files::router())
        .merge(worker::router())
        .merge(openapi::router())
        .merge(operator::router())
        .merge(usage::router())
        .merge(dashboard::router())
        // After the merges: these apply to every route registered before them.
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(trace::http_trace_layer())
        // The metrics layer outside the panic catcher, so a panic's 500 is counted; both in one
        // `layer` call, since each call wraps every route in one more boxed service.
        .layer((
            http_metrics,
            CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                envelope_response(
                    ErrorCode::InternalError,
                    "internal error on the server; it has been logged, try again later".into(),
                )
            }),
        ))
        // One Arc for the whole state: axum clones the state for every request.
        .with_state(Arc::new(state))
}

/// Liveness: 200 while the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "Alive.", body = Envelope<openapi::Health>)),
)]
async fn healthz() -> Json<Envelope<Value>> {
    Json(Envelope::success(serde_json::json!({ "status": "ok" })))
}

/// Readiness, for load balancers: 200 while this node can serve, 503 in the envelope while its
/// store cannot be read or it is draining for a shutdown (so traffic moves elsewhere first).
/// Liveness (`/healthz`) stays 200 in both cases: the process is fine, restarting it would not
/// help.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses((status = 200, description = "Ready: the store answers and the node is not draining.", body = Envelope<openapi::Health>)),
)]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Envelope<Value>>, ApiError> {
    if state.dispatcher.stopping() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "not ready: the server is shutting down",
        ));
    }
    // One indexed read of the store, the cheapest that proves it answers.
    if let Err(e) = state.store.keys_revision().await {
        // The cause names hosts and ports: logged, not told to an unauthenticated caller.
        tracing::warn!(error = %crate::report::error_chain(&e), "readiness check: the store cannot be read");
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "not ready: the store cannot be read; retry shortly",
        ));
    }
    Ok(Json(Envelope::success(
        serde_json::json!({ "status": "ready" }),
    )))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(ErrorCode::EndpointNotFound, format!(
        "no such endpoint: {}; the API is POST /api/v1/generateTask/{{model}} and GET /api/v1/statusTask/{{model}}?taskId=",
        uri.path()
    ))
}

/// A 405 said of the path asked (the fallback serves every route; axum adds `Allow`, which
/// names the methods the path takes).
async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not allowed on {}; the Allow header lists the methods it takes",
            uri.path()
        ),
    )
}

/// A `true`/`false` query parameter of a statusTask extension (`logs`, `attempts`, `input`):
/// absent, empty or `false` is false, `true` is true, anything else a 400 naming it. The status
/// read is the hottest: a query without the name is not parsed again.
pub(super) fn flag_param(uri: &Uri, name: &str) -> Result<bool, ApiError> {
    if !uri.query().is_some_and(|q| q.contains(name)) {
        return Ok(false);
    }
    match query_param(uri, name).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("the {name} query parameter must be true or false, got {other:?}"),
        )),
    }
}

/// The query parameters of a route that takes exactly `names`, in that order: each at most once
/// (which of two was meant is ambiguous), empty counted as absent, any other name refused so
/// that a misspelt parameter is not silently ignored.
pub(super) fn known_params<const N: usize>(
    uri: &Uri,
    route: &str,
    names: [&str; N],
) -> Result<[Option<String>; N], ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    let mut seen = [false; N];
    for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        let i = names.iter().position(|n| *n == name).ok_or_else(|| {
            bad(format!(
                "unknown query parameter {name:?}; {route} takes {}",
                names.join(", ")
            ))
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(bad(format!("the {name} query parameter is given twice")));
        }
        values[i] = Some(value.into_owned()).filter(|v| !v.is_empty());
    }
    Ok(values)
}

pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
        .filter(|v| !v.is_empty())
}
