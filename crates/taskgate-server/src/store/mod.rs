//! Durable state behind one trait, so the API and dispatch never see SQL.
//!
//! Implementations: [`sqlite::SqliteStore`] (the embedded default). The trait is shaped for a
//! PostgreSQL store with many nodes: every claim carries a fresh attempt token and a lease, and
//! every write that ends or hands on a claim is guarded by that token, so a stale holder cannot
//! overwrite the work of the node the task was handed to.

pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::domain::Task;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the store is shutting down")]
    Closed,
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
}

/// A claimed task and the token that proves the claim.
#[derive(Debug, Clone)]
pub struct Claim {
    pub task: Task,
    pub token: String,
}

/// How an attempt ended, when it ends the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success { outputs: Vec<String> },
    Failure { code: String, message: String },
}

/// What a lease sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Back to pending, to run again.
    pub requeued: Vec<String>,
    /// Out of attempts: failed with `ATTEMPTS_EXHAUSTED`.
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant: Tenant,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub key_hash: Vec<u8>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably inserts a pending task. Returns only once the task would survive a crash.
    async fn insert_task(&self, task: NewTask) -> Result<(), StoreError>;

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError>;

    /// Claims the oldest due pending task of `model` (pending → processing), counting an attempt.
    async fn claim(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError>;

    /// The earliest `run_after` among pending tasks of `model`, to sleep until a retry is due.
    async fn next_due(&self, model: &str) -> Result<Option<i64>, StoreError>;

    /// Extends a lease; false when the claim is no longer ours.
    async fn renew_lease(&self, id: &str, token: &str, until: i64) -> Result<bool, StoreError>;

    /// Writes the final state (processing → success | failed). False when the claim is no longer
    /// ours or the task is already final: the final state is written once.
    async fn finish(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
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

    /// Hands on every task whose lease ended before `now`: back to pending, or failed when it
    /// has used all its attempts.
    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError>;

    // Tenants and keys.

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError>;
    async fn insert_key(
        &self,
        tenant: &Tenant,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
    ) -> Result<ApiKeyRecord, StoreError>;
    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError>;
    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revokes by key id; false when no such unrevoked key exists.
    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError>;

    /// Returns the setting `name`, first storing `init` if it has none (atomically, so that nodes
    /// racing at first start agree on one value).
    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Flushes pending writes and closes connections.
    async fn close(&self);
}
