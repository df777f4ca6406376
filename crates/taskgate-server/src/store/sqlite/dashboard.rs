//! The dashboard's and operator view's store calls on SQLite (`store/dashboard.rs` holds their
//! SQL). Reads go through the API's read-only pool; the two writes (a failed attempt's requeue
//! with its history entry, a worker's upsert) through the sqlx write connection, like `requeue`.

use super::super::dashboard::{
    append_attempt_sql, attempt_record_of, backlog_of, backlog_sql, count_rows, count_sql,
    history_msg, id_floor, models_json, worker_rows, worker_upsert_sql, workers_sql, AttemptEnd,
    AttemptRecord, CountRow,
};
use super::super::rows::Dialect;
use super::super::StoreError;
use super::SqliteStore;
use crate::domain::Transition;

impl SqliteStore {
    pub(super) async fn count(
        &self,
        tenant_id: &str,
        since: i64,
    ) -> Result<Vec<CountRow>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(count_sql(Dialect::Sqlite))
            .bind(tenant_id)
            .bind(id_floor(since))
            .bind(since)
            .fetch_all(&self.reader)
            .await?;
        count_rows(rows)
    }

    pub(super) async fn requeue_with_history(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        ended: &AttemptEnd,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(&format!(
            "UPDATE tasks SET {}, run_after = ?1, lease_token = NULL, lease_expires_at = NULL, {} \
             WHERE id = ?6 AND {} AND lease_token = ?7",
            Transition::Requeue.set_state(),
            append_attempt_sql(Dialect::Sqlite, "?2", "?3", "?4", "?5"),
            Transition::Requeue.guard()
        ))
        .bind(run_after)
        .bind(crate::domain::now_ms())
        .bind(&ended.fail_code)
        .bind(history_msg(&ended.fail_msg))
        .bind(ended.runner.as_deref())
        .bind(id)
        .bind(token)
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(super) async fn attempts_of(&self, id: &str) -> Result<Option<AttemptRecord>, StoreError> {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT attempt_history, runner FROM tasks WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        attempt_record_of(row)
    }

    pub(super) async fn backlog(
        &self,
        tenant_id: &str,
    ) -> Result<taskgate_proto::WebhookBacklog, StoreError> {
        let row = sqlx::query_as(&backlog_sql("?1"))
            .bind(tenant_id)
            .fetch_one(&self.reader)
            .await?;
        Ok(backlog_of(row))
    }

    pub(super) async fn upsert_worker(
        &self,
        seen: &taskgate_proto::WorkerSeen,
    ) -> Result<(), StoreError> {
        sqlx::query(worker_upsert_sql(Dialect::Sqlite))
            .bind(&seen.name)
            .bind(&seen.node)
            .bind(models_json(&seen.models))
            .bind(seen.last_seen_at)
            .execute(&mut *self.write_conn().await?)
            .await?;
        Ok(())
    }

    pub(super) async fn workers(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(workers_sql(Dialect::Sqlite))
            .bind(since)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;
        worker_rows(rows)
    }
}
