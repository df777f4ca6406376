//! The `replicate` and `fal` backends against fakes of their documented APIs, written here:
//! Replicate's predictions API (`POST /v1/models/{owner}/{name}/predictions` or
//! `/v1/predictions` with a version, `GET /v1/predictions/{id}`, `POST …/cancel`,
//! `Authorization: Bearer`) and fal's queue (`POST /{owner}/{app}/{path}`, `GET
//! …/requests/{id}/status?logs=1`, `GET …/requests/{id}`, `PUT …/requests/{id}/cancel`,
//! `Authorization: Key`). Each fake is steered by the model name it is asked for (the
//! scenario), and serves the output files itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::support::*;

const REPLICATE_KEY: &str = "r8_fake_token_for_tests";
const FAL_KEY: &str = "fal-fake-key:for-tests";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\nprovider png";
const WEBP: &[u8] = b"RIFF\x00\x00\x00\x00WEBPprovider webp";
const MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42provider mp4";
/// Larger than the `max_output_bytes` the size test sets.
const BIG_LEN: usize = 64 * 1024;

/// A request a fake received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    auth: Option<String>,
    at: Instant,
}

/// State shared by both fakes.
#[derive(Clone)]
struct Fake {
    base: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Creates per scenario, polls per job id.
    counts: Arc<Mutex<HashMap<String, u32>>>,
    /// The bodies of creates, per scenario.
    bodies: Arc<Mutex<HashMap<String, Value>>>,
    cancels: mpsc::UnboundedSender<String>,
}

impl Fake {
    fn record(&self, path: String, headers: &HeaderMap) {
        self.seen.lock().unwrap().push(Seen {
            path,
            auth: headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned()),
            at: Instant::now(),
        });
    }
    fn bump(&self, key: &str) -> u32 {
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }
    fn count(&self, key: &str) -> u32 {
        self.counts.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    /// A new job id carrying its scenario: `{scenario}_{n}`.
    fn new_id(&self, scenario: &str, body: Value) -> (String, u32) {
        let n = self.bump(scenario);
        self.bodies
            .lock()
            .unwrap()
            .insert(scenario.to_owned(), body);
        (format!("{scenario}_{n}"), n)
    }
}

fn scenario_of(id: &str) -> &str {
    id.rsplit_once('_').map_or(id, |(s, _)| s)
}

fn throttled() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "1")],
        Json(json!({ "detail": "Request was throttled. Expected available in 1 second." })),
    )
        .into_response()
}

// ---- Replicate ----

fn prediction(fake: &Fake, id: &str, status: &str, extra: Value) -> Value {
    let base = fake.base();
    let mut p = json!({
        "id": id,
        "status": status,
        "input": {},
        "output": null,
        "error": null,
        "logs": "",
        "urls": {
            "get": format!("{base}/v1/predictions/{id}"),
            "cancel": format!("{base}/v1/predictions/{id}/cancel"),
        }
    });
    p.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    p
}

fn replicate_create(fake: &Fake, scenario: &str, headers: &HeaderMap, body: Value) -> Response {
    let (id, n) = fake.new_id(scenario, body);
    let expected = format!("Bearer {REPLICATE_KEY}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401 })),
        )
            .into_response();
    }
    if scenario == "flaky" && n == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "detail": "overloaded" })),
        )
            .into_response();
    }
    (
        StatusCode::CREATED,
        Json(prediction(fake, &id, "starting", json!({}))),
    )
        .into_response()
}

async fn replicate_create_by_model(
    State(fake): State<Fake>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.record(
        format!("POST /v1/models/{owner}/{name}/predictions"),
        &headers,
    );
    replicate_create(&fake, &name, &headers, body)
}

async fn replicate_create_by_version(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.record("POST /v1/predictions".into(), &headers);
    let version = body["version"].as_str().unwrap().to_owned();
    replicate_create(&fake, &version, &headers, body)
}

async fn replicate_get(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.record(format!("GET /v1/predictions/{id}"), &headers);
    let n = fake.bump(&id);
    let base = fake.base();
    let done = json!({
        "output": [format!("{base}/media/a.png"), format!("{base}/media/b.webp")],
        "logs": "step 1\nstep 2\n 100%|##########| 2/2\n",
    });
    let p = match (scenario_of(&id), n) {
        ("limited", 1) => return throttled(),
        ("pollfails", _) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
        ("fails", 1) | ("slow", _) => {
            prediction(&fake, &id, "processing", json!({ "logs": "step 1\n" }))
        }
        ("fails", _) => prediction(
            &fake,
            &id,
            "failed",
            json!({ "error": "CUDA out of memory", "logs": "step 1\nTraceback…\n" }),
        ),
        ("big", _) => prediction(
            &fake,
            &id,
            "succeeded",
            json!({ "output": format!("{base}/media/big") }),
        ),
        (_, 1) => prediction(&fake, &id, "processing", json!({ "logs": "step 1\n" })),
        (_, 2) => prediction(
            &fake,
            &id,
            "processing",
            json!({ "logs": "step 1\nstep 2\n 50%|#####     | 1/2" }),
        ),
        _ => prediction(&fake, &id, "succeeded", done),
    };
    Json(p).into_response()
}

async fn replicate_cancel(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.record(format!("POST /v1/predictions/{id}/cancel"), &headers);
    fake.cancels.send(id.clone()).unwrap();
    Json(prediction(&fake, &id, "canceled", json!({}))).into_response()
}

// ---- fal ----

async fn fal_submit(
    State(fake): State<Fake>,
    Path((owner, app, scenario)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.record(format!("POST /{owner}/{app}/{scenario}"), &headers);
    let (id, n) = fake.new_id(&scenario, body);
    if scenario == "flaky" && n == 1 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream hiccup").into_response();
    }
    let base = fake.base();
    // The request URLs leave out the endpoint's sub-path, as fal's do.
    let requests = format!("{base}/{owner}/{app}/requests/{id}");
    Json(json!({
        "request_id": id,
        "response_url": requests,
        "status_url": format!("{requests}/status"),
        "cancel_url": format!("{requests}/cancel"),
    }))
    .into_response()
}

async fn fal_status(
    State(fake): State<Fake>,
    Path((owner, app, id)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let logs_flag = query.get("logs").map_or("", String::as_str);
    fake.record(
        format!("GET /{owner}/{app}/requests/{id}/status?logs={logs_flag}"),
        &headers,
    );
    let n = fake.bump(&id);
    let log = |msgs: &[&str]| -> Value {
        msgs.iter()
            .map(|m| json!({ "message": m, "level": "INFO", "source": "user", "timestamp": "2026-01-01T00:00:00Z" }))
            .collect()
    };
    let completed = json!({ "status": "COMPLETED", "logs": log(&["loading", "done"]) });
    let answer = match (scenario_of(&id), n) {
        ("limited", 1) => return throttled(),
        ("limited", _) => completed,
        ("slow", _) => json!({ "status": "IN_PROGRESS", "logs": log(&["loading"]) }),
        ("fails", _) => json!({
            "status": "COMPLETED",
            "logs": log(&["loading"]),
            "error": "Unprocessable image: NSFW content detected",
            "error_type": "content_policy_violation",
        }),
        (_, 1) => json!({ "status": "IN_QUEUE", "queue_position": 2 }),
        (_, 2) => json!({ "status": "IN_QUEUE", "queue_position": 1 }),
        (_, 3) => json!({ "status": "IN_PROGRESS", "logs": log(&["loading"]) }),
        _ => completed,
    };
    let code = if answer["status"] == "COMPLETED" {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (code, Json(answer)).into_response()
}

async fn fal_result(
    State(fake): State<Fake>,
    Path((owner, app, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    fake.record(format!("GET /{owner}/{app}/requests/{id}"), &headers);
    let base = fake.base();
    Json(json!({
        "images": [{ "url": format!("{base}/media/a.png"), "content_type": "image/png", "width": 8, "height": 8 }],
        "video": { "url": format!("{base}/media/c.mp4") },
        "seed": 42,
        "prompt": "a cat",
    }))
    .into_response()
}

async fn fal_cancel(
    State(fake): State<Fake>,
    Path((owner, app, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    fake.record(format!("PUT /{owner}/{app}/requests/{id}/cancel"), &headers);
    fake.cancels.send(id).unwrap();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "status": "CANCELLATION_REQUESTED" })),
    )
        .into_response()
}

async fn media(State(fake): State<Fake>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    fake.record(format!("GET /media/{name}"), &headers);
    match name.as_str() {
        "a.png" => ([("content-type", "image/png")], PNG).into_response(),
        "b.webp" => ([("content-type", "image/webp")], WEBP).into_response(),
        "c.mp4" => ([("content-type", "video/mp4")], MP4).into_response(),
        "big" => ([("content-type", "video/mp4")], vec![7u8; BIG_LEN]).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Which provider a fake plays.
#[derive(Clone, Copy)]
enum Provider {
    Replicate,
    Fal,
}

/// Starts a fake on 127.0.0.1:0; returns it, the receiver of the job ids it was asked to
/// cancel, and its base URL.
async fn start_fake(provider: Provider) -> (Fake, mpsc::UnboundedReceiver<String>, String) {
    let (cancels, cancelled) = mpsc::unbounded_channel();
    let fake = Fake {
        base: Arc::default(),
        seen: Arc::default(),
        counts: Arc::default(),
        bodies: Arc::default(),
        cancels,
    };
    let api = match provider {
        Provider::Replicate => Router::new()
            .route(
                "/v1/models/{owner}/{name}/predictions",
                post(replicate_create_by_model),
            )
            .route("/v1/predictions", post(replicate_create_by_version))
            .route("/v1/predictions/{id}", get(replicate_get))
            .route("/v1/predictions/{id}/cancel", post(replicate_cancel)),
        Provider::Fal => Router::new()
            .route("/{owner}/{app}/{scenario}", post(fal_submit))
            .route("/{owner}/{app}/requests/{id}/status", get(fal_status))
            .route("/{owner}/{app}/requests/{id}", get(fal_result))
            .route("/{owner}/{app}/requests/{id}/cancel", put(fal_cancel)),
    };
    let app = api
        .route("/media/{name}", get(media))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    *fake.base.lock().unwrap() = base.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, cancelled, base)
}

/// A `[models.NAME]` table for Replicate's official model `acme/{scenario}`.
fn replicate_model(name: &str, base: &str, scenario: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nbackend = \"replicate\"\nmodel = \"acme/{scenario}\"\nurl = {}\napi_key = {}\nupstream_poll_interval = \"20ms\"\n{extra}\n",
        toml_str(base),
        toml_str(REPLICATE_KEY)
    )
}

/// A `[models.NAME]` table for fal's endpoint `fal-ai/fake/{scenario}`.
fn fal_model(name: &str, base: &str, scenario: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nbackend = \"fal\"\nmodel = \"fal-ai/fake/{scenario}\"\nurl = {}\napi_key = {}\nupstream_poll_interval = \"20ms\"\n{extra}\n",
        toml_str(base),
        toml_str(FAL_KEY)
    )
}

/// Both fakes, and a server with model `r` on the Replicate fake and `f` on the fal one, each
/// asking for `scenario` with the extra keys `extra`.
async fn both_providers(
    scenario: &str,
    extra: &str,
) -> (TestApp, [(Fake, mpsc::UnboundedReceiver<String>); 2]) {
    let (replicate, r_cancels, rbase) = start_fake(Provider::Replicate).await;
    let (fal, f_cancels, fbase) = start_fake(Provider::Fal).await;
    let app = TestApp::start_with_models(&format!(
        "{}{}",
        replicate_model("r", &rbase, scenario, extra),
        fal_model("f", &fbase, scenario, extra)
    ))
    .await;
    (app, [(replicate, r_cancels), (fal, f_cancels)])
}

async fn fetch_all(data: &Value) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for url in result_urls(data) {
        out.push(fetch_ok(&url).await);
    }
    out
}

/// Every API call carried the key in the provider's scheme; no download did.
fn assert_key_only_on_api_calls(fake: &Fake, expected: &str) {
    for seen in fake.seen() {
        if seen.path.starts_with("GET /media/") {
            assert_eq!(
                seen.auth, None,
                "the key must not go to output URLs: {seen:?}"
            );
        } else {
            assert_eq!(seen.auth.as_deref(), Some(expected), "{seen:?}");
        }
    }
}

/// The task's stored log lines, once `expected` is among them.
async fn wait_for_log_line(api: &Api, model: &str, task_id: &str, expected: &str) -> Vec<String> {
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let resp = api
            .request(reqwest::Method::GET, &format!("/api/v1/statusTask/{model}"))
            .query(&[("taskId", task_id), ("logs", "true")])
            .send()
            .await
            .unwrap();
        let (_, body) = envelope(resp).await;
        last = body["data"]["logs"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|x| x["line"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if last.iter().any(|l| l == expected) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("log line {expected:?} never arrived; lines: {last:?}");
}

/// The gap between the fake's 429 answer (the first request to `first`) and the request after it.
fn gap_after_first(fake: &Fake, first: &str) -> Duration {
    let seen = fake.seen();
    let i = seen.iter().position(|s| s.path.starts_with(first)).unwrap();
    seen[i + 1].at - seen[i].at
}

#[tokio::test]
async fn a_replicate_prediction_is_polled_to_success_and_its_outputs_are_served_by_taskgate() {
    let (fake, _cancels, base) = start_fake(Provider::Replicate).await;
    let app = TestApp::start_with_models(&format!(
        "{}[models.pinned]\nbackend = \"replicate\"\nversion = \"versioned\"\nurl = {}\napi_key = {}\nupstream_poll_interval = \"20ms\"\n",
        replicate_model("official", &base, "ok", ""),
        toml_str(&base),
        toml_str(REPLICATE_KEY)
    ))
    .await;

    let id = app
        .api
        .submit_ok("official", json!({ "prompt": "a cat" }))
        .await;
    let data = app
        .api
        .wait_final("official", &id, Duration::from_secs(20))
        .await;
    let pinned = app
        .api
        .run_to_end("pinned", json!({ "prompt": "a dog" }))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let urls = result_urls(&data);
    assert!(
        urls.iter().all(|u| u.starts_with(&app.api.base)),
        "results are served by taskgate: {urls:?}"
    );
    assert_eq!(
        fetch_all(&data).await,
        vec![
            ("image/png".to_owned(), PNG.to_vec()),
            ("image/webp".to_owned(), WEBP.to_vec()),
        ]
    );
    assert_eq!(
        fake.bodies.lock().unwrap()["ok"],
        json!({ "input": { "prompt": "a cat" } })
    );
    assert!(
        fake.count("ok_1") >= 3,
        "the prediction was polled to its end"
    );
    let lines = wait_for_log_line(&app.api, "official", &id, "step 2").await;
    assert_eq!(
        lines.iter().filter(|l| *l == "step 1").count(),
        1,
        "{lines:?}"
    );
    assert_eq!(pinned["state"], "success", "{pinned}");
    assert_eq!(
        fake.bodies.lock().unwrap()["versioned"],
        json!({ "version": "versioned", "input": { "prompt": "a dog" } })
    );
    assert!(fake.seen().iter().any(|s| s.path == "POST /v1/predictions"));
    assert_key_only_on_api_calls(&fake, &format!("Bearer {REPLICATE_KEY}"));
}

#[tokio::test]
async fn a_fal_request_is_polled_through_the_queue_and_every_url_in_its_result_is_copied() {
    let (fake, _cancels, base) = start_fake(Provider::Fal).await;
    let app = TestApp::start_with_models(&fal_model("flux", &base, "ok", "")).await;

    let id = app
        .api
        .submit_ok("flux", json!({ "prompt": "a cat" }))
        .await;
    let data = app
        .api
        .wait_final("flux", &id, Duration::from_secs(20))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(
        fetch_all(&data).await,
        vec![
            ("image/png".to_owned(), PNG.to_vec()),
            ("video/mp4".to_owned(), MP4.to_vec()),
        ]
    );
    assert_eq!(
        fake.bodies.lock().unwrap()["ok"],
        json!({ "prompt": "a cat" })
    );
    let seen = fake.seen();
    assert_eq!(seen[0].path, "POST /fal-ai/fake/ok");
    assert!(seen
        .iter()
        .any(|s| s.path == "GET /fal-ai/fake/requests/ok_1/status?logs=1"));
    let lines = wait_for_log_line(&app.api, "flux", &id, "done").await;
    for expected in [
        "waiting in fal's queue at position 2",
        "waiting in fal's queue at position 1",
        "loading",
    ] {
        assert_eq!(
            lines.iter().filter(|l| *l == expected).count(),
            1,
            "{expected:?} once in {lines:?}"
        );
    }
    assert_key_only_on_api_calls(&fake, &format!("Key {FAL_KEY}"));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_the_task_succeeds() {
    let (app, [(replicate, _), (fal, _)]) = both_providers("limited", "max_attempts = 1").await;

    let r = app.api.run_to_end("r", json!({})).await;
    let f = app.api.run_to_end("f", json!({})).await;

    assert_eq!(r["state"], "success", "{r}");
    assert_eq!(f["state"], "success", "{f}");
    for (gap, who) in [
        (
            gap_after_first(&replicate, "GET /v1/predictions/"),
            "replicate",
        ),
        (gap_after_first(&fal, "GET /fal-ai/fake/requests/"), "fal"),
    ] {
        assert!(
            gap >= Duration::from_millis(950),
            "{who}: asked again {gap:?} after a Retry-After of 1 s"
        );
    }
}

#[tokio::test]
async fn a_provider_5xx_is_retryable_and_the_next_attempt_succeeds() {
    let (app, [(replicate, _), (fal, _)]) = both_providers("flaky", "max_attempts = 2").await;

    let r = app.api.run_to_end("r", json!({})).await;
    let f = app.api.run_to_end("f", json!({})).await;

    assert_eq!(r["state"], "success", "{r}");
    assert_eq!(f["state"], "success", "{f}");
    assert_eq!(replicate.count("flaky"), 2, "one create per attempt");
    assert_eq!(fal.count("flaky"), 2, "one submit per attempt");
}

#[tokio::test]
async fn a_failed_prediction_fails_the_task_with_the_providers_error() {
    let (app, [(replicate, _), (fal, _)]) = both_providers("fails", "max_attempts = 3").await;

    let r = app.api.run_to_end("r", json!({})).await;
    let f = app.api.run_to_end("f", json!({})).await;

    for (data, error) in [(&r, "CUDA out of memory"), (&f, "NSFW content detected")] {
        assert_eq!(data["state"], "failed", "{data}");
        assert_eq!(data["failCode"], "GENERATION_FAILED", "{data}");
        let msg = data["failMsg"].as_str().unwrap();
        assert!(msg.contains(error), "{msg}");
    }
    assert_eq!(
        replicate.count("fails"),
        1,
        "a failed prediction is not retried"
    );
    assert_eq!(fal.count("fails"), 1, "a failed request is not retried");
}

#[tokio::test]
async fn cancelling_a_running_task_cancels_the_prediction_upstream() {
    let (app, [(replicate, mut r_cancels), (fal, mut f_cancels)]) =
        both_providers("slow", "").await;
    let r = app.api.submit_ok("r", json!({})).await;
    let f = app.api.submit_ok("f", json!({})).await;
    // Running upstream: polled at least once.
    wait_until(
        Duration::from_secs(10),
        "both jobs are being polled",
        || {
            let (replicate, fal) = (replicate.clone(), fal.clone());
            async move { replicate.count("slow_1") >= 1 && fal.count("slow_1") >= 1 }
        },
    )
    .await;

    let (rs, rbody) = app.api.cancel("r", &r).await;
    let (fs, fbody) = app.api.cancel("f", &f).await;

    assert_eq!(rs, StatusCode::OK, "{rbody}");
    assert_eq!(fs, StatusCode::OK, "{fbody}");
    let within = Duration::from_secs(10);
    let r_cancelled = tokio::time::timeout(within, r_cancels.recv()).await;
    let f_cancelled = tokio::time::timeout(within, f_cancels.recv()).await;
    assert_eq!(r_cancelled.unwrap().as_deref(), Some("slow_1"));
    assert_eq!(f_cancelled.unwrap().as_deref(), Some("slow_1"));
    let cancel_calls: Vec<Seen> = replicate
        .seen()
        .into_iter()
        .chain(fal.seen())
        .filter(|s| s.path.ends_with("/cancel"))
        .collect();
    assert_eq!(cancel_calls.len(), 2, "{cancel_calls:?}");
    assert_eq!(
        cancel_calls[0].auth.as_deref(),
        Some(format!("Bearer {REPLICATE_KEY}").as_str())
    );
    assert_eq!(
        cancel_calls[1].auth.as_deref(),
        Some(format!("Key {FAL_KEY}").as_str())
    );
}

#[tokio::test]
async fn an_output_over_max_output_bytes_fails_the_task_and_leaves_no_file() {
    let (fake, _cancels, base) = start_fake(Provider::Replicate).await;
    let app = TestApp::start_with_models(&replicate_model(
        "big",
        &base,
        "big",
        &format!("max_output_bytes = {}\nmax_attempts = 2", BIG_LEN / 2),
    ))
    .await;

    let data = app.api.run_to_end("big", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED", "{data}");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{} byte limit", BIG_LEN / 2)),
        "{msg}"
    );
    assert_eq!(fake.count("big"), 1, "too large is not retried");
    let left: Vec<_> = files_under(app.dir().path())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("output-")
        })
        .collect();
    assert!(left.is_empty(), "no partial output may remain: {left:?}");
}

#[tokio::test]
async fn a_refused_key_fails_the_task_at_once_naming_where_the_key_came_from_but_not_the_key() {
    let (fake, _cancels, base) = start_fake(Provider::Replicate).await;
    let app = TestApp::start_with_models(&format!(
        "[models.wrong]\nbackend = \"replicate\"\nmodel = \"acme/ok\"\nurl = {}\napi_key = \"r8_wrong_key\"\nmax_attempts = 3\n",
        toml_str(&base)
    ))
    .await;

    let data = app.api.run_to_end("wrong", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "MODEL_UNAVAILABLE", "{data}");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(
        msg.contains("refused the API key (401 Unauthorized); check api_key"),
        "{msg}"
    );
    assert!(
        !msg.contains("r8_wrong_key"),
        "the key is never shown: {msg}"
    );
    assert_eq!(fake.count("ok"), 1, "a refused key is not retried");
}

#[tokio::test]
async fn a_poll_answered_5xx_fails_the_attempt_as_retryable_and_cancels_the_prediction() {
    let (_fake, mut cancels, base) = start_fake(Provider::Replicate).await;
    let app = TestApp::start_with_models(&replicate_model(
        "r",
        &base,
        "pollfails",
        "max_attempts = 1",
    ))
    .await;

    let data = app.api.run_to_end("r", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "MODEL_UNAVAILABLE", "{data}");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("500"), "{msg}");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), cancels.recv()).await;
    assert_eq!(
        cancelled.unwrap().as_deref(),
        Some("pollfails_1"),
        "a prediction left running upstream is cancelled"
    );
}
