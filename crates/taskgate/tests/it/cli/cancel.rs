//! `taskgate cancel MODEL TASK_ID`: the cancelled status for people and as JSON (exit 0), a
//! finished task (exit 2, `already_final`), an unknown one (exit 2, `not_found`).

use std::time::Duration;

use serde_json::json;

use super::cli;
use crate::support::*;

#[tokio::test]
async fn cancel_of_a_running_task_prints_its_cancelled_status_and_exits_0() {
    let app = TestApp::start().await;
    let human_id = app.api.submit_ok("echo", json!({"delay_ms": 60_000})).await;
    let json_id = app.api.submit_ok("echo", json!({"delay_ms": 60_000})).await;

    let human = cli(&app, &["cancel", "echo", &human_id]).await;
    let machine = cli(&app, &["cancel", "echo", &json_id, "--json"]).await;

    human.assert_exit(0);
    assert!(
        human.stdout.starts_with(&format!("task      {human_id}\n")),
        "{human}"
    );
    assert!(human.stdout.contains("state     failed"), "{human}");
    assert!(human.stdout.contains("failure   CANCELLED: "), "{human}");
    machine.assert_exit(0);
    let (_, status) = app.api.status("echo", &json_id).await;
    assert_eq!(
        machine.json(),
        status["data"],
        "--json prints the status as the server sends it"
    );
    assert_eq!(status["data"]["failCode"], "CANCELLED");
}

#[tokio::test]
async fn cancel_of_a_finished_task_exits_2_and_says_it_had_finished() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"n": 1})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;

    let human = cli(&app, &["cancel", "echo", &id]).await;
    let machine = cli(&app, &["cancel", "echo", &id, "--json"]).await;

    human.assert_exit(2);
    let line = human.error_line();
    assert!(line.contains(&id), "{human}");
    assert!(line.contains("success"), "{human}");
    assert!(
        line.contains(&format!("taskgate status echo {id}")),
        "{human}"
    );
    assert!(human.stdout.is_empty(), "{human}");
    machine.assert_exit(2);
    let err = &machine.json()["error"];
    assert_eq!(err["kind"], "already_final", "{machine}");
    assert_eq!(err["exitCode"], 2, "{machine}");
    let (_, status) = app.api.status("echo", &id).await;
    assert_eq!(status["data"]["state"], "success");
}

#[tokio::test]
async fn cancel_of_an_unknown_task_exits_2_not_found() {
    let app = TestApp::start().await;
    let id = "task_01hzzzzzzzzzzzzzzzzzzzzzzz";

    let run = cli(&app, &["cancel", "echo", id, "--json"]).await;

    run.assert_exit(2);
    assert_eq!(run.json()["error"]["kind"], "not_found", "{run}");
    assert!(run.error_line().contains(id), "{run}");
}
