//! One local attempt: an output directory that nothing else can write into, the backend under
//! the model's timeout, lease renewals beside it, and outputs staged under the attempt's own tag.
//!
//! The directory is either fresh, or one a previous attempt left *proven empty and unreachable*:
//! that attempt's `run` returned (was not dropped by a timeout, a shutdown or a lost lease), its
//! backend is one whose writes all end with `run` (`Backend::writes_end_with_run`: the builtins
//! and http, not a program that may leave descendants), and the directory was emptied and found
//! empty. Every other directory is removed and never used again, so a late writer (a write that
//! cannot be cancelled, a descendant that outlived its process tree) writes where nobody reads.
//! Reuse matters: creating a directory per attempt costs an inode allocation, which on ext4 was
//! the largest cost of a short task. Staged outputs become the task's outputs only through the
//! completer's token-guarded write; an attempt that failed, lost its claim or was cancelled
//! deletes what it staged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::completer::{Settled, FIRST_WRITE_PAUSE};
use super::{Dispatcher, ModelRuntime};
use crate::artifacts::{output_names, staged_key};
use crate::backends::{BackendError, Job, Produced, Progress};
use crate::domain::{attempt_tag, fail_code, now_ms};
use crate::report::error_chain;
use crate::store::{Blob, Claim};

/// Free space in the data dir's file system below which a failed attempt is deferred rather
/// than counted ([`Dispatcher::disk_full`]): room for a few pages of SQLite and a small output.
const LOW_SPACE: u64 = 1 << 20;

/// How many attempts of one task a node puts back uncounted for want of space, their delays
/// following the retry schedule (with the default one, about nine minutes of full disk). Past
/// it attempts count again: free space is read as an unprivileged user sees it, so a disk
/// that keeps root's reserved blocks can look full for good, and a task that fails for its own
/// reasons must still end.
const MAX_DEFERRALS: u32 = 20;

/// Longest pause between two tries of putting a deferred task back.
const DEFER_WRITE_PAUSE: Duration = Duration::from_millis(250);

/// Failures that say nothing about the disk: they are counted whatever the free space.
fn unrelated_to_space(e: &BackendError) -> bool {
    matches!(
        e.code(),
        fail_code::PROCESSING_TIMEOUT
            | fail_code::INVALID_INPUT
            | fail_code::CANCELLED
            | fail_code::EXPIRED
            | fail_code::MODEL_REMOVED
    )
}

/// When the attempt's lease ends, as far as this process knows: moved on by every renewal.
pub(super) struct LeaseDeadline(Mutex<Instant>);

impl LeaseDeadline {
    pub(super) fn starting_now(lease: Duration) -> Self {
        LeaseDeadline(Mutex::new(Instant::now() + lease))
    }

    pub(super) fn get(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn renewed_at(&self, at: Instant, lease: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at + lease;
    }
}

impl Dispatcher {
    pub(super) async fn run_attempt(&self, model: &ModelRuntime, claim: Claim) {
        // Registered before anything else, so that a cancel that committed right after the claim
        // finds it (or was remembered for it).
        let registration = self
            .running
            .register(&claim.task.id, &claim.token, self.lease);
        if registration.cancelled.is_cancelled() {
            info!("cancelled before it started");
            return;
        }
        let lease = LeaseDeadline::starting_now(self.lease);
        let tag = attempt_tag(&claim.token);
        let input = match claim.task.parse_input() {
            Ok(input) => input,
            Err(message) => {
                let err = BackendError::fatal(fail_code::INTERNAL_ERROR, message);
                self.settle(&model.name, &claim, Err(err), Duration::ZERO, lease.get())
                    .await;
                return;
            }
        };
        // Backends that answer in memory get no directory: a no-op task touches no file.
        let dir = if model.backend.needs_output_dir() {
            match self.work_dirs.take().await {
                Ok(d) => Some(d),
                Err(e) => {
                    let err = BackendError::retryable(
                        fail_code::INTERNAL_ERROR,
                        format!("cannot create an output directory: {e}"),
                    );
                    if let Some(n) = self.next_deferral(&claim.task.id, self.disk_full().await) {
                        self.defer_for_space(&model.name, &claim, &err, n).await;
                        return;
                    }
                    self.settle(&model.name, &claim, Err(err), Duration::ZERO, lease.get())
                        .await;
                    return;
                }
            }
        } else {
            None
        };
        let job = Job {
            task_id: claim.task.id.clone(),
            model: model.name.clone(),
            input,
            attempt: claim.task.attempts,
            output_dir: dir.clone(),
            progress: Progress::new(),
            route: Default::default(),
        };
        // Stores what the backend reports while it runs; dropped (stopped) on every early
        // return below.
        let reports = model
            .backend
            .reports()
            .then(|| self.start_reports(&claim, &job.progress));
        // Keys handed to the artifact store so far, so that an attempt that loses its claim
        // mid-way can take back what it staged.
        let staged = Arc::new(Mutex::new(Vec::new()));
        // Set once the backend's `run` has returned rather than been dropped.
        let returned = AtomicBool::new(false);
        debug!("started");
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = self.execute(model, &job, &tag, &staged, &returned) => r,
            lost = self.keep_lease(&claim, &lease) => {
                // Another runner owns the task now, or it was cancelled (a cancel whose notice
                // never reached this node): whatever we produced is not ours to publish.
                // Returning drops the backend's future, which stops it.
                warn!(lost, "claim lost while running; abandoning the attempt");
                self.give_back(dir, false).await;
                self.discard(&staged).await;
                return;
            }
            _ = registration.cancelled.cancelled() => {
                // The task's final state (failed, CANCELLED) is written and the claim's token is
                // dead, so there is nothing to write. Leaving the select dropped the backend's
                // future: a command's process tree is killed, an http request aborted.
                info!("cancelled; the attempt was stopped");
                self.give_back(dir, false).await;
                self.discard(&staged).await;
                return;
            }
            _ = self.interrupt.cancelled() => {
                self.give_back(dir, false).await;
                self.discard(&staged).await;
                match self.store.requeue(&claim.task.id, &claim.token, now_ms(), true).await {
                    Ok(_) => info!("interrupted by shutdown; left pending"),
                    // The lease will expire and hand the task on at the next start.
                    Err(e) => error!(error = %error_chain(&e), "cannot requeue interrupted task"),
                }
                return;
            }
        };
        // The last log lines are stored before the outcome, so they are there once it is final.
        if let Some(reports) = reports {
            reports.finish().await;
        }
        // Free space is read before the attempt's directory is emptied: a program that filled
        // the disk with a partial output was short of space, whatever is left once it is gone.
        let short_of_space = match &result {
            Err(e) if !unrelated_to_space(e) => self.disk_full().await,
            _ => false,
        };
        let reusable = returned.load(Ordering::Acquire) && model.backend.writes_end_with_run();
        self.give_back(dir, reusable).await;
        if let Err(e) = &result {
            if let Some(n) = self.next_deferral(&claim.task.id, short_of_space) {
                self.discard(&staged).await;
                self.defer_for_space(&model.name, &claim, e, n).await;
                return;
            }
        }
        self.forget_deferrals(&claim.task.id);
        let succeeded = result.is_ok();
        let settled = self
            .settle_as(
                &model.name,
                &claim,
                result,
                started.elapsed(),
                lease.get(),
                None,
                job.route.get(),
            )
            .await;
        // Staged files are taken back unless they may be the task's: after a failure (some may
        // have been staged before it), or when the claim was not ours. Not after `NotWritten`:
        // the write may have committed unseen, and deleting published outputs is worse than
        // leaving an unreferenced file behind. (Blobs need no such care: they are written with
        // the final state or not at all.)
        if !succeeded || matches!(settled, Settled::NotOurs) {
            self.discard(&staged).await;
        }
    }

    /// Whether the data dir's file system is (all but) full. An attempt that failed then is
    /// put down to the disk, not to the task: its program could not write its outputs, or we
    /// could not keep them. Counting it would fail accepted tasks for want of space, and a
    /// full disk is the operator's to fix, not the client's.
    async fn disk_full(&self) -> bool {
        // statvfs off the async threads: on a network file system it can block.
        let dir = self.work_dir.clone();
        match tokio::task::spawn_blocking(move || fs4::available_space(&dir)).await {
            Ok(Ok(free)) => free < LOW_SPACE,
            Ok(Err(e)) => crate::report::storage_full(&e),
            Err(_) => false,
        }
    }

    /// When `short_of_space`, whether another attempt of `task` may be put back uncounted
    /// ([`MAX_DEFERRALS`]): its number (from 1) if so, counted.
    fn next_deferral(&self, task: &str, short_of_space: bool) -> Option<u32> {
        if !short_of_space {
            return None;
        }
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        // Tasks whose next attempt never ran here leave entries behind; a bound keeps the map
        // small (losing the counts only allows a few more deferrals).
        if deferred.len() > 10_000 {
            deferred.clear();
        }
        let n = deferred.entry(task.to_owned()).or_insert(0);
        if *n >= MAX_DEFERRALS {
            return None;
        }
        *n += 1;
        Some(*n)
    }

    fn forget_deferrals(&self, task: &str) {
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        if !deferred.is_empty() {
            deferred.remove(task);
        }
    }

    /// Puts the task back to pending without counting the attempt, to run again after the
    /// retry schedule's `nth` delay: it waits for space instead of failing. The database is likely on the
    /// same full disk, so the write is tried again (the attempt keeps its slot meanwhile) until
    /// it lands once space is freed, or the task turns out not to be ours; a shutdown leaves it
    /// to the lease's expiry.
    async fn defer_for_space(&self, model: &str, claim: &Claim, e: &BackendError, nth: u32) {
        // Counted as the retryable failure it is: it will run again.
        self.metrics.backend_error(model, true, e.code());
        let delay = self
            .retry
            .delay(nth)
            .or_else(|| self.retry.delay(1))
            .unwrap_or(Duration::from_secs(1));
        let mut pause = FIRST_WRITE_PAUSE;
        loop {
            let run_after = now_ms() + delay.as_millis() as i64;
            match self
                .store
                .requeue(&claim.task.id, &claim.token, run_after, true)
                .await
            {
                Ok(true) => {
                    warn!(
                        error = %e,
                        retry_in = %humantime::format_duration(delay),
                        "the disk is full; the attempt is not counted and the task waits for space"
                    );
                    break;
                }
                Ok(false) => {
                    warn!(error = %e, "the disk is full, and the task was handed on or cancelled meanwhile");
                    break;
                }
                Err(w) => {
                    warn!(error = %e, requeue_error = %error_chain(&w), retry_in = ?pause, "the disk is full; cannot put the task back yet");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.interrupt.cancelled() => return,
            }
            // Kept short: once space returns this write must land before the lease sweep,
            // which would count the attempt, reaches the task (it runs once per lease).
            pause = (pause * 2).min(DEFER_WRITE_PAUSE);
        }
        self.events.changed(&claim.task.id);
        self.notify(model);
    }

    async fn give_back(&self, dir: Option<PathBuf>, reusable: bool) {
        if let Some(dir) = dir {
            self.work_dirs.give_back(dir, reusable).await;
        }
    }

    /// Deletes outputs an attempt staged but did not publish.
    async fn discard(&self, staged: &Mutex<Vec<String>>) {
        let keys = std::mem::take(&mut *staged.lock().unwrap_or_else(|p| p.into_inner()));
        for key in keys {
            if let Err(e) = self.artifacts.delete(&key).await {
                warn!(%key, error = %error_chain(&e), "cannot delete an unpublished output");
            }
        }
    }

    /// Runs the backend within the model's timeout and stages its outputs under `tag`: files
    /// go to the artifact store; small in-memory outputs become blobs, written with the final
    /// state when the artifact store lets the database hold them.
    async fn execute(
        &self,
        model: &ModelRuntime,
        job: &Job,
        tag: &str,
        staged: &Mutex<Vec<String>>,
        returned: &AtomicBool,
    ) -> Result<(Vec<String>, Vec<Blob>), BackendError> {
        let timeout = model.config.timeout;
        let produced = match tokio::time::timeout(timeout, model.backend.run(job)).await {
            Ok(r) => {
                returned.store(true, Ordering::Release);
                r?
            }
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
        };
        let internal = |e| BackendError::retryable(fail_code::INTERNAL_ERROR, e);
        let stage = |key: &str| {
            staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(key.to_owned());
        };
        let mut keys = Vec::new();
        let mut blobs = Vec::new();
        match produced {
            Produced::Files => keys = self.stage_files(job.dir()?, job, tag, staged).await?,
            Produced::FilesIn(dir) => keys = self.stage_files(&dir, job, tag, staged).await?,
            Produced::InMemory(outputs) => {
                if outputs.is_empty() {
                    return Err(BackendError::no_output());
                }
                let inline_max = self.artifacts.inline_max();
                for (name, content) in output_names(outputs) {
                    let key = staged_key(&job.task_id, tag, &name);
                    if inline_max > 0 && content.len() <= inline_max {
                        blobs.push(Blob {
                            key: key.clone(),
                            content,
                        });
                    } else {
                        stage(&key);
                        self.artifacts
                            .put_bytes(&key, content)
                            .await
                            .map_err(|e| internal(error_chain(&e)))?;
                    }
                    keys.push(key);
                }
            }
        }
        Ok((keys, blobs))
    }

    /// Stages every file under `dir` (the attempt's outputs) under `tag`; answers their keys.
    async fn stage_files(
        &self,
        dir: &Path,
        job: &Job,
        tag: &str,
        staged: &Mutex<Vec<String>>,
    ) -> Result<Vec<String>, BackendError> {
        let internal = |e| BackendError::retryable(fail_code::INTERNAL_ERROR, e);
        let files = collect_files(dir)
            .await
            .map_err(|e| internal(format!("cannot read the output directory: {e}")))?;
        if files.is_empty() {
            return Err(BackendError::no_output());
        }
        let mut keys = Vec::with_capacity(files.len());
        for (name, path) in output_names(files) {
            let key = staged_key(&job.task_id, tag, &name);
            staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(key.clone());
            self.artifacts
                .put_file(&key, &path)
                .await
                .map_err(|e| internal(error_chain(&e)))?;
            keys.push(key);
        }
        Ok(keys)
    }

    /// Renews the lease until it is lost; returns only then (with how it was lost).
    async fn keep_lease(&self, claim: &Claim, lease: &LeaseDeadline) -> &'static str {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.lease / 3).await;
            let at = Instant::now();
            match self
                .store
                .renew_lease(&claim.task.id, &claim.token, now_ms(), self.lease, None)
                .await
            {
                Ok(true) => {
                    failures = 0;
                    lease.renewed_at(at, self.lease);
                }
                Ok(false) => return "no longer ours (handed on, or cancelled)",
                Err(e) => {
                    failures += 1;
                    warn!(error = %error_chain(&e), "cannot renew lease");
                    if failures >= 2 {
                        return "could not renew";
                    }
                }
            }
        }
    }
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove work directory"),
    }
}

/// Output directories of local attempts: fresh ones, and ones proven empty and unreachable by
/// the attempt that used them (see the module docs). At most as many exist as attempts run at
/// once.
pub(super) struct WorkDirs {
    root: PathBuf,
    /// Unique to this process, so that no name is ever used by two processes: a program left
    /// running by a process that was killed still writes to its old path, which must not be
    /// a directory this process hands to a new attempt.
    run: String,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
}

impl WorkDirs {
    pub(super) fn new(root: PathBuf) -> Self {
        WorkDirs {
            root,
            run: crate::domain::new_id("run"),
            free: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }

    /// An empty directory that no writer of an earlier attempt can reach.
    async fn take(&self) -> std::io::Result<PathBuf> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(dir) = reused {
            return Ok(dir);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("{}-slot-{n}", self.run));
        // Never an existing path, nor one an earlier process used: the name carries this
        // process's run id.
        tokio::fs::create_dir(&dir).await?;
        Ok(dir)
    }

    /// Takes `dir` back after an attempt. With `reusable` (its writers are all done) it is
    /// emptied, checked empty, and kept for the next attempt; otherwise it is removed and its
    /// name never used again.
    async fn give_back(&self, dir: PathBuf, reusable: bool) {
        if !reusable {
            remove_dir(&dir).await;
            return;
        }
        let target = dir.clone();
        let emptied = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            for entry in std::fs::read_dir(&target)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(entry.path())?;
                } else {
                    std::fs::remove_file(entry.path())?;
                }
            }
            Ok(std::fs::read_dir(&target)?.next().is_none())
        })
        .await;
        match emptied {
            Ok(Ok(true)) => self
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(dir),
            _ => remove_dir(&dir).await,
        }
    }
}

/// Every regular file under `dir`, with its path relative to `dir` (`a/b.png` → `a_b.png`);
/// also used by `taskgate worker` for its outputs.
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
