//! What a running attempt reports besides its outcome: its progress (0..1) and log lines.
//!
//! A backend reports through the [`Progress`] handle of its [`super::Job`]; the attempt
//! (`dispatch/attempt.rs`) takes what waits there and writes it to the store, throttled. The
//! handle never blocks the backend and holds a bounded amount: only the latest progress counts,
//! and past [`MAX_WAITING_LINES`] lines the oldest waiting line is dropped (and counted), so a
//! program that logs faster than the store takes lines is never slowed down by it.
//!
//! The line protocol shared by the command backend's stdout and the http backend's ndjson
//! stream is parsed here too ([`parse_line`], [`report_object`]): `progress: 0.42` or
//! `progress: 42%`, a JSON object with only `progress` and/or `log`, or (stdout only) any
//! other text as one log line.
//!
//! Concurrency model: a short `std` mutex around the waiting report, and a `Notify` that wakes
//! the one reader (the attempt's flush loop).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::domain::{clean_text, MAX_LOG_LINE};

/// Most log lines waiting to be stored; beyond it the oldest are dropped.
pub const MAX_WAITING_LINES: usize = 1000;

/// A running attempt's reporter. Cheap to clone; every clone reports to the same attempt. The
/// default reports nowhere (an attempt whose reports nobody reads).
#[derive(Clone, Default)]
pub struct Progress {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    waiting: Mutex<Waiting>,
    notify: Notify,
}

#[derive(Default)]
struct Waiting {
    progress: Option<f64>,
    lines: VecDeque<String>,
    dropped: u64,
}

/// What waited in a [`Progress`] handle, taken at once.
#[derive(Debug, Default, PartialEq)]
pub struct Reported {
    pub progress: Option<f64>,
    pub lines: Vec<String>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("reported", &self.inner.is_some())
            .finish()
    }
}

impl Progress {
    /// A reporter whose reports are kept for [`Progress::take`].
    pub fn new() -> Self {
        Progress {
            inner: Some(Arc::new(Shared {
                waiting: Mutex::new(Waiting::default()),
                notify: Notify::new(),
            })),
        }
    }

    /// Records the attempt's progress (0..1); anything else (NaN, out of range) is ignored.
    pub fn set(&self, progress: f64) {
        if !(0.0..=1.0).contains(&progress) {
            return;
        }
        self.with(|w| w.progress = Some(progress));
    }

    /// Adds one log line, cleaned of control characters and cut to [`MAX_LOG_LINE`] bytes.
    /// Empty lines are dropped.
    pub fn log(&self, line: &str) {
        if self.inner.is_none() {
            return;
        }
        let line = clean_text(line.trim_end(), MAX_LOG_LINE);
        if line.trim().is_empty() {
            return;
        }
        self.with(|w| {
            if w.lines.len() >= MAX_WAITING_LINES {
                w.lines.pop_front();
                w.dropped += 1;
            }
            w.lines.push_back(line);
        });
    }

    /// Applies one parsed line.
    pub fn apply(&self, report: Report) {
        if let Some(p) = report.progress {
            self.set(p);
        }
        if let Some(line) = report.log {
            self.log(&line);
        }
    }

    fn with(&self, change: impl FnOnce(&mut Waiting)) {
        let Some(shared) = &self.inner else { return };
        change(&mut shared.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        // A permit is stored when nobody waits, so the reader's next wait returns at once.
        shared.notify.notify_one();
    }

    /// Waits until something was reported since the last wait; never returns for a reporter
    /// that reports nowhere.
    pub async fn reported(&self) {
        match &self.inner {
            Some(shared) => shared.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// How many log lines wait.
    pub fn waiting_lines(&self) -> usize {
        self.inner.as_ref().map_or(0, |s| {
            s.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lines
                .len()
        })
    }

    /// Takes everything waiting: the latest progress and the lines, oldest first (with a note
    /// first when lines were dropped).
    pub fn take(&self) -> Reported {
        let Some(shared) = &self.inner else {
            return Reported::default();
        };
        let mut w = shared.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines = Vec::with_capacity(w.lines.len() + 1);
        if w.dropped > 0 {
            lines.push(format!(
                "[taskgate: {} earlier log line(s) dropped: they came faster than they could be stored]",
                w.dropped
            ));
            w.dropped = 0;
        }
        lines.extend(w.lines.drain(..));
        Reported {
            progress: w.progress.take(),
            lines,
        }
    }
}

/// One line of the protocol, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub progress: Option<f64>,
    pub log: Option<String>,
}

/// A line of a command's stdout: `progress: 0.42` or `progress: 42%`; a JSON object with only
/// `progress` (a number from 0 to 1) and/or `log` (a string); anything else is a log line as
/// it is. A `progress:` line whose value is not from 0 to 1 is a log line too, so that nothing
/// the program said is lost.
pub fn parse_line(text: &str) -> Report {
    let text = text.trim_end_matches(['\r', '\n']);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Report::default();
    }
    if let Some(value) = strip_prefix_ignore_case(trimmed, "progress:") {
        if let Some(p) = progress_value(value) {
            return Report {
                progress: Some(p),
                log: None,
            };
        }
    } else if trimmed.starts_with('{') {
        if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(trimmed) {
            if let Some(report) = report_object(&obj) {
                return report;
            }
        }
    }
    Report {
        progress: None,
        log: Some(text.to_owned()),
    }
}

/// The report an object makes, if it is one: its only keys are `progress` (a number from 0 to
/// 1) and/or `log` (a string). `None` for any other object (for the http backend, the result).
pub fn report_object(obj: &Map<String, Value>) -> Option<Report> {
    if obj.is_empty() || obj.keys().any(|k| k != "progress" && k != "log") {
        return None;
    }
    let progress = match obj.get("progress") {
        None => None,
        Some(v) => Some(v.as_f64().filter(|p| (0.0..=1.0).contains(p))?),
    };
    let log = match obj.get("log") {
        None => None,
        Some(v) => Some(v.as_str()?.to_owned()),
    };
    Some(Report { progress, log })
}

/// `0.42` or `42%`, from 0 to 1.
fn progress_value(raw: &str) -> Option<f64> {
    let raw = raw.trim();
    let p = match raw.strip_suffix('%') {
        Some(pct) => pct.trim().parse::<f64>().ok()? / 100.0,
        None => raw.parse::<f64>().ok()?,
    };
    (0.0..=1.0).contains(&p).then_some(p)
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits a byte stream into lines as chunks arrive, each cut to `max` bytes when given (the
/// rest of an over-long line is skipped up to its newline, so memory stays bounded by `max`).
pub struct LineSplitter {
    line: Vec<u8>,
    max: Option<usize>,
}

impl LineSplitter {
    pub fn new(max: Option<usize>) -> Self {
        LineSplitter {
            line: Vec::new(),
            max,
        }
    }

    /// Feeds a chunk; calls `each` with every line it completes (without `\n` or `\r\n`).
    pub fn push(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            self.extend(&rest[..i]);
            self.emit(&mut each);
            rest = &rest[i + 1..];
        }
        self.extend(rest);
    }

    /// The last line, if the stream did not end with a newline.
    pub fn finish(&mut self, mut each: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            self.emit(&mut each);
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        let room = match self.max {
            Some(max) => max.saturating_sub(self.line.len()).min(bytes.len()),
            None => bytes.len(),
        };
        self.line.extend_from_slice(&bytes[..room]);
    }

    fn emit(&mut self, each: &mut impl FnMut(&[u8])) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        each(line);
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn progress(p: f64) -> Report {
        Report {
            progress: Some(p),
            log: None,
        }
    }

    fn log(l: &str) -> Report {
        Report {
            progress: None,
            log: Some(l.into()),
        }
    }

    #[test]
    fn stdout_lines_are_progress_json_reports_or_log_text() {
        assert_eq!(parse_line("progress: 0.25"), progress(0.25));
        assert_eq!(parse_line("Progress:42%\r"), progress(0.42));
        assert_eq!(parse_line(r#"{"progress": 0.5}"#), progress(0.5));
        assert_eq!(parse_line(r#"{"log": "step 2"}"#), log("step 2"));
        assert_eq!(
            parse_line(r#"{"progress": 1, "log": "done"}"#),
            Report {
                progress: Some(1.0),
                log: Some("done".into())
            }
        );
        // Anything that is not exactly a report is kept as said.
        assert_eq!(parse_line("loading weights"), log("loading weights"));
        assert_eq!(parse_line("progress: 1.5"), log("progress: 1.5"));
        assert_eq!(parse_line("progress: soon"), log("progress: soon"));
        assert_eq!(parse_line(r#"{"progress": 2}"#), log(r#"{"progress": 2}"#));
        assert_eq!(parse_line(r#"{"step": 3}"#), log(r#"{"step": 3}"#));
        assert_eq!(parse_line("   "), Report::default());
    }

    #[test]
    fn a_reporter_keeps_the_latest_progress_and_a_bounded_number_of_lines() {
        let p = Progress::new();
        p.set(0.1);
        p.set(0.3);
        p.set(f64::NAN);
        for i in 0..MAX_WAITING_LINES + 5 {
            p.log(&format!("line {i}"));
        }
        p.log("with\0nul");
        let taken = p.take();
        assert_eq!(taken.progress, Some(0.3));
        assert_eq!(taken.lines.len(), MAX_WAITING_LINES + 1);
        assert!(
            taken.lines[0].contains("6 earlier log line(s) dropped"),
            "{:?}",
            taken.lines[0]
        );
        assert_eq!(taken.lines[1], "line 6");
        assert_eq!(taken.lines.last().unwrap(), "withnul");
        assert_eq!(p.take(), Reported::default(), "taking empties it");
        // A reporter that reports nowhere keeps nothing.
        let none = Progress::default();
        none.log("x");
        assert_eq!(none.take(), Reported::default());
    }

    #[test]
    fn long_lines_are_cut_and_chunks_are_joined() {
        let mut s = LineSplitter::new(Some(4));
        let mut out = Vec::new();
        s.push(b"abcdefgh\nij", |l| out.push(l.to_vec()));
        s.push(b"k\r\nlast", |l| out.push(l.to_vec()));
        s.finish(|l| out.push(l.to_vec()));
        assert_eq!(out, [b"abcd".to_vec(), b"ijk".to_vec(), b"last".to_vec()]);
    }
}
