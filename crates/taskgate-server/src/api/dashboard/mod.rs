//! The web dashboard at `/dashboard`: a handful of static files (HTML, CSS, JavaScript ES
//! modules) compiled into the binary, so a node serves it with no files beside it, no build
//! step and no request to anywhere else. Everything it shows it reads from the public API with
//! the key the user signs in with; the server knows nothing about dashboard sessions.
//!
//! Every answer here, a 404 included, carries the same strict Content-Security-Policy and
//! hardening headers. Files are revalidated by `ETag` (a SHA-256 of their bytes, computed once):
//! a new binary serves new files at once, an unchanged one answers 304.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::state::AppState;

/// No inline script or style, nothing from another origin: the page may talk only to this
/// server, and only its own files may run.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data: blob:; media-src 'self'; connect-src 'self'; font-src 'self'; \
base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The page, then its assets by the name they are asked for under `/dashboard/assets/`.
static INDEX: Asset = Asset::new("index.html", HTML, include_bytes!("assets/index.html"));
static ASSETS: &[Asset] = &[
    Asset::new("app.js", JS, include_bytes!("assets/app.js")),
    Asset::new("api.js", JS, include_bytes!("assets/api.js")),
    Asset::new("sse.js", JS, include_bytes!("assets/sse.js")),
    Asset::new("dom.js", JS, include_bytes!("assets/dom.js")),
    Asset::new("tasks.js", JS, include_bytes!("assets/tasks.js")),
    Asset::new("task.js", JS, include_bytes!("assets/task.js")),
    Asset::new("operator.js", JS, include_bytes!("assets/operator.js")),
    Asset::new("style.css", CSS, include_bytes!("assets/style.css")),
    Asset::new("favicon.svg", SVG, include_bytes!("assets/favicon.svg")),
];

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Asset {
        Asset {
            name,
            content_type,
            body,
        }
    }
}

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/assets/{name}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => serve(a, &headers),
        None => with_policy(
            (
                StatusCode::NOT_FOUND,
                [(CONTENT_TYPE, "text/plain; charset=utf-8")],
                "no such dashboard file\n",
            )
                .into_response(),
        ),
    }
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = etag_of(asset);
    let fresh = request
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(ETAG, v);
    }
    // Revalidate every time: the files change with the binary, and a 304 costs one round trip.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_policy(response)
}

fn etag_of(asset: &Asset) -> &'static str {
    static ETAGS: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    let etags = ETAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(ASSETS)
            .map(|a| {
                let digest = hex::encode(Sha256::digest(a.body));
                (a.name, format!("\"{}\"", &digest[..32]))
            })
            .collect()
    });
    etags.get(asset.name).map(String::as_str).unwrap_or("\"0\"")
}

fn with_policy(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
