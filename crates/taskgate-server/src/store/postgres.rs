//! The cluster store: PostgreSQL shared by any number of stateless nodes.
//!
//! Claims take `FOR UPDATE SKIP LOCKED`, so nodes never wait on each other's rows, under a
//! per-model advisory transaction lock that makes "no more than `concurrency` running" hold
//! across the cluster. Every write that makes work available sends a NOTIFY on one channel
//! (`task:MODEL` or `delivery`), and a cancel of a running task sends `cancel:TASK_ID`;
//! [`PostgresStore::listen`] forwards them so that nodes act on events rather than by polling. Submits are group-committed as multi-row inserts. Commits are
//! durable: nothing here turns `synchronous_commit` off.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use taskgate_proto::WebhookEvent;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::dashboard::{append_attempt_sql, LEASE_EXPIRED, LEASE_EXPIRED_MSG};
use super::fair::{passes_sql, plan, tenants_sql, Share, WeightCell};
use super::rows::{
    asks, claim_returning, delivery_claim_returning, insert_start_events_sql, owes_progress_event,
    start_event_ids, status_snapshot, ClaimedDeliveryRow, ClaimedRow, Dialect,
};
use super::rows::{
    attempt_error, claims_from_rows, delivery_next_columns, outcome_columns, AttemptRow,
    DeliveryRow, KeyRow, SecretsRow, TaskRow, TenantRow, DELIVERY_COLUMNS, KEY_SELECT,
    TASK_COLUMNS,
};
use super::rows::{delete_tasks_sql, finished_from_rows, finished_tasks_sql, FinishedRow};
use super::rows::{
    insert_tasks, not_expired, removed_message, withdraw_start_sql, EXHAUSTED_SQL, EXPIRED_MESSAGE,
};
use super::rows::{
    key_usage_from, models_column, others_key_usage_sql, unfinished_from, upsert_key_usage,
    UNFINISHED_BY_KEY_SQL,
};
use super::{
    cancelled_message, ApiKeyRecord, CancelOutcome, Claim, Delivery, DeliveryAttempt,
    DeliveryClaim, DeliveryNext, FinishRequest, HostRoom, KeyKind, NewTask, Outcome, Recovered,
    Redeliver, Rotation, Store, StoreError, StoreEvent, Tenant, WebhookSecrets,
};
use super::{AttemptEnd, AttemptRecord, CountRow};
use super::{
    Finished, IdempotencyKey, KeyedInsert, QueueDepth, Runner, TaskPage, TaskQuery,
    MAX_UNACKED_REFUNDS,
};
use super::{KeyPolicy, KeyUsage};
use crate::domain::{fail_code, new_id, Task, Transition};

mod batch;
mod dashboard;
mod logs;

/// The database's clock in Unix ms: every lease is set and compared on it, so nodes whose clocks
/// disagree still agree on when a lease ends.
pub(super) const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const CHANNEL: &str = "taskgate";
const MAX_BATCH: usize = 512;

type InsertRequest = (NewTask, oneshot::Sender<Result<(), StoreError>>);

pub struct PostgresStore {
    pool: PgPool,
    /// The engine's own connections (claims, final states, due times).
    engine: PgPool,
    inserts: mpsc::Sender<InsertRequest>,
    finishes: mpsc::Sender<FinishRequest>,
    closing: CancellationToken,
    /// Fair-share weights by tenant name (`store::fair`).
    weights: WeightCell,
}

impl PostgresStore {
    /// Connects to `url` and applies the embedded migrations. `schema`, when given, is created
    /// if needed and used as the search path (tests give each run its own).
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?;
        if let Some(schema) = schema {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            let created = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&admin)
                .await;
            admin.close().await;
            match created {
                Ok(_) => {}
                // Two connections creating one schema at once: IF NOT EXISTS checks before
                // inserting into the catalog, so the loser can still hit its unique index.
                // Either way the schema exists, which is all we asked for.
                Err(sqlx::Error::Database(e)) if already_exists(e.as_ref()) => {}
                Err(e) => return Err(e.into()),
            }
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            // No ping before each acquire (a round trip per statement); a connection the server
            // dropped fails its statement, which callers already treat as "unavailable, retry".
            .test_before_acquire(false)
            .max_connections(16)
            // Fail fast while the database is down: the API answers 503 rather than hanging.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        // The engine's claims, final states and due-time reads on connections of their own, so
        // that a flood of API reads holding every pooled connection cannot stall dispatch.
        let engine = PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(options);
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(insert_batches(pool.clone(), rx));
        let (finishes, finish_rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(finish_batches(engine.clone(), finish_rx));
        Ok(PostgresStore {
            pool,
            engine,
            inserts: tx,
            finishes,
            closing: CancellationToken::new(),
            weights: WeightCell::default(),
        })
    }
}

/// `unique_violation` or `duplicate_schema`: what a concurrent `CREATE … IF NOT EXISTS` raises.
fn already_exists(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.is_unique_violation() || e.code().as_deref() == Some("42P06")
}

async fn notify(tx: &mut Transaction<'_, Postgres>, payload: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Group commit: every insert waiting at the moment goes into one multi-row INSERT.
async fn insert_batches(pool: PgPool, mut rx: mpsc::Receiver<InsertRequest>) {
    let mut batch: Vec<InsertRequest> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let tasks: Vec<&NewTask> = batch.iter().map(|(t, _)| t).collect();
        match write_batch(&pool, &tasks).await {
            Ok(()) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(StoreError::Unavailable(e)) => {
                let msg = e.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(super::unavailable(&msg)));
                }
            }
            Err(e) if batch.len() == 1 => {
                // Alone in its batch: its own error, kind and cause kept, without a second try.
                if let Some((_, reply)) = batch.pop() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(_) => {
                // One bad row must not fail its neighbours: retry each on its own.
                for (task, reply) in batch.drain(..) {
                    let _ = reply.send(write_batch(&pool, &[&task]).await);
                }
            }
        }
    }
}

async fn write_batch(pool: &PgPool, tasks: &[&NewTask]) -> Result<(), StoreError> {
    let mut qb = insert_tasks::<Postgres>(tasks.iter().copied())?;
    let mut tx = pool.begin().await?;
    qb.build().execute(&mut *tx).await?;
    let models: BTreeSet<&str> = tasks.iter().map(|t| t.model.as_str()).collect();
    for model in models {
        notify(&mut tx, &format!("task:{model}")).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Group commit for final states: every outcome waiting at the moment is written by one
/// `UPDATE … FROM unnest(…)` (each row still guarded by its own token), with its blobs, outbox
/// rows and one NOTIFY per model, in one transaction; each caller learns after the commit
/// whether its write took.
async fn finish_batches(pool: PgPool, mut rx: mpsc::Receiver<FinishRequest>) {
    let mut batch: Vec<FinishRequest> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Rows that took are told apart by task id, so a batch naming one task twice (a stale
        // attempt and the current one finishing together) is written one outcome at a time.
        let result = if super::distinct_tasks(batch.iter().map(|r| r.id.as_str())) {
            finish_all(&pool, &batch).await
        } else {
            Err(StoreError::Conflict("a batch names one task twice".into()))
        };
        match result {
            Ok(written) => {
                for req in batch.drain(..) {
                    let ok = written.contains(req.id.as_str());
                    let _ = req.reply.send(Ok(ok));
                }
            }
            // The database is unreachable, or the commit's outcome is unknown (it may have
            // landed): every caller hears so, and the completer reads its task back before
            // taking a later "not ours" for the truth. Writing each on its own here would turn
            // a commit that landed into "not ours", and wait out a timeout per row.
            Err(StoreError::Unavailable(e)) => {
                let msg = e.to_string();
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(super::unavailable(&msg)));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(req) = batch.pop() {
                    let _ = req.reply.send(Err(e));
                }
            }
            Err(_) => {
                // One bad outcome must not fail its neighbours: write each on its own.
                for req in batch.drain(..) {
                    let r = finish_all(&pool, std::slice::from_ref(&req))
                        .await
                        .map(|w| w.contains(req.id.as_str()));
                    let _ = req.reply.send(r);
                }
            }
        }
    }
}

/// Writes a batch of final states; returns the ids whose write took.
async fn finish_all(
    pool: &PgPool,
    batch: &[FinishRequest],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let (mut ids, mut tokens, mut states, mut nows) = (vec![], vec![], vec![], vec![]);
    let (mut outputs, mut codes, mut messages, mut routes) = (vec![], vec![], vec![], vec![]);
    // Sorted by id so batches usually meet rows in the same order; the plan may still join in
    // another, and a deadlock with another node's batch is an error that sends the batch down
    // the one-outcome-at-a-time path.
    let mut ordered: Vec<&FinishRequest> = batch.iter().collect();
    ordered.sort_by(|a, b| a.id.cmp(&b.id));
    for req in ordered {
        let (state, out, code, message) = outcome_columns(&req.outcome)?;
        ids.push(req.id.as_str());
        tokens.push(req.token.as_str());
        states.push(state.as_str());
        nows.push(req.now);
        outputs.push(out);
        codes.push(code);
        messages.push(message);
        routes.push(req.route.as_deref());
    }
    let mut tx = pool.begin().await?;
    // Succeed and Fail share their guard (from `processing`, under the claim's token). The
    // unnested columns are named apart from the table's so the guard reads the task's own. The
    // URL comes back only where the task owes a final-state delivery (it may have asked for
    // start or progress events alone).
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(&format!(
        "UPDATE tasks SET state = v.new_state, complete_time = v.at, outputs = v.outs, \
         fail_code = v.code, fail_msg = v.msg, route = v.route, lease_token = NULL, \
         lease_expires_at = NULL \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], \
                     $7::text[], $8::text[]) AS v(task, token, new_state, at, outs, code, msg, route) \
         WHERE tasks.id = v.task AND tasks.{} AND tasks.lease_token = v.token \
         RETURNING tasks.id, tasks.model, tasks.tenant_id, \
                   CASE WHEN {} THEN tasks.callback_url END",
        Transition::Succeed.guard(),
        asks(WebhookEvent::Completed, "tasks.")
    ))
    .bind(&ids)
    .bind(&tokens)
    .bind(&states)
    .bind(&nows)
    .bind(&outputs)
    .bind(&codes)
    .bind(&messages)
    .bind(&routes)
    .fetch_all(&mut *tx)
    .await?;
    let written: std::collections::HashSet<String> =
        rows.iter().map(|(id, ..)| id.clone()).collect();
    let (mut keys, mut owners, mut contents) = (vec![], vec![], vec![]);
    for req in batch.iter().filter(|r| written.contains(r.id.as_str())) {
        if let Outcome::Success { blobs, .. } = &req.outcome {
            for blob in blobs {
                keys.push(blob.key.as_str());
                owners.push(req.id.as_str());
                contents.push(blob.content.as_slice());
            }
        }
    }
    if !keys.is_empty() {
        sqlx::query(
            "INSERT INTO output_blobs (key, task_id, content) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])",
        )
        .bind(&keys)
        .bind(&owners)
        .bind(&contents)
        .execute(&mut *tx)
        .await?;
    }
    let now_of: std::collections::HashMap<&str, i64> =
        batch.iter().map(|r| (r.id.as_str(), r.now)).collect();
    let (mut d_ids, mut d_tasks, mut d_tenants, mut d_urls, mut d_at) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (id, _, tenant, url) in &rows {
        if let Some(url) = url {
            d_ids.push(new_id("whk"));
            d_tasks.push(id.as_str());
            d_tenants.push(tenant.as_str());
            d_urls.push(url.as_str());
            d_at.push(now_of.get(id.as_str()).copied().unwrap_or_default());
        }
    }
    if !d_ids.is_empty() {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, \
             next_attempt_at, created_at) \
             SELECT i, t, n, u, 'pending', a, a \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                  AS d(i, t, n, u, a)",
        )
        .bind(&d_ids)
        .bind(&d_tasks)
        .bind(&d_tenants)
        .bind(&d_urls)
        .bind(&d_at)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, "delivery").await?;
    }
    // A slot of each model is free again, on whichever node takes it.
    let models: BTreeSet<&str> = rows.iter().map(|(_, m, ..)| m.as_str()).collect();
    for model in models {
        notify(&mut tx, &format!("task:{model}")).await?;
    }
    // A failed commit may have landed all the same: its outcome is unknown.
    tx.commit()
        .await
        .map_err(|e| StoreError::Unavailable(e.into()))?;
    Ok(written)
}

/// The outbox write, in the transaction that made the task final (unless the task asked for
/// other events only).
async fn enqueue_callback(
    tx: &mut Transaction<'_, Postgres>,
    task_id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let r = sqlx::query(&format!(
        "INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, next_attempt_at, \
         created_at) SELECT $1, id, tenant_id, callback_url, 'pending', $2, $2 FROM tasks \
         WHERE id = $3 AND {}",
        asks(WebhookEvent::Completed, "")
    ))
    .bind(new_id("whk"))
    .bind(now)
    .bind(task_id)
    .execute(&mut **tx)
    .await?;
    let queued = r.rows_affected() == 1;
    if queued {
        notify(tx, "delivery").await?;
    }
    Ok(queued)
}

/// The start deliveries of a claim's tasks that asked for them, in the claim's transaction,
/// with the `delivery` notice. A claim none of whose tasks asked runs no statement.
async fn insert_start_events(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[ClaimedRow],
    now: i64,
) -> Result<(), StoreError> {
    let tasks = start_event_ids(rows);
    if tasks.is_empty() {
        return Ok(());
    }
    let deliveries: Vec<String> = tasks.iter().map(|_| new_id("whk")).collect();
    sqlx::query(&insert_start_events_sql(
        Dialect::Postgres,
        "SELECT * FROM unnest($1::text[], $2::text[]) AS u(task, delivery)",
        "$3",
    ))
    .bind(&tasks)
    .bind(&deliveries)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    notify(tx, "delivery").await
}

impl PostgresStore {
    /// A lease renewal that reports `progress`, and the `progress` delivery it may owe
    /// (`rows::owes_progress_event`), in one statement. The row is locked first (`FOR UPDATE`),
    /// so two nodes renewing one task at once take turns, and the second sees the first's
    /// `last_progress_event_at`: the one-per-second limit holds across nodes, on the database's
    /// clock. The `delivery` notice is sent from the same statement when a row was written
    /// (the CTE calling `pg_notify` is volatile, so it is run, once per row inserted). Tasks
    /// that did not ask for progress events insert nothing and notify nothing.
    async fn renew_with_progress(
        &self,
        id: &str,
        token: &str,
        now: i64,
        lease: Duration,
        progress: f64,
    ) -> Result<bool, StoreError> {
        // `now` (the node's clock) stamps the delivery, as every outbox row is stamped; the
        // throttle is judged on the database's clock.
        let (renewed, _queued): (i64, i64) = sqlx::query_as(&format!(
            "WITH cur AS ( \
               SELECT t.id, {owed} AS owed FROM tasks t \
               WHERE t.id = $2 AND t.state = 'processing' AND t.lease_token = $3 FOR UPDATE), \
             upd AS ( \
               UPDATE tasks t SET lease_expires_at = {DB_NOW_MS} + $1, progress = $4, \
                 claim_acked = TRUE, last_progress_event_at = \
                   CASE WHEN cur.owed THEN {DB_NOW_MS} ELSE t.last_progress_event_at END \
               FROM cur WHERE t.id = cur.id \
               RETURNING t.id, t.tenant_id, t.callback_url, t.state, t.create_time, cur.owed), \
             ins AS ( \
               INSERT INTO webhook_deliveries (id, task_id, tenant_id, url, state, \
                 next_attempt_at, created_at, event, payload) \
               SELECT $5, t.id, t.tenant_id, t.callback_url, 'pending', $6, $6, 'progress', \
                      {snapshot} \
               FROM upd t WHERE t.owed RETURNING 1), \
             notified AS (SELECT pg_notify($7, 'delivery') FROM ins) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM notified)",
            owed = owes_progress_event(Dialect::Postgres, "$4::double precision", DB_NOW_MS),
            snapshot = status_snapshot(Dialect::Postgres, "$4::double precision"),
        ))
        .bind(lease.as_millis() as i64)
        .bind(id)
        .bind(token)
        .bind(progress)
        .bind(new_id("whk"))
        .bind(now)
        .bind(CHANNEL)
        // The API's pool: the engine's four connections are for claims and final states, and a
        // chatty model's progress must not queue them.
        .fetch_one(&self.pool)
        .await?;
        Ok(renewed == 1)
    }

    /// Hands on the processing tasks matching `which` (SQL over the row): claims never
    /// acknowledged go back without counting; tasks out of attempts fail; the rest go back to
    /// pending. `SKIP LOCKED`: a row another node is settling right now is not expired.
    async fn recover(&self, which: &str, now: i64) -> Result<Recovered, StoreError> {
        let completed = now.min(crate::domain::now_ms());
        let requeue = format!(
            "{}, lease_token = NULL, lease_expires_at = NULL, runner = NULL",
            Transition::Requeue.set_state()
        );
        let rows = |extra: &str, t: Transition| {
            format!(
                "SELECT id FROM tasks WHERE {} AND {which} {extra} FOR UPDATE SKIP LOCKED",
                t.guard()
            )
        };
        let mut tx = self.pool.begin().await?;
        let unacknowledged: Vec<(String, String)> = sqlx::query_as(&format!(
            "UPDATE tasks SET {requeue}, attempts = attempts - 1, claim_acked = TRUE, \
             unacked_refunds = unacked_refunds + 1 WHERE id IN ({}) RETURNING id, model",
            rows(
                &format!("AND claim_acked = FALSE AND unacked_refunds < {MAX_UNACKED_REFUNDS}"),
                Transition::Requeue
            )
        ))
        .fetch_all(&mut *tx)
        .await?;
        // Their claims never reached a runner: the starts they announced did not happen.
        for (id, _) in &unacknowledged {
            sqlx::query(&withdraw_start_sql("$1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let failed: Vec<(String, String)> = sqlx::query_as(&format!(
            "UPDATE tasks SET {}, complete_time = $1, fail_code = $2, fail_msg = {EXHAUSTED_SQL}, \
             lease_token = NULL, lease_expires_at = NULL \
             WHERE id IN ({}) RETURNING id, model",
            Transition::Fail.set_state(),
            rows("AND attempts >= max_attempts", Transition::Fail)
        ))
        .bind(completed)
        .bind(fail_code::ATTEMPTS_EXHAUSTED)
        .fetch_all(&mut *tx)
        .await?;
        for (id, _) in &failed {
            enqueue_callback(&mut tx, id, completed).await?;
        }
        // The attempt each of these lost goes into its history.
        let requeued: Vec<(String, String)> = sqlx::query_as(&format!(
            "UPDATE tasks SET {requeue}, {} WHERE id IN ({}) RETURNING id, model",
            append_attempt_sql(Dialect::Postgres, DB_NOW_MS, "$1", "$2", "NULL"),
            rows("", Transition::Requeue)
        ))
        .bind(LEASE_EXPIRED)
        .bind(LEASE_EXPIRED_MSG)
        .fetch_all(&mut *tx)
        .await?;
        let models: BTreeSet<&str> = unacknowledged
            .iter()
            .chain(&failed)
            .chain(&requeued)
            .map(|(_, m)| m.as_str())
            .collect();
        for model in models {
            notify(&mut tx, &format!("task:{model}")).await?;
        }
        tx.commit().await?;
        let ids = |v: Vec<(String, String)>| v.into_iter().map(|(id, _)| id).collect();
        Ok(Recovered {
            requeued: ids(requeued),
            failed: ids(failed),
            unacknowledged: ids(unacknowledged),
        })
    }
}

fn parse_event(payload: &str) -> Option<StoreEvent> {
    match payload.split_once(':') {
        Some(("task", model)) => Some(StoreEvent::TaskReady(model.to_owned())),
        // Sent by the `tasks_changed` trigger (migration 0007).
        Some(("changed", ids)) => Some(StoreEvent::TasksChanged(
            ids.split(',').map(str::to_owned).collect(),
        )),
        Some(("cancel", id)) => Some(StoreEvent::TaskCancelled(id.to_owned())),
        _ if payload == "delivery" => Some(StoreEvent::DeliveryReady),
        _ => None,
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_task(&self, task: NewTask) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inserts
            .send((task, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT content FROM output_blobs WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        sqlx::query_as::<_, TaskRow>(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
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

    async fn claim_batch(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
        max_running: usize,
        limit: usize,
        runner: Runner,
    ) -> Result<Vec<Claim>, StoreError> {
        let prefix = format!("{}_", new_id("att"));
        // Local loops claim on the engine's pool; pull workers' long-polls, which arrive as API
        // traffic, on the API's, so a crowd of workers cannot hold the engine's connections.
        let pool = match runner {
            Runner::Local => &self.engine,
            Runner::Worker => &self.pool,
        };
        let mut tx = pool.begin().await?;
        // Serialises claims of one model across nodes, so the count below stays true until commit.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7474))")
            .bind(model)
            .execute(&mut *tx)
            .await?;
        // The tenants with pending tasks (a loose index scan), their passes, and the room the
        // model's count leaves; then each tenant's share (`store::fair`).
        let shares: Vec<Share> =
            sqlx::query_as(&tenants_sql(Dialect::Postgres, |n| format!("${n}")))
                .bind(model)
                .bind(now)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind(i64::try_from(max_running).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
        let Some(first) = shares.first() else {
            return Ok(Vec::new());
        };
        let room = i64::try_from(max_running)
            .unwrap_or(i64::MAX)
            .saturating_sub(first.running)
            .min(i64::try_from(limit).unwrap_or(i64::MAX));
        if room <= 0 {
            return Ok(Vec::new());
        }
        let plan = plan(
            &shares,
            &self.weights.get(),
            usize::try_from(room).unwrap_or(0),
        );
        let claim = format!(
            "UPDATE tasks SET {set}, attempts = attempts + 1, progress = NULL, \
             lease_token = $1 || id, lease_expires_at = {DB_NOW_MS} + $2, \
             expires_at = NULL, \
             start_time = {DB_NOW_MS}, \
             runner = $6, claim_acked = $7 \
             WHERE id IN (SELECT id FROM tasks WHERE model = $4 AND tenant_id = $8 AND {guard} \
                          AND run_after <= $3 AND {live} \
                          ORDER BY priority DESC, id LIMIT $5 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING {returning}",
            set = Transition::Claim.set_state(),
            guard = Transition::Claim.guard(),
            live = not_expired("$3"),
            returning = claim_returning(),
        );
        let mut rows = Vec::new();
        for (tenant, take) in &plan.take {
            let claimed = sqlx::query_as::<_, ClaimedRow>(&claim)
                .bind(&prefix)
                .bind(lease.as_millis() as i64)
                .bind(now)
                .bind(model)
                .bind(i64::try_from(*take).unwrap_or(i64::MAX))
                .bind(runner.as_str())
                .bind(runner == Runner::Local)
                .bind(tenant)
                .fetch_all(&mut *tx)
                .await?;
            rows.extend(claimed);
        }
        if !plan.passes.is_empty() {
            let sql = passes_sql(plan.passes.len(), |n| format!("${n}"));
            let mut q = sqlx::query(&sql).bind(model);
            for (tenant, pass) in &plan.passes {
                q = q.bind(tenant).bind(pass);
            }
            q.execute(&mut *tx).await?;
        }
        insert_start_events(&mut tx, &rows, now).await?;
        tx.commit().await?;
        claims_from_rows(rows.into_iter().map(|r| r.task).collect(), &prefix)
    }

    async fn next_due(&self, model: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(run_after) FROM tasks WHERE model = $1 AND state = 'pending'",
        )
        .bind(model)
        .fetch_one(&self.engine)
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
        let r = sqlx::query(&format!(
            "UPDATE tasks SET lease_expires_at = {DB_NOW_MS} + $1, \
             progress = COALESCE($4, progress), claim_acked = TRUE \
             WHERE id = $2 AND state = 'processing' AND lease_token = $3"
        ))
        .bind(lease.as_millis() as i64)
        .bind(id)
        .bind(token)
        .bind(progress)
        .execute(&self.engine)
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
        self.finishes
            .send(req)
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn requeue(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        refund_attempt: bool,
    ) -> Result<bool, StoreError> {
        let mut tx = self.engine.begin().await?;
        let model: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {}, run_after = $1, lease_token = NULL, \
             lease_expires_at = NULL, attempts = attempts - $2 \
             WHERE id = $3 AND {} AND lease_token = $4 RETURNING model",
            Transition::Requeue.set_state(),
            Transition::Requeue.guard()
        ))
        .bind(run_after)
        .bind(i64::from(refund_attempt))
        .bind(id)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(model) = model else {
            return Ok(false);
        };
        notify(&mut tx, &format!("task:{model}")).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// `FOR UPDATE` (waiting, not skipping): a final state being written by another node's
    /// batch right now is waited for and then found final, rather than cancelled over.
    async fn cancel_task(
        &self,
        id: &str,
        tenant_id: &str,
        model: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT runner, {TASK_COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE"
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
            "UPDATE tasks SET {}, complete_time = $1, fail_code = $2, fail_msg = $3, \
             lease_token = NULL, lease_expires_at = NULL WHERE id = $4 AND {} \
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
        let runner = (from == taskgate_proto::TaskState::Processing)
            .then(|| runner.as_deref().and_then(Runner::parse))
            .flatten();
        if from == taskgate_proto::TaskState::Processing {
            // The node running a local attempt stops it now (a pull worker learns at its next
            // heartbeat); and a slot of the model is free, on whichever node takes it.
            if runner != Some(Runner::Worker) {
                notify(&mut tx, &format!("cancel:{id}")).await?;
            }
            notify(&mut tx, &format!("task:{model}")).await?;
        }
        // A failed commit may have landed all the same: its outcome is unknown.
        tx.commit()
            .await
            .map_err(|e| StoreError::Unavailable(e.into()))?;
        Ok(CancelOutcome::Cancelled {
            task: Task::try_from(written)?,
            from,
            runner,
        })
    }

    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError> {
        // The caller's `now` only stamps completion times: expiry is judged on the database's
        // clock, the one every lease was set on, read once so that the three statements of the
        // sweep agree on which leases have ended.
        let db_now = self.clock_ms().await?;
        self.recover(&format!("lease_expires_at <= {db_now}"), now)
            .await
    }

    async fn clock_ms(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!("SELECT {DB_NOW_MS}"))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn recover_local(&self, now: i64) -> Result<Recovered, StoreError> {
        // Nodes share the database: another node's local attempt is alive while its lease is.
        self.recover_expired(now).await
    }

    /// Only `pending` tasks: on a shared store a task `processing` on another node (one that
    /// still offers the model, during a rolling deploy) is left to its runner, and comes back
    /// here as pending if its lease expires.
    async fn expire_pending(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {}, complete_time = $1, fail_code = $2, fail_msg = $3 \
             WHERE id IN (SELECT id FROM tasks WHERE {} AND expires_at IS NOT NULL \
                          AND expires_at <= $1 ORDER BY expires_at LIMIT $4 \
                          FOR UPDATE SKIP LOCKED) \
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
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::new();
        let mut tx = self.pool.begin().await?;
        for model in models.iter().filter(|m| !known.contains(m)) {
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "UPDATE tasks SET {}, complete_time = $1, fail_code = $2, fail_msg = $3, \
                 lease_token = NULL, lease_expires_at = NULL WHERE id IN \
                 (SELECT id FROM tasks WHERE model = $4 AND {} AND state = 'pending' \
                  FOR UPDATE SKIP LOCKED) \
                 RETURNING id",
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
            sqlx::query_as::<_, TenantRow>("SELECT id, name FROM tenants WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .map(Tenant::from),
        )
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let tenant = Tenant {
            id: new_id("ten"),
            name: name.to_owned(),
        };
        let r = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(crate::domain::now_ms())
            .execute(&self.pool)
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
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, prefix, created_at, kind, \
             models, read_only, requests_per_minute, concurrent_tasks) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&record.id)
        .bind(&tenant.id)
        .bind(name)
        .bind(key_hash)
        .bind(prefix)
        .bind(record.created_at)
        .bind(kind.as_str())
        .bind(models_column(policy))
        .bind(policy.read_only)
        .bind(policy.requests_per_minute.map(i64::from))
        .bind(policy.concurrent_tasks.map(i64::from))
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(record),
            // Nodes starting together all register TASKGATE_API_KEY; one of them wins.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                "this key is registered already".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, KeyRow>(&format!("{KEY_SELECT} WHERE k.key_hash = $1"))
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?
                .map(ApiKeyRecord::from),
        )
    }

    async fn keys_revision(&self) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(
            "SELECT count(revoked_at) + CAST(COALESCE(sum(changes), 0) AS BIGINT), \
             COALESCE(max(revoked_at), 0) FROM api_keys",
        )
        .fetch_one(&self.engine)
        .await?)
    }

    async fn update_key_policy(&self, id: &str, policy: &KeyPolicy) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE api_keys SET models = $1, read_only = $2, requests_per_minute = $3, \
             concurrent_tasks = $4, changes = changes + 1 \
             WHERE id = $5 AND kind = 'client' AND revoked_at IS NULL",
        )
        .bind(models_column(policy))
        .bind(policy.read_only)
        .bind(policy.requests_per_minute.map(i64::from))
        .bind(policy.concurrent_tasks.map(i64::from))
        .bind(id)
        .execute(&self.pool)
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
                .execute(&self.pool)
                .await?;
        }
        sqlx::query("DELETE FROM key_usage WHERE bucket < $1")
            .bind(oldest)
            .execute(&self.pool)
            .await?;
        let rows = sqlx::query_as(&others_key_usage_sql(|n| format!("${n}")))
            .bind(node)
            .bind(oldest)
            .fetch_all(&self.engine)
            .await?;
        Ok(key_usage_from(rows))
    }

    async fn unfinished_by_key(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query_as(UNFINISHED_BY_KEY_SQL)
            .fetch_all(&self.engine)
            .await?;
        Ok(unfinished_from(rows))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Ok(
            sqlx::query_as::<_, KeyRow>(&format!("{KEY_SELECT} ORDER BY k.created_at, k.id"))
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(ApiKeyRecord::from)
                .collect(),
        )
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(init)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn webhook_secrets(
        &self,
        tenant_id: &str,
        init: &str,
    ) -> Result<WebhookSecrets, StoreError> {
        sqlx::query(
            "INSERT INTO webhook_secrets (tenant_id, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(init)
        .bind(crate::domain::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query_as::<_, SecretsRow>(
            "SELECT secret, previous_secret, previous_expires_at FROM webhook_secrets \
             WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_one(&self.pool)
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
        // The guard sits in the upsert itself, so two nodes rotating at once cannot both pass.
        let rotated = sqlx::query_as::<_, SecretsRow>(
            "INSERT INTO webhook_secrets (tenant_id, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO UPDATE SET previous_secret = webhook_secrets.secret, \
             previous_expires_at = $4, secret = EXCLUDED.secret, created_at = EXCLUDED.created_at \
             WHERE webhook_secrets.previous_expires_at IS NULL \
                OR webhook_secrets.previous_expires_at <= $3 \
             RETURNING secret, previous_secret, previous_expires_at",
        )
        .bind(tenant_id)
        .bind(new)
        .bind(now)
        .bind(previous_until)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = rotated {
            return Ok(Rotation::Rotated(r.into()));
        }
        Ok(Rotation::OverlapRunning(
            sqlx::query_as::<_, SecretsRow>(
                "SELECT secret, previous_secret, previous_expires_at FROM webhook_secrets \
                 WHERE tenant_id = $1",
            )
            .bind(tenant_id)
            .fetch_one(&self.pool)
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
        let (hosts, rooms): (Vec<&str>, Vec<i64>) = room
            .limited
            .iter()
            .map(|(h, r)| (h.as_str(), i64::try_from(*r).unwrap_or(i64::MAX)))
            .unzip();
        // A window function cannot be locked, so the ranked pick is locked in an outer select;
        // it re-checks `state`, since another node may have claimed a row since the snapshot.
        let rows = sqlx::query_as::<_, ClaimedDeliveryRow>(&format!(
            "UPDATE webhook_deliveries SET state = 'delivering', lease_token = $1, \
             lease_expires_at = {DB_NOW_MS} + $2 WHERE id IN ( \
               SELECT id FROM webhook_deliveries WHERE state = 'pending' AND id IN ( \
                 SELECT id FROM ( \
                   SELECT d.id, d.next_attempt_at, COALESCE(l.room, $6) AS room, \
                          row_number() OVER (PARTITION BY d.host \
                                             ORDER BY d.next_attempt_at, d.id) AS rn \
                   FROM webhook_deliveries d \
                   LEFT JOIN unnest($5::text[], $7::bigint[]) AS l(host, room) \
                     ON l.host = d.host \
                   WHERE d.state = 'pending' AND d.next_attempt_at <= $3) ranked \
                 WHERE rn <= room ORDER BY next_attempt_at, id LIMIT $4) \
               FOR UPDATE SKIP LOCKED) \
             RETURNING {returning}",
            returning = delivery_claim_returning()
        ))
        .bind(&token)
        .bind(lease.as_millis() as i64)
        .bind(now)
        .bind(limit as i64)
        .bind(&hosts)
        .bind(i64::try_from(room.per_host).unwrap_or(i64::MAX))
        .bind(&rooms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.into_claim(&token)).collect())
    }

    async fn next_delivery_due(&self, blocked: &[String]) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending' \
             AND NOT (host = ANY($1))",
        )
        .bind(blocked)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn defer_host(&self, host: &str, until: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = $1 \
             WHERE state = 'pending' AND host = $2 AND next_attempt_at < $1",
        )
        .bind(until)
        .bind(host)
        .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, \
             next_attempt_at = COALESCE($2, next_attempt_at), completed_at = $3, \
             attempts = attempts + $4, last_error = COALESCE($5, last_error), \
             lease_token = NULL, lease_expires_at = NULL \
             WHERE id = $6 AND state = 'delivering' AND lease_token = $7",
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
                 latency_ms, error) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(a.attempted_at)
            .bind(a.status_code.map(i64::from))
            .bind(a.latency_ms)
            .bind(&a.error)
            .execute(&mut *tx)
            .await?;
        }
        if state == "pending" {
            notify(&mut tx, "delivery").await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        Ok(sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(Delivery::from))
    }

    async fn deliveries_for_task(
        &self,
        task_id: &str,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>, StoreError> {
        let rows = sqlx::query_as::<_, DeliveryRow>(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE task_id = $1 \
             ORDER BY created_at, id"
        ))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let d = Delivery::from(row);
            let attempts = sqlx::query_as::<_, AttemptRow>(
                "SELECT attempted_at, status_code, latency_ms, error FROM webhook_attempts \
                 WHERE delivery_id = $1 ORDER BY id",
            )
            .bind(&d.id)
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $1, \
             completed_at = NULL, last_manual_retry_at = $1 \
             WHERE id = $2 AND state <> 'delivering' \
             AND (last_manual_retry_at IS NULL OR last_manual_retry_at <= $1 - $3)",
        )
        .bind(now)
        .bind(id)
        .bind(gap)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 1 {
            notify(&mut tx, "delivery").await?;
            tx.commit().await?;
            return Ok(Redeliver::Scheduled);
        }
        tx.rollback().await?;
        let last: Option<Option<i64>> =
            sqlx::query_scalar("SELECT last_manual_retry_at FROM webhook_deliveries WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(super::redeliver_refusal(last, now, gap))
    }

    async fn recover_expired_deliveries(&self, _now: i64) -> Result<u64, StoreError> {
        // Judged on the database's clock, the one the lease was set on.
        let r = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET state = 'pending', lease_token = NULL, \
             lease_expires_at = NULL WHERE state = 'delivering' AND lease_expires_at <= {DB_NOW_MS}"
        ))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn finished_tasks(
        &self,
        after: Option<(i64, String)>,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Finished>, StoreError> {
        let sql = finished_tasks_sql(after.is_some(), |n| format!("${n}"));
        let mut q = sqlx::query_as::<_, FinishedRow>(&sql)
            .bind(before)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        // Bound only when the statement names it: PostgreSQL must type every parameter sent.
        if let Some((at, id)) = after {
            q = q.bind(at).bind(id);
        }
        finished_from_rows(q.fetch_all(&self.pool).await?)
    }

    async fn delete_blobs(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let r = sqlx::query("DELETE FROM output_blobs WHERE key = ANY($1)")
            .bind(keys)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn delete_tasks(&self, task_ids: &[String]) -> Result<Vec<String>, StoreError> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let [attempts, deliveries, logs, tasks] = delete_tasks_sql("SELECT unnest($1::text[])");
        let mut tx = self.pool.begin().await?;
        sqlx::query(&attempts)
            .bind(task_ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&deliveries)
            .bind(task_ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&logs).bind(task_ids).execute(&mut *tx).await?;
        let deleted: Vec<String> = sqlx::query_scalar(&tasks)
            .bind(task_ids)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn delete_expired_keys(&self, before: i64, limit: usize) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN \
             (SELECT tenant_id, key FROM idempotency_keys WHERE created_at < $1 \
              ORDER BY created_at LIMIT $2)",
        )
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn advance_setting(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = GREATEST(settings.value, excluded.value) \
             RETURNING value",
        )
        .bind(name)
        .bind(value)
        .fetch_one(&self.pool)
        .await?)
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
        super::usage::read_usage!(&self.pool, super::rows::Dialect::Postgres, query)
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

    fn set_tenant_weights(&self, weights: super::TenantWeights) {
        self.weights.set(weights);
    }

    fn exclusive(&self) -> bool {
        false
    }

    async fn listen(&self, events: mpsc::UnboundedSender<StoreEvent>) {
        loop {
            let mut listener = tokio::select! {
                l = PgListener::connect_with(&self.pool) => l,
                _ = self.closing.cancelled() => return,
            };
            let connected = match listener.as_mut() {
                Ok(l) => l.listen(CHANNEL).await,
                Err(_) => Err(sqlx::Error::PoolClosed),
            };
            if let (Ok(mut listener), Ok(())) = (listener, connected) {
                // Anything sent while we were not listening was missed.
                if events.send(StoreEvent::Resync).is_err() {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        n = listener.try_recv() => n,
                        _ = self.closing.cancelled() => return,
                    };
                    match next {
                        Ok(Some(n)) => {
                            if let Some(ev) = parse_event(n.payload()) {
                                if events.send(ev).is_err() {
                                    return;
                                }
                            }
                        }
                        // The connection dropped; reconnect and resync.
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            tracing::warn!("lost the PostgreSQL notification connection; reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.closing.cancelled() => return,
            }
        }
    }

    async fn close(&self) {
        self.closing.cancel();
        self.pool.close().await;
        self.engine.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_payloads_name_their_event() {
        assert_eq!(
            parse_event("task:echo"),
            Some(StoreEvent::TaskReady("echo".into()))
        );
        assert_eq!(parse_event("delivery"), Some(StoreEvent::DeliveryReady));
        assert_eq!(
            parse_event("changed:task_a,task_b"),
            Some(StoreEvent::TasksChanged(vec![
                "task_a".into(),
                "task_b".into()
            ]))
        );
        assert_eq!(
            parse_event("cancel:task_1"),
            Some(StoreEvent::TaskCancelled("task_1".into()))
        );
        assert_eq!(parse_event("other"), None);
    }
}
