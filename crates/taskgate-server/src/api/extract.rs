//! Who is asking: the caller's identity as extractors, so a handler that takes one cannot
//! forget to authenticate, and the 401 comes before the body is read (axum runs the
//! `FromRequestParts` extractors before the body extractor).
//!
//! Reading the `Authorization` header is HTTP and lives here; deciding what a key is worth is
//! `auth`'s, which knows nothing of HTTP.
//!
//! Every client-key extractor also counts the request against the key's requests per minute
//! (`limits`): a 429 comes before the body is read, like the 401. A handler takes exactly one
//! of them, so a request is counted once. Which routes write (and refuse read-only keys) is
//! said by the extractor they take: [`Writer`].

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use taskgate_proto::ErrorCode;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{ApiKeyRecord, Tenant};

/// The tenant of the client key the request carries, for routes that read or change the whole
/// tenant (the task list, usage, counts, the webhook secret and deliveries); worker tokens are
/// refused, and so are keys limited to some models (403): those routes would show them the
/// tasks of models outside their scope.
pub struct ClientTenant(pub Tenant);

/// A 403 for a key limited to some models on a route about the whole tenant.
pub(super) fn tenant_wide(record: &ApiKeyRecord) -> Result<(), ApiError> {
    match record.policy.models.as_deref() {
        None => Ok(()),
        Some(models) => Err(ApiError::new(
            ErrorCode::ModelNotAllowed,
            format!(
                "this key may use only {}: the task list, usage, counts, webhook secret and deliveries cover every model of the tenant, so they need a key without --models",
                if models.is_empty() { "no model".to_owned() } else { models.join(", ") }
            ),
        )),
    }
}

/// The client key the request carries, as cached: its tenant, scope and limits.
pub struct Caller(pub Arc<ApiKeyRecord>);

impl Caller {
    pub fn tenant(&self) -> &Tenant {
        &self.0.tenant
    }

    pub fn key_id(&self) -> &str {
        &self.0.id
    }

    /// A 403 unless the key's scope lets it use `model` (checked before the model is looked
    /// up, so a scoped key learns nothing of the models it may not use).
    pub fn may_use(&self, model: &str) -> Result<(), ApiError> {
        if self.0.policy.allows(model) {
            return Ok(());
        }
        let allowed = self.0.policy.models.as_deref().unwrap_or_default();
        Err(ApiError::new(
            ErrorCode::ModelNotAllowed,
            if allowed.is_empty() {
                format!("this key may not use model {model:?}: its scope lists no models")
            } else {
                format!(
                    "this key may not use model {model:?}: it may use only {}",
                    allowed.join(", ")
                )
            },
        ))
    }
}

/// A [`Caller`] that may change something (submit, cancel, rotate, re-send): read-only keys
/// are refused with a 403 before the body is read.
pub struct Writer(pub Caller);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller(client(parts, state).await?.0))
    }
}

impl FromRequestParts<Arc<AppState>> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let (record, _) = client(parts, state).await?;
        if record.policy.read_only {
            return Err(ApiError::new(
                ErrorCode::ReadOnlyKey,
                "this key is read-only: it may read tasks, models and webhook deliveries but not submit, cancel or change anything; use a key without --read-only",
            ));
        }
        Ok(Writer(Caller(record)))
    }
}

/// The client key's record and the key itself, the request counted against its limit.
async fn client<'a>(
    parts: &'a Parts,
    state: &Arc<AppState>,
) -> Result<(Arc<ApiKeyRecord>, &'a str), ApiError> {
    let key = bearer_key(&parts.headers)?;
    let record = state.auth.client(key).await?;
    state
        .limits
        .admit_request(&record)
        .map_err(|r| ApiError::too_soon(ErrorCode::RateLimited, r.message, r.retry_after))?;
    Ok((record, key))
}

/// [`ClientTenant`], keeping the key itself for a response that outlives the request's first
/// moment (a stream checks it again, so a revoked key stops it as it stops every request).
pub struct ClientKey {
    pub tenant: Tenant,
    pub key: String,
    pub record: Arc<ApiKeyRecord>,
}

impl FromRequestParts<Arc<AppState>> for ClientKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let (record, key) = client(parts, state).await?;
        Ok(ClientKey {
            tenant: record.tenant.clone(),
            key: key.to_owned(),
            record,
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
        let (record, _) = client(parts, state).await?;
        tenant_wide(&record)?;
        Ok(ClientTenant(record.tenant.clone()))
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

/// A route's path parameters, refused in the envelope (400) when they cannot be read: axum's own
/// `Path` answers a segment whose escapes are not UTF-8 (`%FF`) in plain text.
pub struct PathParams<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParams<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(params)) => Ok(PathParams(params)),
            // A route whose parameters do not fit its type is our bug, not the client's.
            Err(rejection) if rejection.status().is_server_error() => {
                Err(ApiError::internal(rejection))
            }
            Err(rejection) => Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("the URL path cannot be read: {}", rejection.body_text()),
            )),
        }
    }
}
