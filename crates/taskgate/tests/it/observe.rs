//! Logs and traces (docs/logs-and-traces.md): every JSON log line about a task carries its
//! `taskId` and `model`; with the `otel` feature, spans reach an OTLP receiver, the attempt's
//! linked to the submit's.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Modules whose every line is about one task (an attempt, its backend, its reports, its
/// outcome, a delivery of its callback). A healthy run logs nothing else from them.
const TASK_TARGETS: &[&str] = &[
    "taskgate_server::dispatch::attempt",
    "taskgate_server::dispatch::completer",
    "taskgate_server::dispatch::reports",
    "taskgate_server::backends",
    "taskgate_server::webhooks",
    "taskgate_server::api::worker",
];

/// `name` as the line carries it: among its own fields or those of a span it is in.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    let spans = line["spans"].as_array().into_iter().flatten();
    std::iter::once(&line["fields"])
        .chain(std::iter::once(&line["span"]))
        .chain(spans)
        .find_map(|obj| obj.get(name).and_then(Value::as_str))
}

/// A config with a builtin `echo` and a `flaky` command that fails its first run with exit 75.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let counter = dir.join("runs");
    let config = dir.join("taskgate.toml");
    std::fs::write(
        &config,
        format!(
            "[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n\n{}",
            command_model(
                "flaky",
                "tempfail.sh",
                &[counter.to_str().unwrap(), "1"],
                "max_attempts = 3"
            )
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn every_json_log_line_about_a_task_carries_its_task_id_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let server = ServerProcess::spawn_full(
        &dir.path().join("data"),
        Some(&config),
        &[
            "--log-format",
            "json",
            "--retry-backoff",
            "10ms",
            "--allow-private-callbacks",
        ],
        // Debug: the per-attempt success line and the per-request spans are debug.
        &[("RUST_LOG", "taskgate=debug")],
    )
    .await;
    let (hook, mut callbacks) = callback_receiver().await;

    // A success with a callback, a failure, and a retry that then succeeds.
    let (status, body) = server
        .api
        .submit(
            "echo",
            json!({ "request_type": "callback", "callback_url": hook, "input": { "n": 1 } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let delivered = body["data"]["taskId"].as_str().unwrap().to_owned();
    let failed = server
        .api
        .submit_ok("echo", json!({ "fail": "boom" }))
        .await;
    let retried = server.api.submit_ok("flaky", json!({})).await;
    let wait = Duration::from_secs(20);
    let final_states = [
        server.api.wait_final("echo", &delivered, wait).await["state"].clone(),
        server.api.wait_final("echo", &failed, wait).await["state"].clone(),
        server.api.wait_final("flaky", &retried, wait).await["state"].clone(),
    ];
    assert_eq!(final_states, ["success", "failed", "success"]);
    tokio::time::timeout(wait, callbacks.recv())
        .await
        .expect("no callback within 20s")
        .unwrap();
    // The delivery's line is written after the receiver answered: stop the server (which
    // finishes its deliveries) before reading the log.
    let log_path = server.log.clone();
    assert!(server.terminate().await.success());
    let log = std::fs::read_to_string(&log_path).unwrap();

    let models = [
        (delivered.as_str(), "echo"),
        (failed.as_str(), "echo"),
        (retried.as_str(), "flaky"),
    ];
    let mut checked = Vec::new();
    for text in log.lines().filter(|l| !l.trim().is_empty()) {
        let line: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {text}"));
        let target = line["target"].as_str().unwrap_or_default();
        let named = models.iter().find(|(id, _)| text.contains(id));
        let task_target = TASK_TARGETS.iter().any(|t| target.starts_with(t));
        if named.is_none() && !task_target {
            continue;
        }
        let task_id = field(&line, "taskId")
            .unwrap_or_else(|| panic!("a line about a task without taskId: {text}"));
        let model = field(&line, "model")
            .unwrap_or_else(|| panic!("a line about a task without model: {text}"));
        let (_, want_model) = models
            .iter()
            .find(|(id, _)| *id == task_id)
            .unwrap_or_else(|| panic!("taskId {task_id} is none of this test's tasks: {text}"));
        assert_eq!(model, *want_model, "{text}");
        checked.push((
            task_id.to_owned(),
            line["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    // The workload's lines were there to check: each outcome, the retry and the delivery.
    for (task, message) in [
        (&delivered, "succeeded"),
        (&delivered, "callback delivered"),
        (&failed, "failed"),
        (&retried, "attempt failed; will retry"),
        (&retried, "succeeded"),
    ] {
        assert!(
            checked.iter().any(|(t, m)| t == task && m == message),
            "no {message:?} line for {task} among {checked:?}\n{log}"
        );
    }
}
