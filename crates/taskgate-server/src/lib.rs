//! taskgate's server: the APIXO-compatible task API over an embedded store, with dispatch to
//! pluggable backends and signed result URLs.
//!
//! The entry point is [`run`], which takes a bound listener (tests pass `127.0.0.1:0`) and a
//! shutdown future. See ARCHITECTURE.md at the repository root for the map.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod backends;
pub mod config;
pub mod dashboard;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod report;
pub mod retention;
pub mod retry;
pub mod serve;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod views;
pub mod webhooks;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::Config;

use crate::artifacts::{ArtifactStore, LocalArtifacts, ResultLinks, S3Artifacts, UrlSigner};
use crate::config::ArtifactsConfig;
use crate::dispatch::{Dispatcher, ModelRuntime};
use crate::retry::{AfterLast, RetryPolicy};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError, StoreEvent};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another taskgate process is already using data directory {0}; stop it or pass another --data-dir")]
    DataDirLocked(PathBuf),
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error("cannot set up result file storage")]
    Artifacts(#[from] artifacts::ArtifactError),
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// The SQLite file inside a data dir.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("taskgate.db")
}

/// Opens the store: PostgreSQL when `database_url` is given, else SQLite in `data_dir`
/// (created if needed). Used by `serve` and the `keys` commands.
pub async fn open_store(
    data_dir: &Path,
    database_url: Option<&str>,
) -> Result<Arc<dyn Store>, ServerError> {
    if let Some(url) = database_url {
        return Ok(Arc::new(PostgresStore::connect(url, None).await?));
    }
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(Arc::new(SqliteStore::open(&database_path(data_dir)).await?))
}

/// Holds an exclusive lock on the data dir for the life of the server: two servers on one
/// SQLite file would each think the other's running tasks were orphans.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, ServerError> {
    match dispatch::maintenance::lock_file(&data_dir.join("taskgate.lock")) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(ServerError::DataDirLocked(data_dir.to_owned())),
        Err(source) => Err(ServerError::DataDir {
            path: data_dir.to_owned(),
            source,
        }),
    }
}

const URL_SIGNING_KEY: &str = "artifact_url_signing_key";

/// Acts on other nodes' events (PostgreSQL NOTIFY): wakes local loops and the deliverer, and
/// stops the local attempt of a task cancelled elsewhere. SQLite sends only `DeliveryReady`, for
/// the start and progress deliveries written inside its claims and renewals.
fn forward_store_events(
    store: Arc<dyn Store>,
    dispatcher: Arc<Dispatcher>,
    deliverer: Arc<webhooks::Deliverer>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { store.listen(tx).await });
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            match event {
                StoreEvent::TaskReady(model) => dispatcher.notify(&model),
                StoreEvent::DeliveryReady => deliverer.wake(),
                StoreEvent::TasksChanged(ids) => dispatcher
                    .events()
                    .changed_all(ids.iter().map(String::as_str)),
                // The cancel's final state is written already; this only stops the work. A
                // notice missed while the listener reconnected is made up for by the attempt's
                // next lease renewal, which the dead token fails.
                StoreEvent::TaskCancelled(task_id) => {
                    dispatcher.cancel_running(&task_id);
                }
                StoreEvent::Resync => {
                    dispatcher.events().resync();
                    for m in dispatcher.models() {
                        dispatcher.notify(&m.name);
                    }
                    deliverer.wake();
                }
            }
        }
    });
}

/// Wraps the store the server opens (tests install a [`store::faults::FaultyStore`]).
pub type StoreWrapper = Arc<dyn Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync>;

/// Ways for tests (and the binary) to reach inside a running server; the default changes
/// nothing.
#[derive(Default, Clone)]
pub struct Hooks {
    pub wrap_store: Option<StoreWrapper>,
    /// Called once the server is ready to answer (store open, data dir locked, bootstrap key
    /// stored), with the address it listens on: the binary prints its "listening" line here,
    /// so the line never appears for a server that then fails to start.
    pub on_ready: Option<Arc<dyn Fn(std::net::SocketAddr) + Send + Sync>>,
}

/// Runs the server on `listener` until `shutdown` resolves, then drains: stops accepting, gives
/// running tasks `config.server.shutdown_grace`, and leaves the rest pending for the next start.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(config, listener, shutdown, Hooks::default()).await
}

/// [`run`], with [`Hooks`].
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hooks: Hooks,
) -> Result<(), ServerError> {
    config.validate()?;
    let mut input_schemas = backends::input_schemas(&config.models)?;
    // Absolute, so that paths handed to model programs (TASKGATE_OUTPUT_DIR) do not depend on
    // their working directory.
    std::fs::create_dir_all(&config.server.data_dir).map_err(|source| ServerError::DataDir {
        path: config.server.data_dir.clone(),
        source,
    })?;
    let data_dir =
        std::fs::canonicalize(&config.server.data_dir).map_err(|source| ServerError::DataDir {
            path: config.server.data_dir.clone(),
            source,
        })?;
    // Two servers on one SQLite file would each take the other's running tasks for orphans;
    // PostgreSQL nodes share safely through leases. Taken before the store is opened, so a
    // second server neither migrates nor reads the file it is about to be refused.
    let _lock = if config.server.database_url.is_none() {
        Some(lock_data_dir(&data_dir)?)
    } else {
        None
    };
    let mut store = open_store(
        &data_dir,
        config.server.database_url.as_ref().map(|u| u.as_str()),
    )
    .await?;
    if let Some(wrap) = &hooks.wrap_store {
        store = wrap(store);
    }
    store.set_tenant_weights(config.tenant_weights());

    if let Some(key) = &config.bootstrap_api_key {
        auth::register_bootstrap_key(store.as_ref(), key).await?;
    }
    let client_keys = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.kind == store::KeyKind::Client && k.revoked_at.is_none())
        .count();
    if client_keys == 0 {
        // Otherwise a first run looks healthy and every request gets 401.
        warn!("no API key exists, so every request will be refused with 401: set TASKGATE_API_KEY (16+ characters) for `taskgate serve`, or create one with `taskgate keys create --name NAME --data-dir <this data dir>`");
    }

    let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
    let public_url = config.server.public_url.clone().unwrap_or_else(|| {
        if local_addr.ip().is_unspecified() {
            // 0.0.0.0 is not an address a client can fetch from.
            let reachable = std::net::SocketAddr::new(
                std::net::Ipv4Addr::LOCALHOST.into(),
                local_addr.port(),
            );
            tracing::warn!(%local_addr, "listening on all interfaces without --public-url: result URLs use http://{reachable}; set --public-url to the address clients reach");
            format!("http://{reachable}")
        } else {
            format!("http://{local_addr}")
        }
    });
    let mut fresh_key = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh_key);
    let signing_key = store.setting_or_init(URL_SIGNING_KEY, &fresh_key).await?;
    let local_files = Arc::new(LocalArtifacts::new(
        data_dir.join("files"),
        public_url.clone(),
        UrlSigner::new(signing_key),
    ));
    // With a bucket configured, results go there and their URLs point at it, so this node
    // serves no `/files` (it answers 404).
    let (artifacts, local_files): (Arc<dyn ArtifactStore>, _) = match &config.artifacts {
        ArtifactsConfig::Local => (local_files.clone(), Some(local_files)),
        ArtifactsConfig::S3(s3) => (Arc::new(S3Artifacts::new(s3)?), None),
    };

    // Scratch space for attempts and uploads: this node's alone, and emptied of whatever the
    // last process (or a node that is gone) left.
    let work_dir = dispatch::maintenance::prepare_work_dir(&data_dir, store.exclusive()).map_err(
        |source| ServerError::DataDir {
            path: data_dir.clone(),
            source,
        },
    )?;

    let http = reqwest::Client::builder()
        .user_agent(concat!("taskgate/", env!("CARGO_PKG_VERSION")))
        .redirect(webhooks::ssrf::same_origin_redirects())
        .build()
        .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
    // Before the models: a routed model's backend takes its routes' metric handles.
    let metrics = Arc::new(metrics::Metrics::new(
        config.models.keys().map(String::as_str),
        config
            .server
            .metrics_token
            .as_ref()
            .map(|t| t.as_str().trim().to_owned()),
    ));
    let models: BTreeMap<String, Arc<ModelRuntime>> = config
        .models
        .iter()
        .map(|(name, cfg)| {
            let backend = backends::build(name, cfg, &http, &metrics);
            (
                name.clone(),
                Arc::new(
                    ModelRuntime::new(name.clone(), cfg.clone(), backend)
                        .with_input_schema(input_schemas.remove(name)),
                ),
            )
        })
        .collect();

    let model_names: Vec<String> = models.keys().cloned().collect();
    dispatch::maintenance::recover_at_start(store.as_ref(), &model_names).await?;

    let links = ResultLinks {
        store: artifacts.clone(),
        ttl_secs: config.server.result_url_ttl.as_secs() as i64,
    };
    let webhook_wake = Arc::new(tokio::sync::Notify::new());
    let deliverer = webhooks::Deliverer::new(
        store.clone(),
        links.clone(),
        config.webhooks.clone(),
        webhook_wake.clone(),
        metrics.clone(),
    )
    .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
    deliverer.start();

    let views = views::TaskViews::default();
    let dispatcher = Dispatcher::new(
        store.clone(),
        artifacts,
        models,
        work_dir.path.clone(),
        RetryPolicy::new(
            config.server.retry_backoff.0.clone(),
            0.0,
            AfterLast::RepeatLast,
        ),
        config.server.lease,
        dispatch::Shared {
            webhook_wake,
            views: views.clone(),
            events: events::TaskEvents::default(),
            metrics: metrics.clone(),
        },
    );
    dispatcher.start();
    forward_store_events(store.clone(), dispatcher.clone(), deliverer.clone());

    let retention = retention::Retention {
        files: config.server.file_retention,
        records: config.server.record_retention,
    };
    let sweeping = tokio_util::sync::CancellationToken::new();
    let sweeper = tokio::spawn(
        retention::Sweeper {
            store: store.clone(),
            artifacts: dispatcher.artifacts().clone(),
            views: views.clone(),
            retention,
        }
        .run(sweeping.clone()),
    );

    let authenticator = auth::Authenticator::new(store.clone());
    authenticator.watch_revocations();
    let limiter = limits::Limiter::new(limits::Defaults {
        requests_per_minute: config.limits.requests_per_minute,
        concurrent_tasks: config.limits.concurrent_tasks,
    });
    limiter.start(store.clone());
    let state = state::AppState {
        store: store.clone(),
        auth: authenticator,
        limits: limiter,
        views: views.clone(),
        live_views: store.exclusive(),
        retention,
        dispatcher: dispatcher.clone(),
        links,
        local_files,
        max_body_bytes: config.server.max_body_bytes,
        max_upload_bytes: config.server.max_upload_bytes,
        webhooks: config.webhooks.clone(),
        deliverer: deliverer.clone(),
        metrics,
        dashboard: Arc::new(dashboard::Dashboard::new(public_url.clone())),
    };
    info!(%local_addr, %public_url, models = ?config.models.keys().collect::<Vec<_>>(), "taskgate serving");
    let draining = dispatcher.clone();
    if let Some(ready) = hooks.on_ready {
        ready(local_addr);
    }
    let limits = serve::Limits {
        header_timeout: config.server.header_timeout,
        body_timeout: config.server.body_timeout,
        max_connections: config.server.max_connections,
        drain: config.server.shutdown_grace,
    };
    // One grace period for the whole shutdown, counted from the signal: requests in flight,
    // then running attempts, then deliveries get what the earlier ones left (a supervisor's
    // kill deadline is usually the same length). Attempts cut short stay pending and deliveries
    // are sent again at the next start.
    let since = serve::serve(listener, api::router(state), limits, async move {
        shutdown.await;
        info!("shutting down: no longer accepting connections; finishing requests in flight");
        draining.stop_claiming();
    })
    .await;
    let left = || config.server.shutdown_grace.saturating_sub(since.elapsed());
    info!("no longer accepting requests; draining running tasks");
    sweeping.cancel();
    let _ = sweeper.await;
    dispatcher.shutdown(left()).await;
    deliverer.shutdown(left()).await;
    store.close().await;
    info!("stopped");
    Ok(())
}
