//! `taskgate status` and `taskgate wait`: the status for people and as JSON, failed and unknown
//! tasks, timeouts.

use std::time::{Duration, Instant};

use serde_json::json;

use super::cli;
use crate::support::*;

#[tokio::test]
async fn status_prints_a_finished_task_for_people_and_as_json() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"prompt": "s"})).await;
    let data = app
        .api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;
    let url = &result_urls(&data)[0];

    let human = cli(&app, &["status", "echo", &id]).await;
    let machine = cli(&app, &["status", "echo", &id, "--json"]).await;

    human.assert_exit(0);
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert_eq!(lines[0], format!("task      {id}"), "{human}");
    assert_eq!(lines[1], "state     success", "{human}");
    for label in ["created   ", "finished  ", "took      "] {
        assert!(
            lines.iter().any(|l| l.starts_with(label)),
            "no {label:?} line:\n{human}"
        );
    }
    assert!(
        lines.contains(&format!("result    {url}").as_str()),
        "{human}"
    );

    machine.assert_exit(0);
    assert_eq!(
        machine.json(),
        data,
        "--json prints the status as the server sends it"
    );
}

#[tokio::test]
async fn status_of_a_failed_task_shows_the_failure_and_exits_1() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"fail": "boom"})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;

    let run = cli(&app, &["status", "echo", &id]).await;

    run.assert_exit(1);
    assert!(run.stdout.contains("state     failed"), "{run}");
    assert!(
        run.stdout.contains("failure   GENERATION_FAILED: boom"),
        "{run}"
    );
    assert!(run.error_line().contains("boom"), "{run}");
}

#[tokio::test]
async fn status_json_of_a_failed_task_prints_exactly_one_json_document() {
    // docs/client.md: "With --json, stdout carries exactly one JSON document", and for any
    // failure that document is {"error": {..., "task": {...}}}.
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"fail": "boom"})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;

    let run = cli(&app, &["status", "echo", &id, "--json"]).await;

    run.assert_exit(1);
    let doc = run.json();
    assert_eq!(doc["error"]["kind"], "task_failed", "{run}");
    assert_eq!(doc["error"]["task"]["failMsg"], "boom", "{run}");
}

#[tokio::test]
async fn status_of_a_task_in_progress_says_processing_and_exits_0() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"delay_ms": 30_000})).await;
    app.api
        .wait_for("echo", &id, Duration::from_secs(20), |d| {
            d["state"] == "processing"
        })
        .await;

    let run = cli(&app, &["status", "echo", &id, "--json"]).await;

    run.assert_exit(0);
    assert_eq!(run.json()["state"], "processing", "{run}");
}

#[tokio::test]
async fn status_of_an_unknown_task_exits_2_with_the_servers_message() {
    let app = TestApp::start().await;
    let id = "task_01HZZZZZZZZZZZZZZZZZZZZZZZ";
    let (_, body) = app.api.status("echo", id).await;
    let server_says = body["message"].as_str().unwrap().to_owned();

    let human = cli(&app, &["status", "echo", id]).await;
    let machine = cli(&app, &["status", "echo", id, "--json"]).await;

    human.assert_exit(2);
    let line = human.error_line();
    assert!(line.contains(id), "{human}");
    assert!(line.contains(&server_says), "{human}");
    assert!(human.stdout.is_empty(), "{human}");

    machine.assert_exit(2);
    let err = &machine.json()["error"];
    assert_eq!(err["kind"], "not_found", "{machine}");
    assert_eq!(err["exitCode"], 2, "{machine}");
}

#[tokio::test]
async fn status_on_an_unknown_model_says_the_model_is_unknown_not_the_task() {
    // The server's errorCode tells the two 404s apart; the CLI no longer guesses from the
    // command that it was the task.
    let app = TestApp::start().await;
    let machine = cli(&app, &["status", "nosuchmodel", "task_x", "--json"]).await;
    machine.assert_exit(2);
    let err = &machine.json()["error"];
    assert_eq!(err["kind"], "unknown_model", "{machine}");
    assert!(
        err["message"].as_str().unwrap().contains("nosuchmodel"),
        "{machine}"
    );
}

#[tokio::test]
async fn status_with_another_model_than_the_submit_says_the_model_must_match() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"prompt": "x"})).await;

    let run = cli(&app, &["status", "demo-image", &id]).await;

    run.assert_exit(2);
    let line = run.error_line();
    assert!(line.contains(&id), "{run}");
    assert!(
        line.contains("the model must be the one used at submit"),
        "{run}"
    );
}

#[tokio::test]
async fn wait_with_out_and_json_lists_the_downloaded_files() {
    let app = TestApp::start().await;
    let id = app
        .api
        .submit_ok(
            "demo-image",
            json!({"prompt": "p", "width": 8, "height": 8}),
        )
        .await;
    app.api
        .wait_final("demo-image", &id, Duration::from_secs(20))
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();

    let run = cli(&app, &["wait", "demo-image", &id, "--out", out, "--json"]).await;

    run.assert_exit(0);
    let status = run.json();
    assert_eq!(status["state"], "success", "{run}");
    let files = status["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{run}");
    let bytes = std::fs::read(files[0].as_str().unwrap()).unwrap();
    assert_eq!(png_size(&bytes), (8, 8));
}

#[tokio::test]
async fn a_failed_task_in_json_mode_exits_1_with_the_status_in_the_error_object() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"fail": "boom"})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;

    let run = cli(&app, &["wait", "echo", &id, "--json"]).await;

    run.assert_exit(1);
    let err = &run.json()["error"];
    assert_eq!(err["kind"], "task_failed", "{run}");
    assert_eq!(err["exitCode"], 1, "{run}");
    assert!(err["message"].as_str().unwrap().contains("boom"), "{run}");
    assert_eq!(err["task"]["taskId"], id.as_str(), "{run}");
    assert_eq!(err["task"]["state"], "failed", "{run}");
    assert_eq!(err["task"]["failMsg"], "boom", "{run}");
    assert!(run.error_line().contains("boom"), "{run}");
}

#[tokio::test]
async fn wait_with_a_timeout_shorter_than_the_task_exits_3_with_a_one_line_message() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"delay_ms": 30_000})).await;
    let started = Instant::now();

    let run = cli(&app, &["wait", "echo", &id, "--timeout", "1s"]).await;

    run.assert_exit(3);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a 1s timeout took {:?}",
        started.elapsed()
    );
    let line = run.error_line();
    assert!(line.contains("gave up after 1s"), "{run}");
    assert!(line.contains(&id), "{run}");
    assert!(
        line.contains(&format!("taskgate wait echo {id}")),
        "the message should say how to resume:\n{run}"
    );
    assert!(run.stdout.is_empty(), "{run}");
}

#[tokio::test]
async fn a_timeout_in_json_mode_reports_kind_timeout_and_exit_code_3() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"delay_ms": 30_000})).await;

    let run = cli(&app, &["wait", "echo", &id, "--timeout", "300ms", "--json"]).await;

    run.assert_exit(3);
    let err = &run.json()["error"];
    assert_eq!(err["kind"], "timeout", "{run}");
    assert_eq!(err["exitCode"], 3, "{run}");
}

#[tokio::test]
async fn wait_for_an_unknown_task_exits_2_at_once() {
    let app = TestApp::start().await;
    let started = Instant::now();

    let run = cli(&app, &["wait", "echo", "task_01HZZZZZZZZZZZZZZZZZZZZZZZ"]).await;

    run.assert_exit(2);
    assert!(run.error_line().contains("not found"), "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a 404 is not retried nor waited on: {:?}",
        started.elapsed()
    );
}
