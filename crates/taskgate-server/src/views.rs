//! The status views of finished tasks, kept in memory ready to send.
//!
//! A task in `success` or `failed` never changes again, and its view is a pure function of its
//! row (result URLs expire at completion + the URL lifetime, so signing again gives the same
//! expiry), so the serialised envelope can be reused for every later read: a status read of a
//! finished task then costs one cache lookup and no store read, on any node. The cache is
//! bounded by the bytes it holds; what falls out is read from the store again.

use std::sync::Arc;

use bytes::Bytes;

/// Bytes of serialised views one node keeps.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// A guess at the number of views, which sizes the cache's tables.
const ESTIMATED_VIEWS: usize = 65_536;

/// A finished task's serialised statusTask answer, with what a read must match to see it.
pub struct FinalView {
    pub tenant_id: String,
    pub model: String,
    /// The whole envelope, `{"code":200,…,"data":{…}}`.
    pub body: Bytes,
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Arc<FinalView>> for ByBytes {
    fn weight(&self, key: &String, view: &Arc<FinalView>) -> u64 {
        (key.len() + view.body.len() + view.tenant_id.len() + view.model.len()) as u64
    }
}

#[derive(Clone)]
pub struct FinalViews {
    cache: Arc<quick_cache::sync::Cache<String, Arc<FinalView>, ByBytes>>,
}

impl Default for FinalViews {
    fn default() -> Self {
        FinalViews {
            cache: Arc::new(quick_cache::sync::Cache::with_weighter(
                ESTIMATED_VIEWS,
                CACHE_BYTES,
                ByBytes,
            )),
        }
    }
}

impl FinalViews {
    pub fn get(&self, task_id: &str) -> Option<Arc<FinalView>> {
        self.cache.get(task_id)
    }

    /// Keeps the view of a task that is final; callers must not pass live tasks.
    pub fn insert(&self, task_id: String, view: FinalView) {
        self.cache.insert(task_id, Arc::new(view));
    }
}
