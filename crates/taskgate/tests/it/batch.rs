//! `POST /api/v1/generateTasks/{model}`: up to 1000 tasks in one request, all created or none.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

fn items(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"input": {"n": i}})).collect()
}

#[tokio::test]
async fn a_batch_of_1000_answers_1000_ids_in_order_and_all_succeed() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": items(1000) }))
        .await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<String> = body["data"]["taskIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1000);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        1000,
        "ids are distinct"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids follow the batch's order"
    );
    wait_until(
        Duration::from_secs(60),
        "every task of the batch to finish",
        || async {
            let (_, pending) = app.api.list(&[("state", "pending"), ("limit", "1")]).await;
            let (_, running) = app
                .api
                .list(&[("state", "processing"), ("limit", "1")])
                .await;
            pending["data"]["tasks"].as_array().unwrap().is_empty()
                && running["data"]["tasks"].as_array().unwrap().is_empty()
        },
    )
    .await;
    let succeeded: HashSet<String> = app
        .api
        .list_all_ids(&[("state", "success")])
        .await
        .into_iter()
        .collect();
    assert_eq!(succeeded, ids.iter().cloned().collect::<HashSet<_>>());
    // Each task ran its own item, in its place: the 4th id's result holds n = 3.
    let data = app
        .api
        .wait_final("echo", &ids[3], Duration::from_secs(5))
        .await;
    let (_, file) = fetch_ok(&result_urls(&data)[0]).await;
    let echoed: Value = serde_json::from_slice(&file).unwrap();
    assert_eq!(echoed, json!({"n": 3}));
}

#[tokio::test]
async fn one_bad_item_refuses_the_whole_batch_naming_its_index() {
    let app = TestApp::start().await;
    let mut tasks = items(6);
    tasks[3] = json!({"request_type": "async"});

    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": tasks }))
        .await;

    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        &["tasks[3]: input is required"],
    );
    assert!(
        app.api.list_all_ids(&[]).await.is_empty(),
        "nothing was created"
    );

    // The model's own validation too, and a refused callback_url keeps its code.
    let mut tasks = items(3);
    tasks[1] = json!({"input": {"delay_ms": "soon"}});
    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": tasks }))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        &["tasks[1]: ", "delay_ms"],
    );
    let mut tasks = items(3);
    tasks[2] = json!({"input": {}, "callback_url": "http://127.0.0.1/hook"});
    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": tasks }))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        &["tasks[2]: callback_url"],
    );
    assert_eq!(error_code(&body), "callback_url_refused");
    assert!(
        app.api.list_all_ids(&[]).await.is_empty(),
        "nothing was created"
    );
}

#[tokio::test]
async fn a_batch_of_1001_or_of_none_is_refused() {
    let app = TestApp::start().await;

    let (too_many, many_body) = app
        .api
        .submit_batch("echo", json!({ "tasks": items(1001) }))
        .await;
    let (empty, empty_body) = app.api.submit_batch("echo", json!({ "tasks": [] })).await;
    let (missing, missing_body) = app.api.submit_batch("echo", json!({})).await;
    let (unknown, unknown_body) = app
        .api
        .submit_batch("nano-banana", json!({ "tasks": items(1) }))
        .await;

    assert_error(
        too_many,
        &many_body,
        StatusCode::BAD_REQUEST,
        &["1001", "at most 1000"],
    );
    assert_error(
        empty,
        &empty_body,
        StatusCode::BAD_REQUEST,
        &["tasks is empty"],
    );
    assert_error(
        missing,
        &missing_body,
        StatusCode::BAD_REQUEST,
        &["tasks is required"],
    );
    assert_error(
        unknown,
        &unknown_body,
        StatusCode::NOT_FOUND,
        &["nano-banana"],
    );
    assert!(
        app.api.list_all_ids(&[]).await.is_empty(),
        "nothing was created"
    );
}

#[tokio::test]
async fn a_batch_over_the_body_limit_is_refused_with_413() {
    let app = TestApp::start_with(|c| c.server.max_body_bytes = 4096).await;

    let big = json!({ "tasks": [{"input": {"prompt": "x".repeat(5000)}}] });
    let (status, body) = app.api.submit_batch("echo", big).await;

    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, &["4096"]);
}

#[tokio::test]
async fn batches_and_keyed_submits_run_to_the_end_on_postgresql() {
    let Some(db) = create_db("batch and keyed submits on PostgreSQL").await else {
        return;
    };
    let app = TestApp::node_on(&db, |_| {}).await;

    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": items(50) }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, keyed) = app
        .api
        .submit_keyed("echo", "pg-1", json!({"input": {"k": 1}}))
        .await;
    let (_, replayed) = app
        .api
        .submit_keyed("echo", "pg-1", json!({"input": {"k": 1}}))
        .await;
    assert_eq!(keyed["data"], replayed["data"]);

    let mut ids: Vec<String> = body["data"]["taskIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.push(keyed["data"]["taskId"].as_str().unwrap().to_owned());
    for id in &ids {
        let data = app
            .api
            .wait_final("echo", id, Duration::from_secs(30))
            .await;
        assert_eq!(data["state"], "success", "{data}");
    }
    let mut listed = app.api.list_all_ids(&[("model", "echo")]).await;
    listed.sort_unstable();
    ids.sort_unstable();
    assert_eq!(listed, ids);
    app.stop().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_batch_the_database_cannot_take_answers_503_and_creates_nothing() {
    use taskgate_server::store::faults::Fault;
    let (app, plan) = TestApp::start_with_faults(|_| {}).await;
    plan.inject_next("insert_tasks", 1, Fault::Fail);

    let (status, body) = app
        .api
        .submit_batch("echo", json!({ "tasks": items(3) }))
        .await;
    let listed = app.api.list_all_ids(&[]).await;
    let (retried, again) = app
        .api
        .submit_batch("echo", json!({ "tasks": items(3) }))
        .await;

    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        &["unavailable"],
    );
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(retried, StatusCode::OK, "{again}");
    for id in again["data"]["taskIds"].as_array().unwrap() {
        let data = app
            .api
            .wait_final("echo", id.as_str().unwrap(), Duration::from_secs(20))
            .await;
        assert_eq!(data["state"], "success", "{data}");
    }
}
