//! The hot paths, kept honest: small outputs kept in the database and served through the same
//! signed URLs as files, finished tasks' status views and valid keys answered from memory, and
//! the limits of that memory (other tenants and models still see nothing; revocations and store
//! outages still reach the key cache).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_server::artifacts::INLINE_MAX;
use taskgate_server::auth::REVOCATION_CHECK;
use taskgate_server::store::faults::{Fault, FaultPlan};

use crate::support::*;

/// Every wait for a task in this file is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

/// The files under `DATA_DIR/files` that belong to `task_id`.
fn files_of(data_dir: &Path, task_id: &str) -> Vec<PathBuf> {
    files_under(&data_dir.join("files"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(task_id))
        .collect()
}

/// The task id, attempt tag and name of a result URL `…/files/{task}/{tag}/{name}?…`.
fn url_parts(url: &str) -> (String, String, String) {
    let path = url.split_once("/files/").unwrap().1;
    let path = path.split_once('?').unwrap().0;
    let parts: Vec<&str> = path.split('/').collect();
    assert_eq!(parts.len(), 3, "{url}");
    (parts[0].into(), parts[1].into(), parts[2].into())
}

/// Runs `input` on `model` to a success; returns the task id and its one result URL.
async fn one_result(api: &Api, model: &str, input: Value) -> (String, String) {
    let id = api.submit_ok(model, input).await;
    let data = api.wait_final(model, &id, WAIT).await;
    assert_eq!(data["state"], "success", "{data}");
    let mut urls = result_urls(&data);
    assert_eq!(urls.len(), 1, "{data}");
    (id, urls.remove(0))
}

/// Length of `echo`'s result for the input `{"prompt": "x" * n}` (pretty-printed JSON).
fn echo_len(n: usize) -> usize {
    serde_json::to_vec_pretty(&json!({ "prompt": "x".repeat(n) }))
        .unwrap()
        .len()
}

#[tokio::test]
async fn an_echo_result_is_served_from_the_database_and_leaves_no_file() {
    let app = TestApp::start().await;
    let input = json!({ "prompt": "a small result", "n": 7 });

    let (id, url) = one_result(&app.api, "echo", input.clone()).await;
    let (status, ct, len, body) = fetch_url(&url).await;

    assert_eq!(status, StatusCode::OK, "{url}");
    assert_eq!(ct, "application/json");
    let echoed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed, input);
    assert_eq!(len, Some(body.len() as u64));
    assert!(
        files_of(&app.data_dir, &id).is_empty(),
        "a small result was written as a file: {:?}",
        files_of(&app.data_dir, &id)
    );
    // The signature still guards it: a changed tag or name is refused, not served.
    let (task, tag, name) = url_parts(&url);
    let query = url.split_once('?').unwrap().1;
    for path in [
        format!("{task}/{tag}0/{name}"),
        format!("{task}/{tag}/x{name}"),
    ] {
        let (status, _, _, _) = fetch_url(&format!("{}/files/{path}?{query}", app.api.base)).await;
        assert!(
            status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
            "{path}: {status}"
        );
    }
}

#[tokio::test]
async fn an_output_of_exactly_the_inline_limit_is_a_blob_and_one_byte_more_is_a_file() {
    let app = TestApp::start().await;
    // `echo`'s result is its input pretty-printed: pick prompts that land on the limit.
    let at_limit = INLINE_MAX - echo_len(0);
    assert_eq!(echo_len(at_limit), INLINE_MAX);

    for (n, as_file) in [(at_limit, false), (at_limit + 1, true)] {
        let (id, url) = one_result(&app.api, "echo", json!({ "prompt": "x".repeat(n) })).await;
        let (status, _, _, body) = fetch_url(&url).await;

        assert_eq!(status, StatusCode::OK, "{url}");
        assert_eq!(body.len(), echo_len(n));
        let echoed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echoed["prompt"].as_str().unwrap().len(), n);
        let files = files_of(&app.data_dir, &id);
        assert_eq!(
            files.len(),
            usize::from(as_file),
            "{} bytes: {files:?}",
            body.len()
        );
        if let Some(file) = files.first() {
            assert_eq!(std::fs::read(file).unwrap(), body, "{}", file.display());
        }
    }
}

#[tokio::test]
async fn an_image_over_the_inline_limit_is_a_file_on_disk_served_as_a_valid_png() {
    let app = TestApp::start().await;
    let input = json!({ "prompt": "a lighthouse, large", "width": 1024, "height": 1024 });

    let (id, url) = one_result(&app.api, "demo-image", input).await;
    let (status, ct, len, png) = fetch_url(&url).await;

    assert_eq!(status, StatusCode::OK, "{url}");
    assert_eq!(ct, "image/png");
    assert_eq!(png_size(&png), (1024, 1024));
    assert!(
        png.len() > INLINE_MAX,
        "the image ({} bytes) does not test the file path",
        png.len()
    );
    assert_eq!(len, Some(png.len() as u64));
    // Laid out as DATA_DIR/files/{last two characters of the id}/{id}@{tag}.{name}.
    let (task, tag, name) = url_parts(&url);
    assert_eq!(task, id);
    let path = app
        .data_dir
        .join("files")
        .join(&id[id.len() - 2..])
        .join(format!("{id}@{tag}.{name}"));
    assert_eq!(files_of(&app.data_dir, &id), vec![path.clone()]);
    assert_eq!(std::fs::read(&path).unwrap(), png, "{}", path.display());
}

#[tokio::test]
async fn a_cached_final_view_is_still_hidden_from_other_tenants_and_other_models() {
    let app = TestApp::start().await;
    let a = create_key(&app.data_dir, "tenant-a", None).await;
    let b = create_key(&app.data_dir, "tenant-b", None).await;
    let (a, b) = (app.api.with_key(&a.key), app.api.with_key(&b.key));

    // Read first by its owner (wait_final's last read), so the view is cached.
    let id = a.submit_ok("echo", json!({ "owner": "a" })).await;
    a.wait_final("echo", &id, WAIT).await;
    let (status, first) = a.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["data"]["state"], "success", "{first}");
    // B's key works: its own task answers.
    let own = b.submit_ok("echo", json!({ "owner": "b" })).await;
    assert_eq!(b.wait_final("echo", &own, WAIT).await["state"], "success");

    let (status, body) = b.status("echo", &id).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
    for model in ["demo-image", "no-such-model"] {
        let (status, body) = a.status(model, &id).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, &[model]);
    }
    let (status, again) = a.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, first, "the owner's view changed");

    // The other way round: a stranger's read before the owner's caches nothing it could see.
    let id2 = a.submit_ok("echo", json!({ "owner": "a", "n": 2 })).await;
    a.wait_final("echo", &id2, WAIT).await;
    // A restart empties the cache; then the stranger reads first.
    let dir = app.dir();
    app.stop().await.unwrap();
    let fresh = TestApp::start_in(dir, |_| {}).await;
    let (a, b) = (fresh.api.with_key(&a.key), fresh.api.with_key(&b.key));
    let (status, body) = b.status("echo", &id2).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id2]);
    let (status, body) = a.status("demo-image", &id2).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &["demo-image"]);
    let (status, body) = a.status("echo", &id2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["taskId"], id2.as_str(), "{body}");
    let (status, body) = b.status("echo", &id2).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id2]);
}

#[tokio::test]
async fn a_finished_tasks_status_is_answered_from_memory_while_the_store_fails() {
    let (app, plan) = TestApp::start_with_faults(|_| {}).await;
    let other = create_key(&app.data_dir, "never-used", None).await;
    // The revocation watcher's first reading empties the key cache; let it happen first, so
    // that what this test caches stays cached.
    wait_until(WAIT, "the first revocation check", || {
        let n = plan.calls("keys_revision");
        async move { n >= 1 }
    })
    .await;
    let id = app.api.submit_ok("echo", json!({ "cached": true })).await;
    app.api.wait_final("echo", &id, WAIT).await;
    let (status, before) = app.api.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{before}");

    plan.inject_next("get_task", u64::MAX, Fault::Fail);
    plan.inject_next("key_by_hash", u64::MAX, Fault::Fail);
    let (tasks_read, keys_read) = (plan.calls("get_task"), plan.calls("key_by_hash"));

    let (status, body) = app.api.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "success", "{body}");
    assert_eq!(body, before);
    assert_eq!(
        plan.calls("get_task"),
        tasks_read,
        "the view was read from the store"
    );
    assert_eq!(
        plan.calls("key_by_hash"),
        keys_read,
        "the key was read from the store"
    );

    // The faults are live: a task not in memory, or a key not in memory, needs the store.
    let (status, body) = app
        .api
        .status("echo", "task_01J0000000000000000000000Z")
        .await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, &[]);
    assert!(plan.calls("get_task") > tasks_read);
    let (status, body) = app.api.with_key(&other.key).status("echo", &id).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, &[]);
    assert!(plan.calls("key_by_hash") > keys_read);

    plan.clear();
    let (status, body) = app.api.with_key(&other.key).status("echo", &id).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, &[&id]);
}

#[tokio::test]
async fn while_the_revocation_check_fails_cached_keys_are_checked_against_the_store_again() {
    let (app, plan, id, before) = with_a_cached_finished_task().await;

    // The store cannot say whether a key was revoked, nor vouch for one: within a check or
    // two, the cached key is no longer taken on trust.
    plan.inject_next("keys_revision", u64::MAX, Fault::Fail);
    plan.inject_next("key_by_hash", u64::MAX, Fault::Fail);
    until_untrusted(&app, &id, &before).await;

    // Once the store answers again, so does the key.
    plan.clear();
    let (status, body) = app.api.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, before);
}

#[tokio::test]
async fn a_revocation_check_that_hangs_counts_as_failed_and_cached_keys_stop_being_trusted() {
    let (app, plan, id, before) = with_a_cached_finished_task().await;

    // A read that never answers (a half-dead connection) must not freeze the cache in place.
    plan.inject_next(
        "keys_revision",
        u64::MAX,
        Fault::Delay(Duration::from_secs(3600)),
    );
    plan.inject_next("key_by_hash", u64::MAX, Fault::Fail);
    until_untrusted(&app, &id, &before).await;
}

/// A server with a fault plan, past its first revocation check, with one finished task whose
/// status (returned) and key are now cached.
async fn with_a_cached_finished_task() -> (TestApp, std::sync::Arc<FaultPlan>, String, Value) {
    let (app, plan) = TestApp::start_with_faults(|_| {}).await;
    wait_until(WAIT, "the first revocation check", || {
        let n = plan.calls("keys_revision");
        async move { n >= 1 }
    })
    .await;
    let id = app.api.submit_ok("echo", json!({})).await;
    app.api.wait_final("echo", &id, WAIT).await;
    let (status, before) = app.api.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    (app, plan, id, before)
}

/// Polls the status of `id` (answered from memory as `before`) until the node stops trusting
/// its cached key and answers 503, within five revocation checks.
async fn until_untrusted(app: &TestApp, id: &str, before: &Value) {
    let deadline = tokio::time::Instant::now() + 5 * REVOCATION_CHECK;
    loop {
        let (status, body) = app.api.status("echo", id).await;
        match status {
            StatusCode::OK => assert_eq!(&body, before),
            StatusCode::SERVICE_UNAVAILABLE => return,
            other => panic!("{other}: {body}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cached key was still trusted {:?} after the store stopped answering",
            5 * REVOCATION_CHECK
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_within_the_check_interval_and_an_unused_one_at_once() {
    let app = TestApp::start().await;
    let used = create_key(&app.data_dir, "used", None).await;
    let unused = create_key(&app.data_dir, "unused", None).await;
    let (used_api, unused_api) = (app.api.with_key(&used.key), app.api.with_key(&unused.key));
    let id = used_api.submit_ok("echo", json!({})).await;
    let (status, body) = used_api.status("echo", &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let dir = app.data_dir.to_str().unwrap();
    for key in [&used, &unused] {
        let out = taskgate(&["keys", "revoke", &key.id, "--data-dir", dir]).await;
        assert!(out.status.success(), "{out:?}");
    }
    let revoked_at = tokio::time::Instant::now();

    // Never cached: refused by the very first request.
    let (status, body) = unused_api.submit("echo", json!({ "input": {} })).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);

    // Cached: refused once the watcher sees the revocation, well within 3 s.
    let limit = Duration::from_secs(3);
    loop {
        let (status, body) = used_api.status("echo", &id).await;
        match status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => {
                assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
                break;
            }
            other => panic!("{other}: {body}"),
        }
        assert!(
            revoked_at.elapsed() < limit,
            "a revoked key still worked {limit:?} after its revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And it stays refused, for every endpoint.
    let (status, body) = used_api.submit("echo", json!({ "input": {} })).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
    let (status, body) = used_api.status("echo", &id).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
}

/// The input is stored as the JSON text accepted and parsed only when an attempt starts: a text
/// that no longer parses fails the task with a message, it does not break status reads.
#[tokio::test]
async fn a_local_task_whose_stored_input_no_longer_parses_fails_and_still_answers_status() {
    use sqlx::Connection;
    let app = TestApp::start_with_models(
        "[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\nconcurrency = 1\n",
    )
    .await;
    let holder = app.api.submit_ok("echo", json!({ "delay_ms": 1500 })).await;
    let id = app.api.submit_ok("echo", json!({ "n": 1 })).await;
    let url = format!("sqlite://{}", app.data_dir.join("taskgate.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let changed =
        sqlx::query("UPDATE tasks SET input = '[1, 2' WHERE id = ? AND state = 'pending'")
            .bind(&id)
            .execute(&mut db)
            .await
            .unwrap()
            .rows_affected();
    db.close().await.unwrap();
    assert_eq!(changed, 1, "the second task was no longer pending");

    let data = app.api.wait_final("echo", &id, WAIT).await;
    assert_eq!(data["state"], "failed", "{data}");
    assert_eq!(data["failCode"], "INTERNAL_ERROR", "{data}");
    assert!(
        data["failMsg"].as_str().unwrap().contains("stored input"),
        "{data}"
    );
    let held = app.api.wait_final("echo", &holder, WAIT).await;
    assert_eq!(held["state"], "success", "{held}");
}
