//! `taskgate worker`: a pull worker. It claims tasks of `worker`-backed models from a taskgate
//! server over HTTP (so a GPU box needs no inbound port), runs each with the command backend on
//! this machine, uploads the outputs, and reports the outcome. It speaks the worker API through
//! `taskgate_client::WorkerClient`; of the server it uses only the command backend and the
//! helpers that name attempts and outputs as the server does.
//!
//! Concurrency model: `--concurrency` independent slots, each a loop of long-poll claim → run.
//! A claim is acknowledged with a heartbeat at once (the server hands back a claim nobody
//! acknowledged, as if it had never been received). From then on one heartbeat loop runs beside
//! the whole attempt — program, uploads, and the complete/fail report, which is retried while
//! the server cannot take it — so a long upload keeps its lease. The lease is lost when a
//! heartbeat is answered 409 (the server handed the task to someone else, or its owner cancelled
//! it) or when none got through for a whole lease (the server has let it expire): whatever stage
//! is running is then dropped at once (which kills the program's processes). On SIGTERM or Ctrl-C the slots stop
//! claiming and finish what they run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use taskgate_client::proto::{ErrorCode, WorkerComplete, WorkerFail, WorkerHeartbeat, WorkerTask};
use taskgate_client::{Error, RetryPolicy, WorkerClient};
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
    /// Log format on stderr.
    #[arg(long, env = "TASKGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// The program to run per task, after `--`: input JSON on stdin, outputs into
    /// $TASKGATE_OUTPUT_DIR, exit 75 for a retryable failure.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// How the worker takes a failed call.
enum Failure {
    /// The server says the task is no longer ours.
    LeaseLost,
    /// The server refused our token.
    Refused,
    /// A 429 or 5xx, a transport error, or an answer that could not be read: worth retrying.
    Passing,
    /// The request itself was refused (another 4xx): sending it again cannot help.
    Rejected,
}

fn failure(e: &Error) -> Failure {
    if e.error_code() == Some(ErrorCode::LeaseLost) {
        Failure::LeaseLost
    } else if matches!(e, Error::Api { status: 401, .. }) {
        Failure::Refused
    } else if e.is_transient() || matches!(e, Error::Protocol { .. }) {
        Failure::Passing
    } else {
        Failure::Rejected
    }
}

fn is_lease_lost(e: &Error) -> bool {
    matches!(failure(e), Failure::LeaseLost)
}

fn is_passing(e: &Error) -> bool {
    matches!(failure(e), Failure::Passing)
}

/// How long a claim waits for work, and the time limit of the whole claim call.
const CLAIM_WAIT: Duration = Duration::from_secs(25);
const CLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// The time limit of a claim's acknowledgement; later heartbeats get the interval they are sent
/// in.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The time limit of one `complete` or `fail` call.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let server = args.server.clone();
    // The loops below retry each call in their own way (a report for as long as the lease
    // holds, a claim with a backoff up to 30 s), with a log line per retry.
    let api = WorkerClient::builder(&server, args.token.clone())
        .user_agent(concat!("taskgate-worker/", env!("CARGO_PKG_VERSION")))
        .retry(RetryPolicy::none())
        .timeout(REPORT_TIMEOUT)
        .build()
        .with_context(|| format!("cannot use --server / --url {server:?}"))?;
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
    info!(server = %api.base_url(), models = ?args.models, concurrency = args.concurrency, "worker started");
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
    api: WorkerClient,
    backend: Arc<CommandBackend>,
    models: Vec<String>,
    work_dir: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let claims = api.with_timeout(CLAIM_TIMEOUT - CLAIM_WAIT);
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        let claimed = tokio::select! {
            r = claims.claim(&models, CLAIM_WAIT) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        match claimed {
            Ok(Some(task)) => {
                backoff = Duration::from_millis(500);
                let span = info_span!("attempt", taskId = %task.task_id, model = %task.model, attempt = task.attempt);
                run_task(&api, backend.as_ref(), &work_dir, task)
                    .instrument(span)
                    .await;
            }
            Ok(None) => {}
            Err(e) => match failure(&e) {
                Failure::LeaseLost => {}
                Failure::Refused => {
                    stop.cancel();
                    let message = match &e {
                        Error::Api { message, .. } => message.clone(),
                        e => e.to_string(),
                    };
                    bail!("the server refused this worker's token: {message}");
                }
                Failure::Passing | Failure::Rejected => {
                    warn!(error = %e, retry_in = ?backoff, "cannot claim work");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            },
        }
    }
    Ok(())
}

async fn run_task(api: &WorkerClient, backend: &CommandBackend, work_dir: &Path, task: WorkerTask) {
    // The claim's lease was set before its answer arrived: it ends a lease from now at the latest.
    let mut renewed = Instant::now();
    // Acknowledge before anything else: until then the server may hand the claim back.
    match heartbeat(api, &task, ACK_TIMEOUT).await {
        Ok(()) => renewed = Instant::now(),
        Err(e) if is_lease_lost(&e) => {
            warn!("the claim was handed on before it could be acknowledged; dropping it");
            return;
        }
        // The heartbeat loop below acknowledges it a third of a lease from now.
        Err(e) => warn!(error = %e, "cannot acknowledge the claim; will retry"),
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
        why = heartbeat_until_lost(api, &task, renewed) => {
            // Leaving the select dropped the attempt: its program's process tree is killed.
            warn!(reason = %why, "the task is no longer ours (handed on or cancelled); stopped its program and dropped it");
        }
    }
    let _ = tokio::fs::remove_dir_all(&output_dir).await;
}

/// Runs the program, uploads its outputs and reports the outcome; the caller holds the lease
/// meanwhile and drops this future when the lease is lost.
async fn attempt(
    api: &WorkerClient,
    backend: &CommandBackend,
    output_dir: &Path,
    task: &WorkerTask,
) {
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
        // The program's stdout reports are not forwarded in heartbeats yet: they go nowhere.
        progress: Default::default(),
        route: Default::default(),
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
            let done = Report::Complete(WorkerComplete {
                lease_token: task.lease_token.clone(),
                outputs: names,
            });
            match report(api, task, &done).await {
                Ok(()) => info!("completed"),
                Err(e) if is_lease_lost(&e) => warn!("finished, but the task had been handed on"),
                Err(e) => {
                    error!(error = %e, "cannot report completion; the task will run again when its lease expires")
                }
            }
        }
        Err(e) if is_lease_lost(&e) => warn!("the task was handed on while uploading"),
        Err(e) => {
            report_failure(
                api,
                task,
                BackendError::retryable(
                    fail_code::INTERNAL_ERROR,
                    format!("uploading outputs failed: {e}"),
                ),
            )
            .await
        }
    }
}

/// A final report.
enum Report {
    Complete(WorkerComplete),
    Fail(WorkerFail),
}

/// Sends a final report until the server takes it. A passing failure is retried with backoff,
/// for as long as the caller holds the lease; any other answer is final.
async fn report(api: &WorkerClient, task: &WorkerTask, report: &Report) -> Result<(), Error> {
    let mut backoff = REPORT_RETRY_FIRST;
    loop {
        let sent = match report {
            Report::Complete(done) => api.complete(&task.task_id, done).await,
            Report::Fail(failed) => api.fail(&task.task_id, failed).await,
        };
        match sent {
            Ok(()) => return Ok(()),
            Err(e) if is_passing(&e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot report the outcome yet");
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

/// Renews the lease once, within `timeout`.
async fn heartbeat(api: &WorkerClient, task: &WorkerTask, timeout: Duration) -> Result<(), Error> {
    let hb = WorkerHeartbeat {
        lease_token: task.lease_token.clone(),
        progress: None,
        logs: Vec::new(),
    };
    api.with_timeout(timeout)
        .heartbeat(&task.task_id, &hb)
        .await
}

/// Renews the lease every third of it; returns (why) only once the lease is lost: the server
/// says the task is gone (handed on, or cancelled by its owner), or no renewal got through for a
/// whole lease since `renewed` (the last one that did), after which the server has surely let it
/// expire.
async fn heartbeat_until_lost(
    api: &WorkerClient,
    task: &WorkerTask,
    mut renewed: Instant,
) -> String {
    let lease = Duration::from_millis(task.lease_ms);
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match heartbeat(api, task, every).await {
            // Measured at the answer: the server renewed no later than that.
            Ok(()) => renewed = Instant::now(),
            Err(e) if is_lease_lost(&e) => {
                return match e {
                    Error::Api { message, .. } => message,
                    e => e.to_string(),
                }
            }
            Err(e) if renewed.elapsed() >= lease => {
                warn!(error = %e, "no heartbeat got through for a whole lease");
                return "no heartbeat got through for a whole lease".to_owned();
            }
            Err(e) => warn!(error = %e, "heartbeat failed; will retry"),
        }
    }
}

/// Uploads the files the program left in `dir`; returns their names.
async fn upload_outputs(
    api: &WorkerClient,
    task: &WorkerTask,
    dir: &Path,
) -> Result<Vec<String>, Error> {
    let files = taskgate_server::dispatch::collect_files(dir)
        .await
        .map_err(|source| Error::ReadFile {
            path: dir.to_owned(),
            source,
        })?;
    let mut names = Vec::with_capacity(files.len());
    for (name, path) in taskgate_server::artifacts::output_names(files) {
        // A passing failure (a 5xx, a dropped connection) is tried again rather than failing
        // the attempt; the heartbeat beside this call still ends it if the lease is lost.
        let mut pause = Duration::from_millis(500);
        let mut tries = 1;
        loop {
            match api
                .upload(&task.task_id, &task.lease_token, &name, &path)
                .await
            {
                Ok(()) => break,
                Err(e) if is_passing(&e) && tries < 4 => {
                    warn!(error = %e, %name, retry_in = ?pause, "upload failed; retrying");
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

async fn report_failure(api: &WorkerClient, task: &WorkerTask, e: BackendError) {
    let (code, message, retryable) = match e {
        BackendError::Retryable { code, message } => (code, message, true),
        BackendError::Fatal { code, message } => (code, message, false),
    };
    info!(%code, reason = %message, retryable, "attempt failed");
    let failed = Report::Fail(WorkerFail {
        lease_token: task.lease_token.clone(),
        fail_code: Some(code),
        fail_msg: message,
        retryable,
    });
    match report(api, task, &failed).await {
        Ok(()) => {}
        Err(e) if is_lease_lost(&e) => warn!("failed, but the task had been handed on"),
        Err(e) => {
            error!(error = %e, "cannot report the failure; the task will run again when its lease expires")
        }
    }
}
