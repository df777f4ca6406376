//! The client CLI (`taskgate submit / status / wait / webhook listen`) run as a child process
//! against a real server, plus the SDK end to end: exit codes, stdout, stderr and files.
//!
//! Each CLI run starts from an environment with every `TASKGATE_*` variable removed, then sets
//! only what the test means to give, so a developer's own settings cannot leak in.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_client::webhook::{self, Secret};
use taskgate_client::{Client, SubmitOptions, TaskState, WaitOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::support::*;

/// What one run of the CLI left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stderr lines that start with `error:`, asserting there is exactly one.
    fn error_line(&self) -> &str {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "expected exactly one error line on stderr:\n{self}"
        );
        errors[0]
    }

    /// stdout as exactly one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }

    fn assert_exit(&self, want: i32) {
        assert_eq!(self.code, Some(want), "unexpected exit code:\n{self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The `taskgate` binary with no `TASKGATE_*` variable inherited, and stdin, stdout and stderr
/// not terminals.
fn cli_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = taskgate_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs the CLI with exactly these `TASKGATE_*` variables.
async fn cli_env(envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = cli_command(args);
    cmd.envs(envs.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("taskgate {args:?} did not exit within 30s"))
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs the CLI against `app` with the test key, both given through the environment.
async fn cli(app: &TestApp, args: &[&str]) -> Run {
    cli_env(
        &[
            ("TASKGATE_URL", app.api.base.as_str()),
            ("TASKGATE_API_KEY", API_KEY),
        ],
        args,
    )
    .await
}

/// A 127.0.0.1 port that nothing listens on (bound once by the OS, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The parsed content of the single result file of a successful task's `data`.
async fn echoed_input(data: &Value) -> Value {
    let urls = result_urls(data);
    assert_eq!(urls.len(), 1, "{data}");
    let resp = reqwest::get(&urls[0]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", urls[0]);
    resp.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// submit

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

// ---------------------------------------------------------------------------------------------
// failure, timeout

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

// ---------------------------------------------------------------------------------------------
// status

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
async fn submitting_to_an_unknown_model_names_the_models_the_server_offers() {
    let app = TestApp::start().await;

    let run = cli(&app, &["submit", "nosuchmodel", "--prompt", "hi"]).await;

    run.assert_exit(2);
    let line = run.error_line();
    for needle in ["unknown model", "nosuchmodel", "echo", "demo-image"] {
        assert!(line.contains(needle), "no {needle:?} in:\n{run}");
    }
}

// ---------------------------------------------------------------------------------------------
// transport, auth, usage

#[tokio::test]
async fn a_wrong_api_key_exits_4_saying_the_key_was_refused() {
    let app = TestApp::start().await;

    let run = cli_env(
        &[],
        &[
            "--url",
            &app.api.base,
            "--api-key",
            "tg_wrong_key_0123456789",
            "submit",
            "echo",
            "--prompt",
            "hi",
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
        &["--url", &url, "submit", "echo", "--prompt", "hi", "--json"],
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
    assert!(run.error_line().contains("input.width"), "{run}");
}

// ---------------------------------------------------------------------------------------------
// output when not on a terminal

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

// ---------------------------------------------------------------------------------------------
// webhook listen

/// `taskgate webhook listen --port 0 --secret SECRET` as a child process, with its stdout lines
/// collected and its address read from the "listening on" line.
struct Listener {
    base: String,
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
    _child: tokio::process::Child,
}

impl Listener {
    async fn spawn(secret: &str) -> Listener {
        Self::spawn_command(cli_command(&[
            "webhook", "listen", "--port", "0", "--secret", secret,
        ]))
        .await
    }

    async fn spawn_command(mut cmd: tokio::process::Command) -> Listener {
        let mut child = cmd.spawn().unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let mut stderr = lines_of(child.stderr.take().unwrap());
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = stderr.recv().await {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split('/').next().unwrap();
                    return format!("http://{addr}");
                }
            }
            panic!("webhook listen exited before listening");
        })
        .await
        .expect("webhook listen did not say where it listens within 30s");
        Listener {
            base,
            stdout,
            stderr,
            _child: child,
        }
    }

    /// Collects stdout until a line contains `needle`; returns everything read so far.
    async fn stdout_until(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = self.stdout.recv().await {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(needle) {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "no {needle:?} on stdout; got:\n{seen}"
        );
        seen
    }

    async fn stderr_until(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = self.stderr.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        found
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no {needle:?} on stderr"))
    }
}

fn lines_of(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// POSTs `body` to `url` with Standard Webhooks headers whose signature covers `signed_body`.
async fn deliver(
    url: &str,
    secret: &Secret,
    msg_id: &str,
    signed_body: &[u8],
    body: &[u8],
) -> (StatusCode, String) {
    let ts = webhook::unix_now();
    let resp = reqwest::Client::new()
        .post(url)
        .header(webhook::HEADER_ID, msg_id)
        .header(webhook::HEADER_TIMESTAMP, ts.to_string())
        .header(
            webhook::HEADER_SIGNATURE,
            webhook::sign(secret, msg_id, ts, signed_body),
        )
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

fn delivery_body(task_id: &str) -> Vec<u8> {
    json!({
        "code": 200,
        "message": "success",
        "data": {"taskId": task_id, "state": "success", "createTime": 1_700_000_000_000_i64}
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn webhook_listen_accepts_a_correctly_signed_delivery_and_prints_it() {
    let secret = Secret::generate();
    let mut listener = Listener::spawn(&secret.to_whsec()).await;
    let body = delivery_body("task_hook_ok");

    let (status, text) = deliver(
        &format!("{}/hooks/taskgate", listener.base),
        &secret,
        "msg_cli_1",
        &body,
        &body,
    )
    .await;

    assert_eq!(status, StatusCode::OK, "{text}");
    let printed = listener.stdout_until("\"taskId\"").await;
    let summary = printed
        .lines()
        .find(|l| l.contains("valid signature"))
        .unwrap_or_else(|| panic!("no summary line:\n{printed}"));
    for needle in ["/hooks/taskgate", "msg_cli_1", "task_hook_ok", "success"] {
        assert!(summary.contains(needle), "no {needle:?} in {summary:?}");
    }
    assert!(
        printed.contains("\"taskId\": \"task_hook_ok\""),
        "the body is pretty-printed:\n{printed}"
    );
}

#[tokio::test]
async fn webhook_listen_answers_401_to_a_tampered_body() {
    let secret = Secret::generate();
    let mut listener = Listener::spawn(&secret.to_whsec()).await;
    let signed = delivery_body("task_hook_real");
    let tampered = delivery_body("task_hook_fake");

    let (status, text) = deliver(
        &format!("{}/hook", listener.base),
        &secret,
        "msg_cli_2",
        &signed,
        &tampered,
    )
    .await;

    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(text.contains("invalid signature"), "{text}");
    let line = listener.stderr_until("rejected").await;
    assert!(line.contains("msg_cli_2"), "{line}");
}

#[tokio::test]
async fn webhook_listen_answers_401_to_a_delivery_signed_with_another_secret() {
    let secret = Secret::generate();
    let mut listener = Listener::spawn(&secret.to_whsec()).await;
    let body = delivery_body("task_hook_other");

    let (status, text) = deliver(
        &format!("{}/hook", listener.base),
        &Secret::generate(),
        "msg_cli_3",
        &body,
        &body,
    )
    .await;

    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    listener.stderr_until("rejected").await;
}

#[tokio::test]
async fn webhook_listen_with_a_malformed_secret_is_a_usage_error() {
    let run = cli_env(
        &[],
        &[
            "webhook",
            "listen",
            "--port",
            "0",
            "--secret",
            "not-a-secret",
        ],
    )
    .await;

    run.assert_exit(2);
    assert!(run.error_line().contains("--secret"), "{run}");
}

// ---------------------------------------------------------------------------------------------
// the SDK against the real server

#[tokio::test]
async fn the_sdk_submits_echo_waits_with_short_intervals_and_downloads_the_result() {
    let app = TestApp::start().await;
    let client = Client::new(&app.api.base, API_KEY).unwrap();
    let input = json!({"prompt": "from the sdk", "delay_ms": 150});
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));

    let task_id = client
        .submit("echo", input.clone(), SubmitOptions::default())
        .await
        .unwrap();
    let opts = WaitOptions {
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(20),
        ..WaitOptions::default()
    }
    .on_progress({
        let polls = polls.clone();
        move |p| polls.store(p.polls, std::sync::atomic::Ordering::SeqCst)
    });
    let status = client.wait("echo", &task_id, opts).await.unwrap();

    assert_eq!(status.task_id, task_id);
    assert_eq!(status.state, TaskState::Success);
    assert!(
        polls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "a 150 ms task polled every 20-100 ms is seen processing first"
    );
    let urls = status.result().unwrap().unwrap().result_urls;
    assert_eq!(urls.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = client.download(&urls[0], dir.path()).await.unwrap();
    assert!(path.starts_with(dir.path()), "{}", path.display());
    let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved, input);
    assert_only_file(dir.path(), &path);
}

/// `dir` holds `file` and nothing else (no leftover `.part`).
fn assert_only_file(dir: &Path, file: &Path) {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries, vec![file.to_owned()]);
}

// ---------------------------------------------------------------------------------------------
// more of the same surfaces

#[tokio::test]
async fn webhook_listen_without_a_secret_uses_the_tenants_secret_from_the_server() {
    let app = TestApp::start().await;
    let resp = app
        .api
        .request(reqwest::Method::GET, "/api/v1/webhookSecret")
        .send()
        .await
        .unwrap();
    let (status, env) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK, "{env}");
    let secret = Secret::parse(env["data"]["secret"].as_str().unwrap()).unwrap();
    let mut cmd = cli_command(&["webhook", "listen", "--port", "0"]);
    cmd.env("TASKGATE_URL", &app.api.base)
        .env("TASKGATE_API_KEY", API_KEY);
    let mut listener = Listener::spawn_command(cmd).await;
    let body = delivery_body("task_hook_tenant");

    let (status, text) = deliver(
        &format!("{}/hook", listener.base),
        &secret,
        "msg_cli_4",
        &body,
        &body,
    )
    .await;

    assert_eq!(status, StatusCode::OK, "{text}");
    listener.stdout_until("task_hook_tenant").await;
}

#[tokio::test]
async fn a_callback_from_the_server_reaches_webhook_listen_and_is_printed() {
    let app = TestApp::start_with(|c| c.webhooks.allow_private = true).await;
    let resp = app
        .api
        .request(reqwest::Method::GET, "/api/v1/webhookSecret")
        .send()
        .await
        .unwrap();
    let (_, env) = envelope(resp).await;
    let secret = env["data"]["secret"].as_str().unwrap().to_owned();
    let mut listener = Listener::spawn(&secret).await;
    let callback = format!("{}/hooks/taskgate", listener.base);

    let run = cli(
        &app,
        &[
            "submit",
            "echo",
            "--prompt",
            "call me",
            "--callback",
            &callback,
        ],
    )
    .await;

    run.assert_exit(0);
    let id = run.stdout.trim();
    let printed = listener.stdout_until("valid signature").await;
    assert!(printed.contains(id), "{printed}");
    assert!(printed.contains("/hooks/taskgate"), "{printed}");
    listener.stdout_until("\"state\": \"success\"").await;
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
async fn webhook_listen_answers_401_to_a_delivery_with_a_stale_timestamp() {
    let secret = Secret::generate();
    let mut listener = Listener::spawn(&secret.to_whsec()).await;
    let body = delivery_body("task_hook_stale");
    let ts = webhook::unix_now() - 600;

    let resp = reqwest::Client::new()
        .post(format!("{}/hook", listener.base))
        .header(webhook::HEADER_ID, "msg_cli_5")
        .header(webhook::HEADER_TIMESTAMP, ts.to_string())
        .header(
            webhook::HEADER_SIGNATURE,
            webhook::sign(&secret, "msg_cli_5", ts, &body),
        )
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.text().await.unwrap().contains("tolerance"));
    listener.stderr_until("msg_cli_5").await;
}

#[tokio::test]
async fn webhook_listen_with_json_prints_one_line_per_delivery() {
    let secret = Secret::generate();
    let mut cmd = cli_command(&[
        "webhook",
        "listen",
        "--port",
        "0",
        "--json",
        "--secret",
        &secret.to_whsec(),
    ]);
    cmd.env_remove("TASKGATE_WEBHOOK_SECRET");
    let mut listener = Listener::spawn_command(cmd).await;
    let body = delivery_body("task_hook_json");

    let (ok, _) = deliver(
        &format!("{}/a", listener.base),
        &secret,
        "msg_cli_6",
        &body,
        &body,
    )
    .await;
    let (bad, _) = deliver(
        &format!("{}/b", listener.base),
        &Secret::generate(),
        "msg_cli_7",
        &body,
        &body,
    )
    .await;

    assert_eq!((ok, bad), (StatusCode::OK, StatusCode::UNAUTHORIZED));
    let printed = listener.stdout_until("msg_cli_7").await;
    let lines: Vec<Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert_eq!(lines[0]["valid"], true, "{printed}");
    assert_eq!(lines[0]["path"], "/a", "{printed}");
    assert_eq!(lines[0]["webhookId"], "msg_cli_6", "{printed}");
    assert_eq!(
        lines[0]["body"]["data"]["taskId"], "task_hook_json",
        "{printed}"
    );
    assert_eq!(lines[1]["valid"], false, "{printed}");
    assert_eq!(lines[1]["webhookId"], "msg_cli_7", "{printed}");
}

#[tokio::test]
async fn webhook_listen_without_a_secret_and_with_a_refused_key_exits_4_like_every_auth_error() {
    // docs/client.md's exit codes: 4 is "transport or auth error: server unreachable, key
    // refused (401/403)", for every subcommand.
    let app = TestApp::start().await;

    let run = cli_env(
        &[
            ("TASKGATE_URL", app.api.base.as_str()),
            ("TASKGATE_API_KEY", "tg_wrong_key_0123456789"),
        ],
        &["webhook", "listen", "--port", "0"],
    )
    .await;

    run.assert_exit(4);
    assert!(run.error_line().contains("invalid API key"), "{run}");
}

// ---------------------------------------------------------------------------------------------
// what a new user met running the binary

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
async fn webhook_listen_refuses_a_secret_without_the_whsec_prefix() {
    // "abcd" is valid base64: without the check it was taken as a key.
    let run = cli_env(
        &[],
        &[
            "webhook", "listen", "--port", "0", "--secret", "abcd", "--json",
        ],
    )
    .await;
    run.assert_exit(2);
    let err = &run.json()["error"];
    assert!(err["message"].as_str().unwrap().contains("whsec_"), "{run}");
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
