//! taskgate's operator endpoints (not APIXO's; the dashboard reads them), each scoped to the
//! caller's tenant by its key:
//!
//! - `GET /api/v1/taskCounts?since=` — the caller's tasks created at or after `since` (Unix ms;
//!   default 24 h ago; at most [`MAX_WINDOW_MS`] back), per model and state. One walk of the
//!   `(tenant_id, id)` index from the id of `since`, shared by every request for the same
//!   tenant and window within a second (`crate::dashboard`).
//! - `GET /api/v1/streamTaskCounts?since=` — the same counts as Server-Sent Events (`event:
//!   counts`): one at once, then one whenever they change, at most one a second. The stream
//!   sleeps on the node's tenant-blind "some task changed" signal (`events`, fed by every task
//!   nudge, submits, and other nodes' `NOTIFY`s), reads its tenant's counts again when woken
//!   and sends them only if they moved; it also looks every [`REFRESH`] (other nodes' submits
//!   send no notification, and a default window slides). The heartbeat comment and the key
//!   check are `streamTask`'s.
//! - `GET /api/v1/operator` — the caller's webhook backlog and the pull workers the cluster
//!   has seen in the last 24 h. Workers serve every tenant, so every tenant sees the same list
//!   (names, models, last seen, node: no task data).
//!
//! Also here: recording a pull worker as seen (its claims and heartbeats call
//! [`worker_seen`]), and the attempts of a task for `statusTask …&attempts=true`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::Uri;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use taskgate_proto::{
    AttemptInfo, Envelope, ErrorCode, OperatorView, TaskCounts, TaskState, WorkerSeen,
};
use tokio::time::Instant;
use tracing::warn;

use super::extract::{ClientKey, ClientTenant};
use super::stream::HEARTBEAT;
use crate::dashboard::COUNTS_TTL;
use crate::domain::{now_ms, Task};
use crate::error::ApiError;
use crate::events::AnyWatch;
use crate::report::error_chain;
use crate::state::AppState;
use crate::store::dashboard::{MAX_WORKERS, WORKERS_WINDOW_MS};

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/taskCounts", get(task_counts))
        .route("/api/v1/streamTaskCounts", get(stream_task_counts))
        .route("/api/v1/operator", get(operator))
}

/// The default window: the last 24 h.
const DEFAULT_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// The longest window counted: `since` at most 31 days back, so one count stays a bounded walk.
pub(super) const MAX_WINDOW_MS: i64 = 31 * 24 * 3600 * 1000;
/// Fewest milliseconds between two count events of one stream.
const THROTTLE: Duration = Duration::from_secs(1);
/// How long before a stream woke a shared count read may have started and still be taken.
const SHARE_READ: Duration = Duration::from_millis(100);
/// How often a count stream looks again without a nudge.
const REFRESH: Duration = Duration::from_secs(10);

/// The `since` a request asked for (`None`: the default window, which slides). A repeated
/// `since` is refused before either value is read: which one was meant is ambiguous.
fn parse_since(uri: &Uri, route: &str) -> Result<Option<i64>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let mut given: Option<String> = None;
    for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "since" if given.is_some() => {
                return Err(bad("the since query parameter is given twice".into()))
            }
            "since" => given = Some(value.into_owned()),
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?}; {route} takes since (Unix ms)"
                )))
            }
        }
    }
    let Some(value) = given.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let ms = value.parse::<i64>().map_err(|_| {
        bad(format!(
            "since must be a Unix time in milliseconds (an integer), got {value:?}"
        ))
    })?;
    let now = now_ms();
    if ms < now - MAX_WINDOW_MS {
        return Err(bad(format!(
            "since must be within the last 31 days (at or after {}), got {ms}",
            now - MAX_WINDOW_MS
        )));
    }
    if ms > now + DEFAULT_WINDOW_MS {
        return Err(bad(format!(
            "since is more than a day in the future ({ms}); pass a Unix time in milliseconds"
        )));
    }
    Ok(Some(ms))
}

/// The window's start: the one asked for, or 24 h ago to the second (so that requests within
/// a second share a cached count).
fn window_start(since: Option<i64>) -> i64 {
    since.unwrap_or_else(|| {
        let start = now_ms() - DEFAULT_WINDOW_MS;
        start - start.rem_euclid(1000)
    })
}

/// The caller's tasks created since a time, per model and state (taskgate extension; the
/// dashboard's counts).
#[utoipa::path(
    get,
    path = "/api/v1/taskCounts",
    tag = "operator",
    operation_id = "taskCounts",
    params(
        ("since" = Option<i64>, Query, description = "Unix ms: count the tasks created at or after it, at most 31 days back and at most a day ahead. Left out: 24 h ago."),
    ),
    responses((status = 200, description = "The caller's counts, per model (sorted by name) and in total.", body = Envelope<TaskCounts>)),
    security(("apiKey" = [])),
)]
async fn task_counts(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
    uri: Uri,
) -> Result<Json<Envelope<TaskCounts>>, ApiError> {
    let since = window_start(parse_since(&uri, "/api/v1/taskCounts")?);
    let fresh_after = Instant::now()
        .checked_sub(COUNTS_TTL)
        .unwrap_or_else(Instant::now);
    let counts = state
        .dashboard
        .counts(state.store.as_ref(), &tenant.id, since, fresh_after)
        .await?;
    Ok(Json(Envelope::success(counts.as_ref().clone())))
}

/// The caller's task counts as Server-Sent Events (taskgate extension): one event at once,
/// then one whenever they change, at most one a second. The stream does not end by itself.
#[utoipa::path(
    get,
    path = "/api/v1/streamTaskCounts",
    tag = "operator",
    operation_id = "streamTaskCounts",
    params(
        ("since" = Option<i64>, Query, description = "Unix ms, as taskCounts' `since`. Left out: a window of the last 24 h, which slides."),
    ),
    responses((status = 200, description = "`text/event-stream`: events named `counts`, each `data` a `TaskCounts` in JSON; comments as heartbeats. It ends when the key is revoked or the server stops.", content_type = "text/event-stream", body = String)),
    security(("apiKey" = [])),
)]
async fn stream_task_counts(
    State(state): State<Arc<AppState>>,
    ClientKey {
        tenant,
        key,
        record,
    }: ClientKey,
    uri: Uri,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    super::extract::tenant_wide(&record)?;
    let since = parse_since(&uri, "/api/v1/streamTaskCounts")?;
    // Before the first read, so that no change falls between it and the first wait.
    let any = state.dispatcher.events().subscribe_any();
    let first = read_counts(&state, &tenant.id, since, Instant::now()).await?;
    let read_at = Some(Instant::now());
    let cursor = CountsCursor {
        state,
        key,
        tenant_id: tenant.id,
        since,
        any,
        next: Some(first),
        last: None,
        read_at,
    };
    Ok(
        Sse::new(futures::stream::unfold(cursor, CountsCursor::next_event))
            .keep_alive(KeepAlive::new().interval(HEARTBEAT)),
    )
}

async fn read_counts(
    state: &AppState,
    tenant_id: &str,
    since: Option<i64>,
    fresh_after: Instant,
) -> Result<Arc<TaskCounts>, ApiError> {
    Ok(state
        .dashboard
        .counts(
            state.store.as_ref(),
            tenant_id,
            window_start(since),
            fresh_after,
        )
        .await?)
}

/// Where a count stream is: the counts read but not yet sent, and the last ones sent.
struct CountsCursor {
    state: Arc<AppState>,
    /// Checked again at every wake-up and every [`HEARTBEAT`], as `streamTask`'s.
    key: String,
    tenant_id: String,
    since: Option<i64>,
    any: AnyWatch,
    next: Option<Arc<TaskCounts>>,
    last: Option<Arc<TaskCounts>>,
    /// When the last read finished: reads, not only sends, are throttled, since a nudge about
    /// another tenant's task wakes every stream and changes nothing it would send.
    read_at: Option<Instant>,
}

impl CountsCursor {
    async fn next_event(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            let counts = match self.next.take() {
                Some(c) => c,
                None => {
                    let look = tokio::select! {
                        _ = self.any.changed() => true,
                        _ = tokio::time::sleep(REFRESH) => true,
                        _ = tokio::time::sleep(HEARTBEAT) => false,
                        _ = self.state.dispatcher.stopped() => return None,
                    };
                    if self.state.auth.client_tenant(&self.key).await.is_err() {
                        return None;
                    }
                    if !look {
                        continue;
                    }
                    // At most one event a second: changes meanwhile are read together after.
                    let woke = Instant::now();
                    if let Some(at) = self.read_at {
                        tokio::time::sleep_until(at + THROTTLE).await;
                    }
                    // Every change so far is covered by the read that starts now.
                    self.any.mark_seen();
                    // Streams of one tenant woken by the same nudge share one read: a read
                    // that started up to SHARE_READ before this stream woke is taken (a
                    // change it missed is caught by the next nudge or REFRESH).
                    let fresh_after = woke.checked_sub(SHARE_READ).unwrap_or(woke);
                    let read =
                        read_counts(&self.state, &self.tenant_id, self.since, fresh_after).await;
                    self.read_at = Some(Instant::now());
                    match read {
                        Ok(c) => c,
                        Err(e) => {
                            // The client reconnects and is sent the counts at once.
                            warn!(error = ?e, "cannot read a counts stream's counts; ending the stream");
                            return None;
                        }
                    }
                }
            };
            // Another tenant's change (the signal is tenant-blind) leaves these as they were.
            if self
                .last
                .as_ref()
                .is_some_and(|l| l.models == counts.models && l.total == counts.total)
            {
                continue;
            }
            let data = match serde_json::to_string(counts.as_ref()) {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot serialise counts; ending the stream");
                    return None;
                }
            };
            self.last = Some(counts);
            return Some((Ok(Event::default().event("counts").data(data)), self));
        }
    }
}

/// The caller's webhook backlog and the pull workers seen in the last 24 h (taskgate
/// extension; the dashboard's operator view).
#[utoipa::path(
    get,
    path = "/api/v1/operator",
    tag = "operator",
    operation_id = "operatorView",
    responses((status = 200, description = "The caller's webhook deliveries waiting, by kind, and the pull workers the cluster has seen (every tenant sees the same workers).", body = Envelope<OperatorView>)),
    security(("apiKey" = [])),
)]
async fn operator(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
) -> Result<Json<Envelope<OperatorView>>, ApiError> {
    let webhooks = state.store.webhook_backlog(&tenant.id).await?;
    let workers = state
        .store
        .workers_seen(now_ms() - WORKERS_WINDOW_MS, MAX_WORKERS)
        .await?;
    Ok(Json(Envelope::success(OperatorView { webhooks, workers })))
}

/// Records pull worker `name` as seen by this node, with the models it asks for (empty: keep
/// the recorded ones), at most every 10 s per worker: in the background, so a claim or a
/// heartbeat never waits on it.
pub(super) fn worker_seen(state: &AppState, name: &str, models: Vec<String>) {
    if !state.dashboard.worker_due(name) {
        return;
    }
    let seen = WorkerSeen {
        name: name.to_owned(),
        last_seen_at: now_ms(),
        models,
        node: state.dashboard.node.clone(),
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.record_worker(&seen).await {
            warn!(error = %error_chain(&e), worker = %seen.name, "cannot record a pull worker as seen");
        }
    });
}

/// Every attempt of `task`, oldest first: the earlier ones from its history, then the current
/// or last one from the row (unless the history holds it already: the task went back to
/// pending after it).
pub(super) async fn attempts_of(
    state: &AppState,
    task: &Task,
) -> Result<Vec<AttemptInfo>, ApiError> {
    let record = state
        .store
        .attempt_record(&task.id)
        .await?
        .unwrap_or_default();
    let mut attempts = record.history;
    let recorded = attempts.last().map_or(0, |a| a.attempt);
    if task.attempts > recorded {
        let failed = task.state == TaskState::Failed;
        attempts.push(AttemptInfo {
            attempt: task.attempts,
            started_at: task.start_time,
            ended_at: task
                .state
                .is_final()
                .then_some(task.complete_time)
                .flatten(),
            fail_code: failed.then(|| task.fail_code.clone()).flatten(),
            fail_msg: failed.then(|| task.fail_msg.clone()).flatten(),
            runner: record.runner,
        });
    }
    Ok(attempts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn since(q: &str) -> Result<Option<i64>, String> {
        parse_since(&format!("/x?{q}").parse::<Uri>().unwrap(), "/x").map_err(|e| match e {
            ApiError::Refused { message, .. } => message,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn since_is_an_integer_within_the_last_31_days() {
        assert_eq!(since("").unwrap(), None);
        assert_eq!(since("since=").unwrap(), None);
        let now = now_ms();
        assert_eq!(since(&format!("since={now}")).unwrap(), Some(now));
        assert!(since("since=yesterday").unwrap_err().contains("Unix time"));
        assert!(since("since=0").unwrap_err().contains("31 days"));
        assert!(since(&format!("since={}", now + 2 * DEFAULT_WINDOW_MS))
            .unwrap_err()
            .contains("future"));
        assert!(since("since=1&since=2").unwrap_err().contains("twice"));
        assert!(since(&format!("since=&since={now}"))
            .unwrap_err()
            .contains("twice"));
        assert!(since("from=1")
            .unwrap_err()
            .contains("unknown query parameter"));
    }

    #[test]
    fn the_default_window_starts_24_hours_ago_on_a_second() {
        let start = window_start(None);
        assert_eq!(start % 1000, 0);
        assert!((now_ms() - DEFAULT_WINDOW_MS - start).abs() <= 1000);
        assert_eq!(window_start(Some(5)), 5);
    }

    #[test]
    fn attempts_is_read_only_when_asked_for() {
        let uri = |q: &str| format!("/x?taskId=t{q}").parse::<Uri>().unwrap();
        let wants_attempts = |u: &Uri| super::super::flag_param(u, "attempts");
        assert!(!wants_attempts(&uri("")).unwrap());
        assert!(!wants_attempts(&uri("&attempts=false")).unwrap());
        assert!(wants_attempts(&uri("&attempts=true")).unwrap());
        assert!(wants_attempts(&uri("&attempts=yes")).is_err());
    }
}
