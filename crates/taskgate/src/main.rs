//! The `taskgate` binary: parses flags, layers them over the environment and the config file,
//! sets up tracing, binds, and hands over to the server library. Nothing else lives here.

mod client_cli;
mod keys_cli;
mod telemetry;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use taskgate_server::config::{self, FileConfig};
use taskgate_server::Config;
use telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "taskgate",
    version,
    about = "Self-hosted, APIXO-compatible server for asynchronous AI generation tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        // Boxed: it holds far more settings than the other commands (clippy::large_enum_variant).
        #[command(flatten)]
        args: Box<ServeArgs>,
        /// A key (at least 16 characters) to register in the tenant `default`, for local use and
        /// tests; create real keys with `taskgate keys create`.
        // The variable the client commands read too: one TASKGATE_API_KEY serves a local server
        // and the commands that talk to it.
        #[arg(long, env = "TASKGATE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Manage API keys and worker tokens (works while the server runs).
    #[command(subcommand)]
    Keys(keys_cli::KeysCommand),
    /// Run a pull worker: claim tasks of worker-backed models and run a program for each.
    Worker(worker::WorkerArgs),
    #[command(flatten)]
    Client(client_cli::ClientCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file with [server], [webhooks] and [storage] settings and [models.NAME]
    /// tables.
    #[arg(long, env = "TASKGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Every setting of the settings tables, as flags and `TASKGATE_*` variables
    /// (`taskgate_server::config::settings`).
    #[command(flatten)]
    settings: config::Layers,
    /// Log format on stderr.
    #[arg(long, env = "TASKGATE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector (its base URL, as
    /// OTEL_EXPORTER_OTLP_ENDPOINT takes it). Needs a build with the `otel` feature.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// `serve --help` with each setting's default, read from the one module that holds them: the
/// settings' flags cannot carry clap defaults, which would hide the file below them.
fn with_setting_defaults(cli: clap::Command) -> clap::Command {
    let texts = config::Layers::default_texts();
    cli.mut_subcommand("serve", |serve| {
        serve.mut_args(
            |arg| match texts.iter().find(|(id, _)| arg.get_id().as_str() == *id) {
                Some((_, text)) => {
                    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                    arg.help(format!("{help} [default: {text}]"))
                }
                None => arg,
            },
        )
    })
}

/// Flags and environment (already merged by clap) over the file over the defaults, in the
/// server library's one merge. `api_key` is the key `serve` registers at start.
fn layered_config(args: &ServeArgs, api_key: Option<&str>) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    Ok(config::layered(args.settings.clone(), file, api_key)?)
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn serve(args: ServeArgs, api_key: Option<String>) -> anyhow::Result<()> {
    let telemetry = telemetry::init(args.log_format, args.otlp_endpoint.as_deref())?;
    let served = serve_traced(args, api_key).await;
    telemetry.shutdown().await;
    served
}

async fn serve_traced(args: ServeArgs, api_key: Option<String>) -> anyhow::Result<()> {
    let config = layered_config(&args, api_key.as_deref())?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let hooks = taskgate_server::Hooks {
        // Scripts and tests read the bound address from this line (useful with port 0); it is
        // printed only once the server can answer.
        on_ready: Some(std::sync::Arc::new(|addr| {
            println!("taskgate listening on http://{addr}")
        })),
        ..Default::default()
    };
    taskgate_server::run_with(config, listener, shutdown_signal(), hooks).await?;
    Ok(())
}

/// mimalloc instead of the system allocator: a task's life allocates on one thread and frees on
/// another (tokio workers, the store's connection threads), where glibc's malloc spent about a
/// sixth of a drain's samples in its own locks and consolidation (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line, parsed against the command `serve --help` describes with its defaults.
fn parse_cli() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let mut command = with_setting_defaults(Cli::command());
    let matches = command.try_get_matches_from_mut(std::env::args_os())?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        // Under --json a refused command line is a JSON document too.
        Err(e) => {
            let json = client_cli::json_requested(std::env::args_os());
            return client_cli::report_parse_error(&e, json);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { args, api_key } => serve(*args, api_key).await,
            Command::Keys(cmd) => return Ok(keys_cli::run(cmd).await),
            Command::Worker(args) => {
                let telemetry = telemetry::init(args.log_format, None)?;
                let worked = worker::run(args).await;
                telemetry.shutdown().await;
                worked
            }
            Command::Client(c) => return Ok(client_cli::run(c).await),
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    /// Every flag, variable and file key of `serve` is in docs/configuration.md, each flag's row
    /// states the default the server uses: a setting added without its row fails here.
    #[test]
    fn every_serve_setting_is_documented() {
        use clap::CommandFactory;
        let docs = include_str!("../../../docs/configuration.md");
        let mut cli = Cli::command();
        cli.build();
        let serve = cli.find_subcommand("serve").unwrap();
        let defaults = config::Layers::default_texts();
        let (mut missing, mut checked) = (Vec::new(), 0);
        for arg in serve.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            checked += 1;
            if let Some(long) = arg.get_long() {
                // `--log` must not pass because `--log-format` is documented.
                let row = docs.lines().filter(|l| l.starts_with('|')).find(|line| {
                    [" ", "`", "[", "="]
                        .iter()
                        .any(|end| line.contains(&format!("`--{long}{end}")))
                });
                match row {
                    None => missing.push(format!("--{long}")),
                    Some(row) => {
                        let default = defaults.iter().find(|(id, _)| arg.get_id() == *id);
                        if let Some((_, text)) = default {
                            if !row.contains(text.as_str()) {
                                missing.push(format!("--{long}'s default {text}"));
                            }
                        }
                    }
                }
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                if !docs.contains(&format!("`{env}`")) {
                    missing.push(env.into_owned());
                }
            }
        }
        let server_keys = config::ServerLayer::KEYS
            .iter()
            .map(|k| format!("`[server] {k}`"));
        let other_keys = config::WebhookLayer::KEYS
            .iter()
            .chain(config::StorageLayer::KEYS)
            .map(|k| format!("| `{k}` |"));
        for key in server_keys.chain(other_keys) {
            checked += 1;
            if !docs.contains(&key) {
                missing.push(key);
            }
        }
        assert!(checked >= 40, "only {checked} settings of serve seen");
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
    }

    fn layered_config_for(args: &ServeArgs) -> anyhow::Result<Config> {
        layered_config(args, None)
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["taskgate", "serve"];
        full.extend_from_slice(argv);
        match Cli::parse_from(full).command {
            Command::Serve { args, .. } => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn file_settings_apply_and_flags_win_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[server]\nmax_upload_bytes = 1000\nretry_backoff = [\"2s\", \"10s\"]\nlease = \"10s\"\n\
             [webhooks]\nmax_in_flight = 10\nmax_per_host = 2\nbreaker_threshold = 3\nbreaker_cooldown = \"1m\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = layered_config_for(&serve_args(&["--config", path])).unwrap();
        assert_eq!(c.server.max_upload_bytes, 1000);
        assert_eq!(
            c.server.retry_backoff.0,
            vec![Duration::from_secs(2), Duration::from_secs(10)]
        );
        assert_eq!(c.server.lease, Duration::from_secs(10));
        assert_eq!(
            (
                c.webhooks.max_in_flight,
                c.webhooks.max_per_host,
                c.webhooks.breaker_threshold
            ),
            (10, 2, 3)
        );
        assert_eq!(c.webhooks.breaker_cooldown, Duration::from_secs(60));
        let c = layered_config_for(&serve_args(&[
            "--config",
            path,
            "--max-upload-bytes",
            "5",
            "--retry-backoff",
            "1s",
            "--lease",
            "3s",
        ]))
        .unwrap();
        assert_eq!(c.server.max_upload_bytes, 5);
        assert_eq!(c.server.retry_backoff.0, vec![Duration::from_secs(1)]);
        assert_eq!(c.server.lease, Duration::from_secs(3));
    }
}
