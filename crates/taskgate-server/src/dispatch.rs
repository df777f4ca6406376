//! Dispatch: starts pending tasks as soon as their model has capacity, runs each attempt on its
//! backend, and writes the outcome.
//!
//! Concurrency model: one loop per model holds a semaphore of `concurrency` permits. It takes a
//! permit, then claims a task; with no task due it sleeps until notified (a submit, a shutdown),
//! until the next retry is due, or for a long safety interval. Each claimed task runs in its own
//! tokio task, which owns the permit, renews its lease while it runs, and writes the outcome
//! guarded by its attempt token. Shutdown stops the loops, gives running attempts a grace
//! period, then interrupts the rest and puts them back to pending without counting the attempt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::artifacts::{sanitize_name, ArtifactStore};
use crate::backends::{Backend, BackendError, Job};
use crate::config::ModelConfig;
use crate::domain::{fail_code, now_ms};
use crate::store::{Claim, Outcome, Store};

/// How long a claim lasts without renewal, by default; renewed every third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Most tasks one claim takes.
const CLAIM_BATCH: usize = 32;
/// Safety net for a missed wake-up; notifications are the main path.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

pub struct ModelRuntime {
    pub name: String,
    pub config: ModelConfig,
    pub backend: Arc<dyn Backend>,
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
            notify: Notify::new(),
            permits,
        }
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    artifacts: Arc<dyn ArtifactStore>,
    models: BTreeMap<String, Arc<ModelRuntime>>,
    work_dir: PathBuf,
    work_dirs: WorkDirs,
    retry_backoff: Vec<Duration>,
    lease: Duration,
    /// Wakes the webhook deliverer when a callback task reaches its final state.
    webhook_wake: Arc<Notify>,
    /// Stops claiming.
    stop: CancellationToken,
    /// Interrupts running attempts (after the grace period).
    interrupt: CancellationToken,
    tracker: TaskTracker,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        artifacts: Arc<dyn ArtifactStore>,
        models: BTreeMap<String, Arc<ModelRuntime>>,
        work_dir: PathBuf,
        retry_backoff: Vec<Duration>,
        lease: Duration,
        webhook_wake: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            artifacts,
            models,
            work_dirs: WorkDirs::new(work_dir.clone()),
            work_dir,
            retry_backoff,
            lease,
            webhook_wake,
            stop: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            tracker: TaskTracker::new(),
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

    /// Claims a task of one of `models` for a pull worker, waiting up to `wait` for one to
    /// become due (woken by submits and by other nodes' notifications, like the local loops).
    pub async fn claim_for_worker(
        &self,
        models: &[Arc<ModelRuntime>],
        wait: Duration,
    ) -> Result<Option<(Arc<ModelRuntime>, Claim)>, crate::store::StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = now_ms();
            let mut next_due: Option<i64> = None;
            for m in models {
                if let Some(c) = self
                    .store
                    .claim(&m.name, now, self.lease, m.config.concurrency)
                    .await?
                {
                    return Ok(Some((m.clone(), c)));
                }
                if let Some(due) = self.store.next_due(&m.name).await? {
                    next_due = Some(next_due.map_or(due, |d: i64| d.min(due)));
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() || self.stop.is_cancelled() {
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

    /// Starts one loop per model and the lease sweeper.
    pub fn start(self: &Arc<Self>) {
        for model in self.models.values().filter(|m| m.backend.runs_locally()) {
            let this = self.clone();
            let model = model.clone();
            self.tracker.spawn(
                async move { this.model_loop(model).await }.instrument(info_span!("dispatch")),
            );
        }
        let this = self.clone();
        self.tracker.spawn(async move { this.sweep_leases().await });
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

    async fn model_loop(self: Arc<Self>, model: Arc<ModelRuntime>) {
        loop {
            let first = tokio::select! {
                p = model.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = self.stop.cancelled() => return,
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
            match self
                .store
                .claim_batch(
                    &model.name,
                    now,
                    self.lease,
                    model.config.concurrency,
                    permits.len(),
                )
                .await
            {
                Ok(claims) if !claims.is_empty() => {
                    for (claim, permit) in claims.into_iter().zip(permits) {
                        let this = self.clone();
                        let model = model.clone();
                        let span = info_span!("task", task_id = %claim.task.id, model = %model.name, attempt = claim.task.attempts);
                        self.tracker.spawn(
                            async move {
                                this.run_attempt(&model, claim).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                }
                Ok(_) => {
                    drop(permits);
                    let wait = match self.store.next_due(&model.name).await {
                        Ok(Some(due)) if due > now => {
                            Duration::from_millis((due - now).min(30_000) as u64)
                        }
                        // Due work but no claim: the model is at its concurrency on other nodes,
                        // whose completions will notify us.
                        Ok(Some(_)) | Ok(None) => IDLE_RECHECK,
                        Err(e) => {
                            error!(error = %crate::error::error_chain(&e), model = %model.name, "cannot read the queue");
                            Duration::from_secs(1)
                        }
                    };
                    tokio::select! {
                        _ = model.notify.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    drop(permits);
                    error!(error = %crate::error::error_chain(&e), model = %model.name, "cannot claim a task; retrying in 1s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Hands on tasks whose holder stopped renewing (a node that died, in a cluster).
    async fn sweep_leases(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease) => {}
                _ = self.stop.cancelled() => return,
            }
            match self.store.recover_expired(now_ms()).await {
                Ok(r) => {
                    if !r.requeued.is_empty() || !r.failed.is_empty() {
                        warn!(
                            requeued = r.requeued.len(),
                            failed = r.failed.len(),
                            "recovered tasks with expired leases"
                        );
                        for m in self.models.keys() {
                            self.notify(m);
                        }
                        self.webhook_wake.notify_one();
                    }
                }
                Err(e) => error!(error = %crate::error::error_chain(&e), "lease sweep failed"),
            }
        }
    }

    async fn run_attempt(&self, model: &ModelRuntime, claim: Claim) {
        let task = &claim.task;
        let output_dir = match self.work_dirs.take().await {
            Ok(d) => d,
            Err(e) => {
                let err = BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("cannot create an output directory: {e}"),
                );
                self.settle(&model.name, &claim, Err(err), Duration::ZERO)
                    .await;
                return;
            }
        };
        let job = Job {
            task_id: task.id.clone(),
            model: model.name.clone(),
            input: task.input.clone(),
            attempt: task.attempts,
            output_dir: output_dir.clone(),
        };
        info!("started");
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = self.execute(model, &job) => r,
            lost = self.keep_lease(&claim) => {
                // Another node owns the task now; whatever we produced is not ours to write.
                warn!(lost, "claim lost while running; abandoning the attempt");
                self.work_dirs.give_back(output_dir).await;
                return;
            }
            _ = self.interrupt.cancelled() => {
                self.work_dirs.give_back(output_dir).await;
                match self.store.requeue(&task.id, &claim.token, now_ms(), true).await {
                    Ok(_) => info!("interrupted by shutdown; left pending"),
                    // The lease will expire and hand the task on at the next start.
                    Err(e) => error!(error = %crate::error::error_chain(&e), "cannot requeue interrupted task"),
                }
                return;
            }
        };
        self.work_dirs.give_back(output_dir).await;
        self.settle(&model.name, &claim, result, started.elapsed())
            .await;
    }

    /// Acts on how an attempt ended, wherever it ran (here or on a pull worker): success and
    /// fatal errors end the task; a retryable error runs it again after the backoff while
    /// attempts remain. Returns whether the claim was still ours.
    pub async fn settle(
        &self,
        model: &str,
        claim: &Claim,
        result: Result<Vec<String>, BackendError>,
        elapsed: Duration,
    ) -> bool {
        let task = &claim.task;
        let outcome = match result {
            Ok(outputs) => Outcome::Success { outputs },
            Err(BackendError::Retryable { code, message }) if task.attempts < task.max_attempts => {
                let delay = self
                    .retry_backoff
                    .get(task.attempts as usize - 1)
                    .or(self.retry_backoff.last())
                    .copied()
                    .unwrap_or(Duration::from_secs(1));
                warn!(%code, %message, retry_in = %humantime::format_duration(delay), "attempt failed; will retry");
                let run_after = now_ms() + delay.as_millis() as i64;
                return match self
                    .store
                    .requeue(&task.id, &claim.token, run_after, false)
                    .await
                {
                    Ok(ours) => {
                        self.notify(model);
                        ours
                    }
                    Err(e) => {
                        error!(error = %crate::error::error_chain(&e), "cannot requeue task; its lease will expire and hand it on");
                        true
                    }
                };
            }
            Err(BackendError::Retryable { code, message }) => Outcome::Failure {
                code,
                message: format!("{message} (gave up after {} attempts)", task.attempts),
            },
            Err(BackendError::Fatal { code, message }) => Outcome::Failure { code, message },
        };
        let ours = self.write_outcome(claim, &outcome, elapsed).await;
        // A slot of the model is free: a pull worker waiting on it may claim now.
        self.notify(model);
        ours
    }

    /// Runs the backend within the model's timeout and moves its outputs into the artifact store.
    async fn execute(&self, model: &ModelRuntime, job: &Job) -> Result<Vec<String>, BackendError> {
        let internal = |what: &str, e: std::io::Error| {
            BackendError::retryable(fail_code::INTERNAL_ERROR, format!("{what}: {e}"))
        };
        let timeout = model.config.timeout;
        match tokio::time::timeout(timeout, model.backend.run(job)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(BackendError::fatal(
                    fail_code::PROCESSING_TIMEOUT,
                    format!(
                        "the task ran longer than model {}'s timeout of {}",
                        model.name,
                        humantime::format_duration(timeout)
                    ),
                ))
            }
        }
        let files = collect_files(&job.output_dir)
            .await
            .map_err(|e| internal("cannot read the output directory", e))?;
        if files.is_empty() {
            return Err(BackendError::no_output());
        }
        let mut keys = Vec::with_capacity(files.len());
        let mut used = std::collections::HashSet::new();
        for (relative, path) in files {
            let mut name = sanitize_name(&relative);
            while !used.insert(name.clone()) {
                name = format!("_{name}");
            }
            let key = format!("{}/{name}", job.task_id);
            self.artifacts.put_file(&key, &path).await.map_err(|e| {
                BackendError::retryable(fail_code::INTERNAL_ERROR, crate::error::error_chain(&e))
            })?;
            keys.push(key);
        }
        Ok(keys)
    }

    /// Renews the lease until it is lost; returns only then (with how it was lost).
    async fn keep_lease(&self, claim: &Claim) -> &'static str {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.lease / 3).await;
            match self
                .store
                .renew_lease(
                    &claim.task.id,
                    &claim.token,
                    now_ms() + self.lease.as_millis() as i64,
                    None,
                )
                .await
            {
                Ok(true) => failures = 0,
                Ok(false) => return "taken over",
                Err(e) => {
                    failures += 1;
                    warn!(error = %crate::error::error_chain(&e), "cannot renew lease");
                    if failures >= 2 {
                        return "could not renew";
                    }
                }
            }
        }
    }

    async fn write_outcome(&self, claim: &Claim, outcome: &Outcome, elapsed: Duration) -> bool {
        // A failed write leaves the task processing; its lease then expires and hands it on, so
        // nothing is lost. Retry a few times first, to spare the task a rerun.
        for attempt in 0..5u32 {
            match self
                .store
                .finish(&claim.task.id, &claim.token, outcome, now_ms())
                .await
            {
                Ok(true) => {
                    if claim.task.callback_url.is_some() {
                        self.webhook_wake.notify_one();
                    }
                    match outcome {
                        Outcome::Success { outputs } => {
                            info!(
                                outputs = outputs.len(),
                                elapsed_ms = elapsed.as_millis() as u64,
                                "succeeded"
                            )
                        }
                        Outcome::Failure { code, message } => {
                            info!(%code, %message, elapsed_ms = elapsed.as_millis() as u64, "failed")
                        }
                    }
                    return true;
                }
                Ok(false) => {
                    warn!("the task was handed on before this attempt finished; outcome dropped");
                    return false;
                }
                Err(e) => {
                    error!(error = %crate::error::error_chain(&e), "cannot write the outcome");
                    tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
                }
            }
        }
        true
    }
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove work directory"),
    }
}

/// Every regular file under `dir`; also used by `taskgate worker` for its outputs, with its path relative to `dir` (`a/b.png` → `a_b.png` later).
///
/// One blocking call walks the whole tree: each `tokio::fs` step would be a thread hop of its own,
/// and per-task hops are what bounds the drain rate.
pub async fn collect_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let ft = entry.file_type()?;
                let path = entry.path();
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() {
                    let rel = path
                        .strip_prefix(&dir)
                        .map(|p| p.to_string_lossy().replace('/', "_"))
                        .unwrap_or_else(|_| entry.file_name().to_string_lossy().into_owned());
                    out.push((rel, path));
                }
            }
        }
        out.sort();
        Ok(out)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Empty output directories, reused across attempts. A directory made and removed per attempt
/// costs an inode allocation each time, and on ext4 (which scans for recently deleted inodes)
/// that was the largest single cost of a short task.
struct WorkDirs {
    root: PathBuf,
    free: std::sync::Mutex<Vec<PathBuf>>,
    next: std::sync::atomic::AtomicU64,
}

impl WorkDirs {
    fn new(root: PathBuf) -> Self {
        WorkDirs {
            root,
            free: std::sync::Mutex::new(Vec::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// An empty directory for one attempt.
    async fn take(&self) -> std::io::Result<PathBuf> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(dir) = reused {
            return Ok(dir);
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.root.join(format!("slot-{n}"));
        fresh_dir(&dir).await?;
        Ok(dir)
    }

    /// Empties `dir` (outputs were moved out already unless the attempt failed) and keeps it for
    /// the next attempt; one that cannot be emptied is removed instead.
    async fn give_back(&self, dir: PathBuf) {
        let target = dir.clone();
        let emptied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for entry in std::fs::read_dir(&target)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                } else {
                    std::fs::remove_file(entry.path())?;
                }
            }
            Ok(())
        })
        .await;
        match emptied {
            Ok(Ok(())) => self
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(dir),
            _ => remove_dir(&dir).await,
        }
    }
}

/// Removes `dir` if present and creates it empty, in one blocking call.
async fn fresh_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)
    })
    .await
    .map_err(std::io::Error::other)?
}
