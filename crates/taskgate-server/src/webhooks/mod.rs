//! Callback delivery: a durable outbox drained by one worker per node.
//!
//! The outbox row is written with the task's final state (see `Store::finish`), so a crash at
//! any moment still leads to a delivery after restart (at least once; `webhook-id` stays the
//! same on every attempt so receivers can drop duplicates). A task that asked for `start` or
//! `progress` events also gets rows written with the claim and with the progress report, each
//! carrying the status of its moment (`Delivery::payload`); a final-state row is rendered when
//! sent. Each request is signed per the Standard Webhooks specification with the tenant's
//! secret, and names its event in the `taskgate-event` header.
//!
//! Concurrency model: the worker claims due deliveries in batches no larger than its free
//! global permits (so a large backlog costs little memory), and runs each in its own task. One
//! slow or dead receiver cannot hold up the others, and its backlog costs almost nothing while
//! it waits: each claim tells the store how much room every host has (`max_per_host` minus its
//! requests in flight; none while its circuit is open), so a saturated host's deliveries are
//! never claimed, and rows are written only when they are really attempted. When a circuit
//! opens, its host's pending rows move to the reopen time in one statement. Wake-ups come from
//! task completions, replays, a host freeing a slot and the store (`DeliveryReady`: another
//! node's row, or an event row written inside a claim or renewal); with nothing claimable the
//! worker sleeps until the next retry is due or the next circuit reopens.

pub mod ssrf;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskgate_proto::{webhook, Envelope, TaskStatus};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::artifacts::ResultLinks;
use crate::config::WebhookSettings;
use crate::domain::now_ms;
use crate::metrics::{Metrics, WebhookOutcome};
use crate::report::error_chain;
use crate::retry::{AfterLast, RetryPolicy};
use crate::store::{
    Delivery, DeliveryAttempt, DeliveryClaim, DeliveryNext, HostRoom, Store, StoreError,
    WebhookSecrets,
};

/// How long a claimed delivery is ours; longer than any request may take.
const LEASE_EXTRA: Duration = Duration::from_secs(60);
/// Most deliveries claimed at once.
const BATCH: usize = 64;
const IDLE_RECHECK: Duration = Duration::from_secs(30);
/// Most receiver hosts whose state is kept; past it, idle hosts are forgotten (closed circuits
/// first), so that callbacks to very many hosts cannot grow the table without bound.
const MAX_HOSTS: usize = 10_000;
/// How soon a person may ask for the same delivery to be sent again (`.../retry`): a replay
/// button pressed in a loop must not hammer a receiver.
pub const MANUAL_RETRY_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default, Debug)]
struct HostState {
    in_flight: usize,
    consecutive_failures: u32,
    open_until: Option<i64>,
}

impl HostState {
    fn is_open(&self, now: i64) -> bool {
        self.open_until.is_some_and(|u| u > now)
    }
}

/// Per-host state, keyed by the delivery's `host` column. Hosts with nothing in flight and no
/// failures are dropped at once; the rest are capped at `cap` entries.
struct HostTable {
    hosts: HashMap<String, HostState>,
    cap: usize,
}

impl HostTable {
    fn new(cap: usize) -> Self {
        HostTable {
            hosts: HashMap::new(),
            cap,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.hosts.len()
    }

    /// The state of `host`, created if missing; makes room first when the table is full.
    fn entry(&mut self, host: &str, now: i64) -> &mut HostState {
        if !self.hosts.contains_key(host) && self.hosts.len() >= self.cap {
            self.evict(now);
        }
        self.hosts.entry(host.to_owned()).or_default()
    }

    /// Forgets idle hosts down to 90 % of the cap (so eviction runs once per many new hosts):
    /// closed circuits first, then open ones reopening soonest. A host with requests in flight
    /// is never forgotten, since its count guards `max_per_host`; there are at most
    /// `max_in_flight` of those.
    fn evict(&mut self, now: i64) {
        let target = self.cap - self.cap / 10;
        let mut idle: Vec<(bool, i64, String)> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.in_flight == 0)
            .map(|(k, h)| (h.is_open(now), h.open_until.unwrap_or(0), k.clone()))
            .collect();
        idle.sort_unstable();
        let excess = self.hosts.len().saturating_sub(target);
        for (_, _, host) in idle.into_iter().take(excess) {
            self.hosts.remove(&host);
        }
    }

    fn remove_if_idle(&mut self, host: &str) {
        if self
            .hosts
            .get(host)
            .is_some_and(|h| h.in_flight == 0 && h.consecutive_failures == 0)
        {
            self.hosts.remove(host);
        }
    }

    /// What each host may take now: hosts with less than `per_host` of room, 0 for a host that
    /// is saturated or whose circuit is open.
    fn room(&self, per_host: usize, now: i64) -> HostRoom {
        let limited = self
            .hosts
            .iter()
            .filter_map(|(k, h)| {
                let room = if h.is_open(now) {
                    0
                } else {
                    per_host.saturating_sub(h.in_flight)
                };
                (room < per_host).then(|| (k.clone(), room))
            })
            .collect();
        HostRoom { per_host, limited }
    }

    /// When the next open circuit closes, to wake then.
    fn next_reopen(&self, now: i64) -> Option<i64> {
        self.hosts
            .values()
            .filter_map(|h| h.open_until.filter(|u| *u > now))
            .min()
    }
}

pub struct Deliverer {
    store: Arc<dyn Store>,
    links: ResultLinks,
    config: WebhookSettings,
    client: reqwest::Client,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    hosts: Mutex<HostTable>,
    stop: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
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

/// Retries follow the configured delays, ±10 % so that retries to one host spread out, and stop
/// after the last.
fn retry_policy(config: &WebhookSettings) -> RetryPolicy {
    RetryPolicy::new(config.retry_delays.0.clone(), 0.1, AfterLast::GiveUp)
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        links: ResultLinks,
        config: WebhookSettings,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let builder = ssrf::client_builder(config.allow_private_callbacks).timeout(config.timeout);
        Ok(Arc::new(Deliverer {
            store,
            links,
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            client: builder.build()?,
            wake,
            hosts: Mutex::new(HostTable::new(MAX_HOSTS)),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics,
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

    /// Claims and sends due deliveries until stopped. Deliveries whose lease ended (a node died
    /// mid-request) are put back by `dispatch::maintenance`, the one owner of lease sweeps.
    async fn run(self: Arc<Self>) {
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
            let now = now_ms();
            let room = self.host_room(now);
            let claims = match self
                .store
                .claim_deliveries(now, permits.len(), self.lease(), &room)
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
            // Hosts that are full now (this batch may have filled some) are left out: their due
            // rows are not claimable, and waiting on them would spin. A host freeing a slot
            // wakes the loop; an open circuit is waited for below.
            let now = now_ms();
            let (blocked, reopen) = {
                let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
                (
                    hosts.room(self.config.max_per_host, now).blocked(),
                    hosts.next_reopen(now),
                )
            };
            let due = match self.store.next_delivery_due(&blocked).await {
                Ok(due) => due,
                Err(e) => {
                    error!(error = %error_chain(&e), "cannot read the next delivery time");
                    Some(now + 1000)
                }
            };
            let wait = match due.into_iter().chain(reopen).min() {
                Some(at) => Duration::from_millis((at - now).clamp(5, 30_000) as u64),
                None => IDLE_RECHECK,
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

    fn host_room(&self, now: i64) -> HostRoom {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.room(self.config.max_per_host, now)
    }

    /// Sends `claim` in its own task. The claim respected each host's room, so a deferral here
    /// is rare: only a circuit that opened since the claim (or a full host, defensively).
    async fn dispatch(
        self: &Arc<Self>,
        claim: DeliveryClaim,
        permit: tokio::sync::OwnedSemaphorePermit,
        now: i64,
    ) {
        let host = claim.delivery.host.clone();
        let deferral = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            let h = hosts.entry(&host, now);
            match h.open_until {
                Some(until) if until > now => Some(until),
                _ if h.in_flight >= self.config.max_per_host => {
                    Some(claim.delivery.next_attempt_at)
                }
                _ => {
                    h.in_flight += 1;
                    None
                }
            }
        };
        if let Some(at) = deferral {
            let d = &claim.delivery;
            self.metrics
                .webhook(WebhookOutcome::Deferred, d.created_at, now);
            if let Err(e) = self
                .store
                .finish_delivery_attempt(&d.id, &claim.token, None, DeliveryNext::Defer(at), now)
                .await
            {
                error!(error = %error_chain(&e), deliveryId = %d.id, taskId = %d.task_id, model = claim.model.as_deref(), "cannot defer delivery");
            }
            return;
        }
        let this = self.clone();
        // A root span, like an attempt's: not a child of the long-lived delivery loop.
        let span = info_span!(parent: None, "delivery", deliveryId = %claim.delivery.id, taskId = %claim.delivery.task_id, model = claim.model.as_deref(), event = claim.delivery.event.header_value());
        self.tracker.spawn(
            async move {
                let ok = this.attempt(&claim).await;
                drop(permit);
                if let Some(until) = this.host_done(&host, ok) {
                    // One statement for the host's whole backlog, instead of claiming and
                    // deferring each row until the circuit closes.
                    if let Err(e) = this.store.defer_host(&host, until).await {
                        error!(error = %error_chain(&e), host = %without_userinfo(&host), "cannot hold back a failing host's deliveries");
                    }
                }
                // A slot (or a global permit) is free: the loop may be waiting for it.
                this.wake.notify_one();
            }
            .instrument(span),
        );
    }

    /// Records the end of a request to `host`; returns the time its circuit stays open until,
    /// when this failure opened (or extended) it.
    fn host_done(&self, host: &str, ok: bool) -> Option<i64> {
        let now = now_ms();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.entry(host, now);
        h.in_flight = h.in_flight.saturating_sub(1);
        let mut opened = None;
        if ok {
            h.consecutive_failures = 0;
            h.open_until = None;
        } else {
            h.consecutive_failures += 1;
            if h.consecutive_failures >= self.config.breaker_threshold {
                let until = now + self.config.breaker_cooldown.as_millis() as i64;
                if h.open_until.is_none_or(|u| u < until) {
                    warn!(
                        host = %without_userinfo(host),
                        failures = h.consecutive_failures,
                        "receiver keeps failing; holding its deliveries back"
                    );
                }
                h.open_until = Some(until);
                opened = Some(until);
            }
        }
        hosts.remove_if_idle(host);
        opened
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
        let outcome = match next {
            DeliveryNext::Succeeded => WebhookOutcome::Delivered,
            DeliveryNext::RetryAt(_) => WebhookOutcome::Retrying,
            DeliveryNext::Failed => WebhookOutcome::Failed,
            DeliveryNext::Defer(_) => WebhookOutcome::Deferred,
        };
        self.metrics.webhook(outcome, d.created_at, now_ms());
        match next {
            DeliveryNext::Succeeded => {
                info!(
                    status = attempt.status_code,
                    latency_ms = attempt.latency_ms,
                    "callback delivered"
                )
            }
            DeliveryNext::RetryAt(at) => {
                warn!(
                    status = attempt.status_code,
                    error = attempt.error.as_deref(),
                    retry_in_ms = at - now_ms(),
                    "callback attempt failed; will retry"
                )
            }
            _ => {
                warn!(
                    status = attempt.status_code,
                    error = attempt.error.as_deref(),
                    "callback delivery failed for good"
                )
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
        ok
    }

    fn next_after_failure(&self, attempts_made: u32) -> DeliveryNext {
        match retry_policy(&self.config).delay(attempts_made) {
            Some(delay) => DeliveryNext::RetryAt(now_ms() + delay.as_millis() as i64),
            None => DeliveryNext::Failed,
        }
    }

    async fn send(&self, claim: &DeliveryClaim) -> Result<(reqwest::StatusCode, i64), SendError> {
        let d = &claim.delivery;
        let url = url::Url::parse(&d.url)
            .map_err(|e| SendError::Permanent(format!("callback_url is not a URL: {e}")))?;
        ssrf::check_url(&url, self.config.allow_private_callbacks)
            .map_err(|e| SendError::Permanent(format!("callback_url {e}")))?;
        let store_err = |e: StoreError| SendError::Transient {
            message: format!(
                "server-side error preparing the delivery: {}",
                error_chain(&e)
            ),
            latency: 0,
        };
        let status = match &d.payload {
            Some(snapshot) => event_status(snapshot)?,
            None => self.current_status(d).await?,
        };
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
            .header(webhook::HEADER_EVENT, d.event.header_value())
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

impl Deliverer {
    /// A final-state delivery's status: the task as it is now, rendered as statusTask renders it
    /// (result URLs signed afresh for each attempt).
    async fn current_status(&self, d: &Delivery) -> Result<TaskStatus, SendError> {
        let prepare = |e: &(dyn std::error::Error + 'static)| SendError::Transient {
            message: format!(
                "server-side error preparing the delivery: {}",
                error_chain(e)
            ),
            latency: 0,
        };
        let task = self
            .store
            .get_task(&d.task_id)
            .await
            .map_err(|e| prepare(&e))?
            .ok_or_else(|| SendError::Permanent("the task no longer exists".into()))?;
        self.links.status_of(&task).await.map_err(|e| prepare(&e))
    }
}

/// A start or progress delivery's status: the snapshot written with its event (SQL's JSON of
/// statusTask's `data`), read back into the wire type so that its body is serialised exactly as
/// every other delivery's. A snapshot that does not parse never will: retrying cannot help.
fn event_status(snapshot: &str) -> Result<TaskStatus, SendError> {
    serde_json::from_str(snapshot).map_err(|e| {
        SendError::Permanent(format!("the delivery's stored status is not valid: {e}"))
    })
}

enum SendError {
    /// Retrying cannot help (a refused URL, a deleted task).
    Permanent(String),
    Transient {
        message: String,
        latency: i64,
    },
}

/// `scheme://host[:port]` with any `user:password@` taken out: a callback URL may carry
/// credentials, and host keys end up in logs.
fn without_userinfo(host: &str) -> std::borrow::Cow<'_, str> {
    match (host.find("://"), host.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}{}", &host[..scheme_end + 3], &host[at + 1..]).into()
        }
        _ => host.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_snapshot_from_either_dialect_sends_the_status_of_that_moment() {
        // SQLite's json_object and PostgreSQL's json_build_object spell the same object.
        for snapshot in [
            r#"{"taskId":"task_1","state":"processing","createTime":5,"progress":0.25}"#,
            r#"{"taskId" : "task_1", "state" : "processing", "createTime" : 5, "progress" : 0.25}"#,
        ] {
            let status = event_status(snapshot)
                .ok()
                .unwrap_or_else(|| panic!("{snapshot}"));
            assert_eq!(
                serde_json::to_string(&Envelope::success(status)).unwrap_or_default(),
                r#"{"code":200,"message":"success","data":{"taskId":"task_1","state":"processing","createTime":5,"progress":0.25}}"#
            );
        }
        // A start carries no progress yet: null, left out of the body like statusTask's.
        let status = event_status(
            r#"{"taskId":"task_1","state":"processing","createTime":5,"progress":null}"#,
        );
        assert!(matches!(status, Ok(TaskStatus { progress: None, .. })));
        assert!(matches!(event_status("{}"), Err(SendError::Permanent(_))));
    }

    #[test]
    fn host_keys_are_logged_without_credentials() {
        assert_eq!(
            without_userinfo("https://u:p@a.example:8443"),
            "https://a.example:8443"
        );
        assert_eq!(without_userinfo("https://a.example"), "https://a.example");
    }

    #[test]
    fn delivery_retries_follow_the_configured_delays_with_jitter_then_stop() {
        let config = WebhookSettings {
            retry_delays: crate::config::Delays(vec![Duration::from_secs(10)]),
            ..crate::config::defaults::webhooks()
        };
        let p = retry_policy(&config);
        let d = p.delay(1).unwrap_or_default();
        assert!(
            d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
            "{d:?}"
        );
        assert_eq!(p.delay(2), None);
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

    fn failing(in_flight: usize, open_until: Option<i64>) -> HostState {
        HostState {
            in_flight,
            consecutive_failures: 1,
            open_until,
        }
    }

    #[test]
    fn the_host_table_stays_within_its_cap_forgetting_closed_idle_hosts_first() {
        let mut t = HostTable::new(10);
        let now = 1_000;
        // Full: 3 busy, 3 with open circuits, 4 closed and idle (failures only).
        for i in 0..3 {
            *t.entry(&format!("busy{i}"), now) = failing(1, None);
            *t.entry(&format!("open{i}"), now) = failing(0, Some(now + 100 * (i + 1)));
        }
        for i in 0..4 {
            *t.entry(&format!("idle{i}"), now) = failing(0, None);
        }
        assert_eq!(t.len(), 10);
        t.entry("new", now).in_flight = 1;
        // Evicted down to 9 before the insert: one closed, idle host went.
        assert_eq!(t.len(), 10);
        assert_eq!(t.hosts.keys().filter(|k| k.starts_with("idle")).count(), 3);
        for k in ["busy0", "busy1", "busy2", "open0", "open1", "open2", "new"] {
            assert!(t.hosts.contains_key(k), "{k} was evicted");
        }
        // Busy newcomers use up the closed, idle hosts, then the circuit reopening soonest.
        for i in 0..4 {
            t.entry(&format!("more{i}"), now).in_flight = 1;
            assert!(t.len() <= 10, "{}", t.len());
        }
        assert_eq!(t.hosts.keys().filter(|k| k.starts_with("idle")).count(), 0);
        assert!(!t.hosts.contains_key("open0"));
        assert!(t.hosts.contains_key("open1") && t.hosts.contains_key("open2"));
        // Hosts with requests in flight are never forgotten, even past the cap.
        for i in 0..5 {
            t.entry(&format!("extra{i}"), now).in_flight = 1;
        }
        assert_eq!(
            t.hosts.values().filter(|h| h.in_flight > 0).count(),
            3 + 1 + 4 + 5
        );
    }

    #[test]
    fn a_host_with_nothing_in_flight_and_no_failures_is_dropped() {
        let mut t = HostTable::new(10);
        t.entry("a", 0).in_flight = 0;
        t.remove_if_idle("a");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn room_leaves_out_saturated_and_open_hosts() {
        let mut t = HostTable::new(10);
        *t.entry("full", 0) = failing(2, None);
        *t.entry("half", 0) = failing(1, None);
        *t.entry("open", 0) = failing(0, Some(50));
        *t.entry("fine", 0) = failing(0, None);
        let mut room = t.room(2, 10).limited;
        room.sort();
        assert_eq!(
            room,
            vec![("full".into(), 0), ("half".into(), 1), ("open".into(), 0)]
        );
        assert_eq!(t.next_reopen(10), Some(50));
        assert!(t.room(2, 50).limited.iter().all(|(h, _)| h != "open"));
    }
}
