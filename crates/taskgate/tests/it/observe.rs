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

/// Each task's stored `trace_parent`, by task id (read after the server stopped).
async fn stored_trace_parents(data_dir: &Path) -> Vec<(String, Option<String>)> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(data_dir.join("taskgate.db"));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let rows = sqlx::query_as("SELECT id, trace_parent FROM tasks ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
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
    // No exporter: the submits stored no trace context.
    let parents = stored_trace_parents(&dir.path().join("data")).await;
    assert_eq!(parents.len(), 3);
    assert!(parents.iter().all(|(_, p)| p.is_none()), "{parents:?}");

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

/// Spans as an OTLP/HTTP receiver gets them with `http/json`: every span of every request, in
/// arrival order.
#[cfg(feature = "otel")]
async fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::sync::{Arc, Mutex};
    type Spans = Arc<Mutex<Vec<Value>>>;
    async fn traces(
        axum::extract::State(spans): axum::extract::State<Spans>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::Json<Value> {
        let mut got = spans.lock().unwrap();
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"].clone();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    let mut span = span.clone();
                    span["resourceAttributes"] = service.clone();
                    got.push(span);
                }
            }
        }
        axum::Json(json!({}))
    }
    let spans: Spans = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

/// An OTLP attribute's value as text, whatever its type.
#[cfg(feature = "otel")]
fn attribute(span: &Value, key: &str) -> Option<String> {
    let kv = span["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == key)?;
    let value = kv["value"].as_object()?.values().next()?;
    Some(match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[cfg(feature = "otel")]
#[tokio::test]
async fn spans_reach_the_otlp_endpoint_and_the_attempt_links_to_its_submit() {
    let (endpoint, spans) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let server = ServerProcess::spawn_full(
        &dir.path().join("data"),
        Some(&config),
        &["--otlp-endpoint", &endpoint],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_SERVICE_NAME", "taskgate-under-test"),
            // Export within 50 ms of a span's end rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;

    // The caller is in a trace of its own: the request's span joins it.
    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let response = server
        .api
        .request(reqwest::Method::POST, "/api/v1/generateTask/echo")
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({ "input": { "n": 1 } }))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(response).await;
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["taskId"].as_str().unwrap().to_owned();
    let data = server
        .api
        .wait_final("echo", &task_id, Duration::from_secs(20))
        .await;
    assert_eq!(data["state"], "success", "{data}");

    let find = |spans: &[Value]| {
        let submit = spans
            .iter()
            .find(|s| s["name"] == "POST /api/v1/generateTask/{model}")?
            .clone();
        let attempt = spans
            .iter()
            .find(|s| {
                s["name"] == "attempt" && attribute(s, "taskId").as_deref() == Some(&task_id)
            })?
            .clone();
        Some((submit, attempt))
    };
    let mut found = None;
    wait_until(
        Duration::from_secs(20),
        "the submit and attempt spans",
        || {
            let got = find(&spans.lock().unwrap());
            let done = got.is_some();
            found = got;
            async move { done }
        },
    )
    .await;
    let (submit, attempt) = found.unwrap();
    let everything = spans.lock().unwrap().clone();
    let context = || format!("submit: {submit:#}\nattempt: {attempt:#}\nall: {everything:#?}");

    // The request's span: a server span with its route and status, under our service name.
    assert_eq!(submit["kind"], 2, "not SPAN_KIND_SERVER: {}", context());
    assert_eq!(
        attribute(&submit, "http.route").as_deref(),
        Some("/api/v1/generateTask/{model}"),
        "{}",
        context()
    );
    assert_eq!(
        attribute(&submit, "http.response.status_code").as_deref(),
        Some("200"),
        "{}",
        context()
    );
    let service = submit["resourceAttributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv["key"] == "service.name")
        .map(|kv| kv["value"]["stringValue"].clone());
    assert_eq!(service, Some(json!("taskgate-under-test")), "{}", context());
    assert_eq!(submit["traceId"], CALLER_TRACE, "{}", context());
    assert_eq!(submit["parentSpanId"], CALLER_SPAN, "{}", context());
    // The attempt's span: the task and model, its own trace, linked to the submit's span.
    assert_eq!(
        attribute(&attempt, "model").as_deref(),
        Some("echo"),
        "{}",
        context()
    );
    assert_ne!(attempt["traceId"], submit["traceId"], "{}", context());
    let links = attempt["links"].as_array().cloned().unwrap_or_default();
    assert!(
        links
            .iter()
            .any(|l| l["traceId"] == submit["traceId"] && l["spanId"] == submit["spanId"]),
        "the attempt does not link to the submit: {}",
        context()
    );
    server.terminate().await;
    // What carried the link across the queue: the submit's W3C traceparent, kept with the task.
    let parents = stored_trace_parents(&dir.path().join("data")).await;
    let traceparent = format!(
        "00-{}-{}-01",
        submit["traceId"].as_str().unwrap(),
        submit["spanId"].as_str().unwrap()
    );
    assert_eq!(parents, vec![(task_id, Some(traceparent))]);
}

#[cfg(not(feature = "otel"))]
#[tokio::test]
async fn without_the_otel_feature_an_otlp_endpoint_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        taskgate_command(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
        ])
        .env("TASKGATE_API_KEY", API_KEY)
        .output(),
    )
    .await
    .expect("taskgate serve did not exit within 30s")
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("built without trace export") && stderr.contains("--features otel"),
        "{stderr}"
    );
}
