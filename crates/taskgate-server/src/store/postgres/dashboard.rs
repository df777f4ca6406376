//! The dashboard's and operator view's store calls on PostgreSQL (`store/dashboard.rs` holds
//! their SQL). Reads and the worker upsert on the API's pool; a failed attempt's requeue (with
//! its history entry) on the engine's, as `requeue`, and stamped with the database's clock, the
//! one its start time was stamped with.

use super::super::dashboard::{
    append_attempt_sql, attempt_record_of, backlog_of, backlog_sql, count_rows, count_sql,
    history_msg, id_floor, models_json, worker_rows, worker_upsert_sql, workers_sql, AttemptEnd,
    AttemptRecord, CountRow,
};
use super::super::rows::Dialect;
use super::super::StoreError;
use super::{notify, PostgresStore, DB_NOW_MS};
use crate::domain::Transition;

impl PostgresStore {
    pub(super) async fn count(
        &self,
        tenant_id: &str,
        since: i64,
    ) -> Result<Vec<CountRow>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(count_sql(Dialect::Postgres))
            .bind(tenant_id)
            .bind(id_floor(since))
            .bind(since)
            .fetch_all(&self.pool)
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
        let mut tx = self.engine.begin().await?;
        let model: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET {}, run_after = $1, lease_token = NULL, lease_expires_at = NULL, {} \
             WHERE id = $5 AND {} AND lease_token = $6 RETURNING model",
            Transition::Requeue.set_state(),
            append_attempt_sql(Dialect::Postgres, DB_NOW_MS, "$2", "$3", "$4"),
            Transition::Requeue.guard()
        ))
        .bind(run_after)
        .bind(&ended.fail_code)
        .bind(history_msg(&ended.fail_msg))
        .bind(ended.runner.as_deref())
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

    pub(super) async fn attempts_of(&self, id: &str) -> Result<Option<AttemptRecord>, StoreError> {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT attempt_history, runner FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        attempt_record_of(row)
    }

    pub(super) async fn backlog(
        &self,
        tenant_id: &str,
    ) -> Result<taskgate_proto::WebhookBacklog, StoreError> {
        let row = sqlx::query_as(&backlog_sql("$1"))
            .bind(tenant_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(backlog_of(row))
    }

    pub(super) async fn upsert_worker(
        &self,
        seen: &taskgate_proto::WorkerSeen,
    ) -> Result<(), StoreError> {
        sqlx::query(worker_upsert_sql(Dialect::Postgres))
            .bind(&seen.name)
            .bind(&seen.node)
            .bind(models_json(&seen.models))
            .bind(seen.last_seen_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn workers(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError> {
        let rows: Vec<(String, String, String, i64)> =
            sqlx::query_as(workers_sql(Dialect::Postgres))
                .bind(since)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await?;
        worker_rows(rows)
    }
}
