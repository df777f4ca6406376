//! The pull-worker API (`/api/v1/worker/*`, a taskgate extension APIXO does not have): a
//! [`WorkerClient`] claims tasks of `worker`-backed models, renews their lease with heartbeats,
//! uploads outputs and reports the outcome. `taskgate worker` is built on it.
//!
//! Every call after the claim carries the claim's lease token. Once the task is no longer the
//! caller's (its lease ran out and it was handed on, or it is final) the server answers 409
//! `lease_lost`: [`Error::error_code`] is then [`ErrorCode::LeaseLost`], and the caller must stop
//! working on the task. A refused token is a 401 (`wrong_key_kind` for a client key,
//! `invalid_api_key`, `key_revoked`).
//!
//! Requests go through the same envelope reading and [`RetryPolicy`](crate::RetryPolicy) as
//! [`Client`]'s. Heartbeats, uploads and reports are repeated even when a connection broke after
//! the request was sent: none can do a thing twice (a report repeated after it landed is answered
//! `lease_lost`, the task being final). A claim is not, since its lost answer would hold a task
//! until the lease ran out.

use std::path::Path;
use std::time::Duration;

use reqwest::header::CONTENT_LENGTH;
use reqwest::Method;
use taskgate_proto::{
    ErrorCode, WorkerClaimRequest, WorkerComplete, WorkerFail, WorkerHeartbeat, WorkerTask,
};

use crate::{decode_data, Client, ClientBuilder, Error, RetryPolicy};

/// Builds a [`WorkerClient`] with non-default settings.
///
/// ```
/// use std::time::Duration;
/// use taskgate_client::{RetryPolicy, WorkerClient};
/// let worker = WorkerClient::builder("https://tasks.example.com", "tgw_...")
///     .timeout(Duration::from_secs(60))
///     .retry(RetryPolicy::none())
///     .build()
///     .unwrap();
/// assert_eq!(worker.base_url().as_str(), "https://tasks.example.com/");
/// ```
#[derive(Debug, Clone)]
pub struct WorkerClientBuilder {
    inner: ClientBuilder,
}

impl WorkerClientBuilder {
    /// Sets how transient failures are retried. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.inner = self.inner.retry(policy);
        self
    }

    /// Time limit of one call, the whole response included. A claim may take its long-poll's
    /// wait on top; an upload has no limit but the connect timeout, since a large output may take
    /// long to send. Default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.timeout(timeout);
        self
    }

    /// Time limit for establishing a connection. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.connect_timeout(timeout);
        self
    }

    /// Sets the `User-Agent`. Default `taskgate-client/<version>`.
    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.inner = self.inner.user_agent(ua);
        self
    }

    /// Validates the base URL and builds the client.
    pub fn build(self) -> Result<WorkerClient, Error> {
        Ok(WorkerClient {
            client: self.inner.build_with(None)?,
        })
    }
}

/// A pull worker's handle to one taskgate server, authenticated with a worker token (`tgw_…`,
/// made by `taskgate keys create --worker`). Cheap to clone; clones share a connection pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), taskgate_client::Error> {
/// use std::time::Duration;
/// use taskgate_client::proto::{ErrorCode, WorkerComplete, WorkerHeartbeat};
/// use taskgate_client::WorkerClient;
///
/// let worker = WorkerClient::new("https://tasks.example.com", "tgw_...")?;
/// let Some(task) = worker.claim(&["sdxl"], Duration::from_secs(25)).await? else {
///     return Ok(()); // no work within the wait
/// };
/// // Acknowledge at once: a claim never acknowledged goes back to another worker.
/// let beat = WorkerHeartbeat { lease_token: task.lease_token.clone(), progress: None, logs: vec![] };
/// worker.heartbeat(&task.task_id, &beat).await?;
/// // … run the task, writing out.png, heartbeating every third of `task.lease_ms` …
/// worker
///     .upload(&task.task_id, &task.lease_token, "out.png", "out.png".as_ref())
///     .await?;
/// let done = WorkerComplete { lease_token: task.lease_token.clone(), outputs: vec!["out.png".into()] };
/// match worker.complete(&task.task_id, &done).await {
///     Err(e) if e.error_code() == Some(ErrorCode::LeaseLost) => eprintln!("handed on; dropped"),
///     other => other?,
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerClient {
    client: Client,
}

impl WorkerClient {
    /// A worker client for `base_url` (as for [`Client::new`]) with default settings.
    ///
    /// ```
    /// let w = taskgate_client::WorkerClient::new("http://127.0.0.1:8080", "tgw_...").unwrap();
    /// assert_eq!(w.base_url().as_str(), "http://127.0.0.1:8080/");
    /// assert!(taskgate_client::WorkerClient::new("not a url", "tgw_...").is_err());
    /// ```
    pub fn new(base_url: impl AsRef<str>, token: impl Into<String>) -> Result<Self, Error> {
        Self::builder(base_url, token).build()
    }

    /// A builder for non-default settings.
    pub fn builder(base_url: impl AsRef<str>, token: impl Into<String>) -> WorkerClientBuilder {
        WorkerClientBuilder {
            inner: Client::builder(base_url).api_key(token),
        }
    }

    /// The server's base URL, normalized (no `/api/v1` suffix, trailing slash).
    pub fn base_url(&self) -> &url::Url {
        self.client.base_url()
    }

    /// A clone whose calls have another time limit (see [`WorkerClientBuilder::timeout`]), e.g. a
    /// heartbeat that must not outlast the interval it is sent in.
    pub fn with_timeout(&self, timeout: Duration) -> WorkerClient {
        let mut client = self.client.clone();
        client.timeout = timeout;
        WorkerClient { client }
    }

    /// Long-polls for a task of one of `models` (`POST /api/v1/worker/claim`): `None` when none
    /// came within `wait` (the server caps it at 30 s). The claim must be acknowledged with a
    /// [`heartbeat`](Self::heartbeat) before the lease ends, or the task goes back uncounted.
    ///
    /// Each model must have `backend = "worker"` on the server (else 400
    /// `model_not_for_workers`, or 404 `model_not_found`).
    pub async fn claim<S: AsRef<str>>(
        &self,
        models: &[S],
        wait: Duration,
    ) -> Result<Option<WorkerTask>, Error> {
        let body = WorkerClaimRequest {
            models: models.iter().map(|m| m.as_ref().to_owned()).collect(),
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        let url = self.client.endpoint(&["worker", "claim"])?;
        let timeout = self.client.timeout.saturating_add(wait);
        let data = self
            .client
            .send(&url, false, || {
                let req = self
                    .client
                    .request(Method::POST, url.clone(), Some(timeout));
                std::future::ready(Ok(req.json(&body)))
            })
            .await
            .map_err(lease_lost_of_older_servers)?;
        match data {
            None | Some(serde_json::Value::Null) => Ok(None),
            data => decode_data(&url, data).map(Some),
        }
    }

    /// Renews the lease of `task_id` (`POST …/tasks/{id}/heartbeat`), acknowledging the claim
    /// the first time; progress (0–1) and log lines may ride along.
    pub async fn heartbeat(&self, task_id: &str, beat: &WorkerHeartbeat) -> Result<(), Error> {
        self.report(task_id, "heartbeat", beat).await
    }

    /// Uploads the file at `path` as the output `name` of this attempt
    /// (`PUT …/tasks/{id}/outputs/{name}?leaseToken=…`), streamed with its `Content-Length`.
    /// The server renews the lease while the bytes arrive. An output becomes the task's only
    /// when [`complete`](Self::complete) names it.
    pub async fn upload(
        &self,
        task_id: &str,
        lease_token: &str,
        name: &str,
        path: &Path,
    ) -> Result<(), Error> {
        let mut url = self
            .client
            .endpoint(&["worker", "tasks", task_id, "outputs", name])?;
        url.query_pairs_mut().append_pair("leaseToken", lease_token);
        let read_error = |source| Error::ReadFile {
            path: path.to_owned(),
            source,
        };
        let (client, url_ref) = (&self.client, &url);
        client
            .send(url_ref, true, move || async move {
                let file = tokio::fs::File::open(path).await.map_err(read_error)?;
                let len = file.metadata().await.map_err(read_error)?.len();
                Ok(client
                    .request(Method::PUT, url_ref.clone(), None)
                    .header(CONTENT_LENGTH, len)
                    .body(reqwest::Body::from(file)))
            })
            .await
            .map_err(lease_lost_of_older_servers)?;
        Ok(())
    }

    /// Reports success with the outputs uploaded by this attempt (`POST …/tasks/{id}/complete`).
    /// Naming an output never uploaded is refused (400 `output_not_uploaded`); a 503
    /// `outcome_not_recorded` means nothing was written: report again while the lease holds.
    pub async fn complete(&self, task_id: &str, done: &WorkerComplete) -> Result<(), Error> {
        self.report(task_id, "complete", done).await
    }

    /// Reports failure (`POST …/tasks/{id}/fail`); with `retryable` the task runs again while
    /// attempts remain.
    pub async fn fail(&self, task_id: &str, failed: &WorkerFail) -> Result<(), Error> {
        self.report(task_id, "fail", failed).await
    }

    /// A call about a claimed task that answers nothing but success.
    async fn report<B: serde::Serialize>(
        &self,
        task_id: &str,
        what: &str,
        body: &B,
    ) -> Result<(), Error> {
        let url = self.client.endpoint(&["worker", "tasks", task_id, what])?;
        self.client
            .call(Method::POST, url, Some(body), true)
            .await
            .map_err(lease_lost_of_older_servers)?;
        Ok(())
    }
}

/// A server from before error codes said "lease lost" with a bare 409, the worker API's only
/// 409 then; read it as the code it would send now, so callers have one case to match.
fn lease_lost_of_older_servers(e: Error) -> Error {
    match e {
        Error::Api {
            status: 409,
            code,
            message,
            detail,
            error_code: None,
        } => Error::Api {
            status: 409,
            code,
            message,
            detail,
            error_code: Some(ErrorCode::LeaseLost.as_str().to_owned()),
        },
        e => e,
    }
}
