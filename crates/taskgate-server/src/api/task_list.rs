//! `GET /api/v1/tasks` (taskgate extension): the caller's tenant's tasks, newest first, a page
//! at a time, each in statusTask's `data` shape plus its `model`.
//!
//! Pages are cut by id: ids are `task_` + a lowercase ULID, so id order is creation order, and
//! the cursor is the last id of a page (base64url, opaque to clients). A page is the tasks below
//! the cursor, so tasks submitted while a client pages through sort above every page it has not
//! read yet and none is skipped or repeated. An unknown `model` filters like any other: it
//! lists nothing rather than answering 404, since tasks of a model removed from the
//! configuration are still listed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use taskgate_proto::{Envelope, ErrorCode, TaskList, TaskListItem, TaskState};

use super::extract::ClientTenant;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::TaskQuery;

/// Tasks per page when `limit` is not given, and the most a page holds.
pub(super) const DEFAULT_LIMIT: usize = 20;
pub(super) const MAX_LIMIT: usize = 100;

const PARAMS: &str = "model, state, createdAfter, createdBefore, limit, cursor";

/// Tasks one page reads at most when a `state` filter is checked row by row.
const MAX_EXAMINED: usize = 5_000;
/// How far a task's id time may be from its `create_time` (both are read from the clock at
/// submit, microseconds apart; a wide margin costs nothing but a few index entries).
const ID_CLOCK_SLACK_MS: i64 = 5_000;

/// The smallest task id of millisecond `ms` (ids are `task_` + a lowercase ULID).
fn id_at(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0).min((1 << 48) - 1);
    format!(
        "task_{}",
        ulid::Ulid::from_parts(ms, 0)
            .to_string()
            .to_ascii_lowercase()
    )
}

pub(super) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/v1/tasks", get(list_tasks))
}

/// List the key's tenant's tasks, newest first, a page at a time (taskgate extension).
#[utoipa::path(
    get,
    path = "/api/v1/tasks",
    tag = "tasks",
    operation_id = "listTasks",
    params(
        ("model" = Option<String>, Query, description = "Only tasks of this model."),
        ("state" = Option<TaskState>, Query, description = "Only tasks in this state."),
        ("createdAfter" = Option<i64>, Query, description = "Only tasks created at or after this Unix time in ms."),
        ("createdBefore" = Option<i64>, Query, description = "Only tasks created before this Unix time in ms."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 100, description = "Tasks per page, 1 to 100 (default 20)."),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page, as it came."),
    ),
    responses((status = 200, description = "A page of tasks; `nextCursor` reads on.", body = Envelope<TaskList>)),
    security(("apiKey" = [])),
)]
async fn list_tasks(
    State(state): State<Arc<AppState>>,
    ClientTenant(tenant): ClientTenant,
    uri: Uri,
) -> Result<Json<Envelope<TaskList>>, ApiError> {
    let page = Page::parse(uri.query().unwrap_or(""))?;
    // The time bounds become id bounds too (ids start with their creation time), so the walk
    // is an index range and not the tenant's whole history; `create_time` stays the exact test.
    let before_id = match (
        page.cursor,
        page.created_before
            .map(|t| id_at(t.saturating_add(ID_CLOCK_SLACK_MS))),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let query = TaskQuery {
        tenant_id: tenant.id,
        model: page.model,
        state: page.state,
        created_after: page.created_after,
        created_before: page.created_before,
        before_id,
        after_id: page
            .created_after
            .map(|t| id_at(t.saturating_sub(ID_CLOCK_SLACK_MS))),
        // One more than the page: whether it exists says whether there is a next page.
        limit: page.limit + 1,
        max_examined: MAX_EXAMINED,
    };
    let listed = state.store.list_tasks(&query).await?;
    let mut tasks = listed.tasks;
    let next_cursor = if tasks.len() > page.limit {
        tasks.truncate(page.limit);
        tasks.last().map(|t| encode_cursor(&t.id))
    } else {
        // A state filter that matched little within the tasks one page may read: the page is
        // short, and the next one goes on below where this one stopped.
        listed.examined_to.as_deref().map(encode_cursor)
    };
    let mut items = Vec::with_capacity(tasks.len());
    for task in tasks {
        // The same rendering as statusTask, result URLs included.
        let status = state
            .links
            .status_of(&task)
            .await
            .map_err(ApiError::internal)?;
        items.push(TaskListItem {
            status,
            model: task.model,
        });
    }
    Ok(Json(Envelope::success(TaskList {
        tasks: items,
        next_cursor,
    })))
}

/// The query parameters, checked.
#[derive(Debug, Default, PartialEq)]
struct Page {
    model: Option<String>,
    state: Option<TaskState>,
    created_after: Option<i64>,
    created_before: Option<i64>,
    limit: usize,
    cursor: Option<String>,
}

impl Page {
    /// Every parameter once at most; an empty value counts as absent; an unknown parameter is
    /// refused rather than ignored, so that a misspelt filter does not list everything.
    fn parse(query: &str) -> Result<Page, ApiError> {
        let bad = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
        let mut page = Page {
            limit: DEFAULT_LIMIT,
            ..Page::default()
        };
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if seen.iter().any(|s| *s == name) {
                return Err(bad(format!("the {name} query parameter is given twice")));
            }
            seen.push(name.clone().into_owned());
            if value.is_empty() {
                continue;
            }
            match name.as_ref() {
                // No model name holds a NUL, and PostgreSQL refuses one in text (a 500).
                "model" if value.contains('\0') => {
                    return Err(bad("model must not contain a NUL character".into()))
                }
                "model" => page.model = Some(value.into_owned()),
                "state" => {
                    page.state = Some(TaskState::parse(&value).ok_or_else(|| {
                        bad(format!(
                        "state must be one of pending, processing, success, failed, got {value:?}"
                    ))
                    })?)
                }
                "createdAfter" => page.created_after = Some(unix_ms("createdAfter", &value)?),
                "createdBefore" => page.created_before = Some(unix_ms("createdBefore", &value)?),
                "limit" => {
                    page.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "limit must be an integer from 1 to {MAX_LIMIT}, got {value:?}"
                            ))
                        })?
                }
                "cursor" => page.cursor = Some(decode_cursor(&value)?),
                other => {
                    return Err(bad(format!(
                        "unknown query parameter {other:?}; /api/v1/tasks takes {PARAMS}"
                    )))
                }
            }
        }
        Ok(page)
    }
}

fn unix_ms(name: &str, value: &str) -> Result<i64, ApiError> {
    value.parse::<i64>().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidInput,
            format!("{name} must be a Unix time in milliseconds (an integer), got {value:?}"),
        )
    })
}

const CURSOR: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn encode_cursor(task_id: &str) -> String {
    CURSOR.encode(task_id)
}

/// The task id a cursor stands for, if it is one this server gives out: base64url of
/// `task_` and lowercase letters and digits.
fn decode_cursor(raw: &str) -> Result<String, ApiError> {
    CURSOR
        .decode(raw)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| {
            id.len() <= 64
                && id.strip_prefix("task_").is_some_and(|rest| {
                    !rest.is_empty()
                        && rest
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                })
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "cursor {raw:?} is not one this server gave out; pass nextCursor from the previous page as it came"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(query: &str) -> String {
        match Page::parse(query) {
            Err(ApiError::Refused { code, message, .. }) => {
                assert_eq!(code, ErrorCode::InvalidInput);
                message
            }
            other => panic!("expected a 400 for {query:?}, got {other:?}"),
        }
    }

    #[test]
    fn no_parameters_ask_for_the_first_page_of_20() {
        let p = Page::parse("").unwrap();
        assert_eq!(
            p,
            Page {
                limit: 20,
                ..Page::default()
            }
        );
        assert_eq!(Page::parse("model=&state=").unwrap(), p);
    }

    #[test]
    fn every_parameter_is_parsed() {
        let cursor = encode_cursor("task_01abc");
        let p = Page::parse(&format!(
            "model=echo&state=success&createdAfter=1&createdBefore=-2&limit=100&cursor={cursor}"
        ))
        .unwrap();
        assert_eq!(p.model.as_deref(), Some("echo"));
        assert_eq!(p.state, Some(TaskState::Success));
        assert_eq!((p.created_after, p.created_before), (Some(1), Some(-2)));
        assert_eq!(p.limit, 100);
        assert_eq!(p.cursor.as_deref(), Some("task_01abc"));
    }

    #[test]
    fn bad_values_are_refused_with_the_parameter_named() {
        for limit in ["0", "101", "ten", "1.5", "-1"] {
            assert!(
                refused(&format!("limit={limit}")).contains("limit must be"),
                "{limit}"
            );
        }
        assert!(refused("state=done").contains("state must be one of"));
        assert!(refused("createdAfter=yesterday").contains("createdAfter"));
        assert!(refused("createdBefore=1e3").contains("createdBefore"));
        assert!(refused("cursor=!!").contains("cursor"));
        assert!(refused(&format!("cursor={}", encode_cursor("key_1"))).contains("cursor"));
        assert!(refused(&format!("cursor={}", encode_cursor("task_A"))).contains("cursor"));
        assert!(refused("limit=1&limit=2").contains("twice"));
        assert!(refused("states=pending").contains("unknown query parameter"));
    }

    #[test]
    fn a_cursor_round_trips_the_id() {
        let id = crate::domain::new_task_id();
        assert_eq!(decode_cursor(&encode_cursor(&id)).unwrap(), id);
    }
}
