//! Dispatch: per-model concurrency, timeouts, and models that do not wait on each other.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_model_never_runs_more_tasks_at_once_than_its_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().to_str().unwrap();
    let app = TestApp::start_with_models(&command_model(
        "pair",
        "overlap.sh",
        &[record],
        "concurrency = 2",
    ))
    .await;

    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(app.api.submit_ok("pair", json!({ "i": i })).await);
    }
    // statusTask reads one task at a time, so it cannot prove a bound on the whole model; the
    // script does: each run counts the runs active when it starts.
    for id in &ids {
        let data = app
            .api
            .wait_final("pair", id, Duration::from_secs(30))
            .await;
        assert_eq!(data["state"], "success", "{data}");
    }

    let counts = std::fs::read_to_string(dir.path().join("counts")).unwrap();
    let counts: Vec<u32> = counts.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(counts.len(), 6, "each task ran once: {counts:?}");
    let most = counts.iter().copied().max().unwrap();
    assert_eq!(
        most, 2,
        "runs active at once, as each run saw it: {counts:?}"
    );
}

#[tokio::test]
async fn a_task_longer_than_the_models_timeout_fails_with_processing_timeout() {
    let app = TestApp::start_with_models(
        r#"
        [models.quick]
        backend = "builtin"
        builtin = "echo"
        timeout = "300ms"
        max_attempts = 3
        "#,
    )
    .await;

    let data = app
        .api
        .run_to_end("quick", json!({ "delay_ms": 20_000 }))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "PROCESSING_TIMEOUT");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("quick") && msg.contains("300ms"), "{msg}");
    let took = data["completeTime"].as_i64().unwrap() - data["createTime"].as_i64().unwrap();
    assert!(
        took < 5_000,
        "a timeout is not retried, yet the task took {took} ms"
    );
}

#[tokio::test]
async fn a_busy_model_does_not_hold_up_another_model() {
    let app = TestApp::start_with_models(
        r#"
        [models.slow]
        backend = "builtin"
        builtin = "echo"
        concurrency = 1

        [models.fast]
        backend = "builtin"
        builtin = "echo"
        concurrency = 1
        "#,
    )
    .await;
    let slow = app
        .api
        .submit_ok("slow", json!({ "delay_ms": 5_000 }))
        .await;
    app.api
        .wait_for("slow", &slow, Duration::from_secs(10), |d| {
            d["state"] == "processing"
        })
        .await;

    let data = app.api.run_to_end("fast", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let (_, body) = app.api.status("slow", &slow).await;
    assert_eq!(body["data"]["state"], "processing", "{body}");
}

#[tokio::test]
async fn many_tasks_submitted_at_once_all_complete() {
    let app = TestApp::start().await;

    let mut submits = Vec::new();
    for i in 0..40 {
        let api = app.api.clone();
        submits.push(tokio::spawn(async move {
            api.submit_ok("echo", json!({ "i": i })).await
        }));
    }
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.unwrap());
    }

    for id in &ids {
        let data = app
            .api
            .wait_final("echo", id, Duration::from_secs(30))
            .await;
        assert_eq!(data["state"], "success", "{data}");
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 40);
}
