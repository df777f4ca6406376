//! `GET /api/v1/streamTask/{model}?taskId=`: a task's status as Server-Sent Events, beyond
//! APIXO. Each event's `data` is the statusTask `data` object; one is sent whenever the task's
//! state or progress changes, and the stream ends after the final state.
//!
//! Events are snapshots, so resuming is exact without a per-task event log: an event's `id` is a
//! digest of its `data`, and a client that reconnects with `Last-Event-ID` is sent the task's
//! current status unless it is the one the client already has. A client never ends up behind
//! the task; what it can miss are snapshots a later one has already replaced (a progress of
//! 0.4 superseded by 0.6), which carry nothing the later one lacks. The stream sleeps on the
//! node's task events (nudged on every node through PostgreSQL's `NOTIFY`), reading the task
//! once per nudge, and a comment every 15 s keeps proxies from closing an idle stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::extract::ClientKey;
use super::tasks::{model_or_404, required_task_id, task_not_found};
use crate::domain::Task;
use crate::error::ApiError;
use crate::events::TaskWatch;
use crate::report::error_chain;
use crate::state::AppState;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/streamTask/{model}", get(stream_task))
}

const HEARTBEAT: Duration = Duration::from_secs(15);

async fn stream_task(
    State(state): State<Arc<AppState>>,
    ClientKey { tenant, key }: ClientKey,
    Path(model): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
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
    let last_sent = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let cursor = Cursor {
        state,
        key,
        watch,
        next: Some(task),
        last_sent,
        done: false,
    };
    Ok(
        Sse::new(futures::stream::unfold(cursor, Cursor::next_event))
            .keep_alive(KeepAlive::new().interval(HEARTBEAT)),
    )
}

/// Where a stream is: the task read but not yet sent, and the id of the last event the client
/// has.
struct Cursor {
    state: Arc<AppState>,
    /// Checked again at every wake-up and every [`HEARTBEAT`]: a key revoked while its stream is
    /// open ends the stream, within about the time a revocation takes to reach every node.
    key: String,
    watch: TaskWatch,
    next: Option<Task>,
    last_sent: Option<String>,
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
                    let changed = tokio::select! {
                        _ = self.watch.changed() => true,
                        _ = tokio::time::sleep(HEARTBEAT) => false,
                        // The server is stopping: end the stream so the drain is not held up;
                        // the client resumes on another node (or this one, restarted).
                        _ = self.state.dispatcher.stopped() => return None,
                    };
                    if self.state.auth.client_tenant(&self.key).await.is_err() {
                        return None;
                    }
                    if !changed {
                        continue;
                    }
                    match self.state.store.get_task(self.watch.task_id()).await {
                        Ok(Some(t)) => t,
                        // Deleted (retention): nothing more will happen to it.
                        Ok(None) => return None,
                        Err(e) => {
                            // The client reconnects with Last-Event-ID and misses nothing.
                            warn!(error = %error_chain(&e), "cannot read a streamed task; ending the stream");
                            return None;
                        }
                    }
                }
            };
            let status = match self.state.links.status_of(&task).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %error_chain(&e), task_id = %task.id, "cannot render a streamed task; ending the stream");
                    return None;
                }
            };
            let data = match serde_json::to_string(&status) {
                Ok(d) => d,
                Err(_) => return None,
            };
            self.done = task.state.is_final();
            let id = event_id(&data);
            if self.last_sent.as_deref() == Some(id.as_str()) {
                // The client has this one already (a resume, or a nudge that changed nothing).
                continue;
            }
            self.last_sent = Some(id.clone());
            return Some((Ok(Event::default().id(id).data(data)), self));
        }
    }
}

/// A snapshot's id: the same status renders to the same id on every node.
fn event_id(data: &str) -> String {
    hex::encode(&Sha256::digest(data.as_bytes())[..12])
}
