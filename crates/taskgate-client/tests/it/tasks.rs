//! The taskgate extensions of the SDK against a real server: batches, idempotency keys, the
//! task listing.

use serde_json::json;
use taskgate_client::proto::ErrorCode;
use taskgate_client::{Error, GenerateTaskRequest, ListQuery, SubmitOptions, TaskState};

use crate::real_server::RealServer;

fn item(n: u32) -> GenerateTaskRequest {
    GenerateTaskRequest {
        request_type: None,
        callback_url: None,
        input: json!({ "n": n }).as_object().cloned().unwrap(),
        ..GenerateTaskRequest::default()
    }
}

#[tokio::test]
async fn a_batch_is_listed_page_by_page_newest_first() {
    let app = RealServer::start().await;
    let client = app.client();

    let ids = client
        .submit_batch("echo", (0..5).map(item).collect(), None)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut query = ListQuery {
        model: Some("echo".into()),
        limit: Some(2),
        ..ListQuery::default()
    };
    let mut pages = 0;
    loop {
        let page = client.list_tasks(&query).await.unwrap();
        pages += 1;
        for t in &page.tasks {
            assert_eq!(t.model, "echo");
            seen.push(t.status.task_id.clone());
        }
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }

    assert_eq!(ids.len(), 5);
    assert_eq!(pages, 3);
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "a batch's ids follow its order");
    let none = client
        .list_tasks(&ListQuery {
            state: Some(TaskState::Failed),
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert!(none.tasks.is_empty() && none.next_cursor.is_none());
}

#[tokio::test]
async fn a_key_makes_submits_and_batches_answer_what_they_created() {
    let app = RealServer::start().await;
    let client = app.client();
    let keyed = || SubmitOptions::default().with_idempotency_key("sdk-1");

    let a = client
        .submit("echo", json!({"p": 1}), keyed())
        .await
        .unwrap();
    let b = client
        .submit("echo", json!({"p": 1}), keyed())
        .await
        .unwrap();
    let reused = client
        .submit("echo", json!({"p": 2}), keyed())
        .await
        .unwrap_err();
    let batch = client
        .submit_batch("echo", vec![item(1), item(2)], Some("sdk-2"))
        .await
        .unwrap();
    let again = client
        .submit_batch("echo", vec![item(1), item(2)], Some("sdk-2"))
        .await
        .unwrap();

    assert_eq!(a, b);
    assert_eq!(
        reused.error_code(),
        Some(ErrorCode::IdempotencyKeyReused),
        "{reused}"
    );
    assert_eq!(batch, again);
    let all = client.list_tasks(&ListQuery::default()).await.unwrap();
    assert_eq!(all.tasks.len(), 3);
}

#[tokio::test]
async fn a_batch_of_none_or_too_many_is_refused_before_sending() {
    let app = RealServer::start().await;
    let client = app.client();

    let empty = client.submit_batch("echo", vec![], None).await.unwrap_err();
    let many = client
        .submit_batch("echo", (0..1001).map(item).collect(), None)
        .await
        .unwrap_err();

    assert!(matches!(empty, Error::InvalidInput(_)), "{empty}");
    assert!(matches!(many, Error::InvalidInput(_)), "{many}");
    assert!(client
        .list_tasks(&ListQuery::default())
        .await
        .unwrap()
        .tasks
        .is_empty());
}
