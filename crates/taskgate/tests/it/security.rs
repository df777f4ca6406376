//! One test per security promise (issue 14): keys are stored hashed; a tenant reaches none of
//! another's work on any route; no request reaches into the operator's network, neither at
//! submit nor later; no secret reaches the log. Signed result URLs (`signed_urls.rs`) and per-key
//! limits (`limits.rs`) are proven where they are built.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::limits::{call, client_operations};
use crate::support::*;
use crate::webhooks::{deliveries, loopback_alias, webhook_secret, Receiver, Reply};

/// Every byte the server keeps on disk under `dir` (the database, its WAL, files).
fn bytes_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read(&p).unwrap_or_default(),
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn keys_and_worker_tokens_are_stored_only_as_their_hashes() {
    let app = TestApp::start().await;
    let client = create_key(&app.data_dir, "tenant-b", None).await;
    let worker = worker_token(&app.data_dir, None).await;
    // Each key works, so what is stored is enough to recognise it.
    let (status, body) = app.api.with_key(&client.key).list(&[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = app.api.list(&[]).await;
    assert_eq!(status, StatusCode::OK);
    // Past authentication, the token is refused only for the model it named.
    let claim = app
        .api
        .with_key(&worker)
        .request(reqwest::Method::POST, "/api/v1/worker/claim")
        .json(&json!({"models": ["echo"]}))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(claim).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "model_not_for_workers", "{body}");

    let files = bytes_under(&app.data_dir);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.ends_with(".db") || p.contains("sqlite")),
        "no database file under {}: {:?}",
        app.data_dir.display(),
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    // A generated key shows its first ten characters in listings (over 200 random bits stay
    // unknown); the operator's own key, which may be short, shows none of itself.
    let needles = [
        API_KEY.to_owned(),
        API_KEY[..10].to_owned(),
        client.key.clone(),
        client.key[10..].to_owned(),
        worker.clone(),
        worker[10..].to_owned(),
    ];
    let keys = [API_KEY, client.key.as_str(), worker.as_str()];
    let hashes: Vec<String> = keys
        .iter()
        .map(|k| hex(&taskgate_server::auth::hash_key(k)))
        .collect();
    let mut found_hashes = vec![false; hashes.len()];
    for (path, bytes) in &files {
        for needle in &needles {
            assert!(!contains(bytes, needle), "{path} holds {needle:?}");
        }
        for (i, h) in hashes.iter().enumerate() {
            let raw = taskgate_server::auth::hash_key(keys[i]);
            if bytes.windows(32).any(|w| w == raw) || contains(bytes, h) {
                found_hashes[i] = true;
            }
        }
    }
    // The lookup is by hash: each key's SHA-256 is what was stored.
    assert_eq!(found_hashes, vec![true; hashes.len()], "{hashes:?}");
}

/// A response's body as text; of an event stream (which never ends), what arrives within a
/// second.
async fn body_text(mut resp: reqwest::Response) -> String {
    let stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !stream {
        return resp.text().await.unwrap();
    }
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, resp.chunk()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test]
async fn another_tenant_reaches_none_of_a_tenants_tasks_deliveries_or_secrets_on_any_route() {
    let rx = Receiver::start(vec![]).await;
    let app = crate::webhooks::start_app(|_| {}).await;
    let marker = "tenant-a-private-input-7f3e";
    // Tenant A (the bootstrap key's): a finished task with outputs and a delivered callback.
    let (status, body) = app
        .api
        .submit(
            "echo",
            json!({"request_type": "callback", "callback_url": rx.url, "input": {"note": marker}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = body["data"]["taskId"].as_str().unwrap().to_owned();
    let data = app
        .api
        .wait_final("echo", &task, Duration::from_secs(10))
        .await;
    let outputs = result_urls(&data);
    assert!(!outputs.is_empty(), "{data}");
    let found = Arc::new(std::sync::Mutex::new(None::<String>));
    wait_until(Duration::from_secs(10), "tenant A's delivery", || {
        let (api, task, found) = (app.api.clone(), task.clone(), found.clone());
        async move {
            let list = deliveries(&api, &task).await;
            let id = list
                .first()
                .and_then(|d| d["id"].as_str())
                .map(str::to_owned);
            let ok = id.is_some();
            *found.lock().unwrap() = id;
            ok
        }
    })
    .await;
    let delivery = found.lock().unwrap().clone().unwrap();
    let secret = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // Tenant B: a key of a tenant of its own, with a task of its own.
    let b = create_key(&app.data_dir, "tenant-b", None).await;
    let b_api = app.api.with_key(&b.key);
    b_api.run_to_end("echo", json!({})).await;

    // Nothing of A's may appear in what B is answered; a refusal may repeat the id B named.
    let private = [marker.to_owned(), delivery.clone(), secret.clone()];
    let ops = client_operations(&app, &task).await;
    assert!(ops.len() >= 15, "{ops:?}");
    let mut refused = 0;
    for (method, path) in &ops {
        let path = path.replace("whd_none", &delivery);
        let resp = call(&b_api, method, &path).await;
        let status = resp.status();
        let text = body_text(resp).await;
        assert!(
            !status.is_server_error(),
            "{method} {path}: {status} {text}"
        );
        for p in private.iter().filter(|p| !path.contains(p.as_str())) {
            assert!(
                !text.contains(p.as_str()),
                "{method} {path} shows {p:?}: {text}"
            );
        }
        for url in &outputs {
            let file = url.split('?').next().unwrap();
            assert!(!text.contains(file), "{method} {path} shows {file}: {text}");
        }
        let names_a = path.contains(&task) || path.contains(&delivery);
        if names_a && !path.contains("webhookDeliveries?") {
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
            assert_eq!(body["data"].as_object().unwrap().len(), 1, "{body}");
            refused += 1;
        } else if status.is_success() {
            assert!(
                !text.contains(&task),
                "{method} {path} shows A's task: {text}"
            );
        }
    }
    assert!(refused >= 4, "{refused} routes named A's task or delivery");
    // B's refused cancel and re-send changed nothing of A's.
    let (status, body) = app.api.status("echo", &task).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "success");
    assert_eq!(deliveries(&app.api, &task).await.len(), 1);
}

/// Every way of writing an address in the operator's network (hosts for `http://HOST/…`):
/// loopback in each notation, the unspecified and metadata addresses, the private and
/// carrier-grade NAT ranges, unique and link-local IPv6, and the IPv6 transition forms that
/// carry an IPv4 address or reach one through a relay.
const PRIVATE_HOSTS: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "api.localhost",
    "LOCALHOST.",
    "0.0.0.0",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "2130706433",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f.1",
    "127.1",
    "169.254.169.254",
    "[fd00::1]",
    "[fe80::1]",
    "10.0.0.1",
    "10.255.255.254",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "[2002:7f00:1::]",
    "[2002:a00:1::1]",
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
    "[64:ff9b::7f00:1]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::a00:1]",
    "[::ffff:0:7f00:1]",
];

#[tokio::test]
async fn a_callback_url_in_any_private_form_is_refused_at_submit_with_callback_url_refused() {
    let app = TestApp::start().await;
    for host in PRIVATE_HOSTS {
        let url = format!("http://{host}:8080/hook");
        let (status, body) = app
            .api
            .submit(
                "echo",
                json!({"request_type": "callback", "callback_url": url, "input": {}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert_eq!(error_code(&body), "callback_url_refused", "{url}: {body}");
        // A batch takes the same check.
        let (status, body) = app
            .api
            .submit_batch(
                "echo",
                json!({"tasks": [{"request_type": "callback", "callback_url": url, "input": {}}]}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
    }
    let (status, body) = app.api.list(&[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["tasks"], json!([]), "nothing was accepted");
}

/// A receiver that answers every callback with `307 Location: to`, counting them.
async fn redirecting_receiver(to: String) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State((to, hits)): State<(String, Arc<AtomicUsize>)>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    (AxumStatus::TEMPORARY_REDIRECT, [("location", to)]).into_response()
                },
            ),
        )
        .with_state((to, hits.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hits)
}

#[tokio::test]
async fn a_receiver_that_redirects_a_callback_elsewhere_is_not_followed() {
    // The redirect's target is a receiver that would answer 200: were it followed, the delivery
    // would succeed. Private callbacks are allowed here only because both receivers are local;
    // the redirect is refused whatever the address.
    let inner = Receiver::start(vec![]).await;
    let (outer, hits) = redirecting_receiver(inner.url.clone()).await;
    let app = crate::webhooks::start_app(|_| {}).await;
    let (status, body) = app
        .api
        .submit(
            "echo",
            json!({"request_type": "callback", "callback_url": outer, "input": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = body["data"]["taskId"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(15), "the delivery to give up", || {
        let (api, task) = (app.api.clone(), task.clone());
        async move {
            let list = deliveries(&api, &task).await;
            list.first().is_some_and(|d| d["state"] == "failed")
        }
    })
    .await;
    let d = deliveries(&app.api, &task).await.remove(0);
    assert!(d["lastError"].as_str().unwrap().contains("307"), "{d}");
    assert!(hits.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        inner.count_now(),
        0,
        "the redirect's target must never be reached"
    );
}

/// An upstream model server for the `http` backend that answers with the output URLs the task
/// asked for (`input.urls`), so that a tenant's text is what names them; `/media/a.png` (its
/// requests counted by Host) and `/redirect?to=URL` are what those URLs may reach.
#[derive(Clone, Default)]
struct NamingUpstream {
    media_hosts: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn start_naming_upstream() -> (NamingUpstream, String) {
    let up = NamingUpstream::default();
    async fn model(Json(input): Json<Value>) -> Json<Value> {
        Json(json!({"output": {"urls": input["urls"]}}))
    }
    async fn media(State(up): State<NamingUpstream>, headers: HeaderMap) -> Response {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        up.media_hosts.lock().unwrap().push(host.to_owned());
        (
            [("content-type", "image/png")],
            b"\x89PNG\r\n\x1a\nbytes".as_slice(),
        )
            .into_response()
    }
    async fn redirect(Query(q): Query<std::collections::HashMap<String, String>>) -> Response {
        (AxumStatus::FOUND, [("location", q["to"].clone())]).into_response()
    }
    let app = Router::new()
        .route("/model", post(model))
        .route("/media/a.png", get(media))
        .route("/redirect", get(redirect))
        .with_state(up.clone());
    // On every address, so that 127.0.0.2 (another origin, the same socket) reaches it too.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, format!("http://127.0.0.1:{port}"))
}

/// The `http` model `fetch` on the naming upstream.
fn fetch_model(base: &str) -> String {
    format!(
        "[models.fetch]\nbackend = \"http\"\nurl = {}\nresponse = \"json\"\nurl_pointers = [\"/output/urls\"]\n",
        toml_str(format!("{base}/model"))
    )
}

#[tokio::test]
async fn output_urls_an_upstream_names_in_any_private_form_are_refused() {
    let (up, base) = start_naming_upstream().await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let app = TestApp::start_with_models(&fetch_model(&base)).await;
    // The upstream's port on other hosts: another origin than the trusted one, and each reaches
    // the upstream's own socket if the guard lets it through.
    let mut hosts: Vec<String> = PRIVATE_HOSTS
        .iter()
        .filter(|h| {
            ![
                "127.0.0.1",
                "127.1",
                "2130706433",
                "0177.0.0.1",
                "0x7f.0.0.1",
                "0x7f.1",
            ]
            .contains(h)
        })
        .map(|h| h.to_string())
        .collect();
    hosts.push("127.0.0.2".into());
    hosts.extend(loopback_alias());
    let mut ids = Vec::new();
    for host in &hosts {
        let url = format!("http://{host}:{port}/media/a.png");
        ids.push((
            url.clone(),
            app.api.submit_ok("fetch", json!({"urls": [url]})).await,
        ));
    }
    // The forms that spell the trusted origin's own address (127.0.0.1) on another port.
    for host in ["127.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1"] {
        let url = format!("http://{host}:1/media/a.png");
        ids.push((
            url.clone(),
            app.api.submit_ok("fetch", json!({"urls": [url]})).await,
        ));
    }
    for (url, id) in &ids {
        let data = app
            .api
            .wait_final("fetch", id, Duration::from_secs(20))
            .await;
        assert_eq!(data["state"], "failed", "{url}: {data}");
        assert_eq!(data["failCode"], "GENERATION_FAILED", "{url}: {data}");
        // Refused for good, at submit's check or at resolution: not retried as if the network
        // had failed.
        let msg = data["failMsg"].as_str().unwrap();
        assert!(
            msg.contains("refused")
                && (msg.contains("not a public address") || msg.contains("localhost")),
            "{url}: {msg}"
        );
    }
    assert_eq!(
        *up.media_hosts.lock().unwrap(),
        Vec::<String>::new(),
        "no refused URL may reach the upstream's socket"
    );
}

#[tokio::test]
async fn an_output_url_on_the_upstreams_origin_that_redirects_elsewhere_is_not_followed() {
    let (up, base) = start_naming_upstream().await;
    let port = base.rsplit(':').next().unwrap().to_owned();
    let app = TestApp::start_with_models(&fetch_model(&base)).await;
    // On the trusted origin, the file itself is fetched: the upstream is the operator's choice.
    let own = format!("{base}/media/a.png");
    let data = app.api.run_to_end("fetch", json!({"urls": [own]})).await;
    assert_eq!(data["state"], "success", "{data}");
    // A redirect from there to another origin (a private address here, as a tenant-chosen
    // answer could name) leaves the trusted origin: it is not followed.
    for target in [
        format!("http://127.0.0.2:{port}/media/a.png"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        let via = format!("{base}/redirect?to={target}");
        let data = app.api.run_to_end("fetch", json!({"urls": [via]})).await;
        assert_eq!(data["state"], "failed", "{target}: {data}");
        assert!(
            data["failMsg"].as_str().unwrap().contains("302"),
            "{target}: {data}"
        );
    }
    let hosts = up.media_hosts.lock().unwrap().clone();
    assert_eq!(
        hosts,
        vec![format!("127.0.0.1:{port}")],
        "only the trusted fetch arrived"
    );
}

/// The real binary's log (`server.log`, stderr in the JSON format) after `RUST_LOG=trace`.
/// Each line must be JSON (so that a log shipper can parse it) and hold none of `secrets`.
fn assert_log_free_of(log: &str, what: &str, secrets: &[(&str, String)]) {
    // Below info, or the filter was not what the test set and the check proves nothing.
    assert!(
        log.contains("\"level\":\"TRACE\"") || log.contains("\"level\":\"DEBUG\""),
        "{what}: a log without debug or trace lines:\n{log}"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "{what}: a line that is not JSON: {line}"
        );
    }
    for (name, secret) in secrets {
        if let Some(line) = log.lines().find(|l| l.contains(secret.as_str())) {
            panic!("{what}: the {name} appears in the log: {line}");
        }
    }
}

#[tokio::test]
async fn no_key_token_password_or_secret_reaches_the_log_even_at_trace() {
    const BOOT: &str = "boot-key-secret-0a1b2c3d4e5f";
    const UPSTREAM_KEY: &str = "upstream-key-secret-9z8y7x6w";
    const HTTP_SECRET: &str = "http-header-secret-5v4u3t2s";
    const METRICS: &str = "metrics-token-secret-1r0q9p8o7n";
    const CB_PASSWORD: &str = "cb-password-secret-6m5l4k";
    const CB_TOKEN: &str = "cb-query-secret-3j2i1h";
    const WRONG_KEY: &str = "tg_wrong-key-secret-0g9f8e7d6c5b4a3210zyxwvutsrq";
    let upstream = TestApp::start_with(|c| c.bootstrap_api_key = Some(UPSTREAM_KEY.into())).await;
    let (_naming, naming_base) = start_naming_upstream().await;
    let mut rx = Receiver::start(vec![Reply::Status(500)]).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("taskgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmetrics_token = {}\n[webhooks]\nallow_private_callbacks = true\nretry_delays = [\"50ms\"]\n\
             [models.up]\nbackend = \"http\"\nurl = {}\nresponse = \"json\"\nurl_pointers = [\"/output/urls\"]\nheaders = {{ \"X-Api-Key\" = {} }}\n\
             [models.fwd]\nbackend = \"apixo\"\nurl = {}\nmodel = \"echo\"\napi_key_env = \"SEC_UPSTREAM_KEY\"\nfirst_poll = \"50ms\"\nmax_poll = \"100ms\"\n\
             [models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n\
             [models.broken]\nbackend = \"command\"\ncommand = [\"sh\", \"-c\", \"echo failing >&2; exit 3\"]\nmax_attempts = 1\n{WORKER_MODEL}",
            toml_str(METRICS),
            toml_str(format!("{naming_base}/model")),
            toml_str(HTTP_SECRET),
            toml_str(&upstream.api.base),
        ),
    )
    .unwrap();
    let envs = [
        ("RUST_LOG", "trace"),
        ("TASKGATE_API_KEY", BOOT),
        ("SEC_UPSTREAM_KEY", UPSTREAM_KEY),
    ];
    let server =
        ServerProcess::spawn_full(&data, Some(&config), &["--log-format", "json"], &envs).await;
    let api = server.api.with_key(BOOT);
    let client = create_key(&data, "tenant-b", None).await;
    let token = worker_token(&data, None).await;
    let worker_log = dir.path().join("worker.log");
    let mut worker = taskgate_command(&[
        "worker",
        "--server",
        &api.base,
        "--model",
        "remote",
        "--log-format",
        "json",
        "--",
        "sh",
        "-c",
        "echo done > \"$TASKGATE_OUTPUT_DIR/out.txt\"",
    ])
    .env("TASKGATE_WORKER_TOKEN", &token)
    .env("RUST_LOG", "trace")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&worker_log).unwrap())
    .spawn()
    .unwrap();

    // Callbacks with a secret in the query (first answered 500, so retried) and in the
    // user-info; every kind of backend; a failure; a refused key; the metrics token.
    let (status, body) = api
        .submit(
            "echo",
            json!({"request_type": "callback", "callback_url": format!("{}?token={CB_TOKEN}", rx.url), "input": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let called_back = body["data"]["taskId"].as_str().unwrap().to_owned();
    let with_user = rx
        .url
        .replace("http://", &format!("http://cbuser:{CB_PASSWORD}@"));
    let (status, body) = api
        .submit(
            "echo",
            json!({"request_type": "callback", "callback_url": with_user, "input": {}}),
        )
        .await;
    // Allowed (docs/api.md, callback_url_refused): its password must still stay out of logs.
    assert_eq!(status, StatusCode::OK, "{body}");
    let fetched = api
        .run_to_end(
            "up",
            json!({"urls": [format!("{naming_base}/media/a.png")]}),
        )
        .await;
    assert_eq!(fetched["state"], "success", "{fetched}");
    let forwarded = api.run_to_end("fwd", json!({"n": 1})).await;
    assert_eq!(forwarded["state"], "success", "{forwarded}");
    let remote = api.submit_ok("remote", json!({})).await;
    let remote = api
        .wait_final("remote", &remote, Duration::from_secs(30))
        .await;
    assert_eq!(remote["state"], "success", "{remote}");
    let broken = api.run_to_end("broken", json!({})).await;
    assert_eq!(broken["state"], "failed", "{broken}");
    let theirs = api
        .with_key(&client.key)
        .run_to_end("echo", json!({}))
        .await;
    assert_eq!(theirs["state"], "success", "{theirs}");
    let (status, _) = api.with_key(WRONG_KEY).list(&[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (token, want) in [(METRICS, StatusCode::OK), (BOOT, StatusCode::UNAUTHORIZED)] {
        let resp = api
            .http
            .get(format!("{}/metrics", api.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
    }
    let received = rx.wait_for(2, Duration::from_secs(15)).await;
    assert!(received.len() >= 2);
    api.wait_final("echo", &called_back, Duration::from_secs(10))
        .await;
    let whsec = webhook_secret(&api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    assert!(server.terminate().await.success());

    let secrets = [
        ("bootstrap key", BOOT.to_owned()),
        ("created client key", client.key.clone()),
        ("worker token", token.clone()),
        ("webhook secret", whsec["whsec_".len()..].to_owned()),
        ("callback password", CB_PASSWORD.to_owned()),
        ("callback query token", CB_TOKEN.to_owned()),
        ("http backend header", HTTP_SECRET.to_owned()),
        ("apixo upstream key", UPSTREAM_KEY.to_owned()),
        ("metrics token", METRICS.to_owned()),
        ("refused key", WRONG_KEY.to_owned()),
    ];
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    // The workload is in the log: the trace level was on and the tasks ran through it.
    assert!(
        log.contains(fetched["taskId"].as_str().unwrap()),
        "the http task is not in the log"
    );
    assert_log_free_of(&log, "server", &secrets);
    let log = std::fs::read_to_string(&worker_log).unwrap();
    assert_log_free_of(&log, "worker", &secrets);
    upstream.stop().await.unwrap();
}

#[tokio::test]
async fn a_postgresql_password_never_reaches_the_log_even_at_trace() {
    let Some(db) = create_db("the database password in a trace log").await else {
        return;
    };
    const PASSWORD: &str = "pg-password-secret-4h3g2f";
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_password(Some(PASSWORD)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let envs = [("RUST_LOG", "trace")];
    let flags = ["--log-format", "json", "--database-url", url.as_str()];
    let server = ServerProcess::spawn_full(&data, None, &flags, &envs).await;
    let done = server.api.run_to_end("echo", json!({})).await;
    assert_eq!(done["state"], "success", "{done}");
    assert!(server.terminate().await.success());
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    assert_log_free_of(
        &log,
        "server",
        &[("database password", PASSWORD.to_owned())],
    );
    db.drop_db().await;
}
