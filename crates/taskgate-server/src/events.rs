//! Who is waiting for which task: the one place a change to a task wakes the requests that wait
//! on it (`Prefer: wait`, `streamTask`), so waiting costs no polling of the store.
//!
//! A change is only a nudge ("task X may have changed"); the waiter reads the task again and
//! decides for itself. So a nudge may be spurious or doubled (a local write and its PostgreSQL
//! notification both arrive) without harm, and it carries no state that could go stale. What
//! must never happen is a change with no nudge after the waiter last looked: a waiter
//! subscribes *before* it reads the task, and every write that changes a task nudges *after*
//! its commit.
//!
//! Nudges come from the dispatcher (claims, final states, requeues, lease sweeps, attempts'
//! progress and log lines), the worker API (progress and log lines in heartbeats) and, on
//! PostgreSQL, from other nodes through `NOTIFY`.
//!
//! Beside the per-task watches there is one tenant-blind signal, "some task changed"
//! ([`TaskEvents::subscribe_any`]), for the dashboard's count streams: every nudge above (and a
//! submit, [`TaskEvents::submitted`]) also bumps it, but only while such a stream is open (one
//! more atomic load otherwise). A stream does not learn whose task changed; it reads its own
//! tenant's counts again, throttled, so other tenants' changes cost it a (cached) read and
//! nothing is sent when its counts did not move. The same rules hold: subscribe before reading,
//! nudge after the commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct TaskEvents {
    inner: Arc<Inner>,
}

struct Inner {
    /// How many tasks are watched: with none (the hot paths' usual case), a change costs one
    /// atomic load and no lock.
    watched: AtomicUsize,
    senders: Mutex<HashMap<String, watch::Sender<()>>>,
    /// How many [`AnyWatch`]es are open: with none, `any` is not touched.
    any_watchers: AtomicUsize,
    /// Bumped on every change while someone watches any change.
    any: watch::Sender<()>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            watched: AtomicUsize::new(0),
            senders: Mutex::default(),
            any_watchers: AtomicUsize::new(0),
            any: watch::channel(()).0,
        }
    }
}

/// Interest in every task's changes (tenant-blind); dropping it forgets the interest.
pub struct AnyWatch {
    rx: watch::Receiver<()>,
    inner: Arc<Inner>,
}

impl AnyWatch {
    /// Takes every change so far as seen: the caller is about to read what they changed.
    pub fn mark_seen(&mut self) {
        drop(self.rx.borrow_and_update());
    }

    /// Waits for the next change to any task after the last call (or after subscribing).
    pub async fn changed(&mut self) {
        // The sender lives in `Inner`, which this watch holds: this ends only with a change.
        let _ = self.rx.changed().await;
    }
}

impl Drop for AnyWatch {
    fn drop(&mut self) {
        self.inner.any_watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Interest in one task; dropping it forgets the interest.
pub struct TaskWatch {
    id: String,
    rx: watch::Receiver<()>,
    inner: Arc<Inner>,
}

impl TaskEvents {
    /// Starts watching `task_id`. Subscribe before reading the task: a change committed after
    /// the read is then sure to wake [`TaskWatch::changed`].
    pub fn subscribe(&self, task_id: &str) -> TaskWatch {
        let mut senders = lock(&self.inner.senders);
        let rx = match senders.get(task_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(());
                senders.insert(task_id.to_owned(), tx);
                // SeqCst pairs with the load in `changed`: a writer that reads 0 here committed
                // before this subscription, so the waiter's read that follows sees its write.
                self.inner.watched.fetch_add(1, Ordering::SeqCst);
                rx
            }
        };
        TaskWatch {
            id: task_id.to_owned(),
            rx,
            inner: self.inner.clone(),
        }
    }

    /// Starts watching every task's changes (see the module's docs). Subscribe before reading.
    pub fn subscribe_any(&self) -> AnyWatch {
        // SeqCst, as in `subscribe`: a writer that reads 0 committed before this, so the read
        // that follows sees its write.
        self.inner.any_watchers.fetch_add(1, Ordering::SeqCst);
        AnyWatch {
            rx: self.inner.any.subscribe(),
            inner: self.inner.clone(),
        }
    }

    /// Some task changed: wakes the [`AnyWatch`]es, if any is open.
    fn any_changed(&self) {
        if self.inner.any_watchers.load(Ordering::SeqCst) > 0 {
            self.inner.any.send_replace(());
        }
    }

    /// Tasks were submitted (called after the insert committed): no one waits on a task before
    /// it exists, but the count streams count it.
    pub fn submitted(&self) {
        self.any_changed();
    }

    /// Task `task_id` may have changed (called after the write committed).
    pub fn changed(&self, task_id: &str) {
        self.any_changed();
        if self.inner.watched.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(tx) = lock(&self.inner.senders).get(task_id) {
            tx.send_replace(());
        }
    }

    pub fn changed_all<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        self.any_changed();
        if self.inner.watched.load(Ordering::SeqCst) == 0 {
            return;
        }
        let senders = lock(&self.inner.senders);
        for id in ids {
            if let Some(tx) = senders.get(id) {
                tx.send_replace(());
            }
        }
    }

    /// Every watched task may have changed (notifications from other nodes may have been
    /// missed while the listener reconnected).
    pub fn resync(&self) {
        self.any_changed();
        for tx in lock(&self.inner.senders).values() {
            tx.send_replace(());
        }
    }

    /// How many tasks are being watched (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.inner.watched.load(Ordering::SeqCst)
    }
}

impl TaskWatch {
    pub fn task_id(&self) -> &str {
        &self.id
    }

    /// Waits for the next change after the last call (or after subscribing).
    pub async fn changed(&mut self) {
        // The sender lives while any watch of the task does, this one included, so this ends
        // only with a change.
        let _ = self.rx.changed().await;
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        let mut senders = lock(&self.inner.senders);
        // This watch's receiver is still alive here: it is the last one when the count is 1.
        if senders
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            senders.remove(&self.id);
            self.inner.watched.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The map is only ever held for a lookup or an insert, so a panic cannot leave it half-changed:
/// a poisoned lock is taken over rather than spread.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_after_subscribing_wakes_the_watch() {
        let events = TaskEvents::default();
        let mut w = events.subscribe("a");
        events.changed("b");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w.changed())
                .await
                .is_err(),
            "a change of another task woke the watch"
        );
        events.changed("a");
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("the change woke the watch");
    }

    #[tokio::test]
    async fn a_change_before_the_wait_is_not_lost() {
        let events = TaskEvents::default();
        let mut w = events.subscribe("a");
        events.changed_all(["a"]);
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("the earlier change is still seen");
    }

    #[tokio::test]
    async fn any_change_wakes_an_any_watch_and_costs_nothing_without_one() {
        let events = TaskEvents::default();
        events.changed("a");
        let mut any = events.subscribe_any();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), any.changed())
                .await
                .is_err(),
            "a change before subscribing woke the watch"
        );
        events.changed_all(["b"]);
        tokio::time::timeout(Duration::from_secs(5), any.changed())
            .await
            .expect("a change of any task wakes it");
        events.submitted();
        tokio::time::timeout(Duration::from_secs(5), any.changed())
            .await
            .expect("a submit wakes it");
        drop(any);
        assert_eq!(events.inner.any_watchers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn dropping_the_last_watch_forgets_the_task() {
        let events = TaskEvents::default();
        let a1 = events.subscribe("a");
        let a2 = events.subscribe("a");
        let b = events.subscribe("b");
        assert_eq!(events.watched(), 2);
        drop(a1);
        assert_eq!(events.watched(), 2, "a is still watched by a2");
        drop(a2);
        drop(b);
        assert_eq!(events.watched(), 0);
        assert!(lock(&events.inner.senders).is_empty());
    }
}
