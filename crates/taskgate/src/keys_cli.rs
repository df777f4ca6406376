//! `taskgate keys create|list|update|revoke`: API keys and worker tokens, made and revoked in the
//! server's store directly (SQLite in the data dir, or PostgreSQL), so they work while the server
//! runs and need no key to begin with. `taskgate keys usage`: a tenant's usage report, read from
//! the same store by the same code as `GET /api/v1/usage` (`taskgate_server::usage`).
//!
//! Text for people by default; with `--json`, one document on stdout (a failure's document has
//! the client commands' shape, kind `keys`). Which store was opened always goes to stderr, so it
//! never mixes with what a script reads.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;
use taskgate_server::store::{ApiKeyRecord, KeyKind, KeyPolicy, Store};

use crate::client_cli;

#[derive(Args)]
pub struct DataDirArg {
    /// The server's data directory.
    #[arg(long, env = "TASKGATE_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// The server's PostgreSQL URL, when it runs on PostgreSQL.
    #[arg(long, env = "TASKGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// A client key's scope and limits, as `create` and `update` take them.
#[derive(Args, Default)]
pub struct PolicyArgs {
    /// The models the key may use, comma-separated (default: every model).
    #[arg(long, value_delimiter = ',', conflicts_with = "all_models")]
    models: Option<Vec<String>>,
    /// Let the key use every model (undoes --models).
    #[arg(long)]
    all_models: bool,
    /// The key may read (status, lists, streams, models) but not submit, cancel or change
    /// anything.
    #[arg(long, conflicts_with = "read_write")]
    read_only: bool,
    /// The key may write again (undoes --read-only).
    #[arg(long)]
    read_write: bool,
    /// Requests per minute over every node: a number (0: unlimited), or `default` for the
    /// server's `[limits]` setting.
    #[arg(long, value_name = "N|default", value_parser = parse_limit)]
    requests_per_minute: Option<Limit>,
    /// Unfinished tasks at once: a number (0: unlimited), or `default` for the server's
    /// `[limits]` setting.
    #[arg(long, value_name = "N|default", value_parser = parse_limit)]
    concurrent_tasks: Option<Limit>,
}

/// A limit given on the command line: `None` is the server's default.
#[derive(Clone, Copy)]
struct Limit(Option<u32>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s == "default" {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("{s:?} is not a whole number from 0 to 4294967295 or `default`"))
}

impl PolicyArgs {
    fn is_empty(&self) -> bool {
        self.models.is_none()
            && !self.all_models
            && !self.read_only
            && !self.read_write
            && self.requests_per_minute.is_none()
            && self.concurrent_tasks.is_none()
    }

    /// `policy` with what these arguments change.
    fn apply(&self, mut policy: KeyPolicy) -> anyhow::Result<KeyPolicy> {
        if let Some(models) = &self.models {
            let models: Vec<String> = models
                .iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            if models.is_empty() {
                bail!("--models needs at least one model name (or use --all-models)");
            }
            policy.models = Some(models);
        }
        if self.all_models {
            policy.models = None;
        }
        if self.read_only {
            policy.read_only = true;
        }
        if self.read_write {
            policy.read_only = false;
        }
        if let Some(Limit(n)) = self.requests_per_minute {
            policy.requests_per_minute = n;
        }
        if let Some(Limit(n)) = self.concurrent_tasks {
            policy.concurrent_tasks = n;
        }
        Ok(policy)
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; it is printed once, on the last line.
    Create {
        /// What the key is for.
        #[arg(long)]
        name: String,
        /// Join an existing tenant instead of starting a new one named after the key.
        #[arg(long, conflicts_with = "worker")]
        tenant: Option<String>,
        /// Make a worker token (for `taskgate worker`), which claims work instead of submitting it.
        #[arg(long)]
        worker: bool,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print {"id","kind","name","tenant","apiKey"} on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    List {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print a JSON array of the keys on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A tenant's usage: its tasks created in a window, per model or day, by state, with the
    /// seconds their attempts ran (the figures of GET /api/v1/usage).
    Usage {
        /// The tenant's name, as `keys list` shows it.
        #[arg(long)]
        tenant: String,
        /// Start of the window (inclusive): RFC 3339, a date (UTC midnight) or Unix ms.
        /// Default: 30 days before --to.
        #[arg(long)]
        from: Option<String>,
        /// End of the window (exclusive), in the same forms. Default: now.
        #[arg(long)]
        to: Option<String>,
        /// One row per `model`, per UTC `day` of creation, or per `key` (the id of the submitting key).
        #[arg(long, default_value = "model")]
        group_by: String,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print the report as GET /api/v1/usage's `data` on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a client key's scope and limits; every node applies it within a second.
    Update {
        /// The key's id as `keys list` shows it (key_…).
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print the key as `keys list --json` shows it on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (key_...).
    Revoke {
        /// The key's id as `keys list` shows it (key_… or wkr_…), not the key itself.
        id: String,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print {"id","revoked":true} on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

impl KeysCommand {
    fn json(&self) -> bool {
        match self {
            KeysCommand::Create { json, .. }
            | KeysCommand::List { json, .. }
            | KeysCommand::Usage { json, .. }
            | KeysCommand::Update { json, .. }
            | KeysCommand::Revoke { json, .. } => *json,
        }
    }
}

/// Runs one `keys` command; a failure exits 1.
pub async fn run(cmd: KeysCommand) -> ExitCode {
    let json = cmd.json();
    match keys(cmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            client_cli::report_failure("keys", format!("{e:#}"), 1, json);
            ExitCode::FAILURE
        }
    }
}

/// Opens the server's store for a `keys` command, saying on stderr which one it is: a key made
/// in a store the running server does not use is a key that never works. Only `create` may
/// start a new SQLite store; `list` and `revoke` on a directory without one are refused.
async fn open_store(args: &DataDirArg, create: bool) -> anyhow::Result<Arc<dyn Store>> {
    let where_ = match &args.database_url {
        Some(url) => format!("PostgreSQL at {}", taskgate_server::config::redact_url(url)),
        None => {
            let file = taskgate_server::database_path(&args.data_dir);
            let exists = file.exists();
            if !exists && !create {
                bail!(
                    "no taskgate store in {} (no {}): pass the server's --data-dir (or \
                     TASKGATE_DATA_DIR), or --database-url for a PostgreSQL server",
                    args.data_dir.display(),
                    file.display()
                );
            }
            let new = if exists { "" } else { ", new" };
            format!("SQLite at {}{new}", file.display())
        }
    };
    eprintln!("Using the store: {where_}");
    taskgate_server::open_store(&args.data_dir, args.database_url.as_deref())
        .await
        .with_context(|| format!("cannot open the store ({where_})"))
}

fn format_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A key as `keys list --json` shows it. Times are milliseconds since the Unix epoch, like the
/// API's `createTime`.
fn key_json(k: &ApiKeyRecord) -> serde_json::Value {
    json!({
        "id": k.id,
        "kind": k.kind.as_str(),
        "name": k.name,
        "tenant": k.tenant.name,
        "prefix": k.prefix,
        "createdAt": k.created_at,
        "revokedAt": k.revoked_at,
        "models": k.policy.models,
        "readOnly": k.policy.read_only,
        "requestsPerMinute": k.policy.requests_per_minute,
        "concurrentTasks": k.policy.concurrent_tasks,
    })
}

/// A client key's scope and limits in words, for `keys list` and `keys update`.
fn policy_text(p: &KeyPolicy) -> String {
    let limit = |n: Option<u32>| match n {
        None => "default".to_owned(),
        Some(0) => "unlimited".to_owned(),
        Some(n) => n.to_string(),
    };
    format!(
        "models: {}; {}; requests/min: {}; tasks at once: {}",
        p.models.as_ref().map_or("all".to_owned(), |m| m.join(",")),
        if p.read_only {
            "read-only"
        } else {
            "read-write"
        },
        limit(p.requests_per_minute),
        limit(p.concurrent_tasks)
    )
}

async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            name,
            tenant,
            worker,
            policy,
            data_dir,
            json,
        } => {
            let kind = if worker {
                KeyKind::Worker
            } else {
                KeyKind::Client
            };
            if worker && !policy.is_empty() {
                bail!("scopes and limits apply to client keys; a worker token serves every model");
            }
            let policy = policy.apply(KeyPolicy::default())?;
            let store = open_store(&data_dir, true).await?;
            let (record, key) = taskgate_server::auth::create_key_with(
                store.as_ref(),
                kind,
                &name,
                tenant.as_deref(),
                &policy,
            )
            .await?;
            store.close().await;
            if json {
                println!(
                    "{}",
                    json!({
                        "id": record.id,
                        "kind": kind.as_str(),
                        "name": record.name,
                        "tenant": record.tenant.name,
                        "apiKey": key,
                    })
                );
                return Ok(());
            }
            match kind {
                KeyKind::Client => println!(
                    "Created key {} ({:?}) in tenant {:?}.",
                    record.id, record.name, record.tenant.name
                ),
                KeyKind::Worker => {
                    println!("Created worker token {} ({:?}).", record.id, record.name)
                }
            }
            println!("Store it now: it is shown only this once.");
            println!("API key: {key}");
        }
        KeysCommand::List { data_dir, json } => {
            let store = open_store(&data_dir, false).await?;
            let keys = store.list_keys().await?;
            store.close().await;
            if json {
                let list: Vec<_> = keys.iter().map(key_json).collect();
                println!("{}", serde_json::Value::Array(list));
                return Ok(());
            }
            if keys.is_empty() {
                println!("No keys yet: create one with `taskgate keys create --name NAME`.");
            }
            println!(
                "{:<32}  {:<7}  {:<20}  {:<20}  {:<12}  {:<20}  STATUS",
                "ID", "KIND", "NAME", "TENANT", "PREFIX", "CREATED"
            );
            for k in keys {
                let status = match k.revoked_at {
                    Some(t) => format!("revoked {}", format_time(t)),
                    None => "active".to_owned(),
                };
                println!(
                    "{:<32}  {:<7}  {:<20}  {:<20}  {:<12}  {:<20}  {status}",
                    k.id,
                    k.kind.as_str(),
                    k.name,
                    k.tenant.name,
                    format!("{}…", k.prefix),
                    format_time(k.created_at)
                );
                if k.kind == KeyKind::Client && k.policy != KeyPolicy::default() {
                    println!("    {}", policy_text(&k.policy));
                }
            }
        }
        KeysCommand::Update {
            id,
            policy,
            data_dir,
            json,
        } => {
            if policy.is_empty() {
                bail!("nothing to change: pass --models, --all-models, --read-only, --read-write, --requests-per-minute or --concurrent-tasks");
            }
            let store = open_store(&data_dir, false).await?;
            let updated = update_key(store.as_ref(), &id, &policy).await;
            store.close().await;
            let record = updated?;
            if json {
                println!("{}", key_json(&record));
            } else {
                println!(
                    "Updated key {id}: {}. Every node applies it within a second.",
                    policy_text(&record.policy)
                );
            }
        }
        KeysCommand::Usage {
            tenant,
            from,
            to,
            group_by,
            data_dir,
            json,
        } => {
            // The window is checked before the store is opened: a typo costs no open.
            let window = taskgate_server::usage::window(
                from.as_deref(),
                to.as_deref(),
                Some(group_by.as_str()),
                taskgate_server::domain::now_ms(),
            )
            .map_err(|e| anyhow::anyhow!("{}", e.0.replace("groupBy", "--group-by")))?;
            let store = open_store(&data_dir, false).await?;
            let found = store.tenant_by_name(&tenant).await;
            let report = match found {
                Ok(Some(t)) => taskgate_server::usage::report(store.as_ref(), &t.id, &window)
                    .await
                    .map_err(anyhow::Error::from),
                Ok(None) => Err(anyhow::anyhow!(
                    "no tenant named {tenant:?}; see the TENANT column of `taskgate keys list`"
                )),
                Err(e) => Err(e.into()),
            };
            store.close().await;
            let report = report?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_usage(&tenant, &report);
            }
        }
        KeysCommand::Revoke { id, data_dir, json } => {
            let store = open_store(&data_dir, false).await?;
            let done = store
                .revoke_key(&id, taskgate_server::domain::now_ms())
                .await?;
            store.close().await;
            if !done {
                bail!("no active key with id {id:?}; see `taskgate keys list`");
            }
            if json {
                println!("{}", json!({ "id": id, "revoked": true }));
            } else {
                println!("Revoked key {id}; requests with it now get 401.");
            }
        }
    }
    Ok(())
}

/// The report as a table: one line per group and a total line.
fn print_usage(tenant: &str, r: &taskgate_proto::UsageReport) {
    println!(
        "Usage of tenant {tenant:?}: tasks created from {} to {} (exclusive), per {}.",
        format_time(r.from),
        format_time(r.to),
        r.group_by.as_str()
    );
    println!(
        "{:<32}  {:>9}  {:>9}  {:>9}  {:>10}  {:>9}  {:>12}",
        r.group_by.as_str().to_ascii_uppercase(),
        "SUCCESS",
        "FAILED",
        "PENDING",
        "PROCESSING",
        "TOTAL",
        "RUN SECONDS"
    );
    let line = |name: &str, f: &taskgate_proto::UsageFigures| {
        println!(
            "{:<32}  {:>9}  {:>9}  {:>9}  {:>10}  {:>9}  {:>12.3}",
            name,
            f.counts.success,
            f.counts.failed,
            f.counts.pending,
            f.counts.processing,
            f.total,
            f.run_seconds
        )
    };
    for row in &r.rows {
        let name = row
            .model
            .as_deref()
            .or(row.day.as_deref())
            .or(row.key.as_deref())
            .unwrap_or("");
        line(name, &row.figures);
    }
    line("(total)", &r.total);
}

/// Applies `args` to the client key `id`'s policy; the key as it is now.
async fn update_key(
    store: &dyn Store,
    id: &str,
    args: &PolicyArgs,
) -> anyhow::Result<ApiKeyRecord> {
    let Some(mut record) = store
        .list_keys()
        .await?
        .into_iter()
        .find(|k| k.id == id && k.kind == KeyKind::Client && k.revoked_at.is_none())
    else {
        bail!("no active client key with id {id:?}; see `taskgate keys list`");
    };
    record.policy = args.apply(record.policy)?;
    if !store.update_key_policy(id, &record.policy).await? {
        bail!("no active client key with id {id:?}; see `taskgate keys list`");
    }
    Ok(record)
}
