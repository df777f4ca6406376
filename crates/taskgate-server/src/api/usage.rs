//! `GET /api/v1/usage?from=&to=&groupBy=model|day` (taskgate extension): the caller's tenant's
//! tasks created in a window, per model or per UTC day, by state, with the seconds their
//! attempts ran. The figures come from one store read over the task records (`crate::usage`,
//! which `taskgate keys usage` calls too), never from a second count kept beside them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use taskgate_proto::{Envelope, ErrorCode, UsageGroupBy, UsageReport};

use super::extract::ClientTenant;
use crate::error::ApiError;
use crate::state::AppState;

const ROUTE: &str = "/api/v1/usage";

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/usage", get(usage))
}

/// The caller's tenant's usage: tasks created in `[from, to)`, grouped, by state, with their
/// run time (taskgate extension).
#[utoipa::path(
    get,
    path = "/api/v1/usage",
    tag = "operator",
    operation_id = "usage",
    params(
        ("from" = Option<String>, Query, description = "Start of the window (inclusive), by creation time: RFC 3339 (`2025-01-31T00:00:00Z`, any offset), a date (`2025-01-31`, UTC midnight) or Unix ms. Left out: 30 days before `to`."),
        ("to" = Option<String>, Query, description = "End of the window (exclusive), in the same forms. Left out: now. At most 366 days after `from`."),
        ("groupBy" = Option<UsageGroupBy>, Query, description = "One row per `model` (the default), per UTC `day` of creation, or per `key` (the id of the API key that submitted the tasks; empty for tasks from before keys were recorded)."),
    ),
    responses((status = 200, description = "The caller's usage, one row per group (sorted) and the total.", body = Envelope<UsageReport>)),
    security(("apiKey" = [])),
)]
async fn usage(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
    uri: Uri,
) -> Result<Json<Envelope<UsageReport>>, ApiError> {
    let [from, to, group_by] = super::known_params(&uri, ROUTE, ["from", "to", "groupBy"])?;
    let window = crate::usage::window(
        from.as_deref(),
        to.as_deref(),
        group_by.as_deref(),
        crate::domain::now_ms(),
    )
    .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.0))?;
    let report = crate::usage::report(state.store.as_ref(), &tenant.id, &window).await?;
    Ok(Json(Envelope::success(report)))
}
