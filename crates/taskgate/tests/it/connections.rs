//! The server's connection limits: a deadline for headers, a cap on open connections, and a
//! shutdown whose drain ends even when a client never finishes its request.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestApp, API_KEY};

/// Reads until the server closes the connection; what it sent is returned.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
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
