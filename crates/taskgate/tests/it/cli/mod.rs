//! The `taskgate` binary's command line, run as a child process: the client commands (`submit`,
//! `status`, `wait`, `cancel`, `list`, `models`, `webhook listen`) against a real server, `serve` and `keys`
//! themselves, help and usage errors, and the SDK end to end: exit codes, stdout, stderr and
//! files. One file per command; this one holds only what they share, running the binary and
//! reading what it left.
//!
//! Each CLI run starts from an environment with every `TASKGATE_*` variable removed, then sets
//! only what the test means to give, so a developer's own settings cannot leak in.

mod cancel;
mod connection;
mod keys;
mod list;
mod models;
mod serve;
mod status_wait;
mod submit;
mod usage;
mod webhook_listen;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// What one run of the CLI left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stderr lines that start with `error:`, asserting there is exactly one.
    fn error_line(&self) -> &str {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "expected exactly one error line on stderr:\n{self}"
        );
        errors[0]
    }

    /// stdout as exactly one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }

    fn assert_exit(&self, want: i32) {
        assert_eq!(self.code, Some(want), "unexpected exit code:\n{self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The `taskgate` binary with no `TASKGATE_*` variable inherited, and stdin, stdout and stderr
/// not terminals.
fn cli_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = taskgate_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs the CLI with exactly these `TASKGATE_*` variables.
async fn cli_env(envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = cli_command(args);
    cmd.envs(envs.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("taskgate {args:?} did not exit within 30s"))
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs the CLI against `app` with the test key, both given through the environment.
async fn cli(app: &TestApp, args: &[&str]) -> Run {
    cli_env(
        &[
            ("TASKGATE_URL", app.api.base.as_str()),
            ("TASKGATE_API_KEY", API_KEY),
        ],
        args,
    )
    .await
}

/// A 127.0.0.1 port that nothing listens on (bound once by the OS, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
