//! The `http` backend against a small upstream model server started by each test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

use crate::support::*;

/// A request the upstream received.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone, Default)]
struct Upstream {
    /// Requests per scenario, in order.
    seen: Arc<Mutex<HashMap<String, Vec<Seen>>>>,
    base: Arc<Mutex<String>>,
}

const PNG_BYTES: &[u8] = b"\x89PNG\r\n\x1a\nupstream png";
const JPEG_BYTES: &[u8] = b"\xff\xd8\xff\xe0upstream jpeg";

impl Upstream {
    fn calls(&self, scenario: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .get(scenario)
            .cloned()
            .unwrap_or_default()
    }
}

async fn model(
    State(up): State<Upstream>,
    Path(scenario): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = {
        let mut seen = up.seen.lock().unwrap();
        let calls = seen.entry(scenario.clone()).or_default();
        calls.push(Seen {
            headers,
            body: body.to_vec(),
        });
        calls.len()
    };
    let base = up.base.lock().unwrap().clone();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match scenario.as_str() {
        "raw" => ([("content-type", "image/jpeg")], JPEG_BYTES).into_response(),
        "base64" => axum::Json(json!({
            "data": { "images": [b64(PNG_BYTES), format!("data:image/jpeg;base64,{}", b64(JPEG_BYTES))] }
        }))
        .into_response(),
        // Outputs named outside the upstream's origin: another loopback address (the same
        // server, so only the guard can refuse it) and the cloud metadata address.
        "foreign-url" => axum::Json(json!({
            "output": { "urls": [format!("{base}/media/a.png").replace("127.0.0.1", "127.0.0.2")] },
        }))
        .into_response(),
        "metadata-url" => axum::Json(json!({
            "output": { "urls": ["http://169.254.169.254/latest/meta-data/iam/security-credentials/"] },
        }))
        .into_response(),
        "urls" => axum::Json(json!({
            "output": { "urls": [format!("{base}/media/a.png"), format!("{base}/media/b.mp4")] },
            "first": format!("{base}/media/c")
        }))
        .into_response(),
        "503-then-200" | "429-then-200" if n == 1 => {
            let code = if scenario.starts_with("503") {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            (code, "try again later").into_response()
        }
        "503-then-200" | "429-then-200" => {
            ([("content-type", "image/png")], PNG_BYTES).into_response()
        }
        "slow-then-fast" if n == 1 => {
            // Longer than the model's timeout: the first attempt times out.
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        "slow-then-fast" => ([("content-type", "image/png")], PNG_BYTES).into_response(),
        "always-503" => (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response(),
        "400" => (StatusCode::BAD_REQUEST, "prompt must not be empty").into_response(),
        "bad-json" => ([("content-type", "application/json")], "not json").into_response(),
        "missing-pointer" => axum::Json(json!({ "other": 1 })).into_response(),
        _ => (StatusCode::NOT_FOUND, "no such scenario").into_response(),
    }
}

async fn media(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "a.png" => ([("content-type", "image/png")], PNG_BYTES).into_response(),
        "b.mp4" => ([("content-type", "video/mp4")], "mp4 bytes").into_response(),
        "c" => ([("content-type", "image/webp")], "webp bytes").into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Starts the upstream on 127.0.0.1:0; returns its state and base URL.
async fn start_upstream() -> (Upstream, String) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/model/{scenario}", post(model))
        .route("/media/{name}", get(media))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    *up.base.lock().unwrap() = base.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, base)
}

/// A `[models.NAME]` table POSTing to the upstream scenario.
fn http_model(name: &str, base: &str, scenario: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nbackend = \"http\"\nurl = {}\n{extra}\n",
        toml_str(format!("{base}/model/{scenario}"))
    )
}

async fn fetch_all(data: &Value) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for url in result_urls(data) {
        out.push(fetch_ok(&url).await);
    }
    out
}

#[tokio::test]
async fn raw_bytes_from_the_upstream_become_one_file_of_its_content_type() {
    let (up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model("raw", &base, "raw", "")).await;

    let data = app
        .api
        .run_to_end("raw", json!({ "prompt": "a cat" }))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let files = fetch_all(&data).await;
    assert_eq!(files, vec![("image/jpeg".to_owned(), JPEG_BYTES.to_vec())]);
    let calls = up.calls("raw");
    assert_eq!(calls.len(), 1);
    let sent: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(sent, json!({ "prompt": "a cat" }));
    assert_eq!(calls[0].headers["content-type"], "application/json");
}

#[tokio::test]
async fn base64_data_at_a_json_pointer_becomes_files() {
    let (_up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "b64",
        &base,
        "base64",
        "response = \"json\"\nbase64_pointers = [\"/data/images\"]\nbase64_content_type = \"image/png\"",
    ))
    .await;

    let data = app.api.run_to_end("b64", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let files = fetch_all(&data).await;
    assert_eq!(
        files,
        vec![
            ("image/png".to_owned(), PNG_BYTES.to_vec()),
            ("image/jpeg".to_owned(), JPEG_BYTES.to_vec()),
        ]
    );
}

#[tokio::test]
async fn urls_at_a_json_pointer_are_downloaded_and_served_from_taskgate() {
    let (_up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "urls",
        &base,
        "urls",
        "response = \"json\"\nurl_pointers = [\"/output/urls\", \"/first\"]",
    ))
    .await;

    let data = app.api.run_to_end("urls", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let urls = result_urls(&data);
    assert!(
        urls.iter().all(|u| u.starts_with(&app.api.base)),
        "results must be served by taskgate, not the upstream: {urls:?}"
    );
    let files = fetch_all(&data).await;
    assert_eq!(
        files,
        vec![
            ("image/png".to_owned(), PNG_BYTES.to_vec()),
            ("video/mp4".to_owned(), b"mp4 bytes".to_vec()),
            ("image/webp".to_owned(), b"webp bytes".to_vec()),
        ]
    );
}

#[tokio::test]
async fn an_upstream_503_is_retried_and_the_task_succeeds() {
    let (up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "flaky",
        &base,
        "503-then-200",
        "max_attempts = 3",
    ))
    .await;

    let data = app.api.run_to_end("flaky", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(up.calls("503-then-200").len(), 2);
    assert_eq!(
        fetch_all(&data).await,
        vec![("image/png".to_owned(), PNG_BYTES.to_vec())]
    );
}

#[tokio::test]
async fn an_upstream_429_is_retried_and_the_task_succeeds() {
    let (up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "limited",
        &base,
        "429-then-200",
        "max_attempts = 2",
    ))
    .await;

    let data = app.api.run_to_end("limited", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(up.calls("429-then-200").len(), 2);
}

#[tokio::test]
async fn an_upstream_400_fails_the_task_at_once_without_a_retry() {
    let (up, base) = start_upstream().await;
    let app =
        TestApp::start_with_models(&http_model("picky", &base, "400", "max_attempts = 5")).await;

    let data = app.api.run_to_end("picky", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("400"), "{msg}");
    assert!(msg.contains("prompt must not be empty"), "{msg}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.calls("400").len(), 1);
}

#[tokio::test]
async fn an_upstream_that_always_answers_503_fails_after_exactly_max_attempts_calls() {
    let (up, base) = start_upstream().await;
    let app =
        TestApp::start_with_models(&http_model("down", &base, "always-503", "max_attempts = 3"))
            .await;

    let data = app.api.run_to_end("down", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "MODEL_UNAVAILABLE");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("503") && msg.contains("3 attempts"), "{msg}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.calls("always-503").len(), 3);
}

#[tokio::test]
async fn configured_headers_and_the_task_id_arrive_at_the_upstream() {
    let (up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "auth",
        &base,
        "raw",
        "headers = { \"Authorization\" = \"Bearer upstream-secret\", \"X-Org\" = \"acme\" }",
    ))
    .await;

    let id = app.api.submit_ok("auth", json!({ "q": 1 })).await;
    let data = app
        .api
        .wait_final("auth", &id, Duration::from_secs(20))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let calls = up.calls("raw");
    assert_eq!(calls.len(), 1);
    let h = &calls[0].headers;
    assert_eq!(h["authorization"], "Bearer upstream-secret");
    assert_eq!(h["x-org"], "acme");
    assert_eq!(h["x-taskgate-task-id"], id.as_str());
    assert!(
        !h["authorization"].to_str().unwrap().contains(API_KEY),
        "the client's key must not reach the upstream"
    );
}

#[tokio::test]
async fn an_upstream_answer_that_is_not_the_configured_json_fails_the_task_with_a_reason() {
    let (_up, base) = start_upstream().await;
    let extra = "response = \"json\"\nurl_pointers = [\"/output/urls\"]";
    let app = TestApp::start_with_models(&format!(
        "{}{}",
        http_model("garbled", &base, "bad-json", extra),
        http_model("shapeless", &base, "missing-pointer", extra)
    ))
    .await;

    let garbled = app.api.run_to_end("garbled", json!({})).await;
    let shapeless = app.api.run_to_end("shapeless", json!({})).await;

    assert_eq!(garbled["state"], "failed", "{garbled}");
    assert!(
        garbled["failMsg"].as_str().unwrap().contains("not JSON"),
        "{garbled}"
    );
    assert_eq!(shapeless["state"], "failed", "{shapeless}");
    assert!(
        shapeless["failMsg"]
            .as_str()
            .unwrap()
            .contains("/output/urls"),
        "{shapeless}"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_retried_then_fails_as_model_unavailable() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let app = TestApp::start_with_models(&format!(
        "[models.gone]\nbackend = \"http\"\nurl = \"http://127.0.0.1:{port}/x\"\nmax_attempts = 2\n"
    ))
    .await;

    let data = app.api.run_to_end("gone", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "MODEL_UNAVAILABLE");
    assert!(
        data["failMsg"].as_str().unwrap().contains("2 attempts"),
        "{data}"
    );
}

#[tokio::test]
async fn an_upstream_timeout_is_retried_and_the_task_succeeds() {
    let (up, base) = start_upstream().await;
    let app = TestApp::start_with_models(&http_model(
        "sluggish",
        &base,
        "slow-then-fast",
        "timeout = \"500ms\"\nmax_attempts = 2",
    ))
    .await;

    let data = app.api.run_to_end("sluggish", json!({})).await;

    assert_eq!(
        data["state"], "success",
        "an upstream timeout is retryable: {data}"
    );
    assert_eq!(up.calls("slow-then-fast").len(), 2);
}

#[tokio::test]
async fn output_urls_outside_the_upstreams_origin_must_be_public() {
    let (_up, base) = start_upstream().await;
    let mut models = String::new();
    for scenario in ["foreign-url", "metadata-url"] {
        models += &http_model(
            scenario,
            &base,
            scenario,
            "response = \"json\"\nurl_pointers = [\"/output/urls\"]",
        );
    }
    let app = TestApp::start_with_models(&models).await;

    for model in ["foreign-url", "metadata-url"] {
        let data = app.api.run_to_end(model, json!({})).await;
        assert_eq!(data["state"], "failed", "{data}");
        assert_eq!(data["failCode"], "GENERATION_FAILED", "{data}");
        let msg = data["failMsg"].as_str().unwrap();
        assert!(
            msg.contains("refused") && msg.contains("not a public address"),
            "{msg}"
        );
    }
}
