//! The `command` backend: one program run per attempt, no shell.
//!
//! The input JSON goes to stdin; `TASKGATE_OUTPUT_DIR` names the empty directory whose files
//! become the results. Exit 0 succeeds; exit 75 (`EX_TEMPFAIL`) is a retryable failure; any
//! other exit fails the task with the tail of stderr. stdout is read line by line as the program
//! writes it: progress (`progress: 0.42`, or `{"progress": 0.42}`) and log lines, reported
//! through the job's [`super::Progress`] (the protocol is in `progress.rs`).
//!
//! No process the program started outlives its attempt, not even one that left the program's
//! process group: when the program exits, `run` kills its whole tree (`process_tree`) and
//! returns only once the tree is gone, so the attempt is settled after its last writer died.
//! When the attempt is dropped instead (timeout, shutdown, lost lease), the drop signals every
//! process of the tree before returning and a thread finishes the job (reaping, stragglers
//! forked meanwhile), since a drop cannot wait.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::process_tree::{self, ProcessTree, KILL_BOUND};
use super::progress::{parse_line, LineSplitter, Progress};
use super::{Backend, BackendError, Job, Produced};
use crate::domain::{fail_code, MAX_LOG_LINE};

/// Exit status meaning "temporary failure, try again" (sysexits.h).
pub const EXIT_TEMPFAIL: i32 = 75;
/// Credentials the server itself may hold, kept from model programs (set them in the model's
/// `env` table to pass them on deliberately).
const SECRET_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];
/// How much of stderr is kept for failMsg.
const STDERR_TAIL_BYTES: usize = 2000;

pub struct CommandBackend {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

impl CommandBackend {
    pub fn new(
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        working_dir: Option<PathBuf>,
    ) -> Self {
        // Before any program runs, so that nothing it orphans escapes to init.
        process_tree::become_subreaper();
        CommandBackend {
            argv,
            env,
            working_dir,
        }
    }
}

/// Kills the attempt's process tree on every exit path, including a dropped future.
struct TreeGuard(Option<ProcessTree>);

impl TreeGuard {
    /// Kills the tree and waits until it is gone.
    async fn kill(&mut self) {
        let Some(tree) = self.0.take() else { return };
        match tokio::task::spawn_blocking(move || tree.kill(KILL_BOUND)).await {
            Ok(Ok(())) => {}
            Ok(Err(survivors)) => {
                tracing::error!(error = %survivors, "the model program's processes would not die")
            }
            Err(e) => tracing::error!(error = %e, "killing the model program's processes failed"),
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        let Some(tree) = self.0.take() else {
            return;
        };
        // The group at once (one syscall); the /proc rounds that find and reap escapees are
        // blocking work, so they run off the async threads.
        tree.kill_group();
        // The blocking thread has no span of its own: the attempt's goes with it.
        let span = tracing::Span::current();
        let finish = move || {
            let _attempt = span.enter();
            if let Err(survivors) = tree.kill(KILL_BOUND) {
                tracing::error!(error = %survivors, "the model program's processes would not die");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(finish);
            }
            Err(_) => {
                if let Err(e) = std::thread::Builder::new()
                    .name("taskgate-kill-tree".into())
                    .spawn(finish)
                {
                    tracing::error!(error = %e, "cannot start a thread to finish killing the model program's processes");
                }
            }
        }
    }
}

/// How long stderr may stay open after the program exits (a background child holding it is
/// killed first, so this is only a bound).
const STDERR_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

#[async_trait]
impl Backend for CommandBackend {
    /// A descendant that cleared its environment and was orphaned escapes the tree kill, so
    /// an attempt's directory is never handed to another.
    fn writes_end_with_run(&self) -> bool {
        false
    }

    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let output_dir = job.dir()?;
        let input = serde_json::to_vec(&serde_json::Value::Object(job.input.clone()))
            .map_err(|e| BackendError::fatal(fail_code::INTERNAL_ERROR, e.to_string()))?;
        let mut cmd = Command::new(&self.argv[0]);
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("TASKGATE_") || SECRET_ENV.contains(&n.as_ref()) {
                cmd.env_remove(&name);
            }
        }
        cmd.args(&self.argv[1..])
            .envs(&self.env)
            // The server's own settings (its key, database URL, storage credentials) must not
            // leak into model code; a model that needs a credential gets it through `env`.
            .env_remove("TASKGATE_API_KEY")
            .env("TASKGATE_OUTPUT_DIR", output_dir)
            .env("TASKGATE_TASK_ID", &job.task_id)
            .env("TASKGATE_MODEL", &job.model)
            .env("TASKGATE_ATTEMPT", job.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            cmd.current_dir(dir);
        }
        // The mark is inherited by every descendant, even one that leaves the process group,
        // so the tree kill can find it.
        let (mut child, tree) =
            process_tree::spawn(&mut cmd, process_tree::new_mark()).map_err(|e| {
                BackendError::fatal(
                    fail_code::MODEL_UNAVAILABLE,
                    format!("cannot start {:?}: {e}", self.argv[0]),
                )
            })?;
        let mut tree = TreeGuard(tree);

        let mut stdin = child.stdin.take();
        let write_input = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A program that does not read its input closes the pipe: not an error.
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
            }
            drop(stdin);
        };
        let mut stderr = child.stderr.take();
        let read_stderr = async move {
            let mut tail = VecDeque::with_capacity(STDERR_TAIL_BYTES);
            let mut buf = [0u8; 4096];
            if let Some(err) = stderr.as_mut() {
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.extend(&buf[..n]);
                    while tail.len() > STDERR_TAIL_BYTES {
                        tail.pop_front();
                    }
                }
            }
            tail
        };
        // stderr is read in its own task: a background child that inherited the pipe would
        // otherwise keep it open, and the attempt, alive after the program itself exited.
        let stderr_task = tokio::spawn(tracing::Instrument::in_current_span(read_stderr));
        // stdout likewise, and always drained, so a program that writes much never blocks on
        // a full pipe; aborted if the attempt is dropped.
        let mut stdout_task = AbortOnDrop(tokio::spawn(tracing::Instrument::in_current_span(
            read_stdout(child.stdout.take(), job.progress.clone()),
        )));
        let (_, status) = tokio::join!(write_input, child.wait());
        // The program is done: whatever it left running goes with it, before the attempt is
        // settled.
        tree.kill().await;
        // Both pipes' last lines, read together: their writers are dead, so each ends at once
        // unless an escaped descendant still holds it.
        let (tail, _) = tokio::join!(
            tokio::time::timeout(STDERR_DRAIN, stderr_task),
            tokio::time::timeout(STDERR_DRAIN, &mut stdout_task.0),
        );
        let mut tail = match tail {
            Ok(Ok(tail)) => tail,
            _ => VecDeque::new(),
        };
        let status = status.map_err(|e| {
            BackendError::retryable(
                fail_code::INTERNAL_ERROR,
                format!("waiting for the program failed: {e}"),
            )
        })?;
        if status.success() {
            return Ok(Produced::Files);
        }
        let tail = String::from_utf8_lossy(tail.make_contiguous())
            .trim()
            .to_owned();
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".to_owned(),
        };
        let message = if tail.is_empty() {
            format!("the model program {how} and wrote nothing to stderr")
        } else {
            tail
        };
        if status.code() == Some(EXIT_TEMPFAIL) {
            Err(BackendError::retryable(
                fail_code::GENERATION_FAILED,
                message,
            ))
        } else {
            Err(BackendError::fatal(fail_code::GENERATION_FAILED, message))
        }
    }
}

/// Reads the program's stdout until it closes, reporting each line (cut to [`MAX_LOG_LINE`]
/// bytes) as progress or a log line. The reporter never blocks, so the pipe is drained as fast
/// as the program fills it.
async fn read_stdout(stdout: Option<tokio::process::ChildStdout>, progress: Progress) {
    let Some(mut out) = stdout else { return };
    let mut lines = LineSplitter::new(Some(MAX_LOG_LINE));
    let mut buf = [0u8; 8192];
    let report = |line: &[u8]| progress.apply(parse_line(&String::from_utf8_lossy(line)));
    while let Ok(n) = out.read(&mut buf).await {
        if n == 0 {
            break;
        }
        lines.push(&buf[..n], report);
    }
    lines.finish(report);
}

/// A spawned task that is aborted when dropped (a dropped attempt must not leave a reader
/// behind reporting for it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
