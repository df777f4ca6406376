//! `Prefer: wait` on generateTask and statusTask, and `streamTask` (Server-Sent Events):
//! answers held until the task changes, never a poll of the store, resumable streams, and
//! events that reach a node other than the one running the task (PostgreSQL).

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

const LONG: Duration = Duration::from_secs(30);

/// A model whose task waits for `gate` to exist, marking in `marks` when it started.
async fn gated_app(gate: &Path, marks: &Path) -> TestApp {
    let gate = gate.to_str().unwrap();
    let marks = marks.to_str().unwrap();
    TestApp::start_with_models(&command_model("slow", "gate.sh", &[gate, marks], "")).await
}

async fn post_waiting(api: &Api, model: &str, wait: &str, body: Value) -> reqwest::Response {
    api.http
        .post(format!("{}/api/v1/generateTask/{model}", api.base))
        .bearer_auth(&api.key)
        .header("prefer", wait)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn status_waiting(api: &Api, model: &str, task_id: &str, wait: &str) -> reqwest::Response {
    api.http
        .get(format!("{}/api/v1/statusTask/{model}", api.base))
        .query(&[("taskId", task_id)])
        .bearer_auth(&api.key)
        .header("prefer", wait)
        .send()
        .await
        .unwrap()
}

fn applied(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("preference-applied")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_submit_that_prefers_to_wait_answers_with_the_final_status() {
    let app = TestApp::start().await;
    let resp = post_waiting(
        &app.api,
        "echo",
        "wait=10",
        json!({"input": {"prompt": "hi"}}),
    )
    .await;
    assert_eq!(applied(&resp).as_deref(), Some("wait=10"));
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = &body["data"];
    assert_eq!(data["state"], "success", "{body}");
    assert!(data["taskId"].as_str().unwrap().starts_with("task_"));
    let urls = result_urls(data);
    assert_eq!(urls.len(), 1, "{body}");
    // What the wait answered is what statusTask says.
    let (_, polled) = app
        .api
        .status("echo", data["taskId"].as_str().unwrap())
        .await;
    assert_eq!(polled["data"], *data);
}

#[tokio::test]
async fn without_the_preference_a_submit_answers_only_the_task_id() {
    let app = TestApp::start().await;
    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/generateTask/echo", app.api.base))
        .bearer_auth(&app.api.key)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(applied(&resp), None);
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_fields(&body["data"], &["taskId"]);
    // A preference the server cannot read is ignored (RFC 7240), not refused.
    let resp = post_waiting(&app.api, "echo", "wait=soon", json!({"input": {}})).await;
    assert_eq!(applied(&resp), None);
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_fields(&body["data"], &["taskId"]);
}

#[tokio::test]
async fn a_waiting_status_read_answers_as_soon_as_the_task_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let id = app.api.submit_ok("slow", json!({})).await;
    wait_for_file(&marks.join(format!("started-{id}-1")), LONG).await;

    let api = app.api.clone();
    let waiting = {
        let id = id.clone();
        tokio::spawn(async move { status_waiting(&api, "slow", &id, "wait=60").await })
    };
    // Held while the task runs: the task has started and nothing has answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the wait answered before the task finished"
    );
    std::fs::write(&gate, "").unwrap();
    let resp = tokio::time::timeout(LONG, waiting).await.unwrap().unwrap();
    assert_eq!(applied(&resp).as_deref(), Some("wait=60"));
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "success", "{body}");
}

#[tokio::test]
async fn a_wait_that_runs_out_answers_the_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let id = app.api.submit_ok("slow", json!({})).await;
    wait_for_file(&marks.join(format!("started-{id}-1")), LONG).await;
    let started = Instant::now();
    let resp = status_waiting(&app.api, "slow", &id, "wait=1").await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(applied(&resp).as_deref(), Some("wait=1"));
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["state"], "processing", "{body}");
    std::fs::write(&gate, "").unwrap();
}

#[tokio::test]
async fn waits_are_capped_at_sixty_seconds_and_keep_tenants_apart() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({})).await;
    app.api.wait_final("echo", &id, LONG).await;
    let resp = status_waiting(&app.api, "echo", &id, "wait=600").await;
    assert_eq!(applied(&resp).as_deref(), Some("wait=60"));
    assert_eq!(envelope(resp).await.0, StatusCode::OK);

    let other = create_key(&app.data_dir, "other", None).await;
    let resp = status_waiting(&app.api.with_key(&other.key), "echo", &id, "wait=5").await;
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
}

/// One Server-Sent Event.
#[tokio::test]
async fn a_stream_sends_each_change_and_ends_after_the_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let id = app.api.submit_ok("slow", json!({})).await;
    let mut stream = SseReader::open(&app.api, "slow", &id, None).await;
    let first = stream.until(|d| d["state"] == "processing").await;
    std::fs::write(&gate, "").unwrap();
    let last = stream.until(|d| d["state"] == "success").await;
    assert!(
        stream.next().await.is_none(),
        "the stream outlived the final state"
    );
    let events: Vec<SseEvent> = first.into_iter().chain(last).collect();
    for ev in &events {
        assert_eq!(ev.data["taskId"], id.as_str());
        assert!(ev.id.as_deref().is_some_and(|i| !i.is_empty()), "{ev:?}");
    }
    // Each event differs from the one before it: a nudge that changed nothing sends nothing.
    for pair in events.windows(2) {
        assert_ne!(pair[0].data, pair[1].data);
    }
    // The final event is statusTask's data.
    let (_, polled) = app.api.status("slow", &id).await;
    assert_eq!(events.last().unwrap().data, polled["data"]);
}

#[tokio::test]
async fn a_stream_resumed_with_last_event_id_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let id = app.api.submit_ok("slow", json!({})).await;
    let mut stream = SseReader::open(&app.api, "slow", &id, None).await;
    let seen = stream.until(|d| d["state"] == "processing").await;
    let last_id = seen.last().unwrap().id.clone().unwrap();
    // The connection breaks; the task finishes meanwhile.
    drop(stream);
    std::fs::write(&gate, "").unwrap();
    app.api.wait_final("slow", &id, LONG).await;

    let mut resumed = SseReader::open(&app.api, "slow", &id, Some(&last_id)).await;
    let ev = resumed.next().await.expect("the missed final state");
    assert_eq!(ev.data["state"], "success", "{ev:?}");
    assert!(resumed.next().await.is_none());

    // A client already holding the final event has nothing more to hear.
    let mut current = SseReader::open(&app.api, "slow", &id, ev.id.as_deref()).await;
    assert!(current.next().await.is_none());
    // Resuming from the same point again is idempotent.
    let mut again = SseReader::open(&app.api, "slow", &id, Some(&last_id)).await;
    assert_eq!(again.next().await.unwrap().id, ev.id);
}

#[tokio::test]
async fn a_stream_refuses_what_status_refuses() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({})).await;
    let get = |path: String, key: String| {
        let http = app.api.http.clone();
        async move { envelope(http.get(path).bearer_auth(key).send().await.unwrap()).await }
    };
    let base = &app.api.base;
    let (status, body) = get(format!("{base}/api/v1/streamTask/echo"), API_KEY.into()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["taskId"]);
    let (status, body) = get(
        format!("{base}/api/v1/streamTask/nope?taskId={id}"),
        API_KEY.into(),
    )
    .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &["nope"]);
    let other = create_key(&app.data_dir, "other", None).await;
    let (status, body) = get(
        format!("{base}/api/v1/streamTask/echo?taskId={id}"),
        other.key.clone(),
    )
    .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
    let (status, _) = get(
        format!("{base}/api/v1/streamTask/echo?taskId={id}"),
        "wrong-key".into(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_stream_on_one_node_follows_a_task_run_through_another() {
    let Some(db) = create_db("streamTask across PostgreSQL nodes").await else {
        return;
    };
    let models = "[models.pull]\nbackend = \"worker\"\n";
    let parsed = || {
        taskgate_server::config::FileConfig::parse(models)
            .unwrap()
            .models
            .unwrap()
    };
    let node_a = TestApp::node_on(&db, |c| c.models = parsed()).await;
    let node_b = TestApp::node_on(&db, |c| c.models = parsed()).await;
    let token = worker_token(&node_a.data_dir, Some(&db.url)).await;

    let id = node_a.api.submit_ok("pull", json!({"n": 1})).await;
    let mut stream = SseReader::open(&node_b.api, "pull", &id, None).await;
    let first = stream.next().await.unwrap();
    assert_eq!(first.data["state"], "pending", "{first:?}");

    // A pull worker runs the task through node A only.
    let worker = |path: &str| {
        node_a
            .api
            .http
            .post(format!("{}/api/v1/worker/{path}", node_a.api.base))
            .bearer_auth(&token)
    };
    let (status, claim) = envelope(
        worker("claim")
            .json(&json!({"models": ["pull"], "waitMs": 5000}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{claim}");
    assert_eq!(claim["data"]["taskId"], id.as_str());
    let lease = claim["data"]["leaseToken"].as_str().unwrap().to_owned();
    stream.until(|d| d["state"] == "processing").await;

    let (status, body) = envelope(
        worker(&format!("tasks/{id}/heartbeat"))
            .json(&json!({"leaseToken": lease, "progress": 0.5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ev = stream.until(|d| d["progress"] == 0.5).await;
    assert_eq!(ev.last().unwrap().data["state"], "processing");

    let resp = node_a
        .api
        .http
        .put(format!(
            "{}/api/v1/worker/tasks/{id}/outputs/out.json",
            node_a.api.base
        ))
        .bearer_auth(&token)
        .query(&[("leaseToken", &lease)])
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    let (status, body) = envelope(
        worker(&format!("tasks/{id}/complete"))
            .json(&json!({"leaseToken": lease, "outputs": ["out.json"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stream.until(|d| d["state"] == "success").await;
    assert!(stream.next().await.is_none());

    // A wait on node B is answered by node A's completion too.
    let id = node_a.api.submit_ok("pull", json!({"n": 2})).await;
    let api_b = node_b.api.clone();
    let waiting = {
        let id = id.clone();
        tokio::spawn(async move { status_waiting(&api_b, "pull", &id, "wait=60").await })
    };
    let (status, claim) = envelope(
        worker("claim")
            .json(&json!({"models": ["pull"], "waitMs": 5000}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{claim}");
    let lease = claim["data"]["leaseToken"].as_str().unwrap().to_owned();
    let (status, body) = envelope(
        worker(&format!("tasks/{id}/fail"))
            .json(&json!({"leaseToken": lease, "failMsg": "no GPU today"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = tokio::time::timeout(LONG, waiting).await.unwrap().unwrap();
    let (_, body) = envelope(resp).await;
    assert_eq!(body["data"]["state"], "failed", "{body}");

    node_a.stop().await.unwrap();
    node_b.stop().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_wait_on_another_tenants_running_task_answers_404_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let id = app.api.submit_ok("slow", json!({})).await;
    wait_for_file(&marks.join(format!("started-{id}-1")), LONG).await;
    let other = create_key(&app.data_dir, "other", None).await;
    // Answered while the task still runs: its timing tells the other tenant nothing.
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        status_waiting(&app.api.with_key(&other.key), "slow", &id, "wait=60"),
    )
    .await
    .expect("the 404 waited for the task");
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
    let (_, mine) = app.api.status("slow", &id).await;
    assert_eq!(mine["data"]["state"], "processing");
    std::fs::write(&gate, "").unwrap();
}

#[tokio::test]
async fn a_stream_ends_once_its_key_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, marks) = (dir.path().join("gate"), dir.path().to_owned());
    let app = gated_app(&gate, &marks).await;
    let key = create_key(&app.data_dir, "soon-revoked", None).await;
    let api = app.api.with_key(&key.key);
    let id = api.submit_ok("slow", json!({})).await;
    let mut stream = SseReader::open(&api, "slow", &id, None).await;
    stream.until(|d| d["state"] == "processing").await;
    let out = taskgate(&[
        "keys",
        "revoke",
        &key.id,
        "--data-dir",
        app.data_dir.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(LONG, "the revoked key to be refused", || async {
        api.status("slow", &id).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    // The task changes; the stream, woken, finds its key revoked and ends without telling.
    std::fs::write(&gate, "").unwrap();
    assert!(
        stream.next().await.is_none(),
        "a revoked key was sent the task's next state"
    );
}

#[tokio::test]
async fn ids_no_task_can_have_are_not_found_without_a_store_read() {
    let app = TestApp::start().await;
    let long = "x".repeat(200);
    for id in ["task_\0abc", long.as_str()] {
        for route in ["statusTask", "streamTask"] {
            let resp = app
                .api
                .http
                .get(format!("{}/api/v1/{route}/echo", app.api.base))
                .query(&[("taskId", id)])
                .bearer_auth(&app.api.key)
                .send()
                .await
                .unwrap();
            let (status, body) = envelope(resp).await;
            assert_error(status, &body, StatusCode::NOT_FOUND, &["at most 128 bytes"]);
            assert!(body.to_string().len() < 400, "the id came back: {body}");
        }
    }
    let (status, body) = app.api.list(&[("model", "e\0cho")]).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["NUL"]);
}
