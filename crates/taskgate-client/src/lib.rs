//! Rust SDK for taskgate and any APIXO-compatible asynchronous task API.
//!
//! The API has two calls: `POST /api/v1/generateTask/{model}` answers at once with a `taskId`, and
//! `GET /api/v1/statusTask/{model}?taskId=…` tells how the task is doing. This crate wraps them in
//! a [`Client`] and adds what every caller otherwise writes by hand:
//!
//! * [`Client::wait`] polls with APIXO's recommended practice (first poll after 3 s, ×1.5 per
//!   round, 30 s cap, 5 min limit, with jitter), all configurable through [`WaitOptions`];
//! * each request retries transient failures only (429 honouring `Retry-After`, 5xx, no
//!   connection) with bounded exponential backoff ([`RetryPolicy`]); any other 4xx is returned
//!   at once, because repeating it cannot help;
//! * [`Error`] keeps the envelope's `code` and `message`, so callers can tell a refused key from
//!   an unknown model from a failed task from a timeout;
//! * [`Client::download`] streams a result URL to disk (result URLs expire after 24 h);
//! * [`verify_webhook`] checks the Standard Webhooks signature taskgate puts on callbacks;
//! * [`Client::cancel`] cancels a task that is not finished (a taskgate extension).
//!
//! ```no_run
//! # async fn demo() -> Result<(), taskgate_client::Error> {
//! use taskgate_client::{Client, SubmitOptions, WaitOptions};
//!
//! let client = Client::new("http://127.0.0.1:8080", std::env::var("TASKGATE_API_KEY").unwrap_or_default())?;
//! let task_id = client
//!     .submit("demo-image", serde_json::json!({"prompt": "a red fox"}), SubmitOptions::default())
//!     .await?;
//! let status = client.wait("demo-image", &task_id, WaitOptions::default()).await?;
//! if let Some(Ok(result)) = status.result() {
//!     for url in &result.result_urls {
//!         let path = client.download(url, "out").await?;
//!         println!("saved {}", path.display());
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Concurrency: a [`Client`] is cheap to clone and safe to share between tasks; clones share one
//! connection pool. Nothing runs in the background: every retry and poll happens inside the
//! future the caller awaits, so dropping that future cancels it.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use url::Url;

mod download;
mod error;
mod retry;
mod wait;
mod worker;

pub use download::DownloadProgress;
pub use error::Error;
pub use retry::RetryPolicy;
pub use wait::{ProgressFn, WaitOptions, WaitProgress};
pub use worker::{WorkerClient, WorkerClientBuilder};

pub use taskgate_proto as proto;
pub use taskgate_proto::webhook;
pub use taskgate_proto::webhook::{Secret, VerifyError};
pub use taskgate_proto::{
    GenerateTaskRequest, ModelInfo, ResultJson, TaskList, TaskListItem, TaskState, TaskStatus,
};

use error::{is_transient_status, transport_reason};
use taskgate_proto::{
    Envelope, GenerateTasksRequest, RequestType, TaskCreated, TasksCreated, MAX_BATCH_TASKS,
};

/// Options of [`Client::submit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// When set, the task is submitted in callback mode (`request_type: "callback"`) and the
    /// server POSTs the final status to this URL. Polling still works either way.
    pub callback_url: Option<String>,
    /// Sent as `Idempotency-Key` (a taskgate extension; 1 to 255 printable ASCII characters):
    /// the same key with the same request within 24 h answers the task it created the first
    /// time instead of creating another. With a key, a submit whose answer was lost in transit
    /// is retried like a read, since the retry cannot create a second task.
    pub idempotency_key: Option<String>,
}

impl SubmitOptions {
    /// Callback mode with the given URL.
    ///
    /// ```
    /// let o = taskgate_client::SubmitOptions::callback("https://example.com/hook");
    /// assert_eq!(o.callback_url.as_deref(), Some("https://example.com/hook"));
    /// ```
    pub fn callback(url: impl Into<String>) -> Self {
        SubmitOptions {
            callback_url: Some(url.into()),
            ..SubmitOptions::default()
        }
    }

    /// Submits under an `Idempotency-Key` (see [`SubmitOptions::idempotency_key`]).
    ///
    /// ```
    /// let o = taskgate_client::SubmitOptions::default().with_idempotency_key("order-42");
    /// assert_eq!(o.idempotency_key.as_deref(), Some("order-42"));
    /// ```
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Which tasks [`Client::list_tasks`] asks for (`GET /api/v1/tasks`, a taskgate extension).
/// Every filter is optional; the default is the newest 20 tasks of the key's tenant.
///
/// ```
/// use taskgate_client::{ListQuery, TaskState};
/// let q = ListQuery { model: Some("echo".into()), state: Some(TaskState::Failed), ..ListQuery::default() };
/// assert_eq!(q.limit, None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only tasks of this model (an unknown model lists nothing).
    pub model: Option<String>,
    pub state: Option<TaskState>,
    /// Only tasks created after this Unix time in milliseconds (exclusive).
    pub created_after: Option<i64>,
    /// Only tasks created before this Unix time in milliseconds (exclusive).
    pub created_before: Option<i64>,
    /// Tasks per page, 1 to 100; the server's default is 20.
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page, to read the page after it.
    pub cursor: Option<String>,
}

/// Builds a [`Client`] with non-default settings.
///
/// ```
/// use std::time::Duration;
/// use taskgate_client::{Client, RetryPolicy};
/// let client = Client::builder("https://api.apixo.ai")
///     .api_key("sk-...")
///     .timeout(Duration::from_secs(10))
///     .retry(RetryPolicy::none())
///     .build()
///     .unwrap();
/// assert_eq!(client.base_url().as_str(), "https://api.apixo.ai/");
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<String>,
    retry: RetryPolicy,
    timeout: Duration,
    connect_timeout: Duration,
    user_agent: String,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

impl ClientBuilder {
    /// Sets the API key sent as `Authorization: Bearer <key>`. An empty key sends no header.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        self.api_key = (!key.is_empty()).then_some(key);
        self
    }

    /// Sets how transient failures are retried. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Time limit of one API request (submit, status), the whole response included. Downloads
    /// are bounded by a read timeout of the same length instead, so large files are not cut off.
    /// Default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time limit for establishing a connection. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the `User-Agent`. Default `taskgate-client/<version>`.
    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Validates the base URL and builds the client.
    pub fn build(self) -> Result<Client, Error> {
        let read_timeout = self.timeout;
        self.build_with(Some(read_timeout))
    }

    /// Builds the client; `read_timeout` bounds each read of a download's body. Without one a
    /// request is bounded only by its own timeout, if any: reqwest counts the read timeout from
    /// the start of the request, so a long upload would be cut off by it.
    fn build_with(self, read_timeout: Option<Duration>) -> Result<Client, Error> {
        let base = normalize_base(&self.base_url)?;
        let auth = match &self.api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    Error::InvalidInput(
                        "the API key contains characters not allowed in an HTTP header".into(),
                    )
                })?;
                // Keeps the key out of reqwest's and hyper's debug output.
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .user_agent(self.user_agent)
            .connect_timeout(self.connect_timeout)
            // Below the server's default header_timeout (30s), which closes idle keep-alive
            // connections: reusing one the server is closing would fail a request.
            .pool_idle_timeout(std::time::Duration::from_secs(20))
            // Redirects could carry the Authorization header to another host.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(t) = read_timeout {
            http = http.read_timeout(t);
        }
        let http = http
            .build()
            .map_err(|e| Error::InvalidInput(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            auth,
            retry: self.retry,
            timeout: self.timeout,
        })
    }
}

/// A handle to one APIXO-compatible server. Cheap to clone; clones share a connection pool.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
    retry: RetryPolicy,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("api_key", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .finish()
    }
}

/// One failed attempt, with what the retry loop needs to decide.
struct Failure {
    error: Error,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Client {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8080` or `https://api.apixo.ai`) with
    /// default settings. A base URL ending in `/api/v1` is accepted too.
    ///
    /// ```
    /// let c = taskgate_client::Client::new("https://api.apixo.ai/api/v1", "sk-...").unwrap();
    /// assert_eq!(c.base_url().as_str(), "https://api.apixo.ai/");
    /// assert!(taskgate_client::Client::new("not a url", "k").is_err());
    /// ```
    pub fn new(base_url: impl AsRef<str>, api_key: impl Into<String>) -> Result<Self, Error> {
        Self::builder(base_url).api_key(api_key).build()
    }

    /// A builder for non-default settings.
    pub fn builder(base_url: impl AsRef<str>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.as_ref().to_owned(),
            api_key: None,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            user_agent: concat!("taskgate-client/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }

    /// The server's base URL, normalized (no `/api/v1` suffix, trailing slash).
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// This client (sharing its connection pool) with another [`RetryPolicy`], e.g. one whose
    /// `max_retry_after` is the time a caller has left.
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskgate_client::{Client, RetryPolicy};
    /// let client = Client::new("http://127.0.0.1:8080", "tg_key").unwrap();
    /// let hurried = client.with_retry(RetryPolicy {
    ///     max_retry_after: Duration::from_secs(5),
    ///     ..RetryPolicy::default()
    /// });
    /// # let _ = hurried;
    /// ```
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Submits a task: `POST /api/v1/generateTask/{model}` with `input` (a JSON object), and
    /// returns its `taskId`.
    ///
    /// `429` and `5xx` answers and failed connections are retried per the [`RetryPolicy`]. A
    /// connection that broke after the request was sent is not retried here, since the server may
    /// already have created the task and a retry would create a second one.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// use taskgate_client::SubmitOptions;
    /// let id = client
    ///     .submit(
    ///         "nano-banana",
    ///         serde_json::json!({"mode": "text-to-image", "prompt": "a lighthouse"}),
    ///         SubmitOptions::callback("https://example.com/hooks/taskgate"),
    ///     )
    ///     .await?;
    /// println!("{id}");
    /// # Ok(()) }
    /// ```
    pub async fn submit(
        &self,
        model: &str,
        input: Value,
        opts: SubmitOptions,
    ) -> Result<String, Error> {
        let Value::Object(input) = input else {
            return Err(Error::InvalidInput("input must be a JSON object".into()));
        };
        let body = GenerateTaskRequest {
            request_type: Some(if opts.callback_url.is_some() {
                RequestType::Callback
            } else {
                RequestType::Async
            }),
            callback_url: opts.callback_url,
            input,
            ..GenerateTaskRequest::default()
        };
        let url = self.endpoint(&["generateTask", model])?;
        let data = self
            .call_keyed(url.clone(), &body, opts.idempotency_key.as_deref())
            .await?;
        let created: TaskCreated = decode_data(&url, data)?;
        Ok(created.task_id)
    }

    /// Submits up to 1000 tasks of one model in one request
    /// (`POST /api/v1/generateTasks/{model}`, a taskgate extension) and returns their ids in
    /// the order given. The server creates all of them or none: a refused item fails the call
    /// with an [`Error::Api`] whose message names it (`tasks[3]: …`). With `idempotency_key`
    /// the key covers the whole batch, and a repeat answers the same ids.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// use taskgate_client::GenerateTaskRequest;
    /// let tasks = ["a fox", "a lighthouse"].map(|prompt| GenerateTaskRequest {
    ///     request_type: None,
    ///     callback_url: None,
    ///     input: serde_json::json!({"prompt": prompt}).as_object().cloned().unwrap_or_default(),
    ///     ..GenerateTaskRequest::default()
    /// });
    /// let ids = client.submit_batch("demo-image", tasks.to_vec(), Some("nightly-2024-06-01")).await?;
    /// assert_eq!(ids.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn submit_batch(
        &self,
        model: &str,
        tasks: Vec<GenerateTaskRequest>,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        if tasks.is_empty() || tasks.len() > MAX_BATCH_TASKS {
            return Err(Error::InvalidInput(format!(
                "a batch holds 1 to {MAX_BATCH_TASKS} tasks, got {}",
                tasks.len()
            )));
        }
        let body = GenerateTasksRequest { tasks };
        let url = self.endpoint(&["generateTasks", model])?;
        let data = self.call_keyed(url.clone(), &body, idempotency_key).await?;
        let created: TasksCreated = decode_data(&url, data)?;
        Ok(created.task_ids)
    }

    /// Reads one page of the key's tenant's tasks, newest first (`GET /api/v1/tasks`, a
    /// taskgate extension): each with its status, as [`Client::status`] gives it, and its
    /// model. Pass the page's `next_cursor` as [`ListQuery::cursor`] for the next one; it is
    /// `None` on the last. Tasks submitted meanwhile do not shift the pages.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// use taskgate_client::ListQuery;
    /// let mut query = ListQuery { limit: Some(100), ..ListQuery::default() };
    /// loop {
    ///     let page = client.list_tasks(&query).await?;
    ///     for item in &page.tasks {
    ///         println!("{} {} {}", item.status.task_id, item.model, item.status.state);
    ///     }
    ///     match page.next_cursor {
    ///         Some(cursor) => query.cursor = Some(cursor),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_tasks(&self, query: &ListQuery) -> Result<TaskList, Error> {
        let mut url = self.endpoint(&["tasks"])?;
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(m) = &query.model {
                pairs.append_pair("model", m);
            }
            if let Some(s) = query.state {
                pairs.append_pair("state", s.as_str());
            }
            if let Some(t) = query.created_after {
                pairs.append_pair("createdAfter", &t.to_string());
            }
            if let Some(t) = query.created_before {
                pairs.append_pair("createdBefore", &t.to_string());
            }
            if let Some(n) = query.limit {
                pairs.append_pair("limit", &n.to_string());
            }
            if let Some(c) = &query.cursor {
                pairs.append_pair("cursor", c);
            }
        }
        // No query left empty: `…/tasks?` reads oddly in logs.
        if url.query() == Some("") {
            url.set_query(None);
        }
        let data = self
            .call(Method::GET, url.clone(), None::<&()>, true)
            .await?;
        decode_data(&url, data)
    }

    /// Reads a task's status once: `GET /api/v1/statusTask/{model}?taskId=…`. `model` must be the
    /// one used at submit.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// let s = client.status("echo", "task_01J...").await?;
    /// println!("{} is {}", s.task_id, s.state);
    /// # Ok(()) }
    /// ```
    pub async fn status(&self, model: &str, task_id: &str) -> Result<TaskStatus, Error> {
        let mut url = self.endpoint(&["statusTask", model])?;
        url.query_pairs_mut().append_pair("taskId", task_id);
        let data = self
            .call(Method::GET, url.clone(), None::<&()>, true)
            .await?;
        decode_status(&url, data)
    }

    /// Cancels a task that is not finished yet: `POST /api/v1/cancelTask/{model}?taskId=…`, a
    /// taskgate extension that APIXO does not have. Returns the task's status after the cancel:
    /// `failed` with failCode `CANCELLED`. A running task's work is stopped (a pull worker stops
    /// at its next heartbeat), and a callback task's callback is sent as for any final state.
    ///
    /// A task that is already `success` or `failed` is left alone and answers 409:
    /// [`Error::error_code`] is then [`ErrorCode::TaskAlreadyFinal`](proto::ErrorCode::TaskAlreadyFinal). An unknown
    /// task, another tenant's, or one of another model answers 404 `task_not_found`, as
    /// [`status`](Self::status) does.
    ///
    /// Transient failures are retried like a status read, even after the request was sent: a
    /// cancel cannot happen twice. So a `task_already_final` may follow a first try whose answer
    /// was lost; read the status to see how the task ended.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// use taskgate_client::proto::ErrorCode;
    /// match client.cancel("sdxl", "task_01J...").await {
    ///     Ok(s) => println!("{} is now {} ({:?})", s.task_id, s.state, s.fail_code),
    ///     Err(e) if e.error_code() == Some(ErrorCode::TaskAlreadyFinal) => println!("too late"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&self, model: &str, task_id: &str) -> Result<TaskStatus, Error> {
        let mut url = self.endpoint(&["cancelTask", model])?;
        url.query_pairs_mut().append_pair("taskId", task_id);
        let data = self
            .call(Method::POST, url.clone(), None::<&()>, true)
            .await?;
        decode_status(&url, data)
    }

    /// Reads the tenant's webhook signing secrets (`GET /api/v1/webhookSecret`, a taskgate
    /// extension that APIXO does not have): the current one and, during a rotation, the previous
    /// one that still signs until `previous_expires_time`.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// let secrets = client.webhook_secret().await?;
    /// assert!(secrets.secret.starts_with("whsec_"));
    /// # Ok(()) }
    /// ```
    pub async fn webhook_secret(&self) -> Result<taskgate_proto::WebhookSecretData, Error> {
        let url = self.endpoint(&["webhookSecret"])?;
        let data = self
            .call(Method::GET, url.clone(), None::<&()>, true)
            .await?;
        decode_data(&url, data)
    }

    /// Lists the models this key may use (`GET /api/v1/models`, a taskgate extension that
    /// APIXO does not have; it answers 404 there), sorted by name: each with its modes, the
    /// poll interval the server recommends, and the JSON Schema its `input` must match, if any.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// for m in client.models().await? {
    ///     println!("{} (poll every {} ms)", m.model, m.poll_interval_ms);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn models(&self) -> Result<Vec<ModelInfo>, Error> {
        let url = self.endpoint(&["models"])?;
        let data = self
            .call(Method::GET, url.clone(), None::<&()>, true)
            .await?;
        let list: taskgate_proto::ModelList = decode_data(&url, data)?;
        Ok(list.models)
    }

    fn endpoint(&self, segments: &[&str]) -> Result<Url, Error> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::InvalidUrl {
                url: self.base.to_string(),
                reason: "cannot be used as a base URL".into(),
            })?
            .pop_if_empty()
            .extend(["api", "v1"])
            .extend(segments);
        Ok(url)
    }

    /// Sends one API request, retrying transient failures, and returns the envelope's `data`.
    async fn call<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<Option<Value>, Error> {
        self.send(&url, idempotent, || {
            let mut req = self.request(method.clone(), url.clone(), Some(self.timeout));
            if let Some(body) = body {
                req = req.json(body);
            }
            std::future::ready(Ok(req))
        })
        .await
    }

    /// A POST that creates tasks, under an `Idempotency-Key` when given: with one the request
    /// is idempotent (the server answers a repeat with what the first created), so it is retried
    /// after any transport failure; without one only where it cannot have reached the server.
    async fn call_keyed<B: serde::Serialize + ?Sized>(
        &self,
        url: Url,
        body: &B,
        idempotency_key: Option<&str>,
    ) -> Result<Option<Value>, Error> {
        let key = idempotency_key
            .map(|k| {
                HeaderValue::from_str(k).map_err(|_| {
                    Error::InvalidInput(
                        "the idempotency key must be printable ASCII (1 to 255 characters)".into(),
                    )
                })
            })
            .transpose()?;
        self.send(&url, key.is_some(), || {
            let mut req = self
                .request(Method::POST, url.clone(), Some(self.timeout))
                .json(body);
            if let Some(key) = &key {
                req = req.header("idempotency-key", key.clone());
            }
            std::future::ready(Ok(req))
        })
        .await
    }

    /// A request with the key, limited to `timeout` as a whole when one is given.
    fn request(&self, method: Method, url: Url, timeout: Option<Duration>) -> RequestBuilder {
        let mut req = self.http.request(method, url);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        req
    }

    /// The retry loop of every API call: sends the request `attempt` makes, reads the envelope,
    /// and retries transient failures per the [`RetryPolicy`]. `attempt` is called once per try
    /// because a streamed body cannot be sent twice.
    async fn send<F, Fut>(
        &self,
        url: &Url,
        idempotent: bool,
        mut attempt: F,
    ) -> Result<Option<Value>, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<RequestBuilder, Error>>,
    {
        let mut failures = 0u32;
        loop {
            let outcome = match attempt().await?.send().await {
                Ok(resp) => read_envelope(url, resp, idempotent).await,
                Err(e) => Err(transport_failure(url, e, idempotent)),
            };
            match outcome {
                Ok(data) => return Ok(data),
                Err(f) => {
                    failures += 1;
                    self.pause_before_retry(f, failures).await?;
                }
            }
        }
    }

    /// Sleeps before the next attempt, or returns the error when no retry is due.
    async fn pause_before_retry(&self, f: Failure, failures: u32) -> Result<(), Error> {
        if !f.retryable || failures >= self.retry.max_attempts {
            return Err(f.error);
        }
        let delay = match f.retry_after {
            Some(d) if d > self.retry.max_retry_after => return Err(f.error),
            Some(d) => d,
            None => self.retry.backoff(failures),
        };
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Whether `url` is on the same origin as the API, so it may see the API key.
    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.base.origin()
    }
}

fn normalize_base(raw: &str) -> Result<Url, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: raw.to_owned(),
        reason,
    };
    let mut url = Url::parse(raw.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https".into()));
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        return Err(invalid("the URL has no host".into()));
    }
    url.set_query(None);
    url.set_fragment(None);
    // Some APIXO pages give the base as https://api.apixo.ai/api/v1; accept both spellings.
    let path = url.path().trim_end_matches('/').to_owned();
    let path = path.strip_suffix("/api/v1").unwrap_or(&path);
    url.set_path(&format!("{path}/"));
    Ok(url)
}

fn decode_data<T: serde::de::DeserializeOwned>(url: &Url, data: Option<Value>) -> Result<T, Error> {
    let data = data.ok_or_else(|| Error::Protocol {
        url: url.to_string(),
        reason: "the envelope has no data".into(),
    })?;
    serde_json::from_value(data).map_err(|e| Error::Protocol {
        url: url.to_string(),
        reason: format!("unexpected data: {e}"),
    })
}

/// A task's status from an envelope's `data` (statusTask's, and cancelTask's, which is the same).
fn decode_status(url: &Url, data: Option<Value>) -> Result<TaskStatus, Error> {
    let mut data = data.ok_or_else(|| Error::Protocol {
        url: url.to_string(),
        reason: "the envelope has no data".into(),
    })?;
    // APIXO's documented status examples leave out createTime, which taskgate always sends;
    // tolerate its absence so the client works against APIXO itself.
    if let Value::Object(map) = &mut data {
        map.entry("createTime").or_insert(Value::from(0));
    }
    decode_data(url, Some(data))
}

fn transport_failure(url: &Url, e: reqwest::Error, idempotent: bool) -> Failure {
    // A failed connect never reached the server, so even a submit is safe to repeat.
    let retryable = idempotent || e.is_connect();
    Failure {
        error: Error::Transport {
            url: url.to_string(),
            reason: transport_reason(&e),
            source: e,
        },
        retryable,
        retry_after: None,
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    retry::parse_retry_after(v, SystemTime::now())
}

/// Turns a non-2xx answer (or a 2xx with an error envelope) into an [`Error::Api`].
fn api_failure(status: StatusCode, body: &[u8], headers: &HeaderMap) -> Failure {
    let parsed = serde_json::from_slice::<Envelope<Value>>(body).ok();
    let (code, message, detail, error_code) = match parsed {
        Some(env) => {
            let field = |name: &str| {
                env.data
                    .as_ref()
                    .and_then(|d| d.get(name))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let (detail, error_code) = (field("error"), field("errorCode"));
            (env.code, env.message, detail, error_code)
        }
        None => {
            // Not an envelope: a proxy's HTML page or a bare status. Keep the start of the body
            // in case it says something useful.
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() || text.starts_with('<') {
                status
                    .canonical_reason()
                    .unwrap_or("unknown status")
                    .to_owned()
            } else {
                text.chars().take(200).collect()
            };
            (status.as_u16(), message, None, None)
        }
    };
    // Some gateways answer HTTP 200 with an error code in the envelope; the envelope decides.
    let effective = if status.is_success() {
        code
    } else {
        status.as_u16()
    };
    Failure {
        error: Error::Api {
            status: effective,
            code,
            message,
            detail,
            error_code,
        },
        retryable: is_transient_status(effective),
        retry_after: retry_after(headers),
    }
}

async fn read_envelope(
    url: &Url,
    resp: reqwest::Response,
    idempotent: bool,
) -> Result<Option<Value>, Failure> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = match resp.bytes().await {
        Ok(b) => b,
        // The server had the request: only an idempotent call may be repeated.
        Err(e) => return Err(transport_failure(url, e, idempotent)),
    };
    if !status.is_success() {
        return Err(api_failure(status, &body, &headers));
    }
    let env: Envelope<Value> = serde_json::from_slice(&body).map_err(|e| Failure {
        error: Error::Protocol {
            url: url.to_string(),
            reason: format!("the body is not an APIXO envelope: {e}"),
        },
        retryable: false,
        retry_after: None,
    })?;
    if !(200..300).contains(&env.code) {
        return Err(api_failure(status, &body, &headers));
    }
    Ok(env.data)
}

/// Verifies a webhook delivery received from taskgate (or any Standard Webhooks sender) against
/// the system clock, with the default five-minute tolerance.
///
/// `body` must be the raw bytes as received, before any JSON parsing. `secret` is the
/// `whsec_...` string (from `GET /api/v1/webhookSecret` or `taskgate webhook secret`). To accept
/// two secrets during a rotation, or to choose the clock, call [`webhook::verify`] directly.
///
/// ```
/// use taskgate_client::{verify_webhook, webhook};
/// use reqwest::header::{HeaderMap, HeaderValue};
///
/// let secret = webhook::generate_secret();
/// let body = br#"{"code":200,"message":"success","data":{}}"#;
/// let now = webhook::unix_now();
/// let sig = webhook::sign(&secret.parse().unwrap(), "msg_1", now, body);
///
/// let mut headers = HeaderMap::new();
/// headers.insert("webhook-id", HeaderValue::from_static("msg_1"));
/// headers.insert("webhook-timestamp", HeaderValue::from_str(&now.to_string()).unwrap());
/// headers.insert("webhook-signature", HeaderValue::from_str(&sig).unwrap());
///
/// assert!(verify_webhook(&headers, body, &secret).is_ok());
/// assert!(verify_webhook(&headers, b"{}", &secret).is_err());
/// ```
pub fn verify_webhook(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<(), VerifyError> {
    let secret = Secret::parse(secret)?;
    let signed =
        webhook::SignedHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    webhook::verify_now(&secret, &signed, body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base_urls_with_and_without_api_v1_or_a_prefix_normalize_alike() {
        for (raw, want) in [
            ("http://h:8080", "http://h:8080/"),
            ("http://h:8080/", "http://h:8080/"),
            ("https://api.apixo.ai/api/v1", "https://api.apixo.ai/"),
            ("https://api.apixo.ai/api/v1/", "https://api.apixo.ai/"),
            ("http://h/proxy/taskgate", "http://h/proxy/taskgate/"),
        ] {
            assert_eq!(normalize_base(raw).unwrap().as_str(), want, "{raw}");
        }
        assert!(normalize_base("ftp://h").is_err());
        assert!(normalize_base("h:8080").is_err());
    }

    #[test]
    fn endpoints_percent_encode_the_model_and_task_id() {
        let c = Client::new("http://h/p", "k").unwrap();
        let url = c.endpoint(&["statusTask", "a/b c"]).unwrap();
        assert_eq!(url.as_str(), "http://h/p/api/v1/statusTask/a%2Fb%20c");
    }

    #[test]
    fn the_api_key_never_appears_in_debug_output() {
        let c = Client::new("http://h", "secret-key-123").unwrap();
        assert!(!format!("{c:?}").contains("secret-key-123"));
        let b = Client::builder("http://h").api_key("secret-key-123");
        assert!(!format!("{b:?}").contains("secret-key-123"));
    }
}
