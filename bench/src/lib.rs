//! Shared pieces of the taskgate benchmarks (docs/BENCHMARKS.md says what each one measures):
//! an in-process taskgate server and a trivial axum baseline, both bound to `127.0.0.1:0`, and
//! a load driver that keeps a fixed number of requests in flight.
//!
//! Concurrency model: every server runs on its own multi-threaded tokio runtime with two workers
//! (as many as the benchmark machine has cores), and the load driver runs on another runtime
//! built the same way, so taskgate and the baseline share the machine with their client in the
//! same way and their rates can be compared as a ratio.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use taskgate_server::config::{BackendConfig, BuiltinKind, ModelConfig};
use taskgate_server::Config;
use tokio::runtime::Runtime;

/// The key every benchmark server accepts (registered as `TASKGATE_API_KEY` would be).
pub const API_KEY: &str = "bench-key-0123456789abcdef";

/// The submit body used everywhere, by the criterion benches and by `bench/wrk/submit.lua`.
pub const SUBMIT_BODY: &str = r#"{"input":{"n":1}}"#;

/// Requests kept in flight by the HTTP benchmarks (and `wrk -c64`).
pub const IN_FLIGHT: usize = 64;

/// A runtime like the ones the benchmarks give servers and the client: two workers.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// The baseline: the same two routes as taskgate, answering a fixed APIXO envelope. The submit
/// handler parses the JSON body (as taskgate does) and does nothing else: no auth, no store.
pub fn trivial_router() -> Router {
    Router::new()
        .route("/api/v1/generateTask/{model}", post(trivial_submit))
        .route("/api/v1/statusTask/{model}", get(trivial_status))
}

async fn trivial_submit(Json(body): Json<Value>) -> Json<Value> {
    std::hint::black_box(body);
    Json(json!({
        "code": 200,
        "message": "success",
        "data": {"taskId": "task_01jdbenchbenchbenchbenchbe"}
    }))
}

async fn trivial_status() -> Json<Value> {
    Json(json!({
        "code": 200,
        "message": "success",
        "data": {
            "taskId": "task_01jdbenchbenchbenchbenchbe",
            "state": "pending",
            "createTime": 1_764_370_000_000_i64
        }
    }))
}

/// A builtin `echo` model with `concurrency` slots.
pub fn echo_model(concurrency: usize) -> ModelConfig {
    ModelConfig {
        concurrency,
        timeout: Duration::from_secs(600),
        max_attempts: 3,
        ..ModelConfig::new(BackendConfig::Builtin {
            builtin: BuiltinKind::Echo,
        })
    }
}

/// A server on its own runtime; stopped (and its data dir removed) on drop.
pub struct Server {
    pub addr: SocketAddr,
    rt: Option<Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _data: Option<tempfile::TempDir>,
}

impl Server {
    /// The trivial axum baseline.
    pub fn trivial() -> Server {
        Server::start(|listener, stopped| async move {
            axum::serve(listener, trivial_router())
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("trivial server failed");
        })
    }

    /// taskgate with `models`, on SQLite in a fresh temporary data dir.
    pub fn taskgate(models: BTreeMap<String, ModelConfig>) -> Server {
        let data = tempfile::tempdir().expect("cannot create a temporary data dir");
        let dir = data.path().to_owned();
        let mut server = Server::taskgate_in(dir, models);
        server._data = Some(data);
        server
    }

    /// taskgate with `models` on the SQLite store in `data_dir`, which the caller keeps.
    pub fn taskgate_in(data_dir: PathBuf, models: BTreeMap<String, ModelConfig>) -> Server {
        let mut config = Config::new(data_dir);
        config.bootstrap_api_key = Some(API_KEY.to_owned());
        config.models = models;
        // Limits far above any rate measured, so every request still pays for its counting.
        config.limits.requests_per_minute = 4_000_000_000;
        config.limits.concurrent_tasks = 4_000_000_000;
        // A parked attempt (a long echo delay) must not hold the stop up for 30 s.
        config.server.shutdown_grace = Duration::from_millis(200);
        Server::start(|listener, stopped| async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            taskgate_server::run(config, listener, shutdown)
                .await
                .expect("taskgate server failed");
        })
    }

    /// Binds 127.0.0.1:0 on a runtime of its own and runs `serve` there until stopped.
    fn start<F, Fut>(serve: F) -> Server
    where
        F: FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = rt.spawn(serve(listener, stopped));
        Server {
            addr,
            rt: Some(rt),
            stop: Some(stop),
            done: Some(done),
            _data: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits until it has drained; also done on drop.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(rt), Some(done)) = (self.rt.take(), self.done.take()) {
            let _ = rt.block_on(done);
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A client with enough idle connections for [`IN_FLIGHT`] requests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(4 * IN_FLIGHT)
        .build()
        .expect("cannot build an HTTP client")
}

/// Runs `request(i)` for `i` in `0..total`, keeping `in_flight` of them running, and returns the
/// time it took.
pub async fn drive<F, Fut>(total: u64, in_flight: usize, request: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    futures::stream::iter(0..total)
        .map(request)
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    start.elapsed()
}

/// POSTs [`SUBMIT_BODY`] to `url`; panics unless the answer is a 200 with a body.
pub async fn submit(client: &reqwest::Client, url: &str) -> Value {
    let response = client
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(SUBMIT_BODY)
        .send()
        .await
        .expect("submit failed");
    let status = response.status();
    let body: Value = response.json().await.expect("submit answer is not JSON");
    assert!(status.is_success(), "submit answered {status}: {body}");
    body
}

/// GETs `url` with the key; panics unless the answer is a 200 with a JSON body.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let response = client
        .get(url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET failed");
    let status = response.status();
    let body: Value = response.json().await.expect("answer is not JSON");
    assert!(status.is_success(), "GET {url} answered {status}: {body}");
    body
}

/// The `taskId` of a generateTask answer.
pub fn task_id(created: &Value) -> String {
    created["data"]["taskId"]
        .as_str()
        .expect("generateTask answer has data.taskId")
        .to_owned()
}

/// Polls statusTask until the task is final; returns its state.
pub async fn wait_final(
    client: &reqwest::Client,
    server: &Server,
    model: &str,
    id: &str,
) -> String {
    let url = server.url(&format!("/api/v1/statusTask/{model}?taskId={id}"));
    loop {
        let status = get_json(client, &url).await;
        let state = status["data"]["state"].as_str().unwrap_or_default();
        if state == "success" || state == "failed" {
            return state.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
