//! Callback delivery against real local receivers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::StatusCode as Status;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::watch;

use crate::support::*;

/// What a receiver does with one request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reply {
    Status(u16),
    /// Never answers (until the test ends).
    Hang,
}

#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

#[derive(Clone)]
struct ReceiverState {
    script: Arc<Mutex<VecDeque<Reply>>>,
    received: Arc<Mutex<Vec<Received>>>,
    count: watch::Sender<usize>,
}

/// A callback receiver on 127.0.0.1:0 that answers by script (then 200) and records requests.
pub(crate) struct Receiver {
    pub(crate) url: String,
    state: ReceiverState,
    count: watch::Receiver<usize>,
}

impl Receiver {
    pub(crate) async fn start(script: Vec<Reply>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, script)
    }

    /// [`Receiver::start`] on a listener the test chose (a port that was closed until now).
    pub(crate) fn start_on(listener: tokio::net::TcpListener, script: Vec<Reply>) -> Receiver {
        let (tx, rx) = watch::channel(0);
        let state = ReceiverState {
            script: Arc::new(Mutex::new(script.into())),
            received: Arc::new(Mutex::new(Vec::new())),
            count: tx,
        };
        async fn hook(
            State(s): State<ReceiverState>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            s.received.lock().unwrap().push(Received { headers, body });
            s.count.send_modify(|c| *c += 1);
            let reply = s
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Reply::Status(200));
            match reply {
                Reply::Status(code) => StatusCode::from_u16(code).unwrap(),
                Reply::Hang => std::future::pending().await,
            }
        }
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(state.clone());
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url,
            state,
            count: rx,
        }
    }

    /// How many requests have arrived so far.
    pub(crate) fn count_now(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until at least `n` requests have arrived; returns them all.
    pub(crate) async fn wait_for(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        tokio::time::timeout(timeout, self.count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("receiver got fewer than {n} requests within {timeout:?}"))
            .unwrap();
        self.state.received.lock().unwrap().clone()
    }
}

pub(crate) fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// The Standard Webhooks algorithm, written out here independently of the server's code.
fn expected_signature(secret: &str, id: &str, ts: &str, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Verifies with the `standardwebhooks` package from PyPI, which no one here wrote. Returns
/// None (and says so) where Python or the package is missing; under CI it must be present.
fn verify_with_standardwebhooks(secret: &str, r: &Received) -> Option<bool> {
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
d = json.load(sys.stdin)
try:
    Webhook(d["secret"]).verify(d["body"].encode(), d["headers"])
    print("VALID")
except Exception as e:
    print("INVALID", e)
"#;
    let input = json!({
        "secret": secret,
        "body": std::str::from_utf8(&r.body).unwrap(),
        "headers": {
            "webhook-id": header(r, "webhook-id"),
            "webhook-timestamp": header(r, "webhook-timestamp"),
            "webhook-signature": header(r, "webhook-signature"),
        }
    });
    let run = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.to_string().as_bytes())?;
            child.wait_with_output()
        });
    let out = match run {
        Ok(o) => o,
        Err(e) => return skipped(&format!("python3 cannot run: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named") {
            return skipped("the Python package standardwebhooks is not installed (pip install standardwebhooks)");
        }
        panic!("standardwebhooks check crashed: {stderr}");
    }
    Some(stdout.trim() == "VALID")
}

fn skipped(why: &str) -> Option<bool> {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the standardwebhooks check, but {why}"
    );
    skip(&format!(
        "verification with the standardwebhooks library: {why}"
    ));
    None
}

pub(crate) async fn start_app(tweak: impl FnOnce(&mut taskgate_server::Config)) -> TestApp {
    TestApp::start_with(|c| {
        c.webhooks.allow_private_callbacks = true;
        c.webhooks.retry_delays =
            taskgate_server::config::Delays(vec![Duration::from_millis(20); 3]);
        tweak(c)
    })
    .await
}

pub(crate) async fn submit_callback(api: &Api, url: &str, input: Value) -> String {
    let (status, body) = api
        .submit(
            "echo",
            json!({ "request_type": "callback", "callback_url": url, "input": input }),
        )
        .await;
    assert_eq!(status, Status::OK, "{body}");
    body["data"]["taskId"].as_str().unwrap().to_owned()
}

pub(crate) async fn deliveries(api: &Api, task_id: &str) -> Vec<Value> {
    let resp = api
        .http
        .get(format!("{}/api/v1/webhookDeliveries", api.base))
        .query(&[("taskId", task_id)])
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, Status::OK, "{body}");
    body["data"]["deliveries"].as_array().unwrap().clone()
}

/// Polls the delivery list until the task's only delivery satisfies `cond`.
pub(crate) async fn wait_delivery(
    api: &Api,
    task_id: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = deliveries(api, task_id).await;
        if let Some(d) = list.first() {
            if cond(d) {
                return d.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery never matched: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn webhook_secret(api: &Api) -> Value {
    let resp = api
        .http
        .get(format!("{}/api/v1/webhookSecret", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, Status::OK, "{body}");
    body["data"].clone()
}

#[tokio::test]
async fn a_callback_carries_the_status_envelope_signed_per_standard_webhooks() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let id = submit_callback(&app.api, &rx.url, json!({ "n": 1 })).await;

    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    let r = &got[0];
    let payload: Value = serde_json::from_slice(&r.body).unwrap();
    let (_, status) = app.api.status("echo", &id).await;
    assert_eq!(
        payload, status,
        "the callback body is the statusTask envelope"
    );
    assert_eq!(payload["data"]["state"], "success");
    assert_eq!(header(r, "content-type"), "application/json");
    assert!(header(r, "user-agent").starts_with("taskgate/"));
    let msg_id = header(r, "webhook-id");
    assert!(msg_id.starts_with("whk_"), "{msg_id}");
    let ts: i64 = header(r, "webhook-timestamp").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - ts).abs() < 60,
        "timestamp {ts} is not about now ({now})"
    );

    let secret = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(secret.starts_with("whsec_"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&secret["whsec_".len()..])
        .unwrap();
    assert!(raw.len() >= 24, "secret has only {} bytes", raw.len());
    assert_eq!(
        header(r, "webhook-signature"),
        expected_signature(&secret, msg_id, &ts.to_string(), &r.body)
    );
    if let Some(valid) = verify_with_standardwebhooks(&secret, r) {
        assert!(valid, "the standardwebhooks library rejected our signature");
    }
    // A signature under another secret does not verify: the check above can fail.
    let other = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    if let Some(valid) = verify_with_standardwebhooks(&other, r) {
        assert!(!valid);
    }
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["attemptLog"][0]["statusCode"], 200);
}

#[tokio::test]
async fn a_failed_task_is_called_back_too() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    submit_callback(&app.api, &rx.url, json!({ "fail": "no luck" })).await;
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    let payload: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(payload["data"]["state"], "failed");
    assert_eq!(payload["data"]["failMsg"], "no luck");
    assert_eq!(payload["code"], 200);
}

#[tokio::test]
async fn a_callback_is_retried_after_errors_with_the_same_webhook_id() {
    let mut rx = Receiver::start(vec![
        Reply::Status(500),
        Reply::Status(503),
        Reply::Status(429),
    ])
    .await;
    let app = start_app(|_| {}).await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    let got = rx.wait_for(4, Duration::from_secs(10)).await;
    let ids: Vec<&str> = got.iter().map(|r| header(r, "webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    let codes: Vec<u64> = d["attemptLog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["statusCode"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![500, 503, 429, 200]);
    assert_eq!(d["attempts"], 4);
}

#[tokio::test]
async fn a_receiver_that_hangs_past_the_timeout_is_retried() {
    let mut rx = Receiver::start(vec![Reply::Hang]).await;
    let app = start_app(|c| c.webhooks.timeout = Duration::from_millis(300)).await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    rx.wait_for(2, Duration::from_secs(10)).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    let first = &d["attemptLog"][0];
    assert!(first.get("statusCode").is_none(), "{first}");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains("no answer within"),
        "{first}"
    );
    assert!(first["latencyMs"].as_i64().unwrap() >= 250, "{first}");
}

#[tokio::test]
async fn a_410_gone_stops_retrying_at_once() {
    let mut rx = Receiver::start(vec![Reply::Status(410)]).await;
    let app = start_app(|_| {}).await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "failed").await;
    assert_eq!(d["attempts"], 1);
    assert!(d.get("nextAttemptTime").is_none(), "{d}");
}

#[tokio::test]
async fn after_the_last_retry_the_delivery_fails_and_the_task_stays_pollable() {
    let mut rx = Receiver::start(vec![Reply::Status(500); 10]).await;
    let app = start_app(|c| {
        c.webhooks.retry_delays =
            taskgate_server::config::Delays(vec![Duration::from_millis(10); 2])
    })
    .await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "failed").await;
    assert_eq!(d["attempts"], 3, "one attempt and two retries: {d}");
    assert_eq!(rx.wait_for(3, Duration::from_secs(1)).await.len(), 3);
    assert!(d["lastError"].as_str().unwrap().contains("500"), "{d}");
    let (status, body) = app.api.status("echo", &id).await;
    assert_eq!(status, Status::OK);
    assert_eq!(body["data"]["state"], "success");
}

#[tokio::test]
async fn a_failed_delivery_can_be_replayed_by_its_tenant_only() {
    let mut rx = Receiver::start(vec![Reply::Status(500); 3]).await;
    let app = start_app(|c| {
        c.webhooks.retry_delays =
            taskgate_server::config::Delays(vec![Duration::from_millis(10); 2])
    })
    .await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "failed").await;
    let delivery_id = d["id"].as_str().unwrap().to_owned();

    // Another tenant sees neither the list nor the delivery.
    let other_key = create_key(&app.data_dir, "someone-else", None).await.key;
    let other = app.api.with_key(&other_key);
    let resp = other
        .http
        .get(format!("{}/api/v1/webhookDeliveries", other.base))
        .query(&[("taskId", &id)])
        .bearer_auth(&other.key)
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(resp).await.0, Status::NOT_FOUND);
    let retry_url = format!(
        "{}/api/v1/webhookDeliveries/{delivery_id}/retry",
        app.api.base
    );
    let resp = other
        .http
        .post(&retry_url)
        .bearer_auth(&other.key)
        .send()
        .await
        .unwrap();
    assert_eq!(envelope(resp).await.0, Status::NOT_FOUND);

    let resp = app
        .api
        .http
        .post(&retry_url)
        .bearer_auth(&app.api.key)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, Status::OK, "{body}");
    let got = rx.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(header(&got[3], "webhook-id"), delivery_id);
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    assert_eq!(d["attempts"], 4);
}

#[tokio::test]
async fn after_a_rotation_callbacks_are_signed_with_both_secrets() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let old = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = app
        .api
        .http
        .post(format!("{}/api/v1/webhookSecret/rotate", app.api.base))
        .bearer_auth(&app.api.key)
        .send()
        .await
        .unwrap();
    let (status, rotated) = envelope(resp).await;
    assert_eq!(status, Status::OK);
    let new = rotated["data"]["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated["data"]["previousSecret"], old.as_str());

    submit_callback(&app.api, &rx.url, json!({})).await;
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    let r = &got[0];
    let sigs: Vec<&str> = header(r, "webhook-signature").split(' ').collect();
    let (id, ts) = (header(r, "webhook-id"), header(r, "webhook-timestamp"));
    assert_eq!(
        sigs,
        vec![
            expected_signature(&new, id, ts, &r.body).as_str(),
            expected_signature(&old, id, ts, &r.body).as_str()
        ]
    );
    for secret in [&new, &old] {
        if let Some(valid) = verify_with_standardwebhooks(secret, r) {
            assert!(valid);
        }
    }
}

#[tokio::test]
async fn a_slow_receiver_does_not_hold_up_another() {
    let mut slow = Receiver::start(vec![Reply::Hang; 8]).await;
    let mut fast = Receiver::start(vec![]).await;
    let app = start_app(|c| {
        c.webhooks.max_per_host = 2;
        c.webhooks.timeout = Duration::from_secs(30);
    })
    .await;
    for _ in 0..4 {
        submit_callback(&app.api, &slow.url, json!({})).await;
    }
    slow.wait_for(2, Duration::from_secs(10)).await;
    let id = submit_callback(&app.api, &fast.url, json!({})).await;
    fast.wait_for(1, Duration::from_secs(10)).await;
    wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    // Only max_per_host requests reached the slow host at once.
    assert_eq!(*slow.count.borrow(), 2);
}

#[tokio::test]
async fn callback_urls_into_private_networks_are_refused_at_submit() {
    let app = TestApp::start().await;
    for url in [
        "http://127.0.0.1/h",
        "http://2130706433/h",
        "http://0x7f.1/h",
        "http://[::ffff:127.0.0.1]/h",
        "http://[::1]/h",
        "http://localhost:8080/h",
        "http://10.0.0.1/h",
        "http://172.16.5.4/h",
        "http://192.168.0.10/h",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/h",
        "http://[fd00::1]/h",
        "http://0.0.0.0/h",
        "http://224.0.0.1/h",
        "http://255.255.255.255/h",
        "ftp://example.com/h",
        "not a url",
    ] {
        let (status, body) = app
            .api
            .submit(
                "echo",
                json!({ "request_type": "callback", "callback_url": url, "input": {} }),
            )
            .await;
        assert_eq!(status, Status::BAD_REQUEST, "{url}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("callback_url"),
            "{body}"
        );
    }
    let (status, _) = app
        .api
        .submit(
            "echo",
            json!({ "request_type": "callback", "callback_url": "https://example.com/h", "input": {} }),
        )
        .await;
    assert_eq!(status, Status::OK);
}

/// A name other than localhost that /etc/hosts maps to a loopback address, if any.
pub(crate) fn loopback_alias() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut parts = line.split('#').next()?.split_whitespace();
        let ip: std::net::IpAddr = parts.next()?.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        parts
            .find(|n| !n.contains("localhost") && !n.starts_with("ip6-"))
            .map(str::to_owned)
    })
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_at_delivery() {
    let Some(alias) = loopback_alias() else {
        skip("no loopback alias in /etc/hosts to test DNS-time refusal with");
        return;
    };
    let rx = Receiver::start(vec![]).await;
    let port = rx.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("http://{alias}:{port}");
    let app = TestApp::start_with(|c| {
        c.webhooks.retry_delays = taskgate_server::config::Delays(vec![Duration::from_millis(10)])
    })
    .await;
    let id = submit_callback(&app.api, &url, json!({})).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "failed").await;
    assert!(
        d["lastError"]
            .as_str()
            .unwrap()
            .contains("not a public address"),
        "{d}"
    );
    assert_eq!(*rx.count.borrow(), 0, "the receiver must never be reached");
}

#[tokio::test]
async fn a_delivery_cut_short_by_kill_9_is_sent_after_restart() {
    let mut rx = Receiver::start(vec![Reply::Hang]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskgate.toml");
    std::fs::write(
        &config,
        "[webhooks]\nallow_private_callbacks = true\nretry_delays = [\"50ms\"]\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(&data, Some(&config)).await;
    let id = submit_callback(&server.api, &rx.url, json!({})).await;
    let first = rx.wait_for(1, Duration::from_secs(10)).await;
    let msg_id = header(&first[0], "webhook-id").to_owned();
    server.kill9().await;

    let server = ServerProcess::spawn(&data, Some(&config)).await;
    let got = rx.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(
        header(&got[1], "webhook-id"),
        msg_id,
        "same delivery, same id"
    );
    let d = wait_delivery(&server.api, &id, |d| d["state"] == "succeeded").await;
    assert_eq!(d["id"], msg_id.as_str());
    server.terminate().await;
}

/// A receiver that holds every request until the test opens its gate, then answers 200; it
/// records the `webhook-id` of each request.
struct GatedReceiver {
    url: String,
    ids: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    gate: watch::Sender<bool>,
}

impl GatedReceiver {
    async fn start() -> GatedReceiver {
        #[derive(Clone)]
        struct S {
            ids: Arc<Mutex<Vec<String>>>,
            count: Arc<watch::Sender<usize>>,
            gate: watch::Receiver<bool>,
        }
        async fn hook(State(mut s): State<S>, headers: HeaderMap) -> StatusCode {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            s.ids.lock().unwrap().push(id);
            s.count.send_modify(|c| *c += 1);
            let _ = s.gate.wait_for(|open| *open).await;
            StatusCode::OK
        }
        let (count_tx, count) = watch::channel(0);
        let (gate, gate_rx) = watch::channel(false);
        let ids = Arc::new(Mutex::new(Vec::new()));
        let state = S {
            ids: ids.clone(),
            count: Arc::new(count_tx),
            gate: gate_rx,
        };
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        GatedReceiver {
            url,
            ids,
            count,
            gate,
        }
    }
}

/// Opens the server's SQLite file and counts, with a trigger inside the database, every UPDATE
/// of a delivery row from now on: each claim, deferral and recorded attempt is one.
async fn count_delivery_writes(data_dir: &std::path::Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data_dir.join("taskgate.db"))
        .busy_timeout(Duration::from_secs(10));
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    for sql in [
        "CREATE TABLE test_delivery_writes (n INTEGER NOT NULL)",
        "INSERT INTO test_delivery_writes (n) VALUES (0)",
        "CREATE TRIGGER test_count_delivery_writes AFTER UPDATE ON webhook_deliveries \
         BEGIN UPDATE test_delivery_writes SET n = n + 1; END",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    db
}

async fn delivery_writes(db: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT n FROM test_delivery_writes")
        .fetch_one(db)
        .await
        .unwrap()
}

async fn deliveries_in_state(db: &sqlx::SqlitePool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = ?")
        .bind(state)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_backlog_to_one_slow_host_costs_writes_per_attempt_not_per_wait() {
    let mut rx = GatedReceiver::start().await;
    let app = start_app(|c| {
        c.webhooks.max_per_host = 1;
        c.webhooks.timeout = Duration::from_secs(60);
    })
    .await;
    let db = count_delivery_writes(&app.data_dir).await;
    const N: i64 = 50;
    for i in 0..N {
        submit_callback(&app.api, &rx.url, json!({ "n": i })).await;
    }
    tokio::time::timeout(Duration::from_secs(10), rx.count.wait_for(|c| *c >= 1))
        .await
        .unwrap()
        .unwrap();
    wait_until(Duration::from_secs(10), "every task's delivery", || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhook_deliveries")
                .fetch_one(&db)
                .await
                .unwrap()
                == N
        }
    })
    .await;

    // The measurement window: the host holds its one request, so nothing can be sent. Waiting
    // should cost no writes; before the fix every due row was rewritten twice a second.
    let before = delivery_writes(&db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during_wait = delivery_writes(&db).await - before;
    assert_eq!(*rx.count.borrow(), 1, "max_per_host = 1 holds");
    assert!(
        during_wait <= 4,
        "{during_wait} delivery writes while the only host was busy for 2s"
    );

    rx.gate.send_replace(true);
    wait_until(Duration::from_secs(60), "every delivery to succeed", || {
        let db = db.clone();
        async move { deliveries_in_state(&db, "succeeded").await == N }
    })
    .await;
    let ids = rx.ids.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len() as i64, N, "each callback arrives exactly once");
    assert_eq!(distinct.len() as i64, N);
    // A claim and a recorded attempt per delivery, and a little slack for deferrals in races.
    let total = delivery_writes(&db).await;
    assert!(
        total <= 2 * N + 10,
        "{total} delivery writes for {N} attempts"
    );
}

async fn post_retry(api: &Api, delivery_id: &str) -> (Status, Value, Option<String>) {
    let resp = api
        .http
        .post(format!(
            "{}/api/v1/webhookDeliveries/{delivery_id}/retry",
            api.base
        ))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = envelope(resp).await;
    (status, body, retry_after)
}

#[tokio::test]
async fn a_manual_retry_within_ten_seconds_of_the_last_gets_429_even_after_a_restart() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let id = submit_callback(&app.api, &rx.url, json!({})).await;
    let d = wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;
    let delivery_id = d["id"].as_str().unwrap().to_owned();

    let (status, body, _) = post_retry(&app.api, &delivery_id).await;
    assert_eq!(status, Status::OK, "{body}");
    rx.wait_for(2, Duration::from_secs(10)).await;
    wait_delivery(&app.api, &id, |d| d["state"] == "succeeded").await;

    let (status, body, retry_after) = post_retry(&app.api, &delivery_id).await;
    assert_error(
        status,
        &body,
        Status::TOO_MANY_REQUESTS,
        &["retried", "seconds"],
    );
    let secs: u64 = retry_after.expect("a Retry-After header").parse().unwrap();
    assert!((1..=10).contains(&secs), "Retry-After: {secs}");

    // The last retry time is in the store, so another node (here: the next start) knows it.
    let dir = app.dir();
    app.stop().await.unwrap();
    let app = TestApp::start_in(dir, |c| c.webhooks.allow_private_callbacks = true).await;
    let (status, body, _) = post_retry(&app.api, &delivery_id).await;
    assert_eq!(status, Status::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(*rx.count.borrow(), 2, "the refused retries sent nothing");
}

async fn rotate(api: &Api) -> (Status, Value) {
    let resp = api
        .http
        .post(format!("{}/api/v1/webhookSecret/rotate", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    envelope(resp).await
}

#[tokio::test]
async fn a_second_rotation_during_the_overlap_is_refused_and_keeps_the_previous_secret_signing() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let first = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = rotate(&app.api).await;
    assert_eq!(status, Status::OK, "{body}");
    let second = body["data"]["secret"].as_str().unwrap().to_owned();

    let (status, body) = rotate(&app.api).await;
    assert_error(
        status,
        &body,
        Status::CONFLICT,
        &["previous secret", "until"],
    );
    let now = webhook_secret(&app.api).await;
    assert_eq!(now["secret"], second.as_str());
    assert_eq!(now["previousSecret"], first.as_str(), "{now}");

    submit_callback(&app.api, &rx.url, json!({})).await;
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    let r = &got[0];
    let (id, ts) = (header(r, "webhook-id"), header(r, "webhook-timestamp"));
    let sigs: Vec<&str> = header(r, "webhook-signature").split(' ').collect();
    assert_eq!(
        sigs,
        vec![
            expected_signature(&second, id, ts, &r.body).as_str(),
            expected_signature(&first, id, ts, &r.body).as_str()
        ]
    );
}

#[tokio::test]
async fn once_the_overlap_has_ended_the_secret_can_be_rotated_again() {
    let app = start_app(|c| c.webhooks.secret_overlap = Duration::from_millis(300)).await;
    let (status, body) = rotate(&app.api).await;
    assert_eq!(status, Status::OK, "{body}");
    let second = body["data"]["secret"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(10), "a second rotation", || {
        let api = app.api.clone();
        async move { rotate(&api).await.0 == Status::OK }
    })
    .await;
    let now = webhook_secret(&app.api).await;
    assert_ne!(now["secret"], second.as_str());
    assert_eq!(now["previousSecret"], second.as_str(), "{now}");
}
