//! `taskgate worker`: a pull worker. It claims tasks of `worker`-backed models from a taskgate
//! server over HTTP (so a GPU box needs no inbound port), runs each with the command backend on
//! this machine, uploads the outputs, and reports the outcome.
//!
//! Concurrency model: `--concurrency` independent slots, each a loop of long-poll claim → run.
//! A claim is acknowledged with a heartbeat at once (the server hands back a claim nobody
//! acknowledged, as if it had never been received). From then on one heartbeat loop runs beside
//! the whole attempt — program, uploads, and the complete/fail report, which is retried while
//! the server cannot take it — so a long upload keeps its lease. The lease is lost when a
//! heartbeat is answered 409 (the server handed the task to someone else) or when none got
//! through for a whole lease (the server has let it expire): whatever stage is running is then
//! dropped at once (which kills the program's processes). On SIGTERM or Ctrl-C the slots stop
//! claiming and finish what they run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use taskgate_proto::{
    Envelope, ErrorCode, WorkerClaimRequest, WorkerComplete, WorkerFail, WorkerHeartbeat,
    WorkerTask,
};
use taskgate_server::backends::{Backend, BackendError, CommandBackend, Job};
use taskgate_server::domain::fail_code;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

#[derive(Args)]
pub struct WorkerArgs {
    /// The taskgate server's base URL (`--url` works too, as for the client commands).
    #[arg(
        long,
        alias = "url",
        env = "TASKGATE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// A worker token (`taskgate keys create --worker --name NAME`).
    #[arg(long, env = "TASKGATE_WORKER_TOKEN", hide_env_values = true)]
    token: String,
    /// Model(s) to claim tasks of; each must have backend = "worker" on the server.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Tasks run at the same time on this machine.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Where attempts get their output directories [default: the system temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The program to run per task, after `--`: input JSON on stdin, outputs into
    /// $TASKGATE_OUTPUT_DIR, exit 75 for a retryable failure.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The worker API, as this process speaks it.
#[derive(Clone)]
struct WorkerApi {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Why a call failed: the server said the task is no longer ours, refused our token, rejected
/// the request itself (another 4xx: sending it again cannot help), or anything else (a 5xx or
/// a transport error: worth retrying).
enum CallError {
    LeaseLost,
    Refused(String),
    Rejected(String),
    Other(anyhow::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::LeaseLost => f.write_str("the task is no longer ours"),
            CallError::Refused(m) => write!(f, "refused: {m}"),
            CallError::Rejected(m) => write!(f, "rejected: {m}"),
            CallError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl WorkerApi {
    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Option<T>, CallError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| CallError::Other(anyhow::Error::new(e).context(format!("POST {path}"))))?;
        Self::decode(resp, path).await
    }

    async fn decode<T: DeserializeOwned>(
        resp: reqwest::Response,
        path: &str,
    ) -> Result<Option<T>, CallError> {
        let status = resp.status();
        // Read as JSON first: an error's `data` is `{"errorCode": …}`, not a `T`.
        let envelope: Envelope<serde_json::Value> = match resp.json().await {
            Ok(e) => e,
            Err(e) => {
                return Err(CallError::Other(anyhow::anyhow!(
                    "{path}: the server answered {status} with a body that is not the envelope: {e}"
                )))
            }
        };
        // Only an error's data is an ErrorData; a claim's is the task (not copied to look).
        let error_code = if status.is_success() {
            None
        } else {
            envelope
                .data
                .as_ref()
                .and_then(|d| d.get("errorCode"))
                .and_then(serde_json::Value::as_str)
                .and_then(ErrorCode::parse)
        };
        match status {
            s if s.is_success() => match envelope.data {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(data) => serde_json::from_value(data).map(Some).map_err(|e| {
                    CallError::Other(anyhow::anyhow!(
                        "{path}: the server answered {status} with data this worker does not understand: {e}"
                    ))
                }),
            },
            _ if error_code == Some(ErrorCode::LeaseLost) => Err(CallError::LeaseLost),
            // A server from before error codes said "lease lost" with a bare 409.
            StatusCode::CONFLICT if error_code.is_none() => Err(CallError::LeaseLost),
            StatusCode::UNAUTHORIZED => Err(CallError::Refused(envelope.message)),
            s if s.is_client_error() => Err(CallError::Rejected(format!(
                "{path}: {s}: {}",
                envelope.message
            ))),
            s => Err(CallError::Other(anyhow::anyhow!(
                "{path}: {s}: {}",
                envelope.message
            ))),
        }
    }

    async fn upload(&self, task: &WorkerTask, name: &str, path: &Path) -> Result<(), CallError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CallError::Other(e.into()))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| CallError::Other(e.into()))?
            .len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let url = format!(
            "{}/api/v1/worker/tasks/{}/outputs/{name}",
            self.base, task.task_id
        );
        let resp = self
            .http
            .put(url)
            .query(&[("leaseToken", &task.lease_token)])
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::Other(e.into()))?;
        Self::decode::<serde_json::Value>(resp, "upload")
            .await
            .map(|_| ())
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let server = args.server.clone();
    let base = server.trim_end_matches('/').to_owned();
    url::Url::parse(&base).with_context(|| format!("--server / --url {base:?} is not a URL"))?;
    let api = WorkerApi {
        base,
        token: args.token.clone(),
        http: reqwest::Client::builder()
            .user_agent(concat!("taskgate-worker/", env!("CARGO_PKG_VERSION")))
            .build()?,
    };
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let backend = Arc::new(CommandBackend::new(
        args.command.clone(),
        Default::default(),
        None,
    ));
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            info!("stopping: no new tasks; finishing the running ones");
            stop.cancel();
        });
    }
    info!(server = %api.base, models = ?args.models, concurrency = args.concurrency, "worker started");
    let mut slots = Vec::new();
    for slot in 0..args.concurrency {
        let (api, backend, stop) = (api.clone(), backend.clone(), stop.clone());
        let (models, work_dir) = (args.models.clone(), work_dir.clone());
        slots.push(tokio::spawn(
            async move { slot_loop(api, backend, models, work_dir, stop).await }
                .instrument(info_span!("slot", slot)),
        ));
    }
    for s in slots {
        s.await??;
    }
    Ok(())
}

/// Claims and runs tasks until stopped; returns an error only when retrying cannot help (the
/// server refused the token or the model).
async fn slot_loop(
    api: WorkerApi,
    backend: Arc<CommandBackend>,
    models: Vec<String>,
    work_dir: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        let req = WorkerClaimRequest {
            models: models.clone(),
            wait_ms: 25_000,
        };
        let claimed = tokio::select! {
            r = api.post::<_, WorkerTask>("/api/v1/worker/claim", &req, Duration::from_secs(60)) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        match claimed {
            Ok(Some(task)) => {
                backoff = Duration::from_millis(500);
                let span = info_span!("task", task_id = %task.task_id, attempt = task.attempt);
                run_task(&api, backend.as_ref(), &work_dir, task)
                    .instrument(span)
                    .await;
            }
            Ok(None) => {}
            Err(CallError::LeaseLost) => {}
            Err(CallError::Refused(message)) => {
                stop.cancel();
                bail!("the server refused this worker's token: {message}");
            }
            Err(e @ (CallError::Other(_) | CallError::Rejected(_))) => {
                warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot claim work");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    Ok(())
}

async fn run_task(api: &WorkerApi, backend: &CommandBackend, work_dir: &Path, task: WorkerTask) {
    // The claim's lease was set before its answer arrived: it ends a lease from now at the latest.
    let mut renewed = Instant::now();
    // Acknowledge before anything else: until then the server may hand the claim back.
    match heartbeat(api, &task, Duration::from_secs(10)).await {
        Ok(()) => renewed = Instant::now(),
        Err(CallError::LeaseLost) => {
            warn!("the claim was handed on before it could be acknowledged; dropping it");
            return;
        }
        // The heartbeat loop below acknowledges it a third of a lease from now.
        Err(e) => warn!(error = %format!("{e:#}"), "cannot acknowledge the claim; will retry"),
    }
    info!("running");
    // Named after the claim (its tag), never after the attempt number: a claim handed back
    // unacknowledged comes again with the same number, and two claims must never share a
    // directory.
    let output_dir = work_dir.join(format!(
        "taskgate-{}@{}",
        task.task_id,
        taskgate_server::domain::attempt_tag(&task.lease_token)
    ));
    tokio::select! {
        () = attempt(api, backend, &output_dir, &task) => {}
        () = heartbeat_until_lost(api, &task, renewed) => {
            warn!("the lease on this task is lost; abandoning it");
        }
    }
    let _ = tokio::fs::remove_dir_all(&output_dir).await;
}

/// Runs the program, uploads its outputs and reports the outcome; the caller holds the lease
/// meanwhile and drops this future when the lease is lost.
async fn attempt(api: &WorkerApi, backend: &CommandBackend, output_dir: &Path, task: &WorkerTask) {
    if let Err(e) = tokio::fs::create_dir(output_dir).await {
        report_failure(
            api,
            task,
            BackendError::retryable(
                fail_code::INTERNAL_ERROR,
                format!("cannot create {}: {e}", output_dir.display()),
            ),
        )
        .await;
        return;
    }
    let job = Job {
        task_id: task.task_id.clone(),
        model: task.model.clone(),
        input: task.input.clone(),
        attempt: task.attempt,
        output_dir: Some(output_dir.to_owned()),
    };
    let timeout = Duration::from_millis(task.timeout_ms);
    let result = match tokio::time::timeout(timeout, backend.run(&job)).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::fatal(
            fail_code::PROCESSING_TIMEOUT,
            format!(
                "the task ran longer than the model's timeout of {}",
                humantime::format_duration(timeout)
            ),
        )),
    };
    if let Err(e) = result {
        report_failure(api, task, e).await;
        return;
    }
    match upload_outputs(api, task, output_dir).await {
        Ok(names) => {
            let body = WorkerComplete {
                lease_token: task.lease_token.clone(),
                outputs: names,
            };
            match report(api, task, "complete", &body).await {
                Ok(()) => info!("completed"),
                Err(CallError::LeaseLost) => warn!("finished, but the task had been handed on"),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot report completion; the task will run again when its lease expires")
                }
            }
        }
        Err(CallError::LeaseLost) => warn!("the task was handed on while uploading"),
        Err(e) => {
            report_failure(
                api,
                task,
                BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("uploading outputs failed: {e:#}"),
                ),
            )
            .await
        }
    }
}

/// Sends a final report (`complete` or `fail`) until the server takes it. A 5xx or a transport
/// error is retried with backoff, for as long as the caller holds the lease; any other answer
/// is final.
async fn report<B: Serialize>(
    api: &WorkerApi,
    task: &WorkerTask,
    what: &str,
    body: &B,
) -> Result<(), CallError> {
    let path = format!("/api/v1/worker/tasks/{}/{what}", task.task_id);
    let mut backoff = REPORT_RETRY_FIRST;
    loop {
        match api
            .post::<_, serde_json::Value>(&path, body, Duration::from_secs(60))
            .await
        {
            Ok(_) => return Ok(()),
            Err(CallError::Other(e)) => {
                warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot report the outcome yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REPORT_RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Backoff of `report`: 200 ms doubling up to 5 s.
const REPORT_RETRY_FIRST: Duration = Duration::from_millis(200);
const REPORT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Renews the lease once.
async fn heartbeat(api: &WorkerApi, task: &WorkerTask, timeout: Duration) -> Result<(), CallError> {
    let hb = WorkerHeartbeat {
        lease_token: task.lease_token.clone(),
        progress: None,
        logs: Vec::new(),
    };
    api.post::<_, serde_json::Value>(
        &format!("/api/v1/worker/tasks/{}/heartbeat", task.task_id),
        &hb,
        timeout,
    )
    .await
    .map(|_| ())
}

/// Renews the lease every third of it; returns only once the lease is lost: the server says the
/// task is gone, or no renewal got through for a whole lease since `renewed` (the last one that
/// did), after which the server has surely let it expire.
async fn heartbeat_until_lost(api: &WorkerApi, task: &WorkerTask, mut renewed: Instant) {
    let lease = Duration::from_millis(task.lease_ms);
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match heartbeat(api, task, every).await {
            // Measured at the answer: the server renewed no later than that.
            Ok(()) => renewed = Instant::now(),
            Err(CallError::LeaseLost) => return,
            Err(e) if renewed.elapsed() >= lease => {
                warn!(error = %format!("{e:#}"), "no heartbeat got through for a whole lease");
                return;
            }
            Err(e) => warn!(error = %format!("{e:#}"), "heartbeat failed; will retry"),
        }
    }
}

async fn upload_outputs(
    api: &WorkerApi,
    task: &WorkerTask,
    dir: &Path,
) -> Result<Vec<String>, CallError> {
    let files = taskgate_server::dispatch::collect_files(dir)
        .await
        .map_err(|e| CallError::Other(e.into()))?;
    let mut names = Vec::with_capacity(files.len());
    for (name, path) in taskgate_server::artifacts::output_names(files) {
        // A passing failure (a 5xx, a dropped connection) is tried again rather than failing
        // the attempt; the heartbeat beside this call still ends it if the lease is lost.
        let mut pause = Duration::from_millis(500);
        let mut tries = 1;
        loop {
            match api.upload(task, &name, &path).await {
                Ok(()) => break,
                Err(CallError::Other(e)) if tries < 4 => {
                    warn!(error = %format!("{e:#}"), %name, retry_in = ?pause, "upload failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
        names.push(name);
    }
    Ok(names)
}

async fn report_failure(api: &WorkerApi, task: &WorkerTask, e: BackendError) {
    let (code, message, retryable) = match e {
        BackendError::Retryable { code, message } => (code, message, true),
        BackendError::Fatal { code, message } => (code, message, false),
    };
    info!(%code, %message, retryable, "attempt failed");
    let body = WorkerFail {
        lease_token: task.lease_token.clone(),
        fail_code: Some(code),
        fail_msg: message,
        retryable,
    };
    match report(api, task, "fail", &body).await {
        Ok(()) => {}
        Err(CallError::LeaseLost) => warn!("failed, but the task had been handed on"),
        Err(e) => {
            error!(error = %format!("{e:#}"), "cannot report the failure; the task will run again when its lease expires")
        }
    }
}
