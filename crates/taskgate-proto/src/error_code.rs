//! Machine-readable error codes, sent in an error envelope's `data` as `{"errorCode": "…"}`.
//!
//! APIXO clients read `code` (the HTTP status) and `message` and ignore `data`; taskgate's own
//! SDK and CLI read the error code, so they never guess what a 404 meant. Each code has one HTTP
//! status. docs/api.md's error table is rendered from [`ErrorCode::ALL`] and a test compares
//! them, so the table cannot drift from the enum.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($($variant:ident = $name:literal, $status:literal, $meaning:literal;)+) => {
        /// Why a request was refused. New codes may appear in later versions: a client should
        /// treat a code it does not know by its HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $(#[doc = $meaning] $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order of the docs' table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The code as sent: `snake_case`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)+
                }
            }

            /// The HTTP status (and envelope `code`) this error is answered with.
            pub fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)+
                }
            }

            /// What it means, as the docs' table says it.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $meaning,)+
                }
            }

            /// The code named `s`, if this version knows it.
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s {
                    $($name => Some(ErrorCode::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    InvalidInput = "invalid_input", 400, "The request body or a parameter is not what the endpoint takes (not JSON, a missing or malformed field, a missing query parameter).";
    CallbackUrlRefused = "callback_url_refused", 400, "The `callback_url` is not an absolute http(s) URL this server will call (too long, not http(s), or a private address). A `user:password@` in it is allowed and kept out of logs.";
    ModelNotForWorkers = "model_not_for_workers", 400, "A pull worker asked for a model that this server runs itself, not through workers.";
    OutputNotUploaded = "output_not_uploaded", 400, "A worker completed a task naming an output it never uploaded in this attempt.";
    MissingApiKey = "missing_api_key", 401, "No `Authorization: Bearer …` header.";
    InvalidApiKey = "invalid_api_key", 401, "The header is malformed, or the key is unknown.";
    KeyRevoked = "key_revoked", 401, "The key has been revoked.";
    WrongKeyKind = "wrong_key_kind", 401, "A worker token used on the client API, or a client key on the worker API.";
    ModelNotAllowed = "model_not_allowed", 403, "The key's scope does not include this model (`taskgate keys update --models`); the message names the models it may use.";
    ReadOnlyKey = "read_only_key", 403, "The key is read-only: it may read, but not submit, cancel, rotate a secret or re-send a delivery.";
    LinkInvalid = "link_invalid", 403, "A result link whose signature does not match, or that has expired.";
    EndpointNotFound = "endpoint_not_found", 404, "No such path.";
    ModelNotFound = "model_not_found", 404, "No model of that name on this server.";
    TaskNotFound = "task_not_found", 404, "No task with that id for this key (another tenant's task, or one of another model, does not exist for it).";
    DeliveryNotFound = "delivery_not_found", 404, "No webhook delivery with that id for this key.";
    FileNotFound = "file_not_found", 404, "The result file is gone, or this node does not serve result files.";
    MethodNotAllowed = "method_not_allowed", 405, "The path exists but not with this HTTP method.";
    RequestTimeout = "request_timeout", 408, "The request body did not arrive within the server's `body_timeout`; the connection is closed.";
    LeaseLost = "lease_lost", 409, "A worker reported on a task it no longer holds (its lease ended and the task was handed on, it was cancelled, or it is final): stop working on it.";
    TaskAlreadyFinal = "task_already_final", 409, "A cancel of a task that is already `success` or `failed`: nothing was changed.";
    SecretRotationPending = "secret_rotation_pending", 409, "The previous webhook secret still signs deliveries; rotating again now would cut its overlap short.";
    DeliveryInFlight = "delivery_in_flight", 409, "The webhook delivery is being sent right now.";
    PayloadTooLarge = "payload_too_large", 413, "The request body, or an uploaded output, is over the server's limit.";
    IdempotencyKeyReused = "idempotency_key_reused", 422, "The `Idempotency-Key` was used by this tenant in the last 24 h for a different request (another endpoint, model or body); nothing was created. Use a new key for a new request.";
    RateLimited = "rate_limited", 429, "The key is over its requests per minute or its unfinished tasks at once (the message says which); `Retry-After` says when to ask again.";
    RetryTooSoon = "retry_too_soon", 429, "Asked again too soon; `Retry-After` says when it may be asked again.";
    InternalError = "internal_error", 500, "A fault on the server's side; it is logged there.";
    Unavailable = "unavailable", 503, "The database cannot be reached, or the server is stopping: retry shortly.";
    OutcomeNotRecorded = "outcome_not_recorded", 503, "A worker's outcome could not be written; nothing changed, report it again while the lease holds.";
    InsufficientStorage = "insufficient_storage", 507, "The server's disk is full: nothing was stored (no task was created, no output kept); retry once space is freed.";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ErrorCode::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

/// `data` of an error envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorData {
    /// Kept as text, so a code from a newer server still reaches the caller; see
    /// [`ErrorData::code`].
    #[cfg_attr(feature = "openapi", schema(value_type = ErrorCode))]
    pub error_code: String,
}

impl ErrorData {
    pub fn new(code: ErrorCode) -> Self {
        ErrorData {
            error_code: code.as_str().to_owned(),
        }
    }

    /// The code, if this version knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::parse(&self.error_code)
    }
}

/// The schema of `errorCode`: a string, one of [`ErrorCode::ALL`], each with its status and
/// meaning in the description (the OpenAPI document's copy of the docs' table).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let mut description = String::from(
            "Why the request was refused; the HTTP status follows from the code. A client should \
             treat a code it does not know by its HTTP status.\n\n",
        );
        description.push_str(&markdown_table());
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
            .description(Some(description))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ErrorCode {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("ErrorCode")
    }
}

/// The docs' error table (markdown), rendered from [`ErrorCode::ALL`].
pub fn markdown_table() -> String {
    let mut out = String::from("| errorCode | HTTP status | meaning |\n|---|---|---|\n");
    for c in ErrorCode::ALL {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.as_str(),
            c.status(),
            c.meaning()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name_and_json() {
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&ErrorData::new(c)).unwrap();
            assert_eq!(json, format!("{{\"errorCode\":\"{c}\"}}"));
            let back: ErrorData = serde_json::from_str(&json).unwrap();
            assert_eq!(back.code(), Some(c));
            assert!((400..600).contains(&c.status()), "{c}");
        }
        let unknown: ErrorData =
            serde_json::from_str(r#"{"errorCode":"from_the_future"}"#).unwrap();
        assert_eq!(unknown.code(), None);
    }

    #[test]
    fn the_docs_error_table_is_the_one_rendered_from_the_enum() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md");
        let docs = std::fs::read_to_string(path).unwrap();
        let (start, end) = ("<!-- error-codes:start -->\n", "<!-- error-codes:end -->");
        let from = docs
            .find(start)
            .expect("docs/api.md lacks the error-codes markers")
            + start.len();
        let to = docs[from..].find(end).expect("no error-codes:end marker") + from;
        let table = markdown_table();
        if docs[from..to] != table {
            if std::env::var_os("UPDATE_DOCS").is_some() {
                let updated = format!("{}{table}{}", &docs[..from], &docs[to..]);
                std::fs::write(path, updated).unwrap();
            } else {
                panic!(
                    "docs/api.md's error table differs from ErrorCode (rerun with UPDATE_DOCS=1 to \
                     write it); expected:\n{table}"
                );
            }
        }
    }
}
