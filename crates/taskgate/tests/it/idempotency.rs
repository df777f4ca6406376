//! `Idempotency-Key` on generateTask and generateTasks: one key, one creation, per tenant.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn four_concurrent_submits_with_one_key_create_one_task_and_all_get_its_id() {
    let app = TestApp::start().await;
    let body = json!({"input": {"prompt": "once"}});

    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (api, body) = (app.api.clone(), body.clone());
            tokio::spawn(async move { api.submit_keyed("echo", "order-42", body).await })
        })
        .collect();
    let mut ids = Vec::new();
    for run in runs {
        let (status, answer) = run.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{answer}");
        ids.push(answer["data"]["taskId"].as_str().unwrap().to_owned());
    }

    let listed = app.api.list_all_ids(&[]).await;
    assert_eq!(listed.len(), 1, "exactly one task: {listed:?}");
    assert!(
        ids.iter().all(|id| *id == listed[0]),
        "{ids:?} vs {listed:?}"
    );
    // Later, the same request still answers the same task.
    let (_, again) = app.api.submit_keyed("echo", "order-42", body).await;
    assert_eq!(again["data"]["taskId"], listed[0].as_str());
    assert_eq!(app.api.list_all_ids(&[]).await.len(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_body_or_model_is_refused_with_422() {
    let app = TestApp::start().await;
    let (status, first) = app
        .api
        .submit_keyed("echo", "k1", json!({"input": {"prompt": "a"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");

    let (other_body, body1) = app
        .api
        .submit_keyed("echo", "k1", json!({"input": {"prompt": "b"}}))
        .await;
    let (other_model, body2) = app
        .api
        .submit_keyed("demo-image", "k1", json!({"input": {"prompt": "a"}}))
        .await;

    assert_error(
        other_body,
        &body1,
        StatusCode::UNPROCESSABLE_ENTITY,
        &["k1", "different request"],
    );
    assert_eq!(error_code(&body1), "idempotency_key_reused");
    assert_error(
        other_model,
        &body2,
        StatusCode::UNPROCESSABLE_ENTITY,
        &["k1"],
    );
    assert_eq!(
        app.api.list_all_ids(&[]).await.len(),
        1,
        "nothing more was created"
    );
}

#[tokio::test]
async fn tenants_with_the_same_key_get_tasks_of_their_own() {
    let app = TestApp::start().await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "tenant-b", None).await.key);
    let body = json!({"input": {"prompt": "same"}});

    let (_, a) = app.api.submit_keyed("echo", "shared", body.clone()).await;
    let (status, b) = other.submit_keyed("echo", "shared", body).await;

    assert_eq!(status, StatusCode::OK, "{b}");
    assert_ne!(a["data"]["taskId"], b["data"]["taskId"]);
    assert_eq!(
        other.list_all_ids(&[]).await,
        [b["data"]["taskId"].as_str().unwrap()]
    );
    assert_eq!(
        app.api.list_all_ids(&[]).await,
        [a["data"]["taskId"].as_str().unwrap()]
    );
}

#[tokio::test]
async fn without_the_header_each_submit_creates_a_task() {
    let app = TestApp::start().await;
    let body = json!({"input": {"prompt": "again"}});

    let (_, a) = app.api.submit("echo", body.clone()).await;
    let (_, b) = app.api.submit("echo", body).await;

    assert_ne!(a["data"]["taskId"], b["data"]["taskId"]);
    assert_eq!(app.api.list_all_ids(&[]).await.len(), 2);
}

#[tokio::test]
async fn a_key_covers_a_whole_batch() {
    let app = TestApp::start().await;
    let batch = json!({"tasks": [{"input": {"n": 1}}, {"input": {"n": 2}}]});
    let send = |body: serde_json::Value| {
        app.api
            .request(reqwest::Method::POST, "/api/v1/generateTasks/echo")
            .header("idempotency-key", "batch-7")
            .body(body.to_string())
            .send()
    };

    let (s1, first) = envelope(send(batch.clone()).await.unwrap()).await;
    let (s2, again) = envelope(send(batch).await.unwrap()).await;
    let (s3, other) = envelope(send(json!({"tasks": [{"input": {"n": 3}}]})).await.unwrap()).await;

    assert_eq!(
        (s1, s2),
        (StatusCode::OK, StatusCode::OK),
        "{first} {again}"
    );
    assert_eq!(first["data"], again["data"], "the same two ids, in order");
    assert_error(s3, &other, StatusCode::UNPROCESSABLE_ENTITY, &["batch-7"]);
    assert_eq!(app.api.list_all_ids(&[]).await.len(), 2);
    // The key of a batch is not the key of a single submit with the same name and body.
    let (s4, single) = app
        .api
        .submit_keyed("echo", "batch-7", json!({"input": {"n": 1}}))
        .await;
    assert_error(s4, &single, StatusCode::UNPROCESSABLE_ENTITY, &["batch-7"]);
}

#[tokio::test]
async fn a_malformed_key_is_refused_with_400() {
    let app = TestApp::start().await;
    let body = json!({"input": {}});
    let long = "k".repeat(256);
    for (key, needle) in [(long.as_str(), "256 bytes"), ("", "empty")] {
        let (status, answer) = app.api.submit_keyed("echo", key, body.clone()).await;
        assert_error(
            status,
            &answer,
            StatusCode::BAD_REQUEST,
            &["Idempotency-Key", needle],
        );
    }
    // Non-ASCII bytes (reqwest sends a header value's bytes as they are).
    let resp = app
        .api
        .request(reqwest::Method::POST, "/api/v1/generateTask/echo")
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let (status, answer) = envelope(resp).await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, &["non-ASCII"]);
    // 255 bytes is the most.
    let (status, _) = app.api.submit_keyed("echo", &"k".repeat(255), body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.api.list_all_ids(&[]).await.len(), 1);
}
