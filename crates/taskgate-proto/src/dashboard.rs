//! Wire types of taskgate's dashboard and operator endpoints (not APIXO's): the task counts
//! (`GET /api/v1/taskCounts`, and the `counts` events of `GET /api/v1/streamTaskCounts`), the
//! attempts of a task (`statusTask …&attempts=true`) and the operator view
//! (`GET /api/v1/operator`).

use serde::{Deserialize, Serialize};

/// How many of a set of tasks are in each state.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateCounts {
    pub pending: u64,
    pub processing: u64,
    pub success: u64,
    pub failed: u64,
}

impl StateCounts {
    /// Adds `n` tasks in `state`.
    pub fn add(&mut self, state: crate::TaskState, n: u64) {
        let slot = match state {
            crate::TaskState::Pending => &mut self.pending,
            crate::TaskState::Processing => &mut self.processing,
            crate::TaskState::Success => &mut self.success,
            crate::TaskState::Failed => &mut self.failed,
        };
        *slot = slot.saturating_add(n);
    }
}

/// One model's counts: the model's name beside its [`StateCounts`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelCounts {
    pub model: String,
    #[serde(flatten)]
    pub counts: StateCounts,
}

/// `data` of `GET /api/v1/taskCounts`: the caller's tasks created at or after `since`, per model
/// (sorted by name) and in total.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskCounts {
    /// Unix ms: the window's start (the one asked for, or the default, 24 h before now).
    pub since: i64,
    pub models: Vec<ModelCounts>,
    pub total: StateCounts,
}

/// One attempt of a task (`statusTask …&attempts=true`): the earlier ones from the task's
/// attempt history, the current or last one from the task itself.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptInfo {
    /// From 1.
    pub attempt: u32,
    /// Unix ms.
    #[serde(default)]
    pub started_at: Option<i64>,
    /// Unix ms; null while the attempt runs.
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// Why the attempt ended without success (null for a success or a running attempt).
    #[serde(default)]
    pub fail_code: Option<String>,
    #[serde(default)]
    pub fail_msg: Option<String>,
    /// Who ran it: `local` (a server's dispatcher), `worker:<name>` (a pull worker, named when
    /// known) or `worker`; null when not recorded.
    #[serde(default)]
    pub runner: Option<String>,
}

/// The caller's webhook deliveries that are not done (`GET /api/v1/operator`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBacklog {
    /// Not attempted yet (waiting, or being sent now for the first time).
    pub pending: u64,
    /// Attempted and failed at least once, to be attempted again (or being attempted now).
    pub retrying: u64,
    /// Given up on: every attempt failed (kept until the task's record goes).
    pub failed: u64,
    /// Unix ms: the earliest next attempt among waiting deliveries; null when none waits.
    pub oldest_due_at: Option<i64>,
}

/// A pull worker seen by the cluster (its name is its worker token's name).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSeen {
    pub name: String,
    /// Unix ms of its last claim or heartbeat (recorded at most every 10 s per node).
    pub last_seen_at: i64,
    /// The models it last asked to claim.
    pub models: Vec<String>,
    /// The server node it last talked to (that node's public URL).
    pub node: String,
}

/// `data` of `GET /api/v1/operator`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorView {
    pub webhooks: WebhookBacklog,
    /// Pull workers seen in the last 24 h, most recently seen first. The same for every
    /// tenant: workers serve all of them.
    pub workers: Vec<WorkerSeen>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_serialise_in_the_documented_shape() {
        let mut c = StateCounts::default();
        c.add(crate::TaskState::Success, 5);
        c.add(crate::TaskState::Failed, 2);
        let counts = TaskCounts {
            since: 1,
            models: vec![ModelCounts {
                model: "m".into(),
                counts: c,
            }],
            total: c,
        };
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"since":1,"models":[{"model":"m","pending":0,"processing":0,"success":5,"failed":2}],"total":{"pending":0,"processing":0,"success":5,"failed":2}}"#
        );
        let back: TaskCounts =
            serde_json::from_str(&serde_json::to_string(&counts).unwrap()).unwrap();
        assert_eq!(back, counts);
    }
}
