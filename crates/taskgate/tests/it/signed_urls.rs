//! Result URLs: signed, expiring, and refused when anything in them is changed.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

/// A finished echo task's one result URL, split into its path and its `expires` and `sig`.
struct Link {
    base: String,
    path: String,
    expires: String,
    sig: String,
}

impl Link {
    fn parse(base: &str, url: &str) -> Link {
        let rest = url.strip_prefix(base).unwrap();
        let (path, query) = rest.split_once('?').unwrap();
        let mut expires = None;
        let mut sig = None;
        for pair in query.split('&') {
            match pair.split_once('=').unwrap() {
                ("expires", v) => expires = Some(v.to_owned()),
                ("sig", v) => sig = Some(v.to_owned()),
                _ => {}
            }
        }
        Link {
            base: base.to_owned(),
            path: path.to_owned(),
            expires: expires.unwrap(),
            sig: sig.unwrap(),
        }
    }

    fn url(&self, path: &str, query: &str) -> String {
        format!("{}{path}?{query}", self.base)
    }

    fn with(&self, expires: &str, sig: &str) -> String {
        self.url(&self.path, &format!("expires={expires}&sig={sig}"))
    }
}

async fn finished_link(app: &TestApp) -> (Link, String) {
    let data = app.api.run_to_end("echo", json!({ "secret": 42 })).await;
    assert_eq!(data["state"], "success", "{data}");
    let url = result_urls(&data).remove(0);
    (Link::parse(&app.api.base, &url), url)
}

/// GETs `url` without a key; asserts it is refused with 403 or 404 in the envelope.
async fn assert_refused(url: &str) {
    let resp = reqwest::get(url).await.unwrap();
    let status = resp.status();
    assert!(
        status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
        "{url} answered {status}"
    );
    let (_, body) = envelope(resp).await;
    assert!(
        !body.to_string().contains("secret"),
        "a refused link leaked the file: {body}"
    );
}

#[tokio::test]
async fn a_result_url_works_without_a_key_and_says_how_long_to_cache() {
    let app = TestApp::start().await;
    let (link, url) = finished_link(&app).await;

    let resp = reqwest::get(&url).await.unwrap();

    assert_eq!(resp.status(), StatusCode::OK);
    let cache = resp.headers()["cache-control"].to_str().unwrap().to_owned();
    assert!(cache.starts_with("private"), "{cache}");
    // Opened directly, a result runs nothing on the dashboard's origin.
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("sandbox;"), "{csp}");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let expires: i64 = link.expires.parse().unwrap();
    let now = taskgate_server::domain::now_ms() / 1000;
    assert!(
        (now + 23 * 3600..=now + 24 * 3600 + 60).contains(&expires),
        "expires {expires} is not about 24 h from now ({now})"
    );
}

#[tokio::test]
async fn a_tampered_signature_is_refused() {
    let app = TestApp::start().await;
    let (link, _) = finished_link(&app).await;
    let mut flipped = link.sig.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();

    assert_refused(&link.with(&link.expires, &flipped)).await;
    assert_refused(&link.with(&link.expires, &link.sig[..link.sig.len() - 2])).await;
    assert_refused(&link.with(&link.expires, "not-hex")).await;
    assert_refused(&link.with(&link.expires, "")).await;
}

#[tokio::test]
async fn a_changed_expiry_is_refused() {
    let app = TestApp::start().await;
    let (link, _) = finished_link(&app).await;
    let expires: i64 = link.expires.parse().unwrap();

    assert_refused(&link.with(&(expires + 1).to_string(), &link.sig)).await;
    assert_refused(&link.with(&(expires + 86_400 * 365).to_string(), &link.sig)).await;
    assert_refused(&link.with("never", &link.sig)).await;
}

#[tokio::test]
async fn the_signature_of_one_file_does_not_open_another() {
    let app = TestApp::start().await;
    let (link, _) = finished_link(&app).await;
    let (other, _) = finished_link(&app).await;
    let query = format!("expires={}&sig={}", link.expires, link.sig);
    let task_dir = link.path.rsplit_once('/').unwrap().0;

    assert_refused(&link.url(&format!("{task_dir}/other.json"), &query)).await;
    assert_refused(&link.url(&other.path, &query)).await;
    assert_refused(&link.url(&format!("{task_dir}/..%2F..%2Ftaskgate.db"), &query)).await;
    assert_refused(&link.url("/files/..%2Ftaskgate.db/x", &query)).await;
}

#[tokio::test]
async fn a_link_missing_its_signature_or_expiry_is_refused() {
    let app = TestApp::start().await;
    let (link, _) = finished_link(&app).await;

    assert_refused(&link.url(&link.path, &format!("expires={}", link.expires))).await;
    assert_refused(&link.url(&link.path, &format!("sig={}", link.sig))).await;
    assert_refused(&link.url(&link.path, "")).await;
    assert_refused(&format!("{}{}", link.base, link.path)).await;
}

#[tokio::test]
async fn an_expired_link_is_refused() {
    let app = TestApp::start_with(|c| c.server.result_url_ttl = Duration::from_secs(1)).await;
    let (link, url) = finished_link(&app).await;
    assert_eq!(reqwest::get(&url).await.unwrap().status(), StatusCode::OK);

    // The link names its own expiry: wait for that second to pass, then it must be refused.
    let expires: i64 = link.expires.parse().unwrap();
    wait_until(Duration::from_secs(5), "the link's expiry", || async {
        taskgate_server::domain::now_ms() / 1000 > expires
    })
    .await;

    assert_refused(&url).await;
}

#[tokio::test]
async fn outputs_a_browser_would_run_are_served_as_attachments_and_media_inline() {
    let app =
        TestApp::start_with_models(&command_model("active", "active_outputs.sh", &[], "")).await;

    let data = app.api.run_to_end("active", json!({})).await;

    assert_eq!(data["state"], "success", "{data}");
    let mut seen = 0;
    for url in result_urls(&data) {
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let name = url.split('?').next().unwrap().rsplit('/').next().unwrap();
        assert_eq!(h("x-content-type-options"), "nosniff", "{name}");
        match name.rsplit('.').next().unwrap() {
            "html" | "svg" | "js" | "xml" => {
                assert_eq!(h("content-type"), "application/octet-stream", "{name}");
                assert_eq!(
                    h("content-disposition"),
                    format!("attachment; filename=\"{name}\""),
                    "{name}"
                );
            }
            "png" => {
                assert_eq!(h("content-type"), "image/png", "{name}");
                assert_eq!(h("content-disposition"), "", "{name}");
            }
            "txt" => {
                assert_eq!(h("content-type"), "text/plain; charset=utf-8", "{name}");
                assert_eq!(h("content-disposition"), "", "{name}");
            }
            other => panic!("unexpected output {other}"),
        }
        seen += 1;
    }
    assert_eq!(seen, 6, "{data}");
}
