//! The worker client: a claim's whole life against a real server, the errors a worker must tell
//! apart (lease lost, token refused), and the request details a scripted server can check.

use std::time::Duration;

use serde_json::{json, Value};
use taskgate_client::proto::{ErrorCode, WorkerComplete, WorkerFail, WorkerHeartbeat, WorkerTask};
use taskgate_client::{Error, SubmitOptions, TaskState, WorkerClient};

use crate::real_server::{RealServer, API_KEY};
use crate::support::{FakeServer, Reply};

fn beat(lease_token: &str) -> WorkerHeartbeat {
    WorkerHeartbeat {
        lease_token: lease_token.to_owned(),
        progress: None,
        logs: Vec::new(),
    }
}

fn assert_code(err: &Error, status: u16, code: ErrorCode) {
    assert!(
        matches!(err, Error::Api { status: s, .. } if *s == status),
        "{err:?}"
    );
    assert_eq!(err.error_code(), Some(code), "{err:?}");
}

/// A server, a worker client with a token of its own, and a task submitted with `input` and
/// claimed by that worker.
async fn a_claimed_task(input: Value) -> (RealServer, WorkerClient, WorkerTask) {
    let server = RealServer::start().await;
    let worker = WorkerClient::new(&server.base, server.worker_token().await).unwrap();
    let task_id = server
        .client()
        .submit("remote", input, SubmitOptions::default())
        .await
        .unwrap();
    let task = worker
        .claim(&["remote"], Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the pending task is handed out");
    assert_eq!(task.task_id, task_id);
    (server, worker, task)
}

#[tokio::test]
async fn a_worker_client_claims_acknowledges_uploads_and_completes_a_task() {
    let (server, worker, task) = a_claimed_task(json!({"prompt": "hi"})).await;
    let (client, task_id) = (server.client(), task.task_id.clone());

    assert_eq!(task.model, "remote");
    assert_eq!(task.input["prompt"], "hi");
    assert_eq!(task.attempt, 1);
    worker
        .heartbeat(
            &task.task_id,
            &WorkerHeartbeat {
                progress: Some(0.5),
                logs: vec!["halfway".into()],
                ..beat(&task.lease_token)
            },
        )
        .await
        .unwrap();
    let running = client.status("remote", &task_id).await.unwrap();
    assert_eq!(running.state, TaskState::Processing);
    assert_eq!(running.progress, Some(0.5));
    // Larger than one read of the file, so the body really is streamed in pieces.
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.bin");
    std::fs::write(&output, &content).unwrap();
    worker
        .upload(&task.task_id, &task.lease_token, "out.bin", &output)
        .await
        .unwrap();
    worker
        .complete(
            &task.task_id,
            &WorkerComplete {
                lease_token: task.lease_token.clone(),
                outputs: vec!["out.bin".into()],
            },
        )
        .await
        .unwrap();

    // `complete` answers once the final state is written.
    let done = client.status("remote", &task_id).await.unwrap();
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    let urls = done.result().unwrap().unwrap().result_urls;
    assert_eq!(urls.len(), 1, "{urls:?}");
    let saved = client
        .download(&urls[0], dir.path().join("got"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), content);
}

#[tokio::test]
async fn a_claim_with_no_work_within_its_wait_answers_none() {
    let server = RealServer::start().await;
    let worker = WorkerClient::new(&server.base, server.worker_token().await).unwrap();

    let claimed = worker.claim(&["remote"], Duration::ZERO).await.unwrap();

    assert_eq!(claimed, None);
}

#[tokio::test]
async fn every_call_about_a_task_no_longer_held_is_lease_lost() {
    let (_server, worker, task) = a_claimed_task(json!({})).await;
    let task_id = task.task_id.clone();
    worker
        .heartbeat(&task_id, &beat(&task.lease_token))
        .await
        .unwrap();
    // Given back: the task is pending again and the token holds nothing.
    worker
        .fail(
            &task_id,
            &WorkerFail {
                lease_token: task.lease_token.clone(),
                fail_code: None,
                fail_msg: "try again".into(),
                retryable: true,
            },
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.txt");
    std::fs::write(&output, "late").unwrap();

    let heartbeat = worker.heartbeat(&task_id, &beat(&task.lease_token)).await;
    let upload = worker
        .upload(&task_id, &task.lease_token, "out.txt", &output)
        .await;
    let complete = worker
        .complete(
            &task_id,
            &WorkerComplete {
                lease_token: task.lease_token.clone(),
                outputs: vec!["out.txt".into()],
            },
        )
        .await;

    for result in [heartbeat, upload, complete] {
        let err = result.unwrap_err();
        assert_code(&err, 409, ErrorCode::LeaseLost);
        assert!(!err.is_transient(), "{err:?}");
    }
    let again = worker
        .claim(&["remote"], Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the given-back task is handed out again");
    assert_eq!(again.task_id, task_id);
    assert_eq!(again.attempt, 2);
}

#[tokio::test]
async fn a_client_key_used_as_a_worker_token_is_refused_as_the_wrong_kind_of_key() {
    let server = RealServer::start().await;
    let worker = WorkerClient::new(&server.base, API_KEY).unwrap();

    let err = worker.claim(&["remote"], Duration::ZERO).await.unwrap_err();

    assert_code(&err, 401, ErrorCode::WrongKeyKind);
    assert!(!err.is_transient(), "{err:?}");
    // Nor does a worker token open the client API.
    let token_as_key = taskgate_client::Client::new(&server.base, server.worker_token().await)
        .unwrap()
        .submit("remote", json!({}), SubmitOptions::default())
        .await
        .unwrap_err();
    assert_code(&token_as_key, 401, ErrorCode::WrongKeyKind);
}

#[tokio::test]
async fn a_claim_of_a_model_the_server_runs_itself_is_refused_with_that_reason() {
    let server = RealServer::start().await;
    let worker = WorkerClient::new(&server.base, server.worker_token().await).unwrap();

    let err = worker.claim(&["echo"], Duration::ZERO).await.unwrap_err();

    assert_code(&err, 400, ErrorCode::ModelNotForWorkers);
}

#[tokio::test]
async fn a_bare_409_from_a_server_before_error_codes_reads_as_lease_lost() {
    let fake = FakeServer::start().await;
    fake.on_worker([Reply::error(409, "handed on")]);

    let err = fake
        .worker()
        .heartbeat("task_1", &beat("lease_1"))
        .await
        .unwrap_err();

    assert_code(&err, 409, ErrorCode::LeaseLost);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn an_upload_answered_503_is_sent_again_whole_with_its_length_and_lease_token() {
    let fake = FakeServer::start().await;
    fake.on_worker([Reply::error(503, "busy"), Reply::ok(Value::Null)]);
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.bin");
    std::fs::write(&output, &content).unwrap();

    fake.worker()
        .upload("task_1", "lease 1/2", "out.bin", &output)
        .await
        .unwrap();

    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for r in requests {
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/worker/tasks/task_1/outputs/out.bin");
        assert_eq!(r.query.as_deref(), Some("leaseToken=lease+1%2F2"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer tgw_test_token"));
        assert_eq!(r.content_length, Some(content.len() as u64));
        assert_eq!(r.body.as_ref(), content.as_slice());
    }
}

#[tokio::test]
async fn a_completion_the_server_could_not_record_is_reported_again_until_taken() {
    let fake = FakeServer::start().await;
    let not_recorded = Reply::json(
        503,
        json!({"code": 503, "message": "not recorded", "data": {"errorCode": "outcome_not_recorded"}}),
    );
    fake.on_worker([not_recorded, Reply::ok(Value::Null)]);
    let done = WorkerComplete {
        lease_token: "lease_1".into(),
        outputs: vec!["out.png".into()],
    };

    fake.worker().complete("task_1", &done).await.unwrap();

    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for r in requests {
        assert_eq!(r.path, "/api/v1/worker/tasks/task_1/complete");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"leaseToken": "lease_1", "outputs": ["out.png"]})
        );
    }
}

#[tokio::test]
async fn an_output_that_cannot_be_read_is_an_error_naming_the_file_and_sends_nothing() {
    let fake = FakeServer::start().await;
    let missing = tempfile::tempdir().unwrap().path().join("gone.png");

    let err = fake
        .worker()
        .upload("task_1", "lease_1", "gone.png", &missing)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, Error::ReadFile { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(fake.requests().is_empty());
}
