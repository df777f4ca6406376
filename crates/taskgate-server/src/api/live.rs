//! The live parts of a task's status, beyond APIXO, added where a request has read the task
//! from the store: `queuePosition` while it is pending, and its log lines when asked for
//! (`statusTask …&logs=true`, `&logsAfter=SEQ`; streams send theirs with every event).
//!
//! Neither is ever part of a cached view: a queue position changes with every claim of the
//! model, and logs are asked for per request. A pending view cached at submit (SQLite) is
//! therefore served for the first [`PENDING_VIEW_FRESH_MS`] only (`api/tasks.rs`,
//! `pending_view`): long enough for the fast path it exists for (a task claimed within
//! milliseconds, polled meanwhile), after which polls of a task still waiting read the store
//! and see where it stands.

use axum::http::Uri;
use taskgate_proto::{ErrorCode, TaskLogLine, TaskState, TaskStatus};

use super::query_param;
use crate::domain::{now_ms, Task};
use crate::error::ApiError;
use crate::state::AppState;

/// How long a just-submitted task's cached `pending` view is served, in ms; polls after that
/// read the store, which adds `queuePosition`.
pub(super) const PENDING_VIEW_FRESH_MS: i64 = 1000;

/// Most log lines one answer carries (statusTask, or one stream event).
pub(super) const LOG_PAGE: usize = 100;

/// The logs a statusTask request asked for: `logs=true`, and `logsAfter=SEQ` to read on from a
/// line already seen (without it, the newest lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LogsQuery {
    pub(super) after: Option<u64>,
}

impl LogsQuery {
    /// `None` unless the request asks for logs; a bad value is a 400 naming it.
    pub(super) fn from_uri(uri: &Uri) -> Result<Option<LogsQuery>, ApiError> {
        // Status polls are the hottest request: most carry only taskId, and are not parsed
        // again for parameters they do not have.
        if !uri.query().is_some_and(|q| q.contains("logs")) {
            return Ok(None);
        }
        let wanted = super::flag_param(uri, "logs")?;
        let after = match query_param(uri, "logsAfter") {
            None => None,
            Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidInput,
                    format!(
                    "logsAfter must be the seq of a log line (a non-negative integer), got {raw:?}"
                ),
                )
            })?),
        };
        // logsAfter alone asks for logs too: it cannot mean anything else.
        Ok((wanted || after.is_some()).then_some(LogsQuery { after }))
    }
}

/// Adds `queuePosition` to a pending task's status, and its log lines when `logs` asks for
/// them. The caller has checked that the task is the caller's to see.
pub(super) async fn add_live_fields(
    state: &AppState,
    task: &Task,
    status: &mut TaskStatus,
    logs: Option<LogsQuery>,
) -> Result<(), ApiError> {
    if task.state == TaskState::Pending {
        status.queue_position = state.store.queue_position(&task.id, now_ms()).await?;
    }
    if let Some(q) = logs {
        status.logs = Some(log_page(state, &task.id, q.after).await?);
    }
    Ok(())
}

/// One page of a task's log: the newest lines, or the ones after `after`.
pub(super) async fn log_page(
    state: &AppState,
    task_id: &str,
    after: Option<u64>,
) -> Result<Vec<TaskLogLine>, ApiError> {
    Ok(state.store.log_tail(task_id, after, LOG_PAGE).await?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn query(q: &str) -> Result<Option<LogsQuery>, ApiError> {
        LogsQuery::from_uri(&format!("/x?taskId=t&{q}").parse::<Uri>().unwrap())
    }

    #[test]
    fn logs_are_asked_for_with_logs_true_or_a_position() {
        assert_eq!(query("").unwrap(), None);
        assert_eq!(query("logs=false").unwrap(), None);
        assert_eq!(query("logs=true").unwrap(), Some(LogsQuery { after: None }));
        assert_eq!(
            query("logs=true&logsAfter=42").unwrap(),
            Some(LogsQuery { after: Some(42) })
        );
        assert_eq!(
            query("logsAfter=0").unwrap(),
            Some(LogsQuery { after: Some(0) })
        );
        assert!(query("logs=yes").is_err());
        assert!(query("logs=true&logsAfter=-1").is_err());
    }
}
