//! Outages that last: the data dir's file system filling up, a webhook receiver down for a long
//! stretch (across a kill -9 of the server), backends that hang past their timeout. Each test
//! ends with the promises: every accepted task reaches exactly one final state with its outputs,
//! every owed callback is delivered.
//!
//! The disk-full tests mount a small tmpfs, so they need root (as in CI); elsewhere they say
//! visibly that they were skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::faults::{check_invariants, Want};
use crate::recovery::Gated;
use crate::support::*;
use crate::webhooks::{header, submit_callback, wait_delivery, Receiver, Reply};

/// Every wait in this file is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// A tmpfs of a few megabytes mounted on a directory, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `path`; `None`, said visibly,
    /// where that is not allowed (not root, no tmpfs).
    fn mount(path: &Path, size: &str) -> Option<SmallDisk> {
        // CI runs as root with mount allowed: there a skip would hide an untested promise.
        let skip = |why: &str| {
            assert!(std::env::var_os("CI").is_none(), "CI must run {why}");
            skip(why);
        };
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk {
                path: path.to_owned(),
            }),
            Ok(o) => {
                skip(&format!(
                    "a disk-full test: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(&format!("a disk-full test: cannot run mount: {e}"));
                None
            }
        }
    }

    /// Writes a filler file until the file system refuses with ENOSPC; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        // Big chunks first, then smaller ones for what is left of the last page.
        for size in [1 << 20, 4096, 1] {
            let chunk = vec![0u8; size];
            loop {
                match f.write_all(&chunk) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
                    Err(e) => panic!("filling {}: {e}", filler.display()),
                }
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily, so that a failed test's leftover processes cannot keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Submits until one is refused (at most `tries`): the ids of those accepted on the way, and
/// the refusal.
async fn submit_until_refused(api: &Api, input: Value, tries: usize) -> (Vec<String>, Value) {
    let mut accepted = Vec::new();
    for _ in 0..tries {
        let (status, body) = api.submit("gated", json!({ "input": input })).await;
        if status == StatusCode::OK {
            accepted.push(body["data"]["taskId"].as_str().unwrap().to_owned());
            continue;
        }
        return (accepted, body);
    }
    panic!("{tries} submits on a full disk were all accepted");
}

/// `taskgate_backend_errors_total` of `model`'s retryable failures, from /metrics.
async fn deferred_attempts(api: &Api, model: &str) -> u64 {
    crate::metrics::scrape_api(api).await.sum(
        "taskgate_backend_errors_total",
        &[("model", model), ("kind", "retryable")],
    ) as u64
}

#[tokio::test]
async fn a_full_data_disk_refuses_submits_with_507_keeps_accepted_tasks_and_recovers_by_itself() {
    let g = Gated::new(1);
    let Some(disk) = SmallDisk::mount(&g.data, "8m") else {
        return;
    };
    let server = g.spawn(&["--retry-backoff", "200ms"]).await;
    // One task running (held at its gate), two waiting behind it.
    let running = server.api.submit_ok("gated", json!({ "n": 1 })).await;
    let script = g.started(&running, 1).await;
    let waiting = [
        server.api.submit_ok("gated", json!({ "n": 2 })).await,
        server.api.submit_ok("gated", json!({ "n": 3 })).await,
    ];

    let filler = disk.fill();
    // A submit that needs new pages cannot be stored: 507, never a 200 for a task that is not
    // there, never a 500. (A small one may still fit in pages SQLite already has; if accepted,
    // it must then run like any other.)
    let big = json!({ "pad": "x".repeat(256 * 1024) });
    let (mut accepted, refusal) = submit_until_refused(&server.api, big, 5).await;
    assert_eq!(
        error_code(&refusal),
        "insufficient_storage",
        "a submit on a full disk: {refusal}"
    );
    assert_eq!(refusal["code"], 507, "{refusal}");
    let (status, body) = server
        .api
        .submit("gated", json!({ "input": { "small": true } }))
        .await;
    match status {
        StatusCode::OK => accepted.push(body["data"]["taskId"].as_str().unwrap().to_owned()),
        _ => assert_eq!(error_code(&body), "insufficient_storage", "{body}"),
    }
    // Reads keep working.
    let (status, body) = server.api.status("gated", &running).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "processing", "{body}");
    for id in &waiting {
        let (status, body) = server.api.status("gated", id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"]["state"], "pending", "{body}");
    }

    // The running task's program now fails to write its output. The attempt is not counted:
    // the task waits (processing until SQLite, on the same disk, can take the write putting it
    // back), neither failed nor a success.
    g.open_gate();
    wait_until(
        WAIT,
        "the failed attempt to be counted as one to retry",
        || {
            let api = server.api.clone();
            async move { deferred_attempts(&api, "gated").await >= 1 }
        },
    )
    .await;
    assert!(process_is_gone(script));
    let (status, body) = server.api.status("gated", &running).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        matches!(
            body["data"]["state"].as_str(),
            Some("processing" | "pending")
        ),
        "a task whose output cannot be written must wait for space: {body}"
    );

    // Space comes back; the server carries on without a restart, and runs the task again.
    std::fs::remove_file(&filler).unwrap();
    let after = server.api.submit_ok("gated", json!({ "n": 4 })).await;
    let mut all = vec![running.clone()];
    all.extend(waiting.iter().cloned());
    all.extend(accepted);
    all.push(after);
    for id in &all {
        server.api.wait_final("gated", id, WAIT).await;
    }
    // "attempt 1": no attempt made while the disk was full was counted against a task.
    let tasks: Vec<(&str, &str, Want)> = all
        .iter()
        .map(|id| {
            (
                "gated",
                id.as_str(),
                Want::Success(&[("result.txt", "attempt 1\n")]),
            )
        })
        .collect();
    check_invariants(&server.api, &tasks).await;
    server.terminate().await;
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver down for a long stretch.

#[tokio::test]
async fn callbacks_owed_through_a_long_receiver_outage_and_a_kill_9_are_all_delivered_under_their_ids(
) {
    // A port nobody listens on: every attempt is refused until the receiver comes up there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskgate.toml");
    // The outage's hour, shortened: 60 retries 100 ms apart, and the breaker that holds back
    // a failing receiver's deliveries closing again after 300 ms instead of 30 s.
    let delays = vec!["\"100ms\""; 60].join(", ");
    std::fs::write(
        &config,
        format!(
            "[webhooks]\nallow_private_callbacks = true\nretry_delays = [{delays}]\n\
             breaker_cooldown = \"300ms\"\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(&data, Some(&config)).await;
    let inputs = [
        (json!({ "n": 1 }), "success"),
        (json!({ "fail": "no luck" }), "failed"),
        (json!({ "n": 2 }), "success"),
        (json!({ "fail": "again" }), "failed"),
        (json!({ "n": 3 }), "success"),
    ];
    let mut tasks = Vec::new();
    for (input, want) in &inputs {
        let id = submit_callback(&server.api, &url, input.clone()).await;
        tasks.push((id, *want));
    }
    // Each callback has been refused at least twice.
    let mut before = Vec::new();
    for (id, _) in &tasks {
        let d = wait_delivery(&server.api, id, |d| d["attempts"].as_u64() >= Some(2)).await;
        assert_ne!(d["state"], "succeeded", "{d}");
        assert!(
            d["attemptLog"][0].get("statusCode").is_none(),
            "nothing listens, so no status: {d}"
        );
        before.push(d);
    }

    // The server dies mid-outage and comes back, still to a closed port.
    server.kill9().await;
    let server = ServerProcess::spawn(&data, Some(&config)).await;
    for ((id, _), d) in tasks.iter().zip(&before) {
        let seen = d["attempts"].as_u64().unwrap();
        let after =
            wait_delivery(&server.api, id, |d| d["attempts"].as_u64() > Some(seen + 1)).await;
        assert_eq!(
            after["id"], d["id"],
            "the delivery owed survives the restart"
        );
    }

    // The receiver comes back, answering 500 for a while, then 200.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let mut rx = Receiver::start_on(listener, vec![Reply::Status(500); 6]);
    let mut delivered = Vec::new();
    for (id, _) in &tasks {
        delivered.push(wait_delivery(&server.api, id, |d| d["state"] == "succeeded").await);
    }

    let got = rx.wait_for(tasks.len() + 6, WAIT).await;
    for (((id, want), d), first) in tasks.iter().zip(&delivered).zip(&before) {
        assert_eq!(d["id"], first["id"], "{d}");
        let log = d["attemptLog"].as_array().unwrap();
        assert_eq!(log.last().unwrap()["statusCode"], 200, "{d}");
        // Every request for this task carried the delivery's id and the task's final state.
        let mine: Vec<Value> = got
            .iter()
            .filter(|r| header(r, "webhook-id") == d["id"].as_str().unwrap())
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert!(!mine.is_empty(), "no request reached the receiver for {id}");
        for payload in &mine {
            assert_eq!(payload["data"]["taskId"], id.as_str(), "{payload}");
            assert_eq!(payload["data"]["state"], *want, "{payload}");
        }
        let (_, status) = server.api.status("echo", id).await;
        assert_eq!(status["data"]["state"], *want, "{status}");
    }
    // No request came with an id that is not one of the deliveries owed.
    let ids: Vec<&str> = delivered
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    for r in &got {
        assert!(ids.contains(&header(r, "webhook-id")));
    }
    let statuses: Vec<Value> = delivered
        .iter()
        .flat_map(|d| d["attemptLog"].as_array().unwrap().clone())
        .map(|a| a["statusCode"].clone())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        6,
        "the 500s were retried: {statuses:?}"
    );
    server.terminate().await;
}

// ---------------------------------------------------------------------------------------------
// Backends that hang past their timeout. (command.rs proves a timed-out program's process group
// is killed; http_backend.rs that a slow upstream is retried.)

#[tokio::test]
async fn a_program_ignoring_sigterm_is_killed_at_its_timeout_and_frees_its_slot_for_the_next_task()
{
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("pids");
    let app = TestApp::start_with_models(&command_model(
        "deaf",
        "ignore_term.sh",
        &[prefix.to_str().unwrap()],
        "timeout = \"500ms\"\nconcurrency = 1\nmax_attempts = 2",
    ))
    .await;

    let first = app.api.submit_ok("deaf", json!({})).await;
    let second = app.api.submit_ok("deaf", json!({})).await;
    let mut pids = Vec::new();
    for id in [&first, &second] {
        // The second starts only once the first's slot is free.
        let file = PathBuf::from(format!("{}-{id}", prefix.display()));
        let these: Vec<i32> = wait_for_file(&file, WAIT)
            .await
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(these.len(), 2, "{these:?}");
        pids.extend(these);
    }
    for id in [&first, &second] {
        app.api.wait_final("deaf", id, WAIT).await;
    }

    check_invariants(
        &app.api,
        &[
            ("deaf", &first, Want::Failed("PROCESSING_TIMEOUT")),
            ("deaf", &second, Want::Failed("PROCESSING_TIMEOUT")),
        ],
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "the programs and their grandchildren, deaf to SIGTERM, to be killed",
        || async { pids.iter().all(|&p| process_is_gone(p)) },
    )
    .await;
}

/// An upstream that accepts connections and never answers; counts them.
async fn silent_upstream() -> (String, tokio::sync::watch::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            tx.send_modify(|n| *n += 1);
        }
    });
    (base, rx)
}

#[tokio::test]
async fn an_upstream_that_accepts_and_never_answers_is_retried_then_fails_and_frees_its_slot() {
    let (base, calls) = silent_upstream().await;
    let app = TestApp::start_with_models(&format!(
        "[models.mute]\nbackend = \"http\"\nurl = {}\ntimeout = \"400ms\"\nconcurrency = 1\nmax_attempts = 2\n",
        toml_str(format!("{base}/model"))
    ))
    .await;

    let first = app.api.submit_ok("mute", json!({})).await;
    let second = app.api.submit_ok("mute", json!({})).await;
    let a = app.api.wait_final("mute", &first, WAIT).await;
    let b = app.api.wait_final("mute", &second, WAIT).await;

    // The upstream's silence is the http client's timeout, a retryable MODEL_UNAVAILABLE.
    check_invariants(
        &app.api,
        &[
            ("mute", &first, Want::Failed("MODEL_UNAVAILABLE")),
            ("mute", &second, Want::Failed("MODEL_UNAVAILABLE")),
        ],
    )
    .await;
    assert!(b["failMsg"].as_str().unwrap().contains("2 attempts"), "{b}");
    assert!(
        a["failMsg"].as_str().unwrap().contains("2 attempts"),
        "retried once, then failed: {a}"
    );
    // Two tasks, two attempts each: the second ran once the first let go of the one slot.
    assert_eq!(*calls.borrow(), 4);
}

#[tokio::test]
async fn a_pull_worker_that_claims_and_goes_silent_loses_the_task_at_each_lease_then_it_fails() {
    let app = TestApp::start_with(|c| {
        c.models = taskgate_server::config::FileConfig::parse(
            "[models.remote]\nbackend = \"worker\"\nconcurrency = 1\ntimeout = \"30s\"\nmax_attempts = 2\n",
        )
        .unwrap()
        .models
        .unwrap();
        c.server.lease = Duration::from_millis(600);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let worker = crate::faults::Worker::new(&app.api.base, &token);
    let id = app.api.submit_ok("remote", json!({})).await;

    // Two attempts, each claimed, acknowledged by one heartbeat (a claim never acknowledged
    // goes back uncounted), then never heard of again.
    for attempt in 1..=2 {
        let task = worker.claim_until(&["remote"]).await;
        let (got, lease) = crate::faults::ids(&task);
        assert_eq!(got, id);
        assert_eq!(task["attempt"], attempt, "{task}");
        let (status, body) = worker.heartbeat(&id, &lease).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    app.api.wait_final("remote", &id, WAIT).await;
    check_invariants(
        &app.api,
        &[("remote", &id, Want::Failed("ATTEMPTS_EXHAUSTED"))],
    )
    .await;

    // Its slot is free: the next task is handed out.
    let next = app.api.submit_ok("remote", json!({})).await;
    let task = worker.claim_until(&["remote"]).await;
    assert_eq!(crate::faults::ids(&task).0, next);
}

#[tokio::test]
async fn with_postgresql_a_full_disk_for_result_files_reruns_tasks_uncounted_until_space_returns() {
    let Some(db) = create_db("the disk-full test on PostgreSQL").await else {
        return;
    };
    let g = Gated::new(1);
    let Some(disk) = SmallDisk::mount(&g.data, "8m") else {
        db.drop_db().await;
        return;
    };
    let server = g
        .spawn(&["--retry-backoff", "200ms", "--database-url", &db.url])
        .await;
    let running = server.api.submit_ok("gated", json!({ "n": 1 })).await;
    let script = g.started(&running, 1).await;

    let filler = disk.fill();
    // The database has room, so a submit is stored and answered 200.
    let waiting = server.api.submit_ok("gated", json!({ "n": 2 })).await;
    g.open_gate();
    // The program fails to write its output, again and again: each time the task goes back
    // uncounted and runs again.
    wait_until(WAIT, "two attempts failed on the full disk", || {
        let api = server.api.clone();
        async move { deferred_attempts(&api, "gated").await >= 2 }
    })
    .await;
    assert!(process_is_gone(script));
    for id in [&running, &waiting] {
        let (status, body) = server.api.status("gated", id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            matches!(
                body["data"]["state"].as_str(),
                Some("processing" | "pending")
            ),
            "{body}"
        );
    }

    std::fs::remove_file(&filler).unwrap();
    for id in [&running, &waiting] {
        server.api.wait_final("gated", id, WAIT).await;
    }
    check_invariants(
        &server.api,
        &[
            (
                "gated",
                &running,
                Want::Success(&[("result.txt", "attempt 1\n")]),
            ),
            (
                "gated",
                &waiting,
                Want::Success(&[("result.txt", "attempt 1\n")]),
            ),
        ],
    )
    .await;
    server.terminate().await;
    drop(disk);
    db.drop_db().await;
}

#[tokio::test]
async fn a_workers_upload_to_a_full_disk_is_refused_with_507_and_taken_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = SmallDisk::mount(&data, "8m") else {
        return;
    };
    let config = dir.path().join("taskgate.toml");
    std::fs::write(&config, WORKER_MODEL).unwrap();
    let server = ServerProcess::spawn(&data, Some(&config)).await;
    let token = worker_token(&data, None).await;
    let worker = crate::faults::Worker::new(&server.api.base, &token);
    let id = server.api.submit_ok("remote", json!({})).await;
    let task = worker.claim_until(&["remote"]).await;
    let (_, lease) = crate::faults::ids(&task);
    let (status, body) = worker.heartbeat(&id, &lease).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let filler = disk.fill();
    // Small enough to be sent whole before the refusal (an answer before the body is read
    // ends the connection, and the client may see that instead of the 507).
    let output = "y".repeat(1000);
    let (status, body) = worker.upload(&id, "out.txt", &lease, output.clone()).await;
    assert_eq!(status.as_u16(), 507, "{body}");
    assert_eq!(error_code(&body), "insufficient_storage", "{body}");

    std::fs::remove_file(&filler).unwrap();
    let (status, body) = worker.upload(&id, "out.txt", &lease, output.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = worker.complete(&id, &lease, &["out.txt"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_invariants(
        &server.api,
        &[("remote", &id, Want::Success(&[("out.txt", &output)]))],
    )
    .await;
    server.terminate().await;
}
