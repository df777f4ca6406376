//! The SDK's submit, wait and download against a real server (moved here from the binary's
//! tests, `cli.rs`, since what it checks is this crate's behaviour).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use taskgate_client::{Client, SubmitOptions, TaskState, WaitOptions};

use crate::real_server::{RealServer, API_KEY};

#[tokio::test]
async fn the_sdk_submits_echo_waits_with_short_intervals_and_downloads_the_result() {
    let app = RealServer::start().await;
    let client = Client::new(&app.base, API_KEY).unwrap();
    let input = json!({"prompt": "from the sdk", "delay_ms": 150});
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));

    let task_id = client
        .submit("echo", input.clone(), SubmitOptions::default())
        .await
        .unwrap();
    let opts = WaitOptions {
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(20),
        ..WaitOptions::default()
    }
    .on_progress({
        let polls = polls.clone();
        move |p| polls.store(p.polls, std::sync::atomic::Ordering::SeqCst)
    });
    let status = client.wait("echo", &task_id, opts).await.unwrap();

    assert_eq!(status.task_id, task_id);
    assert_eq!(status.state, TaskState::Success);
    assert!(
        polls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "a 150 ms task polled every 20-100 ms is seen processing first"
    );
    let urls = status.result().unwrap().unwrap().result_urls;
    assert_eq!(urls.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = client.download(&urls[0], dir.path()).await.unwrap();
    assert!(path.starts_with(dir.path()), "{}", path.display());
    let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved, input);
    assert_only_file(dir.path(), &path);
}

/// `dir` holds `file` and nothing else (no leftover `.part`).
fn assert_only_file(dir: &Path, file: &Path) {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries, vec![file.to_owned()]);
}
