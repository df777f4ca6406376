//! What a person or a script sees of a successful command: the status as human text or as one
//! JSON document on stdout, and the live feedback on stderr while waiting and downloading.
//!
//! On a terminal, waiting draws one redrawn line (state, polls, a countdown to the next poll) and
//! each download a byte progress bar. Anywhere else (CI, a pipe, a log file) it prints one plain
//! line per state change and one `saved PATH (SIZE)` line per file, so logs stay readable.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use taskgate_client::{Client, Error, ModelInfo, TaskList, TaskState, TaskStatus, WaitOptions};

use super::Connection;

/// What the live progress line shows, updated by the wait callback and read by the ticker.
#[derive(Default)]
struct Line {
    state: Option<TaskState>,
    polls: u32,
    next_at: Option<Instant>,
}

pub(super) async fn wait_with_progress(
    client: &Client,
    model: &str,
    task_id: &str,
    timeout: Duration,
    poll_immediately: bool,
) -> Result<TaskStatus, Error> {
    let opts = WaitOptions::default()
        .timeout(timeout)
        .poll_immediately(poll_immediately);

    if !std::io::stderr().is_terminal() {
        // Not a terminal: one plain line per state change, nothing that redraws.
        let last = Mutex::new(None::<TaskState>);
        let opts = opts.on_progress(move |p| {
            let Some(state) = p.state else { return };
            if let Ok(mut last) = last.lock() {
                if *last != Some(state) {
                    *last = Some(state);
                    eprintln!("{}: {state} after {}s", p.task_id, p.elapsed.as_secs());
                }
            }
        });
        return client.wait(model, task_id, opts).await;
    }

    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    let line = Arc::new(Mutex::new(Line::default()));

    // The callback fires only at polls; a ticker keeps the "next poll in" countdown moving.
    let ticker = tokio::spawn({
        let (pb, line, task_id) = (pb.clone(), line.clone(), task_id.to_owned());
        async move {
            loop {
                if let Ok(l) = line.lock() {
                    // Before the first poll the task is what every submit makes: pending.
                    let state = l.state.map(TaskState::as_str).unwrap_or("pending");
                    let next = l
                        .next_at
                        .map(|at| at.saturating_duration_since(Instant::now()).as_secs_f64())
                        .map(|s| format!(" · next poll in {s:.0}s"))
                        .unwrap_or_default();
                    pb.set_message(format!("{task_id} {state} · {} polls{next}", l.polls));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let opts = opts.on_progress({
        let line = line.clone();
        move |p| {
            if let Ok(mut l) = line.lock() {
                l.state = p.state;
                l.polls = p.polls;
                l.next_at = p.next_poll.map(|d| Instant::now() + d);
            }
        }
    });
    let result = client.wait(model, task_id, opts).await;
    ticker.abort();
    pb.finish_and_clear();
    result
}

pub(super) async fn download_with_progress(
    client: &Client,
    url: &str,
    dir: &Path,
    json_mode: bool,
) -> Result<PathBuf, Error> {
    let path = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::hidden();
        let mut shown = false;
        let style = ProgressStyle::with_template(
            "{spinner} {msg} {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        // The file's name, not the signed query string after it.
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        let bar = pb.clone();
        let result = client
            .download_with_progress(url, dir, move |p| {
                if !shown {
                    shown = true;
                    // Only now is the size known; without one the bar is a byte counter.
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    match p.total {
                        Some(total) => {
                            bar.set_length(total);
                            bar.set_style(style.clone());
                        }
                        None => bar.set_style(
                            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        ),
                    }
                    bar.set_message(name.clone());
                }
                bar.set_position(p.downloaded);
            })
            .await;
        pb.finish_and_clear();
        result?
    } else {
        client.download(url, dir).await?
    };
    if !json_mode {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!("saved {} ({})", path.display(), HumanBytes(size));
    }
    Ok(path)
}

pub(super) fn show_status(conn: &Connection, status: &TaskStatus, files: &[PathBuf]) {
    if conn.json {
        let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
        if !files.is_empty() {
            v["files"] = json!(files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>());
        }
        println!("{v}");
        return;
    }
    println!("task      {}", status.task_id);
    println!("state     {}", status.state);
    // 0 means the server did not say (APIXO leaves createTime out).
    if status.create_time > 0 {
        println!("created   {}", format_millis(status.create_time));
    }
    if let Some(done) = status.complete_time {
        println!("finished  {}", format_millis(done));
    }
    if let Some(ms) = status.cost_time {
        if ms < 1000 {
            println!("took      {ms}ms");
        } else {
            println!("took      {:.1}s", ms as f64 / 1000.0);
        }
    }
    match status.result() {
        Some(Ok(r)) => {
            for url in &r.result_urls {
                println!("result    {url}");
            }
        }
        Some(Err(e)) => println!("result    (unreadable resultJson: {e})"),
        None => {}
    }
    if status.state == TaskState::Failed {
        println!(
            "failure   {}{}",
            status
                .fail_code
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default(),
            status.fail_msg.as_deref().unwrap_or("no reason given")
        );
    }
    for f in files {
        println!("file      {}", f.display());
    }
}

/// A page of tasks: with `--json` the listing's `data` as the server sends it (one document);
/// else one line per task under a header, and on stderr how to read the next page.
pub(super) fn show_list(conn: &Connection, page: &TaskList) {
    if conn.json {
        println!("{}", serde_json::to_value(page).unwrap_or(Value::Null));
        return;
    }
    if page.tasks.is_empty() {
        eprintln!("no tasks");
    } else {
        let model_width = page
            .tasks
            .iter()
            .map(|t| t.model.len())
            .max()
            .unwrap_or(0)
            .max("MODEL".len());
        println!(
            "{:<31}  {:<model_width$}  {:<10}  CREATED",
            "TASK", "MODEL", "STATE"
        );
        for t in &page.tasks {
            println!(
                "{:<31}  {:<model_width$}  {:<10}  {}",
                t.status.task_id,
                t.model,
                t.status.state.as_str(),
                format_millis(t.status.create_time)
            );
        }
    }
    if let Some(cursor) = &page.next_cursor {
        eprintln!("more tasks: add --cursor {cursor}");
    }
}

/// The model list: with `--json` the server's `data` as it came (`{"models": [...]}`); for
/// people one line per model, its input's top-level fields with `*` on the required ones.
pub(super) fn show_models(conn: &Connection, models: &[ModelInfo]) {
    if conn.json {
        println!("{}", json!({ "models": models }));
        return;
    }
    let rows: Vec<[String; 5]> = models
        .iter()
        .map(|m| {
            [
                m.model.clone(),
                humantime::format_duration(Duration::from_millis(m.poll_interval_ms)).to_string(),
                m.modes.join(","),
                m.input_schema
                    .as_ref()
                    .map(input_fields)
                    .unwrap_or_else(|| "any (no schema)".to_owned()),
                m.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["MODEL", "POLL", "MODES", "INPUT", "DESCRIPTION"].map(str::to_owned);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `prompt*, width, height`: the schema's top-level properties, required ones starred.
fn input_fields(schema: &Value) -> String {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let fields: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| {
            p.keys()
                .map(|k| {
                    if required.contains(&k.as_str()) {
                        format!("{k}*")
                    } else {
                        k.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if fields.is_empty() {
        "see --json".to_owned()
    } else {
        fields.join(", ")
    }
}

fn format_millis(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}
