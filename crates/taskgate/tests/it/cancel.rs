//! `POST /api/v1/cancelTask/{model}?taskId=`: a pending or running task fails with `CANCELLED`
//! and its work stops (a command's whole process tree, a pull worker's program, an attempt on
//! another node); a finished task is left alone (409); who may cancel is who may read.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_client::proto::{ErrorCode, WorkerComplete, WorkerHeartbeat};
use taskgate_client::WorkerClient;

use crate::support::*;

/// A builtin echo model that runs one task at a time, so a slow task keeps the next one pending.
const ONE_AT_A_TIME: &str = r#"
[models.one]
backend = "builtin"
builtin = "echo"
concurrency = 1
"#;

/// The fields statusTask sends for a failed task.
const FAILED_FIELDS: &[&str] = &[
    "taskId",
    "state",
    "createTime",
    "completeTime",
    "failCode",
    "failMsg",
];

/// Asserts a 200 whose data is the task failed with `CANCELLED`; returns the data.
fn assert_cancelled(status: StatusCode, body: &Value, id: &str) -> Value {
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = body["data"].clone();
    assert_eq!(data["taskId"], id, "{body}");
    assert_eq!(data["state"], "failed", "{body}");
    assert_eq!(data["failCode"], "CANCELLED", "{body}");
    assert_fields(&data, FAILED_FIELDS);
    data
}

/// The pids a `hang.sh`-style script wrote to `file` (the script, then its background child),
/// both asserted alive.
async fn running_pids(file: &std::path::Path) -> Vec<i32> {
    let pids: Vec<i32> = wait_for_file(file, Duration::from_secs(20))
        .await
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        pids.iter().all(|&p| !process_is_gone(p)),
        "the script should be running: {pids:?}"
    );
    pids
}

async fn wait_gone(pids: &[i32], within: Duration, what: &str) {
    wait_until(within, what, || async {
        pids.iter().all(|&p| process_is_gone(p))
    })
    .await;
}

#[tokio::test]
async fn a_pending_task_is_cancelled_at_once_and_its_callback_is_delivered() {
    let app = TestApp::start_with(|c| {
        c.models = taskgate_server::config::FileConfig::parse(ONE_AT_A_TIME)
            .unwrap()
            .models
            .unwrap();
        c.webhooks.allow_private_callbacks = true;
    })
    .await;
    let blocker = app
        .api
        .submit_ok("one", json!({ "delay_ms": 60_000 }))
        .await;
    app.api
        .wait_for("one", &blocker, Duration::from_secs(20), |d| {
            d["state"] == "processing"
        })
        .await;
    let (hook, mut calls) = callback_receiver().await;
    let (status, body) = app
        .api
        .submit("one", json!({ "callback_url": hook, "input": { "n": 1 } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["data"]["taskId"].as_str().unwrap().to_owned();
    let (_, before) = app.api.status("one", &id).await;
    assert_eq!(before["data"]["state"], "pending", "{before}");

    let (status, body) = app.api.cancel("one", &id).await;

    let data = assert_cancelled(status, &body, &id);
    assert!(
        data["failMsg"].as_str().unwrap().contains("pending"),
        "{data}"
    );
    let (_, after) = app.api.status("one", &id).await;
    assert_eq!(
        after["data"], data,
        "statusTask agrees with the cancel's answer"
    );
    let delivered = tokio::time::timeout(Duration::from_secs(15), calls.recv())
        .await
        .expect("no callback within 15s")
        .unwrap();
    let payload: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(payload, after, "the callback carries the cancelled status");
    // The running task was not touched; once it is cancelled too, its slot runs the next one.
    let (_, running) = app.api.status("one", &blocker).await;
    assert_eq!(running["data"]["state"], "processing", "{running}");
    let (status, body) = app.api.cancel("one", &blocker).await;
    let data = assert_cancelled(status, &body, &blocker);
    assert!(
        data["failMsg"].as_str().unwrap().contains("processing"),
        "{data}"
    );
    let next = app.api.run_to_end("one", json!({ "n": 2 })).await;
    assert_eq!(next["state"], "success", "{next}");
}

#[tokio::test]
async fn a_running_command_is_stopped_with_its_whole_process_tree() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let app = TestApp::start_with(|c| {
        let toml = command_model(
            "stuck",
            "hang.sh",
            &[pid_file.to_str().unwrap()],
            "timeout = \"5m\"",
        );
        c.models = taskgate_server::config::FileConfig::parse(&toml)
            .unwrap()
            .models
            .unwrap();
        // The first renewal comes after 20 s: what stops the program sooner is the cancel.
        c.server.lease = Duration::from_secs(60);
    })
    .await;
    let id = app.api.submit_ok("stuck", json!({})).await;
    let pids = running_pids(&pid_file).await;

    let (status, body) = app.api.cancel("stuck", &id).await;

    let data = assert_cancelled(status, &body, &id);
    wait_gone(
        &pids,
        Duration::from_secs(10),
        "the script and its background child to be killed",
    )
    .await;
    let (_, after) = app.api.status("stuck", &id).await;
    assert_eq!(after["data"], data, "nothing was written after the cancel");
}

#[tokio::test]
async fn a_finished_task_is_left_alone_and_answers_409() {
    let app = TestApp::start().await;
    for (input, state) in [
        (json!({ "n": 1 }), "success"),
        (json!({ "fail": "boom" }), "failed"),
    ] {
        let id = app.api.submit_ok("echo", input).await;
        let done = app
            .api
            .wait_final("echo", &id, Duration::from_secs(20))
            .await;
        assert_eq!(done["state"], state, "{done}");

        let (status, body) = app.api.cancel("echo", &id).await;

        assert_error(status, &body, StatusCode::CONFLICT, &[&id, state]);
        assert_eq!(error_code(&body), "task_already_final", "{body}");
        let (_, after) = app.api.status("echo", &id).await;
        assert_eq!(after["data"], done, "a cancel changed a finished task");
    }
}

#[tokio::test]
async fn another_tenants_task_another_models_and_an_unknown_one_answer_404_as_status_does() {
    let app = TestApp::start().await;
    let id = app
        .api
        .submit_ok("echo", json!({ "delay_ms": 60_000 }))
        .await;
    let other = create_key(&app.data_dir, "other-tenant", None).await;
    let stranger = app.api.with_key(&other.key);
    let unknown = "task_01hzzzzzzzzzzzzzzzzzzzzzzz";
    for (api, model, task) in [
        (&stranger, "echo", id.as_str()),
        (&app.api, "demo-image", id.as_str()),
        (&app.api, "echo", unknown),
        (&app.api, "nope", id.as_str()),
    ] {
        let (status, body) = api.cancel(model, task).await;
        let (read_status, read) = api.status(model, task).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{model} {task}: {body}");
        assert_eq!(
            (status, &body),
            (read_status, &read),
            "cancelTask and statusTask answer alike for {model} {task}"
        );
    }
    let (_, body) = app.api.status("echo", &id).await;
    assert_ne!(
        body["data"]["state"], "failed",
        "a refused cancel changed the task"
    );
    app.api.cancel("echo", &id).await;
}

#[tokio::test]
async fn a_cancel_needs_a_task_id_and_a_client_key() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let post = |path: &str, key: Option<&str>| {
        let mut req = app.api.http.post(format!("{}{path}", app.api.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        async move { envelope(req.send().await.unwrap()).await }
    };

    for path in [
        "/api/v1/cancelTask/remote",
        "/api/v1/cancelTask/remote?taskId=",
    ] {
        let (status, body) = post(path, Some(API_KEY)).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &["taskId"]);
        assert_eq!(error_code(&body), "invalid_input");
    }
    let (status, body) = post("/api/v1/cancelTask/nope", Some(API_KEY)).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &["nope"]);
    assert_eq!(error_code(&body), "model_not_found");
    let (status, body) = post("/api/v1/cancelTask/remote?taskId=task_x", Some(&token)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["worker token"]);
    let (status, body) = post("/api/v1/cancelTask/remote?taskId=task_x", None).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        &["missing API key"],
    );
    let resp = app
        .api
        .request(
            reqwest::Method::GET,
            "/api/v1/cancelTask/remote?taskId=task_x",
        )
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::METHOD_NOT_ALLOWED, &["GET"]);
}

#[tokio::test]
async fn a_pull_workers_cancelled_task_is_refused_at_its_next_heartbeat() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let worker = WorkerClient::new(&app.api.base, token).unwrap();
    let id = app.api.submit_ok("remote", json!({})).await;
    let task = worker
        .claim(&["remote"], Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a claim");
    assert_eq!(task.task_id, id);
    let beat = WorkerHeartbeat {
        lease_token: task.lease_token.clone(),
        progress: Some(0.5),
        logs: vec![],
    };
    worker.heartbeat(&id, &beat).await.unwrap();

    let (status, body) = app.api.cancel("remote", &id).await;

    assert_cancelled(status, &body, &id);
    let refused = worker.heartbeat(&id, &beat).await.unwrap_err();
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::LeaseLost),
        "{refused}"
    );
    assert!(refused.to_string().contains("cancelled"), "{refused}");
    let done = WorkerComplete {
        lease_token: task.lease_token.clone(),
        outputs: vec!["out.png".into()],
    };
    let refused = worker.complete(&id, &done).await.unwrap_err();
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::LeaseLost),
        "{refused}"
    );
    let (_, after) = app.api.status("remote", &id).await;
    assert_eq!(after["data"]["failCode"], "CANCELLED", "{after}");
}

#[tokio::test]
async fn taskgate_worker_kills_the_program_of_a_task_cancelled_under_it() {
    let app = TestApp::start_with(|c| {
        c.models = taskgate_server::config::FileConfig::parse(WORKER_MODEL)
            .unwrap()
            .models
            .unwrap();
        // Heartbeats every 300 ms.
        c.server.lease = Duration::from_millis(900);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let pid_file = app.data_dir.join("worker-pids");
    let script = format!(
        "sleep 300 & echo \"$$ $!\" > {p}.tmp && mv {p}.tmp {p}; wait",
        p = pid_file.display()
    );
    let mut worker = taskgate_command(&[
        "worker",
        "--server",
        &app.api.base,
        "--token",
        &token,
        "--model",
        "remote",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let id = app.api.submit_ok("remote", json!({})).await;
    let pids = running_pids(&pid_file).await;

    let (status, body) = app.api.cancel("remote", &id).await;

    assert_cancelled(status, &body, &id);
    wait_gone(
        &pids,
        Duration::from_secs(10),
        "the worker to kill its program and the program's child",
    )
    .await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker itself should keep running"
    );
}

#[tokio::test]
async fn an_attempt_whose_claim_is_taken_away_unannounced_stops_at_its_next_renewal() {
    // A cancel written by someone who could not tell this node (as when a notice is lost): the
    // attempt's lease renewal, refused, stops the program.
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let app = TestApp::start_with(|c| {
        let toml = command_model(
            "stuck",
            "hang.sh",
            &[pid_file.to_str().unwrap()],
            "timeout = \"5m\"",
        );
        c.models = taskgate_server::config::FileConfig::parse(&toml)
            .unwrap()
            .models
            .unwrap();
        c.server.lease = Duration::from_millis(900);
    })
    .await;
    let id = app.api.submit_ok("stuck", json!({})).await;
    let pids = running_pids(&pid_file).await;

    let db = format!(
        "sqlite://{}",
        taskgate_server::database_path(&app.data_dir).display()
    );
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE tasks SET state = 'failed', fail_code = 'CANCELLED', fail_msg = 'by hand', \
         complete_time = 1, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
    )
    .bind(&id)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();

    wait_gone(
        &pids,
        Duration::from_secs(10),
        "the attempt to stop its program at the refused renewal",
    )
    .await;
    let (_, after) = app.api.status("stuck", &id).await;
    assert_eq!(after["data"]["failMsg"], "by hand", "{after}");
}

#[tokio::test]
async fn a_cancel_on_one_node_stops_the_attempt_running_on_another_at_once() {
    let Some(db) = create_db("PostgreSQL cancel across nodes").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let config = dir.path().join("models.toml");
    std::fs::write(
        &config,
        command_model(
            "stuck",
            "hang.sh",
            &[pid_file.to_str().unwrap()],
            "timeout = \"5m\"",
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    // A lease long enough that a renewal (every 20 s) cannot be what stops the attempt.
    let flags = ["--database-url", db.url.as_str(), "--lease", "60s"];
    let runner = ServerProcess::spawn_with(&data, Some(&config), &flags).await;
    let id = runner.api.submit_ok("stuck", json!({})).await;
    let pids = running_pids(&pid_file).await;
    // Started only now, so the attempt is surely the first node's.
    let other = ServerProcess::spawn_with(&data, Some(&config), &flags).await;

    let (status, body) = other.api.cancel("stuck", &id).await;

    let data = assert_cancelled(status, &body, &id);
    // Well within the first renewal (20 s): the cancel's notice stopped it.
    wait_gone(
        &pids,
        Duration::from_secs(10),
        "the other node to stop its attempt",
    )
    .await;
    let (_, seen) = runner.api.status("stuck", &id).await;
    assert_eq!(seen["data"], data, "both nodes agree");
    runner.terminate().await;
    other.terminate().await;
    db.drop_db().await;
}
