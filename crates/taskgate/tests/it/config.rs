//! `taskgate serve --config F`: a bad file stops the start with a message naming the setting;
//! a good one decides exactly which models are offered.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

/// Runs `serve` with `config` (a TOML text); it must exit non-zero. Returns stderr.
pub async fn serve_must_refuse(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskgate.toml");
    std::fs::write(&path, config).unwrap();
    serve_must_refuse_file(&path, dir.path()).await
}

async fn serve_must_refuse_file(config: &Path, dir: &Path) -> String {
    let data = dir.join("data");
    let out = taskgate(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "serve started with a bad config; stderr: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "serve listened before refusing"
    );
    stderr
}

fn assert_names(stderr: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr does not mention {n:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn an_unknown_server_setting_stops_the_start_naming_it() {
    let stderr = serve_must_refuse("[server]\nlisten_addr = \"127.0.0.1:1\"\n").await;
    assert_names(&stderr, &["listen_addr"]);
}

#[tokio::test]
async fn an_unknown_top_level_table_stops_the_start_naming_it() {
    let stderr =
        serve_must_refuse("[modles.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n").await;
    assert_names(&stderr, &["modles"]);
}

#[tokio::test]
async fn a_misspelt_model_setting_stops_the_start_naming_it() {
    let stderr = serve_must_refuse(
        "[models.sd]\nbackend = \"command\"\ncommand = [\"true\"]\nconcurency = 2\n",
    )
    .await;
    assert_names(&stderr, &["concurency"]);
}

#[tokio::test]
async fn an_empty_command_stops_the_start_naming_the_setting() {
    let stderr = serve_must_refuse("[models.sd]\nbackend = \"command\"\ncommand = []\n").await;
    assert_names(&stderr, &["models.sd.command"]);
}

#[tokio::test]
async fn a_bad_upstream_url_stops_the_start_naming_the_setting() {
    for url in ["not a url", "ftp://example.com/x", "/relative"] {
        let stderr = serve_must_refuse(&format!(
            "[models.up]\nbackend = \"http\"\nurl = {}\n",
            toml_str(url)
        ))
        .await;
        assert_names(&stderr, &["models.up.url"]);
    }
}

#[tokio::test]
async fn out_of_range_model_settings_stop_the_start_naming_them() {
    for (setting, line) in [
        ("models.m.concurrency", "concurrency = 0"),
        ("models.m.max_attempts", "max_attempts = 0"),
        ("models.m.timeout", "timeout = \"0s\""),
    ] {
        let stderr = serve_must_refuse(&format!(
            "[models.m]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n{line}\n"
        ))
        .await;
        assert_names(&stderr, &[setting]);
    }
}

#[tokio::test]
async fn an_unknown_backend_or_builtin_stops_the_start_naming_it() {
    let stderr = serve_must_refuse("[models.m]\nbackend = \"grpc\"\n").await;
    assert_names(&stderr, &["grpc"]);
    let stderr =
        serve_must_refuse("[models.m]\nbackend = \"builtin\"\nbuiltin = \"mirror\"\n").await;
    assert_names(&stderr, &["mirror"]);
}

#[tokio::test]
async fn a_config_file_that_does_not_parse_or_exist_stops_the_start_naming_the_file() {
    let stderr = serve_must_refuse("[models.m\nbackend = ").await;
    assert_names(&stderr, &["taskgate.toml"]);

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let stderr = serve_must_refuse_file(&missing, dir.path()).await;
    assert_names(&stderr, &["missing.toml"]);
}

#[tokio::test]
async fn a_models_table_with_no_model_stops_the_start_naming_the_setting() {
    let stderr = serve_must_refuse("[models]\n").await;
    assert_names(&stderr, &["models", "[models.NAME]"]);
}

#[tokio::test]
async fn a_bad_public_url_stops_the_start_naming_the_setting() {
    let stderr = serve_must_refuse("[server]\npublic_url = \"tasks.example.com\"\n").await;
    assert_names(&stderr, &["public_url"]);
}

#[tokio::test]
async fn a_valid_config_offers_exactly_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskgate.toml");
    std::fs::write(
        &path,
        "[models.only-this]\nbackend = \"builtin\"\nbuiltin = \"echo\"\nconcurrency = 1\n",
    )
    .unwrap();
    let server = ServerProcess::spawn_with(&dir.path().join("data"), Some(&path), &[]).await;

    let data = server.api.run_to_end("only-this", json!({ "a": 1 })).await;
    let (status, body) = server.api.submit("echo", json!({ "input": {} })).await;

    assert_eq!(data["state"], "success", "{data}");
    let msg = assert_error(status, &body, StatusCode::NOT_FOUND, &["only-this"]);
    assert!(!msg.contains("demo-image"), "{msg}");
    server.kill9().await;
}

#[tokio::test]
async fn without_a_config_serve_offers_exactly_echo_and_demo_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_with(&dir.path().join("data"), None, &[]).await;

    let (status, body) = server.api.submit("nope", json!({ "input": {} })).await;

    let msg = assert_error(status, &body, StatusCode::NOT_FOUND, &["nope"]);
    let offered = msg.rsplit(':').next().unwrap().trim();
    assert_eq!(offered, "demo-image, echo", "{msg}");
    server.kill9().await;
}

#[test]
fn a_model_table_of_each_backend_kind_parses_with_its_settings() {
    let text = r#"
        [models.img]
        backend = "builtin"
        builtin = "demo-image"
        concurrency = 2

        [models.sd]
        backend = "command"
        command = ["python3", "sd.py"]
        env = { CUDA_VISIBLE_DEVICES = "0" }
        timeout = "90s"
        max_attempts = 5

        [models.up]
        backend = "http"
        url = "https://models.example.com/generate"
        headers = { Authorization = "Bearer x" }
        response = "json"
        url_pointers = ["/images"]
    "#;

    let file = taskgate_server::config::FileConfig::parse(text);

    let models = file
        .unwrap_or_else(|e| panic!("a valid config file was refused: {e}"))
        .models
        .unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(models["img"].concurrency, 2);
    assert_eq!(models["sd"].timeout, std::time::Duration::from_secs(90));
    assert_eq!(models["sd"].max_attempts, 5);
}

/// Submits a body of about `size` bytes; returns the HTTP status.
async fn submit_of_size(api: &Api, size: usize) -> StatusCode {
    let body = json!({ "input": { "p": "x".repeat(size) } });
    api.submit("echo", body).await.0
}

#[tokio::test]
async fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskgate.toml");
    std::fs::write(&path, "[server]\nmax_body_bytes = 300\n").unwrap();
    let data = dir.path().join("data");

    // File only: 300 bytes.
    let file_only = ServerProcess::spawn_with(&data, Some(&path), &[]).await;
    let file_small = submit_of_size(&file_only.api, 100).await;
    let file_big = submit_of_size(&file_only.api, 1000).await;
    file_only.terminate().await;
    // The environment over the file: 3000 bytes.
    let env = [("TASKGATE_MAX_BODY_BYTES", "3000")];
    let env_over_file = ServerProcess::spawn_full(&data, Some(&path), &[], &env).await;
    let env_big = submit_of_size(&env_over_file.api, 1000).await;
    env_over_file.terminate().await;
    // A flag over both: 300 bytes again.
    let flag =
        ServerProcess::spawn_full(&data, Some(&path), &["--max-body-bytes", "300"], &env).await;
    let flag_big = submit_of_size(&flag.api, 1000).await;
    flag.terminate().await;

    assert_eq!(file_small, StatusCode::OK);
    assert_eq!(file_big, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(env_big, StatusCode::OK);
    assert_eq!(flag_big, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn the_shutdown_grace_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TASKGATE_SHUTDOWN_GRACE", "100ms")];
    let server = ServerProcess::spawn_full(&dir.path().join("data"), None, &[], &env).await;
    let id = server
        .api
        .submit_ok("echo", json!({ "delay_ms": 60_000 }))
        .await;
    server
        .api
        .wait_for("echo", &id, std::time::Duration::from_secs(10), |d| {
            d["state"] == "processing"
        })
        .await;

    let started = std::time::Instant::now();
    let status = server.terminate().await;

    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the 100ms grace was not honoured: exit took {:?}",
        started.elapsed()
    );
}
