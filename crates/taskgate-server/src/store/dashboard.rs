//! What the dashboard and operator endpoints ask of the store, with the SQL both dialects share:
//! task counts over an id range, the attempt history appended by requeues, the webhook backlog
//! and the pull workers seen. Each dialect runs these in `sqlite/dashboard.rs` and
//! `postgres/dashboard.rs`.
//!
//! None of it is on a hot path: the history is written only by a requeue (never by a task that
//! succeeds at its first attempt), and workers are recorded at most every 10 s per worker per
//! node (`api/operator.rs` throttles).

use taskgate_proto::{AttemptInfo, TaskState};

use super::rows::Dialect;
use super::StoreError;

/// How many tasks of one model are in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountRow {
    pub model: String,
    pub state: TaskState,
    pub count: u64,
}

/// Why an attempt ended without ending its task, for its entry in the task's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEnd {
    pub fail_code: String,
    /// Cut to [`MAX_HISTORY_FAIL_MSG`] characters when written.
    pub fail_msg: String,
    /// `worker:<name>` when the caller knows the worker; `None`: the row's runner.
    pub runner: Option<String>,
}

/// What a task's row says of its attempts beyond its status: the earlier attempts (its history)
/// and who runs (or ran) the current one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptRecord {
    pub history: Vec<AttemptInfo>,
    pub runner: Option<String>,
}

/// Longest failMsg kept in an attempt's history entry, in characters.
pub const MAX_HISTORY_FAIL_MSG: usize = 500;

/// The history entry's code when a lease ran out (the runner stopped, was killed or lost
/// contact) and the task went back to pending.
pub const LEASE_EXPIRED: &str = "LEASE_EXPIRED";
pub const LEASE_EXPIRED_MSG: &str =
    "the attempt's lease ended before it reported an outcome (its runner stopped, was killed or lost contact)";
/// The history entry's code when the server restarted under a local attempt.
pub const SERVER_RESTARTED: &str = "SERVER_RESTARTED";
pub const SERVER_RESTARTED_MSG: &str =
    "the server stopped while the attempt ran; the task was handed on when it started again";

/// Workers seen within this window are listed.
pub const WORKERS_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Most workers listed.
pub const MAX_WORKERS: usize = 1000;
/// Deliveries counted per class at most: the count stops there (one index range each).
pub const MAX_BACKLOG_COUNT: i64 = 100_000;
/// How far a task's id time may be from its `create_time` (both read from the clock at submit):
/// the id range starts this much earlier, and `create_time` is the exact test.
const ID_CLOCK_SLACK_MS: i64 = 5_000;

/// The smallest task id a task created at `since` may have (ids are `task_` + a lowercase ULID,
/// which starts with its time), less the clock slack.
pub fn id_floor(since: i64) -> String {
    smallest_id_at(since.saturating_sub(ID_CLOCK_SLACK_MS))
}

/// An id every task created before `before` sorts below (the clock slack added): the top of an
/// id range whose `create_time < before` is the exact test.
pub fn id_ceiling(before: i64) -> String {
    smallest_id_at(before.saturating_add(ID_CLOCK_SLACK_MS))
}

/// The smallest task id of millisecond `ms`, clamped to the ids' 48-bit time.
fn smallest_id_at(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0).min((1 << 48) - 1);
    format!(
        "task_{}",
        ulid::Ulid::from_parts(ms, 0)
            .to_string()
            .to_ascii_lowercase()
    )
}

/// Counts of one tenant's tasks per model and state, over the id range of `(tenant_id, id)` from
/// `?2`/`$2` (the id floor) with `create_time >= ?3`/`$3` as the exact test.
pub fn count_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "SELECT model, state, count(*) FROM tasks \
             WHERE tenant_id = ?1 AND id >= ?2 AND create_time >= ?3 GROUP BY model, state"
        }
        Dialect::Postgres => {
            "SELECT model, state, count(*) FROM tasks \
             WHERE tenant_id = $1 AND id >= $2 AND create_time >= $3 GROUP BY model, state"
        }
    }
}

/// The rows of [`count_sql`], checked.
pub fn count_rows(rows: Vec<(String, String, i64)>) -> Result<Vec<CountRow>, StoreError> {
    rows.into_iter()
        .map(|(model, state, count)| {
            Ok(CountRow {
                state: TaskState::parse(&state)
                    .ok_or_else(|| StoreError::Invalid(format!("task state {state:?}")))?,
                model,
                count: u64::try_from(count).unwrap_or(0),
            })
        })
        .collect()
}

/// The `SET` item that appends an attempt to `attempt_history`: the attempt number and start
/// time are the row's own (the values before the statement, in both dialects), the rest the
/// given SQL expressions; `runner` falls back to the row's runner column.
pub fn append_attempt_sql(
    d: Dialect,
    ended_at: &str,
    code: &str,
    msg: &str,
    runner: &str,
) -> String {
    match d {
        Dialect::Sqlite => format!(
            "attempt_history = json_insert(COALESCE(attempt_history, '[]'), '$[#]', \
             json_object('attempt', attempts, 'startedAt', start_time, 'endedAt', {ended_at}, \
             'failCode', {code}, 'failMsg', {msg}, 'runner', COALESCE({runner}, runner)))"
        ),
        Dialect::Postgres => format!(
            "attempt_history = (COALESCE(attempt_history::jsonb, '[]'::jsonb) || \
             jsonb_build_array(jsonb_build_object('attempt', attempts, 'startedAt', start_time, \
             'endedAt', ({ended_at})::bigint, 'failCode', ({code})::text, 'failMsg', ({msg})::text, \
             'runner', COALESCE(({runner})::text, runner))))::text"
        ),
    }
}

/// A history entry's failMsg, capped.
pub fn history_msg(msg: &str) -> String {
    crate::domain::clean_text(msg, MAX_HISTORY_FAIL_MSG)
}

/// The stored history, parsed (a history that does not parse is reported, not hidden).
pub fn parse_history(text: Option<&str>) -> Result<Vec<AttemptInfo>, StoreError> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(t)
            .map_err(|e| StoreError::Invalid(format!("attempt history: {e}"))),
    }
}

/// The webhook backlog of tenant `{t}` (the placeholder): not-yet-attempted, retrying and
/// failed deliveries, each counted up to [`MAX_BACKLOG_COUNT`] along the
/// `webhook_deliveries_backlog` index, and the earliest due time of the waiting ones. Each
/// subquery repeats the index's `state <> 'succeeded'`: SQLite uses a partial index only for a
/// query that states its condition, and otherwise walked every tenant's due deliveries.
pub fn backlog_sql(t: &str) -> String {
    let count = |cond: &str| {
        format!(
            "(SELECT count(*) FROM (SELECT 1 FROM webhook_deliveries \
             WHERE tenant_id = {t} AND state <> 'succeeded' AND {cond} LIMIT {MAX_BACKLOG_COUNT}) c)"
        )
    };
    format!(
        "SELECT {}, {}, {}, (SELECT min(next_attempt_at) FROM webhook_deliveries \
         WHERE tenant_id = {t} AND state <> 'succeeded' AND state = 'pending')",
        count("state IN ('pending', 'delivering') AND attempts = 0"),
        count("state IN ('pending', 'delivering') AND attempts > 0"),
        count("state = 'failed'"),
    )
}

/// A backlog row (`backlog_sql`'s four columns) as the wire type.
pub fn backlog_of(row: (i64, i64, i64, Option<i64>)) -> taskgate_proto::WebhookBacklog {
    let (pending, retrying, failed, oldest_due_at) = row;
    taskgate_proto::WebhookBacklog {
        pending: pending.max(0) as u64,
        retrying: retrying.max(0) as u64,
        failed: failed.max(0) as u64,
        oldest_due_at,
    }
}

/// The row of `SELECT attempt_history, runner FROM tasks WHERE id = …`, if the task exists.
pub fn attempt_record_of(
    row: Option<(Option<String>, Option<String>)>,
) -> Result<Option<AttemptRecord>, StoreError> {
    row.map(|(history, runner)| {
        Ok(AttemptRecord {
            history: parse_history(history.as_deref())?,
            runner,
        })
    })
    .transpose()
}

/// The upsert of a worker seen: an empty `models` (a heartbeat's) keeps the models recorded.
pub fn worker_upsert_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "INSERT INTO pull_workers (name, node, models, last_seen_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET node = CASE WHEN excluded.last_seen_at >= pull_workers.last_seen_at \
             THEN excluded.node ELSE pull_workers.node END, \
             last_seen_at = max(pull_workers.last_seen_at, excluded.last_seen_at), \
             models = CASE WHEN excluded.models = '[]' THEN pull_workers.models ELSE excluded.models END"
        }
        Dialect::Postgres => {
            "INSERT INTO pull_workers (name, node, models, last_seen_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET node = CASE WHEN excluded.last_seen_at >= pull_workers.last_seen_at \
             THEN excluded.node ELSE pull_workers.node END, \
             last_seen_at = GREATEST(pull_workers.last_seen_at, excluded.last_seen_at), \
             models = CASE WHEN excluded.models = '[]' THEN pull_workers.models ELSE excluded.models END"
        }
    }
}

pub fn workers_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "SELECT name, node, models, last_seen_at FROM pull_workers WHERE last_seen_at >= ?1 \
             ORDER BY last_seen_at DESC, name LIMIT ?2"
        }
        Dialect::Postgres => {
            "SELECT name, node, models, last_seen_at FROM pull_workers WHERE last_seen_at >= $1 \
             ORDER BY last_seen_at DESC, name LIMIT $2"
        }
    }
}

/// The rows of [`workers_sql`].
pub fn worker_rows(
    rows: Vec<(String, String, String, i64)>,
) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError> {
    rows.into_iter()
        .map(|(name, node, models, last_seen_at)| {
            Ok(taskgate_proto::WorkerSeen {
                models: serde_json::from_str(&models)
                    .map_err(|e| StoreError::Invalid(format!("worker {name:?}'s models: {e}")))?,
                name,
                node,
                last_seen_at,
            })
        })
        .collect()
}

/// A worker's models as stored.
pub fn models_json(models: &[String]) -> String {
    serde_json::to_string(models).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_floor_sorts_below_every_id_of_its_time_and_above_older_ones() {
        let at = 1_764_547_200_000;
        let floor = id_floor(at);
        let id = format!(
            "task_{}",
            ulid::Ulid::from_parts(at as u64, 0)
                .to_string()
                .to_ascii_lowercase()
        );
        assert!(floor < id);
        let old = format!(
            "task_{}",
            ulid::Ulid::from_parts((at - 10_000) as u64, u128::MAX)
                .to_string()
                .to_ascii_lowercase()
        );
        assert!(old < floor);
        assert_eq!(id_floor(-5), id_floor(0));
    }
}
