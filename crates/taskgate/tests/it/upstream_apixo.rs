//! The `apixo` backend: our server forwards tasks to a second taskgate started by the test (the
//! upstream), or to a small fake APIXO server written here for the answers a taskgate does not
//! give on demand (429 with Retry-After, 5xx, foreign failCodes, progress, large outputs).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::support::*;

/// Our model `gen`, forwarded to `upstream_model` at `url` with the key inline.
fn apixo_model(url: &str, upstream_model: &str, key: &str, extra: &str) -> String {
    format!(
        "[models.gen]\nbackend = \"apixo\"\nurl = {}\nmodel = {}\napi_key = {}\nfirst_poll = \"50ms\"\nmax_poll = \"100ms\"\n{extra}\n",
        toml_str(url),
        toml_str(upstream_model),
        toml_str(key)
    )
}

/// The upstream's only task (the test's server forwards one task to it).
async fn only_upstream_task(upstream: &Api) -> Value {
    let (status, body) = upstream.list(&[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tasks = body["data"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{body}");
    tasks[0].clone()
}

/// Files under `dir` whose name starts with `output-` (what the backend downloads).
fn downloaded_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().starts_with("output-") {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test]
async fn a_task_forwarded_to_another_taskgate_has_its_outputs_copied_and_our_callback_sent() {
    let upstream = TestApp::start().await;
    let key = create_key(&upstream.data_dir, "gateway", None).await;
    let dir = tempfile::tempdir().unwrap();
    // The real binary, so that the key really comes from the environment.
    let config = dir.path().join("taskgate.toml");
    std::fs::write(
        &config,
        format!(
            "[webhooks]\nallow_private_callbacks = true\n\n[models.gen]\nbackend = \"apixo\"\nurl = {}\nmodel = \"demo-image\"\napi_key_env = \"UPSTREAM_APIXO_KEY\"\nfirst_poll = \"50ms\"\nmax_poll = \"100ms\"\n",
            toml_str(&upstream.api.base)
        ),
    )
    .unwrap();
    let ours = ServerProcess::spawn_full(
        &dir.path().join("data"),
        Some(&config),
        &[],
        &[("UPSTREAM_APIXO_KEY", &key.key)],
    )
    .await;
    let (hook, mut received) = callback_receiver().await;

    let (status, body) = ours
        .api
        .submit(
            "gen",
            json!({
                "request_type": "callback",
                "callback_url": hook,
                "input": { "prompt": "a fox", "width": 24, "height": 16 }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task_id = body["data"]["taskId"].as_str().unwrap().to_owned();
    let done = ours
        .api
        .wait_final("gen", &task_id, Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "success", "{done}");

    // The upstream ran it under the gateway's key, without our client's callback.
    let theirs = only_upstream_task(&upstream.api.with_key(&key.key)).await;
    assert_eq!(theirs["model"], "demo-image");
    assert_eq!(theirs["state"], "success", "{theirs}");
    let their_id = theirs["taskId"].as_str().unwrap();
    assert!(
        crate::webhooks::deliveries(&upstream.api.with_key(&key.key), their_id)
            .await
            .is_empty(),
        "the upstream was given a callback"
    );

    // Our result links are ours, and serve the upstream's bytes.
    let our_urls = result_urls(&done);
    let their_urls = result_urls(&theirs);
    assert_eq!(our_urls.len(), their_urls.len());
    for (mine, upstream_url) in our_urls.iter().zip(&their_urls) {
        assert!(mine.starts_with(&ours.api.base), "{mine}");
        let (ct, bytes) = fetch_ok(mine).await;
        let (_, original) = fetch_ok(upstream_url).await;
        assert_eq!(bytes, original);
        assert_eq!(ct, "image/png");
        assert_eq!(png_size(&bytes), (24, 16));
    }

    // Our own server sent our client's callback, with our links.
    let delivered = tokio::time::timeout(Duration::from_secs(15), received.recv())
        .await
        .expect("no callback within 15s")
        .unwrap();
    let delivered: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(delivered["data"]["taskId"], task_id.as_str());
    assert_eq!(delivered["data"]["state"], "success");
    assert_eq!(result_urls(&delivered["data"]), our_urls);
}

#[tokio::test]
async fn an_upstream_failure_fails_our_task_with_its_code_and_message() {
    let upstream = TestApp::start().await;
    let ours = TestApp::start_with_models(&apixo_model(
        &upstream.api.base,
        "echo",
        API_KEY,
        "max_attempts = 3",
    ))
    .await;

    let done = ours
        .api
        .run_to_end("gen", json!({ "fail": "the moon is made of cheese" }))
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["failCode"], "GENERATION_FAILED", "{done}");
    let msg = done["failMsg"].as_str().unwrap();
    assert!(msg.contains("the moon is made of cheese"), "{msg}");
    // A failed prediction is the model's answer: not retried, so one upstream task.
    let theirs = only_upstream_task(&upstream.api).await;
    assert_eq!(theirs["failCode"], "GENERATION_FAILED");
    assert!(msg.contains(theirs["taskId"].as_str().unwrap()), "{msg}");
}

#[tokio::test]
async fn cancelling_our_task_cancels_the_upstream_one() {
    let upstream = TestApp::start().await;
    let ours =
        TestApp::start_with_models(&apixo_model(&upstream.api.base, "echo", API_KEY, "")).await;

    let task_id = ours
        .api
        .submit_ok("gen", json!({ "delay_ms": 60000 }))
        .await;
    let up = upstream.api.clone();
    wait_until(Duration::from_secs(20), "the upstream task runs", || {
        let up = up.clone();
        async move {
            let (_, body) = up.list(&[("state", "processing")]).await;
            body["data"]["tasks"]
                .as_array()
                .is_some_and(|t| t.len() == 1)
        }
    })
    .await;
    let (status, body) = ours.api.cancel("gen", &task_id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["failCode"], "CANCELLED");

    let their_id = only_upstream_task(&upstream.api).await["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = upstream
        .api
        .wait_final("echo", &their_id, Duration::from_secs(20))
        .await;
    assert_eq!(theirs["failCode"], "CANCELLED", "{theirs}");
}

#[tokio::test]
async fn a_refused_upstream_key_fails_the_task_saying_so_without_showing_the_key() {
    let upstream = TestApp::start().await;
    let wrong = "tg_wrong-key-that-the-upstream-never-issued";
    let ours = TestApp::start_with_models(&apixo_model(
        &upstream.api.base,
        "echo",
        wrong,
        "max_attempts = 3",
    ))
    .await;

    let done = ours.api.run_to_end("gen", json!({})).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["failCode"], "MODEL_UNAVAILABLE", "{done}");
    let msg = done["failMsg"].as_str().unwrap();
    assert!(msg.contains("refused our API key"), "{msg}");
    assert!(msg.contains("401"), "{msg}");
    assert!(
        !msg.contains(wrong),
        "the key leaked into the message: {msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// A fake APIXO service. The model in the path picks the behaviour:
// `ratelimited`: the first submit answers 429 with `Retry-After: 1`, then the task succeeds;
// `down`: every submit answers 503;
// `flaky`: the first upstream task fails with MODEL_UNAVAILABLE, later ones succeed;
// `violation`: every task fails with APIXO's CONTENT_VIOLATION;
// `progress`: tasks report progress 0.4 until the test releases them, then succeed;
// `big`: tasks succeed with a 4096-byte output.

#[derive(Clone, Debug)]
struct Submit {
    at: Instant,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone, Default)]
struct Fake {
    base: Arc<Mutex<String>>,
    submits: Arc<Mutex<HashMap<String, Vec<Submit>>>>,
    released: Arc<AtomicBool>,
}

impl Fake {
    async fn start() -> Fake {
        let fake = Fake::default();
        let app = Router::new()
            .route("/api/v1/generateTask/{model}", post(fake_submit))
            .route("/api/v1/statusTask/{model}", get(fake_status))
            .route("/out/{name}", get(fake_output))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *fake.base.lock().unwrap() = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    fn submits(&self, model: &str) -> Vec<Submit> {
        self.submits
            .lock()
            .unwrap()
            .get(model)
            .cloned()
            .unwrap_or_default()
    }
}

fn envelope_of(code: StatusCode, data: Value) -> Response {
    let message = if code.is_success() {
        "success"
    } else {
        "error"
    };
    (
        code,
        Json(json!({ "code": code.as_u16(), "message": message, "data": data })),
    )
        .into_response()
}

async fn fake_submit(
    State(fake): State<Fake>,
    UrlPath(model): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer fake-key") {
        return envelope_of(StatusCode::UNAUTHORIZED, Value::Null);
    }
    let n = {
        let mut all = fake.submits.lock().unwrap();
        let calls = all.entry(model.clone()).or_default();
        calls.push(Submit {
            at: Instant::now(),
            headers,
            body,
        });
        calls.len()
    };
    match model.as_str() {
        "ratelimited" if n == 1 => {
            let mut resp = envelope_of(StatusCode::TOO_MANY_REQUESTS, Value::Null);
            resp.headers_mut()
                .insert("retry-after", "1".parse().unwrap());
            resp
        }
        "down" => envelope_of(StatusCode::SERVICE_UNAVAILABLE, Value::Null),
        _ => envelope_of(StatusCode::OK, json!({ "taskId": format!("{model}-{n}") })),
    }
}

async fn fake_status(
    State(fake): State<Fake>,
    UrlPath(model): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let task_id = q.get("taskId").cloned().unwrap_or_default();
    let base = fake.base();
    // APIXO's shapes: no createTime, resultJson a string.
    let success = |name: &str| {
        json!({
            "taskId": task_id,
            "state": "success",
            "resultJson": json!({ "resultUrls": [format!("{base}/out/{name}")] }).to_string(),
        })
    };
    let failed = |code: &str, msg: &str| json!({ "taskId": task_id, "state": "failed", "failCode": code, "failMsg": msg });
    let data = match model.as_str() {
        "flaky" if task_id.ends_with("-1") => failed("MODEL_UNAVAILABLE", "warming up"),
        "violation" => failed("CONTENT_VIOLATION", "Content violates usage policy"),
        "progress" if !fake.released.load(Ordering::SeqCst) => {
            json!({ "taskId": task_id, "state": "processing", "progress": 0.4 })
        }
        "big" => success("big.bin"),
        _ => success("a.png"),
    };
    envelope_of(StatusCode::OK, data)
}

const FAKE_PNG: &[u8] = b"\x89PNG\r\n\x1a\nfrom the fake upstream";

async fn fake_output(UrlPath(name): UrlPath<String>) -> Response {
    match name.as_str() {
        "big.bin" => vec![7u8; 4096].into_response(),
        _ => ([("content-type", "image/png")], FAKE_PNG).into_response(),
    }
}

async fn fake_and_ours(model: &str, extra: &str) -> (Fake, TestApp) {
    let fake = Fake::start().await;
    let mut toml = apixo_model(&fake.base(), model, "fake-key", extra);
    toml.push_str("timeout = \"30s\"\n");
    let ours = TestApp::start_with_models(&toml).await;
    (fake, ours)
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_the_submit_repeated_under_the_same_key() {
    let (fake, ours) = fake_and_ours("ratelimited", "max_attempts = 1").await;

    let done = ours.api.run_to_end("gen", json!({ "prompt": "hi" })).await;
    assert_eq!(done["state"], "success", "{done}");
    let urls = result_urls(&done);
    assert_eq!(urls.len(), 1);
    assert!(urls[0].starts_with(&ours.api.base), "{}", urls[0]);
    assert_eq!(fetch_ok(&urls[0]).await.1, FAKE_PNG);

    let submits = fake.submits("ratelimited");
    assert_eq!(submits.len(), 2);
    assert!(
        submits[1].at - submits[0].at >= Duration::from_millis(900),
        "Retry-After: 1 was not honoured"
    );
    let key = |s: &Submit| s.headers["idempotency-key"].to_str().unwrap().to_owned();
    assert_eq!(key(&submits[0]), key(&submits[1]));
    let task_id = done["taskId"].as_str().unwrap();
    assert!(key(&submits[0]).contains(task_id), "{}", key(&submits[0]));
    // The input is forwarded as given, in async mode.
    assert_eq!(submits[0].body["input"], json!({ "prompt": "hi" }));
    assert_eq!(submits[0].body["request_type"], "async");
    assert!(submits[0].body.get("callback_url").is_none());
}

#[tokio::test]
async fn an_upstream_that_keeps_answering_503_fails_the_task_as_unavailable() {
    let (fake, ours) = fake_and_ours("down", "max_attempts = 1").await;

    let done = ours.api.run_to_end("gen", json!({})).await;
    assert_eq!(done["failCode"], "MODEL_UNAVAILABLE", "{done}");
    assert!(done["failMsg"].as_str().unwrap().contains("503"), "{done}");
    // The request was retried with backoff before the attempt gave up.
    assert!(fake.submits("down").len() > 1);
}

#[tokio::test]
async fn a_transient_upstream_failure_is_retried_as_a_new_upstream_task() {
    let (fake, ours) = fake_and_ours("flaky", "max_attempts = 2").await;

    let done = ours.api.run_to_end("gen", json!({})).await;
    assert_eq!(done["state"], "success", "{done}");
    let submits = fake.submits("flaky");
    assert_eq!(submits.len(), 2);
    assert_ne!(
        submits[0].headers["idempotency-key"],
        submits[1].headers["idempotency-key"]
    );
}

#[tokio::test]
async fn a_foreign_fail_code_becomes_generation_failed_and_is_not_retried() {
    let (fake, ours) = fake_and_ours("violation", "max_attempts = 3").await;

    let done = ours.api.run_to_end("gen", json!({})).await;
    assert_eq!(done["failCode"], "GENERATION_FAILED", "{done}");
    let msg = done["failMsg"].as_str().unwrap();
    assert!(msg.contains("CONTENT_VIOLATION"), "{msg}");
    assert!(msg.contains("Content violates usage policy"), "{msg}");
    assert_eq!(fake.submits("violation").len(), 1);
}

#[tokio::test]
async fn the_upstreams_progress_shows_in_our_status() {
    let (fake, ours) = fake_and_ours("progress", "").await;

    let task_id = ours.api.submit_ok("gen", json!({})).await;
    ours.api
        .wait_for("gen", &task_id, Duration::from_secs(20), |d| {
            d["progress"].as_f64() == Some(0.4)
        })
        .await;
    fake.released.store(true, Ordering::SeqCst);
    let done = ours
        .api
        .wait_final("gen", &task_id, Duration::from_secs(20))
        .await;
    assert_eq!(done["state"], "success", "{done}");
}

#[tokio::test]
async fn an_output_over_max_output_bytes_fails_the_task_and_leaves_no_file() {
    let (_fake, ours) = fake_and_ours("big", "max_output_bytes = 1000").await;

    let done = ours.api.run_to_end("gen", json!({})).await;
    assert_eq!(done["failCode"], "GENERATION_FAILED", "{done}");
    assert!(
        done["failMsg"]
            .as_str()
            .unwrap()
            .contains("1000 byte limit"),
        "{done}"
    );
    assert_eq!(downloaded_files(&ours.data_dir), Vec::<String>::new());
}
