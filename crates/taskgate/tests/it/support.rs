//! The test app builder: a real server (in-process via `taskgate_server::run`, or the real
//! binary as a child process when a test must kill it), plus helpers to talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use taskgate_server::config::FileConfig;
use taskgate_server::Config;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const API_KEY: &str = "test-key-0123456789abcdef";

/// Talks to a server at `base` with the test key.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Self {
        Api {
            base,
            key: API_KEY.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    /// POST generateTask with a JSON body; returns the status and the parsed envelope.
    pub async fn submit(&self, model: &str, body: Value) -> (StatusCode, Value) {
        self.submit_raw(model, body.to_string().into_bytes()).await
    }

    pub async fn submit_raw(&self, model: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/api/v1/generateTask/{model}", self.base))
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    /// Submits and returns the task id, asserting success.
    pub async fn submit_ok(&self, model: &str, input: Value) -> String {
        let (status, body) = self
            .submit(model, serde_json::json!({ "input": input }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["data"]["taskId"].as_str().unwrap().to_owned()
    }

    pub async fn status(&self, model: &str, task_id: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}/api/v1/statusTask/{model}", self.base))
            .query(&[("taskId", task_id)])
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    /// POST cancelTask; returns the status and the parsed envelope.
    pub async fn cancel(&self, model: &str, task_id: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/api/v1/cancelTask/{model}", self.base))
            .query(&[("taskId", task_id)])
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    /// Polls (every 20 ms) until the task is final or `timeout` passes; returns `data`.
    pub async fn wait_final(&self, model: &str, task_id: &str, timeout: Duration) -> Value {
        self.wait_for(model, task_id, timeout, |d| {
            matches!(d["state"].as_str(), Some("success" | "failed"))
        })
        .await
    }

    /// Polls until `cond` holds for the task's `data`.
    pub async fn wait_for(
        &self,
        model: &str,
        task_id: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.status(model, task_id).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if cond(&body["data"]) {
                return body["data"].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {task_id} did not reach the condition within {timeout:?}; last: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Decodes a response as the envelope, asserting that `code` mirrors the HTTP status.
pub async fn envelope(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {status} {text}"));
    assert_eq!(
        body["code"].as_u64(),
        Some(status.as_u16() as u64),
        "{body}"
    );
    assert!(body["message"].is_string(), "{body}");
    if !status.is_success() {
        // Every refusal names its reason, and the reason's status is the one answered.
        let code = body["data"]["errorCode"]
            .as_str()
            .unwrap_or_else(|| panic!("an error without data.errorCode: {status} {body}"));
        let known = taskgate_proto::ErrorCode::parse(code)
            .unwrap_or_else(|| panic!("an unknown errorCode {code:?}: {body}"));
        assert_eq!(known.status(), status.as_u16(), "{body}");
    }
    (status, body)
}

/// The `data.errorCode` of an error envelope.
pub fn error_code(body: &Value) -> &str {
    body["data"]["errorCode"].as_str().unwrap_or("")
}

/// The result URLs of a successful task's `data`.
pub fn result_urls(data: &Value) -> Vec<String> {
    let rj: Value = serde_json::from_str(data["resultJson"].as_str().unwrap()).unwrap();
    rj["resultUrls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

/// The in-process server's log goes to the test harness's captured output (`RUST_LOG`, default
/// `info`): shown for a test that fails, hidden for one that passes.
fn show_server_logs_on_failure() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A server running in this process.
pub struct TestApp {
    pub api: Api,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _dir: Arc<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), taskgate_server::ServerError>>>,
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    /// Starts with models from a TOML config text (its `[models.*]` tables).
    pub async fn start_with_models(toml: &str) -> TestApp {
        let file = FileConfig::parse(toml).unwrap();
        Self::start_with(move |c| c.models = file.models.unwrap()).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(dir, tweak).await
    }

    /// Starts with a fault-injection store: the returned plan makes chosen store calls fail or
    /// hang (see `taskgate_server::store::faults`).
    pub async fn start_with_faults(
        tweak: impl FnOnce(&mut Config),
    ) -> (TestApp, Arc<taskgate_server::store::faults::FaultPlan>) {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let plan = taskgate_server::store::faults::FaultPlan::new();
        let hooks = faulty_hooks(plan.clone());
        (Self::start_in_with(dir, tweak, hooks).await, plan)
    }

    /// Starts on an existing data dir (to restart over the same store).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::start_in_with(dir, tweak, taskgate_server::Hooks::default()).await
    }

    /// Starts on an existing data dir with `hooks`.
    pub async fn start_in_with(
        dir: Arc<tempfile::TempDir>,
        tweak: impl FnOnce(&mut Config),
        hooks: taskgate_server::Hooks,
    ) -> TestApp {
        show_server_logs_on_failure();
        let mut config = Config::new(dir.path());
        config.bootstrap_api_key = Some(API_KEY.to_owned());
        config.server.retry_backoff =
            taskgate_server::config::Delays(vec![Duration::from_millis(50)]);
        config.server.shutdown_grace = Duration::from_secs(5);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(taskgate_server::run_with(
            config,
            listener,
            async {
                let _ = rx.await;
            },
            hooks,
        ));
        let api = Api::new(format!("http://{addr}"));
        wait_healthy(&api).await;
        TestApp {
            api,
            addr,
            data_dir: dir.path().to_owned(),
            _dir: dir,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A node of a cluster on `db`: a data dir of its own, the shared database, then `tweak`.
    pub async fn node_on(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let url = db.url.clone();
        Self::start_with(move |c| {
            c.server.database_url = Some(taskgate_server::config::DatabaseUrl(url));
            tweak(c);
        })
        .await
    }

    pub fn dir(&self) -> Arc<tempfile::TempDir> {
        self._dir.clone()
    }

    /// Graceful stop, as on SIGTERM; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), taskgate_server::ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Hooks that put every store call of the server through `plan`.
pub fn faulty_hooks(
    plan: Arc<taskgate_server::store::faults::FaultPlan>,
) -> taskgate_server::Hooks {
    taskgate_server::Hooks {
        wrap_store: Some(Arc::new(move |inner| {
            Arc::new(taskgate_server::store::faults::FaultyStore::new(
                inner,
                plan.clone(),
            ))
        })),
        ..Default::default()
    }
}

async fn wait_healthy(api: &Api) {
    for _ in 0..500 {
        if let Ok(r) = api.http.get(format!("{}/healthz", api.base)).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server at {} never became healthy", api.base);
}

/// The real `taskgate` binary as a child process, for tests that kill it.
pub struct ServerProcess {
    pub api: Api,
    pub child: tokio::process::Child,
    /// The server's stderr, shown when it does not exit in time.
    pub log: PathBuf,
}

impl ServerProcess {
    /// Runs `taskgate serve` on port 0 over `data_dir`, with `config` if given; waits for the
    /// "listening on" line and for /healthz.
    pub async fn spawn(data_dir: &Path, config: Option<&Path>) -> ServerProcess {
        Self::spawn_full(data_dir, config, &[], &[]).await
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub async fn terminate(self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit().await
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Waits (up to 60 s) for the process to exit.
    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "taskgate did not exit within 60s of SIGTERM; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers added for the core suite.

impl Api {
    /// A request to `path` (relative to the base) with the key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Submits and waits for the final state; returns `data`.
    pub async fn run_to_end(&self, model: &str, input: Value) -> Value {
        let id = self.submit_ok(model, input).await;
        self.wait_final(model, &id, Duration::from_secs(20)).await
    }
}

/// The absolute path of a script under `tests/scripts`.
pub fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name);
    assert!(path.exists(), "missing test script {}", path.display());
    path.to_string_lossy().into_owned()
}

/// `s` as a TOML basic string (JSON string escapes are valid TOML).
pub fn toml_str(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

/// A `[models.NAME]` table for the command backend running `sh SCRIPT ARGS...`.
pub fn command_model(name: &str, script_name: &str, args: &[&str], extra: &str) -> String {
    let mut argv = vec![toml_str("sh"), toml_str(script(script_name))];
    argv.extend(args.iter().map(toml_str));
    format!(
        "[models.{name}]\nbackend = \"command\"\ncommand = [{}]\n{extra}\n",
        argv.join(", ")
    )
}

/// Asserts that `data` is an object with exactly these keys: optional fields are absent, not null.
pub fn assert_fields(data: &Value, expected: &[&str]) {
    let obj = data
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {data}"));
    let mut got: Vec<&str> = obj.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = expected.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "fields of {data}");
    for (k, v) in obj {
        assert!(!v.is_null(), "field {k} is null in {data}");
    }
}

/// Asserts an error envelope: the status, `data` holding an error code of that status, a message
/// containing every one of `needles` (case-insensitive). Returns the message.
pub fn assert_error(
    status: StatusCode,
    body: &Value,
    want: StatusCode,
    needles: &[&str],
) -> String {
    assert_eq!(status, want, "{body}");
    assert!(
        body.as_object().unwrap().contains_key("data"),
        "no data field: {body}"
    );
    let code = taskgate_proto::ErrorCode::parse(error_code(body))
        .unwrap_or_else(|| panic!("no known data.errorCode: {body}"));
    assert_eq!(code.status(), want.as_u16(), "{body}");
    let message = body["message"].as_str().unwrap().to_owned();
    assert_ne!(message, "success", "{body}");
    for needle in needles {
        assert!(
            message.to_lowercase().contains(&needle.to_lowercase()),
            "message {message:?} does not mention {needle:?}"
        );
    }
    message
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every file under `dir`, at any depth (none when `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Waits until `path` exists and is non-empty; returns its content.
pub async fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let mut content = String::new();
    wait_until(timeout, &format!("file {}", path.display()), || {
        let read = std::fs::read_to_string(path).unwrap_or_default();
        let ready = !read.trim().is_empty();
        content = read;
        async move { ready }
    })
    .await;
    content
}

/// Whether the process `pid` has ended (no longer exists, or is a zombie awaiting its reaper).
pub fn process_is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// The real `taskgate` binary with `args`, inheriting no `TASKGATE_*` variable from whoever runs
/// the tests (a developer's `TASKGATE_DATABASE_URL` or key must not change what a test sees),
/// stdin empty, killed if the test drops it.
pub fn taskgate_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TASKGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Width and height from a PNG's IHDR chunk, checking the signature and chunk type.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.len() > 24,
        "too short for a PNG: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// Runs the real `taskgate` binary with `args` and returns its output.
pub async fn taskgate(args: &[&str]) -> std::process::Output {
    let out = taskgate_command(args).output();
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("taskgate did not exit within 30s")
        .unwrap()
}

/// A key made by `taskgate keys create`.
pub struct CreatedKey {
    pub id: String,
    pub key: String,
    pub stdout: String,
}

/// `taskgate keys create --name NAME [--tenant T] --data-dir DIR`: the key is the last word of
/// the last line, the id the word after "Created key".
pub async fn create_key(data_dir: &Path, name: &str, tenant: Option<&str>) -> CreatedKey {
    let dir = data_dir.to_str().unwrap();
    let mut args = vec!["keys", "create", "--name", name, "--data-dir", dir];
    if let Some(t) = tenant {
        args.extend(["--tenant", t]);
    }
    let out = taskgate(&args).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "keys create failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = last_word(&stdout);
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap_or_else(|| panic!("no key id in {stdout}"))
        .to_owned();
    CreatedKey { id, key, stdout }
}

impl ServerProcess {
    /// Like [`ServerProcess::spawn`], with extra `serve` flags; the child's log goes to
    /// `server.log` in the data dir (kept for debugging a failure).
    pub async fn spawn_with(
        data_dir: &Path,
        config: Option<&Path>,
        extra: &[&str],
    ) -> ServerProcess {
        Self::spawn_full(data_dir, config, extra, &[]).await
    }

    /// Like [`ServerProcess::spawn_with`], with extra environment variables.
    pub async fn spawn_full(
        data_dir: &Path,
        config: Option<&Path>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> ServerProcess {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .unwrap();
        let mut cmd = taskgate_command(&["serve"]);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // The test key first, so that `envs` can replace it.
            .env("TASKGATE_API_KEY", API_KEY)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("taskgate listening on ") {
                    return url.to_owned();
                }
            }
            panic!("taskgate exited before listening");
        })
        .await
        .expect("taskgate did not print its address within 30s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let api = Api::new(base);
        wait_healthy(&api).await;
        ServerProcess {
            api,
            child,
            log: data_dir.join("server.log"),
        }
    }
}

/// Says that a test skipped part of its work, where a person running the suite sees it: written
/// straight to the process's stderr, past the test harness's output capture (which would hide
/// an `eprintln!` of a passing test).
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// `taskgate keys create --worker` against the server's store: returns the token.
pub async fn worker_token(data_dir: &Path, database_url: Option<&str>) -> String {
    let mut args = vec![
        "keys",
        "create",
        "--worker",
        "--name",
        "gpu",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let out = taskgate(&args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = last_word(&stdout);
    assert!(token.starts_with("tgw_"), "{stdout}");
    token
}

/// A database of its own on the test server (`TEST_DATABASE_URL`), dropped by `drop_db`.
/// Without the variable, says visibly that `what` was skipped and returns `None`.
pub struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

pub async fn create_db(what: &str) -> Option<TestDb> {
    let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
        skip(&format!("{what} (set TEST_DATABASE_URL)"));
        return None;
    };
    let name = format!(
        "tg_it_{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let mut url = url::Url::parse(&admin_url).unwrap();
    url.set_path(&name);
    Some(TestDb {
        admin_url,
        name,
        url: url.to_string(),
    })
}

impl TestDb {
    pub async fn drop_db(self) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.admin_url)
            .await
            .unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

/// The last word of the last line: where `keys create` prints the key it made.
fn last_word(stdout: &str) -> String {
    stdout
        .trim_end()
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no key in {stdout:?}"))
        .to_owned()
}

/// A model served by pull workers (`remote`).
pub const WORKER_MODEL: &str = r#"
[models.remote]
backend = "worker"
concurrency = 2
timeout = "30s"
max_attempts = 3
"#;

/// GETs a URL with no API key (result links are meant for browsers): status, content type
/// (empty when absent), declared length, body.
pub async fn fetch_url(url: &str) -> (StatusCode, String, Option<u64>, Vec<u8>) {
    let resp = reqwest::get(url).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let len = resp.content_length();
    (status, ct, len, resp.bytes().await.unwrap().to_vec())
}

/// A result file that must be there: asserts 200 and a content type; returns both parts.
pub async fn fetch_ok(url: &str) -> (String, Vec<u8>) {
    let (status, ct, _, body) = fetch_url(url).await;
    assert_eq!(status, StatusCode::OK, "{url}");
    assert!(!ct.is_empty(), "{url} came without a content type");
    (ct, body)
}

/// A callback receiver on 127.0.0.1:0 that answers 200 and hands each body to the test.
pub async fn callback_receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<axum::body::Bytes>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    async fn hook(
        axum::extract::State(tx): axum::extract::State<
            tokio::sync::mpsc::UnboundedSender<axum::body::Bytes>,
        >,
        body: axum::body::Bytes,
    ) -> &'static str {
        let _ = tx.send(body);
        "ok"
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

// ---------------------------------------------------------------------------------------------
// Listing, batch and keyed submits (taskgate extensions).

impl Api {
    /// GET /api/v1/tasks with these query parameters.
    pub async fn list(&self, query: &[(&str, &str)]) -> (StatusCode, Value) {
        let resp = self
            .request(reqwest::Method::GET, "/api/v1/tasks")
            .query(query)
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    /// Every task id the listing gives with `query` (plus `limit=100`), page after page,
    /// newest first.
    pub async fn list_all_ids(&self, query: &[(&str, &str)]) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            q.push(("limit", "100"));
            if let Some(c) = &cursor {
                q.push(("cursor", c));
            }
            let (status, body) = self.list(&q).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            for t in body["data"]["tasks"].as_array().unwrap() {
                ids.push(t["taskId"].as_str().unwrap().to_owned());
            }
            match body["data"]["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return ids,
            }
        }
    }

    /// POST /api/v1/generateTasks/{model} with a JSON body.
    pub async fn submit_batch(&self, model: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .request(
                reqwest::Method::POST,
                &format!("/api/v1/generateTasks/{model}"),
            )
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }

    /// POST generateTask with an `Idempotency-Key`.
    pub async fn submit_keyed(&self, model: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .request(
                reqwest::Method::POST,
                &format!("/api/v1/generateTask/{model}"),
            )
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        envelope(resp).await
    }
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Value,
}

/// Reads a `text/event-stream` body (`streamTask`) event by event.
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub async fn open(api: &Api, model: &str, task_id: &str, last_event_id: Option<&str>) -> Self {
        let mut req = api
            .http
            .get(format!("{}/api/v1/streamTask/{model}", api.base))
            .query(&[("taskId", task_id)])
            .bearer_auth(&api.key);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` once the server ended the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("no event within the timeout")
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Events until one matches `cond`; returns them all.
    pub async fn until(&mut self, cond: impl Fn(&Value) -> bool) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        loop {
            let ev = self.next().await.expect("the stream ended early");
            let done = cond(&ev.data);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Database outages (cluster and fault tests).

/// A TCP proxy to PostgreSQL that the test can cut and restore.
pub struct Proxy {
    pub port: u16,
    accept: Option<JoinHandle<()>>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Listens on `port` (0: any) and forwards each connection to 127.0.0.1:5432.
    pub async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let h = tokio::spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                    conns.lock().unwrap().push(h);
                }
            })
        };
        Proxy {
            port,
            accept: Some(accept),
            conns,
        }
    }

    /// Refuses new connections and cuts open ones, as a database outage does.
    pub fn cut(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}
