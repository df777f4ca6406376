//! Backends run one attempt of a task. Dispatch gives each attempt an empty output directory;
//! every file the backend leaves there becomes a result. In-process backends whose results are
//! small hand them back in memory instead ([`Produced::InMemory`]) and get no directory: a
//! no-op task then touches no file system at all. Later kinds (pull workers, upstream
//! providers) implement the same trait and need no change to dispatch.

mod apixo;
mod builtin;
mod command;
pub mod download;
pub(crate) mod fal;
mod http;
mod process_tree;
pub mod progress;
pub(crate) mod replicate;
pub mod routes;
mod upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::config::{BackendConfig, ConfigError, InputSchema, ModelConfig};
use crate::metrics::Metrics;

pub use apixo::ApixoBackend;
pub use builtin::{DemoImage, Echo};
pub use command::CommandBackend;
pub use http::HttpBackend;
pub use progress::Progress;

/// One attempt of one task.
#[derive(Debug, Clone)]
pub struct Job {
    pub task_id: String,
    pub model: String,
    pub input: Map<String, Value>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Empty at start; what is in it at the end is the result. `None` for backends that
    /// produce in memory (`Backend::needs_output_dir` false).
    pub output_dir: Option<PathBuf>,
    /// Where the attempt reports progress and log lines while it runs (never blocks).
    pub progress: Progress,
    /// Which route of a routed model ran the attempt; untouched for other models.
    pub route: ServedBy,
}

/// The route a routed model's attempt ran on (the last one tried, when all failed), written by
/// the routed backend and read by dispatch for the final state. Other backends leave it empty,
/// and an empty one costs nothing (no allocation).
#[derive(Debug, Default)]
pub struct ServedBy(Mutex<Option<Arc<str>>>);

impl ServedBy {
    pub fn set(&self, route: &Arc<str>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(route.clone());
    }

    pub fn get(&self) -> Option<Arc<str>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Clone for ServedBy {
    fn clone(&self) -> Self {
        ServedBy(Mutex::new(self.get()))
    }
}

impl Job {
    /// The output directory, for backends that write files.
    pub fn dir(&self) -> Result<&Path, BackendError> {
        self.output_dir.as_deref().ok_or_else(|| {
            BackendError::fatal(
                crate::domain::fail_code::INTERNAL_ERROR,
                "this backend writes files but the attempt has no output directory",
            )
        })
    }
}

/// What an attempt produced.
#[derive(Debug)]
pub enum Produced {
    /// The files the backend left in the job's output directory.
    Files,
    /// The files in this directory instead, one the backend made inside the job's output
    /// directory (a routed model's try after a failover: the failed route's files, or a writer
    /// it left behind, stay outside it).
    FilesIn(PathBuf),
    /// The outputs themselves, by name, held in memory (no file was written).
    InMemory(Vec<(String, Vec<u8>)>),
}

/// How an attempt failed: retryable errors run again while attempts remain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("{message}")]
    Retryable { code: String, message: String },
    #[error("{message}")]
    Fatal { code: String, message: String },
}

impl BackendError {
    /// The failCode, whichever kind.
    pub fn code(&self) -> &str {
        match self {
            BackendError::Retryable { code, .. } | BackendError::Fatal { code, .. } => code,
        }
    }

    /// An attempt that reported success but left no output file: a model that produced nothing
    /// is treated as broken, wherever it ran.
    pub fn no_output() -> Self {
        BackendError::fatal(
            crate::domain::fail_code::GENERATION_FAILED,
            "the model finished without producing any output file",
        )
    }

    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        BackendError::Fatal {
            code: code.to_owned(),
            message: message.into(),
        }
    }
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        BackendError::Retryable {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Checks an input at submit time, so that a bad one gets a 400 instead of a failed task.
    /// The message names the field and what it takes.
    fn validate(&self, _input: &Map<String, Value>) -> Result<(), String> {
        Ok(())
    }

    /// Runs one attempt. Dropping the future must stop the work (the dispatcher does so on
    /// timeout and at shutdown).
    async fn run(&self, job: &Job) -> Result<Produced, BackendError>;

    /// Whether attempts need an output directory. False for backends that always answer
    /// [`Produced::InMemory`]: the dispatcher then makes none.
    fn needs_output_dir(&self) -> bool {
        true
    }

    /// Whether every write of an attempt has finished once `run` has returned (not been
    /// dropped). True for backends that write only from this process and await every write;
    /// false for ones that start other programs, whose descendants might still write. The
    /// dispatcher reuses an attempt's directory only when this holds and `run` returned.
    fn writes_end_with_run(&self) -> bool {
        true
    }

    /// False for backends whose attempts run elsewhere (pull workers claim them): the
    /// dispatcher then runs no loop for the model.
    fn runs_locally(&self) -> bool {
        true
    }

    /// Whether the backend may report progress or log lines through its job's `Progress`
    /// handle. Those that never do (the builtins) get no report task beside each attempt: a
    /// spawned task and its join per attempt cost a no-op drain about a sixth of its rate.
    fn reports(&self) -> bool {
        true
    }
}

/// `worker`: attempts run on remote pull workers, which claim them through the worker API.
pub struct PullWorkers;

#[async_trait]
impl Backend for PullWorkers {
    async fn run(&self, _job: &Job) -> Result<Produced, BackendError> {
        Err(BackendError::fatal(
            crate::domain::fail_code::MODEL_UNAVAILABLE,
            "this model is served by pull workers, not by the server itself",
        ))
    }

    fn runs_locally(&self) -> bool {
        false
    }
}

/// Builds the backend model `name`'s configuration names (a routed model's routes get their
/// metric handles from `metrics`).
pub fn build(
    name: &str,
    model: &ModelConfig,
    http: &reqwest::Client,
    metrics: &Metrics,
) -> Arc<dyn Backend> {
    match &model.backend {
        BackendConfig::Routes { routes: list } => Arc::new(routes::Routed::new(
            list.iter()
                .enumerate()
                .map(|(i, route)| {
                    let route_name = route.name_at(i);
                    let handles = metrics.route_handles(name, &route_name);
                    let backend = build(name, &route.as_model(), http, metrics);
                    routes::Route::new(route_name, route, backend, handles)
                })
                .collect(),
            model.timeout,
        )),
        BackendConfig::Builtin { builtin } => match builtin {
            crate::config::BuiltinKind::Echo => Arc::new(Echo),
            crate::config::BuiltinKind::DemoImage => Arc::new(DemoImage),
        },
        BackendConfig::Command {
            command,
            env,
            working_dir,
        } => Arc::new(CommandBackend::new(
            command.clone(),
            env.clone(),
            working_dir.clone(),
        )),
        BackendConfig::Worker {} => Arc::new(PullWorkers),
        BackendConfig::Http(cfg) => {
            Arc::new(HttpBackend::new(cfg.clone(), http.clone(), model.timeout))
        }
        BackendConfig::Apixo(cfg) => Arc::new(ApixoBackend::new(cfg, http.clone(), model.timeout)),
        BackendConfig::Replicate(cfg) => Arc::new(replicate::ReplicateBackend::new(
            cfg.clone(),
            http.clone(),
            model.timeout,
        )),
        BackendConfig::Fal(cfg) => Arc::new(fal::FalBackend::new(
            cfg.clone(),
            http.clone(),
            model.timeout,
        )),
    }
}

/// The JSON Schema of a backend kind's input, for a model whose table names none: the builtins
/// know theirs; what other backends take is up to the model behind them.
pub fn default_input_schema(backend: &BackendConfig) -> Option<Value> {
    match backend {
        BackendConfig::Builtin { builtin } => Some(match builtin {
            crate::config::BuiltinKind::Echo => builtin::echo_schema(),
            crate::config::BuiltinKind::DemoImage => builtin::demo_image_schema(),
        }),
        _ => None,
    }
}

/// Compiles each model's input schema (its `input_schema`, else its backend's own), once per
/// start and before anything is opened: a schema that does not compile stops the start with a
/// message naming the model. Models without a schema are absent.
pub fn input_schemas(
    models: &BTreeMap<String, ModelConfig>,
) -> Result<BTreeMap<String, Arc<InputSchema>>, ConfigError> {
    let mut schemas = BTreeMap::new();
    for (name, model) in models {
        let compiled = match &model.input_schema {
            Some(source) => Some(InputSchema::load(source)),
            None => default_input_schema(&model.backend).map(InputSchema::compile),
        };
        if let Some(compiled) = compiled {
            let schema = compiled.map_err(|e| ConfigError::Invalid {
                setting: format!("models.{name}.input_schema"),
                message: e.to_string(),
            })?;
            schemas.insert(name.clone(), Arc::new(schema));
        }
    }
    Ok(schemas)
}

/// Reads an optional non-negative integer field, for validation messages that name it.
fn optional_u64(input: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match input.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("input.{field} must be a non-negative integer, got {v}")),
    }
}

/// Shortest useful form of a duration for messages: `90s`, `10m`.
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
