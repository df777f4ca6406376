//! The producer: claims due tasks, for the local loops (in batches, one write for every free
//! slot) and for pull workers' long-polls.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info_span, Instrument};

use super::{Dispatcher, ModelRuntime};
use crate::domain::now_ms;
use crate::report::error_chain;
use crate::store::{Claim, Runner, StoreError};

/// Most tasks one claim takes.
const CLAIM_BATCH: usize = 256;
/// Safety net for a missed wake-up; notifications are the main path.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

impl Dispatcher {
    /// Claims a task of one of `models` for a pull worker, waiting up to `wait` for one to
    /// become due (woken by submits and by other nodes' notifications, like the local loops).
    /// A stopping server hands out nothing. The claim counts only once the worker acknowledges
    /// it (its first heartbeat): if this answer never reaches the worker, the task goes back
    /// when the lease ends, attempt refunded.
    pub async fn claim_for_worker(
        &self,
        models: &[Arc<ModelRuntime>],
        wait: Duration,
    ) -> Result<Option<(Arc<ModelRuntime>, Claim)>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            let now = now_ms();
            let mut next_due: Option<i64> = None;
            for m in models {
                let claimed = self
                    .store
                    .claim_batch(
                        &m.name,
                        now,
                        self.lease,
                        m.config.concurrency,
                        1,
                        Runner::Worker,
                    )
                    .await?
                    .pop();
                if let Some(c) = claimed {
                    self.metrics.started(
                        &m.name,
                        c.task.attempts,
                        c.task.create_time,
                        c.task.start_time,
                    );
                    self.views.forget(&c.task.id);
                    self.events.changed(&c.task.id);
                    return Ok(Some((m.clone(), c)));
                }
                if let Some(due) = self.store.next_due(&m.name).await? {
                    next_due = Some(next_due.map_or(due, |d: i64| d.min(due)));
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            let until_due = match next_due {
                Some(due) if due > now => Duration::from_millis((due - now) as u64),
                _ => remaining,
            };
            let wakeups = models.iter().map(|m| Box::pin(m.notify.notified()));
            tokio::select! {
                _ = futures::future::select_all(wakeups) => {}
                _ = tokio::time::sleep(remaining.min(until_due)) => {}
                _ = self.stop.cancelled() => return Ok(None),
            }
        }
    }

    /// How long to wait before looking for due work again when a claim found less than it
    /// asked for: until the next retry's due time, or the idle recheck.
    async fn until_due(&self, model: &ModelRuntime) -> Duration {
        let now = now_ms();
        match self.store.next_due(&model.name).await {
            Ok(Some(due)) if due > now => Duration::from_millis((due - now).min(30_000) as u64),
            // Due work but no claim: the model is at its concurrency (on other nodes or with
            // pull workers), whose completions will notify us.
            Ok(Some(_)) | Ok(None) => IDLE_RECHECK,
            Err(e) => {
                error!(error = %error_chain(&e), model = %model.name, "cannot read the queue");
                Duration::from_secs(1)
            }
        }
    }

    /// A claim parked in the store until a task of `model` is due; wake-ups that are not
    /// submits (requeues, freed capacity, a retry's time after `wait`) poke it. It answers at
    /// once when the server stops, with what it had already taken: those run within the
    /// shutdown grace rather than being lost with a dropped future.
    async fn claim_parked(
        &self,
        model: &ModelRuntime,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        let claim = self.store.claim_parked(
            &model.name,
            self.lease,
            model.config.concurrency,
            limit,
            &self.stop,
        );
        tokio::pin!(claim);
        let timer = tokio::time::sleep(wait);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                claimed = &mut claim => return claimed,
                _ = model.notify.notified() => {}
                _ = &mut timer => {}
            }
            // The wake-up may be a retry put back with a later due time, and the timer may have
            // been capped short of one: read the due time again, then poke. Read first:
            // whatever is due by the read, the poke's claim (made later) sees.
            let wait = self.until_due(model).await;
            timer.as_mut().reset(tokio::time::Instant::now() + wait);
            self.store.poke(&model.name).await;
        }
    }

    pub(super) async fn model_loop(self: Arc<Self>, model: Arc<ModelRuntime>) {
        // Set when the last claim found less than it asked for and the store parks claims: the
        // next one waits in the store, with this as when to look again for a retry coming due.
        let mut park_for: Option<Duration> = None;
        loop {
            let first = tokio::select! {
                // Stop first: a stopping server claims nothing more, even with slots free.
                biased;
                _ = self.stop.cancelled() => return,
                p = model.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            // Every free slot is filled by one claim: one write for many tasks when a backlog
            // meets idle capacity.
            let mut permits = vec![first];
            while permits.len() < CLAIM_BATCH {
                match model.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let now = now_ms();
            let asked = permits.len();
            let claimed = match park_for.take() {
                Some(wait) => self.claim_parked(&model, asked, wait).await,
                None => {
                    self.store
                        .claim_batch(
                            &model.name,
                            now,
                            self.lease,
                            model.config.concurrency,
                            asked,
                            Runner::Local,
                        )
                        .await
                }
            };
            match claimed {
                Ok(claims) => {
                    let got = claims.len();
                    // Permits left over when fewer tasks came back are dropped with the zip.
                    for (claim, permit) in claims.into_iter().zip(permits) {
                        self.metrics.started(
                            &model.name,
                            claim.task.attempts,
                            claim.task.create_time,
                            claim.task.start_time,
                        );
                        // Out of `pending`: its cached pending view is no longer true.
                        self.views.forget(&claim.task.id);
                        self.events.changed(&claim.task.id);
                        let this = self.clone();
                        let model = model.clone();
                        // A root span: each attempt is its own trace (not a child of the
                        // long-lived dispatch loop), linked to the submit's.
                        let span = info_span!(parent: None, "attempt", taskId = %claim.task.id, model = %model.name, attempt = claim.task.attempts);
                        crate::telemetry::link_to_submit(&span, claim.task.trace_parent.as_deref());
                        self.tracker.spawn(
                            async move {
                                this.run_attempt(&model, claim).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    if got == asked {
                        // Maybe more where these came from: claim again at once.
                        continue;
                    }
                    // Fewer than asked: nothing more was due when the claim ran, so wait for a
                    // submit's wake-up (kept by `Notify` if it came meanwhile) or the next
                    // retry's due time, instead of paying a second, empty claim per task.
                    let wait = self.until_due(&model).await;
                    if self.store.parks_claims() {
                        park_for = Some(wait);
                        continue;
                    }
                    tokio::select! {
                        _ = model.notify.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    drop(permits);
                    error!(error = %error_chain(&e), model = %model.name, "cannot claim a task; retrying in 1s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }
}
