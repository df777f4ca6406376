//! Retention: expired idempotency keys go a day after their request; finished tasks' result
//! files go `file_retention` after completion (their URLs
//! have expired by then, with the defaults), and their records `record_retention` after it;
//! then statusTask answers 404 for them.
//!
//! One sweeper per node walks finished tasks oldest first by completion time, through the
//! `tasks_finished` index, in batches of [`BATCH`]: each batch is one short read and one short
//! write, so a sweep never holds the write lock long enough to delay submits. Many nodes may
//! sweep at once: every step is idempotent (deleting what is gone is not an error, and a record
//! is deleted by one statement guarded on its state), so the worst case is work done twice.
//!
//! Files: the walk resumes from a mark kept in the store (`retention_files_mark`: the last
//! completion time and id whose files went), which only moves forward whichever node writes
//! it, so a sweep does not revisit the tasks already stripped. A task whose completion time
//! lands behind the mark (a final write that committed late) keeps its files until its record
//! goes, which deletes them again. Records: each sweep walks from the oldest finished task; a
//! record that still owes a callback (a delivery pending or in flight) is kept, with its files,
//! until it is settled, whatever its age. A file that cannot be deleted is logged and left, so
//! it does not stop the sweep.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::artifacts::ArtifactStore;
use crate::domain::now_ms;
use crate::report::error_chain;
use crate::store::{Finished, Store, StoreError};
use crate::views::TaskViews;

/// Tasks handled per batch: one read and one short write each.
pub const BATCH: usize = 200;
const FILES_MARK: &str = "retention_files_mark";
/// How long an `Idempotency-Key` holds (the API refuses to reuse one within it).
pub const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest pause between sweeps.
const MAX_PERIOD: Duration = Duration::from_secs(60);

/// How long finished tasks' files and records are kept; zero keeps them.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub files: Duration,
    pub records: Duration,
}

impl Retention {
    /// When a task completed at `complete_time` is deleted, if ever.
    pub fn gone_after(&self, complete_time: Option<i64>) -> Option<i64> {
        if self.records.is_zero() {
            return None;
        }
        complete_time.map(|at| at.saturating_add(self.records.as_millis() as i64))
    }

    /// How often to sweep: a minute, or a quarter of the shorter retention when that is shorter
    /// (so short retentions, as in tests, are kept to within a quarter).
    pub fn period(&self) -> Duration {
        [self.files, self.records]
            .into_iter()
            .filter(|d| !d.is_zero())
            .map(|d| d / 4)
            .fold(MAX_PERIOD, Duration::min)
            .max(Duration::from_millis(100))
    }
}

pub struct Sweeper {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub views: TaskViews,
    pub retention: Retention,
}

impl Sweeper {
    /// Sweeps every period until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let period = self.retention.period();
        loop {
            if let Err(e) = self.sweep_once(&stop).await {
                warn!(error = %error_chain(&e), "retention sweep failed; trying again next round");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One sweep: files due, then records due, each walk on its own (one that keeps failing
    /// must not hold up the other).
    async fn sweep_once(&self, stop: &CancellationToken) -> Result<(), StoreError> {
        let now = now_ms();
        // Idempotency keys expire after a day whatever the retention of tasks.
        let mut result = self
            .sweep_keys(now - KEY_LIFETIME.as_millis() as i64, stop)
            .await;
        // A zero file retention keeps files until their record goes, which deletes them.
        if !self.retention.files.is_zero() {
            result = self
                .sweep_files(now - self.retention.files.as_millis() as i64, stop)
                .await;
        }
        if !self.retention.records.is_zero() {
            let records = self
                .sweep_records(now - self.retention.records.as_millis() as i64, stop)
                .await;
            result = result.and(records);
        }
        result
    }

    async fn sweep_keys(&self, before: i64, stop: &CancellationToken) -> Result<(), StoreError> {
        while !stop.is_cancelled() {
            let n = self.store.delete_expired_keys(before, BATCH).await?;
            if n < BATCH as u64 {
                break;
            }
        }
        Ok(())
    }

    async fn sweep_files(&self, before: i64, stop: &CancellationToken) -> Result<(), StoreError> {
        let mut mark = parse_mark(&self.store.setting_or_init(FILES_MARK, b"").await?);
        while !stop.is_cancelled() {
            let batch = self
                .store
                .finished_tasks(mark.clone(), before, BATCH)
                .await?;
            let Some(last) = batch.last() else { break };
            let next = (last.complete_time, last.id.clone());
            self.delete_outputs(&batch).await?;
            // Only after the deletes: a crash before this repeats them, which is harmless.
            self.store
                .advance_setting(FILES_MARK, format_mark(&next).as_bytes())
                .await?;
            debug!(tasks = batch.len(), "retention: result files deleted");
            mark = Some(next);
            if batch.len() < BATCH {
                break;
            }
        }
        Ok(())
    }

    async fn sweep_records(&self, before: i64, stop: &CancellationToken) -> Result<(), StoreError> {
        let mut after = None;
        while !stop.is_cancelled() {
            let batch = self.store.finished_tasks(after, before, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = Some((last.complete_time, last.id.clone()));
            let ids: Vec<String> = batch.iter().map(|t| t.id.clone()).collect();
            let deleted = self.store.delete_tasks(&ids).await?;
            for id in &deleted {
                self.views.forget(id);
            }
            // Then the outputs of the records that went (those kept, owing a callback, keep
            // theirs). A crash in between leaves files no task names, which are never served,
            // like the staged files of attempts that did not win. Usually the files walk took
            // them long before.
            let gone: Vec<Finished> = batch
                .into_iter()
                .filter(|t| deleted.contains(&t.id))
                .collect();
            self.delete_outputs(&gone).await?;
            debug!(tasks = deleted.len(), "retention: task records deleted");
            if ids.len() < BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Deletes the batch's outputs: files from the artifact store, blobs from the database.
    async fn delete_outputs(&self, batch: &[Finished]) -> Result<(), StoreError> {
        let keys: Vec<String> = batch.iter().flat_map(|t| t.outputs.clone()).collect();
        for key in &keys {
            // One file that cannot go (a permission, a key the store refuses) must not stop
            // every later deletion: it is logged and left.
            if let Err(e) = self.artifacts.delete(key).await {
                warn!(%key, error = %error_chain(&e), "retention: cannot delete a result file; leaving it");
            }
        }
        self.store.delete_blobs(&keys).await?;
        Ok(())
    }
}

/// `{complete_time:020}:{id}`: zero-padded, so the bytes order as the positions do.
fn format_mark((at, id): &(i64, String)) -> String {
    format!("{:020}:{id}", (*at).max(0))
}

fn parse_mark(raw: &[u8]) -> Option<(i64, String)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (at, id) = text.split_once(':')?;
    Some((at.parse().ok()?, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_order_bytewise_as_positions_do() {
        let a = format_mark(&(999, "task_b".into()));
        let b = format_mark(&(1000, "task_a".into()));
        let c = format_mark(&(1000, "task_b".into()));
        assert!(a < b && b < c);
        assert_eq!(parse_mark(b.as_bytes()), Some((1000, "task_a".into())));
        assert_eq!(parse_mark(b""), None);
    }

    #[test]
    fn the_period_is_a_quarter_of_the_shortest_retention_within_bounds() {
        let r = |files, records| Retention {
            files: Duration::from_secs(files),
            records: Duration::from_secs(records),
        };
        assert_eq!(r(24 * 3600, 30 * 24 * 3600).period(), MAX_PERIOD);
        assert_eq!(r(0, 8).period(), Duration::from_secs(2));
        assert_eq!(r(0, 0).period(), MAX_PERIOD);
    }
}
