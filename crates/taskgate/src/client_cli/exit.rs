//! The exit-code policy of the client commands: what a failure prints and how the process ends.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the task failed |
//! | 2 | usage error: bad arguments, unknown model or task, request refused as invalid (a cancel of a finished task) |
//! | 3 | timed out waiting |
//! | 4 | transport or auth error (unreachable server, refused key, rate limit or server error that outlasted the retries, local I/O) |
//!
//! A failure is one line on stderr that says what to change, including the server's own message;
//! with `--json` stdout also carries one document, `{"error": {"kind", "message", "exitCode"}}`
//! (plus `"task"` when the task failed). [`explain`] is the one place an SDK error, and the
//! server's `ErrorCode` inside it, becomes a code and a `kind`.
//!
//! The same document is printed for a command line that clap refuses ([`report_parse_error`]:
//! kind `usage`, exit 2, clap's own message on stderr) and for a failed `keys` command
//! ([`report_failure`]), so that `--json` means one document on stdout for every command.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use taskgate_client::proto::ErrorCode;
use taskgate_client::{Error, TaskState, TaskStatus};

use super::Connection;

const EXIT_TASK_FAILED: u8 = 1;
pub(super) const EXIT_USAGE: u8 = 2;
const EXIT_TIMEOUT: u8 = 3;
pub(super) const EXIT_TRANSPORT: u8 = 4;

/// A command's failure, already phrased for a person.
pub(super) struct Failure {
    pub(super) exit: u8,
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) task: Option<Box<TaskStatus>>,
}

impl Failure {
    pub(super) fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: EXIT_USAGE,
            kind: "usage",
            message: message.into(),
            task: None,
        }
    }

    pub(super) fn report(&self, json_mode: bool) {
        eprintln!("error: {}", self.message);
        if json_mode {
            self.print_document();
        }
    }

    fn print_document(&self) {
        let mut err = json!({
            "kind": self.kind,
            "message": self.message,
            "exitCode": self.exit,
        });
        if let Some(task) = &self.task {
            err["task"] = serde_json::to_value(task).unwrap_or(Value::Null);
        }
        println!("{}", json!({ "error": err }));
    }
}

/// Whether the raw command line asks for `--json`. Read before parsing because clap refuses a
/// bad command line before there is a parsed flag to look at; what follows `--` is a program's
/// arguments (`taskgate worker -- …`), not ours.
pub fn json_requested(args: impl IntoIterator<Item = OsString>) -> bool {
    args.into_iter()
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Reports a command line clap refused, and returns the exit code: clap's message (with the usage)
/// on stderr as always, and with `json_mode` the error document on stdout. `--help` and
/// `--version` also arrive here, as clap errors that print to stdout and exit 0: they are not
/// failures and get no document.
pub fn report_parse_error(err: &clap::Error, json_mode: bool) -> ExitCode {
    let _ = err.print();
    let exit = u8::try_from(err.exit_code()).unwrap_or(EXIT_USAGE);
    if json_mode && exit != 0 {
        let message = match err.kind() {
            // clap's text is the whole help here; its first line is no error message.
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                "a subcommand is missing; the usage is on stderr".to_owned()
            }
            // The first paragraph: the error line and, for a missing argument, the names below it.
            _ => err
                .to_string()
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.trim().trim_start_matches("error: "))
                .collect::<Vec<_>>()
                .join(" "),
        };
        Failure {
            exit,
            kind: "usage",
            message,
            task: None,
        }
        .print_document();
    }
    ExitCode::from(exit)
}

/// Reports a failure of a command outside this module (`keys`) the way the client commands
/// report theirs: one line on stderr, and with `json_mode` the error document on stdout.
pub fn report_failure(kind: &'static str, message: String, exit: u8, json_mode: bool) {
    Failure {
        exit,
        kind,
        message,
        task: None,
    }
    .report(json_mode);
}

/// What the failing call was about, so an error can name the model or the task.
pub(super) enum Action<'a> {
    Submit {
        model: &'a str,
    },
    Task {
        model: &'a str,
        task_id: &'a str,
    },
    Download,
    /// Listing the tenant's tasks.
    List,
    /// Reading the tenant's webhook secret for `webhook listen`.
    WebhookSecret,
    /// Listing the models (`taskgate models`).
    Models,
}

/// Turns an SDK error into one actionable line and an exit code.
pub(super) fn explain(conn: &Connection, action: Action<'_>, err: Error) -> Failure {
    let fail = |exit, kind, message: String| Failure {
        exit,
        kind,
        message,
        task: None,
    };
    let error_code = err.error_code();
    match err {
        Error::Transport { reason, .. } => fail(
            EXIT_TRANSPORT,
            "transport",
            format!("cannot reach {}: {reason}", conn.url),
        ),
        Error::Api {
            status,
            message,
            detail,
            ..
        } => {
            let server_says = match &detail {
                Some(d) => format!("{message} ({d})"),
                None => message,
            };
            match (status, &action) {
                (401, _) => {
                    let hint = if conn.api_key.is_none() {
                        "no key was given: pass --api-key or set TASKGATE_API_KEY"
                    } else {
                        "check --api-key / TASKGATE_API_KEY"
                    };
                    fail(
                        EXIT_TRANSPORT,
                        "auth",
                        format!("{} refused the API key: {server_says}; {hint}", conn.url),
                    )
                }
                (403, _) => fail(
                    EXIT_TRANSPORT,
                    "auth",
                    format!("{} refused the request (403): {server_says}", conn.url),
                ),
                // A taskgate server says which thing was not found; APIXO does not, and then a
                // 404 is read by what was asked.
                (_, Action::Submit { model } | Action::Task { model, .. })
                    if error_code == Some(ErrorCode::ModelNotFound)
                        || (error_code.is_none()
                            && status == 404
                            && matches!(action, Action::Submit { .. })) =>
                {
                    fail(
                        EXIT_USAGE,
                        "unknown_model",
                        format!("unknown model {model:?} at {}: {server_says}", conn.url),
                    )
                }
                (_, Action::Task { model, task_id })
                    if error_code == Some(ErrorCode::TaskNotFound)
                        || (error_code.is_none() && status == 404) =>
                {
                    fail(
                    EXIT_USAGE,
                    "not_found",
                    format!(
                        "no task {task_id} for model {model:?} at {} (the model must be the one used at submit): {server_says}",
                        conn.url
                    ),
                    )
                }
                (_, Action::Task { model, task_id })
                    if error_code == Some(ErrorCode::TaskAlreadyFinal) =>
                {
                    fail(
                        EXIT_USAGE,
                        "already_final",
                        format!(
                            "task {task_id} has already finished, so it was not cancelled: {server_says}; see how it ended with: taskgate status {model} {task_id}"
                        ),
                    )
                }
                // APIXO (or a taskgate before the listing) has no such endpoint.
                (404, Action::List) => fail(
                    EXIT_USAGE,
                    "unsupported",
                    format!(
                        "{} has no task listing (GET /api/v1/tasks is a taskgate extension): {server_says}",
                        conn.url
                    ),
                ),
                (429, _) => fail(
                    EXIT_TRANSPORT,
                    "rate_limited",
                    format!("{} is rate limiting this key, still after retries: {server_says}", conn.url),
                ),
                (500..=599, _) => fail(
                    EXIT_TRANSPORT,
                    "server_error",
                    format!("{} failed with HTTP {status}, still after retries: {server_says}", conn.url),
                ),
                // APIXO has no model list: say so rather than "refused".
                (404, Action::Models) if error_code != Some(ErrorCode::ModelNotFound) => fail(
                    EXIT_USAGE,
                    "unsupported",
                    format!(
                        "{} does not list models (GET /api/v1/models is a taskgate extension): {server_says}",
                        conn.url
                    ),
                ),
                (_, Action::Download) => fail(
                    EXIT_TRANSPORT,
                    "download",
                    format!("download refused with HTTP {status}: {server_says}"),
                ),
                _ => fail(
                    EXIT_USAGE,
                    "invalid_request",
                    format!("the server refused the request (HTTP {status}): {server_says}"),
                ),
            }
        }
        Error::Timeout {
            task_id,
            elapsed,
            last_state,
        } => {
            let model = match action {
                Action::Task { model, .. } | Action::Submit { model } => model,
                _ => "MODEL",
            };
            fail(
                EXIT_TIMEOUT,
                "timeout",
                format!(
                    "gave up after {} waiting for task {task_id} (still {}); raise --timeout or resume with: taskgate wait {model} {task_id}",
                    humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                    last_state.map(TaskState::as_str).unwrap_or("unknown"),
                ),
            )
        }
        Error::TaskFailed { status, .. } => failed_task(*status, conn.json),
        Error::Protocol { reason, .. } => fail(
            EXIT_TRANSPORT,
            "protocol",
            format!(
                "{} does not answer like an APIXO-compatible server: {reason}",
                conn.url
            ),
        ),
        Error::InvalidUrl { url, reason } => fail(
            EXIT_USAGE,
            "usage",
            format!("invalid URL {url:?}: {reason}"),
        ),
        Error::InvalidInput(msg) => fail(EXIT_USAGE, "usage", msg),
        Error::Io { path, source } => fail(
            EXIT_TRANSPORT,
            "io",
            format!("cannot write {}: {source}", path.display()),
        ),
        other => fail(EXIT_TRANSPORT, "error", other.to_string()),
    }
}

pub(super) fn failed_task(status: TaskStatus, json_mode: bool) -> Failure {
    let reason = match (&status.fail_code, &status.fail_msg) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "no reason given".to_owned(),
    };
    Failure {
        exit: EXIT_TASK_FAILED,
        kind: "task_failed",
        message: format!("task {} failed: {reason}", status.task_id),
        // In JSON mode the status already went to stdout with the error object.
        task: json_mode.then(|| Box::new(status)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn json_is_requested_by_the_flag_anywhere_before_a_double_dash() {
        assert!(json_requested(args(&[
            "taskgate", "submit", "--json", "echo"
        ])));
        assert!(json_requested(args(&[
            "taskgate", "keys", "list", "--json"
        ])));
        assert!(!json_requested(args(&["taskgate", "submit", "echo"])));
        assert!(!json_requested(args(&[
            "taskgate", "worker", "--", "prog", "--json"
        ])));
        assert!(!json_requested(args(&["taskgate", "submit", "--jsonx"])));
    }
}
