//! Pull workers: the real `taskgate worker` binary against a real server.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{post, put};
use axum::Router;
use serde_json::json;

use crate::support::*;

/// Starts `taskgate worker` running `sh -c SCRIPT` per task.
pub(crate) fn spawn_worker(base: &str, token: &str, script: &str) -> tokio::process::Child {
    taskgate_command(&[
        "worker", "--server", base, "--token", token, "--model", "remote", "--", "sh", "-c", script,
    ])
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    // Quiet: the worker's log would read like failures in a passing run.
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap()
}

#[tokio::test]
async fn a_pull_worker_runs_the_task_and_its_outputs_become_results() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let _worker = spawn_worker(
        &app.api.base,
        &token,
        r#"cat > "$TASKGATE_OUTPUT_DIR/input.json"; echo "ran $TASKGATE_TASK_ID" > "$TASKGATE_OUTPUT_DIR/log.txt""#,
    );
    let id = app.api.submit_ok("remote", json!({ "prompt": "hi" })).await;
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(30))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    let urls = result_urls(&data);
    assert_eq!(urls.len(), 2);
    let input_url = urls.iter().find(|u| u.contains("/input.json?")).unwrap();
    let body: serde_json::Value = reqwest::get(input_url).await.unwrap().json().await.unwrap();
    assert_eq!(body, json!({ "prompt": "hi" }));
    let log_url = urls.iter().find(|u| u.contains("/log.txt?")).unwrap();
    assert_eq!(
        reqwest::get(log_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim(),
        format!("ran {id}")
    );
}

#[tokio::test]
async fn a_failing_program_on_a_worker_fails_the_task_with_its_stderr() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let _worker = spawn_worker(
        &app.api.base,
        &token,
        "echo 'CUDA out of memory' >&2; exit 3",
    );
    let id = app.api.submit_ok("remote", json!({})).await;
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(30))
        .await;
    assert_eq!(data["state"], "failed");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    assert!(
        data["failMsg"]
            .as_str()
            .unwrap()
            .contains("CUDA out of memory"),
        "{data}"
    );
}

#[tokio::test]
async fn worker_tokens_and_client_keys_cannot_stand_in_for_each_other() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let (status, body) = app
        .api
        .with_key(&token)
        .submit("remote", json!({ "input": {} }))
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("worker token"));
    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/worker/claim", app.api.base))
        .bearer_auth(&app.api.key)
        .json(&json!({ "models": ["remote"] }))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, 401, "{body}");
    // A worker may not claim a model the server runs itself.
    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/worker/claim", app.api.base))
        .bearer_auth(&token)
        .json(&json!({ "models": ["echo"] }))
        .send()
        .await
        .unwrap();
    let (status, _) = envelope(resp).await;
    assert!(status == 400 || status == 404, "{status}");
}

#[tokio::test]
async fn a_worker_killed_mid_task_loses_only_its_lease_and_another_worker_finishes() {
    let app = TestApp::start_with(|c| {
        c.models = taskgate_server::config::FileConfig::parse(WORKER_MODEL)
            .unwrap()
            .models
            .unwrap();
        c.server.lease = Duration::from_millis(900);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let marker = app.data_dir.join("first-started");
    let mut first = spawn_worker(
        &app.api.base,
        &token,
        &format!("touch {}; sleep 20", marker.display()),
    );
    let id = app.api.submit_ok("remote", json!({})).await;
    wait_for_file_exists(&marker).await;
    app.api
        .wait_for("remote", &id, Duration::from_secs(10), |d| {
            d["state"] == "processing"
        })
        .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    let _second = spawn_worker(
        &app.api.base,
        &token,
        r#"echo second > "$TASKGATE_OUTPUT_DIR/out.txt""#,
    );
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(30))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    let url = &result_urls(&data)[0];
    assert_eq!(
        reqwest::get(url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim(),
        "second"
    );
}

async fn wait_for_file_exists(path: &Path) {
    wait_until(
        Duration::from_secs(20),
        &format!("{} to exist", path.display()),
        || {
            let exists = path.exists();
            async move { exists }
        },
    )
    .await;
}

#[tokio::test]
async fn a_worker_given_a_refused_token_exits_with_a_clear_error_instead_of_retrying() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let mut cmd = taskgate_command(&[
        "worker",
        "--server",
        &app.api.base,
        "--token",
        API_KEY,
        "--model",
        "remote",
        "--",
        "true",
    ]);
    let out = cmd.output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("the worker kept retrying a refused token")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused this worker's token"), "{stderr}");
}

#[tokio::test]
async fn a_retried_task_does_not_show_the_previous_attempts_progress() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let id = app.api.submit_ok("remote", json!({})).await;
    let claim = |wait: u64| {
        let api = app.api.clone();
        let token = token.clone();
        async move {
            let resp = api
                .http
                .post(format!("{}/api/v1/worker/claim", api.base))
                .bearer_auth(&token)
                .json(&json!({ "models": ["remote"], "waitMs": wait }))
                .send()
                .await
                .unwrap();
            let (status, body) = envelope(resp).await;
            assert_eq!(status, 200, "{body}");
            body["data"].clone()
        }
    };
    let task = claim(5000).await;
    assert_eq!(task["taskId"], id.as_str());
    let lease = task["leaseToken"].as_str().unwrap().to_owned();
    let post = |path: String, body: serde_json::Value| {
        let api = app.api.clone();
        let token = token.clone();
        async move {
            let resp = api
                .http
                .post(format!("{}{path}", api.base))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            envelope(resp).await
        }
    };
    let (status, _) = post(
        format!("/api/v1/worker/tasks/{id}/heartbeat"),
        json!({ "leaseToken": lease, "progress": 0.5 }),
    )
    .await;
    assert_eq!(status, 200);
    let (_, s) = app.api.status("remote", &id).await;
    assert_eq!(s["data"]["progress"], 0.5);
    let (status, _) = post(
        format!("/api/v1/worker/tasks/{id}/fail"),
        json!({ "leaseToken": lease, "failMsg": "try again", "retryable": true }),
    )
    .await;
    assert_eq!(status, 200);
    // The stale token is refused once the task was handed back.
    let (status, _) = post(
        format!("/api/v1/worker/tasks/{id}/heartbeat"),
        json!({ "leaseToken": lease }),
    )
    .await;
    assert_eq!(status, 409);
    let again = claim(10_000).await;
    assert_eq!(again["attempt"], 2);
    let (_, s) = app.api.status("remote", &id).await;
    assert_eq!(s["data"]["state"], "processing");
    assert!(s["data"].get("progress").is_none(), "{s}");
}

/// What a worker did with the one task a [`StubWorkerApi`] handed it, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// A heartbeat, and whether the program had started by then.
    Heartbeat {
        program_started: bool,
    },
    /// A heartbeat answered 409: the task was handed on.
    HeartbeatRefused,
    UploadStarted,
    UploadDone,
    /// A `complete` call and the status it was answered with.
    Complete(u16),
    Fail,
}

/// How a [`StubWorkerApi`] behaves.
#[derive(Clone)]
struct StubScript {
    lease_ms: u64,
    /// How long each upload takes to be answered.
    upload_delay: Duration,
    /// How many `complete` calls are answered 503 before one is taken.
    complete_503s: usize,
    /// The file the task's program creates first thing.
    program_marker: std::path::PathBuf,
    /// Answer heartbeats 409 once an upload has started.
    lose_lease_while_uploading: bool,
}

/// A stand-in for the server's worker API: hands out one task, then no more, and records every
/// call the worker makes about it. It lets a test control what the real server would not: a
/// slow upload, a `complete` answered 503.
#[derive(Clone)]
struct StubWorkerApi {
    script: StubScript,
    claimed: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl StubWorkerApi {
    async fn start(script: StubScript) -> (StubWorkerApi, String) {
        let stub = StubWorkerApi {
            script,
            claimed: Arc::default(),
            calls: Arc::default(),
        };
        let app = Router::new()
            .route("/api/v1/worker/claim", post(stub_claim))
            .route("/api/v1/worker/tasks/{id}/heartbeat", post(stub_heartbeat))
            .route("/api/v1/worker/tasks/{id}/outputs/{name}", put(stub_upload))
            .route("/api/v1/worker/tasks/{id}/complete", post(stub_complete))
            .route("/api/v1/worker/tasks/{id}/fail", post(stub_fail))
            .with_state(stub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (stub, base)
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn ok(data: serde_json::Value) -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "code": 200, "message": "success", "data": data }))
}

async fn stub_claim(State(stub): State<StubWorkerApi>) -> axum::Json<serde_json::Value> {
    if stub.claimed.swap(true, Ordering::SeqCst) {
        // A short long-poll with nothing to hand out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        return ok(serde_json::Value::Null);
    }
    ok(json!({
        "taskId": "task_stub",
        "model": "remote",
        "input": {},
        "attempt": 1,
        // Unique per claim, as the server's are: the worker names its output directory after it,
        // and stubs of tests running side by side share the temp dir.
        "leaseToken": format!("lease_stub_{}", ulid::Ulid::new()),
        "leaseMs": stub.script.lease_ms,
        "timeoutMs": 30_000,
    }))
}

async fn stub_heartbeat(State(stub): State<StubWorkerApi>) -> axum::response::Response {
    use axum::response::IntoResponse;
    if stub.script.lose_lease_while_uploading && stub.calls().contains(&Call::UploadStarted) {
        stub.record(Call::HeartbeatRefused);
        let body = json!({ "code": 409, "message": "handed on", "data": null });
        return (axum::http::StatusCode::CONFLICT, axum::Json(body)).into_response();
    }
    let program_started = stub.script.program_marker.exists();
    stub.record(Call::Heartbeat { program_started });
    ok(serde_json::Value::Null).into_response()
}

async fn stub_upload(
    State(stub): State<StubWorkerApi>,
    _body: axum::body::Bytes,
) -> axum::Json<serde_json::Value> {
    stub.record(Call::UploadStarted);
    tokio::time::sleep(stub.script.upload_delay).await;
    stub.record(Call::UploadDone);
    ok(serde_json::Value::Null)
}

async fn stub_complete(State(stub): State<StubWorkerApi>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let earlier = stub
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Complete(_)))
        .count();
    if earlier < stub.script.complete_503s {
        stub.record(Call::Complete(503));
        let body = json!({ "code": 503, "message": "try again later", "data": null });
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(body),
        )
            .into_response();
    }
    stub.record(Call::Complete(200));
    ok(serde_json::Value::Null).into_response()
}

async fn stub_fail(State(stub): State<StubWorkerApi>) -> axum::Json<serde_json::Value> {
    stub.record(Call::Fail);
    ok(serde_json::Value::Null)
}

/// Starts `taskgate worker` against `stub`, its program writing one output.
fn spawn_stub_worker(stub: &StubWorkerApi, base: &str) -> tokio::process::Child {
    let marker = stub.script.program_marker.display().to_string();
    spawn_worker(
        base,
        "tgw_stub",
        &format!(r#"touch {marker}; echo out > "$TASKGATE_OUTPUT_DIR/out.txt""#),
    )
}

/// Runs `taskgate worker` against `stub` until it has reported the outcome; returns the calls.
async fn run_stub_task(stub: &StubWorkerApi, base: &str) -> Vec<Call> {
    let _worker = spawn_stub_worker(stub, base);
    wait_until(
        Duration::from_secs(30),
        "the worker to report the outcome",
        || {
            let done = stub
                .calls()
                .iter()
                .any(|c| matches!(c, Call::Complete(200) | Call::Fail));
            async move { done }
        },
    )
    .await;
    stub.calls()
}

#[tokio::test]
async fn a_worker_acknowledges_a_claim_with_a_heartbeat_before_running_the_program() {
    let dir = tempfile::tempdir().unwrap();
    // A long lease: no regular heartbeat is due for 20 s, far longer than this task takes.
    let (stub, base) = StubWorkerApi::start(StubScript {
        lease_ms: 60_000,
        upload_delay: Duration::ZERO,
        complete_503s: 0,
        program_marker: dir.path().join("started"),
        lose_lease_while_uploading: false,
    })
    .await;

    let calls = run_stub_task(&stub, &base).await;

    assert_eq!(
        calls.first(),
        Some(&Call::Heartbeat {
            program_started: false
        }),
        "{calls:?}"
    );
    assert_eq!(calls.last(), Some(&Call::Complete(200)), "{calls:?}");
}

#[tokio::test]
async fn a_worker_keeps_its_lease_while_an_upload_takes_longer_than_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (stub, base) = StubWorkerApi::start(StubScript {
        // Heartbeats every 500 ms, each allowed 500 ms: slack for a loaded machine.
        lease_ms: 1500,
        upload_delay: Duration::from_millis(4500),
        complete_503s: 0,
        program_marker: dir.path().join("started"),
        lose_lease_while_uploading: false,
    })
    .await;

    let calls = run_stub_task(&stub, &base).await;

    let start = calls.iter().position(|c| *c == Call::UploadStarted);
    let end = calls.iter().position(|c| *c == Call::UploadDone);
    let (Some(start), Some(end)) = (start, end) else {
        panic!("no upload: {calls:?}")
    };
    let during = calls[start..end]
        .iter()
        .filter(|c| matches!(c, Call::Heartbeat { .. }))
        .count();
    // A heartbeat every 500 ms over a 4.5 s upload (three leases): at least three renewals.
    assert!(
        during >= 3,
        "{during} heartbeats during the upload: {calls:?}"
    );
    assert_eq!(calls.last(), Some(&Call::Complete(200)), "{calls:?}");
}

#[tokio::test]
async fn a_worker_retries_a_completion_answered_503_until_the_server_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (stub, base) = StubWorkerApi::start(StubScript {
        lease_ms: 3_000,
        upload_delay: Duration::ZERO,
        complete_503s: 2,
        program_marker: dir.path().join("started"),
        lose_lease_while_uploading: false,
    })
    .await;

    let calls = run_stub_task(&stub, &base).await;

    let completes: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Complete(_)))
        .collect();
    assert_eq!(
        completes,
        [
            &Call::Complete(503),
            &Call::Complete(503),
            &Call::Complete(200)
        ],
        "{calls:?}"
    );
    assert!(!calls.contains(&Call::Fail), "{calls:?}");
}

#[tokio::test]
async fn a_worker_that_loses_its_lease_while_uploading_abandons_the_task_without_reporting() {
    let dir = tempfile::tempdir().unwrap();
    let (stub, base) = StubWorkerApi::start(StubScript {
        // Long enough that a loaded machine still gets a heartbeat through before the worker
        // counts the lease lost on its own.
        lease_ms: 4000,
        upload_delay: Duration::from_millis(5000),
        complete_503s: 0,
        program_marker: dir.path().join("started"),
        lose_lease_while_uploading: true,
    })
    .await;

    let _worker = spawn_stub_worker(&stub, &base);
    // The lease is lost during the upload: a heartbeat answered 409, or (on a loaded machine)
    // no heartbeat getting through for a whole lease, which the worker counts as lost too.
    wait_until(Duration::from_secs(30), "the upload to start", || {
        let started = stub.calls().contains(&Call::UploadStarted);
        async move { started }
    })
    .await;
    // Had the worker kept going, it would report once the 5 s upload was answered.
    tokio::time::sleep(Duration::from_millis(5500)).await;

    let calls = stub.calls();
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Complete(_) | Call::Fail)),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_task_whose_stored_input_no_longer_parses_fails_at_its_first_claim() {
    use sqlx::Connection;
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let id = app.api.submit_ok("remote", json!({ "prompt": "x" })).await;
    // Someone edited the database by hand.
    let url = format!("sqlite://{}", app.data_dir.join("taskgate.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let changed = sqlx::query("UPDATE tasks SET input = 'not json' WHERE id = ?")
        .bind(&id)
        .execute(&mut db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    db.close().await.unwrap();

    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/worker/claim", app.api.base))
        .bearer_auth(&token)
        .json(&json!({ "models": ["remote"], "waitMs": 0 }))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["data"].is_null(), "the task was handed out: {body}");
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(10))
        .await;
    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "INTERNAL_ERROR", "{data}");
    assert!(
        data["failMsg"].as_str().unwrap().contains("stored input"),
        "{data}"
    );
}

#[tokio::test]
async fn a_worker_without_server_takes_the_url_from_taskgate_url_like_the_client_commands() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let _worker = taskgate_command(&[
        "worker",
        "--token",
        &token,
        "--model",
        "remote",
        "--",
        "sh",
        "-c",
        "echo ok > \"$TASKGATE_OUTPUT_DIR/out.txt\"",
    ])
    .env("TASKGATE_URL", &app.api.base)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let id = app.api.submit_ok("remote", json!({})).await;
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(30))
        .await;
    assert_eq!(data["state"], "success", "{data}");
}
