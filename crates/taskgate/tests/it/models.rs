//! `GET /api/v1/models` and the models' input schemas: what is listed, what a submit that breaks a
//! schema is told, and the schemas a start refuses.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_server::config::FileConfig;

use crate::support::*;

/// `GET /api/v1/models` with `api`'s key (none when `key` is false).
async fn list(api: &Api, key: bool) -> (StatusCode, Value) {
    let mut req = api.http.get(format!("{}/api/v1/models", api.base));
    if key {
        req = req.bearer_auth(&api.key);
    }
    envelope(req.send().await.unwrap()).await
}

/// The listed model named `name`.
fn listed<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["data"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {body}"))
}

const SDXL_SCHEMA: &str = r#"
type = "object"
required = ["prompt"]
additionalProperties = false
[properties.prompt]
type = "string"
minLength = 1
[properties.width]
type = "integer"
minimum = 64
maximum = 4096
"#;

/// A config file in `dir`: `sdxl` with an inline schema and listing keys, `upscale` with a schema
/// file next to the config (named relatively), `plain` with no schema. All `worker` models, so
/// accepted tasks just wait.
fn write_config(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    std::fs::write(
        dir.join("schemas/upscale.json"),
        r#"{"type": "object", "required": ["image_url"], "properties": {"image_url": {"type": "string", "format": "uri"}, "scale": {"enum": [2, 4]}}}"#,
    )
    .unwrap();
    let mut sdxl_table = String::new();
    for line in SDXL_SCHEMA.lines() {
        // The schema's own tables nest under the model's input_schema.
        match line.strip_prefix("[properties.") {
            Some(rest) => {
                sdxl_table.push_str(&format!("[models.sdxl.input_schema.properties.{rest}\n"))
            }
            None => {
                sdxl_table.push_str(line);
                sdxl_table.push('\n');
            }
        }
    }
    let config = format!(
        r#"
[models.upscale]
backend = "worker"
input_schema = "schemas/upscale.json"

[models.plain]
backend = "worker"

[models.sdxl]
backend = "worker"
poll_interval = "15s"
modes = ["async", "callback", "text-to-image"]
description = "Stable Diffusion XL"

[models.sdxl.input_schema]
{sdxl_table}"#
    );
    let path = dir.join("taskgate.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A server with the models of [`write_config`], loaded from a file in another directory than
/// the working one.
async fn start_with_schemas() -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let models = FileConfig::load(&write_config(dir.path()))
        .unwrap()
        .models
        .unwrap();
    (TestApp::start_with(move |c| c.models = models).await, dir)
}

#[tokio::test]
async fn a_default_server_lists_echo_and_demo_image_with_their_schemas_and_poll_intervals() {
    let app = TestApp::start().await;

    let (status, body) = list(&app.api, true).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body["data"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo-image", "echo"], "sorted by name: {body}");
    for name in names {
        let m = listed(&body, name);
        assert_eq!(m["modes"], json!(["async", "callback"]), "{m}");
        assert_eq!(m["pollIntervalMs"], 1000, "{m}");
        assert!(m.get("description").is_none(), "{m}");
    }
    let image = &listed(&body, "demo-image")["inputSchema"];
    assert_eq!(image["type"], "object", "{image}");
    assert_eq!(image["properties"]["width"]["maximum"], 4096, "{image}");
    assert_eq!(image["properties"]["height"]["minimum"], 1, "{image}");
    let echo = &listed(&body, "echo")["inputSchema"];
    assert_eq!(echo["properties"]["delay_ms"]["minimum"], 0, "{echo}");
    assert!(echo["properties"]["fail"].is_object(), "{echo}");
}

#[tokio::test]
async fn inline_and_file_schemas_are_listed_with_the_models_settings() {
    let (app, _dir) = start_with_schemas().await;

    let (status, body) = list(&app.api, true).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let sdxl = listed(&body, "sdxl");
    assert_eq!(
        sdxl["inputSchema"],
        json!({
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": false,
            "properties": {
                "prompt": {"type": "string", "minLength": 1},
                "width": {"type": "integer", "minimum": 64, "maximum": 4096}
            }
        }),
        "the TOML table, as JSON"
    );
    assert_eq!(sdxl["pollIntervalMs"], 15_000);
    assert_eq!(sdxl["modes"], json!(["async", "callback", "text-to-image"]));
    assert_eq!(sdxl["description"], "Stable Diffusion XL");
    let upscale = listed(&body, "upscale");
    assert_eq!(upscale["inputSchema"]["required"], json!(["image_url"]));
    assert_eq!(
        upscale["pollIntervalMs"], 3000,
        "the default for models not builtin"
    );
    let plain = listed(&body, "plain");
    assert!(plain.get("inputSchema").is_none(), "{plain}");
}

#[tokio::test]
async fn a_submit_breaking_two_constraints_is_refused_naming_both_pointers() {
    let (app, _dir) = start_with_schemas().await;

    let (status, body) = app
        .api
        .submit("sdxl", json!({"input": {"width": 5000}}))
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "invalid_input");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("input does not match model \"sdxl\"'s schema: "),
        "{message}"
    );
    assert!(
        message.contains("/width: 5000 is greater than the maximum of 4096"),
        "{message}"
    );
    assert!(
        message.contains("/prompt: \"prompt\" is a required property"),
        "{message}"
    );
}

#[tokio::test]
async fn a_submit_matching_the_schema_is_accepted() {
    let (app, _dir) = start_with_schemas().await;

    let id = app
        .api
        .submit_ok("sdxl", json!({"prompt": "a fox", "width": 1024}))
        .await;
    let from_file = app
        .api
        .submit_ok(
            "upscale",
            json!({"image_url": "https://example.com/a.png", "scale": 4}),
        )
        .await;

    let (status, body) = app.api.status("sdxl", &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "pending");
    let (status, body) = app
        .api
        .submit("upscale", json!({"input": {"scale": 3}}))
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{body} (after {from_file})"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("/scale") && message.contains("/image_url"),
        "{message}"
    );
}

#[tokio::test]
async fn a_model_without_a_schema_accepts_any_input_object() {
    let (app, _dir) = start_with_schemas().await;

    app.api
        .submit_ok(
            "plain",
            json!({"anything": [1, {"x": null}], "width": "wide"}),
        )
        .await;
}

#[tokio::test]
async fn the_builtins_schemas_answer_before_their_own_checks() {
    let app = TestApp::start().await;

    let (status, body) = app
        .api
        .submit(
            "demo-image",
            json!({"input": {"width": 0, "height": "tall"}}),
        )
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("/width: 0 is less than the minimum of 1") && message.contains("/height"),
        "{message}"
    );
}

/// `run` with `models`: it must refuse to start. Returns its error.
async fn start_must_fail(models: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut config = taskgate_server::Config::new(dir.path());
    config.models = FileConfig::parse(models).unwrap().models.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        taskgate_server::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the server started with a bad schema");
    outcome.unwrap_err().to_string()
}

#[tokio::test]
async fn an_invalid_schema_stops_the_start_naming_the_model_and_the_problem() {
    let err = start_must_fail(
        "[models.bad]\nbackend = \"worker\"\ninput_schema = { type = 12 }\n\
         [models.good]\nbackend = \"worker\"\n",
    )
    .await;

    assert!(err.contains("models.bad.input_schema"), "{err}");
    assert!(err.contains("not a valid JSON Schema"), "{err}");

    let err = start_must_fail(
        "[models.gone]\nbackend = \"worker\"\ninput_schema = \"/nonexistent/schema.json\"\n",
    )
    .await;
    assert!(
        err.contains("models.gone.input_schema") && err.contains("/nonexistent/schema.json"),
        "{err}"
    );
}

#[tokio::test]
async fn a_remote_ref_stops_serve_at_load_naming_the_model_and_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskgate.toml");
    std::fs::write(
        &config,
        "[models.remote]\nbackend = \"worker\"\n\
         [models.remote.input_schema.properties.size]\n\"$ref\" = \"https://example.com/size.json\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");

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

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {stderr}");
    assert!(
        stderr.contains("models.remote.input_schema")
            && stderr.contains("https://example.com/size.json")
            && stderr.contains("does not fetch"),
        "{stderr}"
    );
}

#[tokio::test]
async fn listing_models_needs_a_client_key() {
    let app = TestApp::start().await;

    let (status, body) = list(&app.api, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "missing_api_key");

    let (status, body) = list(&app.api.with_key("tg_not-a-key"), true).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "invalid_api_key");
}
