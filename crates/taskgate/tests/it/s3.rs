//! Result files in S3: a real S3-compatible server (`moto_server`, from PyPI's `moto[server]`)
//! started by each test on a free loopback port, with taskgate uploading to it and handing out
//! presigned URLs.
//!
//! moto checks neither the signature nor the expiry of a presigned URL (any URL with a
//! `Signature` in it is let through, tampered or expired), so a tampered link cannot be shown to
//! get 403 here. Instead the tests recompute the SigV4 signature independently, from the AWS
//! documentation: a URL whose signature matches is one S3 accepts until `X-Amz-Expires`.

use std::process::Stdio;
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use taskgate_server::config::{ArtifactsConfig, FileConfig, S3Config, S3Credentials};

use crate::support::*;

const BUCKET: &str = "taskgate-results";
const ACCESS_KEY_ID: &str = "AKIATASKGATETEST";
const SECRET_ACCESS_KEY: &str = "taskgate-test-secret";
const REGION: &str = "us-east-1";

/// A `moto_server` child process; killed when dropped.
struct Moto {
    endpoint: String,
    _child: tokio::process::Child,
}

/// Starts moto on a free port and creates [`BUCKET`]; `None` (after printing `SKIPPED: ...`) when
/// moto is not installed, except under CI, which installs it and so must not skip.
async fn start_moto() -> Option<Moto> {
    let skip = |why: String| {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}; CI must install it (pip install 'moto[server]')"
        );
        skip(&format!(
            "{why}; install it with: pip install 'moto[server]'"
        ));
        None
    };
    // Ask the OS for a free port, then hand it to moto (which cannot report one it picked).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawned = tokio::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return skip(format!("moto_server cannot be started ({e})")),
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // A pyenv shim without moto behind it starts, then exits with 127.
        if let Some(status) = child.try_wait().unwrap() {
            return skip(format!("moto_server exited at once ({status})"));
        }
        // Creating the bucket doubles as the readiness check; moto needs no auth for it.
        if let Ok(resp) = http.put(format!("{endpoint}/{BUCKET}")).send().await {
            assert!(
                resp.status().is_success(),
                "moto refused to create the bucket: {}",
                resp.status()
            );
            return Some(Moto {
                endpoint,
                _child: child,
            });
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "moto_server did not answer on {endpoint} within 60s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn s3_config(moto: &Moto) -> S3Config {
    S3Config {
        endpoint: Some(moto.endpoint.clone()),
        region: REGION.to_owned(),
        prefix: Some("it/results".to_owned()),
        credentials: Some(S3Credentials {
            access_key_id: ACCESS_KEY_ID.to_owned(),
            secret_access_key: SECRET_ACCESS_KEY.to_owned(),
        }),
        ..S3Config::new(BUCKET)
    }
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SigV4's URI encoding: everything but unreserved characters is %XX.
fn aws_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The signature S3 would compute for a presigned GET `url` (query-string SigV4, host header
/// only, unsigned payload), written from the AWS documentation rather than taken from
/// object_store, so that it checks taskgate's URLs independently.
fn expected_signature(url: &reqwest::Url, secret: &str) -> String {
    let mut query: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (aws_encode(&k), aws_encode(&v)))
        .collect();
    query.sort();
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap()),
        None => url.host_str().unwrap().to_owned(),
    };
    let canonical_request = format!(
        "GET\n{}\n{canonical_query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
        url.path()
    );
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no {name} in {url}"))
            .1
            .into_owned()
    };
    let amz_date = param("X-Amz-Date");
    let credential = param("X-Amz-Credential");
    let scope = credential.split_once('/').unwrap().1;
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut parts = scope.split('/');
    let (day, region, service) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), day);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, service);
    let k_signing = hmac(&k_service, "aws4_request");
    hex(&hmac(&k_signing, &string_to_sign))
}

/// Asserts that `url` is a presigned GET real S3 would accept for about `ttl`, and that changing
/// its signature (or what it signs) breaks it.
fn assert_properly_presigned(url: &str, ttl: Duration) {
    let parsed = reqwest::Url::parse(url).unwrap();
    let param = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(
        param("X-Amz-Algorithm").as_deref(),
        Some("AWS4-HMAC-SHA256")
    );
    assert_eq!(param("X-Amz-SignedHeaders").as_deref(), Some("host"));
    let expires: u64 = param("X-Amz-Expires").unwrap().parse().unwrap();
    assert!(
        expires <= ttl.as_secs() && expires + 60 >= ttl.as_secs(),
        "X-Amz-Expires={expires}, want about {ttl:?} from completion"
    );
    assert!(
        param("X-Amz-Credential")
            .unwrap()
            .starts_with(&format!("{ACCESS_KEY_ID}/")),
        "{url}"
    );
    assert!(!url.contains(SECRET_ACCESS_KEY), "the secret leaked: {url}");
    let sig = param("X-Amz-Signature").unwrap();
    assert_eq!(
        sig,
        expected_signature(&parsed, SECRET_ACCESS_KEY),
        "the signature is not what S3 computes for {url}"
    );
    // Another object under the same signature does not verify.
    let mut other = parsed.clone();
    other.set_path(&format!("{}x", parsed.path()));
    assert_ne!(sig, expected_signature(&other, SECRET_ACCESS_KEY));
}

#[tokio::test]
async fn results_are_uploaded_to_s3_and_served_by_presigned_urls() {
    let Some(moto) = start_moto().await else {
        return;
    };
    let app = TestApp::start_with(|c| c.artifacts = ArtifactsConfig::S3(s3_config(&moto))).await;

    let echo = app
        .api
        .run_to_end("echo", json!({ "prompt": "to s3" }))
        .await;
    let image = app
        .api
        .run_to_end(
            "demo-image",
            json!({ "prompt": "a cat", "width": 48, "height": 32 }),
        )
        .await;

    assert_eq!(echo["state"], "success", "{echo}");
    assert_eq!(image["state"], "success", "{image}");
    let echo_url = result_urls(&echo).remove(0);
    let image_url = result_urls(&image).remove(0);
    let task_id = echo["taskId"].as_str().unwrap();
    // Outputs are staged under the attempt's tag: {task_id}/{16 hex}/{name}.
    let rest = echo_url
        .strip_prefix(&format!("{}/{BUCKET}/it/results/{task_id}/", moto.endpoint))
        .unwrap_or_else(|| panic!("{echo_url}"));
    let (tag, name) = rest.split_once('/').unwrap();
    assert!(
        tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
        "{echo_url}"
    );
    assert!(name.starts_with("result.json?"), "{echo_url}");

    let (status, ct, _, body) = fetch_url(&echo_url).await;
    assert_eq!(status, StatusCode::OK, "{echo_url}");
    assert_eq!(ct, "application/json");
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed, json!({ "prompt": "to s3" }));

    let (status, ct, _, body) = fetch_url(&image_url).await;
    assert_eq!(status, StatusCode::OK, "{image_url}");
    assert_eq!(ct, "image/png");
    assert_eq!(&body[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&body[16..24], &[0, 0, 0, 48, 0, 0, 0, 32], "48x32 IHDR");

    // Both URLs are signed the way S3 checks, for the default 24 h from completion.
    let ttl = Duration::from_secs(24 * 3600);
    assert_properly_presigned(&echo_url, ttl);
    assert_properly_presigned(&image_url, ttl);

    // The objects are private: without the presigned query the bucket refuses.
    let bare = echo_url.split_once('?').unwrap().0;
    assert_eq!(fetch_url(bare).await.0, StatusCode::FORBIDDEN, "{bare}");

    // This node serves no files of its own: result links point to the bucket.
    let (status, body) = envelope(
        app.api
            .http
            .get(format!(
                "{}/files/{task_id}/result.json?expires=9999999999&sig=00",
                app.api.base
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Every status read signs afresh, and the callback view uses the same store.
    let (_, again) = app.api.status("echo", task_id).await;
    let again_url = result_urls(&again["data"]).remove(0);
    assert_eq!(fetch_url(&again_url).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_file_larger_than_one_part_goes_up_in_parts_intact() {
    let Some(moto) = start_moto().await else {
        return;
    };
    // About 23 MB of distinct lines: parts out of order or lost would show in the bytes.
    let file = FileConfig::parse(
        r#"
        [models.big]
        backend = "command"
        command = ["sh", "-c", "seq 1 3000000 > \"$TASKGATE_OUTPUT_DIR/numbers.txt\""]
        timeout = "60s"
        "#,
    )
    .unwrap();
    let app = TestApp::start_with(|c| {
        c.models = file.models.unwrap();
        c.artifacts = ArtifactsConfig::S3(s3_config(&moto));
    })
    .await;

    let id = app.api.submit_ok("big", json!({})).await;
    let data = app
        .api
        .wait_final("big", &id, Duration::from_secs(120))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let url = &result_urls(&data)[0];
    let (status, ct, _, body) = fetch_url(url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/plain"), "{ct}");
    // A multipart object's ETag is `"MD5-PARTS"`; a single PUT's has no dash.
    let resp = reqwest::get(url).await.unwrap();
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.contains('-'), "not a multipart upload: ETag {etag}");
    let expected: String = (1..=3_000_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(body.len(), expected.len());
    assert!(body == expected.as_bytes(), "the downloaded bytes differ");
}

#[tokio::test]
async fn the_binary_selects_s3_from_flags_and_takes_credentials_from_the_aws_environment() {
    let Some(moto) = start_moto().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_full(
        dir.path(),
        None,
        &[
            "--s3-bucket",
            BUCKET,
            "--s3-endpoint",
            &moto.endpoint,
            "--s3-prefix",
            "from-flags",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
            ("AWS_REGION", REGION),
        ],
    )
    .await;

    let data = server
        .api
        .run_to_end("echo", json!({ "prompt": "flags" }))
        .await;

    assert_eq!(data["state"], "success", "{data}");
    let url = result_urls(&data).remove(0);
    assert!(
        url.starts_with(&format!("{}/{BUCKET}/from-flags/", moto.endpoint)),
        "{url}"
    );
    assert_properly_presigned(&url, Duration::from_secs(24 * 3600));
    let (status, _, _, body) = fetch_url(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({ "prompt": "flags" })
    );
    server.terminate().await;
}
