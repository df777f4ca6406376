//! `GET /api/v1/streamTask/{model}?taskId=`: a task's status as Server-Sent Events, beyond
//! APIXO. Each event's `data` is the statusTask `data` object (with `queuePosition` while
//! pending) plus `logs`, the log lines new since the last event; one is sent whenever the
//! task's state or progress changes or it logs, and the stream ends after the final state.
//!
//! Status events are snapshots, so resuming is exact without a per-task event log: an event's
//! `id` is `{digest}.{seq}`, a digest of its status (without the logs) and the seq of the last
//! log line the client has. A client that reconnects with `Last-Event-ID` is sent the task's
//! current status unless it is the one the client already has, and every log line after that
//! seq (pages of [`LOG_PAGE`] lines, one event each, without waiting) that the log still keeps.
//! A client never ends up behind the task; what it can miss are status snapshots a later one
//! has already replaced (a progress of 0.4 superseded by 0.6), which carry nothing the later one
//! lacks. The stream sleeps on the node's task events (nudged on every node through
//! PostgreSQL's `NOTIFY`), reading the task once per nudge; while the task is pending it also
//! looks again every [`QUEUE_RECHECK`], since its queue position moves with other tasks'
//! claims, which nudge only those. A comment every 15 s keeps proxies from closing an idle
//! stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::extract::{ClientKey, PathParams};
use super::live::LOG_PAGE;
use super::tasks::{model_or_404, required_task_id, task_not_found};
use crate::domain::Task;
use crate::error::ApiError;
use crate::events::TaskWatch;
use crate::report::error_chain;
use crate::state::AppState;
use crate::store::StoreError;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/streamTask/{model}", get(stream_task))
}

pub(super) const HEARTBEAT: Duration = Duration::from_secs(15);
/// How often a pending task's stream looks at its queue position again.
const QUEUE_RECHECK: Duration = Duration::from_secs(5);

/// Follow a task as Server-Sent Events (taskgate extension).
///
/// Each event's `data` is the task's status (statusTask's `data`, schema `TaskStatus`) with
/// `logs` holding the lines new since the last event; its `id` resumes the stream through
/// `Last-Event-ID`. The stream ends after the final state.
#[utoipa::path(
    get,
    path = "/api/v1/streamTask/{model}",
    tag = "tasks",
    operation_id = "streamTask",
    params(
        ("model" = String, Path, description = "The model's name, as `GET /api/v1/models` lists it.", example = "echo"),
        ("taskId" = String, Query, description = "The id generateTask answered.", example = "task_01jd5v9k2r8m3q4w5e6r7t8y9u"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received: the stream resumes after it."),
    ),
    responses((status = 200, description = "`text/event-stream`: one event per change of the task, each `data` a `TaskStatus` in JSON.", content_type = "text/event-stream", body = String)),
    security(("apiKey" = [])),
)]
async fn stream_task(
    State(state): State<Arc<AppState>>,
    ClientKey {
        tenant,
        key,
        record,
    }: ClientKey,
    PathParams(model): PathParams<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    super::extract::Caller(record).may_use(&model)?;
    let runtime = model_or_404(&state, &model);
    let task_id = required_task_id(&state, &uri, "streamTask", &model)?;
    // Before the first read, so that no change falls between it and the stream's first wait.
    let watch = state.dispatcher.events().subscribe(&task_id);
    let task = state
        .store
        .get_task(&task_id)
        .await?
        .filter(|t| t.tenant_id == tenant.id && t.model == model);
    let Some(task) = task else {
        return Err(runtime
            .err()
            .unwrap_or_else(|| task_not_found(&task_id, &model)));
    };
    let (last_sent, log_seq) = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(id) => parse_event_id(id),
        None => (None, None),
    };
    let cursor = Cursor {
        state,
        key,
        watch,
        next: Some(task),
        last_sent,
        log_seq,
        more_logs: false,
        pending: false,
        done: false,
    };
    Ok(
        Sse::new(futures::stream::unfold(cursor, Cursor::next_event))
            .keep_alive(KeepAlive::new().interval(HEARTBEAT)),
    )
}

/// Where a stream is: the task read but not yet sent, and what the client has: the digest of
/// the last status and the seq of the last log line.
struct Cursor {
    state: Arc<AppState>,
    /// Checked again at every wake-up and every [`HEARTBEAT`]: a key revoked while its stream is
    /// open ends the stream, within about the time a revocation takes to reach every node.
    key: String,
    watch: TaskWatch,
    next: Option<Task>,
    last_sent: Option<String>,
    /// `None` until the first event, which sends the newest lines rather than all of them.
    log_seq: Option<u64>,
    /// The last page of lines was full: read on at once rather than wait for a nudge.
    more_logs: bool,
    /// The task was pending at the last read: look again now and then for its position.
    pending: bool,
    done: bool,
}

impl Cursor {
    async fn next_event(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let task = match self.next.take() {
                Some(t) => t,
                None => {
                    if !self.more_logs {
                        let look = tokio::select! {
                            _ = self.watch.changed() => true,
                            _ = tokio::time::sleep(QUEUE_RECHECK), if self.pending => true,
                            _ = tokio::time::sleep(HEARTBEAT) => false,
                            // The server is stopping: end the stream so the drain is not held
                            // up; the client resumes on another node (or this one, restarted).
                            _ = self.state.dispatcher.stopped() => return None,
                        };
                        if self.state.auth.client_tenant(&self.key).await.is_err() {
                            return None;
                        }
                        if !look {
                            continue;
                        }
                    }
                    match self.state.store.get_task(self.watch.task_id()).await {
                        Ok(Some(t)) => t,
                        // Deleted (retention): nothing more will happen to it.
                        Ok(None) => return None,
                        Err(e) => {
                            // The client reconnects with Last-Event-ID and misses nothing.
                            warn!(error = %error_chain(&e), taskId = %self.watch.task_id(), "cannot read a streamed task; ending the stream");
                            return None;
                        }
                    }
                }
            };
            let mut status = match self.state.links.status_of(&task).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %error_chain(&e), taskId = %task.id, model = %task.model, "cannot render a streamed task; ending the stream");
                    return None;
                }
            };
            let logs = match self.live_fields(&task).await {
                Ok((position, logs)) => {
                    status.queue_position = position;
                    logs
                }
                Err(e) => {
                    // The client reconnects with Last-Event-ID and misses nothing.
                    warn!(error = %error_chain(&e), taskId = %task.id, model = %task.model, "cannot read a streamed task's position or logs; ending the stream");
                    return None;
                }
            };
            let digest = match serde_json::to_string(&status) {
                Ok(d) => event_digest(&d),
                Err(_) => return None,
            };
            // After a first page of newest lines, older ones are not sent: only pages read on
            // from a known line continue without waiting.
            self.more_logs = self.log_seq.is_some() && logs.len() == LOG_PAGE;
            let seq = logs.last().map(|l| l.seq).or(self.log_seq).unwrap_or(0);
            self.log_seq = Some(seq);
            self.pending = task.state == taskgate_proto::TaskState::Pending;
            self.done = task.state.is_final() && !self.more_logs;
            if self.last_sent.as_deref() == Some(digest.as_str()) && logs.is_empty() {
                // The client has this one already (a resume, or a nudge that changed nothing).
                continue;
            }
            self.last_sent = Some(digest.clone());
            if !logs.is_empty() {
                status.logs = Some(logs);
            }
            let data = match serde_json::to_string(&status) {
                Ok(d) => d,
                Err(_) => return None,
            };
            let id = format!("{digest}.{seq}");
            return Some((Ok(Event::default().id(id).data(data)), self));
        }
    }
}

impl Cursor {
    /// The live fields of an event: the queue position of a pending task, and the log lines the
    /// client does not have yet (the newest ones for a client that has none).
    async fn live_fields(
        &self,
        task: &Task,
    ) -> Result<(Option<u64>, Vec<taskgate_proto::TaskLogLine>), StoreError> {
        let position = if task.state == taskgate_proto::TaskState::Pending {
            self.state
                .store
                .queue_position(&task.id, crate::domain::now_ms())
                .await?
        } else {
            None
        };
        let logs = self
            .state
            .store
            .log_tail(&task.id, self.log_seq, LOG_PAGE)
            .await?;
        Ok((position, logs))
    }
}

/// A status snapshot's digest: the same status renders to the same digest on every node.
fn event_digest(data: &str) -> String {
    hex::encode(&Sha256::digest(data.as_bytes())[..12])
}

/// The digest and the log seq of a `Last-Event-ID` (`{digest}.{seq}`); an id without a seq (or
/// with one that does not parse) is taken as a digest alone, and the stream then sends the
/// newest lines, as to a new client.
fn parse_event_id(id: &str) -> (Option<String>, Option<u64>) {
    match id.rsplit_once('.') {
        Some((digest, seq)) => match seq.parse::<u64>() {
            Ok(seq) => (Some(digest.to_owned()), Some(seq)),
            Err(_) => (Some(id.to_owned()), None),
        },
        None => (Some(id.to_owned()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_carries_the_status_digest_and_the_last_log_seq() {
        assert_eq!(
            parse_event_id("5f2c0e.42"),
            (Some("5f2c0e".into()), Some(42))
        );
        assert_eq!(parse_event_id("5f2c0e"), (Some("5f2c0e".into()), None));
        assert_eq!(parse_event_id("5f2c0e.x"), (Some("5f2c0e.x".into()), None));
    }
}
