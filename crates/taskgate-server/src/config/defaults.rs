//! Every default of the server's settings, in one place. `--help` shows these (the binary reads
//! them through `Layers::default_texts`), and docs/configuration.md states them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::settings::{Delays, LimitSettings, ServerSettings, StorageSettings, WebhookSettings};

pub fn server() -> ServerSettings {
    ServerSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        data_dir: PathBuf::from("./data"),
        max_body_bytes: 10 * 1024 * 1024,
        max_upload_bytes: 4 * 1024 * 1024 * 1024,
        retry_backoff: Delays(secs(&[1, 5, 30])),
        // Renewed every third of it: a dead node's tasks move on within this.
        lease: Duration::from_secs(30),
        result_url_ttl: Duration::from_secs(24 * 3600),
        shutdown_grace: Duration::from_secs(30),
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        // Below the usual 65,536 open files, so that the limit, not the kernel, says no.
        max_connections: 10_000,
        // As long as result URLs stay valid: after that nobody can fetch them anyway.
        file_retention: Duration::from_secs(24 * 3600),
        record_retention: Duration::from_secs(30 * 24 * 3600),
        database_url: None,
        public_url: None,
        metrics_token: None,
    }
}

pub fn webhooks() -> WebhookSettings {
    WebhookSettings {
        // About a day: 23h 42m 30s in all.
        retry_delays: Delays(secs(&[
            30,
            120,
            600,
            1800,
            3600,
            3 * 3600,
            6 * 3600,
            12 * 3600,
        ])),
        timeout: Duration::from_secs(30),
        secret_overlap: Duration::from_secs(24 * 3600),
        allow_private_callbacks: false,
        max_in_flight: 64,
        max_per_host: 8,
        breaker_threshold: 5,
        breaker_cooldown: Duration::from_secs(30),
    }
}

/// APIXO's per-key limits.
pub fn limits() -> LimitSettings {
    LimitSettings {
        requests_per_minute: 10_000,
        concurrent_tasks: 1000,
    }
}

pub fn storage() -> StorageSettings {
    StorageSettings {
        s3_region: S3_REGION.to_owned(),
        s3_bucket: None,
        s3_endpoint: None,
        s3_prefix: None,
    }
}

/// A model table's `concurrency`.
pub const MODEL_CONCURRENCY: usize = 4;
/// A model table's `timeout`.
pub const MODEL_TIMEOUT: Duration = Duration::from_secs(600);
/// A model table's `max_attempts`.
pub const MODEL_MAX_ATTEMPTS: u32 = 3;
/// A model table's `poll_interval`: APIXO's recommended poll interval for fast image models
/// (its docs: 3 s for images, 5 s quality images, 10 s audio, 15 s video; set those per model).
pub const MODEL_POLL_INTERVAL: Duration = Duration::from_secs(3);
/// `poll_interval` of a builtin model, which answers within milliseconds.
pub const BUILTIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A model table's `modes`: APIXO's two request types, which every model takes.
pub const MODEL_MODES: &[&str] = &["async", "callback"];
/// A route's `breaker_failures`: consecutive retryable failures that open its circuit breaker.
pub const ROUTE_BREAKER_FAILURES: u32 = 5;
/// A route's `breaker_cooldown`: how long an open breaker refuses before one probe may pass.
pub const ROUTE_BREAKER_COOLDOWN: Duration = Duration::from_secs(30);

fn secs(list: &[u64]) -> Vec<Duration> {
    list.iter().copied().map(Duration::from_secs).collect()
}

/// The `[storage]` table's `s3_region`, also where an `S3Config` is made in code.
pub const S3_REGION: &str = "us-east-1";

/// Where a `replicate` model's key is read from when its table names no variable (Replicate's
/// own clients' name).
pub const REPLICATE_KEY_ENV: &str = "REPLICATE_API_TOKEN";
/// Where a `fal` model's key is read from when its table names no variable (fal's own clients'
/// name).
pub const FAL_KEY_ENV: &str = "FAL_KEY";
