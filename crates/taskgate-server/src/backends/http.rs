//! The `http` backend: POSTs the input JSON to an upstream model server.
//!
//! The answer is either the output itself (raw bytes, typed by `Content-Type`) or JSON that
//! carries URLs to fetch or base64 data, found at configured JSON pointers. Upstream 5xx, 429,
//! timeouts and connection errors are retryable; any other 4xx is the input's fault and is not.
//!
//! An upstream that answers `Content-Type: application/x-ndjson` streams: it sends progress and
//! log objects (`{"progress": 0.42}`, `{"log": "…"}`) as it works, each on its own line, and
//! ends with the result object, which is then read as a JSON answer. The lines are read as they
//! arrive and reported through the job's [`super::Progress`].

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::Value;

use super::download::{
    file_name, status_error, transport_error, Download, DEFAULT_MAX_OUTPUT_BYTES,
};
use super::progress::{report_object, LineSplitter};
use super::{Backend, BackendError, Job, Produced};
use crate::config::{HttpBackendConfig, HttpResponseKind};
use crate::domain::fail_code;

pub struct HttpBackend {
    cfg: HttpBackendConfig,
    client: reqwest::Client,
    headers: HeaderMap,
    timeout: Duration,
    download: Download,
}

impl HttpBackend {
    /// `cfg` has been validated, so header names and values parse. `model_timeout` bounds the
    /// whole attempt; each request gets a little less, so that an upstream that hangs is a
    /// retryable request timeout rather than the attempt's final `PROCESSING_TIMEOUT`.
    pub fn new(cfg: HttpBackendConfig, client: reqwest::Client, model_timeout: Duration) -> Self {
        let margin = (model_timeout / 10).min(Duration::from_secs(5));
        let timeout = model_timeout.saturating_sub(margin);
        let headers = cfg
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        let download = Download {
            client: client.clone(),
            trusted: super::download::origin_of(&cfg.url),
            timeout,
            max_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        };
        HttpBackend {
            cfg,
            client,
            headers,
            timeout,
            download,
        }
    }
}

/// The strings at `pointer`: one string, or an array of strings.
fn strings_at<'a>(doc: &'a Value, pointer: &str) -> Result<Vec<&'a str>, BackendError> {
    let missing = || {
        BackendError::fatal(
            fail_code::GENERATION_FAILED,
            format!("the upstream response has no string or array of strings at {pointer:?}"),
        )
    };
    match doc.pointer(pointer).ok_or_else(missing)? {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(missing))
            .collect(),
        _ => Err(missing()),
    }
}

impl HttpBackend {
    async fn write(&self, job: &Job, name: String, bytes: &[u8]) -> Result<(), BackendError> {
        tokio::fs::write(job.dir()?.join(name), bytes)
            .await
            .map_err(|e| {
                BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("cannot write output: {e}"),
                )
            })
    }

    async fn fetch(&self, job: &Job, index: usize, url: &str) -> Result<(), BackendError> {
        self.download.to_dir(url, job.dir()?, index).await.map(drop)
    }

    /// Sends `request` within the request timeout (which also bounds reading the answer).
    async fn start(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, BackendError> {
        request
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error(what, &e, self.timeout))
    }

    /// Reads a whole answer; a non-2xx one is an error, retryable or not by its status.
    async fn answer(&self, resp: reqwest::Response, what: &str) -> Result<Answer, BackendError> {
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport_error(what, &e, self.timeout))?;
        if !status.is_success() {
            return Err(status_error(what, status, &body));
        }
        Ok(Answer { content_type, body })
    }
}

/// The media type of a streamed answer: one JSON object per line.
const NDJSON: &str = "application/x-ndjson";

impl HttpBackend {
    /// The model server's answer: read whole, or, when it streams ndjson, line by line with
    /// progress and log objects reported as they arrive and the last other line as the answer
    /// (JSON, whatever the stream's type, so `response = "json"` reads it as usual).
    async fn post_model(
        &self,
        request: reqwest::RequestBuilder,
        job: &Job,
    ) -> Result<Answer, BackendError> {
        const WHAT: &str = "the upstream model server";
        let resp = self.start(request, WHAT).await?;
        let streams = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|ct| ct.trim().eq_ignore_ascii_case(NDJSON));
        if !streams || !resp.status().is_success() {
            return self.answer(resp, WHAT).await;
        }
        let mut resp = resp;
        // No cap on a line: the result line may carry base64 outputs (an answer read whole is
        // not capped either).
        let mut lines = LineSplitter::new(None);
        let mut result: Option<Vec<u8>> = None;
        let mut take = |line: &[u8]| {
            if line.iter().all(u8::is_ascii_whitespace) {
                return;
            }
            if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) {
                if let Some(report) = report_object(&obj) {
                    job.progress.apply(report);
                    return;
                }
            }
            // A candidate for the result; one it replaces was not the last, so it is kept as
            // a log line rather than lost.
            if let Some(earlier) = result.replace(line.to_vec()) {
                job.progress.log(&String::from_utf8_lossy(&earlier));
            }
        };
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(WHAT, &e, self.timeout))?
        {
            lines.push(&chunk, &mut take);
        }
        lines.finish(&mut take);
        let body = result.ok_or_else(|| {
            BackendError::fatal(
                fail_code::GENERATION_FAILED,
                "the upstream's ndjson stream ended without a result line (every line was a progress or log object)",
            )
        })?;
        Ok(Answer {
            content_type: Some("application/json".to_owned()),
            body: bytes::Bytes::from(body),
        })
    }
}

/// A successful upstream answer.
struct Answer {
    content_type: Option<String>,
    body: bytes::Bytes,
}

#[async_trait]
impl Backend for HttpBackend {
    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let request = self
            .client
            .post(&self.cfg.url)
            .headers(self.headers.clone())
            .header("x-taskgate-task-id", &job.task_id)
            .json(&job.input);
        let Answer {
            content_type, body, ..
        } = self.post_model(request, job).await?;
        match self.cfg.response {
            HttpResponseKind::Raw => {
                self.write(job, file_name(0, content_type.as_deref(), None), &body)
                    .await?;
                Ok(Produced::Files)
            }
            HttpResponseKind::Json => {
                let doc: Value = serde_json::from_slice(&body).map_err(|e| {
                    BackendError::fatal(
                        fail_code::GENERATION_FAILED,
                        format!("the upstream response is not JSON: {e}"),
                    )
                })?;
                let mut index = 0;
                for pointer in &self.cfg.url_pointers {
                    for url in strings_at(&doc, pointer)? {
                        self.fetch(job, index, url).await?;
                        index += 1;
                    }
                }
                for pointer in &self.cfg.base64_pointers {
                    for data in strings_at(&doc, pointer)? {
                        let (ct, payload) = match data.strip_prefix("data:") {
                            Some(rest) => match rest.split_once(";base64,") {
                                Some((ct, payload)) => (Some(ct), payload),
                                None => (None, rest),
                            },
                            None => (self.cfg.base64_content_type.as_deref(), data),
                        };
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(payload.trim())
                            .map_err(|e| {
                                BackendError::fatal(
                                    fail_code::GENERATION_FAILED,
                                    format!("the upstream response has invalid base64 at {pointer:?}: {e}"),
                                )
                            })?;
                        self.write(job, file_name(index, ct, None), &bytes).await?;
                        index += 1;
                    }
                }
                Ok(Produced::Files)
            }
        }
    }
}
