//! Callback delivery: a durable outbox drained by one worker per node.
//!
//! The outbox row is written with the task's final state (see `Store::finish`), so a crash at
//! any moment still leads to a delivery after restart (at least once; `webhook-id` stays the
//! same on every attempt so receivers can drop duplicates). Each request is signed per the
//! Standard Webhooks specification with the tenant's secret.
//!
//! Concurrency model: the worker claims due deliveries in batches no larger than its free
//! global permits (so a large backlog costs little memory), and runs each in its own task. A
//! host with `max_per_host` requests in flight, or whose circuit is open after repeated
//! failures, gets its deliveries deferred without an attempt being counted, so one slow or dead
//! receiver cannot hold up the others. Wake-ups come from task completions and replays; with
//! nothing due the worker sleeps until the next retry is due.

pub mod ssrf;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use taskgate_proto::{webhook, Envelope};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::artifacts::ResultLinks;
use crate::config::WebhookConfig;
use crate::domain::now_ms;
use crate::error::error_chain;
use crate::store::{
    DeliveryAttempt, DeliveryClaim, DeliveryNext, Store, StoreError, WebhookSecrets,
};

/// How long a claimed delivery is ours; longer than any request may take.
const LEASE_EXTRA: Duration = Duration::from_secs(60);
/// Most deliveries claimed at once.
const BATCH: usize = 64;
/// How long a delivery waits when its host already has `max_per_host` requests in flight.
const HOST_BUSY_DEFER: Duration = Duration::from_millis(500);
const IDLE_RECHECK: Duration = Duration::from_secs(30);

#[derive(Default)]
struct HostState {
    in_flight: usize,
    consecutive_failures: u32,
    open_until: Option<i64>,
}

pub struct Deliverer {
    store: Arc<dyn Store>,
    links: ResultLinks,
    config: WebhookConfig,
    client: reqwest::Client,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    hosts: Mutex<HashMap<String, HostState>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// The secrets that sign now: the current one, and the previous one during its overlap.
pub fn signing_secrets(s: &WebhookSecrets, now: i64) -> Vec<webhook::Secret> {
    let mut out = Vec::with_capacity(2);
    if let Ok(cur) = webhook::Secret::parse(&s.current) {
        out.push(cur);
    }
    if let (Some(prev), Some(until)) = (&s.previous, s.previous_expires_at) {
        if until > now {
            if let Ok(prev) = webhook::Secret::parse(prev) {
                out.push(prev);
            }
        }
    }
    out
}

/// Delay before retry number `attempt` (1-based), ±10 % so that retries to one host spread out.
fn retry_delay(delays: &[Duration], attempt: u32) -> Option<Duration> {
    let base = delays.get(attempt as usize - 1)?;
    let jitter = rand::thread_rng().gen_range(0.9..=1.1);
    Some(base.mul_f64(jitter))
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        links: ResultLinks,
        config: WebhookConfig,
        wake: Arc<Notify>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("taskgate/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout);
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(ssrf::GuardedResolver));
        }
        Ok(Arc::new(Deliverer {
            store,
            links,
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            client: builder.build()?,
            wake,
            hosts: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }))
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn start(self: &Arc<Self>) {
        let this = self.clone();
        self.tracker
            .spawn(async move { this.run().await }.instrument(info_span!("webhooks")));
    }

    /// Stops claiming and waits up to `grace` for requests in flight. A delivery cut short stays
    /// claimed until its lease ends, then runs again: at least once, never lost.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
    }

    fn lease(&self) -> Duration {
        self.config.timeout + LEASE_EXTRA
    }

    async fn run(self: Arc<Self>) {
        // Deliveries claimed by a process that died are ours to send again.
        let mut last_sweep = Instant::now();
        if let Err(e) = self.store.recover_expired_deliveries(now_ms()).await {
            error!(error = %error_chain(&e), "cannot recover deliveries");
        }
        loop {
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = self.stop.cancelled() => return,
            };
            let mut permits = vec![first];
            while permits.len() < BATCH {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            if last_sweep.elapsed() > self.lease() {
                last_sweep = Instant::now();
                if let Err(e) = self.store.recover_expired_deliveries(now_ms()).await {
                    error!(error = %error_chain(&e), "cannot recover deliveries");
                }
            }
            let now = now_ms();
            let claims = match self
                .store
                .claim_deliveries(now, permits.len(), self.lease())
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %error_chain(&e), "cannot claim deliveries; retrying in 1s");
                    drop(permits);
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let full = claims.len() == permits.len();
            for claim in claims {
                let Some(permit) = permits.pop() else { break };
                self.dispatch(claim, permit, now).await;
            }
            drop(permits);
            if full {
                continue;
            }
            let wait = match self.store.next_delivery_due().await {
                Ok(Some(due)) => Duration::from_millis((due - now_ms()).clamp(5, 30_000) as u64),
                Ok(None) => IDLE_RECHECK,
                Err(_) => Duration::from_secs(1),
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Sends `claim` in its own task, or defers it when its host is saturated or failing.
    async fn dispatch(
        self: &Arc<Self>,
        claim: DeliveryClaim,
        permit: tokio::sync::OwnedSemaphorePermit,
        now: i64,
    ) {
        let host = host_key(&claim.delivery.url);
        let deferral = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            let h = hosts.entry(host.clone()).or_default();
            match h.open_until {
                Some(until) if until > now => Some(until),
                _ if h.in_flight >= self.config.max_per_host => {
                    Some(now + HOST_BUSY_DEFER.as_millis() as i64)
                }
                _ => {
                    h.in_flight += 1;
                    None
                }
            }
        };
        if let Some(at) = deferral {
            let d = &claim.delivery;
            if let Err(e) = self
                .store
                .finish_delivery_attempt(&d.id, &claim.token, None, DeliveryNext::Defer(at), now)
                .await
            {
                error!(error = %error_chain(&e), delivery_id = %d.id, "cannot defer delivery");
            }
            return;
        }
        let this = self.clone();
        let span = info_span!("delivery", delivery_id = %claim.delivery.id, task_id = %claim.delivery.task_id);
        self.tracker.spawn(
            async move {
                let ok = this.attempt(&claim).await;
                this.host_done(&host, ok);
                drop(permit);
            }
            .instrument(span),
        );
    }

    fn host_done(&self, host: &str, ok: bool) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.entry(host.to_owned()).or_default();
        h.in_flight = h.in_flight.saturating_sub(1);
        if ok {
            h.consecutive_failures = 0;
            h.open_until = None;
        } else {
            h.consecutive_failures += 1;
            if h.consecutive_failures >= self.config.breaker_threshold {
                let until = now_ms() + self.config.breaker_cooldown.as_millis() as i64;
                if h.open_until.is_none_or(|u| u < until) {
                    warn!(
                        host,
                        failures = h.consecutive_failures,
                        "receiver keeps failing; holding its deliveries back"
                    );
                }
                h.open_until = Some(until);
            }
        }
        if h.in_flight == 0 && h.consecutive_failures == 0 {
            hosts.remove(host);
        }
    }

    /// One attempt: build, sign, send, record. Returns whether the receiver took it.
    async fn attempt(&self, claim: &DeliveryClaim) -> bool {
        let d = &claim.delivery;
        let started = now_ms();
        let (attempt, next) = match self.send(claim).await {
            Ok((status, latency)) => {
                let next = if status.is_success() {
                    DeliveryNext::Succeeded
                } else if status == reqwest::StatusCode::GONE {
                    DeliveryNext::Failed
                } else {
                    self.next_after_failure(d.attempts + 1)
                };
                (
                    DeliveryAttempt {
                        attempted_at: started,
                        status_code: Some(status.as_u16()),
                        latency_ms: latency,
                        error: None,
                    },
                    next,
                )
            }
            Err(SendError::Permanent(message)) => (
                DeliveryAttempt {
                    attempted_at: started,
                    status_code: None,
                    latency_ms: 0,
                    error: Some(message),
                },
                DeliveryNext::Failed,
            ),
            Err(SendError::Transient { message, latency }) => (
                DeliveryAttempt {
                    attempted_at: started,
                    status_code: None,
                    latency_ms: latency,
                    error: Some(message),
                },
                self.next_after_failure(d.attempts + 1),
            ),
        };
        let ok = next == DeliveryNext::Succeeded;
        match next {
            DeliveryNext::Succeeded => {
                info!(status = ?attempt.status_code, latency_ms = attempt.latency_ms, "callback delivered")
            }
            DeliveryNext::RetryAt(at) => {
                warn!(status = ?attempt.status_code, error = ?attempt.error, retry_in_ms = at - now_ms(), "callback attempt failed; will retry")
            }
            _ => {
                warn!(status = ?attempt.status_code, error = ?attempt.error, "callback delivery failed for good")
            }
        }
        match self
            .store
            .finish_delivery_attempt(&d.id, &claim.token, Some(&attempt), next, now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => warn!("delivery was handed on before this attempt was recorded"),
            Err(e) => {
                error!(error = %error_chain(&e), "cannot record delivery attempt; it will run again when its lease ends")
            }
        }
        // The loop may be asleep with nothing pending: a retry is due soon.
        self.wake.notify_one();
        ok
    }

    fn next_after_failure(&self, attempts_made: u32) -> DeliveryNext {
        match retry_delay(&self.config.retry_delays, attempts_made) {
            Some(delay) => DeliveryNext::RetryAt(now_ms() + delay.as_millis() as i64),
            None => DeliveryNext::Failed,
        }
    }

    async fn send(&self, claim: &DeliveryClaim) -> Result<(reqwest::StatusCode, i64), SendError> {
        let d = &claim.delivery;
        let url = url::Url::parse(&d.url)
            .map_err(|e| SendError::Permanent(format!("callback_url is not a URL: {e}")))?;
        ssrf::check_url(&url, self.config.allow_private)
            .map_err(|e| SendError::Permanent(format!("callback_url {e}")))?;
        let store_err = |e: StoreError| SendError::Transient {
            message: format!(
                "server-side error preparing the delivery: {}",
                error_chain(&e)
            ),
            latency: 0,
        };
        let task = self
            .store
            .get_task(&d.task_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| SendError::Permanent("the task no longer exists".into()))?;
        let status = self
            .links
            .status_of(&task)
            .await
            .map_err(|e| SendError::Transient {
                message: format!(
                    "server-side error preparing the delivery: {}",
                    error_chain(&e)
                ),
                latency: 0,
            })?;
        let body = serde_json::to_vec(&Envelope::success(status))
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        let secrets = self
            .store
            .webhook_secrets(&d.tenant_id, &webhook::generate_secret())
            .await
            .map_err(store_err)?;
        let timestamp = now_ms() / 1000;
        let signature = webhook::sign_all(
            &signing_secrets(&secrets, now_ms()),
            &d.id,
            timestamp,
            &body,
        );
        let started = Instant::now();
        let result = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(webhook::HEADER_ID, &d.id)
            .header(webhook::HEADER_TIMESTAMP, timestamp.to_string())
            .header(webhook::HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await;
        let latency = started.elapsed().as_millis() as i64;
        match result {
            Ok(resp) => Ok((resp.status(), latency)),
            Err(e) if ssrf::is_refused_address(&e) => Err(SendError::Permanent(error_chain(&e))),
            Err(e) => {
                let message = if e.is_timeout() {
                    format!(
                        "no answer within {}",
                        humantime::format_duration(self.config.timeout)
                    )
                } else {
                    error_chain(&e)
                };
                Err(SendError::Transient { message, latency })
            }
        }
    }
}

enum SendError {
    /// Retrying cannot help (a refused URL, a deleted task).
    Permanent(String),
    Transient {
        message: String,
        latency: i64,
    },
}

/// `host:port`, the unit of per-receiver limits.
fn host_key(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_follow_the_schedule_with_bounded_jitter_then_stop() {
        let delays = vec![Duration::from_secs(10), Duration::from_secs(100)];
        for _ in 0..50 {
            let d = retry_delay(&delays, 1).unwrap_or_default();
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
            let d = retry_delay(&delays, 2).unwrap_or_default();
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        assert_eq!(retry_delay(&delays, 3), None);
    }

    #[test]
    fn the_previous_secret_signs_only_until_its_overlap_ends() {
        let s = WebhookSecrets {
            current: webhook::generate_secret(),
            previous: Some(webhook::generate_secret()),
            previous_expires_at: Some(1000),
        };
        assert_eq!(signing_secrets(&s, 999).len(), 2);
        assert_eq!(signing_secrets(&s, 1000).len(), 1);
    }

    #[test]
    fn hosts_are_keyed_with_their_port() {
        assert_eq!(host_key("https://a.example/x"), "a.example:443");
        assert_eq!(host_key("http://a.example:8080/x"), "a.example:8080");
    }
}
