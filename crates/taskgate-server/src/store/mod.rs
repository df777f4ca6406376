//! Durable state behind one trait, so the API and dispatch never see SQL.
//!
//! Implementations: [`sqlite::SqliteStore`] (the embedded default). The trait is shaped for a
//! PostgreSQL store with many nodes: every claim carries a fresh attempt token and a lease, and
//! every write that ends or hands on a claim is guarded by that token, so a stale holder cannot
//! overwrite the work of the node the task was handed to.

mod batch;
pub mod dashboard;
pub mod fair;
pub mod faults;
pub mod postgres;
mod rows;
pub mod sqlite;
pub mod usage;

pub use batch::{IdempotencyKey, KeyedInsert, TaskPage, TaskQuery};
pub use dashboard::{AttemptEnd, AttemptRecord, CountRow};
pub use fair::TenantWeights;
pub use usage::{UsageAggregate, UsageQuery};

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::domain::Task;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused or lost, pool exhausted): the request
    /// may succeed later; nothing was written.
    #[error("the database is unavailable")]
    Unavailable(#[source] BoxError),
    #[error("database error")]
    Database(#[source] BoxError),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the store is shutting down")]
    Closed,
}

/// A driver's error (sqlx's, or rusqlite's on the SQLite writer thread), kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.into()),
            other => StoreError::Database(other.into()),
        }
    }
}

/// Something other nodes did that this node may act on (PostgreSQL LISTEN/NOTIFY).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A task of this model may be claimable (submitted, requeued, or capacity freed).
    TaskReady(String),
    /// A webhook delivery may be due.
    DeliveryReady,
    /// These tasks' state or progress changed (on any node): requests waiting on them look again.
    TasksChanged(Vec<String>),
    /// A processing task was cancelled (its final state is written): whichever node runs its
    /// attempt stops it now rather than at its next lease renewal.
    TaskCancelled(String),
    /// Notifications may have been missed (the listener reconnected): recheck everything.
    Resync,
}

/// A task to insert, in state `pending`.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub tenant_id: String,
    pub model: String,
    pub input: Map<String, Value>,
    pub callback_url: Option<String>,
    pub max_attempts: u32,
    pub create_time: i64,
    /// Higher runs first among a model's due tasks.
    pub priority: i32,
    /// Not started by then (Unix ms), the task fails with `EXPIRED`.
    pub expires_at: Option<i64>,
    /// Which events are delivered to `callback_url` (start, progress, the final state).
    pub webhook_events: crate::domain::EventMask,
    /// The submit request's W3C `traceparent`, kept while trace export is on so the attempt's
    /// span can link to it (`telemetry`); `None` otherwise.
    pub trace_parent: Option<String>,
    /// The client key that submitted it (per-key limits and the usage report count by it).
    pub key_id: Option<String>,
}

/// A claimed task and the token that proves the claim.
#[derive(Debug, Clone)]
pub struct Claim {
    pub task: Task,
    pub token: String,
}

/// An output kept in the database rather than as a file (small results of in-process
/// backends): written in the same transaction as the `success` that lists its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub key: String,
    pub content: Vec<u8>,
}

/// How an attempt ended, when it ends the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `outputs` lists every output key, in order; `blobs` carries the bytes of those kept in
    /// the database (a subset of `outputs`), the rest are files in the artifact store.
    Success {
        outputs: Vec<String>,
        blobs: Vec<Blob>,
    },
    Failure {
        code: String,
        message: String,
    },
}

/// What a lease sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Back to pending, to run again.
    pub requeued: Vec<String>,
    /// Out of attempts: failed with `ATTEMPTS_EXHAUSTED`.
    pub failed: Vec<String>,
    /// Claims a pull worker never acknowledged (the claim answer was lost): back to pending
    /// without the attempt counting.
    pub unacknowledged: Vec<String>,
}

impl Recovered {
    pub fn is_empty(&self) -> bool {
        self.requeued.is_empty() && self.failed.is_empty() && self.unacknowledged.is_empty()
    }
}

/// How many unacknowledged claims of one task go back without counting; past this, an
/// unacknowledged claim that expires counts like any lost attempt, so the task still ends.
pub const MAX_UNACKED_REFUNDS: u32 = 3;

/// Who runs a claimed attempt. Decides what a restart recovers: an attempt that ran inside the
/// process that died is recovered at start; a pull worker's keeps its lease, since the worker
/// may still be running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// This server's dispatcher, in this process.
    Local,
    /// A pull worker, over the worker API. Its claim counts only once the worker acknowledges
    /// it (its first heartbeat): a claim whose answer never reached the worker is handed back
    /// without burning an attempt.
    Worker,
}

impl Runner {
    pub fn as_str(self) -> &'static str {
        match self {
            Runner::Local => "local",
            Runner::Worker => "worker",
        }
    }

    /// The runner named by the `runner` column (`None`: not claimed, or claimed by a version that
    /// did not record it).
    pub fn parse(s: &str) -> Option<Runner> {
        match s {
            "local" => Some(Runner::Local),
            "worker" => Some(Runner::Worker),
            _ => None,
        }
    }
}

/// What [`Store::cancel_task`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Written: the task is `failed` with `CANCELLED` (`task` as it is now), its lease token
    /// cleared and its callback owed. `from` is the state it left; when that was `processing`,
    /// `runner` is who ran the attempt the write cut off (`None` for a claim recorded without
    /// one), which must now stop it.
    Cancelled {
        task: Task,
        from: taskgate_proto::TaskState,
        runner: Option<Runner>,
    },
    /// The task was final already: nothing changed.
    AlreadyFinal(Task),
    /// No task with that id for this tenant and model.
    NotFound,
}

/// failMsg of a cancelled task.
pub(crate) fn cancelled_message(from: taskgate_proto::TaskState) -> String {
    format!("the task was cancelled by its owner (cancelTask) while {from}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
}

/// What a key may do: client keys submit and read tasks; worker tokens claim and run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Client,
    Worker,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Client => "client",
            KeyKind::Worker => "worker",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub kind: KeyKind,
    pub tenant: Tenant,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub key_hash: Vec<u8>,
    pub policy: KeyPolicy,
}

/// A client key's scope and limits (docs/gateway.md, "Per-key limits and scopes").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPolicy {
    /// The models the key may use; `None`: every model.
    pub models: Option<Vec<String>>,
    /// Reads only: every submit, cancel or change is refused.
    pub read_only: bool,
    /// `None` takes the server's `[limits]` default; 0 is unlimited.
    pub requests_per_minute: Option<u32>,
    /// `None` takes the server's `[limits]` default; 0 is unlimited.
    pub concurrent_tasks: Option<u32>,
}

impl KeyPolicy {
    /// Whether the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|name| name == model))
    }
}

/// One node's count of a key's requests in one bucket of time (`limits` module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub bucket: i64,
    pub count: u64,
}

/// A tenant's webhook signing secrets: during a rotation the previous one still signs.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecrets {
    pub current: String,
    pub previous: Option<String>,
    pub previous_expires_at: Option<i64>,
}

impl std::fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("previous_expires_at", &self.previous_expires_at)
            .finish_non_exhaustive()
    }
}

/// One callback to send: a row of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub task_id: String,
    pub tenant_id: String,
    pub url: String,
    /// The receiver, `scheme://host[:port]`: the unit of per-host limits and circuits.
    pub host: String,
    /// `pending`, `delivering`, `succeeded` or `failed`.
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub last_error: Option<String>,
    /// What it reports.
    pub event: taskgate_proto::WebhookEvent,
    /// The status (statusTask's `data`, JSON) at the moment of a start or progress event; `None`
    /// for the final state, whose status is rendered when each attempt is sent.
    pub payload: Option<String>,
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub attempted_at: i64,
    pub status_code: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeliveryClaim {
    pub delivery: Delivery,
    /// The task's model (`None` if the task is gone), for the delivery's span.
    pub model: Option<String>,
    pub token: String,
}

/// What happens to a delivery after an attempt (or instead of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    Succeeded,
    /// Try again at this time (Unix ms).
    RetryAt(i64),
    /// No more attempts.
    Failed,
    /// Not attempted (host busy or its circuit open): try at this time, counting nothing.
    Defer(i64),
}

/// Answer to a request to send a delivery again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeliver {
    Scheduled,
    InFlight,
    NotFound,
    /// Asked again too soon after the last manual retry: allowed from this time (Unix ms).
    TooSoon {
        retry_at: i64,
    },
}

/// A final state for a store's group-commit loop, and where to say whether it was written.
struct FinishRequest {
    id: String,
    token: String,
    outcome: Outcome,
    /// The route that ran the attempt, for routed models.
    route: Option<String>,
    now: i64,
    reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
}

impl FinishRequest {
    fn new(
        id: &str,
        token: &str,
        outcome: &Outcome,
        route: Option<&str>,
        now: i64,
    ) -> (
        Self,
        tokio::sync::oneshot::Receiver<Result<bool, StoreError>>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = FinishRequest {
            id: id.to_owned(),
            token: token.to_owned(),
            outcome: outcome.clone(),
            route: route.map(str::to_owned),
            now,
            reply,
        };
        (req, answer)
    }
}

/// An `Unavailable` error carrying another's message: sqlx errors cannot be cloned, and a batch's
/// one error is answered to each of its callers.
fn unavailable(message: &str) -> StoreError {
    StoreError::Unavailable(message.into())
}

/// Whether no task id appears twice (for batched final writes, which match rows by id).
fn distinct_tasks<'a>(ids: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().all(|id| seen.insert(id))
}

/// Why a redelivery changed nothing, from the row's last manual retry (`None`: no such row).
fn redeliver_refusal(last_manual_retry: Option<Option<i64>>, now: i64, gap: i64) -> Redeliver {
    match last_manual_retry {
        None => Redeliver::NotFound,
        Some(Some(last)) if last > now - gap => Redeliver::TooSoon {
            retry_at: last + gap,
        },
        Some(_) => Redeliver::InFlight,
    }
}

/// How many more requests each receiver host may take now, for a delivery claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRoom {
    /// Room of a host not listed in `limited`.
    pub per_host: usize,
    /// Hosts with less room than `per_host`; 0 leaves a host out (saturated, or circuit open).
    pub limited: Vec<(String, usize)>,
}

impl HostRoom {
    /// Hosts that may take nothing now.
    pub fn blocked(&self) -> Vec<String> {
        self.limited
            .iter()
            .filter(|(_, room)| *room == 0)
            .map(|(h, _)| h.clone())
            .collect()
    }
}

/// One model's queue, as [`Store::queue_depths`] counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub model: String,
    pub pending: u64,
    pub processing: u64,
}

/// [`QueueDepth`]s from `(model, state, count)` rows, by model.
pub(crate) fn queue_depths_from(rows: Vec<(String, String, i64)>) -> Vec<QueueDepth> {
    let mut by_model: std::collections::BTreeMap<String, QueueDepth> = Default::default();
    for (model, state, count) in rows {
        let d = by_model.entry(model.clone()).or_insert_with(|| QueueDepth {
            model,
            pending: 0,
            processing: 0,
        });
        let count = u64::try_from(count).unwrap_or(0);
        match state.as_str() {
            "pending" => d.pending = count,
            _ => d.processing = count,
        }
    }
    by_model.into_values().collect()
}

/// A finished task as retention sees it: when it completed and what it left in the artifact
/// store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: String,
    pub complete_time: i64,
    pub outputs: Vec<String>,
}

/// Answer to a secret rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    Rotated(WebhookSecrets),
    /// The previous secret still signs (until `previous_expires_at`): rotating now would stop it
    /// before its overlap ends, so nothing changed.
    OverlapRunning(WebhookSecrets),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably inserts a pending task. Returns only once the task would survive a crash.
    async fn insert_task(&self, task: NewTask) -> Result<(), StoreError>;

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError>;

    /// Durably inserts pending tasks in one transaction: all of them or, on error, none. Not
    /// through the single submits' group commit (the batch is its own group).
    async fn insert_tasks(&self, tasks: Vec<NewTask>) -> Result<(), StoreError>;

    /// Like [`Store::insert_tasks`] under an idempotency key, in one transaction with the key's
    /// row: a live key of the tenant answers the ids it created (same request) or a mismatch
    /// (another request) and inserts nothing; concurrent calls with one key insert once, and
    /// the others answer the winner's ids.
    async fn insert_tasks_keyed(
        &self,
        key: &IdempotencyKey,
        tasks: Vec<NewTask>,
    ) -> Result<KeyedInsert, StoreError>;

    /// A page of one tenant's tasks, newest first (a read: never a write connection).
    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError>;

    /// The bytes of an output kept in the database, by its artifact key.
    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Claims the oldest due pending task of `model` for a local attempt (pending → processing),
    /// counting an attempt, unless `max_running` tasks of the model are processing already
    /// (across every node that shares the store).
    async fn claim(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
        max_running: usize,
    ) -> Result<Option<Claim>, StoreError> {
        Ok(self
            .claim_batch(model, now, lease, max_running, 1, Runner::Local)
            .await?
            .pop())
    }

    /// Like [`Store::claim`], for up to `limit` tasks in one write, each with its own token, for
    /// `runner`. The lease is measured on the store's clock where nodes share it. Claimed tasks
    /// that asked for start events get their `start` delivery in the claim's transaction.
    async fn claim_batch(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
        max_running: usize,
        limit: usize,
        runner: Runner,
    ) -> Result<Vec<Claim>, StoreError>;

    /// The fair-share weights claims use between tenants of a model (`store::fair`), set at
    /// start from the config's `[tenants.NAME]` tables; until then every tenant weighs 1.
    fn set_tenant_weights(&self, weights: TenantWeights);

    /// Whether [`Store::claim_parked`] waits inside the store (SQLite's writer thread does):
    /// the local loops then park their free slots there instead of waiting for a wake-up.
    fn parks_claims(&self) -> bool {
        false
    }

    /// A local claim of up to `limit` tasks that, when none is due, waits in the store and is
    /// made in the same transaction as the next submit of `model` (or at the next
    /// [`Store::poke`]), so a task on an idle model costs one commit fewer: its insert's commit
    /// also claims it. When `withdraw` is cancelled it answers at once with whatever it had
    /// already taken (the caller runs those), and takes nothing more; a dropped future hands
    /// back, uncounted, what it took. Stores that do not park answer at once, like
    /// `claim_batch`.
    async fn claim_parked(
        &self,
        model: &str,
        lease: Duration,
        max_running: usize,
        limit: usize,
        _withdraw: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_batch(
            model,
            crate::domain::now_ms(),
            lease,
            max_running,
            limit,
            Runner::Local,
        )
        .await
    }

    /// Tells a parked claim of `model` to look again (tasks became due some other way than a
    /// submit: a requeue, a retry's time, capacity freed).
    async fn poke(&self, _model: &str) {}

    /// The earliest `run_after` among pending tasks of `model`, to sleep until a retry is due.
    async fn next_due(&self, model: &str) -> Result<Option<i64>, StoreError>;

    /// Extends a lease to `lease` from now (recording progress, 0..1, when given) and marks
    /// the claim acknowledged; false when the claim is no longer ours. `now` is the caller's
    /// clock; stores shared by nodes measure leases on their own clock instead. A progress that
    /// changed, of a task that asked for progress events, writes a `progress` delivery in the
    /// same transaction unless the task's last one is less than a second old (on the store's
    /// clock where nodes share it).
    async fn renew_lease(
        &self,
        id: &str,
        token: &str,
        now: i64,
        lease: Duration,
        progress: Option<f64>,
    ) -> Result<bool, StoreError>;

    /// Writes the final state (processing → success | failed), with a success's blobs, in one
    /// transaction. False when the claim is no longer ours or the task is already final: the
    /// final state is written once.
    async fn finish(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.finish_routed(id, token, outcome, None, now).await
    }

    /// [`Store::finish`], also recording which route of a routed model ran the attempt
    /// (`tasks.route`, shown as statusTask's `route`); `None` for other models. The same one
    /// group-committed write: a route is one more column of it.
    async fn finish_routed(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
        route: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// processing → pending, to run again at `run_after`. With `refund_attempt` the attempt does
    /// not count (the task was interrupted by a shutdown, not by its own fault).
    async fn requeue(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        refund_attempt: bool,
    ) -> Result<bool, StoreError>;

    /// Cancels a task of `tenant_id` and `model` that is not final (the `Cancel` transition:
    /// pending | processing → failed with `CANCELLED`), in one guarded write that also clears
    /// the lease token, so the running attempt's token is dead: any later finish, requeue or
    /// renewal by its holder is refused. The outbox row of a callback task is written in the same
    /// transaction. Stores shared by nodes also tell every node (`StoreEvent::TaskCancelled`) so
    /// that the one running the attempt stops it at once. Another tenant's task, or one of
    /// another model, is `NotFound`.
    async fn cancel_task(
        &self,
        id: &str,
        tenant_id: &str,
        model: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError>;

    /// Hands on every task whose lease ended before `now`: back to pending, or failed when it
    /// has used all its attempts; a claim never acknowledged goes back without counting. Stores
    /// shared by nodes compare leases with their own clock and ignore `now` for that, so a node
    /// whose clock runs ahead cannot take over live work.
    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError>;

    /// The clock leases and start times are measured on: the store's own where nodes share it
    /// (so nodes whose clocks disagree agree on how long a task has run), else this process's.
    async fn clock_ms(&self) -> Result<i64, StoreError> {
        Ok(crate::domain::now_ms())
    }

    /// At the start of an exclusive store's only process: hands on every attempt that ran in
    /// the process that died (runner `local`), whatever its lease says. Pull workers' claims
    /// keep their leases.
    async fn recover_local(&self, now: i64) -> Result<Recovered, StoreError>;

    /// Fails up to `limit` pending tasks whose deadline (`expires_at`) is before `now` with
    /// `EXPIRED` (callbacks owed as for any final state); returns their ids.
    async fn expire_pending(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Fails every unfinished task of a model not in `known` with `MODEL_REMOVED` (callbacks
    /// owed as for any final state); returns their ids. Stores shared by nodes fail only
    /// `pending` ones (another node may still be running the model during a rolling deploy).
    async fn fail_removed_models(
        &self,
        known: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;

    // Progress and logs (`renew_lease` records progress).

    /// Appends log lines to a processing task's log, numbered on from its last line, and trims
    /// it to its newest [`crate::domain::MAX_LOG_LINES`] lines and
    /// [`crate::domain::MAX_LOG_BYTES`] bytes, in one transaction: one write per call, however
    /// many lines. False, nothing written, when the task is not processing under the claim
    /// `token` (a stale attempt's lines never land in the next attempt's log). Stores shared by
    /// nodes tell every node the task changed (`StoreEvent::TasksChanged`), so streams of it
    /// elsewhere send the lines.
    async fn append_logs(
        &self,
        task_id: &str,
        token: &str,
        lines: &[String],
        now: i64,
    ) -> Result<bool, StoreError>;

    /// A task's log lines, oldest first: with `after`, the first `limit` whose seq is greater
    /// (to read on from a line already seen); without, the newest `limit`.
    async fn log_tail(
        &self,
        task_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::TaskLogLine>, StoreError>;

    /// How many pending tasks of a pending task's model a claim at `now` would take before it
    /// (higher priority, or equal priority and older; due and not expired), counting no more
    /// than [`taskgate_proto::MAX_QUEUE_POSITION`]: an index range, bounded however long the
    /// queue. `None` when the task is not pending.
    async fn queue_position(&self, task_id: &str, now: i64) -> Result<Option<u64>, StoreError>;

    /// Every model's tasks waiting (`pending`, due or not) and running (`processing`), over
    /// the whole store (every node's), for `GET /metrics`. Models with neither are left out.
    /// Counts the `tasks_ready` and `tasks_running_by_model` partial indexes, never the table.
    async fn queue_depths(&self) -> Result<Vec<QueueDepth>, StoreError>;

    // Tenants and keys.

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError>;
    async fn insert_key(
        &self,
        kind: KeyKind,
        tenant: &Tenant,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
        policy: &KeyPolicy,
    ) -> Result<ApiKeyRecord, StoreError>;
    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Replaces an unrevoked client key's scope and limits; false when there is no such key.
    /// Moves [`Store::keys_revision`], so every node drops its cached record.
    async fn update_key_policy(&self, id: &str, policy: &KeyPolicy) -> Result<bool, StoreError>;
    /// Changes whenever a key is revoked or its policy changed (anywhere, by any process): nodes
    /// that cache keys compare it in the background and forget what they cached when it moves.
    async fn keys_revision(&self) -> Result<(i64, i64), StoreError>;
    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revokes by key id; false when no such unrevoked key exists.
    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError>;

    /// Stores this node's request counts (`mine`, absolute per key and bucket, so a repeated
    /// write is harmless), deletes every node's counts older than `oldest` and answers the
    /// other nodes' summed counts per key and bucket from `oldest` on (`limits` module).
    async fn sync_key_usage(
        &self,
        node: &str,
        mine: &[KeyUsage],
        oldest: i64,
    ) -> Result<Vec<KeyUsage>, StoreError>;

    /// Each key's unfinished (`pending` or `processing`) tasks, over the whole store; keys
    /// with none, and tasks with no key, are left out.
    async fn unfinished_by_key(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Returns the setting `name`, first storing `init` if it has none (atomically, so that nodes
    /// racing at first start agree on one value).
    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError>;

    // Webhooks.

    /// The tenant's signing secrets, storing `init` as its first secret if it has none.
    async fn webhook_secrets(
        &self,
        tenant_id: &str,
        init: &str,
    ) -> Result<WebhookSecrets, StoreError>;

    /// Makes `new` the current secret; the old one keeps signing until `previous_until`.
    /// Refused (atomically, across nodes) while a previous secret still signs at `now`.
    async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        new: &str,
        now: i64,
        previous_until: i64,
    ) -> Result<Rotation, StoreError>;

    /// Claims up to `limit` due deliveries (pending → delivering) with a lease, oldest first,
    /// no more per host than `room` gives it, so that a busy host's backlog stays untouched.
    async fn claim_deliveries(
        &self,
        now: i64,
        limit: usize,
        lease: Duration,
        room: &HostRoom,
    ) -> Result<Vec<DeliveryClaim>, StoreError>;

    /// The earliest `next_attempt_at` among pending deliveries to hosts other than `blocked`.
    async fn next_delivery_due(&self, blocked: &[String]) -> Result<Option<i64>, StoreError>;

    /// Moves every pending delivery to `host` to no earlier than `until`, in one statement (its
    /// circuit opened). Returns how many were moved.
    async fn defer_host(&self, host: &str, until: i64) -> Result<u64, StoreError>;

    /// Records an attempt (if one was made) and moves the delivery on; false when the claim is
    /// no longer ours.
    async fn finish_delivery_attempt(
        &self,
        id: &str,
        token: &str,
        attempt: Option<&DeliveryAttempt>,
        next: DeliveryNext,
        now: i64,
    ) -> Result<bool, StoreError>;

    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError>;

    /// A task's deliveries with their attempts, oldest first.
    async fn deliveries_for_task(
        &self,
        task_id: &str,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>, StoreError>;

    /// Schedules one more attempt of a delivery, now, unless the last manual retry was less
    /// than `min_gap` ago.
    async fn redeliver(
        &self,
        id: &str,
        now: i64,
        min_gap: Duration,
    ) -> Result<Redeliver, StoreError>;

    /// Puts deliveries whose lease ended before `now` back to pending; returns how many.
    async fn recover_expired_deliveries(&self, now: i64) -> Result<u64, StoreError>;

    // Retention.

    /// Finished tasks that completed before `before`, oldest first (by completion time, then
    /// id), after the position `after` (exclusive), at most `limit`.
    async fn finished_tasks(
        &self,
        after: Option<(i64, String)>,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Finished>, StoreError>;

    /// Deletes the outputs kept in the database (blobs) under these artifact keys (keys of
    /// files are simply absent); answers how many went.
    async fn delete_blobs(&self, keys: &[String]) -> Result<u64, StoreError>;

    /// Deletes the records of these tasks — the task, its callback deliveries and their
    /// attempts — except any that is not final or still owes a callback (a delivery pending or
    /// in flight); answers the ids deleted. Blobs are deleted by key first
    /// ([`Store::delete_blobs`]), as the task's outputs name them.
    async fn delete_tasks(&self, task_ids: &[String]) -> Result<Vec<String>, StoreError>;

    /// Deletes up to `limit` idempotency keys created before `before` (they have expired:
    /// a request with one creates anew); answers how many went.
    async fn delete_expired_keys(&self, before: i64, limit: usize) -> Result<u64, StoreError>;

    /// Stores `value` under the setting `name` unless the stored value is greater or equal
    /// (bytewise), atomically; answers the value stored afterwards. A mark that only moves
    /// forward, whichever node writes last.
    async fn advance_setting(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;

    // Dashboard and operator views (`store/dashboard.rs`).

    /// How many of a tenant's tasks created at or after `since` (Unix ms) are in each state,
    /// per model: a walk of the `(tenant_id, id)` index from the id of `since`, never the
    /// tenant's whole history.
    async fn count_tasks(&self, tenant_id: &str, since: i64) -> Result<Vec<CountRow>, StoreError>;

    /// The usage report's figures: one grouped aggregate over the tenant's tasks created in
    /// `[from, to)`, a walk of the `(tenant_id, id)` index over the window's id range
    /// (`store/usage.rs`). Groups come in no particular order.
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageAggregate>, StoreError>;

    /// [`Store::requeue`] of an attempt that failed and will be retried (no refund), which also
    /// appends the attempt to the task's history in the same statement.
    async fn requeue_failed(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        ended: &AttemptEnd,
    ) -> Result<bool, StoreError>;

    /// A task's earlier attempts and its runner (`None`: no such task).
    async fn attempt_record(&self, id: &str) -> Result<Option<AttemptRecord>, StoreError>;

    /// The tenant's webhook deliveries that are not done, by class (bounded counts).
    async fn webhook_backlog(
        &self,
        tenant_id: &str,
    ) -> Result<taskgate_proto::WebhookBacklog, StoreError>;

    /// Records a pull worker as seen (an upsert by name; empty `models` keep the recorded ones).
    async fn record_worker(&self, seen: &taskgate_proto::WorkerSeen) -> Result<(), StoreError>;

    /// Pull workers seen at or after `since`, most recent first, at most `limit`.
    async fn workers_seen(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError>;

    /// Whether this process is the store's only user (SQLite under the data-dir lock): then every
    /// lease found at start belongs to a dead process, whatever its expiry says.
    fn exclusive(&self) -> bool;

    /// Forwards other nodes' events to `events` until the store closes. A store with a single
    /// user has no other nodes; it forwards only `DeliveryReady` for the deliveries it writes
    /// inside its own writes (start and progress events), which no caller sees.
    async fn listen(&self, _events: tokio::sync::mpsc::UnboundedSender<StoreEvent>) {}

    /// Flushes pending writes and closes connections.
    async fn close(&self);
}
