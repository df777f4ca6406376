//! The `apixo` backend: forwards a task to another APIXO-compatible service (APIXO itself, or
//! another taskgate) with its own key, follows it, and copies its outputs into our store.
//!
//! One attempt is: `generateTask` on the upstream (the input as given; never our client's
//! `callback_url`, since this server sends the callback itself when it writes the final state),
//! then `statusTask` polls on the SDK's schedule (`taskgate_client::Client::wait`: `first_poll`,
//! ×1.5, up to `max_poll`), the upstream's `progress` passed on through the job's `Progress`,
//! then every result URL downloaded with [`Download::to_dir`] (streamed, size-capped). Requests
//! go through the SDK, so each one retries 429 (honouring `Retry-After` while the attempt has
//! time left), 5xx and lost connections with its backoff before the attempt gives up.
//!
//! The submit carries an `Idempotency-Key` made of our task id, the attempt number and a nonce
//! drawn per run: a submit whose answer was lost is retried without creating a second upstream
//! task (taskgate honours the header; APIXO ignores it). The nonce is there because a shutdown
//! hands the same attempt number to the next run, after this run cancelled its upstream task:
//! a key without it would attach the next run to that cancelled task.
//!
//! Dropping the future (our cancel, the model's timeout, a shutdown, a lost lease) or giving up
//! on an upstream task that is not final cancels it there: a guard spawns a best-effort
//! `cancelTask` (taskgate's extension; APIXO answers 404, which is ignored).
//!
//! The upstream is followed by polling only; it is not asked to call back (see
//! docs/gateway.md for why).

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde_json::Value;
use taskgate_client::{Client, Error as ClientError, RetryPolicy, SubmitOptions, WaitOptions};
use tokio::time::Instant;
use tracing::{debug, info};

use super::download::{Download, DEFAULT_MAX_OUTPUT_BYTES};
use super::{Backend, BackendError, Job, Produced};
use crate::config::{redact_url, ApixoBackendConfig};
use crate::domain::fail_code;

/// Longest one API request (submit, one status read, cancel) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guard's cancel may try after the attempt is gone.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ApixoBackend {
    /// `Err` holds why no client could be built (every run fails with it).
    client: Result<Client, String>,
    /// The upstream's base URL, for messages.
    shown_url: String,
    upstream_model: Option<String>,
    first_poll: Duration,
    max_poll: Duration,
    /// The model's timeout: the longest an attempt may run.
    timeout: Duration,
    download: Download,
}

impl ApixoBackend {
    /// `cfg` has been validated. `http` is the server's client, used for the downloads (result
    /// URLs are public or signed, so they get no key); the API calls use the SDK's own client.
    pub fn new(cfg: &ApixoBackendConfig, http: reqwest::Client, model_timeout: Duration) -> Self {
        let defaults = WaitOptions::default();
        let client = cfg
            .resolve_key("")
            .map_err(|e| e.to_string())
            .and_then(|key| {
                Client::builder(&cfg.url)
                    .api_key(key)
                    .timeout(REQUEST_TIMEOUT.min(model_timeout))
                    .user_agent(concat!("taskgate/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| e.to_string())
            });
        let margin = (model_timeout / 10).min(Duration::from_secs(5));
        ApixoBackend {
            client,
            shown_url: redact_url(&cfg.url),
            upstream_model: cfg.model.clone(),
            first_poll: cfg.first_poll.unwrap_or(defaults.initial_interval),
            max_poll: cfg.max_poll.unwrap_or(defaults.max_interval),
            timeout: model_timeout,
            download: Download {
                trusted: super::download::origin_of(&cfg.url),
                client: http,
                timeout: model_timeout.saturating_sub(margin),
                max_bytes: cfg.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
            },
        }
    }

    /// The SDK's request retries, with `Retry-After` honoured only while the attempt has time
    /// left: a longer one ends the attempt with a retryable error instead of its timeout.
    fn retries(deadline: Instant) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
            max_retry_after: deadline.saturating_duration_since(Instant::now()),
        }
    }
}

/// `Idempotency-Key` of one run's submit: printable ASCII, well under 255 characters.
fn idempotency_key(job: &Job) -> String {
    let nonce: u64 = rand::thread_rng().gen();
    format!("taskgate-{}-{}-{nonce:016x}", job.task_id, job.attempt)
}

/// Upstream failCodes that say another try may succeed. Ours are kept as they are; the
/// others are reported as `GENERATION_FAILED` with the upstream's code in the message.
fn map_fail_code(code: Option<&str>) -> (&'static str, bool) {
    match code {
        Some(fail_code::MODEL_UNAVAILABLE) => (fail_code::MODEL_UNAVAILABLE, true),
        Some(fail_code::PROCESSING_TIMEOUT) => (fail_code::PROCESSING_TIMEOUT, true),
        Some(fail_code::INTERNAL_ERROR) => (fail_code::INTERNAL_ERROR, true),
        // The upstream lost its workers, or did not start the task in time: both pass.
        Some(fail_code::ATTEMPTS_EXHAUSTED) => (fail_code::ATTEMPTS_EXHAUSTED, true),
        Some(fail_code::EXPIRED) => (fail_code::EXPIRED, true),
        Some(fail_code::INVALID_INPUT) => (fail_code::INVALID_INPUT, false),
        // CANCELLED and MODEL_REMOVED mean something else here (not our client's cancel, not
        // our configuration), so they are the upstream's failure like any unknown code.
        _ => (fail_code::GENERATION_FAILED, false),
    }
}

impl ApixoBackend {
    /// What a failed SDK call means for the attempt. `what` names the call; the key is never
    /// part of an SDK error, so messages may carry them whole.
    fn call_error(&self, what: &str, model: &str, e: ClientError) -> BackendError {
        let url = &self.shown_url;
        match e {
            ClientError::Api {
                status: status @ (401 | 403),
                message,
                ..
            } => BackendError::fatal(
                fail_code::MODEL_UNAVAILABLE,
                format!(
                    "the upstream {url} refused our API key ({what} answered HTTP {status}: {message}); check the key configured for this model and its permission for model {model:?} there"
                ),
            ),
            ClientError::Api {
                status: 400 | 422,
                message,
                detail,
                ..
            } => BackendError::fatal(
                fail_code::INVALID_INPUT,
                format!(
                    "the upstream {url} refused the input: {message}{}",
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            ),
            e @ ClientError::Api { .. } if e.is_transient() => {
                BackendError::retryable(fail_code::MODEL_UNAVAILABLE, format!("{what}: {e}"))
            }
            ClientError::Api {
                status: 404,
                message,
                ..
            } => BackendError::fatal(
                fail_code::MODEL_UNAVAILABLE,
                format!("{what}: the upstream {url} has no model {model:?} or no such task (HTTP 404: {message})"),
            ),
            e @ ClientError::Api { .. } => {
                BackendError::fatal(fail_code::GENERATION_FAILED, format!("{what}: {e}"))
            }
            // Not reached or not understood: another try may find it working.
            e @ (ClientError::Transport { .. } | ClientError::Protocol { .. }) => {
                BackendError::retryable(fail_code::MODEL_UNAVAILABLE, format!("{what}: {e}"))
            }
            ClientError::Timeout { elapsed, .. } => BackendError::fatal(
                fail_code::PROCESSING_TIMEOUT,
                format!(
                    "the upstream task did not finish within {}",
                    super::human(elapsed)
                ),
            ),
            e => BackendError::fatal(fail_code::INTERNAL_ERROR, format!("{what}: {e}")),
        }
    }
}

/// Cancels the upstream task when dropped armed: the attempt was dropped or gave up on a task
/// that may still be running there.
struct CancelUpstream {
    client: Client,
    model: String,
    task_id: String,
    armed: bool,
}

impl Drop for CancelUpstream {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Without a runtime (the process is ending) there is nothing to send it with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone().with_retry(RetryPolicy {
            max_attempts: 3,
            max_retry_after: Duration::from_secs(5),
            ..RetryPolicy::default()
        });
        let (model, task_id) = (
            std::mem::take(&mut self.model),
            std::mem::take(&mut self.task_id),
        );
        runtime.spawn(async move {
            match tokio::time::timeout(CANCEL_TIMEOUT, client.cancel(&model, &task_id)).await {
                Ok(Ok(_)) => info!(upstream_task = %task_id, "cancelled the upstream task"),
                // 404: APIXO has no cancelTask; 409: it finished meanwhile.
                Ok(Err(e)) => {
                    debug!(upstream_task = %task_id, error = %e, "the upstream task was not cancelled")
                }
                Err(_) => debug!(upstream_task = %task_id, "cancelling the upstream task timed out"),
            }
        });
    }
}

#[async_trait]
impl Backend for ApixoBackend {
    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let deadline = Instant::now() + self.timeout;
        let client = self
            .client
            .as_ref()
            .map_err(|e| BackendError::fatal(fail_code::MODEL_UNAVAILABLE, e.clone()))?;
        let model = self.upstream_model.as_deref().unwrap_or(&job.model);
        let upstream_id = client
            .clone()
            .with_retry(Self::retries(deadline))
            .submit(
                model,
                Value::Object(job.input.clone()),
                SubmitOptions::default().with_idempotency_key(idempotency_key(job)),
            )
            .await
            .map_err(|e| self.call_error("generateTask", model, e))?;
        job.progress.log(&format!(
            "upstream task {upstream_id} at {}",
            self.shown_url
        ));
        let mut guard = CancelUpstream {
            client: client.clone(),
            model: model.to_owned(),
            task_id: upstream_id.clone(),
            armed: true,
        };
        let progress = job.progress.clone();
        let opts = WaitOptions {
            initial_interval: self.first_poll,
            max_interval: self.max_poll,
            // The dispatcher's timeout ends the attempt first; this only bounds a wait that
            // somehow outlives it.
            timeout: self.timeout,
            ..WaitOptions::default()
        }
        .on_progress(move |p| {
            if let Some(x) = p.progress {
                progress.set(x);
            }
        });
        let waited = client
            .clone()
            .with_retry(Self::retries(deadline))
            .wait(model, &upstream_id, opts)
            .await;
        let status = match waited {
            Ok(status) => status,
            Err(ClientError::TaskFailed {
                fail_code: code,
                fail_msg,
                ..
            }) => {
                guard.armed = false;
                let (ours, retryable) = map_fail_code(code.as_deref());
                let message = format!(
                    "the upstream task {upstream_id} failed ({}): {}",
                    code.as_deref().unwrap_or("no failCode"),
                    fail_msg.as_deref().unwrap_or("no failMsg")
                );
                return Err(if retryable {
                    BackendError::retryable(ours, message)
                } else {
                    BackendError::fatal(ours, message)
                });
            }
            // The guard cancels the upstream task, which may still be running.
            Err(e) => return Err(self.call_error("statusTask", model, e)),
        };
        guard.armed = false;
        let urls = match status.result() {
            Some(Ok(result)) => result.result_urls,
            Some(Err(e)) => {
                return Err(BackendError::fatal(
                    fail_code::GENERATION_FAILED,
                    format!("the upstream task {upstream_id} succeeded with a resultJson that is not {{\"resultUrls\": [...]}}: {e}"),
                ))
            }
            None => Vec::new(),
        };
        if urls.is_empty() {
            return Err(BackendError::no_output());
        }
        let dir = job.dir()?;
        for (index, url) in urls.iter().enumerate() {
            self.download.to_dir(url, dir, index).await?;
        }
        Ok(Produced::Files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_upstream_fail_codes_are_retried_and_foreign_ones_become_generation_failed() {
        for (upstream, ours, retryable) in [
            (
                Some("MODEL_UNAVAILABLE"),
                fail_code::MODEL_UNAVAILABLE,
                true,
            ),
            (
                Some("PROCESSING_TIMEOUT"),
                fail_code::PROCESSING_TIMEOUT,
                true,
            ),
            (Some("INVALID_INPUT"), fail_code::INVALID_INPUT, false),
            (
                Some("CONTENT_VIOLATION"),
                fail_code::GENERATION_FAILED,
                false,
            ),
            (Some("CANCELLED"), fail_code::GENERATION_FAILED, false),
            (None, fail_code::GENERATION_FAILED, false),
        ] {
            assert_eq!(map_fail_code(upstream), (ours, retryable), "{upstream:?}");
        }
    }
}
