//! Who is asking: the caller's identity as extractors, so a handler that takes one cannot
//! forget to authenticate, and the 401 comes before the body is read (axum runs the
//! `FromRequestParts` extractors before the body extractor).
//!
//! Reading the `Authorization` header is HTTP and lives here; deciding what a key is worth is
//! `auth`'s, which knows nothing of HTTP.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use taskgate_proto::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{ApiKeyRecord, Tenant};

/// The tenant of the client key the request carries; worker tokens are refused.
pub struct ClientTenant(pub Tenant);

/// [`ClientTenant`], keeping the key itself for a response that outlives the request's first
/// moment (a stream checks it again, so a revoked key stops it as it stops every request).
pub struct ClientKey {
    pub tenant: Tenant,
    pub key: String,
}

impl FromRequestParts<Arc<AppState>> for ClientKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer_key(&parts.headers)?;
        let tenant = state.auth.client_tenant(key).await?;
        Ok(ClientKey {
            tenant,
            key: key.to_owned(),
        })
    }
}

/// The worker token the request carries; client keys are refused.
pub struct WorkerToken(pub ApiKeyRecord);

impl FromRequestParts<Arc<AppState>> for ClientTenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer_key(&parts.headers)?;
        Ok(ClientTenant(state.auth.client_tenant(key).await?))
    }
}

impl FromRequestParts<Arc<AppState>> for WorkerToken {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer_key(&parts.headers)?;
        Ok(WorkerToken(state.auth.worker(key).await?))
    }
}

/// The key of `Authorization: Bearer KEY`.
fn bearer_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingApiKey,
            "missing API key: send the header \"Authorization: Bearer YOUR_API_KEY\"",
        )
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "malformed Authorization header: expected \"Bearer YOUR_API_KEY\"",
            )
        })
}
