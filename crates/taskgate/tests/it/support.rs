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
    (status, body)
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

    /// Starts on an existing data dir (to restart over the same store).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config::new(dir.path());
        config.bootstrap_api_key = Some(API_KEY.to_owned());
        config.retry_backoff = vec![Duration::from_millis(50)];
        config.shutdown_grace = Duration::from_secs(5);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(taskgate_server::run(config, listener, async {
            let _ = rx.await;
        }));
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
}

impl ServerProcess {
    /// Runs `taskgate serve` on port 0 over `data_dir`, with `config` if given; waits for the
    /// "listening on" line and for /healthz.
    pub async fn spawn(data_dir: &Path, config: Option<&Path>) -> ServerProcess {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .env("TASKGATE_API_KEY", API_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let api = Api::new(base);
        wait_healthy(&api).await;
        ServerProcess { api, child }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("taskgate did not exit within 60s of SIGTERM")
            .unwrap()
    }
}
