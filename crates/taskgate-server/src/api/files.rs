//! Result files kept in the data directory, served behind HMAC-signed, expiring links. A node
//! whose results go to S3 serves none (its URLs point at the bucket).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use taskgate_proto::ErrorCode;

use super::extract::PathParams;
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/files/{task_id}/{name}", get(get_untagged_file))
        .route("/files/{task_id}/{tag}/{name}", get(get_file))
}

/// A file of a task finished before outputs were staged per attempt (`TASK_ID/NAME` keys).
#[utoipa::path(
    get,
    path = "/files/{task_id}/{name}",
    tag = "files",
    operation_id = "getUntaggedFile",
    params(
        ("task_id" = String, Path, description = "The task's id."),
        ("name" = String, Path, description = "The output's name."),
        ("expires" = i64, Query, description = "Unix seconds after which the link is refused."),
        ("sig" = String, Query, description = "The link's signature (HMAC of the path and `expires`)."),
    ),
    responses((status = 200, description = "The file; its `Content-Type` follows its name.", content_type = "application/octet-stream", body = Vec<u8>)),
)]
async fn get_untagged_file(
    State(state): State<Arc<AppState>>,
    PathParams((task_id, name)): PathParams<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    serve_file(state, format!("{task_id}/{name}"), name, uri).await
}

/// A result file, as linked from `resultJson` (signed and expiring; no key).
#[utoipa::path(
    get,
    path = "/files/{task_id}/{tag}/{name}",
    tag = "files",
    operation_id = "getFile",
    params(
        ("task_id" = String, Path, description = "The task's id."),
        ("tag" = String, Path, description = "The attempt that made the file."),
        ("name" = String, Path, description = "The output's name."),
        ("expires" = i64, Query, description = "Unix seconds after which the link is refused."),
        ("sig" = String, Query, description = "The link's signature (HMAC of the path and `expires`)."),
    ),
    responses((status = 200, description = "The file; its `Content-Type` follows its name.", content_type = "application/octet-stream", body = Vec<u8>)),
)]
async fn get_file(
    State(state): State<Arc<AppState>>,
    PathParams((task_id, tag, name)): PathParams<(String, String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    serve_file(state, format!("{task_id}/{tag}/{name}"), name, uri).await
}

async fn serve_file(
    state: Arc<AppState>,
    key: String,
    name: String,
    uri: Uri,
) -> Result<Response, ApiError> {
    let refused = || {
        ApiError::new(
            ErrorCode::LinkInvalid,
            "this link is invalid or has expired",
        )
    };
    let files = state.local_files.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::FileNotFound,
            "result files are not served by this node",
        )
    })?;
    let (mut expires, mut sig) = (None, None);
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "expires" => expires = v.parse::<i64>().ok(),
            "sig" => sig = Some(v.into_owned()),
            _ => {}
        }
    }
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return Err(refused());
    };
    if !files.signer().verify(&key, expires, &sig) || expires < now_ms() / 1000 {
        return Err(refused());
    }
    let path = files.path_of(&key).ok_or_else(refused)?;
    // A file, or a small output kept in the database (see `artifacts::INLINE_MAX`).
    let (body, len) = match tokio::fs::File::open(&path).await {
        Ok(file) => {
            let len = file.metadata().await.map_err(ApiError::internal)?.len();
            (
                Body::from_stream(tokio_util::io::ReaderStream::new(file)),
                len,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match state.store.get_blob(&key).await? {
                Some(content) => {
                    let len = content.len() as u64;
                    (Body::from(content), len)
                }
                None => {
                    return Err(ApiError::new(
                        ErrorCode::FileNotFound,
                        "this result file no longer exists",
                    ))
                }
            }
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    match passive_type(&name) {
        Some(content_type) => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        None => {
            // Anything a browser might run (HTML, SVG, XML, scripts, PDF) or that we cannot
            // name is served as bytes to save, never rendered on this origin.
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            // Quotes and backslashes would end or escape the quoted name: left out.
            let quoted: String = name.chars().filter(|c| !matches!(c, '"' | '\\')).collect();
            if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{quoted}\"")) {
                h.insert(header::CONTENT_DISPOSITION, v);
            } else {
                h.insert(
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment"),
                );
            }
        }
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    // A result is whatever a model wrote, served on the origin where the dashboard keeps its
    // key: no sniffing, and a sandbox (an opaque origin, no scripts) for whatever a browser
    // opens directly, an HTML or SVG output included. Embedding it (<img>, <video>) is unaffected.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; img-src 'self' data:; media-src 'self'; style-src 'unsafe-inline'"),
    );
    let max_age = (expires - now_ms() / 1000).max(0);
    if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={max_age}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    Ok(response)
}

/// The content type of a result a browser may show inline: media and plain data that run
/// nothing. Every other name gets `None` (served as an attachment).
fn passive_type(name: &str) -> Option<&'static str> {
    let ext = std::path::Path::new(name)
        .extension()?
        .to_str()?
        .to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "bmp" => "image/bmp",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "ogv" => "video/ogg",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" | "oga" => "audio/ogg",
        "flac" => "audio/flac",
        "m4a" | "aac" => "audio/aac",
        "json" => "application/json",
        "txt" | "log" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        _ => return None,
    })
}
