//! Server settings and the per-model tables.
//!
//! `settings` declares each settings table once (the file's table, the flags and variables, and
//! the resolved values come from that one declaration) and layers them: flags > environment >
//! file > defaults, in `settings::layered`. `defaults` holds every default. This module holds
//! the file format, the model tables, and the validation that stops a bad start with a message
//! saying what to change. It depends on nothing else in the crate.

mod apixo;
pub mod defaults;
pub mod schema;
pub mod settings;

pub use apixo::ApixoBackendConfig;
pub use schema::{InputSchema, SchemaSource};

pub use settings::{
    layered, DatabaseUrl, Delays, Layers, LimitLayer, LimitSettings, MetricsToken, ServerLayer,
    ServerSettings, StorageLayer, StorageSettings, WebhookLayer, WebhookSettings,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration cannot be used. Every message names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {setting}: {message}")]
    Invalid { setting: String, message: String },
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.into(),
        message: message.into(),
    }
}

/// The whole file: optional `[server]`, `[webhooks]` and `[storage]` tables and one
/// `[models.NAME]` table per model.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerLayer,
    #[serde(default)]
    pub webhooks: WebhookLayer,
    #[serde(default)]
    pub storage: StorageLayer,
    #[serde(default)]
    pub limits: LimitLayer,
    /// When absent, `serve` offers the two builtin models `echo` and `demo-image`.
    pub models: Option<BTreeMap<String, ModelConfig>>,
    /// Per-tenant settings by tenant name (`[tenants.NAME]`).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// One tenant's settings, by its name (`taskgate keys create --tenant NAME`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Its share of each model against other tenants with waiting tasks (docs/gateway.md,
    /// "Fair sharing between tenants"); 1 when not set.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl FileConfig {
    /// Reads and parses a TOML file; unknown keys are errors so that typos do not pass silently.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Ok(config.with_schema_paths_from(path.parent().unwrap_or(Path::new(""))))
    }

    /// Schema files named by a relative path are looked up next to the config file, so that a
    /// config and its schemas move together, whatever directory the server starts in.
    fn with_schema_paths_from(mut self, dir: &Path) -> Self {
        for model in self.models.iter_mut().flat_map(|m| m.values_mut()) {
            model.input_schema = model.input_schema.take().map(|s| s.anchored_at(dir));
        }
        self
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut raw: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let routed = tag_routed_models(&mut raw)?;
        // Keys first: a typo in a route is then named by its route, not by serde's model.
        if let Some(toml::Value::Table(models)) = raw.get("models") {
            for (name, table) in models {
                if let toml::Value::Table(t) = table {
                    check_model_keys(name, t)?;
                }
            }
        }
        // A file without routes is read from its text, so that errors keep their line numbers.
        let mut config: FileConfig = if routed.is_empty() {
            toml::from_str(text)
        } else {
            raw.try_into()
        }
        .map_err(|e| e.to_string())?;
        if let Some(models) = &mut config.models {
            for (name, set) in routed {
                if let Some(model) = models.get_mut(&name) {
                    model.sum_routes(set);
                }
            }
        }
        Ok(config)
    }
}

/// Which of a routed model's own settings its table set (the rest are its routes' sums).
#[derive(Debug, Clone, Copy)]
struct RoutedSet {
    concurrency: bool,
    timeout: bool,
}

/// Gives each model table that lists `routes` instead of a `backend` the tag `backend =
/// "routes"`, and each route without a `name` its default (its kind and 1-based position,
/// `http-1`), so that serde reads them; refuses what a route cannot be (a pull-worker model, a
/// route of routes, a route without a kind). Answers the routed models.
fn tag_routed_models(raw: &mut toml::Table) -> Result<Vec<(String, RoutedSet)>, String> {
    let mut routed = Vec::new();
    let Some(toml::Value::Table(models)) = raw.get_mut("models") else {
        return Ok(routed);
    };
    for (name, table) in models.iter_mut() {
        let toml::Value::Table(t) = table else {
            continue;
        };
        let Some(routes) = t.get_mut("routes") else {
            continue;
        };
        let toml::Value::Array(routes) = routes else {
            return Err(format!(
                "models.{name}.routes must be an array of backend tables, e.g. routes = [{{ backend = \"http\", url = \"...\" }}]"
            ));
        };
        for (i, route) in routes.iter_mut().enumerate() {
            let at = format!("models.{name}.routes[{i}]");
            let toml::Value::Table(route) = route else {
                return Err(format!("{at} must be a backend table"));
            };
            let kind = match route.get("backend").and_then(|b| b.as_str()) {
                Some(kind @ ("worker" | "routes")) => {
                    return Err(format!(
                        "{at}.backend: a route cannot be {kind:?}; routes run here (a pull-worker model has no failover) and do not nest"
                    ))
                }
                Some(kind) => kind.to_owned(),
                None => return Err(format!("{at}: every route needs backend = \"...\"")),
            };
            if !route.contains_key("name") {
                route.insert("name".into(), format!("{kind}-{}", i + 1).into());
            }
        }
        if let Some(kind) = t.get("backend").and_then(|b| b.as_str()) {
            if kind != "routes" {
                return Err(format!(
                    "models.{name} has both backend = {kind:?} and routes; use one: routes lists each backend"
                ));
            }
        }
        routed.push((
            name.clone(),
            RoutedSet {
                concurrency: t.contains_key("concurrency"),
                timeout: t.contains_key("timeout"),
            },
        ));
        t.insert("backend".into(), "routes".into());
    }
    Ok(routed)
}

/// One model: which backend runs it and how much of it may run at once.
// serde cannot deny unknown fields through `flatten`; `check_model_keys` does it instead.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(flatten)]
    pub backend: BackendConfig,
    /// Tasks of this model that may run at the same time.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Longest one attempt may run before the task fails with `PROCESSING_TIMEOUT`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts (first run included) before a retryable error or a lost worker fails the task.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The JSON Schema a submit's `input` must match (compiled at start, see `schema`). Without
    /// it, a builtin's own schema, and for other backends no check.
    #[serde(default)]
    pub input_schema: Option<SchemaSource>,
    /// The first poll interval clients are told to use ([`ModelConfig::recommended_poll_interval`]).
    #[serde(default, with = "humantime_serde::option")]
    pub poll_interval: Option<Duration>,
    /// How tasks of this model can be followed, as listed to clients ([`ModelConfig::listed_modes`]).
    #[serde(default)]
    pub modes: Option<Vec<String>>,
    /// One line for people, listed by `GET /api/v1/models`.
    #[serde(default)]
    pub description: Option<String>,
}

impl ModelConfig {
    /// A model of `backend` with every other setting at its default.
    pub fn new(backend: BackendConfig) -> Self {
        ModelConfig {
            backend,
            concurrency: default_concurrency(),
            timeout: default_timeout(),
            max_attempts: default_max_attempts(),
            input_schema: None,
            poll_interval: None,
            modes: None,
            description: None,
        }
    }

    /// `poll_interval`, or the default of the model's kind: builtins answer in milliseconds; for
    /// the others taskgate cannot know, so it says what APIXO recommends for fast image models.
    pub fn recommended_poll_interval(&self) -> Duration {
        self.poll_interval.unwrap_or(match self.backend {
            BackendConfig::Builtin { .. } => defaults::BUILTIN_POLL_INTERVAL,
            _ => defaults::MODEL_POLL_INTERVAL,
        })
    }

    /// A routed model's `concurrency` and `timeout` that its table left out: the sums of its
    /// routes' (every route may run at once; an attempt may try each route in turn).
    fn sum_routes(&mut self, set: RoutedSet) {
        let BackendConfig::Routes { routes } = &self.backend else {
            return;
        };
        if !set.concurrency {
            self.concurrency = routes.iter().map(|r| r.concurrency).sum();
        }
        if !set.timeout {
            self.timeout = routes.iter().map(|r| r.timeout).sum();
        }
    }

    /// `modes`, or what every model supports: APIXO's two request types.
    pub fn listed_modes(&self) -> Vec<String> {
        match &self.modes {
            Some(modes) => modes.clone(),
            None => defaults::MODEL_MODES
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
        }
    }
}

/// Refuses keys a model table's backend does not take, so that a typo is not silently ignored.
fn check_model_keys(name: &str, table: &toml::Table) -> Result<(), String> {
    const COMMON: &[&str] = &[
        "backend",
        "concurrency",
        "timeout",
        "max_attempts",
        "input_schema",
        "poll_interval",
        "modes",
        "description",
    ];
    /// What every route table takes besides its backend's own keys.
    const ROUTE: &[&str] = &[
        "backend",
        "name",
        "concurrency",
        "timeout",
        "breaker_failures",
        "breaker_cooldown",
    ];
    if let Some(toml::Value::Array(routes)) = table.get("routes") {
        for (i, route) in routes.iter().enumerate() {
            if let toml::Value::Table(route) = route {
                check_backend_keys(&format!("models.{name}.routes[{i}]"), ROUTE, route)?;
            }
        }
    }
    check_backend_keys(&format!("models.{name}"), COMMON, table)
}

/// Refuses keys of `table` (named `at`) that are neither `common` nor its backend's own.
fn check_backend_keys(at: &str, common: &[&str], table: &toml::Table) -> Result<(), String> {
    let own: &[&str] = match table.get("backend").and_then(|b| b.as_str()) {
        Some("routes") => &["routes"],
        Some("builtin") => &["builtin"],
        Some("command") => &["command", "env", "working_dir"],
        Some("worker") => &[],
        Some("replicate") => &["model", "version"],
        Some("fal") => &["model"],
        Some("http") => &[
            "url",
            "headers",
            "response",
            "url_pointers",
            "base64_pointers",
            "base64_content_type",
        ],
        Some("apixo") => apixo::KEYS,
        _ => return Ok(()),
    };
    let upstream: &[&str] = match table.get("backend").and_then(|b| b.as_str()) {
        Some("replicate" | "fal") => UPSTREAM_KEYS,
        _ => &[],
    };
    for key in table.keys() {
        let key = key.as_str();
        if !common.contains(&key) && !own.contains(&key) && !upstream.contains(&key) {
            let mut allowed: Vec<&str> =
                common.iter().chain(own).chain(upstream).copied().collect();
            allowed.sort_unstable();
            return Err(format!(
                "unknown key {key:?} in [{at}]; this backend takes: {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn default_concurrency() -> usize {
    defaults::MODEL_CONCURRENCY
}
fn default_timeout() -> Duration {
    defaults::MODEL_TIMEOUT
}
fn default_max_attempts() -> u32 {
    defaults::MODEL_MAX_ATTEMPTS
}
fn default_breaker_failures() -> u32 {
    defaults::ROUTE_BREAKER_FAILURES
}
fn default_breaker_cooldown() -> Duration {
    defaults::ROUTE_BREAKER_COOLDOWN
}

/// The kind of backend and its own settings, tagged by `backend = "..."`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum BackendConfig {
    /// Stand-ins that need nothing installed.
    Builtin { builtin: BuiltinKind },
    /// A program run per task, input JSON on stdin, outputs left in `$TASKGATE_OUTPUT_DIR`.
    Command {
        command: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        working_dir: Option<PathBuf>,
    },
    /// An upstream model server that takes the input JSON in a POST.
    Http(HttpBackendConfig),
    /// Remote pull workers (`taskgate worker`) claim this model's tasks over HTTP.
    Worker {},
    /// Another APIXO-compatible service (APIXO, or another taskgate) runs the task.
    Apixo(ApixoBackendConfig),
    /// Replicate's predictions API (`backends/replicate.rs`).
    Replicate(ReplicateConfig),
    /// fal's queue API (`backends/fal.rs`).
    Fal(FalConfig),
    /// Several backends tried in order, with failover (`routes = [...]` in place of `backend`;
    /// [`FileConfig::parse`] fills in this tag).
    Routes { routes: Vec<RouteConfig> },
}

/// `backend = "replicate"`: one of `model` (`owner/name`, an official model) or `version`.
#[derive(Debug, Clone, Deserialize)]
pub struct ReplicateConfig {
    pub model: Option<String>,
    pub version: Option<String>,
    #[serde(flatten)]
    pub upstream: UpstreamSettings,
}

/// `backend = "fal"`: `model` is the endpoint id, e.g. `fal-ai/flux/dev`.
#[derive(Debug, Clone, Deserialize)]
pub struct FalConfig {
    pub model: String,
    #[serde(flatten)]
    pub upstream: UpstreamSettings,
}

/// What every rented provider's table takes besides its model.
#[derive(Clone, Deserialize)]
pub struct UpstreamSettings {
    /// The API's base URL; the provider's own when absent (tests point it at a fake).
    pub url: Option<String>,
    /// The environment variable holding the key (each provider has its usual default).
    pub api_key_env: Option<String>,
    /// The key itself, for a config file kept as secret as the key; never printed.
    pub api_key: Option<String>,
    /// One downloaded output larger than this fails the task.
    pub max_output_bytes: Option<u64>,
    /// The first wait between two status polls; it doubles up to ten times this.
    #[serde(default, with = "humantime_serde::option")]
    pub upstream_poll_interval: Option<Duration>,
}

impl std::fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("url", &self.url)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_output_bytes", &self.max_output_bytes)
            .field("upstream_poll_interval", &self.upstream_poll_interval)
            .finish()
    }
}

/// The keys an upstream provider's table takes besides `model`/`version`.
const UPSTREAM_KEYS: &[&str] = &[
    "url",
    "api_key_env",
    "api_key",
    "max_output_bytes",
    "upstream_poll_interval",
];

impl UpstreamSettings {
    /// The API key: `api_key`, else the variable `api_key_env` (or `default_env`) names. The
    /// error names the variable, never a value.
    pub fn key(&self, default_env: &str) -> Result<String, String> {
        if let Some(key) = &self.api_key {
            return Ok(key.clone());
        }
        let var = self.api_key_env.as_deref().unwrap_or(default_env);
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
            _ => Err(format!(
                "the environment variable {var} (the API key) is not set; set it, or name another with api_key_env"
            )),
        }
    }

    fn validate(&self, at: &dyn Fn(&str) -> String, default_env: &str) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let parsed = url::Url::parse(url)
                .map_err(|e| invalid(at("url"), format!("{url:?} is not an absolute URL ({e})")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(at("url"), "must start with http:// or https://"));
            }
        }
        if self.max_output_bytes == Some(0) {
            return Err(invalid(at("max_output_bytes"), "must be at least 1"));
        }
        if self.upstream_poll_interval.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                at("upstream_poll_interval"),
                "must be longer than 0s",
            ));
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(invalid(at("api_key"), "is empty"));
        }
        self.key(default_env)
            .map(drop)
            .map_err(|message| invalid(at("api_key_env"), message))
    }
}

/// `owner/name`: two non-empty segments of what a URL path takes without escaping.
fn owner_slash_name(s: &str, min_segments: usize) -> bool {
    let segments: Vec<&str> = s.split('/').collect();
    segments.len() >= min_segments
        && segments.iter().all(|seg| {
            !seg.is_empty()
                && seg != &"."
                && seg != &".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

/// One route of a routed model: a whole backend table (any kind but `worker`), with its own
/// concurrency, timeout and circuit breaker.
// Like `ModelConfig`, unknown keys are refused by `check_model_keys`, not serde.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    /// Shown in statusTask's `route` and in metrics; default `KIND-POSITION` (`http-1` for the
    /// first route), filled in by [`FileConfig::parse`].
    #[serde(default)]
    pub name: Option<String>,
    #[serde(flatten)]
    pub backend: BackendConfig,
    /// Attempts this route may run at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Longest one try on this route may take; then the attempt moves to the next route.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive retryable failures that open the route's circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker turns attempts away before one probe may try the route.
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl RouteConfig {
    /// A route of `backend` with every other setting at its default.
    pub fn new(backend: BackendConfig) -> Self {
        RouteConfig {
            name: None,
            backend,
            concurrency: default_concurrency(),
            timeout: default_timeout(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
        }
    }

    /// The route's name; `route-N` (1-based) for a route built in code without one.
    pub fn name_at(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("route-{}", index + 1))
    }

    /// The route as a model of its own, for building its backend.
    pub fn as_model(&self) -> ModelConfig {
        ModelConfig {
            concurrency: self.concurrency,
            timeout: self.timeout,
            ..ModelConfig::new(self.backend.clone())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinKind {
    Echo,
    DemoImage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpBackendConfig {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `raw`: the response body is the one output file. `json`: outputs are found at pointers.
    #[serde(default)]
    pub response: HttpResponseKind,
    /// JSON pointers (RFC 6901) to a URL string or an array of them; each URL is downloaded.
    #[serde(default)]
    pub url_pointers: Vec<String>,
    /// JSON pointers to base64 data (or an array of it), plain or as a `data:` URL.
    #[serde(default)]
    pub base64_pointers: Vec<String>,
    /// Content type assumed for base64 data that is not a `data:` URL.
    pub base64_content_type: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpResponseKind {
    #[default]
    Raw,
    Json,
}

/// The models offered when no config file names any.
pub fn default_models() -> BTreeMap<String, ModelConfig> {
    let builtin = |kind| ModelConfig::new(BackendConfig::Builtin { builtin: kind });
    BTreeMap::from([
        ("echo".to_owned(), builtin(BuiltinKind::Echo)),
        ("demo-image".to_owned(), builtin(BuiltinKind::DemoImage)),
    ])
}

/// Everything `run` needs, after layering and validation.
#[derive(Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub webhooks: WebhookSettings,
    /// Each client key's default limits (`[limits]`).
    pub limits: LimitSettings,
    /// Where result files are kept and who serves them (from the `[storage]` table).
    pub artifacts: ArtifactsConfig,
    /// A key registered at start (`serve --api-key` / `TASKGATE_API_KEY`), for local use and
    /// tests.
    pub bootstrap_api_key: Option<String>,
    pub models: BTreeMap<String, ModelConfig>,
    /// `[tenants.NAME]` tables; a name no tenant has yet applies once it is created.
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Config {
    /// The fair-share weights claims use, by tenant name.
    pub fn tenant_weights(&self) -> crate::store::TenantWeights {
        crate::store::TenantWeights::new(
            self.tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.weight))
                .collect(),
        )
    }
}

/// Where result files live.
#[derive(Debug, Clone, Default)]
pub enum ArtifactsConfig {
    /// `DATA_DIR/files`, served by this node at `/files/...` with HMAC-signed links.
    #[default]
    Local,
    /// An S3-compatible bucket; result URLs are presigned GETs that go to it directly.
    S3(S3Config),
}

/// An S3-compatible bucket for result files.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// For S3-compatible servers (MinIO, R2, moto…); `None` means AWS itself. Requests go
    /// path-style (`ENDPOINT/BUCKET/KEY`), and plain `http://` is allowed only when named here.
    pub endpoint: Option<String>,
    pub region: String,
    /// Prepended to every key (`PREFIX/TASK_ID/NAME`), so one bucket can serve several things.
    pub prefix: Option<String>,
    /// `None`: the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, web identity, instance metadata). Explicit keys are for embedding
    /// and tests, which should not mutate the process environment.
    pub credentials: Option<S3Credentials>,
}

/// S3's limit on the life of a presigned URL (SigV4 `X-Amz-Expires`).
pub const S3_MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl S3Config {
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            endpoint: None,
            region: defaults::S3_REGION.to_owned(),
            prefix: None,
            credentials: None,
        }
    }
}

/// A static access key pair; the secret never appears in `Debug` output.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Parses `1s,5s,2m` (humantime units, comma-separated).
///
/// ```
/// use std::time::Duration;
/// use taskgate_server::config::parse_duration_list;
///
/// assert_eq!(
///     parse_duration_list("30s, 2m").unwrap(),
///     vec![Duration::from_secs(30), Duration::from_secs(120)]
/// );
/// assert!(parse_duration_list("soon").unwrap_err().contains("soon"));
/// ```
pub fn parse_duration_list(s: &str) -> Result<Vec<Duration>, String> {
    s.split(',')
        .map(|part| {
            humantime::parse_duration(part.trim())
                .map_err(|e| format!("{:?} is not a duration like 30s or 2m: {e}", part.trim()))
        })
        .collect()
}

impl std::fmt::Debug for Config {
    // `server.database_url` redacts itself; the bootstrap key is shown only as present.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("webhooks", &self.webhooks)
            .field("limits", &self.limits)
            .field("artifacts", &self.artifacts)
            .field(
                "bootstrap_api_key",
                &self.bootstrap_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("tenants", &self.tenants)
            .finish()
    }
}

impl Config {
    /// Defaults for everything, with the builtin models: what tests and `serve` with no flags use.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            server: ServerSettings {
                data_dir: data_dir.into(),
                ..defaults::server()
            },
            webhooks: defaults::webhooks(),
            limits: defaults::limits(),
            artifacts: ArtifactsConfig::Local,
            bootstrap_api_key: None,
            models: default_models(),
            tenants: BTreeMap::new(),
        }
    }

    /// Checks everything a start depends on, so that a bad value stops the start, not a task.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.server.public_url {
            let parsed = url::Url::parse(url).map_err(|e| {
                invalid(
                    "public_url",
                    format!(
                        "{url:?} is not an absolute URL ({e}); example: https://tasks.example.com"
                    ),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid("public_url", "must start with http:// or https://"));
            }
        }
        if let Some(db) = &self.server.database_url {
            let db = db.as_str();
            if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
                return Err(invalid(
                    "database_url",
                    format!(
                        "{} is not a PostgreSQL URL; example: postgres://user@host:5432/taskgate",
                        redact_url(db)
                    ),
                ));
            }
        }
        if let Some(token) = &self.server.metrics_token {
            // A short token is guessable, and an empty one (an unset variable left `=`) would
            // look like protection while any `Bearer ` header passed.
            if token.as_str().trim().len() < 16 {
                return Err(invalid(
                    "metrics_token",
                    "the /metrics token (--metrics-token / TASKGATE_METRICS_TOKEN) is too short to be safe: use at least 16 characters, or remove it to leave /metrics open",
                ));
            }
        }
        if self.server.max_upload_bytes == 0 {
            return Err(invalid("max_upload_bytes", "must be greater than 0"));
        }
        if self.server.retry_backoff.0.is_empty() {
            return Err(invalid(
                "retry_backoff",
                "needs at least one delay, e.g. 1s,5s,30s",
            ));
        }
        if self.webhooks.breaker_threshold == 0 {
            return Err(invalid("webhooks.breaker_threshold", "must be at least 1"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be greater than 0"));
        }
        if self.server.lease < Duration::from_millis(300) {
            return Err(invalid(
                "lease",
                "must be at least 300ms (renewals come every third of it)",
            ));
        }
        // Bounded above too: a deadline past what the clock can hold would panic on every
        // request.
        const A_DAY: Duration = Duration::from_secs(24 * 3600);
        if self.server.header_timeout > A_DAY {
            return Err(invalid("header_timeout", "must be at most 24h"));
        }
        if self.server.body_timeout > A_DAY {
            return Err(invalid("body_timeout", "must be at most 24h"));
        }
        if self.server.header_timeout.is_zero() {
            return Err(invalid("header_timeout", "must be longer than 0s"));
        }
        if self.server.body_timeout.is_zero() {
            return Err(invalid("body_timeout", "must be longer than 0s"));
        }
        if self.server.max_connections == 0 || self.server.max_connections > 1_000_000 {
            return Err(invalid("max_connections", "must be between 1 and 1000000"));
        }
        if self.server.result_url_ttl.is_zero() {
            return Err(invalid("result_url_ttl", "must be longer than 0s"));
        }
        if self.webhooks.timeout.is_zero() {
            return Err(invalid("webhook_timeout", "must be longer than 0s"));
        }
        if self.webhooks.max_in_flight == 0 || self.webhooks.max_per_host == 0 {
            return Err(invalid("webhooks", "concurrency limits must be at least 1"));
        }
        if let ArtifactsConfig::S3(s3) = &self.artifacts {
            validate_s3(s3, self.server.result_url_ttl)?;
        }
        for (name, tenant) in &self.tenants {
            if !(1..=crate::store::fair::MAX_WEIGHT).contains(&tenant.weight) {
                return Err(invalid(
                    format!("tenants.{name}.weight"),
                    format!(
                        "must be between 1 and {}; it is this tenant's share of a model against the other tenants with waiting tasks",
                        crate::store::fair::MAX_WEIGHT
                    ),
                ));
            }
        }
        if self.models.is_empty() {
            return Err(invalid(
                "models",
                "the config file names no model; add a [models.NAME] table",
            ));
        }
        for (name, model) in &self.models {
            let at = |k: &str| format!("models.{name}.{k}");
            if !valid_model_name(name) {
                return Err(invalid(
                    format!("models.{name}"),
                    "model names start with a lowercase letter or digit and use only lowercase letters, digits, '-', '_' and '.', at most 128 characters",
                ));
            }
            // The backend first: a routed model's own limits are its routes' sums, so a bad
            // route is named as itself.
            validate_backend(name, &model.backend, &at)?;
            if model.concurrency == 0 {
                return Err(invalid(at("concurrency"), "must be at least 1"));
            }
            if model.max_attempts == 0 {
                return Err(invalid(at("max_attempts"), "must be at least 1"));
            }
            if model.timeout.is_zero() {
                return Err(invalid(at("timeout"), "must be longer than 0s"));
            }
            validate_listing(name, model)?;
        }
        Ok(())
    }
}

/// Checks one backend table's own settings; `at` names a setting of it for messages.
fn validate_backend(
    name: &str,
    backend: &BackendConfig,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    match backend {
        BackendConfig::Builtin { .. } | BackendConfig::Worker {} => {}
        BackendConfig::Command { command, .. } => {
            if command.is_empty() || command[0].is_empty() {
                return Err(invalid(
                    at("command"),
                    "must name a program, e.g. command = [\"python3\", \"model.py\"]",
                ));
            }
        }
        BackendConfig::Http(http) => {
            let parsed = url::Url::parse(&http.url).map_err(|e| {
                invalid(
                    at("url"),
                    format!("{:?} is not an absolute URL ({e})", http.url),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(at("url"), "must start with http:// or https://"));
            }
            let pointers = http
                .url_pointers
                .iter()
                .map(|p| ("url_pointers", p))
                .chain(http.base64_pointers.iter().map(|p| ("base64_pointers", p)));
            for (key, pointer) in pointers {
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    return Err(invalid(
                        at(key),
                        format!("{pointer:?} is not a JSON pointer; they start with '/', e.g. \"/images/0\""),
                    ));
                }
            }
            if http.response == HttpResponseKind::Json
                && http.url_pointers.is_empty()
                && http.base64_pointers.is_empty()
            {
                return Err(invalid(
                    at("response"),
                    "response = \"json\" needs url_pointers or base64_pointers",
                ));
            }
            for (k, v) in &http.headers {
                if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(v).is_err()
                {
                    return Err(invalid(
                        at("headers"),
                        format!("header {k:?} is not a valid HTTP header"),
                    ));
                }
            }
        }
        BackendConfig::Routes { routes } => validate_routes(name, routes)?,
        BackendConfig::Apixo(apixo) => apixo.validate(name)?,
        BackendConfig::Replicate(r) => {
            match (&r.model, &r.version) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        at("model"),
                        "a replicate model names exactly one of model = \"owner/name\" or version = \"VERSION_ID\"",
                    ))
                }
                (Some(m), None) if !owner_slash_name(m, 2) || m.split('/').count() != 2 => {
                    return Err(invalid(
                        at("model"),
                        format!("{m:?} is not owner/name, e.g. \"black-forest-labs/flux-schnell\""),
                    ))
                }
                (None, Some(v)) if v.trim().is_empty() => {
                    return Err(invalid(at("version"), "is empty"))
                }
                _ => {}
            }
            r.upstream.validate(at, defaults::REPLICATE_KEY_ENV)?;
        }
        BackendConfig::Fal(f) => {
            if !owner_slash_name(&f.model, 2) {
                return Err(invalid(
                    at("model"),
                    format!(
                        "{:?} is not a fal endpoint id, e.g. \"fal-ai/flux/dev\"",
                        f.model
                    ),
                ));
            }
            f.upstream.validate(at, defaults::FAL_KEY_ENV)?;
        }
    }
    Ok(())
}

/// Checks a routed model's routes: each a backend that runs here, with its own limits, and
/// names unique within the model (they are what statusTask and metrics show).
fn validate_routes(name: &str, routes: &[RouteConfig]) -> Result<(), ConfigError> {
    if routes.is_empty() {
        return Err(invalid(
            format!("models.{name}.routes"),
            "must list at least one route",
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        let at = |k: &str| format!("models.{name}.routes[{i}].{k}");
        let route_name = route.name_at(i);
        if !valid_model_name(&route_name) {
            return Err(invalid(
                at("name"),
                "route names use only lowercase letters, digits, '-', '_' and '.', at most 128 characters",
            ));
        }
        if !names.insert(route_name.clone()) {
            return Err(invalid(
                at("name"),
                format!("{route_name:?} names two routes of the model; give each its own name"),
            ));
        }
        if matches!(
            route.backend,
            BackendConfig::Worker {} | BackendConfig::Routes { .. }
        ) {
            return Err(invalid(
                at("backend"),
                "a route runs here: it cannot be a pull-worker backend or routes of its own",
            ));
        }
        if route.concurrency == 0 {
            return Err(invalid(at("concurrency"), "must be at least 1"));
        }
        if route.timeout.is_zero() {
            return Err(invalid(at("timeout"), "must be longer than 0s"));
        }
        if route.breaker_failures == 0 {
            return Err(invalid(at("breaker_failures"), "must be at least 1"));
        }
        if route.breaker_cooldown.is_zero() {
            return Err(invalid(at("breaker_cooldown"), "must be longer than 0s"));
        }
        validate_backend(name, &route.backend, &at)?;
    }
    Ok(())
}

/// Checks what a model tells clients (`poll_interval`, `modes`). Its `input_schema` is compiled
/// (and so checked) once, when the server builds the model.
fn validate_listing(name: &str, model: &ModelConfig) -> Result<(), ConfigError> {
    if model.poll_interval.is_some_and(|d| d.is_zero()) {
        return Err(invalid(
            format!("models.{name}.poll_interval"),
            "must be longer than 0s",
        ));
    }
    if let Some(modes) = &model.modes {
        if modes.is_empty() || modes.iter().any(|m| m.trim().is_empty()) {
            return Err(invalid(
                format!("models.{name}.modes"),
                "must list at least one mode, none empty, e.g. modes = [\"async\", \"callback\"]",
            ));
        }
    }
    Ok(())
}

/// Checks the S3 settings; names them as the flags do (`s3_bucket` is `--s3-bucket`).
fn validate_s3(s3: &S3Config, result_url_ttl: Duration) -> Result<(), ConfigError> {
    // Bucket rules vary between S3-compatible servers; refuse only what no server accepts.
    if s3.bucket.is_empty()
        || s3
            .bucket
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "s3_bucket",
            format!(
                "{:?} is not a bucket name; example: --s3-bucket taskgate-results",
                s3.bucket
            ),
        ));
    }
    if let Some(endpoint) = &s3.endpoint {
        let parsed = url::Url::parse(endpoint).map_err(|e| {
            invalid(
                "s3_endpoint",
                format!(
                    "{endpoint:?} is not an absolute URL ({e}); example: http://127.0.0.1:9000"
                ),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(
                "s3_endpoint",
                "must start with http:// or https://",
            ));
        }
    }
    if s3.region.trim().is_empty() {
        return Err(invalid(
            "s3_region",
            format!(
                "must not be empty; example: --s3-region {}",
                defaults::S3_REGION
            ),
        ));
    }
    if let Some(prefix) = &s3.prefix {
        if object_store::path::Path::parse(prefix.trim_matches('/')).is_err() {
            return Err(invalid(
                "s3_prefix",
                format!("{prefix:?} is not a key prefix: use segments like results/prod, without empty, '.' or '..' parts"),
            ));
        }
    }
    if result_url_ttl > S3_MAX_URL_TTL {
        return Err(invalid(
            "result_url_ttl",
            "S3 presigned URLs last at most 7 days; with s3_bucket set, use 7d or less",
        ));
    }
    if let Some(c) = &s3.credentials {
        if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
            return Err(invalid(
                "AWS_ACCESS_KEY_ID",
                "S3 credentials need both an access key id and a secret access key",
            ));
        }
    }
    Ok(())
}

/// A database URL without its password, for logs and messages.
///
/// ```
/// use taskgate_server::config::redact_url;
/// let shown = redact_url("postgres://u:hunter2@db/tg?sslmode=require&password=hunter3");
/// assert!(!shown.contains("hunter"), "{shown}");
/// assert!(shown.contains("sslmode=require"), "{shown}");
/// ```
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("REDACTED"));
            }
            // sqlx also takes the password from the query (`?password=`, `sslpassword=`).
            if u.query().is_some() {
                let kept: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = k.eq_ignore_ascii_case("password")
                            || k.eq_ignore_ascii_case("sslpassword");
                        let v = if secret {
                            "REDACTED".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(kept);
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// Model names appear in URL paths and file names, so they are kept to a safe alphabet.
///
/// ```
/// use taskgate_server::config::valid_model_name;
///
/// assert!(valid_model_name("flux-2"));
/// assert!(!valid_model_name("../etc"));
/// assert!(!valid_model_name("Flux"));
/// assert!(!valid_model_name(".."));
/// ```
pub fn valid_model_name(name: &str) -> bool {
    // A name of dots alone would be `.` or `..` as a path segment.
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= 128
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_routed_model_takes_its_routes_sums_and_default_route_names_unless_set() {
        let f = FileConfig::parse(
            r#"
            [models.sum]
            routes = [
                { backend = "http", url = "http://127.0.0.1:1/", concurrency = 2, timeout = "60s" },
                { name = "cloud", backend = "builtin", builtin = "echo", timeout = "30s" },
            ]
            [models.set]
            concurrency = 1
            timeout = "5s"
            [[models.set.routes]]
            backend = "builtin"
            builtin = "echo"
            "#,
        )
        .unwrap();
        let models = f.models.unwrap();
        let sum = &models["sum"];
        assert_eq!(sum.concurrency, 2 + defaults::MODEL_CONCURRENCY);
        assert_eq!(sum.timeout, Duration::from_secs(90));
        let BackendConfig::Routes { routes } = &sum.backend else {
            panic!("not routed: {:?}", sum.backend);
        };
        let names: Vec<String> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| r.name_at(i))
            .collect();
        assert_eq!(names, ["http-1", "cloud"]);
        assert_eq!(routes[0].breaker_failures, defaults::ROUTE_BREAKER_FAILURES);
        assert_eq!(routes[1].breaker_cooldown, defaults::ROUTE_BREAKER_COOLDOWN);
        let set = &models["set"];
        assert_eq!((set.concurrency, set.timeout), (1, Duration::from_secs(5)));
    }

    #[test]
    fn a_model_table_parses_with_defaults() {
        let f = FileConfig::parse(
            r#"
            [models.sd]
            backend = "command"
            command = ["python3", "sd.py"]
            timeout = "90s"
            "#,
        )
        .unwrap();
        let m = &f.models.unwrap()["sd"];
        assert_eq!(m.timeout, Duration::from_secs(90));
        assert_eq!(m.concurrency, 4);
        assert!(matches!(m.backend, BackendConfig::Command { .. }));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = FileConfig::parse("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn a_misspelt_model_key_is_an_error_naming_it() {
        let err = FileConfig::parse(
            "[models.x]\nbackend = \"command\"\ncommand = [\"a\"]\nconcurency = 2\n",
        )
        .unwrap_err();
        assert!(
            err.contains("concurency") && err.contains("[models.x]"),
            "{err}"
        );
    }

    #[test]
    fn a_storage_table_parses_and_a_typo_in_it_is_named() {
        let f =
            FileConfig::parse("[storage]\ns3_bucket = \"b\"\ns3_region = \"eu-west-1\"\n").unwrap();
        assert_eq!(f.storage.s3_bucket.as_deref(), Some("b"));
        let err = FileConfig::parse("[storage]\ns3_bukket = \"b\"\n").unwrap_err();
        assert!(err.contains("s3_bukket"), "{err}");
    }

    #[test]
    fn bad_provider_tables_are_refused_with_the_setting_named_and_keys_are_never_printed() {
        let check = |table: &str, expected: &str| {
            let mut c = Config::new("/tmp/x");
            c.models = FileConfig::parse(&format!("[models.m]\n{table}"))
                .unwrap_or_else(|e| panic!("{e}"))
                .models
                .unwrap();
            let err = c.validate().map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(expected), "{table}: {err}");
        };
        let key = "api_key = \"r8_secret\"\n";
        check(
            &format!("backend = \"replicate\"\n{key}"),
            "models.m.model: a replicate model names exactly one of",
        );
        check(
            &format!("backend = \"replicate\"\nmodel = \"a/b\"\nversion = \"v\"\n{key}"),
            "models.m.model",
        );
        check(
            &format!("backend = \"replicate\"\nmodel = \"flux\"\n{key}"),
            "\"flux\" is not owner/name",
        );
        check(
            &format!("backend = \"fal\"\nmodel = \"fal-ai/../x\"\n{key}"),
            "models.m.model",
        );
        check(
            &format!("backend = \"fal\"\nmodel = \"fal-ai/x\"\nurl = \"queue.fal.run\"\n{key}"),
            "models.m.url",
        );
        check(
            &format!("backend = \"fal\"\nmodel = \"fal-ai/x\"\nmax_output_bytes = 0\n{key}"),
            "models.m.max_output_bytes",
        );
        check(
            "backend = \"fal\"\nmodel = \"fal-ai/x\"\napi_key_env = \"TASKGATE_TEST_NEVER_SET_KEY\"\n",
            "models.m.api_key_env: the environment variable TASKGATE_TEST_NEVER_SET_KEY (the API key) is not set",
        );
        let err =
            FileConfig::parse("[models.m]\nbackend = \"fal\"\nmodel = \"a/b\"\nversion = \"v\"\n")
                .unwrap_err();
        assert!(err.contains("unknown key \"version\""), "{err}");

        let ok = FileConfig::parse(&format!(
            "[models.m]\nbackend = \"fal\"\nmodel = \"fal-ai/flux/dev\"\n{key}"
        ))
        .unwrap();
        let mut c = Config::new("/tmp/x");
        c.models = ok.models.unwrap();
        c.validate().unwrap();
        let shown = format!("{:?}", c.models["m"]);
        assert!(
            !shown.contains("r8_secret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn bad_s3_settings_are_refused_with_the_setting_named() {
        let check = |tweak: &dyn Fn(&mut S3Config), ttl: Duration, setting: &str| {
            let mut s3 = S3Config::new("results");
            tweak(&mut s3);
            let mut c = Config::new("/tmp/x");
            c.server.result_url_ttl = ttl;
            c.artifacts = ArtifactsConfig::S3(s3);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{err}");
        };
        let day = Duration::from_secs(24 * 3600);
        check(&|s| s.bucket = String::new(), day, "s3_bucket");
        check(
            &|s| s.endpoint = Some("localhost:9000".into()),
            day,
            "s3_endpoint",
        );
        check(&|s| s.endpoint = Some("ftp://x".into()), day, "s3_endpoint");
        check(&|s| s.region = " ".into(), day, "s3_region");
        check(&|s| s.prefix = Some("a//b".into()), day, "s3_prefix");
        check(&|s| s.prefix = Some("a/../b".into()), day, "s3_prefix");
        check(&|_| {}, 8 * day, "result_url_ttl");
        let mut ok = Config::new("/tmp/x");
        ok.artifacts = ArtifactsConfig::S3(S3Config {
            endpoint: Some("http://127.0.0.1:9000".into()),
            prefix: Some("/results/prod/".into()),
            ..S3Config::new("results")
        });
        ok.validate().unwrap();
    }

    #[test]
    fn s3_credentials_are_redacted_in_debug_output() {
        let mut c = Config::new("/tmp/x");
        c.artifacts = ArtifactsConfig::S3(S3Config {
            credentials: Some(S3Credentials {
                access_key_id: "AKIAEXAMPLE".into(),
                secret_access_key: "very-secret".into(),
            }),
            ..S3Config::new("results")
        });
        let shown = format!("{c:?}");
        assert!(
            shown.contains("AKIAEXAMPLE") && !shown.contains("very-secret"),
            "{shown}"
        );
    }

    #[test]
    fn an_empty_command_is_refused_with_the_setting_named() {
        let mut c = Config::new("/tmp/x");
        c.models.insert(
            "bad".into(),
            ModelConfig::new(BackendConfig::Command {
                command: vec![],
                env: BTreeMap::new(),
                working_dir: None,
            }),
        );
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("models.bad.command"), "{err}");
    }

    #[test]
    fn the_listing_keys_parse_and_default_by_kind() {
        let f = FileConfig::parse(
            r#"
            [models.sdxl]
            backend = "worker"
            poll_interval = "15s"
            modes = ["async", "callback", "text-to-image"]
            description = "Stable Diffusion XL"
            input_schema = { type = "object", required = ["prompt"] }

            [models.upscale]
            backend = "command"
            command = ["up"]
            input_schema = "schemas/upscale.json"

            [models.echo]
            backend = "builtin"
            builtin = "echo"
            "#,
        )
        .unwrap();
        let models = f.models.unwrap();
        let sdxl = &models["sdxl"];
        assert_eq!(sdxl.recommended_poll_interval(), Duration::from_secs(15));
        assert_eq!(
            sdxl.listed_modes(),
            vec!["async", "callback", "text-to-image"]
        );
        assert_eq!(sdxl.description.as_deref(), Some("Stable Diffusion XL"));
        let Some(SchemaSource::Inline(schema)) = &sdxl.input_schema else {
            panic!("{:?}", sdxl.input_schema)
        };
        assert_eq!(schema["required"], serde_json::json!(["prompt"]));
        assert_eq!(
            models["upscale"].input_schema,
            Some(SchemaSource::File("schemas/upscale.json".into()))
        );
        assert_eq!(
            models["upscale"].recommended_poll_interval(),
            defaults::MODEL_POLL_INTERVAL
        );
        let echo = &models["echo"];
        assert_eq!(
            echo.recommended_poll_interval(),
            defaults::BUILTIN_POLL_INTERVAL
        );
        assert_eq!(echo.listed_modes(), vec!["async", "callback"]);
        assert_eq!(
            (echo.input_schema.as_ref(), echo.description.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn the_example_config_parses_and_its_schemas_compile() {
        let text = include_str!("../../../../examples/taskgate.toml");
        let models = FileConfig::parse(text).unwrap().models.unwrap();
        let sd = &models["sd-webui"];
        assert_eq!(sd.recommended_poll_interval(), Duration::from_secs(5));
        let schema = InputSchema::load(sd.input_schema.as_ref().unwrap()).unwrap();
        let refused = schema
            .check(&serde_json::json!({"width": 100}))
            .unwrap_err();
        assert_eq!((refused.shown.len(), refused.more), (2, false), "{refused}");
    }

    #[test]
    fn the_gateway_example_parses_into_three_routes_and_a_weight() {
        let text = include_str!("../../../../examples/gateway.toml");
        let file = FileConfig::parse(text).unwrap();
        let flux = &file.models.unwrap()["flux"];
        let BackendConfig::Routes { routes } = &flux.backend else {
            panic!("flux should be routed: {:?}", flux.backend);
        };
        let names: Vec<String> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| r.name_at(i))
            .collect();
        assert_eq!(names, ["local", "fal", "replicate"]);
        assert!(matches!(routes[1].backend, BackendConfig::Fal(_)));
        assert!(matches!(routes[2].backend, BackendConfig::Replicate(_)));
        assert_eq!(flux.concurrency, 18, "the sum of the routes'");
        assert_eq!(file.tenants["acme"].weight, 3);
    }

    #[test]
    fn a_schema_path_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskgate.toml");
        std::fs::write(
            &path,
            "[models.a]\nbackend = \"worker\"\ninput_schema = \"s/a.json\"\n\
             [models.b]\nbackend = \"worker\"\ninput_schema = \"/abs/b.json\"\n",
        )
        .unwrap();
        let models = FileConfig::load(&path).unwrap().models.unwrap();
        assert_eq!(
            models["a"].input_schema,
            Some(SchemaSource::File(dir.path().join("s/a.json")))
        );
        assert_eq!(
            models["b"].input_schema,
            Some(SchemaSource::File("/abs/b.json".into()))
        );
    }

    #[test]
    fn a_schema_that_is_neither_table_nor_path_is_refused_saying_what_it_takes() {
        let err =
            FileConfig::parse("[models.a]\nbackend = \"worker\"\ninput_schema = 3\n").unwrap_err();
        assert!(err.contains("the path of a JSON Schema file"), "{err}");
    }

    #[test]
    fn bad_listing_settings_are_refused_with_the_setting_named() {
        for (toml, setting) in [
            ("poll_interval = \"0s\"", "models.m.poll_interval"),
            ("modes = []", "models.m.modes"),
            ("modes = [\"async\", \" \"]", "models.m.modes"),
        ] {
            let f =
                FileConfig::parse(&format!("[models.m]\nbackend = \"worker\"\n{toml}\n")).unwrap();
            let mut c = Config::new("/tmp/x");
            c.models = f.models.unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{toml}: {err}");
        }
    }

    #[test]
    fn tenant_weights_parse_and_a_bad_one_is_refused_with_the_setting_named() {
        let f = FileConfig::parse("[tenants.acme]\nweight = 3\n[tenants.other]\n").unwrap();
        let mut c = Config::new("/tmp/x");
        c.tenants = f.tenants;
        c.validate().unwrap();
        let weights = c.tenant_weights();
        assert_eq!(weights.weight(Some("acme")), 3);
        assert_eq!(weights.weight(Some("other")), 1);
        assert_eq!(weights.weight(Some("not-yet-created")), 1);
        for toml in ["weight = 0", "weight = 1001"] {
            let f = FileConfig::parse(&format!("[tenants.acme]\n{toml}\n")).unwrap();
            c.tenants = f.tenants;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("tenants.acme.weight"), "{toml}: {err}");
        }
        let typo = FileConfig::parse("[tenants.acme]\nwieght = 3\n").unwrap_err();
        assert!(typo.contains("wieght"), "{typo}");
    }
}
