//! Priority and deadlines on generateTask: higher priorities start first within a model; a task
//! not started before `ttl_seconds` fails with EXPIRED and its callback is sent.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

const LONG: Duration = Duration::from_secs(30);

/// One slot; each task appends its id to `log` when it starts, then waits for `gate`.
async fn one_slot_app(log: &Path, gate: &Path) -> TestApp {
    let script = format!(
        "echo \"$TASKGATE_TASK_ID\" >> {log}; while [ ! -e {gate} ]; do sleep 0.02; done; echo '{{}}' > \"$TASKGATE_OUTPUT_DIR/out.json\"",
        log = log.display(),
        gate = gate.display()
    );
    let models = format!(
        "[models.slot]\nbackend = \"command\"\ncommand = [\"sh\", \"-c\", {}]\nconcurrency = 1\n",
        toml_str(script)
    );
    let file = taskgate_server::config::FileConfig::parse(&models).unwrap();
    TestApp::start_with(move |c| {
        c.models = file.models.unwrap();
        // The callback receiver listens on loopback.
        c.webhooks.allow_private_callbacks = true;
    })
    .await
}

async fn submit_with(api: &Api, body: Value) -> String {
    let (status, body) = api.submit("slot", body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]["taskId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn higher_priorities_start_first_and_equal_ones_in_submit_order() {
    let dir = tempfile::tempdir().unwrap();
    let (log, gate) = (dir.path().join("order.log"), dir.path().join("gate"));
    let app = one_slot_app(&log, &gate).await;
    // The one slot is taken; everything after queues.
    let blocker = submit_with(&app.api, json!({"input": {}})).await;
    wait_for_file(&log, LONG).await;
    let low = submit_with(&app.api, json!({"input": {}, "priority": -5})).await;
    let plain = submit_with(&app.api, json!({"input": {}})).await;
    let high = submit_with(&app.api, json!({"input": {}, "priority": 10})).await;
    let plain2 = submit_with(&app.api, json!({"input": {}, "priority": 0})).await;
    std::fs::write(&gate, "").unwrap();
    app.api.wait_final("slot", &low, LONG).await;
    let started: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(started, [blocker, high, plain, plain2, low]);
}

#[tokio::test]
async fn a_task_not_started_before_its_deadline_fails_expired_and_is_called_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, gate) = (dir.path().join("order.log"), dir.path().join("gate"));
    let app = one_slot_app(&log, &gate).await;
    let (url, mut callbacks) = callback_receiver().await;
    let _blocker = submit_with(&app.api, json!({"input": {}})).await;
    wait_for_file(&log, LONG).await;
    let late = submit_with(
        &app.api,
        json!({"input": {}, "ttl_seconds": 1, "callback_url": url}),
    )
    .await;
    let patient = submit_with(&app.api, json!({"input": {}, "ttl_seconds": 3600})).await;

    let data = app.api.wait_final("slot", &late, LONG).await;
    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "EXPIRED", "{data}");
    let body = tokio::time::timeout(LONG, callbacks.recv())
        .await
        .expect("no callback for the expired task")
        .unwrap();
    let callback: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(callback["data"]["taskId"], late.as_str(), "{callback}");
    assert_eq!(callback["data"]["failCode"], "EXPIRED", "{callback}");

    // The other deadline is far off: it runs once the slot frees, and the expired one never ran.
    std::fs::write(&gate, "").unwrap();
    let data = app.api.wait_final("slot", &patient, LONG).await;
    assert_eq!(data["state"], "success", "{data}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains(&late), "the expired task ran: {log}");
}

#[tokio::test]
async fn bad_priorities_and_deadlines_are_refused_with_the_field_named() {
    let app = TestApp::start().await;
    for (body, needle) in [
        (
            json!({"input": {}, "priority": "high"}),
            "priority must be an integer",
        ),
        (
            json!({"input": {}, "priority": 1.5}),
            "priority must be an integer from",
        ),
        (
            json!({"input": {}, "priority": 10_000_000}),
            "priority must be an integer from",
        ),
        (
            json!({"input": {}, "ttl_seconds": 0}),
            "ttl_seconds must be an integer from 1",
        ),
        (json!({"input": {}, "ttl_seconds": -3}), "ttl_seconds"),
        (json!({"input": {}, "ttl_seconds": 99_999_999}), "30 days"),
        (
            json!({"input": {}, "ttl_seconds": "60"}),
            "ttl_seconds must be an integer",
        ),
    ] {
        let (status, resp) = app.api.submit("echo", body.clone()).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, &[needle]);
    }
    let (status, resp) = app
        .api
        .submit(
            "echo",
            json!({"input": {}, "priority": -3, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
}
