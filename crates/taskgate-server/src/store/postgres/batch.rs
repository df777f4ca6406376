//! Batch and keyed submits and the task listing on PostgreSQL.
//!
//! Both submits are one transaction on the API's pool, apart from the single submits' group
//! commit, with one `NOTIFY` per model so that every node's loop of the model wakes.
//!
//! A keyed submit writes the key's row first, by an upsert that takes the row only when the
//! key is new or its row has expired. Two nodes racing with one key meet at the unique index:
//! the second's upsert waits for the first's transaction, then (read committed) sees its row,
//! changes nothing, and reads the winner's ids instead. If the first rolls back, the second
//! goes on and inserts.

use std::collections::BTreeSet;

use sqlx::{Postgres, Transaction};

use super::super::batch::{
    floor_query, list_query, needs_floor, task_ids_from_json, task_ids_json, IdempotencyKey,
    KeyedInsert, TaskPage, TaskQuery, INSERT_CHUNK,
};
use super::super::rows::{insert_tasks, TaskRow};
use super::super::{NewTask, StoreError};
use super::{notify, PostgresStore};
use crate::domain::Task;

impl PostgresStore {
    pub(super) async fn insert_batch(&self, tasks: &[NewTask]) -> Result<(), StoreError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        insert_rows(&mut tx, tasks).await?;
        commit(tx).await
    }

    pub(super) async fn insert_keyed(
        &self,
        key: &IdempotencyKey,
        tasks: &[NewTask],
    ) -> Result<KeyedInsert, StoreError> {
        let ids = task_ids_json(tasks.iter().map(|t| t.id.as_str()))?;
        let mut tx = self.pool.begin().await?;
        let took: Option<i32> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash, task_ids, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id, key) DO UPDATE SET request_hash = excluded.request_hash, \
             task_ids = excluded.task_ids, created_at = excluded.created_at \
             WHERE idempotency_keys.created_at <= $6 RETURNING 1",
        )
        .bind(&key.tenant_id)
        .bind(&key.key)
        .bind(&key.request_hash)
        .bind(&ids)
        .bind(key.now)
        .bind(key.expired_at_or_before)
        .fetch_optional(&mut *tx)
        .await?;
        if took.is_none() {
            // A statement of its own, so (read committed) it sees the row the upsert waited for.
            let (hash, ids): (Vec<u8>, String) = sqlx::query_as(
                "SELECT request_hash, task_ids FROM idempotency_keys \
                 WHERE tenant_id = $1 AND key = $2",
            )
            .bind(&key.tenant_id)
            .bind(&key.key)
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(if hash == key.request_hash {
                KeyedInsert::Replayed(task_ids_from_json(&ids)?)
            } else {
                KeyedInsert::Mismatch
            });
        }
        insert_rows(&mut tx, tasks).await?;
        commit(tx).await?;
        Ok(KeyedInsert::Inserted)
    }

    pub(super) async fn list(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let floor: Option<String> = if needs_floor(query) {
            floor_query::<Postgres>(query)
                .build_query_scalar()
                .fetch_optional(&self.pool)
                .await?
        } else {
            None
        };
        let tasks = list_query::<Postgres>(query, floor.as_deref())
            .build_query_as::<TaskRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let examined_to = floor.filter(|_| tasks.len() < query.limit);
        Ok(TaskPage { tasks, examined_to })
    }
}

/// The rows, and a `NOTIFY` per model (sent by PostgreSQL at commit).
async fn insert_rows(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &[NewTask],
) -> Result<(), StoreError> {
    for chunk in tasks.chunks(INSERT_CHUNK) {
        let mut qb = insert_tasks::<Postgres>(chunk)?;
        qb.build().execute(&mut **tx).await?;
    }
    let models: BTreeSet<&str> = tasks.iter().map(|t| t.model.as_str()).collect();
    for model in models {
        notify(tx, &format!("task:{model}")).await?;
    }
    Ok(())
}

/// A failed `COMMIT` may have landed all the same: its outcome is unknown.
async fn commit(tx: Transaction<'static, Postgres>) -> Result<(), StoreError> {
    tx.commit()
        .await
        .map_err(|e| StoreError::Unavailable(e.into()))
}
