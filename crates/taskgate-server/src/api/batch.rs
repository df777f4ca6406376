//! `POST /api/v1/generateTasks/{model}` (taskgate extension): up to 1000 generateTask bodies
//! in one request, `{"tasks": [BODY, ...]}`, created in one transaction — all of them, or none.
//!
//! Each item is checked exactly as generateTask checks its body (the same parsing, then the
//! model backend's `validate`); the first bad item is named by its index (`tasks[3]: …`) and
//! nothing is created. The whole request is one body, so the server's `max_body_bytes` bounds
//! the batch (413 beyond it). With an `Idempotency-Key` the key covers the whole batch.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value};
use taskgate_proto::{Envelope, ErrorCode, GenerateTasksRequest, TasksCreated, MAX_BATCH_TASKS};

use super::extract::{PathParams, Writer};
use super::idempotency::{self, IdempotencyHeader, GENERATE_TASKS};
use super::models;
use super::tasks::{
    json_type_name, model_or_404, new_task, read_body, submission_from_object, within_task_limit,
};
use crate::domain::{new_task_ids, now_ms};
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/generateTasks/{model}", post(generate_tasks))
}

/// Submit up to 1000 tasks of one model, all or none (taskgate extension).
#[utoipa::path(
    post,
    path = "/api/v1/generateTasks/{model}",
    tag = "tasks",
    operation_id = "generateTasks",
    params(("model" = String, Path, description = "The model's name, as `GET /api/v1/models` lists it.", example = "echo"), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII bytes. The same key from the same tenant within 24 h answers what the first request created and creates nothing; with another request it is `idempotency_key_reused` (422).", example = "nightly-2024-06-01")),
    request_body(content = GenerateTasksRequest, description = "1 to 1000 generateTask bodies; a refused item is named by its index (`tasks[3]: …`) and nothing is created."),
    responses((status = 200, description = "All created; their ids in the order of the request.", body = Envelope<TasksCreated>)),
    security(("apiKey" = [])),
)]
async fn generate_tasks(
    State(state): State<Arc<AppState>>,
    Writer(caller): Writer,
    PathParams(model): PathParams<String>,
    idempotency: IdempotencyHeader,
    request: axum::extract::Request,
) -> Result<Json<Envelope<TasksCreated>>, ApiError> {
    caller.may_use(&model)?;
    let runtime = model_or_404(&state, &model)?;
    let body = read_body(&state, request).await?;
    let key = idempotency.key()?;
    let items = parse_batch(&body)?;
    let now = now_ms();
    let ids = new_task_ids(items.len());
    let mut tasks = Vec::with_capacity(items.len());
    for (i, (item, id)) in items.into_iter().zip(ids).enumerate() {
        let mut submission = submission_from_object(item, state.webhooks.allow_private_callbacks)
            .map_err(|e| at_item(i, e))?;
        models::check_input(runtime, &mut submission.input).map_err(|e| at_item(i, e))?;
        runtime
            .backend
            .validate(&submission.input)
            .map_err(|m| at_item(i, ApiError::new(ErrorCode::InvalidInput, m)))?;
        tasks.push(new_task(runtime, &caller, submission, id, now));
    }
    let n = tasks.len() as u64;
    let task_ids = within_task_limit(&state, &caller, n, async {
        match key {
            Some(key) => {
                idempotency::submit(&state, runtime, key, GENERATE_TASKS, &body, tasks).await
            }
            None => idempotency::insert_all(&state, runtime, tasks).await,
        }
    })
    .await?;
    Ok(Json(Envelope::success(TasksCreated { task_ids })))
}

/// The items of `{"tasks": [...]}`, each a JSON object, 1 to [`MAX_BATCH_TASKS`] of them.
/// Other top-level fields are ignored, as generateTask ignores unknown fields.
pub(super) fn parse_batch(bytes: &[u8]) -> Result<Vec<Map<String, Value>>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
    let example = "{\"tasks\": [{\"input\": {\"prompt\": \"...\"}}, ...]}";
    let value = super::tasks::parse_json_body(bytes, example)?;
    let Value::Object(mut body) = value else {
        return Err(bad(format!(
            "the request body must be a JSON object like {example}, got {}",
            json_type_name(&value)
        )));
    };
    let items = match body.remove("tasks") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(bad(format!(
                "tasks is required: a list of 1 to {MAX_BATCH_TASKS} generateTask bodies, e.g. {example}"
            )))
        }
        Some(other) => {
            return Err(bad(format!(
                "tasks must be an array of generateTask bodies, got {}",
                json_type_name(&other)
            )))
        }
    };
    if items.is_empty() {
        return Err(bad(format!(
            "tasks is empty; send 1 to {MAX_BATCH_TASKS} generateTask bodies"
        )));
    }
    if items.len() > MAX_BATCH_TASKS {
        return Err(bad(format!(
            "tasks holds {} bodies; at most {MAX_BATCH_TASKS} fit in one request, send the rest in another",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(m) => Ok(m),
            other => Err(bad(format!(
                "tasks[{i}] must be a JSON object (a generateTask body), got {}",
                json_type_name(&other)
            ))),
        })
        .collect()
}

/// The refusal of one item, named by its index; its code (and so its status) is kept.
fn at_item(i: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::Refused {
            code,
            message,
            retry_after,
        } => ApiError::Refused {
            code,
            message: format!("tasks[{i}]: {message}"),
            retry_after,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn err(body: &str) -> String {
        match parse_batch(body.as_bytes()) {
            Err(ApiError::Refused { code, message, .. }) => {
                assert_eq!(code, ErrorCode::InvalidInput);
                message
            }
            _ => panic!("expected a 400 for {body}"),
        }
    }

    #[test]
    fn each_malformed_batch_gets_a_message_naming_the_problem() {
        assert!(err("").contains("empty"));
        assert!(err("{").contains("not valid JSON"));
        assert!(err("[]").contains("must be a JSON object"));
        assert!(err("{}").contains("tasks is required"));
        assert!(err(r#"{"tasks": {}}"#).contains("must be an array"));
        assert!(err(r#"{"tasks": []}"#).contains("tasks is empty"));
        assert!(err(r#"{"tasks": [{}, 3]}"#).contains("tasks[1] must be a JSON object"));
        let many = format!(r#"{{"tasks": [{}]}}"#, vec!["{}"; 1001].join(","));
        assert!(err(&many).contains("1001"));
        let most = format!(r#"{{"tasks": [{}]}}"#, vec!["{}"; 1000].join(","));
        assert_eq!(parse_batch(most.as_bytes()).unwrap().len(), 1000);
    }

    #[test]
    fn an_items_refusal_names_its_index_and_keeps_its_code() {
        let e = at_item(
            3,
            ApiError::new(ErrorCode::CallbackUrlRefused, "callback_url bad"),
        );
        match e {
            ApiError::Refused { code, message, .. } => {
                assert_eq!(code, ErrorCode::CallbackUrlRefused);
                assert_eq!(message, "tasks[3]: callback_url bad");
            }
            _ => panic!(),
        }
    }
}
