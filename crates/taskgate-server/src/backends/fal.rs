//! The `fal` backend: one request on fal's queue per attempt.
//!
//! Submit (`POST {base}/{model}` with the input as the body, `Authorization: Key …`), then poll
//! the request's status (`status_url`, else `{base}/{owner}/{app}/requests/{id}/status`, with
//! `?logs=1`) with a doubling wait: `IN_QUEUE` reports its queue position as a log line when it
//! changes, `IN_PROGRESS` reports new log entries, `COMPLETED` fetches the result
//! (`response_url`) and copies every `url` field of it into the attempt's directory. Dropping
//! the attempt cancels the request (`PUT …/cancel`).

use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use super::upstream::{url_fields, Upstream};
use super::{Backend, BackendError, Job, Produced};
use crate::config::FalConfig;

pub use crate::config::defaults::FAL_KEY_ENV as DEFAULT_KEY_ENV;
pub const DEFAULT_URL: &str = "https://queue.fal.run";

pub struct FalBackend {
    cfg: FalConfig,
    api: Upstream,
    /// `{owner}/{app}`: the request URLs leave out an endpoint's sub-path (`fal-ai/flux/dev`
    /// submits to `…/fal-ai/flux/dev` but its requests live under `…/fal-ai/flux/requests/`).
    app: String,
}

impl FalBackend {
    pub fn new(
        cfg: FalConfig,
        client: reqwest::Client,
        model_timeout: std::time::Duration,
    ) -> Self {
        let api = Upstream::new(
            "fal",
            &cfg.upstream,
            DEFAULT_URL,
            DEFAULT_KEY_ENV,
            "Key",
            client,
            model_timeout,
        );
        let app = cfg.model.split('/').take(2).collect::<Vec<_>>().join("/");
        FalBackend { cfg, api, app }
    }
}

/// The submit's answer.
#[derive(Debug, Deserialize)]
struct Queued {
    request_id: String,
    status_url: Option<String>,
    response_url: Option<String>,
    cancel_url: Option<String>,
}

/// A status answer.
#[derive(Debug, Deserialize)]
struct Status {
    status: String,
    queue_position: Option<u64>,
    #[serde(default)]
    logs: Option<Vec<LogEntry>>,
    /// Set on a `COMPLETED` request whose model failed.
    #[serde(default)]
    error: Value,
}

#[derive(Debug, Deserialize)]
struct LogEntry {
    #[serde(default)]
    message: String,
}

#[async_trait]
impl Backend for FalBackend {
    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let deadline = self.api.deadline();
        const SUBMIT: &str = "submit";
        let body = Value::Object(job.input.clone());
        let answer = self
            .api
            .call(
                Method::POST,
                &self.api.url(&self.cfg.model),
                Some(&body),
                SUBMIT,
                deadline,
                &job.progress,
            )
            .await?;
        let queued: Queued =
            serde_json::from_value(answer).map_err(|e| self.api.malformed(SUBMIT, e))?;
        let id = &queued.request_id;
        let documented = format!("{}/requests/{id}", self.app);
        let mut status_url = url::Url::parse(&self.api.own_url(
            queued.status_url.as_deref(),
            &format!("{documented}/status"),
        ))
        .map_err(|e| self.api.malformed(SUBMIT, e))?;
        status_url.query_pairs_mut().append_pair("logs", "1");
        let response_url = self
            .api
            .own_url(queued.response_url.as_deref(), &documented);
        let cancel_url = self.api.own_url(
            queued.cancel_url.as_deref(),
            &format!("{documented}/cancel"),
        );
        let mut guard = self.api.cancel_on_drop(Method::PUT, cancel_url);
        let mut backoff = self.api.backoff();
        let mut position = None;
        let mut logs_seen = 0;
        loop {
            tokio::time::sleep(backoff.next()).await;
            const STATUS: &str = "request status";
            let doc = self
                .api
                .get(status_url.as_str(), STATUS, deadline, &job.progress)
                .await?;
            let status: Status =
                serde_json::from_value(doc).map_err(|e| self.api.malformed(STATUS, e))?;
            // Every answer carries the whole log so far.
            let logs = status.logs.unwrap_or_default();
            for entry in logs.iter().skip(logs_seen) {
                job.progress.log(&entry.message);
            }
            logs_seen = logs_seen.max(logs.len());
            match status.status.as_str() {
                "IN_QUEUE"
                    if status.queue_position.is_some() && status.queue_position != position =>
                {
                    position = status.queue_position;
                    job.progress.log(&format!(
                        "waiting in fal's queue at position {}",
                        status.queue_position.unwrap_or_default()
                    ));
                }
                "COMPLETED" => {
                    guard.disarm();
                    if !status.error.is_null() {
                        return Err(self
                            .api
                            .failed(&format!("request {id} failed"), Some(&status.error)));
                    }
                    const RESULT: &str = "request result";
                    let result = self
                        .api
                        .get(&response_url, RESULT, deadline, &job.progress)
                        .await?;
                    let urls = url_fields(&result);
                    return self.api.save_outputs(job, &urls, &result).await;
                }
                // IN_PROGRESS, and any state added later: still running.
                _ => {}
            }
        }
    }
}
