//! APIXO's two endpoints: submit (`generateTask`) and read (`statusTask`).
//!
//! Handlers parse and check input themselves (rather than through axum's typed extractors) so
//! that every bad request gets a precise message in the envelope. Order of checks: key (401, the
//! extractor, before the body is read), model (404), body size (413), body content (400).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};
use taskgate_proto::{Envelope, ErrorCode, RequestType, TaskCreated};
use tokio::time::Instant;

use super::extract::ClientTenant;
use super::{models, query_param, wait};
use crate::dispatch::ModelRuntime;
use crate::domain::{new_task_id, now_ms};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::NewTask;
use crate::views::CachedView;
use crate::webhooks::ssrf;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/generateTask/{model}", post(generate_task))
        .route("/api/v1/statusTask/{model}", get(status_task))
}

pub(super) fn model_or_404<'a>(
    state: &'a AppState,
    model: &str,
) -> Result<&'a Arc<ModelRuntime>, ApiError> {
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
    ClientTenant(tenant): ClientTenant,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
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
    let mut submission = parse_submission(&body, state.webhooks.allow_private_callbacks)?;
    models::check_input(runtime, &mut submission.input)?;
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
    // Before the insert, so that no change of the new task can come before the watch.
    let wait =
        wait::preference(&headers).map(|w| (w, state.dispatcher.events().subscribe(&task_id)));
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
    let Some((wait, watch)) = wait else {
        return Ok(Json(Envelope::success(TaskCreated { task_id })).into_response());
    };
    // Asked to wait: the answer is the task's status (which carries its taskId) once it is
    // final or the wait is over.
    let deadline = Instant::now() + wait;
    match wait::until_final(&state, &task_id, watch, deadline).await? {
        Some(task) => Ok((
            [wait::applied(wait)],
            json_bytes(render_status(&state, task).await?),
        )
            .into_response()),
        // Only a retention sweep could remove it this soon; the id is still the answer.
        None => Ok(Json(Envelope::success(TaskCreated { task_id })).into_response()),
    }
}

async fn status_task(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
    Path(model): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A model removed from the configuration has no runtime, but its tasks (failed with
    // MODEL_REMOVED) still answer; an unknown model with no such task is a 404 naming the model.
    let runtime = model_or_404(&state, &model);
    let task_id = required_task_id(&state, &uri, "statusTask", &model)?;
    let not_found = || task_not_found(&task_id, &model);
    if let Some(wait) = wait::preference(&headers) {
        // The watch before the first read: a change between the two still wakes the wait.
        let watch = state.dispatcher.events().subscribe(&task_id);
        let deadline = Instant::now() + wait;
        let task = wait::until_final(&state, &task_id, watch, deadline)
            .await?
            .filter(|t| t.tenant_id == tenant.id && t.model == model);
        let Some(task) = task else {
            return Err(runtime.err().unwrap_or_else(not_found));
        };
        let body = render_status(&state, task).await?;
        return Ok(([wait::applied(wait)], json_bytes(body)).into_response());
    }
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
    Ok(json_bytes(render_status(&state, task).await?))
}

/// The `taskId` query parameter of a route about one task (`/api/v1/{route}/{model}?taskId=`);
/// without it, the unknown model's 404 or a 400 showing the form.
pub(super) fn required_task_id(
    state: &AppState,
    uri: &Uri,
    route: &str,
    model: &str,
) -> Result<String, ApiError> {
    if let Some(id) = query_param(uri, "taskId") {
        return Ok(id);
    }
    model_or_404(state, model)?;
    Err(ApiError::new(
        ErrorCode::InvalidInput,
        format!("the taskId query parameter is required: /api/v1/{route}/{model}?taskId=TASK_ID"),
    ))
}

/// What a task of another tenant or model answers, like one that does not exist.
pub(super) fn task_not_found(task_id: &str, model: &str) -> ApiError {
    ApiError::new(
        ErrorCode::TaskNotFound,
        format!("task {task_id:?} not found for model {model:?}"),
    )
}

/// The statusTask answer of `task` (its owner checked by the caller), kept in the node's views
/// where it can no longer change.
async fn render_status(state: &AppState, task: crate::domain::Task) -> Result<Bytes, ApiError> {
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
    Ok(body)
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
