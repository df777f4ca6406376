//! `--url` and `--api-key`, which every client command takes: a refused or missing key, a server
//! that is not there, a base URL with `/api/v1`.

use std::time::Duration;

use serde_json::json;

use super::{cli_env, closed_port};
use crate::support::*;

#[tokio::test]
async fn a_wrong_api_key_exits_4_saying_the_key_was_refused() {
    let app = TestApp::start().await;

    let run = cli_env(
        &[],
        &[
            "submit",
            "echo",
            "--prompt",
            "hi",
            "--url",
            &app.api.base,
            "--api-key",
            "tg_wrong_key_0123456789",
        ],
    )
    .await;

    run.assert_exit(4);
    let line = run.error_line();
    assert!(line.contains("refused the API key"), "{run}");
    assert!(line.contains(&app.api.base), "{run}");
    assert!(
        !line.contains("tg_wrong_key"),
        "the key must not be echoed:\n{run}"
    );
    assert!(run.stdout.is_empty(), "{run}");
}

#[tokio::test]
async fn a_missing_api_key_exits_4_and_says_how_to_give_one() {
    let app = TestApp::start().await;

    let run = cli_env(
        &[("TASKGATE_URL", app.api.base.as_str())],
        &["status", "echo", "task_x"],
    )
    .await;

    run.assert_exit(4);
    let line = run.error_line();
    assert!(line.contains("refused the API key"), "{run}");
    assert!(line.contains("TASKGATE_API_KEY"), "{run}");
}

#[tokio::test]
async fn a_url_nothing_listens_on_exits_4_saying_it_cannot_connect() {
    let url = format!("http://127.0.0.1:{}", closed_port());

    let run = cli_env(
        &[("TASKGATE_API_KEY", API_KEY)],
        &["submit", "echo", "--prompt", "hi", "--url", &url, "--json"],
    )
    .await;

    run.assert_exit(4);
    let line = run.error_line();
    assert!(line.contains(&format!("cannot reach {url}")), "{run}");
    let err = &run.json()["error"];
    assert_eq!(err["kind"], "transport", "{run}");
    assert_eq!(err["exitCode"], 4, "{run}");
}

#[tokio::test]
async fn a_base_url_ending_in_api_v1_works_as_well() {
    let app = TestApp::start().await;
    let id = app.api.submit_ok("echo", json!({"prompt": "x"})).await;
    app.api
        .wait_final("echo", &id, Duration::from_secs(20))
        .await;
    let url = format!("{}/api/v1", app.api.base);

    let run = cli_env(
        &[
            ("TASKGATE_URL", url.as_str()),
            ("TASKGATE_API_KEY", API_KEY),
        ],
        &["status", "echo", &id, "--json"],
    )
    .await;

    run.assert_exit(0);
    assert_eq!(run.json()["state"], "success", "{run}");
}
