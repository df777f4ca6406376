//! Wire types of the usage report (`GET /api/v1/usage`, taskgate's own; `taskgate keys usage
//! --json` prints the same `data`): a tenant's tasks created in a window, grouped, with their
//! final states and the seconds their attempts ran.

use serde::{Deserialize, Serialize};

use crate::StateCounts;

/// What the rows of a usage report are per.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageGroupBy {
    /// One row per model name.
    Model,
    /// One row per UTC date of creation (`YYYY-MM-DD`).
    Day,
    /// One row per API key that submitted the tasks (its id).
    Key,
}

impl UsageGroupBy {
    pub const ALL: [UsageGroupBy; 3] = [UsageGroupBy::Model, UsageGroupBy::Day, UsageGroupBy::Key];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageGroupBy::Model => "model",
            UsageGroupBy::Day => "day",
            UsageGroupBy::Key => "key",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// The figures of a set of tasks: how many are in each state, how many in all, and the seconds
/// their attempts ran.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageFigures {
    #[serde(flatten)]
    pub counts: StateCounts,
    pub total: u64,
    /// Seconds (millisecond precision) the tasks' attempts ran: every ended attempt, from its
    /// claim to its end, the earlier (retried or lost) ones included; a running attempt is not
    /// counted until it ends.
    pub run_seconds: f64,
}

/// One row of a usage report: the group it is for (the field named as `groupBy`) and its
/// figures.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// With `groupBy=model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// With `groupBy=day`: the UTC date of creation, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// With `groupBy=key`: the id of the key that submitted the tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(flatten)]
    pub figures: UsageFigures,
}

/// `data` of `GET /api/v1/usage`: the caller's tenant's tasks created in `[from, to)`, one row
/// per group (sorted by the group's value; groups without tasks are left out), and the total.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// Unix ms: the window's start (inclusive).
    pub from: i64,
    /// Unix ms: the window's end (exclusive).
    pub to: i64,
    pub group_by: UsageGroupBy,
    pub rows: Vec<UsageRow>,
    pub total: UsageFigures,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_row_names_its_group_and_flattens_its_figures() {
        let row = UsageRow {
            model: None,
            day: Some("2025-01-02".into()),
            key: None,
            figures: UsageFigures {
                counts: StateCounts {
                    pending: 1,
                    processing: 0,
                    success: 2,
                    failed: 3,
                },
                total: 6,
                run_seconds: 1.5,
            },
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"day": "2025-01-02", "pending": 1, "processing": 0,
                "success": 2, "failed": 3, "total": 6, "runSeconds": 1.5})
        );
        assert_eq!(serde_json::from_value::<UsageRow>(json).unwrap(), row);
        assert_eq!(UsageGroupBy::parse("day"), Some(UsageGroupBy::Day));
        assert_eq!(UsageGroupBy::parse("Day"), None);
    }
}
