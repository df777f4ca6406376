//! Client subcommands of the `taskgate` binary: `submit`, `status`, `wait` and `webhook listen`.
//!
//! They are thin over `taskgate-client`, which owns polling, retries and downloads; this module
//! owns only what a person or a script sees: the output (human text by default, one JSON document
//! on stdout with `--json`), the live progress line on a terminal (plain lines otherwise, so logs
//! stay readable), and the exit code:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the task failed |
//! | 2 | usage error: bad arguments, unknown model or task, request refused as invalid |
//! | 3 | timed out waiting |
//! | 4 | transport or auth error (unreachable server, refused key, rate limit or server error that outlasted the retries, local I/O) |
//!
//! Errors are one line on stderr that says what to change, including the server's own message.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use taskgate_client::proto::ErrorCode;
use taskgate_client::webhook::{self, Secret, SignedHeaders};
use taskgate_client::{Client, Error, SubmitOptions, TaskState, TaskStatus, WaitOptions};

/// Where the server is and how to talk to it; shared by every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Base URL of the taskgate server, or of any APIXO-compatible API (e.g. https://api.apixo.ai).
    #[arg(
        long,
        env = "TASKGATE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,

    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "TASKGATE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// Print machine-readable JSON on stdout instead of human text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Submit a task; prints its id, or with --wait its final status.
    Submit {
        /// Model id, e.g. `echo`, `demo-image`, `nano-banana`.
        model: String,
        /// Task input as a JSON object, or @file.json to read it from a file (@- for stdin).
        #[arg(long, value_name = "JSON|@FILE")]
        input: Option<String>,
        /// Sets input.prompt (merged over --input).
        #[arg(long, value_name = "TEXT")]
        prompt: Option<String>,
        /// Callback mode: the server POSTs the final status to this URL.
        #[arg(long, value_name = "URL")]
        callback: Option<String>,
        /// Wait for the task to finish (first poll after 3 s, then x1.5 up to 30 s).
        #[arg(long)]
        wait: bool,
        /// Download the results into this directory (implies --wait).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// How long --wait waits before giving up (exit code 3).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Show a task's status once.
    Status {
        /// The model the task was submitted to.
        model: String,
        /// The task id returned by submit.
        task_id: String,
    },
    /// Wait for a task to finish, polling with backoff.
    Wait {
        /// The model the task was submitted to.
        model: String,
        /// The task id returned by submit.
        task_id: String,
        /// How long to wait before giving up (exit code 3).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Download the results into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Tools for developing webhook receivers.
    #[command(subcommand)]
    Webhook(WebhookCommand),
}

/// `taskgate webhook ...`
#[derive(Debug, Clone, Subcommand)]
pub enum WebhookCommand {
    /// Receive callbacks on 127.0.0.1, verify their signatures and print them (Ctrl-C to stop).
    ///
    /// Answers 200 to a delivery with a valid signature and 401 otherwise. A taskgate server only
    /// calls a loopback address when started with --allow-private-callbacks.
    Listen {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Signing secret (whsec_...). Without it, the secret is read from the server with the
        /// API key (GET /api/v1/webhookSecret).
        #[arg(long, env = "TASKGATE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
}

/// Runs one client subcommand and returns the process exit code (see the module docs).
pub async fn run(conn: Connection, cmd: ClientCommand) -> ExitCode {
    match execute(&conn, cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report(conn.json);
            ExitCode::from(failure.exit)
        }
    }
}

const EXIT_TASK_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TIMEOUT: u8 = 3;
const EXIT_TRANSPORT: u8 = 4;

/// A command's failure, already phrased for a person.
struct Failure {
    exit: u8,
    kind: &'static str,
    message: String,
    task: Option<Box<TaskStatus>>,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: EXIT_USAGE,
            kind: "usage",
            message: message.into(),
            task: None,
        }
    }

    fn report(&self, json_mode: bool) {
        eprintln!("error: {}", self.message);
        if json_mode {
            let mut err = json!({
                "kind": self.kind,
                "message": self.message,
                "exitCode": self.exit,
            });
            if let Some(task) = &self.task {
                err["task"] = serde_json::to_value(task).unwrap_or(Value::Null);
            }
            println!("{}", json!({ "error": err }));
        }
    }
}

/// What the failing call was about, so an error can name the model or the task.
enum Action<'a> {
    Submit {
        model: &'a str,
    },
    Task {
        model: &'a str,
        task_id: &'a str,
    },
    Download,
    /// Reading the tenant's webhook secret for `webhook listen`.
    WebhookSecret,
}

async fn execute(conn: &Connection, cmd: ClientCommand) -> Result<(), Failure> {
    match cmd {
        ClientCommand::Submit {
            model,
            input,
            prompt,
            callback,
            wait,
            out,
            timeout,
        } => {
            let input = build_input(input.as_deref(), prompt)?;
            let client = connect(conn)?;
            let opts = SubmitOptions {
                callback_url: callback,
            };
            let task_id = client
                .submit(&model, input, opts)
                .await
                .map_err(|e| explain(conn, Action::Submit { model: &model }, e))?;
            if !wait && out.is_none() {
                if conn.json {
                    println!("{}", json!({ "taskId": task_id }));
                } else {
                    println!("{task_id}");
                    if std::io::stderr().is_terminal() {
                        eprintln!("follow it with: taskgate wait {model} {task_id}");
                    }
                }
                return Ok(());
            }
            if !conn.json {
                eprintln!("submitted {task_id}");
            }
            wait_and_show(conn, &client, &model, &task_id, timeout, out, false).await
        }
        ClientCommand::Status { model, task_id } => {
            let client = connect(conn)?;
            let status = client.status(&model, &task_id).await.map_err(|e| {
                explain(
                    conn,
                    Action::Task {
                        model: &model,
                        task_id: &task_id,
                    },
                    e,
                )
            })?;
            if status.state == TaskState::Failed {
                // The lookup worked, but a script asking about a failed task should see it fail.
                // In JSON mode the error object carries the status: one document on stdout.
                if !conn.json {
                    show_status(conn, &status, &[]);
                }
                return Err(failed_task(status, conn.json));
            }
            show_status(conn, &status, &[]);
            Ok(())
        }
        ClientCommand::Wait {
            model,
            task_id,
            timeout,
            out,
        } => {
            let client = connect(conn)?;
            // The task may have finished long ago, so look once before the first interval.
            wait_and_show(conn, &client, &model, &task_id, timeout, out, true).await
        }
        ClientCommand::Webhook(WebhookCommand::Listen { port, secret }) => {
            listen(conn, port, secret).await
        }
    }
}

fn connect(conn: &Connection) -> Result<Client, Failure> {
    Client::builder(&conn.url)
        .api_key(conn.api_key.clone().unwrap_or_default())
        .build()
        .map_err(|e| match e {
            Error::InvalidUrl { url, reason } => Failure::usage(format!(
                "--url {url:?} is not a usable server URL ({reason}); expected something like http://127.0.0.1:8080"
            )),
            other => Failure::usage(other.to_string()),
        })
}

fn build_input(input: Option<&str>, prompt: Option<String>) -> Result<Value, Failure> {
    let mut obj = match input {
        None => Map::new(),
        Some(raw) => {
            let (text, source) = match raw.strip_prefix('@') {
                Some("-") => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).map_err(|e| {
                        Failure::usage(format!("cannot read --input from stdin: {e}"))
                    })?;
                    (s, "stdin".to_owned())
                }
                Some(path) => {
                    let s = std::fs::read_to_string(path).map_err(|e| {
                        Failure::usage(format!("cannot read --input file {path}: {e}"))
                    })?;
                    (s, path.to_owned())
                }
                None => (raw.to_owned(), "--input".to_owned()),
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(Failure::usage(format!(
                        "{source} must hold a JSON object, e.g. '{{\"prompt\": \"a red fox\"}}'"
                    )))
                }
                Err(e) => return Err(Failure::usage(format!("{source} is not valid JSON: {e}"))),
            }
        }
    };
    if let Some(p) = prompt {
        obj.insert("prompt".to_owned(), Value::String(p));
    }
    if obj.is_empty() && input.is_none() {
        return Err(Failure::usage(
            "nothing to submit: give --prompt TEXT or --input JSON (or --input @file.json)",
        ));
    }
    Ok(Value::Object(obj))
}

/// Turns an SDK error into one actionable line and an exit code.
fn explain(conn: &Connection, action: Action<'_>, err: Error) -> Failure {
    let fail = |exit, kind, message: String| Failure {
        exit,
        kind,
        message,
        task: None,
    };
    let error_code = err.error_code();
    match err {
        Error::Transport { reason, .. } => fail(
            EXIT_TRANSPORT,
            "transport",
            format!("cannot reach {}: {reason}", conn.url),
        ),
        Error::Api {
            status,
            message,
            detail,
            ..
        } => {
            let server_says = match &detail {
                Some(d) => format!("{message} ({d})"),
                None => message,
            };
            match (status, &action) {
                (401, _) => {
                    let hint = if conn.api_key.is_none() {
                        "no key was given: pass --api-key or set TASKGATE_API_KEY"
                    } else {
                        "check --api-key / TASKGATE_API_KEY"
                    };
                    fail(
                        EXIT_TRANSPORT,
                        "auth",
                        format!("{} refused the API key: {server_says}; {hint}", conn.url),
                    )
                }
                (403, _) => fail(
                    EXIT_TRANSPORT,
                    "auth",
                    format!("{} refused the request (403): {server_says}", conn.url),
                ),
                // A taskgate server says which thing was not found; APIXO does not, and then a
                // 404 is read by what was asked.
                (_, Action::Submit { model } | Action::Task { model, .. })
                    if error_code == Some(ErrorCode::ModelNotFound)
                        || (error_code.is_none()
                            && status == 404
                            && matches!(action, Action::Submit { .. })) =>
                {
                    fail(
                        EXIT_USAGE,
                        "unknown_model",
                        format!("unknown model {model:?} at {}: {server_says}", conn.url),
                    )
                }
                (_, Action::Task { model, task_id })
                    if error_code == Some(ErrorCode::TaskNotFound)
                        || (error_code.is_none() && status == 404) =>
                {
                    fail(
                    EXIT_USAGE,
                    "not_found",
                    format!(
                        "no task {task_id} for model {model:?} at {} (the model must be the one used at submit): {server_says}",
                        conn.url
                    ),
                    )
                }
                (429, _) => fail(
                    EXIT_TRANSPORT,
                    "rate_limited",
                    format!("{} is rate limiting this key, still after retries: {server_says}", conn.url),
                ),
                (500..=599, _) => fail(
                    EXIT_TRANSPORT,
                    "server_error",
                    format!("{} failed with HTTP {status}, still after retries: {server_says}", conn.url),
                ),
                (_, Action::Download) => fail(
                    EXIT_TRANSPORT,
                    "download",
                    format!("download refused with HTTP {status}: {server_says}"),
                ),
                _ => fail(
                    EXIT_USAGE,
                    "invalid_request",
                    format!("the server refused the request (HTTP {status}): {server_says}"),
                ),
            }
        }
        Error::Timeout {
            task_id,
            elapsed,
            last_state,
        } => {
            let model = match action {
                Action::Task { model, .. } | Action::Submit { model } => model,
                _ => "MODEL",
            };
            fail(
                EXIT_TIMEOUT,
                "timeout",
                format!(
                    "gave up after {} waiting for task {task_id} (still {}); raise --timeout or resume with: taskgate wait {model} {task_id}",
                    humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                    last_state.map(TaskState::as_str).unwrap_or("unknown"),
                ),
            )
        }
        Error::TaskFailed { status, .. } => failed_task(*status, conn.json),
        Error::Protocol { reason, .. } => fail(
            EXIT_TRANSPORT,
            "protocol",
            format!(
                "{} does not answer like an APIXO-compatible server: {reason}",
                conn.url
            ),
        ),
        Error::InvalidUrl { url, reason } => fail(
            EXIT_USAGE,
            "usage",
            format!("invalid URL {url:?}: {reason}"),
        ),
        Error::InvalidInput(msg) => fail(EXIT_USAGE, "usage", msg),
        Error::Io { path, source } => fail(
            EXIT_TRANSPORT,
            "io",
            format!("cannot write {}: {source}", path.display()),
        ),
        other => fail(EXIT_TRANSPORT, "error", other.to_string()),
    }
}

fn failed_task(status: TaskStatus, json_mode: bool) -> Failure {
    let reason = match (&status.fail_code, &status.fail_msg) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "no reason given".to_owned(),
    };
    Failure {
        exit: EXIT_TASK_FAILED,
        kind: "task_failed",
        message: format!("task {} failed: {reason}", status.task_id),
        // In JSON mode the status already went to stdout with the error object.
        task: json_mode.then(|| Box::new(status)),
    }
}

async fn wait_and_show(
    conn: &Connection,
    client: &Client,
    model: &str,
    task_id: &str,
    timeout: Duration,
    out: Option<PathBuf>,
    poll_immediately: bool,
) -> Result<(), Failure> {
    let action = || Action::Task { model, task_id };
    let status = wait_with_progress(client, model, task_id, timeout, poll_immediately)
        .await
        .map_err(|e| explain(conn, action(), e))?;
    let mut files = Vec::new();
    if let Some(dir) = out {
        let urls = match status.result() {
            Some(Ok(r)) => r.result_urls,
            Some(Err(e)) => {
                return Err(explain(
                    conn,
                    action(),
                    Error::Protocol {
                        url: conn.url.clone(),
                        reason: format!("resultJson is not valid: {e}"),
                    },
                ))
            }
            None => Vec::new(),
        };
        for url in urls {
            let path = download_with_progress(client, &url, &dir, conn.json)
                .await
                .map_err(|e| explain(conn, Action::Download, e))?;
            files.push(path);
        }
    }
    show_status(conn, &status, &files);
    Ok(())
}

/// What the live progress line shows, updated by the wait callback and read by the ticker.
#[derive(Default)]
struct Line {
    state: Option<TaskState>,
    polls: u32,
    next_at: Option<Instant>,
}

async fn wait_with_progress(
    client: &Client,
    model: &str,
    task_id: &str,
    timeout: Duration,
    poll_immediately: bool,
) -> Result<TaskStatus, Error> {
    let opts = WaitOptions::default()
        .timeout(timeout)
        .poll_immediately(poll_immediately);

    if !std::io::stderr().is_terminal() {
        // Not a terminal: one plain line per state change, nothing that redraws.
        let last = Mutex::new(None::<TaskState>);
        let opts = opts.on_progress(move |p| {
            let Some(state) = p.state else { return };
            if let Ok(mut last) = last.lock() {
                if *last != Some(state) {
                    *last = Some(state);
                    eprintln!("{}: {state} after {}s", p.task_id, p.elapsed.as_secs());
                }
            }
        });
        return client.wait(model, task_id, opts).await;
    }

    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    let line = Arc::new(Mutex::new(Line::default()));

    // The callback fires only at polls; a ticker keeps the "next poll in" countdown moving.
    let ticker = tokio::spawn({
        let (pb, line, task_id) = (pb.clone(), line.clone(), task_id.to_owned());
        async move {
            loop {
                if let Ok(l) = line.lock() {
                    // Before the first poll the task is what every submit makes: pending.
                    let state = l.state.map(TaskState::as_str).unwrap_or("pending");
                    let next = l
                        .next_at
                        .map(|at| at.saturating_duration_since(Instant::now()).as_secs_f64())
                        .map(|s| format!(" · next poll in {s:.0}s"))
                        .unwrap_or_default();
                    pb.set_message(format!("{task_id} {state} · {} polls{next}", l.polls));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let opts = opts.on_progress({
        let line = line.clone();
        move |p| {
            if let Ok(mut l) = line.lock() {
                l.state = p.state;
                l.polls = p.polls;
                l.next_at = p.next_poll.map(|d| Instant::now() + d);
            }
        }
    });
    let result = client.wait(model, task_id, opts).await;
    ticker.abort();
    pb.finish_and_clear();
    result
}

async fn download_with_progress(
    client: &Client,
    url: &str,
    dir: &Path,
    json_mode: bool,
) -> Result<PathBuf, Error> {
    let path = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::hidden();
        let mut shown = false;
        let style = ProgressStyle::with_template(
            "{spinner} {msg} {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        // The file's name, not the signed query string after it.
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        let bar = pb.clone();
        let result = client
            .download_with_progress(url, dir, move |p| {
                if !shown {
                    shown = true;
                    // Only now is the size known; without one the bar is a byte counter.
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    match p.total {
                        Some(total) => {
                            bar.set_length(total);
                            bar.set_style(style.clone());
                        }
                        None => bar.set_style(
                            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        ),
                    }
                    bar.set_message(name.clone());
                }
                bar.set_position(p.downloaded);
            })
            .await;
        pb.finish_and_clear();
        result?
    } else {
        client.download(url, dir).await?
    };
    if !json_mode {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!("saved {} ({})", path.display(), HumanBytes(size));
    }
    Ok(path)
}

fn show_status(conn: &Connection, status: &TaskStatus, files: &[PathBuf]) {
    if conn.json {
        let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
        if !files.is_empty() {
            v["files"] = json!(files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>());
        }
        println!("{v}");
        return;
    }
    println!("task      {}", status.task_id);
    println!("state     {}", status.state);
    // 0 means the server did not say (APIXO leaves createTime out).
    if status.create_time > 0 {
        println!("created   {}", format_millis(status.create_time));
    }
    if let Some(done) = status.complete_time {
        println!("finished  {}", format_millis(done));
    }
    if let Some(ms) = status.cost_time {
        if ms < 1000 {
            println!("took      {ms}ms");
        } else {
            println!("took      {:.1}s", ms as f64 / 1000.0);
        }
    }
    match status.result() {
        Some(Ok(r)) => {
            for url in &r.result_urls {
                println!("result    {url}");
            }
        }
        Some(Err(e)) => println!("result    (unreadable resultJson: {e})"),
        None => {}
    }
    if status.state == TaskState::Failed {
        println!(
            "failure   {}{}",
            status
                .fail_code
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default(),
            status.fail_msg.as_deref().unwrap_or("no reason given")
        );
    }
    for f in files {
        println!("file      {}", f.display());
    }
}

fn format_millis(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

struct ListenState {
    secrets: Vec<Secret>,
    json: bool,
}

async fn listen(conn: &Connection, port: u16, secret: Option<String>) -> Result<(), Failure> {
    let raw: Vec<String> = match secret {
        // The server's secrets always carry the prefix; without it a mistyped value (any word
        // that happens to be base64) would be taken as a key and every delivery "forged".
        Some(s) if !s.trim().starts_with(webhook::SECRET_PREFIX) => {
            return Err(Failure::usage(format!(
                "--secret must be a webhook secret starting with {}, as GET /api/v1/webhookSecret returns it (or leave --secret out to read it from the server)",
                webhook::SECRET_PREFIX
            )))
        }
        Some(s) => vec![s],
        None => {
            let client = connect(conn)?;
            // Refused keys and unreachable servers exit as they do for every other command.
            let data = client
                .webhook_secret()
                .await
                .map_err(|e| explain(conn, Action::WebhookSecret, e))?;
            // During a rotation deliveries may still carry only the previous secret's signature.
            std::iter::once(data.secret)
                .chain(data.previous_secret)
                .collect()
        }
    };
    let secrets = raw
        .iter()
        .map(|s| Secret::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(format!("--secret is not a webhook secret: {e}")))?;

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Failure {
        exit: EXIT_TRANSPORT,
        kind: "io",
        message: format!("cannot read the listening address: {e}"),
        task: None,
    })?;
    eprintln!(
        "listening on http://{addr}/ (any path); submit with --callback http://{addr}/hook. \
         A taskgate server needs --allow-private-callbacks to call a loopback address. Ctrl-C stops."
    );

    let state = Arc::new(ListenState {
        secrets,
        json: conn.json,
    });
    let app = axum::Router::new().fallback(receive).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Failure {
            exit: EXIT_TRANSPORT,
            kind: "io",
            message: format!("the webhook listener stopped: {e}"),
            task: None,
        })
}

async fn receive(
    State(state): State<Arc<ListenState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST only\n".to_owned());
    }
    let signed = SignedHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let verdict = webhook::verify_now(state.secrets.as_slice(), &signed, &body);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let id = signed.id.unwrap_or("-");

    match verdict {
        Ok(()) => {
            if state.json {
                println!(
                    "{}",
                    json!({
                        "valid": true,
                        "path": uri.path(),
                        "webhookId": id,
                        "webhookTimestamp": signed.timestamp,
                        "body": parsed.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned())),
                    })
                );
            } else {
                let summary = parsed
                    .as_ref()
                    .and_then(|v| v.get("data"))
                    .map(|d| {
                        format!(
                            " · task {} {}",
                            d.get("taskId").and_then(Value::as_str).unwrap_or("?"),
                            d.get("state").and_then(Value::as_str).unwrap_or("?")
                        )
                    })
                    .unwrap_or_default();
                let pretty = parsed
                    .as_ref()
                    .and_then(|v| serde_json::to_string_pretty(v).ok())
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                println!(
                    "valid signature · POST {} · {id}{summary}\n{pretty}\n",
                    uri.path()
                );
            }
            (StatusCode::OK, "ok\n".to_owned())
        }
        Err(e) => {
            if state.json {
                println!(
                    "{}",
                    json!({"valid": false, "path": uri.path(), "webhookId": id, "error": e.to_string()})
                );
            } else {
                eprintln!("rejected POST {} · {id}: {e}", uri.path());
            }
            (
                StatusCode::UNAUTHORIZED,
                format!("invalid signature: {e}\n"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    #[test]
    fn the_clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_are_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "taskgate",
            "submit",
            "echo",
            "--prompt",
            "hi",
            "--url",
            "http://h:1",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.conn.url, "http://h:1");
        assert!(cli.conn.json);
        assert!(matches!(cli.cmd, ClientCommand::Submit { ref model, .. } if model == "echo"));
    }

    #[test]
    fn wait_parses_a_human_timeout() {
        let cli = Cli::try_parse_from(["taskgate", "wait", "echo", "task_1", "--timeout", "90s"])
            .unwrap();
        assert!(matches!(
            cli.cmd,
            ClientCommand::Wait { timeout, .. } if timeout == Duration::from_secs(90)
        ));
    }

    #[test]
    fn prompt_is_merged_over_the_input_object() {
        let v = build_input(
            Some(r#"{"mode":"text-to-image","prompt":"old"}"#),
            Some("new".into()),
        )
        .map_err(|f| f.message)
        .unwrap();
        assert_eq!(v, json!({"mode": "text-to-image", "prompt": "new"}));
    }

    #[test]
    fn input_that_is_not_a_json_object_is_a_usage_error() {
        for bad in ["[1,2]", "{not json"] {
            let f = build_input(Some(bad), None).err().unwrap();
            assert_eq!(f.exit, EXIT_USAGE, "{bad}");
        }
        assert_eq!(build_input(None, None).err().unwrap().exit, EXIT_USAGE);
    }
}
