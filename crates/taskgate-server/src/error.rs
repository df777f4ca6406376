//! The one place where errors become HTTP responses: the APIXO envelope `{code, message, data}`
//! with `code` equal to the HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use taskgate_proto::{Envelope, ErrorCode, ErrorData};

use crate::report::{error_chain, storage_full};

/// A refused request: its machine-readable code (which fixes the HTTP status), a message for
/// people, and for 429s when to ask again.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Refused {
        code: ErrorCode,
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// Our fault. The cause is logged in full; the client only learns that it was ours.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::Refused {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 429 that says when to ask again (`Retry-After`).
    pub fn too_soon(code: ErrorCode, message: String, retry_after: std::time::Duration) -> Self {
        ApiError::Refused {
            code,
            message,
            retry_after: Some(retry_after),
        }
    }

    /// A request body that failed to arrive: 408 when the client was too slow
    /// ([`crate::serve::TimedBody`]), else `otherwise(cause)`.
    pub fn unread_body(
        cause: &(dyn std::error::Error + 'static),
        otherwise: impl FnOnce() -> ApiError,
    ) -> Self {
        match crate::serve::body_timed_out(cause) {
            Some(timeout) => ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive in time: the server's body_timeout is {}s (a body within it of its headers, an upload without a pause that long)",
                    timeout.as_secs_f64()
                ),
            ),
            None => otherwise(),
        }
    }

    /// Our fault, unless the disk is full: that is answered 507 wherever it surfaces (a file
    /// write, SQLite, PostgreSQL), so that a client and the operator learn what to do about it.
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        if storage_full(&e) {
            return ApiError::storage_full(&e);
        }
        ApiError::Internal(Box::new(e))
    }

    fn storage_full(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::warn!(error = %error_chain(cause), "the disk is full; a request was refused");
        ApiError::new(
            ErrorCode::InsufficientStorage,
            "the server's disk is full: nothing was stored; retry once space is freed",
        )
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Refused { code, .. } => *code,
            ApiError::Internal(_) => ErrorCode::InternalError,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(cause) if storage_full(&*cause) => {
                ApiError::storage_full(&*cause)
            }
            crate::store::StoreError::Unavailable(cause) => {
                tracing::warn!(error = %error_chain(&*cause), "database unavailable");
                ApiError::new(
                    ErrorCode::Unavailable,
                    "the database is unavailable, retry shortly (a submit answered so may have been stored: use the same request again only if a duplicate task is acceptable)",
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        use crate::store::KeyKind;
        match e {
            AuthError::Invalid => ApiError::new(ErrorCode::InvalidApiKey, "invalid API key"),
            AuthError::Revoked => ApiError::new(
                ErrorCode::KeyRevoked,
                "this API key has been revoked; create a new one with `taskgate keys create`",
            ),
            AuthError::WrongKind {
                expected: KeyKind::Client,
            } => ApiError::new(
                ErrorCode::WrongKeyKind,
                "this is a worker token: it can only claim and report work under /api/v1/worker/; use a client API key here",
            ),
            AuthError::WrongKind {
                expected: KeyKind::Worker,
            } => ApiError::new(
                ErrorCode::WrongKeyKind,
                "this endpoint takes a worker token (create one with `taskgate keys create --worker --name NAME`), not a client API key",
            ),
            AuthError::Store(e) => e.into(),
        }
    }
}

/// Renders an error as its envelope, the code in `data`; used by handlers and by the panic
/// catcher.
pub fn envelope_response(code: ErrorCode, message: String) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = Envelope {
        code: status.as_u16(),
        message,
        data: Some(ErrorData::new(code)),
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = %error_chain(cause.as_ref()), "request failed on our side");
                "internal error on the server; it has been logged, try again later".to_owned()
            }
            other => {
                // One line per refusal, so an operator sees why a client is turned away. Only
                // refusals: a line per successful submit or poll would cost the hot paths more
                // than the request (docs/BENCHMARKS.md).
                let message = other.to_string();
                tracing::info!(status = status.as_u16(), error_code = %self.code(), reason = %message, "request refused");
                message
            }
        };
        let mut response = envelope_response(self.code(), message);
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come; nothing on the connection can be trusted
            // to start a request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::Refused {
            retry_after: Some(retry_after),
            ..
        } = &self
        {
            // Whole seconds, rounded up, so a client that waits exactly this long is not early.
            let secs = retry_after.as_millis().div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        response
    }
}
