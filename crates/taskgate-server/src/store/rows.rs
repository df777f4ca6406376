//! Rows as both SQL dialects return them, and their conversion to domain types. One definition
//! serves SQLite and PostgreSQL (`FromRow` is derived per database), so the two stores differ
//! only in their SQL text.

use taskgate_proto::{TaskState, WebhookEvent};

use super::{
    ApiKeyRecord, Delivery, DeliveryAttempt, KeyKind, KeyPolicy, KeyUsage, StoreError, Tenant,
    WebhookSecrets,
};
use crate::domain::{EventMask, Task};

pub const TASK_COLUMNS: &str = "id, tenant_id, model, state, input, callback_url, attempts, \
     max_attempts, create_time, start_time, complete_time, outputs, fail_code, fail_msg, \
     progress, trace_parent, route";
/// How many columns [`TASK_COLUMNS`] names: a column selected after them is at this index.
const TASK_COLUMNS_LEN: usize = 17;

#[derive(sqlx::FromRow)]
pub struct TaskRow {
    id: String,
    tenant_id: String,
    model: String,
    state: String,
    input: String,
    callback_url: Option<String>,
    attempts: i64,
    max_attempts: i64,
    create_time: i64,
    start_time: Option<i64>,
    complete_time: Option<i64>,
    outputs: Option<String>,
    fail_code: Option<String>,
    fail_msg: Option<String>,
    progress: Option<f64>,
    trace_parent: Option<String>,
    route: Option<String>,
}

impl TaskRow {
    /// The row as the SQLite writer thread's rusqlite connection returns it, columns in
    /// [`TASK_COLUMNS`] order.
    pub fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(TaskRow {
            id: r.get(0)?,
            tenant_id: r.get(1)?,
            model: r.get(2)?,
            state: r.get(3)?,
            input: r.get(4)?,
            callback_url: r.get(5)?,
            attempts: r.get(6)?,
            max_attempts: r.get(7)?,
            create_time: r.get(8)?,
            start_time: r.get(9)?,
            complete_time: r.get(10)?,
            outputs: r.get(11)?,
            fail_code: r.get(12)?,
            fail_msg: r.get(13)?,
            progress: r.get(14)?,
            trace_parent: r.get(15)?,
            route: r.get(16)?,
        })
    }
}

impl TryFrom<TaskRow> for Task {
    type Error = StoreError;

    fn try_from(r: TaskRow) -> Result<Self, StoreError> {
        let state = TaskState::parse(&r.state)
            .ok_or_else(|| StoreError::Invalid(format!("unknown task state {:?}", r.state)))?;
        let outputs = match r.outputs {
            Some(s) => serde_json::from_str(&s)
                .map_err(|e| StoreError::Invalid(format!("task outputs: {e}")))?,
            None => Vec::new(),
        };
        Ok(Task {
            id: r.id,
            tenant_id: r.tenant_id,
            model: r.model,
            state,
            input: r.input,
            callback_url: r.callback_url,
            attempts: r.attempts as u32,
            max_attempts: r.max_attempts as u32,
            create_time: r.create_time,
            start_time: r.start_time,
            complete_time: r.complete_time,
            outputs,
            fail_code: r.fail_code,
            fail_msg: r.fail_msg,
            progress: r.progress,
            trace_parent: r.trace_parent,
            route: r.route,
        })
    }
}

pub const KEY_SELECT: &str =
    "SELECT k.id, k.kind, k.tenant_id, t.name AS tenant_name, k.name, k.prefix, \
     k.created_at, k.revoked_at, k.key_hash, k.models, k.read_only, k.requests_per_minute, \
     k.concurrent_tasks FROM api_keys k JOIN tenants t ON t.id = k.tenant_id";

/// A stored limit; out of range (only by hand) clamps.
fn limit_from(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// The `models` column of a policy: NULL for every model, else a JSON array.
pub fn models_column(policy: &KeyPolicy) -> Option<String> {
    policy
        .models
        .as_ref()
        .map(|m| serde_json::Value::from(m.clone()).to_string())
}

/// The multi-row upsert of one node's key usage counts (`Store::sync_key_usage`).
pub fn upsert_key_usage<'a, DB>(node: &'a str, mine: &'a [KeyUsage]) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = sqlx::QueryBuilder::new("INSERT INTO key_usage (key_id, node, bucket, count) ");
    qb.push_values(mine, |mut b, u| {
        b.push_bind(u.key_id.as_str())
            .push_bind(node)
            .push_bind(u.bucket)
            .push_bind(i64::try_from(u.count).unwrap_or(i64::MAX));
    });
    qb.push(" ON CONFLICT (key_id, node, bucket) DO UPDATE SET count = excluded.count");
    qb
}

/// Other nodes' counts per key and bucket: `(node, oldest bucket)`.
pub fn others_key_usage_sql(param: impl Fn(usize) -> String) -> String {
    format!(
        "SELECT key_id, bucket, CAST(sum(count) AS BIGINT) FROM key_usage WHERE node <> {} AND bucket >= {} \
         GROUP BY key_id, bucket",
        param(1),
        param(2)
    )
}

/// Rows of [`others_key_usage_sql`] as usage.
pub fn key_usage_from(rows: Vec<(String, i64, i64)>) -> Vec<KeyUsage> {
    rows.into_iter()
        .map(|(key_id, bucket, count)| KeyUsage {
            key_id,
            bucket,
            count: u64::try_from(count).unwrap_or(0),
        })
        .collect()
}

/// Each key's unfinished tasks: one branch per state, so that each walks its state's partial
/// index (`tasks_ready`, `tasks_leased`); `state IN (…)` matches neither and scans the table.
/// `key_id` is then read from each row: the cost grows with the unfinished tasks, not the
/// table (docs/gateway.md gives the measurements).
pub const UNFINISHED_BY_KEY_SQL: &str = "SELECT key_id, count(*) FROM \
     (SELECT key_id FROM tasks WHERE state = 'pending' \
      UNION ALL SELECT key_id FROM tasks WHERE state = 'processing') unfinished \
     WHERE key_id IS NOT NULL GROUP BY key_id";

/// Rows of [`UNFINISHED_BY_KEY_SQL`] as counts.
pub fn unfinished_from(rows: Vec<(String, i64)>) -> Vec<(String, u64)> {
    rows.into_iter()
        .map(|(k, n)| (k, u64::try_from(n).unwrap_or(0)))
        .collect()
}

#[derive(sqlx::FromRow)]
pub struct KeyRow {
    id: String,
    kind: String,
    tenant_id: String,
    tenant_name: String,
    name: String,
    prefix: String,
    created_at: i64,
    revoked_at: Option<i64>,
    key_hash: Vec<u8>,
    models: Option<String>,
    read_only: bool,
    requests_per_minute: Option<i64>,
    concurrent_tasks: Option<i64>,
}

impl From<KeyRow> for ApiKeyRecord {
    fn from(r: KeyRow) -> Self {
        ApiKeyRecord {
            id: r.id,
            kind: if r.kind == "worker" {
                KeyKind::Worker
            } else {
                KeyKind::Client
            },
            tenant: Tenant {
                id: r.tenant_id,
                name: r.tenant_name,
            },
            name: r.name,
            prefix: r.prefix,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            key_hash: r.key_hash,
            policy: KeyPolicy {
                // A list that cannot be read allows nothing rather than everything.
                models: r
                    .models
                    .map(|m| serde_json::from_str(&m).unwrap_or_default()),
                read_only: r.read_only,
                requests_per_minute: r.requests_per_minute.map(limit_from),
                concurrent_tasks: r.concurrent_tasks.map(limit_from),
            },
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct TenantRow {
    id: String,
    name: String,
}

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Tenant {
            id: r.id,
            name: r.name,
        }
    }
}

pub const DELIVERY_COLUMNS: &str = "id, task_id, tenant_id, url, host, state, attempts, \
     next_attempt_at, created_at, completed_at, last_error, event, payload";

/// A delivery claim's `RETURNING` list: the delivery and its task's model, which the delivery's
/// span and log lines carry (one primary-key read per claimed delivery; `NULL` once the task is
/// gone).
pub fn delivery_claim_returning() -> String {
    format!(
        "{DELIVERY_COLUMNS}, (SELECT t.model FROM tasks t \
         WHERE t.id = webhook_deliveries.task_id) AS model"
    )
}

#[derive(sqlx::FromRow)]
pub struct ClaimedDeliveryRow {
    #[sqlx(flatten)]
    pub delivery: DeliveryRow,
    pub model: Option<String>,
}

impl ClaimedDeliveryRow {
    pub fn into_claim(self, token: &str) -> super::DeliveryClaim {
        super::DeliveryClaim {
            delivery: self.delivery.into(),
            model: self.model,
            token: token.to_owned(),
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct DeliveryRow {
    id: String,
    task_id: String,
    tenant_id: String,
    url: String,
    host: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    created_at: i64,
    completed_at: Option<i64>,
    last_error: Option<String>,
    event: String,
    payload: Option<String>,
}

impl From<DeliveryRow> for Delivery {
    fn from(r: DeliveryRow) -> Self {
        Delivery {
            id: r.id,
            task_id: r.task_id,
            tenant_id: r.tenant_id,
            url: r.url,
            host: r.host,
            state: r.state,
            attempts: r.attempts as u32,
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
            completed_at: r.completed_at,
            last_error: r.last_error,
            // The column's CHECK admits only the three names.
            event: WebhookEvent::parse(&r.event).unwrap_or_default(),
            payload: r.payload,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct AttemptRow {
    attempted_at: i64,
    status_code: Option<i64>,
    latency_ms: i64,
    error: Option<String>,
}

impl From<AttemptRow> for DeliveryAttempt {
    fn from(r: AttemptRow) -> Self {
        DeliveryAttempt {
            attempted_at: r.attempted_at,
            status_code: r.status_code.and_then(|c| u16::try_from(c).ok()),
            latency_ms: r.latency_ms,
            error: r.error,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct SecretsRow {
    secret: String,
    previous_secret: Option<String>,
    previous_expires_at: Option<i64>,
}

impl From<SecretsRow> for WebhookSecrets {
    fn from(r: SecretsRow) -> Self {
        WebhookSecrets {
            current: r.secret,
            previous: r.previous_secret,
            previous_expires_at: r.previous_expires_at,
        }
    }
}

/// Claims from the rows a batch claim returned, oldest first, each with its token
/// (`prefix` + task id, as the statement wrote it).
pub fn claims_from_rows(rows: Vec<TaskRow>, prefix: &str) -> Result<Vec<super::Claim>, StoreError> {
    let mut claims = rows
        .into_iter()
        .map(|r| {
            let task = Task::try_from(r)?;
            Ok(super::Claim {
                token: format!("{prefix}{}", task.id),
                task,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    claims.sort_by(|a, b| a.task.id.cmp(&b.task.id));
    Ok(claims)
}

/// The columns `finish` writes for an outcome: state, outputs JSON, failCode, failMsg.
pub type OutcomeColumns<'a> = (TaskState, Option<String>, Option<&'a str>, Option<&'a str>);

pub fn outcome_columns(outcome: &super::Outcome) -> Result<OutcomeColumns<'_>, StoreError> {
    Ok(match outcome {
        super::Outcome::Success { outputs, .. } => (
            TaskState::Success,
            Some(serde_json::to_string(outputs).map_err(|e| StoreError::Invalid(e.to_string()))?),
            None,
            None,
        ),
        super::Outcome::Failure { code, message } => (
            TaskState::Failed,
            None,
            Some(code.as_str()),
            Some(message.as_str()),
        ),
    })
}

/// The last error a delivery attempt leaves: its transport error, or the non-2xx status.
pub fn attempt_error(attempt: Option<&DeliveryAttempt>) -> Option<String> {
    let a = attempt?;
    a.error.clone().or_else(|| {
        a.status_code
            .filter(|c| !(200..300).contains(c))
            .map(|c| format!("the receiver answered HTTP {c}"))
    })
}

/// `state`, `next_attempt_at`, `completed_at` after an attempt.
pub fn delivery_next_columns(
    next: super::DeliveryNext,
    now: i64,
) -> (&'static str, Option<i64>, Option<i64>) {
    match next {
        super::DeliveryNext::Succeeded => ("succeeded", None, Some(now)),
        super::DeliveryNext::Failed => ("failed", None, Some(now)),
        super::DeliveryNext::RetryAt(t) | super::DeliveryNext::Defer(t) => {
            ("pending", Some(t), None)
        }
    }
}

/// failMsg of a task whose model the server no longer offers.
pub fn removed_message(model: &str) -> String {
    format!(
        "the server no longer offers model {model:?} (it was removed from the configuration), so this task cannot run"
    )
}

/// failMsg of a task whose attempts all ended with their runner gone.
pub const EXHAUSTED_SQL: &str = "'the task was interrupted ' || attempts || ' time(s) \
     (its worker stopped or was killed) and has no attempts left'";

/// The columns a new task's row is written with, in this order, by both stores' group commits.
pub const NEW_TASK_COLUMNS: &str = "id, tenant_id, model, state, input, callback_url, \
     max_attempts, run_after, create_time, priority, expires_at, webhook_events, trace_parent, \
     key_id";

/// The multi-row `INSERT` of new tasks (state `pending`, due at creation) through sqlx: the
/// PostgreSQL group commit writes a batch of submits with it. (SQLite's writer thread writes the
/// same statement through rusqlite, in `store/sqlite/writer.rs`.)
pub fn insert_tasks<'a, DB>(
    tasks: impl IntoIterator<Item = &'a super::NewTask>,
) -> Result<sqlx::QueryBuilder<'a, DB>, StoreError>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i16: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let rows = tasks
        .into_iter()
        .map(|t| serde_json::to_string(&t.input).map(|input| (t, input)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let mut qb = sqlx::QueryBuilder::new(format!("INSERT INTO tasks ({NEW_TASK_COLUMNS}) "));
    qb.push_values(rows, |mut b, (t, input)| {
        b.push_bind(t.id.as_str())
            .push_bind(t.tenant_id.as_str())
            .push_bind(t.model.as_str())
            .push_bind("pending")
            .push_bind(input)
            .push_bind(t.callback_url.as_deref())
            .push_bind(i64::from(t.max_attempts))
            .push_bind(t.create_time)
            .push_bind(t.create_time)
            .push_bind(i64::from(t.priority))
            .push_bind(t.expires_at)
            .push_bind(t.webhook_events.bits())
            .push_bind(t.trace_parent.as_deref())
            .push_bind(t.key_id.as_deref());
    });
    Ok(qb)
}

/// A row of a retention walk: `SELECT id, complete_time, outputs`.
pub type FinishedRow = (String, i64, Option<String>);

pub fn finished_from_rows(rows: Vec<FinishedRow>) -> Result<Vec<super::Finished>, StoreError> {
    rows.into_iter()
        .map(|(id, complete_time, outputs)| {
            let outputs = match outputs {
                Some(s) => serde_json::from_str(&s)
                    .map_err(|e| StoreError::Invalid(format!("task outputs: {e}")))?,
                None => Vec::new(),
            };
            Ok(super::Finished {
                id,
                complete_time,
                outputs,
            })
        })
        .collect()
}

/// The retention walk's statement: finished tasks before `before`, after a position, oldest
/// first. Placeholders are written by `p(n)` so one text serves both dialects: 1 is `before`,
/// 2 the limit, 3 and 4 the position (bound only when `after`).
pub fn finished_tasks_sql(after: bool, p: impl Fn(u32) -> String) -> String {
    let position = if after {
        format!(
            // A row value, so that PostgreSQL (and SQLite) take it as the index range's lower
            // bound; the equivalent OR is a filter on PostgreSQL, rescanning every earlier row.
            "AND (complete_time, id) > ({a}, {b})",
            a = p(3),
            b = p(4)
        )
    } else {
        String::new()
    };
    format!(
        "SELECT id, complete_time, outputs FROM tasks \
         WHERE complete_time IS NOT NULL AND complete_time < {before} {position} \
         ORDER BY complete_time, id LIMIT {limit}",
        before = p(1),
        limit = p(2)
    )
}

/// Deletes a task's records where it is final and owes no callback (`{ids}` is a subquery
/// yielding the ids, in the dialect's form): the deliveries' attempts, the deliveries, the log
/// lines, then the task. Blobs go by key, before (their keys are the task's outputs).
pub fn delete_tasks_sql(ids: &str) -> [String; 4] {
    let deletable = format!(
        "SELECT t.id FROM tasks t WHERE t.id IN ({ids}) AND t.complete_time IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.task_id = t.id \
                         AND d.state IN ('pending', 'delivering'))"
    );
    [
        format!(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT id FROM webhook_deliveries WHERE task_id IN ({deletable}))"
        ),
        format!("DELETE FROM webhook_deliveries WHERE task_id IN ({deletable})"),
        format!("DELETE FROM task_logs WHERE task_id IN ({deletable})"),
        format!("DELETE FROM tasks WHERE id IN ({deletable}) RETURNING id"),
    ]
}

/// Trims a task's log after an append to its newest `MAX_LOG_LINES` lines and `MAX_LOG_BYTES`
/// bytes: the lines to drop are the oldest ones (a running count and sum from the newest
/// back), so one `seq <=` bound deletes them. Placeholder 1 (written by `p`) is the task id;
/// `byte_len` is the dialect's byte length of `line`. Reads at most the task's own lines
/// (the cap plus one flush), through the primary key.
pub fn trim_logs_sql(p: impl Fn(u32) -> String, byte_len: &str) -> String {
    format!(
        "DELETE FROM task_logs WHERE task_id = {id} AND seq <= \
         (SELECT max(seq) FROM (SELECT seq, row_number() OVER w AS n, \
                                       sum({byte_len}) OVER w AS bytes \
                                FROM task_logs WHERE task_id = {id} \
                                WINDOW w AS (ORDER BY seq DESC)) newest_first \
          WHERE n > {lines} OR bytes > {bytes})",
        id = p(1),
        lines = crate::domain::MAX_LOG_LINES,
        bytes = crate::domain::MAX_LOG_BYTES,
    )
}

/// A task's log lines (`seq`, `at`, `line`), oldest first: after a seq (placeholders: 1 the
/// task, 2 the seq, 3 the limit), or the newest (1 the task, 2 the limit).
pub fn log_tail_sql(after: bool, p: impl Fn(u32) -> String) -> String {
    if after {
        format!(
            "SELECT seq, at, line FROM task_logs WHERE task_id = {} AND seq > {} \
             ORDER BY seq LIMIT {}",
            p(1),
            p(2),
            p(3)
        )
    } else {
        format!(
            "SELECT seq, at, line FROM (SELECT seq, at, line FROM task_logs \
             WHERE task_id = {} ORDER BY seq DESC LIMIT {}) newest ORDER BY seq",
            p(1),
            p(2)
        )
    }
}

/// A row of a log read.
pub type LogRow = (i64, i64, String);

pub fn log_lines(rows: Vec<LogRow>) -> Vec<taskgate_proto::TaskLogLine> {
    rows.into_iter()
        .map(|(seq, at, line)| taskgate_proto::TaskLogLine {
            seq: u64::try_from(seq).unwrap_or(0),
            at,
            line,
        })
        .collect()
}

/// A pending task's place in its *tenant's* queue of its model: the tenant's pending tasks a
/// claim would take first (`ORDER BY priority DESC, id`), as two ranges of the `tasks_ready`
/// index (higher priority; same priority and older), each walked to at most
/// `MAX_QUEUE_POSITION` index entries so the work is bounded however long the queue; with the
/// task's tenant and its name, from which `store::fair::queue_estimate` adds the other tenants'
/// shares. Tasks waiting out a retry's backoff count as ahead: filtering them (`run_after`,
/// `expires_at` are not in the index) made the walk unbounded, a review measured 42 ms per poll
/// behind 300k tasks in backoff. No row when the task is not pending. Placeholders: 1 the task
/// id, 2 now (unused, kept for the callers' binds).
pub fn queue_position_sql(p: impl Fn(u32) -> String) -> String {
    let cap = taskgate_proto::MAX_QUEUE_POSITION;
    let (id, now) = (p(1), p(2));
    let ahead = |order: &str| {
        format!(
            "(SELECT count(*) FROM (SELECT 1 FROM tasks o, me WHERE o.model = me.model \
             AND o.tenant_id = me.tenant_id AND o.state = 'pending' AND {order} \
             AND {now} = {now} LIMIT {cap}) ahead)"
        )
    };
    format!(
        "WITH me AS (SELECT model, tenant_id, priority, id FROM tasks \
                     WHERE id = {id} AND state = 'pending') \
         SELECT {} + {} AS ahead, me.model AS model, me.tenant_id AS tenant_id, \
                (SELECT name FROM tenants WHERE id = me.tenant_id) AS name FROM me",
        ahead("o.priority > me.priority"),
        ahead("o.priority = me.priority AND o.id < me.id"),
    )
}

/// A pending task's row of [`queue_position_sql`].
#[derive(Debug, sqlx::FromRow)]
pub struct QueuePlace {
    pub ahead: i64,
    pub model: String,
    pub tenant_id: String,
    pub name: Option<String>,
}

/// `(model, state, count)` of pending and processing tasks, for both dialects. Each half is
/// the one state of a partial index on `model` (`tasks_ready`, `tasks_running_by_model`), so
/// the grouping walks those indexes (PostgreSQL: an index-only scan) and never the finished
/// tasks, however many are kept. The state is cast to text for PostgreSQL's decoder.
pub const QUEUE_DEPTHS_SQL: &str = "\
    SELECT model, CAST('pending' AS TEXT), count(*) FROM tasks WHERE state = 'pending' GROUP BY model \
    UNION ALL \
    SELECT model, CAST('processing' AS TEXT), count(*) FROM tasks WHERE state = 'processing' GROUP BY model";

/// The claim's guard against deadlines: a pending task past its `expires_at` is not started
/// (the expiry sweep fails it). `now` is the placeholder of the claim's time. The claim clears
/// `expires_at`: the deadline is to *start*, so a task that started and went back to pending (a
/// retry, a lost worker, a shutdown) is never expired.
pub fn not_expired(now: &str) -> String {
    format!("(expires_at IS NULL OR expires_at > {now})")
}

/// Why a task expired, for its failMsg.
pub const EXPIRED_MESSAGE: &str =
    "the task was not started before its deadline (ttl_seconds) and was not run";

/// SQL true when the task row (columns prefixed with `table`, e.g. `t.` or empty) owes `event`
/// a delivery: it has a callback URL and asked for the event.
pub fn asks(event: WebhookEvent, table: &str) -> String {
    format!(
        "({table}callback_url IS NOT NULL AND ({table}webhook_events & {}) <> 0)",
        EventMask::bit(event)
    )
}

/// A claim's `RETURNING` list: the task, and whether this claim owes it a `start` delivery (so
/// that the claim writes start rows only when one of its tasks asked: the others pay nothing).
pub fn claim_returning() -> String {
    format!(
        "{TASK_COLUMNS}, {} AS wants_start",
        asks(WebhookEvent::Start, "")
    )
}

/// A claimed task's row as [`claim_returning`] lists it.
#[derive(sqlx::FromRow)]
pub struct ClaimedRow {
    #[sqlx(flatten)]
    pub task: TaskRow,
    pub wants_start: bool,
}

impl ClaimedRow {
    /// The row as the SQLite writer thread's rusqlite connection returns it.
    pub fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(ClaimedRow {
            task: TaskRow::from_sqlite(r)?,
            wants_start: r.get(TASK_COLUMNS_LEN)?,
        })
    }
}

/// The ids of the claimed tasks that owe a `start` delivery.
pub fn start_event_ids(rows: &[ClaimedRow]) -> Vec<&str> {
    rows.iter()
        .filter(|r| r.wants_start)
        .map(|r| r.task.id.as_str())
        .collect()
}

/// Which SQL dialect a statement is written for, where the two spell a function differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A start or progress delivery's payload, as SQL over the task row `t` at the moment of the
/// event: the status view of a processing task (statusTask's `data`: taskId, state,
/// createTime, progress), with `progress` the given SQL expression (the reported value, bound,
/// or the row's). The deliverer parses it into `TaskStatus` and serialises the envelope the
/// way it serialises every other, so both dialects' JSON spellings send the same bytes.
pub fn status_snapshot(dialect: Dialect, progress: &str) -> String {
    let fields = format!(
        "'taskId', t.id, 'state', t.state, 'createTime', t.create_time, 'progress', {progress}"
    );
    match dialect {
        Dialect::Sqlite => format!("json_object({fields})"),
        Dialect::Postgres => format!("json_build_object({fields})::text"),
    }
}

/// The outbox rows of `start` events: for each `(task id, delivery id)` pair the statement's
/// `pairs` yields (a subquery in the dialect's form, columns `task` and `delivery`), a pending
/// delivery carrying the task's status as the claim left it, where the task asked for it.
/// `{now}` is the placeholder of the claim's time.
pub fn insert_start_events_sql(dialect: Dialect, pairs: &str, now: &str) -> String {
    format!(
        "INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, next_attempt_at, \
         created_at, event, payload) \
         SELECT p.delivery, t.id, t.tenant_id, t.callback_url, 'pending', {now}, {now}, 'start', \
                {snapshot} \
         FROM ({pairs}) p JOIN tasks t ON t.id = p.task WHERE {asked}",
        snapshot = status_snapshot(dialect, "t.progress"),
        asked = asks(WebhookEvent::Start, "t."),
    )
}

/// Least time between two `progress` deliveries of one task, in ms.
pub const PROGRESS_EVENT_INTERVAL_MS: i64 = 1000;

/// SQL true when a progress report of the task row `t` (its values before the report) owes a
/// `progress` delivery: the task asked for progress events, the value `{progress}` differs
/// from the stored one, and its last progress delivery is at least
/// [`PROGRESS_EVENT_INTERVAL_MS`] older than `{now}`.
pub fn owes_progress_event(dialect: Dialect, progress: &str, now: &str) -> String {
    let changed = match dialect {
        Dialect::Sqlite => format!("t.progress IS NOT {progress}"),
        Dialect::Postgres => format!("t.progress IS DISTINCT FROM {progress}"),
    };
    format!(
        "({asked} AND {changed} AND (t.last_progress_event_at IS NULL \
          OR t.last_progress_event_at <= {now} - {PROGRESS_EVENT_INTERVAL_MS}))",
        asked = asks(WebhookEvent::Progress, "t."),
    )
}

/// Withdraws a task's start callback that has not been sent yet, when its claim is handed back
/// uncounted (the claim never reached its runner): the start it announced did not happen. A
/// start already sent stays sent; the next claim announces another. `p(1)` is the task id.
pub fn withdraw_start_sql(p: &str) -> String {
    format!(
        "DELETE FROM webhook_deliveries WHERE task_id = {p} AND event = 'start' \
         AND state = 'pending' AND attempts = 0"
    )
}
