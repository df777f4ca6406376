//! `Idempotency-Key` on generateTask and generateTasks, and the insert every submit that creates
//! its tasks outside the single submits' group commit shares (a batch, a keyed submit).
//!
//! The same key from the same tenant within 24 h answers what the first request created and
//! creates nothing, also when the requests race: the store writes the key's row in the
//! transaction that inserts the tasks, under a unique `(tenant_id, key)`, and a loser reads the
//! winner's row. The request is identified by a SHA-256 of the endpoint, the model and the raw
//! body bytes; the same key with another request answers 422 (`idempotency_key_reused`). On a
//! batch the key covers the whole batch.
//!
//! Requests without the header never touch the key table: the extractor reads one header, and
//! the handler goes on down the hot path as before.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use taskgate_proto::ErrorCode;

use super::tasks::pending_view;
use crate::dispatch::ModelRuntime;
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{IdempotencyKey, KeyedInsert, NewTask};

pub(super) const HEADER: &str = "idempotency-key";
/// Longest key accepted, in bytes.
pub(super) const MAX_KEY_BYTES: usize = 255;
/// How long a key answers with what it created; after that it is replaced by the next use.
pub(super) const KEY_TTL_MS: i64 = crate::retention::KEY_LIFETIME.as_millis() as i64;

/// The endpoints a key may be used on, as they enter the request's hash: a key first used for
/// one task and then for a batch (or the other way) is a different request.
pub(super) const GENERATE_TASK: &str = "generateTask";
pub(super) const GENERATE_TASKS: &str = "generateTasks";

/// The request's `Idempotency-Key`, if it has one. The extractor never refuses: the handler
/// asks for the key ([`IdempotencyHeader::key`]) after the model and the body size are checked,
/// so refusals keep their documented order.
pub(super) struct IdempotencyHeader(Option<Result<String, ApiError>>);

impl IdempotencyHeader {
    pub(super) fn key(self) -> Result<Option<String>, ApiError> {
        self.0.transpose()
    }
}

impl FromRequestParts<Arc<AppState>> for IdempotencyHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(first) = values.next() else {
            return Ok(IdempotencyHeader(None));
        };
        if values.next().is_some() {
            return Ok(IdempotencyHeader(Some(Err(ApiError::new(
                ErrorCode::InvalidInput,
                "send one Idempotency-Key header, not several",
            )))));
        }
        Ok(IdempotencyHeader(Some(check_key(first.as_bytes()))))
    }
}

/// 1 to 255 bytes of printable ASCII: what fits the key column on every store and reads the
/// same in every log.
fn check_key(raw: &[u8]) -> Result<String, ApiError> {
    let bad = |why: String| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!(
                "the Idempotency-Key header {why}; send 1 to {MAX_KEY_BYTES} printable ASCII characters, e.g. a UUID"
            ),
        )
    };
    if raw.is_empty() {
        return Err(bad("is empty".into()));
    }
    if raw.len() > MAX_KEY_BYTES {
        return Err(bad(format!("is {} bytes long", raw.len())));
    }
    if let Some(at) = raw.iter().position(|b| !(0x20..=0x7e).contains(b)) {
        return Err(bad(format!(
            "has a non-ASCII or control byte at offset {at}"
        )));
    }
    // Printable ASCII is UTF-8.
    String::from_utf8(raw.to_vec()).map_err(|_| bad("is not ASCII".into()))
}

/// SHA-256 of the endpoint, the model and the raw body, each part ended by a NUL (neither an
/// endpoint nor a model name holds one), so no two requests share their bytes.
pub(super) fn request_hash(endpoint: &str, model: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    h.update(model.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().to_vec()
}

/// generateTask with a key: the task's id, its own or the one the key created before.
pub(super) async fn submit_one(
    state: &AppState,
    runtime: &ModelRuntime,
    key: String,
    body: &[u8],
    task: NewTask,
) -> Result<String, ApiError> {
    let ids = submit(state, runtime, key, GENERATE_TASK, body, vec![task]).await?;
    ids.into_iter().next().ok_or_else(|| {
        ApiError::internal(crate::store::StoreError::Invalid(
            "an idempotency key of generateTask holds no task id".into(),
        ))
    })
}

/// Creates `tasks` under `key` (the request's raw `body` to `endpoint` identifies it), or
/// answers the ids the key created before; 422 when it was used for another request.
pub(super) async fn submit(
    state: &AppState,
    runtime: &ModelRuntime,
    key: String,
    endpoint: &str,
    body: &[u8],
    tasks: Vec<NewTask>,
) -> Result<Vec<String>, ApiError> {
    let tenant_id = tasks
        .first()
        .map(|t| t.tenant_id.clone())
        .unwrap_or_default();
    let now = now_ms();
    let record = IdempotencyKey {
        tenant_id,
        key,
        request_hash: request_hash(endpoint, &runtime.name, body),
        now,
        expired_at_or_before: now - KEY_TTL_MS,
    };
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let views = PendingViews::put(state, &tasks);
    match state.store.insert_tasks_keyed(&record, tasks).await {
        Ok(KeyedInsert::Inserted) => {
            state.metrics.submitted(&runtime.name, ids.len());
            wake(state, runtime);
            Ok(ids)
        }
        // Nothing of ours was inserted: the views put in for our ids go.
        Ok(KeyedInsert::Replayed(original)) => {
            views.forget();
            Ok(original)
        }
        Ok(KeyedInsert::Mismatch) => {
            views.forget();
            Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                format!(
                    "the Idempotency-Key {:?} was used in the last 24 hours for a different request (another endpoint, model or body), so nothing was created; use a new key for a new request",
                    record.key
                ),
            ))
        }
        Err(e) => {
            views.forget();
            Err(e.into())
        }
    }
}

/// Creates `tasks` in one transaction (a batch without a key): all of them or none.
pub(super) async fn insert_all(
    state: &AppState,
    runtime: &ModelRuntime,
    tasks: Vec<NewTask>,
) -> Result<Vec<String>, ApiError> {
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let views = PendingViews::put(state, &tasks);
    if let Err(e) = state.store.insert_tasks(tasks).await {
        views.forget();
        return Err(e.into());
    }
    state.metrics.submitted(&runtime.name, ids.len());
    wake(state, runtime);
    Ok(ids)
}

/// After the commit, always: these inserts bypass SQLite's writer thread, so a claim parked
/// there did not see them (the loop's wake-up pokes it), and pull workers' long-polls wait for
/// a wake-up too.
fn wake(state: &AppState, runtime: &ModelRuntime) {
    state.dispatcher.notify(&runtime.name);
    // The dashboard's count streams count new tasks.
    state.dispatcher.events().submitted();
}

/// The pending views of tasks about to be inserted, kept as the single submit keeps its own
/// (put in before the insert, forgotten by the claim that takes the task: views.rs), and
/// forgotten here when the insert did not happen or created nothing of ours.
struct PendingViews<'a> {
    state: &'a AppState,
    ids: Vec<String>,
}

impl<'a> PendingViews<'a> {
    fn put(state: &'a AppState, tasks: &[NewTask]) -> Self {
        let mut ids = Vec::new();
        if state.live_views {
            for task in tasks {
                if let Some(view) = pending_view(task) {
                    state.views.insert(task.id.clone(), view);
                    ids.push(task.id.clone());
                }
            }
        }
        PendingViews { state, ids }
    }

    fn forget(self) {
        for id in &self.ids {
            self.state.views.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(raw: &[u8]) -> String {
        match check_key(raw) {
            Err(ApiError::Refused { code, message, .. }) => {
                assert_eq!(code, ErrorCode::InvalidInput);
                message
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn keys_are_1_to_255_printable_ascii_bytes() {
        assert_eq!(check_key(b"order-42 retry").unwrap(), "order-42 retry");
        assert_eq!(check_key(&[b'k'; 255]).unwrap().len(), 255);
        assert!(refused(b"").contains("is empty"));
        assert!(refused(&[b'k'; 256]).contains("256 bytes long"));
        assert!(refused("clé".as_bytes()).contains("offset 2"));
        assert!(refused(b"a\tb").contains("control"));
    }

    #[test]
    fn the_hash_tells_endpoint_model_and_body_apart() {
        let h = request_hash(GENERATE_TASK, "echo", b"{}");
        assert_eq!(h, request_hash(GENERATE_TASK, "echo", b"{}"));
        assert_ne!(h, request_hash(GENERATE_TASKS, "echo", b"{}"));
        assert_ne!(h, request_hash(GENERATE_TASK, "demo-image", b"{}"));
        assert_ne!(h, request_hash(GENERATE_TASK, "echo", b"{ }"));
        // The separator keeps the parts from running into each other.
        assert_ne!(
            request_hash(GENERATE_TASK, "ab", b"c"),
            request_hash(GENERATE_TASK, "a", b"bc")
        );
    }
}
