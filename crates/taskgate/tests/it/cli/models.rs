//! `taskgate models`: the model list for people and as JSON, and a refused key.

use serde_json::Value;

use super::{cli, cli_env};
use crate::support::*;

#[tokio::test]
async fn models_lists_each_model_for_people_and_as_the_server_sends_it() {
    let app = TestApp::start().await;
    let served: Value = app
        .api
        .http
        .get(format!("{}/api/v1/models", app.api.base))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let human = cli(&app, &["models"]).await;
    let machine = cli(&app, &["models", "--json"]).await;

    human.assert_exit(0);
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line per model:\n{human}");
    let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        words(lines[0]),
        ["MODEL", "POLL", "MODES", "INPUT", "DESCRIPTION"],
        "{human}"
    );
    assert_eq!(
        words(lines[1]),
        [
            "demo-image",
            "1s",
            "async,callback",
            "height,",
            "prompt,",
            "width"
        ],
        "{human}"
    );
    assert_eq!(
        words(lines[2]),
        ["echo", "1s", "async,callback", "delay_ms,", "fail"],
        "{human}"
    );

    machine.assert_exit(0);
    assert_eq!(
        machine.json(),
        served["data"],
        "--json prints data as served"
    );
}

#[tokio::test]
async fn models_with_a_refused_key_exits_4() {
    let app = TestApp::start().await;

    let run = cli_env(
        &[("TASKGATE_URL", app.api.base.as_str())],
        &["models", "--api-key", "tg_wrong_key_0123456789"],
    )
    .await;

    run.assert_exit(4);
    assert!(run.error_line().contains("refused the API key"), "{run}");
    assert!(run.stdout.is_empty(), "{run}");
}
