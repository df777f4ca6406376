//! `taskgate submit`: the input it sends (inline, @file, @- for stdin, --prompt over it), what it
//! prints with and without --wait / --out, and its usage errors.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{cli, cli_command, cli_env, closed_port};
use crate::support::*;

/// The parsed content of the single result file of a successful task's `data`.
async fn echoed_input(data: &Value) -> Value {
    let urls = result_urls(data);
    assert_eq!(urls.len(), 1, "{data}");
    let resp = reqwest::get(&urls[0]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", urls[0]);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn submit_echo_with_inline_input_and_wait_prints_the_successful_status_as_json() {
    let app = TestApp::start().await;

    let run = cli(
        &app,
        &[
            "submit",
            "echo",
            "--input",
            r#"{"prompt":"hi","n":7}"#,
            "--wait",
            "--json",
        ],
    )
    .await;

    run.assert_exit(0);
    let status = run.json();
    assert_eq!(status["state"], "success", "{run}");
    assert!(
        status["taskId"].as_str().unwrap().starts_with("task_"),
        "{run}"
    );
    assert_eq!(
        echoed_input(&status).await,
        json!({"prompt": "hi", "n": 7}),
        "{run}"
    );
}

#[tokio::test]
async fn submit_reads_the_input_from_a_file_given_with_an_at_sign() {
    let app = TestApp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.json");
    std::fs::write(&file, r#"{"prompt": "from a file", "seed": 42}"#).unwrap();
    let arg = format!("@{}", file.display());

    let run = cli(&app, &["submit", "echo", "--input", &arg, "--json"]).await;

    run.assert_exit(0);
    let created = run.json();
    let id = created["taskId"].as_str().unwrap();
    assert_eq!(created, json!({ "taskId": id }), "{run}");
    let data = app
        .api
        .wait_final("echo", id, Duration::from_secs(20))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(
        echoed_input(&data).await,
        json!({"prompt": "from a file", "seed": 42})
    );
}

#[tokio::test]
async fn submit_reads_the_input_from_stdin_with_at_dash() {
    let app = TestApp::start().await;
    let mut cmd = cli_command(&["submit", "echo", "--input", "@-"]);
    cmd.env("TASKGATE_URL", &app.api.base)
        .env("TASKGATE_API_KEY", API_KEY)
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(br#"{"prompt":"piped"}"#).await.unwrap();
    }

    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();

    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let id = String::from_utf8(out.stdout).unwrap();
    let data = app
        .api
        .wait_final("echo", id.trim(), Duration::from_secs(20))
        .await;
    assert_eq!(echoed_input(&data).await, json!({"prompt": "piped"}));
}

#[tokio::test]
async fn submit_prints_only_the_task_id_and_prompt_overrides_input_prompt() {
    let app = TestApp::start().await;

    let run = cli(
        &app,
        &[
            "submit",
            "echo",
            "--input",
            r#"{"prompt":"old","k":1}"#,
            "--prompt",
            "new words",
        ],
    )
    .await;

    run.assert_exit(0);
    let id = run.stdout.trim_end_matches('\n');
    assert!(
        id.starts_with("task_") && !id.contains(char::is_whitespace),
        "stdout should be the task id alone:\n{run}"
    );
    let data = app
        .api
        .wait_final("echo", id, Duration::from_secs(20))
        .await;
    assert_eq!(
        echoed_input(&data).await,
        json!({"prompt": "new words", "k": 1})
    );
}

#[tokio::test]
async fn submit_with_only_a_prompt_sends_it_as_input_prompt() {
    let app = TestApp::start().await;

    let run = cli(&app, &["submit", "echo", "--prompt", "just this"]).await;

    run.assert_exit(0);
    let data = app
        .api
        .wait_final("echo", run.stdout.trim(), Duration::from_secs(20))
        .await;
    assert_eq!(echoed_input(&data).await, json!({"prompt": "just this"}));
}

#[tokio::test]
async fn submit_demo_image_with_out_saves_a_real_png_into_the_directory() {
    let app = TestApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_arg = out.to_str().unwrap();

    let run = cli(
        &app,
        &[
            "submit",
            "demo-image",
            "--input",
            r#"{"width":64,"height":48}"#,
            "--prompt",
            "a red fox",
            "--wait",
            "--out",
            out_arg,
        ],
    )
    .await;

    run.assert_exit(0);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "expected one file, no .part left: {names:?}"
    );
    let saved = out.join(&names[0]);
    let bytes = std::fs::read(&saved).unwrap();
    assert_eq!(png_size(&bytes), (64, 48));
    assert!(run.stdout.contains("state     success"), "{run}");
    assert!(
        run.stdout
            .contains(&format!("file      {}", saved.display())),
        "{run}"
    );
    assert!(
        run.stderr.contains(&format!("saved {}", saved.display())),
        "{run}"
    );
}

#[tokio::test]
async fn a_failed_task_exits_1_with_its_fail_message() {
    let app = TestApp::start().await;

    let run = cli(
        &app,
        &["submit", "echo", "--input", r#"{"fail":"boom"}"#, "--wait"],
    )
    .await;

    run.assert_exit(1);
    let line = run.error_line();
    assert!(line.contains("failed"), "{run}");
    assert!(line.contains("GENERATION_FAILED: boom"), "{run}");
    assert!(
        run.stdout.is_empty(),
        "nothing on stdout for a failure:\n{run}"
    );
}

#[tokio::test]
async fn submit_wait_with_a_short_timeout_exits_3_and_says_how_to_resume() {
    let app = TestApp::start().await;

    let run = cli(
        &app,
        &[
            "submit",
            "echo",
            "--input",
            r#"{"delay_ms":30000}"#,
            "--wait",
            "--timeout",
            "500ms",
        ],
    )
    .await;

    run.assert_exit(3);
    let id = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("submitted "))
        .unwrap_or_else(|| panic!("no submitted line:\n{run}"));
    let line = run.error_line();
    assert!(line.contains("gave up after"), "{run}");
    assert!(line.contains(&format!("taskgate wait echo {id}")), "{run}");
}

#[tokio::test]
async fn submitting_to_an_unknown_model_names_the_models_the_server_offers() {
    let app = TestApp::start().await;

    let run = cli(&app, &["submit", "nosuchmodel", "--prompt", "hi"]).await;

    run.assert_exit(2);
    let line = run.error_line();
    for needle in ["unknown model", "nosuchmodel", "echo", "demo-image"] {
        assert!(line.contains(needle), "no {needle:?} in:\n{run}");
    }
}

#[tokio::test]
async fn submit_without_a_model_is_a_usage_error() {
    let run = cli_env(&[], &["submit"]).await;

    run.assert_exit(2);
    assert!(run.stderr.contains("MODEL"), "{run}");
    assert!(run.stdout.is_empty(), "{run}");
}

#[tokio::test]
async fn submit_with_nothing_to_send_is_a_usage_error_before_any_request() {
    // No server at all: the input is checked first.
    let url = format!("http://127.0.0.1:{}", closed_port());

    let run = cli_env(&[("TASKGATE_URL", url.as_str())], &["submit", "echo"]).await;

    run.assert_exit(2);
    assert!(run.error_line().contains("nothing to submit"), "{run}");
}

#[tokio::test]
async fn input_that_is_not_a_json_object_is_a_usage_error() {
    let url = format!("http://127.0.0.1:{}", closed_port());

    let bad = cli_env(
        &[("TASKGATE_URL", url.as_str())],
        &["submit", "echo", "--input", "{not json"],
    )
    .await;
    let missing = cli_env(
        &[("TASKGATE_URL", url.as_str())],
        &["submit", "echo", "--input", "@/nonexistent/input.json"],
    )
    .await;

    bad.assert_exit(2);
    assert!(bad.error_line().contains("not valid JSON"), "{bad}");
    missing.assert_exit(2);
    assert!(
        missing.error_line().contains("/nonexistent/input.json"),
        "{missing}"
    );
}

#[tokio::test]
async fn input_the_server_refuses_is_a_usage_error_with_its_message() {
    let app = TestApp::start().await;

    let run = cli(&app, &["submit", "demo-image", "--input", r#"{"width":0}"#]).await;

    run.assert_exit(2);
    assert!(run.error_line().contains("/width"), "{run}");
}

#[tokio::test]
async fn output_that_is_not_a_terminal_is_plain_lines_without_escapes_or_redraws() {
    let app = TestApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();

    let run = cli(
        &app,
        &[
            "submit",
            "echo",
            "--input",
            r#"{"delay_ms":100}"#,
            "--wait",
            "--out",
            out,
        ],
    )
    .await;

    run.assert_exit(0);
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(!text.contains('\x1b'), "ANSI escape on {name}:\n{run}");
        assert!(!text.contains('\r'), "carriage return on {name}:\n{run}");
    }
    let id = run
        .stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("task      "))
        .unwrap_or_else(|| panic!("no task line:\n{run}"));
    let err: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(err[0], format!("submitted {id}"), "{run}");
    assert!(
        err.iter()
            .any(|l| l.starts_with(&format!("{id}: success after "))),
        "no plain state line:\n{run}"
    );
    assert!(
        err.last().unwrap().starts_with("saved ") && err.last().unwrap().ends_with(')'),
        "no plain saved line:\n{run}"
    );
    // One line per state change, not one per poll.
    let success_lines = err.iter().filter(|l| l.contains(": success")).count();
    assert_eq!(success_lines, 1, "{run}");
}

#[tokio::test]
async fn submit_with_an_idempotency_key_twice_prints_one_task_id() {
    let app = TestApp::start().await;
    let args = [
        "submit",
        "echo",
        "--prompt",
        "once",
        "--idempotency-key",
        "cli-1",
    ];

    let first = cli(&app, &args).await;
    let second = cli(&app, &args).await;
    let other = cli(
        &app,
        &[
            "submit",
            "echo",
            "--prompt",
            "twice",
            "--idempotency-key",
            "cli-1",
        ],
    )
    .await;

    first.assert_exit(0);
    second.assert_exit(0);
    assert_eq!(first.stdout, second.stdout);
    assert_eq!(app.api.list_all_ids(&[]).await, [first.stdout.trim()]);
    other.assert_exit(2);
    assert!(other.error_line().contains("cli-1"), "{other}");
}
