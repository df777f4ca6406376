//! What operators point their tooling at: liveness (`/healthz`) and readiness (`/readyz`).

use std::time::Duration;

use reqwest::StatusCode;
use taskgate_server::store::faults::Fault;

use crate::support::*;

async fn get(app: &TestApp, path: &str) -> (StatusCode, serde_json::Value) {
    envelope(
        app.api
            .http
            .get(format!("{}{path}", app.api.base))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn readiness_follows_the_store_while_liveness_stays_up() {
    let (app, plan) = TestApp::start_with_faults(|_| {}).await;
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["status"], "ready");

    // The store stops answering: not ready, in the envelope, without naming its address.
    plan.inject_next("keys_revision", 1_000_000, Fault::Fail);
    let (status, body) = get(&app, "/readyz").await;
    let message = assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        &["store cannot be read"],
    );
    assert!(!message.contains("127.0.0.1"), "{message}");
    let (status, _) = get(&app, "/healthz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "liveness must not fail with the store"
    );

    // Back by itself once the store answers.
    plan.clear();
    wait_until(
        Duration::from_secs(10),
        "readiness to come back",
        || async { get(&app, "/readyz").await.0 == StatusCode::OK },
    )
    .await;
}
