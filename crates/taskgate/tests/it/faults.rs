//! The engine's guarantees under faults, each driven step by step through HTTP: the test is the
//! pull worker (raw worker-API calls), the store fails or stalls where a fault plan says, the
//! server is stopped and restarted on its data dir. Every test ends with [`check_invariants`]
//! over the tasks it submitted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_server::config::{FileConfig, ModelConfig};
use taskgate_server::store::faults::Fault;
use tokio::sync::Notify;

use crate::support::*;

/// Every wait in this file is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

fn models(toml: &str) -> std::collections::BTreeMap<String, ModelConfig> {
    FileConfig::parse(toml).unwrap().models.unwrap()
}

/// A pull worker played by the test: one raw worker-API call per method.
#[derive(Clone)]
pub(crate) struct Worker {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Worker {
    pub(crate) fn new(base: &str, token: &str) -> Worker {
        Worker {
            http: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    /// The same worker talking to another server (after a restart).
    fn at(&self, base: &str) -> Worker {
        Worker {
            base: base.to_owned(),
            ..self.clone()
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/api/v1/worker{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// One claim (long-polling up to `wait_ms`): the WorkerTask, or None for "no task".
    pub(crate) async fn claim(&self, models: &[&str], wait_ms: u64) -> Option<Value> {
        let resp = self
            .post("/claim")
            .json(&json!({ "models": models, "waitMs": wait_ms }))
            .send()
            .await
            .unwrap();
        let (status, body) = envelope(resp).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (!body["data"].is_null()).then(|| body["data"].clone())
    }

    /// Claims until a task is handed out (at most [`WAIT`]).
    pub(crate) async fn claim_until(&self, models: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(task) = self.claim(models, 1000).await {
                return task;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no task of {models:?} was handed out within {WAIT:?}"
            );
        }
    }

    pub(crate) async fn heartbeat(&self, id: &str, lease: &str) -> (StatusCode, Value) {
        let resp = self
            .post(&format!("/tasks/{id}/heartbeat"))
            .json(&json!({ "leaseToken": lease }))
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    pub(crate) async fn upload(
        &self,
        id: &str,
        name: &str,
        lease: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .put(format!(
                "{}/api/v1/worker/tasks/{id}/outputs/{name}",
                self.base
            ))
            .query(&[("leaseToken", lease)])
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    pub(crate) async fn complete(
        &self,
        id: &str,
        lease: &str,
        outputs: &[&str],
    ) -> (StatusCode, Value) {
        let resp = self
            .post(&format!("/tasks/{id}/complete"))
            .json(&json!({ "leaseToken": lease, "outputs": outputs }))
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    async fn fail(&self, id: &str, lease: &str, body: Value) -> (StatusCode, Value) {
        let mut body = body;
        body["leaseToken"] = json!(lease);
        let resp = self
            .post(&format!("/tasks/{id}/fail"))
            .json(&body)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }
}

/// The id and lease token of a WorkerTask.
pub(crate) fn ids(task: &Value) -> (String, String) {
    (
        task["taskId"].as_str().unwrap().to_owned(),
        task["leaseToken"].as_str().unwrap().to_owned(),
    )
}

/// What a task must look like at the end of a test.
pub(crate) enum Want<'a> {
    /// Success with exactly these outputs (file name, content).
    Success(&'a [(&'a str, &'a str)]),
    /// Failed with this failCode.
    Failed(&'a str),
    /// Either of the two: for load under crashes, where an attempt interrupted too often may
    /// legitimately end the task failed (with this failCode) instead of with these outputs.
    SuccessOr(&'a [(&'a str, &'a str)], &'a str),
}

/// The file name a result URL serves.
fn file_name(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap()
        .to_owned()
}

/// Asserts a success with exactly `files` (name, content), each fetching 200.
async fn assert_success_with(id: &str, data: &Value, files: &[(&str, &str)]) {
    assert_eq!(data["state"], "success", "{data}");
    assert!(data.get("failCode").is_none(), "{data}");
    let urls = result_urls(data);
    assert!(!urls.is_empty(), "a success without results: {data}");
    let mut got: Vec<String> = urls.iter().map(|u| file_name(u)).collect();
    got.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(got, expected, "the outputs of task {id}: {data}");
    for url in &urls {
        let resp = reqwest::get(url).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let content = resp.text().await.unwrap();
        let name = file_name(url);
        let (_, want_content) = files.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(content, *want_content, "content of {name} of task {id}");
    }
}

/// Asserts a failure with failCode `code`, a message and no results.
fn assert_failed_with(data: &Value, code: &str) {
    assert_eq!(data["state"], "failed", "{data}");
    let got = data["failCode"].as_str().unwrap_or_else(|| {
        panic!("a failed task without failCode: {data}");
    });
    assert!(!got.is_empty(), "{data}");
    assert_eq!(got, code, "{data}");
    assert!(data["failMsg"].is_string(), "{data}");
    assert!(data.get("resultJson").is_none(), "{data}");
}

/// The invariants every test ends with, for each `(model, task id, expectation)`: the task is in
/// exactly one final state, the expected one, and stays there; a success has non-empty
/// resultUrls, exactly the expected files, each fetching 200 with the expected content, and no
/// failCode; a failure has a failCode (the expected one) and no results.
pub(crate) async fn check_invariants(api: &Api, tasks: &[(&str, &str, Want<'_>)]) {
    let mut seen = Vec::with_capacity(tasks.len());
    for (model, id, want) in tasks {
        let (status, body) = api.status(model, id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let data = body["data"].clone();
        assert_eq!(data["taskId"], *id, "{data}");
        let state = data["state"].as_str().unwrap();
        assert!(
            matches!(state, "success" | "failed"),
            "task {id} is not final: {data}"
        );
        assert!(data["completeTime"].is_i64(), "no completeTime: {data}");
        match want {
            Want::Success(files) => assert_success_with(id, &data, files).await,
            Want::Failed(code) => assert_failed_with(&data, code),
            Want::SuccessOr(files, code) => match state {
                "success" => assert_success_with(id, &data, files).await,
                _ => assert_failed_with(&data, code),
            },
        }
        seen.push(data);
    }
    // Exactly one final state: none moves on. One pause for all, so that a check over
    // hundreds of tasks stays quick.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for ((model, id, _), data) in tasks.iter().zip(&seen) {
        let (_, again) = api.status(model, id).await;
        for field in ["state", "completeTime", "failCode", "failMsg"] {
            assert_eq!(again["data"][field], data[field], "{field} of {id} changed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Outputs belong to one attempt.

#[tokio::test]
async fn a_stale_attempts_outputs_and_report_are_refused_and_the_result_is_the_new_attempts() {
    let app = TestApp::start_with(|c| {
        c.models = models(WORKER_MODEL);
        c.server.lease = Duration::from_secs(1);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let a = Worker::new(&app.api.base, &token);
    let b = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({ "n": 1 })).await;

    let task_a = a.claim(&["remote"], 5000).await.expect("A got no task");
    let (a_id, a_lease) = ids(&task_a);
    assert_eq!(a_id, id);
    let (status, body) = a.heartbeat(&id, &a_lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // While it still holds the task, A stages an output of the same name B will use.
    let (status, body) = a.upload(&id, "out.txt", &a_lease, "A staged").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A goes silent; its lease ends and the task is handed to B.
    let task_b = b.claim_until(&["remote"]).await;
    let (b_id, b_lease) = ids(&task_b);
    assert_eq!(b_id, id);
    assert_ne!(b_lease, a_lease);
    assert_eq!(task_b["attempt"], 2, "{task_b}");

    // A stale upload while B holds the task is refused, and does not become B's.
    let (status, body) = a.upload(&id, "out.txt", &a_lease, "A early").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = b.upload(&id, "out.txt", &b_lease, "B").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b.complete(&id, &b_lease, &["out.txt"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = app.api.wait_final("remote", &id, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");

    // A comes back: it can neither replace the output nor report.
    let (status, body) = a.upload(&id, "out.txt", &a_lease, "A").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = a.complete(&id, &a_lease, &["out.txt"]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = a.heartbeat(&id, &a_lease).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    check_invariants(
        &app.api,
        &[("remote", &id, Want::Success(&[("out.txt", "B")]))],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. `complete` checks the outputs it names.

#[tokio::test]
async fn completing_with_an_output_never_uploaded_is_refused_and_the_task_keeps_its_claim() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({})).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (status, body) = w.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = w.complete(&id, &lease, &["missing.png"]).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["missing.png"]);
    assert_eq!(body["code"], 400, "{body}");
    let (_, s) = app.api.status("remote", &id).await;
    assert_eq!(s["data"]["state"], "processing", "{s}");

    let (status, body) = w.upload(&id, "missing.png", &lease, "now here").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = w.complete(&id, &lease, &["missing.png"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_invariants(
        &app.api,
        &[("remote", &id, Want::Success(&[("missing.png", "now here")]))],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. A file never crosses from one task to another.

#[tokio::test]
async fn a_writer_left_behind_by_one_task_never_puts_a_file_into_another_tasks_results() {
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("writer.log");
    let go = scratch.path().join("go");
    let toml = format!(
        "{}\n{}",
        command_model(
            "leaky",
            "leak_writer.sh",
            &[marker.to_str().unwrap(), go.to_str().unwrap()],
            "timeout = \"30s\"",
        ),
        r#"
[models.clean]
backend = "command"
command = ["sh", "-c", "sleep 0.5; echo own > \"$TASKGATE_OUTPUT_DIR/own.txt\""]
timeout = "30s"
"#
    );
    let app = TestApp::start_with_models(&toml).await;
    let first = app.api.submit_ok("leaky", json!({})).await;
    let data = app.api.wait_final("leaky", &first, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");
    let second = app.api.submit_ok("clean", json!({})).await;
    // The writer left behind (if it escaped) now writes while the second task runs.
    std::fs::write(&go, "go").unwrap();
    let data = app.api.wait_final("clean", &second, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");

    // Let the writer finish its tries, or be gone (the command backend kills the whole process
    // tree, setsid or not), before looking at what was published.
    let log = std::fs::read_to_string(&marker).unwrap_or_default();
    let writer_pid: Option<i32> = log
        .lines()
        .find_map(|l| l.strip_prefix("started "))
        .and_then(|p| p.trim().parse().ok());
    if let Some(pid) = writer_pid {
        wait_until(WAIT, "the leftover writer to finish or die", || {
            let log = std::fs::read_to_string(&marker).unwrap_or_default();
            async move { log.contains("done") || process_is_gone(pid) }
        })
        .await;
    }
    let log = std::fs::read_to_string(&marker).unwrap_or_default();

    check_invariants(
        &app.api,
        &[
            ("leaky", &first, Want::Success(&[("first.txt", "first\n")])),
            ("clean", &second, Want::Success(&[("own.txt", "own\n")])),
        ],
    )
    .await;
    // Nothing published anywhere is the writer's.
    let mut stack = vec![app.data_dir.join("files")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert!(
                    !p.to_string_lossy().contains("leak"),
                    "a leftover writer's file was published: {} (writer log: {log})",
                    p.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A restart recovers only what it must.

#[tokio::test]
async fn a_restart_leaves_a_workers_acknowledged_claim_with_it_and_the_worker_finishes() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({ "n": 4 })).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (status, body) = w.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A long-poll open when shutdown begins is answered at once with no task.
    let poller = w.clone();
    let poll = tokio::spawn(async move { poller.claim(&["remote"], 20_000).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = app.dir();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(WAIT, app.stop())
        .await
        .expect("the server did not stop")
        .unwrap();
    let polled = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the long-poll was not answered")
        .unwrap();
    assert!(polled.is_none(), "a stopping server handed out {polled:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an open long-poll held up the shutdown for {:?}",
        started.elapsed()
    );

    let app = TestApp::start_in(dir, |c| c.models = models(WORKER_MODEL)).await;
    let (_, s) = app.api.status("remote", &id).await;
    assert_eq!(s["data"]["state"], "processing", "{s}");
    let w = w.at(&app.api.base);
    let (status, body) = w.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = w.upload(&id, "out.txt", &lease, "after restart").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = w.complete(&id, &lease, &["out.txt"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_invariants(
        &app.api,
        &[(
            "remote",
            &id,
            Want::Success(&[("out.txt", "after restart")]),
        )],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Long uploads keep their lease.

#[tokio::test]
async fn an_upload_that_takes_longer_than_the_lease_keeps_the_claim() {
    let app = TestApp::start_with(|c| {
        c.models = models(WORKER_MODEL);
        c.server.lease = Duration::from_secs(1);
        // Shorter than the upload too: an upload only has to keep moving.
        c.server.body_timeout = Duration::from_secs(2);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({})).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (status, body) = w.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // 30 chunks, 100 ms apart: the body takes ~3 s, three leases, with no heartbeat.
    let chunks: Vec<String> = (0..30).map(|i| format!("chunk {i:02}\n")).collect();
    let expected = chunks.concat();
    let (tx, rx) = futures::channel::mpsc::channel::<Result<String, std::io::Error>>(1);
    tokio::spawn(async move {
        let mut tx = tx;
        for c in chunks {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if futures::SinkExt::send(&mut tx, Ok(c)).await.is_err() {
                return;
            }
        }
    });
    let started = tokio::time::Instant::now();
    let (status, body) = w
        .upload(&id, "slow.txt", &lease, reqwest::Body::wrap_stream(rx))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    let (status, body) = w.complete(&id, &lease, &["slow.txt"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_invariants(
        &app.api,
        &[(
            "remote",
            &id,
            Want::Success(&[("slow.txt", expected.as_str())]),
        )],
    )
    .await;
}

#[tokio::test]
async fn an_upload_that_stops_moving_for_the_body_timeout_is_answered_408() {
    let app = TestApp::start_with(|c| {
        c.models = models(WORKER_MODEL);
        c.server.body_timeout = Duration::from_millis(500);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({})).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (tx, rx) = futures::channel::mpsc::channel::<Result<&str, std::io::Error>>(1);
    // One chunk, then silence (the sender is held, so the body never ends).
    let mut tx = tx;
    futures::SinkExt::send(&mut tx, Ok("first\n"))
        .await
        .unwrap();
    let (status, body) = tokio::time::timeout(
        WAIT,
        w.upload(&id, "stalled.txt", &lease, reqwest::Body::wrap_stream(rx)),
    )
    .await
    .expect("the server waited on an upload that stopped");
    assert_error(status, &body, StatusCode::REQUEST_TIMEOUT, &["0.5s"]);
    drop(tx);
    // Nothing of it was kept: completing with it is refused.
    let (status, body) = w.complete(&id, &lease, &["stalled.txt"]).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["never uploaded"]);
}

// ---------------------------------------------------------------------------------------------
// 6. A failed write is never reported as done.

#[tokio::test]
async fn a_local_task_whose_final_write_fails_a_few_times_still_succeeds() {
    let (app, plan) = TestApp::start_with_faults(|c| {
        c.models = models("[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n");
    })
    .await;
    plan.inject_next("finish", 3, Fault::Fail);
    let id = app.api.submit_ok("echo", json!({ "n": 6 })).await;
    let data = app.api.wait_final("echo", &id, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");
    assert!(plan.calls("finish") >= 4, "{}", plan.calls("finish"));
    check_invariants(
        &app.api,
        &[(
            "echo",
            &id,
            Want::Success(&[("result.json", "{\n  \"n\": 6\n}")]),
        )],
    )
    .await;
}

#[tokio::test]
async fn a_final_write_that_committed_but_reported_an_error_keeps_its_outputs() {
    // The connection drops after the commit: the completer's next try finds the token gone,
    // which must not be taken for a lost claim (whose staged outputs would be deleted).
    let (app, plan) = TestApp::start_with_faults(|c| {
        c.models =
            models("[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\nconcurrency = 1\n");
    })
    .await;
    plan.inject_next("finish", 1, Fault::FailAfter);
    let id = app.api.submit_ok("echo", json!({ "n": 7 })).await;
    let data = app.api.wait_final("echo", &id, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");
    // With one slot, a second task runs only once the first attempt has settled entirely
    // (including whatever it decided about its staged files).
    let after = app.api.submit_ok("echo", json!({ "n": 8 })).await;
    app.api.wait_final("echo", &after, WAIT).await;
    assert!(plan.calls("finish") >= 3, "{}", plan.calls("finish"));
    check_invariants(
        &app.api,
        &[(
            "echo",
            &id,
            Want::Success(&[("result.json", "{\n  \"n\": 7\n}")]),
        )],
    )
    .await;
}

#[tokio::test]
async fn a_worker_is_told_503_when_its_outcome_could_not_be_written_and_finishes_once_later() {
    let (app, plan) = TestApp::start_with_faults(|c| {
        c.models = models(WORKER_MODEL);
        c.server.lease = Duration::from_secs(1);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({})).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (status, body) = w.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = w.upload(&id, "out.txt", &lease, "done").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    plan.inject_next("finish", 1_000_000, Fault::Fail);
    let (status, body) = w.complete(&id, &lease, &["out.txt"]).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, &[]);
    plan.clear();
    let (_, s) = app.api.status("remote", &id).await;
    assert_ne!(
        s["data"]["state"], "success",
        "reported before written: {s}"
    );
    assert!(s["data"].get("resultJson").is_none(), "{s}");

    // Report again while the lease holds; if it ended meanwhile, the task is claimed anew.
    let (status, body) = w.complete(&id, &lease, &["out.txt"]).await;
    let final_lease = match status {
        StatusCode::OK => lease.clone(),
        StatusCode::CONFLICT => {
            let (again_id, again) = ids(&w.claim_until(&["remote"]).await);
            assert_eq!(again_id, id);
            let (status, body) = w.upload(&id, "out.txt", &again, "done").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let (status, body) = w.complete(&id, &again, &["out.txt"]).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            again
        }
        other => panic!("the second report answered {other}: {body}"),
    };
    let data = app.api.wait_final("remote", &id, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");
    // Success is written once: every later report is refused, and the state does not move.
    for l in [&lease, &final_lease] {
        let (status, body) = w.complete(&id, l, &["out.txt"]).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
    }
    let (_, s) = app.api.status("remote", &id).await;
    assert_eq!(s["data"]["completeTime"], data["completeTime"], "{s}");
    check_invariants(
        &app.api,
        &[("remote", &id, Want::Success(&[("out.txt", "done")]))],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Failure messages are cleaned.

const DIRTY_MSG: &str = "bad\u{0} input \u{1b}[31mred\u{1b}[0m\u{7} done";

/// A worker fails the task with a message holding NUL, ANSI escapes and a bell; the stored
/// message is clean but keeps the text.
async fn fail_with_a_dirty_message(app: &TestApp, token: &str) {
    let w = Worker::new(&app.api.base, token);
    let id = app.api.submit_ok("remote", json!({})).await;
    let (_, lease) = ids(&w.claim(&["remote"], 5000).await.expect("no task"));
    let (status, body) = w
        .fail(
            &id,
            &lease,
            json!({ "failCode": "WORKER_\u{0}ERROR", "failMsg": DIRTY_MSG, "retryable": false }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = app.api.wait_final("remote", &id, WAIT).await;
    assert_eq!(data["state"], "failed", "{data}");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(
        !msg.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{msg:?}"
    );
    for word in ["bad", "input", "[31mred", "done"] {
        assert!(msg.contains(word), "{msg:?} lost {word:?}");
    }
    check_invariants(&app.api, &[("remote", &id, Want::Failed("WORKER_ERROR"))]).await;
}

#[tokio::test]
async fn a_failure_message_with_nul_and_escapes_is_stored_clean_on_sqlite() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    fail_with_a_dirty_message(&app, &token).await;
}

#[tokio::test]
async fn a_failure_message_with_nul_and_escapes_is_stored_clean_on_postgresql() {
    let Some(db) = create_db("faults on PostgreSQL").await else {
        return;
    };
    let url = db.url.clone();
    let app = TestApp::start_with(|c| {
        c.models = models(WORKER_MODEL);
        c.server.database_url = Some(taskgate_server::config::DatabaseUrl(url.clone()));
    })
    .await;
    let token = worker_token(&app.data_dir, Some(&url)).await;
    fail_with_a_dirty_message(&app, &token).await;
    app.stop().await.unwrap();
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Removing a model strands nothing.

/// A callback receiver on 127.0.0.1:0 that records every request body and answers 200.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    arrived: Arc<Notify>,
}

impl Receiver {
    async fn start() -> Receiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (b, n) = (bodies.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (b, n) = (b.clone(), n.clone());
                async move {
                    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    b.lock().unwrap().push(v);
                    n.notify_one();
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url,
            bodies,
            arrived,
        }
    }

    /// Waits (at most [`WAIT`]) for a callback about `task_id`; returns its body.
    async fn wait_for(&self, task_id: &str) -> Value {
        let find = || {
            self.bodies
                .lock()
                .unwrap()
                .iter()
                .find(|b| b["data"]["taskId"] == task_id)
                .cloned()
        };
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.arrived.notified();
                if let Some(b) = find() {
                    return b;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no callback for {task_id} within {WAIT:?}"))
    }
}

#[tokio::test]
async fn removing_a_model_fails_its_waiting_tasks_and_still_sends_their_callbacks() {
    let rx = Receiver::start().await;
    let with_gone = format!(
        "{WORKER_MODEL}\n[models.gone]\nbackend = \"worker\"\n\n[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n"
    );
    let app = TestApp::start_with(|c| {
        c.models = models(&with_gone);
        c.webhooks.allow_private_callbacks = true;
    })
    .await;
    let (status, body) = app
        .api
        .submit(
            "gone",
            json!({ "request_type": "callback", "callback_url": rx.url, "input": {} }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["data"]["taskId"].as_str().unwrap().to_owned();
    let (_, s) = app.api.status("gone", &id).await;
    assert_eq!(s["data"]["state"], "pending", "{s}");
    let dir = app.dir();
    app.stop().await.unwrap();

    let app = TestApp::start_in(dir, |c| {
        c.models = models("[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n");
        c.webhooks.allow_private_callbacks = true;
    })
    .await;
    let (status, s) = app.api.status("gone", &id).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["data"]["state"], "failed", "{s}");
    assert_eq!(s["data"]["failCode"], "MODEL_REMOVED", "{s}");
    let cb = rx.wait_for(&id).await;
    assert_eq!(cb["data"]["state"], "failed", "{cb}");
    assert_eq!(cb["data"]["failCode"], "MODEL_REMOVED", "{cb}");
    check_invariants(&app.api, &[("gone", &id, Want::Failed("MODEL_REMOVED"))]).await;
}

// ---------------------------------------------------------------------------------------------
// 9. A claim the worker never received is not lost.

#[tokio::test]
async fn a_claim_the_worker_never_acknowledged_goes_back_without_using_up_an_attempt() {
    // One attempt only: a claim wrongly counted would fail the task with ATTEMPTS_EXHAUSTED.
    let app = TestApp::start_with(|c| {
        c.models =
            models("[models.once]\nbackend = \"worker\"\ntimeout = \"30s\"\nmax_attempts = 1\n");
        c.server.lease = Duration::from_secs(1);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let w = Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("once", json!({})).await;
    // The answer to this claim is "lost": the worker never calls back with its token.
    let lost = w.claim(&["once"], 5000).await.expect("no task");
    assert_eq!(lost["attempt"], 1, "{lost}");
    let (_, lost_lease) = ids(&lost);

    let again = w.claim_until(&["once"]).await;
    let (again_id, lease) = ids(&again);
    assert_eq!(again_id, id);
    assert_eq!(again["attempt"], 1, "the lost claim was counted: {again}");
    assert_ne!(lease, lost_lease);
    let (status, body) = w.heartbeat(&id, &lost_lease).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let (status, body) = w.upload(&id, "out.txt", &lease, "found").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = w.complete(&id, &lease, &["out.txt"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_invariants(
        &app.api,
        &[("once", &id, Want::Success(&[("out.txt", "found")]))],
    )
    .await;
}
