//! The usage report's one store read, with its SQL for both dialects: a tenant's tasks created
//! in a window, grouped, counted per state, with the milliseconds their attempts ran. It is
//! computed from the task rows themselves (state, times, attempt history), so there is no
//! second record of usage that could drift from the tasks. Nothing here is written, and no hot
//! path reads it.
//!
//! The walk: the `(tenant_id, id)` index over the id range the window's times give (ids start
//! with their creation time, [`id_floor`]/[`id_ceiling`] add the clock slack), with
//! `create_time` as the exact test, so a report reads only the tenant's tasks of the window.

use taskgate_proto::{StateCounts, TaskState, UsageGroupBy};

use super::dashboard::{id_ceiling, id_floor};
use super::rows::Dialect;
use super::StoreError;

/// A usage read: the tenant's tasks with `from <= create_time < to`, grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub tenant_id: String,
    pub from: i64,
    pub to: i64,
    pub group_by: UsageGroupBy,
}

/// One group's figures as the store counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageAggregate {
    /// The model name; for days, the UTC day number (days since 1970-01-01) as text.
    pub group: String,
    pub counts: StateCounts,
    /// Milliseconds the group's ended attempts ran (see [`run_ms_sql`]).
    pub run_ms: i64,
}

/// The SQL of a group's value, as text in both dialects; `None` for a grouping the schema cannot
/// answer. `key` groups by `tasks.key_id` (migration 0020); tasks from before it have none and
/// group under the empty id.
fn group_sql(g: UsageGroupBy) -> Option<&'static str> {
    match g {
        UsageGroupBy::Model => Some("model"),
        // Integer division: the UTC day of creation, the same in both dialects.
        UsageGroupBy::Day => Some("CAST(create_time / 86400000 AS TEXT)"),
        UsageGroupBy::Key => Some("COALESCE(key_id, '')"),
    }
}

/// A task row's run time in ms: each attempt in its history (`endedAt - startedAt`: retried
/// attempts, lost leases, restarts), plus the last attempt's `complete_time - start_time` when
/// the task ended while that attempt ran. The row's `start_time` is its last claim's and is not
/// cleared by a requeue, so a task that ended while pending (cancelled, its model removed) would
/// count its wait: the last attempt counts only when `attempts` is above the history's last
/// attempt number, i.e. a claim came after the last requeue and was not refunded (a requeue
/// that refunds, at shutdown or for a claim never acknowledged, takes `attempts` back down).
fn run_ms_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "(COALESCE((SELECT sum(json_extract(h.value, '$.endedAt') - json_extract(h.value, '$.startedAt')) \
               FROM json_each(attempt_history) h), 0) \
             + CASE WHEN complete_time > start_time \
                     AND attempts > COALESCE(json_extract(attempt_history, '$[#-1].attempt'), 0) \
               THEN complete_time - start_time ELSE 0 END)"
        }
        Dialect::Postgres => {
            "(COALESCE((SELECT sum((h ->> 'endedAt')::bigint - (h ->> 'startedAt')::bigint) \
               FROM jsonb_array_elements(attempt_history::jsonb) h), 0) \
             + CASE WHEN complete_time > start_time \
                     AND attempts > COALESCE((attempt_history::jsonb -> -1 ->> 'attempt')::bigint, 0) \
               THEN complete_time - start_time ELSE 0 END)"
        }
    }
}

/// The grouped aggregate: binds tenant, id floor, id ceiling, `from`, `to` in that order.
pub fn usage_sql(d: Dialect, g: UsageGroupBy) -> Result<String, StoreError> {
    let group = group_sql(g).ok_or_else(|| {
        StoreError::Invalid(format!(
            "usage grouped by {} needs a column the tasks do not have yet",
            g.as_str()
        ))
    })?;
    let p = |n: u8| match d {
        Dialect::Sqlite => format!("?{n}"),
        Dialect::Postgres => format!("${n}"),
    };
    let per_state =
        |s: TaskState| format!("sum(CASE WHEN state = '{}' THEN 1 ELSE 0 END)", s.as_str());
    Ok(format!(
        "SELECT {group} AS grp, {}, {}, {}, {}, CAST(COALESCE(sum({}), 0) AS BIGINT) \
         FROM tasks WHERE tenant_id = {} AND id >= {} AND id < {} \
         AND create_time >= {} AND create_time < {} GROUP BY grp",
        per_state(TaskState::Pending),
        per_state(TaskState::Processing),
        per_state(TaskState::Success),
        per_state(TaskState::Failed),
        run_ms_sql(d),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
    ))
}

/// What [`usage_sql`] binds after the tenant: the id range and the exact time bounds.
pub fn usage_bounds(q: &UsageQuery) -> (String, String, i64, i64) {
    (id_floor(q.from), id_ceiling(q.to), q.from, q.to)
}

/// Runs [`usage_sql`] for `$query` on `$pool` in `$dialect`: one text for both dialects' impls
/// (a macro, since the two pools' types differ and sqlx's generic bounds would outweigh it).
macro_rules! read_usage {
    ($pool:expr, $dialect:expr, $query:expr) => {{
        use $crate::store::usage::{usage_bounds, usage_rows, usage_sql, UsageSqlRow};
        let (floor, ceiling, from, to) = usage_bounds($query);
        let rows: Vec<UsageSqlRow> = sqlx::query_as(&usage_sql($dialect, $query.group_by)?)
            .bind(&$query.tenant_id)
            .bind(floor)
            .bind(ceiling)
            .bind(from)
            .bind(to)
            .fetch_all($pool)
            .await?;
        Ok(usage_rows(rows))
    }};
}
pub(crate) use read_usage;

/// A row of [`usage_sql`].
pub type UsageSqlRow = (String, i64, i64, i64, i64, i64);

/// The rows of [`usage_sql`], in the order the store gave them.
pub fn usage_rows(rows: Vec<UsageSqlRow>) -> Vec<UsageAggregate> {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    rows.into_iter()
        .map(
            |(group, pending, processing, success, failed, run_ms)| UsageAggregate {
                group,
                counts: StateCounts {
                    pending: n(pending),
                    processing: n(processing),
                    success: n(success),
                    failed: n(failed),
                },
                run_ms: run_ms.max(0),
            },
        )
        .collect()
}
