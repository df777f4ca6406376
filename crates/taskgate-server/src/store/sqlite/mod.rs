//! The embedded store: one SQLite file in WAL mode.
//!
//! Concurrency model: the hot writes (submits, final states, claims) go to the writer thread
//! (`writer`), which group-commits everything waiting at that moment in one transaction on a
//! connection of its own, so many callers share one fsync while each still returns only after
//! its write is durable (`synchronous = FULL`); a claim takes a batch per statement. The other
//! writes go through one sqlx connection, and every write transaction on either side is
//! `BEGIN IMMEDIATE`, so SQLite's one-writer lock orders them without `SQLITE_BUSY`. Reads go
//! through two small read-only pools (the API's and the engine's).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use taskgate_proto::WebhookEvent;
use tokio::sync::{mpsc, oneshot, Notify, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use super::dashboard::{append_attempt_sql, LEASE_EXPIRED, LEASE_EXPIRED_MSG};
use super::dashboard::{SERVER_RESTARTED, SERVER_RESTARTED_MSG};
use super::fair::WeightCell;
use super::rows::{
    asks, claim_returning, delivery_claim_returning, owes_progress_event, status_snapshot,
    ClaimedDeliveryRow, Dialect,
};
use super::rows::{
    attempt_error, delivery_next_columns, AttemptRow, DeliveryRow, KeyRow, SecretsRow, TaskRow,
    TenantRow, DELIVERY_COLUMNS, KEY_SELECT, TASK_COLUMNS,
};
use super::rows::{delete_tasks_sql, finished_from_rows, finished_tasks_sql, FinishedRow};
use super::rows::{
    key_usage_from, models_column, others_key_usage_sql, unfinished_from, upsert_key_usage,
    UNFINISHED_BY_KEY_SQL,
};
use super::rows::{
    not_expired, removed_message, withdraw_start_sql, EXHAUSTED_SQL, EXPIRED_MESSAGE,
};
use super::MAX_UNACKED_REFUNDS;
use super::{
    cancelled_message, ApiKeyRecord, CancelOutcome, Claim, Delivery, DeliveryAttempt,
    DeliveryClaim, DeliveryNext, FinishRequest, HostRoom, KeyKind, NewTask, Outcome, Recovered,
    Redeliver, Rotation, Store, StoreError, Tenant, WebhookSecrets,
};
use super::{AttemptEnd, AttemptRecord, CountRow};
use super::{
    Finished, IdempotencyKey, KeyedInsert, QueueDepth, Runner, StoreEvent, TaskPage, TaskQuery,
};
use super::{KeyPolicy, KeyUsage};
use crate::domain::{fail_code, new_id, Task, Transition};

mod batch;
mod dashboard;
mod logs;
mod writer;

use writer::{ClaimRequest, Write};

pub struct SqliteStore {
    writer: SqlitePool,
    /// Reads for the API (status, listings, files).
    reader: SqlitePool,
    /// Reads for the engine alone (when is work due), on a connection of their own: under a flood
    /// of status polls the API's readers are all busy, and a dispatcher waiting behind them for
    /// `next_due` stopped claiming, so tasks queued, so clients polled more.
    engine_reader: SqlitePool,
    /// The writer loop's queue: submits, final states and claims.
    writes: mpsc::Sender<Write>,
    /// Taken by the writer thread for each round and by the sqlx side for each write: a fair
    /// (FIFO) turn between the two connections, instead of SQLite's busy polling.
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Told after a write made inside the store queued a delivery (a claim's start events, a
    /// renewal's progress event): `listen` turns it into `DeliveryReady`, which wakes the
    /// deliverer, as PostgreSQL's `NOTIFY` does. The callers of those writes never learn of them.
    deliveries: Arc<Notify>,
    /// Ends `listen` at close.
    closing: CancellationToken,
    /// Fair-share weights by tenant name, sent with each claim to the writer thread.
    weights: WeightCell,
}

impl SqliteStore {
    /// Opens (creating if needed) `path` and applies the embedded migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit survives power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No ping before each acquire: it is one more round trip to the connection's thread per
        // statement, and a local file does not drop connections the way a network peer does.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let read_only = options.read_only(true);
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(4)
            .connect_with(read_only.clone())
            .await?;
        let engine_reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(2)
            .connect_with(read_only)
            .await?;
        let write_lock = Arc::new(tokio::sync::Mutex::new(()));
        let deliveries = Arc::new(Notify::new());
        let writes = writer::start(path, write_lock.clone(), deliveries.clone()).await?;
        Ok(SqliteStore {
            writer,
            reader,
            engine_reader,
            writes,
            write_lock,
            deliveries,
            closing: CancellationToken::new(),
            weights: WeightCell::default(),
        })
    }
}

/// The claim of one tenant's tasks: up to `?6` due pending tasks of model `?4` and tenant `?9`,
/// best priority first, no more than leave `?5` running (`store::fair` says how many each tenant
/// gets). It must walk the `tasks_ready` index, never scan the table (a test checks its query
/// plan).
pub(super) fn claim_sql() -> String {
    format!(
        "UPDATE tasks SET {set}, attempts = attempts + 1, progress = NULL, \
         lease_token = ?1 || id, lease_expires_at = ?2, start_time = ?3, runner = ?7, \
         expires_at = NULL, \
         claim_acked = ?8 \
         WHERE id IN (SELECT id FROM tasks WHERE model = ?4 AND tenant_id = ?9 AND {guard} \
                      AND run_after <= ?3 AND {live} ORDER BY priority DESC, id \
                      LIMIT max(0, min(?6, ?5 - (SELECT count(*) FROM tasks \
                                                WHERE model = ?4 AND state = 'processing')))) \
         RETURNING {returning}",
        set = Transition::Claim.set_state(),
        guard = Transition::Claim.guard(),
        live = not_expired("?3"),
        returning = claim_returning(),
    )
}

impl SqliteStore {
    /// A claim made by the writer thread: at `now`, or (`None`) parked until something of
    /// `model` is due, at the time it is made. When `withdraw` is cancelled it answers at once:
    /// with nothing if the request was not sent, else with what the writer had already answered
    /// (a claim it makes later finds the answer closed and hands its tasks back).
    #[allow(clippy::too_many_arguments)]
    async fn claim_in_writer(
        &self,
        model: &str,
        now: Option<i64>,
        lease: Duration,
        max_running: usize,
        limit: usize,
        runner: Runner,
        withdraw: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<Vec<Claim>, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        let req = ClaimRequest {
            model: model.to_owned(),
            now,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            max_running,
            limit,
            runner,
            weights: self.weights.get(),
            reply,
        };
        let withdrawn = || async move {
            match withdraw {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            sent = self.writes.send(Write::Claim(req)) => sent.map_err(|_| writer_gone())?,
            // Not sent: nothing can have been taken.
            _ = withdrawn() => return Ok(Vec::new()),
        }
        tokio::select! {
            answered = &mut answer => answered.map_err(|_| writer_gone())?,
            _ = withdrawn() => {
                answer.close();
                match answer.try_recv() {
                    Ok(answered) => answered,
                    Err(_) => Ok(Vec::new()),
                }
            }
        }
    }
}

/// What a hot write hears once the writer thread has ended (closed, or stopped by a panic): the
/// database cannot be written, as a closed pool answers on the sqlx side.
fn writer_gone() -> StoreError {
    super::unavailable("the database is closed")
}

/// The sqlx writer connection, taken under the write lock it shares with the writer thread.
struct WriteConn {
    _lock: OwnedMutexGuard<()>,
    conn: PoolConnection<sqlx::Sqlite>,
}

impl std::ops::Deref for WriteConn {
    type Target = sqlx::SqliteConnection;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl SqliteStore {
    /// The sqlx writer connection for one statement, in turn with the writer thread's rounds.
    /// Without the lock the two connections met in SQLite's busy handler, which polls with
    /// sleeps: a writer thread that begins its next round right after each commit could keep a
    /// lease renewal waiting until its busy timeout.
    async fn write_conn(&self) -> Result<WriteConn, StoreError> {
        let lock = self.write_lock.clone().lock_owned().await;
        Ok(WriteConn {
            _lock: lock,
            conn: self.writer.acquire().await?,
        })
    }

    /// A write transaction on the sqlx side, under the write lock and `BEGIN IMMEDIATE` (as the
    /// writer thread's): a deferred one that read first could find its snapshot made stale by
    /// the other connection's commit. The guard must live as long as the transaction.
    async fn begin_write(
        &self,
    ) -> Result<
        (
            OwnedMutexGuard<()>,
            sqlx::Transaction<'static, sqlx::Sqlite>,
        ),
        StoreError,
    > {
        let lock = self.write_lock.clone().lock_owned().await;
        Ok((lock, self.writer.begin_with("BEGIN IMMEDIATE").await?))
    }
}

impl SqliteStore {
    /// A lease renewal that reports `progress`, and the `progress` delivery it may owe
    /// (`rows::owes_progress_event`), in one transaction. The delivery is written first, while
    /// the row still holds the value it replaces; `BEGIN IMMEDIATE` under the write lock keeps
    /// anything from changing the row between the two statements. Tasks that did not ask for
    /// progress events pay one indexed read that inserts nothing.
    async fn renew_with_progress(
        &self,
        id: &str,
        token: &str,
        now: i64,
        lease: Duration,
        progress: f64,
    ) -> Result<bool, StoreError> {
        let (_lock, mut tx) = self.begin_write().await?;
        let queued = sqlx::query(&format!(
            "INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, \
             next_attempt_at, created_at, event, payload) \
             SELECT ?1, t.id, t.tenant_id, t.callback_url, 'pending', ?2, ?2, 'progress', \
                    {snapshot} \
             FROM tasks t WHERE t.id = ?3 AND t.state = 'processing' AND t.lease_token = ?4 \
             AND {owed}",
            snapshot = status_snapshot(Dialect::Sqlite, "?5"),
            owed = owes_progress_event(Dialect::Sqlite, "?5", "?2"),
        ))
        .bind(new_id("whk"))
        .bind(now)
        .bind(id)
        .bind(token)
        .bind(progress)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        let r = sqlx::query(
            "UPDATE tasks SET lease_expires_at = ?1, progress = ?2, claim_acked = TRUE, \
             last_progress_event_at = CASE WHEN ?3 THEN ?4 ELSE last_progress_event_at END \
             WHERE id = ?5 AND state = 'processing' AND lease_token = ?6",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(progress)
        .bind(queued)
        .bind(now)
        .bind(id)
        .bind(token)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if queued {
            self.deliveries.notify_one();
        }
        Ok(r.rows_affected() == 1)
    }

    /// Hands on the processing tasks matching `which` (SQL over the row, `?1` = `now`): claims
    /// never acknowledged go back without counting; tasks out of attempts fail; the rest go
    /// back to pending.
    async fn recover(
        &self,
        which: &str,
        now: i64,
        why: (&str, &str),
    ) -> Result<Recovered, StoreError> {
        let completed = now.min(crate::domain::now_ms());
        let requeue = format!(
            "{}, lease_token = NULL, lease_expires_at = NULL, runner = NULL",
            Transition::Requeue.set_state()
        );
        let (_lock, mut tx) = self.begin_write().await?;
        let unacknowledged: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {requeue}, attempts = attempts - 1, claim_acked = TRUE, \
             unacked_refunds = unacked_refunds + 1 \
             WHERE {} AND {which} AND claim_acked = FALSE AND unacked_refunds < {MAX_UNACKED_REFUNDS} \
             RETURNING id",
            Transition::Requeue.guard()
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        // Their claims never reached a runner: the starts they announced did not happen.
        for id in &unacknowledged {
            sqlx::query(&withdraw_start_sql("?1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let failed: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {}, complete_time = ?2, fail_code = ?3, fail_msg = {EXHAUSTED_SQL}, \
             lease_token = NULL, lease_expires_at = NULL \
             WHERE {} AND {which} AND attempts >= max_attempts RETURNING id",
            Transition::Fail.set_state(),
            Transition::Fail.guard()
        ))
        .bind(now)
        .bind(completed)
        .bind(fail_code::ATTEMPTS_EXHAUSTED)
        .fetch_all(&mut *tx)
        .await?;
        for id in &failed {
            enqueue_callback(&mut tx, id, completed).await?;
        }
        // The attempt each of these lost goes into its history (`?1` is when it ended).
        let requeued: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {requeue}, {} WHERE {} AND {which} RETURNING id",
            append_attempt_sql(Dialect::Sqlite, "?1", "?2", "?3", "NULL"),
            Transition::Requeue.guard()
        ))
        .bind(now)
        .bind(why.0)
        .bind(why.1)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Recovered {
            requeued,
            failed,
            unacknowledged,
        })
    }
}

/// The outbox write: a callback task that just reached its final state gets a pending delivery,
/// in the same transaction as that state (unless it asked for other events only).
async fn enqueue_callback(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    task_id: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, next_attempt_at, \
         created_at) SELECT ?, id, tenant_id, callback_url, 'pending', ?, ? FROM tasks \
         WHERE id = ? AND {}",
        asks(WebhookEvent::Completed, "")
    ))
    .bind(new_id("whk"))
    .bind(now)
    .bind(now)
    .bind(task_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_task(&self, task: NewTask) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writes
            .send(Write::Insert(task, tx))
            .await
            .map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT content FROM output_blobs WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        sqlx::query_as::<_, TaskRow>(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(Task::try_from)
            .transpose()
    }

    async fn insert_tasks(&self, tasks: Vec<NewTask>) -> Result<(), StoreError> {
        self.insert_batch(&tasks).await
    }

    async fn insert_tasks_keyed(
        &self,
        key: &IdempotencyKey,
        tasks: Vec<NewTask>,
    ) -> Result<KeyedInsert, StoreError> {
        self.insert_keyed(key, &tasks).await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        self.list(query).await
    }

    /// One writer connection serialises claims, so the running count in the statement stays
    /// true until it commits. (Local loops also hold a semaphore; pull workers rely on this.)
    async fn claim_batch(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
        max_running: usize,
        limit: usize,
        runner: Runner,
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_in_writer(model, Some(now), lease, max_running, limit, runner, None)
            .await
    }

    fn parks_claims(&self) -> bool {
        true
    }

    fn set_tenant_weights(&self, weights: super::TenantWeights) {
        self.weights.set(weights);
    }

    async fn claim_parked(
        &self,
        model: &str,
        lease: Duration,
        max_running: usize,
        limit: usize,
        withdraw: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_in_writer(
            model,
            None,
            lease,
            max_running,
            limit,
            Runner::Local,
            Some(withdraw),
        )
        .await
    }

    async fn poke(&self, model: &str) {
        // Awaited, not `try_send`: a dropped poke could leave a requeued task waiting for the
        // idle recheck.
        let _ = self.writes.send(Write::Poke(model.to_owned())).await;
    }

    async fn next_due(&self, model: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(run_after) FROM tasks WHERE model = ? AND state = 'pending'",
        )
        .bind(model)
        .fetch_one(&self.engine_reader)
        .await?)
    }

    async fn renew_lease(
        &self,
        id: &str,
        token: &str,
        now: i64,
        lease: Duration,
        progress: Option<f64>,
    ) -> Result<bool, StoreError> {
        if let Some(progress) = progress {
            return self
                .renew_with_progress(id, token, now, lease, progress)
                .await;
        }
        let r = sqlx::query(
            "UPDATE tasks SET lease_expires_at = ?, progress = COALESCE(?, progress), \
             claim_acked = TRUE WHERE id = ? AND state = 'processing' AND lease_token = ?",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(progress)
        .bind(id)
        .bind(token)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn finish_routed(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
        route: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (req, answer) = FinishRequest::new(id, token, outcome, route, now);
        self.writes
            .send(Write::Finish(req))
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    async fn requeue(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        refund_attempt: bool,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(&format!(
            "UPDATE tasks SET {}, run_after = ?, lease_token = NULL, \
             lease_expires_at = NULL, attempts = attempts - ? \
             WHERE id = ? AND {} AND lease_token = ?",
            Transition::Requeue.set_state(),
            Transition::Requeue.guard()
        ))
        .bind(run_after)
        .bind(i64::from(refund_attempt))
        .bind(id)
        .bind(token)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// On the sqlx write connection, not the writer thread: cancels are rare, and `BEGIN
    /// IMMEDIATE` orders this transaction with the writer's rounds, so the read of the state and
    /// the guarded write see the same row (a claim or final state cannot slip between them).
    async fn cancel_task(
        &self,
        id: &str,
        tenant_id: &str,
        model: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let (_lock, mut tx) = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "SELECT runner, {TASK_COLUMNS} FROM tasks WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let runner: Option<String> = sqlx::Row::try_get(&row, "runner")?;
        let task = Task::try_from(<TaskRow as sqlx::FromRow<_>>::from_row(&row)?)?;
        if task.tenant_id != tenant_id || task.model != model {
            return Ok(CancelOutcome::NotFound);
        }
        if !Transition::Cancel.from_states().contains(&task.state) {
            return Ok(CancelOutcome::AlreadyFinal(task));
        }
        let from = task.state;
        let written = sqlx::query_as::<_, TaskRow>(&format!(
            "UPDATE tasks SET {}, complete_time = ?, fail_code = ?, fail_msg = ?, \
             lease_token = NULL, lease_expires_at = NULL WHERE id = ? AND {} \
             RETURNING {TASK_COLUMNS}",
            Transition::Cancel.set_state(),
            Transition::Cancel.guard()
        ))
        .bind(now)
        .bind(fail_code::CANCELLED)
        .bind(cancelled_message(from))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        enqueue_callback(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled {
            task: Task::try_from(written)?,
            from,
            runner: (from == taskgate_proto::TaskState::Processing)
                .then(|| runner.as_deref().and_then(Runner::parse))
                .flatten(),
        })
    }

    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError> {
        self.recover(
            "lease_expires_at <= ?1",
            now,
            (LEASE_EXPIRED, LEASE_EXPIRED_MSG),
        )
        .await
    }

    async fn recover_local(&self, now: i64) -> Result<Recovered, StoreError> {
        // ?1 is bound but unused: the condition is who ran the attempt, not its lease.
        self.recover(
            "(runner = 'local' OR runner IS NULL) AND ?1 = ?1",
            now,
            (SERVER_RESTARTED, SERVER_RESTARTED_MSG),
        )
        .await
    }

    async fn expire_pending(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let (_lock, mut tx) = self.begin_write().await?;
        let ids: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {}, complete_time = ?1, fail_code = ?2, fail_msg = ?3 \
             WHERE id IN (SELECT id FROM tasks WHERE {} AND expires_at IS NOT NULL \
                          AND expires_at <= ?1 ORDER BY expires_at LIMIT ?4) \
             RETURNING id",
            Transition::Expire.set_state(),
            Transition::Expire.guard()
        ))
        .bind(now)
        .bind(fail_code::EXPIRED)
        .bind(EXPIRED_MESSAGE)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            enqueue_callback(&mut tx, id, now).await?;
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn fail_removed_models(
        &self,
        known: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let models: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT model FROM tasks WHERE {}",
            Transition::Remove.guard()
        ))
        .fetch_all(&mut *self.write_conn().await?)
        .await?;
        let mut failed = Vec::new();
        let (_lock, mut tx) = self.begin_write().await?;
        for model in models.iter().filter(|m| !known.contains(m)) {
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "UPDATE tasks SET {}, complete_time = ?, fail_code = ?, fail_msg = ?, \
                 lease_token = NULL, lease_expires_at = NULL WHERE model = ? AND {} RETURNING id",
                Transition::Remove.set_state(),
                Transition::Remove.guard()
            ))
            .bind(now)
            .bind(fail_code::MODEL_REMOVED)
            .bind(removed_message(model))
            .bind(model)
            .fetch_all(&mut *tx)
            .await?;
            for id in &ids {
                enqueue_callback(&mut tx, id, now).await?;
            }
            failed.extend(ids);
        }
        tx.commit().await?;
        Ok(failed)
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        Ok(
            sqlx::query_as::<_, TenantRow>("SELECT id, name FROM tenants WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *self.write_conn().await?)
                .await?
                .map(Tenant::from),
        )
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let tenant = Tenant {
            id: new_id("ten"),
            name: name.to_owned(),
        };
        let r = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(crate::domain::now_ms())
            .execute(&mut *self.write_conn().await?)
            .await;
        match r {
            Ok(_) => Ok(tenant),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                format!("a tenant named {name:?} already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn insert_key(
        &self,
        kind: KeyKind,
        tenant: &Tenant,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
        policy: &KeyPolicy,
    ) -> Result<ApiKeyRecord, StoreError> {
        let record = ApiKeyRecord {
            id: new_id(if kind == KeyKind::Worker {
                "wkr"
            } else {
                "key"
            }),
            kind,
            tenant: tenant.clone(),
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            created_at: crate::domain::now_ms(),
            revoked_at: None,
            key_hash: key_hash.to_vec(),
            policy: policy.clone(),
        };
        let r = sqlx::query(
            "INSERT INTO api_keys (id, kind, tenant_id, name, key_hash, prefix, created_at, \
             models, read_only, requests_per_minute, concurrent_tasks) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&record.id)
        .bind(kind.as_str())
        .bind(&tenant.id)
        .bind(name)
        .bind(key_hash)
        .bind(prefix)
        .bind(record.created_at)
        .bind(models_column(policy))
        .bind(policy.read_only)
        .bind(policy.requests_per_minute.map(i64::from))
        .bind(policy.concurrent_tasks.map(i64::from))
        .execute(&mut *self.write_conn().await?)
        .await;
        match r {
            Ok(_) => Ok(record),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                "this key is registered already".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, KeyRow>(&format!("{KEY_SELECT} WHERE k.key_hash = ?"))
                .bind(key_hash)
                .fetch_optional(&self.reader)
                .await?
                .map(ApiKeyRecord::from),
        )
    }

    async fn keys_revision(&self) -> Result<(i64, i64), StoreError> {
        // On the engine's connection: behind a flood of API reads the check would time out,
        // and a timeout empties the key cache (more reads still).
        Ok(sqlx::query_as(
            "SELECT count(revoked_at) + CAST(COALESCE(sum(changes), 0) AS BIGINT), \
             COALESCE(max(revoked_at), 0) FROM api_keys",
        )
        .fetch_one(&self.engine_reader)
        .await?)
    }

    async fn update_key_policy(&self, id: &str, policy: &KeyPolicy) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE api_keys SET models = ?, read_only = ?, requests_per_minute = ?, \
             concurrent_tasks = ?, changes = changes + 1 \
             WHERE id = ? AND kind = 'client' AND revoked_at IS NULL",
        )
        .bind(models_column(policy))
        .bind(policy.read_only)
        .bind(policy.requests_per_minute.map(i64::from))
        .bind(policy.concurrent_tasks.map(i64::from))
        .bind(id)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn sync_key_usage(
        &self,
        node: &str,
        mine: &[KeyUsage],
        oldest: i64,
    ) -> Result<Vec<KeyUsage>, StoreError> {
        if !mine.is_empty() {
            upsert_key_usage(node, mine)
                .build()
                .execute(&mut *self.write_conn().await?)
                .await?;
        }
        sqlx::query("DELETE FROM key_usage WHERE bucket < ?")
            .bind(oldest)
            .execute(&mut *self.write_conn().await?)
            .await?;
        let rows = sqlx::query_as(&others_key_usage_sql(|n| format!("?{n}")))
            .bind(node)
            .bind(oldest)
            .fetch_all(&self.engine_reader)
            .await?;
        Ok(key_usage_from(rows))
    }

    async fn unfinished_by_key(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query_as(UNFINISHED_BY_KEY_SQL)
            .fetch_all(&self.engine_reader)
            .await?;
        Ok(unfinished_from(rows))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, KeyRow>(&format!("{KEY_SELECT} ORDER BY k.created_at, k.id"))
                .fetch_all(&self.reader)
                .await?
                .into_iter()
                .map(ApiKeyRecord::from)
                .collect(),
        )
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *self.write_conn().await?)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(init)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *self.write_conn().await?)
                .await?,
        )
    }

    async fn webhook_secrets(
        &self,
        tenant_id: &str,
        init: &str,
    ) -> Result<WebhookSecrets, StoreError> {
        sqlx::query(
            "INSERT INTO webhook_secrets (tenant_id, secret, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(init)
        .bind(crate::domain::now_ms())
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(sqlx::query_as::<_, SecretsRow>(
            "SELECT secret, previous_secret, previous_expires_at FROM webhook_secrets \
             WHERE tenant_id = ?",
        )
        .bind(tenant_id)
        .fetch_one(&mut *self.write_conn().await?)
        .await?
        .into())
    }

    async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        new: &str,
        now: i64,
        previous_until: i64,
    ) -> Result<Rotation, StoreError> {
        // The guard sits in the upsert itself, so two racing rotations cannot both pass it.
        let rotated = sqlx::query_as::<_, SecretsRow>(
            "INSERT INTO webhook_secrets (tenant_id, secret, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant_id) DO UPDATE SET previous_secret = webhook_secrets.secret, \
             previous_expires_at = ?4, secret = excluded.secret, created_at = excluded.created_at \
             WHERE webhook_secrets.previous_expires_at IS NULL \
                OR webhook_secrets.previous_expires_at <= ?3 \
             RETURNING secret, previous_secret, previous_expires_at",
        )
        .bind(tenant_id)
        .bind(new)
        .bind(now)
        .bind(previous_until)
        .fetch_optional(&mut *self.write_conn().await?)
        .await?;
        if let Some(r) = rotated {
            return Ok(Rotation::Rotated(r.into()));
        }
        Ok(Rotation::OverlapRunning(
            sqlx::query_as::<_, SecretsRow>(
                "SELECT secret, previous_secret, previous_expires_at FROM webhook_secrets \
                 WHERE tenant_id = ?",
            )
            .bind(tenant_id)
            .fetch_one(&mut *self.write_conn().await?)
            .await?
            .into(),
        ))
    }

    async fn claim_deliveries(
        &self,
        now: i64,
        limit: usize,
        lease: Duration,
        room: &HostRoom,
    ) -> Result<Vec<DeliveryClaim>, StoreError> {
        let token = new_id("dlv");
        // `limited` goes in as JSON, `[["https://a.example", 0], ...]`: SQLite has no arrays.
        let limited =
            serde_json::to_string(&room.limited).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let rows = sqlx::query_as::<_, ClaimedDeliveryRow>(&format!(
            "UPDATE webhook_deliveries SET state = 'delivering', lease_token = ?1, \
             lease_expires_at = ?2 WHERE id IN ( \
               SELECT id FROM ( \
                 SELECT d.id, d.next_attempt_at, COALESCE(l.room, ?6) AS room, \
                        row_number() OVER (PARTITION BY d.host \
                                           ORDER BY d.next_attempt_at, d.id) AS rn \
                 FROM webhook_deliveries d \
                 LEFT JOIN (SELECT json_extract(value, '$[0]') AS host, \
                                   json_extract(value, '$[1]') AS room FROM json_each(?5)) l \
                   ON l.host = d.host \
                 WHERE d.state = 'pending' AND d.next_attempt_at <= ?3) \
               WHERE rn <= room ORDER BY next_attempt_at, id LIMIT ?4) \
             RETURNING {returning}",
            returning = delivery_claim_returning()
        ))
        .bind(&token)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .bind(limited)
        .bind(i64::try_from(room.per_host).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.write_conn().await?)
        .await?;
        Ok(rows.into_iter().map(|r| r.into_claim(&token)).collect())
    }

    async fn next_delivery_due(&self, blocked: &[String]) -> Result<Option<i64>, StoreError> {
        let blocked =
            serde_json::to_string(blocked).map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending' \
             AND host NOT IN (SELECT value FROM json_each(?))",
        )
        .bind(blocked)
        .fetch_one(&self.engine_reader)
        .await?)
    }

    async fn defer_host(&self, host: &str, until: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = ?1 \
             WHERE state = 'pending' AND host = ?2 AND next_attempt_at < ?1",
        )
        .bind(until)
        .bind(host)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected())
    }

    async fn finish_delivery_attempt(
        &self,
        id: &str,
        token: &str,
        attempt: Option<&DeliveryAttempt>,
        next: DeliveryNext,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (state, next_at, completed_at) = delivery_next_columns(next, now);
        let (_lock, mut tx) = self.begin_write().await?;
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET state = ?, \
             next_attempt_at = COALESCE(?, next_attempt_at), completed_at = ?, \
             attempts = attempts + ?, last_error = COALESCE(?, last_error), \
             lease_token = NULL, lease_expires_at = NULL \
             WHERE id = ? AND state = 'delivering' AND lease_token = ?",
        )
        .bind(state)
        .bind(next_at)
        .bind(completed_at)
        .bind(i64::from(attempt.is_some()))
        .bind(attempt_error(attempt))
        .bind(id)
        .bind(token)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(a) = attempt {
            sqlx::query(
                "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, \
                 latency_ms, error) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(a.attempted_at)
            .bind(a.status_code.map(i64::from))
            .bind(a.latency_ms)
            .bind(&a.error)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        Ok(sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .map(Delivery::from))
    }

    async fn deliveries_for_task(
        &self,
        task_id: &str,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>, StoreError> {
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE task_id = ? \
             ORDER BY created_at, id"
        ))
        .bind(task_id)
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let d = Delivery::from(row);
            let attempts = sqlx::query_as::<_, AttemptRow>(
                "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts \
                 WHERE delivery_id = ? ORDER BY id",
            )
            .bind(&d.id)
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(DeliveryAttempt::from)
            .collect();
            out.push((d, attempts));
        }
        Ok(out)
    }

    async fn redeliver(
        &self,
        id: &str,
        now: i64,
        min_gap: Duration,
    ) -> Result<Redeliver, StoreError> {
        let gap = min_gap.as_millis() as i64;
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = ?1, \
             completed_at = NULL, last_manual_retry_at = ?1 \
             WHERE id = ?2 AND state <> 'delivering' \
             AND (last_manual_retry_at IS NULL OR last_manual_retry_at <= ?1 - ?3)",
        )
        .bind(now)
        .bind(id)
        .bind(gap)
        .execute(&mut *self.write_conn().await?)
        .await?;
        if r.rows_affected() == 1 {
            return Ok(Redeliver::Scheduled);
        }
        let last: Option<Option<i64>> =
            sqlx::query_scalar("SELECT last_manual_retry_at FROM webhook_deliveries WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *self.write_conn().await?)
                .await?;
        Ok(super::redeliver_refusal(last, now, gap))
    }

    async fn recover_expired_deliveries(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', lease_token = NULL, \
             lease_expires_at = NULL WHERE state = 'delivering' AND lease_expires_at <= ?",
        )
        .bind(now)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected())
    }

    async fn finished_tasks(
        &self,
        after: Option<(i64, String)>,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Finished>, StoreError> {
        let sql = finished_tasks_sql(after.is_some(), |n| format!("?{n}"));
        let mut q = sqlx::query_as::<_, FinishedRow>(&sql)
            .bind(before)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        if let Some((at, id)) = after {
            q = q.bind(at).bind(id);
        }
        finished_from_rows(q.fetch_all(&self.reader).await?)
    }

    async fn delete_blobs(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let keys = serde_json::to_string(keys).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let r =
            sqlx::query("DELETE FROM output_blobs WHERE key IN (SELECT value FROM json_each(?))")
                .bind(keys)
                .execute(&mut *self.write_conn().await?)
                .await?;
        Ok(r.rows_affected())
    }

    async fn delete_tasks(&self, task_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids =
            serde_json::to_string(task_ids).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let [attempts, deliveries, logs, tasks] =
            delete_tasks_sql("SELECT value FROM json_each(?1)");
        let (_lock, mut tx) = self.begin_write().await?;
        sqlx::query(&attempts).bind(&ids).execute(&mut *tx).await?;
        sqlx::query(&deliveries)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&logs).bind(&ids).execute(&mut *tx).await?;
        let deleted: Vec<String> = sqlx::query_scalar(&tasks)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn delete_expired_keys(&self, before: i64, limit: usize) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN \
             (SELECT tenant_id, key FROM idempotency_keys WHERE created_at < ?1 \
              ORDER BY created_at LIMIT ?2)",
        )
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected())
    }

    async fn advance_setting(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut conn = self.write_conn().await?;
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value \
             WHERE settings.value < excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&mut *conn)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *conn)
                .await?,
        )
    }

    async fn append_logs(
        &self,
        task_id: &str,
        token: &str,
        lines: &[String],
        now: i64,
    ) -> Result<bool, StoreError> {
        self.append_log_lines(task_id, token, lines, now).await
    }

    async fn log_tail(
        &self,
        task_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::TaskLogLine>, StoreError> {
        self.log_lines(task_id, after, limit).await
    }

    async fn queue_position(&self, task_id: &str, now: i64) -> Result<Option<u64>, StoreError> {
        self.position_in_queue(task_id, now).await
    }

    async fn queue_depths(&self) -> Result<Vec<QueueDepth>, StoreError> {
        self.count_queues().await
    }

    async fn count_tasks(&self, tenant_id: &str, since: i64) -> Result<Vec<CountRow>, StoreError> {
        self.count(tenant_id, since).await
    }

    async fn usage(
        &self,
        query: &super::UsageQuery,
    ) -> Result<Vec<super::UsageAggregate>, StoreError> {
        super::usage::read_usage!(&self.reader, super::rows::Dialect::Sqlite, query)
    }

    async fn requeue_failed(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        ended: &AttemptEnd,
    ) -> Result<bool, StoreError> {
        self.requeue_with_history(id, token, run_after, ended).await
    }

    async fn attempt_record(&self, id: &str) -> Result<Option<AttemptRecord>, StoreError> {
        self.attempts_of(id).await
    }

    async fn webhook_backlog(
        &self,
        tenant_id: &str,
    ) -> Result<taskgate_proto::WebhookBacklog, StoreError> {
        self.backlog(tenant_id).await
    }

    async fn record_worker(&self, seen: &taskgate_proto::WorkerSeen) -> Result<(), StoreError> {
        self.upsert_worker(seen).await
    }

    async fn workers_seen(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError> {
        self.workers(since, limit).await
    }

    fn exclusive(&self) -> bool {
        true
    }

    /// No other node writes here: the only events are this store's own event deliveries.
    async fn listen(&self, events: mpsc::UnboundedSender<StoreEvent>) {
        loop {
            tokio::select! {
                _ = self.deliveries.notified() => {
                    if events.send(StoreEvent::DeliveryReady).is_err() {
                        return;
                    }
                }
                _ = self.closing.cancelled() => return,
            }
        }
    }

    async fn close(&self) {
        self.closing.cancel();
        let (done, closed) = oneshot::channel();
        if self.writes.send(Write::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
        self.reader.close().await;
        self.engine_reader.close().await;
        self.writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::fair::tenants_sql;

    /// The hot statements walk an index: a table scan per claim or per sweep makes every claim
    /// cost as much as the table is large (as it did while the guard read `state IN (…)`).
    #[tokio::test]
    async fn the_claim_and_the_lease_sweep_use_indexes_not_scans() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let sweep = format!(
            "SELECT id FROM tasks WHERE {} AND lease_expires_at <= ?1",
            Transition::Requeue.guard()
        );
        let tenants = tenants_sql(Dialect::Sqlite, |n| format!("?{n}"));
        for sql in [claim_sql(), sweep, tenants] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(&store.writer)
                    .await
                    .unwrap();
            let steps: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
            assert!(
                !steps.iter().any(|s| s.starts_with("SCAN tasks")),
                "{sql}\nscans the table: {steps:?}"
            );
        }
    }
}
