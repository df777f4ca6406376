//! `GET /api/v1/tasks`: the caller's tenant's tasks, newest first, in pages, with filters.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

fn tasks(body: &Value) -> &Vec<Value> {
    body["data"]["tasks"].as_array().unwrap()
}

fn ids(body: &Value) -> Vec<String> {
    tasks(body)
        .iter()
        .map(|t| t["taskId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn tasks_are_listed_newest_first_each_as_statustask_shows_it_plus_its_model() {
    let app = TestApp::start().await;
    let mut submitted = Vec::new();
    for (model, input) in [
        ("echo", json!({"prompt": "a"})),
        (
            "demo-image",
            json!({"prompt": "b", "width": 8, "height": 8}),
        ),
        ("echo", json!({"fail": "boom"})),
    ] {
        let id = app.api.submit_ok(model, input).await;
        app.api
            .wait_final(model, &id, Duration::from_secs(20))
            .await;
        submitted.push((model, id));
    }

    let (status, body) = app.api.list(&[]).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let mut newest_first: Vec<String> = submitted.iter().map(|(_, id)| id.clone()).collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&body), newest_first);
    assert!(body["data"]["nextCursor"].is_null(), "{body}");
    for item in tasks(&body) {
        let id = item["taskId"].as_str().unwrap();
        let (model, _) = submitted.iter().find(|(_, s)| s == id).unwrap();
        assert_eq!(item["model"], *model, "{item}");
        let (_, status) = app.api.status(model, id).await;
        let mut without_model = item.clone();
        without_model.as_object_mut().unwrap().remove("model");
        assert_eq!(
            without_model, status["data"],
            "the item is the status, result URLs and all"
        );
    }
}

#[tokio::test]
async fn the_listing_filters_by_model_state_and_creation_time() {
    let app = TestApp::start().await;
    let ok = app.api.run_to_end("echo", json!({"prompt": "ok"})).await;
    let failed = app.api.run_to_end("echo", json!({"fail": "boom"})).await;
    let image = app
        .api
        .run_to_end("demo-image", json!({"width": 8, "height": 8}))
        .await;
    let slow = app.api.submit_ok("echo", json!({"delay_ms": 30_000})).await;
    app.api
        .wait_for("echo", &slow, Duration::from_secs(20), |d| {
            d["state"] == "processing"
        })
        .await;

    let (_, echo) = app.api.list(&[("model", "echo")]).await;
    let (_, images) = app.api.list(&[("model", "demo-image")]).await;
    let (status, unknown) = app.api.list(&[("model", "nano-banana")]).await;
    let (_, failures) = app.api.list(&[("state", "failed")]).await;
    let (_, running) = app
        .api
        .list(&[("state", "processing"), ("model", "echo")])
        .await;

    assert_eq!(ids(&echo).len(), 3);
    assert!(tasks(&echo).iter().all(|t| t["model"] == "echo"));
    assert_eq!(ids(&images), [image["taskId"].as_str().unwrap()]);
    assert_eq!(
        status,
        StatusCode::OK,
        "an unknown model lists nothing: {unknown}"
    );
    assert!(tasks(&unknown).is_empty());
    assert_eq!(ids(&failures), [failed["taskId"].as_str().unwrap()]);
    assert_eq!(tasks(&failures)[0]["failMsg"], "boom");
    assert_eq!(ids(&running), [slow.as_str()]);

    // Both time bounds are exclusive: after the first task's createTime, before the last's.
    let (_, all) = app.api.list(&[]).await;
    let first = ok["createTime"].as_i64().unwrap();
    let (_, slow_status) = app.api.status("echo", &slow).await;
    let last = slow_status["data"]["createTime"].as_i64().unwrap();
    let (_, window) = app
        .api
        .list(&[
            ("createdAfter", &first.to_string()),
            ("createdBefore", &last.to_string()),
        ])
        .await;
    let expected: Vec<String> = tasks(&all)
        .iter()
        .filter(|t| (first + 1..last).contains(&t["createTime"].as_i64().unwrap()))
        .map(|t| t["taskId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids(&window), expected);
    assert!(
        !ids(&window).contains(&slow)
            && !ids(&window).contains(&ok["taskId"].as_str().unwrap().to_owned())
    );
}

#[tokio::test]
async fn another_tenant_sees_none_of_a_tenants_tasks() {
    let app = TestApp::start().await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "tenant-b", None).await.key);
    let mine: HashSet<String> = [
        app.api.submit_ok("echo", json!({"prompt": "1"})).await,
        app.api.submit_ok("echo", json!({"prompt": "2"})).await,
    ]
    .into();

    let (status, before) = other.list(&[]).await;
    let theirs = other.submit_ok("echo", json!({"prompt": "b"})).await;
    let (_, after) = other.list(&[("model", "echo")]).await;
    let listed_mine: HashSet<String> = app.api.list_all_ids(&[]).await.into_iter().collect();

    assert_eq!(status, StatusCode::OK, "{before}");
    assert!(tasks(&before).is_empty(), "{before}");
    assert_eq!(ids(&after), [theirs]);
    assert_eq!(listed_mine, mine);
}

#[tokio::test]
async fn paging_while_tasks_are_added_yields_each_original_task_exactly_once() {
    let app = TestApp::start().await;
    let mut originals = Vec::new();
    for i in 0..45 {
        originals.push(app.api.submit_ok("echo", json!({ "n": i })).await);
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = vec![("limit", "20".to_owned())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = app.api.list(&q).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages += 1;
        seen.extend(ids(&body));
        // New tasks between pages sort above every page not read yet.
        for i in 0..5 {
            app.api.submit_ok("echo", json!({ "late": i })).await;
        }
        match body["data"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }

    assert_eq!(pages, 3);
    let original: HashSet<&String> = originals.iter().collect();
    let seen_originals: Vec<&String> = seen.iter().filter(|id| original.contains(id)).collect();
    let mut expected: Vec<&String> = originals.iter().collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen_originals, expected, "each original once, newest first");
}

#[tokio::test]
async fn bad_parameters_are_refused_with_a_message_naming_them() {
    let app = TestApp::start().await;
    for (query, needle) in [
        (
            vec![("limit", "101")],
            "limit must be an integer from 1 to 100",
        ),
        (vec![("limit", "0")], "limit"),
        (vec![("limit", "ten")], "limit"),
        (vec![("cursor", "not-a-cursor")], "cursor"),
        (vec![("cursor", "dGFza19YWVo")], "cursor"),
        (
            vec![("state", "done")],
            "state must be one of pending, processing, success, failed",
        ),
        (vec![("createdAfter", "yesterday")], "createdAfter"),
        (vec![("createdBefore", "1.5")], "createdBefore"),
        (vec![("states", "pending")], "unknown query parameter"),
    ] {
        let (status, body) = app.api.list(&query).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &[needle]);
        assert_eq!(error_code(&body), "invalid_input");
    }
    let (status, body) = app.api.with_key("").list(&[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}
