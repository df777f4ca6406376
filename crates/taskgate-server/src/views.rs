//! Tasks' statusTask answers, kept in memory ready to send.
//!
//! A task in `success` or `failed` never changes again, and its view is a pure function of its
//! row (result URLs expire at completion + the URL lifetime, so signing again gives the same
//! expiry), so the serialised envelope can be reused for every later read: a status read of a
//! finished task then costs one cache lookup and no store read, on any node.
//!
//! On a store only this process writes (SQLite), a just-submitted task's `pending` view is kept
//! too, so that clients polling a new task do not read the store: it is put in before the task
//! is inserted (nobody knows its id yet) and forgotten by the dispatcher as soon as a claim of
//! it commits, the only way out of `pending` while the process runs. Reads after that go to the
//! store until the task is final. (With several nodes another node may claim it, so nothing
//! live is kept there.) A pending view is served for its first second only (`gone_after`): a
//! task still waiting after that is read from the store, whose answer adds its
//! `queuePosition` (`api/live.rs`). The cache is bounded by the bytes it holds; what falls out
//! is read from the store again.

use std::sync::Arc;

use bytes::Bytes;

/// Bytes of serialised views one node keeps.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// A guess at the number of views, which sizes the cache's tables.
const ESTIMATED_VIEWS: usize = 65_536;

/// A task's serialised statusTask answer, with what a read must match to see it.
pub struct CachedView {
    pub tenant_id: String,
    pub model: String,
    /// The whole envelope, `{"code":200,…,"data":{…}}`.
    pub body: Bytes,
    /// From when (Unix ms) the view is not served: when retention deletes a final task, so a
    /// node that did not run the deletion does not keep answering for a task that is gone; a
    /// second after a pending task's submit, so that polls of a task still waiting read its
    /// queue position from the store.
    pub gone_after: Option<i64>,
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Arc<CachedView>> for ByBytes {
    fn weight(&self, key: &String, view: &Arc<CachedView>) -> u64 {
        (key.len() + view.body.len() + view.tenant_id.len() + view.model.len()) as u64
    }
}

#[derive(Clone)]
pub struct TaskViews {
    cache: Arc<quick_cache::sync::Cache<String, Arc<CachedView>, ByBytes>>,
}

impl Default for TaskViews {
    fn default() -> Self {
        TaskViews {
            cache: Arc::new(quick_cache::sync::Cache::with_weighter(
                ESTIMATED_VIEWS,
                CACHE_BYTES,
                ByBytes,
            )),
        }
    }
}

impl TaskViews {
    pub fn get(&self, task_id: &str) -> Option<Arc<CachedView>> {
        let view = self.cache.get(task_id)?;
        if view
            .gone_after
            .is_some_and(|at| crate::domain::now_ms() >= at)
        {
            self.cache.remove(task_id);
            return None;
        }
        Some(view)
    }

    /// Keeps the view of a task that is final, or of one about to be inserted `pending` (see
    /// the module docs for the rule that keeps that one true).
    pub fn insert(&self, task_id: String, view: CachedView) {
        self.cache.insert(task_id, Arc::new(view));
    }

    /// Drops a task's view: it was claimed, or its insert failed.
    pub fn forget(&self, task_id: &str) {
        self.cache.remove(task_id);
    }
}
