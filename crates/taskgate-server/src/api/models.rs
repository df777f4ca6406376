//! `GET /api/v1/models` (a taskgate extension): the models a key may use, each with its modes,
//! recommended poll interval and input schema; and the schema check that generateTask runs.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value};
use taskgate_proto::{Envelope, ErrorCode, ModelInfo, ModelList};

use super::extract::Caller;
use crate::dispatch::ModelRuntime;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/models", get(list_models))
}

/// The models this key may use (taskgate extension).
#[utoipa::path(
    get,
    path = "/api/v1/models",
    tag = "models",
    operation_id = "listModels",
    responses((status = 200, description = "The models, sorted by name.", body = Envelope<ModelList>)),
    security(("apiKey" = [])),
)]
async fn list_models(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Json<Envelope<ModelList>> {
    let models = usable_models(&state, &caller).map(|m| info(m)).collect();
    Json(Envelope::success(ModelList { models }))
}

/// The models `caller` may use, sorted by name: those of its key's scope. Every route about a
/// model checks the same scope ([`Caller::may_use`]) before looking the model up.
fn usable_models<'a>(
    state: &'a AppState,
    caller: &'a Caller,
) -> impl Iterator<Item = &'a Arc<ModelRuntime>> {
    // The dispatcher keeps its models in a BTreeMap: the order is the names'.
    state
        .dispatcher
        .models()
        .filter(|m| caller.0.policy.allows(&m.name))
}

fn info(model: &ModelRuntime) -> ModelInfo {
    let config = &model.config;
    ModelInfo {
        model: model.name.clone(),
        description: config.description.clone(),
        modes: config.listed_modes(),
        poll_interval_ms: u64::try_from(config.recommended_poll_interval().as_millis())
            .unwrap_or(u64::MAX),
        input_schema: model.input_schema.as_ref().map(|s| s.document().clone()),
    }
}

/// Checks a submit's `input` against the model's schema, if it has one: a 400 naming every
/// violation (up to the cap) by its JSON pointer.
pub(super) fn check_input(
    model: &ModelRuntime,
    input: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let Some(schema) = &model.input_schema else {
        return Ok(());
    };
    // The validator takes a `Value`: move the map in and back out rather than copy a body that
    // may be megabytes.
    let value = Value::Object(std::mem::take(input));
    let outcome = schema.check(&value);
    if let Value::Object(map) = value {
        *input = map;
    }
    outcome.map_err(|violations| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!(
                "input does not match model {:?}'s schema: {violations}",
                model.name
            ),
        )
    })
}
