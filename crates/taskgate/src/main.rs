//! The `taskgate` binary: parses flags, layers them over the environment and the config file,
//! sets up tracing, binds, and hands over to the server library. Nothing else lives here.

mod client_cli;
mod keys_cli;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use taskgate_server::config::{self, FileConfig};
use taskgate_server::Config;

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

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file with [server] settings and [models.NAME] tables.
    #[arg(long, env = "TASKGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TASKGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the database and result files [default: ./data].
    #[arg(long, env = "TASKGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://…) for a cluster of nodes; without it, SQLite in the data dir.
    #[arg(long, env = "TASKGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Base of result URLs, as clients reach this server [default: the listen address].
    #[arg(long, env = "TASKGATE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Largest accepted request body in bytes [default: 10 MiB].
    #[arg(long, env = "TASKGATE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest output file a pull worker may upload, in bytes [default: 4 GiB].
    #[arg(long, env = "TASKGATE_MAX_UPLOAD_BYTES")]
    max_upload_bytes: Option<u64>,
    /// Delays between attempts after a retryable backend error, e.g. 1s,5s,30s (the last
    /// repeats) [default: 1s,5s,30s].
    #[arg(long, env = "TASKGATE_RETRY_BACKOFF", value_parser = parse_delays)]
    retry_backoff: Option<Delays>,
    /// How long result URLs stay valid after the task completes [default: 24h].
    #[arg(long, env = "TASKGATE_RESULT_URL_TTL", value_parser = humantime::parse_duration)]
    result_url_ttl: Option<Duration>,
    /// How long running tasks may finish after SIGTERM before they are left pending [default: 30s].
    #[arg(long, env = "TASKGATE_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Delays between callback retries, e.g. 30s,2m,10m [default: about a day, 8 retries].
    #[arg(long, env = "TASKGATE_WEBHOOK_RETRY_DELAYS", value_parser = parse_delays)]
    webhook_retry_delays: Option<Delays>,
    /// How long a callback receiver may take to answer [default: 30s].
    #[arg(long, env = "TASKGATE_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration)]
    webhook_timeout: Option<Duration>,
    /// How long the previous webhook secret keeps signing after a rotation [default: 24h].
    #[arg(long, env = "TASKGATE_WEBHOOK_SECRET_OVERLAP", value_parser = humantime::parse_duration)]
    webhook_secret_overlap: Option<Duration>,
    /// Let callback URLs reach loopback and private addresses (local development only).
    #[arg(long, env = "TASKGATE_ALLOW_PRIVATE_CALLBACKS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    allow_private_callbacks: Option<bool>,
    /// Keep result files in this S3 bucket (URLs become presigned S3 links) instead of the data
    /// dir. Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the usual AWS chain).
    #[arg(long, env = "TASKGATE_S3_BUCKET")]
    s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000 [default: AWS].
    #[arg(long, env = "TASKGATE_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Region of the bucket [default: us-east-1].
    #[arg(long, env = "TASKGATE_S3_REGION")]
    s3_region: Option<String>,
    /// Prefix for every object key, e.g. results/prod.
    #[arg(long, env = "TASKGATE_S3_PREFIX")]
    s3_prefix: Option<String>,
    /// How long a claimed task stays with a node or worker without renewal [default: 30s].
    #[arg(long, env = "TASKGATE_LEASE", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Log format on stderr.
    #[arg(long, env = "TASKGATE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// A list of durations, kept as one value for clap.
#[derive(Clone)]
struct Delays(Vec<Duration>);

fn parse_delays(s: &str) -> Result<Delays, String> {
    config::parse_duration_list(s).map(Delays)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: in a file or a pipe the escape codes are noise.
    // NO_COLOR (https://no-color.org) turns it off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Flags and environment (already merged by clap) over the file over the defaults.
/// `api_key` is the global `--api-key` / `TASKGATE_API_KEY`, which `serve` registers.
fn layered_config(args: &ServeArgs, api_key: Option<&str>) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let s = file.server;
    let data_dir = args
        .data_dir
        .clone()
        .or(s.data_dir)
        .unwrap_or_else(|| PathBuf::from("./data"));
    let mut config = Config::new(data_dir);
    config.database_url = args.database_url.clone().or(s.database_url);
    config.listen = args.listen.or(s.listen).unwrap_or(config.listen);
    config.public_url = args.public_url.clone().or(s.public_url);
    config.max_body_bytes = args
        .max_body_bytes
        .or(s.max_body_bytes)
        .unwrap_or(config::DEFAULT_MAX_BODY_BYTES);
    config.result_url_ttl = args
        .result_url_ttl
        .or(s.result_url_ttl)
        .unwrap_or(config::DEFAULT_RESULT_URL_TTL);
    config.shutdown_grace = args
        .shutdown_grace
        .or(s.shutdown_grace)
        .unwrap_or(config::DEFAULT_SHUTDOWN_GRACE);
    if let Some(models) = file.models {
        config.models = models;
    }
    let st = file.storage;
    let s3_endpoint = args.s3_endpoint.clone().or(st.s3_endpoint);
    let s3_region = args.s3_region.clone().or(st.s3_region);
    let s3_prefix = args.s3_prefix.clone().or(st.s3_prefix);
    match args.s3_bucket.clone().or(st.s3_bucket) {
        Some(bucket) => {
            config.artifacts = config::ArtifactsConfig::S3(config::S3Config {
                bucket,
                endpoint: s3_endpoint,
                region: s3_region.unwrap_or_else(|| config::DEFAULT_S3_REGION.to_owned()),
                prefix: s3_prefix,
                credentials: None,
            });
        }
        // Without a bucket the local directory is used, which would silently ignore these.
        None if s3_endpoint.is_some() || s3_region.is_some() || s3_prefix.is_some() => {
            bail!("invalid setting s3_bucket: s3_endpoint, s3_region and s3_prefix only apply to S3 storage; set --s3-bucket (TASKGATE_S3_BUCKET) too, or remove them");
        }
        None => {}
    }
    if let Some(b) = args.max_upload_bytes.or(s.max_upload_bytes) {
        config.max_upload_bytes = b;
    }
    if let Some(d) = args.retry_backoff.clone().map(|d| d.0).or(s.retry_backoff) {
        config.retry_backoff = d;
    }
    if let Some(lease) = args.lease.or(s.lease) {
        config.lease = lease;
    }
    let w = file.webhooks;
    let wh = &mut config.webhooks;
    if let Some(n) = w.max_in_flight {
        wh.max_in_flight = n;
    }
    if let Some(n) = w.max_per_host {
        wh.max_per_host = n;
    }
    if let Some(n) = w.breaker_threshold {
        wh.breaker_threshold = n;
    }
    if let Some(d) = w.breaker_cooldown {
        wh.breaker_cooldown = d;
    }
    if let Some(d) = args
        .webhook_retry_delays
        .clone()
        .map(|d| d.0)
        .or(w.retry_delays)
    {
        wh.retry_delays = d;
    }
    if let Some(t) = args.webhook_timeout.or(w.timeout) {
        wh.timeout = t;
    }
    if let Some(o) = args.webhook_secret_overlap.or(w.secret_overlap) {
        wh.secret_overlap = o;
    }
    if let Some(a) = args.allow_private_callbacks.or(w.allow_private_callbacks) {
        wh.allow_private = a;
    }
    // The same key the client commands send: `serve --api-key` (shown in its help) used to be
    // ignored, only the variable counted.
    config.bootstrap_api_key = api_key.map(str::to_owned).filter(|k| !k.trim().is_empty());
    if let Some(key) = &config.bootstrap_api_key {
        if key.len() < 16 {
            bail!("the API key (--api-key / TASKGATE_API_KEY) is too short to be safe: use at least 16 characters (or create keys with `taskgate keys create`)");
        }
    }
    config.validate()?;
    Ok(config)
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
    init_tracing(args.log_format);
    let config = layered_config(&args, api_key.as_deref())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
                init_tracing(LogFormat::Text);
                worker::run(args).await
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

    /// Every flag and variable of `serve` is in docs/configuration.md: a setting added to the
    /// command without its row there fails here.
    #[test]
    fn every_serve_setting_is_documented() {
        use clap::CommandFactory;
        let docs = include_str!("../../../docs/configuration.md");
        let mut cli = Cli::command();
        cli.build();
        let serve = cli.find_subcommand("serve").unwrap();
        let (mut missing, mut checked) = (Vec::new(), 0);
        for arg in serve.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            // Globals of the client commands that `serve` does not read.
            if arg.is_global_set() && !matches!(arg.get_id().as_str(), "api_key") {
                continue;
            }
            checked += 1;
            if let Some(long) = arg.get_long() {
                // `--log` must not pass because `--log-format` is documented.
                let documented = [" ", "`", "[", "="]
                    .iter()
                    .any(|end| docs.contains(&format!("`--{long}{end}")));
                if !documented {
                    missing.push(format!("--{long}"));
                }
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                if !docs.contains(&format!("`{env}`")) {
                    missing.push(env.into_owned());
                }
            }
        }
        assert!(checked >= 20, "only {checked} settings of serve seen");
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
        assert_eq!(c.max_upload_bytes, 1000);
        assert_eq!(
            c.retry_backoff,
            vec![Duration::from_secs(2), Duration::from_secs(10)]
        );
        assert_eq!(c.lease, Duration::from_secs(10));
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
        assert_eq!(c.max_upload_bytes, 5);
        assert_eq!(c.retry_backoff, vec![Duration::from_secs(1)]);
        assert_eq!(c.lease, Duration::from_secs(3));
    }
}
