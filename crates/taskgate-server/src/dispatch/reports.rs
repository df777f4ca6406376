//! Stores what a running local attempt reports (its progress and log lines, through the job's
//! [`Progress`] handle), throttled, in a tokio task of its own beside the attempt.
//!
//! At most one flush per [`FLUSH_EVERY`] per attempt, sooner (but never closer than
//! [`MIN_GAP`]) once [`FLUSH_LINES`] lines wait. A flush is at most two writes: the progress
//! through `Store::renew_lease` (token-guarded, and only when it changed since the last one
//! written) and every waiting line through one `Store::append_logs`; then waiting requests are
//! nudged (`events`). An attempt that reports nothing costs nothing: the task sleeps on the
//! handle and writes nothing. The backend never waits for the store: the handle is bounded and
//! drops the oldest lines when the store is slower than the program.
//!
//! A task of its own so that a slow write never pauses the backend's future, and a write is
//! never cut off half-way when the work ends: the attempt asks for a last flush of the lines
//! still waiting ([`Reports::finish`]) before it settles, so every line the program wrote is
//! readable once the task is final. An attempt that is abandoned (lost lease, cancel, shutdown)
//! drops its [`Reports`], which stops the task.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use super::Dispatcher;
use crate::backends::Progress;
use crate::domain::now_ms;
use crate::events::TaskEvents;
use crate::report::error_chain;
use crate::store::{Claim, Store};

/// The usual pause between two flushes of one attempt.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Lines waiting that call for a flush before [`FLUSH_EVERY`] is over.
pub const FLUSH_LINES: usize = 100;
/// The shortest pause between two flushes, however fast lines come: at most four writes a
/// second per attempt.
pub const MIN_GAP: Duration = Duration::from_millis(250);
/// Most bytes of log lines one flush writes (the newest kept, the rest counted as dropped):
/// with [`MIN_GAP`] a program flooding its stdout costs the store at most 256 KiB of lines a
/// second, a few short writes, rather than SQLite's write lock for most of every second
/// (4 MB inserted and then trimmed back to the per-task cap, as a review measured).
pub const MAX_FLUSH_BYTES: usize = 64 * 1024;
/// Longest the last flush may hold up settling the attempt.
const LAST_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// The running report task of one attempt; dropping it stops the task.
pub(super) struct Reports {
    work_done: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Dispatcher {
    /// Starts storing what the attempt of `claim` reports through `progress`.
    pub(super) fn start_reports(&self, claim: &Claim, progress: &Progress) -> Reports {
        let work_done = CancellationToken::new();
        let writer = ReportWriter {
            store: self.store.clone(),
            events: self.events.clone(),
            lease: self.lease,
            task_id: claim.task.id.clone(),
            token: claim.token.clone(),
            written: None,
        };
        let task = tokio::spawn(
            writer
                .run(progress.clone(), work_done.clone())
                .instrument(tracing::Span::current()),
        );
        Reports {
            work_done,
            task: Some(task),
        }
    }
}

impl Reports {
    /// The attempt's work is over: stores the lines still waiting, then stops (within a bound:
    /// a store that hangs must not hold the outcome back).
    pub(super) async fn finish(mut self) {
        self.work_done.cancel();
        if let Some(task) = self.task.as_mut() {
            if tokio::time::timeout(LAST_FLUSH_BOUND, task).await.is_err() {
                warn!("the last log lines could not be stored in time; continuing without them");
            }
        }
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct ReportWriter {
    store: Arc<dyn Store>,
    events: TaskEvents,
    lease: Duration,
    task_id: String,
    token: String,
    /// The progress last written, so that an unchanged one is not written again.
    written: Option<f64>,
}

impl ReportWriter {
    async fn run(mut self, progress: Progress, work_done: CancellationToken) {
        let mut last: Option<Instant> = None;
        loop {
            let mut ending = tokio::select! {
                biased;
                _ = work_done.cancelled() => true,
                _ = progress.reported() => false,
            };
            // The throttle: wait out the pause since the last flush, unless the work ends.
            while !ending {
                let Some(at) = last else { break };
                let many = progress.waiting_lines() >= FLUSH_LINES;
                let until = at + if many { MIN_GAP } else { FLUSH_EVERY };
                if Instant::now() >= until {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    // More lines may make it `many`.
                    _ = progress.reported() => {}
                    _ = work_done.cancelled() => ending = true,
                }
            }
            let keep_going = self.flush(&progress, ending).await;
            last = Some(Instant::now());
            if ending || !keep_going {
                return;
            }
        }
    }

    /// Writes what waits; false once the task is no longer this attempt's (nothing more will
    /// be written).
    async fn flush(&mut self, progress: &Progress, ending: bool) -> bool {
        let mut reported = progress.take();
        cap_lines(&mut reported.lines, MAX_FLUSH_BYTES);
        let mut changed = false;
        let mut ours = true;
        // A progress at the very end is not worth a write: a final or requeued task shows none.
        let new_progress = reported
            .progress
            .filter(|p| !ending && self.written != Some(*p));
        if let Some(p) = new_progress {
            match self
                .store
                .renew_lease(&self.task_id, &self.token, now_ms(), self.lease, Some(p))
                .await
            {
                Ok(true) => {
                    self.written = Some(p);
                    changed = true;
                }
                // The lease keeper sees it too and abandons the attempt.
                Ok(false) => ours = false,
                Err(e) => warn!(error = %error_chain(&e), "cannot store the attempt's progress"),
            }
        }
        if ours && !reported.lines.is_empty() {
            match self
                .store
                .append_logs(&self.task_id, &self.token, &reported.lines, now_ms())
                .await
            {
                Ok(true) => changed = true,
                Ok(false) => ours = false,
                Err(e) => {
                    warn!(error = %error_chain(&e), lines = reported.lines.len(), "cannot store the attempt's log lines; they are dropped")
                }
            }
        }
        if changed {
            self.events.changed(&self.task_id);
        }
        ours
    }
}

/// Keeps the newest lines that fit in `max` bytes; the first kept line says how many went.
fn cap_lines(lines: &mut Vec<String>, max: usize) {
    let mut total = 0;
    let keep = lines
        .iter()
        .rev()
        .take_while(|l| {
            total += l.len() + 1;
            total <= max
        })
        .count();
    let dropped = lines.len() - keep;
    if dropped > 0 {
        lines.drain(..dropped);
        lines.insert(
            0,
            format!("[taskgate: {dropped} log line(s) dropped: the program wrote faster than they are stored]"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_keeps_the_newest_lines_that_fit_and_says_how_many_went() {
        let mut lines: Vec<String> = (0..100).map(|i| format!("{i:09}")).collect();
        cap_lines(&mut lines, 10 * 10);
        assert_eq!(lines.len(), 11);
        assert!(lines[0].contains("90 log line(s) dropped"), "{}", lines[0]);
        assert_eq!(lines[10], "000000099");
        let mut few = vec!["a".to_owned()];
        cap_lines(&mut few, 100);
        assert_eq!(few, ["a"]);
    }
}
