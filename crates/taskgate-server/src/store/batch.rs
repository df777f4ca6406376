//! What the listing, batch and keyed submits hand the store: a page query of a tenant's tasks,
//! and an `Idempotency-Key` with the hash of the request it came with. Both stores implement
//! the methods in their own dialect (`sqlite/batch.rs`, `postgres/batch.rs`); the listing's SQL
//! is built here once for both.

use taskgate_proto::TaskState;

use super::StoreError;

/// A page of one tenant's tasks, newest (greatest id) first. Task ids are `task_` + a ULID,
/// so id order is creation order to the millisecond, and a page that starts below the last id
/// of the page before it neither skips nor repeats a task while new ones are added (they sort
/// above every page already read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQuery {
    pub tenant_id: String,
    pub model: Option<String>,
    pub state: Option<TaskState>,
    /// Only tasks created after this time (Unix ms, exclusive).
    pub created_after: Option<i64>,
    /// Only tasks created before this time (Unix ms, exclusive).
    pub created_before: Option<i64>,
    /// Only tasks whose id sorts below this one: the page after the one that ended there.
    pub before_id: Option<String>,
    /// Only tasks whose id sorts above this one (a bound derived from `created_after`, so the
    /// walk stops there instead of reading the tenant's whole history).
    pub after_id: Option<String>,
    pub limit: usize,
    /// With a `model` or `state`, which are checked row by row, the walk reads at most this
    /// many of the tenant's tasks; a page that ran out of them says where it stopped
    /// ([`TaskPage::examined_to`]).
    pub max_examined: usize,
}

/// A page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    pub tasks: Vec<crate::domain::Task>,
    /// Set when the walk reached `max_examined` before filling the page: the lowest id it
    /// examined. The next page starts below it (there may be matches further down).
    pub examined_to: Option<String>,
}

/// An `Idempotency-Key` as the store keeps it: one row per tenant and key, written in the
/// transaction that inserts the tasks the request created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub tenant_id: String,
    pub key: String,
    /// SHA-256 of what the request asked for (endpoint, model, raw body): a replay must match.
    pub request_hash: Vec<u8>,
    /// When the request arrived (Unix ms): the row's `created_at`.
    pub now: i64,
    /// A row created at or before this time has expired: it is ignored and replaced.
    pub expired_at_or_before: i64,
}

/// What a keyed insert did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyedInsert {
    /// The key was new (or its row had expired): the tasks were inserted, with the key.
    Inserted,
    /// The key was used before for the same request: nothing was inserted; these are the ids
    /// of the tasks that request created, in its order.
    Replayed(Vec<String>),
    /// The key was used before for another request: nothing was inserted.
    Mismatch,
}

/// The columns a listing reads: a task's row without its input (`''`), which a status view
/// never shows and which may be large, so a page of 100 tasks does not read 100 inputs; nor
/// its trace context, which only a claim uses.
pub const LIST_COLUMNS: &str = "id, tenant_id, model, state, '' AS input, callback_url, \
     attempts, max_attempts, create_time, start_time, complete_time, outputs, fail_code, \
     fail_msg, progress, CAST(NULL AS TEXT) AS trace_parent, route";

/// The listing's statement, in either dialect (the builder writes `?` or `$n`). It walks the
/// index `(tenant_id, id)` backwards from the cursor; the other filters are checked on the rows
/// it walks, within the floor when one is given.
pub fn list_query<'a, DB>(q: &'a TaskQuery, floor: Option<&'a str>) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = sqlx::QueryBuilder::new(format!(
        "SELECT {LIST_COLUMNS} FROM tasks WHERE tenant_id = "
    ));
    qb.push_bind(q.tenant_id.as_str());
    if let Some(model) = &q.model {
        qb.push(" AND model = ").push_bind(model.as_str());
    }
    if let Some(state) = q.state {
        qb.push(" AND state = ").push_bind(state.as_str());
    }
    if let Some(after) = q.created_after {
        qb.push(" AND create_time > ").push_bind(after);
    }
    if let Some(before) = q.created_before {
        qb.push(" AND create_time < ").push_bind(before);
    }
    if let Some(id) = &q.before_id {
        qb.push(" AND id < ").push_bind(id.as_str());
    }
    if let Some(id) = &q.after_id {
        qb.push(" AND id > ").push_bind(id.as_str());
    }
    if let Some(floor) = floor {
        qb.push(" AND id >= ").push_bind(floor);
    }
    qb.push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::try_from(q.limit).unwrap_or(i64::MAX));
    qb
}

/// The lowest id of the first `max_examined` tasks the listing's walk reads (tenant, cursor and
/// id bounds, newest first), if there are that many: an index-only walk that bounds the page
/// query's row-by-row `model` and `state` checks.
pub fn floor_query<'a, DB>(q: &'a TaskQuery) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = sqlx::QueryBuilder::new("SELECT id FROM tasks WHERE tenant_id = ");
    qb.push_bind(q.tenant_id.as_str());
    if let Some(id) = &q.before_id {
        qb.push(" AND id < ").push_bind(id.as_str());
    }
    if let Some(id) = &q.after_id {
        qb.push(" AND id > ").push_bind(id.as_str());
    }
    qb.push(" ORDER BY id DESC LIMIT 1 OFFSET ")
        .push_bind(i64::try_from(q.max_examined.saturating_sub(1)).unwrap_or(i64::MAX));
    qb
}

/// Whether a listing needs its walk bounded: the `model` and `state` filters are checked row by
/// row along `(tenant_id, id)` (the ids are the index range).
pub fn needs_floor(q: &TaskQuery) -> bool {
    q.state.is_some() || q.model.is_some()
}

/// The ids a key row holds (a JSON array).
pub fn task_ids_from_json(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Invalid(format!("idempotency key's task ids: {e}")))
}

/// The ids a key row is written with.
pub fn task_ids_json<'a>(ids: impl Iterator<Item = &'a str>) -> Result<String, StoreError> {
    serde_json::to_string(&ids.collect::<Vec<_>>()).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Rows of a multi-row insert per statement: 13 parameters each stays far below SQLite's limit
/// of 32766 bound parameters (and PostgreSQL's 65535).
pub const INSERT_CHUNK: usize = 500;
