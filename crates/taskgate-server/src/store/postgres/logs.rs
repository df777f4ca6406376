//! Task log lines and queue positions on PostgreSQL.
//!
//! An append is one transaction on the API's pool: a per-task advisory lock (so two appends to
//! one task, from any nodes, number their lines one after the other), the insert of every line
//! of the flush, the trim to the caps, and `NOTIFY changed:TASK_ID`, which the `tasks_changed`
//! trigger does not send for a table other than `tasks`: streams of the task on every node then
//! send the lines.

use super::super::fair::{other_queue_cap, other_queues_sql, queue_estimate};
use super::super::rows::{
    log_lines, log_tail_sql, queue_position_sql, trim_logs_sql, LogRow, QueuePlace,
    QUEUE_DEPTHS_SQL,
};
use super::super::{queue_depths_from, QueueDepth, StoreError};
use super::{notify, PostgresStore};

impl PostgresStore {
    pub(super) async fn append_log_lines(
        &self,
        task_id: &str,
        token: &str,
        lines: &[String],
        now: i64,
    ) -> Result<bool, StoreError> {
        if lines.is_empty() {
            return Ok(true);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7475))")
            .bind(task_id)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO task_logs (task_id, seq, at, line) \
             SELECT $1, last.seq + l.n, $2, l.line \
             FROM unnest($3::text[]) WITH ORDINALITY AS l(line, n), \
                  (SELECT COALESCE(max(seq), 0) AS seq FROM task_logs WHERE task_id = $1) last \
             WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND state = 'processing' \
                           AND lease_token = $4)",
        )
        .bind(task_id)
        .bind(now)
        .bind(lines)
        .bind(token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query(&trim_logs_sql(|n| format!("${n}"), "octet_length(line)"))
            .bind(task_id)
            .execute(&mut *tx)
            .await?;
        notify(&mut tx, &format!("changed:{task_id}")).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn log_lines(
        &self,
        task_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::TaskLogLine>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = log_tail_sql(after.is_some(), |n| format!("${n}"));
        let mut q = sqlx::query_as::<_, LogRow>(&sql).bind(task_id);
        if let Some(after) = after {
            q = q.bind(i64::try_from(after).unwrap_or(i64::MAX));
        }
        Ok(log_lines(q.bind(limit).fetch_all(&self.pool).await?))
    }

    pub(super) async fn count_queues(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(QUEUE_DEPTHS_SQL)
            .fetch_all(&self.pool)
            .await?;
        Ok(queue_depths_from(rows))
    }

    pub(super) async fn position_in_queue(
        &self,
        task_id: &str,
        now: i64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(me) = sqlx::query_as::<_, QueuePlace>(&queue_position_sql(|n| format!("${n}")))
            .bind(task_id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let weights = self.weights.get();
        let mine = weights.weight(me.name.as_deref());
        let others: Vec<(Option<String>, i64)> =
            sqlx::query_as(&other_queues_sql(|n| format!("${n}")))
                .bind(&me.model)
                .bind(&me.tenant_id)
                .bind(other_queue_cap(me.ahead, mine, &weights))
                .fetch_all(&self.pool)
                .await?;
        Ok(Some(queue_estimate(me.ahead, mine, &others, &weights)))
    }
}
