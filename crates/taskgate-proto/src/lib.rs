//! Wire types of the APIXO-compatible task API.
//!
//! Both the server and the client speak through these types, so a field renamed here is renamed on
//! both sides at once. Everything follows APIXO's conventions: camelCase field names, optional
//! fields left out rather than sent as `null`, and `resultJson` as a JSON *string*.

use serde::{Deserialize, Serialize};

pub mod dashboard;
pub mod error_code;
pub mod usage;
pub mod webhook;

pub use dashboard::{
    AttemptInfo, ModelCounts, OperatorView, StateCounts, TaskCounts, WebhookBacklog, WorkerSeen,
};
pub use error_code::{ErrorCode, ErrorData};
pub use usage::{UsageFigures, UsageGroupBy, UsageReport, UsageRow};

/// The envelope every response is wrapped in: `code` mirrors the HTTP status.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// The HTTP status, repeated.
    #[cfg_attr(feature = "openapi", schema(example = 200))]
    pub code: u16,
    /// `success`, or why the request was refused.
    pub message: String,
    /// The answer; on an error, `{"errorCode": …}`.
    pub data: Option<T>,
}

impl<T> Envelope<T> {
    /// A `200 success` envelope around `data`.
    pub fn success(data: T) -> Self {
        Envelope {
            code: 200,
            message: "success".to_owned(),
            data: Some(data),
        }
    }
}

/// How the client wants to hear about the result.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestType {
    /// Poll `statusTask` until the task is final.
    #[default]
    Async,
    /// The server POSTs the final status to `callback_url`.
    Callback,
}

impl RequestType {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Async => "async",
            RequestType::Callback => "callback",
        }
    }
}

/// Body of `POST /api/v1/generateTask/{model}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"input": {"prompt": "a lighthouse at dusk"}}))
)]
pub struct GenerateTaskRequest {
    /// `async` (poll statusTask) or `callback` (needs `callback_url`). Left out: `callback`
    /// when a `callback_url` is given, else `async`; an explicit `async` drops the
    /// `callback_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_type: Option<RequestType>,
    /// The absolute http(s) URL the server POSTs the task's status to (signed, Standard
    /// Webhooks); at most 2048 characters, no credentials, no private address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The model's parameters; checked against the model's `inputSchema` when it has one.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub input: serde_json::Map<String, serde_json::Value>,
    /// taskgate extension: higher runs first among a model's due tasks (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = -1_000_000, maximum = 1_000_000))]
    pub priority: Option<i32>,
    /// taskgate extension: the task fails with `EXPIRED` if it has not started this many
    /// seconds after the submit (1 to 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2_592_000))]
    pub ttl_seconds: Option<u64>,
    /// taskgate extension: which events are POSTed to `callback_url`, each name once (needs a
    /// `callback_url`). Left out: `completed` only, as APIXO does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 3))]
    pub webhook_events: Option<Vec<WebhookEvent>>,
}

/// `data` of a successful submit.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"taskId": "task_01jd5v9k2r8m3q4w5e6r7t8y9u"}))
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskCreated {
    pub task_id: String,
}

/// The four states APIXO clients know. `pending` and `processing` are not final; a task reaches
/// exactly one of `success` or `failed`, once.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Processing,
    Success,
    Failed,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Processing => "processing",
            TaskState::Success => "success",
            TaskState::Failed => "failed",
        }
    }

    /// Parses the lowercase wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(TaskState::Pending),
            "processing" => Some(TaskState::Processing),
            "success" => Some(TaskState::Success),
            "failed" => Some(TaskState::Failed),
            _ => None,
        }
    }

    /// Whether no further transition can happen.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Failed)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` of `GET /api/v1/statusTask/{model}` and of a callback delivery.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({
        "taskId": "task_01jd5v9k2r8m3q4w5e6r7t8y9u",
        "state": "success",
        "createTime": 1_717_200_000_000_i64,
        "resultJson": "{\"resultUrls\":[\"http://127.0.0.1:8080/files/task_01jd5v9k2r8m3q4w5e6r7t8y9u/a1/out.png?expires=1717286400&sig=…\"]}",
        "costTime": 2140,
        "completeTime": 1_717_200_002_140_i64,
    }))
)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    pub task_id: String,
    pub state: TaskState,
    /// Unix milliseconds. (Some APIXO examples leave it out; 0 then.)
    #[serde(default)]
    pub create_time: i64,
    /// A JSON string holding [`ResultJson`]; present only on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_json: Option<String>,
    /// Milliseconds from creation to completion; present only on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_time: Option<i64>,
    /// Unix milliseconds; present once the task is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_msg: Option<String>,
    /// taskgate extension: 0..1 while processing, when the backend or pull worker reports it.
    /// APIXO clients ignore unknown fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// taskgate extension: for a model with routes (failover between backends), the name of
    /// the route that served the task (for a failed task, the last route tried); set with the
    /// final state, absent for other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// taskgate extension: while pending, an estimate of how many tasks of the same model will
    /// start before this one (0: it is next): those ahead in its tenant's own queue, plus what
    /// the other waiting tenants start meanwhile at their fair share, capped at
    /// [`MAX_QUEUE_POSITION`]. Shown on answers read
    /// from the store (docs/api.md says when a fresh submit's answer leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// taskgate extension: the task's log lines, oldest first, only when asked for
    /// (`statusTask …&logs=true`; stream events carry the lines new since the last event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<TaskLogLine>>,
    /// taskgate extension: every attempt of the task, oldest first, only when asked for
    /// (`statusTask …&attempts=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptInfo>>,
    /// taskgate extension: the task's `input` object exactly as the submit was accepted, only
    /// when asked for (`statusTask …&input=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub input: Option<serde_json::Value>,
}

/// The largest `queuePosition` shown: a task further back shows this (counting is bounded).
pub const MAX_QUEUE_POSITION: u64 = 10_000;

/// One line a task's attempt logged (a command's stdout, an upstream's stream, a pull worker's
/// heartbeat).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskLogLine {
    /// Increases by one per line of the task, from 1, across its attempts: pass the last one
    /// seen as `logsAfter` to read on.
    pub seq: u64,
    /// Unix ms when the server stored it.
    pub at: i64,
    pub line: String,
}

impl TaskStatus {
    /// Decodes `resultJson`, if present.
    pub fn result(&self) -> Option<Result<ResultJson, serde_json::Error>> {
        self.result_json.as_deref().map(serde_json::from_str)
    }
}

/// What `resultJson` holds once decoded.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultJson {
    pub result_urls: Vec<String>,
}

impl ResultJson {
    /// Encodes as the string APIXO puts in `resultJson`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"resultUrls\":[]}"))
    }
}

/// Body of `POST /api/v1/generateTasks/{model}` (taskgate extension): up to
/// [`MAX_BATCH_TASKS`] generateTask bodies, all created in one transaction or none.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"tasks": [{"input": {"prompt": "a fox"}}, {"input": {"prompt": "a lighthouse"}}]}))
)]
pub struct GenerateTasksRequest {
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 1000))]
    pub tasks: Vec<GenerateTaskRequest>,
}

/// Most tasks one `generateTasks` request may carry.
pub const MAX_BATCH_TASKS: usize = 1000;

/// `data` of a successful batch submit: the new tasks' ids, in the order of the request.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TasksCreated {
    pub task_ids: Vec<String>,
}

/// One task of `GET /api/v1/tasks` (taskgate extension): its statusTask `data`, plus the model
/// it was submitted to, since one page mixes models. The status is flattened, so an item reads
/// like a statusTask answer with one more field.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskListItem {
    #[serde(flatten)]
    pub status: TaskStatus,
    pub model: String,
}

/// `data` of `GET /api/v1/tasks`: a page of the tenant's tasks, newest first.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskList {
    pub tasks: Vec<TaskListItem>,
    /// Pass as `cursor` to read the next (older) page; `null` on the last page. Sent as
    /// `null` rather than left out so that "no more pages" is explicit.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub next_cursor: Option<String>,
}

/// `data` of `GET /api/v1/webhookSecret` and of its rotation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSecretData {
    /// `whsec_` + base64: the secret that signs callbacks now.
    pub secret: String,
    /// The secret it replaced, which still signs until `previousExpiresTime` (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_expires_time: Option<i64>,
}

/// What a callback delivery reports (`webhook_events` at submit, taskgate extension). A task
/// asks for any of them; without the field it gets `completed` only, APIXO's one callback.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// An attempt started: the task is `processing`. Sent again if a later attempt starts.
    Start,
    /// A runner reported a new progress (at most one delivery per second per task).
    Progress,
    /// The task reached its final state, `success` or `failed`.
    #[default]
    Completed,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 3] = [
        WebhookEvent::Start,
        WebhookEvent::Progress,
        WebhookEvent::Completed,
    ];

    /// The name in `webhook_events` and in delivery views.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Start => "start",
            WebhookEvent::Progress => "progress",
            WebhookEvent::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The value of the [`webhook::HEADER_EVENT`] header on a delivery of this event:
    /// `task.start`, `task.progress` or `task.completed`.
    pub fn header_value(self) -> &'static str {
        match self {
            WebhookEvent::Start => "task.start",
            WebhookEvent::Progress => "task.progress",
            WebhookEvent::Completed => "task.completed",
        }
    }
}

impl std::fmt::Display for WebhookEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One callback of a task, as listed by `GET /api/v1/webhookDeliveries?taskId=`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// Sent as `webhook-id` on every attempt.
    pub id: String,
    pub task_id: String,
    /// What the delivery reports. Servers from before events were added send none: `completed`.
    #[serde(default)]
    pub event: WebhookEvent,
    pub url: String,
    /// `pending`, `delivering`, `succeeded` or `failed`.
    pub state: String,
    pub attempts: u32,
    pub create_time: i64,
    /// When the next attempt is due (Unix ms), while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub attempt_log: Vec<WebhookAttempt>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttempt {
    /// Unix ms.
    pub time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    pub latency_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `data` of `GET /api/v1/webhookDeliveries`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDeliveries {
    pub deliveries: Vec<WebhookDelivery>,
}

/// One model a key may use, as `GET /api/v1/models` lists it (a taskgate extension).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// The id used in `generateTask/{model}` and `statusTask/{model}`.
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How tasks of this model can be followed: `async` (poll statusTask) and `callback` (the
    /// server POSTs the final status), plus whatever the operator lists for the model.
    pub modes: Vec<String>,
    /// How long to wait before the first statusTask poll (and between the early ones).
    pub poll_interval_ms: u64,
    /// The JSON Schema a submit's `input` must match; absent when the model checks nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub input_schema: Option<serde_json::Value>,
}

/// `data` of `GET /api/v1/models`: sorted by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

/// Body of `POST /api/v1/worker/claim`: long-polls for a task of one of `models`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"models": ["remote"], "waitMs": 0}))
)]
pub struct WorkerClaimRequest {
    pub models: Vec<String>,
    /// How long to wait for work before answering with no task (capped by the server).
    #[serde(default)]
    pub wait_ms: u64,
}

/// A task handed to a pull worker: `data` of a successful claim.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTask {
    pub task_id: String,
    pub model: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub input: serde_json::Map<String, serde_json::Value>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Proves the claim on every later call; a stale token gets 409.
    pub lease_token: String,
    /// Heartbeat well within this, or the task goes to another worker.
    pub lease_ms: u64,
    /// The model's timeout for one attempt.
    pub timeout_ms: u64,
}

/// Body of `POST /api/v1/worker/tasks/{id}/heartbeat`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"leaseToken": "LEASE_TOKEN", "progress": 0.5, "logs": ["step 1 of 2"]}))
)]
pub struct WorkerHeartbeat {
    pub lease_token: String,
    /// 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Lines of the worker's log since the last heartbeat; the server keeps them with the task
    /// (`statusTask …&logs=true`) and writes them to its own log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
}

/// Body of `POST /api/v1/worker/tasks/{id}/complete`: the uploaded outputs, by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"leaseToken": "LEASE_TOKEN", "outputs": ["out.png"]}))
)]
pub struct WorkerComplete {
    pub lease_token: String,
    pub outputs: Vec<String>,
}

/// Body of `POST /api/v1/worker/tasks/{id}/fail`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"leaseToken": "LEASE_TOKEN", "failMsg": "the GPU ran out of memory", "retryable": true}))
)]
pub struct WorkerFail {
    pub lease_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_code: Option<String>,
    pub fail_msg: String,
    /// Run the task again (while attempts remain) rather than failing it.
    #[serde(default)]
    pub retryable: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pending_status_leaves_out_every_optional_field() {
        let s = TaskStatus {
            task_id: "task_1".into(),
            state: TaskState::Pending,
            create_time: 5,
            result_json: None,
            cost_time: None,
            complete_time: None,
            fail_code: None,
            fail_msg: None,
            progress: None,
            route: None,
            queue_position: None,
            logs: None,
            attempts: None,
            input: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"taskId":"task_1","state":"pending","createTime":5}"#
        );
    }

    #[test]
    fn result_json_is_a_string_holding_result_urls() {
        let r = ResultJson {
            result_urls: vec!["http://x/a.png".into()],
        };
        assert_eq!(r.to_json_string(), r#"{"resultUrls":["http://x/a.png"]}"#);
    }

    #[test]
    fn a_list_item_is_the_status_with_the_model_and_the_cursor_is_null_at_the_end() {
        let list = TaskList {
            tasks: vec![TaskListItem {
                status: TaskStatus {
                    task_id: "task_1".into(),
                    state: TaskState::Pending,
                    create_time: 5,
                    result_json: None,
                    cost_time: None,
                    complete_time: None,
                    fail_code: None,
                    fail_msg: None,
                    progress: None,
                    route: None,
                    queue_position: None,
                    logs: None,
                    attempts: None,
                    input: None,
                },
                model: "echo".into(),
            }],
            next_cursor: None,
        };
        let json = serde_json::to_string(&list).unwrap();
        assert_eq!(
            json,
            r#"{"tasks":[{"taskId":"task_1","state":"pending","createTime":5,"model":"echo"}],"nextCursor":null}"#
        );
        assert_eq!(serde_json::from_str::<TaskList>(&json).unwrap(), list);
    }

    #[test]
    fn a_model_without_schema_or_description_leaves_them_out() {
        let m = ModelInfo {
            model: "echo".into(),
            description: None,
            modes: vec!["async".into()],
            poll_interval_ms: 1000,
            input_schema: None,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"model":"echo","modes":["async"],"pollIntervalMs":1000}"#
        );
    }

    #[test]
    fn webhook_events_have_one_name_and_one_header_value_each() {
        for e in WebhookEvent::ALL {
            assert_eq!(WebhookEvent::parse(e.as_str()), Some(e));
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
            assert_eq!(e.header_value(), format!("task.{e}"));
        }
        assert_eq!(WebhookEvent::parse("finish"), None);
        assert_eq!(WebhookEvent::default(), WebhookEvent::Completed);
    }

    #[test]
    fn request_type_defaults_to_async_and_rejects_unknown_values() {
        let r: GenerateTaskRequest = serde_json::from_str(r#"{"input":{}}"#).unwrap();
        assert_eq!(r.request_type.unwrap_or_default(), RequestType::Async);
        assert!(serde_json::from_str::<GenerateTaskRequest>(
            r#"{"request_type":"sync","input":{}}"#
        )
        .is_err());
    }
}
