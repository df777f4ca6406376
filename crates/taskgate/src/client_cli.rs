//! Placeholder until the client CLI lands.
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Connection {
    /// Server base URL.
    #[arg(
        long,
        env = "TASKGATE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
}

#[derive(clap::Subcommand)]
pub enum ClientCommand {
    /// Show a task's status.
    Status { model: String, task_id: String },
}

pub async fn run(_conn: Connection, _cmd: ClientCommand) -> ExitCode {
    ExitCode::FAILURE
}
