//! A scripted fake of an APIXO-compatible server on 127.0.0.1:0.
//!
//! Each route family (submit, status, worker, files) has a queue of replies; a request takes the next
//! reply, and the last one repeats forever, so "503 then success" is `[503, ok]`. Every request is
//! recorded so tests can count attempts and inspect headers without sleeping.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{json, Value};
use taskgate_client::{Client, RetryPolicy, WorkerClient};

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    /// A success envelope around `data`.
    pub fn ok(data: Value) -> Self {
        Self::json(
            200,
            json!({"code": 200, "message": "success", "data": data}),
        )
    }

    /// An error envelope, `code` equal to the HTTP status as APIXO does.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(
            status,
            json!({"code": status, "message": message, "data": null}),
        )
    }

    pub fn bytes(status: u16, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            headers: vec![("content-type", "application/octet-stream".into())],
            body: body.into(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A status envelope for `task_1` in `state`.
    pub fn state(state: &str) -> Self {
        Self::ok(json!({"taskId": "task_1", "state": state, "createTime": 1}))
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub content_length: Option<u64>,
    pub body: Bytes,
}

#[derive(Default)]
struct Script {
    submit: VecDeque<Reply>,
    status: VecDeque<Reply>,
    worker: VecDeque<Reply>,
    files: VecDeque<Reply>,
}

#[derive(Clone)]
pub struct FakeServer {
    pub base: String,
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeServer {
    pub async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (script.clone(), requests.clone());
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (s, r) = (s.clone(), r.clone());
                async move { handle(s, r, method, uri, headers, body) }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeServer {
            base: format!("http://{addr}"),
            script,
            requests,
        }
    }

    pub fn on_submit(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.script.lock().unwrap().submit.extend(replies);
        self
    }

    pub fn on_status(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.script.lock().unwrap().status.extend(replies);
        self
    }

    /// Replies to the pull-worker API (`/api/v1/worker/…`).
    pub fn on_worker(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.script.lock().unwrap().worker.extend(replies);
        self
    }

    pub fn on_files(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.script.lock().unwrap().files.extend(replies);
        self
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// A client with tiny retry delays, so tests exercise the retry loop quickly.
    pub fn client(&self) -> Client {
        Client::builder(&self.base)
            .api_key("tg_test_key")
            .retry(fast_retry())
            .build()
            .unwrap()
    }

    /// A worker client with tiny retry delays.
    pub fn worker(&self) -> WorkerClient {
        WorkerClient::builder(&self.base, "tgw_test_token")
            .retry(fast_retry())
            .build()
            .unwrap()
    }
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_retry_after: Duration::from_secs(5),
    }
}

fn handle(
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    requests.lock().unwrap().push(Recorded {
        method,
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        content_length: headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        body,
    });
    let reply = {
        let mut s = script.lock().unwrap();
        let queue = if path.starts_with("/api/v1/generateTask/") {
            &mut s.submit
        } else if path.starts_with("/api/v1/statusTask/") {
            &mut s.status
        } else if path.starts_with("/api/v1/worker/") {
            &mut s.worker
        } else {
            &mut s.files
        };
        if queue.len() > 1 {
            queue.pop_front()
        } else {
            queue.front().cloned()
        }
    };
    let reply = reply.unwrap_or_else(|| Reply::error(404, "nothing scripted for this path"));
    let mut builder = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
    for (name, value) in reply.headers {
        builder = builder.header(name, value);
    }
    builder.body(Body::from(reply.body)).unwrap()
}
