//! Client subcommands of the `taskgate` binary: `submit`, `status`, `wait`, `cancel`, `list`, `models` and
//! `webhook listen`.
//!
//! They are thin over `taskgate-client`, which owns polling, retries and downloads; this module
//! owns only what a person or a script sees, split by job:
//!
//! - here: the flags (`Connection` and the subcommands) and [`run`];
//! - `commands`: running `submit`, `status`, `wait`, `cancel`, `list` and `models`;
//! - `output`: human text or one JSON document on stdout, progress on stderr;
//! - `exit`: the exit codes and the one error line (or JSON error document) of every failure;
//! - `listen`: the `webhook listen` receiver.

mod commands;
mod exit;
mod listen;
mod output;

pub use exit::{json_requested, report_failure, report_parse_error};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

/// Where the server is and how to talk to it. Flattened into each client subcommand rather than
/// global, so that `serve`, `keys` and `worker` do not list flags they would ignore.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Base URL of the taskgate server, or of any APIXO-compatible API (e.g. https://api.apixo.ai).
    #[arg(long, env = "TASKGATE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "TASKGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Print machine-readable JSON on stdout instead of human text.
    #[arg(long)]
    pub json: bool,
}

/// The client subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Submit a task; prints its id, or with --wait its final status.
    Submit {
        /// Model id, e.g. `echo`, `demo-image`, `nano-banana`.
        model: String,
        /// Task input as a JSON object, or @file.json to read it from a file (@- for stdin).
        #[arg(long, value_name = "JSON|@FILE")]
        input: Option<String>,
        /// Sets input.prompt (merged over --input).
        #[arg(long, value_name = "TEXT")]
        prompt: Option<String>,
        /// Callback mode: the server POSTs the final status to this URL.
        #[arg(long, value_name = "URL")]
        callback: Option<String>,
        /// Sent as Idempotency-Key: the same key and input within 24 h answer the task the
        /// first submit created instead of creating another (taskgate servers).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Wait for the task to finish (first poll after 3 s, then x1.5 up to 30 s).
        #[arg(long)]
        wait: bool,
        /// Download the results into this directory (implies --wait).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// How long --wait waits before giving up (exit code 3).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a task's status once.
    Status {
        /// The model the task was submitted to.
        model: String,
        /// The task id returned by submit.
        task_id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Wait for a task to finish, polling with backoff.
    Wait {
        /// The model the task was submitted to.
        model: String,
        /// The task id returned by submit.
        task_id: String,
        /// How long to wait before giving up (exit code 3).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Download the results into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel a pending or running task; prints its status (failed, CANCELLED).
    ///
    /// A running task's work is stopped. A task that has already finished is left alone (exit
    /// code 2). A taskgate extension: APIXO has no cancel.
    Cancel {
        /// The model the task was submitted to.
        model: String,
        /// The task id returned by submit.
        task_id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List your tasks, newest first (taskgate servers; GET /api/v1/tasks).
    List {
        /// Only tasks of this model.
        #[arg(long)]
        model: Option<String>,
        /// Only tasks in this state.
        #[arg(long, value_parser = ["pending", "processing", "success", "failed"])]
        state: Option<String>,
        /// Tasks to show, 1 to 100.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: u32,
        /// Continue after a previous page: the cursor it printed.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List the models this key may use, with their input schemas (a taskgate extension).
    Models {
        #[command(flatten)]
        conn: Connection,
    },
    /// Tools for developing webhook receivers.
    #[command(subcommand)]
    Webhook(WebhookCommand),
}

/// `taskgate webhook ...`
#[derive(Debug, Clone, Subcommand)]
pub enum WebhookCommand {
    /// Receive callbacks on 127.0.0.1, verify their signatures and print them (Ctrl-C to stop).
    ///
    /// Answers 200 to a delivery with a valid signature and 401 otherwise. A taskgate server only
    /// calls a loopback address when started with --allow-private-callbacks.
    Listen {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Signing secret (whsec_...). Without it, the secret is read from the server with the
        /// API key (GET /api/v1/webhookSecret).
        #[arg(long, env = "TASKGATE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
}

impl ClientCommand {
    fn connection(&self) -> &Connection {
        match self {
            ClientCommand::Submit { conn, .. }
            | ClientCommand::Status { conn, .. }
            | ClientCommand::Wait { conn, .. }
            | ClientCommand::Cancel { conn, .. }
            | ClientCommand::List { conn, .. }
            | ClientCommand::Models { conn }
            | ClientCommand::Webhook(WebhookCommand::Listen { conn, .. }) => conn,
        }
    }
}

/// Runs one client subcommand and returns the process exit code (the table is in `exit`).
pub async fn run(cmd: ClientCommand) -> ExitCode {
    let conn = cmd.connection().clone();
    match commands::execute(&conn, cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report(conn.json);
            ExitCode::from(failure.exit)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    #[test]
    fn the_clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_are_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "taskgate",
            "submit",
            "echo",
            "--prompt",
            "hi",
            "--url",
            "http://h:1",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.cmd.connection().url, "http://h:1");
        assert!(cli.cmd.connection().json);
        assert!(matches!(cli.cmd, ClientCommand::Submit { ref model, .. } if model == "echo"));
    }

    #[test]
    fn list_takes_its_filters_and_refuses_a_limit_out_of_range() {
        let cli = Cli::try_parse_from([
            "taskgate", "list", "--model", "echo", "--state", "failed", "--limit", "5",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            ClientCommand::List { ref model, ref state, limit: 5, .. }
                if model.as_deref() == Some("echo") && state.as_deref() == Some("failed")
        ));
        for bad in [["--limit", "101"], ["--limit", "0"], ["--state", "done"]] {
            let mut args = vec!["taskgate", "list"];
            args.extend(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wait_parses_a_human_timeout() {
        let cli = Cli::try_parse_from(["taskgate", "wait", "echo", "task_1", "--timeout", "90s"])
            .unwrap();
        assert!(matches!(
            cli.cmd,
            ClientCommand::Wait { timeout, .. } if timeout == Duration::from_secs(90)
        ));
    }
}
