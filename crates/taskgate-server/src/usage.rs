//! The usage report, shared by `GET /api/v1/usage` (`api/usage.rs`) and `taskgate keys usage`,
//! so both show the same figures from the same store read: the window and grouping checked
//! ([`window`]), then one [`Store::usage`] call turned into the wire's [`UsageReport`]
//! ([`report`]). No HTTP here.
//!
//! Membership is by creation time (`from <= create_time < to`): the cheapest bound, since ids
//! start with their creation time and the `(tenant_id, id)` index gives the range. A task is
//! counted in the state it has when the report is read, so a window's figures settle as its
//! tasks finish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use taskgate_proto::{UsageFigures, UsageGroupBy, UsageReport, UsageRow};

use crate::store::{Store, StoreError, UsageAggregate, UsageQuery};

const DAY_MS: i64 = 86_400_000;
/// The window when `from` is not given: the 30 days before `to`.
pub const DEFAULT_WINDOW_MS: i64 = 30 * DAY_MS;
/// The longest window one report may ask for: its walk reads every task of the tenant in it.
pub const MAX_WINDOW_MS: i64 = 366 * DAY_MS;

/// A checked window and grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWindow {
    pub from: i64,
    pub to: i64,
    pub group_by: UsageGroupBy,
}

/// Why a window or grouping was refused; the message names the parameter (the API's and the
/// CLI's names differ only in `groupBy`/`--group-by`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Checks `from`, `to` (each RFC 3339, a `YYYY-MM-DD` date (UTC midnight) or Unix ms; `to`
/// defaults to `now`, `from` to 30 days before `to`) and `group_by` (`model`, the default, or
/// `day`).
pub fn window(
    from: Option<&str>,
    to: Option<&str>,
    group_by: Option<&str>,
    now: i64,
) -> Result<UsageWindow, UsageError> {
    let to = to.map(|v| parse_time("to", v)).transpose()?.unwrap_or(now);
    let from = from
        .map(|v| parse_time("from", v))
        .transpose()?
        .unwrap_or(to.saturating_sub(DEFAULT_WINDOW_MS));
    if from >= to {
        return Err(UsageError(format!(
            "from ({from}) must be before to ({to}); the window is [from, to), in Unix ms"
        )));
    }
    if to.saturating_sub(from) > MAX_WINDOW_MS {
        return Err(UsageError(format!(
            "the window from {from} to {to} is longer than 366 days; ask for it in parts"
        )));
    }
    let group_by = match group_by {
        None => UsageGroupBy::Model,
        Some(g) => UsageGroupBy::parse(g).ok_or_else(|| {
            UsageError(format!("groupBy must be one of model, day, key, got {g:?}"))
        })?,
    };
    Ok(UsageWindow { from, to, group_by })
}

/// A time parameter: Unix ms (an integer), a `YYYY-MM-DD` date (UTC midnight), or an RFC 3339
/// time with `Z` or a `±HH:MM` offset.
pub fn parse_time(name: &str, value: &str) -> Result<i64, UsageError> {
    let bad = || {
        UsageError(format!(
            "{name} must be an RFC 3339 time (2025-01-31T00:00:00Z), a date (2025-01-31) or a Unix \
             time in milliseconds, got {value:?}"
        ))
    };
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let (utc, offset_ms) = if value.len() == 10 {
        (format!("{value}T00:00:00Z"), 0)
    } else if let Some(stripped) = value.strip_suffix(['Z', 'z']) {
        (format!("{stripped}Z"), 0)
    } else {
        // `±HH:MM` at the end: humantime reads only `Z`, so the offset is taken off by hand.
        let split = value.len().checked_sub(6).ok_or_else(bad)?;
        let (time, offset) = (value.get(..split).ok_or_else(bad)?, &value[split..]);
        let sign = match offset.as_bytes().first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(bad()),
        };
        let (h, m) = offset[1..].split_once(':').ok_or_else(bad)?;
        let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        (format!("{time}Z"), sign * (h * 60 + m) * 60_000)
    };
    let t = humantime::parse_rfc3339(&utc).map_err(|_| bad())?;
    let ms = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?.as_millis();
    i64::try_from(ms)
        .map(|ms| ms - offset_ms)
        .map_err(|_| bad())
}

/// The report of `tenant_id`'s tasks in `w`: one store read.
pub async fn report(
    store: &dyn Store,
    tenant_id: &str,
    w: &UsageWindow,
) -> Result<UsageReport, StoreError> {
    let aggregates = store
        .usage(&UsageQuery {
            tenant_id: tenant_id.to_owned(),
            from: w.from,
            to: w.to,
            group_by: w.group_by,
        })
        .await?;
    Ok(report_of(w, aggregates))
}

/// The store's groups as the wire's rows (sorted by their value) and total.
pub fn report_of(w: &UsageWindow, aggregates: Vec<UsageAggregate>) -> UsageReport {
    let mut rows = Vec::with_capacity(aggregates.len());
    let mut total = UsageFigures::default();
    let mut total_ms: i64 = 0;
    for a in aggregates {
        let figures = figures(&a.counts, a.run_ms);
        for (state, n) in [
            (taskgate_proto::TaskState::Pending, a.counts.pending),
            (taskgate_proto::TaskState::Processing, a.counts.processing),
            (taskgate_proto::TaskState::Success, a.counts.success),
            (taskgate_proto::TaskState::Failed, a.counts.failed),
        ] {
            total.counts.add(state, n);
        }
        total_ms = total_ms.saturating_add(a.run_ms);
        let mut row = UsageRow {
            model: None,
            day: None,
            key: None,
            figures,
        };
        match w.group_by {
            UsageGroupBy::Model => row.model = Some(a.group),
            UsageGroupBy::Day => row.day = Some(day_of(&a.group)),
            UsageGroupBy::Key => row.key = Some(a.group),
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| {
        (a.model.as_ref(), a.day.as_ref(), a.key.as_ref()).cmp(&(
            b.model.as_ref(),
            b.day.as_ref(),
            b.key.as_ref(),
        ))
    });
    UsageReport {
        from: w.from,
        to: w.to,
        group_by: w.group_by,
        rows,
        total: figures(&total.counts, total_ms),
    }
}

fn figures(counts: &taskgate_proto::StateCounts, run_ms: i64) -> UsageFigures {
    UsageFigures {
        counts: *counts,
        total: counts.pending + counts.processing + counts.success + counts.failed,
        // Exact to the millisecond for any sum below 2^53 ms (285 000 years).
        run_seconds: run_ms as f64 / 1000.0,
    }
}

/// `YYYY-MM-DD` of a UTC day number (days since 1970-01-01, as the store groups them).
fn day_of(group: &str) -> String {
    let days = group.parse::<u64>().unwrap_or(0);
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(days.saturating_mul(86_400));
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NOW: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

    #[test]
    fn times_are_read_as_unix_ms_rfc3339_with_any_offset_or_a_date() {
        assert_eq!(parse_time("from", "1764547200000").unwrap(), NOW);
        assert_eq!(parse_time("from", "2025-12-01T00:00:00Z").unwrap(), NOW);
        assert_eq!(
            parse_time("from", "2025-12-01T00:00:00.250Z").unwrap(),
            NOW + 250
        );
        assert_eq!(
            parse_time("from", "2025-12-01T02:30:00+02:30").unwrap(),
            NOW
        );
        assert_eq!(
            parse_time("from", "2025-11-30T23:00:00-01:00").unwrap(),
            NOW
        );
        assert_eq!(parse_time("from", "2025-12-01").unwrap(), NOW);
        for bad in [
            "yesterday",
            "2025-13-01",
            "2025-12-01T00:00:00+25:00",
            "1e3",
            "",
            "é",
        ] {
            let e = parse_time("from", bad).unwrap_err();
            assert!(
                e.0.starts_with("from must be an RFC 3339 time"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_window_defaults_to_the_30_days_before_now_grouped_by_model() {
        let w = window(None, None, None, NOW).unwrap();
        assert_eq!(
            w,
            UsageWindow {
                from: NOW - DEFAULT_WINDOW_MS,
                to: NOW,
                group_by: UsageGroupBy::Model
            }
        );
        let w = window(None, Some("1000000000000"), Some("day"), NOW).unwrap();
        assert_eq!(
            (w.from, w.to),
            (1_000_000_000_000 - DEFAULT_WINDOW_MS, 1_000_000_000_000)
        );
        assert_eq!(w.group_by, UsageGroupBy::Day);
    }

    #[test]
    fn empty_reversed_or_too_long_windows_and_unknown_groupings_are_refused() {
        let e =
            |f: Option<&str>, t: Option<&str>, g: Option<&str>| window(f, t, g, NOW).unwrap_err().0;
        assert!(e(Some("5"), Some("5"), None).contains("must be before"));
        assert!(e(Some("6"), Some("5"), None).contains("must be before"));
        assert!(e(Some("2024-01-01"), Some("2025-12-01"), None).contains("366 days"));
        assert!(window(Some("2024-12-01"), Some("2025-12-01"), None, NOW).is_ok());
        assert!(e(None, None, Some("tenant")).contains("one of model, day, key"));
        assert!(window(None, None, Some("key"), NOW).is_ok());
    }

    #[test]
    fn rows_are_sorted_by_their_group_and_add_up_to_the_total() {
        let w = window(None, None, Some("day"), NOW).unwrap();
        let agg = |group: &str, success, run_ms| UsageAggregate {
            group: group.into(),
            counts: taskgate_proto::StateCounts {
                success,
                failed: 1,
                ..Default::default()
            },
            run_ms,
        };
        let r = report_of(&w, vec![agg("20423", 2, 1500), agg("20422", 3, 250)]);
        let days: Vec<_> = r.rows.iter().map(|r| r.day.clone().unwrap()).collect();
        assert_eq!(days, ["2025-11-30", "2025-12-01"]);
        assert_eq!(r.rows[1].figures.total, 3);
        assert_eq!(r.rows[1].figures.run_seconds, 1.5);
        assert_eq!(r.total.counts.success, 5);
        assert_eq!(r.total.total, 7);
        assert_eq!(r.total.run_seconds, 1.75);
    }
}
