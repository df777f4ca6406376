//! The pull-worker API: remote workers claim tasks of `worker`-backed models, renew their lease
//! with heartbeats (reporting progress and log lines, kept with the task as a local attempt's
//! are), upload outputs, then complete or fail.
//!
//! Every call after the claim carries the claim's lease token; a worker whose task was handed to
//! another worker (its lease expired) or cancelled gets 409 `lease_lost` and must stop. (A cancel
//! keeps that code, with a message that says so: every worker already stops on it.) Workers authenticate with worker
//! tokens, which cannot use the client API (and client keys cannot use this one).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::Uri;
use axum::routing::{post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use taskgate_proto::{
    Envelope, WorkerClaimRequest, WorkerComplete, WorkerFail, WorkerHeartbeat, WorkerTask,
};
use tokio::io::AsyncWriteExt;
use tracing::{info, info_span, warn, Instrument};

use super::extract::{PathParams, WorkerToken};
use crate::artifacts::{sanitize_name, staged_key};
use crate::backends::BackendError;
use crate::dispatch::{ModelRuntime, Settled};
use crate::domain::{attempt_tag, clean_text, fail_code, now_ms, Task, MAX_LOG_LINE};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Claim;
use taskgate_proto::ErrorCode;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/worker/claim", post(claim))
        .route("/api/v1/worker/tasks/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/worker/tasks/{id}/outputs/{name}", put(upload))
        .route("/api/v1/worker/tasks/{id}/complete", post(complete))
        .route("/api/v1/worker/tasks/{id}/fail", post(fail))
}

/// The answer to a report: success, nothing to return.
fn done() -> Json<Envelope<()>> {
    Json(Envelope {
        code: 200,
        message: "success".into(),
        data: None,
    })
}

/// Longest a claim may wait for work.
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);

fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        ApiError::unread_body(&r, || {
            let code = if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::PayloadTooLarge
            } else {
                ErrorCode::InvalidInput
            };
            ApiError::new(code, format!("cannot read the request body: {r}"))
        })
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("the request body is not valid: {e}"),
        )
    })
}

fn lease_lost(task_id: &str) -> ApiError {
    ApiError::new(ErrorCode::LeaseLost, format!(
        "task {task_id:?} is no longer yours (its lease expired and it was handed on, or it is already final); stop working on it"
    ))
}

/// Why a claim no longer holds, read from the task after a refused renewal: a cancelled task says
/// so (the refusal is the worker's only notice of it). Only refusals pay for the read.
async fn lost(state: &AppState, task_id: &str) -> ApiError {
    match state.store.get_task(task_id).await {
        Ok(Some(t))
            if t.state == taskgate_proto::TaskState::Failed
                && t.fail_code.as_deref() == Some(fail_code::CANCELLED) =>
        {
            ApiError::new(
                ErrorCode::LeaseLost,
                format!("task {task_id:?} was cancelled; stop working on it and drop its outputs"),
            )
        }
        _ => lease_lost(task_id),
    }
}

/// The task, if `token` still holds its claim; the check renews the lease (recording
/// `progress` when given).
async fn claimed(
    state: &AppState,
    task_id: &str,
    token: &str,
    progress: Option<f64>,
) -> Result<(Claim, Arc<ModelRuntime>), ApiError> {
    let task = state.store.get_task(task_id).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::TaskNotFound,
            format!("task {task_id:?} not found"),
        )
    })?;
    let model = state
        .dispatcher
        .model(&task.model)
        .filter(|m| !m.backend.runs_locally())
        .cloned()
        .ok_or_else(|| lease_lost(task_id))?;
    renew(state, task_id, token, progress).await?;
    Ok((
        Claim {
            task,
            token: token.to_owned(),
        },
        model,
    ))
}

/// Renews the claim's lease (recording `progress` when given). Renewing is the check: it
/// succeeds only for the current holder of a processing task. It also acknowledges the claim:
/// the worker has it, so from now on the attempt counts.
async fn renew(
    state: &AppState,
    task_id: &str,
    token: &str,
    progress: Option<f64>,
) -> Result<(), ApiError> {
    if state
        .store
        .renew_lease(task_id, token, now_ms(), state.dispatcher.lease(), progress)
        .await?
    {
        if progress.is_some() {
            state.dispatcher.events().changed(task_id);
        }
        Ok(())
    } else {
        Err(lost(state, task_id).await)
    }
}

/// When a lease renewed just now ends, less a margin for the answer to reach the worker.
fn lease_deadline(state: &AppState) -> tokio::time::Instant {
    tokio::time::Instant::now() + state.dispatcher.lease().mul_f64(0.8)
}

/// The claim answer, or why the task's stored input cannot be sent (the database was edited by
/// hand).
fn worker_task(
    task: &Task,
    token: String,
    model: &ModelRuntime,
    lease: Duration,
) -> Result<WorkerTask, String> {
    Ok(WorkerTask {
        task_id: task.id.clone(),
        model: task.model.clone(),
        input: task.parse_input()?,
        attempt: task.attempts,
        lease_token: token,
        lease_ms: lease.as_millis() as u64,
        timeout_ms: model.config.timeout.as_millis() as u64,
    })
}

/// Long-poll for a task of one of the given worker-backed models.
#[utoipa::path(
    post,
    path = "/api/v1/worker/claim",
    tag = "workers",
    operation_id = "claimWork",
    request_body = WorkerClaimRequest,
    responses((status = 200, description = "A task (`data`), or `message` `no task` and `data` null when none came within `waitMs`.", body = Envelope<Option<WorkerTask>>)),
    security(("workerToken" = [])),
)]
async fn claim(
    State(state): State<Arc<AppState>>,
    WorkerToken(worker): WorkerToken,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Envelope<WorkerTask>>, ApiError> {
    let req: WorkerClaimRequest = parse_json(body)?;
    if req.models.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            "models must name at least one model",
        ));
    }
    let mut models = Vec::with_capacity(req.models.len());
    for name in &req.models {
        let m = state.dispatcher.model(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("model {name:?} not found"),
            )
        })?;
        if m.backend.runs_locally() {
            return Err(ApiError::new(ErrorCode::ModelNotForWorkers, format!(
                "model {name:?} is not served by pull workers; set backend = \"worker\" in its [models.{name}] table"
            )));
        }
        models.push(m.clone());
    }
    // For the operator view; throttled, in the background.
    super::operator::worker_seen(&state, &worker.name, req.models.clone());
    let wait = Duration::from_millis(req.wait_ms).min(MAX_CLAIM_WAIT);
    match state.dispatcher.claim_for_worker(&models, wait).await? {
        Some((model, c)) => {
            info!(taskId = %c.task.id, model = %model.name, attempt = c.task.attempts, worker = %worker.name, "claimed by a pull worker");
            match worker_task(&c.task, c.token.clone(), &model, state.dispatcher.lease()) {
                Ok(task) => Ok(Json(Envelope::success(task))),
                Err(message) => {
                    // No worker could run it: fail the task now rather than hand it out again
                    // on every claim until its attempts run out.
                    let err = BackendError::fatal(fail_code::INTERNAL_ERROR, message);
                    state
                        .dispatcher
                        .settle(
                            &model.name,
                            &c,
                            Err(err),
                            Duration::ZERO,
                            lease_deadline(&state),
                        )
                        .instrument(info_span!("attempt", taskId = %c.task.id, model = %model.name, attempt = c.task.attempts))
                        .await;
                    Ok(Json(Envelope {
                        code: 200,
                        message: "no task".into(),
                        data: None,
                    }))
                }
            }
        }
        None => Ok(Json(Envelope {
            code: 200,
            message: "no task".into(),
            data: None,
        })),
    }
}

/// Renew the lease, report progress and log lines.
#[utoipa::path(
    post,
    path = "/api/v1/worker/tasks/{id}/heartbeat",
    tag = "workers",
    operation_id = "heartbeat",
    params(("id" = String, Path, description = "The claimed task's id.")),
    request_body = WorkerHeartbeat,
    responses((status = 200, description = "Renewed; `data` is null.", body = Envelope<super::openapi::Nothing>)),
    security(("workerToken" = [])),
)]
async fn heartbeat(
    State(state): State<Arc<AppState>>,
    WorkerToken(worker): WorkerToken,
    PathParams(task_id): PathParams<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Envelope<()>>, ApiError> {
    let hb: WorkerHeartbeat = parse_json(body)?;
    if let Some(p) = hb.progress {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("progress must be from 0 to 1, got {p}"),
            ));
        }
    }
    let (claim, model) = claimed(&state, &task_id, &hb.lease_token, hb.progress).await?;
    super::operator::worker_seen(&state, &worker.name, Vec::new());
    let span = info_span!("attempt", taskId = %task_id, model = %model.name, attempt = claim.task.attempts, worker = %worker.name);
    for line in hb.logs.iter().take(MAX_HEARTBEAT_LINES) {
        span.in_scope(|| info!(target: "taskgate::worker_log", "{line}"));
    }
    store_worker_logs(&state, &task_id, &hb.lease_token, &hb.logs).await?;
    // A worker that heartbeats forever must still respect the model's timeout.
    // Measured on the clock the start time was stamped with (the database's, on PostgreSQL), so
    // a node whose clock runs ahead does not time out live work.
    let now = state.store.clock_ms().await?;
    let started = claim.task.start_time.unwrap_or(now);
    if now - started > model.config.timeout.as_millis() as i64 {
        let err = BackendError::fatal(
            fail_code::PROCESSING_TIMEOUT,
            format!(
                "the task ran longer than model {}'s timeout of {}",
                model.name,
                humantime::format_duration(model.config.timeout)
            ),
        );
        state
            .dispatcher
            .settle(
                &model.name,
                &claim,
                Err(err),
                Duration::ZERO,
                lease_deadline(&state),
            )
            .instrument(span)
            .await;
        return Err(lease_lost(&task_id));
    }
    Ok(done())
}

/// Most log lines of one heartbeat that are used.
const MAX_HEARTBEAT_LINES: usize = 1000;

/// Keeps a heartbeat's log lines with the task (cleaned and cut like a command's stdout lines),
/// in one write, and nudges the requests waiting on it. A heartbeat without lines writes
/// nothing.
async fn store_worker_logs(
    state: &AppState,
    task_id: &str,
    token: &str,
    logs: &[String],
) -> Result<(), ApiError> {
    let lines: Vec<String> = logs
        .iter()
        .take(MAX_HEARTBEAT_LINES)
        .map(|l| clean_text(l.trim_end(), MAX_LOG_LINE))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    // The claim was renewed just now, so the task is processing; a cancel in between leaves
    // the lines unwritten, which is what it should.
    if state
        .store
        .append_logs(task_id, token, &lines, now_ms())
        .await?
    {
        state.dispatcher.events().changed(task_id);
    }
    Ok(())
}

/// Streams one output into this node's scratch space, then stages it under the attempt's tag.
///
/// The lease is renewed as the bytes arrive (at most every third of it), so an output that takes
/// longer than the lease to upload still completes; the temporary file is the upload's own (two
/// uploads of one attempt never touch each other's) and is removed on every path out, including
/// a dropped connection. The staged output becomes the task's only through `complete`.
#[utoipa::path(
    put,
    path = "/api/v1/worker/tasks/{id}/outputs/{name}",
    tag = "workers",
    operation_id = "uploadOutput",
    params(
        ("id" = String, Path, description = "The claimed task's id."),
        ("name" = String, Path, description = "The output's file name (cleaned of path parts)."),
        ("leaseToken" = String, Query, description = "The claim's lease token."),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The output's bytes, up to the server's upload limit."),
    responses((status = 200, description = "Stored for this attempt; `data` is null.", body = Envelope<super::openapi::Nothing>)),
    security(("workerToken" = [])),
)]
async fn upload(
    State(state): State<Arc<AppState>>,
    _worker: WorkerToken,
    PathParams((task_id, name)): PathParams<(String, String)>,
    uri: Uri,
    body: Body,
) -> Result<Json<Envelope<()>>, ApiError> {
    let token = super::query_param(&uri, "leaseToken").ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidInput,
            "the leaseToken query parameter is required",
        )
    })?;
    let (claim, _) = claimed(&state, &task_id, &token, None).await?;
    let name = sanitize_name(&name);
    let temp = TempUpload::new(
        state
            .dispatcher
            .work_dir()
            .join(format!("upload-{}", crate::domain::new_id("up"))),
    );
    let mut file = tokio::fs::File::create(temp.path())
        .await
        .map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    let renew_every = state.dispatcher.lease() / 3;
    let mut renewed = tokio::time::Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::unread_body(&e, || {
                ApiError::new(ErrorCode::InvalidInput, format!("upload interrupted: {e}"))
            })
        })?;
        written += chunk.len() as u64;
        if written > state.max_upload_bytes {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "outputs are limited to {} bytes each",
                    state.max_upload_bytes
                ),
            ));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
        if renewed.elapsed() >= renew_every {
            renew(&state, &task_id, &token, None).await?;
            renewed = tokio::time::Instant::now();
        }
    }
    file.flush().await.map_err(ApiError::internal)?;
    drop(file);
    let key = staged_key(&task_id, &attempt_tag(&token), &name);
    state
        .dispatcher
        .artifacts()
        .put_file(&key, temp.path())
        .await
        .map_err(ApiError::internal)?;
    // Still ours after the upload? A stale attempt's staged file is taken back at once.
    if let Err(e) = renew(&state, &claim.task.id, &token, None).await {
        if let Err(d) = state.dispatcher.artifacts().delete(&key).await {
            warn!(%key, error = %crate::report::error_chain(&d), "cannot delete a stale attempt's output");
        }
        return Err(e);
    }
    Ok(done())
}

/// A temporary file removed when dropped, whichever way the handler ends.
struct TempUpload(std::path::PathBuf);

impl TempUpload {
    fn new(path: std::path::PathBuf) -> Self {
        TempUpload(path)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempUpload {
    fn drop(&mut self) {
        // After a successful put the file was moved away and this finds nothing.
        let path = std::mem::take(&mut self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || std::fs::remove_file(path));
            }
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Finish the task with the outputs uploaded in this attempt.
#[utoipa::path(
    post,
    path = "/api/v1/worker/tasks/{id}/complete",
    tag = "workers",
    operation_id = "completeTask",
    params(("id" = String, Path, description = "The claimed task's id.")),
    request_body = WorkerComplete,
    responses((status = 200, description = "Recorded; `data` is null.", body = Envelope<super::openapi::Nothing>)),
    security(("workerToken" = [])),
)]
async fn complete(
    State(state): State<Arc<AppState>>,
    WorkerToken(worker): WorkerToken,
    PathParams(task_id): PathParams<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Envelope<()>>, ApiError> {
    let req: WorkerComplete = parse_json(body)?;
    let (claim, model) = claimed(&state, &task_id, &req.lease_token, None).await?;
    let result = if req.outputs.is_empty() {
        Err(BackendError::no_output())
    } else {
        let tag = attempt_tag(&req.lease_token);
        let mut keys = Vec::with_capacity(req.outputs.len());
        for n in &req.outputs {
            let key = staged_key(&task_id, &tag, &sanitize_name(n));
            let present = state
                .dispatcher
                .artifacts()
                .exists(&key)
                .await
                .map_err(ApiError::internal)?;
            if !present {
                return Err(ApiError::new(ErrorCode::OutputNotUploaded, format!(
                    "output {n:?} was never uploaded by this attempt; upload it with PUT /api/v1/worker/tasks/{task_id}/outputs/NAME before completing"
                )));
            }
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(keys)
    };
    settle(&state, &model, &claim, result, &worker.name).await
}

/// Fail the attempt: retried while attempts remain when `retryable`, else final.
#[utoipa::path(
    post,
    path = "/api/v1/worker/tasks/{id}/fail",
    tag = "workers",
    operation_id = "failTask",
    params(("id" = String, Path, description = "The claimed task's id.")),
    request_body = WorkerFail,
    responses((status = 200, description = "Recorded; `data` is null.", body = Envelope<super::openapi::Nothing>)),
    security(("workerToken" = [])),
)]
async fn fail(
    State(state): State<Arc<AppState>>,
    WorkerToken(worker): WorkerToken,
    PathParams(task_id): PathParams<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Envelope<()>>, ApiError> {
    let req: WorkerFail = parse_json(body)?;
    let (claim, model) = claimed(&state, &task_id, &req.lease_token, None).await?;
    let code = req
        .fail_code
        .unwrap_or_else(|| fail_code::GENERATION_FAILED.to_owned());
    let err = if req.retryable {
        BackendError::Retryable {
            code,
            message: req.fail_msg,
        }
    } else {
        BackendError::Fatal {
            code,
            message: req.fail_msg,
        }
    };
    settle(&state, &model, &claim, Err(err), &worker.name).await
}

async fn settle(
    state: &AppState,
    model: &ModelRuntime,
    claim: &Claim,
    result: Result<Vec<String>, BackendError>,
    worker: &str,
) -> Result<Json<Envelope<()>>, ApiError> {
    let elapsed = claim
        .task
        .start_time
        .map(|t| Duration::from_millis(now_ms().saturating_sub(t).max(0) as u64))
        .unwrap_or_default();
    match state
        .dispatcher
        .settle_as(
            &model.name,
            claim,
            result.map(|keys| (keys, Vec::new())),
            elapsed,
            lease_deadline(state),
            Some(format!("worker:{worker}")),
            None,
        )
        .instrument(info_span!("attempt", taskId = %claim.task.id, model = %model.name, attempt = claim.task.attempts))
        .await
    {
        Settled::Written => Ok(done()),
        Settled::NotOurs => {
            warn!(taskId = %claim.task.id, model = %model.name, "a worker reported on a task it no longer held");
            Err(lost(state, &claim.task.id).await)
        }
        // The worker must not believe it is done: it retries while it holds the lease.
        Settled::NotWritten(_) => Err(ApiError::new(
            ErrorCode::OutcomeNotRecorded,
            "the outcome could not be recorded; nothing was changed, report it again while the lease holds",
        )),
    }
}
