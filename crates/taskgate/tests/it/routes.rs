//! Routes and failover: a model with two `http` routes in front of an upstream written in the
//! test, whose answers the test sets per route and whose requests it counts. Failover on a 503,
//! the breaker opening (the first route is then not called at all), a half-open probe closing
//! it again, a fatal 4xx that neither fails over nor counts, every route failing, and the
//! config file's refusals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use crate::support::*;

const LOCAL_PNG: &[u8] = b"\x89PNG\r\n\x1a\nfrom the local route";
const CLOUD_PNG: &[u8] = b"\x89PNG\r\n\x1a\nfrom the cloud route";

/// What the upstream answers on one route's path.
#[derive(Clone, Copy)]
enum Answer {
    Unavailable,
    Png(&'static [u8]),
    BadRequest,
    /// No answer for a minute: the route is busy for the whole test.
    Hang,
}

#[derive(Clone, Default)]
struct Upstream {
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Upstream {
    fn answer(&self, route: &str, answer: Answer) {
        self.answers
            .lock()
            .unwrap()
            .insert(route.to_owned(), answer);
    }

    fn calls(&self, route: &str) -> usize {
        self.calls.lock().unwrap().get(route).copied().unwrap_or(0)
    }
}

async fn route(State(up): State<Upstream>, Path(route): Path<String>) -> Response {
    *up.calls.lock().unwrap().entry(route.clone()).or_default() += 1;
    let answer = up.answers.lock().unwrap().get(&route).copied();
    match answer {
        Some(Answer::Png(bytes)) => ([("content-type", "image/png")], bytes).into_response(),
        Some(Answer::Hang) => {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Some(Answer::BadRequest) => {
            (StatusCode::BAD_REQUEST, "prompt must not be empty").into_response()
        }
        Some(Answer::Unavailable) | None => {
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response()
        }
    }
}

async fn start_upstream() -> (Upstream, String) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/r/{route}", post(route))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, base)
}

/// Model `m`: route `local`, then route `cloud`, both on the upstream; `local` and `model` are
/// extra lines for the first route's table and the model's (default `max_attempts = 1`).
fn routed_model(base: &str, model: &str, local: &str) -> String {
    let model = if model.is_empty() {
        "max_attempts = 1"
    } else {
        model
    };
    format!(
        "[models.m]\n{model}\n\n\
         [[models.m.routes]]\nname = \"local\"\nbackend = \"http\"\nurl = {}\n{local}\n\n\
         [[models.m.routes]]\nname = \"cloud\"\nbackend = \"http\"\nurl = {}\n",
        toml_str(format!("{base}/r/local")),
        toml_str(format!("{base}/r/cloud")),
    )
}

/// The upstream answering `local` and `cloud` as told, and a server with model `m` on it
/// ([`routed_model`]'s `model` and `local` lines).
async fn start(
    local: Answer,
    cloud: Answer,
    model: &str,
    local_extra: &str,
) -> (Upstream, TestApp) {
    let (up, base) = start_upstream().await;
    up.answer("local", local);
    up.answer("cloud", cloud);
    let app = TestApp::start_with_models(&routed_model(&base, model, local_extra)).await;
    (up, app)
}

/// A route's breaker state (0 closed, 1 open, 2 half-open) from `/metrics`, if shown.
async fn breaker(app: &TestApp, route: &str) -> Option<f64> {
    route_metric(app, "taskgate_route_breaker_state", route).await
}

/// A route's failovers so far, from `/metrics`, if shown.
async fn failovers(app: &TestApp, route: &str) -> Option<f64> {
    route_metric(app, "taskgate_route_failovers_total", route).await
}

async fn route_metric(app: &TestApp, name: &str, route: &str) -> Option<f64> {
    crate::metrics::scrape_api(&app.api)
        .await
        .get(name, &[("model", "m"), ("route", route)])
}

async fn files_of(data: &Value) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for url in result_urls(data) {
        out.push(fetch_ok(&url).await.1);
    }
    out
}

#[tokio::test]
async fn a_503_from_the_first_route_fails_over_to_the_second_which_serves_the_task() {
    let (up, app) = start(Answer::Unavailable, Answer::Png(CLOUD_PNG), "", "").await;

    let data = app.api.run_to_end("m", json!({ "prompt": "a cat" })).await;

    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(data["route"], "cloud", "{data}");
    assert_eq!(files_of(&data).await, vec![CLOUD_PNG.to_vec()]);
    assert_eq!((up.calls("local"), up.calls("cloud")), (1, 1));
    assert_eq!(failovers(&app, "local").await, Some(1.0));
    assert_eq!(breaker(&app, "local").await, Some(0.0));
}

#[tokio::test]
async fn once_its_breaker_opens_the_first_route_is_not_called_and_tasks_go_to_the_second() {
    let (up, app) = start(
        Answer::Unavailable,
        Answer::Png(CLOUD_PNG),
        "",
        "breaker_failures = 2\nbreaker_cooldown = \"1h\"",
    )
    .await;

    for _ in 0..2 {
        let data = app.api.run_to_end("m", json!({})).await;
        assert_eq!(data["route"], "cloud", "{data}");
    }
    assert_eq!(up.calls("local"), 2);
    assert_eq!(breaker(&app, "local").await, Some(1.0), "open");

    for _ in 0..3 {
        let data = app.api.run_to_end("m", json!({})).await;
        assert_eq!(data["state"], "success", "{data}");
        assert_eq!(data["route"], "cloud", "{data}");
        assert_eq!(files_of(&data).await, vec![CLOUD_PNG.to_vec()]);
    }
    assert_eq!(up.calls("local"), 2, "an open breaker keeps attempts away");
    assert_eq!(up.calls("cloud"), 5);
    assert_eq!(failovers(&app, "local").await, Some(5.0));
    assert_eq!(breaker(&app, "cloud").await, Some(0.0));
}

#[tokio::test]
async fn after_the_cool_down_one_probe_reaches_the_first_route_and_its_success_closes_the_breaker()
{
    let (up, app) = start(
        Answer::Unavailable,
        Answer::Png(CLOUD_PNG),
        "",
        "breaker_failures = 1\nbreaker_cooldown = \"200ms\"",
    )
    .await;
    let data = app.api.run_to_end("m", json!({})).await;
    assert_eq!(data["route"], "cloud", "{data}");
    assert_eq!(breaker(&app, "local").await, Some(1.0), "open");

    // The first route is healthy again; tasks keep going to the second until the cool-down
    // lets one probe through.
    up.answer("local", Answer::Png(LOCAL_PNG));
    let probed = Arc::new(Mutex::new(None));
    wait_until(
        Duration::from_secs(10),
        "a task served by the first route",
        || {
            let (api, probed) = (app.api.clone(), probed.clone());
            async move {
                let data = api.run_to_end("m", json!({})).await;
                let served = data["route"] == "local";
                if served {
                    *probed.lock().unwrap() = Some(data);
                }
                served
            }
        },
    )
    .await;

    let data = probed.lock().unwrap().take().unwrap();
    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(files_of(&data).await, vec![LOCAL_PNG.to_vec()]);
    assert_eq!(up.calls("local"), 2, "the failure, then exactly one probe");
    assert_eq!(breaker(&app, "local").await, Some(0.0), "closed");
    let data = app.api.run_to_end("m", json!({})).await;
    assert_eq!(
        data["route"], "local",
        "closed: the first route serves again"
    );
}

#[tokio::test]
async fn a_fatal_4xx_from_the_first_route_neither_fails_over_nor_counts_against_its_breaker() {
    let (up, app) = start(
        Answer::BadRequest,
        Answer::Png(CLOUD_PNG),
        "",
        "breaker_failures = 1\nbreaker_cooldown = \"1h\"",
    )
    .await;

    let data = app.api.run_to_end("m", json!({ "prompt": "" })).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["route"], "local", "{data}");
    assert!(
        data["failMsg"]
            .as_str()
            .unwrap()
            .contains("prompt must not be empty"),
        "{data}"
    );
    assert_eq!(up.calls("cloud"), 0, "no failover on the input's fault");
    assert_eq!(breaker(&app, "local").await, Some(0.0), "closed");
    assert_eq!(failovers(&app, "local").await, Some(0.0));
    up.answer("local", Answer::Png(LOCAL_PNG));
    let data = app.api.run_to_end("m", json!({ "prompt": "a cat" })).await;
    assert_eq!(data["route"], "local", "{data}");
    assert_eq!(files_of(&data).await, vec![LOCAL_PNG.to_vec()]);
}

#[tokio::test]
async fn when_every_route_fails_the_task_fails_after_its_retries_naming_each_route() {
    let (up, app) = start(
        Answer::Unavailable,
        Answer::Unavailable,
        "max_attempts = 2",
        "",
    )
    .await;

    let data = app.api.run_to_end("m", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("every route failed"), "{msg}");
    assert!(msg.contains("local: ") && msg.contains("cloud: "), "{msg}");
    assert!(msg.contains("503"), "{msg}");
    assert!(msg.contains("gave up after 2 attempts"), "{msg}");
    assert_eq!(data["route"], "cloud", "the last route tried");
    assert_eq!((up.calls("local"), up.calls("cloud")), (2, 2));
}

#[tokio::test]
async fn a_model_with_one_backend_shows_no_route() {
    let (up, base) = start_upstream().await;
    up.answer("only", Answer::Png(LOCAL_PNG));
    let app = TestApp::start_with_models(&format!(
        "[models.one]\nbackend = \"http\"\nurl = {}\n",
        toml_str(format!("{base}/r/only"))
    ))
    .await;

    let data = app.api.run_to_end("one", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    assert!(data.get("route").is_none(), "{data}");
}

#[tokio::test]
async fn bad_routes_stop_the_start_naming_the_setting() {
    let http =
        |extra: &str| format!("{{ backend = \"http\", url = \"http://127.0.0.1:1/\"{extra} }}");
    let cases = [
        (
            format!(
                "routes = [{}, {{ backend = \"http\", url = \"not a url\" }}]",
                http("")
            ),
            "models.m.routes[1].url",
        ),
        (
            format!(
                "routes = [{}, {}]",
                http(", name = \"a\""),
                http(", name = \"a\"")
            ),
            "models.m.routes[1].name",
        ),
        (
            "routes = [{ backend = \"worker\" }]".to_owned(),
            "models.m.routes[0].backend",
        ),
        (
            format!("routes = [{}]", http(", urll = \"x\"")),
            "models.m.routes[0]",
        ),
        (
            "routes = [{ url = \"http://127.0.0.1:1/\" }]".to_owned(),
            "models.m.routes[0]",
        ),
        (
            format!("routes = [{}]", http(", timeout = \"0s\"")),
            "models.m.routes[0].timeout",
        ),
        (
            format!("routes = [{}]", http(", breaker_failures = 0")),
            "models.m.routes[0].breaker_failures",
        ),
        (
            format!(
                "backend = \"http\"\nurl = \"http://127.0.0.1:1/\"\nroutes = [{}]",
                http("")
            ),
            "models.m",
        ),
        ("routes = []".to_owned(), "models.m.routes"),
    ];
    for (table, setting) in cases {
        let stderr = crate::config::serve_must_refuse(&format!("[models.m]\n{table}\n")).await;
        assert!(
            stderr.contains(setting),
            "{table}: stderr does not name {setting}: {stderr}"
        );
    }
}

#[tokio::test]
async fn an_attempt_that_finds_every_route_full_ends_retryable_instead_of_timing_out() {
    // The routes hold five attempts (local 1, cloud its default 4) and keep them; the model
    // claims six at once, so the sixth finds both full and may wait half the model's timeout.
    let (up, app) = start(
        Answer::Hang,
        Answer::Hang,
        "max_attempts = 1\nconcurrency = 6\ntimeout = \"2s\"",
        "concurrency = 1",
    )
    .await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.api.submit_ok("m", json!({})).await);
    }
    let mut codes = Vec::new();
    for id in &ids {
        let data = app.api.wait_final("m", id, Duration::from_secs(20)).await;
        assert_eq!(data["state"], "failed", "{data}");
        codes.push((
            data["failCode"].as_str().unwrap().to_owned(),
            data["failMsg"].as_str().unwrap().to_owned(),
        ));
    }
    codes.sort();
    assert_eq!(codes[0].0, "MODEL_UNAVAILABLE", "{codes:?}");
    assert!(codes[0].1.contains("no route had room"), "{codes:?}");
    assert!(
        codes[1..]
            .iter()
            .all(|(code, _)| code == "PROCESSING_TIMEOUT"),
        "{codes:?}"
    );
    assert_eq!(
        up.calls("local") + up.calls("cloud"),
        5,
        "the sixth never ran"
    );
}
