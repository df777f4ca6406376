//! `Client::cancel` against a real server: the cancelled status comes back decoded, and a
//! finished task's refusal carries `task_already_final`.

use serde_json::json;
use taskgate_client::proto::ErrorCode;
use taskgate_client::{SubmitOptions, TaskState, WaitOptions};

use crate::real_server::RealServer;

#[tokio::test]
async fn cancel_returns_the_cancelled_status_and_a_second_cancel_is_refused_as_already_final() {
    let app = RealServer::start().await;
    let client = app.client();
    let id = client
        .submit(
            "echo",
            json!({"delay_ms": 60_000}),
            SubmitOptions::default(),
        )
        .await
        .unwrap();

    let status = client.cancel("echo", &id).await.unwrap();

    assert_eq!(status.task_id, id);
    assert_eq!(status.state, TaskState::Failed);
    assert_eq!(status.fail_code.as_deref(), Some("CANCELLED"));
    assert!(status.complete_time.is_some());
    let waited = client
        .wait("echo", &id, WaitOptions::default().poll_immediately(true))
        .await
        .unwrap_err();
    assert!(
        matches!(waited, taskgate_client::Error::TaskFailed { .. }),
        "{waited}"
    );
    let again = client.cancel("echo", &id).await.unwrap_err();
    assert_eq!(
        again.error_code(),
        Some(ErrorCode::TaskAlreadyFinal),
        "{again}"
    );
    let unknown = client
        .cancel("echo", "task_01hzzzzzzzzzzzzzzzzzzzzzzz")
        .await
        .unwrap_err();
    assert_eq!(
        unknown.error_code(),
        Some(ErrorCode::TaskNotFound),
        "{unknown}"
    );
}
