//! Every bad request gets the envelope with the right 4xx and a message a person can act on;
//! none gets a 5xx.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_unknown_model_is_404_naming_the_models_on_offer() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .submit("no-such-model", json!({ "input": {} }))
        .await;
    let msg = assert_error(status, &body, StatusCode::NOT_FOUND, &["no-such-model"]);
    assert!(msg.contains("echo") && msg.contains("demo-image"), "{msg}");

    let (status, body) = app.api.status("no-such-model", "task_x").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &["no-such-model"]);
}

#[tokio::test]
async fn an_unknown_task_is_404_naming_it() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .status("echo", "task_01hzzzzzzzzzzzzzzzzzzzzzzz")
        .await;

    assert_error(
        status,
        &body,
        StatusCode::NOT_FOUND,
        &["task_01hzzzzzzzzzzzzzzzzzzzzzzz", "not found"],
    );
}

#[tokio::test]
async fn a_missing_or_empty_task_id_is_400_naming_the_parameter() {
    let app = TestApp::start().await;

    let resp = app
        .api
        .request(Method::GET, "/api/v1/statusTask/echo")
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["taskId"]);

    let (status, body) = app.api.status("echo", "").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, &["taskId"]);
}

#[tokio::test]
async fn a_task_asked_for_under_another_model_is_404() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;

    let (status, body) = app.api.status("demo-image", &id).await;

    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
}

#[tokio::test]
async fn another_tenants_task_is_404_even_with_a_valid_key() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({})).await;
    // Created while the server runs: usable at once.
    let other = create_key(&app.data_dir, "other", None).await;
    let other_api = app.api.with_key(&other.key);

    let (status, body) = other_api.status("echo", &id).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);

    // The other key works for its own tasks, which the first tenant cannot see either.
    let theirs = other_api.submit_ok("echo", json!({})).await;
    let data = other_api
        .wait_final("echo", &theirs, Duration::from_secs(10))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    let (status, body) = app.api.status("echo", &theirs).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&theirs]);
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_message_naming_the_problem() {
    let app = TestApp::start().await;
    let cases: Vec<(&[u8], &[&str])> = vec![
        (b"{\"input\": {", &["not valid JSON"]),
        (b"{\"input\": {\"p\": \"\xff\xfe\"}}", &["UTF-8"]),
        (b"", &["empty", "input"]),
        (b"   ", &["empty"]),
        (b"[1, 2]", &["JSON object", "array"]),
        (b"\"just a string\"", &["JSON object"]),
        (b"{}", &["input is required"]),
        (b"{\"input\": null}", &["input is required"]),
        (b"{\"input\": \"draw a cat\"}", &["input must be a JSON object", "string"]),
        (b"{\"input\": [1]}", &["input must be a JSON object", "array"]),
        (b"{\"input\": 5}", &["input must be a JSON object"]),
        (b"{\"request_type\": \"sync\", \"input\": {}}", &["request_type", "async", "callback"]),
        (b"{\"request_type\": 1, \"input\": {}}", &["request_type"]),
        (b"{\"request_type\": \"callback\", \"input\": {}}", &["callback_url is required"]),
        (b"{\"request_type\": \"callback\", \"callback_url\": \"ftp://example.com/h\", \"input\": {}}", &["callback_url", "http"]),
        (b"{\"callback_url\": \"/relative/path\", \"input\": {}}", &["callback_url", "absolute"]),
        (b"{\"callback_url\": 42, \"input\": {}}", &["callback_url", "string"]),
        (b"{\"input\": {\"delay_ms\": -1}}", &["/delay_ms"]),
        (b"{\"input\": {\"delay_ms\": \"soon\"}}", &["/delay_ms"]),
        (b"{\"input\": {\"fail\": true}}", &["/fail"]),
    ];

    for (body, needles) in cases {
        let (status, env) = app.api.submit_raw("echo", body.to_vec()).await;
        assert_error(status, &env, StatusCode::BAD_REQUEST, needles);
    }
}

#[tokio::test]
async fn a_callback_request_with_a_valid_url_is_accepted() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .submit(
            "echo",
            json!({
                "request_type": "callback",
                "callback_url": "https://hooks.example.com/apixo",
                "input": {}
            }),
        )
        .await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["data"]["taskId"].is_string());
}

#[tokio::test]
async fn strange_bodies_never_cause_a_5xx() {
    let app = TestApp::start().await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_input = format!(
        "{{\"input\": {{\"a\": {}1{}}}}}",
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let bodies: Vec<Vec<u8>> = vec![
        deep.into_bytes(),
        deep_input.into_bytes(),
        b"{\"input\": {\"delay_ms\": 1e400}}".to_vec(),
        b"{\"input\": {\"delay_ms\": 18446744073709551616}}".to_vec(),
        b"{\"input\": {}, \"input\": 3}".to_vec(),
        b"\x00\x00\x00".to_vec(),
        b"{\"input\": {\"p\": \"\\ud800\"}}".to_vec(),
        "{\"input\": {\"prompt\": \"ünïcödé 🦀\"}, \"extra\": [null, {}]}"
            .as_bytes()
            .to_vec(),
    ];

    for body in bodies {
        for model in ["echo", "demo-image"] {
            let (status, env) = app.api.submit_raw(model, body.clone()).await;
            assert!(
                status.is_success() || status.is_client_error(),
                "{status} for {:?}: {env}",
                String::from_utf8_lossy(&body[..body.len().min(60)])
            );
        }
    }
    // Odd task ids and model names are 4xx too.
    for id in [
        "'; DROP TABLE tasks; --",
        "%00",
        "../../etc/passwd",
        &"x".repeat(5000),
    ] {
        let (status, env) = app.api.status("echo", id).await;
        assert!(status.is_client_error(), "{status} for {id:?}: {env}");
    }
}

#[tokio::test]
async fn a_missing_key_is_401_saying_which_header_to_send() {
    let app = TestApp::start().await;

    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/generateTask/echo", app.api.base))
        .json(&json!({ "input": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) = envelope(resp).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        &["Authorization: Bearer"],
    );

    let resp = app
        .api
        .http
        .get(format!(
            "{}/api/v1/statusTask/echo?taskId=task_x",
            app.api.base
        ))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["Authorization"]);
}

#[tokio::test]
async fn a_wrong_or_malformed_key_is_401() {
    let app = TestApp::start().await;
    let wrong = app.api.with_key("tg_this-key-does-not-exist-0000000000000");

    let (status, body) = wrong.submit("echo", json!({ "input": {} })).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        &["invalid API key"],
    );
    let (status, body) = wrong.status("echo", "task_x").await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        &["invalid API key"],
    );

    for header in [
        format!("Basic {API_KEY}"),
        API_KEY.to_owned(),
        "Bearer ".to_owned(),
    ] {
        let resp = app
            .api
            .http
            .post(format!("{}/api/v1/generateTask/echo", app.api.base))
            .header("authorization", header.clone())
            .json(&json!({ "input": {} }))
            .send()
            .await
            .unwrap();
        let (status, body) = envelope(resp).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, &["Bearer"]);
    }
}

#[tokio::test]
async fn the_key_is_checked_before_the_model_so_models_do_not_leak() {
    let app = TestApp::start().await;
    let wrong = app
        .api
        .with_key("tg_wrong-wrong-wrong-wrong-wrong-wrong-wr");

    let (status, body) = wrong.submit("no-such-model", json!({ "input": {} })).await;

    assert_error(status, &body, StatusCode::UNAUTHORIZED, &[]);
    assert!(
        !body["message"].as_str().unwrap().contains("echo"),
        "{body}"
    );
}

#[tokio::test]
async fn a_revoked_key_is_401_saying_it_was_revoked() {
    let app = TestApp::start().await;
    let created = create_key(&app.data_dir, "soon-revoked", None).await;
    let api = app.api.with_key(&created.key);
    let id = api.submit_ok("echo", json!({})).await;

    let dir = app.data_dir.to_str().unwrap();
    let out = taskgate(&["keys", "revoke", &created.id, "--data-dir", dir]).await;
    assert!(out.status.success(), "{out:?}");

    // The server had this key cached; the revocation reaches it within the revocation check
    // interval (1 s), so wait for that, boundedly, rather than expecting it at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (mut status, mut body) = api.submit("echo", json!({ "input": {} })).await;
    while status == StatusCode::OK && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        (status, body) = api.submit("echo", json!({ "input": {} })).await;
    }
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
    let (status, body) = api.status("echo", &id).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_naming_the_limit() {
    let app = TestApp::start_with(|c| c.server.max_body_bytes = 1024).await;
    let big = json!({ "input": { "prompt": "x".repeat(4096) } });
    let small = json!({ "input": { "prompt": "x".repeat(500) } });

    let (status, body) = app.api.submit("echo", big.clone()).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, &["1024"]);

    // Also when the body is streamed without a Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .to_string()
        .into_bytes()
        .chunks(512)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = app
        .api
        .request(Method::POST, "/api/v1/generateTask/echo")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, &["1024"]);

    let (status, body) = app.api.submit("echo", small).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A stream of ready chunks, for a request body without a Content-Length.
fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    futures::stream::iter(chunks)
}

#[tokio::test]
async fn an_unknown_path_is_a_404_envelope_pointing_at_the_api() {
    let app = TestApp::start().await;

    for path in [
        "/",
        "/api/v1/generateTask",
        "/api/v2/statusTask/echo",
        "/nope",
    ] {
        let resp = app.api.request(Method::GET, path).send().await.unwrap();
        let (status, body) = envelope(resp).await;
        assert_error(
            status,
            &body,
            StatusCode::NOT_FOUND,
            &["/api/v1/generateTask"],
        );
    }
}

#[tokio::test]
async fn a_wrong_method_is_a_405_envelope_naming_the_right_one() {
    let app = TestApp::start().await;

    for (method, path, takes) in [
        (Method::GET, "/api/v1/generateTask/echo", "POST"),
        (Method::POST, "/api/v1/statusTask/echo?taskId=task_x", "GET"),
        (
            Method::DELETE,
            "/api/v1/statusTask/echo?taskId=task_x",
            "GET",
        ),
        (Method::PUT, "/api/v1/generateTask/echo", "POST"),
        (Method::GET, "/api/v1/webhookSecret/rotate", "POST"),
        (Method::DELETE, "/healthz", "GET"),
        (Method::GET, "/api/v1/worker/claim", "POST"),
    ] {
        let resp = app.api.request(method.clone(), path).send().await.unwrap();
        let allow = resp.headers().get("allow").cloned();
        let (status, body) = envelope(resp).await;
        // Said of this path (not of generateTask on every path), with what it does take.
        let route = path.split('?').next().unwrap();
        let msg = assert_error(
            status,
            &body,
            StatusCode::METHOD_NOT_ALLOWED,
            &[method.as_str(), route, "Allow"],
        );
        assert!(!msg.contains("generateTask takes"), "{msg}");
        assert!(allow.unwrap().to_str().unwrap().contains(takes));
    }
}

#[tokio::test]
async fn each_refusal_names_its_reason_in_data_error_code() {
    let app = TestApp::start().await;
    let base = &app.api.base;
    let http = &app.api.http;
    let send =
        |req: reqwest::RequestBuilder| async move { envelope(req.send().await.unwrap()).await };
    let key = |req: reqwest::RequestBuilder| req.bearer_auth(API_KEY);

    let cases: Vec<(&str, (StatusCode, serde_json::Value))> = vec![
        (
            "endpoint_not_found",
            send(http.get(format!("{base}/api/v2/nothing"))).await,
        ),
        (
            "method_not_allowed",
            send(http.delete(format!("{base}/api/v1/generateTask/echo"))).await,
        ),
        (
            "missing_api_key",
            send(http.post(format!("{base}/api/v1/generateTask/echo"))).await,
        ),
        (
            "invalid_api_key",
            send(
                http.post(format!("{base}/api/v1/generateTask/echo"))
                    .bearer_auth("nope"),
            )
            .await,
        ),
        (
            "model_not_found",
            app.api.submit("nope", json!({ "input": {} })).await,
        ),
        ("task_not_found", app.api.status("echo", "task_nope").await),
        (
            "invalid_input",
            send(key(http.get(format!("{base}/api/v1/statusTask/echo")))).await,
        ),
        (
            "invalid_input",
            app.api.submit("echo", json!({ "input": "x" })).await,
        ),
        (
            "callback_url_refused",
            app.api
                .submit(
                    "echo",
                    json!({ "input": {}, "callback_url": "http://127.0.0.1/h" }),
                )
                .await,
        ),
        (
            "delivery_not_found",
            send(key(http.post(format!(
                "{base}/api/v1/webhookDeliveries/whk_nope/retry"
            ))))
            .await,
        ),
        (
            "link_invalid",
            send(http.get(format!("{base}/files/task_x/t/a.png?expires=1&sig=x"))).await,
        ),
    ];
    for (want, (status, body)) in cases {
        assert_eq!(error_code(&body), want, "{status} {body}");
    }
}

#[tokio::test]
async fn deeply_nested_or_huge_json_is_400_and_the_server_stays_up() {
    let app = TestApp::start().await;
    let deep = format!(
        "{{\"input\": {{\"a\": {}1{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let (status, env) = app.api.submit_raw("echo", deep.clone().into_bytes()).await;
    assert_error(status, &env, StatusCode::BAD_REQUEST, &["deeper than 64"]);
    // 4 MiB of zeros: under the body limit, over the element cap.
    let wide = format!("{{\"input\": {{\"a\": [{}0]}}}}", "0,".repeat(2 << 20));
    let (status, env) = app.api.submit_raw("echo", wide.into_bytes()).await;
    assert_error(status, &env, StatusCode::BAD_REQUEST, &["more than 250000"]);
    // The batch endpoint reads its body through the same check.
    let resp = app
        .api
        .request(reqwest::Method::POST, "/api/v1/generateTasks/echo")
        .body(format!("{{\"tasks\": [{deep}]}}"))
        .send()
        .await
        .unwrap();
    let (status, env) = envelope(resp).await;
    assert_error(status, &env, StatusCode::BAD_REQUEST, &["deeper than 64"]);
    app.api.submit_ok("echo", json!({})).await;
}
