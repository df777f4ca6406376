use std::time::{Duration, Instant};

use serde_json::json;
use taskgate_client::{Client, Error, RetryPolicy, SubmitOptions, TaskState};

use crate::support::{FakeServer, Reply};

#[tokio::test]
async fn status_is_retried_after_a_429_with_retry_after_and_a_503_then_succeeds() {
    let server = FakeServer::start().await;
    server.on_status([
        Reply::error(429, "Too many requests").header("retry-after", "1"),
        Reply::error(503, "Service unavailable"),
        Reply::state("success"),
    ]);
    let started = Instant::now();

    let status = server.client().status("echo", "task_1").await.unwrap();

    assert_eq!(status.state, TaskState::Success);
    assert_eq!(server.requests().len(), 3);
    // The backoff is a few milliseconds, so only Retry-After explains a full second.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn submit_is_retried_after_a_503_and_returns_the_task_id() {
    let server = FakeServer::start().await;
    server.on_submit([
        Reply::error(503, "busy"),
        Reply::error(502, "bad gateway"),
        Reply::ok(json!({"taskId": "task_abc"})),
    ]);

    let id = server
        .client()
        .submit("echo", json!({"prompt": "hi"}), SubmitOptions::default())
        .await
        .unwrap();

    assert_eq!(id, "task_abc");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_400_is_returned_at_once_with_the_envelopes_code_message_and_detail() {
    let server = FakeServer::start().await;
    server.on_submit([Reply::json(
        400,
        json!({"code": 400, "message": "Invalid request",
               "data": {"error": "Missing required field: input.prompt"}}),
    )]);

    let err = server
        .client()
        .submit("echo", json!({}), SubmitOptions::default())
        .await
        .unwrap_err();

    match err {
        Error::Api {
            status,
            code,
            message,
            detail,
            error_code,
        } => {
            // An APIXO-style answer carries no taskgate error code.
            assert_eq!(error_code, None);
            assert_eq!((status, code), (400, 400));
            assert_eq!(message, "Invalid request");
            assert_eq!(
                detail.as_deref(),
                Some("Missing required field: input.prompt")
            );
        }
        other => panic!("expected Error::Api, got {other:?}"),
    }
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_404_is_not_retried() {
    let server = FakeServer::start().await;
    server.on_status([Reply::error(404, "task not found")]);

    let err = server
        .client()
        .status("echo", "task_nope")
        .await
        .unwrap_err();

    assert!(matches!(err, Error::Api { status: 404, .. }), "{err:?}");
    assert!(!err.is_transient());
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_401_is_not_retried_and_keeps_the_servers_message() {
    let server = FakeServer::start().await;
    server.on_status([Reply::error(401, "invalid API key")]);

    let err = server.client().status("echo", "task_1").await.unwrap_err();

    assert_eq!(err.to_string(), "server answered HTTP 401: invalid API key");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn retries_stop_after_max_attempts_and_return_the_last_error() {
    let server = FakeServer::start().await;
    server.on_status([Reply::error(503, "still down")]);
    let client = Client::builder(&server.base)
        .retry(RetryPolicy {
            max_attempts: 3,
            ..crate::support::fast_retry()
        })
        .build()
        .unwrap();

    let err = client.status("echo", "task_1").await.unwrap_err();

    assert!(matches!(err, Error::Api { status: 503, .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_is_returned_instead_of_slept_through() {
    let server = FakeServer::start().await;
    server.on_status([Reply::error(429, "slow down").header("retry-after", "3600")]);

    let err = server.client().status("echo", "task_1").await.unwrap_err();

    assert!(matches!(err, Error::Api { status: 429, .. }), "{err:?}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn an_error_envelope_inside_http_200_is_still_an_error() {
    let server = FakeServer::start().await;
    server.on_submit([Reply::json(
        200,
        json!({"code": 400, "message": "Insufficient credits", "data": null}),
    )]);

    let err = server
        .client()
        .submit(
            "gpt-image-1",
            json!({"prompt": "x"}),
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();

    assert!(
        matches!(&err, Error::Api { status: 400, code: 400, message, .. } if message == "Insufficient credits"),
        "{err:?}"
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_non_envelope_error_page_still_gives_a_readable_message() {
    let server = FakeServer::start().await;
    server.on_status([Reply::bytes(502, "<html>Bad Gateway</html>")]);
    let client = Client::builder(&server.base)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();

    let err = client.status("echo", "task_1").await.unwrap_err();

    assert_eq!(err.to_string(), "server answered HTTP 502: Bad Gateway");
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error_saying_connection_refused() {
    // Bind then drop a listener to get a local port that nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::builder(format!("http://127.0.0.1:{port}"))
        .retry(crate::support::fast_retry())
        .build()
        .unwrap();

    let err = client.status("echo", "task_1").await.unwrap_err();

    match &err {
        Error::Transport { reason, url, .. } => {
            assert_eq!(reason, "connection refused");
            assert!(
                url.starts_with(&format!("http://127.0.0.1:{port}/")),
                "{url}"
            );
        }
        other => panic!("expected Error::Transport, got {other:?}"),
    }
    assert!(err.is_transient());
}

#[tokio::test]
async fn submit_sends_the_key_the_input_and_the_callback_mode() {
    let server = FakeServer::start().await;
    server.on_submit([Reply::ok(json!({"taskId": "task_1"}))]);
    let client = server.client();

    client
        .submit(
            "demo-image",
            json!({"prompt": "fox"}),
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    client
        .submit(
            "demo-image",
            json!({"prompt": "fox"}),
            SubmitOptions::callback("https://example.com/hook"),
        )
        .await
        .unwrap();

    let reqs = server.requests();
    assert_eq!(reqs[0].method, axum::http::Method::POST);
    assert_eq!(reqs[0].path, "/api/v1/generateTask/demo-image");
    assert_eq!(reqs[0].authorization.as_deref(), Some("Bearer tg_test_key"));
    let first: serde_json::Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(
        first,
        json!({"request_type": "async", "input": {"prompt": "fox"}})
    );
    let second: serde_json::Value = serde_json::from_slice(&reqs[1].body).unwrap();
    assert_eq!(
        second,
        json!({"request_type": "callback", "callback_url": "https://example.com/hook",
               "input": {"prompt": "fox"}})
    );
}

#[tokio::test]
async fn input_that_is_not_an_object_is_refused_before_sending() {
    let server = FakeServer::start().await;

    let err = server
        .client()
        .submit(
            "echo",
            json!(["not", "an", "object"]),
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();

    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn status_queries_the_model_path_with_the_task_id() {
    let server = FakeServer::start().await;
    server.on_status([Reply::state("pending")]);

    server.client().status("sora-2", "task_1").await.unwrap();

    let reqs = server.requests();
    assert_eq!(reqs[0].method, axum::http::Method::GET);
    assert_eq!(reqs[0].path, "/api/v1/statusTask/sora-2");
    assert_eq!(reqs[0].query.as_deref(), Some("taskId=task_1"));
}

#[tokio::test]
async fn status_accepts_apixo_responses_without_create_time() {
    let server = FakeServer::start().await;
    server.on_status([Reply::ok(json!({
        "taskId": "task_abc123xyz",
        "state": "success",
        "resultJson": "{\"resultUrls\":[\"https://cdn.apixo.ai/x.png\"]}",
        "costTime": 12500
    }))]);

    let s = server
        .client()
        .status("nano-banana", "task_abc123xyz")
        .await
        .unwrap();

    assert_eq!(s.state, TaskState::Success);
    assert_eq!(
        s.result().unwrap().unwrap().result_urls,
        vec!["https://cdn.apixo.ai/x.png".to_owned()]
    );
}
