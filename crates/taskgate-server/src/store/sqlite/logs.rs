//! Task log lines and queue positions on SQLite.
//!
//! An append is one `BEGIN IMMEDIATE` transaction on the sqlx write connection (under the write
//! lock it shares with the writer thread, as batch submits are): the insert of every line of the
//! flush, numbered on from the task's last line, then the trim to the caps. It never goes
//! through the writer thread, whose rounds (submits, claims, final states) stay as they were;
//! tasks that log nothing never call it. Reads go through the API's read-only pool.

use super::super::fair::{other_queue_cap, other_queues_sql, queue_estimate};
use super::super::rows::{
    log_lines, log_tail_sql, queue_position_sql, trim_logs_sql, LogRow, QueuePlace,
    QUEUE_DEPTHS_SQL,
};
use super::super::{queue_depths_from, QueueDepth, StoreError};
use super::SqliteStore;

impl SqliteStore {
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
        // The lines go in as one JSON array: SQLite has no array parameters.
        let json = serde_json::to_string(lines).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let (_lock, mut tx) = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO task_logs (task_id, seq, at, line) \
             SELECT ?1, last.seq + j.key + 1, ?2, j.value \
             FROM json_each(?3) j, \
                  (SELECT COALESCE(max(seq), 0) AS seq FROM task_logs WHERE task_id = ?1) last \
             WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND state = 'processing' \
                           AND lease_token = ?4)",
        )
        .bind(task_id)
        .bind(now)
        .bind(json)
        .bind(token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query(&trim_logs_sql(
            |n| format!("?{n}"),
            "length(CAST(line AS BLOB))",
        ))
        .bind(task_id)
        .execute(&mut *tx)
        .await?;
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
        let sql = log_tail_sql(after.is_some(), |n| format!("?{n}"));
        let mut q = sqlx::query_as::<_, LogRow>(&sql).bind(task_id);
        if let Some(after) = after {
            q = q.bind(i64::try_from(after).unwrap_or(i64::MAX));
        }
        Ok(log_lines(q.bind(limit).fetch_all(&self.reader).await?))
    }

    pub(super) async fn count_queues(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(QUEUE_DEPTHS_SQL)
            .fetch_all(&self.reader)
            .await?;
        Ok(queue_depths_from(rows))
    }

    pub(super) async fn position_in_queue(
        &self,
        task_id: &str,
        now: i64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(me) = sqlx::query_as::<_, QueuePlace>(&queue_position_sql(|n| format!("?{n}")))
            .bind(task_id)
            .bind(now)
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(None);
        };
        let weights = self.weights.get();
        let mine = weights.weight(me.name.as_deref());
        let others: Vec<(Option<String>, i64)> =
            sqlx::query_as(&other_queues_sql(|n| format!("?{n}")))
                .bind(&me.model)
                .bind(&me.tenant_id)
                .bind(other_queue_cap(me.ahead, mine, &weights))
                .fetch_all(&self.reader)
                .await?;
        Ok(Some(queue_estimate(me.ahead, mine, &others, &weights)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Counting a queue position walks the `tasks_ready` index: a scan would cost every poll of
    /// a pending task as much as the table is large.
    #[tokio::test]
    async fn the_queue_position_walks_the_ready_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        for sql in [
            queue_position_sql(|n| format!("?{n}")),
            crate::store::fair::other_queues_sql(|n| format!("?{n}")),
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(&store.reader)
                    .await
                    .unwrap();
            let steps: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
            assert!(
                !steps
                    .iter()
                    .any(|s| s.starts_with("SCAN tasks") || s.starts_with("SCAN o")),
                "{sql}\nscans the table: {steps:?}"
            );
            assert!(
                steps.iter().any(|s| s.contains("tasks_ready")),
                "{sql}\ndoes not use tasks_ready: {steps:?}"
            );
        }
    }

    /// The scrape's queue depths walk the two partial indexes, never the table of (mostly
    /// finished) tasks.
    #[tokio::test]
    async fn queue_depths_walk_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {QUEUE_DEPTHS_SQL}"))
                .fetch_all(&store.reader)
                .await
                .unwrap();
        let steps: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
        let scans: Vec<&&str> = steps
            .iter()
            .filter(|s| s.starts_with("SCAN tasks"))
            .collect();
        assert_eq!(scans.len(), 2, "{steps:?}");
        assert!(
            scans[0].ends_with("INDEX tasks_ready")
                && scans[1].ends_with("INDEX tasks_running_by_model"),
            "{steps:?}"
        );
    }
}
