//! What the dashboard and operator endpoints keep per node: a short-lived cache of task counts,
//! so that many open dashboards (and their count streams) cost the store one read per tenant
//! and window per second, and the throttle that records a pull worker as seen at most every
//! [`WORKER_RECORD_EVERY`]. No HTTP (that is `api/operator.rs`).
//!
//! Concurrency: both maps are behind a `std` mutex held only for a lookup or an insert. A count
//! read is shared: callers that find an entry fresh enough for them await its one read
//! (`tokio::sync::OnceCell`); a read that fails is not kept, the next caller reads again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskgate_proto::{ModelCounts, StateCounts, TaskCounts};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::store::{Store, StoreError};

/// How long counts are served from the cache.
pub const COUNTS_TTL: Duration = Duration::from_secs(1);
/// A pull worker is recorded as seen at most this often per node.
pub const WORKER_RECORD_EVERY: Duration = Duration::from_secs(10);
/// Count reads this node runs at once, for every tenant and stream together: a count walks the
/// tenant's tasks of the window, so a tenant with many tasks (or many open dashboards, or
/// windows chosen to miss the cache) waits for its turn instead of taking every store
/// connection the API's reads need.
pub const MAX_COUNT_READS: usize = 2;
/// Entries past which the maps drop what is stale.
const PRUNE_AT: usize = 4096;

pub struct Dashboard {
    /// This node, as the operator view names it: its public URL.
    pub node: String,
    counts: Mutex<HashMap<(String, i64), Arc<CountsEntry>>>,
    workers: Mutex<HashMap<String, Instant>>,
    reads: tokio::sync::Semaphore,
}

struct CountsEntry {
    /// When the entry was made: its read started at or after this.
    made: Instant,
    value: OnceCell<Arc<TaskCounts>>,
}

impl Dashboard {
    pub fn new(node: String) -> Self {
        Dashboard {
            node,
            counts: Mutex::default(),
            workers: Mutex::default(),
            reads: tokio::sync::Semaphore::new(MAX_COUNT_READS),
        }
    }

    /// The counts of `tenant_id`'s tasks created at or after `since`, read at or after
    /// `fresh_after` (a count stream passes the time it was nudged, so what it sends reflects
    /// the change; a plain read passes now − [`COUNTS_TTL`]).
    pub async fn counts(
        &self,
        store: &dyn Store,
        tenant_id: &str,
        since: i64,
        fresh_after: Instant,
    ) -> Result<Arc<TaskCounts>, StoreError> {
        let entry = {
            let mut map = lock(&self.counts);
            let key = (tenant_id.to_owned(), since);
            match map.get(&key) {
                Some(e) if e.made >= fresh_after => e.clone(),
                _ => {
                    if map.len() >= PRUNE_AT {
                        map.retain(|_, e| e.made.elapsed() < COUNTS_TTL);
                    }
                    let e = Arc::new(CountsEntry {
                        made: Instant::now(),
                        value: OnceCell::new(),
                    });
                    map.insert(key, e.clone());
                    e
                }
            }
        };
        entry
            .value
            .get_or_try_init(|| async {
                // Never closed, so acquiring cannot fail; a closed one would only skip the cap.
                let _permit = self.reads.acquire().await.ok();
                let rows = store.count_tasks(tenant_id, since).await?;
                Ok(Arc::new(tally(since, rows)))
            })
            .await
            .cloned()
    }

    /// Whether to record worker `name` as seen now (true at most every
    /// [`WORKER_RECORD_EVERY`] per name on this node).
    pub fn worker_due(&self, name: &str) -> bool {
        let now = Instant::now();
        let mut map = lock(&self.workers);
        if map
            .get(name)
            .is_some_and(|last| now.duration_since(*last) < WORKER_RECORD_EVERY)
        {
            return false;
        }
        if map.len() >= PRUNE_AT {
            map.retain(|_, last| now.duration_since(*last) < WORKER_RECORD_EVERY);
        }
        map.insert(name.to_owned(), now);
        true
    }
}

/// The counts' answer from the store's rows: models sorted by name, and the total.
pub fn tally(since: i64, rows: Vec<crate::store::CountRow>) -> TaskCounts {
    let mut by_model: std::collections::BTreeMap<String, StateCounts> = Default::default();
    let mut total = StateCounts::default();
    for row in rows {
        by_model
            .entry(row.model)
            .or_default()
            .add(row.state, row.count);
        total.add(row.state, row.count);
    }
    TaskCounts {
        since,
        models: by_model
            .into_iter()
            .map(|(model, counts)| ModelCounts { model, counts })
            .collect(),
        total,
    }
}

/// Held only for a lookup or an insert: a poisoned lock is taken over.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CountRow;
    use taskgate_proto::TaskState;

    #[test]
    fn counts_are_grouped_by_model_in_name_order_with_a_total() {
        let row = |m: &str, s, n| CountRow {
            model: m.into(),
            state: s,
            count: n,
        };
        let c = tally(
            7,
            vec![
                row("b", TaskState::Success, 2),
                row("a", TaskState::Failed, 1),
                row("b", TaskState::Pending, 3),
            ],
        );
        assert_eq!(c.since, 7);
        let names: Vec<&str> = c.models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.models[1].counts.pending, 3);
        assert_eq!(c.models[1].counts.success, 2);
        assert_eq!(
            (c.total.pending, c.total.success, c.total.failed),
            (3, 2, 1)
        );
    }

    #[test]
    fn a_worker_is_recorded_at_most_every_ten_seconds() {
        let d = Dashboard::new("http://node".into());
        assert!(d.worker_due("w1"));
        assert!(!d.worker_due("w1"));
        assert!(d.worker_due("w2"), "another worker is throttled on its own");
    }
}
