//! Failure injection: a [`Store`] that wraps another and makes chosen calls of a named method
//! fail or hang, the way meilisearch's index-scheduler injects failures at named points. Tests
//! install it through [`crate::Hooks`] and drive every error branch of the engine through the
//! real server, instead of waiting for a crash to find them.
//!
//! Points are the trait's method names (`"finish"`, `"renew_lease"`, …). Calls are counted per
//! point from 1; a rule covers a range of call numbers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ApiKeyRecord, CancelOutcome, Claim, Delivery, DeliveryAttempt, DeliveryClaim, DeliveryNext,
    Finished, HostRoom, KeyKind, NewTask, Outcome, Recovered, Redeliver, Rotation, Runner, Store,
    StoreError, StoreEvent, Tenant, WebhookSecrets,
};
use super::{AttemptEnd, AttemptRecord, CountRow};
use super::{IdempotencyKey, KeyedInsert, QueueDepth, TaskPage, TaskQuery};
use super::{KeyPolicy, KeyUsage};
use crate::domain::Task;

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails as if the database were unreachable; nothing is written.
    Fail,
    /// The call waits this long before going through.
    Delay(Duration),
    /// The call goes through (its write commits) and then reports failure, as when the
    /// connection drops before the database's answer arrives.
    FailAfter,
}

#[derive(Debug, Clone)]
struct Rule {
    point: &'static str,
    /// First call number (1-based) the rule covers.
    from: u64,
    /// How many calls from there it covers.
    times: u64,
    fault: Fault,
}

/// The faults to inject and the calls seen so far; shared by the test and the wrapper.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<HashMap<&'static str, u64>>,
}

impl FaultPlan {
    pub fn new() -> Arc<Self> {
        Arc::new(FaultPlan::default())
    }

    /// Injects `fault` into calls `from`, `from + 1`, … (`times` of them) of `point`, counting
    /// every call of the point since the plan was made.
    pub fn inject(&self, point: &'static str, from: u64, times: u64, fault: Fault) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Rule {
                point,
                from,
                times,
                fault,
            });
    }

    /// Injects `fault` into the next `times` calls of `point`.
    pub fn inject_next(&self, point: &'static str, times: u64, fault: Fault) {
        let next = self.calls(point) + 1;
        self.inject(point, next, times, fault);
    }

    /// Removes every rule: calls go through from now on.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many calls of `point` were made.
    pub fn calls(&self, point: &str) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(point)
            .copied()
            .unwrap_or(0)
    }

    /// Counts the call and applies the fault that covers it, if any; `Ok(Some(n))` asks
    /// [`FaultPlan::leave`] to fail call `n` after it went through.
    async fn enter(&self, point: &'static str) -> Result<Option<u64>, StoreError> {
        let n = {
            let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            let n = calls.entry(point).or_insert(0);
            *n += 1;
            *n
        };
        let fault = self
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|r| r.point == point && n >= r.from && n - r.from < r.times)
            .map(|r| r.fault);
        match fault {
            None => Ok(None),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            Some(Fault::Fail) => Err(injected(point, n)),
            Some(Fault::FailAfter) => Ok(Some(n)),
        }
    }

    /// The call's result, or the injected failure of a call that went through.
    fn leave<T>(
        &self,
        point: &'static str,
        fail_after: Option<u64>,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match fail_after {
            Some(n) => result.and(Err(injected(point, n))),
            None => result,
        }
    }
}

fn injected(point: &str, n: u64) -> StoreError {
    StoreError::Unavailable(format!("injected fault: call {n} of {point}").into())
}

/// A store whose calls pass through a [`FaultPlan`] first.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: Arc<FaultPlan>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>, plan: Arc<FaultPlan>) -> Self {
        FaultyStore { inner, plan }
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn insert_task(&self, task: NewTask) -> Result<(), StoreError> {
        let after = self.plan.enter("insert_task").await?;
        let result = self.inner.insert_task(task).await;
        self.plan.leave("insert_task", after, result)
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let after = self.plan.enter("get_task").await?;
        let result = self.inner.get_task(id).await;
        self.plan.leave("get_task", after, result)
    }

    async fn insert_tasks(&self, tasks: Vec<NewTask>) -> Result<(), StoreError> {
        let after = self.plan.enter("insert_tasks").await?;
        let result = self.inner.insert_tasks(tasks).await;
        self.plan.leave("insert_tasks", after, result)
    }

    async fn insert_tasks_keyed(
        &self,
        key: &IdempotencyKey,
        tasks: Vec<NewTask>,
    ) -> Result<KeyedInsert, StoreError> {
        let after = self.plan.enter("insert_tasks_keyed").await?;
        let result = self.inner.insert_tasks_keyed(key, tasks).await;
        self.plan.leave("insert_tasks_keyed", after, result)
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let after = self.plan.enter("list_tasks").await?;
        let result = self.inner.list_tasks(query).await;
        self.plan.leave("list_tasks", after, result)
    }

    async fn claim_batch(
        &self,
        model: &str,
        now: i64,
        lease: Duration,
        max_running: usize,
        limit: usize,
        runner: Runner,
    ) -> Result<Vec<Claim>, StoreError> {
        self.plan.enter("claim_batch").await?;
        self.inner
            .claim_batch(model, now, lease, max_running, limit, runner)
            .await
    }

    async fn next_due(&self, model: &str) -> Result<Option<i64>, StoreError> {
        let after = self.plan.enter("next_due").await?;
        let result = self.inner.next_due(model).await;
        self.plan.leave("next_due", after, result)
    }

    async fn renew_lease(
        &self,
        id: &str,
        token: &str,
        now: i64,
        lease: Duration,
        progress: Option<f64>,
    ) -> Result<bool, StoreError> {
        self.plan.enter("renew_lease").await?;
        self.inner
            .renew_lease(id, token, now, lease, progress)
            .await
    }

    // Named `finish` in fault plans: it is the one final-state write, routed or not.
    async fn finish_routed(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
        route: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let after = self.plan.enter("finish").await?;
        let result = self
            .inner
            .finish_routed(id, token, outcome, route, now)
            .await;
        self.plan.leave("finish", after, result)
    }

    async fn requeue(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        refund_attempt: bool,
    ) -> Result<bool, StoreError> {
        self.plan.enter("requeue").await?;
        self.inner
            .requeue(id, token, run_after, refund_attempt)
            .await
    }

    async fn cancel_task(
        &self,
        id: &str,
        tenant_id: &str,
        model: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let after = self.plan.enter("cancel_task").await?;
        let result = self.inner.cancel_task(id, tenant_id, model, now).await;
        self.plan.leave("cancel_task", after, result)
    }

    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError> {
        let after = self.plan.enter("recover_expired").await?;
        let result = self.inner.recover_expired(now).await;
        self.plan.leave("recover_expired", after, result)
    }

    async fn recover_local(&self, now: i64) -> Result<Recovered, StoreError> {
        let after = self.plan.enter("recover_local").await?;
        let result = self.inner.recover_local(now).await;
        self.plan.leave("recover_local", after, result)
    }

    async fn fail_removed_models(
        &self,
        known: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let after = self.plan.enter("fail_removed_models").await?;
        let result = self.inner.fail_removed_models(known, now).await;
        self.plan.leave("fail_removed_models", after, result)
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let after = self.plan.enter("tenant_by_name").await?;
        let result = self.inner.tenant_by_name(name).await;
        self.plan.leave("tenant_by_name", after, result)
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let after = self.plan.enter("create_tenant").await?;
        let result = self.inner.create_tenant(name).await;
        self.plan.leave("create_tenant", after, result)
    }

    async fn insert_key(
        &self,
        kind: KeyKind,
        tenant: &Tenant,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
        policy: &KeyPolicy,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.plan.enter("insert_key").await?;
        self.inner
            .insert_key(kind, tenant, name, prefix, key_hash, policy)
            .await
    }

    async fn update_key_policy(&self, id: &str, policy: &KeyPolicy) -> Result<bool, StoreError> {
        let after = self.plan.enter("update_key_policy").await?;
        let result = self.inner.update_key_policy(id, policy).await;
        self.plan.leave("update_key_policy", after, result)
    }

    async fn sync_key_usage(
        &self,
        node: &str,
        mine: &[KeyUsage],
        oldest: i64,
    ) -> Result<Vec<KeyUsage>, StoreError> {
        let after = self.plan.enter("sync_key_usage").await?;
        let result = self.inner.sync_key_usage(node, mine, oldest).await;
        self.plan.leave("sync_key_usage", after, result)
    }

    async fn unfinished_by_key(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let after = self.plan.enter("unfinished_by_key").await?;
        let result = self.inner.unfinished_by_key().await;
        self.plan.leave("unfinished_by_key", after, result)
    }

    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        let after = self.plan.enter("key_by_hash").await?;
        let result = self.inner.key_by_hash(key_hash).await;
        self.plan.leave("key_by_hash", after, result)
    }

    async fn keys_revision(&self) -> Result<(i64, i64), StoreError> {
        let after = self.plan.enter("keys_revision").await?;
        let result = self.inner.keys_revision().await;
        self.plan.leave("keys_revision", after, result)
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let after = self.plan.enter("get_blob").await?;
        let result = self.inner.get_blob(key).await;
        self.plan.leave("get_blob", after, result)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let after = self.plan.enter("list_keys").await?;
        let result = self.inner.list_keys().await;
        self.plan.leave("list_keys", after, result)
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let after = self.plan.enter("revoke_key").await?;
        let result = self.inner.revoke_key(id, now).await;
        self.plan.leave("revoke_key", after, result)
    }

    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError> {
        let after = self.plan.enter("setting_or_init").await?;
        let result = self.inner.setting_or_init(name, init).await;
        self.plan.leave("setting_or_init", after, result)
    }

    async fn webhook_secrets(
        &self,
        tenant_id: &str,
        init: &str,
    ) -> Result<WebhookSecrets, StoreError> {
        let after = self.plan.enter("webhook_secrets").await?;
        let result = self.inner.webhook_secrets(tenant_id, init).await;
        self.plan.leave("webhook_secrets", after, result)
    }

    async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        new: &str,
        now: i64,
        previous_until: i64,
    ) -> Result<Rotation, StoreError> {
        self.plan.enter("rotate_webhook_secret").await?;
        self.inner
            .rotate_webhook_secret(tenant_id, new, now, previous_until)
            .await
    }

    async fn claim_deliveries(
        &self,
        now: i64,
        limit: usize,
        lease: Duration,
        room: &HostRoom,
    ) -> Result<Vec<DeliveryClaim>, StoreError> {
        let after = self.plan.enter("claim_deliveries").await?;
        let result = self.inner.claim_deliveries(now, limit, lease, room).await;
        self.plan.leave("claim_deliveries", after, result)
    }

    async fn next_delivery_due(&self, blocked: &[String]) -> Result<Option<i64>, StoreError> {
        let after = self.plan.enter("next_delivery_due").await?;
        let result = self.inner.next_delivery_due(blocked).await;
        self.plan.leave("next_delivery_due", after, result)
    }

    async fn defer_host(&self, host: &str, until: i64) -> Result<u64, StoreError> {
        let after = self.plan.enter("defer_host").await?;
        let result = self.inner.defer_host(host, until).await;
        self.plan.leave("defer_host", after, result)
    }

    async fn finish_delivery_attempt(
        &self,
        id: &str,
        token: &str,
        attempt: Option<&DeliveryAttempt>,
        next: DeliveryNext,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.plan.enter("finish_delivery_attempt").await?;
        self.inner
            .finish_delivery_attempt(id, token, attempt, next, now)
            .await
    }

    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let after = self.plan.enter("get_delivery").await?;
        let result = self.inner.get_delivery(id).await;
        self.plan.leave("get_delivery", after, result)
    }

    async fn deliveries_for_task(
        &self,
        task_id: &str,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>, StoreError> {
        let after = self.plan.enter("deliveries_for_task").await?;
        let result = self.inner.deliveries_for_task(task_id).await;
        self.plan.leave("deliveries_for_task", after, result)
    }

    async fn redeliver(
        &self,
        id: &str,
        now: i64,
        min_gap: Duration,
    ) -> Result<Redeliver, StoreError> {
        let after = self.plan.enter("redeliver").await?;
        let result = self.inner.redeliver(id, now, min_gap).await;
        self.plan.leave("redeliver", after, result)
    }

    async fn recover_expired_deliveries(&self, now: i64) -> Result<u64, StoreError> {
        let after = self.plan.enter("recover_expired_deliveries").await?;
        let result = self.inner.recover_expired_deliveries(now).await;
        self.plan.leave("recover_expired_deliveries", after, result)
    }

    async fn clock_ms(&self) -> Result<i64, StoreError> {
        let after = self.plan.enter("clock_ms").await?;
        let result = self.inner.clock_ms().await;
        self.plan.leave("clock_ms", after, result)
    }

    async fn expire_pending(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let entered = self.plan.enter("expire_pending").await?;
        let result = self.inner.expire_pending(now, limit).await;
        self.plan.leave("expire_pending", entered, result)
    }

    async fn finished_tasks(
        &self,
        after: Option<(i64, String)>,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Finished>, StoreError> {
        let entered = self.plan.enter("finished_tasks").await?;
        let result = self.inner.finished_tasks(after, before, limit).await;
        self.plan.leave("finished_tasks", entered, result)
    }

    async fn delete_blobs(&self, keys: &[String]) -> Result<u64, StoreError> {
        let entered = self.plan.enter("delete_blobs").await?;
        let result = self.inner.delete_blobs(keys).await;
        self.plan.leave("delete_blobs", entered, result)
    }

    async fn delete_tasks(&self, task_ids: &[String]) -> Result<Vec<String>, StoreError> {
        let entered = self.plan.enter("delete_tasks").await?;
        let result = self.inner.delete_tasks(task_ids).await;
        self.plan.leave("delete_tasks", entered, result)
    }

    async fn delete_expired_keys(&self, before: i64, limit: usize) -> Result<u64, StoreError> {
        let entered = self.plan.enter("delete_expired_keys").await?;
        let result = self.inner.delete_expired_keys(before, limit).await;
        self.plan.leave("delete_expired_keys", entered, result)
    }

    async fn advance_setting(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let entered = self.plan.enter("advance_setting").await?;
        let result = self.inner.advance_setting(name, value).await;
        self.plan.leave("advance_setting", entered, result)
    }

    async fn append_logs(
        &self,
        task_id: &str,
        token: &str,
        lines: &[String],
        now: i64,
    ) -> Result<bool, StoreError> {
        let entered = self.plan.enter("append_logs").await?;
        let result = self.inner.append_logs(task_id, token, lines, now).await;
        self.plan.leave("append_logs", entered, result)
    }

    async fn log_tail(
        &self,
        task_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::TaskLogLine>, StoreError> {
        let entered = self.plan.enter("log_tail").await?;
        let result = self.inner.log_tail(task_id, after, limit).await;
        self.plan.leave("log_tail", entered, result)
    }

    async fn queue_position(&self, task_id: &str, now: i64) -> Result<Option<u64>, StoreError> {
        let entered = self.plan.enter("queue_position").await?;
        let result = self.inner.queue_position(task_id, now).await;
        self.plan.leave("queue_position", entered, result)
    }

    async fn queue_depths(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let entered = self.plan.enter("queue_depths").await?;
        let result = self.inner.queue_depths().await;
        self.plan.leave("queue_depths", entered, result)
    }

    async fn count_tasks(&self, tenant_id: &str, since: i64) -> Result<Vec<CountRow>, StoreError> {
        let entered = self.plan.enter("count_tasks").await?;
        let result = self.inner.count_tasks(tenant_id, since).await;
        self.plan.leave("count_tasks", entered, result)
    }

    async fn usage(
        &self,
        query: &super::UsageQuery,
    ) -> Result<Vec<super::UsageAggregate>, StoreError> {
        let entered = self.plan.enter("usage").await?;
        let result = self.inner.usage(query).await;
        self.plan.leave("usage", entered, result)
    }

    async fn requeue_failed(
        &self,
        id: &str,
        token: &str,
        run_after: i64,
        ended: &AttemptEnd,
    ) -> Result<bool, StoreError> {
        // Named like `requeue`: a plan that breaks requeues breaks both kinds.
        self.plan.enter("requeue").await?;
        self.inner.requeue_failed(id, token, run_after, ended).await
    }

    async fn attempt_record(&self, id: &str) -> Result<Option<AttemptRecord>, StoreError> {
        let entered = self.plan.enter("attempt_record").await?;
        let result = self.inner.attempt_record(id).await;
        self.plan.leave("attempt_record", entered, result)
    }

    async fn webhook_backlog(
        &self,
        tenant_id: &str,
    ) -> Result<taskgate_proto::WebhookBacklog, StoreError> {
        let entered = self.plan.enter("webhook_backlog").await?;
        let result = self.inner.webhook_backlog(tenant_id).await;
        self.plan.leave("webhook_backlog", entered, result)
    }

    async fn record_worker(&self, seen: &taskgate_proto::WorkerSeen) -> Result<(), StoreError> {
        let entered = self.plan.enter("record_worker").await?;
        let result = self.inner.record_worker(seen).await;
        self.plan.leave("record_worker", entered, result)
    }

    async fn workers_seen(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<taskgate_proto::WorkerSeen>, StoreError> {
        let entered = self.plan.enter("workers_seen").await?;
        let result = self.inner.workers_seen(since, limit).await;
        self.plan.leave("workers_seen", entered, result)
    }

    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }

    fn set_tenant_weights(&self, weights: super::TenantWeights) {
        self.inner.set_tenant_weights(weights);
    }

    async fn listen(&self, events: tokio::sync::mpsc::UnboundedSender<StoreEvent>) {
        self.inner.listen(events).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
