//! The store conformance suite: every test runs against SQLite and against PostgreSQL
//! (`TEST_DATABASE_URL`; each test in its own schema). Without the variable the PostgreSQL half
//! says so and passes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Map;
use taskgate_proto::{TaskState, WebhookEvent};
use taskgate_server::domain::fail_code;
use taskgate_server::domain::{EventMask, Task, Transition};
use taskgate_server::store::postgres::PostgresStore;
use taskgate_server::store::sqlite::SqliteStore;
use taskgate_server::store::{
    Blob, CancelOutcome, DeliveryAttempt, DeliveryNext, HostRoom, IdempotencyKey, KeyKind,
    KeyPolicy, KeyUsage, KeyedInsert, NewTask, Outcome, Redeliver, Rotation, Runner, Store,
    StoreEvent, TaskQuery,
};

const LEASE: Duration = Duration::from_secs(30);
/// Room for any number of requests per host.
const ROOM: HostRoom = HostRoom {
    per_host: usize::MAX,
    limited: Vec::new(),
};

/// Says that a test skipped its work, past the harness's output capture (an `eprintln!` of a
/// passing test would be hidden).
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// A fresh store and whatever keeps it alive.
struct Fixture {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Fixture {
    async fn finish(self) {
        self.store.close().await;
        if let Some(schema) = self.schema {
            drop_schema(&schema).await;
        }
    }
}

/// Leaves the shared test database as it was.
async fn drop_schema(schema: &str) {
    let url = std::env::var("TEST_DATABASE_URL").unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

async fn sqlite() -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    Some(Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
        schema: None,
    })
}

async fn postgres() -> Option<Fixture> {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        skip("PostgreSQL half of the store suite (set TEST_DATABASE_URL)");
        return None;
    };
    let schema = format!("t_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    let store = PostgresStore::connect(&url, Some(&schema)).await.unwrap();
    Some(Fixture {
        store: Arc::new(store),
        _dir: None,
        schema: Some(schema),
    })
}

fn new_task(id: &str, model: &str, now: i64) -> NewTask {
    NewTask {
        id: id.into(),
        tenant_id: "ten_1".into(),
        model: model.into(),
        input: Map::new(),
        callback_url: None,
        max_attempts: 2,
        create_time: now,
        priority: 0,
        expires_at: None,
        webhook_events: EventMask::DEFAULT,
        trace_parent: None,
        key_id: None,
    }
}

fn callback_task(id: &str) -> NewTask {
    NewTask {
        callback_url: Some("https://example.com/hook".into()),
        ..new_task(id, "m", 1)
    }
}

/// Defines `mod NAME { sqlite, postgres }` running one async body against each store.
macro_rules! conformance {
    ($($name:ident($s:ident) $body:block)*) => {$(
        mod $name {
            use super::*;
            async fn check($s: Arc<dyn Store>) $body
            #[tokio::test]
            async fn sqlite() {
                let f = super::sqlite().await.unwrap();
                check(f.store.clone()).await;
                f.finish().await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(f) = super::postgres().await {
                    check(f.store.clone()).await;
                    f.finish().await;
                }
            }
        }
    )*};
}

conformance! {
    a_batch_claim_takes_up_to_its_limit_within_the_running_limit_with_distinct_tokens(s) {
        for i in 0..6 {
            s.insert_task(new_task(&format!("task_{i}"), "m", 1)).await.unwrap();
        }
        let first = s.claim_batch("m", 10, LEASE, 4, 3, Runner::Local).await.unwrap();
        assert_eq!(first.iter().map(|c| c.task.id.as_str()).collect::<Vec<_>>(), ["task_0", "task_1", "task_2"]);
        let tokens: std::collections::HashSet<&str> = first.iter().map(|c| c.token.as_str()).collect();
        assert_eq!(tokens.len(), 3, "each claim has its own token");
        // Only one more fits under the running limit of 4.
        let second = s.claim_batch("m", 10, LEASE, 4, 10, Runner::Local).await.unwrap();
        assert_eq!(second.len(), 1);
        assert!(s.claim_batch("m", 10, LEASE, 4, 10, Runner::Local).await.unwrap().is_empty());
        // Every token finishes its own task, and only its own.
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(!s.finish("task_0", &first[1].token, &ok, 20).await.unwrap());
        for c in first.iter().chain(&second) {
            assert!(s.finish(&c.task.id, &c.token, &ok, 20).await.unwrap());
        }
        assert_eq!(s.claim_batch("m", 30, LEASE, 4, 10, Runner::Local).await.unwrap().len(), 2);
    }

    a_claim_respects_the_models_running_limit(s) {
        for id in ["task_a", "task_b", "task_c"] {
            s.insert_task(new_task(id, "m", 1)).await.unwrap();
        }
        let a = s.claim("m", 10, LEASE, 2).await.unwrap().unwrap();
        s.claim("m", 10, LEASE, 2).await.unwrap().unwrap();
        assert!(s.claim("m", 10, LEASE, 2).await.unwrap().is_none(), "two are running");
        s.finish(&a.task.id, &a.token, &Outcome::Success { outputs: vec![], blobs: vec![] }, 11).await.unwrap();
        assert_eq!(s.claim("m", 12, LEASE, 2).await.unwrap().unwrap().task.id, "task_c");
    }

    a_claim_takes_the_oldest_pending_task_of_its_model_only(s) {
        s.insert_task(new_task("task_b", "m", 1)).await.unwrap();
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        s.insert_task(new_task("task_c", "other", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, "task_a");
        assert_eq!(c.task.state, TaskState::Processing);
        assert_eq!(c.task.attempts, 1);
        let c2 = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c2.task.id, "task_b");
        assert!(s.claim("m", 10, LEASE, 10).await.unwrap().is_none());
    }

    the_final_state_is_written_once_and_only_by_the_claim_holder(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        let ok = Outcome::Success { outputs: vec!["task_a/x.png".into()], blobs: vec![] };
        assert!(!s.finish("task_a", "att_stale", &ok, 20).await.unwrap());
        assert!(s.finish("task_a", &c.token, &ok, 20).await.unwrap());
        let fail = Outcome::Failure { code: "X".into(), message: "y".into() };
        assert!(!s.finish("task_a", &c.token, &fail, 30).await.unwrap());
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Success);
        assert_eq!(t.outputs, vec!["task_a/x.png".to_string()]);
        assert_eq!(t.complete_time, Some(20));
        assert_eq!(t.fail_code, None);
    }

    an_expired_lease_requeues_until_attempts_run_out(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c1 = s.claim("m", 10, Duration::ZERO, 10).await.unwrap().unwrap();
        let r = s.recover_expired(100).await.unwrap();
        assert_eq!(r.requeued, vec!["task_a".to_string()]);
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(!s.finish("task_a", &c1.token, &ok, 101).await.unwrap(), "a stale holder cannot finish");
        let c2 = s.claim("m", 200, Duration::ZERO, 10).await.unwrap().unwrap();
        assert_eq!(c2.task.attempts, 2);
        let r = s.recover_expired(300).await.unwrap();
        assert_eq!(r.failed, vec!["task_a".to_string()]);
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.fail_code.as_deref(), Some(fail_code::ATTEMPTS_EXHAUSTED));
    }

    a_live_lease_is_not_recovered(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert!(s.recover_expired(20).await.unwrap().requeued.is_empty());
        assert!(s.renew_lease("task_a", &c.token, 10 + 30_000, LEASE, Some(0.5)).await.unwrap());
        assert!(s.recover_expired(40_000).await.unwrap().requeued.is_empty());
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().progress, Some(0.5));
        assert!(!s.renew_lease("task_a", "att_other", 1, LEASE, None).await.unwrap());
    }

    a_requeued_task_waits_for_its_run_after_time(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert!(s.requeue("task_a", &c.token, 500, true).await.unwrap());
        assert!(s.claim("m", 499, LEASE, 10).await.unwrap().is_none());
        assert_eq!(s.next_due("m").await.unwrap(), Some(500));
        let c = s.claim("m", 500, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.attempts, 1, "the refunded attempt does not count");
    }

    concurrent_inserts_are_all_durable(s) {
        let mut handles = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                s.insert_task(new_task(&format!("task_{i:04}"), "m", 1)).await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let mut n = 0;
        while s.claim("m", 10, LEASE, usize::MAX).await.unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 200);
    }

    a_duplicate_id_fails_only_its_own_insert(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let (a, b) = tokio::join!(
            s.insert_task(new_task("task_a", "m", 1)),
            s.insert_task(new_task("task_b", "m", 1)),
        );
        assert!(a.is_err());
        b.unwrap();
        assert!(s.get_task("task_b").await.unwrap().is_some());
    }

    a_setting_keeps_its_first_value(s) {
        assert_eq!(s.setting_or_init("k", b"one").await.unwrap(), b"one");
        assert_eq!(s.setting_or_init("k", b"two").await.unwrap(), b"one");
    }

    keys_belong_to_tenants_and_can_be_revoked(s) {
        let t = s.create_tenant("acme").await.unwrap();
        assert!(s.create_tenant("acme").await.is_err());
        assert_eq!(s.tenant_by_name("acme").await.unwrap(), Some(t.clone()));
        let k = s.insert_key(KeyKind::Client, &t, "ci", "tg_abcdefg", &[1, 2, 3], &KeyPolicy::default()).await.unwrap();
        let found = s.key_by_hash(&[1, 2, 3]).await.unwrap().unwrap();
        assert_eq!(found.tenant, t);
        assert_eq!(found.revoked_at, None);
        assert!(s.revoke_key(&k.id, 5).await.unwrap());
        assert!(!s.revoke_key(&k.id, 6).await.unwrap());
        assert_eq!(s.key_by_hash(&[1, 2, 3]).await.unwrap().unwrap().revoked_at, Some(5));
        let w = s.insert_key(KeyKind::Worker, &t, "gpu", "tgw_abcdef", &[4], &KeyPolicy::default()).await.unwrap();
        assert_eq!(s.key_by_hash(&[4]).await.unwrap().unwrap().kind, KeyKind::Worker);
        assert_eq!(s.key_by_hash(&[1, 2, 3]).await.unwrap().unwrap().kind, KeyKind::Client);
        assert!(w.id.starts_with("wkr_"));
        assert_eq!(s.list_keys().await.unwrap().len(), 2);
        assert!(s.key_by_hash(&[9]).await.unwrap().is_none());
    }

    a_keys_scope_and_limits_round_trip_and_an_update_moves_the_revision(s) {
        let t = s.create_tenant("acme").await.unwrap();
        let policy = KeyPolicy {
            models: Some(vec!["echo".into(), "sd".into()]),
            read_only: true,
            requests_per_minute: Some(60),
            concurrent_tasks: Some(0),
        };
        let k = s.insert_key(KeyKind::Client, &t, "ci", "tg_abc", &[1], &policy).await.unwrap();
        assert_eq!(k.policy, policy);
        assert_eq!(s.key_by_hash(&[1]).await.unwrap().unwrap().policy, policy);
        let plain = s.insert_key(KeyKind::Client, &t, "p", "tg_p", &[2], &KeyPolicy::default()).await.unwrap();
        assert_eq!(s.key_by_hash(&[2]).await.unwrap().unwrap().policy, KeyPolicy::default());

        let before = s.keys_revision().await.unwrap();
        let widened = KeyPolicy { models: None, read_only: false, ..policy.clone() };
        assert!(s.update_key_policy(&k.id, &widened).await.unwrap());
        assert_eq!(s.key_by_hash(&[1]).await.unwrap().unwrap().policy, widened);
        let after = s.keys_revision().await.unwrap();
        assert_ne!(before, after, "an update must reach the nodes' key caches");
        assert!(!s.update_key_policy("key_none", &widened).await.unwrap());
        assert!(s.revoke_key(&plain.id, 5).await.unwrap());
        assert!(!s.update_key_policy(&plain.id, &widened).await.unwrap(), "a revoked key stays as it was");
        assert_ne!(s.keys_revision().await.unwrap(), after);
    }

    unfinished_tasks_are_counted_by_the_key_that_submitted_them(s) {
        let by = |id: &str, key: Option<&str>| NewTask { key_id: key.map(str::to_owned), ..new_task(id, "m", 1) };
        s.insert_task(by("task_a", Some("key_1"))).await.unwrap();
        s.insert_tasks(vec![by("task_b", Some("key_1")), by("task_c", Some("key_2")), by("task_d", None)]).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        let mut counts = s.unfinished_by_key().await.unwrap();
        counts.sort();
        assert_eq!(counts, vec![("key_1".to_owned(), 2), ("key_2".to_owned(), 1)]);
        // A final task no longer counts.
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish(&c.task.id, &c.token, &ok, 20).await.unwrap());
        let total: u64 = s.unfinished_by_key().await.unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 2);
    }

    key_usage_sums_the_other_nodes_and_forgets_old_buckets(s) {
        let u = |key: &str, bucket: i64, count: u64| KeyUsage { key_id: key.into(), bucket, count };
        assert!(s.sync_key_usage("node_a", &[u("k", 10, 3), u("k", 11, 1)], 5).await.unwrap().is_empty());
        // Absolute counts: a node writing its bucket again replaces its count.
        s.sync_key_usage("node_a", &[u("k", 11, 4)], 5).await.unwrap();
        let seen = s.sync_key_usage("node_b", &[u("k", 11, 2)], 5).await.unwrap();
        let mut seen: Vec<_> = seen.into_iter().map(|x| (x.key_id, x.bucket, x.count)).collect();
        seen.sort();
        assert_eq!(seen, vec![("k".into(), 10, 3), ("k".into(), 11, 4)]);
        let seen = s.sync_key_usage("node_c", &[], 11).await.unwrap();
        let mut seen: Vec<_> = seen.into_iter().map(|x| (x.bucket, x.count)).collect();
        seen.sort();
        assert_eq!(seen, vec![(11, 6)], "bucket 10 is gone; node a and b summed");
    }

    a_final_callback_task_leaves_exactly_one_pending_delivery(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        s.insert_task(new_task("task_b", "m", 1)).await.unwrap();
        for _ in 0..2 {
            let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
            let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
            assert!(s.finish(&c.task.id, &c.token, &ok, 20).await.unwrap());
        }
        let a = s.deliveries_for_task("task_a").await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].0.state, "pending");
        assert!(s.deliveries_for_task("task_b").await.unwrap().is_empty());
        assert_eq!(s.next_delivery_due(&[]).await.unwrap(), Some(20));
    }

    a_task_failed_by_lease_recovery_is_called_back(s) {
        let mut t = callback_task("task_a");
        t.max_attempts = 1;
        s.insert_task(t).await.unwrap();
        s.claim("m", 10, Duration::ZERO, 10).await.unwrap().unwrap();
        assert_eq!(s.recover_expired(100).await.unwrap().failed, vec!["task_a".to_string()]);
        assert_eq!(s.deliveries_for_task("task_a").await.unwrap().len(), 1);
    }

    deliveries_are_claimed_once_retried_and_finished(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        s.finish("task_a", &c.token, &Outcome::Success { outputs: vec![], blobs: vec![] }, 20).await.unwrap();
        let claims = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(claims.len(), 1);
        assert!(s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap().is_empty(), "claimed once");
        let d = &claims[0];
        let attempt = DeliveryAttempt { attempted_at: 21, status_code: Some(500), latency_ms: 3, error: None };
        assert!(!s.finish_delivery_attempt(&d.delivery.id, "dlv_stale", Some(&attempt), DeliveryNext::RetryAt(50), 22).await.unwrap());
        assert!(s.finish_delivery_attempt(&d.delivery.id, &d.token, Some(&attempt), DeliveryNext::RetryAt(50), 22).await.unwrap());
        assert!(s.claim_deliveries(49, 10, LEASE, &ROOM).await.unwrap().is_empty());
        let again = s.claim_deliveries(50, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(again.len(), 1);
        let ok = DeliveryAttempt { attempted_at: 51, status_code: Some(200), latency_ms: 2, error: None };
        s.finish_delivery_attempt(&again[0].delivery.id, &again[0].token, Some(&ok), DeliveryNext::Succeeded, 52).await.unwrap();
        let list = s.deliveries_for_task("task_a").await.unwrap();
        let (d, attempts) = &list[0];
        assert_eq!(d.state, "succeeded");
        assert_eq!(d.attempts, 2);
        assert_eq!(d.last_error.as_deref(), Some("the receiver answered HTTP 500"));
        assert_eq!(attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(), vec![Some(500), Some(200)]);
        assert_eq!(s.redeliver(&d.id, 60, Duration::ZERO).await.unwrap(), Redeliver::Scheduled);
        assert_eq!(s.redeliver("whk_nope", 60, Duration::ZERO).await.unwrap(), Redeliver::NotFound);
        let third = s.claim_deliveries(60, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(s.redeliver(&d.id, 61, Duration::ZERO).await.unwrap(), Redeliver::InFlight);
        assert_eq!(s.recover_expired_deliveries(61).await.unwrap(), 0);
        if s.exclusive() {
            assert_eq!(s.recover_expired_deliveries(60 + 30_001).await.unwrap(), third.len() as u64);
        } else {
            // Shared stores judge delivery leases on their own clock, not the caller's.
            assert_eq!(s.recover_expired_deliveries(i64::MAX).await.unwrap(), 0);
        }
    }

    a_deferred_delivery_counts_no_attempt(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        s.finish("task_a", &c.token, &Outcome::Success { outputs: vec![], blobs: vec![] }, 20).await.unwrap();
        let d = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap().remove(0);
        s.finish_delivery_attempt(&d.delivery.id, &d.token, None, DeliveryNext::Defer(99), 21).await.unwrap();
        let got = s.get_delivery(&d.delivery.id).await.unwrap().unwrap();
        assert_eq!((got.attempts, got.next_attempt_at, got.state.as_str()), (0, 99, "pending"));
    }

    a_parked_claim_is_made_by_the_submit_of_its_model_and_a_withdrawn_one_takes_nothing(s) {
        use tokio_util::sync::CancellationToken;
        let never = CancellationToken::new();
        if !s.parks_claims() {
            // Answers at once, like claim_batch.
            assert!(s.claim_parked("m", LEASE, 10, 5, &never).await.unwrap().is_empty());
            return;
        }
        let now = taskgate_server::domain::now_ms();
        let park = |token: CancellationToken| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_parked("m", LEASE, 10, 5, &token).await })
        };
        let parked = park(never.clone());
        // A submit of another model, and a poke, leave it parked (nothing of "m" is due).
        s.insert_task(new_task("task_other", "other", now)).await.unwrap();
        s.poke("m").await;
        s.insert_task(new_task("task_other2", "other", now)).await.unwrap();
        assert!(!parked.is_finished(), "a parked claim answered with nothing due");
        // The submit of its model is claimed in the submit's own commit: by the time the insert
        // returns, the task is processing.
        s.insert_task(new_task("task_a", "m", now)).await.unwrap();
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().state, TaskState::Processing);
        let claims = parked.await.unwrap().unwrap();
        assert_eq!(claims.iter().map(|c| c.task.id.as_str()).collect::<Vec<_>>(), ["task_a"]);
        assert_eq!(claims[0].task.attempts, 1);
        assert_eq!(s.get_task("task_other").await.unwrap().unwrap().state, TaskState::Pending);

        // Withdrawn (as on shutdown) with nothing taken: it answers at once with nothing, and the
        // next submit stays pending, its attempt uncounted, for whoever claims next.
        let stop = CancellationToken::new();
        let withdrawn = park(stop.clone());
        s.insert_task(new_task("task_other3", "other", now)).await.unwrap();
        stop.cancel();
        assert!(withdrawn.await.unwrap().unwrap().is_empty());
        s.insert_task(new_task("task_b", "m", now)).await.unwrap();
        let b = s.get_task("task_b").await.unwrap().unwrap();
        assert_eq!((b.state, b.attempts), (TaskState::Pending, 0));
        let c = s.claim("m", now, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, "task_b");

        // Withdrawn around the moment it took a task: the task is never lost. Either the answer
        // landed first and the caller gets it, or the withdrawal did and the writer handed it
        // back to pending, its attempt uncounted.
        let stop = CancellationToken::new();
        let taken = park(stop.clone());
        s.insert_task(new_task("task_other4", "other", now)).await.unwrap();
        s.insert_task(new_task("task_c", "m", now)).await.unwrap();
        stop.cancel();
        let claims = taken.await.unwrap().unwrap();
        if claims.is_empty() {
            // The hand-back runs on the writer thread right after its failed answer, so once a
            // later write has gone through the thread, it has landed.
            s.insert_task(new_task("task_after", "other", now)).await.unwrap();
            let c = s.get_task("task_c").await.unwrap().unwrap();
            assert_eq!((c.state, c.attempts), (TaskState::Pending, 0));
            assert_eq!(s.claim("m", now, LEASE, 10).await.unwrap().unwrap().task.id, "task_c");
        } else {
            assert_eq!(claims.iter().map(|c| c.task.id.as_str()).collect::<Vec<_>>(), ["task_c"]);
        }

        // Dropped (the caller went away) after it parked: the next submit stays pending.
        let dropped = park(never.clone());
        s.insert_task(new_task("task_other5", "other", now)).await.unwrap();
        dropped.abort();
        let _ = dropped.await;
        s.insert_task(new_task("task_d", "m", now)).await.unwrap();
        let d = s.get_task("task_d").await.unwrap().unwrap();
        assert_eq!((d.state, d.attempts), (TaskState::Pending, 0));
    }

    a_failed_insert_keeps_its_cause_so_an_outage_is_not_taken_for_bad_input(s) {
        // A closed pool fails like a lost database: the caller must learn it is unavailable
        // (503), not that its row was invalid (500).
        s.close().await;
        let e = s.insert_task(new_task("task_a", "m", 1)).await.unwrap_err();
        assert!(matches!(e, taskgate_server::store::StoreError::Unavailable(_)), "{e:?}");
    }

    webhook_secrets_rotate_and_keep_the_previous_one(s) {
        let first = s.webhook_secrets("ten_1", "whsec_a").await.unwrap();
        assert_eq!(first.current, "whsec_a");
        assert_eq!(s.webhook_secrets("ten_1", "whsec_b").await.unwrap().current, "whsec_a");
        let Rotation::Rotated(rotated) = s.rotate_webhook_secret("ten_1", "whsec_c", 10, 1000).await.unwrap() else {
            panic!("the first rotation is refused");
        };
        assert_eq!(rotated.current, "whsec_c");
        assert_eq!(rotated.previous.as_deref(), Some("whsec_a"));
        assert_eq!(rotated.previous_expires_at, Some(1000));
        // While whsec_a still signs, a second rotation changes nothing.
        let refused = s.rotate_webhook_secret("ten_1", "whsec_d", 999, 2000).await.unwrap();
        assert_eq!(refused, Rotation::OverlapRunning(rotated));
        let Rotation::Rotated(again) = s.rotate_webhook_secret("ten_1", "whsec_d", 1000, 2000).await.unwrap() else {
            panic!("a rotation after the overlap is refused");
        };
        assert_eq!((again.current.as_str(), again.previous.as_deref()), ("whsec_d", Some("whsec_c")));
    }

    manual_retries_are_spaced_per_delivery(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        s.finish("task_a", &c.token, &Outcome::Success { outputs: vec![], blobs: vec![] }, 20).await.unwrap();
        let d = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap().remove(0);
        s.finish_delivery_attempt(&d.delivery.id, &d.token, None, DeliveryNext::Failed, 21).await.unwrap();
        let gap = Duration::from_secs(10);
        assert_eq!(s.redeliver(&d.delivery.id, 1_000, gap).await.unwrap(), Redeliver::Scheduled);
        assert_eq!(s.redeliver(&d.delivery.id, 5_000, gap).await.unwrap(), Redeliver::TooSoon { retry_at: 11_000 });
        assert_eq!(s.redeliver(&d.delivery.id, 11_000, gap).await.unwrap(), Redeliver::Scheduled);
        assert_eq!(s.redeliver("whk_nope", 11_000, gap).await.unwrap(), Redeliver::NotFound);
    }

    claims_respect_each_hosts_room_and_skip_blocked_hosts(s) {
        let urls = ["https://a.example/1", "https://a.example/2?x", "https://a.example/3", "http://b.example:8080/1", "http://b.example:8080/2"];
        for (i, url) in urls.iter().enumerate() {
            let mut t = callback_task(&format!("task_{i}"));
            t.callback_url = Some((*url).into());
            s.insert_task(t).await.unwrap();
            let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
            s.finish(&c.task.id, &c.token, &Outcome::Success { outputs: vec![], blobs: vec![] }, 20 + i as i64).await.unwrap();
        }
        let room = HostRoom { per_host: 2, limited: vec![("http://b.example:8080".into(), 0)] };
        let claimed = s.claim_deliveries(100, 10, LEASE, &room).await.unwrap();
        let hosts: Vec<&str> = claimed.iter().map(|c| c.delivery.host.as_str()).collect();
        assert_eq!(hosts, ["https://a.example", "https://a.example"], "two for a, none for blocked b");
        assert_eq!(s.next_delivery_due(&["http://b.example:8080".into()]).await.unwrap(), Some(22));
        assert_eq!(s.next_delivery_due(&[]).await.unwrap(), Some(22));
        // b's circuit opens: its backlog moves in one statement.
        assert_eq!(s.defer_host("http://b.example:8080", 5_000).await.unwrap(), 2);
        assert_eq!(s.next_delivery_due(&["https://a.example".into()]).await.unwrap(), Some(5_000));
        let rest = s.claim_deliveries(5_000, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(rest.len(), 3);
    }
}

/// PostgreSQL only: the concurrency cap holds across stores (nodes) sharing one database.
#[tokio::test]
async fn concurrency_holds_across_nodes_sharing_postgres() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        skip("concurrency_holds_across_nodes_sharing_postgres (set TEST_DATABASE_URL)");
        return;
    };
    let schema = format!("t_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    let a = Arc::new(PostgresStore::connect(&url, Some(&schema)).await.unwrap());
    let b = Arc::new(PostgresStore::connect(&url, Some(&schema)).await.unwrap());
    for i in 0..20 {
        a.insert_task(new_task(&format!("task_{i:02}"), "m", 1))
            .await
            .unwrap();
    }
    // Many racing claims from two "nodes" with a cap of 3.
    let mut handles = Vec::new();
    for i in 0..16 {
        let s: Arc<dyn Store> = if i % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            s.claim("m", 10, LEASE, 3).await.unwrap()
        }));
    }
    let mut claimed = 0;
    for h in handles {
        claimed += usize::from(h.await.unwrap().is_some());
    }
    assert_eq!(claimed, 3);
    a.close().await;
    b.close().await;
    drop_schema(&schema).await;
}

/// Puts `task_a` of model `m` into `state` through the store's own writes; returns the claim
/// token when the task was claimed on the way.
async fn task_in(s: &dyn Store, state: TaskState) -> Option<String> {
    // With a deadline after every claim of the walk, so that Expire can be tried from any state.
    let task = NewTask {
        expires_at: Some(100),
        ..new_task("task_a", "m", 1)
    };
    s.insert_task(task).await.unwrap();
    if state == TaskState::Pending {
        return None;
    }
    let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
    let outcome = match state {
        TaskState::Success => Outcome::Success {
            outputs: vec![],
            blobs: vec![],
        },
        TaskState::Failed => Outcome::Failure {
            code: "X".into(),
            message: "y".into(),
        },
        _ => return Some(c.token),
    };
    assert!(s.finish("task_a", &c.token, &outcome, 20).await.unwrap());
    Some(c.token)
}

/// Attempts `t` on `task_a` with whatever proof it needs; returns whether the store made it.
async fn attempt(s: &dyn Store, t: Transition, token: Option<&str>) -> bool {
    let token = token.unwrap_or("att_none");
    match t {
        Transition::Claim => s.claim("m", 30, LEASE, 10).await.unwrap().is_some(),
        Transition::Requeue => s.requeue("task_a", token, 30, false).await.unwrap(),
        Transition::Succeed => s
            .finish(
                "task_a",
                token,
                &Outcome::Success {
                    outputs: vec![],
                    blobs: vec![],
                },
                30,
            )
            .await
            .unwrap(),
        Transition::Fail => s
            .finish(
                "task_a",
                token,
                &Outcome::Failure {
                    code: "X".into(),
                    message: "y".into(),
                },
                30,
            )
            .await
            .unwrap(),
        Transition::Remove => !s.fail_removed_models(&[], 30).await.unwrap().is_empty(),
        Transition::Expire => !s.expire_pending(1_000, 10).await.unwrap().is_empty(),
        Transition::Cancel => matches!(
            s.cancel_task("task_a", "ten_1", "m", 30).await.unwrap(),
            CancelOutcome::Cancelled { .. }
        ),
    }
}

async fn fresh(store: &str) -> Option<Fixture> {
    if store == "sqlite" {
        sqlite().await
    } else {
        postgres().await
    }
}

/// Every transition from every state, on both stores: a write happens exactly when the table in
/// `domain::Transition` allows it, and lands in the state the table says.
async fn walk_the_state_machine(store: &str) {
    for from in [
        TaskState::Pending,
        TaskState::Processing,
        TaskState::Success,
        TaskState::Failed,
    ] {
        for t in Transition::ALL {
            let Some(f) = fresh(store).await else { return };
            let s = f.store.clone();
            let token = task_in(s.as_ref(), from).await;
            let made = attempt(s.as_ref(), t, token.as_deref()).await;
            // A shared store narrows Remove to pending tasks (another node may still run the
            // model); the table allows it from processing, which the exclusive store does.
            let narrowed =
                t == Transition::Remove && from == TaskState::Processing && !s.exclusive();
            let allowed = t.from_states().contains(&from) && !narrowed;
            assert_eq!(made, allowed, "{store}: {t:?} from {from}");
            let now = s.get_task("task_a").await.unwrap().unwrap().state;
            assert_eq!(
                now,
                if allowed { t.to() } else { from },
                "{store}: {t:?} from {from}"
            );
            f.finish().await;
        }
    }
}

#[tokio::test]
async fn every_transition_and_every_forbidden_one_on_sqlite() {
    walk_the_state_machine("sqlite").await;
}

#[tokio::test]
async fn every_transition_and_every_forbidden_one_on_postgres() {
    walk_the_state_machine("postgres").await;
}

conformance! {
    a_stale_token_cannot_make_any_transition(s) {
        let _ = task_in(s.as_ref(), TaskState::Processing).await;
        for t in [Transition::Requeue, Transition::Succeed, Transition::Fail] {
            assert!(!attempt(s.as_ref(), t, Some("att_stale")).await, "{t:?}");
        }
    }

    an_unacknowledged_worker_claim_goes_back_without_counting(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim_batch("m", 10, Duration::ZERO, 10, 1, Runner::Worker).await.unwrap().remove(0);
        assert_eq!(c.task.attempts, 1);
        let r = s.recover_expired(100).await.unwrap();
        assert_eq!(r.unacknowledged, vec!["task_a".to_string()]);
        assert!(r.requeued.is_empty() && r.failed.is_empty());
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!((t.state, t.attempts), (TaskState::Pending, 0));
        // Acknowledged (a heartbeat), then lost: the attempt counts.
        let c = s.claim_batch("m", 200, LEASE, 10, 1, Runner::Worker).await.unwrap().remove(0);
        assert!(s.renew_lease("task_a", &c.token, 200, Duration::ZERO, None).await.unwrap());
        let r = s.recover_expired(i64::MAX).await.unwrap();
        assert_eq!(r.requeued, vec!["task_a".to_string()]);
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().attempts, 1);
    }

    a_restart_recovers_local_attempts_but_not_live_worker_claims(s) {
        s.insert_task(new_task("task_local", "m", 1)).await.unwrap();
        s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        s.insert_task(new_task("task_worker", "w", 1)).await.unwrap();
        let w = s.claim_batch("w", 10, LEASE, 10, 1, Runner::Worker).await.unwrap().remove(0);
        assert!(s.renew_lease("task_worker", &w.token, 10, LEASE, None).await.unwrap());
        let r = s.recover_local(20).await.unwrap();
        let t = s.get_task("task_worker").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Processing, "a live worker's claim was taken");
        if s.exclusive() {
            assert_eq!(r.requeued, vec!["task_local".to_string()]);
        }
        let ok = Outcome::Success { outputs: vec!["task_worker/t/x.png".into()], blobs: vec![] };
        assert!(s.finish("task_worker", &w.token, &ok, 30).await.unwrap());
    }

    tasks_of_removed_models_fail_and_are_called_back(s) {
        let mut t = callback_task("task_a");
        t.model = "gone".into();
        s.insert_task(t).await.unwrap();
        s.insert_task(new_task("task_b", "kept", 1)).await.unwrap();
        let failed = s.fail_removed_models(&["kept".to_string()], 50).await.unwrap();
        assert_eq!(failed, vec!["task_a".to_string()]);
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.fail_code.as_deref(), Some(fail_code::MODEL_REMOVED));
        assert!(t.fail_msg.unwrap().contains("gone"));
        assert_eq!(s.deliveries_for_task("task_a").await.unwrap().len(), 1);
        assert_eq!(s.get_task("task_b").await.unwrap().unwrap().state, TaskState::Pending);
    }

    unacknowledged_claims_go_back_uncounted_only_a_few_times(s) {
        let mut t = new_task("task_a", "m", 1);
        t.max_attempts = 1;
        s.insert_task(t).await.unwrap();
        for _ in 0..taskgate_server::store::MAX_UNACKED_REFUNDS {
            s.claim_batch("m", 10, Duration::ZERO, 10, 1, Runner::Worker).await.unwrap().remove(0);
            assert_eq!(s.recover_expired(i64::MAX).await.unwrap().unacknowledged.len(), 1);
        }
        // One more lost claim counts: the task (one attempt allowed) ends.
        s.claim_batch("m", 10, Duration::ZERO, 10, 1, Runner::Worker).await.unwrap().remove(0);
        let r = s.recover_expired(i64::MAX).await.unwrap();
        assert_eq!(r.failed, vec!["task_a".to_string()]);
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!(t.fail_code.as_deref(), Some(fail_code::ATTEMPTS_EXHAUSTED));
    }

    a_node_whose_clock_runs_ahead_does_not_take_over_live_work(s) {
        // Only a shared store has nodes with other clocks; SQLite's one process has one clock.
        if s.exclusive() {
            return;
        }
        let now = taskgate_server::domain::now_ms();
        s.insert_task(new_task("task_a", "m", now)).await.unwrap();
        s.claim("m", now, LEASE, 10).await.unwrap().unwrap();
        let ahead = now + 3_600_000;
        let r = s.recover_expired(ahead).await.unwrap();
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().state, TaskState::Processing);
    }
}

/// PostgreSQL only: stores opening one fresh schema at the same instant all open (schema and
/// migrations), all register the same bootstrap key without a conflict, and all agree on the
/// settings and secrets they initialise.
#[tokio::test]
async fn stores_opening_a_fresh_schema_at_once_all_open_and_agree_on_start_up_rows() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        skip("stores_opening_a_fresh_schema_at_once_all_open_and_agree_on_start_up_rows (set TEST_DATABASE_URL)");
        return;
    };
    for _ in 0..5 {
        let schema = format!("t_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let opens: Vec<_> = (0..4u8)
            .map(|i| {
                let (url, schema) = (url.clone(), schema.clone());
                tokio::spawn(async move {
                    let s = PostgresStore::connect(&url, Some(&schema)).await?;
                    taskgate_server::auth::register_bootstrap_key(&s, "tg_one_key_for_all").await?;
                    let v = s.setting_or_init("k", &[i]).await?;
                    let secret = s.webhook_secrets("ten_1", &format!("whsec_{i}")).await?;
                    s.close().await;
                    Ok::<_, taskgate_server::store::StoreError>((v, secret.current))
                })
            })
            .collect();
        let mut values = std::collections::HashSet::new();
        for open in opens {
            values.insert(open.await.unwrap().unwrap());
        }
        assert_eq!(
            values.len(),
            1,
            "every node reads the first values: {values:?}"
        );
        let s = PostgresStore::connect(&url, Some(&schema)).await.unwrap();
        assert_eq!(
            s.list_keys().await.unwrap().len(),
            1,
            "the key is registered once"
        );
        s.close().await;
        drop_schema(&schema).await;
    }
}

/// A blob under `key` holding `content`.
fn blob(key: &str, content: &[u8]) -> Blob {
    Blob {
        key: key.into(),
        content: content.to_vec(),
    }
}

/// A success listing `blobs` (and `files`, kept elsewhere) as its outputs.
fn success_with(blobs: Vec<Blob>, files: &[&str]) -> Outcome {
    let mut outputs: Vec<String> = blobs.iter().map(|b| b.key.clone()).collect();
    outputs.extend(files.iter().map(|f| f.to_string()));
    Outcome::Success { outputs, blobs }
}

/// Every byte value, NUL included: a blob is bytes, not text.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

conformance! {
    a_success_writes_its_blobs_only_when_its_final_write_takes(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        let key = "task_a/0a/result.json";

        // A stale holder's success writes neither the state nor its blob.
        let stale = success_with(vec![blob(key, b"stale")], &[]);
        assert!(!s.finish("task_a", "att_stale", &stale, 15).await.unwrap());
        assert_eq!(s.get_blob(key).await.unwrap(), None, "a refused success left its blob");
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().state, TaskState::Processing);

        // The claim holder's success writes both, byte for byte, alongside a file output.
        let live = success_with(
            vec![blob(key, br#"{"x":1}"#), blob("task_a/0a/raw.bin", &all_bytes())],
            &["task_a/0a/big.png"],
        );
        assert!(s.finish("task_a", &c.token, &live, 20).await.unwrap());
        assert_eq!(s.get_blob(key).await.unwrap().as_deref(), Some(&br#"{"x":1}"#[..]));
        assert_eq!(s.get_blob("task_a/0a/raw.bin").await.unwrap(), Some(all_bytes()));
        assert_eq!(s.get_blob("task_a/0a/big.png").await.unwrap(), None, "a file is not a blob");
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Success);
        assert_eq!(t.outputs, vec![key.to_string(), "task_a/0a/raw.bin".into(), "task_a/0a/big.png".into()]);

        // The task is final: another success, even under the same token, writes nothing more
        // and changes nothing already written.
        let late = success_with(vec![blob("task_a/0b/late.json", b"late"), blob(key, b"over")], &[]);
        assert!(!s.finish("task_a", &c.token, &late, 30).await.unwrap());
        assert_eq!(s.get_blob("task_a/0b/late.json").await.unwrap(), None);
        assert_eq!(s.get_blob(key).await.unwrap().as_deref(), Some(&br#"{"x":1}"#[..]));
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!((t.outputs.len(), t.complete_time), (3, Some(20)));

        // A task that failed keeps no blob of a success attempted after it.
        s.insert_task(new_task("task_b", "m", 1)).await.unwrap();
        let b = s.claim("m", 40, LEASE, 10).await.unwrap().unwrap();
        let fail = Outcome::Failure { code: "X".into(), message: "y".into() };
        assert!(s.finish("task_b", &b.token, &fail, 41).await.unwrap());
        let after = success_with(vec![blob("task_b/0a/result.json", b"b")], &[]);
        assert!(!s.finish("task_b", &b.token, &after, 42).await.unwrap());
        assert_eq!(s.get_blob("task_b/0a/result.json").await.unwrap(), None);
        assert_eq!(s.get_blob("task_nope/0a/x").await.unwrap(), None);
    }

    concurrent_finishes_each_get_their_own_answer_and_exact_end_states(s) {
        const N: usize = 50;
        let id = |i: usize| format!("task_{i:02}");
        // Every fifth task asks for a callback, each with its own tenant and URL, so that a
        // batch mixing them up would show.
        let url = |i: usize| format!("https://example.com/hook/{i}");
        for i in 0..N {
            let mut t = new_task(&id(i), "m", 1);
            if i % 5 == 0 {
                t.callback_url = Some(url(i));
                t.tenant_id = format!("ten_{i}");
            }
            s.insert_task(t).await.unwrap();
        }
        let claims = s.claim_batch("m", 10, LEASE, N, N, Runner::Local).await.unwrap();
        assert_eq!(claims.len(), N);
        let token_of: std::collections::HashMap<String, String> =
            claims.iter().map(|c| (c.task.id.clone(), c.token.clone())).collect();
        let key = |i: usize| format!("{}/0a/out.bin", id(i));
        let content = |i: usize| vec![i as u8; i + 1];

        // Round 1, every task once, all at the same moment: even ones under their own token,
        // odd ones under their neighbour's (a live token, of another task).
        let outcomes: Vec<(String, String, Outcome, i64)> = (0..N)
            .map(|i| {
                let token = if i % 2 == 0 { token_of[&id(i)].clone() } else { token_of[&id(i - 1)].clone() };
                let outcome = success_with(vec![blob(&key(i), &content(i))], &[]);
                (id(i), token, outcome, 100 + i as i64)
            })
            .collect();
        let answers = futures::future::join_all(
            outcomes.iter().map(|(id, token, outcome, now)| s.finish(id, token, outcome, *now)),
        )
        .await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), i % 2 == 0, "round 1, {}", id(i));
        }

        // Round 2, one task named twice (a stale holder and the live one together), the odd
        // tasks failed under their own tokens, and the even ones, final already, again.
        s.insert_task(new_task("task_dup", "m", 1)).await.unwrap();
        let stale = s.claim("m", 200, Duration::ZERO, N + 1).await.unwrap().unwrap();
        assert_eq!(s.recover_expired(300).await.unwrap().requeued, vec!["task_dup".to_string()]);
        let live = s.claim("m", 400, LEASE, N + 1).await.unwrap().unwrap();
        assert_eq!(live.task.id, "task_dup");
        let fail = |i: usize| Outcome::Failure { code: format!("CODE_{i}"), message: format!("m{i}") };
        let mut round2: Vec<(String, String, Outcome, i64, bool)> = vec![
            ("task_dup".into(), stale.token.clone(), success_with(vec![blob("task_dup/0a/x", b"stale")], &[]), 500, false),
        ];
        for i in 0..N {
            round2.push((id(i), token_of[&id(i)].clone(), fail(i), 500 + i as i64, i % 2 == 1));
        }
        round2.push(("task_dup".into(), live.token.clone(), success_with(vec![blob("task_dup/0b/x", b"live")], &[]), 600, true));
        let answers = futures::future::join_all(
            round2.iter().map(|(id, token, outcome, now, _)| s.finish(id, token, outcome, *now)),
        )
        .await;
        for ((id, token, _, _, want), answer) in round2.iter().zip(answers) {
            assert_eq!(answer.unwrap(), *want, "round 2, {id} under {token}");
        }

        // End states: exactly what the answers said, each with its own values.
        for i in 0..N {
            let t = s.get_task(&id(i)).await.unwrap().unwrap();
            if i % 2 == 0 {
                assert_eq!(t.state, TaskState::Success, "{}", id(i));
                assert_eq!(t.outputs, vec![key(i)]);
                assert_eq!(t.complete_time, Some(100 + i as i64));
                assert_eq!(t.fail_code, None);
                assert_eq!(s.get_blob(&key(i)).await.unwrap(), Some(content(i)), "{}", id(i));
            } else {
                assert_eq!(t.state, TaskState::Failed, "{}", id(i));
                assert_eq!(t.fail_code, Some(format!("CODE_{i}")));
                assert_eq!(t.fail_msg, Some(format!("m{i}")));
                assert_eq!(t.complete_time, Some(500 + i as i64));
                assert!(t.outputs.is_empty(), "{}: {:?}", id(i), t.outputs);
                assert_eq!(s.get_blob(&key(i)).await.unwrap(), None, "{}: the refused success left its blob", id(i));
            }
            let deliveries = s.deliveries_for_task(&id(i)).await.unwrap();
            if i % 5 == 0 {
                assert_eq!(deliveries.len(), 1, "{}", id(i));
                let d = &deliveries[0].0;
                assert_eq!((d.task_id.as_str(), d.tenant_id.as_str(), d.url.as_str()), (id(i).as_str(), format!("ten_{i}").as_str(), url(i).as_str()));
                assert_eq!(d.state, "pending");
                assert_eq!(d.next_attempt_at, t.complete_time.unwrap(), "{}", id(i));
            } else {
                assert!(deliveries.is_empty(), "{}: {deliveries:?}", id(i));
            }
        }
        let t = s.get_task("task_dup").await.unwrap().unwrap();
        assert_eq!((t.state, t.complete_time), (TaskState::Success, Some(600)));
        assert_eq!(t.outputs, vec!["task_dup/0b/x".to_string()]);
        assert_eq!(s.get_blob("task_dup/0b/x").await.unwrap().as_deref(), Some(&b"live"[..]));
        assert_eq!(s.get_blob("task_dup/0a/x").await.unwrap(), None);
        assert!(s.claim("m", 700, LEASE, N + 1).await.unwrap().is_none(), "a task was left running");
    }

    only_a_final_write_that_takes_enqueues_a_callback_and_only_for_a_callback_task(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        s.insert_task(new_task("task_b", "m", 1)).await.unwrap();
        s.insert_task(callback_task("task_c")).await.unwrap();
        let claims = s.claim_batch("m", 10, LEASE, 10, 3, Runner::Local).await.unwrap();
        let token = |id: &str| claims.iter().find(|c| c.task.id == id).unwrap().token.clone();
        let ok = success_with(vec![blob("task_x/0a/r.json", b"{}")], &[]);
        let fail = Outcome::Failure { code: "X".into(), message: "y".into() };
        // A refused write of a callback task enqueues nothing.
        assert!(!s.finish("task_a", "att_stale", &Outcome::Success { outputs: vec![], blobs: vec![] }, 15).await.unwrap());
        assert!(s.deliveries_for_task("task_a").await.unwrap().is_empty());
        // Three final writes together: a success with a callback, one without, a failure with one.
        let (ta, tb, tc) = (token("task_a"), token("task_b"), token("task_c"));
        let empty = Outcome::Success { outputs: vec![], blobs: vec![] };
        let (a, b, c) = tokio::join!(
            s.finish("task_a", &ta, &empty, 20),
            s.finish("task_b", &tb, &ok, 21),
            s.finish("task_c", &tc, &fail, 22),
        );
        assert!(a.unwrap() && b.unwrap() && c.unwrap());
        // A second final write of a task already final enqueues no second delivery.
        assert!(!s.finish("task_a", &ta, &fail, 30).await.unwrap());
        for (id, at) in [("task_a", 20), ("task_c", 22)] {
            let d = s.deliveries_for_task(id).await.unwrap();
            assert_eq!(d.len(), 1, "{id}: {d:?}");
            assert_eq!((d[0].0.state.as_str(), d[0].0.next_attempt_at), ("pending", at), "{id}");
            assert_eq!(d[0].0.url, "https://example.com/hook");
            assert!(d[0].1.is_empty(), "{id}: no attempt yet");
        }
        assert!(s.deliveries_for_task("task_b").await.unwrap().is_empty());
        let claimed = s.claim_deliveries(100, 10, LEASE, &ROOM).await.unwrap();
        let mut ids: Vec<&str> = claimed.iter().map(|c| c.delivery.task_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["task_a", "task_c"], "the outbox holds exactly these");
    }

    the_keys_revision_moves_on_every_revocation_and_only_then(s) {
        let t = s.create_tenant("acme").await.unwrap();
        let r0 = s.keys_revision().await.unwrap();
        let k1 = s.insert_key(KeyKind::Client, &t, "one", "tg_one", &[1], &KeyPolicy::default()).await.unwrap();
        let k2 = s.insert_key(KeyKind::Worker, &t, "two", "tgw_two", &[2], &KeyPolicy::default()).await.unwrap();
        let k3 = s.insert_key(KeyKind::Client, &t, "three", "tg_three", &[3], &KeyPolicy::default()).await.unwrap();
        assert_eq!(s.keys_revision().await.unwrap(), r0, "creating keys revoked nothing");
        let mut seen = vec![r0];
        assert!(s.revoke_key(&k1.id, 100).await.unwrap());
        seen.push(s.keys_revision().await.unwrap());
        // A worker token, revoked at the same instant as the previous key.
        assert!(s.revoke_key(&k2.id, 100).await.unwrap());
        seen.push(s.keys_revision().await.unwrap());
        // A node whose clock runs behind revokes with an earlier time: still a move.
        assert!(s.revoke_key(&k3.id, 50).await.unwrap());
        seen.push(s.keys_revision().await.unwrap());
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "a revocation left the revision where it was: {seen:?}");
        // Nothing revoked, nothing moves: a refused revocation, a new key, reads.
        let last = *seen.last().unwrap();
        assert!(!s.revoke_key(&k1.id, 200).await.unwrap());
        s.insert_key(KeyKind::Client, &t, "four", "tg_four", &[4], &KeyPolicy::default()).await.unwrap();
        s.list_keys().await.unwrap();
        assert_eq!(s.keys_revision().await.unwrap(), last);
    }
}

/// Runs `id` (of model `m`) to success at `now` with `outcome`.
async fn run_to_success(s: &dyn Store, id: &str, outcome: &Outcome, now: i64) {
    let c = s.claim("m", now, LEASE, 100).await.unwrap().unwrap();
    assert_eq!(c.task.id, id);
    assert!(s.finish(id, &c.token, outcome, now).await.unwrap());
}

conformance! {
    retention_walks_finished_tasks_oldest_first_from_a_position(s) {
        for (i, id) in ["task_a", "task_b", "task_c", "task_d"].iter().enumerate() {
            s.insert_task(new_task(id, "m", 1)).await.unwrap();
            let ok = success_with(vec![], &[]);
            // task_b and task_c complete in the same millisecond: ties go by id.
            let at = [10, 20, 20, 30][i];
            run_to_success(s.as_ref(), id, &ok, at).await;
        }
        s.insert_task(new_task("task_pending", "m", 1)).await.unwrap();
        let ids = |v: Vec<taskgate_server::store::Finished>| v.into_iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(s.finished_tasks(None, 25, 10).await.unwrap()), ["task_a", "task_b", "task_c"]);
        assert_eq!(ids(s.finished_tasks(None, 100, 2).await.unwrap()), ["task_a", "task_b"]);
        assert_eq!(
            ids(s.finished_tasks(Some((20, "task_b".into())), 100, 10).await.unwrap()),
            ["task_c", "task_d"],
            "the position is exclusive and ties go by id"
        );
        assert!(s.finished_tasks(None, 10, 10).await.unwrap().is_empty(), "before is exclusive");
    }

    retention_deletes_only_final_tasks_that_owe_no_callback(s) {
        let outcome = success_with(vec![blob("task_a/t/r.json", b"{}")], &["task_a/t/big.png"]);
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        run_to_success(s.as_ref(), "task_a", &outcome, 10).await;
        s.insert_task(callback_task("task_cb")).await.unwrap();
        run_to_success(s.as_ref(), "task_cb", &success_with(vec![], &[]), 11).await;
        s.insert_task(new_task("task_live", "m", 1)).await.unwrap();

        let finished = s.finished_tasks(None, 100, 10).await.unwrap();
        let a = finished.iter().find(|f| f.id == "task_a").unwrap();
        assert_eq!(a.outputs, ["task_a/t/r.json", "task_a/t/big.png"]);
        assert_eq!(s.delete_blobs(&a.outputs).await.unwrap(), 1, "one output is a blob, one a file");
        assert_eq!(s.get_blob("task_a/t/r.json").await.unwrap(), None);

        let all: Vec<String> = ["task_a", "task_cb", "task_live"].map(String::from).into();
        let deleted = s.delete_tasks(&all).await.unwrap();
        assert_eq!(deleted, ["task_a"], "a pending callback and a live task keep their records");
        assert!(s.get_task("task_a").await.unwrap().is_none());
        assert!(s.get_task("task_live").await.unwrap().is_some());

        // Once its callback is settled, the callback task goes, with its delivery and attempts.
        let d = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap().pop().unwrap();
        let attempt = DeliveryAttempt { attempted_at: 21, status_code: Some(200), latency_ms: 3, error: None };
        assert!(s.finish_delivery_attempt(&d.delivery.id, &d.token, Some(&attempt), DeliveryNext::Succeeded, 21).await.unwrap());
        assert_eq!(s.delete_tasks(&all).await.unwrap(), ["task_cb"]);
        assert!(s.deliveries_for_task("task_cb").await.unwrap().is_empty());
        assert!(s.get_delivery(&d.delivery.id).await.unwrap().is_none());
        assert!(s.delete_tasks(&all).await.unwrap().is_empty(), "deleting again is not an error");
    }

    a_mark_setting_only_moves_forward(s) {
        assert_eq!(s.advance_setting("mark", b"0005").await.unwrap(), b"0005");
        assert_eq!(s.advance_setting("mark", b"0003").await.unwrap(), b"0005", "never back");
        assert_eq!(s.advance_setting("mark", b"0009").await.unwrap(), b"0009");
        assert_eq!(s.setting_or_init("mark", b"").await.unwrap(), b"0009");
    }
}

conformance! {
    claims_take_higher_priorities_first_then_the_oldest(s) {
        for (id, priority) in [("task_a", 0), ("task_b", 5), ("task_c", -1), ("task_d", 5)] {
            s.insert_task(NewTask { priority, ..new_task(id, "m", 1) }).await.unwrap();
        }
        // One at a time: a batch's rows come back in no particular order.
        let mut order = Vec::new();
        while let Some(c) = s.claim("m", 10, LEASE, 10).await.unwrap() {
            order.push(c.task.id);
        }
        assert_eq!(order, ["task_b", "task_d", "task_a", "task_c"]);
    }

    a_task_past_its_deadline_is_never_started_and_fails_expired(s) {
        s.insert_task(NewTask { expires_at: Some(50), ..callback_task("task_late") }).await.unwrap();
        s.insert_task(NewTask { expires_at: Some(500), ..new_task("task_soon", "m", 1) }).await.unwrap();
        s.insert_task(new_task("task_never", "m", 1)).await.unwrap();
        // At 60 the first is past its deadline: claims pass over it.
        let claims = s.claim_batch("m", 60, LEASE, 10, 10, Runner::Local).await.unwrap();
        let mut claimed: Vec<String> = claims.iter().map(|c| c.task.id.clone()).collect();
        claimed.sort();
        assert_eq!(claimed, ["task_never", "task_soon"]);
        assert_eq!(s.expire_pending(60, 10).await.unwrap(), ["task_late"]);
        let t = s.get_task("task_late").await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.fail_code.as_deref(), Some(fail_code::EXPIRED));
        assert_eq!(t.complete_time, Some(60));
        assert_eq!(s.deliveries_for_task("task_late").await.unwrap().len(), 1, "its callback is owed");
        // Started tasks are never expired, whatever their deadline: not while running, nor once
        // back to pending for a retry after the deadline has passed.
        assert!(s.expire_pending(10_000, 10).await.unwrap().is_empty());
        assert_eq!(s.get_task("task_soon").await.unwrap().unwrap().state, TaskState::Processing);
        let soon = claims.iter().find(|c| c.task.id == "task_soon").unwrap();
        assert!(s.requeue("task_soon", &soon.token, 600, false).await.unwrap());
        assert!(s.expire_pending(10_000, 10).await.unwrap().is_empty(), "a retry is not expired");
        let again = s.claim("m", 10_000, LEASE, 10).await.unwrap().expect("the retry runs");
        assert_eq!((again.task.id.as_str(), again.task.attempts), ("task_soon", 2));
    }
}

/// The cancel a test expects to have been written: `from` the state it left, `runner` who ran it.
fn cancelled(outcome: CancelOutcome) -> (taskgate_server::domain::Task, TaskState, Option<Runner>) {
    match outcome {
        CancelOutcome::Cancelled { task, from, runner } => (task, from, runner),
        other => panic!("expected a written cancel, got {other:?}"),
    }
}

conformance! {
    a_cancelled_pending_task_fails_with_cancelled_and_is_never_claimed(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let (task, from, runner) = cancelled(s.cancel_task("task_a", "ten_1", "m", 50).await.unwrap());
        assert_eq!((from, runner), (TaskState::Pending, None));
        assert_eq!(task.state, TaskState::Failed);
        assert_eq!(task.fail_code.as_deref(), Some(fail_code::CANCELLED));
        assert!(task.fail_msg.as_deref().unwrap().contains("cancelled"), "{task:?}");
        assert_eq!(task.complete_time, Some(50));
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap(), task, "the answer is the stored row");
        assert!(s.claim("m", 100, LEASE, 10).await.unwrap().is_none(), "a cancelled task was claimed");
        assert_eq!(s.next_due("m").await.unwrap(), None);
    }

    a_cancel_kills_the_running_attempts_token(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        let (task, from, runner) = cancelled(s.cancel_task("task_a", "ten_1", "m", 20).await.unwrap());
        assert_eq!((from, runner), (TaskState::Processing, Some(Runner::Local)));
        assert_eq!(task.attempts, 1);
        // The old holder can do nothing more with its token.
        let ok = Outcome::Success { outputs: vec!["task_a/t/x.png".into()], blobs: vec![] };
        assert!(!s.finish("task_a", &c.token, &ok, 30).await.unwrap(), "finish after cancel");
        let fail = Outcome::Failure { code: "X".into(), message: "y".into() };
        assert!(!s.finish("task_a", &c.token, &fail, 30).await.unwrap(), "fail after cancel");
        assert!(!s.renew_lease("task_a", &c.token, 30, LEASE, Some(0.9)).await.unwrap(), "renewal after cancel");
        assert!(!s.requeue("task_a", &c.token, 30, true).await.unwrap(), "requeue after cancel");
        // Nor does a lease sweep, however late, hand it on.
        assert!(s.recover_expired(i64::MAX).await.unwrap().is_empty());
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!((t.state, t.fail_code.as_deref(), t.outputs.len()), (TaskState::Failed, Some(fail_code::CANCELLED), 0));
        // The slot is free again.
        s.insert_task(new_task("task_b", "m", 40)).await.unwrap();
        assert_eq!(s.claim("m", 50, LEASE, 1).await.unwrap().unwrap().task.id, "task_b");
    }

    a_cancel_of_a_pull_workers_task_names_the_worker_as_its_runner(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        let c = s.claim_batch("m", 10, LEASE, 10, 1, Runner::Worker).await.unwrap().remove(0);
        assert!(s.renew_lease("task_a", &c.token, 10, LEASE, None).await.unwrap());
        let (_, from, runner) = cancelled(s.cancel_task("task_a", "ten_1", "m", 20).await.unwrap());
        assert_eq!((from, runner), (TaskState::Processing, Some(Runner::Worker)));
        assert!(!s.renew_lease("task_a", &c.token, 30, LEASE, None).await.unwrap(), "the worker's heartbeat is refused");
    }

    a_finished_task_is_left_alone_by_a_cancel(s) {
        s.insert_task(callback_task("task_a")).await.unwrap();
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        let ok = Outcome::Success { outputs: vec!["task_a/t/x.png".into()], blobs: vec![] };
        assert!(s.finish("task_a", &c.token, &ok, 20).await.unwrap());
        let before = s.get_task("task_a").await.unwrap().unwrap();
        match s.cancel_task("task_a", "ten_1", "m", 30).await.unwrap() {
            CancelOutcome::AlreadyFinal(t) => assert_eq!(t, before),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap(), before);
        assert_eq!(s.deliveries_for_task("task_a").await.unwrap().len(), 1, "no second callback");
        // A cancelled task is final too: cancelling it again changes nothing.
        s.insert_task(new_task("task_b", "m", 1)).await.unwrap();
        let (first, ..) = cancelled(s.cancel_task("task_b", "ten_1", "m", 40).await.unwrap());
        match s.cancel_task("task_b", "ten_1", "m", 50).await.unwrap() {
            CancelOutcome::AlreadyFinal(t) => assert_eq!(t, first),
            other => panic!("{other:?}"),
        }
    }

    a_cancel_finds_only_the_tenants_task_of_that_model(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        for (id, tenant, model) in [("task_nope", "ten_1", "m"), ("task_a", "ten_2", "m"), ("task_a", "ten_1", "other")] {
            assert_eq!(s.cancel_task(id, tenant, model, 20).await.unwrap(), CancelOutcome::NotFound, "{id} {tenant} {model}");
        }
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().state, TaskState::Pending);
    }

    a_cancelled_callback_task_owes_exactly_one_callback(s) {
        s.insert_task(callback_task("task_pending")).await.unwrap();
        s.insert_task(callback_task("task_running")).await.unwrap();
        s.insert_task(new_task("task_quiet", "m", 1)).await.unwrap();
        // Oldest first: the claim takes task_pending; cancel the other two while pending and
        // the claimed one while running.
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, "task_pending");
        for id in ["task_pending", "task_running", "task_quiet"] {
            cancelled(s.cancel_task(id, "ten_1", "m", 20).await.unwrap());
        }
        for id in ["task_pending", "task_running"] {
            let d = s.deliveries_for_task(id).await.unwrap();
            assert_eq!(d.len(), 1, "{id}: {d:?}");
            assert_eq!((d[0].0.state.as_str(), d[0].0.next_attempt_at), ("pending", 20), "{id}");
        }
        assert!(s.deliveries_for_task("task_quiet").await.unwrap().is_empty());
        assert_eq!(s.next_delivery_due(&[]).await.unwrap(), Some(20));
    }

    a_parked_claim_does_not_take_a_task_cancelled_while_it_waited(s) {
        use tokio_util::sync::CancellationToken;
        if !s.parks_claims() {
            return;
        }
        let now = taskgate_server::domain::now_ms();
        let withdraw = CancellationToken::new();
        let parked = {
            let (s, withdraw) = (s.clone(), withdraw.clone());
            tokio::spawn(async move { s.claim_parked("m", LEASE, 10, 5, &withdraw).await })
        };
        // Not due for a minute: the submit's round leaves the claim parked.
        s.insert_task(new_task("task_a", "m", now + 60_000)).await.unwrap();
        cancelled(s.cancel_task("task_a", "ten_1", "m", now).await.unwrap());
        s.poke("m").await;
        // Through the writer thread after the poke: its round has run by now.
        s.insert_task(new_task("task_other", "other", now)).await.unwrap();
        assert!(!parked.is_finished(), "the parked claim answered");
        withdraw.cancel();
        assert!(parked.await.unwrap().unwrap().is_empty());
        assert_eq!(s.get_task("task_a").await.unwrap().unwrap().state, TaskState::Failed);
    }
}

/// The next event a listener forwards, within 10 s.
async fn next_event(events: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> StoreEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no event within 10s")
        .unwrap()
}

/// PostgreSQL only: a cancel of a running local attempt reaches every node's listener as
/// `TaskCancelled`, so the node running it stops it at once; a pending task's cancel sends none
/// (nothing runs anywhere).
#[tokio::test]
async fn a_cancel_of_a_running_task_is_announced_to_every_node() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        skip("a_cancel_of_a_running_task_is_announced_to_every_node (set TEST_DATABASE_URL)");
        return;
    };
    let schema = format!("t_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    let a = Arc::new(PostgresStore::connect(&url, Some(&schema)).await.unwrap());
    let b = Arc::new(PostgresStore::connect(&url, Some(&schema)).await.unwrap());
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let listener = {
        let b = b.clone();
        tokio::spawn(async move { b.listen(tx).await })
    };
    assert_eq!(
        next_event(&mut events).await,
        StoreEvent::Resync,
        "listening"
    );
    // Notification channels are the database's, shared by every schema: other tests' cancels
    // are heard too, so this test's tasks have names of their own.
    let (running, waiting) = (
        format!("task_{schema}_running"),
        format!("task_{schema}_waiting"),
    );
    a.insert_task(new_task(&running, "m", 1)).await.unwrap();
    a.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
    a.insert_task(new_task(&waiting, "m", 1)).await.unwrap();
    // The pending one first: had it been announced, its notice would come before the other's.
    cancelled(a.cancel_task(&waiting, "ten_1", "m", 20).await.unwrap());
    cancelled(a.cancel_task(&running, "ten_1", "m", 20).await.unwrap());
    loop {
        match next_event(&mut events).await {
            StoreEvent::TaskCancelled(id) if id == running => break,
            StoreEvent::TaskCancelled(id) => {
                assert_ne!(id, waiting, "a pending task's cancel was announced")
            }
            StoreEvent::TaskReady(_)
            | StoreEvent::DeliveryReady
            | StoreEvent::TasksChanged(_)
            | StoreEvent::Resync => {}
        }
    }
    a.close().await;
    b.close().await;
    listener.abort();
    drop_schema(&schema).await;
}

fn tenant_task(id: &str, tenant: &str, model: &str, now: i64) -> NewTask {
    NewTask {
        tenant_id: tenant.into(),
        ..new_task(id, model, now)
    }
}

/// The first page of `tenant`'s tasks matching `tweak`, ids only.
async fn page(
    s: &dyn Store,
    tenant: &str,
    limit: usize,
    before_id: Option<String>,
    tweak: impl FnOnce(&mut TaskQuery),
) -> Vec<String> {
    let mut q = TaskQuery {
        tenant_id: tenant.into(),
        model: None,
        state: None,
        created_after: None,
        created_before: None,
        before_id,
        after_id: None,
        limit,
        max_examined: 5000,
    };
    tweak(&mut q);
    s.list_tasks(&q)
        .await
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.id)
        .collect()
}

fn key(tenant: &str, key: &str, hash: &[u8], now: i64) -> IdempotencyKey {
    IdempotencyKey {
        tenant_id: tenant.into(),
        key: key.into(),
        request_hash: hash.to_vec(),
        now,
        expired_at_or_before: now - 1000,
    }
}

conformance! {
    a_tenants_tasks_are_listed_newest_first_a_page_at_a_time(s) {
        // 45 tasks of one tenant, created 0..45, two models; two of another tenant.
        let ids: Vec<String> = (0..45).map(|i| format!("task_{i:02}")).collect();
        let tasks = ids.iter().enumerate().map(|(i, id)| {
            tenant_task(id, "ten_a", if i % 3 == 0 { "img" } else { "m" }, i as i64)
        });
        s.insert_tasks(tasks.collect()).await.unwrap();
        s.insert_tasks(vec![tenant_task("task_99", "ten_b", "m", 0), tenant_task("task_98", "ten_b", "img", 0)]).await.unwrap();

        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let got = page(s.as_ref(), "ten_a", 20, cursor.clone(), |_| {}).await;
            seen.extend(got.iter().cloned());
            if got.len() < 20 { break; }
            cursor = got.last().cloned();
        }
        let mut newest_first = ids.clone();
        newest_first.reverse();
        assert_eq!(seen, newest_first, "every task once, newest first");

        assert_eq!(page(s.as_ref(), "ten_b", 100, None, |_| {}).await, ["task_99", "task_98"]);
        assert!(page(s.as_ref(), "ten_c", 100, None, |_| {}).await.is_empty());

        let img = page(s.as_ref(), "ten_a", 100, None, |q| q.model = Some("img".into())).await;
        assert_eq!(img.len(), 15);
        assert_eq!(img[0], "task_42");
        assert!(page(s.as_ref(), "ten_a", 100, None, |q| q.model = Some("nope".into())).await.is_empty());

        let window = page(s.as_ref(), "ten_a", 100, None, |q| {
            q.created_after = Some(10);
            q.created_before = Some(13);
        }).await;
        assert_eq!(window, ["task_12", "task_11"], "both bounds are exclusive");

        // The oldest task of model m is claimed: the only one processing.
        s.claim("m", 100, LEASE, 10).await.unwrap().unwrap();
        let processing = page(s.as_ref(), "ten_a", 100, None, |q| q.state = Some(TaskState::Processing)).await;
        assert_eq!(processing, ["task_01"]);
        let listed = s.list_tasks(&TaskQuery {
            tenant_id: "ten_a".into(), model: None, state: Some(TaskState::Processing),
            created_after: None, created_before: None, before_id: None, after_id: None, limit: 1,
            max_examined: 5000,
        }).await.unwrap().tasks;
        assert_eq!((listed[0].model.as_str(), listed[0].attempts), ("m", 1));
        assert_eq!(page(s.as_ref(), "ten_a", 100, None, |q| q.state = Some(TaskState::Pending)).await.len(), 44);
    }

    a_batch_insert_is_all_or_nothing(s) {
        s.insert_tasks(vec![new_task("task_a", "m", 1), new_task("task_b", "m", 1)]).await.unwrap();
        let t = s.get_task("task_b").await.unwrap().unwrap();
        assert_eq!((t.state, t.attempts), (TaskState::Pending, 0));
        // task_a exists: the whole batch is refused, task_c and task_d with it.
        let r = s.insert_tasks(vec![new_task("task_c", "m", 2), new_task("task_a", "m", 2), new_task("task_d", "m", 2)]).await;
        assert!(r.is_err());
        for id in ["task_c", "task_d"] {
            assert!(s.get_task(id).await.unwrap().is_none(), "{id} was written");
        }
        // Batch tasks are claimable like any other.
        assert_eq!(s.claim_batch("m", 10, LEASE, 10, 10, Runner::Local).await.unwrap().len(), 2);
        // A large batch (more rows than one statement takes) lands whole.
        let many: Vec<NewTask> = (0..1200).map(|i| new_task(&format!("task_x{i:04}"), "big", 1)).collect();
        s.insert_tasks(many).await.unwrap();
        assert_eq!(page(s.as_ref(), "ten_1", 2000, None, |q| q.model = Some("big".into())).await.len(), 1200);
    }

    an_idempotency_key_creates_once_then_answers_what_it_created(s) {
        let first = s.insert_tasks_keyed(&key("ten_1", "k", b"h1", 10_000), vec![new_task("task_a", "m", 1), new_task("task_b", "m", 1)]).await.unwrap();
        assert_eq!(first, KeyedInsert::Inserted);
        assert!(s.get_task("task_b").await.unwrap().is_some());
        // The same request again: the first one's ids, nothing new.
        let again = s.insert_tasks_keyed(&key("ten_1", "k", b"h1", 10_500), vec![new_task("task_c", "m", 1)]).await.unwrap();
        assert_eq!(again, KeyedInsert::Replayed(vec!["task_a".into(), "task_b".into()]));
        assert!(s.get_task("task_c").await.unwrap().is_none());
        // Another request with the key: refused, nothing new.
        let other = s.insert_tasks_keyed(&key("ten_1", "k", b"h2", 10_500), vec![new_task("task_c", "m", 1)]).await.unwrap();
        assert_eq!(other, KeyedInsert::Mismatch);
        assert!(s.get_task("task_c").await.unwrap().is_none());
        // Another tenant's key of the same name is its own.
        let theirs = s.insert_tasks_keyed(&key("ten_2", "k", b"h1", 10_500), vec![tenant_task("task_d", "ten_2", "m", 1)]).await.unwrap();
        assert_eq!(theirs, KeyedInsert::Inserted);
        // Expired (created at 10 000, at or before 11 000 - 1000): replaced by the next request.
        let later = s.insert_tasks_keyed(&key("ten_1", "k", b"h2", 11_000), vec![new_task("task_e", "m", 1)]).await.unwrap();
        assert_eq!(later, KeyedInsert::Inserted);
        let replay = s.insert_tasks_keyed(&key("ten_1", "k", b"h2", 11_001), vec![new_task("task_f", "m", 1)]).await.unwrap();
        assert_eq!(replay, KeyedInsert::Replayed(vec!["task_e".into()]));
    }

    a_keyed_insert_that_fails_keeps_no_key(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        // task_a exists: the insert fails, and the key's row goes with it.
        let r = s.insert_tasks_keyed(&key("ten_1", "k", b"h", 10_000), vec![new_task("task_a", "m", 1)]).await;
        assert!(r.is_err());
        let retry = s.insert_tasks_keyed(&key("ten_1", "k", b"h", 10_001), vec![new_task("task_b", "m", 1)]).await.unwrap();
        assert_eq!(retry, KeyedInsert::Inserted);
        assert!(s.get_task("task_b").await.unwrap().is_some());
    }

    racing_inserts_with_one_key_create_once(s) {
        let runs: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let id = format!("task_r{i}");
                    let r = s.insert_tasks_keyed(&key("ten_1", "race", b"h", 10_000), vec![new_task(&id, "m", 1)]).await.unwrap();
                    (id, r)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut answers = Vec::new();
        for run in runs {
            match run.await.unwrap() {
                (id, KeyedInsert::Inserted) => winners.push(id),
                (_, KeyedInsert::Replayed(ids)) => answers.push(ids),
                (_, KeyedInsert::Mismatch) => panic!("the same request was taken for another"),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert!(answers.iter().all(|ids| *ids == winners), "{answers:?} vs {winners:?}");
        assert_eq!(page(s.as_ref(), "ten_1", 100, None, |_| {}).await, winners);
    }
}

conformance! {
    a_state_filtered_page_reads_a_bounded_walk_and_says_where_it_stopped(s) {
        // The oldest task is the only pending one; 24 finished ones sit above it.
        for i in 0..25 {
            s.insert_task(new_task(&format!("task_{i:02}"), "m", 1)).await.unwrap();
        }
        for _ in 0..24 {
            let c = s.claim_batch("m", 10, LEASE, 100, 1, Runner::Local).await.unwrap().pop().unwrap();
            assert!(s.finish(&c.task.id, &c.token, &Outcome::Failure { code: "X".into(), message: "y".into() }, 20).await.unwrap());
        }
        // Claims took task_00..task_23; task_24 (the newest) is the pending one. Walk from the top
        // for a state that only the *oldest* rows have: failed, with a walk of 10.
        let mut q = TaskQuery {
            tenant_id: "ten_1".into(), model: None, state: Some(TaskState::Failed),
            created_after: None, created_before: None, before_id: None, after_id: None,
            limit: 100, max_examined: 10,
        };
        let first = s.list_tasks(&q).await.unwrap();
        assert_eq!(first.tasks.len(), 9, "task_24 is pending; the next 9 of the 10 read are failed");
        assert_eq!(first.examined_to.as_deref(), Some("task_15"), "the walk stopped at the 10th");
        // Following it reads the rest, a bounded walk at a time, and ends.
        let mut seen = first.tasks.len();
        q.before_id = first.examined_to;
        loop {
            let page = s.list_tasks(&q).await.unwrap();
            seen += page.tasks.len();
            match page.examined_to {
                Some(to) => q.before_id = Some(to),
                None => break,
            }
        }
        assert_eq!(seen, 24);
        // Without a state filter nothing is bounded.
        q.state = None;
        q.before_id = None;
        let all = s.list_tasks(&q).await.unwrap();
        assert_eq!((all.tasks.len(), all.examined_to), (25, None));
    }
}

conformance! {
    expired_idempotency_keys_are_deleted_oldest_first_and_live_ones_kept(s) {
        for (i, at) in [100, 200, 300].into_iter().enumerate() {
            let k = key("ten_1", &format!("k{i}"), b"h", at);
            let task = new_task(&format!("task_k{i}"), "m", at);
            assert_eq!(s.insert_tasks_keyed(&k, vec![task]).await.unwrap(), KeyedInsert::Inserted);
        }
        assert_eq!(s.delete_expired_keys(250, 1).await.unwrap(), 1, "one at a time, oldest first");
        assert_eq!(s.delete_expired_keys(250, 10).await.unwrap(), 1);
        assert_eq!(s.delete_expired_keys(250, 10).await.unwrap(), 0, "the live key stays");
        // The live key still replays; a deleted one creates anew.
        let live = key("ten_1", "k2", b"h", 310);
        assert!(matches!(s.insert_tasks_keyed(&live, vec![new_task("task_x", "m", 310)]).await.unwrap(), KeyedInsert::Replayed(_)));
        let gone = key("ten_1", "k0", b"h", 310);
        assert_eq!(s.insert_tasks_keyed(&gone, vec![new_task("task_y", "m", 310)]).await.unwrap(), KeyedInsert::Inserted);
    }
}

// Webhook events beyond the final state (`webhook_events`).

/// A callback task of model `m` that asked for `events`.
fn events_task(id: &str, events: &[WebhookEvent]) -> NewTask {
    NewTask {
        webhook_events: EventMask::of(events.iter().copied()),
        trace_parent: None,
        key_id: None,
        ..callback_task(id)
    }
}

/// A task's deliveries: event and stored payload (parsed), oldest first.
async fn events_of(s: &dyn Store, task_id: &str) -> Vec<(WebhookEvent, Option<serde_json::Value>)> {
    s.deliveries_for_task(task_id)
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| {
            (
                d.event,
                d.payload.map(|p| serde_json::from_str(&p).unwrap()),
            )
        })
        .collect()
}

/// Waits for a `DeliveryReady` (other tests' notices share PostgreSQL's channel and are passed
/// over).
async fn delivery_ready(events: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) {
    while next_event(events).await != StoreEvent::DeliveryReady {}
}

/// Waits until the store's clock (the one progress events are throttled on) reaches `at`.
async fn until_store_clock(s: &dyn Store, at: i64) {
    while s.clock_ms().await.unwrap() < at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

conformance! {
    a_claim_writes_start_deliveries_only_for_tasks_that_asked_for_them(s) {
        use WebhookEvent::{Completed, Start};
        s.insert_task(events_task("task_a", &[Start, Completed])).await.unwrap();
        s.insert_task(callback_task("task_b")).await.unwrap();
        // Asked, but without a URL there is nowhere to send it.
        s.insert_task(NewTask { callback_url: None, ..events_task("task_c", &[Start]) }).await.unwrap();
        // Through the batch insert, which writes the column with its own statement.
        s.insert_tasks(vec![events_task("task_d", &[Start])]).await.unwrap();
        let local = s.claim_batch("m", 10, LEASE, 10, 3, Runner::Local).await.unwrap();
        assert_eq!(local.len(), 3);
        let worker = s.claim_batch("m", 10, LEASE, 10, 1, Runner::Worker).await.unwrap();
        assert_eq!(worker[0].task.id, "task_d");

        // The status as the claim left it, taken in the claim's own write.
        let expected = |id: &str| serde_json::json!({
            "taskId": id, "state": "processing", "createTime": 1, "progress": null
        });
        assert_eq!(events_of(s.as_ref(), "task_a").await, vec![(Start, Some(expected("task_a")))]);
        assert_eq!(events_of(s.as_ref(), "task_d").await, vec![(Start, Some(expected("task_d")))]);
        assert!(events_of(s.as_ref(), "task_b").await.is_empty());
        assert!(events_of(s.as_ref(), "task_c").await.is_empty());
        let start = &s.deliveries_for_task("task_a").await.unwrap()[0].0;
        assert_eq!((start.state.as_str(), start.next_attempt_at, start.created_at), ("pending", 10, 10));
        let claimed = s.claim_deliveries(10, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(claimed.len(), 2);
        assert!(claimed.iter().all(|c| c.delivery.event == Start && c.delivery.payload.is_some()));

        // The final state: a delivery rendered when sent (no payload), only where `completed` was
        // asked for.
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        for c in local.iter().chain(&worker) {
            assert!(s.finish(&c.task.id, &c.token, &ok, 20).await.unwrap());
        }
        assert_eq!(events_of(s.as_ref(), "task_a").await, vec![(Start, Some(expected("task_a"))), (Completed, None)]);
        assert_eq!(events_of(s.as_ref(), "task_b").await, vec![(Completed, None)]);
        assert_eq!(events_of(s.as_ref(), "task_d").await.len(), 1, "start only: no final-state delivery");
        // Nor by the other writes of a final state (a cancel, here).
        s.insert_task(events_task("task_e", &[Start])).await.unwrap();
        cancelled(s.cancel_task("task_e", "ten_1", "m", 30).await.unwrap());
        assert!(events_of(s.as_ref(), "task_e").await.is_empty());
    }

    progress_deliveries_carry_their_progress_and_are_held_to_one_a_second(s) {
        use WebhookEvent::{Completed, Progress};
        s.insert_task(events_task("task_p", &[Progress, Completed])).await.unwrap();
        s.insert_task(callback_task("task_q")).await.unwrap();
        let claims = s.claim_batch("m", 10, LEASE, 10, 2, Runner::Worker).await.unwrap();
        let (p, q) = (&claims[0], &claims[1]);
        assert_eq!(p.task.id, "task_p");
        let snapshot = |progress: f64| Some(serde_json::json!({
            "taskId": "task_p", "state": "processing", "createTime": 1, "progress": progress
        }));

        let t0 = s.clock_ms().await.unwrap();
        assert!(s.renew_lease(&p.task.id, &p.token, t0, LEASE, Some(0.1)).await.unwrap());
        let t1 = s.clock_ms().await.unwrap();
        // Within the second: the progress is recorded, no delivery is written.
        assert!(s.renew_lease(&p.task.id, &p.token, t0 + 10, LEASE, Some(0.2)).await.unwrap());
        assert_eq!(s.get_task("task_p").await.unwrap().unwrap().progress, Some(0.2));
        assert_eq!(events_of(s.as_ref(), "task_p").await, vec![(Progress, snapshot(0.1))]);
        // Renewals without progress, other tasks and stale tokens write none either.
        assert!(s.renew_lease(&p.task.id, &p.token, t0 + 20, LEASE, None).await.unwrap());
        assert!(s.renew_lease(&q.task.id, &q.token, t0 + 20, LEASE, Some(0.5)).await.unwrap());
        assert!(!s.renew_lease(&p.task.id, "att_stale", t0 + 20, LEASE, Some(0.9)).await.unwrap());
        assert!(events_of(s.as_ref(), "task_q").await.is_empty());

        until_store_clock(s.as_ref(), t1 + 1000).await;
        let later = s.clock_ms().await.unwrap();
        // A second on, an unchanged progress still writes nothing; a new one does.
        assert!(s.renew_lease(&p.task.id, &p.token, later, LEASE, Some(0.2)).await.unwrap());
        assert_eq!(events_of(s.as_ref(), "task_p").await.len(), 1);
        assert!(s.renew_lease(&p.task.id, &p.token, later, LEASE, Some(0.3)).await.unwrap());
        assert!(s.renew_lease(&p.task.id, &p.token, later + 1, LEASE, Some(0.4)).await.unwrap());
        assert_eq!(
            events_of(s.as_ref(), "task_p").await,
            vec![(Progress, snapshot(0.1)), (Progress, snapshot(0.3))]
        );
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish(&p.task.id, &p.token, &ok, later + 2).await.unwrap());
        assert_eq!(events_of(s.as_ref(), "task_p").await.last(), Some(&(Completed, None)));
        // Retention deletes a finished task's event deliveries with it, once none is owed.
        for d in s.claim_deliveries(i64::MAX / 2, 10, LEASE, &ROOM).await.unwrap() {
            s.finish_delivery_attempt(&d.delivery.id, &d.token, None, DeliveryNext::Succeeded, later + 3).await.unwrap();
        }
        assert_eq!(s.delete_tasks(&["task_p".into()]).await.unwrap(), vec!["task_p".to_string()]);
        assert!(s.deliveries_for_task("task_p").await.unwrap().is_empty());
    }

    event_deliveries_written_inside_the_store_wake_its_listener(s) {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let listener = {
            let s = s.clone();
            tokio::spawn(async move { s.listen(tx).await })
        };
        if !s.exclusive() {
            assert_eq!(next_event(&mut events).await, StoreEvent::Resync, "listening");
        }
        s.insert_task(events_task("task_w", &[WebhookEvent::Start, WebhookEvent::Progress])).await.unwrap();
        let c = s.claim_batch("m", 10, LEASE, 10, 1, Runner::Worker).await.unwrap().remove(0);
        delivery_ready(&mut events).await;
        let now = s.clock_ms().await.unwrap();
        assert!(s.renew_lease(&c.task.id, &c.token, now, LEASE, Some(0.5)).await.unwrap());
        delivery_ready(&mut events).await;
        assert_eq!(events_of(s.as_ref(), "task_w").await.len(), 2);
        listener.abort();
    }
}

fn seqs(lines: &[taskgate_proto::TaskLogLine]) -> Vec<u64> {
    lines.iter().map(|l| l.seq).collect()
}

fn numbered(from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("line {i}")).collect()
}

conformance! {
    a_tasks_log_is_numbered_on_trimmed_to_its_caps_and_read_by_pages(s) {
        s.insert_task(new_task("task_a", "m", 1)).await.unwrap();
        assert!(!s.append_logs("task_a", "att_none", &numbered(0, 3), 5).await.unwrap(), "a pending task takes no lines");
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert!(!s.append_logs("task_a", "att_stale", &numbered(0, 3), 15).await.unwrap(), "another claim's lines are refused");
        assert!(s.append_logs("task_a", &c.token, &numbered(0, 600), 20).await.unwrap());
        assert!(s.append_logs("task_a", &c.token, &numbered(600, 600), 21).await.unwrap());

        // 1200 lines in two writes: the newest 1000 are kept, numbered on across the writes.
        let newest = s.log_tail("task_a", None, 3).await.unwrap();
        assert_eq!(seqs(&newest), [1198, 1199, 1200]);
        assert_eq!((newest[2].line.as_str(), newest[2].at), ("line 1199", 21));
        assert_eq!(seqs(&s.log_tail("task_a", Some(0), 2).await.unwrap()), [201, 202], "the oldest kept");
        assert_eq!(seqs(&s.log_tail("task_a", Some(1198), 10).await.unwrap()), [1199, 1200]);
        assert!(s.log_tail("task_a", Some(1200), 10).await.unwrap().is_empty());
        assert_eq!(s.log_tail("task_a", Some(0), 5000).await.unwrap().len(), 1000);

        // 100 lines of 4 KiB are more than 256 KiB: the newest 64 (exactly 256 KiB) are kept.
        let big: Vec<String> = (0..100).map(|i| format!("{i:04}{}", "x".repeat(4092))).collect();
        assert!(s.append_logs("task_a", &c.token, &big, 30).await.unwrap());
        let all = s.log_tail("task_a", Some(0), 5000).await.unwrap();
        assert_eq!(all.len(), 64);
        assert_eq!((all[0].seq, all[63].seq), (1237, 1300));
        assert!(all[63].line.starts_with("0099"));

        // A final task keeps its log, takes no more lines, and retention deletes it with the task.
        assert!(s.finish("task_a", &c.token, &success_with(vec![], &["task_a/t/r.png"]), 40).await.unwrap());
        assert!(!s.append_logs("task_a", &c.token, &numbered(0, 1), 41).await.unwrap());
        assert_eq!(s.log_tail("task_a", None, 100).await.unwrap().len(), 64);
        assert_eq!(s.delete_tasks(&["task_a".to_owned()]).await.unwrap(), ["task_a"]);
        assert!(s.log_tail("task_a", None, 100).await.unwrap().is_empty());
        assert!(s.log_tail("task_unknown", Some(0), 100).await.unwrap().is_empty());
    }

    a_queue_position_counts_the_pending_tasks_a_claim_would_consider_first(s) {
        for (id, priority) in [("task_a", 0), ("task_b", 0), ("task_c", 5), ("task_d", 0)] {
            s.insert_task(NewTask { priority, ..new_task(id, "m", 1) }).await.unwrap();
        }
        s.insert_task(new_task("task_other_model", "other", 1)).await.unwrap();
        let pos = |id: &'static str, now: i64| {
            let s = s.clone();
            async move { s.queue_position(id, now).await.unwrap() }
        };
        assert_eq!(pos("task_c", 10).await, Some(0), "a higher priority goes first");
        assert_eq!(pos("task_a", 10).await, Some(1));
        assert_eq!(pos("task_b", 10).await, Some(2));
        assert_eq!(pos("task_d", 10).await, Some(3));
        assert_eq!(pos("task_other_model", 10).await, Some(0), "other models do not count");

        // A task waiting out a retry still counts as ahead: the count is an index walk bounded
        // by its cap, and run_after is not in the index (filtering on it made the walk
        // unbounded behind a long backoff).
        let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, "task_c");
        assert_eq!(pos("task_c", 10).await, None, "a processing task has no position");
        assert_eq!(pos("task_a", 10).await, Some(0));
        assert!(s.requeue("task_c", &c.token, 1000, false).await.unwrap());
        assert_eq!(pos("task_a", 10).await, Some(1));
        assert_eq!(pos("task_d", 2000).await, Some(3));
        assert_eq!(pos("task_unknown", 10).await, None);
    }
}

conformance! {
    a_claim_handed_back_unacknowledged_withdraws_its_unsent_start(s) {
        s.insert_task(events_task("task_a", &[WebhookEvent::Start, WebhookEvent::Completed])).await.unwrap();
        // A pull worker's claim whose answer never reached the worker: it writes a start…
        s.claim_batch("m", 10, Duration::ZERO, 10, 1, Runner::Worker).await.unwrap().pop().unwrap();
        assert_eq!(events_of(s.as_ref(), "task_a").await.len(), 1);
        // …which goes with the claim when the lease ends unacknowledged.
        let r = s.recover_expired(i64::MAX).await.unwrap();
        assert_eq!(r.unacknowledged, ["task_a"]);
        assert!(events_of(s.as_ref(), "task_a").await.is_empty(), "the unsent start stayed");
        // The claim that does reach its runner announces its start.
        s.claim_batch("m", 20, LEASE, 10, 1, Runner::Worker).await.unwrap().pop().unwrap();
        let events = events_of(s.as_ref(), "task_a").await;
        assert_eq!(events.iter().map(|(e, _)| *e).collect::<Vec<_>>(), [WebhookEvent::Start]);
    }
}

conformance! {
    queue_depths_count_pending_and_processing_tasks_per_model_and_nothing_final(s) {
        assert!(s.queue_depths().await.unwrap().is_empty(), "an empty store has no queues");
        for i in 0..4 {
            s.insert_task(new_task(&format!("task_m{i}"), "m", 1)).await.unwrap();
        }
        s.insert_task(new_task("task_o", "other", 1)).await.unwrap();
        s.insert_task(new_task("task_done", "done", 1)).await.unwrap();
        // m: two claimed (processing), two pending.
        let claims = s.claim_batch("m", 10, LEASE, 10, 2, Runner::Local).await.unwrap();
        assert_eq!(claims.len(), 2);
        // done: claimed and finished, so it is in no queue.
        let d = s.claim("done", 10, LEASE, 10).await.unwrap().unwrap();
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish(&d.task.id, &d.token, &ok, 11).await.unwrap());
        let depths = |pending, processing, model: &str| taskgate_server::store::QueueDepth {
            model: model.into(),
            pending,
            processing,
        };
        assert_eq!(
            s.queue_depths().await.unwrap(),
            vec![depths(2, 2, "m"), depths(1, 0, "other")]
        );
        // A requeue waiting for its retry time is still pending: it is in the queue.
        assert!(s.requeue(&claims[0].task.id, &claims[0].token, 1_000_000, false).await.unwrap());
        assert_eq!(s.queue_depths().await.unwrap()[0], depths(3, 1, "m"));
    }

    a_claim_hands_back_the_submits_trace_parent_and_a_delivery_claim_its_tasks_model(s) {
        const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        // Both insert paths: the single submit's group commit and a batch's multi-row insert.
        s.insert_task(NewTask { trace_parent: Some(PARENT.into()), ..callback_task("task_a") }).await.unwrap();
        s.insert_tasks(vec![
            NewTask { trace_parent: Some(PARENT.into()), ..new_task("task_b", "m", 1) },
            new_task("task_c", "m", 1),
        ]).await.unwrap();
        let mut claims = s.claim_batch("m", 10, LEASE, 10, 10, Runner::Local).await.unwrap();
        claims.sort_by(|a, b| a.task.id.cmp(&b.task.id));
        let parents: Vec<Option<&str>> = claims.iter().map(|c| c.task.trace_parent.as_deref()).collect();
        assert_eq!(parents, [Some(PARENT), Some(PARENT), None]);
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish("task_a", &claims[0].token, &ok, 20).await.unwrap());
        let deliveries = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0].delivery.task_id, "task_a");
        assert_eq!(deliveries[0].model.as_deref(), Some("m"));
    }

    a_final_state_records_the_route_that_ran_it_and_other_final_states_none(s) {
        s.insert_tasks(vec![new_task("task_a", "m", 1), new_task("task_b", "m", 1), new_task("task_c", "m", 1)])
            .await
            .unwrap();
        let mut claims = s.claim_batch("m", 10, LEASE, 10, 10, Runner::Local).await.unwrap();
        claims.sort_by(|a, b| a.task.id.cmp(&b.task.id));
        assert!(claims.iter().all(|c| c.task.route.is_none()));
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        let fail = Outcome::Failure { code: "GENERATION_FAILED".into(), message: "every route failed".into() };
        // Together, so that the group commit writes routed and plain outcomes in one batch.
        let (a, b, c) = tokio::join!(
            s.finish_routed("task_a", &claims[0].token, &ok, Some("cloud"), 20),
            s.finish_routed("task_b", &claims[1].token, &fail, Some("local"), 20),
            s.finish("task_c", &claims[2].token, &ok, 20),
        );
        assert!(a.unwrap() && b.unwrap() && c.unwrap());
        let route = |t: Option<Task>| t.unwrap().route;
        assert_eq!(route(s.get_task("task_a").await.unwrap()).as_deref(), Some("cloud"));
        assert_eq!(route(s.get_task("task_b").await.unwrap()).as_deref(), Some("local"));
        assert_eq!(route(s.get_task("task_c").await.unwrap()), None);
        let view = s.get_task("task_a").await.unwrap().unwrap().status(|k| k.to_owned());
        assert_eq!(view.route.as_deref(), Some("cloud"));
    }
}

/// A task id of millisecond `ms` (`task_` + a lowercase ULID, as the server makes them).
fn id_at(ms: i64, n: u128) -> String {
    format!(
        "task_{}",
        ulid::Ulid::from_parts(ms as u64, n)
            .to_string()
            .to_ascii_lowercase()
    )
}

fn counts_of(rows: Vec<taskgate_server::store::CountRow>) -> Vec<(String, TaskState, u64)> {
    let mut v: Vec<_> = rows
        .into_iter()
        .map(|r| (r.model, r.state, r.count))
        .collect();
    v.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
    v
}

const T0: i64 = 1_764_547_200_000;

conformance! {
    task_counts_cover_one_tenants_tasks_from_since_per_model_and_state(s) {
        // Before the window, in it, and another tenant's.
        s.insert_task(tenant_task(&id_at(T0 - 60_000, 1), "ten_1", "a", T0 - 60_000)).await.unwrap();
        s.insert_task(tenant_task(&id_at(T0, 1), "ten_1", "a", T0)).await.unwrap();
        s.insert_task(tenant_task(&id_at(T0 + 1, 1), "ten_1", "a", T0 + 1)).await.unwrap();
        s.insert_task(tenant_task(&id_at(T0 + 2, 1), "ten_1", "b", T0 + 2)).await.unwrap();
        let c = s.claim("a", T0 + 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, id_at(T0 - 60_000, 1), "the oldest is claimed first");
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish(&c.task.id, &c.token, &ok, T0 + 11).await.unwrap());
        let c = s.claim("a", T0 + 12, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c.task.id, id_at(T0, 1));
        // Inserted after the claims: with it pending, fair sharing would have given the second
        // claim to this tenant.
        s.insert_task(tenant_task(&id_at(T0 + 3, 1), "ten_2", "a", T0 + 3)).await.unwrap();

        let got = counts_of(s.count_tasks("ten_1", T0).await.unwrap());
        assert_eq!(got, vec![
            ("a".to_string(), TaskState::Pending, 1),
            ("a".to_string(), TaskState::Processing, 1),
            ("b".to_string(), TaskState::Pending, 1),
        ], "the task created before since and the other tenant's are not counted");
        let all = counts_of(s.count_tasks("ten_1", T0 - 60_000).await.unwrap());
        assert!(all.contains(&("a".to_string(), TaskState::Success, 1)), "{all:?}");
        assert_eq!(counts_of(s.count_tasks("ten_2", T0).await.unwrap()), vec![("a".to_string(), TaskState::Pending, 1)]);
        assert!(s.count_tasks("ten_3", T0).await.unwrap().is_empty());
    }

    a_retried_attempt_and_a_lost_lease_go_into_the_attempt_history_and_a_first_success_writes_none(s) {
        use taskgate_server::store::AttemptEnd;
        let mut t = new_task("task_a", "m", 1);
        t.max_attempts = 3;
        s.insert_task(t).await.unwrap();
        s.insert_task(new_task("task_b", "m", 2)).await.unwrap();
        let c1 = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(c1.task.id, "task_a");
        let ended = AttemptEnd {
            fail_code: "TEMPORARY".into(),
            fail_msg: "x".repeat(2000),
            runner: Some("worker:gpu-1".into()),
        };
        assert!(!s.requeue_failed("task_a", "att_stale", 20, &ended).await.unwrap(), "token-guarded");
        assert!(s.requeue_failed("task_a", &c1.token, 20, &ended).await.unwrap());
        let t = s.get_task("task_a").await.unwrap().unwrap();
        assert_eq!((t.state, t.attempts), (TaskState::Pending, 1), "a retry keeps its attempt");
        let rec = s.attempt_record("task_a").await.unwrap().unwrap();
        assert_eq!(rec.history.len(), 1);
        let a1 = &rec.history[0];
        assert_eq!(a1.attempt, 1);
        assert_eq!(a1.started_at, c1.task.start_time);
        assert!(a1.ended_at.is_some_and(|e| e >= a1.started_at.unwrap_or(0)));
        assert_eq!(a1.fail_code.as_deref(), Some("TEMPORARY"));
        assert_eq!(a1.fail_msg.as_ref().map(|m| m.chars().count()), Some(500), "capped");
        assert_eq!(a1.runner.as_deref(), Some("worker:gpu-1"));

        // Attempt 2 loses its lease: recorded with the row's runner.
        let c2 = s.claim("m", 30, Duration::ZERO, 10).await.unwrap().unwrap();
        assert_eq!((c2.task.id.as_str(), c2.task.attempts), ("task_a", 2));
        assert_eq!(s.recover_expired(100).await.unwrap().requeued, vec!["task_a".to_string()]);
        let rec = s.attempt_record("task_a").await.unwrap().unwrap();
        assert_eq!(rec.history.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(rec.history[1].fail_code.as_deref(), Some("LEASE_EXPIRED"));
        assert_eq!(rec.history[1].runner.as_deref(), Some("local"));

        // Attempt 3 succeeds: the history keeps the two earlier ones only.
        let c3 = s.claim("m", 200, LEASE, 10).await.unwrap().unwrap();
        assert_eq!((c3.task.id.as_str(), c3.task.attempts), ("task_a", 3));
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        assert!(s.finish("task_a", &c3.token, &ok, 201).await.unwrap());
        let rec = s.attempt_record("task_a").await.unwrap().unwrap();
        assert_eq!(rec.history.len(), 2);
        assert_eq!(rec.runner.as_deref(), Some("local"));

        // A task that succeeds at once has no history.
        let cb = s.claim("m", 300, LEASE, 10).await.unwrap().unwrap();
        assert_eq!(cb.task.id, "task_b");
        assert!(s.finish("task_b", &cb.token, &ok, 301).await.unwrap());
        assert!(s.attempt_record("task_b").await.unwrap().unwrap().history.is_empty());
        assert!(s.attempt_record("task_none").await.unwrap().is_none());
    }

    the_webhook_backlog_counts_a_tenants_undelivered_deliveries_by_class(s) {
        for id in ["task_a", "task_b", "task_c"] {
            s.insert_task(callback_task(id)).await.unwrap();
            let c = s.claim("m", 10, LEASE, 10).await.unwrap().unwrap();
            let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
            assert!(s.finish(&c.task.id, &c.token, &ok, 11).await.unwrap());
        }
        let b = s.webhook_backlog("ten_1").await.unwrap();
        assert_eq!((b.pending, b.retrying, b.failed, b.oldest_due_at), (3, 0, 0, Some(11)));
        // One fails once (retrying, due at 500), one gives up, one is delivered.
        let claims = s.claim_deliveries(20, 10, LEASE, &ROOM).await.unwrap();
        assert_eq!(claims.len(), 3);
        let err = DeliveryAttempt { attempted_at: 21, status_code: Some(500), latency_ms: 3, error: None };
        let ok = DeliveryAttempt { attempted_at: 21, status_code: Some(200), latency_ms: 3, error: None };
        let next = [DeliveryNext::RetryAt(500), DeliveryNext::Failed, DeliveryNext::Succeeded];
        for ((c, next), attempt) in claims.iter().zip(next).zip([&err, &err, &ok]) {
            assert!(s.finish_delivery_attempt(&c.delivery.id, &c.token, Some(attempt), next, 22).await.unwrap());
        }
        let b = s.webhook_backlog("ten_1").await.unwrap();
        assert_eq!((b.pending, b.retrying, b.failed, b.oldest_due_at), (0, 1, 1, Some(500)));
        let other = s.webhook_backlog("ten_2").await.unwrap();
        assert_eq!((other.pending, other.retrying, other.failed, other.oldest_due_at), (0, 0, 0, None));
    }

    pull_workers_seen_are_upserted_by_name_and_listed_most_recent_first(s) {
        use taskgate_proto::WorkerSeen;
        let seen = |name: &str, at: i64, models: &[&str]| WorkerSeen {
            name: name.into(),
            last_seen_at: at,
            models: models.iter().map(|m| m.to_string()).collect(),
            node: format!("http://node-{at}"),
        };
        s.record_worker(&seen("gpu-1", 100, &["a", "b"])).await.unwrap();
        s.record_worker(&seen("gpu-2", 200, &["a"])).await.unwrap();
        // A heartbeat (no models) keeps the models; an older report does not move last seen back.
        s.record_worker(&seen("gpu-1", 300, &[])).await.unwrap();
        s.record_worker(&seen("gpu-2", 150, &["c"])).await.unwrap();
        let got = s.workers_seen(0, 10).await.unwrap();
        assert_eq!(got.iter().map(|w| (w.name.as_str(), w.last_seen_at)).collect::<Vec<_>>(), [("gpu-1", 300), ("gpu-2", 200)]);
        assert_eq!(got[0].models, ["a", "b"]);
        assert_eq!(got[0].node, "http://node-300");
        assert_eq!(got[1].models, ["c"]);
        assert_eq!(s.workers_seen(250, 10).await.unwrap().len(), 1, "only the recently seen");
        assert_eq!(s.workers_seen(0, 1).await.unwrap().len(), 1, "at most the limit");
    }
}

/// The tenant of each of `n` claims of one slot of model `m` at `now`, `None` once nothing is due.
async fn claim_tenants(s: &dyn Store, n: usize, now: i64) -> Vec<Option<String>> {
    let mut tenants = Vec::new();
    for _ in 0..n {
        let c = s.claim("m", now, LEASE, 1000).await.unwrap();
        tenants.push(c.map(|c| c.task.tenant_id));
    }
    tenants
}

fn count_of(tenants: &[Option<String>], tenant: &str) -> usize {
    tenants
        .iter()
        .filter(|t| t.as_deref() == Some(tenant))
        .count()
}

// Fair sharing between the tenants of a model (store::fair, docs/gateway.md).
conformance! {
    a_flooding_tenant_cannot_starve_another_within_a_model(s) {
        for i in 0..50 {
            s.insert_task(tenant_task(&format!("task_a{i:03}"), "ten_a", "m", 1)).await.unwrap();
        }
        s.insert_task(tenant_task("task_b", "ten_b", "m", 1)).await.unwrap();
        let first = s.claim("m", 10, LEASE, 1000).await.unwrap().unwrap();
        assert_eq!(first.task.id, "task_a000", "a tie goes to the smaller tenant id");
        let second = s.claim("m", 10, LEASE, 1000).await.unwrap().unwrap();
        assert_eq!(second.task.id, "task_b", "b's one task comes right after a's first");
        // Then a has the model to itself again, in its own order.
        let rest = s.claim_batch("m", 10, LEASE, 1000, 5, Runner::Worker).await.unwrap();
        let ids: Vec<&str> = rest.iter().map(|c| c.task.id.as_str()).collect();
        assert_eq!(ids, ["task_a001", "task_a002", "task_a003", "task_a004", "task_a005"]);
    }

    a_tenant_arriving_behind_a_flood_waits_for_at_most_one_more_of_its_tasks(s) {
        for i in 0..50 {
            s.insert_task(tenant_task(&format!("task_a{i:03}"), "ten_a", "m", 1)).await.unwrap();
        }
        // a alone: the plain claim, nothing written for the passes.
        assert_eq!(count_of(&claim_tenants(s.as_ref(), 5, 10).await, "ten_a"), 5);
        s.insert_task(tenant_task("task_b", "ten_b", "m", 1)).await.unwrap();
        let next = claim_tenants(s.as_ref(), 2, 10).await;
        assert_eq!(count_of(&next, "ten_b"), 1, "{next:?}");
    }

    weights_share_a_model_three_to_one(s) {
        let heavy = s.create_tenant("heavy").await.unwrap();
        let light = s.create_tenant("light").await.unwrap();
        s.set_tenant_weights(taskgate_server::store::TenantWeights::new(
            [("heavy".to_owned(), 3)].into_iter().collect(),
        ));
        for i in 0..40 {
            s.insert_task(tenant_task(&format!("task_h{i:03}"), &heavy.id, "m", 1)).await.unwrap();
            s.insert_task(tenant_task(&format!("task_l{i:03}"), &light.id, "m", 1)).await.unwrap();
        }
        let one_at_a_time = claim_tenants(s.as_ref(), 16, 10).await;
        assert_eq!(count_of(&one_at_a_time, &heavy.id), 12, "{one_at_a_time:?}");
        assert_eq!(count_of(&one_at_a_time, &light.id), 4, "{one_at_a_time:?}");
        // A claim of many slots shares them the same way.
        let batch = s.claim_batch("m", 10, LEASE, 1000, 8, Runner::Local).await.unwrap();
        let heavy_n = batch.iter().filter(|c| c.task.tenant_id == heavy.id).count();
        assert_eq!((heavy_n, batch.len()), (6, 8));
    }

    priority_still_orders_a_tenants_own_tasks(s) {
        for (id, tenant, priority) in [
            ("task_a1", "ten_a", 0), ("task_a2", "ten_a", 9), ("task_a3", "ten_a", 5),
            ("task_b1", "ten_b", 0), ("task_b2", "ten_b", 1),
        ] {
            s.insert_task(NewTask { priority, ..tenant_task(id, tenant, "m", 1) }).await.unwrap();
        }
        let mut ids = Vec::new();
        while let Some(c) = s.claim("m", 10, LEASE, 1000).await.unwrap() {
            ids.push(c.task.id);
        }
        // Between tenants the fair order; within each, priority then age.
        assert_eq!(ids, ["task_a2", "task_b2", "task_a3", "task_b1", "task_a1"]);
    }

    an_idle_tenant_does_not_bank_credit(s) {
        for i in 0..40 {
            s.insert_task(tenant_task(&format!("task_a{i:03}"), "ten_a", "m", 1)).await.unwrap();
            s.insert_task(tenant_task(&format!("task_c{i:03}"), "ten_c", "m", 1)).await.unwrap();
        }
        // a and c share the model for a while; b has nothing waiting.
        let shared = claim_tenants(s.as_ref(), 20, 10).await;
        assert_eq!(count_of(&shared, "ten_a"), 10, "{shared:?}");
        for i in 0..10 {
            s.insert_task(tenant_task(&format!("task_b{i:03}"), "ten_b", "m", 1)).await.unwrap();
        }
        // b joins at the model's virtual time: a third of the slots, not ten in a row.
        let after = claim_tenants(s.as_ref(), 9, 10).await;
        let b = count_of(&after, "ten_b");
        assert!((3..=4).contains(&b), "b took {b} of 9: {after:?}");
    }

    retries_in_backoff_and_expired_tasks_are_still_passed_over(s) {
        for i in 0..5 {
            s.insert_task(tenant_task(&format!("task_a{i:03}"), "ten_a", "m", 1)).await.unwrap();
        }
        s.insert_task(NewTask { expires_at: Some(5), ..tenant_task("task_b_late", "ten_b", "m", 1) })
            .await
            .unwrap();
        s.insert_task(tenant_task("task_c", "ten_c", "m", 1)).await.unwrap();
        let c = s.claim("m", 10, LEASE, 1000).await.unwrap().unwrap();
        assert_eq!(c.task.id, "task_a000");
        let c2 = s.claim("m", 10, LEASE, 1000).await.unwrap().unwrap();
        assert_eq!(c2.task.id, "task_c", "b's only task is past its deadline");
        // c's task fails and waits out a backoff: a has the model meanwhile.
        assert!(s.requeue("task_c", &c2.token, 1000, false).await.unwrap());
        let during = claim_tenants(s.as_ref(), 3, 20).await;
        assert_eq!(count_of(&during, "ten_a"), 3, "{during:?}");
        let after = claim_tenants(s.as_ref(), 2, 1000).await;
        assert_eq!(count_of(&after, "ten_c"), 1, "{after:?}");
        assert_eq!(s.get_task("task_b_late").await.unwrap().unwrap().state, TaskState::Pending);
    }

    a_queue_position_counts_the_other_tenants_share(s) {
        for i in 0..10 {
            s.insert_task(tenant_task(&format!("task_a{i:03}"), "ten_a", "m", 1)).await.unwrap();
        }
        for i in 0..3 {
            s.insert_task(tenant_task(&format!("task_b{i:03}"), "ten_b", "m", 1)).await.unwrap();
        }
        // b's third task has two of b's ahead, and a starts about two meanwhile.
        assert_eq!(s.queue_position("task_b002", 10).await.unwrap(), Some(4));
        assert_eq!(s.queue_position("task_b000", 10).await.unwrap(), Some(0));
        // a's last task: nine of a's, and b's three (all b has) meanwhile.
        assert_eq!(s.queue_position("task_a009", 10).await.unwrap(), Some(12));
    }
}

const DAY: i64 = 86_400_000;

/// A claim of `model` that must find `id`.
async fn claim_of(s: &dyn Store, model: &str, id: &str, now: i64) -> taskgate_server::store::Claim {
    let c = s.claim(model, now, LEASE, 10).await.unwrap().unwrap();
    assert_eq!(c.task.id, id);
    c
}

fn usage_query(
    tenant: &str,
    from: i64,
    to: i64,
    group_by: taskgate_proto::UsageGroupBy,
) -> taskgate_server::store::UsageQuery {
    taskgate_server::store::UsageQuery {
        tenant_id: tenant.into(),
        from,
        to,
        group_by,
    }
}

/// The aggregates sorted by group, as (group, [pending, processing, success, failed], run ms).
async fn usage_of(
    s: &dyn Store,
    q: taskgate_server::store::UsageQuery,
) -> Vec<(String, [u64; 4], i64)> {
    let mut v: Vec<_> = s
        .usage(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|a| {
            (
                a.group,
                [
                    a.counts.pending,
                    a.counts.processing,
                    a.counts.success,
                    a.counts.failed,
                ],
                a.run_ms,
            )
        })
        .collect();
    v.sort();
    v
}

conformance! {
    usage_counts_a_tenants_tasks_created_in_the_window_by_state_with_every_ended_attempts_run_time(s) {
        use taskgate_proto::UsageGroupBy::{Day, Model};
        let ok = Outcome::Success { outputs: vec![], blobs: vec![] };
        let boom = Outcome::Failure { code: "BOOM".into(), message: "no".into() };
        // Before the window: counted by nothing below.
        let early = id_at(T0 - 1, 1);
        s.insert_task(tenant_task(&early, "ten_1", "a", T0 - 1)).await.unwrap();
        let c = claim_of(s.as_ref(), "a", &early, T0 + 10).await;
        assert!(s.finish(&early, &c.token, &ok, c.task.start_time.unwrap() + 99_000).await.unwrap());
        // Another tenant's, in the window.
        let other = id_at(T0 + 3, 1);
        s.insert_task(tenant_task(&other, "ten_2", "a", T0 + 3)).await.unwrap();
        let c = claim_of(s.as_ref(), "a", &other, T0 + 10).await;
        assert!(s.finish(&other, &c.token, &ok, c.task.start_time.unwrap() + 77_000).await.unwrap());
        // a1: one attempt of 1.5 s, a success (the start is the store's: PostgreSQL stamps
        // claims with its own clock).
        let a1 = id_at(T0, 1);
        s.insert_task(tenant_task(&a1, "ten_1", "a", T0)).await.unwrap();
        let c = claim_of(s.as_ref(), "a", &a1, T0 + 10).await;
        assert!(s.finish(&a1, &c.token, &ok, c.task.start_time.unwrap() + 1_500).await.unwrap());
        // a2: a retried attempt (in its history), then a failure after 0.7 s.
        let a2 = id_at(T0 + 1, 1);
        s.insert_task(tenant_task(&a2, "ten_1", "a", T0 + 1)).await.unwrap();
        let c = claim_of(s.as_ref(), "a", &a2, T0 + 10).await;
        let ended = taskgate_server::store::AttemptEnd { fail_code: "TEMPORARY".into(), fail_msg: "x".into(), runner: None };
        assert!(s.requeue_failed(&a2, &c.token, T0 + 20, &ended).await.unwrap());
        let c = claim_of(s.as_ref(), "a", &a2, T0 + 30).await;
        assert!(s.finish(&a2, &c.token, &boom, c.task.start_time.unwrap() + 700).await.unwrap());
        let history = s.attempt_record(&a2).await.unwrap().unwrap().history;
        assert_eq!(history.len(), 1);
        let retried = history[0].ended_at.unwrap() - history[0].started_at.unwrap();
        // a3: claimed, handed back with its attempt refunded (as at shutdown), then cancelled
        // while pending: its start time is left from the refunded claim, and counts nothing.
        let a3 = id_at(T0 + 2, 1);
        s.insert_task(tenant_task(&a3, "ten_1", "a", T0 + 2)).await.unwrap();
        let c = claim_of(s.as_ref(), "a", &a3, T0 + 10).await;
        assert!(s.requeue(&a3, &c.token, T0 + 10, true).await.unwrap());
        s.cancel_task(&a3, "ten_1", "a", T0 + 10_000_000).await.unwrap();
        assert_eq!(s.get_task(&a3).await.unwrap().unwrap().state, TaskState::Failed);
        // b1 running and b2 pending, the next day; one more at the window's (exclusive) end.
        let (b1, b2, late) = (id_at(T0 + DAY, 1), id_at(T0 + DAY + 5, 1), id_at(T0 + 2 * DAY, 1));
        s.insert_task(tenant_task(&b1, "ten_1", "b", T0 + DAY)).await.unwrap();
        claim_of(s.as_ref(), "b", &b1, T0 + DAY + 1).await;
        s.insert_task(tenant_task(&b2, "ten_1", "b", T0 + DAY + 5)).await.unwrap();
        s.insert_task(tenant_task(&late, "ten_1", "b", T0 + 2 * DAY)).await.unwrap();

        let a_run = 1_500 + retried + 700;
        assert_eq!(usage_of(s.as_ref(), usage_query("ten_1", T0, T0 + 2 * DAY, Model)).await, vec![
            ("a".to_string(), [0, 0, 1, 2], a_run),
            ("b".to_string(), [1, 1, 0, 0], 0),
        ], "a running attempt counts nothing until it ends");
        let (day1, day2) = ((T0 / DAY).to_string(), (T0 / DAY + 1).to_string());
        assert_eq!(usage_of(s.as_ref(), usage_query("ten_1", T0, T0 + 2 * DAY, Day)).await, vec![
            (day1.clone(), [0, 0, 1, 2], a_run),
            (day2, [1, 1, 0, 0], 0),
        ]);
        assert_eq!(usage_of(s.as_ref(), usage_query("ten_1", T0 - 1, T0 + 1, Day)).await, vec![
            ((T0 / DAY - 1).to_string(), [0, 0, 1, 0], 99_000),
            (day1, [0, 0, 1, 0], 1_500),
        ], "from is inclusive and to exclusive, by creation time");
        assert_eq!(usage_of(s.as_ref(), usage_query("ten_2", T0, T0 + DAY, Model)).await, vec![
            ("a".to_string(), [0, 0, 1, 0], 77_000),
        ], "only the tenant's own tasks");
        assert!(usage_of(s.as_ref(), usage_query("ten_1", T0 + 3 * DAY, T0 + 4 * DAY, Model)).await.is_empty());
        // These tasks were inserted without a key: one group, under the empty id.
        let by_key = usage_of(s.as_ref(), usage_query("ten_1", T0, T0 + 2 * DAY, taskgate_proto::UsageGroupBy::Key)).await;
        assert_eq!(by_key.len(), 1, "{by_key:?}");
        assert_eq!(by_key[0].0, "");
    }
}
