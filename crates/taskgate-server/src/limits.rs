//! Per-key limits: requests per minute and concurrent unfinished tasks, held across every node
//! that shares one database without a store write per request (docs/gateway.md, "Per-key
//! limits and scopes").
//!
//! Concurrency model. Each node keeps, per key, its own request counts in 10-second buckets
//! (atomics in a ring; a request is a `fetch_add` and a dozen loads) and a copy of the other
//! nodes' counts. A background task ([`Limiter::start`]) every [`SYNC_INTERVAL`] writes this
//! node's changed buckets (one multi-row upsert for every active key) and reads the others'
//! sums; a request is admitted while the others' sum plus this node's stays within the limit.
//! A node that holds the store alone (SQLite) has no others and skips the sync: its counts
//! are exact.
//!
//! Unfinished tasks work the same way: a per-key count read from the store every
//! [`REFRESH_INTERVAL`] (one grouped count), plus this node's submits since that read. A task
//! that ends frees its place at the next read.
//!
//! The only lock a request may take is the key map's read lock, and a key's roll lock once per
//! bucket; the background task takes the write lock to add keys and drop idle ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::domain::now_ms;
use crate::store::{ApiKeyRecord, KeyUsage, Store, StoreError};

/// Width of a request-count bucket.
pub const BUCKET_MS: i64 = 10_000;
/// Buckets a minute's count covers: the current one and the six before. Any 60 s lies within
/// seven buckets, so a key never gets more than its limit in any 60 s on one node; the price
/// is that a refusal may last up to one bucket longer than a true sliding minute would.
const WINDOW: i64 = 7;
/// Ring slots per key: more than [`WINDOW`], so the slot a new bucket takes is never counted.
const SLOTS: usize = 8;
/// How often a node writes its counts and reads the other nodes' (when it shares the store).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// How often the unfinished tasks of every key are counted from the store, at most: a count
/// that took longer than a tenth of this waits ten times its own length before the next, so
/// the count never takes more than a tenth of a database connection's time.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The server's defaults (`[limits]`), for keys that set none; 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub requests_per_minute: u32,
    pub concurrent_tasks: u32,
}

/// Why a request was refused, and when it may pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub retry_after: Duration,
}

#[derive(Default)]
struct Slot {
    bucket: AtomicI64,
    count: AtomicU64,
}

/// One key's counters on this node.
#[derive(Default)]
struct KeyState {
    /// This node's requests per bucket.
    mine: [Slot; SLOTS],
    /// The other nodes' summed requests per bucket, as of the last sync.
    others: [Slot; SLOTS],
    /// Taken only to start a new bucket in a slot (once per bucket).
    roll: Mutex<()>,
    /// Unfinished tasks in the store at the last refresh.
    unfinished_stored: AtomicU64,
    /// This node's submits since the last refresh began (less any that failed).
    unfinished_local: AtomicU64,
}

impl KeyState {
    /// This node's slot for `bucket`, emptied first if it held an older bucket.
    fn my_slot(&self, bucket: i64) -> &Slot {
        let slot = &self.mine[slot_of(bucket)];
        if slot.bucket.load(Ordering::Acquire) != bucket {
            let _rolling = self.roll.lock().unwrap_or_else(|p| p.into_inner());
            if slot.bucket.load(Ordering::Acquire) != bucket {
                slot.count.store(0, Ordering::Relaxed);
                slot.bucket.store(bucket, Ordering::Release);
            }
        }
        slot
    }

    /// Requests counted per bucket of the window ending at `bucket`, oldest first, leaving out
    /// this node's current bucket (which the caller counts itself).
    fn window(&self, bucket: i64) -> [u64; WINDOW as usize] {
        let mut counts = [0; WINDOW as usize];
        for (i, b) in (bucket - WINDOW + 1..=bucket).enumerate() {
            let slot = slot_of(b);
            let mut n = count_in(&self.others[slot], b);
            if b != bucket {
                n += count_in(&self.mine[slot], b);
            }
            counts[i] = n;
        }
        counts
    }

    fn idle(&self, bucket: i64) -> bool {
        let quiet = |slots: &[Slot; SLOTS]| {
            slots
                .iter()
                .all(|s| s.bucket.load(Ordering::Relaxed) <= bucket - WINDOW)
        };
        quiet(&self.mine)
            && quiet(&self.others)
            && self.unfinished_stored.load(Ordering::Relaxed) == 0
            && self.unfinished_local.load(Ordering::Relaxed) == 0
    }
}

fn slot_of(bucket: i64) -> usize {
    bucket.rem_euclid(SLOTS as i64) as usize
}

fn count_in(slot: &Slot, bucket: i64) -> u64 {
    if slot.bucket.load(Ordering::Acquire) == bucket {
        slot.count.load(Ordering::Relaxed)
    } else {
        0
    }
}

/// The node's limiter, shared by every request (`AppState::limits`).
pub struct Limiter {
    defaults: Defaults,
    keys: RwLock<HashMap<String, Arc<KeyState>>>,
    /// This process's name in `key_usage` (random per start: a restarted node's old rows age out).
    node: String,
}

impl Limiter {
    pub fn new(defaults: Defaults) -> Arc<Self> {
        Arc::new(Limiter {
            defaults,
            keys: RwLock::new(HashMap::new()),
            node: crate::domain::new_id("node"),
        })
    }

    /// Starts the background sync (only where other nodes share the store) and the unfinished
    /// tasks' refresh; both end when the limiter is dropped.
    pub fn start(self: &Arc<Self>, store: Arc<dyn Store>) {
        if !store.exclusive() {
            tokio::spawn(sync_usage(Arc::downgrade(self), store.clone()));
        }
        tokio::spawn(refresh_unfinished(Arc::downgrade(self), store));
    }

    /// Counts one request of `key` against its requests per minute, or refuses it (uncounted).
    pub fn admit_request(&self, key: &ApiKeyRecord) -> Result<(), Refusal> {
        self.admit_request_at(key, now_ms())
    }

    fn admit_request_at(&self, key: &ApiKeyRecord, now: i64) -> Result<(), Refusal> {
        let limit = key
            .policy
            .requests_per_minute
            .unwrap_or(self.defaults.requests_per_minute);
        if limit == 0 {
            return Ok(());
        }
        let state = self.state(&key.id);
        let bucket = now.div_euclid(BUCKET_MS);
        let slot = state.my_slot(bucket);
        let window = state.window(bucket);
        let before: u64 = window.iter().sum();
        // Counted first, then checked: two requests racing for the last place cannot both pass.
        let mine = slot.count.fetch_add(1, Ordering::Relaxed) + 1;
        if before + mine <= u64::from(limit) {
            return Ok(());
        }
        slot.count.fetch_sub(1, Ordering::Relaxed);
        // The oldest buckets leave the window one by one; wait for the first moment the rest
        // leaves room for one more.
        let mut total = before + mine - 1;
        let mut wait_buckets = WINDOW;
        for (k, n) in window.iter().enumerate() {
            total -= n;
            if total < u64::from(limit) {
                wait_buckets = k as i64 + 1;
                break;
            }
        }
        let retry_at = (bucket + wait_buckets) * BUCKET_MS;
        Err(Refusal {
            message: format!(
                "this key has used its {limit} requests per minute (requests_per_minute); retry after the Retry-After header's seconds"
            ),
            retry_after: Duration::from_millis(u64::try_from(retry_at - now).unwrap_or(1000)),
        })
    }

    /// Reserves places for `n` new unfinished tasks of `key`, or refuses (reserving nothing).
    /// A submit that then fails gives them back with [`Limiter::release_tasks`].
    pub fn reserve_tasks(&self, key: &ApiKeyRecord, n: u64) -> Result<(), Refusal> {
        let limit = key
            .policy
            .concurrent_tasks
            .unwrap_or(self.defaults.concurrent_tasks);
        if limit == 0 {
            return Ok(());
        }
        let state = self.state(&key.id);
        let local = state.unfinished_local.fetch_add(n, Ordering::Relaxed) + n;
        let stored = state.unfinished_stored.load(Ordering::Relaxed);
        if stored + local <= u64::from(limit) {
            return Ok(());
        }
        state.unfinished_local.fetch_sub(n, Ordering::Relaxed);
        let plural = if n == 1 { "" } else { "s" };
        Err(Refusal {
            message: format!(
                "this key may have {limit} unfinished tasks at once (concurrent_tasks) and has {}: {n} more task{plural} would pass it; retry when some finish",
                (stored + local - n).min(u64::from(limit))
            ),
            retry_after: REFRESH_INTERVAL,
        })
    }

    /// Gives back places reserved for tasks that were not stored after all.
    pub fn release_tasks(&self, key: &ApiKeyRecord, n: u64) {
        if let Some(state) = self.existing(&key.id) {
            // Never below 0: a refresh may have taken the reservation into its count already.
            let _ =
                state
                    .unfinished_local
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(n))
                    });
        }
    }

    fn existing(&self, key_id: &str) -> Option<Arc<KeyState>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(key_id).cloned()
    }

    fn state(&self, key_id: &str) -> Arc<KeyState> {
        if let Some(s) = self.existing(key_id) {
            return s;
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.entry(key_id.to_owned()).or_default().clone()
    }

    fn snapshot(&self) -> Vec<(String, Arc<KeyState>)> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    /// Forgets keys with nothing counted in the window and no unfinished tasks.
    fn drop_idle(&self, bucket: i64) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.retain(|_, s| !s.idle(bucket));
    }
}

/// Writes this node's changed counts and reads the others', every [`SYNC_INTERVAL`].
async fn sync_usage(limiter: Weak<Limiter>, store: Arc<dyn Store>) {
    // What this task last wrote, so that only changed buckets are written again.
    let mut written: HashMap<(String, i64), u64> = HashMap::new();
    let mut failing = false;
    loop {
        tokio::time::sleep(SYNC_INTERVAL).await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        let bucket = now_ms().div_euclid(BUCKET_MS);
        let oldest = bucket - WINDOW + 1;
        let mut mine = Vec::new();
        for (key_id, state) in limiter.snapshot() {
            for b in oldest..=bucket {
                let count = count_in(&state.mine[slot_of(b)], b);
                if count > 0 && written.get(&(key_id.clone(), b)) != Some(&count) {
                    mine.push(KeyUsage {
                        key_id: key_id.clone(),
                        bucket: b,
                        count,
                    });
                }
            }
        }
        let read = tokio::time::timeout(
            SYNC_INTERVAL * 4,
            store.sync_key_usage(&limiter.node, &mine, oldest),
        )
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the key usage sync timed out".into(),
            ))
        });
        match read {
            Ok(others) => {
                failing = false;
                written.retain(|(_, b), _| *b >= oldest);
                for u in mine {
                    written.insert((u.key_id, u.bucket), u.count);
                }
                let mut by_key: HashMap<String, Vec<(i64, u64)>> = HashMap::new();
                for u in others {
                    by_key
                        .entry(u.key_id)
                        .or_default()
                        .push((u.bucket, u.count));
                }
                // Keys busy elsewhere get a state here, so a key's first request on this node
                // already sees what the others spent.
                for (key_id, counts) in &by_key {
                    let state = limiter.state(key_id);
                    for (b, n) in counts {
                        let slot = &state.others[slot_of(*b)];
                        slot.count.store(*n, Ordering::Relaxed);
                        slot.bucket.store(*b, Ordering::Release);
                    }
                }
                for (key_id, state) in limiter.snapshot() {
                    let counts = by_key.get(&key_id);
                    for b in oldest..=bucket {
                        if counts.is_none_or(|c| !c.iter().any(|(cb, _)| *cb == b)) {
                            state.others[slot_of(b)].count.store(0, Ordering::Relaxed);
                        }
                    }
                }
                limiter.drop_idle(bucket);
            }
            Err(e) => {
                // Each node then limits on its own counts and the last known others': the
                // limit holds per node, and across nodes once the store answers.
                if !failing {
                    tracing::warn!(error = %crate::report::error_chain(&e), "cannot share per-key request counts with other nodes; limiting on this node's counts until the store answers");
                    failing = true;
                }
            }
        }
    }
}

/// Counts every key's unfinished tasks in the store, every [`REFRESH_INTERVAL`] while this
/// node has keys to limit.
async fn refresh_unfinished(limiter: Weak<Limiter>, store: Arc<dyn Store>) {
    let mut failing = false;
    let mut pause = REFRESH_INTERVAL;
    loop {
        tokio::time::sleep(pause).await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        // Keys quiet for a whole window are forgotten here too (SQLite runs no sync), so a
        // node whose keys all went quiet stops counting.
        limiter.drop_idle(now_ms().div_euclid(BUCKET_MS));
        let before = limiter.snapshot();
        if before.is_empty() {
            continue;
        }
        // This node's submits counted so far are (once committed) in the count about to be
        // read: they are subtracted from the local count after it.
        let taken: Vec<(Arc<KeyState>, u64)> = before
            .into_iter()
            .map(|(_, s)| {
                let n = s.unfinished_local.load(Ordering::Relaxed);
                (s, n)
            })
            .collect();
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(REFRESH_INTERVAL * 30, store.unfinished_by_key())
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the unfinished tasks' count timed out".into(),
                ))
            });
        pause = REFRESH_INTERVAL.max(started.elapsed() * 10);
        match read {
            Ok(rows) => {
                failing = false;
                let counts: HashMap<String, u64> = rows.into_iter().collect();
                for (key_id, state) in limiter.snapshot() {
                    let n = counts.get(&key_id).copied().unwrap_or(0);
                    state.unfinished_stored.store(n, Ordering::Relaxed);
                }
                for (state, n) in taken {
                    let _ = state.unfinished_local.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |v| Some(v.saturating_sub(n)),
                    );
                }
            }
            Err(e) => {
                // Local submits keep counting: the limit errs on the strict side until it reads.
                if !failing {
                    tracing::warn!(error = %crate::report::error_chain(&e), "cannot count unfinished tasks per key; their limit counts this node's submits until the store answers");
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
    use crate::store::{KeyKind, KeyPolicy, Tenant};

    fn key(rpm: u32) -> ApiKeyRecord {
        ApiKeyRecord {
            id: "key_1".into(),
            kind: KeyKind::Client,
            tenant: Tenant {
                id: "ten_1".into(),
                name: "t".into(),
            },
            name: "k".into(),
            prefix: "tg_".into(),
            created_at: 0,
            revoked_at: None,
            key_hash: vec![],
            policy: KeyPolicy {
                requests_per_minute: Some(rpm),
                ..KeyPolicy::default()
            },
        }
    }

    fn limiter() -> Arc<Limiter> {
        Limiter::new(Defaults {
            requests_per_minute: 10_000,
            concurrent_tasks: 1000,
        })
    }

    #[test]
    fn a_key_gets_its_limit_in_a_minute_and_waits_for_the_oldest_bucket_to_leave() {
        let l = limiter();
        let k = key(3);
        // One request in an early bucket, two in a later one.
        l.admit_request_at(&k, 1_000).unwrap();
        l.admit_request_at(&k, 21_000).unwrap();
        l.admit_request_at(&k, 22_000).unwrap();
        let refused = l.admit_request_at(&k, 25_000).unwrap_err();
        // Bucket 0 leaves the window at 70 s: room for one then.
        assert_eq!(refused.retry_after, Duration::from_millis(70_000 - 25_000));
        assert!(l.admit_request_at(&k, 69_999).is_err());
        l.admit_request_at(&k, 70_000).unwrap();
        assert!(l.admit_request_at(&k, 70_001).is_err());
    }

    #[test]
    fn other_nodes_counts_take_from_the_same_budget() {
        let l = limiter();
        let k = key(5);
        let state = l.state(&k.id);
        state.others[slot_of(2)].count.store(4, Ordering::Relaxed);
        state.others[slot_of(2)].bucket.store(2, Ordering::Release);
        l.admit_request_at(&k, 25_000).unwrap();
        assert!(l.admit_request_at(&k, 25_001).is_err());
    }

    #[test]
    fn zero_is_unlimited_and_reservations_are_given_back() {
        let l = limiter();
        let free = key(0);
        for i in 0..100 {
            l.admit_request_at(&free, i).unwrap();
        }
        let mut k = key(0);
        k.policy.concurrent_tasks = Some(2);
        l.reserve_tasks(&k, 2).unwrap();
        assert!(l.reserve_tasks(&k, 1).is_err());
        l.release_tasks(&k, 1);
        l.reserve_tasks(&k, 1).unwrap();
    }
}
