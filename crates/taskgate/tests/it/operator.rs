//! The operator endpoints the dashboard reads, through HTTP against a real server: task counts
//! (`GET /api/v1/taskCounts`) and their stream (`streamTaskCounts`), a task's attempts
//! (`statusTask …&attempts=true`), and the operator view (`GET /api/v1/operator`): each one
//! scoped to the caller's tenant.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use taskgate_server::config::{Delays, FileConfig};

use crate::support::*;

async fn get(api: &Api, path: &str) -> (reqwest::StatusCode, Value) {
    envelope(api.request(Method::GET, path).send().await.unwrap()).await
}

/// `data` of GET `path`, read every 20 ms until `cond` holds on it; panics after `timeout`.
async fn get_until(
    api: &Api,
    path: &str,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (status, body) = get(api, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        if cond(&body["data"]) {
            return body["data"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} did not reach the awaited state within {timeout:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn counts(api: &Api) -> Value {
    let (status, body) = get(api, "/api/v1/taskCounts").await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

/// `(pending, processing, success, failed)` of a counts object.
fn four(c: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("no {k} in {c}"));
    (n("pending"), n("processing"), n("success"), n("failed"))
}

#[tokio::test]
async fn task_counts_show_the_callers_tasks_per_model_and_state_and_no_one_elses() {
    let app = TestApp::start().await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "b", None).await.key);
    for input in [json!({"n": 1}), json!({"n": 2}), json!({"fail": "boom"})] {
        app.api.run_to_end("echo", input).await;
    }
    other.run_to_end("echo", json!({"n": 3})).await;

    let mine = counts(&app.api).await;
    assert_eq!(four(&mine["total"]), (0, 0, 2, 1), "{mine}");
    assert_eq!(mine["models"].as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine["models"][0]["model"], "echo");
    assert_eq!(four(&mine["models"][0]), (0, 0, 2, 1));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let since = mine["since"].as_i64().unwrap();
    assert!(
        (now - 24 * 3600 * 1000 - since).abs() < 60_000,
        "the default window is the last 24 h: {since}"
    );
    let theirs = counts(&other).await;
    assert_eq!(four(&theirs["total"]), (0, 0, 1, 0), "{theirs}");

    // A window that starts after every task counts none.
    let (status, body) = get(
        &app.api,
        &format!("/api/v1/taskCounts?since={}", now + 60_000),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(four(&body["data"]["total"]), (0, 0, 0, 0), "{body}");
    assert_eq!(body["data"]["models"], json!([]));

    for (query, says) in [
        ("since=yesterday", "Unix time"),
        ("since=1", "31 days"),
        ("from=1", "unknown query parameter"),
    ] {
        let (status, body) = get(&app.api, &format!("/api/v1/taskCounts?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(error_code(&body), "invalid_input", "{body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
    let resp = app
        .api
        .http
        .get(format!("{}/api/v1/taskCounts", app.api.base))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, 401, "{body}");
}

/// Reads `text/event-stream` events as (event name, data).
struct CountStream {
    resp: reqwest::Response,
    buf: String,
}

impl CountStream {
    async fn open(api: &Api) -> CountStream {
        let resp = api
            .request(Method::GET, "/api/v1/streamTaskCounts")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        CountStream {
            resp,
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a heartbeat comment
                }
                return (event, serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("no count event within 30 s")
                .unwrap()
                .expect("the count stream ended");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[tokio::test]
async fn the_count_stream_sends_the_counts_at_once_then_again_when_the_callers_tasks_change() {
    let app = TestApp::start().await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "b", None).await.key);
    other.run_to_end("echo", json!({"n": 0})).await;

    let mut stream = CountStream::open(&app.api).await;
    let (event, first) = stream.next().await;
    assert_eq!(event, "counts");
    assert_eq!(
        four(&first["total"]),
        (0, 0, 0, 0),
        "another tenant's task is not counted: {first}"
    );

    app.api.run_to_end("echo", json!({"n": 1})).await;
    app.api.run_to_end("echo", json!({"fail": "no"})).await;
    // Events follow the changes, at most one a second; the last one shows both final.
    loop {
        let (event, data) = stream.next().await;
        assert_eq!(event, "counts");
        let (p, r, s, f) = four(&data["total"]);
        assert!(s <= 1 && f <= 1, "only the caller's tasks: {data}");
        if (p, r, s, f) == (0, 0, 1, 1) {
            break;
        }
    }

    // A refused stream is an envelope, not a stream.
    let (status, body) = get(&app.api, "/api/v1/streamTaskCounts?since=soon").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_code(&body), "invalid_input");
}

const RETRYING_WORKER_MODEL: &str = r#"
[models.remote]
backend = "worker"
concurrency = 1
timeout = "30s"
max_attempts = 3
"#;

async fn worker_post(app: &TestApp, token: &str, path: &str, body: Value) -> Value {
    let resp = app
        .api
        .http
        .post(format!("{}{path}", app.api.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, 200, "{path}: {body}");
    body["data"].clone()
}

async fn claim(app: &TestApp, token: &str) -> Value {
    let task = worker_post(
        app,
        token,
        "/api/v1/worker/claim",
        json!({"models": ["remote"], "waitMs": 10_000}),
    )
    .await;
    assert!(task.is_object(), "no task to claim: {task}");
    task
}

#[tokio::test]
async fn attempts_list_each_attempt_with_its_end_and_runner_and_the_operator_view_names_the_worker()
{
    let app = TestApp::start_with(|c| {
        c.models = FileConfig::parse(RETRYING_WORKER_MODEL)
            .unwrap()
            .models
            .unwrap();
        c.server.retry_backoff = Delays(vec![Duration::from_millis(10)]);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let id = app.api.submit_ok("remote", json!({"prompt": "x"})).await;

    let first = claim(&app, &token).await;
    assert_eq!(first["taskId"], id.as_str());
    worker_post(
        &app,
        &token,
        &format!("/api/v1/worker/tasks/{id}/fail"),
        json!({"leaseToken": first["leaseToken"], "failMsg": "the GPU ran out of memory", "retryable": true}),
    )
    .await;
    let second = claim(&app, &token).await;
    assert_eq!(
        (second["taskId"].as_str(), second["attempt"].as_u64()),
        (Some(id.as_str()), Some(2))
    );
    let resp = app
        .api
        .http
        .put(format!(
            "{}/api/v1/worker/tasks/{id}/outputs/out.txt",
            app.api.base
        ))
        .query(&[("leaseToken", second["leaseToken"].as_str().unwrap())])
        .bearer_auth(&token)
        .body("done")
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, 200, "{body}");
    worker_post(
        &app,
        &token,
        &format!("/api/v1/worker/tasks/{id}/complete"),
        json!({"leaseToken": second["leaseToken"], "outputs": ["out.txt"]}),
    )
    .await;
    let done = app
        .api
        .wait_final("remote", &id, Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "success", "{done}");
    assert!(done.get("attempts").is_none(), "only when asked: {done}");

    let (status, body) = get(
        &app.api,
        &format!("/api/v1/statusTask/remote?taskId={id}&attempts=true"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let attempts = body["data"]["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "{body}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert!(attempts[0]["failCode"].is_string(), "{body}");
    assert!(
        attempts[0]["failMsg"]
            .as_str()
            .unwrap()
            .contains("ran out of memory"),
        "{body}"
    );
    assert_eq!(attempts[0]["runner"], "worker:gpu", "{body}");
    let (started, ended) = (
        attempts[0]["startedAt"].as_i64().unwrap(),
        attempts[0]["endedAt"].as_i64().unwrap(),
    );
    assert!(started <= ended, "{body}");
    assert_eq!(attempts[1]["attempt"], 2);
    assert!(attempts[1]["failCode"].is_null(), "a success: {body}");
    assert_eq!(attempts[1]["endedAt"], done["completeTime"], "{body}");
    assert!(
        attempts[1]["runner"]
            .as_str()
            .unwrap()
            .starts_with("worker"),
        "{body}"
    );
    assert!(attempts[1]["startedAt"].as_i64().unwrap() >= ended);

    let (status, body) = get(
        &app.api,
        &format!("/api/v1/statusTask/remote?taskId={id}&attempts=yes"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("attempts"));

    // Another tenant cannot read the attempts of this task.
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "b", None).await.key);
    let (status, body) = get(
        &other,
        &format!("/api/v1/statusTask/remote?taskId={id}&attempts=true"),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // The worker is recorded as seen in the background of its claims.
    let view = get_until(&app.api, "/api/v1/operator", Duration::from_secs(10), |d| {
        d["workers"].as_array().is_some_and(|w| !w.is_empty())
    })
    .await;
    let worker = &view["workers"][0];
    assert_eq!(worker["name"], "gpu", "{view}");
    assert_eq!(worker["models"], json!(["remote"]), "{view}");
    assert!(worker["lastSeenAt"].as_i64().unwrap() > 0);
    assert_eq!(worker["node"], app.api.base.as_str(), "{view}");
}

#[tokio::test]
async fn the_operator_view_counts_the_callers_undelivered_callbacks_only() {
    let app = TestApp::start_with(|c| {
        c.webhooks.allow_private_callbacks = true;
        // One failed attempt, then a long wait: the delivery stays "retrying".
        c.webhooks.retry_delays = Delays(vec![Duration::from_secs(3600)]);
    })
    .await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "b", None).await.key);
    // A port nobody listens on: the first attempt is refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, body) = app
        .api
        .submit(
            "echo",
            json!({"request_type": "callback", "callback_url": format!("http://{closed}/hook"), "input": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let view = get_until(&app.api, "/api/v1/operator", Duration::from_secs(20), |d| {
        d["webhooks"]["retrying"] == 1
    })
    .await;
    let backlog = &view["webhooks"];
    assert_eq!(backlog["pending"], 0, "{backlog}");
    assert_eq!(backlog["failed"], 0, "{backlog}");
    let due = backlog["oldestDueAt"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        due > now + 3_000_000,
        "the next attempt is an hour away: {backlog}"
    );

    let (status, body) = get(&other, "/api/v1/operator").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"]["webhooks"],
        json!({"pending": 0, "retrying": 0, "failed": 0, "oldestDueAt": null}),
        "another tenant's backlog is its own"
    );
}
