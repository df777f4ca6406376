//! Maintenance: the one owner of recovery. At start it hands on what the last process left
//! (attempts that ran in it, deliveries it was sending), fails the tasks of models the server no
//! longer offers, and clears scratch space of nodes that are gone; while running it sweeps
//! expired leases of tasks and deliveries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::Dispatcher;
use crate::domain::now_ms;
use crate::report::error_chain;
use crate::store::{Store, StoreError};

/// The start-up pass, before anything is claimed.
///
/// With an exclusive store (SQLite under the data-dir lock) every attempt that ran in the
/// process is dead, whatever its lease says, so those are handed on at once; pull workers'
/// claims keep their leases (the worker may still be running them) and are recovered only when
/// they expire. With a shared store only expired leases are orphans.
pub async fn recover_at_start(store: &dyn Store, models: &[String]) -> Result<(), StoreError> {
    let now = now_ms();
    let mut recovered = store.recover_expired(now).await?;
    if store.exclusive() {
        let local = store.recover_local(now).await?;
        recovered.requeued.extend(local.requeued);
        recovered.failed.extend(local.failed);
        recovered.unacknowledged.extend(local.unacknowledged);
    }
    if !recovered.is_empty() {
        info!(
            requeued = recovered.requeued.len(),
            failed = recovered.failed.len(),
            unacknowledged = recovered.unacknowledged.len(),
            "recovered tasks interrupted by the previous process"
        );
    }
    let removed = store.fail_removed_models(models, now).await?;
    if !removed.is_empty() {
        warn!(
            tasks = removed.len(),
            "failed unfinished tasks of models this server no longer offers (failCode MODEL_REMOVED)"
        );
    }
    // Deliveries: every one claimed by the last process of an exclusive store was cut short.
    let cutoff = if store.exclusive() { i64::MAX } else { now };
    let redeliveries = store.recover_expired_deliveries(cutoff).await?;
    if redeliveries > 0 {
        info!(
            redeliveries,
            "callbacks cut short by the previous process will be sent again"
        );
    }
    Ok(())
}

/// How often pending tasks past their deadline are failed: a deadline is kept to within this.
const EXPIRY_PERIOD: Duration = Duration::from_secs(1);
/// Small, so one round holds SQLite's write lock for a few milliseconds at most.
const EXPIRY_BATCH: usize = 200;

/// Fails pending tasks whose deadline (`ttl_seconds`) passed before they started, with
/// `EXPIRED`. Claims already skip them, so this only makes the failure visible and owes their
/// callbacks; one indexed statement per round, and nothing when no task has a deadline.
pub(super) async fn expire_tasks(dispatcher: Arc<Dispatcher>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_PERIOD) => {}
            _ = dispatcher.stop.cancelled() => return,
        }
        loop {
            match dispatcher
                .store
                .expire_pending(now_ms(), EXPIRY_BATCH)
                .await
            {
                Ok(ids) => {
                    for id in &ids {
                        dispatcher.views.forget(id);
                        dispatcher.events.changed(id);
                    }
                    dispatcher
                        .metrics
                        .swept(crate::domain::fail_code::EXPIRED, ids.len());
                    if !ids.is_empty() {
                        info!(
                            tasks = ids.len(),
                            "failed tasks not started before their deadline (EXPIRED)"
                        );
                        dispatcher.webhook_wake.notify_one();
                    }
                    if ids.len() < EXPIRY_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    error!(error = %error_chain(&e), "expiring tasks past their deadline failed");
                    break;
                }
            }
        }
    }
}

/// Hands on tasks and deliveries whose holder stopped renewing (a node or worker that died).
pub(super) async fn sweep_leases(dispatcher: Arc<Dispatcher>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(dispatcher.lease) => {}
            _ = dispatcher.stop.cancelled() => return,
        }
        match dispatcher.store.recover_expired(now_ms()).await {
            Ok(r) if !r.is_empty() => {
                dispatcher
                    .metrics
                    .swept(crate::domain::fail_code::ATTEMPTS_EXHAUSTED, r.failed.len());
                // None of these is pending with a cached view any more (or pending again, which
                // the store answers): drop whatever view a lost claim answer left behind.
                for id in r.requeued.iter().chain(&r.failed).chain(&r.unacknowledged) {
                    dispatcher.views.forget(id);
                    dispatcher.events.changed(id);
                }
                warn!(
                    requeued = r.requeued.len(),
                    failed = r.failed.len(),
                    unacknowledged = r.unacknowledged.len(),
                    "recovered tasks with expired leases"
                );
                dispatcher.notify_all();
                dispatcher.webhook_wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => error!(error = %error_chain(&e), "lease sweep failed"),
        }
        match dispatcher.store.recover_expired_deliveries(now_ms()).await {
            Ok(0) => {}
            Ok(n) => {
                warn!(deliveries = n, "recovered callbacks with expired leases");
                dispatcher.webhook_wake.notify_one();
            }
            Err(e) => error!(error = %error_chain(&e), "delivery lease sweep failed"),
        }
    }
}

/// This node's scratch directory, and the lock that marks it as in use.
pub struct WorkDir {
    pub path: PathBuf,
    _lock: Option<std::fs::File>,
}

/// Prepares this node's scratch directory under `data_dir`.
///
/// A sole user of the data dir (under its lock) takes `work/` and empties it: nothing in it is
/// worth keeping after a restart. Nodes of a cluster sharing one data dir each take
/// `work-{node id}/` and hold a lock on `work-{node id}.lock` while they live; at start each
/// removes the directories of nodes whose lock nobody holds any more (nodes that are gone).
pub fn prepare_work_dir(data_dir: &Path, exclusive: bool) -> std::io::Result<WorkDir> {
    if exclusive {
        let path = data_dir.join("work");
        remove_all(&path)?;
        std::fs::create_dir_all(&path)?;
        return Ok(WorkDir { path, _lock: None });
    }
    let node = crate::domain::new_id("node");
    let path = data_dir.join(format!("work-{node}"));
    // Lock first, then make the directory: a directory that exists always has its lock held
    // while its node lives, so a node starting at the same moment cannot take it for abandoned.
    let lock = lock_file(&data_dir.join(format!("work-{node}.lock")))?
        .ok_or_else(|| std::io::Error::other("a fresh node lock is held by another process"))?;
    std::fs::create_dir_all(&path)?;
    remove_abandoned_work_dirs(data_dir, &path);
    Ok(WorkDir {
        path,
        _lock: Some(lock),
    })
}

/// Removes `work-*` directories whose node no longer holds their lock.
fn remove_abandoned_work_dirs(data_dir: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path == ours || !name.starts_with("work-") || name.ends_with(".lock") {
            continue;
        }
        let lock_path = data_dir.join(format!("{name}.lock"));
        // A lock we can take belongs to no living node; a directory without a lock file is
        // from a node that died before making one (or an older version): gone too.
        let held = match lock_file(&lock_path) {
            Ok(Some(_)) => false,
            Ok(None) => true,
            Err(_) => continue,
        };
        if held {
            continue;
        }
        match remove_all(&path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&lock_path);
                info!(dir = %path.display(), "removed the scratch directory of a node that is gone");
            }
            Err(e) => {
                warn!(dir = %path.display(), error = %e, "cannot remove an abandoned scratch directory")
            }
        }
    }
}

/// Opens and exclusively locks `path` (created if needed); `None` when another process holds it.
pub(crate) fn lock_file(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    use fs4::fs_std::FileExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    Ok(file.try_lock_exclusive()?.then_some(file))
}

fn remove_all(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_removes_the_scratch_space_of_nodes_that_are_gone_but_not_of_live_ones() {
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let live = prepare_work_dir(data.path(), false).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(live.path.join("x"), b"busy").unwrap_or_else(|e| panic!("{e}"));
        let gone = data.path().join("work-node_gone");
        std::fs::create_dir_all(&gone).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(data.path().join("work-node_gone.lock"), b"")
            .unwrap_or_else(|e| panic!("{e}"));
        let other = prepare_work_dir(data.path(), false).unwrap_or_else(|e| panic!("{e}"));
        assert!(!gone.exists(), "the dead node's directory stays");
        assert!(
            live.path.join("x").exists(),
            "a live node's directory was removed"
        );
        assert!(other.path.exists());
    }
}
