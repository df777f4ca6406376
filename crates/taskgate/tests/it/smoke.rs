use serde_json::json;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn an_echo_task_succeeds_and_its_result_url_serves_the_input() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({ "hello": "world" })).await;
    let data = app
        .api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    let urls = result_urls(&data);
    assert_eq!(urls.len(), 1);
    let resp = reqwest::get(&urls[0]).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, json!({ "hello": "world" }));
}
