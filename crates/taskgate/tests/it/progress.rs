//! Progress, log lines and queue positions: from a command's stdout, an http upstream's ndjson
//! stream and a pull worker's heartbeats, to statusTask (`progress`, `&logs=true`,
//! `queuePosition`) and streamTask.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::*;

const LONG: Duration = Duration::from_secs(30);

/// statusTask with extra query parameters (`logs=true`, `logsAfter=…`); returns `data`.
async fn status_with(api: &Api, model: &str, task_id: &str, extra: &[(&str, &str)]) -> Value {
    let mut query = vec![("taskId", task_id)];
    query.extend_from_slice(extra);
    let resp = api
        .request(reqwest::Method::GET, &format!("/api/v1/statusTask/{model}"))
        .query(&query)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].clone()
}

/// The lines of a `logs` array.
fn lines(logs: &Value) -> Vec<String> {
    logs.as_array()
        .unwrap_or_else(|| panic!("no logs array: {logs}"))
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect()
}

fn seqs(logs: &Value) -> Vec<u64> {
    logs.as_array()
        .unwrap()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_commands_stdout_shows_as_progress_and_log_lines_in_status_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (gate1, gate2) = (dir.path().join("gate1"), dir.path().join("gate2"));
    let app = TestApp::start_with_models(&command_model(
        "report",
        "report.sh",
        &[gate1.to_str().unwrap(), gate2.to_str().unwrap()],
        "",
    ))
    .await;
    let id = app.api.submit_ok("report", json!({})).await;
    let mut stream = SseReader::open(&app.api, "report", &id, None).await;

    let data = app
        .api
        .wait_for("report", &id, LONG, |d| d["progress"] == 0.25)
        .await;
    assert_eq!(data["state"], "processing");
    assert!(data.get("logs").is_none(), "logs only when asked: {data}");
    // The lines printed around the progress line (the one after it may take a flush more).
    let deadline = tokio::time::Instant::now() + LONG;
    let with_logs = loop {
        let data = status_with(&app.api, "report", &id, &[("logs", "true")]).await;
        if data["logs"].as_array().is_some_and(|l| l.len() == 2) {
            break data;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first two lines never showed: {data}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        lines(&with_logs["logs"]),
        ["loading weights", "step 1 of 2"]
    );
    assert_eq!(seqs(&with_logs["logs"]), [1, 2]);
    assert_eq!(with_logs["progress"], 0.25);
    // The stream has sent it too before the program moves on (snapshots replace each other).
    let mut events = stream.until(|d| d["progress"] == 0.25).await;

    std::fs::write(&gate1, "").unwrap();
    app.api
        .wait_for("report", &id, LONG, |d| d["progress"] == 0.5)
        .await;
    events.extend(stream.until(|d| d["progress"] == 0.5).await);
    std::fs::write(&gate2, "").unwrap();
    let done = app.api.wait_final("report", &id, LONG).await;
    assert_eq!(done["state"], "success", "{done}");
    assert!(done.get("progress").is_none(), "{done}");

    // Every line is kept once the task is final, in order; logsAfter reads on from a line.
    let all = status_with(&app.api, "report", &id, &[("logs", "true")]).await;
    let expected = [
        "loading weights",
        "step 1 of 2",
        "halfway",
        "step 2 of 2",
        "done",
    ];
    assert_eq!(lines(&all["logs"]), expected);
    assert_eq!(seqs(&all["logs"]), [1, 2, 3, 4, 5]);
    let after = status_with(&app.api, "report", &id, &[("logsAfter", "2")]).await;
    assert_eq!(lines(&after["logs"]), ["halfway", "step 2 of 2", "done"]);
    // Without logs=true the answer is the plain (cached) one.
    let (_, plain) = app.api.status("report", &id).await;
    assert!(plain["data"].get("logs").is_none(), "{plain}");

    // The stream sent each progress and every line, once each, in order.
    events.extend(stream.until(|d| d["state"] == "success").await);
    assert!(
        stream.next().await.is_none(),
        "the stream outlived the task"
    );
    let progress: Vec<&Value> = events
        .iter()
        .filter_map(|e| e.data.get("progress"))
        .collect();
    assert!(progress.contains(&&json!(0.25)), "{events:?}");
    assert!(progress.contains(&&json!(0.5)), "{events:?}");
    let streamed: Vec<String> = events
        .iter()
        .filter_map(|e| e.data.get("logs"))
        .flat_map(lines)
        .collect();
    assert_eq!(streamed, expected);

    // A resume from an event sends exactly the lines after the ones it had.
    let mid = events
        .iter()
        .find(|e| e.data.get("logs").is_some())
        .unwrap();
    let had = seqs(&mid.data["logs"]).last().copied().unwrap();
    assert!(
        mid.id.as_deref().unwrap().ends_with(&format!(".{had}")),
        "{mid:?}"
    );
    let mut resumed = SseReader::open(&app.api, "report", &id, mid.id.as_deref()).await;
    let ev = resumed.next().await.unwrap();
    assert_eq!(ev.data["state"], "success");
    assert_eq!(lines(&ev.data["logs"]), expected[had as usize..]);
    assert!(resumed.next().await.is_none());
}

#[tokio::test]
async fn queued_tasks_show_their_place_in_line_by_priority_then_age() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = TestApp::start_with_models(&command_model(
        "one",
        "gate.sh",
        &[gate.to_str().unwrap(), marks.to_str().unwrap()],
        "concurrency = 1",
    ))
    .await;
    let blocker = app.api.submit_ok("one", json!({})).await;
    wait_for_file(&marks.join(format!("started-{blocker}-1")), LONG).await;

    let a = app.api.submit_ok("one", json!({})).await;
    let b = app.api.submit_ok("one", json!({})).await;
    let (status, body) = app
        .api
        .submit("one", json!({"input": {}, "priority": 1}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let urgent = body["data"]["taskId"].as_str().unwrap().to_owned();

    // A position is read from the store: a fresh submit's first polls may come from memory
    // without one, so each is polled until it shows.
    let mut positions = Vec::new();
    for id in [&urgent, &a, &b] {
        let data = app
            .api
            .wait_for("one", id, LONG, |d| d["queuePosition"].is_u64())
            .await;
        assert_eq!(data["state"], "pending", "{data}");
        positions.push(data["queuePosition"].as_u64().unwrap());
    }
    assert_eq!(
        positions,
        [0, 1, 2],
        "the higher priority first, then by age"
    );
    let (_, running) = app.api.status("one", &blocker).await;
    assert!(running["data"].get("queuePosition").is_none(), "{running}");

    std::fs::write(&gate, "").unwrap();
    for id in [&blocker, &urgent, &a, &b] {
        let data = app.api.wait_final("one", id, LONG).await;
        assert_eq!(data["state"], "success", "{data}");
        assert!(data.get("queuePosition").is_none(), "{data}");
    }
}

/// An upstream whose one answer is an ndjson stream of the lines the test sends it.
#[derive(Clone)]
struct NdjsonUpstream {
    lines: Arc<Mutex<Option<mpsc::UnboundedReceiver<String>>>>,
}

async fn ndjson_model(State(up): State<NdjsonUpstream>) -> axum::response::Response {
    let rx = up.lines.lock().unwrap().take().expect("one request only");
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(Bytes::from(line + "\n")), rx))
    });
    axum::response::Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap()
}

#[tokio::test]
async fn an_http_upstream_streaming_ndjson_reports_progress_then_answers_on_its_last_line() {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = NdjsonUpstream {
        lines: Arc::new(Mutex::new(Some(rx))),
    };
    let router = Router::new()
        .route("/model", post(ndjson_model))
        .with_state(up);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let app = TestApp::start_with_models(&format!(
        "[models.sd]\nbackend = \"http\"\nurl = {}\nresponse = \"json\"\nbase64_pointers = [\"/images\"]\nbase64_content_type = \"image/png\"\n",
        toml_str(format!("{base}/model"))
    ))
    .await;
    let id = app.api.submit_ok("sd", json!({"prompt": "a cat"})).await;

    tx.send(r#"{"progress": 0.3}"#.into()).unwrap();
    tx.send(r#"{"log": "denoising"}"#.into()).unwrap();
    let data = app
        .api
        .wait_for("sd", &id, LONG, |d| d["progress"] == 0.3)
        .await;
    assert_eq!(data["state"], "processing");
    // A line that is neither a report nor the last is kept as a log line, not lost.
    tx.send(r#"{"note": "warming up"}"#.into()).unwrap();
    tx.send(r#"{"progress": 0.9, "log": "encoding"}"#.into())
        .unwrap();
    app.api
        .wait_for("sd", &id, LONG, |d| d["progress"] == 0.9)
        .await;
    let png = b"\x89PNG\r\n\x1a\nstreamed png";
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    tx.send(json!({"images": [b64], "seed": 7}).to_string())
        .unwrap();
    drop(tx);

    let done = app.api.wait_final("sd", &id, LONG).await;
    assert_eq!(done["state"], "success", "{done}");
    let urls = result_urls(&done);
    assert_eq!(urls.len(), 1);
    let (_, content_type, _, bytes) = fetch_url(&urls[0]).await;
    assert_eq!(
        (content_type.as_str(), bytes.as_slice()),
        ("image/png", &png[..])
    );
    let all = status_with(&app.api, "sd", &id, &[("logs", "true")]).await;
    // The stray line became a log line when the next candidate for the answer arrived.
    assert_eq!(
        lines(&all["logs"]),
        ["denoising", "encoding", r#"{"note": "warming up"}"#]
    );
}

#[tokio::test]
async fn a_pull_workers_heartbeat_progress_and_logs_show_in_status() {
    let app = TestApp::start_with_models(WORKER_MODEL).await;
    let token = worker_token(&app.data_dir, None).await;
    let id = app.api.submit_ok("remote", json!({})).await;
    let worker = |path: String, body: Value| {
        let api = app.api.clone();
        let token = token.clone();
        async move {
            let resp = api
                .http
                .post(format!("{}/api/v1/worker/{path}", api.base))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let (status, body) = envelope(resp).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let claim = worker(
        "claim".into(),
        json!({"models": ["remote"], "waitMs": 5000}),
    )
    .await;
    assert_eq!(claim["data"]["taskId"], id.as_str());
    let lease = claim["data"]["leaseToken"].as_str().unwrap().to_owned();
    let beat = |progress: f64, logs: Value| {
        worker(
            format!("tasks/{id}/heartbeat"),
            json!({"leaseToken": lease, "progress": progress, "logs": logs}),
        )
    };

    beat(0.4, json!(["fetched the model", "step 8/20"])).await;
    let data = status_with(&app.api, "remote", &id, &[("logs", "true")]).await;
    assert_eq!(data["progress"], 0.4);
    assert_eq!(lines(&data["logs"]), ["fetched the model", "step 8/20"]);
    beat(0.8, json!(["step 16/20\u{0000}"])).await;
    let data = status_with(&app.api, "remote", &id, &[("logsAfter", "2")]).await;
    assert_eq!(data["progress"], 0.8);
    assert_eq!(lines(&data["logs"]), ["step 16/20"], "cleaned of NUL");
    assert_eq!(seqs(&data["logs"]), [3]);

    worker(
        format!("tasks/{id}/fail"),
        json!({"leaseToken": lease, "failMsg": "out of memory"}),
    )
    .await;
    let data = status_with(&app.api, "remote", &id, &[("logs", "true")]).await;
    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(lines(&data["logs"]).len(), 3, "kept after the end");
}

#[tokio::test]
async fn a_bad_logs_parameter_is_refused_naming_it() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({})).await;
    for (name, value) in [("logs", "yes"), ("logsAfter", "-3")] {
        let resp = app
            .api
            .request(reqwest::Method::GET, "/api/v1/statusTask/echo")
            .query(&[("taskId", id.as_str()), (name, value)])
            .send()
            .await
            .unwrap();
        let (status, body) = envelope(resp).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &[name]);
    }
}

#[tokio::test]
async fn log_lines_stored_through_one_node_reach_a_stream_on_another() {
    let Some(db) = create_db("log lines across PostgreSQL nodes").await else {
        return;
    };
    let models = || {
        taskgate_server::config::FileConfig::parse(WORKER_MODEL)
            .unwrap()
            .models
            .unwrap()
    };
    let node_a = TestApp::node_on(&db, |c| c.models = models()).await;
    let node_b = TestApp::node_on(&db, |c| c.models = models()).await;
    let token = worker_token(&node_a.data_dir, Some(&db.url)).await;
    let id = node_a.api.submit_ok("remote", json!({})).await;
    let mut stream = SseReader::open(&node_b.api, "remote", &id, None).await;
    let first = stream.next().await.unwrap();
    assert_eq!(first.data["state"], "pending", "{first:?}");
    assert_eq!(first.data["queuePosition"], 0, "{first:?}");

    let worker = |path: String, body: Value| {
        let api = node_a.api.clone();
        let token = token.clone();
        async move {
            let resp = api
                .http
                .post(format!("{}/api/v1/worker/{path}", api.base))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let (status, body) = envelope(resp).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let claim = worker(
        "claim".into(),
        json!({"models": ["remote"], "waitMs": 5000}),
    )
    .await;
    let lease = claim["data"]["leaseToken"].as_str().unwrap().to_owned();
    stream.until(|d| d["state"] == "processing").await;
    // Lines without a progress change: only the append's own notice can wake node B.
    worker(
        format!("tasks/{id}/heartbeat"),
        json!({"leaseToken": lease, "logs": ["on node A"]}),
    )
    .await;
    let events = stream.until(|d| d.get("logs").is_some()).await;
    let last = events.last().unwrap();
    assert_eq!(lines(&last.data["logs"]), ["on node A"]);
    assert_eq!(last.data["state"], "processing");

    node_a.stop().await.unwrap();
    node_b.stop().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_command_that_floods_stdout_is_never_held_up_and_its_newest_lines_are_kept() {
    let app = TestApp::start_with_models(&command_model("chatty", "flood.sh", &[], "")).await;
    let id = app.api.submit_ok("chatty", json!({})).await;
    let done = app.api.wait_final("chatty", &id, LONG).await;
    assert_eq!(done["state"], "success", "{done}");
    let newest = status_with(&app.api, "chatty", &id, &[("logs", "true")]).await;
    let newest = lines(&newest["logs"]);
    assert_eq!(newest.len(), 100);
    assert_eq!(
        newest.last().unwrap(),
        "line 19999",
        "the last flush came before the end"
    );
    let kept = status_with(&app.api, "chatty", &id, &[("logsAfter", "0")]).await;
    assert!(seqs(&kept["logs"]).windows(2).all(|w| w[0] < w[1]));
}
