//! APIXO's two endpoints, submit (`generateTask`) and read (`statusTask`), and taskgate's
//! `cancelTask`, which APIXO does not have.
//!
//! Handlers parse and check input themselves (rather than through axum's typed extractors) so
//! that every bad request gets a precise message in the envelope. Order of checks: key (401, the
//! extractor, before the body is read), model (404), body size (413), body content (400).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};
use taskgate_proto::{
    Envelope, ErrorCode, GenerateTaskRequest, RequestType, TaskCreated, TaskStatus, WebhookEvent,
};

use super::extract::{Caller, PathParams, Writer};
use super::idempotency::{self, IdempotencyHeader};
use super::live::{add_live_fields, LogsQuery, PENDING_VIEW_FRESH_MS};
use super::{models, operator, query_param, wait};
use crate::dispatch::ModelRuntime;
use crate::domain::{new_task_id, now_ms, EventMask};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{CancelOutcome, NewTask, Runner};
use crate::views::CachedView;
use crate::webhooks::ssrf;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/generateTask/{model}", post(generate_task))
        .route("/api/v1/statusTask/{model}", get(status_task))
        .route("/api/v1/cancelTask/{model}", post(cancel_task))
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

pub(super) fn json_type_name(v: &Value) -> &'static str {
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
pub(super) struct Submission {
    pub(super) callback_url: Option<String>,
    pub(super) input: Map<String, Value>,
    pub(super) priority: i32,
    pub(super) ttl: Option<Duration>,
    pub(super) webhook_events: EventMask,
}

/// Bounds of `priority`: wide enough for any scheme, narrow enough to stay an `i32` everywhere.
const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1_000_000..=1_000_000;
/// Longest `ttl_seconds`: 30 days, past which a deadline means nothing.
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

/// `priority` (optional integer, higher runs first) and `ttl_seconds` (optional positive
/// integer: the task fails with EXPIRED if not started by then).
fn parse_scheduling(body: &Map<String, Value>) -> Result<(i32, Option<Duration>), ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_i64().filter(|p| PRIORITY_RANGE.contains(p)) {
            Some(p) => i32::try_from(p).unwrap_or_default(),
            None => {
                return Err(bad(format!(
                    "priority must be an integer from {} to {}, got {n}",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "priority must be an integer, got {}",
                json_type_name(other)
            )))
        }
    };
    let ttl = match body.get("ttl_seconds") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64().filter(|t| (1..=MAX_TTL_SECONDS).contains(t)) {
            Some(t) => Some(Duration::from_secs(t)),
            None => {
                return Err(bad(format!(
                    "ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS} (30 days), got {n}"
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "ttl_seconds must be an integer, got {}",
                json_type_name(other)
            )))
        }
    };
    Ok((priority, ttl))
}

pub(super) fn parse_submission(bytes: &[u8], allow_private: bool) -> Result<Submission, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let value = parse_json_body(bytes, "{\"input\": {\"prompt\": \"...\"}}")?;
    let Value::Object(body) = value else {
        return Err(bad(format!(
            "the request body must be a JSON object, got {}",
            json_type_name(&value)
        )));
    };
    submission_from_object(body, allow_private)
}

/// Deepest nesting of arrays and objects a request body may have.
pub(super) const MAX_JSON_DEPTH: usize = 64;
/// Most values (containers and the items in them) a request body may hold: a 10 MiB array of
/// zeros would otherwise become about 160 MB of parsed values.
pub(super) const MAX_JSON_ELEMENTS: usize = 250_000;

/// A request body as JSON: UTF-8, not empty, within [`MAX_JSON_DEPTH`] and
/// [`MAX_JSON_ELEMENTS`] (checked on the text before anything is allocated for it), parsed.
/// `example` shows the caller what an empty body should have held.
pub(super) fn parse_json_body(bytes: &[u8], example: &str) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(bad(format!(
            "the request body is empty; send JSON like {example}"
        )));
    }
    json_shape_within(text.as_bytes(), MAX_JSON_DEPTH, MAX_JSON_ELEMENTS).map_err(bad)?;
    serde_json::from_str(text).map_err(|e| bad(format!("the request body is not valid JSON: {e}")))
}

/// Refuses JSON text nested deeper than `max_depth` or holding more than `max_elements`
/// values, by one pass over the bytes (strings skipped), before it is parsed. Counts are upper
/// bounds (every comma and container counts), so text it accepts parses within them.
fn json_shape_within(text: &[u8], max_depth: usize, max_elements: usize) -> Result<(), String> {
    let mut depth = 0usize;
    let mut elements = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                elements += 1;
                if depth > max_depth {
                    return Err(format!(
                        "the request body nests arrays and objects deeper than {max_depth} levels"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => elements += 1,
            _ => {}
        }
        if elements > max_elements {
            return Err(format!(
                "the request body holds more than {max_elements} JSON values"
            ));
        }
    }
    Ok(())
}

/// Checks one generateTask body, already parsed: the whole body of generateTask, or one item
/// of a generateTasks batch.
pub(super) fn submission_from_object(
    mut body: Map<String, Value>,
    allow_private: bool,
) -> Result<Submission, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
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
    let (priority, ttl) = parse_scheduling(&body)?;
    let webhook_events = parse_webhook_events(&body, callback_url.is_some())?;
    Ok(Submission {
        callback_url,
        input,
        priority,
        ttl,
        webhook_events,
    })
}

/// `webhook_events` (optional, taskgate's own): the events POSTed to the callback URL, a
/// non-empty array of distinct names from `start`, `progress`, `completed`. Left out (or
/// null), the final state only, as APIXO does. Every refusal names the problem.
fn parse_webhook_events(
    body: &Map<String, Value>,
    has_callback: bool,
) -> Result<EventMask, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    const NAMES: &str = "\"start\", \"progress\" and \"completed\"";
    let items = match body.get("webhook_events") {
        None | Some(Value::Null) => return Ok(EventMask::DEFAULT),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(bad(format!(
                "webhook_events must be an array of event names ({NAMES}), got {}",
                json_type_name(other)
            )))
        }
    };
    if items.is_empty() {
        return Err(bad(format!(
            "webhook_events is empty; omit it for the default, [\"completed\"] (the events are {NAMES})"
        )));
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::String(name) = item else {
            return Err(bad(format!(
                "webhook_events[{i}] must be an event name (a string), got {}",
                json_type_name(item)
            )));
        };
        let event = WebhookEvent::parse(name).ok_or_else(|| {
            bad(format!(
                "webhook_events[{i}] is {name:?}, which is not an event; the events are {NAMES}"
            ))
        })?;
        if events.contains(&event) {
            return Err(bad(format!(
                "webhook_events names {name:?} more than once; list each event once"
            )));
        }
        events.push(event);
    }
    if !has_callback {
        return Err(bad(
            "webhook_events needs a callback_url: the events are POSTed to it (and request_type \"async\" drops the callback_url)".into(),
        ));
    }
    Ok(EventMask::of(events))
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

/// The request body within the server's limit (413 beyond it), read only when the handler asks:
/// after the key and the model are checked, so a refused request costs no body.
pub(super) async fn read_body(state: &AppState, request: Request) -> Result<Bytes, ApiError> {
    // A declared length over the limit is refused at once: the limit alone would wait for the
    // bytes to pass it, which a client that declares a gigabyte need never send.
    if request.body().size_hint().lower() > state.max_body_bytes as u64 {
        return Err(too_large(state));
    }
    Bytes::from_request(request, &())
        .await
        .map_err(|rejection| ApiError::unread_body(&rejection, || body_refused(state, &rejection)))
}

fn too_large(state: &AppState) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the request body is larger than the limit of {} bytes; pass large media as URLs",
            state.max_body_bytes
        ),
    )
}

fn body_refused(state: &AppState, rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(state)
    } else {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("cannot read the request body: {rejection}"),
        )
    }
}

/// Submit a task (APIXO's generateTask).
///
/// Answers at once with the new task's id, once it is stored. With `Prefer: wait=N` the answer
/// is the task's status when it is final or N seconds have passed.
#[utoipa::path(
    post,
    path = "/api/v1/generateTask/{model}",
    tag = "tasks",
    operation_id = "generateTask",
    params(("model" = String, Path, description = "The model's name, as `GET /api/v1/models` lists it.", example = "echo"), ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold the answer until the task is final or N seconds (at most 60) pass; `Preference-Applied` says it was honoured. Unreadable preferences are ignored.", example = "wait=10"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII bytes. The same key from the same tenant within 24 h answers what the first request created and creates nothing; with another request it is `idempotency_key_reused` (422).", example = "nightly-2024-06-01")),
    request_body(content = GenerateTaskRequest, description = "The task: its `input` and how to hear of the result."),
    responses((status = 200, description = "Created (or, with an `Idempotency-Key` seen before, what the first request created).", body = Envelope<super::openapi::Submitted>, headers(("Preference-Applied" = String, description = "`wait=N`, present when the request asked to wait.")))),
    security(("apiKey" = [])),
)]
async fn generate_task(
    State(state): State<Arc<AppState>>,
    Writer(caller): Writer,
    PathParams(model): PathParams<String>,
    idempotency: IdempotencyHeader,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    caller.may_use(&model)?;
    let runtime = model_or_404(&state, &model)?;
    let body = read_body(&state, request).await?;
    let key = idempotency.key()?;
    let mut submission = parse_submission(&body, state.webhooks.allow_private_callbacks)?;
    models::check_input(runtime, &mut submission.input)?;
    runtime
        .backend
        .validate(&submission.input)
        .map_err(|m| ApiError::new(ErrorCode::InvalidInput, m))?;
    let tenant_id = caller.tenant().id.clone();
    let task = new_task(runtime, &caller, submission, new_task_id(), now_ms());
    let task_id = within_task_limit(&state, &caller, 1, async {
        if let Some(key) = key {
            // The slower path: the key's row is read and written in the task's transaction.
            idempotency::submit_one(&state, runtime, key, &body, task).await
        } else {
            submit_one(&state, runtime, task).await
        }
    })
    .await?;
    let Some(wait) = wait::preference(&headers) else {
        return Ok(Json(Envelope::success(TaskCreated { task_id })).into_response());
    };
    // Asked to wait: the answer is the task's status (which carries its taskId) once it is
    // final or the wait is over; a task that finished before this point is answered at once.
    match wait::until_final(&state, &task_id, wait, |t| t.tenant_id == tenant_id).await? {
        Some(task) => Ok((
            [wait::applied(wait)],
            json_bytes(render_status(&state, task).await?),
        )
            .into_response()),
        // Only a retention sweep could remove it this soon; the id is still the answer.
        None => Ok(Json(Envelope::success(TaskCreated { task_id })).into_response()),
    }
}

/// Runs `submit` of `n` tasks within the caller's limit of unfinished tasks: a 429 when they
/// would pass it, and their places given back when the submit fails.
pub(super) async fn within_task_limit<T>(
    state: &AppState,
    caller: &Caller,
    n: u64,
    submit: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    state
        .limits
        .reserve_tasks(&caller.0, n)
        .map_err(|r| ApiError::too_soon(ErrorCode::RateLimited, r.message, r.retry_after))?;
    let submitted = submit.await;
    if submitted.is_err() {
        state.limits.release_tasks(&caller.0, n);
    }
    submitted
}

/// The task a checked submission of `caller` makes, created at `create_time`.
pub(super) fn new_task(
    runtime: &ModelRuntime,
    caller: &Caller,
    submission: Submission,
    id: String,
    create_time: i64,
) -> NewTask {
    NewTask {
        id,
        tenant_id: caller.tenant().id.clone(),
        key_id: Some(caller.key_id().to_owned()),
        model: runtime.name.clone(),
        input: submission.input,
        callback_url: submission.callback_url,
        max_attempts: runtime.config.max_attempts,
        create_time,
        priority: submission.priority,
        expires_at: submission
            .ttl
            .map(|ttl| create_time.saturating_add(ttl.as_millis() as i64)),
        webhook_events: submission.webhook_events,
        // The submit request's span is current here (a batch's too: each task links to it).
        trace_parent: crate::telemetry::current_traceparent(),
    }
}

/// The hot path of a submit: the group-committed insert, with the pending view cached first
/// where this process is the store's only writer.
async fn submit_one(
    state: &AppState,
    runtime: &ModelRuntime,
    task: NewTask,
) -> Result<String, ApiError> {
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
    state.metrics.submitted(&runtime.name, 1);
    // The dashboard's count streams count new tasks (one atomic load while none is open).
    state.dispatcher.events().submitted();
    // A local loop parked in the store was answered by the insert's own commit; a wake-up
    // would only cost it a due-time read. Pull workers' long-polls still need one.
    if !(state.store.parks_claims() && runtime.backend.runs_locally()) {
        state.dispatcher.notify(&runtime.name);
    }
    Ok(task_id)
}

/// Read a task's status (APIXO's statusTask).
#[utoipa::path(
    get,
    path = "/api/v1/statusTask/{model}",
    tag = "tasks",
    operation_id = "statusTask",
    params(
        ("model" = String, Path, description = "The model's name, as `GET /api/v1/models` lists it.", example = "echo"),
        ("taskId" = String, Query, description = "The id generateTask answered.", example = "task_01jd5v9k2r8m3q4w5e6r7t8y9u"),
        ("logs" = Option<bool>, Query, description = "taskgate extension: `true` adds the task's log lines (`logs`, the newest 100)."),
        ("logsAfter" = Option<u64>, Query, description = "taskgate extension: the lines after this `seq` (implies `logs=true`)."),
        ("attempts" = Option<bool>, Query, description = "taskgate extension: `true` adds every attempt of the task, oldest first (`attempts`)."),
        ("input" = Option<bool>, Query, description = "taskgate extension: `true` adds the task's `input` object exactly as the submit was accepted (`input`)."),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold the answer until the task is final or N seconds (at most 60) pass; `Preference-Applied` says it was honoured. Unreadable preferences are ignored.", example = "wait=10"),
    ),
    responses((status = 200, description = "The task's status.", body = Envelope<TaskStatus>, headers(("Preference-Applied" = String, description = "`wait=N`, present when the request asked to wait.")))),
    security(("apiKey" = [])),
)]
async fn status_task(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    PathParams(model): PathParams<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.may_use(&model)?;
    let tenant = caller.tenant();
    // A model removed from the configuration has no runtime, but its tasks (failed with
    // MODEL_REMOVED) still answer; an unknown model with no such task is a 404 naming the model.
    let runtime = model_or_404(&state, &model);
    let task_id = required_task_id(&state, &uri, "statusTask", &model)?;
    let not_found = || task_not_found(&task_id, &model);
    let logs = LogsQuery::from_uri(&uri)?;
    let attempts = super::flag_param(&uri, "attempts")?;
    let input = super::flag_param(&uri, "input")?;
    let extras = Extras {
        logs,
        attempts,
        input,
    };
    if let Some(wait) = wait::preference(&headers) {
        let task = wait::until_final(&state, &task_id, wait, |t| {
            t.tenant_id == tenant.id && t.model == model
        })
        .await?;
        let Some(task) = task else {
            return Err(runtime.err().unwrap_or_else(not_found));
        };
        let body = render_status_with(&state, task, extras).await?;
        return Ok(([wait::applied(wait)], json_bytes(body)).into_response());
    }
    // Another tenant's task, or one of another model, does not exist as far as this key knows.
    // (A cached view has no logs, attempts or input: a request for them reads the store.)
    if let Some(view) = state.views.get(&task_id).filter(|_| extras.is_none()) {
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
    Ok(json_bytes(render_status_with(&state, task, extras).await?))
}

/// Longest `taskId` looked up; ours are 31 bytes.
const MAX_TASK_ID_BYTES: usize = 128;

/// The `taskId` query parameter of a route about one task (`/api/v1/{route}/{model}?taskId=`);
/// without it, the unknown model's 404 or a 400 showing the form.
pub(super) fn required_task_id(
    state: &AppState,
    uri: &Uri,
    route: &str,
    model: &str,
) -> Result<String, ApiError> {
    if let Some(id) = query_param(uri, "taskId") {
        // No task has such an id; PostgreSQL would refuse the NUL (a 500), and a megabyte of id
        // need not reach the store or come back in the message.
        if id.contains('\0') || id.len() > MAX_TASK_ID_BYTES {
            model_or_404(state, model)?;
            return Err(ApiError::new(
                ErrorCode::TaskNotFound,
                format!(
                    "task not found for model {model:?}: a task id is at most {MAX_TASK_ID_BYTES} bytes with no NUL"
                ),
            ));
        }
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
    render_status_with(state, task, Extras::default()).await
}

/// What a statusTask request asks for beyond the status: its extensions.
#[derive(Default)]
struct Extras {
    /// `logs=true` / `logsAfter=`.
    logs: Option<LogsQuery>,
    /// `attempts=true`.
    attempts: bool,
    /// `input=true`.
    input: bool,
}

impl Extras {
    fn is_none(&self) -> bool {
        self.logs.is_none() && !self.attempts && !self.input
    }
}

/// [`render_status`] with the live fields (`queuePosition`, and the logs when asked for) and,
/// when asked for, the attempts and the input; an answer with any of the extras is not kept.
async fn render_status_with(
    state: &AppState,
    task: crate::domain::Task,
    extras: Extras,
) -> Result<Bytes, ApiError> {
    let keep_view = extras.is_none();
    let Extras {
        logs,
        attempts,
        input,
    } = extras;
    let mut status = state
        .links
        .status_of(&task)
        .await
        .map_err(ApiError::internal)?;
    add_live_fields(state, &task, &mut status, logs).await?;
    if attempts {
        status.attempts = Some(operator::attempts_of(state, &task).await?);
    }
    if input {
        // The stored text was checked as an object at submit; anything else is our fault.
        let object = task
            .parse_input()
            .map_err(|e| ApiError::Internal(format!("task {}: {e}", task.id).into()))?;
        status.input = Some(serde_json::Value::Object(object));
    }
    let body =
        Bytes::from(serde_json::to_vec(&Envelope::success(status)).map_err(ApiError::internal)?);
    // A failure's view has no URLs; a success's is kept only where its URLs stay valid.
    let keep = match task.state {
        _ if !keep_view => false,
        taskgate_proto::TaskState::Failed => true,
        taskgate_proto::TaskState::Success => state.links.store.stable_urls(),
        _ => false,
    };
    if keep {
        state.views.insert(
            task.id,
            CachedView {
                gone_after: state.retention.gone_after(task.complete_time),
                tenant_id: task.tenant_id,
                model: task.model,
                body: body.clone(),
            },
        );
    }
    Ok(body)
}

/// Cancel a pending or processing task (taskgate extension).
///
/// `POST /api/v1/cancelTask/{model}?taskId=`: a pending or processing task fails with
/// `CANCELLED`; the answer is its status, as statusTask would give it. Who may see a task and
/// the 404s are statusTask's.
///
/// The final state is written first, in one guarded store write that also kills the claim's
/// token and owes the callback; only then is the running attempt stopped (here, or on the node
/// that runs it through the store's notice; a pull worker at its next heartbeat). So a cancel
/// holds even when the node running the attempt is dead, and no attempt can write after it.
#[utoipa::path(
    post,
    path = "/api/v1/cancelTask/{model}",
    tag = "tasks",
    operation_id = "cancelTask",
    params(("model" = String, Path, description = "The model's name, as `GET /api/v1/models` lists it.", example = "echo"), ("taskId" = String, Query, description = "The id generateTask answered.", example = "task_01jd5v9k2r8m3q4w5e6r7t8y9u")),
    responses((status = 200, description = "Cancelled: the task's status, `failed` with failCode `CANCELLED`.", body = Envelope<TaskStatus>)),
    security(("apiKey" = [])),
)]
async fn cancel_task(
    State(state): State<Arc<AppState>>,
    Writer(caller): Writer,
    PathParams(model): PathParams<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    caller.may_use(&model)?;
    let tenant = caller.tenant();
    // As in statusTask: a removed model's tasks still answer (they are final, so 409).
    let runtime = model_or_404(&state, &model);
    let task_id = required_task_id(&state, &uri, "cancelTask", &model)?;
    let outcome = state
        .store
        .cancel_task(&task_id, &tenant.id, &model, now_ms())
        .await?;
    let (task, from, runner) = match outcome {
        CancelOutcome::Cancelled { task, from, runner } => (task, from, runner),
        CancelOutcome::AlreadyFinal(task) => {
            return Err(ApiError::new(
                ErrorCode::TaskAlreadyFinal,
                format!(
                    "task {task_id:?} is already {}, so it cannot be cancelled; only a pending or processing task can",
                    task.state
                ),
            ))
        }
        CancelOutcome::NotFound => {
            return Err(runtime.err().unwrap_or_else(|| task_not_found(&task_id, &model)))
        }
    };
    // A just-submitted task's cached `pending` view is no longer true (the failed one is put
    // in below).
    state.views.forget(&task.id);
    state.metrics.finished(
        &task.model,
        task.fail_code.as_deref(),
        task.create_time,
        task.complete_time.unwrap_or_else(now_ms),
    );
    // Waits and streams of the task, here (other nodes hear of it through the store).
    state.dispatcher.events().changed(&task.id);
    tracing::info!(taskId = %task.id, model = %task.model, %from, "cancelled");
    if from == taskgate_proto::TaskState::Processing {
        // A pull worker is told at its next heartbeat (the token it holds is dead); another
        // node's attempt is stopped by the store's notice to it.
        if runner != Some(Runner::Worker) {
            state.dispatcher.cancel_running(&task.id);
        }
        // A slot of the model is free: a worker's long-poll may claim now.
        state.dispatcher.notify(&task.model);
    }
    if task.callback_url.is_some() {
        state.deliverer.wake();
    }
    Ok(json_bytes(render_status(&state, task).await?))
}

/// The statusTask answer of a task just submitted, as a store read would render it but for
/// `queuePosition`: served only for its first [`PENDING_VIEW_FRESH_MS`] (`api/live.rs` says
/// why), after which polls read the store.
pub(super) fn pending_view(task: &NewTask) -> Option<CachedView> {
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
        trace_parent: None,
        route: None,
    }
    .status(|_| String::new());
    let body = serde_json::to_vec(&Envelope::success(view)).ok()?;
    Some(CachedView {
        gone_after: Some(task.create_time.saturating_add(PENDING_VIEW_FRESH_MS)),
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
    fn deep_or_huge_json_is_refused_before_it_is_parsed() {
        let deep = format!(
            "{{\"input\": {{\"a\": {}1{}}}}}",
            "[".repeat(70),
            "]".repeat(70)
        );
        assert!(
            err(&deep).contains("deeper than 64 levels"),
            "{}",
            err(&deep)
        );
        let wide = format!(
            "{{\"input\": {{\"a\": [{}0]}}}}",
            "0,".repeat(MAX_JSON_ELEMENTS)
        );
        assert!(err(&wide).contains("more than 250000 JSON values"));
        // Brackets and commas inside strings are text, not structure.
        let quoted = format!(
            "{{\"input\": {{\"prompt\": \"{}\\\"{}\"}}}}",
            "[".repeat(100),
            ",".repeat(MAX_JSON_ELEMENTS + 1)
        );
        assert!(parse_submission(quoted.as_bytes(), false).is_ok());
        let nested_ok = format!(
            "{{\"input\": {{\"a\": {}1{}}}}}",
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(parse_submission(nested_ok.as_bytes(), false).is_ok());
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
    fn webhook_events_are_checked_and_kept_as_a_mask() {
        let with = |events: &str| {
            format!(
                r#"{{"callback_url": "https://example.com/h", "webhook_events": {events}, "input": {{}}}}"#
            )
        };
        let mask = |events: &str| {
            parse_submission(with(events).as_bytes(), false)
                .ok()
                .map(|s| s.webhook_events)
        };
        assert_eq!(mask("null"), Some(EventMask::DEFAULT));
        assert_eq!(
            mask(r#"["progress", "start"]"#),
            Some(EventMask::of([WebhookEvent::Start, WebhookEvent::Progress]))
        );
        let s = parse_submission(
            br#"{"callback_url": "https://example.com/h", "input": {}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            s.webhook_events,
            EventMask::DEFAULT,
            "left out: the final state only"
        );
        assert!(err(&with(r#""start""#)).contains("must be an array of event names"));
        assert!(err(&with("[]")).contains("omit it for the default"));
        assert!(err(&with(r#"["start", 1]"#)).contains("webhook_events[1] must be an event name"));
        assert!(err(&with(r#"["done"]"#))
            .contains(r#"webhook_events[0] is "done", which is not an event"#));
        assert!(err(&with(r#"["start", "start"]"#)).contains(r#"names "start" more than once"#));
        assert!(
            err(r#"{"webhook_events": ["start"], "input": {}}"#).contains("needs a callback_url")
        );
        assert!(err(r#"{"request_type": "async", "callback_url": "https://example.com/h", "webhook_events": ["start"], "input": {}}"#)
            .contains("needs a callback_url"));
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
