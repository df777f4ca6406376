//! The attempts running on this node, by task, so that a cancel can stop one at once.
//!
//! A cancel writes the task's final state first (which kills the claim's token), then asks the
//! node that runs the attempt to stop it: [`Running::cancel`] fires the attempt's token, and the
//! attempt drops its backend's future (which kills a command's process tree and aborts an http
//! request), writes nothing and takes back what it staged. An attempt registers when it starts
//! and is removed when it ends.
//!
//! A cancel may reach this node before the attempt it cuts off has registered: the claim
//! committed, the cancel committed right after, and the dispatcher had not yet started the
//! attempt. Such cancels are remembered for a while (`recent`), and an attempt registering for
//! one of those tasks starts cancelled. That is always right: a cancelled task is final, so any
//! attempt of it is stale. The memory is bounded in time and size; past it, the attempt's next
//! lease renewal (answered "not yours") stops it all the same, only later.
//!
//! Concurrency model: one mutex around two small maps, taken once when an attempt starts, once
//! when it ends, and once per cancel; never held across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Most cancels remembered for attempts that have not registered yet.
const RECENT_MAX: usize = 4096;

#[derive(Default)]
pub(super) struct Running {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Task id → its attempts on this node, by claim token (a stale attempt may still be
    /// stopping while a newer claim of the same task runs).
    attempts: HashMap<String, Vec<(String, CancellationToken)>>,
    /// Cancels that found no attempt here, by task, with when (looked up by every attempt
    /// that starts, so a map rather than a scan).
    recent: HashMap<String, Instant>,
    /// The same cancels, oldest first, to forget them in order.
    recent_order: VecDeque<(String, Instant)>,
}

impl Inner {
    /// Forgets remembered cancels older than `keep` (and the oldest beyond the bound).
    fn prune(&mut self, keep: Duration) {
        while let Some((id, at)) = self.recent_order.front() {
            if at.elapsed() <= keep && self.recent_order.len() <= RECENT_MAX {
                break;
            }
            // A task cancelled twice is remembered from its latest cancel.
            if self.recent.get(id) == Some(at) {
                self.recent.remove(id);
            }
            self.recent_order.pop_front();
        }
    }
}

/// Removes an attempt from the registry when dropped, on every way out of the attempt. Borrows
/// the claim's id and token rather than copying them: this is paid by every task.
pub(super) struct Registration<'a> {
    running: &'a Running,
    task_id: &'a str,
    token: &'a str,
    pub(super) cancelled: CancellationToken,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut inner = self.running.lock();
        if let Some(list) = inner.attempts.get_mut(self.task_id) {
            list.retain(|(t, _)| t != self.token);
            if list.is_empty() {
                inner.attempts.remove(self.task_id);
            }
        }
    }
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the attempt of `task_id` holding `token`; its token fires on a cancel (at once
    /// when the task was cancelled within `keep` and before it registered).
    pub(super) fn register<'a>(
        &'a self,
        task_id: &'a str,
        token: &'a str,
        keep: Duration,
    ) -> Registration<'a> {
        let cancelled = CancellationToken::new();
        let mut inner = self.lock();
        if !inner.recent.is_empty() {
            inner.prune(keep);
            if inner.recent.contains_key(task_id) {
                cancelled.cancel();
            }
        }
        inner
            .attempts
            .entry(task_id.to_owned())
            .or_default()
            .push((token.to_owned(), cancelled.clone()));
        Registration {
            running: self,
            task_id,
            token,
            cancelled,
        }
    }

    /// Stops every attempt of `task_id` on this node; returns how many there were. With none,
    /// the cancel is remembered for an attempt that registers within `keep`.
    pub(super) fn cancel(&self, task_id: &str, keep: Duration) -> usize {
        let mut inner = self.lock();
        match inner.attempts.get(task_id) {
            Some(list) => {
                for (_, token) in list {
                    token.cancel();
                }
                list.len()
            }
            None => {
                inner.prune(keep);
                let now = Instant::now();
                inner.recent.insert(task_id.to_owned(), now);
                inner.recent_order.push_back((task_id.to_owned(), now));
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Duration = Duration::from_secs(30);

    #[test]
    fn a_cancel_stops_every_attempt_of_its_task_and_no_other() {
        let running = Running::default();
        let a1 = running.register("task_a", "att_1", KEEP);
        let a2 = running.register("task_a", "att_2", KEEP);
        let b = running.register("task_b", "att_3", KEEP);
        assert_eq!(running.cancel("task_a", KEEP), 2);
        assert!(a1.cancelled.is_cancelled() && a2.cancelled.is_cancelled());
        assert!(!b.cancelled.is_cancelled());
    }

    #[test]
    fn an_attempt_that_registers_after_its_cancel_starts_cancelled() {
        let running = Running::default();
        assert_eq!(running.cancel("task_a", KEEP), 0);
        assert!(running
            .register("task_a", "att_1", KEEP)
            .cancelled
            .is_cancelled());
        assert!(!running
            .register("task_b", "att_2", KEEP)
            .cancelled
            .is_cancelled());
    }

    #[test]
    fn an_ended_attempt_is_forgotten_and_old_cancels_expire() {
        let running = Running::default();
        drop(running.register("task_a", "att_1", KEEP));
        assert_eq!(running.cancel("task_a", Duration::ZERO), 0);
        std::thread::sleep(Duration::from_millis(2));
        assert!(!running
            .register("task_a", "att_2", Duration::ZERO)
            .cancelled
            .is_cancelled());
        assert!(running.lock().recent.is_empty());
    }
}
