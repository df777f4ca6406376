use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskgate_client::{Error, TaskState, WaitOptions};

use crate::support::{FakeServer, Reply};

fn fast() -> WaitOptions {
    WaitOptions {
        initial_interval: Duration::from_millis(2),
        max_interval: Duration::from_millis(10),
        timeout: Duration::from_secs(10),
        ..WaitOptions::default()
    }
}

#[tokio::test]
async fn wait_returns_the_final_status_once_the_task_succeeds_and_reports_each_poll() {
    let server = FakeServer::start().await;
    server.on_status([
        Reply::state("pending"),
        Reply::state("processing"),
        Reply::state("success"),
    ]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();

    let status = server
        .client()
        .wait(
            "echo",
            "task_1",
            fast().on_progress(move |p| {
                sink.lock()
                    .unwrap()
                    .push((p.state, p.polls, p.next_poll.is_some()))
            }),
        )
        .await
        .unwrap();

    assert_eq!(status.state, TaskState::Success);
    assert_eq!(server.requests().len(), 3);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (None, 0, true),
            (Some(TaskState::Pending), 1, true),
            (Some(TaskState::Processing), 2, true),
            (Some(TaskState::Success), 3, false),
        ]
    );
}

#[tokio::test]
async fn wait_reports_a_failed_task_with_its_fail_code_and_message() {
    let server = FakeServer::start().await;
    server.on_status([
        Reply::state("processing"),
        Reply::ok(serde_json::json!({
            "taskId": "task_1", "state": "failed", "createTime": 1,
            "failCode": "CONTENT_VIOLATION", "failMsg": "Content violates usage policy"
        })),
    ]);

    let err = server
        .client()
        .wait("echo", "task_1", fast())
        .await
        .unwrap_err();

    match err {
        Error::TaskFailed {
            task_id,
            fail_code,
            fail_msg,
            status,
        } => {
            assert_eq!(task_id, "task_1");
            assert_eq!(fail_code.as_deref(), Some("CONTENT_VIOLATION"));
            assert_eq!(fail_msg.as_deref(), Some("Content violates usage policy"));
            assert_eq!(status.state, TaskState::Failed);
        }
        other => panic!("expected TaskFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn wait_times_out_when_the_task_never_finishes() {
    let server = FakeServer::start().await;
    server.on_status([Reply::state("processing")]);

    let err = server
        .client()
        .wait("echo", "task_1", fast().timeout(Duration::from_millis(60)))
        .await
        .unwrap_err();

    match err {
        Error::Timeout {
            task_id,
            elapsed,
            last_state,
        } => {
            assert_eq!(task_id, "task_1");
            assert_eq!(last_state, Some(TaskState::Processing));
            assert!(elapsed >= Duration::from_millis(60), "{elapsed:?}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(server.requests().len() >= 2);
}

#[tokio::test]
async fn wait_with_poll_immediately_returns_a_finished_task_without_waiting_an_interval() {
    let server = FakeServer::start().await;
    server.on_status([Reply::state("success")]);
    // An hour-long interval: the test can only finish if the first poll happens right away.
    let opts = WaitOptions {
        initial_interval: Duration::from_secs(3600),
        ..WaitOptions::default()
    }
    .poll_immediately(true);

    let status = tokio::time::timeout(
        Duration::from_secs(10),
        server.client().wait("echo", "task_1", opts),
    )
    .await
    .expect("wait should not sleep before its first poll")
    .unwrap();

    assert_eq!(status.state, TaskState::Success);
}

#[tokio::test]
async fn wait_gives_up_on_a_status_error_that_is_not_transient() {
    let server = FakeServer::start().await;
    server.on_status([Reply::error(404, "task not found")]);

    let err = server
        .client()
        .wait("echo", "task_1", fast())
        .await
        .unwrap_err();

    assert!(matches!(err, Error::Api { status: 404, .. }), "{err:?}");
    assert_eq!(server.requests().len(), 1);
}
