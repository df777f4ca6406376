//! API keys and tenants.
//!
//! A key is `tg_` + 43 characters of base64url (256 random bits). Only its SHA-256 is stored;
//! a fast hash is enough because the key itself is unguessable. A request's key is looked up by
//! its hash, and the stored hash is then compared in constant time, so neither the lookup nor
//! the comparison tells an attacker anything about a real key.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{ApiKeyRecord, KeyKind, KeyPolicy, Store, StoreError, Tenant};

/// Tenant that the `TASKGATE_API_KEY` key belongs to.
pub const DEFAULT_TENANT: &str = "default";

pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "tg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// What listings show of a key. A generated key (`tg_`/`tgw_` and 43 random characters) shows
/// its first ten characters, which leave over 200 random bits unknown. A key chosen by the
/// operator (`TASKGATE_API_KEY`) may be short, and its start may be most of it: it shows a
/// fingerprint of its hash instead, which tells two keys apart and reveals nothing of either.
pub fn key_prefix(key: &str) -> String {
    let generated = (key.starts_with("tg_") || key.starts_with("tgw_")) && key.len() >= 40;
    if generated {
        key.chars().take(10).collect()
    } else {
        format!("sha256:{}", hex::encode(&hash_key(key)[..4]))
    }
}

/// The name the bootstrap key (`TASKGATE_API_KEY`) is registered under.
const BOOTSTRAP_KEY_NAME: &str = "TASKGATE_API_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no tenant named {0:?}; list tenants with `taskgate keys list`")]
    NoSuchTenant(String),
    #[error("a tenant named {0:?} already exists: pass --tenant {0} to add a key to it, or choose another --name")]
    TenantExists(String),
    #[error("the key name must be 1 to 100 printable characters")]
    BadName,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a key: in tenant `tenant` if given (it must exist), else in a new tenant named `name`.
/// Returns the record and the key itself, which is never stored and cannot be shown again.
pub async fn create_key(
    store: &dyn Store,
    kind: KeyKind,
    name: &str,
    tenant: Option<&str>,
) -> Result<(ApiKeyRecord, String), KeyError> {
    create_key_with(store, kind, name, tenant, &KeyPolicy::default()).await
}

/// [`create_key`] with a scope and limits (client keys; a worker token's are ignored).
pub async fn create_key_with(
    store: &dyn Store,
    kind: KeyKind,
    name: &str,
    tenant: Option<&str>,
    policy: &KeyPolicy,
) -> Result<(ApiKeyRecord, String), KeyError> {
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(KeyError::BadName);
    }
    // Worker tokens serve every tenant; they are kept in one tenant of their own.
    let tenant = match (kind, tenant) {
        (KeyKind::Worker, _) => ensure_tenant(store, WORKER_TENANT).await?,
        (KeyKind::Client, Some(t)) => store
            .tenant_by_name(t)
            .await?
            .ok_or_else(|| KeyError::NoSuchTenant(t.to_owned()))?,
        (KeyKind::Client, None) => match store.create_tenant(name).await {
            Ok(t) => t,
            Err(StoreError::Conflict(_)) => return Err(KeyError::TenantExists(name.to_owned())),
            Err(e) => return Err(e.into()),
        },
    };
    let key = match kind {
        KeyKind::Client => generate_key(),
        KeyKind::Worker => generate_key().replacen("tg_", "tgw_", 1),
    };
    let record = store
        .insert_key(
            kind,
            &tenant,
            name,
            &key_prefix(&key),
            &hash_key(&key),
            policy,
        )
        .await?;
    Ok((record, key))
}

/// Registers a key given from outside (`TASKGATE_API_KEY`) in the default tenant, and revokes
/// the bootstrap keys registered before it: changing the variable replaces the key rather than
/// adding one, so a leaked bootstrap key is retired by setting a new one.
///
/// Idempotent under concurrent starts: nodes starting together on one fresh database all find
/// no key and all insert it; the unique index on the hash lets one win, and the others take the
/// conflict as "registered already" (as [`ensure_tenant`] does for the tenant). A key that was
/// revoked stays revoked, and then retires nothing (a node restarted with an old value cannot
/// revoke the newer key).
pub async fn register_bootstrap_key(store: &dyn Store, key: &str) -> Result<(), StoreError> {
    let hash = hash_key(key);
    let current = match store.key_by_hash(&hash).await? {
        Some(existing) if existing.revoked_at.is_some() => {
            tracing::warn!(key_id = %existing.id, "TASKGATE_API_KEY names a revoked key; it stays revoked");
            return Ok(());
        }
        Some(existing) => existing,
        None => {
            let tenant = ensure_tenant(store, DEFAULT_TENANT).await?;
            let inserted = store
                .insert_key(
                    KeyKind::Client,
                    &tenant,
                    BOOTSTRAP_KEY_NAME,
                    &key_prefix(key),
                    &hash,
                    &KeyPolicy::default(),
                )
                .await;
            match inserted {
                Ok(record) => record,
                Err(StoreError::Conflict(_)) => match store.key_by_hash(&hash).await? {
                    Some(record) => record,
                    None => return Err(StoreError::Invalid("the bootstrap key vanished".into())),
                },
                Err(e) => return Err(e),
            }
        }
    };
    let now = crate::domain::now_ms();
    for old in store.list_keys().await? {
        let previous_bootstrap = old.name == BOOTSTRAP_KEY_NAME
            && old.tenant.id == current.tenant.id
            && old.kind == KeyKind::Client
            && old.revoked_at.is_none()
            && old.id != current.id
            && old.created_at <= current.created_at;
        if previous_bootstrap && store.revoke_key(&old.id, now).await? {
            tracing::info!(key_id = %old.id, "revoked the previous TASKGATE_API_KEY");
        }
    }
    Ok(())
}

/// The tenant named `name`, created if missing (racing nodes agree on one).
async fn ensure_tenant(store: &dyn Store, name: &str) -> Result<Tenant, StoreError> {
    if let Some(t) = store.tenant_by_name(name).await? {
        return Ok(t);
    }
    match store.create_tenant(name).await {
        Ok(t) => Ok(t),
        Err(StoreError::Conflict(_)) => store
            .tenant_by_name(name)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("tenant {name:?} vanished"))),
        Err(e) => Err(e),
    }
}

/// Tenant that holds worker tokens.
pub const WORKER_TENANT: &str = "workers";

/// Most keys one node keeps in memory.
const KEY_CACHE_ENTRIES: usize = 10_000;

/// How often a node asks the store whether any key was revoked or changed: the longest a key
/// revoked elsewhere (another node, `taskgate keys revoke`) keeps working on this node, and
/// the longest an old scope or limit (`taskgate keys update`) holds on it.
pub const REVOCATION_CHECK: Duration = Duration::from_secs(1);

/// Turns an `Authorization` header into the tenant it acts for.
///
/// Keys found valid are kept in a bounded in-memory cache, so a request costs no store read.
/// Revocations reach the cache through a watcher that reads the store's revocation
/// revision every [`REVOCATION_CHECK`] and empties the cache when it moves. Unknown and revoked
/// keys are never cached: a key created a moment ago works at once.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: Arc<KeyCache>,
}

struct KeyCache {
    /// Shared records: a hit costs a reference count, not a copy of the key's model list.
    keys: quick_cache::sync::Cache<[u8; 32], Arc<ApiKeyRecord>>,
    /// Bumped (under the write lock) whenever the cache is emptied. A lookup that missed
    /// inserts what it read only if the generation did not move while it read, so a record
    /// read before a revocation cannot land in the cache after the watcher emptied it.
    generation: RwLock<u64>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Authenticator {
            store,
            cache: Arc::new(KeyCache {
                keys: quick_cache::sync::Cache::new(KEY_CACHE_ENTRIES),
                generation: RwLock::new(0),
            }),
        }
    }

    /// Starts the revocation watcher; it ends when the last clone of this authenticator is
    /// dropped.
    pub fn watch_revocations(&self) {
        let cache = Arc::downgrade(&self.cache);
        let store = self.store.clone();
        tokio::spawn(watch_revocations(store, cache));
    }

    /// A client key's tenant; worker tokens are refused.
    pub async fn client_tenant(&self, key: &str) -> Result<Tenant, AuthError> {
        Ok(self.client(key).await?.tenant.clone())
    }

    /// A client key's record (its tenant, scope and limits); worker tokens are refused.
    pub async fn client(&self, key: &str) -> Result<Arc<ApiKeyRecord>, AuthError> {
        let record = self.lookup(key).await?;
        match record.kind {
            KeyKind::Client => Ok(record),
            KeyKind::Worker => Err(AuthError::WrongKind {
                expected: KeyKind::Client,
            }),
        }
    }

    /// A worker token's record; client keys are refused.
    pub async fn worker(&self, key: &str) -> Result<ApiKeyRecord, AuthError> {
        let record = self.lookup(key).await?;
        match record.kind {
            KeyKind::Worker => Ok(ApiKeyRecord::clone(&record)),
            KeyKind::Client => Err(AuthError::WrongKind {
                expected: KeyKind::Worker,
            }),
        }
    }

    async fn lookup(&self, key: &str) -> Result<Arc<ApiKeyRecord>, AuthError> {
        let hash = hash_key(key);
        // The cache is keyed by the full hash of a key already proven valid; the constant-time
        // comparison below guards the store's lookup by hash.
        if let Some(r) = self.cache.keys.get(&hash) {
            return Ok(r);
        }
        let generation = *self
            .cache
            .generation
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let record = self.store.key_by_hash(&hash).await?;
        match record {
            Some(r) if bool::from(r.key_hash.ct_eq(&hash)) && r.revoked_at.is_none() => {
                let r = Arc::new(r);
                let now = self
                    .cache
                    .generation
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                if *now == generation {
                    self.cache.keys.insert(hash, r.clone());
                }
                Ok(r)
            }
            Some(r) if r.revoked_at.is_some() => Err(AuthError::Revoked),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// Why a key does not let a request in. The API turns each into its envelope (`error` module).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid API key")]
    Invalid,
    #[error("this API key has been revoked")]
    Revoked,
    /// A worker token where a client key belongs, or the other way round.
    #[error("a {} key is needed here", expected.as_str())]
    WrongKind { expected: KeyKind },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Empties `cache` whenever the store's revocation revision moves; ends with the cache.
async fn watch_revocations(store: Arc<dyn Store>, cache: Weak<KeyCache>) {
    let mut seen = None;
    let mut failing = false;
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(REVOCATION_CHECK).await;
        }
        first = false;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        // A read that hangs (a half-dead connection) must count as a failure, or revoked keys
        // would keep working for as long as it hangs.
        let read = tokio::time::timeout(REVOCATION_CHECK, store.keys_revision()).await;
        let read =
            read.unwrap_or_else(|_| Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut.into())));
        match read {
            Ok(revision) => {
                failing = false;
                // The first reading also empties the cache: whatever was cached before it was
                // read against an unknown revision.
                if seen != Some(revision) {
                    let mut generation =
                        cache.generation.write().unwrap_or_else(|p| p.into_inner());
                    *generation += 1;
                    cache.keys.clear();
                }
                seen = Some(revision);
            }
            Err(e) => {
                // A store that cannot be read cannot tell us of revocations either: forget what
                // we cached, so that keys are checked against the store again once it is back.
                let mut generation = cache.generation.write().unwrap_or_else(|p| p.into_inner());
                *generation += 1;
                cache.keys.clear();
                if !failing {
                    tracing::warn!(error = %crate::report::error_chain(&e), "cannot check for revoked keys; the key cache is emptied until the store answers");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_carry_256_random_bits_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 43);
        assert_eq!(key_prefix(&a).len(), 10);
    }

    /// The stored hash is what is looked up and compared: the key opens, and nothing near it
    /// does (what listings show of it, a changed last character, a differing case).
    #[tokio::test]
    async fn only_the_whole_key_matches_its_stored_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("t.db"))
                .await
                .unwrap(),
        );
        let (record, key) = create_key(store.as_ref(), KeyKind::Client, "a", None)
            .await
            .unwrap();
        assert_eq!(record.key_hash, hash_key(&key).to_vec());
        let auth = Authenticator::new(store);
        assert_eq!(auth.client(&key).await.unwrap().id, record.id);
        let mut last_changed = key.clone();
        let last = last_changed.pop().unwrap();
        last_changed.push(if last == 'A' { 'B' } else { 'A' });
        for near in [
            key_prefix(&key),
            key[..key.len() - 1].to_owned(),
            last_changed,
            key.to_uppercase(),
            format!("{key} "),
            hex::encode(hash_key(&key)),
        ] {
            assert!(
                matches!(auth.client(&near).await, Err(AuthError::Invalid)),
                "{near:?} was let in"
            );
        }
    }

    #[test]
    fn a_short_key_is_shown_as_a_fingerprint_of_its_hash() {
        let shown = key_prefix("letmein");
        assert!(shown.starts_with("sha256:") && shown.len() == 15, "{shown}");
        assert!(!shown.contains("letme"));
        assert_ne!(shown, key_prefix("letmeout"));
    }
}
