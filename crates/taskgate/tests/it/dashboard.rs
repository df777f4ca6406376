//! The dashboard: what the server sends (headers, caching, no inline code), and the whole thing
//! in a real browser (`tests/browser/dashboard.mjs`: Debian's chromium driven by playwright-core)
//! against a real server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;

use crate::support::*;

/// Every file the page loads, with the type it must be served as.
const FILES: &[(&str, &str)] = &[
    ("/dashboard", "text/html; charset=utf-8"),
    ("/dashboard/", "text/html; charset=utf-8"),
    ("/dashboard/assets/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/assets/api.js", "text/javascript; charset=utf-8"),
    ("/dashboard/assets/sse.js", "text/javascript; charset=utf-8"),
    ("/dashboard/assets/dom.js", "text/javascript; charset=utf-8"),
    (
        "/dashboard/assets/tasks.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/dashboard/assets/task.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/dashboard/assets/operator.js",
        "text/javascript; charset=utf-8",
    ),
    ("/dashboard/assets/style.css", "text/css; charset=utf-8"),
    ("/dashboard/assets/favicon.svg", "image/svg+xml"),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self'; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn assert_hardened(path: &str, headers: &reqwest::header::HeaderMap) {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    assert_eq!(h("content-security-policy"), CSP, "{path}");
    assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
    assert_eq!(h("referrer-policy"), "no-referrer", "{path}");
}

#[tokio::test]
async fn dashboard_files_are_served_from_the_binary_under_a_strict_csp_and_revalidated_by_etag() {
    let app = TestApp::start().await;
    let http = reqwest::Client::new();
    for (path, content_type) in FILES {
        // No key: the page must load before anyone has signed in.
        let resp = http
            .get(format!("{}{path}", app.api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_hardened(path, resp.headers());
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            *content_type,
            "{path}"
        );
        let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
        let body = resp.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        if content_type.starts_with("text/html") {
            // The CSP forbids inline code; the page must need none.
            assert!(!body.contains("style="), "{path} has a style attribute");
            assert!(!body.contains("<style"), "{path} has a style element");
            for script in body.split("<script").skip(1) {
                assert!(
                    script.split('>').next().unwrap().contains("src="),
                    "{path} has an inline script"
                );
            }
        }
        if content_type.starts_with("text/javascript") {
            // Server data reaches the page as text only.
            assert!(!body.contains("innerHTML"), "{path} uses innerHTML");
            assert!(!body.contains("insertAdjacentHTML"), "{path}");
            assert!(!body.contains("document.write"), "{path}");
        }

        let again = http
            .get(format!("{}{path}", app.api.base))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), etag, "{path}");
        assert_hardened(path, again.headers());
    }

    let missing = http
        .get(format!("{}/dashboard/assets/nope.js", app.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_hardened("nope.js", missing.headers());
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Why the browser test cannot run here, if it cannot.
async fn browser_missing(root: &Path) -> Option<String> {
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if !matches!(node, Ok(s) if s.success()) {
        return Some("node is not installed (Node.js 20 or later)".into());
    }
    if !Path::new("/usr/bin/chromium").exists() {
        return Some("/usr/bin/chromium is missing (apt-get install chromium)".into());
    }
    if !root
        .join("tests/browser/node_modules/playwright-core")
        .exists()
    {
        return Some(
            "tests/browser/node_modules is missing (npm ci --prefix tests/browser)".into(),
        );
    }
    None
}

#[tokio::test]
async fn the_dashboard_signs_in_submits_previews_and_cancels_in_a_real_browser() {
    let root = repo_root();
    if let Some(why) = browser_missing(&root).await {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the dashboard's browser test, but {why}"
        );
        skip(&format!("the dashboard's browser test: {why}"));
        return;
    }
    let app = TestApp::start().await;
    // The README's pictures are refreshed only on request; otherwise they go to the target dir.
    let shots = if std::env::var("TASKGATE_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        root.join("docs/img")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots")
    };

    let run = tokio::process::Command::new("node")
        .arg(root.join("tests/browser/dashboard.mjs"))
        .env("BASE_URL", &app.api.base)
        .env("API_KEY", API_KEY)
        .env("SCREENSHOT_DIR", &shots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test did not finish within 240 s")
        .expect("node could not be started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("natural size"), "{stdout}");
    for shot in ["dashboard-tasks.png", "dashboard-task.png"] {
        let len = std::fs::metadata(shots.join(shot)).map(|m| m.len());
        assert!(matches!(len, Ok(n) if n > 0), "no screenshot {shot}");
    }
}
