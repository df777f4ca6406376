//! Per-key limits and scopes (docs/gateway.md, "Per-key limits and scopes"): requests per
//! minute and unfinished tasks at once, one node and two sharing PostgreSQL; models and
//! read-only scopes on every route.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

/// `taskgate keys create --name NAME` with `flags` (scope and limits); the new key.
pub async fn key_with(data_dir: &Path, name: &str, flags: &[&str]) -> CreatedKey {
    key_in(&["--data-dir", data_dir.to_str().unwrap()], name, flags).await
}

/// `taskgate keys create` on the store `store_args` names.
async fn key_in(store_args: &[&str], name: &str, flags: &[&str]) -> CreatedKey {
    let mut args = vec!["keys", "create", "--name", name];
    args.extend_from_slice(store_args);
    args.extend_from_slice(flags);
    let out = taskgate(&args).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "keys create {flags:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_owned();
    let key = stdout.split_whitespace().last().unwrap().to_owned();
    CreatedKey { id, key, stdout }
}

async fn get(api: &Api, path: &str) -> reqwest::Response {
    api.http
        .get(format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap()
}

async fn post(api: &Api, path: &str, body: Value) -> reqwest::Response {
    api.http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Asserts a 429 `rate_limited` with a `Retry-After` of whole seconds, at least 1; its message.
async fn assert_rate_limited(resp: reqwest::Response) -> String {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), "rate_limited", "{body}");
    let secs: u64 = retry_after
        .expect("a 429 carries Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(secs >= 1, "Retry-After {secs}");
    body["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_key_past_its_requests_per_minute_gets_429_rate_limited_with_retry_after() {
    let app = TestApp::start().await;
    let limited = key_with(&app.data_dir, "limited", &["--requests-per-minute", "3"]).await;
    let api = app.api.with_key(&limited.key);

    for i in 0..3 {
        let (status, body) = envelope(get(&api, "/api/v1/models").await).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let message = assert_rate_limited(get(&api, "/api/v1/models").await).await;
    assert!(message.contains("3 requests per minute"), "{message}");
    // Every client route counts, a submit too; another key has its own budget.
    assert_rate_limited(post(&api, "/api/v1/generateTask/echo", json!({"input": {}})).await).await;
    let (status, body) = envelope(get(&app.api, "/api/v1/models").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn keys_that_set_no_limit_take_the_limits_table_and_zero_is_unlimited() {
    let app = TestApp::start_with(|c| c.limits.requests_per_minute = 2).await;
    let plain = key_with(&app.data_dir, "plain", &[]).await;
    let free = key_with(&app.data_dir, "free", &["--requests-per-minute", "0"]).await;

    let plain = app.api.with_key(&plain.key);
    for _ in 0..2 {
        assert_eq!(get(&plain, "/api/v1/models").await.status(), StatusCode::OK);
    }
    assert_rate_limited(get(&plain, "/api/v1/models").await).await;
    let free = app.api.with_key(&free.key);
    for i in 0..10 {
        let resp = get(&free, "/api/v1/models").await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
    }
}

#[tokio::test]
async fn a_key_with_two_unfinished_tasks_is_refused_a_third_until_one_finishes() {
    let app = TestApp::start().await;
    let two = key_with(&app.data_dir, "two", &["--concurrent-tasks", "2"]).await;
    let api = app.api.with_key(&two.key);
    let slow = json!({ "delay_ms": 600_000 });
    let first = api.submit_ok("echo", slow.clone()).await;
    let second = api.submit_ok("echo", slow.clone()).await;

    let message =
        assert_rate_limited(post(&api, "/api/v1/generateTask/echo", json!({"input": slow})).await)
            .await;
    assert!(message.contains("concurrent_tasks"), "{message}");
    // A batch that would pass the limit is refused whole.
    let (status, body) = api
        .submit_batch("echo", json!({ "tasks": [{"input": {}}] }))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");

    let (status, body) = api.cancel("echo", &first).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let third = std::sync::Arc::new(std::sync::Mutex::new(None));
    wait_until(
        Duration::from_secs(10),
        "a place frees once a task ends",
        || {
            let (api, third) = (api.clone(), third.clone());
            async move {
                let (status, body) = api.submit("echo", json!({"input": {}})).await;
                if status == StatusCode::OK {
                    *third.lock().unwrap() = body["data"]["taskId"].as_str().map(str::to_owned);
                }
                status == StatusCode::OK
            }
        },
    )
    .await;
    assert!(third.lock().unwrap().is_some());
    api.cancel("echo", &second).await;
}

#[tokio::test]
async fn a_key_scoped_to_one_model_gets_403_on_another_and_lists_only_its_own() {
    let app = TestApp::start().await;
    let scoped = key_with(&app.data_dir, "scoped", &["--models", "echo"]).await;
    let api = app.api.with_key(&scoped.key);

    let (status, body) = api.submit("demo-image", json!({"input": {}})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "model_not_allowed");
    assert!(
        body["message"].as_str().unwrap().contains("only echo"),
        "{body}"
    );
    // Another key's task of that model is no more visible to it than a task that is not there.
    let other = app.api.submit_ok("demo-image", json!({})).await;
    let (status, body) = api.status("demo-image", &other).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "model_not_allowed");
    let (status, body) = api.cancel("demo-image", &other).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let (status, body) = envelope(get(&api, "/api/v1/models").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = body["data"]["models"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "only its model is listed: {body}");
    assert_eq!(listed[0]["model"], "echo");
    let data = api.run_to_end("echo", json!({"n": 1})).await;
    assert_eq!(data["state"], "success", "{data}");
}

/// Every client-key operation of the OpenAPI document, as (method, path) with path parameters
/// filled in and a `taskId=` query where it takes one, so that a route added later is walked
/// too.
pub(crate) async fn client_operations(app: &TestApp, task_id: &str) -> Vec<(String, String)> {
    let doc: Value = reqwest::get(format!("{}/openapi.json", app.api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let takes_client_key = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("apiKey").is_some()));
            if takes_client_key {
                let mut path = path.replace("{model}", "echo").replace("{id}", "whd_none");
                let takes_task_id = op["parameters"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == "taskId"));
                if takes_task_id {
                    path.push_str(&format!("?taskId={task_id}"));
                }
                ops.push((method.to_uppercase(), path));
            }
        }
    }
    ops
}

/// One operation of [`client_operations`] with `api`'s key and a body any submit would take.
pub(crate) async fn call(api: &Api, method: &str, path: &str) -> reqwest::Response {
    api.http
        .request(method.parse().unwrap(), format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .json(&json!({"input": {}, "tasks": [{"input": {}}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_read_only_key_is_refused_every_write_with_403_and_may_read() {
    let app = TestApp::start().await;
    let reader = key_with(
        &app.data_dir,
        "reader",
        &["--tenant", "default", "--read-only"],
    )
    .await;
    let api = app.api.with_key(&reader.key);
    let task = app.api.submit_ok("echo", json!({})).await;
    app.api
        .wait_final("echo", &task, Duration::from_secs(10))
        .await;

    let ops = client_operations(&app, &task).await;
    let writes: Vec<_> = ops.iter().filter(|(m, _)| m != "GET").collect();
    assert!(writes.len() >= 5, "{writes:?}");
    for (method, path) in &ops {
        let resp = call(&api, method, path).await;
        let status = resp.status();
        if method == "GET" {
            // Headers are enough (a stream's body never ends): any answer but a refusal.
            assert_eq!(status, StatusCode::OK, "{method} {path}");
        } else {
            let (status, body) = envelope(resp).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert_eq!(error_code(&body), "read_only_key", "{method} {path}");
        }
    }
    // The task it read is untouched by the refused cancel.
    let (status, body) = api.status("echo", &task).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "success");
}

#[tokio::test]
async fn keys_update_reaches_a_running_server_within_seconds() {
    let app = TestApp::start().await;
    let key = key_with(&app.data_dir, "changing", &[]).await;
    let api = app.api.with_key(&key.key);
    api.submit_ok("demo-image", json!({})).await;

    let dir = app.data_dir.to_str().unwrap();
    let out = taskgate(&[
        "keys",
        "update",
        &key.id,
        "--models",
        "echo",
        "--read-only",
        "--data-dir",
        dir,
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("models: echo; read-only"), "{stdout}");

    wait_until(Duration::from_secs(5), "the new scope applies", || {
        let api = api.clone();
        async move {
            let (status, body) = api.submit("demo-image", json!({"input": {}})).await;
            status == StatusCode::FORBIDDEN && error_code(&body) == "read_only_key"
        }
    })
    .await;
    let (status, body) = envelope(get(&api, "/api/v1/models").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["data"]["models"].as_array().unwrap().len(),
        1,
        "{body}"
    );
}

#[tokio::test]
async fn keys_create_and_update_refuse_bad_limits_and_list_shows_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = taskgate(&[
        "keys",
        "create",
        "--name",
        "x",
        "--requests-per-minute",
        "lots",
        "--data-dir",
        d,
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a whole number"), "{err}");
    let out = taskgate(&[
        "keys",
        "create",
        "--name",
        "w",
        "--worker",
        "--models",
        "echo",
        "--data-dir",
        d,
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("client keys")
            || String::from_utf8_lossy(&out.stderr).contains("client keys")
    );

    let k = key_with(
        dir.path(),
        "k",
        &["--models", "echo,demo-image", "--concurrent-tasks", "5"],
    )
    .await;
    let out = taskgate(&[
        "keys",
        "update",
        &k.id,
        "--requests-per-minute",
        "60",
        "--data-dir",
        d,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = taskgate(&["keys", "update", &k.id, "--data-dir", d]).await;
    assert!(
        !out.status.success(),
        "an update with nothing to change is refused"
    );
    let out = taskgate(&["keys", "update", "key_nope", "--read-only", "--data-dir", d]).await;
    assert!(!out.status.success());

    let out = taskgate(&["keys", "list", "--json", "--data-dir", d]).await;
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == k.id.as_str())
        .unwrap();
    assert_eq!(listed["models"], json!(["echo", "demo-image"]));
    assert_eq!(listed["concurrentTasks"], 5);
    assert_eq!(listed["requestsPerMinute"], 60);
    assert_eq!(listed["readOnly"], false);
}

#[tokio::test]
async fn a_keys_budget_spent_on_one_node_is_refused_on_another_within_a_few_syncs() {
    let Some(db) = create_db("per-key limits across PostgreSQL nodes").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = ["--database-url", &db.url];
    let a = ServerProcess::spawn_with(&data, None, &flags).await;
    let b = ServerProcess::spawn_with(&data, None, &flags).await;
    const LIMIT: usize = 20;
    let key = key_in(
        &["--database-url", &db.url],
        "shared",
        &["--requests-per-minute", &LIMIT.to_string()],
    )
    .await;
    let on_a = a.api.with_key(&key.key);
    let on_b = b.api.with_key(&key.key);

    let mut admitted = 0;
    for _ in 0..LIMIT {
        if get(&on_a, "/api/v1/models").await.status() == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, LIMIT, "node A alone admits the whole budget");
    // Node B learns of A's spending at its next syncs (500 ms each); until then it may admit
    // from its own view. One request per 100 ms, so its overshoot stays small.
    let mut on_b_admitted = 0;
    let mut refused = false;
    for _ in 0..50 {
        let resp = get(&on_b, "/api/v1/models").await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_rate_limited(resp).await;
            refused = true;
            break;
        }
        on_b_admitted += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "node B never refused the spent key");
    // The documented bound: what B admits in two sync intervals of A's and its own (about 1 s,
    // 10 requests at this pace); far below a budget of its own.
    assert!(
        on_b_admitted <= 12,
        "node B admitted {on_b_admitted} after A spent the budget"
    );
    // And A now sees B's too: the key stays refused there.
    assert_rate_limited(get(&on_a, "/api/v1/models").await).await;
    a.terminate().await;
    b.terminate().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_key_scoped_to_other_models_is_refused_every_route_that_could_show_this_models_tasks() {
    let app = TestApp::start().await;
    let scoped = key_with(
        &app.data_dir,
        "scoped",
        &["--tenant", "default", "--models", "demo-image"],
    )
    .await;
    let api = app.api.with_key(&scoped.key);
    // A task of the same tenant, of a model outside the key's scope.
    let task = app.api.submit_ok("echo", json!({})).await;
    app.api
        .wait_final("echo", &task, Duration::from_secs(10))
        .await;

    let ops = client_operations(&app, &task).await;
    assert!(ops.len() >= 10, "{ops:?}");
    for (method, path) in &ops {
        let resp = call(&api, method, path).await;
        if path == "/api/v1/models" {
            assert_eq!(resp.status(), StatusCode::OK, "{method} {path}");
            continue;
        }
        let (status, body) = envelope(resp).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert_eq!(error_code(&body), "model_not_allowed", "{method} {path}");
        assert!(!body.to_string().contains(&task), "{method} {path}: {body}");
    }
}
