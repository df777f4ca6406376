//! `taskgate webhook listen`: signature checks, what it prints (text or JSON lines), where its
//! secret comes from, and a real callback from the server reaching it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_client::webhook::{self, Secret};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::{cli, cli_command, cli_env};
use crate::support::*;

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
async fn a_callback_from_the_server_reaches_webhook_listen_and_is_printed() {
    let app = TestApp::start_with(|c| c.webhooks.allow_private_callbacks = true).await;
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
