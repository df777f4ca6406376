//! The task domain: ids, the record a task is, and its state machine. No IO happens here.
//!
//! A task moves `pending → processing → success | failed`. `processing → pending` is the one way
//! back: a retryable error, a lost worker or a shutdown hands the task on, and the attempt token
//! it held stops being valid. Final states have no way out, which is what makes "one final state
//! per task" an invariant the store can enforce with a `WHERE state = 'processing'` guard.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use taskgate_proto::{ResultJson, TaskState, TaskStatus};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A prefixed, time-sortable id: `PREFIX_` + a ULID (48 bits of milliseconds, 80 random bits).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

pub fn new_task_id() -> String {
    new_id("task")
}

/// failCode values taskgate itself produces. Backends may report any other string.
pub mod fail_code {
    pub const GENERATION_FAILED: &str = "GENERATION_FAILED";
    pub const PROCESSING_TIMEOUT: &str = "PROCESSING_TIMEOUT";
    /// The task kept losing its worker (process killed, lease expired) until its attempts ran out.
    pub const ATTEMPTS_EXHAUSTED: &str = "ATTEMPTS_EXHAUSTED";
    pub const MODEL_UNAVAILABLE: &str = "MODEL_UNAVAILABLE";
    pub const INVALID_INPUT: &str = "INVALID_INPUT";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
}

/// The transitions the state machine allows, named so that every write can say which it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// pending → processing: a runner claimed the task.
    Claim,
    /// processing → pending: retry later, worker lost, or shutdown.
    Requeue,
    /// processing → success.
    Succeed,
    /// processing → failed.
    Fail,
}

impl Transition {
    pub fn from(self) -> TaskState {
        match self {
            Transition::Claim => TaskState::Pending,
            Transition::Requeue | Transition::Succeed | Transition::Fail => TaskState::Processing,
        }
    }

    pub fn to(self) -> TaskState {
        match self {
            Transition::Claim => TaskState::Processing,
            Transition::Requeue => TaskState::Pending,
            Transition::Succeed => TaskState::Success,
            Transition::Fail => TaskState::Failed,
        }
    }

    /// The transition from `from` to `to`, if the state machine has one.
    pub fn between(from: TaskState, to: TaskState) -> Option<Transition> {
        [
            Transition::Claim,
            Transition::Requeue,
            Transition::Succeed,
            Transition::Fail,
        ]
        .into_iter()
        .find(|t| t.from() == from && t.to() == to)
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub tenant_id: String,
    pub model: String,
    pub state: TaskState,
    pub input: Map<String, Value>,
    pub callback_url: Option<String>,
    /// Attempts started so far (claims), including the running one.
    pub attempts: u32,
    pub max_attempts: u32,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub complete_time: Option<i64>,
    /// Artifact keys of the outputs, on success.
    pub outputs: Vec<String>,
    pub fail_code: Option<String>,
    pub fail_msg: Option<String>,
    /// 0..1, as last reported by a pull worker.
    pub progress: Option<f64>,
}

impl Task {
    /// The APIXO status view, with result URLs made by `url_for` from the output keys.
    pub fn status(&self, url_for: impl Fn(&str) -> String) -> TaskStatus {
        let success = self.state == TaskState::Success;
        TaskStatus {
            task_id: self.id.clone(),
            state: self.state,
            create_time: self.create_time,
            result_json: success.then(|| {
                ResultJson {
                    result_urls: self.outputs.iter().map(|k| url_for(k)).collect(),
                }
                .to_json_string()
            }),
            // APIXO's examples measure costTime from creation to completion.
            cost_time: if success {
                self.complete_time.map(|c| c - self.create_time)
            } else {
                None
            },
            complete_time: if self.state.is_final() {
                self.complete_time
            } else {
                None
            },
            fail_code: (self.state == TaskState::Failed)
                .then(|| self.fail_code.clone())
                .flatten(),
            fail_msg: (self.state == TaskState::Failed)
                .then(|| self.fail_msg.clone())
                .flatten(),
            progress: (self.state == TaskState::Processing)
                .then_some(self.progress)
                .flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_have_no_way_out() {
        for from in [TaskState::Success, TaskState::Failed] {
            for to in [
                TaskState::Pending,
                TaskState::Processing,
                TaskState::Success,
                TaskState::Failed,
            ] {
                assert_eq!(Transition::between(from, to), None, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_pending_task_can_only_be_claimed() {
        assert_eq!(
            Transition::between(TaskState::Pending, TaskState::Processing),
            Some(Transition::Claim)
        );
        assert_eq!(
            Transition::between(TaskState::Pending, TaskState::Success),
            None
        );
        assert_eq!(
            Transition::between(TaskState::Pending, TaskState::Failed),
            None
        );
    }

    #[test]
    fn a_processing_task_can_finish_either_way_or_go_back() {
        assert_eq!(
            Transition::between(TaskState::Processing, TaskState::Success),
            Some(Transition::Succeed)
        );
        assert_eq!(
            Transition::between(TaskState::Processing, TaskState::Failed),
            Some(Transition::Fail)
        );
        assert_eq!(
            Transition::between(TaskState::Processing, TaskState::Pending),
            Some(Transition::Requeue)
        );
    }

    #[test]
    fn ids_carry_their_prefix_and_sort_by_time() {
        let a = new_task_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_task_id();
        assert!(a.starts_with("task_") && a.len() == 5 + 26);
        assert!(a < b);
    }

    fn task(state: TaskState) -> Task {
        Task {
            id: "task_1".into(),
            tenant_id: "t".into(),
            model: "echo".into(),
            state,
            input: Map::new(),
            callback_url: None,
            attempts: 1,
            max_attempts: 3,
            create_time: 1000,
            start_time: Some(1100),
            complete_time: Some(3500),
            outputs: vec!["task_1/result.json".into()],
            fail_code: Some("X".into()),
            fail_msg: Some("y".into()),
            progress: None,
        }
    }

    #[test]
    fn success_status_has_result_urls_and_cost_time_but_no_failure() {
        let s = task(TaskState::Success).status(|k| format!("http://h/files/{k}"));
        assert_eq!(
            s.result_json.as_deref(),
            Some(r#"{"resultUrls":["http://h/files/task_1/result.json"]}"#)
        );
        assert_eq!(s.cost_time, Some(2500));
        assert_eq!(s.complete_time, Some(3500));
        assert_eq!(s.fail_code, None);
    }

    #[test]
    fn failed_status_has_fail_fields_but_no_result_or_cost() {
        let s = task(TaskState::Failed).status(|k| k.to_owned());
        assert_eq!(s.result_json, None);
        assert_eq!(s.cost_time, None);
        assert_eq!(s.fail_code.as_deref(), Some("X"));
        assert_eq!(s.fail_msg.as_deref(), Some("y"));
    }

    #[test]
    fn processing_status_has_only_id_state_and_create_time() {
        let s = task(TaskState::Processing).status(|k| k.to_owned());
        assert_eq!(
            (s.result_json, s.cost_time, s.complete_time, s.fail_code),
            (None, None, None, None)
        );
    }
}
