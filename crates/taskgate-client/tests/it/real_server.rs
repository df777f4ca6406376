//! A real taskgate server in this process (`taskgate_server::run_with` on 127.0.0.1:0 over a
//! fresh data dir), for calls whose meaning only the server defines: a worker's lease, the
//! kind of key a route takes, what `wait` sees while a task runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskgate_client::Client;
use taskgate_server::config::FileConfig;
use taskgate_server::store::KeyKind;
use taskgate_server::Config;
use tokio::sync::oneshot;

/// The client key the server registers at start.
pub const API_KEY: &str = "test-key-0123456789abcdef";

/// A model served by pull workers, added to the builtin ones (`echo`, …).
const WORKER_MODEL: &str = r#"
[models.remote]
backend = "worker"
concurrency = 2
timeout = "30s"
max_attempts = 3
"#;

pub struct RealServer {
    pub base: String,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
}

impl RealServer {
    /// Starts the server with the builtin models and `remote` (worker-backed); returns once it
    /// answers.
    pub async fn start() -> RealServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path());
        config.bootstrap_api_key = Some(API_KEY.to_owned());
        // A task a worker gives back is claimable again at once.
        config.server.retry_backoff =
            taskgate_server::config::Delays(vec![Duration::from_millis(50)]);
        config
            .models
            .extend(FileConfig::parse(WORKER_MODEL).unwrap().models.unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (ready_tx, ready_rx) = oneshot::channel();
        let ready_tx = Mutex::new(Some(ready_tx));
        let hooks = taskgate_server::Hooks {
            on_ready: Some(Arc::new(move |_| {
                if let Some(tx) = ready_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            })),
            ..Default::default()
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(taskgate_server::run_with(
            config,
            listener,
            async {
                let _ = stop.await;
            },
            hooks,
        ));
        if ready_rx.await.is_err() {
            // The hook was dropped unrun: the server failed to start; say why.
            panic!("the server did not start: {:?}", server.await);
        }
        RealServer {
            base,
            data_dir: dir.path().to_owned(),
            _dir: dir,
            shutdown: Some(shutdown),
        }
    }

    /// A client with the registered key.
    pub fn client(&self) -> Client {
        Client::new(&self.base, API_KEY).unwrap()
    }

    /// A new worker token, made in the server's store as `taskgate keys create --worker` does.
    pub async fn worker_token(&self) -> String {
        let store = taskgate_server::open_store(&self.data_dir, None)
            .await
            .unwrap();
        let (_, token) =
            taskgate_server::auth::create_key(store.as_ref(), KeyKind::Worker, "gpu", None)
                .await
                .unwrap();
        store.close().await;
        token
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
