//! Dispatch: starts pending tasks as soon as their model has capacity, runs each attempt, and
//! settles its outcome. Split the way River splits a queue, one job per part:
//!
//! - [`producer`]: one loop per local model claims due tasks in batches as permits free up;
//!   pull workers' long-polls claim through the same code.
//! - [`attempt`]: runs one attempt in a directory no other attempt uses, under the model's
//!   timeout, renewing its lease, and stages its outputs under the attempt's own tag.
//! - [`completer`]: settles an outcome, wherever the attempt ran: the token-guarded final
//!   write (which is what publishes staged outputs), or a requeue with the retry policy's delay.
//!   A write that fails is retried until it lands or the lease is lost, and the caller is told
//!   which.
//! - [`maintenance`]: the one owner of recovery: the start-up pass (attempts of a dead process,
//!   models no longer offered, scratch directories of nodes that are gone) and the periodic
//!   lease sweeps of tasks and webhook deliveries.
//! - [`running`]: the attempts running on this node, so that a cancelled task's attempt is
//!   stopped at once ([`Dispatcher::cancel_running`]) once its final state is written.
//! - [`reports`]: stores what a running local attempt reports (progress, log lines),
//!   throttled, beside it.
//!
//! Concurrency model: each model's loop holds a semaphore of `concurrency` permits; each claimed
//! task runs in its own tokio task, which owns its permit. Shutdown stops the loops, gives
//! running attempts a grace period, then interrupts the rest and puts them back to pending
//! without counting the attempt.

mod attempt;
mod completer;
pub mod maintenance;
mod producer;
mod reports;
mod running;

pub use attempt::collect_files;
pub use completer::Settled;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use crate::artifacts::ArtifactStore;
use crate::backends::Backend;
use crate::config::{InputSchema, ModelConfig};
use crate::events::TaskEvents;
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::views::TaskViews;

pub struct ModelRuntime {
    pub name: String,
    pub config: ModelConfig,
    pub backend: Arc<dyn Backend>,
    /// Checked at submit before the backend's own `validate`; compiled once at start.
    pub input_schema: Option<Arc<InputSchema>>,
    notify: Notify,
    permits: Arc<Semaphore>,
}

impl ModelRuntime {
    pub fn new(name: String, config: ModelConfig, backend: Arc<dyn Backend>) -> Self {
        let permits = Arc::new(Semaphore::new(config.concurrency));
        ModelRuntime {
            name,
            config,
            backend,
            input_schema: None,
            notify: Notify::new(),
            permits,
        }
    }

    /// The same model, with submits checked against `schema`.
    pub fn with_input_schema(mut self, schema: Option<Arc<InputSchema>>) -> Self {
        self.input_schema = schema;
        self
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    artifacts: Arc<dyn ArtifactStore>,
    models: BTreeMap<String, Arc<ModelRuntime>>,
    /// This node's scratch space: attempts' directories and uploads in progress.
    work_dir: PathBuf,
    work_dirs: attempt::WorkDirs,
    retry: RetryPolicy,
    lease: Duration,
    /// Wakes the webhook deliverer when a callback task reaches its final state.
    webhook_wake: Arc<Notify>,
    /// Stops claiming.
    stop: CancellationToken,
    /// Interrupts running attempts (after the grace period).
    interrupt: CancellationToken,
    tracker: TaskTracker,
    /// Cached status views: a claimed task's pending view is forgotten here.
    views: TaskViews,
    /// Requests waiting on tasks: nudged after every change the dispatcher writes.
    events: TaskEvents,
    /// This node's running local attempts, for cancels.
    running: running::Running,
    /// Attempts of each task put back uncounted for want of space on this node
    /// (`attempt::defer_for_space`), so a disk that looks full forever cannot keep a task from
    /// ending. Forgotten when the task's next attempt is settled; cleared if it grows large.
    deferred: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    metrics: Arc<Metrics>,
}

/// What the dispatcher shares with the rest of the node.
pub struct Shared {
    /// Wakes the webhook deliverer.
    pub webhook_wake: Arc<Notify>,
    /// The API's cached status views.
    pub views: TaskViews,
    /// Requests waiting on tasks (`Prefer: wait`, streams).
    pub events: TaskEvents,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        artifacts: Arc<dyn ArtifactStore>,
        models: BTreeMap<String, Arc<ModelRuntime>>,
        work_dir: PathBuf,
        retry: RetryPolicy,
        lease: Duration,
        shared: Shared,
    ) -> Arc<Self> {
        let Shared {
            webhook_wake,
            views,
            events,
            metrics,
        } = shared;
        Arc::new(Dispatcher {
            store,
            artifacts,
            models,
            work_dirs: attempt::WorkDirs::new(work_dir.clone()),
            work_dir,
            retry,
            lease,
            webhook_wake,
            stop: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            tracker: TaskTracker::new(),
            views,
            events,
            running: running::Running::default(),
            deferred: Default::default(),
            metrics,
        })
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelRuntime>> {
        self.models.get(name)
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelRuntime>> {
        self.models.values()
    }

    /// Wakes the loop of `model`: a task may be ready.
    pub fn notify(&self, model: &str) {
        if let Some(m) = self.models.get(model) {
            m.notify.notify_one();
        }
    }

    fn notify_all(&self) {
        for m in self.models.values() {
            m.notify.notify_one();
        }
    }

    /// How long a claim lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn artifacts(&self) -> &Arc<dyn ArtifactStore> {
        &self.artifacts
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Who waits on which task; writers outside the dispatcher (the worker API's progress) nudge
    /// it too.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn events(&self) -> &TaskEvents {
        &self.events
    }

    /// Whether shutdown has begun: nothing more is claimed.
    pub fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when shutdown begins: requests that wait on tasks answer then, so they do not
    /// hold up the drain.
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Starts one loop per local model and the maintenance sweeps.
    pub fn start(self: &Arc<Self>) {
        for model in self.models.values().filter(|m| m.backend.runs_locally()) {
            let this = self.clone();
            let model = model.clone();
            self.tracker.spawn(
                async move { this.model_loop(model).await }.instrument(info_span!("dispatch")),
            );
        }
        let this = self.clone();
        self.tracker
            .spawn(async move { maintenance::sweep_leases(this).await });
        let this = self.clone();
        self.tracker
            .spawn(async move { maintenance::expire_tasks(this).await });
    }

    /// Stops this node's attempts of a task whose cancel has been written (the store's write
    /// comes first: it is what makes the cancel durable, even when the node running the attempt
    /// is dead). The attempt drops its backend at once, writes nothing and takes back what it
    /// staged. Returns how many attempts were stopped here; a cancel that finds none is
    /// remembered for a lease, in case the attempt has not registered yet.
    pub fn cancel_running(&self, task_id: &str) -> usize {
        self.running.cancel(task_id, self.lease)
    }

    /// Stops claiming (local loops and pull workers' long-polls answer at once); called as soon
    /// as shutdown begins, so that open long-polls do not hold up the HTTP drain.
    pub fn stop_claiming(&self) {
        self.stop.cancel();
    }

    /// Stops claiming, waits up to `grace` for running attempts, then interrupts the rest, which
    /// go back to pending for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(grace = %humantime::format_duration(grace), "grace period over; interrupting running tasks, they stay pending");
            self.interrupt.cancel();
            self.tracker.wait().await;
        }
    }
}
