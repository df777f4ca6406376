//! The wire contract: endpoints, the envelope, and the exact shape of `data` in every state.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_server::domain::now_ms;

use crate::support::*;

/// One echo model that runs one task at a time, so a second task has to wait.
const SERIAL_ECHO: &str = r#"
[models.serial]
backend = "builtin"
builtin = "echo"
concurrency = 1
"#;

fn int(data: &Value, field: &str) -> i64 {
    data[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} is not an integer in {data}"))
}

#[tokio::test]
async fn healthz_answers_without_a_key() {
    let app = TestApp::start().await;

    let resp = reqwest::get(format!("{}/healthz", app.api.base))
        .await
        .unwrap();

    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["message"], "success");
}

#[tokio::test]
async fn submit_answers_at_once_with_exactly_the_task_id_in_the_envelope() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .submit(
            "echo",
            json!({ "request_type": "async", "input": { "delay_ms": 60_000 } }),
        )
        .await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["code"], 200);
    assert_eq!(body["message"], "success");
    assert_fields(&body["data"], &["taskId"]);
    let id = body["data"]["taskId"].as_str().unwrap();
    assert!(id.starts_with("task_"), "{id}");
    assert!(id.len() >= 26, "a task id must be hard to guess: {id}");
}

#[tokio::test]
async fn request_type_may_be_omitted_and_task_ids_differ() {
    let app = TestApp::start().await;

    let a = app.api.submit_ok("echo", json!({})).await;
    let b = app.api.submit_ok("echo", json!({})).await;

    assert_ne!(a, b);
    for id in [a, b] {
        let data = app
            .api
            .wait_final("echo", &id, Duration::from_secs(10))
            .await;
        assert_eq!(data["state"], "success", "{data}");
    }
}

#[tokio::test]
async fn a_task_behind_a_busy_model_stays_pending_while_the_first_is_processing() {
    let app = TestApp::start_with_models(SERIAL_ECHO).await;
    let before = now_ms();
    let first = app
        .api
        .submit_ok("serial", json!({ "delay_ms": 1500 }))
        .await;
    let processing = app
        .api
        .wait_for("serial", &first, Duration::from_secs(10), |d| {
            d["state"] == "processing"
        })
        .await;

    let second = app.api.submit_ok("serial", json!({ "n": 2 })).await;
    let after = now_ms();

    // processing: only taskId, state and createTime.
    assert_fields(&processing, &["taskId", "state", "createTime"]);
    assert_eq!(processing["taskId"], first.as_str());
    let created = int(&processing, "createTime");
    assert!(
        (before..=after).contains(&created),
        "createTime {created} not in [{before}, {after}]"
    );
    // pending, and it stays so as long as the first one runs. The second is read before the
    // first: if the first is still processing afterwards, it was when the second was read.
    let mut pending_seen = 0;
    loop {
        let (status, b) = app.api.status("serial", &second).await;
        let (_, a) = app.api.status("serial", &first).await;
        assert_eq!(status, StatusCode::OK);
        if a["data"]["state"] != "processing" {
            break;
        }
        assert_eq!(b["data"]["state"], "pending", "{b}");
        // APIXO's three fields, and taskgate's queuePosition once the answer comes from the
        // store (after the first second): 0, the task is next.
        let mut fields = vec!["taskId", "state", "createTime"];
        if b["data"].get("queuePosition").is_some() {
            assert_eq!(b["data"]["queuePosition"], 0, "{b}");
            fields.push("queuePosition");
        }
        assert_fields(&b["data"], &fields);
        pending_seen += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pending_seen > 0, "never saw the second task pending");
    let data = app
        .api
        .wait_final("serial", &second, Duration::from_secs(10))
        .await;
    assert_eq!(data["state"], "success", "{data}");
}

#[tokio::test]
async fn a_successful_task_has_result_json_as_a_string_and_consistent_times() {
    let app = TestApp::start().await;
    let before = now_ms();
    let id = app.api.submit_ok("echo", json!({ "delay_ms": 200 })).await;

    let data = app
        .api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;
    let after = now_ms();

    assert_eq!(data["state"], "success", "{data}");
    assert_fields(
        &data,
        &[
            "taskId",
            "state",
            "createTime",
            "resultJson",
            "costTime",
            "completeTime",
        ],
    );
    let result_json = data["resultJson"].as_str().expect("resultJson is a string");
    let parsed: Value = serde_json::from_str(result_json).unwrap();
    assert_fields(&parsed, &["resultUrls"]);
    let urls = result_urls(&data);
    assert_eq!(urls.len(), 1);
    assert!(
        urls[0].starts_with(&format!("{}/files/", app.api.base)),
        "{}",
        urls[0]
    );
    let (created, completed, cost) = (
        int(&data, "createTime"),
        int(&data, "completeTime"),
        int(&data, "costTime"),
    );
    assert!(before <= created && created <= completed && completed <= after);
    assert!(
        cost >= 200,
        "costTime {cost} is shorter than the 200 ms delay"
    );
    assert!(
        cost <= completed - created,
        "costTime {cost} is longer than the task's life {}",
        completed - created
    );
}

#[tokio::test]
async fn a_failed_task_is_still_a_200_with_fail_code_and_fail_msg_but_no_result() {
    let app = TestApp::start().await;
    let before = now_ms();

    let data = app
        .api
        .run_to_end("echo", json!({ "fail": "the prompt was rejected" }))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_fields(
        &data,
        &[
            "taskId",
            "state",
            "createTime",
            "completeTime",
            "failCode",
            "failMsg",
        ],
    );
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    assert_eq!(data["failMsg"], "the prompt was rejected");
    assert!(int(&data, "completeTime") >= int(&data, "createTime"));
    assert!(int(&data, "createTime") >= before);
}

#[tokio::test]
async fn the_final_state_does_not_change_when_read_again() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({ "x": 1 })).await;
    let first = app
        .api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, again) = app.api.status("echo", &id).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["data"], first);
}

#[tokio::test]
async fn an_idle_model_starts_a_new_task_at_once_without_waiting_for_a_poll_interval() {
    let app = TestApp::start().await;
    // Let the dispatcher go idle first: it must be woken by the submit, not by a timer.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    let data = app.api.run_to_end("echo", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn result_urls_are_absolute_on_the_bound_address_by_default() {
    let app = TestApp::start().await;

    let data = app.api.run_to_end("echo", json!({})).await;

    let url = &result_urls(&data)[0];
    assert!(
        url.starts_with(&format!("http://{}/files/task_", app.addr)),
        "{url}"
    );
}

#[tokio::test]
async fn result_urls_are_built_from_the_public_url_when_one_is_set() {
    let app =
        TestApp::start_with(|c| c.server.public_url = Some("https://tasks.example.com/".into()))
            .await;

    let data = app.api.run_to_end("echo", json!({})).await;

    let url = &result_urls(&data)[0];
    assert!(
        url.starts_with("https://tasks.example.com/files/task_"),
        "{url}"
    );
    // The same link, asked of this server directly, serves the file.
    let local = url.replace("https://tasks.example.com", &app.api.base);
    assert_eq!(reqwest::get(&local).await.unwrap().status(), StatusCode::OK);
}

/// statusTask with extra query parameters (beyond `taskId`).
async fn status_with(api: &Api, id: &str, extra: &[(&str, &str)]) -> (StatusCode, Value) {
    let resp = api
        .request(reqwest::Method::GET, "/api/v1/statusTask/echo")
        .query(&[("taskId", id)])
        .query(extra)
        .send()
        .await
        .unwrap();
    envelope(resp).await
}

#[tokio::test]
async fn status_with_input_true_returns_the_input_as_submitted_and_leaves_it_out_otherwise() {
    let app = TestApp::start().await;
    let input = json!({
        "prompt": "a fox 🦊 in \"quotes\"",
        "size": {"width": 64, "height": 48, "scale": 1.5},
        "tags": ["a", 2, null, true, {"deep": [[], {}]}],
        "empty": {},
    });
    let id = app.api.submit_ok("echo", input.clone()).await;
    let done = app
        .api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;
    assert_eq!(done["state"], "success", "{done}");

    // The default read (from the store, then from the node's views) has no input.
    for _ in 0..2 {
        let (status, body) = app.api.status("echo", &id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["data"].get("input").is_none(), "{body}");
    }
    let (_, body) = status_with(&app.api, &id, &[("input", "false")]).await;
    assert!(body["data"].get("input").is_none(), "{body}");

    // Asked for, it is the input exactly as submitted, beside the usual fields.
    let (status, body) = status_with(&app.api, &id, &[("input", "true")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["input"], input);
    assert_eq!(body["data"]["taskId"], id.as_str());
    assert_eq!(body["data"]["resultJson"], done["resultJson"]);

    // A bad value is a 400 naming the parameter.
    let (status, body) = status_with(&app.api, &id, &[("input", "yes")]).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["input", "yes"]);
    assert_eq!(error_code(&body), "invalid_input");

    // Another tenant's key cannot read it: the task does not exist for it.
    let other = create_key(&app.data_dir, "other-tenant", None).await;
    let (status, body) =
        status_with(&app.api.with_key(&other.key), &id, &[("input", "true")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(error_code(&body), "task_not_found");
    assert!(!body.to_string().contains("fox"), "{body}");
}
