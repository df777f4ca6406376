//! What the rented providers (`replicate`, `fal`) share: one authenticated API call that waits
//! out a 429 by its `Retry-After` while the attempt has time, the polling backoff, the guard that
//! cancels the upstream job when the attempt's future is dropped, and collecting output URLs from
//! a JSON answer and copying them in with [`Download`].
//!
//! Concurrency: everything runs inside the attempt's future, except the cancel request a dropped
//! guard sends, which is spawned on the runtime (a `Drop` cannot await) and is best effort.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{info, Instrument};

use super::download::{status_error, transport_error, Download, DEFAULT_MAX_OUTPUT_BYTES};
use super::{BackendError, Job, Produced, Progress};
use crate::config::UpstreamSettings;
use crate::domain::fail_code;

/// The longest one API request (not a download) may take: the APIs answer at once; a hung
/// connection is retried by a later attempt rather than waited on for the whole attempt.
const MAX_REQUEST_TIME: Duration = Duration::from_secs(60);
/// The first wait between polls when the table names none.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How much of a provider's error text reaches the task's `failMsg`.
const MAX_ERROR_CHARS: usize = 500;

/// One provider's API as one attempt sees it.
pub(crate) struct Upstream {
    /// `replicate` or `fal`, for messages.
    pub provider: &'static str,
    pub client: reqwest::Client,
    /// The API's base URL, always ending in `/` so that joins keep its path.
    pub base: url::Url,
    /// `Authorization`, marked sensitive; `Err` says which variable was missing.
    auth: Result<HeaderValue, String>,
    /// Where the key came from, for the message of a refused key.
    key_source: String,
    /// One attempt's budget: the model's timeout less a margin, so that running out of it is a
    /// retryable failure of ours rather than the attempt's final `PROCESSING_TIMEOUT`.
    pub budget: Duration,
    request_timeout: Duration,
    first_poll: Duration,
    pub download: Download,
}

impl Upstream {
    /// `settings` were validated at start; a key that went missing since then fails each attempt.
    pub fn new(
        provider: &'static str,
        settings: &UpstreamSettings,
        default_url: &str,
        default_key_env: &str,
        scheme: &str,
        client: reqwest::Client,
        model_timeout: Duration,
    ) -> Self {
        let margin = (model_timeout / 10).min(Duration::from_secs(5));
        let budget = model_timeout.saturating_sub(margin);
        let mut base = settings
            .url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .unwrap_or_else(|| url::Url::parse(default_url).expect("the default URL parses"));
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let auth = settings.key(default_key_env).and_then(|key| {
            let mut value = HeaderValue::from_str(&format!("{scheme} {key}"))
                .map_err(|_| "the API key is not a valid HTTP header value".to_owned())?;
            value.set_sensitive(true);
            Ok(value)
        });
        let key_source = match (&settings.api_key, &settings.api_key_env) {
            (Some(_), _) => "api_key".to_owned(),
            (None, Some(var)) => var.clone(),
            (None, None) => default_key_env.to_owned(),
        };
        let download = Download {
            client: client.clone(),
            trusted: Some(base.origin()),
            timeout: budget,
            max_bytes: settings
                .max_output_bytes
                .unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
        };
        Upstream {
            provider,
            client,
            base,
            auth,
            key_source,
            budget,
            request_timeout: budget.min(MAX_REQUEST_TIME),
            first_poll: settings
                .upstream_poll_interval
                .unwrap_or(DEFAULT_POLL_INTERVAL),
            download,
        }
    }

    /// `path` under the base URL.
    pub fn url(&self, path: &str) -> String {
        self.base
            .join(path.trim_start_matches('/'))
            .map(String::from)
            .unwrap_or_else(|_| format!("{}{path}", self.base))
    }

    /// A URL the provider handed back (`urls.get`, `status_url`), used only when it is on the
    /// configured API's origin: the key goes with every call, so it must not follow a URL
    /// elsewhere. Otherwise the documented path is built.
    pub fn own_url(&self, given: Option<&str>, documented: &str) -> String {
        given
            .and_then(|g| url::Url::parse(g).ok())
            .filter(|g| g.origin() == self.base.origin())
            .map(String::from)
            .unwrap_or_else(|| self.url(documented))
    }

    /// When the attempt's budget runs out, counted from now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.budget
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            next: self.first_poll,
            max: self.first_poll * 10,
        }
    }

    fn auth(&self) -> Result<&HeaderValue, BackendError> {
        self.auth
            .as_ref()
            .map_err(|m| BackendError::fatal(fail_code::MODEL_UNAVAILABLE, m.clone()))
    }

    /// One API call; the JSON of its 2xx answer. A 429 is waited out (its `Retry-After`, else
    /// the poll backoff) and sent again while that ends before `deadline`; past it, and on a
    /// 5xx or a connection error, the attempt fails retryably. A refused key (401, 403) and
    /// any other 4xx fail it for good.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        what: &str,
        deadline: Instant,
        progress: &Progress,
    ) -> Result<Value, BackendError> {
        let what = format!("{} {what}", self.provider);
        let mut backoff = self.backoff();
        loop {
            let mut request = self
                .client
                .request(method.clone(), url)
                .header(AUTHORIZATION, self.auth()?.clone())
                .timeout(self.request_timeout);
            if let Some(body) = body {
                request = request.json(body);
            }
            let resp = request
                .send()
                .await
                .map_err(|e| transport_error(&what, &e, self.request_timeout))?;
            let status = resp.status();
            // Never sooner than our own backoff: a `Retry-After: 0` would otherwise have us ask
            // again back to back until the attempt's time ran out.
            let wait = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
                let ours = backoff.next();
                retry_after(resp.headers()).map_or(ours, |theirs| theirs.max(ours))
            });
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| transport_error(&what, &e, self.request_timeout))?;
            if let Some(wait) = wait.filter(|w| Instant::now() + *w < deadline) {
                progress.log(&format!(
                    "{} is rate limiting us (429); asking again in {}",
                    self.provider,
                    super::human(wait)
                ));
                tokio::time::sleep(wait).await;
                continue;
            }
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                return Err(BackendError::fatal(
                    fail_code::MODEL_UNAVAILABLE,
                    format!(
                        "{what} refused the API key ({status}); check {}",
                        self.key_source
                    ),
                ));
            }
            if !status.is_success() {
                return Err(status_error(&what, status, &bytes));
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                BackendError::retryable(
                    fail_code::MODEL_UNAVAILABLE,
                    format!("{what} answered {status} with a body that is not JSON: {e}"),
                )
            });
        }
    }

    /// A `GET` through [`Upstream::call`].
    pub async fn get(
        &self,
        url: &str,
        what: &str,
        deadline: Instant,
        progress: &Progress,
    ) -> Result<Value, BackendError> {
        self.call(Method::GET, url, None, what, deadline, progress)
            .await
    }

    /// A guard that, unless disarmed, sends `method url` (the provider's cancel) when dropped.
    pub fn cancel_on_drop(&self, method: Method, url: String) -> CancelOnDrop {
        let request = self.auth().ok().and_then(|auth| {
            self.client
                .request(method, &url)
                .header(AUTHORIZATION, auth.clone())
                .timeout(self.request_timeout)
                .build()
                .ok()
        });
        CancelOnDrop {
            client: self.client.clone(),
            request,
            provider: self.provider,
        }
    }

    /// Copies each URL into the attempt's directory. With no URL, the answer itself is the
    /// result (a language model's text): it is kept as `output-0.json`; with nothing at all the
    /// attempt failed.
    pub async fn save_outputs(
        &self,
        job: &Job,
        urls: &[&str],
        answer: &Value,
    ) -> Result<Produced, BackendError> {
        let dir = job.dir()?;
        if urls.is_empty() {
            if answer.is_null() {
                return Err(BackendError::no_output());
            }
            let bytes = serde_json::to_vec_pretty(answer).unwrap_or_default();
            tokio::fs::write(dir.join("output-0.json"), bytes)
                .await
                .map_err(|e| {
                    BackendError::retryable(
                        fail_code::INTERNAL_ERROR,
                        format!("cannot write output: {e}"),
                    )
                })?;
            return Ok(Produced::Files);
        }
        for (index, url) in urls.iter().enumerate() {
            self.download.to_dir(url, dir, index).await?;
        }
        Ok(Produced::Files)
    }

    /// The provider's own account of a failed job, as our fatal `GENERATION_FAILED`.
    pub fn failed(&self, what: &str, error: Option<&Value>) -> BackendError {
        let text = match error {
            None | Some(Value::Null) => "no error was given".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        let text: String = text.trim().chars().take(MAX_ERROR_CHARS).collect();
        BackendError::fatal(
            fail_code::GENERATION_FAILED,
            format!("{} {what}: {text}", self.provider),
        )
    }

    /// An answer that is not the documented shape.
    pub fn malformed(&self, what: &str, e: impl std::fmt::Display) -> BackendError {
        BackendError::retryable(
            fail_code::MODEL_UNAVAILABLE,
            format!("{} {what} is not the documented shape: {e}", self.provider),
        )
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and falls back to the
/// backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// The waits between polls: doubling from the first up to ten times it, so a quick job is seen
/// soon and a long one is not polled needlessly.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// Cancels the upstream job when the attempt's future is dropped (our cancelTask, the attempt's
/// timeout, shutdown) or returns early with an error, unless the job reached an end first.
pub(crate) struct CancelOnDrop {
    client: reqwest::Client,
    request: Option<reqwest::Request>,
    provider: &'static str,
}

impl CancelOnDrop {
    /// The job ended upstream: nothing to cancel.
    pub fn disarm(&mut self) {
        self.request = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let provider = self.provider;
        let url = crate::config::redact_url(request.url().as_str());
        runtime.spawn(
            async move {
                match client.execute(request).await {
                    Ok(resp) => info!(%url, status = %resp.status(), "asked {provider} to cancel"),
                    Err(e) => info!(%url, error = %crate::report::error_chain(&e), "could not ask {provider} to cancel"),
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// Every string in `doc` that is an http(s) URL, in document order: Replicate's `output` is
/// one, an array of them, or an object holding them.
pub(crate) fn url_strings(doc: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    walk(doc, None, &mut |_, s| {
        if s.starts_with("https://") || s.starts_with("http://") {
            out.push(s);
        }
    });
    out
}

/// Every string under a `url` key in `doc`, in document order: fal's results name their files
/// as `{url, content_type, …}` objects wherever they sit (`images[]`, `video`, `audio`, …).
pub(crate) fn url_fields(doc: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    walk(doc, None, &mut |key, s| {
        if key == Some("url") {
            out.push(s);
        }
    });
    out
}

fn walk<'a>(doc: &'a Value, key: Option<&'a str>, each: &mut impl FnMut(Option<&str>, &'a str)) {
    match doc {
        Value::String(s) => each(key, s),
        Value::Array(items) => items.iter().for_each(|v| walk(v, None, each)),
        Value::Object(map) => map.iter().for_each(|(k, v)| walk(v, Some(k), each)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_urls_are_found_in_strings_arrays_and_objects() {
        assert_eq!(url_strings(&json!("https://a/x.png")), ["https://a/x.png"]);
        assert_eq!(
            url_strings(&json!(["https://a/1", "not a url", "http://b/2"])),
            ["https://a/1", "http://b/2"]
        );
        assert_eq!(
            url_strings(&json!({ "image": "https://a/i", "n": 3, "more": ["https://a/j"] })),
            ["https://a/i", "https://a/j"]
        );
    }

    #[test]
    fn fal_files_are_every_url_field() {
        let result = json!({
            "images": [{ "url": "https://cdn/1.png", "content_type": "image/png" }, { "url": "https://cdn/2.png" }],
            "video": { "url": "https://cdn/v.mp4" },
            "prompt": "https://not-a-file",
            "seed": 7
        });
        assert_eq!(
            url_fields(&result),
            [
                "https://cdn/1.png",
                "https://cdn/2.png",
                "https://cdn/v.mp4"
            ]
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_ignores_what_it_cannot_read() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn the_backoff_doubles_up_to_ten_times_the_first_wait() {
        let mut b = Backoff {
            next: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        let waits: Vec<u64> = (0..6).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }
}
