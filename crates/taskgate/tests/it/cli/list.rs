//! `taskgate list`: the tenant's tasks newest first, for people and as JSON, with filters and
//! pages.

use std::time::Duration;

use serde_json::json;

use super::cli;
use crate::support::*;

#[tokio::test]
async fn list_shows_tasks_newest_first_for_people_and_as_json() {
    let app = TestApp::start().await;
    let ok = app.api.submit_ok("echo", json!({"prompt": "a"})).await;
    let failed = app.api.submit_ok("echo", json!({"fail": "boom"})).await;
    let image = app
        .api
        .submit_ok("demo-image", json!({"width": 8, "height": 8}))
        .await;
    for (model, id) in [("echo", &ok), ("echo", &failed), ("demo-image", &image)] {
        app.api.wait_final(model, id, Duration::from_secs(20)).await;
    }
    let mut newest_first = vec![ok.clone(), failed.clone(), image.clone()];
    newest_first.sort_unstable_by(|a, b| b.cmp(a));

    let human = cli(&app, &["list"]).await;
    let machine = cli(&app, &["list", "--json"]).await;
    let failures = cli(
        &app,
        &["list", "--state", "failed", "--model", "echo", "--json"],
    )
    .await;

    human.assert_exit(0);
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert!(
        lines[0].starts_with("TASK") && lines[0].contains("MODEL"),
        "{human}"
    );
    let listed: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(listed, newest_first, "{human}");
    let image_line = lines.iter().find(|l| l.starts_with(&image)).unwrap();
    assert!(
        image_line.contains("demo-image") && image_line.contains("success"),
        "{human}"
    );

    machine.assert_exit(0);
    let (_, body) = app.api.list(&[]).await;
    assert_eq!(
        machine.json(),
        body["data"],
        "--json prints the server's data"
    );

    failures.assert_exit(0);
    let doc = failures.json();
    assert_eq!(doc["tasks"].as_array().unwrap().len(), 1, "{failures}");
    assert_eq!(doc["tasks"][0]["taskId"], failed.as_str());
    assert_eq!(doc["tasks"][0]["failMsg"], "boom");
}

#[tokio::test]
async fn list_pages_with_limit_and_the_cursor_it_prints() {
    let app = TestApp::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.api.submit_ok("echo", json!({ "n": i })).await);
    }
    ids.sort_unstable_by(|a, b| b.cmp(a));

    let first = cli(&app, &["list", "--limit", "2"]).await;
    first.assert_exit(0);
    let cursor = first
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("more tasks: add --cursor "))
        .unwrap_or_else(|| panic!("no cursor hint:\n{first}"))
        .to_owned();
    let second = cli(
        &app,
        &["list", "--limit", "2", "--cursor", &cursor, "--json"],
    )
    .await;

    assert_eq!(
        first.stdout.lines().count(),
        3,
        "a header and two tasks:\n{first}"
    );
    second.assert_exit(0);
    let doc = second.json();
    assert_eq!(doc["tasks"][0]["taskId"], ids[2].as_str(), "{second}");
    assert!(doc["nextCursor"].is_null(), "{second}");
}

#[tokio::test]
async fn list_refuses_bad_flags_and_a_bad_cursor_with_exit_2() {
    let app = TestApp::start().await;

    let limit = cli(&app, &["list", "--limit", "101"]).await;
    let state = cli(&app, &["list", "--state", "done", "--json"]).await;
    let cursor = cli(&app, &["list", "--cursor", "nonsense", "--json"]).await;

    limit.assert_exit(2);
    state.assert_exit(2);
    assert_eq!(state.json()["error"]["kind"], "usage", "{state}");
    cursor.assert_exit(2);
    let err = &cursor.json()["error"];
    assert_eq!(err["kind"], "invalid_request", "{cursor}");
    assert!(
        err["message"].as_str().unwrap().contains("cursor"),
        "{cursor}"
    );
}
