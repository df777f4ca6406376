//! The builtin backends, `echo` and `demo-image`, and the seed's own polling loop against them.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

async fn demo_image(api: &Api, input: Value) -> (String, Vec<u8>) {
    let data = api.run_to_end("demo-image", input).await;
    assert_eq!(data["state"], "success", "{data}");
    let urls = result_urls(&data);
    assert_eq!(urls.len(), 1, "{data}");
    fetch_ok(&urls[0]).await
}

#[tokio::test]
async fn echo_waits_delay_ms_before_succeeding() {
    let app = TestApp::start().await;
    let started = Instant::now();

    let data = app
        .api
        .run_to_end("echo", json!({ "delay_ms": 400, "prompt": "p" }))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let (ct, body) = fetch_ok(&result_urls(&data)[0]).await;
    assert_eq!(ct, "application/json");
    let echoed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed, json!({ "delay_ms": 400, "prompt": "p" }));
}

#[tokio::test]
async fn echo_with_fail_fails_with_generation_failed_and_the_string_as_fail_msg() {
    let app = TestApp::start().await;

    let data = app
        .api
        .run_to_end("echo", json!({ "fail": "out of cheese", "delay_ms": 10 }))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    assert_eq!(data["failMsg"], "out of cheese");
    assert!(data.get("resultJson").is_none(), "{data}");
}

#[tokio::test]
async fn demo_image_renders_a_png_of_the_requested_size() {
    let app = TestApp::start().await;

    let (ct, png) = demo_image(
        &app.api,
        json!({ "prompt": "a lighthouse at dusk", "width": 64, "height": 48 }),
    )
    .await;

    assert_eq!(ct, "image/png");
    assert_eq!(png_size(&png), (64, 48));
}

#[tokio::test]
async fn demo_image_defaults_to_512_by_512() {
    let app = TestApp::start().await;

    let (_, png) = demo_image(&app.api, json!({ "prompt": "default size" })).await;

    assert_eq!(png_size(&png), (512, 512));
}

#[tokio::test]
async fn demo_image_is_deterministic_for_a_prompt_and_differs_for_another() {
    let app = TestApp::start().await;
    let input = |p: &str| json!({ "prompt": p, "width": 40, "height": 30 });

    let (_, a) = demo_image(&app.api, input("a red fox")).await;
    let (_, b) = demo_image(&app.api, input("a red fox")).await;
    let (_, c) = demo_image(&app.api, input("a blue whale")).await;

    assert_eq!(a, b, "the same prompt gave different images");
    assert_ne!(a, c, "different prompts gave the same image");
    assert_eq!(png_size(&c), (40, 30));
}

#[tokio::test]
async fn demo_image_refuses_sizes_it_cannot_render_at_submit() {
    let app = TestApp::start().await;

    for (input, field) in [
        (json!({ "width": 0 }), "/width"),
        (json!({ "height": 100_000 }), "/height"),
        (json!({ "width": "wide" }), "/width"),
        (json!({ "prompt": 7 }), "/prompt"),
    ] {
        let (status, body) = app
            .api
            .submit("demo-image", json!({ "input": input }))
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &[field]);
    }
}

/// The seed's `pollWithBackoff`, transcribed literally: check, return on success, throw on
/// failure, else sleep `interval` (starting at 3 s) and grow it ×1.5 up to 30 s, until `maxWait`.
async fn poll_with_backoff(api: &Api, model: &str, task_id: &str, max_wait: Duration) -> Value {
    let mut interval = Duration::from_millis(3000);
    let start_time = Instant::now();
    let mut sleeps = Vec::new();
    while start_time.elapsed() < max_wait {
        let (_, body) = api.status(model, task_id).await;
        let result = &body["data"];
        if result["state"] == "success" {
            return json!({ "result": result, "sleeps_ms": sleeps });
        }
        if result["state"] == "failed" {
            panic!("{}", result["failMsg"]);
        }
        tokio::time::sleep(interval).await;
        sleeps.push(interval.as_millis() as u64);
        interval = (interval.mul_f64(1.5)).min(Duration::from_millis(30_000));
    }
    panic!("Timeout waiting for result");
}

#[tokio::test]
async fn the_seeds_own_polling_loop_gets_a_demo_image() {
    let app = TestApp::start().await;
    let (status, body) = app
        .api
        .submit(
            "demo-image",
            json!({
                "request_type": "async",
                "input": { "mode": "text-to-image", "prompt": "A beautiful sunset over mountains" }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task_id = body["data"]["taskId"].as_str().unwrap().to_owned();

    let out = poll_with_backoff(&app.api, "demo-image", &task_id, Duration::from_secs(300)).await;

    let result = &out["result"];
    assert_eq!(result["state"], "success");
    assert!(result["costTime"].as_i64().unwrap() >= 0);
    // Either the first check already saw it done, or the loop slept 3 s once and then did.
    let sleeps = out["sleeps_ms"].as_array().unwrap();
    assert!(sleeps.len() <= 1, "{sleeps:?}");
    if let Some(s) = sleeps.first() {
        assert_eq!(s, 3000);
    }
    let (ct, png) = fetch_ok(&result_urls(result)[0]).await;
    assert_eq!(ct, "image/png");
    assert_eq!(png_size(&png), (512, 512));
}
