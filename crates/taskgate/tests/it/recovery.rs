//! Restarts of the real binary: after SIGKILL no accepted task is lost; after SIGTERM running
//! tasks get a grace period and the rest are left pending for the next start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use taskgate_proto::TaskState;

use crate::support::*;

/// A data dir, a config with one command model `gated` (gate.sh: it records that it started,
/// then waits for the gate file), and the paths the test drives it with.
pub(crate) struct Gated {
    _dir: tempfile::TempDir,
    pub(crate) data: PathBuf,
    config: PathBuf,
    gate: PathBuf,
    marks: PathBuf,
}

impl Gated {
    pub(crate) fn new(concurrency: usize) -> Gated {
        Self::with_attempts(concurrency, 3)
    }

    pub(crate) fn with_attempts(concurrency: usize, max_attempts: u32) -> Gated {
        let dir = tempfile::tempdir().unwrap();
        let marks = dir.path().join("marks");
        std::fs::create_dir(&marks).unwrap();
        let gate = dir.path().join("gate");
        let config = dir.path().join("taskgate.toml");
        std::fs::write(
            &config,
            command_model(
                "gated",
                "gate.sh",
                &[gate.to_str().unwrap(), marks.to_str().unwrap()],
                &format!("concurrency = {concurrency}\nmax_attempts = {max_attempts}"),
            ),
        )
        .unwrap();
        Gated {
            data: dir.path().join("data"),
            _dir: dir,
            config,
            gate,
            marks,
        }
    }

    pub(crate) async fn spawn(&self, extra: &[&str]) -> ServerProcess {
        ServerProcess::spawn_with(&self.data, Some(&self.config), extra).await
    }

    pub(crate) fn mark(&self, task: &str, attempt: u32) -> PathBuf {
        self.marks.join(format!("started-{task}-{attempt}"))
    }

    /// Waits until attempt `attempt` of `task` has started; returns the script's pid.
    pub(crate) async fn started(&self, task: &str, attempt: u32) -> i32 {
        wait_for_file(&self.mark(task, attempt), Duration::from_secs(20))
            .await
            .trim()
            .parse()
            .unwrap()
    }

    pub(crate) fn open_gate(&self) {
        std::fs::write(&self.gate, "go").unwrap();
    }
}

/// Kills what is left of an orphaned script's process group (it outlives a SIGKILLed server).
pub(crate) fn kill_group(pid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The task as stored, read straight from the data dir while no server runs.
async fn stored_state(data: &Path, task: &str) -> (TaskState, u32) {
    let store = taskgate_server::open_store(data, None).await.unwrap();
    let t = store.get_task(task).await.unwrap().unwrap();
    store.close().await;
    (t.state, t.attempts)
}

#[tokio::test]
async fn a_task_processing_when_the_server_is_killed_completes_after_a_restart() {
    let g = Gated::new(1);
    let server = g.spawn(&[]).await;
    let id = server.api.submit_ok("gated", json!({ "n": 1 })).await;
    let orphan = g.started(&id, 1).await;
    server
        .api
        .wait_for("gated", &id, Duration::from_secs(10), |d| {
            d["state"] == "processing"
        })
        .await;

    server.kill9().await;
    let (state, attempts) = stored_state(&g.data, &id).await;
    assert_eq!((state, attempts), (TaskState::Processing, 1));
    let server = g.spawn(&[]).await;
    // The interrupted attempt counts: the rerun is attempt 2.
    g.started(&id, 2).await;
    g.open_gate();
    let data = server
        .api
        .wait_final("gated", &id, Duration::from_secs(20))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let url = &result_urls(&data)[0];
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert_eq!(body, "attempt 2\n");
    kill_group(orphan);
    server.terminate().await;
}

#[tokio::test]
async fn pending_tasks_accepted_before_a_kill_9_all_complete_after_a_restart() {
    let g = Gated::new(1);
    let server = g.spawn(&[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(server.api.submit_ok("gated", json!({ "n": i })).await);
    }
    let orphan = g.started(&ids[0], 1).await;
    for id in &ids[1..] {
        let (_, body) = server.api.status("gated", id).await;
        assert_eq!(body["data"]["state"], "pending", "{body}");
    }

    server.kill9().await;
    let server = g.spawn(&[]).await;
    g.open_gate();

    for id in &ids {
        let data = server
            .api
            .wait_final("gated", id, Duration::from_secs(30))
            .await;
        assert_eq!(data["state"], "success", "{id}: {data}");
    }
    kill_group(orphan);
    server.terminate().await;
}

#[tokio::test]
async fn sigterm_leaves_a_task_longer_than_the_grace_pending_and_the_next_start_completes_it() {
    let g = Gated::new(1);
    let server = g.spawn(&["--shutdown-grace", "300ms"]).await;
    let id = server.api.submit_ok("gated", json!({})).await;
    let first = g.started(&id, 1).await;

    let status = server.terminate().await;

    assert!(status.success(), "exit status {status:?}");
    wait_until(
        Duration::from_secs(5),
        "the interrupted script to be killed",
        || async { process_is_gone(first) },
    )
    .await;
    // Left pending, and the interrupted attempt is not held against the task.
    assert_eq!(stored_state(&g.data, &id).await, (TaskState::Pending, 0));
    std::fs::remove_file(g.mark(&id, 1)).unwrap();
    let server = g.spawn(&[]).await;
    g.started(&id, 1).await;
    g.open_gate();
    let data = server
        .api
        .wait_final("gated", &id, Duration::from_secs(20))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    server.terminate().await;
}

#[tokio::test]
async fn sigterm_lets_a_task_that_ends_within_the_grace_finish_before_exiting() {
    let g = Gated::new(1);
    let server = g.spawn(&["--shutdown-grace", "20s"]).await;
    let id = server.api.submit_ok("gated", json!({})).await;
    g.started(&id, 1).await;

    server.send_sigterm();
    g.open_gate();
    let status = server.wait_exit().await;

    assert!(status.success(), "exit status {status:?}");
    assert_eq!(stored_state(&g.data, &id).await, (TaskState::Success, 1));
    let server = g.spawn(&[]).await;
    let (_, body) = server.api.status("gated", &id).await;
    assert_eq!(body["data"]["state"], "success", "{body}");
    server.terminate().await;
}

#[tokio::test]
async fn finished_tasks_and_their_signed_links_survive_a_restart() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({ "keep": true })).await;
    let before = app
        .api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;
    let old_base = app.api.base.clone();
    let dir = app.dir();

    app.stop().await.unwrap();
    let app = TestApp::start_in(dir, |_| {}).await;
    let (_, body) = app.api.status("echo", &id).await;

    let after = &body["data"];
    for field in ["state", "createTime", "completeTime", "costTime"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    // The signing key is kept in the store: the link is the same apart from the address.
    let old_url = result_urls(&before).remove(0);
    let new_url = result_urls(after).remove(0);
    assert_eq!(
        old_url.strip_prefix(&old_base),
        new_url.strip_prefix(&app.api.base)
    );
    let resp = reqwest::get(&new_url).await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, json!({ "keep": true }));
}

#[tokio::test]
async fn a_task_killed_on_its_last_attempt_ends_failed_instead_of_hanging() {
    let g = Gated::with_attempts(1, 1);
    let server = g.spawn(&[]).await;
    let id = server.api.submit_ok("gated", json!({})).await;
    let orphan = g.started(&id, 1).await;

    server.kill9().await;
    let server = g.spawn(&[]).await;
    let data = server
        .api
        .wait_final("gated", &id, Duration::from_secs(20))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "ATTEMPTS_EXHAUSTED");
    assert!(
        data["failMsg"].as_str().unwrap().contains("interrupted"),
        "{data}"
    );
    assert!(
        !g.mark(&id, 2).exists(),
        "a task with max_attempts = 1 ran twice"
    );
    kill_group(orphan);
    server.terminate().await;
}
