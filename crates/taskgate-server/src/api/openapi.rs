//! The OpenAPI 3.1 document (`GET /openapi.json`) and the browsable reference on it (`/docs`).
//!
//! The document is generated from the code: the schemas from the wire types in
//! `taskgate-proto` (their `ToSchema` derives, behind its `openapi` feature), the operations from
//! the `#[utoipa::path]` attribute on each handler, and the error responses from [`ERRORS`],
//! whose codes are `ErrorCode` values (so a code's status and meaning come from the one table in
//! `taskgate-proto`). [`ApiDoc`] is the one list of operations: a route added to a router must be
//! added there too, and `it/openapi.rs` fails while one is missing (it reads every `.route(` of
//! this crate and compares it with the document served).
//!
//! The document is built once, on its first request, and served as bytes; `/docs` is Swagger
//! UI, its files embedded in the binary (`utoipa-swagger-ui` with the `vendored` and
//! `debug-embed` features), served under a Content-Security-Policy that allows nothing but this
//! origin and nothing inline.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use taskgate_proto::{
    AttemptInfo, ErrorCode, ErrorData, GenerateTaskRequest, GenerateTasksRequest, ModelCounts,
    ModelInfo, ModelList, OperatorView, RequestType, ResultJson, StateCounts, TaskCounts,
    TaskCreated, TaskList, TaskListItem, TaskLogLine, TaskState, TaskStatus, TasksCreated,
    UsageFigures, UsageGroupBy, UsageReport, UsageRow, WebhookAttempt, WebhookBacklog,
    WebhookDeliveries, WebhookDelivery, WebhookEvent, WebhookSecretData, WorkerClaimRequest,
    WorkerComplete, WorkerFail, WorkerHeartbeat, WorkerSeen, WorkerTask,
};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::error::ApiError;
use crate::state::AppState;

/// Every operation of the API. Adding a route: annotate its handler with `#[utoipa::path]`, name
/// the handler in `paths(...)` here, and give its operation id an entry in [`ERRORS`]
/// (docs/api.md, "The OpenAPI document and /docs").
#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskgate",
        description = "An APIXO-compatible API for asynchronous AI generation tasks, with \
            taskgate's extensions. Every JSON answer is the envelope `{code, message, data}`, \
            `code` repeating the HTTP status; a refusal's `data` is `{\"errorCode\": …}` \
            (`ErrorCode` lists them all, with their statuses). The guide is docs/api.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::tasks::generate_task,
        super::tasks::status_task,
        super::tasks::cancel_task,
        super::batch::generate_tasks,
        super::task_list::list_tasks,
        super::stream::stream_task,
        super::models::list_models,
        super::webhooks::webhook_secret,
        super::webhooks::rotate_webhook_secret,
        super::webhooks::list_deliveries,
        super::webhooks::retry_delivery,
        super::files::get_file,
        super::files::get_untagged_file,
        super::worker::claim,
        super::worker::heartbeat,
        super::worker::upload,
        super::worker::complete,
        super::worker::fail,
        super::operator::task_counts,
        super::operator::stream_task_counts,
        super::usage::usage,
        super::operator::operator,
        super::metrics::metrics,
        super::healthz,
        super::readyz,
        openapi_json,
    ),
    components(schemas(
        ErrorCode, ErrorData, RequestType, GenerateTaskRequest, GenerateTasksRequest, TaskCreated,
        TasksCreated, TaskState, TaskStatus, TaskLogLine, ResultJson, TaskList, TaskListItem,
        ModelInfo, ModelList, WebhookEvent, WebhookSecretData, WebhookDelivery, WebhookAttempt,
        WebhookDeliveries, WorkerClaimRequest, WorkerTask, WorkerHeartbeat, WorkerComplete,
        WorkerFail, Submitted, Health, TaskCounts, ModelCounts, StateCounts, AttemptInfo,
        OperatorView, WebhookBacklog, WorkerSeen, UsageReport, UsageRow, UsageFigures, UsageGroupBy,
    )),
    modifiers(&Security, &ErrorResponses, &EventStreams, &ParametersNotNull),
    tags(
        (name = "tasks", description = "Submit, read, follow, list and cancel tasks (APIXO's generateTask and statusTask, and taskgate's extensions)."),
        (name = "models", description = "The models a key may use."),
        (name = "webhooks", description = "The signing secret of callbacks, and each task's deliveries."),
        (name = "files", description = "Result files behind signed, expiring links (the URLs in `resultJson`); no key."),
        (name = "workers", description = "The pull-worker API: claim, heartbeat, upload, complete, fail. Worker tokens only."),
        (name = "operator", description = "taskgate's views for the dashboard: the caller's task counts (and their stream), webhook backlog and the pull workers seen."),
        (name = "operations", description = "Health, readiness, metrics and this document; no key (metrics: the metrics token, when the server has one)."),
    )
)]
pub struct ApiDoc;

/// The security schemes: client keys and worker tokens are both bearer tokens, told apart by
/// the server (a key of the wrong kind is `wrong_key_kind`).
struct Security;

pub(super) const CLIENT_KEY: &str = "apiKey";
pub(super) const WORKER_TOKEN: &str = "workerToken";
pub(super) const METRICS_TOKEN: &str = "metricsToken";

impl Modify for Security {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            CLIENT_KEY,
            bearer(
                "A tenant's client API key (`taskgate keys create`): `Authorization: Bearer tg_…`.",
            ),
        );
        components.add_security_scheme(
            WORKER_TOKEN,
            bearer("A worker token (`taskgate keys create --worker --name NAME`), for /api/v1/worker/* only."),
        );
        components.add_security_scheme(
            METRICS_TOKEN,
            bearer("The server's `--metrics-token` (`server.metrics_token`), for `GET /metrics` only; without one set, /metrics takes no credential."),
        );
    }
}

/// The refusals each operation can answer, by operation id, besides those every operation of
/// its kind shares ([`CLIENT_AUTH`] where it takes a key, and `internal_error`, which any
/// request may meet). Statuses and meanings come from `ErrorCode`.
pub const ERRORS: &[(&str, &[ErrorCode])] = {
    use ErrorCode::*;
    &[
        (
            "generateTask",
            &[
                InvalidInput,
                CallbackUrlRefused,
                ModelNotFound,
                PayloadTooLarge,
                IdempotencyKeyReused,
                ModelNotAllowed,
                ReadOnlyKey,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "generateTasks",
            &[
                InvalidInput,
                CallbackUrlRefused,
                ModelNotFound,
                PayloadTooLarge,
                IdempotencyKeyReused,
                ModelNotAllowed,
                ReadOnlyKey,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "statusTask",
            &[
                InvalidInput,
                ModelNotFound,
                TaskNotFound,
                ModelNotAllowed,
                Unavailable,
            ],
        ),
        (
            "streamTask",
            &[
                InvalidInput,
                ModelNotFound,
                TaskNotFound,
                ModelNotAllowed,
                Unavailable,
            ],
        ),
        (
            "cancelTask",
            &[
                InvalidInput,
                ModelNotFound,
                TaskNotFound,
                TaskAlreadyFinal,
                ModelNotAllowed,
                ReadOnlyKey,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        ("listTasks", &[InvalidInput, ModelNotAllowed, Unavailable]),
        ("listModels", &[Unavailable]),
        ("getWebhookSecret", &[ModelNotAllowed, Unavailable]),
        (
            "rotateWebhookSecret",
            &[
                SecretRotationPending,
                ModelNotAllowed,
                ReadOnlyKey,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "listWebhookDeliveries",
            &[InvalidInput, TaskNotFound, ModelNotAllowed, Unavailable],
        ),
        (
            "retryWebhookDelivery",
            &[
                DeliveryNotFound,
                DeliveryInFlight,
                RetryTooSoon,
                ModelNotAllowed,
                ReadOnlyKey,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        ("getFile", &[LinkInvalid, FileNotFound, Unavailable]),
        ("getUntaggedFile", &[LinkInvalid, FileNotFound, Unavailable]),
        (
            "claimWork",
            &[
                InvalidInput,
                ModelNotFound,
                ModelNotForWorkers,
                PayloadTooLarge,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "heartbeat",
            &[
                InvalidInput,
                PayloadTooLarge,
                TaskNotFound,
                LeaseLost,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "uploadOutput",
            &[
                InvalidInput,
                PayloadTooLarge,
                TaskNotFound,
                LeaseLost,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "completeTask",
            &[
                InvalidInput,
                PayloadTooLarge,
                TaskNotFound,
                LeaseLost,
                OutputNotUploaded,
                OutcomeNotRecorded,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        (
            "failTask",
            &[
                InvalidInput,
                PayloadTooLarge,
                TaskNotFound,
                LeaseLost,
                OutcomeNotRecorded,
                Unavailable,
                InsufficientStorage,
            ],
        ),
        ("taskCounts", &[InvalidInput, ModelNotAllowed, Unavailable]),
        (
            "streamTaskCounts",
            &[InvalidInput, ModelNotAllowed, Unavailable],
        ),
        ("usage", &[InvalidInput, ModelNotAllowed, Unavailable]),
        ("operatorView", &[ModelNotAllowed, Unavailable]),
        // The metrics token's refusals reuse the API key's codes (api/metrics.rs).
        ("metrics", &[MissingApiKey, InvalidApiKey]),
        ("healthz", &[]),
        ("readyz", &[Unavailable]),
        ("openapi", &[]),
    ]
};

/// What every request with a key can be refused for before its handler runs.
const CLIENT_AUTH: &[ErrorCode] = &[
    ErrorCode::MissingApiKey,
    ErrorCode::InvalidApiKey,
    ErrorCode::KeyRevoked,
    ErrorCode::WrongKeyKind,
];

/// Adds each operation's error responses, one per status, from [`ERRORS`]: the description
/// names each code and its meaning, and the schema is the error envelope with `errorCode`
/// narrowed to those codes. An operation missing from the table is a bug the unit test below
/// reports; here it gets only the shared ones.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components
            .schemas
            .insert("ErrorEnvelope".to_owned(), error_envelope_schema());
        for item in doc.paths.paths.values_mut() {
            for op in operations_mut(item) {
                add_error_responses(op);
            }
        }
    }
}

/// The envelope of every refusal.
fn error_envelope_schema() -> RefOr<Schema> {
    ObjectBuilder::new()
        .description(Some(
            "A refusal: `code` is the HTTP status, `message` says why for people, \
             `data.errorCode` says why for programs.",
        ))
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(400))
                .maximum(Some(599)),
        )
        .required("code")
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .required("message")
        .property("data", Ref::from_schema_name(ErrorData::name()))
        .required("data")
        .into()
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// The error codes an operation documents: its [`ERRORS`] entry, the key refusals where it
/// takes a client key or a worker token, and `internal_error`.
pub fn operation_errors(op: &Operation) -> Vec<ErrorCode> {
    let id = op.operation_id.as_deref().unwrap_or_default();
    let mut codes: Vec<ErrorCode> = ERRORS
        .iter()
        .find(|(name, _)| *name == id)
        .map(|(_, codes)| codes.to_vec())
        .unwrap_or_default();
    if takes_key(op) {
        codes.extend_from_slice(CLIENT_AUTH);
    }
    // A path whose escapes are not UTF-8 cannot be read (extract::PathParams).
    let in_path = |p: &utoipa::openapi::path::Parameter| {
        matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Path)
    };
    if op.parameters.iter().flatten().any(in_path) && !codes.contains(&ErrorCode::InvalidInput) {
        codes.push(ErrorCode::InvalidInput);
    }
    // A body that does not arrive in time (serve::TimedBody).
    if op.request_body.is_some() {
        codes.push(ErrorCode::RequestTimeout);
    }
    // Every client-key request counts against the key's requests per minute.
    if takes_scheme(op, &[CLIENT_KEY]) {
        codes.push(ErrorCode::RateLimited);
    }
    codes.push(ErrorCode::InternalError);
    codes
}

/// Whether `op` requires a client key or a worker token (the keys' store, so [`CLIENT_AUTH`]);
/// the metrics token is not one (its refusals are in [`ERRORS`]).
fn takes_key(op: &Operation) -> bool {
    takes_scheme(op, &[CLIENT_KEY, WORKER_TOKEN])
}

/// Whether `op` requires one of `schemes`.
fn takes_scheme(op: &Operation, schemes: &[&str]) -> bool {
    op.security.iter().flatten().any(|requirement| {
        // A requirement's schemes are private in utoipa; its JSON is `{scheme: [scopes]}`.
        serde_json::to_value(requirement).is_ok_and(|v| {
            v.as_object()
                .is_some_and(|o| schemes.iter().any(|s| o.contains_key(*s)))
        })
    })
}

fn add_error_responses(op: &mut Operation) {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for code in operation_errors(op) {
        let codes = by_status.entry(code.status()).or_default();
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    for (status, codes) in by_status {
        let mut description = String::new();
        for c in &codes {
            description.push_str(&format!("`{}`: {}\n", c.as_str(), c.meaning()));
        }
        let narrowed = ObjectBuilder::new().property(
            "data",
            ObjectBuilder::new().property(
                "errorCode",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(codes.iter().map(|c| c.as_str()))),
            ),
        );
        let schema = AllOfBuilder::new()
            .item(Ref::from_schema_name("ErrorEnvelope"))
            .item(narrowed);
        // One example per code: a viewer would otherwise make one up from the schema, with a
        // code of another status.
        let examples = codes.iter().map(|c| {
            let value = serde_json::json!({
                "code": status,
                "message": c.meaning(),
                "data": {"errorCode": c.as_str()},
            });
            (
                c.as_str(),
                utoipa::openapi::example::ExampleBuilder::new()
                    .summary(c.as_str())
                    .value(Some(value))
                    .build(),
            )
        });
        let mut response = ResponseBuilder::new()
            .description(description.trim_end())
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(schema))
                    .examples_from_iter(examples)
                    .build(),
            );
        if status == 401 {
            response = response.header(
                "WWW-Authenticate",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("`Bearer`"))
                    .build(),
            );
        }
        if codes.contains(&ErrorCode::RetryTooSoon) || codes.contains(&ErrorCode::RateLimited) {
            response = response.header(
                "Retry-After",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::Integer))
                    .description(Some("Seconds until the request may be made again."))
                    .build(),
            );
        }
        op.responses
            .responses
            .insert(status.to_string(), response.build().into());
    }
}

/// What each event of a `text/event-stream` answer carries in its `data` (JSON), by operation
/// id: the schema's name. OpenAPI 3.1 has no field for it, so the document says it in an
/// extension, `x-event-data`, beside the stream's media type (the integration test checks
/// every event against it).
pub const EVENT_STREAMS: &[(&str, &str)] = &[
    ("streamTask", "TaskStatus"),
    ("streamTaskCounts", "TaskCounts"),
];

struct EventStreams;

impl Modify for EventStreams {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            for op in operations_mut(item) {
                let id = op.operation_id.as_deref().unwrap_or_default();
                let Some((_, schema)) = EVENT_STREAMS.iter().find(|(op, _)| *op == id) else {
                    continue;
                };
                for response in op.responses.responses.values_mut() {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    if let Some(content) = response.content.get_mut("text/event-stream") {
                        let reference = serde_json::json!({
                            "$ref": format!("#/components/schemas/{schema}")
                        });
                        // The schema of one event, as OpenAPI 3.2's `itemSchema` has it and
                        // fuzzers (schemathesis) read it: the stream as a whole is text.
                        content.schema = Some(event_schema(schema).into());
                        content
                            .extensions
                            .get_or_insert_with(Default::default)
                            .insert("x-event-data".to_owned(), reference);
                    }
                }
            }
        }
    }
}

/// One server-sent event of a stream whose `data` is the JSON of schema `data_schema`.
fn event_schema(data_schema: &str) -> Schema {
    let text = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .description(Some(format!(
            "One server-sent event: `data` is the JSON of a `{data_schema}` (see `x-event-data`), `id` resumes the stream as `Last-Event-ID`."
        )))
        .property("id", text())
        .property("event", text())
        .property(
            "data",
            text().description(Some(format!("A `{data_schema}` as JSON."))),
        )
        .required("data")
        .into()
}

/// A parameter is optional by being left out, never by being `null` (a query string or a
/// header has no null), but utoipa makes an `Option<T>` parameter's schema nullable: this takes
/// the `null` back out.
struct ParametersNotNull;

impl Modify for ParametersNotNull {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            for op in operations_mut(item) {
                for p in op.parameters.iter_mut().flatten() {
                    p.schema = p.schema.take().map(not_null);
                }
            }
        }
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null))
}

fn not_null(schema: RefOr<Schema>) -> RefOr<Schema> {
    match schema {
        RefOr::T(Schema::Object(mut o)) => {
            if let SchemaType::Array(types) = &o.schema_type {
                let mut rest: Vec<Type> = types
                    .iter()
                    .filter(|t| **t != Type::Null)
                    .cloned()
                    .collect();
                o.schema_type = match rest.len() {
                    1 => SchemaType::Type(rest.remove(0)),
                    _ => SchemaType::Array(rest),
                };
            }
            RefOr::T(Schema::Object(o))
        }
        RefOr::T(Schema::OneOf(one)) => {
            let mut rest: Vec<RefOr<Schema>> =
                one.items.iter().filter(|i| !is_null(i)).cloned().collect();
            if rest.len() == 1 {
                rest.remove(0)
            } else {
                RefOr::T(Schema::OneOf(one))
            }
        }
        other => other,
    }
}

/// `data` of generateTask: `{taskId}`; with `Prefer: wait=N`, the task's status (statusTask's
/// `data`, which carries the `taskId` too) once it is final or the wait is over.
pub struct Submitted;

impl PartialSchema for Submitted {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(Ref::from_schema_name(TaskCreated::name()))
            .item(Ref::from_schema_name(TaskStatus::name()))
            .description(Some(
                "`{taskId}`; with `Prefer: wait=N`, the task's status (with `Preference-Applied`).",
            ))
            .into()
    }
}

impl ToSchema for Submitted {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((TaskCreated::name().into(), TaskCreated::schema()));
        schemas.push((TaskStatus::name().into(), TaskStatus::schema()));
    }
}

/// `data` of an answer that has none (a worker's reports): `null`.
pub struct Nothing;

impl PartialSchema for Nothing {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Null)
            .description(Some("Always `null`."))
            .into()
    }
}

impl ToSchema for Nothing {}

/// `data` of `/healthz` and `/readyz`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // A schema only: the handlers build the same JSON.
pub struct Health {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(example = "ok")]
    status: String,
}

/// The document as served: JSON, built once.
pub fn document_json() -> Bytes {
    // Serialising the document's own types cannot fail; an empty body would fail the tests.
    Bytes::from(ApiDoc::openapi().to_pretty_json().unwrap_or_default())
}

/// This OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server's API.", content_type = "application/json", body = Object)),
)]
async fn openapi_json() -> impl IntoResponse {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        DOC.get_or_init(document_json).clone(),
    )
}

/// The routes of the document and of `/docs`.
pub(super) fn router() -> Router<Arc<AppState>> {
    let config = Arc::new(
        utoipa_swagger_ui::Config::new(["/openapi.json"])
            // No badge fetched from the validator's site: nothing leaves this origin.
            .validator_url("none")
            // No top bar: its box loads a document from any URL (which the policy would refuse
            // anyway), and its logo is an SVG with an inline <style> the policy refuses.
            .use_base_layout()
            .try_it_out_enabled(false)
            .display_request_duration(true),
    );
    let asset_config = config.clone();
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(|| async { Redirect::permanent("/docs/") }))
        .route(
            "/docs/",
            get(move || {
                let config = config.clone();
                async move { docs_file("", config) }
            }),
        )
        .route(
            "/docs/{*file}",
            get(move |Path(file): Path<String>| {
                let config = asset_config.clone();
                async move { docs_file(&file, config) }
            }),
        )
}

/// Only this origin, and no inline script or style. Swagger UI's stylesheet draws its icons
/// as `data:` SVG images, hence `img-src data:`.
pub const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// One file of Swagger UI (`index.html` for the directory), with the security headers.
fn docs_file(file: &str, config: Arc<utoipa_swagger_ui::Config<'static>>) -> Response {
    let not_found = || {
        ApiError::new(
            ErrorCode::EndpointNotFound,
            format!("no such file of the API reference: /docs/{file}; open /docs/"),
        )
        .into_response()
    };
    let served = match utoipa_swagger_ui::serve(file, config) {
        Ok(Some(f)) => f,
        Ok(None) => return not_found(),
        Err(e) => {
            return ApiError::Internal(format!("cannot render /docs/{file}: {e}").into())
                .into_response()
        }
    };
    let mut response = Bytes::from(served.bytes.into_owned()).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&served.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DOCS_CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_operation_has_an_id_and_an_entry_in_the_errors_table() {
        let mut doc = ApiDoc::openapi();
        let mut ids = Vec::new();
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in operations_mut(item) {
                let id = op
                    .operation_id
                    .clone()
                    .unwrap_or_else(|| panic!("an operation of {path} has no operation_id"));
                assert!(
                    ERRORS.iter().any(|(name, _)| *name == id),
                    "operation {id} ({path}) has no entry in api::openapi::ERRORS"
                );
                assert!(!ids.contains(&id), "operation id {id} is used twice");
                ids.push(id);
            }
        }
        let named = ERRORS.iter().map(|(n, _)| *n);
        for name in named.chain(EVENT_STREAMS.iter().map(|(n, _)| *n)) {
            assert!(
                ids.iter().any(|id| id == name),
                "ERRORS or EVENT_STREAMS names {name}, which no operation has"
            );
        }
    }

    #[test]
    fn every_error_code_is_in_the_schema_and_answered_by_some_operation_or_the_router() {
        let json: serde_json::Value =
            serde_json::from_slice(&document_json()).expect("the document is JSON");
        let listed = &json["components"]["schemas"]["ErrorCode"]["enum"];
        for &c in ErrorCode::ALL {
            assert!(
                listed.as_array().unwrap().iter().any(|v| v == c.as_str()),
                "{c} is not in the ErrorCode schema"
            );
            // The router's fallbacks answer these two for paths and methods that are not
            // operations.
            if matches!(c, ErrorCode::EndpointNotFound | ErrorCode::MethodNotAllowed) {
                continue;
            }
            let text = json["paths"].to_string();
            assert!(
                text.contains(&format!("\"{}\"", c.as_str())),
                "no operation documents {c}"
            );
        }
        assert_eq!(json["openapi"], "3.1.0");
    }
}
