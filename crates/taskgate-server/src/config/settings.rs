//! The server's settings tables, each declared once.
//!
//! A table (`[server]`, `[webhooks]`, `[storage]`) is one list of fields given to
//! [`settings_table!`], which makes two types of it:
//! - the **layer** (`ServerLayer`, …): every field optional. The same type is the table of the
//!   TOML file (serde) and the flags with their `TASKGATE_*` variables (clap, which also puts
//!   the variable in `--help`), so a setting can be given in every place at once.
//! - the **settings** (`ServerSettings`, …): every field resolved, what the server reads.
//!
//! Layers stack with [`or`](ServerLayer::or) (`flags.or(file)`; clap has already put the flag
//! over its variable) and end in [`resolve`](ServerLayer::resolve) over the defaults, which all
//! live in `config::defaults`. [`layered`] does it for the whole configuration. Adding a setting
//! is one field here, its default there, and its row in docs/configuration.md (a test in the
//! binary fails without the row).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{
    defaults, invalid, parse_duration_list, ArtifactsConfig, Config, ConfigError, FileConfig,
    S3Config,
};

/// Declares a settings table: the resolved type, its layer, and the layer's `or`/`resolve`.
///
/// Fields in the first list have a default in `config::defaults`; fields in `optional` have
/// none and stay `Option` once resolved. Attributes on a field (doc comment = `--help` text,
/// `#[arg]`, `#[serde]`) apply to the layer's field.
macro_rules! settings_table {
    (
        $(#[$meta:meta])*
        pub struct $name:ident / $layer:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
        }
        optional {
            $( $(#[$ometa:meta])* $ofield:ident : $oty:ty, )*
        }
    ) => {
        $(#[$meta])*
        ///
        /// Resolved: what the server reads. Each field is documented on the layer type.
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( pub $field: $ty, )*
            $( pub $ofield: Option<$oty>, )*
        }

        $(#[$meta])*
        ///
        /// One layer (the file's table, or the flags and variables): what it sets, `None` where
        /// it is silent.
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct $layer {
            $( $(#[$fmeta])* pub $field: Option<$ty>, )*
            $( $(#[$ometa])* pub $ofield: Option<$oty>, )*
        }

        impl $layer {
            /// The table's keys, as the file spells them.
            pub const KEYS: &'static [&'static str] =
                &[$( stringify!($field), )* $( stringify!($ofield), )*];

            /// What `self` sets, and what `lower` sets where `self` is silent.
            pub fn or(self, lower: Self) -> Self {
                $layer {
                    $( $field: self.$field.or(lower.$field), )*
                    $( $ofield: self.$ofield.or(lower.$ofield), )*
                }
            }

            /// Every setting, from `defaults` where no layer set it.
            pub fn resolve(self, defaults: $name) -> $name {
                $name {
                    $( $field: self.$field.unwrap_or(defaults.$field), )*
                    $( $ofield: self.$ofield.or(defaults.$ofield), )*
                }
            }

            /// Each setting's default as `--help` shows it: `(field, text)`.
            pub fn default_texts(defaults: &$name) -> Vec<(&'static str, String)> {
                #[allow(unused_mut)] // a table without optional fields
                let mut texts = vec![$( (stringify!($field), ShowDefault::show(&defaults.$field)), )*];
                $( if let Some(v) = &defaults.$ofield {
                    texts.push((stringify!($ofield), ShowDefault::show(v)));
                } )*
                texts
            }
        }
    };
}

settings_table! {
    /// `[server]`: where the server listens and keeps its data, and its limits.
    pub struct ServerSettings / ServerLayer {
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, env = "TASKGATE_LISTEN")]
        listen: SocketAddr,
        /// Directory for the database and result files.
        #[arg(long, env = "TASKGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Largest accepted request body in bytes.
        #[arg(long, env = "TASKGATE_MAX_BODY_BYTES")]
        max_body_bytes: usize,
        /// Largest output file a pull worker may upload, in bytes.
        #[arg(long, env = "TASKGATE_MAX_UPLOAD_BYTES")]
        max_upload_bytes: u64,
        /// Delays between attempts after a retryable backend error, e.g. 1s,5s,30s (the last
        /// repeats).
        #[arg(long, env = "TASKGATE_RETRY_BACKOFF")]
        retry_backoff: Delays,
        /// How long a claimed task stays with a node or worker without renewal.
        #[arg(long, env = "TASKGATE_LEASE", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        lease: Duration,
        /// How long result URLs stay valid after the task completes.
        #[arg(long, env = "TASKGATE_RESULT_URL_TTL", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        result_url_ttl: Duration,
        /// How long running tasks may finish after SIGTERM before they are left pending.
        #[arg(long, env = "TASKGATE_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        shutdown_grace: Duration,
        /// Longest a client may take to send a request's headers (also how long an idle
        /// keep-alive connection stays open).
        #[arg(long, env = "TASKGATE_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        header_timeout: Duration,
        /// Longest a client may take to send a request's body, counted from the end of its
        /// headers; an output upload only has to keep its bytes coming (no pause this long).
        #[arg(long, env = "TASKGATE_BODY_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        body_timeout: Duration,
        /// Connections open at once; more wait until one closes.
        #[arg(long, env = "TASKGATE_MAX_CONNECTIONS")]
        max_connections: usize,
        /// How long a finished task's result files are kept after it completes (0 keeps them
        /// until the record goes).
        #[arg(long, env = "TASKGATE_FILE_RETENTION", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        file_retention: Duration,
        /// How long a finished task's record is kept after it completes; then statusTask
        /// answers 404 (0 keeps records forever).
        #[arg(long, env = "TASKGATE_RECORD_RETENTION", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        record_retention: Duration,
    }
    optional {
        /// PostgreSQL URL (postgres://…) for a cluster of nodes; without it, SQLite in the data
        /// dir.
        #[arg(long, env = "TASKGATE_DATABASE_URL", hide_env_values = true)]
        database_url: DatabaseUrl,
        /// Base of result URLs, as clients reach this server [default: the listen address].
        #[arg(long, env = "TASKGATE_PUBLIC_URL")]
        public_url: String,
        /// Bearer token that GET /metrics requires (16+ characters) [default: none, /metrics
        /// is open: do not expose it publicly].
        #[arg(long, env = "TASKGATE_METRICS_TOKEN", hide_env_values = true)]
        metrics_token: MetricsToken,
    }
}

settings_table! {
    /// `[webhooks]`: callback delivery.
    pub struct WebhookSettings / WebhookLayer {
        /// Delays between callback retries, e.g. 30s,2m,10m; after the last, the delivery is
        /// marked failed.
        #[arg(long = "webhook-retry-delays", env = "TASKGATE_WEBHOOK_RETRY_DELAYS")]
        retry_delays: Delays,
        /// How long a callback receiver may take to answer.
        #[arg(long = "webhook-timeout", env = "TASKGATE_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        timeout: Duration,
        /// How long the previous webhook secret keeps signing after a rotation.
        #[arg(long = "webhook-secret-overlap", env = "TASKGATE_WEBHOOK_SECRET_OVERLAP", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        secret_overlap: Duration,
        /// Let callback URLs reach loopback and private addresses (local development only).
        #[arg(long, env = "TASKGATE_ALLOW_PRIVATE_CALLBACKS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
        allow_private_callbacks: bool,
        /// Callback deliveries in flight at once, over all receivers.
        #[arg(long = "webhook-max-in-flight", env = "TASKGATE_WEBHOOK_MAX_IN_FLIGHT")]
        max_in_flight: usize,
        /// Callback deliveries in flight at once from this node to one host.
        #[arg(long = "webhook-max-per-host", env = "TASKGATE_WEBHOOK_MAX_PER_HOST")]
        max_per_host: usize,
        /// Consecutive failures of a callback host that open its circuit.
        #[arg(long = "webhook-breaker-threshold", env = "TASKGATE_WEBHOOK_BREAKER_THRESHOLD")]
        breaker_threshold: u32,
        /// How long an open circuit holds a host's callbacks back.
        #[arg(long = "webhook-breaker-cooldown", env = "TASKGATE_WEBHOOK_BREAKER_COOLDOWN", value_parser = humantime::parse_duration)]
        #[serde(default, with = "humantime_serde::option")]
        breaker_cooldown: Duration,
    }
    optional {}
}

settings_table! {
    /// `[limits]`: each client key's limits, unless the key sets its own (`taskgate keys`).
    pub struct LimitSettings / LimitLayer {
        /// Requests a key may make per minute, over every node (0: unlimited).
        #[arg(long = "key-requests-per-minute", env = "TASKGATE_KEY_REQUESTS_PER_MINUTE")]
        requests_per_minute: u32,
        /// Unfinished (pending or processing) tasks a key may have at once (0: unlimited).
        #[arg(long = "key-concurrent-tasks", env = "TASKGATE_KEY_CONCURRENT_TASKS")]
        concurrent_tasks: u32,
    }
    optional {}
}

settings_table! {
    /// `[storage]`: where result files live. S3 credentials are deliberately not settable
    /// here: they come from the standard AWS environment.
    pub struct StorageSettings / StorageLayer {
        /// Region of the bucket.
        #[arg(long, env = "TASKGATE_S3_REGION")]
        s3_region: String,
    }
    optional {
        /// Keep result files in this S3 bucket (URLs become presigned S3 links) instead of the
        /// data dir. Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the
        /// usual AWS chain).
        #[arg(long, env = "TASKGATE_S3_BUCKET")]
        s3_bucket: String,
        /// Endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000 [default: AWS].
        #[arg(long, env = "TASKGATE_S3_ENDPOINT")]
        s3_endpoint: String,
        /// Prefix for every object key, e.g. results/prod.
        #[arg(long, env = "TASKGATE_S3_PREFIX")]
        s3_prefix: String,
    }
}

/// Every table's layer: the flags and variables of `serve`, or the tables of the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Layers {
    #[command(flatten)]
    pub server: ServerLayer,
    #[command(flatten)]
    pub webhooks: WebhookLayer,
    #[command(flatten)]
    pub storage: StorageLayer,
    #[command(flatten)]
    pub limits: LimitLayer,
}

impl Layers {
    /// Each setting's default as `--help` shows it, by clap argument id (the field's name).
    pub fn default_texts() -> Vec<(&'static str, String)> {
        let mut texts = ServerLayer::default_texts(&defaults::server());
        texts.extend(WebhookLayer::default_texts(&defaults::webhooks()));
        texts.extend(StorageLayer::default_texts(&defaults::storage()));
        texts.extend(LimitLayer::default_texts(&defaults::limits()));
        texts
    }
}

/// The configuration from its layers: `flags` (clap has put each flag over its variable) over
/// the file over the defaults. `api_key` is the key `serve` registers at start.
pub fn layered(
    flags: Layers,
    file: FileConfig,
    api_key: Option<&str>,
) -> Result<Config, ConfigError> {
    let server = flags.server.or(file.server).resolve(defaults::server());
    let webhooks = flags
        .webhooks
        .or(file.webhooks)
        .resolve(defaults::webhooks());
    let storage = flags.storage.or(file.storage);
    let mut config = Config::new(server.data_dir.clone());
    config.server = server;
    config.webhooks = webhooks;
    config.limits = flags.limits.or(file.limits).resolve(defaults::limits());
    if let Some(models) = file.models {
        config.models = models;
    }
    config.tenants = file.tenants;
    config.artifacts = artifacts(storage)?;
    config.bootstrap_api_key = api_key.map(str::to_owned).filter(|k| !k.trim().is_empty());
    if let Some(key) = &config.bootstrap_api_key {
        if key.len() < 16 {
            return Err(invalid(
                "api_key",
                "the API key (--api-key / TASKGATE_API_KEY) is too short to be safe: use at least 16 characters (or create keys with `taskgate keys create`)",
            ));
        }
    }
    config.validate()?;
    Ok(config)
}

/// Where result files go, from the storage table.
fn artifacts(layer: StorageLayer) -> Result<ArtifactsConfig, ConfigError> {
    let given_s3_detail =
        layer.s3_endpoint.is_some() || layer.s3_region.is_some() || layer.s3_prefix.is_some();
    let storage = layer.resolve(defaults::storage());
    match storage.s3_bucket {
        Some(bucket) => Ok(ArtifactsConfig::S3(S3Config {
            bucket,
            endpoint: storage.s3_endpoint,
            region: storage.s3_region,
            prefix: storage.s3_prefix,
            credentials: None,
        })),
        // Without a bucket the local directory is used, which would silently ignore these.
        None if given_s3_detail => Err(invalid(
            "s3_bucket",
            "s3_endpoint, s3_region and s3_prefix only apply to S3 storage; set --s3-bucket (TASKGATE_S3_BUCKET) too, or remove them",
        )),
        None => Ok(ArtifactsConfig::Local),
    }
}

/// A list of delays, `1s,5s,30s` on the command line and `["1s", "5s", "30s"]` in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delays(pub Vec<Duration>);

impl FromStr for Delays {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration_list(s).map(Delays)
    }
}

impl<'de> Deserialize<'de> for Delays {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items: Vec<String> = Vec::deserialize(d)?;
        items.join(",").parse().map_err(serde::de::Error::custom)
    }
}

/// A database URL, which may carry a password: `Debug` shows it redacted, so a settings type
/// printed whole leaks nothing.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&super::redact_url(&self.0))
    }
}

/// The bearer token of `GET /metrics`: a secret, so `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct MetricsToken(pub String);

impl MetricsToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MetricsToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(MetricsToken(s.to_owned()))
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How a default reads in `--help`: as it would be written in a flag.
pub trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_with_display {
    ($($t:ty),*) => { $( impl ShowDefault for $t {
        fn show(&self) -> String { self.to_string() }
    } )* };
}
show_with_display!(SocketAddr, String, usize, u64, u32, bool);

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl ShowDefault for DatabaseUrl {
    fn show(&self) -> String {
        super::redact_url(&self.0)
    }
}

impl ShowDefault for MetricsToken {
    fn show(&self) -> String {
        "<redacted>".to_owned()
    }
}

impl ShowDefault for Duration {
    /// Whole hours and minutes as `24h` and `2m`, as people write them (humantime alone would
    /// say `1day`).
    fn show(&self) -> String {
        let secs = self.as_secs();
        if self.subsec_nanos() == 0 && secs > 0 && secs.checked_rem(3600) == Some(0) {
            format!("{}h", secs / 3600)
        } else if self.subsec_nanos() == 0
            && secs > 0
            && secs.checked_rem(60) == Some(0)
            && secs < 3600
        {
            format!("{}m", secs / 60)
        } else {
            humantime::format_duration(*self).to_string()
        }
    }
}

impl ShowDefault for Delays {
    fn show(&self) -> String {
        self.0
            .iter()
            .map(ShowDefault::show)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_higher_layer_wins_and_the_defaults_fill_the_rest() {
        let flags = ServerLayer {
            lease: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let file = ServerLayer {
            lease: Some(Duration::from_secs(10)),
            max_upload_bytes: Some(1000),
            ..Default::default()
        };
        let s = flags.or(file).resolve(defaults::server());
        assert_eq!(s.lease, Duration::from_secs(3));
        assert_eq!(s.max_upload_bytes, 1000);
        assert_eq!(s.max_body_bytes, defaults::server().max_body_bytes);
        assert_eq!(s.database_url, None);
    }

    #[test]
    fn defaults_read_as_flags_would_be_written() {
        let texts = Layers::default_texts();
        let get = |k: &str| texts.iter().find(|(f, _)| *f == k).unwrap().1.clone();
        assert_eq!(get("listen"), "127.0.0.1:8080");
        assert_eq!(get("retry_backoff"), "1s,5s,30s");
        assert_eq!(get("lease"), "30s");
        assert!(!texts.iter().any(|(f, _)| *f == "database_url"));
    }
}
