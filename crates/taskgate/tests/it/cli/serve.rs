//! `taskgate serve` as a new user runs it: its log, a second server on the same data dir, the
//! bootstrap key from `--api-key` / `TASKGATE_API_KEY`.

use super::cli_env;
use crate::support::*;

#[tokio::test]
async fn serve_logs_to_a_file_without_colour_codes() {
    // NO_COLOR, if the runner sets it, is removed: the file alone must turn colour off.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_full(dir.path(), None, &[], &[("NO_COLOR", "")]).await;
    // One refused request, so there is more than the start-up line.
    let _ = server.api.status("echo", "task_nope").await;
    let log_path = server.log.clone();
    server.terminate().await;
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("taskgate serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log written to a file:\n{log}"
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_exits_1_without_claiming_to_listen() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::spawn(dir.path(), None).await;
    let data = dir.path().to_str().unwrap();
    let run = cli_env(
        &[("TASKGATE_API_KEY", API_KEY)],
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", data],
    )
    .await;
    run.assert_exit(1);
    assert!(
        !run.stdout.contains("listening"),
        "a refused server said it listens:\n{run}"
    );
    assert!(
        run.stderr.contains("already using data directory") && run.stderr.contains(data),
        "no word about the data dir:\n{run}"
    );
    // The first is untouched.
    let (status, _) = first.api.status("echo", "task_nope").await;
    assert_eq!(status, 404);
    first.terminate().await;
}

/// No key from the environment: an empty `TASKGATE_API_KEY` counts as none.
const NO_KEY: &[(&str, &str)] = &[("TASKGATE_API_KEY", "")];

#[tokio::test]
async fn serve_without_any_key_warns_that_every_request_will_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_full(dir.path(), None, &[], NO_KEY).await;
    // The warning is logged before the listening line is printed.
    let log_path = server.log.clone();
    server.terminate().await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("no API key exists") && log.contains("TASKGATE_API_KEY"),
        "{log}"
    );
}

#[tokio::test]
async fn serve_api_key_flag_registers_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = "flag-key-0123456789abcdef";
    let server = ServerProcess::spawn_full(dir.path(), None, &["--api-key", key], NO_KEY).await;
    let (status, body) = server.api.with_key(key).status("echo", "task_nope").await;
    let log_path = server.log.clone();
    server.terminate().await;
    // Known key, unknown task: 404, not 401.
    assert_eq!(status, 404, "{body}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("no API key exists"), "{log}");
}

#[tokio::test]
async fn a_refused_request_leaves_a_log_line_with_its_status_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(dir.path(), None).await;
    let _ = server.api.status("echo", "task_nope").await;
    let _ = server
        .api
        .with_key("wrong-key")
        .status("echo", "task_x")
        .await;
    let log_path = server.log.clone();
    server.terminate().await;
    let log = std::fs::read_to_string(log_path).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert!(
        refused.iter().any(|l| l.contains("status=404")
            && l.contains("error_code=task_not_found")
            && l.contains("task_nope")),
        "{log}"
    );
    assert!(refused.iter().any(|l| l.contains("status=401")), "{log}");
    // Displayed, not debug-printed.
    assert!(!log.contains("Some("), "{log}");
}
