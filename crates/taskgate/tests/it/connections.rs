//! The server's connection limits: deadlines for headers and bodies, a cap on open
//! connections, and a shutdown whose drain ends even when a client never finishes its request.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{assert_error, TestApp, API_KEY};

/// Reads until the server closes the connection; what it sent is returned.
pub(crate) async fn read_to_close(stream: &mut (impl AsyncRead + Unpin)) -> String {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// The status and the JSON body of one raw HTTP/1.1 answer (with a `Content-Length` body, as
/// every envelope has).
pub(crate) fn parse_answer(answer: &str) -> (StatusCode, Value) {
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the answer's body is not JSON ({e}): {answer:?}"));
    (status, body)
}

/// The head of a generateTask request for the builtin `echo` model, declaring `length` bytes of
/// body, with the test key.
pub(crate) fn submit_head(length: usize) -> String {
    format!(
        "POST /api/v1/generateTask/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Sends one keep-alive request and reads its whole answer (a `/healthz` body is small and
/// comes in one piece after the headers).
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"ok\"") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the answer: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected_at_the_header_timeout() {
    let app = TestApp::start_with(|c| c.server.header_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    // Without the deadline this read would never end: the headers are never finished.
    let answer = tokio::time::timeout(Duration::from_secs(20), read_to_close(&mut slow))
        .await
        .expect("the server kept a connection whose headers never ended");
    assert!(!answer.contains("200 OK"), "{answer}");
    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    assert!(healthz_on(&mut idle).await.contains("200 OK"));
    tokio::time::timeout(Duration::from_secs(20), read_to_close(&mut idle))
        .await
        .expect("an idle keep-alive connection stayed open past the header timeout");
    // Others are still served.
    let r = reqwest::get(format!("http://{}/healthz", app.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let app = TestApp::start_with(|c| {
        c.server.max_connections = 3;
        c.server.header_timeout = Duration::from_secs(120);
    })
    .await;
    // The harness's own HTTP client keeps a pooled connection too, so open connections (each
    // answered once and then held) until one is not served.
    let mut served = Vec::new();
    let mut waiting = None;
    for _ in 0..4 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(1500), healthz_on(&mut stream)).await {
            Ok(answer) => {
                assert!(answer.contains("200 OK"), "{answer}");
                served.push(stream);
            }
            Err(_) => {
                waiting = Some(stream);
                break;
            }
        }
    }
    let mut waiting = waiting.expect("4 connections were served at once over a limit of 3");
    assert!(!served.is_empty(), "no connection was served at all");
    // The request the waiting connection sent is answered once a slot frees.
    served.pop();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"ok\"") {
        let n = tokio::time::timeout(Duration::from_secs(20), waiting.read(&mut buf))
            .await
            .expect("the waiting connection was not served after a slot freed")
            .unwrap();
        assert!(n > 0, "closed before the answer: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("200 OK"), "{got}");
}

#[tokio::test]
async fn shutdown_ends_even_when_a_client_never_finishes_its_request_body() {
    let app = TestApp::start_with(|c| c.server.shutdown_grace = Duration::from_millis(500)).await;
    let mut stuck = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/generateTask/echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"input\":"
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    // A healthy request on another connection shows the server has the stuck one too: both
    // were accepted by the same loop, in order.
    let r = reqwest::get(format!("http://{}/healthz", app.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stopped = tokio::time::timeout(Duration::from_secs(30), app.stop())
        .await
        .expect("shutdown waited on a request body that never came");
    stopped.unwrap();
    // The stuck connection was closed, not left open.
    let rest = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut stuck)).await;
    assert!(rest.is_ok(), "the stuck connection is still open");
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_is_answered_408_and_disconnected() {
    let app = TestApp::start_with(|c| c.server.body_timeout = Duration::from_millis(500)).await;
    let mut stuck = TcpStream::connect(app.addr).await.unwrap();
    stuck
        .write_all(format!("{}{{\"input\":", submit_head(1000)).as_bytes())
        .await
        .unwrap();
    // Without the deadline this read would never end: the rest of the body never comes.
    let answer = tokio::time::timeout(Duration::from_secs(20), read_to_close(&mut stuck))
        .await
        .expect("the server waited on a body that never came");
    let (status, body) = parse_answer(&answer);
    assert_error(status, &body, StatusCode::REQUEST_TIMEOUT, &["0.5s"]);
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    // Others are still served.
    app.api.submit_ok("echo", serde_json::json!({})).await;
}

#[tokio::test]
async fn a_body_that_keeps_trickling_is_cut_off_at_the_body_timeout_of_its_headers() {
    let app = TestApp::start_with(|c| c.server.body_timeout = Duration::from_secs(1)).await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    // 200 bytes at one every 100 ms: never a pause of a second, but 20 s in all.
    let trickle = tokio::spawn(async move {
        wr.write_all(submit_head(200).as_bytes()).await?;
        for _ in 0..200 {
            wr.write_all(b" ").await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::io::Result::Ok(())
    });
    let started = tokio::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(15), read_to_close(&mut rd))
        .await
        .expect("a body that kept moving was let run past the body timeout");
    let (status, body) = parse_answer(&answer);
    assert_error(status, &body, StatusCode::REQUEST_TIMEOUT, &["1s"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    trickle.abort();
}
