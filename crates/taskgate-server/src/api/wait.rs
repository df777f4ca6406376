//! `Prefer: wait=N` (RFC 7240) on generateTask and statusTask: hold the answer until the task is
//! final or N seconds pass. The wait sleeps on the node's task events (`events::TaskEvents`),
//! nudged after every change to the task on any node, and reads the task once per nudge: it
//! never polls the store.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::domain::Task;
use crate::error::ApiError;
use crate::state::AppState;

/// The longest wait a client may ask for; longer asks are cut to this.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

pub static PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// The `wait` preference of a request, capped at [`MAX_WAIT`]. Per RFC 7240 a preference the
/// server does not understand is ignored rather than refused: `Prefer: wait=soon` waits not at
/// all, like a request without the header.
pub fn preference(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(axum::http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            // `wait=10` or `wait="10"`, possibly with parameters after a `;`.
            let token = pref.split(';').next()?.trim();
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let secs: u64 = value.trim().trim_matches('"').parse().ok()?;
            Some(Duration::from_secs(secs).min(MAX_WAIT))
        })
}

/// `Preference-Applied: wait=N`, telling the client its wait was honoured (and for how long).
pub fn applied(wait: Duration) -> (HeaderName, HeaderValue) {
    (
        PREFERENCE_APPLIED.clone(),
        HeaderValue::from_str(&format!("wait={}", wait.as_secs()))
            .unwrap_or(HeaderValue::from_static("wait")),
    )
}

/// Reads `task_id` until it is final, `wait` passes, or the server begins shutting down;
/// answers the last read (`None`: the task does not exist for the caller, which `visible`
/// decides on every read — a wait on another tenant's task must answer its 404 at once, not
/// when the task ends, or its timing would tell that the task exists). It subscribes to the
/// task's events before its first read, so no change slips between a read and the sleep.
pub async fn until_final(
    state: &AppState,
    task_id: &str,
    wait: Duration,
    visible: impl Fn(&Task) -> bool,
) -> Result<Option<Task>, ApiError> {
    let mut watch = state.dispatcher.events().subscribe(task_id);
    let deadline = Instant::now() + wait;
    loop {
        let Some(task) = state.store.get_task(task_id).await?.filter(&visible) else {
            return Ok(None);
        };
        if task.state.is_final() || Instant::now() >= deadline {
            return Ok(Some(task));
        }
        tokio::select! {
            _ = watch.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = state.dispatcher.stopped() => return Ok(Some(task)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                "prefer",
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        preference(&h)
    }

    #[test]
    fn wait_is_read_among_other_preferences_and_capped() {
        assert_eq!(prefer(&["wait=5"]), Some(Duration::from_secs(5)));
        assert_eq!(
            prefer(&["respond-async, wait=10"]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            prefer(&["return=minimal", "Wait=\"7\""]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(prefer(&["wait=600"]), Some(MAX_WAIT));
        assert_eq!(prefer(&["wait=0"]), Some(Duration::ZERO));
    }

    #[test]
    fn a_wait_the_server_cannot_read_is_ignored() {
        assert_eq!(prefer(&[]), None);
        assert_eq!(prefer(&["wait=soon"]), None);
        assert_eq!(prefer(&["wait=-1"]), None);
        assert_eq!(prefer(&["respond-async"]), None);
    }
}
