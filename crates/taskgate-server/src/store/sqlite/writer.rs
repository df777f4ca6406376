//! The SQLite writer thread: the group commit for the hot writes (submits, final states, claims).
//!
//! It owns a connection of its own (rusqlite) and runs every statement on its own thread. Through
//! sqlx, each statement was a message to the connection's worker thread and back: a round
//! (BEGIN, the writes, COMMIT) cost six or more thread switches, and on a VM a switch costs tens
//! of microseconds. Below saturation those switches, not SQLite, were what a task cost: a perf
//! profile at 435 submits/s showed 63 % of the server's samples in the kernel's scheduler and
//! 1.15 ms of CPU per task (docs/BENCHMARKS.md, "Issue 9"). Now a round is one wake-up of this
//! thread and one wake-up of each caller.
//!
//! The other writes (recovery, keys, webhooks) stay on the sqlx writer pool: SQLite still admits
//! one writer at a time, and both sides open their write transactions with `BEGIN IMMEDIATE`, so
//! neither can hold a read snapshot the other's commit makes stale.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::ToSql;
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use taskgate_proto::WebhookEvent;
use tokio::sync::{mpsc, oneshot, Notify};

use super::super::fair::{passes_sql, plan, tenants_sql, Share, TenantWeights};
use super::super::rows::{
    asks, claims_from_rows, insert_start_events_sql, outcome_columns, start_event_ids, ClaimedRow,
    Dialect, TaskRow, NEW_TASK_COLUMNS,
};
use super::super::{Blob, Claim, FinishRequest, NewTask, Outcome, Runner, StoreError};
use super::claim_sql;
use crate::domain::{new_id, now_ms, Transition};

/// Most writes taken into one group commit.
pub(super) const MAX_BATCH: usize = 512;

pub(super) type InsertRequest = (NewTask, oneshot::Sender<Result<(), StoreError>>);

/// A write for the writer loop, with where to send its answer.
pub(super) enum Write {
    Insert(NewTask, oneshot::Sender<Result<(), StoreError>>),
    Finish(FinishRequest),
    Claim(ClaimRequest),
    /// Look again at the parked claim of this model.
    Poke(String),
    /// Ends the loop after the writes queued before it, then answers: the connection is closed.
    Close(oneshot::Sender<()>),
}

/// A claim to make in the writer loop's next round.
pub(super) struct ClaimRequest {
    pub model: String,
    /// The claim's clock; `None` parks it: made at the time it runs, and when it finds nothing
    /// due it waits in the loop (unanswered) for a round that writes a task of its model.
    pub now: Option<i64>,
    pub lease_ms: i64,
    pub max_running: usize,
    pub limit: usize,
    pub runner: Runner,
    /// Fair-share weights, for a claim that chooses between tenants.
    pub weights: TenantWeights,
    pub reply: oneshot::Sender<Result<Vec<Claim>, StoreError>>,
}

/// Opens the writer's connection (the database exists and is migrated by now) and starts its
/// thread. It ends when the last sender (the store) is gone. `deliveries` is told after a round
/// that wrote start deliveries (the store's `listen` wakes the deliverer with it).
pub(super) async fn start(
    path: &Path,
    lock: Arc<tokio::sync::Mutex<()>>,
    deliveries: Arc<Notify>,
) -> Result<mpsc::Sender<Write>, StoreError> {
    let path = path.to_owned();
    let conn = tokio::task::spawn_blocking(move || open(&path))
        .await
        .map_err(|e| StoreError::Unavailable(e.into()))??;
    let (writes, rx) = mpsc::channel(MAX_BATCH * 4);
    std::thread::Builder::new()
        .name("taskgate-writer".into())
        .spawn(move || {
            let _watch = WriterWatch;
            write_loop(conn, rx, &lock, &deliveries)
        })
        .map_err(|e| StoreError::Unavailable(e.into()))?;
    Ok(writes)
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sqlite_error)?;
    // The same settings as the sqlx connections: a commit survives power loss (FULL), and a
    // write that meets another connection's waits instead of failing.
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sqlite_error)?;
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(sqlite_error)?;
    // Multi-row statements differ by row count: room for the sizes a busy server sees.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Says so loudly when the writer thread ends by a panic: every write fails from then on (callers
/// see the store as closed), and the log must tell why.
struct WriterWatch;

impl Drop for WriterWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the SQLite writer stopped after a panic; no write can succeed until the server restarts");
        }
    }
}

/// SQLite's answers that mean "not now" (locked, out of disk, I/O) rather than "this write is
/// wrong": the callers hear 503, as with the sqlx side's I/O errors.
pub(super) fn sqlite_error(e: rusqlite::Error) -> StoreError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
        )
    );
    if transient {
        StoreError::Unavailable(e.into())
    } else {
        StoreError::Database(e.into())
    }
}

/// The group-commit loop for the hot writes: it waits for one, takes every other one queued at
/// that moment (submits, final states and claims alike), writes them all in one transaction,
/// final states first so that the slots they free count for the claims after them, and answers
/// each caller after the commit. One fsync (`synchronous = FULL`) then covers a whole round,
/// however the work is mixed: with a transaction per kind, claims made one or two at a time
/// each paid an fsync of their own, and under a mixed load the writer fell behind.
fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Write>,
    lock: &tokio::sync::Mutex<()>,
    deliveries: &Notify,
) {
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    // Local loops' claims that found nothing due: each waits for a round that submits a task of
    // its model, and is made in that round's transaction, after the insert.
    let mut parked: Vec<ClaimRequest> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let (mut inserts, mut finishes, mut claims) = (Vec::new(), Vec::new(), Vec::new());
        let mut poked: Vec<String> = Vec::new();
        for w in batch.drain(..) {
            match w {
                Write::Insert(t, reply) => inserts.push((t, reply)),
                Write::Finish(f) => finishes.push(f),
                Write::Claim(c) => claims.push(c),
                Write::Poke(model) => poked.push(model),
                Write::Close(done) => closing = Some(done),
            }
        }
        // Withdrawn parked claims go; those whose model this round submits to, or that were
        // poked, run in it.
        parked.retain(|c| !c.reply.is_closed());
        let (wake, keep): (Vec<_>, Vec<_>) = parked.drain(..).partition(|c| {
            poked.contains(&c.model) || inserts.iter().any(|(t, _)| t.model == c.model)
        });
        parked = keep;
        claims.extend(wake);
        // Final states that took are told apart by task id, so a round naming one task twice
        // (a stale attempt and the current one finishing together) goes one write at a time.
        // The round's turn at the database, shared fairly with the sqlx connection's writes.
        let _turn = lock.blocking_lock();
        let distinct = super::super::distinct_tasks(finishes.iter().map(|r| r.id.as_str()));
        let round = if distinct {
            write_round(&mut conn, &inserts, &finishes, &claims, deliveries)
        } else {
            Err(StoreError::Conflict("a round names one task twice".into()))
        };
        match round {
            Ok((written, claimed)) => {
                for (_, reply) in inserts {
                    let _ = reply.send(Ok(()));
                }
                for (req, ok) in finishes.into_iter().zip(written) {
                    let _ = req.reply.send(Ok(ok));
                }
                for (req, (prefix, rows)) in claims.into_iter().zip(claimed) {
                    if rows.is_empty() && req.now.is_none() {
                        parked.push(req);
                        continue;
                    }
                    let answer = claims_from_rows(rows, &prefix);
                    if let Err(Ok(orphans)) = req.reply.send(answer) {
                        // The claimer went away (a pull worker's long-poll closed) after the
                        // claim was queued: hand the tasks back at once, uncounted.
                        give_back(&conn, &orphans);
                    }
                }
            }
            // The database cannot be written, or the commit's outcome is unknown (it may have
            // landed): every caller hears so. Writing each on its own would turn a commit that
            // landed into "not ours" (or a claim nobody runs), and wait out a timeout per write.
            Err(StoreError::Unavailable(e)) => {
                let msg = e.to_string();
                // A full disk stays recognisable to each caller (a submit answers 507).
                let full = crate::report::storage_full(&*e);
                let err = || {
                    if full {
                        StoreError::Unavailable(Box::new(crate::report::StorageFull(msg.clone())))
                    } else {
                        super::super::unavailable(&msg)
                    }
                };
                for (_, reply) in inserts {
                    let _ = reply.send(Err(err()));
                }
                for req in finishes {
                    let _ = req.reply.send(Err(err()));
                }
                for req in claims {
                    let _ = req.reply.send(Err(err()));
                }
            }
            Err(e) if inserts.len() + finishes.len() + claims.len() == 1 => {
                // Alone in its round: its own error.
                if let Some((_, reply)) = inserts.pop() {
                    let _ = reply.send(Err(e));
                } else if let Some(req) = finishes.pop() {
                    let _ = req.reply.send(Err(e));
                } else if let Some(req) = claims.pop() {
                    let _ = req.reply.send(Err(e));
                }
            }
            Err(_) => {
                // One bad write must not fail its neighbours: each on its own.
                for (task, reply) in inserts {
                    let one = [(task, oneshot::channel().0)];
                    let r = write_round(&mut conn, &one, &[], &[], deliveries).map(|_| ());
                    let _ = reply.send(r);
                }
                for req in finishes {
                    let r =
                        write_round(&mut conn, &[], std::slice::from_ref(&req), &[], deliveries)
                            .map(|(w, _)| w.first().copied().unwrap_or(false));
                    let _ = req.reply.send(r);
                }
                for req in claims {
                    let r =
                        write_round(&mut conn, &[], &[], std::slice::from_ref(&req), deliveries)
                            .and_then(|(_, mut c)| match c.pop() {
                                Some((prefix, rows)) => claims_from_rows(rows, &prefix),
                                None => Ok(Vec::new()),
                            });
                    if let Err(Ok(orphans)) = req.reply.send(r) {
                        give_back(&conn, &orphans);
                    }
                }
            }
        }
        if let Some(done) = closing {
            // Writes queued after the close find the channel gone and hear "unavailable".
            rx.close();
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

/// Which final states took, and each claim's token prefix and rows.
type RoundResult = (Vec<bool>, Vec<(String, Vec<TaskRow>)>);

/// One transaction: final states, then submits, then claims (with the start deliveries of the
/// claimed tasks that asked for them). `deliveries` is told after a commit that wrote any.
fn write_round(
    conn: &mut Connection,
    inserts: &[InsertRequest],
    finishes: &[FinishRequest],
    claims: &[ClaimRequest],
    deliveries: &Notify,
) -> Result<RoundResult, StoreError> {
    if inserts.is_empty() && finishes.is_empty() && claims.is_empty() {
        // A round that only closes.
        return Ok((Vec::new(), Vec::new()));
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite_error)?;
    let written = if finishes.is_empty() {
        Vec::new()
    } else {
        finish_in(&tx, finishes)?
    };
    if !inserts.is_empty() {
        insert_in(&tx, inserts)?;
    }
    let mut claimed = Vec::with_capacity(claims.len());
    let mut started = false;
    for c in claims {
        if c.reply.is_closed() {
            // Nobody waits for this claim any more: make none.
            claimed.push((String::new(), Vec::new()));
            continue;
        }
        // Each claim's token is its prefix and the task id: distinct, one statement.
        let prefix = format!("{}_", new_id("att"));
        let now = c.now.unwrap_or_else(now_ms);
        let rows = claim_fair(&tx, c, &prefix, now)?;
        started |= insert_start_events(&tx, &rows, now)?;
        claimed.push((prefix, rows.into_iter().map(|r| r.task).collect()));
    }
    // A failed commit may have landed all the same: its outcome is unknown.
    tx.commit().map_err(|e| StoreError::Unavailable(e.into()))?;
    if started {
        deliveries.notify_one();
    }
    Ok((written, claimed))
}

/// One claim, shared between the model's tenants (`store::fair`): the loose scan of the tenants
/// with pending tasks, then the per-tenant claim of each tenant's share, then (only when it chose
/// between tenants) their passes.
fn claim_fair(
    tx: &Connection,
    c: &ClaimRequest,
    prefix: &str,
    now: i64,
) -> Result<Vec<ClaimedRow>, StoreError> {
    let max_running = i64::try_from(c.max_running).unwrap_or(i64::MAX);
    let limit = i64::try_from(c.limit).unwrap_or(i64::MAX);
    let shares: Vec<Share> = tx
        .prepare_cached(&tenants_sql(Dialect::Sqlite, |n| format!("?{n}")))
        .and_then(|mut s| {
            s.query_map(
                rusqlite::params![c.model, now, limit, max_running],
                Share::from_sqlite,
            )?
            .collect()
        })
        .map_err(sqlite_error)?;
    let Some(first) = shares.first() else {
        return Ok(Vec::new());
    };
    let room = usize::try_from((max_running - first.running).min(limit)).unwrap_or(0);
    if room == 0 {
        return Ok(Vec::new());
    }
    let plan = plan(&shares, &c.weights, room);
    let mut rows = Vec::new();
    let mut stmt = tx.prepare_cached(&claim_sql()).map_err(sqlite_error)?;
    for (tenant, take) in &plan.take {
        let claimed = stmt
            .query_map(
                rusqlite::params![
                    prefix,
                    now + c.lease_ms,
                    now,
                    c.model,
                    max_running,
                    i64::try_from(*take).unwrap_or(i64::MAX),
                    c.runner.as_str(),
                    c.runner == Runner::Local,
                    tenant,
                ],
                ClaimedRow::from_sqlite,
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(sqlite_error)?;
        rows.extend(claimed);
    }
    if !plan.passes.is_empty() {
        let mut params: Vec<&dyn ToSql> = vec![&c.model];
        for (tenant, pass) in &plan.passes {
            params.extend_from_slice(&[tenant as &dyn ToSql, pass]);
        }
        tx.prepare_cached(&passes_sql(plan.passes.len(), |n| format!("?{n}")))
            .and_then(|mut s| s.execute(params.as_slice()))
            .map_err(sqlite_error)?;
    }
    Ok(rows)
}

/// The start deliveries of a claim's tasks that asked for them, in the claim's transaction;
/// true when any was written. A claim none of whose tasks asked runs no statement.
fn insert_start_events(tx: &Connection, rows: &[ClaimedRow], now: i64) -> Result<bool, StoreError> {
    let ids = start_event_ids(rows);
    if ids.is_empty() {
        return Ok(false);
    }
    // `[[task id, delivery id], …]`: SQLite has no arrays.
    let pairs: Vec<(&str, String)> = ids.into_iter().map(|id| (id, new_id("whk"))).collect();
    let pairs = serde_json::to_string(&pairs).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let sql = insert_start_events_sql(
        Dialect::Sqlite,
        "SELECT json_extract(value, '$[0]') AS task, json_extract(value, '$[1]') AS delivery \
         FROM json_each(?1)",
        "?2",
    );
    let n = tx
        .prepare_cached(&sql)
        .and_then(|mut s| s.execute(rusqlite::params![pairs, now]))
        .map_err(sqlite_error)?;
    Ok(n > 0)
}

/// Puts claims nobody will run back to pending, their attempts refunded.
fn give_back(conn: &Connection, claims: &[Claim]) {
    let sql = format!(
        "UPDATE tasks SET {}, lease_token = NULL, lease_expires_at = NULL, runner = NULL, \
         attempts = attempts - 1 WHERE id = ?1 AND {} AND lease_token = ?2",
        Transition::Requeue.set_state(),
        Transition::Requeue.guard()
    );
    let withdraw = super::super::rows::withdraw_start_sql("?1");
    for c in claims {
        let r = conn
            .execute(&sql, rusqlite::params![c.task.id, c.token])
            .and_then(|n| match n {
                0 => Ok(0),
                _ => conn.execute(&withdraw, rusqlite::params![c.task.id]),
            });
        if let Err(e) = r {
            // Its lease will end and the sweep hands it on.
            tracing::warn!(taskId = %c.task.id, model = %c.task.model, error = %crate::report::error_chain(&e), "cannot hand back an unclaimed task");
        }
    }
}

/// `(?, ?, …), (?, ?, …), …`: `rows` groups of `columns` placeholders.
fn values(rows: usize, columns: usize) -> String {
    let one = format!("({})", vec!["?"; columns].join(", "));
    vec![one; rows].join(", ")
}

/// One multi-row `INSERT INTO {into} VALUES …`, rows of `columns` parameters each, the statement
/// prepared once per row count.
fn insert_rows(
    tx: &Connection,
    into: &str,
    columns: usize,
    params: &[&dyn ToSql],
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO {into} VALUES {}",
        values(params.len() / columns, columns)
    );
    tx.prepare_cached(&sql)
        .and_then(|mut s| s.execute(params))
        .map_err(sqlite_error)?;
    Ok(())
}

/// Submits as one multi-row INSERT, due at creation.
fn insert_in(tx: &Connection, batch: &[InsertRequest]) -> Result<(), StoreError> {
    let inputs = batch
        .iter()
        .map(|(t, _)| serde_json::to_string(&t.input))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let attempts: Vec<i64> = batch
        .iter()
        .map(|(t, _)| i64::from(t.max_attempts))
        .collect();
    let priorities: Vec<i64> = batch.iter().map(|(t, _)| i64::from(t.priority)).collect();
    let events: Vec<i16> = batch.iter().map(|(t, _)| t.webhook_events.bits()).collect();
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(batch.len() * 14);
    for (((((t, _), input), max_attempts), priority), events) in batch
        .iter()
        .zip(&inputs)
        .zip(&attempts)
        .zip(&priorities)
        .zip(&events)
    {
        params.extend_from_slice(&[
            &t.id as &dyn ToSql,
            &t.tenant_id,
            &t.model,
            &"pending",
            input,
            &t.callback_url,
            max_attempts,
            &t.create_time,
            &t.create_time,
            priority,
            &t.expires_at,
            events,
            &t.trace_parent,
            &t.key_id,
        ]);
    }
    insert_rows(tx, &format!("tasks ({NEW_TASK_COLUMNS})"), 14, &params)
}

/// One `UPDATE … FROM (VALUES …)` for the whole batch, each row still guarded by its own token;
/// then the blobs and outbox rows of the rows that took, each as one statement, in the same
/// transaction.
fn finish_in(tx: &Connection, batch: &[FinishRequest]) -> Result<Vec<bool>, StoreError> {
    let columns = batch
        .iter()
        .map(|req| outcome_columns(&req.outcome))
        .collect::<Result<Vec<_>, _>>()?;
    let states: Vec<&str> = columns.iter().map(|(s, ..)| s.as_str()).collect();
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(batch.len() * 8);
    for ((req, (_, outs, code, msg)), state) in batch.iter().zip(&columns).zip(&states) {
        params.extend_from_slice(&[
            &req.id as &dyn ToSql,
            &req.token,
            state,
            &req.now,
            outs,
            code,
            msg,
            &req.route,
        ]);
    }
    // Succeed and Fail share their guard (from `processing`, under the claim's token). The URL
    // comes back only where the task owes a final-state delivery (it may have asked for start
    // or progress events alone).
    let sql = format!(
        "WITH v(task, token, new_state, at, outs, code, msg, route) AS (VALUES {}) \
         UPDATE tasks SET state = v.new_state, complete_time = v.at, outputs = v.outs, \
         fail_code = v.code, fail_msg = v.msg, route = v.route, lease_token = NULL, \
         lease_expires_at = NULL \
         FROM v WHERE tasks.id = v.task AND tasks.{} AND tasks.lease_token = v.token \
         RETURNING tasks.id, tasks.tenant_id, \
                   CASE WHEN {} THEN tasks.callback_url END",
        values(batch.len(), 8),
        Transition::Succeed.guard(),
        asks(WebhookEvent::Completed, "tasks.")
    );
    let rows: Vec<(String, String, Option<String>)> = tx
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(params.as_slice(), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(sqlite_error)?;
    let written: HashMap<&str, (&str, Option<&str>)> = rows
        .iter()
        .map(|(id, tenant, url)| (id.as_str(), (tenant.as_str(), url.as_deref())))
        .collect();
    let blobs: Vec<(&str, &Blob)> = batch
        .iter()
        .filter(|r| written.contains_key(r.id.as_str()))
        .flat_map(|r| match &r.outcome {
            Outcome::Success { blobs, .. } => blobs.iter().map(|b| (r.id.as_str(), b)).collect(),
            Outcome::Failure { .. } => Vec::new(),
        })
        .collect();
    for chunk in blobs.chunks(MAX_BATCH) {
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 3);
        for (task, blob) in chunk {
            params.extend_from_slice(&[&blob.key as &dyn ToSql, task, &blob.content]);
        }
        insert_rows(tx, "output_blobs (key, task_id, content)", 3, &params)?;
    }
    // The outbox: a row only for tasks with a callback, whose tenant and URL the UPDATE gave.
    let deliveries: Vec<(&FinishRequest, &str, &str, String)> = batch
        .iter()
        .filter_map(|r| {
            let (tenant, url) = written.get(r.id.as_str())?;
            Some((r, *tenant, (*url)?, new_id("whk")))
        })
        .collect();
    if !deliveries.is_empty() {
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(deliveries.len() * 7);
        for (req, tenant, url, id) in &deliveries {
            params.extend_from_slice(&[
                id as &dyn ToSql,
                &req.id,
                tenant,
                url,
                &"pending",
                &req.now,
                &req.now,
            ]);
        }
        insert_rows(
            tx,
            "webhook_deliveries (id, task_id, tenant_id, url, state, next_attempt_at, created_at)",
            7,
            &params,
        )?;
    }
    Ok(batch
        .iter()
        .map(|r| written.contains_key(r.id.as_str()))
        .collect())
}
