//! The task domain: ids, the record a task is, and its state machine. No IO happens here.
//!
//! A task moves `pending → processing → success | failed`. `processing → pending` is the one way
//! back: a retryable error, a lost worker or a shutdown hands the task on, and the attempt token
//! it held stops being valid. A client may cancel a task that is not final yet (`pending |
//! processing → failed` with `CANCELLED`), which also kills the running attempt's token. Final
//! states have no way out, which is what makes "one final state per task" an invariant the store
//! can enforce with a `WHERE state = …` guard taken from the table.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use taskgate_proto::{ResultJson, TaskState, TaskStatus, WebhookEvent};

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

/// `n` task ids for one batch, increasing in the batch's order: ULIDs from one monotonic
/// generator (within a millisecond it adds one to the random part), so the tasks are claimed
/// and listed in the order they were sent, which independent ULIDs of one millisecond are not.
pub fn new_task_ids(n: usize) -> Vec<String> {
    let mut generator = ulid::Generator::new();
    (0..n)
        .map(|_| {
            // Overflow needs 2^80 ids in one millisecond; a fresh ULID is still unique.
            let id = generator.generate().unwrap_or_else(|_| ulid::Ulid::new());
            format!("task_{}", id.to_string().to_ascii_lowercase())
        })
        .collect()
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
    /// The server started without the task's model in its configuration.
    pub const MODEL_REMOVED: &str = "MODEL_REMOVED";
    /// The task was not started before its deadline (`ttl_seconds`).
    pub const EXPIRED: &str = "EXPIRED";
    /// The task's owner cancelled it (`cancelTask`) before it finished.
    pub const CANCELLED: &str = "CANCELLED";
}

/// The transitions the state machine allows: the one table every store write is derived from.
///
/// Each store write names its transition and takes its `WHERE` guard ([`Transition::guard`])
/// and its new state ([`Transition::to`]) from here, so the SQLite and PostgreSQL statements
/// cannot disagree with the table; the conformance suite walks every transition and every
/// forbidden one on both stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// pending → processing: a runner claimed the task.
    Claim,
    /// processing → pending: retry later, worker lost, or shutdown.
    Requeue,
    /// processing → success.
    Succeed,
    /// processing → failed (the attempt's own failure, or its attempts ran out).
    Fail,
    /// pending | processing → failed with `MODEL_REMOVED`: the server no longer offers the model.
    Remove,
    /// pending → failed with `EXPIRED`: not started before its deadline.
    Expire,
    /// pending | processing → failed with `CANCELLED`: the task's owner cancelled it. The write
    /// clears the lease token, so a running attempt can no longer finish, requeue or renew.
    Cancel,
}

impl Transition {
    pub const ALL: [Transition; 7] = [
        Transition::Claim,
        Transition::Requeue,
        Transition::Succeed,
        Transition::Fail,
        Transition::Remove,
        Transition::Expire,
        Transition::Cancel,
    ];

    /// The states the transition may start from.
    pub fn from_states(self) -> &'static [TaskState] {
        match self {
            Transition::Claim | Transition::Expire => &[TaskState::Pending],
            Transition::Requeue | Transition::Succeed | Transition::Fail => {
                &[TaskState::Processing]
            }
            Transition::Remove | Transition::Cancel => &[TaskState::Pending, TaskState::Processing],
        }
    }

    pub fn to(self) -> TaskState {
        match self {
            Transition::Claim => TaskState::Processing,
            Transition::Requeue => TaskState::Pending,
            Transition::Succeed => TaskState::Success,
            Transition::Fail | Transition::Remove | Transition::Expire | Transition::Cancel => {
                TaskState::Failed
            }
        }
    }

    /// Whether the table has a transition from `from` to `to`.
    pub fn allowed(from: TaskState, to: TaskState) -> bool {
        Self::ALL
            .iter()
            .any(|t| t.to() == to && t.from_states().contains(&from))
    }

    /// The SQL guard a write making this transition must carry: `state = '…'`, or
    /// `state IN ('…', …)` for several from-states. One state is written as an equality because
    /// SQLite uses a partial index (`WHERE state = 'pending'`) only for a term that matches it
    /// literally: with `IN ('pending')` every claim scanned the whole table.
    pub fn guard(self) -> String {
        match self.from_states() {
            [one] => format!("state = '{}'", one.as_str()),
            many => {
                let states: Vec<String> =
                    many.iter().map(|s| format!("'{}'", s.as_str())).collect();
                format!("state IN ({})", states.join(", "))
            }
        }
    }

    /// The SQL assignment of the new state: `state = '…'`.
    pub fn set_state(self) -> String {
        format!("state = '{}'", self.to().as_str())
    }
}

/// Longest failMsg kept, in bytes.
pub const MAX_FAIL_MSG: usize = 4000;
/// Longest failCode kept, in bytes.
pub const MAX_FAIL_CODE: usize = 64;

/// Longest log line kept, in bytes (a longer one is cut).
pub const MAX_LOG_LINE: usize = 4096;
/// Most log lines kept per task: older ones are trimmed as new ones arrive.
pub const MAX_LOG_LINES: u64 = 1000;
/// Most bytes of log lines kept per task, trimmed like [`MAX_LOG_LINES`].
pub const MAX_LOG_BYTES: u64 = 256 * 1024;

/// Makes text from outside (a program's stderr, an upstream's body, a worker's report) safe to
/// store and show: no NUL (PostgreSQL refuses it in text, so the write would fail every time),
/// no control characters but newline and tab, at most `max` bytes (cut on a character boundary).
pub fn clean_text(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    for c in raw.chars() {
        let c = if c.is_control() && c != '\n' && c != '\t' {
            if c == '\0' {
                continue;
            }
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// A failure message with the secrets a URL in it may carry taken out: the user and password
/// of `scheme://user:pass@host`, and the values of query parameters whose names say they are
/// secret (`key`, `token`, `secret`, `password`, `sig`, `auth`, `credential` anywhere in the
/// name). Messages come from backends and upstreams and are shown to the tenant, who must not
/// learn the operator's upstream credentials from them.
pub fn scrub_secrets(message: &str) -> String {
    const SECRET_NAMES: [&str; 7] = [
        "key",
        "token",
        "secret",
        "password",
        "sig",
        "auth",
        "credential",
    ];
    let ends_url = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`');
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after.find(ends_url).unwrap_or(after.len());
        let (url, tail) = after.split_at(end);
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        let (authority, path) = url.split_at(authority_end);
        match authority.rfind('@') {
            Some(i) => {
                out.push_str("***");
                out.push_str(&authority[i..]);
            }
            None => out.push_str(authority),
        }
        match path.split_once('?') {
            Some((p, query)) => {
                out.push_str(p);
                out.push('?');
                let (query, fragment) = match query.split_once('#') {
                    Some((q, f)) => (q, Some(f)),
                    None => (query, None),
                };
                for (n, pair) in query.split('&').enumerate() {
                    if n > 0 {
                        out.push('&');
                    }
                    match pair.split_once('=') {
                        Some((name, _))
                            if SECRET_NAMES
                                .iter()
                                .any(|s| name.to_ascii_lowercase().contains(s)) =>
                        {
                            out.push_str(name);
                            out.push_str("=***");
                        }
                        _ => out.push_str(pair),
                    }
                }
                if let Some(f) = fragment {
                    out.push('#');
                    out.push_str(f);
                }
            }
            None => out.push_str(path),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// The name under which one attempt's outputs are staged: derived from its claim token (unique
/// per claim), without revealing the token, which proves the claim to the worker API.
pub fn attempt_tag(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub tenant_id: String,
    pub model: String,
    pub state: TaskState,
    /// The input object as the JSON text that was stored: parsed only where an attempt needs
    /// it or a status read asks for it (`input=true`), never for a default status read.
    pub input: String,
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
    /// 0..1, as last reported by the running attempt (its backend, or a pull worker).
    pub progress: Option<f64>,
    /// The submit request's W3C `traceparent`, when trace export was on at submit.
    pub trace_parent: Option<String>,
    /// The route of a routed model that ran the last attempt, written with the final state.
    pub route: Option<String>,
}

impl Task {
    /// The input object, parsed.
    pub fn parse_input(&self) -> Result<Map<String, Value>, String> {
        match serde_json::from_str(&self.input) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("the stored input is not a JSON object".to_owned()),
            Err(e) => Err(format!("the stored input is not valid JSON: {e}")),
        }
    }

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
            route: self.route.clone(),
            // Live fields the API adds where it reads them (`api/live.rs`).
            queue_position: None,
            logs: None,
            attempts: None,
            input: None,
        }
    }
}

/// The webhook events a task asked for (`webhook_events` at submit), as its `webhook_events`
/// column stores them: one bit per event. Submits without the field, and every task written
/// before the column existed, have [`EventMask::DEFAULT`]: the final state only, APIXO's one
/// callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMask(u8);

impl EventMask {
    /// `completed` only. Migration 0013 writes the same value as the column's default.
    pub const DEFAULT: EventMask = EventMask(Self::bit(WebhookEvent::Completed));

    /// The bit of `event` in the column. Stored: never renumber.
    pub const fn bit(event: WebhookEvent) -> u8 {
        match event {
            WebhookEvent::Start => 1,
            WebhookEvent::Progress => 2,
            WebhookEvent::Completed => 4,
        }
    }

    pub fn of(events: impl IntoIterator<Item = WebhookEvent>) -> EventMask {
        EventMask(events.into_iter().fold(0, |m, e| m | Self::bit(e)))
    }

    pub fn contains(self, event: WebhookEvent) -> bool {
        self.0 & Self::bit(event) != 0
    }

    /// The column's value.
    pub fn bits(self) -> i16 {
        i16::from(self.0)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn failure_messages_lose_the_secrets_of_the_urls_in_them() {
        let m = scrub_secrets(
            "download of https://bob:hunter2@cdn.example/a.png?X-Amz-Signature=abc&size=2&api_key=zz#f failed; see http://x/y",
        );
        assert!(
            !m.contains("hunter2") && !m.contains("bob") && !m.contains("abc") && !m.contains("zz"),
            "{m}"
        );
        assert!(
            m.contains(
                "https://***@cdn.example/a.png?X-Amz-Signature=***&size=2&api_key=***#f failed"
            ),
            "{m}"
        );
        assert!(m.ends_with("see http://x/y"), "{m}");
        assert_eq!(scrub_secrets("no url here"), "no url here");
        assert_eq!(scrub_secrets("odd ://@"), "odd ://***@");
    }

    use super::*;

    const STATES: [TaskState; 4] = [
        TaskState::Pending,
        TaskState::Processing,
        TaskState::Success,
        TaskState::Failed,
    ];

    #[test]
    fn final_states_have_no_way_out() {
        for from in [TaskState::Success, TaskState::Failed] {
            for to in STATES {
                assert!(!Transition::allowed(from, to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_pending_task_can_be_claimed_removed_or_cancelled_only() {
        assert!(Transition::allowed(
            TaskState::Pending,
            TaskState::Processing
        ));
        assert!(Transition::allowed(TaskState::Pending, TaskState::Failed));
        assert!(!Transition::allowed(TaskState::Pending, TaskState::Success));
        assert!(!Transition::allowed(TaskState::Pending, TaskState::Pending));
    }

    #[test]
    fn a_processing_task_can_finish_either_way_or_go_back() {
        for to in [TaskState::Success, TaskState::Failed, TaskState::Pending] {
            assert!(Transition::allowed(TaskState::Processing, to));
        }
    }

    #[test]
    fn guards_name_exactly_the_from_states() {
        assert_eq!(Transition::Claim.guard(), "state = 'pending'");
        assert_eq!(
            Transition::Remove.guard(),
            "state IN ('pending', 'processing')"
        );
        assert_eq!(Transition::Succeed.set_state(), "state = 'success'");
        assert_eq!(
            Transition::Cancel.guard(),
            "state IN ('pending', 'processing')"
        );
        assert_eq!(Transition::Cancel.set_state(), "state = 'failed'");
    }

    #[test]
    fn text_is_cleaned_of_nul_and_control_characters_and_capped() {
        assert_eq!(clean_text("a\0b\x1b[31mc\n\td", 100), "ab [31mc\n\td");
        assert_eq!(clean_text("héllo", 2), "h");
        assert_eq!(
            clean_text(&"x".repeat(10_000), MAX_FAIL_MSG).len(),
            MAX_FAIL_MSG
        );
    }

    #[test]
    fn attempt_tags_differ_per_token_and_hide_it() {
        let (a, b) = (attempt_tag("att_1_task_a"), attempt_tag("att_2_task_a"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(!a.contains("att"));
    }

    #[test]
    fn ids_carry_their_prefix_and_sort_by_time() {
        let a = new_task_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_task_id();
        assert!(a.starts_with("task_") && a.len() == 5 + 26);
        assert!(a < b);
    }

    #[test]
    fn a_batchs_ids_increase_in_its_order() {
        let ids = new_task_ids(1000);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids
            .iter()
            .all(|id| id.starts_with("task_") && id.len() == 5 + 26));
    }

    fn task(state: TaskState) -> Task {
        Task {
            id: "task_1".into(),
            tenant_id: "t".into(),
            model: "echo".into(),
            state,
            input: "{}".to_owned(),
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
            trace_parent: None,
            route: None,
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
    fn an_event_mask_holds_exactly_the_events_it_was_made_of() {
        assert_eq!(EventMask::DEFAULT, EventMask::of([WebhookEvent::Completed]));
        assert_eq!(
            EventMask::DEFAULT.bits(),
            4,
            "migration 0013's column default"
        );
        let m = EventMask::of([WebhookEvent::Start, WebhookEvent::Progress]);
        assert!(m.contains(WebhookEvent::Start) && m.contains(WebhookEvent::Progress));
        assert!(!m.contains(WebhookEvent::Completed));
        assert_eq!(EventMask::of(WebhookEvent::ALL).bits(), 7);
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
