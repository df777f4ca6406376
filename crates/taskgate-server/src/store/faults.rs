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
    ApiKeyRecord, Claim, Delivery, DeliveryAttempt, DeliveryClaim, DeliveryNext, HostRoom, KeyKind,
    NewTask, Outcome, Recovered, Redeliver, Rotation, Runner, Store, StoreError, StoreEvent,
    Tenant, WebhookSecrets,
};
use crate::domain::Task;

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails as if the database were unreachable; nothing is written.
    Fail,
    /// The call waits this long before going through.
    Delay(Duration),
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

    /// Counts the call and applies the fault that covers it, if any.
    async fn enter(&self, point: &'static str) -> Result<(), StoreError> {
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
            None => Ok(()),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Fail) => Err(StoreError::Unavailable(sqlx::Error::Protocol(format!(
                "injected fault: call {n} of {point}"
            )))),
        }
    }
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
        self.plan.enter("insert_task").await?;
        self.inner.insert_task(task).await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.plan.enter("get_task").await?;
        self.inner.get_task(id).await
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
        self.plan.enter("next_due").await?;
        self.inner.next_due(model).await
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

    async fn finish(
        &self,
        id: &str,
        token: &str,
        outcome: &Outcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.plan.enter("finish").await?;
        self.inner.finish(id, token, outcome, now).await
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

    async fn recover_expired(&self, now: i64) -> Result<Recovered, StoreError> {
        self.plan.enter("recover_expired").await?;
        self.inner.recover_expired(now).await
    }

    async fn recover_local(&self, now: i64) -> Result<Recovered, StoreError> {
        self.plan.enter("recover_local").await?;
        self.inner.recover_local(now).await
    }

    async fn fail_removed_models(
        &self,
        known: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.plan.enter("fail_removed_models").await?;
        self.inner.fail_removed_models(known, now).await
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.plan.enter("tenant_by_name").await?;
        self.inner.tenant_by_name(name).await
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        self.plan.enter("create_tenant").await?;
        self.inner.create_tenant(name).await
    }

    async fn insert_key(
        &self,
        kind: KeyKind,
        tenant: &Tenant,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
    ) -> Result<ApiKeyRecord, StoreError> {
        self.plan.enter("insert_key").await?;
        self.inner
            .insert_key(kind, tenant, name, prefix, key_hash)
            .await
    }

    async fn key_by_hash(&self, key_hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.plan.enter("key_by_hash").await?;
        self.inner.key_by_hash(key_hash).await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.plan.enter("list_keys").await?;
        self.inner.list_keys().await
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.plan.enter("revoke_key").await?;
        self.inner.revoke_key(id, now).await
    }

    async fn setting_or_init(&self, name: &str, init: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.plan.enter("setting_or_init").await?;
        self.inner.setting_or_init(name, init).await
    }

    async fn webhook_secrets(
        &self,
        tenant_id: &str,
        init: &str,
    ) -> Result<WebhookSecrets, StoreError> {
        self.plan.enter("webhook_secrets").await?;
        self.inner.webhook_secrets(tenant_id, init).await
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
        self.plan.enter("claim_deliveries").await?;
        self.inner.claim_deliveries(now, limit, lease, room).await
    }

    async fn next_delivery_due(&self, blocked: &[String]) -> Result<Option<i64>, StoreError> {
        self.plan.enter("next_delivery_due").await?;
        self.inner.next_delivery_due(blocked).await
    }

    async fn defer_host(&self, host: &str, until: i64) -> Result<u64, StoreError> {
        self.plan.enter("defer_host").await?;
        self.inner.defer_host(host, until).await
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
        self.plan.enter("get_delivery").await?;
        self.inner.get_delivery(id).await
    }

    async fn deliveries_for_task(
        &self,
        task_id: &str,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>, StoreError> {
        self.plan.enter("deliveries_for_task").await?;
        self.inner.deliveries_for_task(task_id).await
    }

    async fn redeliver(
        &self,
        id: &str,
        now: i64,
        min_gap: Duration,
    ) -> Result<Redeliver, StoreError> {
        self.plan.enter("redeliver").await?;
        self.inner.redeliver(id, now, min_gap).await
    }

    async fn recover_expired_deliveries(&self, now: i64) -> Result<u64, StoreError> {
        self.plan.enter("recover_expired_deliveries").await?;
        self.inner.recover_expired_deliveries(now).await
    }

    async fn clock_ms(&self) -> Result<i64, StoreError> {
        self.plan.enter("clock_ms").await?;
        self.inner.clock_ms().await
    }

    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }

    async fn listen(&self, events: tokio::sync::mpsc::UnboundedSender<StoreEvent>) {
        self.inner.listen(events).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
