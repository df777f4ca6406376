//! The `replicate` backend: one prediction on Replicate per attempt, through its HTTP API.
//!
//! Create (`POST /v1/models/{owner}/{name}/predictions` for `model`, `POST /v1/predictions` with
//! `version`), then poll the prediction (`urls.get`, else `GET /v1/predictions/{id}`) with a
//! doubling wait until it is `succeeded`, `failed` or `canceled`, reporting new `logs` lines
//! (and a tqdm-style percentage in them as progress). The URLs in `output` are copied into the
//! attempt's directory. Dropping the attempt cancels the prediction (`POST …/cancel`).

use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::upstream::{url_strings, Upstream};
use super::{Backend, BackendError, Job, Produced, Progress};
use crate::config::ReplicateConfig;

pub use crate::config::defaults::REPLICATE_KEY_ENV as DEFAULT_KEY_ENV;
pub const DEFAULT_URL: &str = "https://api.replicate.com";

pub struct ReplicateBackend {
    cfg: ReplicateConfig,
    api: Upstream,
}

impl ReplicateBackend {
    pub fn new(
        cfg: ReplicateConfig,
        client: reqwest::Client,
        model_timeout: std::time::Duration,
    ) -> Self {
        let api = Upstream::new(
            "replicate",
            &cfg.upstream,
            DEFAULT_URL,
            DEFAULT_KEY_ENV,
            "Bearer",
            client,
            model_timeout,
        );
        ReplicateBackend { cfg, api }
    }
}

/// The fields of a prediction object taskgate reads.
#[derive(Debug, Deserialize)]
struct Prediction {
    id: String,
    status: String,
    #[serde(default)]
    output: Value,
    #[serde(default)]
    error: Value,
    #[serde(default)]
    logs: Option<String>,
    #[serde(default)]
    urls: Urls,
}

#[derive(Debug, Default, Deserialize)]
struct Urls {
    get: Option<String>,
    cancel: Option<String>,
}

impl ReplicateBackend {
    fn prediction(&self, what: &str, doc: Value) -> Result<Prediction, BackendError> {
        serde_json::from_value(doc).map_err(|e| self.api.malformed(what, e))
    }
}

#[async_trait]
impl Backend for ReplicateBackend {
    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let deadline = self.api.deadline();
        let (path, body) = match (&self.cfg.model, &self.cfg.version) {
            (Some(model), _) => (
                format!("v1/models/{model}/predictions"),
                json!({ "input": job.input }),
            ),
            (None, version) => (
                "v1/predictions".to_owned(),
                json!({ "version": version, "input": job.input }),
            ),
        };
        const CREATE: &str = "create prediction";
        let created = self
            .api
            .call(
                Method::POST,
                &self.api.url(&path),
                Some(&body),
                CREATE,
                deadline,
                &job.progress,
            )
            .await?;
        let mut prediction = self.prediction(CREATE, created)?;
        let id = prediction.id.clone();
        let documented = format!("v1/predictions/{id}");
        let get_url = self
            .api
            .own_url(prediction.urls.get.as_deref(), &documented);
        let cancel_url = self.api.own_url(
            prediction.urls.cancel.as_deref(),
            &format!("{documented}/cancel"),
        );
        let mut guard = self.api.cancel_on_drop(Method::POST, cancel_url);
        let mut logs = LogTail::default();
        let mut backoff = self.api.backoff();
        loop {
            logs.feed(prediction.logs.as_deref(), &job.progress);
            match prediction.status.as_str() {
                "succeeded" => {
                    guard.disarm();
                    logs.finish(&job.progress);
                    let urls = url_strings(&prediction.output);
                    return self.api.save_outputs(job, &urls, &prediction.output).await;
                }
                "failed" => {
                    guard.disarm();
                    logs.finish(&job.progress);
                    return Err(self
                        .api
                        .failed(&format!("prediction {id} failed"), Some(&prediction.error)));
                }
                "canceled" => {
                    guard.disarm();
                    return Err(self.api.failed(
                        &format!("prediction {id} was canceled upstream"),
                        Some(&prediction.error),
                    ));
                }
                // starting, processing, and any state added later: still running.
                _ => {}
            }
            tokio::time::sleep(backoff.next()).await;
            const GET: &str = "get prediction";
            let doc = self.api.get(&get_url, GET, deadline, &job.progress).await?;
            prediction = self.prediction(GET, doc)?;
        }
    }
}

/// Replicate's `logs` is the whole log so far: each poll reports only the complete lines it
/// has not reported yet (the last, unfinished line waits for its newline or the end).
#[derive(Default)]
struct LogTail {
    reported: usize,
    pending: String,
}

impl LogTail {
    fn feed(&mut self, logs: Option<&str>, progress: &Progress) {
        let Some(logs) = logs else { return };
        // A log that shrank or was cut mid-character was rewritten: start again from its end.
        let Some(new) = logs.get(self.reported..) else {
            self.reported = logs.len();
            return;
        };
        let Some(last_newline) = new.rfind('\n') else {
            self.pending = new.to_owned();
            return;
        };
        for line in new[..last_newline].split('\n') {
            report_line(line, progress);
        }
        self.reported += last_newline + 1;
        self.pending = new[last_newline + 1..].to_owned();
    }

    fn finish(&mut self, progress: &Progress) {
        report_line(&std::mem::take(&mut self.pending), progress);
    }
}

/// One log line; a tqdm bar (`" 40%|████      | 20/50"`) also sets the progress.
fn report_line(line: &str, progress: &Progress) {
    // tqdm redraws with `\r`: the last drawing is the current one.
    let line = line.rsplit('\r').next().unwrap_or(line);
    if let Some((before, _)) = line.split_once("%|") {
        let digits = before
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or("");
        if let Ok(percent) = digits.parse::<u32>() {
            progress.set(f64::from(percent.min(100)) / 100.0);
        }
    }
    progress.log(line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_logs_are_reported_once_line_by_line_with_tqdm_progress() {
        let progress = Progress::new();
        let mut tail = LogTail::default();
        tail.feed(Some("loading\n 10%|#   | 1/10"), &progress);
        tail.feed(
            Some("loading\n 10%|#   | 1/10\r 50%|#####| 5/10\nsaving"),
            &progress,
        );
        tail.finish(&progress);
        let got = progress.take();
        assert_eq!(got.lines, ["loading", " 50%|#####| 5/10", "saving"]);
        assert_eq!(got.progress, Some(0.5));
    }
}
