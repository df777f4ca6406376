//! Metrics: the one registry of the node and every metric handle in it, rendered by
//! `GET /metrics` (`api/metrics.rs`) in the Prometheus/OpenMetrics text format. docs/metrics.md
//! lists every metric.
//!
//! Counters and histograms live in memory, per node, and are updated where the event happens
//! (the API's submits and cancels, the completer, the deliverer, the HTTP layer). Their
//! histograms have fixed buckets, so memory stays the same whether or not anyone scrapes.
//! Queue depths are the exception: they are cluster-wide, read from the store at scrape time
//! (one grouped count over the `tasks_ready` and `tasks_running_by_model` partial indexes) and
//! cached for [`QUEUE_READ_EVERY`], so a storm of scrapes costs the store one read a second.
//!
//! Labels are bounded by construction: models come from the configuration (handles are made
//! once at start, so a hot path never builds a label set), failCodes and error kinds are mapped
//! onto our own list ([`fail_code_label`]: anything else, e.g. a code an upstream or a pull
//! worker made up, is `other`), HTTP routes are the router's templates. No metric carries a
//! tenant or a task id: that would make the series unbounded and tell a scraper who uses the
//! server.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::domain::fail_code;
use crate::report::error_chain;
use crate::store::Store;

/// How long a read of the queue depths serves scrapes.
pub const QUEUE_READ_EVERY: Duration = Duration::from_secs(1);
/// Longest a scrape waits for the store's counts; then it answers with the last ones.
const QUEUE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The failCodes that are labels of their own; every other code is `other`.
pub const FAIL_CODES: [&str; 9] = [
    fail_code::GENERATION_FAILED,
    fail_code::PROCESSING_TIMEOUT,
    fail_code::ATTEMPTS_EXHAUSTED,
    fail_code::MODEL_UNAVAILABLE,
    fail_code::INVALID_INPUT,
    fail_code::INTERNAL_ERROR,
    fail_code::MODEL_REMOVED,
    fail_code::EXPIRED,
    fail_code::CANCELLED,
];
/// The label of a failCode outside [`FAIL_CODES`].
pub const OTHER: &str = "other";

/// A failCode as a label value: one of ours, else `other`.
pub fn fail_code_label(code: &str) -> &'static str {
    FAIL_CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or(OTHER)
}

fn fail_code_index(code: &str) -> usize {
    FAIL_CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(FAIL_CODES.len())
}

/// Seconds-long waits and runs: 5 ms to an hour.
fn task_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
        3600.0,
    ])
}

/// Request latencies: 0.25 ms to 30 s (a `Prefer: wait` request may take its whole wait).
fn http_buckets() -> Histogram {
    Histogram::new([
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0,
    ])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    model: String,
    state: &'static str,
    fail_code: &'static str,
}

/// A route of a routed model (not an HTTP route): both from the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelRouteLabels {
    model: String,
    route: String,
}

/// One route's handles, resolved when its model's backend is built.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Gauge,
    /// Attempts that left this route for the next one.
    pub failovers: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailCodeLabels {
    fail_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendErrorLabels {
    model: String,
    /// `retryable` or `fatal`: what the backend's error says of itself.
    kind: &'static str,
    fail_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// A route template as a label value, shared with the router's own copy (no allocation per
/// request).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RouteLabel(Arc<str>);

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: RouteLabel,
    status: u16,
}

/// How a webhook attempt (or a turn of the deliverer at a delivery) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Failed; another attempt is scheduled.
    Retrying,
    /// Failed with no attempt left, or a failure retrying cannot help (410, a refused address).
    Failed,
    /// Not attempted: the host was at its limit or its circuit was open.
    Deferred,
}

impl WebhookOutcome {
    const ALL: [WebhookOutcome; 4] = [
        WebhookOutcome::Delivered,
        WebhookOutcome::Retrying,
        WebhookOutcome::Failed,
        WebhookOutcome::Deferred,
    ];

    fn label(self) -> &'static str {
        match self {
            WebhookOutcome::Delivered => "delivered",
            WebhookOutcome::Retrying => "retrying",
            WebhookOutcome::Failed => "failed",
            WebhookOutcome::Deferred => "deferred",
        }
    }
}

/// One configured model's handles, resolved at start.
struct ModelMetrics {
    submitted: Counter,
    succeeded: Counter,
    /// By [`fail_code_index`]: one per [`FAIL_CODES`] entry, then `other`.
    failed: Vec<Counter>,
    queue_wait: Histogram,
    run_time: Histogram,
    submit_to_final: Histogram,
}

/// The node's metrics. One per server, shared as an `Arc`.
pub struct Metrics {
    registry: Registry,
    models: HashMap<String, ModelMetrics>,
    submitted: Family<ModelLabels, Counter>,
    finished: Family<FinishedLabels, Counter>,
    swept: Family<FailCodeLabels, Counter>,
    backend_errors: Family<BackendErrorLabels, Counter>,
    webhook_attempts: [Counter; 4],
    webhook_latency: Histogram,
    pending: Family<ModelLabels, Gauge>,
    running: Family<ModelLabels, Gauge>,
    route_breaker_state: Family<ModelRouteLabels, Gauge>,
    route_failovers: Family<ModelRouteLabels, Counter>,
    queue_read_failures: Counter,
    /// When the queue depths were last read (`None`: never). Held across the read, so that
    /// concurrent scrapes wait for one read instead of each making their own.
    queue_read_at: tokio::sync::Mutex<Option<Instant>>,
    /// Models seen in the store's counts that are not configured, so that their gauges go
    /// back to 0 when their tasks are gone.
    unconfigured_seen: std::sync::Mutex<BTreeSet<String>>,
    pub http: HttpMetrics,
    token: Option<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The registry with every metric, and per-model handles for `models` (each of their
    /// series is exposed from the start, at 0, so `rate()` sees the first increment).
    /// `token`: the bearer token `GET /metrics` requires, if any.
    pub fn new<'a>(models: impl IntoIterator<Item = &'a str>, token: Option<String>) -> Self {
        let mut registry = Registry::with_prefix("taskgate");
        let submitted = Family::<ModelLabels, Counter>::default();
        registry.register(
            "tasks_submitted",
            "Tasks accepted by this node (single submits and each item of a batch), by model",
            submitted.clone(),
        );
        let finished = Family::<FinishedLabels, Counter>::default();
        registry.register(
            "tasks_finished",
            "Tasks this node brought to a final state (an attempt's outcome, or a cancel), by model, state (success|failed) and fail_code (empty on success; unknown codes are `other`)",
            finished.clone(),
        );
        let swept = Family::<FailCodeLabels, Counter>::default();
        registry.register(
            "tasks_swept",
            "Tasks failed by this node's sweeps rather than by an attempt: ATTEMPTS_EXHAUSTED (leases lost until no attempt was left) and EXPIRED (not started before their ttl)",
            swept.clone(),
        );
        let backend_errors = Family::<BackendErrorLabels, Counter>::default();
        registry.register(
            "backend_errors",
            "Failed attempts, by model, kind (retryable|fatal) and fail_code (the backend's own classification: PROCESSING_TIMEOUT a timeout, MODEL_UNAVAILABLE a spawn failure or an unreachable upstream, GENERATION_FAILED a non-zero exit or an upstream's refusal, ...)",
            backend_errors.clone(),
        );
        let attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Callback deliveries taken up by this node's deliverer, by outcome: delivered, retrying (failed, another attempt is scheduled), failed (no attempt left or a permanent failure), deferred (not attempted: host at its limit or circuit open)",
            attempts.clone(),
        );
        let webhook_attempts = WebhookOutcome::ALL
            .map(|o| attempts.get_or_create_owned(&OutcomeLabels { outcome: o.label() }));
        let webhook_latency = task_buckets();
        registry.register_with_unit(
            "webhook_delivery_latency",
            "From a delivery's creation (its task's final state, start or progress) to its successful delivery",
            Unit::Seconds,
            webhook_latency.clone(),
        );
        let pending = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "tasks_pending",
            "Tasks waiting to start, by model, cluster-wide (read from the store, at most 1 s old)",
            pending.clone(),
        );
        let running = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "tasks_running",
            "Tasks running (processing), by model, cluster-wide (read from the store, at most 1 s old)",
            running.clone(),
        );
        let route_breaker_state = Family::<ModelRouteLabels, Gauge>::default();
        registry.register(
            "route_breaker_state",
            "The circuit breaker of each route of a routed model, on this node: 0 closed, 1 open (attempts skip the route), 2 half-open (one probe may try it)",
            route_breaker_state.clone(),
        );
        let route_failovers = Family::<ModelRouteLabels, Counter>::default();
        registry.register(
            "route_failovers",
            "Attempts that left a route of a routed model for the next one (a retryable failure, the route's timeout, or its open breaker), by model and route",
            route_failovers.clone(),
        );
        let queue_read_failures = Counter::default();
        registry.register(
            "queue_read_failures",
            "Scrapes whose read of the queue depths failed or timed out (they showed the last depths read)",
            queue_read_failures.clone(),
        );
        let queue_wait = Family::<ModelLabels, Histogram>::new_with_constructor(
            task_buckets as fn() -> Histogram,
        );
        registry.register_with_unit(
            "task_queue_wait",
            "From a task's creation to the start of its first attempt, by model",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let run_time = Family::<ModelLabels, Histogram>::new_with_constructor(
            task_buckets as fn() -> Histogram,
        );
        registry.register_with_unit(
            "task_run",
            "From an attempt's start to its outcome, each attempt, by model",
            Unit::Seconds,
            run_time.clone(),
        );
        let submit_to_final = Family::<ModelLabels, Histogram>::new_with_constructor(
            task_buckets as fn() -> Histogram,
        );
        registry.register_with_unit(
            "task_submit_to_final",
            "From a task's creation to its final state, by model",
            Unit::Seconds,
            submit_to_final.clone(),
        );
        let http = HttpMetrics::new(&mut registry);

        let models = models
            .into_iter()
            .map(|m| {
                let by_model = ModelLabels {
                    model: m.to_owned(),
                };
                let finished_as = |state: &'static str, fail_code: &'static str| {
                    finished.get_or_create_owned(&FinishedLabels {
                        model: m.to_owned(),
                        state,
                        fail_code,
                    })
                };
                let handles = ModelMetrics {
                    submitted: submitted.get_or_create_owned(&by_model),
                    succeeded: finished_as("success", ""),
                    failed: FAIL_CODES
                        .iter()
                        .chain(std::iter::once(&OTHER))
                        .map(|code| finished_as("failed", code))
                        .collect(),
                    queue_wait: queue_wait.get_or_create_owned(&by_model),
                    run_time: run_time.get_or_create_owned(&by_model),
                    submit_to_final: submit_to_final.get_or_create_owned(&by_model),
                };
                pending.get_or_create(&by_model).set(0);
                running.get_or_create(&by_model).set(0);
                (m.to_owned(), handles)
            })
            .collect();
        Metrics {
            registry,
            models,
            submitted,
            finished,
            swept,
            backend_errors,
            webhook_attempts,
            webhook_latency,
            pending,
            running,
            route_breaker_state,
            route_failovers,
            queue_read_failures,
            queue_read_at: tokio::sync::Mutex::new(None),
            unconfigured_seen: std::sync::Mutex::new(BTreeSet::new()),
            http,
            token,
        }
    }

    /// The bearer token `GET /metrics` requires, if one is set.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The handles of route `route` of `model`, made once when the model's backend is built
    /// (its series show from the start).
    pub fn route_handles(&self, model: &str, route: &str) -> RouteMetrics {
        let labels = ModelRouteLabels {
            model: model.to_owned(),
            route: route.to_owned(),
        };
        RouteMetrics {
            breaker_state: self.route_breaker_state.get_or_create_owned(&labels),
            failovers: self.route_failovers.get_or_create_owned(&labels),
        }
    }

    /// `n` tasks of `model` were accepted.
    pub fn submitted(&self, model: &str, n: usize) {
        match self.models.get(model) {
            Some(m) => m.submitted.inc_by(n as u64),
            // Submits name a configured model; kept for completeness.
            None => self
                .submitted
                .get_or_create(&ModelLabels {
                    model: model.to_owned(),
                })
                .inc_by(n as u64),
        };
    }

    /// An attempt of `model` started (its claim): the queue wait of a first attempt.
    pub fn started(&self, model: &str, attempt: u32, create_time: i64, start_time: Option<i64>) {
        if attempt != 1 {
            return;
        }
        if let (Some(m), Some(start)) = (self.models.get(model), start_time) {
            m.queue_wait.observe(seconds_between(create_time, start));
        }
    }

    /// An attempt of `model` ended, `run` after it started.
    pub fn attempt_ended(&self, model: &str, run: Duration) {
        if let Some(m) = self.models.get(model) {
            m.run_time.observe(run.as_secs_f64());
        }
    }

    /// A backend (or a pull worker) reported a failed attempt.
    pub fn backend_error(&self, model: &str, retryable: bool, code: &str) {
        self.backend_errors
            .get_or_create(&BackendErrorLabels {
                model: model.to_owned(),
                kind: if retryable { "retryable" } else { "fatal" },
                fail_code: fail_code_label(code),
            })
            .inc();
    }

    /// A task of `model` reached its final state at `now`: success, or failed with
    /// `fail_code`.
    pub fn finished(&self, model: &str, fail_code: Option<&str>, create_time: i64, now: i64) {
        match self.models.get(model) {
            Some(m) => {
                match fail_code {
                    None => m.succeeded.inc(),
                    Some(code) => m.failed[fail_code_index(code)].inc(),
                };
                m.submit_to_final.observe(seconds_between(create_time, now));
            }
            // A model no longer configured (a task cancelled after its removal).
            None => {
                self.finished
                    .get_or_create(&FinishedLabels {
                        model: model.to_owned(),
                        state: if fail_code.is_some() {
                            "failed"
                        } else {
                            "success"
                        },
                        fail_code: fail_code.map(fail_code_label).unwrap_or(""),
                    })
                    .inc();
            }
        }
    }

    /// `n` tasks were failed with `fail_code` by a sweep.
    pub fn swept(&self, fail_code: &str, n: usize) {
        if n > 0 {
            self.swept
                .get_or_create(&FailCodeLabels {
                    fail_code: fail_code_label(fail_code),
                })
                .inc_by(n as u64);
        }
    }

    /// A delivery's turn ended with `outcome`; `created_at` is the delivery row's creation
    /// (Unix ms), for the latency of a delivered one.
    pub fn webhook(&self, outcome: WebhookOutcome, created_at: i64, now: i64) {
        self.webhook_attempts[outcome as usize].inc();
        if outcome == WebhookOutcome::Delivered {
            self.webhook_latency
                .observe(seconds_between(created_at, now));
        }
    }

    /// The text exposition, with queue depths at most [`QUEUE_READ_EVERY`] old (read from
    /// `store` when older). A failed read is logged and counted, and the last depths are shown:
    /// metrics matter most while something is wrong.
    pub async fn render(&self, store: &dyn Store) -> String {
        {
            let mut read_at = self.queue_read_at.lock().await;
            if read_at.is_none_or(|at| at.elapsed() >= QUEUE_READ_EVERY) {
                let read = tokio::time::timeout(QUEUE_READ_TIMEOUT, store.queue_depths()).await;
                // A failed or slow read counts as a read too: the next scrape within
                // QUEUE_READ_EVERY shows the last depths rather than starting another count.
                *read_at = Some(Instant::now());
                match read {
                    Ok(Ok(depths)) => self.set_depths(depths),
                    Ok(Err(e)) => {
                        self.queue_read_failures.inc();
                        tracing::warn!(error = %error_chain(&e), "metrics: cannot read the queue depths; showing the last ones");
                    }
                    Err(_) => {
                        self.queue_read_failures.inc();
                        tracing::warn!(
                            "metrics: reading the queue depths timed out; showing the last ones"
                        );
                    }
                }
            }
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn set_depths(&self, depths: Vec<crate::store::QueueDepth>) {
        let mut seen = self
            .unconfigured_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut zero: BTreeSet<String> = seen.clone();
        zero.extend(self.models.keys().cloned());
        for d in depths {
            zero.remove(&d.model);
            if !self.models.contains_key(&d.model) {
                seen.insert(d.model.clone());
            }
            let labels = ModelLabels { model: d.model };
            self.pending
                .get_or_create(&labels)
                .set(i64::try_from(d.pending).unwrap_or(i64::MAX));
            self.running
                .get_or_create(&labels)
                .set(i64::try_from(d.processing).unwrap_or(i64::MAX));
        }
        for model in zero {
            let labels = ModelLabels { model };
            self.pending.get_or_create(&labels).set(0);
            self.running.get_or_create(&labels).set(0);
        }
    }
}

/// `to - from` (Unix ms) in seconds; 0 when the clocks that stamped them disagree.
fn seconds_between(from: i64, to: i64) -> f64 {
    (to.saturating_sub(from).max(0)) as f64 / 1000.0
}

/// The route label of a request no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// HTTP requests by route and status, and their latency by route. The HTTP layer
/// (`api/metrics.rs`) finds a route's handles with one read lock and one lookup of the
/// template; a route's first request (and a status first seen on it) makes them.
pub struct HttpMetrics {
    requests: Family<RouteStatusLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    routes: RwLock<HashMap<Arc<str>, Arc<RouteHandles>>>,
}

/// One route's handles.
pub struct RouteHandles {
    route: Arc<str>,
    latency: Histogram,
    /// By status; a route answers a handful of statuses, so a scan beats a hash.
    statuses: RwLock<Vec<(u16, Counter)>>,
    requests: Family<RouteStatusLabels, Counter>,
}

impl HttpMetrics {
    fn new(registry: &mut Registry) -> Self {
        let requests = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route (the matched route template; `unmatched` for every path no route serves) and status",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            http_buckets as fn() -> Histogram,
        );
        registry.register_with_unit(
            "http_request_duration",
            "From a request reaching its route to its response's head, by route (a stream's body is not included)",
            Unit::Seconds,
            duration.clone(),
        );
        HttpMetrics {
            requests,
            duration,
            routes: RwLock::new(HashMap::new()),
        }
    }

    /// The handles of `route` (a template, or [`UNMATCHED_ROUTE`]). (Not named `route`:
    /// tests/it/openapi.rs reads every `.route(` of this crate as a route registered.)
    pub fn handles_of(&self, route: &str) -> Arc<RouteHandles> {
        if let Some(h) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
        {
            return h.clone();
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(Arc::from(route))
            .or_insert_with_key(|key| {
                Arc::new(RouteHandles {
                    route: key.clone(),
                    latency: self.duration.get_or_create_owned(&RouteLabels {
                        route: RouteLabel(key.clone()),
                    }),
                    statuses: RwLock::new(Vec::new()),
                    requests: self.requests.clone(),
                })
            })
            .clone()
    }
}

impl RouteHandles {
    /// A request of this route was answered with `status`, `elapsed` after it arrived.
    pub fn answered(&self, status: u16, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
        {
            let statuses = self.statuses.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, c)) = statuses.iter().find(|(s, _)| *s == status) {
                c.inc();
                return;
            }
        }
        let mut statuses = self.statuses.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = statuses.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let counter = self.requests.get_or_create_owned(&RouteStatusLabels {
            route: RouteLabel(self.route.clone()),
            status,
        });
        counter.inc();
        statuses.push((status, counter));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_fail_code_outside_our_list_is_other() {
        assert_eq!(fail_code_label("CANCELLED"), "CANCELLED");
        assert_eq!(fail_code_label("UPSTREAM_SAYS_\"}{\n"), "other");
        assert_eq!(fail_code_index("nope"), FAIL_CODES.len());
    }

    #[test]
    fn configured_models_are_exposed_at_zero_and_counted_once_resolved() {
        let m = Metrics::new(["echo"], None);
        m.submitted("echo", 3);
        m.finished("echo", Some("made-up code"), 0, 1500);
        let text = prometheus_client_text(&m);
        assert!(
            text.contains("taskgate_tasks_submitted_total{model=\"echo\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("taskgate_tasks_finished_total{model=\"echo\",state=\"failed\",fail_code=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "taskgate_tasks_finished_total{model=\"echo\",state=\"success\",fail_code=\"\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("taskgate_tasks_pending{model=\"echo\"} 0"),
            "{text}"
        );
    }

    fn prometheus_client_text(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        out
    }
}
