//! Copying an output an upstream names by URL into the attempt's directory: streamed to the
//! file as it arrives (never held whole in memory) and stopped at a size cap. Used by every
//! backend that is answered with URLs rather than bytes (`http` with `url_pointers`, and the
//! upstream providers), so each gets the same naming, limits and error classes.

use std::path::Path;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use tokio::io::AsyncWriteExt;

use super::{human, BackendError};
use crate::domain::fail_code;

/// The default cap on one downloaded output: large enough for minutes of video.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// A network failure (connection, timeout) is retryable: another try may reach the upstream.
pub(crate) fn transport_error(what: &str, e: &reqwest::Error, timeout: Duration) -> BackendError {
    let message = if e.is_timeout() {
        format!("{what} timed out after {}", human(timeout))
    } else {
        format!("{what} failed: {}", without_url(e))
    };
    BackendError::retryable(fail_code::MODEL_UNAVAILABLE, message)
}

/// A reqwest error's causes without its own line, which repeats the whole URL (credentials and
/// query included); `what` names the URL already, redacted, and tenants read this message.
fn without_url(e: &reqwest::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => crate::report::error_chain(cause),
        None => e.to_string(),
    }
}

/// 5xx and 429 may pass; other 4xx will not.
pub(crate) fn status_error(what: &str, status: reqwest::StatusCode, body: &[u8]) -> BackendError {
    // A short snippet: enough to show the upstream's reason, not a page of its internals.
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let message = format!("{what} answered {status}: {}", snippet.trim());
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        BackendError::retryable(fail_code::MODEL_UNAVAILABLE, message)
    } else {
        BackendError::fatal(fail_code::GENERATION_FAILED, message)
    }
}

/// `output-{i}.{ext}` with the extension the URL or else the content type usually has.
pub(crate) fn file_name(
    index: usize,
    content_type: Option<&str>,
    url_path: Option<&str>,
) -> String {
    let from_type = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .and_then(|ct| extension_for(&ct));
    let from_url = url_path
        .and_then(|p| Path::new(p).extension())
        .and_then(|e| e.to_str())
        .filter(|e| e.len() <= 8 && e.bytes().all(|b| b.is_ascii_alphanumeric()));
    let ext = from_url.or(from_type).unwrap_or("bin");
    format!("output-{index}.{ext}")
}

/// The usual extension of a media type. mime_guess lists extensions alphabetically (image/jpeg
/// would become `.jfif`), so the common generation outputs are named first.
fn extension_for(content_type: &str) -> Option<&'static str> {
    let common = match content_type {
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "audio/mpeg" => "mp3",
        "audio/wav" | "audio/x-wav" => "wav",
        "audio/ogg" => "ogg",
        "application/json" => "json",
        "text/plain" => "txt",
        other => {
            return mime_guess::get_mime_extensions_str(other).and_then(|e| e.first().copied())
        }
    };
    Some(common)
}

/// Where and how much an upstream's outputs may be downloaded.
///
/// An output URL comes from an upstream's answer, and a model's answer may carry text its
/// tenant chose ("answer with http://169.254.169.254/…"), so it is not trusted like the
/// operator's configuration: a URL on the `trusted` origin (the upstream's own base URL, which
/// the operator configured, private or not) is fetched with `client`; any other only if it
/// reaches a public address, through a client that checks every address it connects to and
/// follows no redirect (the callback guard's, `webhooks::ssrf`).
#[derive(Debug, Clone)]
pub struct Download {
    pub client: reqwest::Client,
    /// The origin of the upstream the operator configured.
    pub trusted: Option<url::Origin>,
    /// Bounds each whole download (request and body).
    pub timeout: Duration,
    /// One output larger than this fails the attempt (`GENERATION_FAILED`, not retried: the
    /// same output would be as large the next time).
    pub max_bytes: u64,
}

impl Download {
    /// Downloads `url` into `dir` as `output-{index}.{ext}`, streamed, and returns the name.
    /// On any failure the partial file is removed, so the directory holds only whole outputs.
    pub async fn to_dir(
        &self,
        url: &str,
        dir: &Path,
        index: usize,
    ) -> Result<String, BackendError> {
        let what = format!("download of {}", crate::config::redact_url(url));
        let parsed = url::Url::parse(url).map_err(|e| {
            BackendError::fatal(
                fail_code::GENERATION_FAILED,
                format!("{what}: the upstream named an output that is not a URL ({e})"),
            )
        })?;
        let client = if self.trusted.as_ref() == Some(&parsed.origin()) {
            &self.client
        } else {
            crate::webhooks::ssrf::check_url(&parsed, false).map_err(|refused| {
                BackendError::fatal(
                    fail_code::GENERATION_FAILED,
                    format!("{what} refused: the URL {refused}; only the upstream's own origin and public addresses are fetched"),
                )
            })?;
            guarded_client().ok_or_else(|| {
                BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("{what}: the guarded HTTP client could not be built"),
                )
            })?
        };
        let mut resp = client
            .get(parsed)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| {
                // A name that resolves into a private network would resolve there again: the
                // refusal is final, as the callback deliverer's is.
                if crate::webhooks::ssrf::is_refused_address(&e) {
                    BackendError::fatal(
                        fail_code::GENERATION_FAILED,
                        format!("{what} refused: {}", without_url(&e)),
                    )
                } else {
                    transport_error(&what, &e, self.timeout)
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(status_error(&what, status, &body));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(self.too_large(&what));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let name = file_name(index, content_type.as_deref(), Some(resp.url().path()));
        let path = dir.join(&name);
        let written = async {
            let mut file = tokio::fs::File::create(&path).await.map_err(write_error)?;
            let mut total: u64 = 0;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| transport_error(&what, &e, self.timeout))?
            {
                total += chunk.len() as u64;
                if total > self.max_bytes {
                    return Err(self.too_large(&what));
                }
                file.write_all(&chunk).await.map_err(write_error)?;
            }
            file.flush().await.map_err(write_error)?;
            Ok(())
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        Ok(name)
    }

    fn too_large(&self, what: &str) -> BackendError {
        BackendError::fatal(
            fail_code::GENERATION_FAILED,
            format!("{what} is larger than the {} byte limit", self.max_bytes),
        )
    }
}

/// The origin of a configured upstream URL, trusted for downloads.
pub fn origin_of(url: &str) -> Option<url::Origin> {
    url::Url::parse(url).ok().map(|u| u.origin())
}

/// The client for outputs outside the upstream's origin: every address it connects to is
/// checked at resolution (no rebinding window), and a redirect is not followed.
/// `None` only if the TLS backend cannot start, and then no fetch is made (never unguarded).
fn guarded_client() -> Option<&'static reqwest::Client> {
    static CLIENT: std::sync::OnceLock<Option<reqwest::Client>> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| crate::webhooks::ssrf::client_builder(false).build().ok())
        .as_ref()
}

fn write_error(e: std::io::Error) -> BackendError {
    BackendError::retryable(
        fail_code::INTERNAL_ERROR,
        format!("cannot write output: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_take_their_extension_from_the_url_or_the_content_type() {
        assert_eq!(file_name(0, Some("image/png"), None), "output-0.png");
        assert_eq!(
            file_name(1, Some("text/plain; charset=utf-8"), Some("/a/b.mp4")),
            "output-1.mp4"
        );
        assert_eq!(file_name(2, None, None), "output-2.bin");
        assert_eq!(file_name(3, Some("image/jpeg"), None), "output-3.jpg");
    }
}
