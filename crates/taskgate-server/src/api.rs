//! The HTTP API: APIXO's two endpoints, result files, health.
//!
//! Handlers parse and check input themselves (rather than through axum's extractors) so that
//! every bad request gets a precise message in the envelope; they talk to the store only through
//! its trait. Order of checks: key (401), model (404), body size (413), body content (400).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};
use taskgate_proto::{Envelope, RequestType, TaskCreated};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::artifacts::{LocalArtifacts, ResultLinks};
use crate::auth::Authenticator;
use crate::config::WebhookConfig;
use crate::dispatch::{Dispatcher, ModelRuntime};
use crate::domain::{new_task_id, now_ms};
use crate::error::{envelope_response, ApiError};
use crate::store::{Delivery, DeliveryAttempt, Redeliver, Rotation};
use crate::store::{NewTask, Store};
use crate::views::{CachedView, TaskViews};
use crate::webhooks::{ssrf, Deliverer, MANUAL_RETRY_INTERVAL};
use crate::worker_api;
use taskgate_proto::ErrorCode;
use taskgate_proto::{
    webhook, WebhookAttempt, WebhookDeliveries, WebhookDelivery, WebhookSecretData,
};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub auth: Authenticator,
    pub dispatcher: Arc<Dispatcher>,
    pub links: ResultLinks,
    pub local_files: Option<Arc<LocalArtifacts>>,
    pub max_body_bytes: usize,
    /// Largest output a pull worker may upload.
    pub max_upload_bytes: u64,
    pub webhooks: WebhookConfig,
    pub deliverer: Arc<Deliverer>,
    /// Tasks' statusTask answers, ready to send (`views` module).
    pub views: TaskViews,
    /// Whether just-submitted tasks' pending views are kept: only where this process is the
    /// store's only writer.
    pub live_views: bool,
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/generateTask/{model}", post(generate_task))
        .route("/api/v1/statusTask/{model}", get(status_task))
        .route("/api/v1/webhookSecret", get(webhook_secret))
        .route("/api/v1/webhookSecret/rotate", post(rotate_webhook_secret))
        .route("/api/v1/webhookDeliveries", get(list_deliveries))
        .route("/api/v1/webhookDeliveries/{id}/retry", post(retry_delivery))
        .route("/api/v1/worker/claim", post(worker_api::claim))
        .route(
            "/api/v1/worker/tasks/{id}/heartbeat",
            post(worker_api::heartbeat),
        )
        .route(
            "/api/v1/worker/tasks/{id}/outputs/{name}",
            axum::routing::put(worker_api::upload),
        )
        .route(
            "/api/v1/worker/tasks/{id}/complete",
            post(worker_api::complete),
        )
        .route("/api/v1/worker/tasks/{id}/fail", post(worker_api::fail))
        .route("/files/{task_id}/{name}", get(get_untagged_file))
        .route("/files/{task_id}/{tag}/{name}", get(get_file))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                envelope_response(
                    ErrorCode::InternalError,
                    "internal error on the server; it has been logged, try again later".into(),
                )
            },
        ))
        // One Arc for the whole state: axum clones the state for every request.
        .with_state(Arc::new(state))
}

async fn healthz() -> Json<Envelope<Value>> {
    Json(Envelope::success(serde_json::json!({ "status": "ok" })))
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

fn model_or_404<'a>(state: &'a AppState, model: &str) -> Result<&'a Arc<ModelRuntime>, ApiError> {
    state.dispatcher.model(model).ok_or_else(|| {
        let known: Vec<&str> = state.dispatcher.models().map(|m| m.name.as_str()).collect();
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!(
                "model {model:?} not found; this server offers: {}",
                known.join(", ")
            ),
        )
    })
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The checked parts of a generateTask body.
struct Submission {
    callback_url: Option<String>,
    input: Map<String, Value>,
}

fn parse_submission(bytes: &[u8], allow_private: bool) -> Result<Submission, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(bad(
            "the request body is empty; send JSON like {\"input\": {\"prompt\": \"...\"}}".into(),
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(bad(format!(
            "the request body must be a JSON object, got {}",
            json_type_name(&value)
        )));
    };
    let request_type = match body.get("request_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "async" => Some(RequestType::Async),
        Some(Value::String(s)) if s == "callback" => Some(RequestType::Callback),
        Some(other) => {
            return Err(bad(format!(
                "request_type must be \"async\" or \"callback\", got {other}"
            )))
        }
    };
    let callback_url = match body.get("callback_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(check_callback_url(s, allow_private)?),
        Some(other) => {
            return Err(bad(format!(
                "callback_url must be a string, got {}",
                json_type_name(other)
            )))
        }
    };
    // An explicit "async" ignores a callback_url; with no request_type, a callback_url means
    // the client wants a callback.
    let callback_url = match (request_type, callback_url) {
        (Some(RequestType::Callback), None) => {
            return Err(bad(
                "callback_url is required when request_type is \"callback\"".into(),
            ))
        }
        (Some(RequestType::Async), _) => None,
        (_, url) => url,
    };
    let input = match body.remove("input") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => {
            return Err(bad(
                "input is required: an object with the model's parameters, e.g. {\"input\": {\"prompt\": \"...\"}}".into(),
            ))
        }
        Some(other) => {
            return Err(bad(format!(
                "input must be a JSON object, got {}",
                json_type_name(&other)
            )))
        }
    };
    Ok(Submission {
        callback_url,
        input,
    })
}

/// An absolute http(s) URL of reasonable length that does not point into a private network.
fn check_callback_url(raw: &str, allow_private: bool) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            ErrorCode::CallbackUrlRefused,
            format!("callback_url {raw:?} {why}"),
        )
    };
    if raw.len() > 2048 {
        return Err(bad("is longer than 2048 characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| bad(&format!("is not an absolute URL ({e})")))?;
    ssrf::check_url(&url, allow_private).map_err(|e| bad(&e.to_string()))?;
    Ok(url.to_string())
}

async fn generate_task(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Envelope<TaskCreated>>, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    let runtime = model_or_404(&state, &model)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                "the request body is larger than the limit of {} bytes; pass large media as URLs",
                state.max_body_bytes
            ),
            )
        } else {
            ApiError::new(
                ErrorCode::InvalidInput,
                format!("cannot read the request body: {rejection}"),
            )
        }
    })?;
    let submission = parse_submission(&body, state.webhooks.allow_private)?;
    runtime
        .backend
        .validate(&submission.input)
        .map_err(|m| ApiError::new(ErrorCode::InvalidInput, m))?;
    let task = NewTask {
        id: new_task_id(),
        tenant_id: tenant.id,
        model: runtime.name.clone(),
        input: submission.input,
        callback_url: submission.callback_url,
        max_attempts: runtime.config.max_attempts,
        create_time: now_ms(),
    };
    let task_id = task.id.clone();
    // Before the insert: once it commits the task may be claimed at once, and the claim's
    // `forget` must come after this.
    if state.live_views {
        if let Some(view) = pending_view(&task) {
            state.views.insert(task_id.clone(), view);
        }
    }
    if let Err(e) = state.store.insert_task(task).await {
        state.views.forget(&task_id);
        return Err(e.into());
    }
    // A local loop parked in the store was answered by the insert's own commit; a wake-up
    // would only cost it a due-time read. Pull workers' long-polls still need one.
    if !(state.store.parks_claims() && runtime.backend.runs_locally()) {
        state.dispatcher.notify(&runtime.name);
    }
    Ok(Json(Envelope::success(TaskCreated { task_id })))
}

async fn status_task(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    // A model removed from the configuration has no runtime, but its tasks (failed with
    // MODEL_REMOVED) still answer; an unknown model with no such task is a 404 naming the model.
    let runtime = model_or_404(&state, &model);
    let Some(task_id) = query_param(&uri, "taskId") else {
        runtime?;
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!(
                "the taskId query parameter is required: /api/v1/statusTask/{model}?taskId=TASK_ID"
            ),
        ));
    };
    let not_found = || {
        ApiError::new(
            ErrorCode::TaskNotFound,
            format!("task {task_id:?} not found for model {model:?}"),
        )
    };
    // Another tenant's task, or one of another model, does not exist as far as this key knows.
    if let Some(view) = state.views.get(&task_id) {
        if view.tenant_id != tenant.id || view.model != model {
            return Err(runtime.err().unwrap_or_else(not_found));
        }
        return Ok(json_bytes(view.body.clone()));
    }
    let task = match state.store.get_task(&task_id).await? {
        Some(t) => t,
        None => return Err(runtime.err().unwrap_or_else(not_found)),
    };
    if task.tenant_id != tenant.id || task.model != model {
        return Err(runtime.err().unwrap_or_else(not_found));
    }
    let status = state
        .links
        .status_of(&task)
        .await
        .map_err(ApiError::internal)?;
    let body =
        Bytes::from(serde_json::to_vec(&Envelope::success(status)).map_err(ApiError::internal)?);
    // A failure's view has no URLs; a success's is kept only where its URLs stay valid.
    let keep = match task.state {
        taskgate_proto::TaskState::Failed => true,
        taskgate_proto::TaskState::Success => state.links.store.stable_urls(),
        _ => false,
    };
    if keep {
        state.views.insert(
            task.id,
            CachedView {
                tenant_id: task.tenant_id,
                model: task.model,
                body: body.clone(),
            },
        );
    }
    Ok(json_bytes(body))
}

/// The statusTask answer of a task just submitted, as a store read would render it.
fn pending_view(task: &NewTask) -> Option<CachedView> {
    let view = crate::domain::Task {
        id: task.id.clone(),
        tenant_id: task.tenant_id.clone(),
        model: task.model.clone(),
        state: taskgate_proto::TaskState::Pending,
        input: String::new(),
        callback_url: task.callback_url.clone(),
        attempts: 0,
        max_attempts: task.max_attempts,
        create_time: task.create_time,
        start_time: None,
        complete_time: None,
        outputs: Vec::new(),
        fail_code: None,
        fail_msg: None,
        progress: None,
    }
    .status(|_| String::new());
    let body = serde_json::to_vec(&Envelope::success(view)).ok()?;
    Some(CachedView {
        tenant_id: task.tenant_id.clone(),
        model: task.model.clone(),
        body: Bytes::from(body),
    })
}

/// A 200 answer with a body serialised already.
fn json_bytes(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn secret_data(s: crate::store::WebhookSecrets) -> WebhookSecretData {
    let live = s.previous_expires_at.is_some_and(|t| t > now_ms());
    WebhookSecretData {
        secret: s.current,
        previous_secret: s.previous.filter(|_| live),
        previous_expires_time: s.previous_expires_at.filter(|_| live),
    }
}

async fn webhook_secret(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Envelope<WebhookSecretData>>, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    let secrets = state
        .store
        .webhook_secrets(&tenant.id, &webhook::generate_secret())
        .await?;
    Ok(Json(Envelope::success(secret_data(secrets))))
}

async fn rotate_webhook_secret(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Envelope<WebhookSecretData>>, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    // Make sure a first secret exists, so that rotation always has one to overlap with.
    state
        .store
        .webhook_secrets(&tenant.id, &webhook::generate_secret())
        .await?;
    let now = now_ms();
    let until = now + state.webhooks.secret_overlap.as_millis() as i64;
    // A second rotation while the previous secret still signs would drop that secret before
    // receivers were promised it stops: refuse, and say until when.
    match state
        .store
        .rotate_webhook_secret(&tenant.id, &webhook::generate_secret(), now, until)
        .await?
    {
        Rotation::Rotated(secrets) => Ok(Json(Envelope::success(secret_data(secrets)))),
        Rotation::OverlapRunning(secrets) => {
            let until = secrets.previous_expires_at.unwrap_or(now);
            Err(ApiError::new(ErrorCode::SecretRotationPending, format!(
                "the previous secret still signs deliveries until {} (previousExpiresTime {until}); \
                 rotating again now would stop it early. Rotate again after that time",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(until.max(0) as u64)
                ),
            )))
        }
    }
}

fn delivery_view(d: Delivery, attempts: Vec<DeliveryAttempt>) -> WebhookDelivery {
    WebhookDelivery {
        next_attempt_time: (d.state == "pending").then_some(d.next_attempt_at),
        id: d.id,
        task_id: d.task_id,
        url: d.url,
        state: d.state,
        attempts: d.attempts,
        create_time: d.created_at,
        complete_time: d.completed_at,
        last_error: d.last_error,
        attempt_log: attempts
            .into_iter()
            .map(|a| WebhookAttempt {
                time: a.attempted_at,
                status_code: a.status_code,
                latency_ms: a.latency_ms,
                error: a.error,
            })
            .collect(),
    }
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

async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Envelope<WebhookDeliveries>>, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    let task_id = query_param(&uri, "taskId").ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidInput,
            "the taskId query parameter is required: /api/v1/webhookDeliveries?taskId=TASK_ID",
        )
    })?;
    let task = state
        .store
        .get_task(&task_id)
        .await?
        .filter(|t| t.tenant_id == tenant.id)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::TaskNotFound,
                format!("task {task_id:?} not found"),
            )
        })?;
    let deliveries = state
        .store
        .deliveries_for_task(&task.id)
        .await?
        .into_iter()
        .map(|(d, a)| delivery_view(d, a))
        .collect();
    Ok(Json(Envelope::success(WebhookDeliveries { deliveries })))
}

async fn retry_delivery(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Envelope<WebhookDelivery>>, ApiError> {
    let tenant = state.auth.authenticate(&headers).await?;
    let not_found = || {
        ApiError::new(
            ErrorCode::DeliveryNotFound,
            format!("webhook delivery {id:?} not found"),
        )
    };
    let delivery = state
        .store
        .get_delivery(&id)
        .await?
        .filter(|d| d.tenant_id == tenant.id)
        .ok_or_else(not_found)?;
    let now = now_ms();
    match state
        .store
        .redeliver(&delivery.id, now, MANUAL_RETRY_INTERVAL)
        .await?
    {
        Redeliver::Scheduled => {}
        Redeliver::TooSoon { retry_at } => {
            let wait = std::time::Duration::from_millis((retry_at - now).max(0) as u64);
            let secs = wait.as_millis().div_ceil(1000).max(1);
            return Err(ApiError::too_soon(
                ErrorCode::RetryTooSoon,
                format!(
                    "this delivery was retried less than {}s ago; it may be retried again in \
                     {secs} seconds",
                    MANUAL_RETRY_INTERVAL.as_secs()
                ),
                wait,
            ));
        }
        Redeliver::InFlight => {
            return Err(ApiError::new(
                ErrorCode::DeliveryInFlight,
                "this delivery is being sent right now; look at its attempts again shortly",
            ))
        }
        Redeliver::NotFound => return Err(not_found()),
    }
    state.deliverer.wake();
    let updated = state
        .store
        .deliveries_for_task(&delivery.task_id)
        .await?
        .into_iter()
        .find(|(d, _)| d.id == delivery.id)
        .ok_or_else(not_found)?;
    Ok(Json(Envelope::success(delivery_view(updated.0, updated.1))))
}

/// A file of a task finished before outputs were staged per attempt (`TASK_ID/NAME` keys).
async fn get_untagged_file(
    State(state): State<Arc<AppState>>,
    Path((task_id, name)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    serve_file(state, format!("{task_id}/{name}"), name, uri).await
}

async fn get_file(
    State(state): State<Arc<AppState>>,
    Path((task_id, tag, name)): Path<(String, String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    serve_file(state, format!("{task_id}/{tag}/{name}"), name, uri).await
}

async fn serve_file(
    state: Arc<AppState>,
    key: String,
    name: String,
    uri: Uri,
) -> Result<Response, ApiError> {
    let refused = || {
        ApiError::new(
            ErrorCode::LinkInvalid,
            "this link is invalid or has expired",
        )
    };
    let files = state.local_files.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::FileNotFound,
            "result files are not served by this node",
        )
    })?;
    let (mut expires, mut sig) = (None, None);
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "expires" => expires = v.parse::<i64>().ok(),
            "sig" => sig = Some(v.into_owned()),
            _ => {}
        }
    }
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return Err(refused());
    };
    if !files.signer().verify(&key, expires, &sig) || expires < now_ms() / 1000 {
        return Err(refused());
    }
    let path = files.path_of(&key).ok_or_else(refused)?;
    // A file, or a small output kept in the database (see `artifacts::INLINE_MAX`).
    let (body, len) = match tokio::fs::File::open(&path).await {
        Ok(file) => {
            let len = file.metadata().await.map_err(ApiError::internal)?.len();
            (
                Body::from_stream(tokio_util::io::ReaderStream::new(file)),
                len,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match state.store.get_blob(&key).await? {
                Some(content) => {
                    let len = content.len() as u64;
                    (Body::from(content), len)
                }
                None => {
                    return Err(ApiError::new(
                        ErrorCode::FileNotFound,
                        "this result file no longer exists",
                    ))
                }
            }
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let content_type = mime_guess::from_path(&name).first_or_octet_stream();
    let mut response = body.into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type.as_ref()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let max_age = (expires - now_ms() / 1000).max(0);
    if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={max_age}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn err(body: &str) -> String {
        match parse_submission(body.as_bytes(), false) {
            Err(ApiError::Refused { code, message, .. }) if code.status() == 400 => message,
            _ => panic!("expected a 400 for {body}"),
        }
    }

    #[test]
    fn each_malformed_body_gets_a_message_naming_the_problem() {
        assert!(err("{").contains("not valid JSON"));
        assert!(err("[]").contains("must be a JSON object, got an array"));
        assert!(err("{}").contains("input is required"));
        assert!(err(r#"{"input": "x"}"#).contains("input must be a JSON object, got a string"));
        assert!(err(r#"{"request_type": "sync", "input": {}}"#).contains("request_type"));
        assert!(err(r#"{"request_type": "callback", "input": {}}"#)
            .contains("callback_url is required"));
        assert!(err(r#"{"callback_url": "ftp://x/y", "input": {}}"#).contains("http or https"));
        assert!(err(r#"{"callback_url": "/relative", "input": {}}"#).contains("absolute"));
    }

    #[test]
    fn invalid_utf8_is_refused_before_parsing() {
        let m = match parse_submission(b"{\"input\": {\"p\": \"\xff\"}}", false) {
            Err(ApiError::Refused {
                code: ErrorCode::InvalidInput,
                message,
                ..
            }) => message,
            _ => panic!(),
        };
        assert!(m.contains("UTF-8"), "{m}");
    }

    #[test]
    fn a_callback_url_without_request_type_asks_for_a_callback() {
        let s = parse_submission(
            br#"{"callback_url": "https://example.com/h", "input": {}}"#,
            false,
        )
        .unwrap();
        assert_eq!(s.callback_url.as_deref(), Some("https://example.com/h"));
        let s = parse_submission(
            br#"{"request_type": "async", "callback_url": "https://example.com/h", "input": {}}"#,
            false,
        )
        .unwrap();
        assert_eq!(s.callback_url, None);
    }
}
