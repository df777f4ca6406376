//! Webhook settings and deliveries of a tenant: its signing secret, rotation, the delivery log
//! of a task, and manual re-delivery.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::routing::{get, post};
use axum::{Json, Router};
use taskgate_proto::{
    webhook, Envelope, ErrorCode, WebhookAttempt, WebhookDeliveries, WebhookDelivery,
    WebhookSecretData,
};

use super::extract::{ClientTenant, PathParams, Writer};
use super::query_param;
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Delivery, DeliveryAttempt, Redeliver, Rotation};
use crate::webhooks::MANUAL_RETRY_INTERVAL;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/webhookSecret", get(webhook_secret))
        .route("/api/v1/webhookSecret/rotate", post(rotate_webhook_secret))
        .route("/api/v1/webhookDeliveries", get(list_deliveries))
        .route("/api/v1/webhookDeliveries/{id}/retry", post(retry_delivery))
}

fn secret_data(s: crate::store::WebhookSecrets) -> WebhookSecretData {
    let live = s.previous_expires_at.is_some_and(|t| t > now_ms());
    WebhookSecretData {
        secret: s.current,
        previous_secret: s.previous.filter(|_| live),
        previous_expires_time: s.previous_expires_at.filter(|_| live),
    }
}

/// The tenant's webhook signing secret (made on first use).
#[utoipa::path(
    get,
    path = "/api/v1/webhookSecret",
    tag = "webhooks",
    operation_id = "getWebhookSecret",
    responses((status = 200, description = "The secret that signs callbacks, and the previous one while it still signs.", body = Envelope<WebhookSecretData>)),
    security(("apiKey" = [])),
)]
async fn webhook_secret(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
) -> Result<Json<Envelope<WebhookSecretData>>, ApiError> {
    let secrets = state
        .store
        .webhook_secrets(&tenant.id, &webhook::generate_secret())
        .await?;
    Ok(Json(Envelope::success(secret_data(secrets))))
}

/// Replace the signing secret; the previous one keeps signing for the overlap.
#[utoipa::path(
    post,
    path = "/api/v1/webhookSecret/rotate",
    tag = "webhooks",
    operation_id = "rotateWebhookSecret",
    responses((status = 200, description = "Rotated: the new secret, and the previous one with when it stops signing.", body = Envelope<WebhookSecretData>)),
    security(("apiKey" = [])),
)]
async fn rotate_webhook_secret(
    State(state): State<Arc<AppState>>,
    Writer(caller): Writer,
) -> Result<Json<Envelope<WebhookSecretData>>, ApiError> {
    super::extract::tenant_wide(&caller.0)?;
    let tenant = caller.tenant();
    // Make sure a first secret exists, so that rotation always has one to overlap with.
    state
        .store
        .webhook_secrets(&tenant.id, &webhook::generate_secret())
        .await?;
    let now = now_ms();
    let until = now + state.webhooks.secret_overlap.as_millis() as i64;
    // A second rotation while the previous secret still signs would drop that secret before
    // receivers were promised it stops: refuse, and say until when.
    match state
        .store
        .rotate_webhook_secret(&tenant.id, &webhook::generate_secret(), now, until)
        .await?
    {
        Rotation::Rotated(secrets) => Ok(Json(Envelope::success(secret_data(secrets)))),
        Rotation::OverlapRunning(secrets) => {
            let until = secrets.previous_expires_at.unwrap_or(now);
            Err(ApiError::new(ErrorCode::SecretRotationPending, format!(
                "the previous secret still signs deliveries until {} (previousExpiresTime {until}); \
                 rotating again now would stop it early. Rotate again after that time",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(until.max(0) as u64)
                ),
            )))
        }
    }
}

fn delivery_view(d: Delivery, attempts: Vec<DeliveryAttempt>) -> WebhookDelivery {
    WebhookDelivery {
        next_attempt_time: (d.state == "pending").then_some(d.next_attempt_at),
        id: d.id,
        task_id: d.task_id,
        event: d.event,
        url: d.url,
        state: d.state,
        attempts: d.attempts,
        create_time: d.created_at,
        complete_time: d.completed_at,
        last_error: d.last_error,
        attempt_log: attempts
            .into_iter()
            .map(|a| WebhookAttempt {
                time: a.attempted_at,
                status_code: a.status_code,
                latency_ms: a.latency_ms,
                error: a.error,
            })
            .collect(),
    }
}

/// A task's webhook deliveries, each with its attempts.
#[utoipa::path(
    get,
    path = "/api/v1/webhookDeliveries",
    tag = "webhooks",
    operation_id = "listWebhookDeliveries",
    params(("taskId" = String, Query, description = "The task whose deliveries to list.")),
    responses((status = 200, description = "The task's deliveries.", body = Envelope<WebhookDeliveries>)),
    security(("apiKey" = [])),
)]
async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
    uri: Uri,
) -> Result<Json<Envelope<WebhookDeliveries>>, ApiError> {
    let task_id = query_param(&uri, "taskId").ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidInput,
            "the taskId query parameter is required: /api/v1/webhookDeliveries?taskId=TASK_ID",
        )
    })?;
    let task = state
        .store
        .get_task(&task_id)
        .await?
        .filter(|t| t.tenant_id == tenant.id)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::TaskNotFound,
                format!("task {task_id:?} not found"),
            )
        })?;
    let deliveries = state
        .store
        .deliveries_for_task(&task.id)
        .await?
        .into_iter()
        .map(|(d, a)| delivery_view(d, a))
        .collect();
    Ok(Json(Envelope::success(WebhookDeliveries { deliveries })))
}

/// Send a delivery again now (at most once a minute per delivery).
#[utoipa::path(
    post,
    path = "/api/v1/webhookDeliveries/{id}/retry",
    tag = "webhooks",
    operation_id = "retryWebhookDelivery",
    params(("id" = String, Path, description = "The delivery's id (its `webhook-id`).")),
    responses((status = 200, description = "Scheduled: the delivery as it stands now.", body = Envelope<WebhookDelivery>)),
    security(("apiKey" = [])),
)]
async fn retry_delivery(
    State(state): State<Arc<AppState>>,
    Writer(caller): Writer,
    PathParams(id): PathParams<String>,
) -> Result<Json<Envelope<WebhookDelivery>>, ApiError> {
    super::extract::tenant_wide(&caller.0)?;
    let tenant = caller.tenant();
    let not_found = || {
        ApiError::new(
            ErrorCode::DeliveryNotFound,
            format!("webhook delivery {id:?} not found"),
        )
    };
    let delivery = state
        .store
        .get_delivery(&id)
        .await?
        .filter(|d| d.tenant_id == tenant.id)
        .ok_or_else(not_found)?;
    let now = now_ms();
    match state
        .store
        .redeliver(&delivery.id, now, MANUAL_RETRY_INTERVAL)
        .await?
    {
        Redeliver::Scheduled => {}
        Redeliver::TooSoon { retry_at } => {
            let wait = std::time::Duration::from_millis((retry_at - now).max(0) as u64);
            let secs = wait.as_millis().div_ceil(1000).max(1);
            return Err(ApiError::too_soon(
                ErrorCode::RetryTooSoon,
                format!(
                    "this delivery was retried less than {}s ago; it may be retried again in \
                     {secs} seconds",
                    MANUAL_RETRY_INTERVAL.as_secs()
                ),
                wait,
            ));
        }
        Redeliver::InFlight => {
            return Err(ApiError::new(
                ErrorCode::DeliveryInFlight,
                "this delivery is being sent right now; look at its attempts again shortly",
            ))
        }
        Redeliver::NotFound => return Err(not_found()),
    }
    state.deliverer.wake();
    let updated = state
        .store
        .deliveries_for_task(&delivery.task_id)
        .await?
        .into_iter()
        .find(|(d, _)| d.id == delivery.id)
        .ok_or_else(not_found)?;
    Ok(Json(Envelope::success(delivery_view(updated.0, updated.1))))
}
