//! Routes: one model served by several backends in order, with failover and a circuit breaker
//! per route (`routes = [...]` in the model's table). Only models with routes get this wrapper:
//! a model with one `backend` runs that backend directly, as before.
//!
//! An attempt tries the routes in order. A route is passed over when its breaker turns attempts
//! away (open, or half-open with its one probe already out); otherwise the attempt takes one of
//! the route's permits (its `concurrency`) and runs the route's backend under the route's
//! `timeout`. When every route that would take the attempt is busy, it waits for the first of
//! them to free a permit. A retryable failure or a timeout counts against the route's breaker
//! and moves on to the next route; a fatal failure (the input's fault) ends the attempt there,
//! counting nothing; a success closes the breaker. When no route is left, the attempt fails
//! retryable, naming each route's failure, and the task's retry policy takes over.
//!
//! Directories: the first try writes in the attempt's own directory. A try after a failover
//! gets a fresh subdirectory of it (a failed route may have left files, or a writer that
//! outlives it), and a winner there hands its files back as [`Produced::FilesIn`]; the attempt's
//! directory is never reused (`writes_end_with_run` is false), so no late writer of a failed
//! route can reach a later attempt.
//!
//! Concurrency model: breakers and permits are in memory and per node; each node learns a
//! route's health on its own. A breaker is a small mutex-guarded state, held for a few
//! instructions; nothing is awaited under it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::select_all;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{human, Backend, BackendError, Job, Produced};
use crate::config::RouteConfig;
use crate::domain::fail_code;
use crate::metrics::RouteMetrics;

/// What a route's breaker does with attempts, as the state gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts pass; consecutive retryable failures are counted.
    Closed,
    /// Attempts are passed over until the cool-down ends.
    Open,
    /// The cool-down has ended: one probe may pass, and its outcome decides.
    HalfOpen,
}

impl BreakerState {
    /// The value of `taskgate_route_breaker_state`.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A route's circuit breaker: `threshold` consecutive retryable failures open it; after
/// `cooldown` exactly one probe may pass; the probe's success closes it, its failure opens it
/// again. Time is passed in, so the state machine is tested without waiting.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// Leave to try a route, from its breaker. Its outcome is reported once; a pass dropped
/// without one (a fatal failure, a cancelled attempt) frees the probe slot without a verdict.
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether [`Breaker::admit`] would let an attempt through at `now` (changes nothing).
    pub fn admits(&self, now: Instant) -> bool {
        match *self.lock() {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// Lets an attempt through, or not. Past the cool-down the first caller gets the probe and
    /// everyone else is turned away until the probe's outcome is known.
    pub fn admit(&self, now: Instant) -> Option<Pass<'_>> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now >= until => true,
            State::HalfOpen { probing: false } => true,
            State::Open { .. } | State::HalfOpen { probing: true } => return None,
        };
        if probe {
            *state = State::HalfOpen { probing: true };
        }
        Some(Pass {
            breaker: self,
            probe,
        })
    }
}

impl Pass<'_> {
    /// The route answered: a closed breaker's count starts over; a probe closes it.
    pub fn succeeded(self) {
        let mut state = self.breaker.lock();
        match *state {
            State::Closed { .. } => *state = State::Closed { failures: 0 },
            State::HalfOpen { .. } if self.probe => *state = State::Closed { failures: 0 },
            // Began before the breaker opened: the probe decides, not a straggler.
            _ => {}
        }
    }

    /// The route failed in a way another route might not (retryable, or its timeout).
    pub fn failed(self, now: Instant) {
        let b = self.breaker;
        let mut state = b.lock();
        match *state {
            State::Closed { failures } if failures + 1 >= b.threshold => {
                *state = State::Open {
                    until: now + b.cooldown,
                }
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                }
            }
            State::HalfOpen { .. } if self.probe => {
                *state = State::Open {
                    until: now + b.cooldown,
                }
            }
            _ => {}
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.probe {
            return;
        }
        // After `succeeded`/`failed` the state is no longer a probing half-open; otherwise the
        // probe ended without a verdict, and the next attempt may probe.
        let mut state = self.breaker.lock();
        if let State::HalfOpen { probing: true } = *state {
            *state = State::HalfOpen { probing: false };
        }
    }
}

/// One route: its backend, its permits, its breaker and its metrics.
pub struct Route {
    name: Arc<str>,
    backend: Arc<dyn Backend>,
    permits: Arc<Semaphore>,
    timeout: Duration,
    breaker: Breaker,
    metrics: RouteMetrics,
}

impl Route {
    pub fn new(
        name: String,
        cfg: &RouteConfig,
        backend: Arc<dyn Backend>,
        metrics: RouteMetrics,
    ) -> Self {
        metrics.breaker_state.set(BreakerState::Closed.gauge());
        Route {
            name: name.into(),
            backend,
            permits: Arc::new(Semaphore::new(cfg.concurrency)),
            timeout: cfg.timeout,
            breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown),
            metrics,
        }
    }

    fn show_state(&self) {
        self.metrics.breaker_state.set(self.breaker.state().gauge());
    }

    /// This route is left for the next one: counted, and named in the attempt's failure.
    fn passed_over(&self, why: &str, failures: &mut Vec<String>) {
        self.metrics.failovers.inc();
        failures.push(format!("{}: {why}", self.name));
    }
}

/// A model's routes, tried in order.
pub struct Routed {
    routes: Vec<Route>,
    /// How long an attempt waits for a permit when every route that would take it is full
    /// (half the model's timeout): past it the attempt ends retryable, so a queue behind a
    /// route whose breaker opened is retried later instead of failing `PROCESSING_TIMEOUT`
    /// without having run.
    max_wait: Duration,
}

impl Routed {
    pub fn new(routes: Vec<Route>, model_timeout: Duration) -> Self {
        Routed {
            routes,
            max_wait: model_timeout / 2,
        }
    }

    /// The first route in `left` (in order) whose breaker lets the attempt through and that has
    /// a free permit, waiting for a permit when every such route is busy. Routes whose breaker
    /// turns the attempt away leave `left`. `None`: no route is left.
    async fn next_route(
        &self,
        left: &mut Vec<usize>,
        failures: &mut Vec<String>,
        wait_until: tokio::time::Instant,
    ) -> Result<Option<(usize, OwnedSemaphorePermit, Pass<'_>)>, BackendError> {
        loop {
            let mut busy = Vec::new();
            let mut k = 0;
            while k < left.len() {
                let route = &self.routes[left[k]];
                let now = Instant::now();
                if !route.breaker.admits(now) {
                    route.passed_over("circuit breaker open", failures);
                    left.remove(k);
                    continue;
                }
                if let Ok(permit) = route.permits.clone().try_acquire_owned() {
                    if let Some(pass) = route.breaker.admit(now) {
                        route.show_state();
                        return Ok(Some((left[k], permit, pass)));
                    }
                    // Another attempt took the probe between the two looks.
                    route.passed_over("circuit breaker open", failures);
                    left.remove(k);
                    continue;
                }
                busy.push(left[k]);
                k += 1;
            }
            if busy.is_empty() {
                return Ok(None);
            }
            // Every route that would take the attempt is full: the first permit to free wins.
            // It is given back at once and the routes looked at again in order, so a breaker
            // that opened while we waited is seen.
            let waits = busy.iter().map(|&i| {
                let permits = self.routes[i].permits.clone();
                Box::pin(async move { permits.acquire_owned().await })
            });
            let Ok((freed, ..)) = tokio::time::timeout_at(wait_until, select_all(waits)).await
            else {
                return Err(BackendError::retryable(
                    fail_code::MODEL_UNAVAILABLE,
                    format!(
                        "no route had room for {} (every route that would take it was busy)",
                        human(self.max_wait)
                    ),
                ));
            };
            // Closed semaphores are never made; a closed one would only mean "look again".
            drop(freed);
        }
    }

    /// A job for a try after a failover: its own fresh subdirectory of the attempt's.
    async fn fresh_job(&self, job: &Job, tries: usize) -> Result<Job, BackendError> {
        let mut next = job.clone();
        if let Some(dir) = &job.output_dir {
            let sub = dir.join(format!("route-try-{tries}"));
            tokio::fs::create_dir(&sub).await.map_err(|e| {
                BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("cannot create an output directory for the next route: {e}"),
                )
            })?;
            next.output_dir = Some(sub);
        }
        Ok(next)
    }
}

#[async_trait]
impl Backend for Routed {
    /// Failover may take an input to any route, so every route must accept it.
    fn validate(&self, input: &Map<String, Value>) -> Result<(), String> {
        self.routes
            .iter()
            .try_for_each(|r| r.backend.validate(input))
    }

    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let mut left: Vec<usize> = (0..self.routes.len()).collect();
        let mut failures = Vec::new();
        let mut last_code = None;
        let mut tries = 0;
        let wait_until = tokio::time::Instant::now() + self.max_wait;
        while let Some((i, permit, pass)) = self
            .next_route(&mut left, &mut failures, wait_until)
            .await?
        {
            left.retain(|&j| j != i);
            let route = &self.routes[i];
            job.route.set(&route.name);
            let fresh;
            let try_job = if tries == 0 {
                job
            } else {
                fresh = self.fresh_job(job, tries).await?;
                &fresh
            };
            tries += 1;
            let result = tokio::time::timeout(route.timeout, route.backend.run(try_job))
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::retryable(
                        fail_code::PROCESSING_TIMEOUT,
                        format!(
                            "no answer within the route's timeout of {}",
                            human(route.timeout)
                        ),
                    ))
                });
            drop(permit);
            match result {
                Ok(produced) => {
                    pass.succeeded();
                    route.show_state();
                    return Ok(match (produced, &try_job.output_dir) {
                        (Produced::Files, Some(dir)) if tries > 1 => Produced::FilesIn(dir.clone()),
                        (produced, _) => produced,
                    });
                }
                Err(BackendError::Fatal { code, message })
                    if code == fail_code::MODEL_UNAVAILABLE =>
                {
                    // Not the input's fault but the route's, and one retrying will not mend (the
                    // upstream refused our key, has no such model, a key variable is unset):
                    // another route may well serve it, and the breaker should keep attempts off
                    // this one. Without routes the task fails at once, as before.
                    pass.failed(Instant::now());
                    route.show_state();
                    route.passed_over(&message, &mut failures);
                    last_code = Some(code);
                }
                Err(fatal @ BackendError::Fatal { .. }) => {
                    // The input's fault: another route would refuse it too, and the route is
                    // healthy, so nothing is counted (dropping the pass frees a probe slot).
                    drop(pass);
                    return Err(fatal);
                }
                Err(BackendError::Retryable { code, message }) => {
                    pass.failed(Instant::now());
                    route.show_state();
                    route.passed_over(&message, &mut failures);
                    last_code = Some(code);
                }
            }
        }
        Err(BackendError::retryable(
            last_code.as_deref().unwrap_or(fail_code::MODEL_UNAVAILABLE),
            format!("every route failed: {}", failures.join("; ")),
        ))
    }

    fn needs_output_dir(&self) -> bool {
        self.routes.iter().any(|r| r.backend.needs_output_dir())
    }

    /// A failed route may leave a writer behind (its try was dropped at its timeout, or it ran
    /// a program): the attempt's directory is never reused.
    fn writes_end_with_run(&self) -> bool {
        false
    }

    fn reports(&self) -> bool {
        self.routes.iter().any(|r| r.backend.reports())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(30);

    #[test]
    fn consecutive_failures_open_the_breaker_and_a_success_starts_the_count_over() {
        let b = Breaker::new(3, COOLDOWN);
        let t = Instant::now();
        b.admit(t).unwrap().failed(t);
        b.admit(t).unwrap().failed(t);
        b.admit(t).unwrap().succeeded();
        b.admit(t).unwrap().failed(t);
        b.admit(t).unwrap().failed(t);
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit(t).unwrap().failed(t);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admits(t + COOLDOWN / 2));
        assert!(b.admit(t + COOLDOWN / 2).is_none());
    }

    #[test]
    fn after_the_cool_down_exactly_one_probe_passes_and_its_success_closes() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        b.admit(t).unwrap().failed(t);
        let later = t + COOLDOWN;
        assert!(b.admits(later));
        let probe = b.admit(later).expect("the probe passes");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(
            b.admit(later).is_none(),
            "a second attempt waits for the probe"
        );
        probe.succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit(later).is_some());
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_for_another_cool_down() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        b.admit(t).unwrap().failed(t);
        let later = t + COOLDOWN;
        b.admit(later).unwrap().failed(later);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admits(later + COOLDOWN / 2));
        assert!(b.admits(later + COOLDOWN));
    }

    #[test]
    fn a_probe_that_ends_without_a_verdict_lets_the_next_attempt_probe() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        b.admit(t).unwrap().failed(t);
        let later = t + COOLDOWN;
        drop(b.admit(later).unwrap());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit(later).is_some(), "the probe slot is free again");
    }

    #[test]
    fn a_straggler_that_began_before_the_breaker_opened_does_not_close_it() {
        let b = Breaker::new(1, COOLDOWN);
        let t = Instant::now();
        let straggler = b.admit(t).unwrap();
        b.admit(t).unwrap().failed(t);
        straggler.succeeded();
        assert_eq!(b.state(), BreakerState::Open);
    }
}
