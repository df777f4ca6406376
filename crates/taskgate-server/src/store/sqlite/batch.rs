//! Batch and keyed submits and the task listing on SQLite.
//!
//! Batch and keyed submits are written through the sqlx write connection in one `BEGIN
//! IMMEDIATE` transaction, under the write lock it shares with the writer thread, not as a round
//! of the writer thread: a batch is a group of its own (one fsync for up to 1000 tasks), a keyed
//! submit must read its key and write the key's row and the tasks atomically, and the writer
//! thread's loop — the single submits' hot path — stays exactly as it was. Since these inserts
//! bypass the writer thread, a claim parked there does not see them: the API wakes the model's
//! loop after the commit (`Dispatcher::notify`), and the loop pokes its parked claim.
//!
//! The listing reads through the API's read-only pool.

use sqlx::Sqlite;

use super::super::batch::{
    floor_query, list_query, needs_floor, task_ids_from_json, task_ids_json, IdempotencyKey,
    KeyedInsert, TaskPage, TaskQuery, INSERT_CHUNK,
};
use super::super::rows::{insert_tasks, TaskRow};
use super::super::{NewTask, StoreError};
use super::SqliteStore;
use crate::domain::Task;

impl SqliteStore {
    pub(super) async fn insert_batch(&self, tasks: &[NewTask]) -> Result<(), StoreError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let (_lock, mut tx) = self.begin_write().await?;
        insert_rows(&mut tx, tasks).await?;
        commit(tx).await
    }

    pub(super) async fn insert_keyed(
        &self,
        key: &IdempotencyKey,
        tasks: &[NewTask],
    ) -> Result<KeyedInsert, StoreError> {
        let ids = task_ids_json(tasks.iter().map(|t| t.id.as_str()))?;
        // BEGIN IMMEDIATE holds SQLite's write lock from the start, so no other write can come
        // between the key's check and its row: racing requests with one key take turns here,
        // and every one after the first finds the first's row.
        let (_lock, mut tx) = self.begin_write().await?;
        // The row is ours if the key is new or its row has expired (then replaced); a live
        // row makes the upsert change nothing and return nothing.
        let took: Option<i64> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash, task_ids, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (tenant_id, key) DO UPDATE SET request_hash = excluded.request_hash, \
             task_ids = excluded.task_ids, created_at = excluded.created_at \
             WHERE idempotency_keys.created_at <= ?6 RETURNING 1",
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
            let (hash, ids): (Vec<u8>, String) = sqlx::query_as(
                "SELECT request_hash, task_ids FROM idempotency_keys \
                 WHERE tenant_id = ? AND key = ?",
            )
            .bind(&key.tenant_id)
            .bind(&key.key)
            .fetch_one(&mut *tx)
            .await?;
            // Dropping the transaction rolls it back: nothing was written.
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
            floor_query::<Sqlite>(query)
                .build_query_scalar()
                .fetch_optional(&self.reader)
                .await?
        } else {
            None
        };
        let tasks = list_query::<Sqlite>(query, floor.as_deref())
            .build_query_as::<TaskRow>()
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let examined_to = floor.filter(|_| tasks.len() < query.limit);
        Ok(TaskPage { tasks, examined_to })
    }
}

async fn insert_rows(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    tasks: &[NewTask],
) -> Result<(), StoreError> {
    for chunk in tasks.chunks(INSERT_CHUNK) {
        let mut qb = insert_tasks::<Sqlite>(chunk)?;
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A failed `COMMIT` may have landed all the same: its outcome is unknown, which callers hear
/// as "unavailable" (a keyed request may then be repeated safely with its key).
async fn commit(tx: sqlx::Transaction<'static, Sqlite>) -> Result<(), StoreError> {
    tx.commit()
        .await
        .map_err(|e| StoreError::Unavailable(e.into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A page walks the tenant's index from the cursor, with or without a model, and never scans
    /// the table or sorts (a sort would read every matching row before the first is sent).
    #[tokio::test]
    async fn a_page_walks_the_tenants_index_without_a_scan_or_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let all = TaskQuery {
            tenant_id: "ten_1".into(),
            model: None,
            state: Some(taskgate_proto::TaskState::Success),
            created_after: Some(1),
            created_before: Some(2),
            before_id: Some("task_1".into()),
            after_id: Some("task_0".into()),
            limit: 21,
            max_examined: 5000,
        };
        let one_model = TaskQuery {
            model: Some("echo".into()),
            ..all.clone()
        };
        // With a model and id bounds on both sides, the planner may take either tenant index
        // (the model's equality, or the id range): both walk a range in id order.
        for (q, index) in [(all, "tasks_by_tenant"), (one_model, "tasks_by_tenant")] {
            // The page (bounded by the floor) and the floor's own walk.
            for sql in [
                list_query::<Sqlite>(&q, Some("task_0")).sql().to_owned(),
                floor_query::<Sqlite>(&q).sql().to_owned(),
            ] {
                let plan: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .fetch_all(&store.reader)
                        .await
                        .unwrap();
                let steps: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
                assert!(
                    steps.iter().any(|s| s.contains(index)),
                    "{sql}\ndoes not use {index}: {steps:?}"
                );
                assert!(
                    !steps
                        .iter()
                        .any(|s| s.starts_with("SCAN tasks") || s.contains("TEMP B-TREE")),
                    "{sql}\nscans or sorts: {steps:?}"
                );
            }
        }
    }
}
