//! Hostile clients at the HTTP edge: requests that are refused before their body is read,
//! heads too large to hold, bytes that are not UTF-8 where text is expected, huge or odd ids and
//! model names, crowds of idle connections, and a fuzzer (schemathesis) driven by the OpenAPI
//! document. Each is answered with a 4xx (an envelope wherever the request reached the router)
//! or a closed connection, never a 5xx or a hang, and the server goes on serving.
//!
//! `TASKGATE_HOSTILE_IDLE=N` runs the idle-connection test with N connections and the default
//! connection cap (10,000) instead of 300 against a cap of 100; run it by hand, alone:
//! `TASKGATE_HOSTILE_IDLE=10000 cargo test -p taskgate --test it -- hostile_input::idle --nocapture`.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::connections::{parse_answer, read_to_close};
use crate::support::{assert_error, envelope, skip, TestApp, API_KEY};

/// Longest any answer in this file may take; a hang fails the test instead of stalling it.
const ANSWER: Duration = Duration::from_secs(10);

/// Sends `head` (a request head without its final blank line; `Connection: close` is added) on
/// a new connection, sends no body, and returns all the server sent before closing.
async fn exchange(addr: SocketAddr, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = head.to_vec();
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    // The server may answer and close before it has read everything sent.
    let _ = stream.write_all(&request).await;
    tokio::time::timeout(ANSWER, read_to_close(&mut stream))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no answer within {ANSWER:?} to {:?}",
                String::from_utf8_lossy(&head[..head.len().min(120)])
            )
        })
}

/// A raw GET of `target` with the test key; the answer.
async fn get_raw(addr: SocketAddr, target: &[u8]) -> String {
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(target);
    head.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}").as_bytes(),
    );
    exchange(addr, &head).await
}

/// A 4xx answer in the envelope, of the code wanted.
fn assert_envelope(answer: &str, want: StatusCode) {
    let (status, body) = parse_answer(answer);
    assert_error(status, &body, want, &[]);
}

/// Asserts a 4xx status line or a connection closed without an answer: what the server says
/// to a request it cannot even parse.
fn assert_refused_or_closed(answer: &str, what: &str) {
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{what}: {}",
        &answer[..answer.len().min(300)]
    );
}

#[tokio::test]
async fn a_bad_key_or_an_unknown_model_is_answered_before_the_body_is_sent() {
    // A body deadline far past the test's own: an answer in time was not waiting for it.
    let app = TestApp::start_with(|c| c.server.body_timeout = Duration::from_secs(300)).await;
    let post = |path: &str, key: Option<&str>, length: u64| {
        let auth = key.map_or(String::new(), |k| format!("\r\nAuthorization: Bearer {k}"));
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {length}{auth}"
        )
    };
    let cases = [
        (
            post("/api/v1/generateTask/echo", None, 1 << 30),
            StatusCode::UNAUTHORIZED,
        ),
        (
            post(
                "/api/v1/generateTask/echo",
                Some("wrong-key-0123456789"),
                1 << 30,
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            post(
                "/api/v1/generateTask/echo",
                Some("wrong-key-0123456789"),
                100,
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            post("/api/v1/generateTasks/echo", None, 100),
            StatusCode::UNAUTHORIZED,
        ),
        (
            post("/api/v1/worker/claim", Some(API_KEY), 100),
            StatusCode::UNAUTHORIZED,
        ),
        (
            post("/api/v1/generateTask/no-such-model", Some(API_KEY), 100),
            StatusCode::NOT_FOUND,
        ),
        (
            post("/api/v1/generateTasks/no-such-model", Some(API_KEY), 100),
            StatusCode::NOT_FOUND,
        ),
        (
            post("/api/v1/generateTask/echo", Some(API_KEY), 1 << 30),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (head, want) in cases {
        let answer = exchange(app.addr, head.as_bytes()).await;
        let (status, body) = parse_answer(&answer);
        assert_eq!(status, want, "{head}: {body}");
        assert_error(status, &body, want, &[]);
    }
}

#[tokio::test]
async fn oversized_heads_are_refused_and_the_server_keeps_serving() {
    let app = TestApp::start().await;
    let one_huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}",
        "a".repeat(200 * 1024)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: t{}",
        (0..1000)
            .map(|i| format!("\r\nX-H{i}: v"))
            .collect::<String>()
    );
    let huge_task_id = format!(
        "GET /api/v1/statusTask/echo?taskId={} HTTP/1.1\r\nHost: t",
        "t".repeat(100 * 1024)
    );
    for (what, head) in [
        ("one 200 KB header", one_huge_header),
        ("1000 headers", many_headers),
        ("a 100 KB taskId", huge_task_id),
    ] {
        let answer = exchange(app.addr, head.as_bytes()).await;
        assert_refused_or_closed(&answer, what);
    }
    let r = reqwest::get(format!("{}/healthz", app.api.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn huge_task_ids_and_model_names_are_4xx_envelopes() {
    let app = TestApp::start().await;
    // Long, but within the 64 KiB a request's head may take.
    let long_id = "t".repeat(50 * 1024);
    let (status, body) = app.api.status("echo", &long_id).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
    let (status, body) = app.api.cancel("echo", &long_id).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
    let long_model = "m".repeat(10 * 1024);
    let (status, body) = app.api.submit(&long_model, json!({ "input": {} })).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
    let (status, body) = app.api.status(&long_model, "task_x").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
    let resp = app
        .api
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/streamTask/{long_model}?taskId=task_x"),
        )
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
}

#[tokio::test]
async fn bytes_that_are_not_utf8_in_the_path_query_or_a_header_are_4xx() {
    let app = TestApp::start().await;
    // Percent-encoded, they reach the router, which answers in the envelope.
    for target in [
        &b"/api/v1/statusTask/%FF%FE?taskId=task_x"[..],
        b"/api/v1/statusTask/echo?taskId=%FF%FE",
        b"/api/v1/statusTask/echo?taskId=%C0%AF%00",
    ] {
        let answer = get_raw(app.addr, target).await;
        let (status, body) = parse_answer(&answer);
        assert!(
            status.is_client_error(),
            "{}: {status} {body}",
            String::from_utf8_lossy(target)
        );
        assert_error(status, &body, status, &[]);
    }
    // Raw, hyper refuses them as it parses the request line.
    for target in [
        &b"/api/v1/statusTask/\xff\xfe?taskId=task_x"[..],
        b"/api/v1/statusTask/echo?taskId=\xff",
    ] {
        let answer = get_raw(app.addr, target).await;
        assert_refused_or_closed(&answer, &String::from_utf8_lossy(target));
    }
    // In a header value: an unreadable key is a bad key; an unreadable Idempotency-Key is
    // refused; an unreadable Prefer is ignored, as unreadable preferences are.
    let answer = exchange(
        app.addr,
        b"GET /api/v1/statusTask/echo?taskId=task_x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\xfd",
    )
    .await;
    assert_envelope(&answer, StatusCode::UNAUTHORIZED);
    let submit = |header: &[u8]| {
        let mut head = format!(
            "POST /api/v1/generateTask/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 13\r\n"
        )
        .into_bytes();
        head.extend_from_slice(header);
        head
    };
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let mut request = submit(b"Idempotency-Key: \xff\xfe");
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n{\"input\": {}}");
    stream.write_all(&request).await.unwrap();
    let answer = tokio::time::timeout(ANSWER, read_to_close(&mut stream))
        .await
        .unwrap();
    assert_envelope(&answer, StatusCode::BAD_REQUEST);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let mut request = submit(b"Prefer: wait=\xff");
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n{\"input\": {}}");
    stream.write_all(&request).await.unwrap();
    let answer = tokio::time::timeout(ANSWER, read_to_close(&mut stream))
        .await
        .unwrap();
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn odd_model_names_are_404_envelopes_and_an_encoded_real_name_is_served() {
    let app = TestApp::start().await;
    for name in [
        &b".."[..],
        b".",
        b"%2e%2e",
        b"..%2f..%2fetc%2fpasswd",
        b"%00",
        b"echo%00",
        b"ECHO",
        b"mod%C3%A8le",
        b"%F0%9F%A6%80",
        b"%20echo",
    ] {
        let target = [&b"/api/v1/statusTask/"[..], name, b"?taskId=task_x"].concat();
        let answer = get_raw(app.addr, &target).await;
        let (status, body) = parse_answer(&answer);
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{}: {body}",
            String::from_utf8_lossy(name)
        );
        assert_error(status, &body, StatusCode::NOT_FOUND, &[]);
    }
    // A name spelt with percent escapes is the name.
    let resp = app
        .api
        .request(reqwest::Method::POST, "/api/v1/generateTask/%65%63%68%6F")
        .json(&json!({ "input": {} }))
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A model whose name would be a path segment of dots, or is not ASCII, cannot be configured.
    for name in ["..", ".hidden", "modèle"] {
        let mut config = taskgate_server::Config::new("/nonexistent");
        let model = config.models.values().next().unwrap().clone();
        config.models.insert(name.to_owned(), model);
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("start with a lowercase letter or digit"),
            "{name}: {err}"
        );
    }
}

/// Raises this process's open-file limit to `want` if it is lower (as root, past the hard
/// limit too); returns the limit in force.
fn raise_open_files(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok()
        || setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_ok()
    {
        return getrlimit(Resource::RLIMIT_NOFILE).unwrap().0;
    }
    soft
}

#[tokio::test]
async fn idle_connections_cannot_keep_a_real_client_out() {
    let by_hand: Option<usize> = std::env::var("TASKGATE_HOSTILE_IDLE")
        .ok()
        .map(|n| n.parse().expect("TASKGATE_HOSTILE_IDLE is a number"));
    let (idle_count, cap, header_timeout) = match by_hand {
        Some(n) => (n, 10_000, Duration::from_secs(5)),
        None => (300, 100, Duration::from_secs(1)),
    };
    // Both ends of every connection are in this process, with some to spare.
    let limit = raise_open_files(2 * idle_count as u64 + 1000);
    if limit < 2 * idle_count as u64 + 200 {
        skip(&format!(
            "{idle_count} idle connections need more open files than the limit of {limit}"
        ));
        return;
    }
    let app = TestApp::start_with(|c| {
        c.server.max_connections = cap;
        c.server.header_timeout = header_timeout;
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut idle = Vec::with_capacity(idle_count);
    for _ in 0..idle_count {
        // Beyond the accept queue, a connect may wait for the kernel; it still counts as idle.
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(app.addr)).await {
            Ok(Ok(s)) => idle.push(s),
            Ok(Err(e)) => panic!("connect failed after {} connections: {e}", idle.len()),
            Err(_) => break,
        }
    }
    let opened = idle.len();
    // A real client, behind all of them.
    let client = reqwest::Client::new();
    let served = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match client.get(format!("{}/healthz", app.api.base)).send().await {
                Ok(r) => return r.status(),
                // Turned away by a full queue: try again, as a client would.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("a real client was not served while idle connections came and went");
    assert_eq!(served, StatusCode::OK);
    let waited = started.elapsed();
    // Each round of `cap` idle connections is closed after the header timeout.
    let rounds = (opened / cap + 2) as u32;
    let bound = header_timeout * rounds + Duration::from_secs(10);
    assert!(
        waited < bound,
        "{opened} idle connections kept a client out for {waited:?} (bound {bound:?})"
    );
    if by_hand.is_some() {
        skip(&format!(
            "figure: a client was served {waited:?} after {opened} idle connections were opened (cap {cap}, header timeout {header_timeout:?})"
        ));
    }
    // And every idle connection was closed by the server, not kept.
    for mut s in idle.drain(..) {
        tokio::time::timeout(bound, read_to_close(&mut s))
            .await
            .expect("an idle connection stayed open past the header timeout");
    }
}

#[tokio::test]
async fn schemathesis_finds_no_5xx_and_no_answer_outside_the_openapi_document() {
    let app = TestApp::start().await;
    let report = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("st")
        .arg("run")
        .arg(format!("{}/openapi.json", app.api.base))
        .args(["--url", &app.api.base])
        .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "25", "--max-time", "90", "--seed", "14"])
        .args(["--workers", "1", "--request-timeout", "10", "--no-color"])
        .args(["--generation-database", "none"])
        .arg("--report-dir")
        .arg(report.path())
        // It keeps state in the working directory: not in the source tree.
        .current_dir(report.path())
        .kill_on_drop(true)
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => return tool_missing(&format!("`st` (schemathesis) cannot run: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    // The server is still up after the fuzzing.
    app.api.submit_ok("echo", json!({})).await;
}

fn tool_missing(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must fuzz the API with schemathesis (pip install schemathesis), but {why}"
    );
    skip(&format!("fuzzing with schemathesis: {why}"));
}
