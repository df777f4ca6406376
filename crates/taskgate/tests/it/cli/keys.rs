//! `taskgate keys create/list/revoke` through the real binary, as text and as JSON, and the
//! tenancy they set up.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::cli_env;
use crate::support::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn keys_create_prints_a_long_random_key_as_the_last_word_of_the_last_line() {
    let dir = tempfile::tempdir().unwrap();

    let a = create_key(dir.path(), "alice", None).await;
    let b = create_key(dir.path(), "bob", None).await;

    assert_ne!(a.key, b.key);
    assert_ne!(a.id, b.id);
    for k in [&a, &b] {
        assert!(k.key.len() >= 32, "{}", k.key);
        assert!(k.key.starts_with("tg_"), "{}", k.key);
        assert!(
            k.stdout.contains("only"),
            "should warn it is shown once: {}",
            k.stdout
        );
    }
}

#[tokio::test]
async fn a_key_created_before_the_server_starts_works_and_so_does_one_created_while_it_runs() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let early = create_key(dir.path(), "early", None).await;
    let app = TestApp::start_in(dir.clone(), |_| {}).await;

    let late = create_key(&app.data_dir, "late", None).await;

    for key in [&early.key, &late.key] {
        let api = app.api.with_key(key);
        let data = api.run_to_end("echo", json!({})).await;
        assert_eq!(data["state"], "success", "{data}");
    }
}

#[tokio::test]
async fn keys_joined_with_tenant_see_each_others_tasks_and_other_tenants_do_not() {
    let app = TestApp::start().await;
    let alice = create_key(&app.data_dir, "alice", None).await;
    let laptop = create_key(&app.data_dir, "alice-laptop", Some("alice")).await;
    let bob = create_key(&app.data_dir, "bob", None).await;
    let (alice, laptop, bob) = (
        app.api.with_key(&alice.key),
        app.api.with_key(&laptop.key),
        app.api.with_key(&bob.key),
    );

    let id = alice.submit_ok("echo", json!({ "who": "alice" })).await;
    let seen_by_laptop = laptop
        .wait_final("echo", &id, Duration::from_secs(10))
        .await;
    let (bob_status, bob_body) = bob.status("echo", &id).await;
    let (default_status, _) = app.api.status("echo", &id).await;

    assert_eq!(seen_by_laptop["state"], "success", "{seen_by_laptop}");
    assert_eq!(bob_status, StatusCode::NOT_FOUND, "{bob_body}");
    assert_eq!(default_status, StatusCode::NOT_FOUND);
    // And the other way round: the laptop's task is alice's too.
    let id2 = laptop.submit_ok("echo", json!({})).await;
    alice
        .wait_final("echo", &id2, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn keys_list_shows_every_key_without_the_key_itself() {
    let dir = tempfile::tempdir().unwrap();
    let a = create_key(dir.path(), "ci-runner", None).await;
    let b = create_key(dir.path(), "ci-runner-2", Some("ci-runner")).await;
    let d = dir.path().to_str().unwrap();
    let revoked = taskgate(&["keys", "revoke", &b.id, "--data-dir", d]).await;
    assert!(revoked.status.success(), "{}", text(&revoked));

    let out = taskgate(&["keys", "list", "--data-dir", d]).await;

    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains(&a.id) && listing.contains(&b.id),
        "{listing}"
    );
    assert!(listing.contains("ci-runner-2"), "{listing}");
    assert!(
        !listing.contains(&a.key) && !listing.contains(&b.key),
        "keys leaked: {listing}"
    );
    let line_of = |id: &str| listing.lines().find(|l| l.contains(id)).unwrap().to_owned();
    assert!(line_of(&a.id).contains("active"), "{listing}");
    assert!(line_of(&b.id).contains("revoked"), "{listing}");
}

#[tokio::test]
async fn keys_commands_refuse_bad_requests_with_a_message_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    create_key(dir.path(), "taken", None).await;

    let no_tenant = taskgate(&[
        "keys",
        "create",
        "--name",
        "x",
        "--tenant",
        "ghost",
        "--data-dir",
        d,
    ])
    .await;
    let duplicate = taskgate(&["keys", "create", "--name", "taken", "--data-dir", d]).await;
    let no_key = taskgate(&["keys", "revoke", "key_nonexistent", "--data-dir", d]).await;

    assert!(!no_tenant.status.success());
    assert!(text(&no_tenant).contains("ghost"), "{}", text(&no_tenant));
    assert!(!duplicate.status.success());
    assert!(
        text(&duplicate).contains("--tenant"),
        "{}",
        text(&duplicate)
    );
    assert!(!no_key.status.success());
    assert!(
        text(&no_key).contains("key_nonexistent"),
        "{}",
        text(&no_key)
    );
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_a_running_server_and_others_keep_working() {
    let app = TestApp::start().await;
    let keep = create_key(&app.data_dir, "keep", None).await;
    let drop = create_key(&app.data_dir, "drop", Some("keep")).await;
    let d = app.data_dir.to_str().unwrap();

    let out = taskgate(&["keys", "revoke", &drop.id, "--data-dir", d]).await;

    assert!(out.status.success(), "{}", text(&out));
    let (status, body) = app
        .api
        .with_key(&drop.key)
        .submit("echo", json!({ "input": {} }))
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, &["revoked"]);
    let (status, body) = app
        .api
        .with_key(&keep.key)
        .submit("echo", json!({ "input": {} }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn keys_list_and_revoke_refuse_a_directory_without_a_store_and_create_says_which_store() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("not-the-data-dir");
    std::fs::create_dir_all(&empty).unwrap();
    let d = empty.to_str().unwrap();
    for args in [
        vec!["keys", "list", "--data-dir", d],
        vec!["keys", "revoke", "key_x", "--data-dir", d],
    ] {
        let out = taskgate(&args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no taskgate store") && stderr.contains(d),
            "{args:?}: {stderr}"
        );
        // Nothing was created where the key would have been lost.
        assert!(
            !empty.join("taskgate.db").exists(),
            "{args:?} created a store"
        );
    }
    let created = create_key(&empty, "first", None).await;
    assert!(created.key.len() >= 16);
    let out = taskgate(&["keys", "list", "--data-dir", d]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Using the store: SQLite at") && stderr.contains(d),
        "{stderr}"
    );
}

#[tokio::test]
async fn keys_help_shows_each_default_once_and_describes_the_revoke_argument() {
    let list = taskgate(&["keys", "list", "--help"]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert_eq!(text.matches("[default: ./data]").count(), 1, "{text}");
    let revoke = taskgate(&["keys", "revoke", "--help"]).await;
    let text = String::from_utf8_lossy(&revoke.stdout);
    assert!(text.contains("as `keys list` shows it"), "{text}");
}

#[tokio::test]
async fn keys_commands_with_json_print_one_document_each_and_name_the_store_on_stderr() {
    let app = TestApp::start().await;
    let d = app.data_dir.to_str().unwrap();

    let created = cli_env(
        &[],
        &["keys", "create", "--name", "ci", "--json", "--data-dir", d],
    )
    .await;
    let token = cli_env(
        &[],
        &[
            "keys",
            "create",
            "--worker",
            "--name",
            "gpu",
            "--json",
            "--data-dir",
            d,
        ],
    )
    .await;

    created.assert_exit(0);
    let key = created.json();
    let fields = |v: &Value| {
        let mut names: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    assert_eq!(
        fields(&key),
        ["apiKey", "id", "kind", "name", "tenant"],
        "{created}"
    );
    assert_eq!(
        (&key["kind"], &key["name"], &key["tenant"]),
        (&json!("client"), &json!("ci"), &json!("ci")),
        "{created}"
    );
    assert!(
        created.stderr.contains("Using the store: SQLite at"),
        "{created}"
    );
    let api_key = key["apiKey"].as_str().unwrap();
    let data = app
        .api
        .with_key(api_key)
        .run_to_end("echo", json!({}))
        .await;
    assert_eq!(data["state"], "success", "{data}");
    token.assert_exit(0);
    assert_eq!(token.json()["kind"], "worker", "{token}");
    assert!(
        token.json()["apiKey"].as_str().unwrap().starts_with("tgw_"),
        "{token}"
    );

    let id = key["id"].as_str().unwrap();
    let revoked = cli_env(&[], &["keys", "revoke", id, "--json", "--data-dir", d]).await;
    let listed = cli_env(&[], &["keys", "list", "--json", "--data-dir", d]).await;

    revoked.assert_exit(0);
    assert_eq!(
        revoked.json(),
        json!({ "id": id, "revoked": true }),
        "{revoked}"
    );
    listed.assert_exit(0);
    assert!(
        !listed.stdout.contains(api_key),
        "the key leaked:\n{listed}"
    );
    let list = listed.json();
    let entry = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in:\n{listed}"))
            .clone()
    };
    let ci = entry(id);
    assert_eq!(
        fields(&ci),
        [
            "concurrentTasks",
            "createdAt",
            "id",
            "kind",
            "models",
            "name",
            "prefix",
            "readOnly",
            "requestsPerMinute",
            "revokedAt",
            "tenant"
        ],
        "{listed}"
    );
    assert!(
        api_key.starts_with(ci["prefix"].as_str().unwrap()),
        "{listed}"
    );
    assert!(
        ci["createdAt"].is_i64() && ci["revokedAt"].is_i64(),
        "{listed}"
    );
    let gpu = entry(token.json()["id"].as_str().unwrap());
    assert!(gpu["revokedAt"].is_null(), "{listed}");
}

#[tokio::test]
async fn a_failed_keys_command_under_json_prints_an_error_document_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    create_key(dir.path(), "taken", None).await;

    let run = cli_env(
        &[],
        &[
            "keys",
            "revoke",
            "key_nonexistent",
            "--json",
            "--data-dir",
            d,
        ],
    )
    .await;

    run.assert_exit(1);
    let err = &run.json()["error"];
    assert_eq!(err["kind"], "keys", "{run}");
    assert_eq!(err["exitCode"], 1, "{run}");
    assert!(
        err["message"].as_str().unwrap().contains("key_nonexistent"),
        "{run}"
    );
    assert!(run.error_line().contains("key_nonexistent"), "{run}");
}

#[tokio::test]
async fn a_new_bootstrap_key_replaces_the_old_one_and_listings_show_neither() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let first = "boot-first-short";
    let second = "boot-second-short";
    let app = TestApp::start_in(dir.clone(), |c| c.bootstrap_api_key = Some(first.into())).await;
    app.api.with_key(first).submit_ok("echo", json!({})).await;
    app.stop().await.unwrap();

    let app = TestApp::start_in(dir.clone(), |c| c.bootstrap_api_key = Some(second.into())).await;

    let (status, body) = app.api.with_key(first).status("echo", "task_x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "key_revoked", "{body}");
    app.api.with_key(second).submit_ok("echo", json!({})).await;
    // A restart with the same key keeps it.
    app.stop().await.unwrap();
    let app = TestApp::start_in(dir.clone(), |c| c.bootstrap_api_key = Some(second.into())).await;
    app.api.with_key(second).submit_ok("echo", json!({})).await;

    let out = taskgate(&[
        "keys",
        "list",
        "--data-dir",
        &app.data_dir.to_string_lossy(),
    ])
    .await;
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    assert!(listed.contains("sha256:"), "{listed}");
    for secret in [first, second] {
        assert!(!listed.contains(&secret[..6]), "{listed}");
    }
}
