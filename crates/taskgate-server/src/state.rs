//! What every request handler shares. Its own module so that the API's routers (and anything
//! else that serves requests) depend on it, not on each other.

use std::sync::Arc;

use crate::artifacts::{LocalArtifacts, ResultLinks};
use crate::auth::Authenticator;
use crate::config::WebhookSettings;
use crate::dispatch::Dispatcher;
use crate::retention::Retention;
use crate::store::Store;
use crate::views::TaskViews;
use crate::webhooks::Deliverer;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub auth: Authenticator,
    /// Per-key limits (`limits` module).
    pub limits: std::sync::Arc<crate::limits::Limiter>,
    pub dispatcher: Arc<Dispatcher>,
    pub links: ResultLinks,
    pub local_files: Option<Arc<LocalArtifacts>>,
    pub max_body_bytes: usize,
    /// Largest output a pull worker may upload.
    pub max_upload_bytes: u64,
    pub webhooks: WebhookSettings,
    pub deliverer: Arc<Deliverer>,
    /// Tasks' statusTask answers, ready to send (`views` module).
    pub views: TaskViews,
    /// How long finished tasks are kept (the cached views of deleted tasks are not served).
    pub retention: Retention,
    /// Whether just-submitted tasks' pending views are kept: only where this process is the
    /// store's only writer.
    pub live_views: bool,
    /// The node's metrics (`GET /metrics`, and the HTTP layer).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The dashboard's count cache and the pull-worker throttle (`dashboard` module).
    pub dashboard: Arc<crate::dashboard::Dashboard>,
}
