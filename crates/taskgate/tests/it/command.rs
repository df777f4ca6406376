//! The `command` backend, driven by the small sh programs in `tests/scripts`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Every result file by its name (the last path segment of its URL, without the query).
async fn files_by_name(data: &Value) -> BTreeMap<String, (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for url in result_urls(data) {
        let name = url
            .split('?')
            .next()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned();
        out.insert(name, fetch_ok(&url).await);
    }
    out
}

#[tokio::test]
async fn every_file_a_command_leaves_becomes_a_result_url_with_its_content_type() {
    let app = TestApp::start_with_models(&command_model("files", "outputs.sh", &[], "")).await;

    let data = app.api.run_to_end("files", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let files = files_by_name(&data).await;
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "clips_clip.mp4",
            "data.json",
            "greeting.txt",
            "my_image__1_.png",
            "picture.png"
        ]
    );
    assert_eq!(files["greeting.txt"].0, "text/plain; charset=utf-8");
    assert_eq!(files["greeting.txt"].1, b"hello from a command model\n");
    assert_eq!(files["data.json"].0, "application/json");
    assert_eq!(files["picture.png"].0, "image/png");
    assert_eq!(files["clips_clip.mp4"].0, "video/mp4");
    assert_eq!(files["clips_clip.mp4"].1, b"fake mp4 bytes");
    assert_eq!(files["my_image__1_.png"].0, "image/png");
}

#[tokio::test]
async fn a_command_gets_the_input_json_on_stdin_and_the_task_in_its_environment() {
    let model = command_model(
        "stdin",
        "echo_stdin.sh",
        &[],
        "env = { EXTRA_SETTING = \"from-config\" }",
    );
    let app = TestApp::start_with_models(&model).await;
    let input = json!({ "prompt": "a \"quoted\" prompt\nwith ünïcode", "n": [1, 2, 3] });

    let id = app.api.submit_ok("stdin", input.clone()).await;
    let data = app
        .api
        .wait_final("stdin", &id, Duration::from_secs(20))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let files = files_by_name(&data).await;
    let received: Value = serde_json::from_slice(&files["input.json"].1).unwrap();
    assert_eq!(received, input);
    let env = String::from_utf8(files["env.txt"].1.clone()).unwrap();
    assert!(env.contains(&format!("task_id={id}\n")), "{env}");
    assert!(env.contains("model=stdin\n"), "{env}");
    assert!(env.contains("attempt=1\n"), "{env}");
    assert!(env.contains("extra=from-config\n"), "{env}");
    assert!(env.contains("api_key=\n"), "the server's key leaked: {env}");
}

#[tokio::test]
async fn a_nonzero_exit_fails_the_task_with_the_tail_of_stderr() {
    let app =
        TestApp::start_with_models(&command_model("broken", "fail.sh", &[], "max_attempts = 3"))
            .await;

    let data = app.api.run_to_end("broken", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(
        msg.ends_with("fatal: the model ran out of GPU memory"),
        "{msg}"
    );
    assert!(
        !msg.contains("noise line 0:"),
        "failMsg should keep only the tail: {msg}"
    );
    assert!(msg.len() <= 2000, "failMsg is {} bytes", msg.len());
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_the_task_naming_the_program() {
    let app = TestApp::start_with_models(
        "[models.missing]\nbackend = \"command\"\ncommand = [\"/nonexistent/model-binary\"]\n",
    )
    .await;

    let data = app.api.run_to_end("missing", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert!(
        data["failMsg"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/model-binary"),
        "{data}"
    );
}

#[tokio::test]
async fn a_command_that_leaves_no_file_fails_instead_of_succeeding_empty() {
    let app = TestApp::start_with_models(
        "[models.silent]\nbackend = \"command\"\ncommand = [\"true\"]\n",
    )
    .await;

    let data = app.api.run_to_end("silent", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    assert!(
        data["failMsg"].as_str().unwrap().contains("output"),
        "{data}"
    );
}

#[tokio::test]
async fn exit_75_is_retried_and_the_task_succeeds_once_the_program_does() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("runs");
    let counter = counter.to_str().unwrap();
    let app = TestApp::start_with_models(&command_model(
        "flaky",
        "tempfail.sh",
        &[counter, "2"],
        "max_attempts = 3",
    ))
    .await;

    let data = app.api.run_to_end("flaky", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    assert_eq!(std::fs::read_to_string(counter).unwrap().trim(), "3");
    let files = files_by_name(&data).await;
    assert_eq!(files["result.txt"].1, b"succeeded on run 3\n");
}

#[tokio::test]
async fn exit_75_every_time_fails_after_exactly_max_attempts_runs() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("runs");
    let counter = counter.to_str().unwrap();
    let app = TestApp::start_with_models(&command_model(
        "busy",
        "tempfail.sh",
        &[counter, "1000"],
        "max_attempts = 4",
    ))
    .await;

    let data = app.api.run_to_end("busy", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "GENERATION_FAILED");
    let msg = data["failMsg"].as_str().unwrap();
    assert!(msg.contains("backend busy (run 4)"), "{msg}");
    assert!(msg.contains("4 attempts"), "{msg}");
    // No run after the final state was written.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(counter).unwrap().trim(), "4");
}

#[tokio::test]
async fn a_nonzero_exit_other_than_75_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("runs");
    let app = TestApp::start_with_models(&format!(
        "[models.once]\nbackend = \"command\"\ncommand = [\"sh\", \"-c\", {}]\nmax_attempts = 5\n",
        toml_str(format!(
            "echo x >> {}; echo 'bad input' >&2; exit 1",
            counter.display()
        ))
    ))
    .await;

    let data = app.api.run_to_end("once", json!({})).await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failMsg"], "bad input");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");
}

#[tokio::test]
async fn a_timeout_fails_the_task_and_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let app = TestApp::start_with_models(&command_model(
        "stuck",
        "hang.sh",
        &[pid_file.to_str().unwrap()],
        "timeout = \"700ms\"\nmax_attempts = 3",
    ))
    .await;

    let id = app.api.submit_ok("stuck", json!({})).await;
    let pids = wait_for_file(&pid_file, Duration::from_secs(10)).await;
    let pids: Vec<i32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        pids.iter().all(|&p| !process_is_gone(p)),
        "the script should be running"
    );
    let data = app
        .api
        .wait_final("stuck", &id, Duration::from_secs(10))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "PROCESSING_TIMEOUT");
    assert!(
        data["failMsg"].as_str().unwrap().contains("timeout"),
        "{data}"
    );
    wait_until(
        Duration::from_secs(5),
        "the script and its grandchild to be killed",
        || async { pids.iter().all(|&p| process_is_gone(p)) },
    )
    .await;
}

#[tokio::test]
async fn a_program_that_exits_leaving_a_background_child_succeeds_at_once_and_the_child_is_killed()
{
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let app = TestApp::start_with_models(&command_model(
        "bg",
        "background.sh",
        &[pid_file.to_str().unwrap()],
        "timeout = \"3s\"",
    ))
    .await;

    let id = app.api.submit_ok("bg", json!({})).await;
    let child: i32 = wait_for_file(&pid_file, Duration::from_secs(10))
        .await
        .trim()
        .parse()
        .unwrap();
    let data = app.api.wait_final("bg", &id, Duration::from_secs(30)).await;

    assert_eq!(data["state"], "success", "{data}");
    let took = data["costTime"].as_i64().unwrap();
    assert!(
        took < 5_000,
        "the program exited at once, but the task took {took} ms"
    );
    wait_until(
        Duration::from_secs(5),
        "the leftover background child to be killed",
        || async { process_is_gone(child) },
    )
    .await;
}

#[tokio::test]
async fn a_command_sees_none_of_the_servers_own_settings_but_its_configured_env() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("models.toml");
    std::fs::write(
        &config,
        r#"
[models.env]
backend = "command"
command = ["sh", "-c", "env > \"$TASKGATE_OUTPUT_DIR/env.txt\""]
env = { MODEL_SETTING = "kept" }
"#,
    )
    .unwrap();
    let server = ServerProcess::spawn_full(
        &dir.path().join("data"),
        Some(&config),
        &[],
        &[
            ("TASKGATE_SHUTDOWN_GRACE", "5s"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ],
    )
    .await;
    let data = server.api.run_to_end("env", json!({})).await;
    assert_eq!(data["state"], "success", "{data}");
    let (_, body) = fetch_ok(&result_urls(&data)[0]).await;
    let env = String::from_utf8(body).unwrap();
    assert!(env.contains("MODEL_SETTING=kept"), "{env}");
    assert!(env.contains("TASKGATE_TASK_ID=task_"), "{env}");
    assert!(
        env.contains("TASKGATE_OUTPUT_DIR=/"),
        "an absolute output dir: {env}"
    );
    for secret in [
        "TASKGATE_API_KEY",
        "TASKGATE_SHUTDOWN_GRACE",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(
            !env.contains(secret),
            "{secret} leaked into the model's environment"
        );
    }
    server.terminate().await;
}

/// How long escape.sh's grandchild sleeps before it writes its late file: long enough that even
/// a loaded machine settles the task first, so a late file means the grandchild outlived it.
const LATE_AFTER_SECS: &str = "5";

/// When a late file would surely have been written, counted from when the grandchild's pid was
/// read (it sleeps only after writing it).
fn late_after() -> Duration {
    Duration::from_secs(LATE_AFTER_SECS.parse().unwrap()) + Duration::from_millis(500)
}

#[tokio::test]
async fn a_grandchild_that_escapes_into_its_own_session_is_gone_before_the_task_is_final() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start_with_models(&command_model(
        "escape",
        "escape.sh",
        &[dir.path().to_str().unwrap(), LATE_AFTER_SECS],
        "timeout = \"20s\"",
    ))
    .await;

    let id = app.api.submit_ok("escape", json!({})).await;
    let grandchild: i32 = wait_for_file(&dir.path().join("pid"), Duration::from_secs(10))
        .await
        .trim()
        .parse()
        .unwrap();
    let late_due = tokio::time::Instant::now() + late_after();
    let data = app
        .api
        .wait_final("escape", &id, Duration::from_secs(30))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    assert!(
        process_is_gone(grandchild),
        "the grandchild {grandchild} in its own session outlived its settled task"
    );
    let names: Vec<String> = files_by_name(&data).await.into_keys().collect();
    assert_eq!(names, ["result.txt"]);
    tokio::time::sleep_until(late_due).await;
    assert!(
        !dir.path().join("late").exists(),
        "the escaped grandchild kept running after its task was settled"
    );
}

#[tokio::test]
async fn a_timeout_kills_a_grandchild_that_escaped_into_its_own_session() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start_with_models(&command_model(
        "escape_stuck",
        "escape.sh",
        &[dir.path().to_str().unwrap(), LATE_AFTER_SECS, "hang"],
        "timeout = \"700ms\"\nmax_attempts = 1",
    ))
    .await;

    let id = app.api.submit_ok("escape_stuck", json!({})).await;
    let grandchild: i32 = wait_for_file(&dir.path().join("pid"), Duration::from_secs(10))
        .await
        .trim()
        .parse()
        .unwrap();
    let late_due = tokio::time::Instant::now() + late_after();
    assert!(
        !process_is_gone(grandchild),
        "the grandchild should be running"
    );
    let data = app
        .api
        .wait_final("escape_stuck", &id, Duration::from_secs(10))
        .await;

    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "PROCESSING_TIMEOUT");
    // A timeout drops the attempt, so the kill cannot be awaited before settling; it is sent
    // from the drop itself and the process dies within moments.
    // Bounded by when it would write its late file (5 s after it started), with room for a
    // loaded machine.
    wait_until(
        Duration::from_millis(4000),
        "the escaped grandchild to be killed",
        || async { process_is_gone(grandchild) },
    )
    .await;
    tokio::time::sleep_until(late_due).await;
    assert!(
        !dir.path().join("late").exists(),
        "the escaped grandchild kept running after its task timed out"
    );
}

#[tokio::test]
async fn a_grandchild_that_escaped_and_died_before_its_program_is_reaped_not_left_a_zombie() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let app = TestApp::start_with_models(&command_model(
        "orphan",
        "orphan_zombie.sh",
        &[pid_file.to_str().unwrap()],
        "timeout = \"20s\"",
    ))
    .await;

    let data = app.api.run_to_end("orphan", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let grandchild: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Reparented to the server when its program exited; only the server can reap it.
    assert!(
        !std::path::Path::new(&format!("/proc/{grandchild}")).exists(),
        "the escaped grandchild {grandchild} was left a zombie"
    );
}
