//! `suite`: every taskgate benchmark in one run, one table (issue 9). Started by `bench/run`,
//! which builds the release binaries first; docs/BENCHMARKS.md ("The suite: one command") says
//! what each row means.
//!
//! Everything runs against the release `taskgate serve` binary as a child process (a fresh data
//! dir on disk per server, the key in `TASKGATE_API_KEY`, `--listen 127.0.0.1:0` with the address
//! read from the line the server prints) and against the trivial axum baseline
//! (`examples/trivial`), over loopback. The harness relies only on the HTTP API, the `serve`
//! flags and the `tasks` table, so it keeps working while the server's insides change: rows are
//! seeded with plain SQL into `tasks` while the server is stopped.
//!
//! Knobs (environment): `DURATION` (seconds per load run, 10), `DRAIN_N` (100000), `STORED_N`
//! (1000000), `ONLY` (comma list of steps), `TEST_DATABASE_URL` (PostgreSQL; without it the
//! PostgreSQL drain is skipped, visibly), `STORED_RATE` (status requests/s of the stored-tasks
//! row instead of a quarter of the ceiling's status rate).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Connection;
use taskgate_bench::API_KEY;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// The steps, in the order they run; `ONLY` picks some (`drain` means both drains).
const STEPS: [&str; 6] = [
    "submit",
    "status",
    "drain-sqlite",
    "drain-pg",
    "e2e",
    "stored",
];

/// The model every config here offers.
const MODEL: &str = "echo";

/// Most requests the open-loop drivers keep in flight (and so most connections they open):
/// past this, requests wait for a slot and the wait counts in their latency.
const MAX_IN_FLIGHT: usize = 256;

/// How long an end-to-end task may take, from its submit to `success` seen by polling.
const E2E_TIMEOUT: Duration = Duration::from_secs(10);

/// Tasks whose status and result file the drain checks over HTTP.
const DRAIN_SAMPLE: usize = 200;

/// Rows per seeding statement.
const SEED_CHUNK: usize = 500;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("suite: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    root: PathBuf,
    taskgate: PathBuf,
    trivial: PathBuf,
    duration: u64,
    drain_n: usize,
    stored_n: usize,
    /// Status requests/s for the stored-tasks row; `None`: a quarter of the ceiling's.
    stored_rate: Option<f64>,
    steps: BTreeSet<&'static str>,
    pg_url: Option<String>,
    clk_tck: f64,
    clk_tck_source: &'static str,
}

fn env_num<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow!("{name}={v:?} is not a valid number: {e}")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let exe = std::env::current_exe().context("cannot find the suite binary")?;
        let bin_dir = exe
            .parent()
            .context("the suite binary has no directory")?
            .to_owned();
        let path_var = |var: &str, default: PathBuf| {
            std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
        };
        let root = path_var(
            "SUITE_ROOT",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .context("bench/ has no parent")?
                .to_owned(),
        );
        let taskgate = path_var("SUITE_TASKGATE_BIN", bin_dir.join("taskgate"));
        let trivial = path_var(
            "SUITE_TRIVIAL_BIN",
            bin_dir.join("examples").join("trivial"),
        );
        for (what, p) in [("taskgate", &taskgate), ("trivial", &trivial)] {
            if !p.is_file() {
                bail!(
                    "the {what} binary is missing at {}: run bench/run, which builds it",
                    p.display()
                );
            }
        }
        let steps = match std::env::var("ONLY") {
            Ok(only) if !only.trim().is_empty() => {
                let mut steps = BTreeSet::new();
                for name in only.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match name {
                        "drain" => {
                            steps.insert("drain-sqlite");
                            steps.insert("drain-pg");
                        }
                        _ => match STEPS.iter().find(|s| **s == name) {
                            Some(s) => {
                                steps.insert(*s);
                            }
                            None => bail!(
                                "ONLY names an unknown step {name:?}; steps: {}, drain",
                                STEPS.join(", ")
                            ),
                        },
                    }
                }
                steps
            }
            _ => STEPS.iter().copied().collect(),
        };
        let (clk_tck, clk_tck_source) = match std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(t) if t > 0.0 => (t, "getconf CLK_TCK"),
            _ => (100.0, "assumed (getconf CLK_TCK failed)"),
        };
        let duration = env_num("DURATION", 10u64)?;
        let drain_n = env_num("DRAIN_N", 100_000usize)?;
        let stored_n = env_num("STORED_N", 1_000_000usize)?;
        let stored_rate = match env_num("STORED_RATE", 0.0f64)? {
            r if r > 0.0 => Some(r),
            _ => None,
        };
        if duration == 0 || drain_n == 0 || stored_n < 10 {
            bail!("DURATION and DRAIN_N must be positive, STORED_N at least 10");
        }
        Ok(Settings {
            root,
            taskgate,
            trivial,
            duration,
            drain_n,
            stored_n,
            stored_rate,
            steps,
            pg_url: std::env::var("TEST_DATABASE_URL")
                .ok()
                .filter(|u| !u.trim().is_empty()),
            clk_tck,
            clk_tck_source,
        })
    }

    fn config(&self, name: &str) -> PathBuf {
        self.root.join("bench").join("wrk").join(name)
    }

    fn echo_config(&self) -> PathBuf {
        self.config("taskgate-echo.toml")
    }

    fn parked_config(&self) -> PathBuf {
        self.config("taskgate-parked.toml")
    }
}

// ---------------------------------------------------------------------------------------------
// The report

struct Row {
    /// Where the row goes in the table.
    order: u32,
    step: &'static str,
    what: String,
    taskgate: String,
    ceiling: String,
    ratio: String,
    notes: String,
}

struct Suite {
    s: Settings,
    http: reqwest::Client,
    rows: Vec<Row>,
    raw: serde_json::Map<String, Value>,
    warnings: Vec<String>,
    rustc: BTreeMap<&'static str, (u32, u32)>,
    ceiling_submit: Option<f64>,
    ceiling_status: Option<f64>,
    ok: bool,
}

impl Suite {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        order: u32,
        step: &'static str,
        what: &str,
        taskgate: String,
        ceiling: String,
        ratio: String,
        notes: String,
    ) {
        self.rows.push(Row {
            order,
            step,
            what: what.to_owned(),
            taskgate,
            ceiling,
            ratio,
            notes,
        });
    }

    fn warn(&mut self, w: String) {
        eprintln!("WARNING: {w}");
        self.warnings.push(w);
    }

    fn record(&mut self, key: &str, v: Value) {
        self.raw.insert(key.to_owned(), v);
    }

    /// Spawns a taskgate server on `config` (and `database_url`) in a data dir of `tmp`.
    async fn taskgate(
        &self,
        tmp: &Path,
        config: &Path,
        database_url: Option<&str>,
    ) -> Result<Server> {
        Server::taskgate(
            &self.s,
            &tmp.join("data"),
            config,
            database_url,
            &tmp.join("server.log"),
        )
        .await
    }

    /// The ceiling's submit rate, measured with wrk now unless the submit step did it already.
    async fn ceiling_submit(&mut self) -> Result<f64> {
        if let Some(r) = self.ceiling_submit {
            return Ok(r);
        }
        let mut trivial = Server::trivial(&self.s).await?;
        let w = wrk(&self.s, "submit.lua", &trivial.url(&submit_path())).await;
        trivial.stop().await;
        let w = w?;
        self.record("wrk_ceiling_submit", w.json());
        self.ceiling_submit = Some(w.rps);
        Ok(w.rps)
    }

    /// The ceiling's status rate, measured with wrk now unless the status step did it already.
    async fn ceiling_status(&mut self) -> Result<(f64, Wrk)> {
        let mut trivial = Server::trivial(&self.s).await?;
        let w = wrk(&self.s, "status.lua", &trivial.url(&status_path("task_x"))).await;
        trivial.stop().await;
        let w = w?;
        self.record("wrk_ceiling_status", w.json());
        self.ceiling_status = Some(w.rps);
        Ok((w.rps, w))
    }

    async fn ceiling_status_rate(&mut self) -> Result<f64> {
        match self.ceiling_status {
            Some(r) => Ok(r),
            None => Ok(self.ceiling_status().await?.0),
        }
    }
}

async fn run() -> Result<bool> {
    let s = Settings::from_env()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4 * MAX_IN_FLIGHT)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let mut suite = Suite {
        s,
        http,
        rows: Vec::new(),
        raw: serde_json::Map::new(),
        warnings: Vec::new(),
        rustc: BTreeMap::new(),
        ceiling_submit: None,
        ceiling_status: None,
        ok: true,
    };
    let machine = machine(&suite.s).await?;
    eprintln!("{}", machine_lines(&machine, &suite.s).join("\n"));
    let started = Instant::now();
    for step in STEPS {
        if !suite.s.steps.contains(step) {
            continue;
        }
        let before = rustc_count().await;
        eprintln!("\n== {step} (pgrep -c rustc: {before})");
        if before > 0 {
            suite.warn(format!(
                "{before} rustc process(es) running when step {step} started: its figures are suspect"
            ));
        }
        let t = Instant::now();
        let result = match step {
            "submit" => step_submit(&mut suite).await,
            "status" => step_status(&mut suite).await,
            "drain-sqlite" => step_drain(&mut suite, false).await,
            "drain-pg" => step_drain(&mut suite, true).await,
            "e2e" => step_e2e(&mut suite).await,
            "stored" => step_stored(&mut suite).await,
            _ => Ok(()),
        };
        let after = rustc_count().await;
        if after > 0 {
            suite.warn(format!(
                "{after} rustc process(es) running when step {step} ended: its figures are suspect"
            ));
        }
        suite.rustc.insert(step, (before, after));
        eprintln!(
            "== {step} done in {:.1} s (pgrep -c rustc: {after})",
            t.elapsed().as_secs_f64()
        );
        if let Err(e) = result {
            suite.ok = false;
            let msg = format!("{e:#}");
            eprintln!("step {step} FAILED: {msg}");
            suite.row(
                step_order(step),
                step,
                &format!("{step}: FAILED"),
                "—".into(),
                "—".into(),
                "—".into(),
                one_line(&msg),
            );
            suite.record(&format!("{step}_error"), json!(msg));
        }
    }
    let total = started.elapsed();
    let table = render(&suite, &machine, total);
    println!("\n{table}");
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let dir = suite.s.root.join("bench").join("results");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let md = dir.join(format!("suite-{stamp}.md"));
    std::fs::write(&md, &table).with_context(|| format!("cannot write {}", md.display()))?;
    let raw = json!({
        "machine": machine,
        "settings": {
            "duration_s": suite.s.duration,
            "drain_n": suite.s.drain_n,
            "stored_n": suite.s.stored_n,
            "stored_rate": suite.s.stored_rate,
            "steps": suite.s.steps,
            "postgres": suite.s.pg_url.is_some(),
            "clk_tck": suite.s.clk_tck,
            "clk_tck_source": suite.s.clk_tck_source,
        },
        "total_s": total.as_secs_f64(),
        "rustc": suite.rustc,
        "warnings": suite.warnings,
        "rows": suite.rows.iter().map(|r| json!({
            "step": r.step, "what": r.what, "taskgate": r.taskgate, "ceiling": r.ceiling,
            "ratio": r.ratio, "notes": r.notes,
        })).collect::<Vec<_>>(),
        "raw": suite.raw,
    });
    let js = dir.join(format!("suite-{stamp}.json"));
    std::fs::write(&js, serde_json::to_string_pretty(&raw)?)
        .with_context(|| format!("cannot write {}", js.display()))?;
    eprintln!("written: {} and {}", md.display(), js.display());
    Ok(suite.ok)
}

fn step_order(step: &str) -> u32 {
    match step {
        "submit" => 10,
        "status" => 30,
        "drain-sqlite" => 40,
        "drain-pg" => 50,
        "e2e" => 60,
        "stored" => 80,
        _ => 999,
    }
}

fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '|'], " ");
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

async fn machine(s: &Settings) -> Result<Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let git = command_line(
        "git",
        &[
            "-C",
            &s.root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .await
    .unwrap_or_else(|| "unknown".into());
    let dirty = command_line(
        "git",
        &[
            "-C",
            &s.root.to_string_lossy(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .await
    .is_some_and(|o| !o.is_empty());
    let wrk_version = Command::new("wrk")
        .arg("-v")
        .output()
        .await
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "wrk not found".into());
    let tmp = tempfile::Builder::new()
        .prefix("taskgate-suite-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let fs = fs_type(tmp.path());
    if fs == "tmpfs" || fs == "ramfs" {
        bail!(
            "the temporary directory {} is on {fs}: set TMPDIR to a directory on disk",
            tmp.path().display()
        );
    }
    Ok(json!({
        "nproc": nproc,
        "model_name": model,
        "mem_total": mem,
        "git": if dirty { format!("{git} (with uncommitted changes)") } else { git },
        "wrk": wrk_version,
        "tmp": format!("{} ({fs})", std::env::temp_dir().display()),
        "taskgate_bin": s.taskgate.display().to_string(),
    }))
}

fn machine_lines(m: &Value, s: &Settings) -> Vec<String> {
    let f = |k: &str| {
        m[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| m[k].to_string())
    };
    vec![
        format!(
            "machine: {} CPUs (nproc), {}, MemTotal {}",
            f("nproc"),
            f("model_name"),
            f("mem_total")
        ),
        format!("taskgate: git {} ({})", f("git"), f("taskgate_bin")),
        format!("load tool: {}; data dirs under {}", f("wrk"), f("tmp")),
        format!(
            "knobs: DURATION={} DRAIN_N={} STORED_N={}{} ONLY={} TEST_DATABASE_URL {}",
            s.duration,
            s.drain_n,
            s.stored_n,
            s.stored_rate
                .map(|r| format!(" STORED_RATE={r}"))
                .unwrap_or_default(),
            s.steps.iter().copied().collect::<Vec<_>>().join(","),
            if s.pg_url.is_some() { "set" } else { "unset" }
        ),
    ]
}

/// The type of the file system holding `path`, from /proc/self/mounts.
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), ty.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, ty)| ty)
        .unwrap_or_else(|| "unknown".into())
}

async fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().await.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn rustc_count() -> u32 {
    // pgrep exits 1 when it finds none, still printing 0.
    match Command::new("pgrep").args(["-c", "rustc"]).output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn render(suite: &Suite, machine: &Value, total: Duration) -> String {
    let mut out = String::new();
    out.push_str("# taskgate benchmark suite\n\n");
    for l in machine_lines(machine, &suite.s) {
        out.push_str(&format!("- {l}\n"));
    }
    out.push_str(&format!(
        "- total run time: {:.0} s; CPU clock ticks: {}/s ({})\n\n",
        total.as_secs_f64(),
        suite.s.clk_tck,
        suite.s.clk_tck_source
    ));
    out.push_str("| what | taskgate | ceiling | ratio | notes | rustc before/after |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    let mut rows: Vec<&Row> = suite.rows.iter().collect();
    rows.sort_by_key(|r| r.order);
    for r in rows {
        let rustc = match suite.rustc.get(r.step) {
            Some((0, 0)) => "0/0".to_owned(),
            Some((b, a)) => format!("**{b}/{a}** ⚠"),
            None => "—".to_owned(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.what, r.taskgate, r.ceiling, r.ratio, r.notes, rustc
        ));
    }
    if !suite.warnings.is_empty() {
        out.push_str("\nWarnings:\n\n");
        for w in &suite.warnings {
            out.push_str(&format!("- {w}\n"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Formatting

/// `12345.6` → `12,346`.
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut groups = Vec::new();
    let mut end = digits.len();
    while end > 0 {
        let start = end.saturating_sub(3);
        groups.push(&digits[start..end]);
        end = start;
    }
    groups.reverse();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn percent(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("**{:.1} %**", 100.0 * a / b)
    } else {
        "—".into()
    }
}

fn times(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

// ---------------------------------------------------------------------------------------------
// Processes

fn submit_path() -> String {
    format!("/api/v1/generateTask/{MODEL}")
}

fn status_path(id: &str) -> String {
    format!("/api/v1/statusTask/{MODEL}?taskId={id}")
}

/// A server process: taskgate or the trivial baseline. Killed if dropped unstopped.
struct Server {
    child: Child,
    pid: u32,
    base: String,
    log: Option<PathBuf>,
}

impl Server {
    async fn taskgate(
        s: &Settings,
        data_dir: &Path,
        config: &Path,
        database_url: Option<&str>,
        log: &Path,
    ) -> Result<Server> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut cmd = Command::new(&s.taskgate);
        // Only what is set here: no TASKGATE_* setting of the caller's shell leaks in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            // A parked attempt (a 10-minute echo delay) must not hold a stop up for 30 s.
            .args(["--shutdown-grace", "200ms"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(config);
        if let Some(url) = database_url {
            cmd.arg("--database-url").arg(url);
        }
        // Limits far above any rate measured, so every request still pays for its counting.
        cmd.env("TASKGATE_API_KEY", API_KEY)
            .env("TASKGATE_KEY_REQUESTS_PER_MINUTE", "4000000000")
            .env("TASKGATE_KEY_CONCURRENT_TASKS", "4000000000")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", s.taskgate.display()))?;
        let pid = child.id().context("taskgate has no pid")?;
        let stdout = child.stdout.take().context("taskgate has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // The server prints its bound address on stdout, for scripts like this one.
        let found = tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("taskgate listening on ") {
                    return Ok::<_, anyhow::Error>(Some(url.trim().to_owned()));
                }
            }
            Ok(None)
        })
        .await;
        let base = match found {
            Ok(Ok(Some(base))) => base,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let _ = child.wait().await;
                bail!(
                    "taskgate exited before listening; its log ends:\n{}",
                    tail(log, 15)
                );
            }
            Err(_) => bail!(
                "taskgate printed no address within 300 s:\n{}",
                tail(log, 15)
            ),
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            pid,
            base,
            log: Some(log.to_owned()),
        })
    }

    /// The trivial axum baseline on a free port (bound to 127.0.0.1:0 and released first).
    async fn trivial(s: &Settings) -> Result<Server> {
        let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port")?;
        let mut child = Command::new(&s.trivial)
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", s.trivial.display()))?;
        let pid = child.id().context("trivial has no pid")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("the trivial baseline exited ({status}) before listening on {addr}");
            }
            if Instant::now() > deadline {
                bail!("the trivial baseline did not listen on {addr} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Server {
            child,
            pid,
            base: format!("http://{addr}"),
            log: None,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/healthz` until it answers 200; returns when (Unix ms) it did.
    async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<i64> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let url = self.url("/healthz");
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(unix_ms());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "taskgate exited ({status}) before /healthz answered:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("/healthz did not answer within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn log_tail(&self) -> String {
        self.log.as_deref().map(|l| tail(l, 15)).unwrap_or_default()
    }

    fn cpu_ticks(&self) -> Result<u64> {
        cpu_ticks(self.pid)
    }

    fn memory(&self) -> Result<(u64, u64)> {
        memory_kib(self.pid)
    }

    /// SIGTERM (taskgate) or SIGINT (the baseline waits for Ctrl-C), then waits; SIGKILL after
    /// 20 s.
    async fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let signal = if self.log.is_some() {
            Signal::SIGTERM
        } else {
            Signal::SIGINT
        };
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("server {} did not stop within 20 s: killing it", self.pid);
            let _ = self.child.kill().await;
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it start at the state.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        f.get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad /proc/PID/stat field")
    };
    Ok(field(11)? + field(12)?)
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let get = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

fn fresh_tmp() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("taskgate-suite-")
        .tempdir()
        .context("cannot create a temporary directory")
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> Result<String> {
    let v = post_submit(http, base, body, None).await?;
    v["data"]["taskId"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("submit answer has no data.taskId: {v}"))
}

/// generateTask, with a `Prefer` header when given; the answered envelope.
async fn post_submit(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    prefer: Option<&str>,
) -> Result<Value> {
    let mut req = http
        .post(format!("{base}{}", submit_path()))
        .bearer_auth(API_KEY)
        .json(body);
    if let Some(p) = prefer {
        req = req.header("prefer", p);
    }
    let r = req.send().await.context("submit failed")?;
    let status = r.status();
    let v: Value = r.json().await.context("submit answer is not JSON")?;
    if !status.is_success() {
        bail!("submit answered {status}: {v}");
    }
    Ok(v)
}

/// statusTask's `data`.
async fn status(http: &reqwest::Client, base: &str, id: &str) -> Result<Value> {
    let r = http
        .get(format!("{base}{}", status_path(id)))
        .bearer_auth(API_KEY)
        .send()
        .await
        .context("statusTask failed")?;
    let code = r.status();
    let v: Value = r.json().await.context("statusTask answer is not JSON")?;
    if !code.is_success() {
        bail!("statusTask answered {code}: {v}");
    }
    Ok(v["data"].clone())
}

async fn wait_success(http: &reqwest::Client, base: &str, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let data = status(http, base, id).await?;
        match data["state"].as_str() {
            Some("success") => return Ok(data),
            Some("failed") => bail!("task {id} failed: {data}"),
            _ if Instant::now() > deadline => bail!("task {id} not final after 60 s: {data}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The first result URL of a status `data` (`resultJson` is a JSON string).
fn first_result_url(data: &Value) -> Result<String> {
    let rj: Value = serde_json::from_str(data["resultJson"].as_str().context("no resultJson")?)
        .context("resultJson is not JSON")?;
    rj["resultUrls"][0]
        .as_str()
        .map(str::to_owned)
        .context("resultJson has no resultUrls[0]")
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Default)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50: f64,
    p75: f64,
    p90: f64,
    p99: f64,
    non2xx: u64,
    socket_errors: u64,
    raw: String,
}

impl Wrk {
    fn json(&self) -> Value {
        json!({
            "rps": self.rps, "requests": self.requests, "p50_ms": self.p50, "p75_ms": self.p75,
            "p90_ms": self.p90, "p99_ms": self.p99, "non2xx": self.non2xx,
            "socket_errors": self.socket_errors, "output": self.raw,
        })
    }

    fn clean(&self) -> bool {
        self.non2xx == 0 && self.socket_errors == 0
    }

    fn flags(&self) -> String {
        if self.clean() {
            String::new()
        } else {
            format!(
                " ⚠ **INVALID RUN: {} non-2xx, {} socket errors**",
                self.non2xx, self.socket_errors
            )
        }
    }

    fn latency(&self) -> String {
        format!("p50 {} / p99 {}", ms(self.p50), ms(self.p99))
    }
}

/// A wrk time such as `535.71us`, `4.16ms`, `1.02s`, `2.00m`, in ms.
fn wrk_time_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * scale)
}

fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk {
        raw: out.to_owned(),
        ..Wrk::default()
    };
    let mut rps = None;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.non2xx = v.trim().parse().unwrap_or(u64::MAX);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            w.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if t.contains(" requests in ") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some((p, v)) = t.split_once('%') {
            let slot = match p.trim() {
                "50" => &mut w.p50,
                "75" => &mut w.p75,
                "90" => &mut w.p90,
                "99" => &mut w.p99,
                _ => continue,
            };
            *slot = wrk_time_ms(v).unwrap_or(f64::NAN);
        }
    }
    w.rps = rps.with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    Ok(w)
}

/// `wrk -t2 -c50 -dDURATIONs --latency -s bench/wrk/SCRIPT URL`.
async fn wrk(s: &Settings, script: &str, url: &str) -> Result<Wrk> {
    let script = s.root.join("bench").join("wrk").join(script);
    eprintln!(
        "   wrk -t2 -c50 -d{}s --latency -s {} {url}",
        s.duration,
        script.display()
    );
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c50",
            &format!("-d{}s", s.duration),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .env("TASKGATE_API_KEY", API_KEY)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run wrk (apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let w = parse_wrk(&text)?;
    eprintln!(
        "   {:.0} req/s, {}, {} non-2xx, {} socket errors",
        w.rps,
        w.latency(),
        w.non2xx,
        w.socket_errors
    );
    Ok(w)
}

// ---------------------------------------------------------------------------------------------
// The database, through the `tasks` table only

enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl Db {
    async fn sqlite(data_dir: &Path, read_only: bool) -> Result<Db> {
        // The file the server keeps in its data dir (docs/configuration.md, --data-dir).
        let path = data_dir.join("taskgate.db");
        if !path.is_file() {
            bail!("no database at {}", path.display());
        }
        // The server keeps it in WAL mode (a setting the file remembers).
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(30))
            .read_only(read_only);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Db::Sqlite(pool))
    }

    async fn pg(url: &str) -> Result<Db> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .context("cannot connect to PostgreSQL")?;
        Ok(Db::Pg(pool))
    }

    /// Parameter `n` (1-based) in this dialect.
    fn p(&self, n: usize) -> String {
        match self {
            Db::Sqlite(_) => format!("?{n}"),
            Db::Pg(_) => format!("${n}"),
        }
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
            Db::Pg(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
        }
        .with_context(|| format!("query failed: {sql}"))
    }

    async fn opt_i64(&self, sql: &str) -> Result<Option<i64>> {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar::<_, Option<i64>>(sql).fetch_one(p).await,
            Db::Pg(p) => sqlx::query_scalar::<_, Option<i64>>(sql).fetch_one(p).await,
        }
        .with_context(|| format!("query failed: {sql}"))
    }

    async fn states(&self) -> Result<BTreeMap<String, i64>> {
        let sql = "SELECT state, count(*) FROM tasks GROUP BY state";
        let rows: Vec<(String, i64)> = match self {
            Db::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await,
            Db::Pg(p) => sqlx::query_as(sql).fetch_all(p).await,
        }
        .context("cannot count tasks by state")?;
        Ok(rows.into_iter().collect())
    }

    /// Tasks not final yet. Two counts, so that each can use the partial indexes on
    /// `pending` and `processing` rows instead of scanning the table.
    async fn unfinished(&self) -> Result<i64> {
        self.count(
            "SELECT (SELECT count(*) FROM tasks WHERE state = 'pending') \
             + (SELECT count(*) FROM tasks WHERE state = 'processing')",
        )
        .await
    }

    /// tenant_id and max_attempts of a task the server wrote.
    async fn template(&self, id: &str) -> Result<(String, i64)> {
        let sql = format!(
            "SELECT tenant_id, max_attempts FROM tasks WHERE id = {}",
            self.p(1)
        );
        let row: Option<(String, i64)> = match self {
            Db::Sqlite(p) => sqlx::query_as(&sql).bind(id).fetch_optional(p).await,
            Db::Pg(p) => sqlx::query_as(&sql).bind(id).fetch_optional(p).await,
        }
        .context("cannot read the template task")?;
        row.with_context(|| format!("task {id} is not in the tasks table"))
    }

    /// Inserts `pending` tasks of `MODEL` (id, input JSON) with the columns the server's own
    /// insert writes, in one transaction, `SEED_CHUNK` rows per statement.
    async fn seed_pending(
        &self,
        tenant: &str,
        max_attempts: i64,
        rows: &[(String, String)],
    ) -> Result<()> {
        let now = unix_ms();
        let sql_for = |n: usize| {
            let mut sql = String::from(
                "INSERT INTO tasks (id, tenant_id, model, state, input, callback_url, \
                 max_attempts, run_after, create_time) VALUES ",
            );
            for k in 0..n {
                if k > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "({}, {}, {}, 'pending', {}, NULL, {}, {}, {})",
                    self.p(5 + 2 * k),
                    self.p(1),
                    self.p(2),
                    self.p(6 + 2 * k),
                    self.p(3),
                    self.p(4),
                    self.p(4)
                ));
            }
            sql
        };
        // The same statements on either pool; a macro because sqlx's query types differ per
        // database.
        macro_rules! seed_into {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                for chunk in rows.chunks(SEED_CHUNK) {
                    let sql = sql_for(chunk.len());
                    let mut q = sqlx::query(&sql)
                        .bind(tenant)
                        .bind(MODEL)
                        .bind(max_attempts)
                        .bind(now);
                    for (id, input) in chunk {
                        q = q.bind(id).bind(input);
                    }
                    q.execute(&mut *tx).await.context("seeding failed")?;
                }
                tx.commit().await?;
            }};
        }
        match self {
            Db::Sqlite(pool) => seed_into!(pool),
            Db::Pg(pool) => seed_into!(pool),
        }
        Ok(())
    }

    /// SQLite: copies of the finished task `template` under the new `ids`, every column as the
    /// server wrote it except the id, and `outputs` pointing at keys under the new id. One
    /// transaction, `SEED_CHUNK` rows per statement.
    async fn seed_copies(&self, template: &str, ids: &[String]) -> Result<()> {
        let Db::Sqlite(pool) = self else {
            bail!("copies are seeded on SQLite only");
        };
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('tasks')")
                .fetch_all(pool)
                .await
                .context("cannot list the columns of tasks")?;
        if !columns.iter().any(|c| c == "id") || !columns.iter().any(|c| c == "outputs") {
            bail!("tasks has no id or outputs column: {columns:?}");
        }
        let exprs: Vec<String> = columns
            .iter()
            .map(|c| match c.as_str() {
                "id" => "v.nid".to_owned(),
                "outputs" => "replace(t.outputs, t.id, v.nid)".to_owned(),
                other => format!("t.\"{other}\""),
            })
            .collect();
        let cols: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let sql_for = |n: usize| {
            let values: Vec<String> = (0..n).map(|k| format!("(?{})", k + 2)).collect();
            format!(
                "WITH v(nid) AS (VALUES {}) INSERT INTO tasks ({}) SELECT {} FROM v, tasks t \
                 WHERE t.id = ?1",
                values.join(","),
                cols.join(", "),
                exprs.join(", ")
            )
        };
        let mut tx = pool.begin().await?;
        for chunk in ids.chunks(SEED_CHUNK) {
            let sql = sql_for(chunk.len());
            let mut q = sqlx::query(&sql).bind(template);
            for id in chunk {
                q = q.bind(id);
            }
            let done = q.execute(&mut *tx).await.context("seeding failed")?;
            if done.rows_affected() != chunk.len() as u64 {
                bail!(
                    "seeding wrote {} rows instead of {}",
                    done.rows_affected(),
                    chunk.len()
                );
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Process ids of the PostgreSQL backends serving this database (not this connection).
    async fn backend_pids(&self) -> Result<Vec<i32>> {
        let Db::Pg(p) = self else {
            return Ok(Vec::new());
        };
        Ok(sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid()",
        )
        .fetch_all(p)
        .await?)
    }

    async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Pg(p) => p.close().await,
        }
    }
}

/// A fresh id of the server's shape: `task_` + a lowercase ULID.
fn task_id() -> String {
    format!(
        "task_{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

/// `n` fresh ids, sorted (so the first is the one a dispatcher claims first).
fn task_ids(n: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..n).map(|_| task_id()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A database of its own on the PostgreSQL server, dropped by `drop_db`.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDb {
    async fn create(admin_url: &str) -> Result<PgDb> {
        let name = format!(
            "taskgate_bench_{}",
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        );
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .context("cannot connect to TEST_DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        conn.close().await?;
        let mut url = url::Url::parse(admin_url).context("TEST_DATABASE_URL is not a URL")?;
        url.set_path(&name);
        Ok(PgDb {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        })
    }

    async fn drop_db(&self) -> Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .with_context(|| format!("cannot drop database {}", self.name))?;
        conn.close().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Open-loop driving

/// Runs `request` `rate` times a second for `secs` seconds, each in a task of its own, whether
/// or not earlier ones have answered (tokio interval, missed ticks burst). Returns the tasks'
/// results and the time the sending took.
async fn open_loop<F, Fut, T>(rate: f64, secs: u64, mut request: F) -> Result<(Vec<T>, Duration)>
where
    F: FnMut(u64, Instant) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("no rate to drive at ({rate})");
    }
    let total = (rate * secs as f64).round().max(1.0) as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut set = JoinSet::new();
    let start = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        set.spawn(request(i, Instant::now()));
    }
    let sending = start.elapsed();
    let mut out = Vec::with_capacity(total as usize);
    while let Some(r) = set.join_next().await {
        out.push(r.context("a request task panicked")?);
    }
    Ok((out, sending))
}

/// One status request: its latency in ms from when it was due, or an error.
async fn timed_get(
    http: reqwest::Client,
    sem: Arc<Semaphore>,
    url: String,
    sent: Instant,
) -> Result<f64, String> {
    let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
    let r = http
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let code = r.status();
    let body = r.bytes().await.map_err(|e| format!("body: {e}"))?;
    if !code.is_success() {
        return Err(format!("HTTP {code}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(sent.elapsed().as_secs_f64() * 1000.0)
}

struct Latencies {
    ok: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
    achieved: f64,
}

impl Latencies {
    fn collect(results: Vec<Result<f64, String>>, secs: f64) -> Latencies {
        let mut ok = Vec::with_capacity(results.len());
        let mut errors = 0;
        let mut first_error = None;
        for r in results {
            match r {
                Ok(v) => ok.push(v),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        let ok = sorted(ok);
        let achieved = ok.len() as f64 / secs.max(1e-9);
        Latencies {
            ok,
            errors,
            first_error,
            achieved,
        }
    }

    fn json(&self) -> Value {
        json!({
            "count": self.ok.len(), "errors": self.errors, "first_error": self.first_error,
            "p50_ms": pct(&self.ok, 50.0), "p90_ms": pct(&self.ok, 90.0),
            "p99_ms": pct(&self.ok, 99.0), "max_ms": self.ok.last(),
            "answered_per_s": self.achieved,
        })
    }

    fn summary(&self) -> String {
        format!(
            "p50 {} / p99 {} / max {}",
            ms(pct(&self.ok, 50.0)),
            ms(pct(&self.ok, 99.0)),
            ms(self.ok.last().copied().unwrap_or(f64::NAN))
        )
    }
}

/// GETs statusTask for random ids among `ids` at `rate` for `secs` against `base`.
async fn status_open_loop(
    http: &reqwest::Client,
    base: &str,
    ids: Arc<Vec<String>>,
    rate: f64,
    secs: u64,
) -> Result<Latencies> {
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut rng = StdRng::from_entropy();
    let t = Instant::now();
    let (results, _) = open_loop(rate, secs, |_, sent| {
        let id = &ids[rng.gen_range(0..ids.len())];
        timed_get(
            http.clone(),
            sem.clone(),
            format!("{base}{}", status_path(id)),
            sent,
        )
    })
    .await?;
    Ok(Latencies::collect(results, t.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------
// Step 1: submit over HTTP

async fn step_submit(suite: &mut Suite) -> Result<()> {
    let ceiling = suite.ceiling_submit().await?;
    let ceiling_wrk = suite
        .raw
        .get("wrk_ceiling_submit")
        .cloned()
        .unwrap_or_default();
    let c_lat = format!(
        "p50 {} / p99 {}",
        ms(ceiling_wrk["p50_ms"].as_f64().unwrap_or(f64::NAN)),
        ms(ceiling_wrk["p99_ms"].as_f64().unwrap_or(f64::NAN))
    );
    let c_clean = ceiling_wrk["non2xx"].as_u64() == Some(0)
        && ceiling_wrk["socket_errors"].as_u64() == Some(0);
    let c_flag = if c_clean {
        ""
    } else {
        " ⚠ **ceiling run had errors**"
    };

    // Dispatch parked: one 10-minute echo task holds the only slot.
    let tmp = fresh_tmp()?;
    let parked_cfg = suite.s.parked_config();
    let mut server = suite.taskgate(tmp.path(), &parked_cfg, None).await?;
    let parked = async {
        server.wait_healthy(&suite.http).await?;
        submit(
            &suite.http,
            &server.base,
            &json!({"input": {"delay_ms": 600000}}),
        )
        .await?;
        wrk(&suite.s, "submit.lua", &server.url(&submit_path())).await
    }
    .await;
    server.stop().await;
    let parked = parked?;
    suite.record("wrk_submit_parked", parked.json());
    suite.row(
        10,
        "submit",
        "submit, wrk, dispatch parked (req/s)",
        thousands(parked.rps),
        thousands(ceiling),
        percent(parked.rps, ceiling),
        format!(
            "{} (ceiling {c_lat}){}{c_flag}",
            parked.latency(),
            parked.flags()
        ),
    );
    drop(tmp);

    // Dispatch live: echo ×1024 runs what arrives.
    let tmp = fresh_tmp()?;
    let echo_cfg = suite.s.echo_config();
    let mut server = suite.taskgate(tmp.path(), &echo_cfg, None).await?;
    let live = async {
        server.wait_healthy(&suite.http).await?;
        wrk(&suite.s, "submit.lua", &server.url(&submit_path())).await
    }
    .await;
    server.stop().await;
    let live = live?;
    let states = Db::sqlite(&tmp.path().join("data"), true).await?;
    let backlog = states.states().await?;
    states.close().await;
    suite.record("wrk_submit_live", live.json());
    suite.record("submit_live_states_after", json!(backlog));
    suite.row(
        20,
        "submit",
        "submit, wrk, dispatch live, echo ×1024 (req/s)",
        thousands(live.rps),
        thousands(ceiling),
        percent(live.rps, ceiling),
        format!(
            "{} (ceiling {c_lat}); after the run: {} success, {} pending{}{c_flag}",
            live.latency(),
            thousands(*backlog.get("success").unwrap_or(&0) as f64),
            thousands(*backlog.get("pending").unwrap_or(&0) as f64),
            live.flags()
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Step 2: status over HTTP

async fn step_status(suite: &mut Suite) -> Result<()> {
    let (ceiling, cw) = suite.ceiling_status().await?;
    let tmp = fresh_tmp()?;
    let echo_cfg = suite.s.echo_config();
    let mut server = suite.taskgate(tmp.path(), &echo_cfg, None).await?;
    let run = async {
        server.wait_healthy(&suite.http).await?;
        let id = submit(&suite.http, &server.base, &json!({"input": {"n": 1}})).await?;
        wait_success(&suite.http, &server.base, &id).await?;
        wrk(&suite.s, "status.lua", &server.url(&status_path(&id))).await
    }
    .await;
    server.stop().await;
    let w = run?;
    suite.record("wrk_status", w.json());
    suite.row(
        30,
        "status",
        "status of a finished task, wrk (req/s)",
        thousands(w.rps),
        thousands(ceiling),
        percent(w.rps, ceiling),
        format!(
            "{} (ceiling {}){}{}",
            w.latency(),
            cw.latency(),
            w.flags(),
            if cw.clean() {
                ""
            } else {
                " ⚠ **ceiling run had errors**"
            }
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Step 3 and 6: drain, and its CPU cost

async fn step_drain(suite: &mut Suite, pg: bool) -> Result<()> {
    let (step, label, order) = if pg {
        ("drain-pg", "PostgreSQL", 50)
    } else {
        ("drain-sqlite", "SQLite", 40)
    };
    let n = suite.s.drain_n;
    if pg {
        let Some(admin) = suite.s.pg_url.clone() else {
            suite.row(
                order,
                step,
                &format!(
                    "drain {} echo tasks, {label} (tasks/s)",
                    thousands(n as f64)
                ),
                "SKIPPED".into(),
                "—".into(),
                "—".into(),
                "set TEST_DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/test) to run it"
                    .into(),
            );
            suite.row(
                order + 100,
                step,
                &format!("CPU-s per 1,000 tasks, drain {label}"),
                "SKIPPED".into(),
                "—".into(),
                "—".into(),
                "needs TEST_DATABASE_URL".into(),
            );
            return Ok(());
        };
        let db = PgDb::create(&admin).await?;
        eprintln!("   database {}", db.name);
        let result = drain(suite, Some(&db.url)).await;
        if let Err(e) = db.drop_db().await {
            suite.warn(format!("could not drop database {}: {e:#}", db.name));
        }
        report_drain(suite, step, label, order, result?);
    } else {
        let result = drain(suite, None).await?;
        report_drain(suite, step, label, order, result);
    }
    Ok(())
}

struct Drain {
    n: usize,
    seed_s: f64,
    startup_ms: f64,
    tasks_per_s: f64,
    cpu_s: f64,
    pg_cpu_s: Option<f64>,
    check_failures: Vec<String>,
    raw: Value,
}

async fn drain(suite: &Suite, database_url: Option<&str>) -> Result<Drain> {
    let s = &suite.s;
    let http = &suite.http;
    let n = s.drain_n;
    let tmp = fresh_tmp()?;
    let data = tmp.path().join("data");
    let config = s.echo_config();

    // 1. A first start creates the schema and the key's tenant; one task submitted over HTTP
    //    tells us the tenant and max_attempts the server writes.
    let mut server = Server::taskgate(
        s,
        &data,
        &config,
        database_url,
        &tmp.path().join("server.log"),
    )
    .await?;
    let template = async {
        server.wait_healthy(http).await?;
        let id = submit(http, &server.base, &json!({"input": {"n": -1}})).await?;
        wait_success(http, &server.base, &id).await?;
        Ok::<_, anyhow::Error>(id)
    }
    .await;
    server.stop().await;
    let template = template?;
    let db = match database_url {
        Some(url) => Db::pg(url).await?,
        None => Db::sqlite(&data, false).await?,
    };
    let (tenant, max_attempts) = db.template(&template).await?;

    // 2. N pending echo tasks, written straight into `tasks` while the server is stopped.
    let ids = task_ids(n);
    let rows: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), json!({"n": i}).to_string()))
        .collect();
    let t = Instant::now();
    db.seed_pending(&tenant, max_attempts, &rows).await?;
    let seed_s = t.elapsed().as_secs_f64();
    eprintln!("   seeded {n} pending tasks in {seed_s:.1} s");
    let pending = db
        .count("SELECT count(*) FROM tasks WHERE state = 'pending'")
        .await?;
    if pending != ids.len() as i64 {
        bail!("{pending} tasks pending after seeding {}", ids.len());
    }
    // SQLite: reopen read-only for polling, so the server finds no other writer.
    let db = match db {
        Db::Sqlite(p) => {
            p.close().await;
            Db::sqlite(&data, true).await?
        }
        pg => pg,
    };

    // 3. Start and time until nothing is pending or processing.
    let spawned = Instant::now();
    let mut server = Server::taskgate(
        s,
        &data,
        &config,
        database_url,
        &tmp.path().join("server.log"),
    )
    .await?;
    let result = async {
        let healthy_ms = server.wait_healthy(http).await?;
        let startup_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        let healthy = Instant::now();
        let cpu0 = server.cpu_ticks()?;
        let pg_pids = db.backend_pids().await?;
        let pg0: Vec<(i32, u64)> = pg_pids
            .iter()
            .filter_map(|p| Some((*p, cpu_ticks(u32::try_from(*p).ok()?).ok()?)))
            .collect();
        let mut last = i64::MAX;
        let mut progressed = Instant::now();
        let mut polls = 0u64;
        loop {
            let left = db.unfinished().await?;
            polls += 1;
            if left == 0 {
                break;
            }
            if left < last {
                last = left;
                progressed = Instant::now();
            } else if progressed.elapsed() > Duration::from_secs(60) {
                bail!("the drain made no progress for 60 s with {left} tasks left");
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "taskgate exited ({status}) during the drain:\n{}",
                    server.log_tail()
                );
            }
            // Every 20 ms near the end; less often while much is left, so that polling a
            // large table costs the server little (the rate comes from complete_time anyway).
            let sleep = if left as usize <= (n / 50).max(500) {
                20
            } else {
                200
            };
            tokio::time::sleep(Duration::from_millis(sleep)).await;
        }
        let observed_s = healthy.elapsed().as_secs_f64();
        let cpu1 = server.cpu_ticks()?;
        let pg1: u64 = pg0
            .iter()
            .filter_map(|(p, t0)| {
                Some(cpu_ticks(u32::try_from(*p).ok()?).ok()?.saturating_sub(*t0))
            })
            .sum();
        let (rss, hwm) = server.memory()?;
        let last_final = db
            .opt_i64("SELECT max(complete_time) FROM tasks")
            .await?
            .context("no complete_time after the drain")?;
        let span_s = ((last_final - healthy_ms) as f64 / 1000.0).max(1e-3);
        let cpu_s = cpu1.saturating_sub(cpu0) as f64 / s.clk_tck;
        let pg_cpu_s = database_url.map(|_| pg1 as f64 / s.clk_tck);

        // 4. Checks: every task success, each run exactly once, and a sample over HTTP.
        let mut failures = Vec::new();
        let states = db.states().await?;
        let total: i64 = states.values().sum();
        let success = *states.get("success").unwrap_or(&0);
        if success != total {
            failures.push(format!("not every task succeeded: {states:?}"));
        }
        let reruns = db
            .count("SELECT count(*) FROM tasks WHERE attempts <> 1")
            .await?;
        if reruns != 0 {
            failures.push(format!("{reruns} tasks with attempts <> 1"));
        }
        let sample = rand::seq::index::sample(&mut StdRng::from_entropy(), n, DRAIN_SAMPLE.min(n));
        let checks = futures::stream::iter(sample.into_iter().map(|i| {
            let id = ids[i].clone();
            let base = server.base.clone();
            async move { check_echo(http, &base, &id, i).await }
        }))
        .buffer_unordered(16)
        .collect::<Vec<Result<()>>>()
        .await;
        let bad: Vec<String> = checks
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        if !bad.is_empty() {
            failures.push(format!(
                "{} of {} sampled tasks failed the HTTP check, e.g. {}",
                bad.len(),
                DRAIN_SAMPLE.min(n),
                bad[0]
            ));
        }
        let raw = json!({
            "n": n, "seed_s": seed_s, "startup_ms": startup_ms,
            "healthy_unix_ms": healthy_ms, "last_complete_time": last_final,
            "span_s": span_s, "observed_by_polling_s": observed_s, "polls": polls,
            "tasks_per_s": n as f64 / span_s, "cpu_ticks": cpu1.saturating_sub(cpu0),
            "cpu_s": cpu_s, "cpu_s_total_since_spawn": cpu1 as f64 / s.clk_tck,
            "pg_backend_cpu_s": pg_cpu_s, "pg_backends": pg_pids,
            "vm_rss_kib": rss, "vm_hwm_kib": hwm, "states": states,
            "attempts_not_1": reruns, "sampled": DRAIN_SAMPLE.min(n), "sample_failures": bad,
        });
        Ok::<_, anyhow::Error>(Drain {
            n,
            seed_s,
            startup_ms,
            tasks_per_s: n as f64 / span_s,
            cpu_s,
            pg_cpu_s,
            check_failures: failures,
            raw,
        })
    }
    .await;
    server.stop().await;
    db.close().await;
    result
}

/// statusTask says `success`, and the first result URL answers 200 with the echo of `{"n": i}`.
async fn check_echo(http: &reqwest::Client, base: &str, id: &str, i: usize) -> Result<()> {
    let data = status(http, base, id).await?;
    if data["state"] != "success" {
        bail!("task {id} is {}", data["state"]);
    }
    let url = first_result_url(&data)?;
    let r = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if r.status() != reqwest::StatusCode::OK {
        bail!("GET {url} answered {}", r.status());
    }
    let body: Value = r
        .json()
        .await
        .with_context(|| format!("{url} is not JSON"))?;
    if body != json!({"n": i}) {
        bail!("{url} holds {body}, expected {{\"n\":{i}}}");
    }
    Ok(())
}

fn report_drain(suite: &mut Suite, step: &'static str, label: &str, order: u32, d: Drain) {
    let checks = if d.check_failures.is_empty() {
        format!(
            "checks OK: all success, attempts = 1, {} sampled results fetched",
            DRAIN_SAMPLE.min(d.n)
        )
    } else {
        suite.ok = false;
        format!("⚠ **CHECKS FAILED: {}**", d.check_failures.join("; "))
    };
    suite.row(
        order,
        step,
        &format!(
            "drain {} echo tasks, {label}, concurrency 1024 (tasks/s)",
            thousands(d.n as f64)
        ),
        thousands(d.tasks_per_s),
        "—".into(),
        "—".into(),
        format!(
            "startup with {} pending: {}; seeding {:.2} s; {checks}",
            thousands(d.n as f64),
            ms(d.startup_ms),
            d.seed_s
        ),
    );
    let per_1000 = d.cpu_s / d.n as f64 * 1000.0;
    let pg_note = match d.pg_cpu_s {
        Some(pg) => format!(
            "; PostgreSQL backends of its connections: {:.3} CPU-s per 1,000 more (backends that came and went are missed)",
            pg / d.n as f64 * 1000.0
        ),
        None => String::new(),
    };
    suite.row(
        order + 100,
        step,
        &format!("CPU-s per 1,000 tasks, drain {label}"),
        format!("{per_1000:.3}"),
        "—".into(),
        "—".into(),
        format!(
            "server process utime+stime from /healthz to the last final: {:.2} s for {} tasks{pg_note}",
            d.cpu_s,
            thousands(d.n as f64)
        ),
    );
    suite.record(step, d.raw);
}

// ---------------------------------------------------------------------------------------------
// Step 4: submit → success latency, open loop

enum E2e {
    Done {
        latency_ms: f64,
        server_ms: Option<f64>,
    },
    Failed(String),
    TimedOut,
}

async fn e2e_one(
    http: reqwest::Client,
    base: Arc<str>,
    sem: Arc<Semaphore>,
    polls: Arc<AtomicU64>,
    body: Value,
    sent: Instant,
    poll: Duration,
) -> E2e {
    let run = async {
        if poll.is_zero() {
            // One request per task: `Prefer: wait` holds the submit's answer until the task is
            // final, so the latency is the task's and no poll loads the cores.
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let data = submit_waiting(&http, &base, &body)
                .await
                .map_err(|e| format!("submit: {e:#}"))?;
            return match data["state"].as_str() {
                Some("success") => Ok((sent.elapsed().as_secs_f64() * 1000.0, server_ms(&data))),
                _ => Err(format!("not success after the wait: {data}")),
            };
        }
        let id = {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            submit(&http, &base, &body)
                .await
                .map_err(|e| format!("submit: {e:#}"))?
        };
        loop {
            let data = {
                let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
                polls.fetch_add(1, Ordering::Relaxed);
                status(&http, &base, &id)
                    .await
                    .map_err(|e| format!("status: {e:#}"))?
            };
            match data["state"].as_str() {
                Some("success") => {
                    let latency_ms = sent.elapsed().as_secs_f64() * 1000.0;
                    return Ok((latency_ms, server_ms(&data)));
                }
                Some("failed") => return Err(format!("task failed: {data}")),
                _ => tokio::time::sleep(poll).await,
            }
        }
    };
    match tokio::time::timeout(E2E_TIMEOUT, run).await {
        Ok(Ok((latency_ms, server_ms))) => E2e::Done {
            latency_ms,
            server_ms,
        },
        Ok(Err(e)) => E2e::Failed(e),
        Err(_) => E2e::TimedOut,
    }
}

/// completeTime − createTime of a status `data`: the latency by the server's own clock.
fn server_ms(data: &Value) -> Option<f64> {
    match (data["completeTime"].as_i64(), data["createTime"].as_i64()) {
        (Some(c), Some(t)) => Some((c - t) as f64),
        _ => None,
    }
}

/// generateTask with `Prefer: wait=10`: the task's status `data` once final (or after 10 s).
async fn submit_waiting(http: &reqwest::Client, base: &str, body: &Value) -> Result<Value> {
    Ok(post_submit(http, base, body, Some("wait=10")).await?["data"].clone())
}

async fn step_e2e(suite: &mut Suite) -> Result<()> {
    let ceiling = suite.ceiling_submit().await?;
    // E2E_PERCENTS adds rates between (e.g. "1,3,5,10") to find where latency turns.
    let percents: Vec<f64> = std::env::var("E2E_PERCENTS")
        .ok()
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .filter(|v: &Vec<f64>| !v.is_empty())
        .unwrap_or_else(|| vec![1.0, 10.0]);
    for (i, percent_of) in percents.into_iter().enumerate() {
        let order = 60 + 10 * i as u32;
        if let Err(e) = e2e_at(suite, ceiling, percent_of, order).await {
            suite.ok = false;
            eprintln!("e2e at {percent_of} % FAILED: {e:#}");
            suite.row(
                order,
                "e2e",
                &format!("submit → success at {percent_of} % of the ceiling's submit rate: FAILED"),
                "—".into(),
                "—".into(),
                "—".into(),
                one_line(&format!("{e:#}")),
            );
        }
    }
    Ok(())
}

async fn e2e_at(suite: &mut Suite, ceiling: f64, percent_of: f64, order: u32) -> Result<()> {
    let rate = ceiling * percent_of / 100.0;
    let secs = suite.s.duration;
    // E2E_POLL_MS: poll each task every so many ms instead of one `Prefer: wait` submit (the
    // default, 0). Polls are load on the same cores: 1 ms resolves the latency finely but
    // measures mostly the load generator on a 2-core machine.
    let poll_ms: u64 = std::env::var("E2E_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let how = if poll_ms == 0 {
        "one generateTask with Prefer: wait=10".to_owned()
    } else {
        format!("polled every {poll_ms} ms")
    };
    eprintln!("   open loop: {rate:.0} submits/s for {secs} s, each {how} until success");
    let tmp = fresh_tmp()?;
    let echo_cfg = suite.s.echo_config();
    let mut server = suite.taskgate(tmp.path(), &echo_cfg, None).await?;
    let http = suite.http.clone();
    let run = async {
        server.wait_healthy(&http).await?;
        let cpu0 = server.cpu_ticks()?;
        let base: Arc<str> = Arc::from(server.base.as_str());
        let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let polls = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let (results, sending) = open_loop(rate, secs, |i, sent| {
            e2e_one(
                http.clone(),
                base.clone(),
                sem.clone(),
                polls.clone(),
                json!({"input": {"n": i}}),
                sent,
                Duration::from_millis(poll_ms),
            )
        })
        .await?;
        let elapsed = t.elapsed().as_secs_f64();
        let cpu = server.cpu_ticks()?.saturating_sub(cpu0);
        Ok::<_, anyhow::Error>((
            results,
            sending,
            polls.load(Ordering::Relaxed),
            elapsed,
            cpu,
        ))
    }
    .await;
    server.stop().await;
    let (results, sending, polls, elapsed, cpu) = run?;
    let sent = results.len();
    let mut lat = Vec::new();
    let mut server_side = Vec::new();
    let (mut failures, mut timeouts) = (0usize, 0usize);
    let mut first_failure = None;
    for r in results {
        match r {
            E2e::Done {
                latency_ms,
                server_ms,
            } => {
                lat.push(latency_ms);
                server_side.extend(server_ms);
            }
            E2e::Failed(e) => {
                failures += 1;
                first_failure.get_or_insert(e);
            }
            E2e::TimedOut => timeouts += 1,
        }
    }
    let lat = sorted(lat);
    let server_side = sorted(server_side);
    let offered = sent as f64 / sending.as_secs_f64().max(1e-9);
    let key = format!("e2e_{percent_of}pct");
    suite.record(
        &key,
        json!({
            "target_rate": rate, "offered_rate": offered, "sent": sent, "succeeded": lat.len(),
            "failed": failures, "timed_out": timeouts, "first_failure": first_failure,
            "p50_ms": pct(&lat, 50.0), "p90_ms": pct(&lat, 90.0), "p99_ms": pct(&lat, 99.0),
            "max_ms": lat.last(), "server_p50_ms": pct(&server_side, 50.0),
            "server_p99_ms": pct(&server_side, 99.0), "polls": polls,
            "polls_per_s": polls as f64 / elapsed, "server_cpu_s": cpu as f64 / suite.s.clk_tck,
        }),
    );
    let bad = failures + timeouts;
    let flag = if bad > 0 {
        format!(
            " ⚠ **{} of {} not success within {} s** ({failures} failed, {timeouts} timed out{})",
            thousands(bad as f64),
            thousands(sent as f64),
            E2E_TIMEOUT.as_secs(),
            first_failure
                .map(|f| format!("; first failure: {}", one_line(&f)))
                .unwrap_or_default()
        )
    } else {
        String::new()
    };
    suite.row(
        order,
        "e2e",
        &format!("submit → success latency at {percent_of} % of the ceiling's submit rate, SQLite, echo, {how} (p50 / p90 / p99 / max)"),
        if lat.is_empty() {
            "none succeeded".into()
        } else {
            format!(
                "{} / {} / {} / {}",
                ms(pct(&lat, 50.0)),
                ms(pct(&lat, 90.0)),
                ms(pct(&lat, 99.0)),
                ms(lat.last().copied().unwrap_or(f64::NAN))
            )
        },
        format!("rate {} submits/s", thousands(rate)),
        "—".into(),
        format!(
            "{} tasks sent at {} /s over {} s; server-side completeTime − createTime p50 {} / p99 {}; {} status polls ({}/s); server CPU {:.2} cores{flag}",
            thousands(sent as f64),
            thousands(offered),
            secs,
            ms(pct(&server_side, 50.0)),
            ms(pct(&server_side, 99.0)),
            thousands(polls as f64),
            thousands(polls as f64 / elapsed),
            cpu as f64 / suite.s.clk_tck / elapsed,
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Step 5: status with STORED_N finished tasks stored, and memory

/// A data dir whose SQLite store holds `success` copies (`n_success`) of one echo task the
/// server finished, and `n_pending` pending echo tasks (the first, claimed first, parks for 10
/// minutes). Returns the copies' ids.
async fn stored_dir(
    suite: &Suite,
    tmp: &Path,
    config: &Path,
    n_success: usize,
    n_pending: usize,
) -> Result<Vec<String>> {
    let http = &suite.http;
    let data = tmp.join("data");
    let mut server = suite.taskgate(tmp, config, None).await?;
    let template = async {
        server.wait_healthy(http).await?;
        let id = submit(http, &server.base, &json!({"input": {"n": 1}})).await?;
        wait_success(http, &server.base, &id).await?;
        Ok::<_, anyhow::Error>(id)
    }
    .await;
    server.stop().await;
    let template = template?;
    let db = Db::sqlite(&data, false).await?;
    let t = Instant::now();
    let ids = task_ids(n_success);
    let seeded = async {
        db.seed_copies(&template, &ids).await?;
        if n_pending > 0 {
            let (tenant, max_attempts) = db.template(&template).await?;
            let rows: Vec<(String, String)> = task_ids(n_pending)
                .into_iter()
                .enumerate()
                .map(|(i, id)| {
                    let input = if i == 0 {
                        json!({"delay_ms": 600000})
                    } else {
                        json!({"n": i})
                    };
                    (id, input.to_string())
                })
                .collect();
            db.seed_pending(&tenant, max_attempts, &rows).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    db.close().await;
    seeded?;
    eprintln!(
        "   seeded {n_success} success + {n_pending} pending tasks in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(ids)
}

async fn step_stored(suite: &mut Suite) -> Result<()> {
    let n = suite.s.stored_n;
    let secs = suite.s.duration;
    let (rate, rate_source) = match suite.s.stored_rate {
        Some(r) => (r, "STORED_RATE"),
        None => (
            suite.ceiling_status_rate().await? / 4.0,
            "¼ of the ceiling's wrk status rate",
        ),
    };
    let http = suite.http.clone();

    // A. n finished tasks; status at a quarter of the ceiling's status rate.
    let tmp = fresh_tmp()?;
    let echo_cfg = suite.s.echo_config();
    let ids = Arc::new(stored_dir(suite, tmp.path(), &echo_cfg, n, 0).await?);
    let spawned = Instant::now();
    let mut server = suite.taskgate(tmp.path(), &echo_cfg, None).await?;
    let run = async {
        server.wait_healthy(&http).await?;
        let startup_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = server.memory()?;
        eprintln!("   open loop: {rate:.0} status requests/s for {secs} s over {n} stored tasks");
        let lat = status_open_loop(&http, &server.base, ids.clone(), rate, secs).await?;
        let after = server.memory()?;
        Ok::<_, anyhow::Error>((startup_ms, idle, lat, after))
    }
    .await;
    server.stop().await;
    drop(tmp);
    let (startup_ms, idle, lat, after) = run?;

    // The ceiling at the same rate, and its memory.
    let mut trivial = Server::trivial(&suite.s).await?;
    let ceiling = async {
        let lat = status_open_loop(
            &http,
            &trivial.base,
            Arc::new(vec!["task_x".to_owned()]),
            rate,
            secs,
        )
        .await?;
        Ok::<_, anyhow::Error>((lat, trivial.memory()?))
    }
    .await;
    trivial.stop().await;
    let (c_lat, c_mem) = ceiling?;
    let rate_note = format!("offered {} /s ({rate_source})", thousands(rate));
    suite.record(
        "stored_status",
        json!({
            "stored": n, "rate": rate, "startup_ms": startup_ms, "taskgate": lat.json(),
            "ceiling": c_lat.json(), "vm_rss_kib_idle": idle.0, "vm_hwm_kib_idle": idle.1,
            "vm_rss_kib_after": after.0, "vm_hwm_kib_after": after.1,
            "ceiling_vm_rss_kib": c_mem.0, "ceiling_vm_hwm_kib": c_mem.1,
        }),
    );
    let errors = |l: &Latencies| {
        let mut flags = String::new();
        if l.errors > 0 {
            flags.push_str(&format!(
                " ⚠ **{} errors** (first: {})",
                thousands(l.errors as f64),
                one_line(l.first_error.as_deref().unwrap_or(""))
            ));
        }
        // Answers slower than the offered rate: requests queued, and the tail is that queue.
        if l.achieved < 0.95 * rate {
            flags.push_str(" ⚠ **overloaded: answers fell behind the offered rate**");
        }
        flags
    };
    suite.row(
        80,
        "stored",
        &format!(
            "status p99 with {} finished tasks stored, open loop, random ids",
            thousands(n as f64)
        ),
        ms(pct(&lat.ok, 99.0)),
        ms(pct(&c_lat.ok, 99.0)),
        times(pct(&lat.ok, 99.0), pct(&c_lat.ok, 99.0)),
        format!(
            "{rate_note}; taskgate {} answered {} /s{}; ceiling {} answered {} /s{}; startup {}",
            lat.summary(),
            thousands(lat.achieved),
            errors(&lat),
            c_lat.summary(),
            thousands(c_lat.achieved),
            errors(&c_lat),
            ms(startup_ms)
        ),
    );
    let target = |kib: u64| {
        if kib as f64 / 1024.0 <= 150.0 {
            "within the 150 MB target"
        } else {
            "⚠ **over the 150 MB target**"
        }
    };
    suite.row(
        90,
        "stored",
        &format!(
            "RSS with {} finished tasks stored (VmRSS idle / after the status run; VmHWM)",
            thousands(n as f64)
        ),
        format!("{} / {}; HWM {}", mib(idle.0), mib(after.0), mib(after.1)),
        format!("{}; HWM {}", mib(c_mem.0), mib(c_mem.1)),
        times(after.0 as f64, c_mem.0 as f64),
        format!("{} (VmHWM)", target(after.1)),
    );

    // B. The same count with a tenth pending on a parked model (concurrency 1, the first
    //    pending task holds the slot for 10 minutes), so they stay pending.
    let n_pending = (n / 10).max(2);
    let tmp = fresh_tmp()?;
    let parked_cfg = suite.s.parked_config();
    stored_dir(suite, tmp.path(), &parked_cfg, n - n_pending, n_pending).await?;
    let mut server = suite.taskgate(tmp.path(), &parked_cfg, None).await?;
    let run = async {
        server.wait_healthy(&http).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.memory()
    }
    .await;
    server.stop().await;
    let mem = run?;
    let db = Db::sqlite(&tmp.path().join("data"), true).await?;
    let states = db.states().await?;
    db.close().await;
    suite.record(
        "stored_pending",
        json!({"success": n - n_pending, "pending": n_pending, "vm_rss_kib": mem.0,
               "vm_hwm_kib": mem.1, "states_after": states}),
    );
    suite.row(
        95,
        "stored",
        &format!(
            "RSS with {} success + {} pending stored (VmRSS 2 s after start; VmHWM)",
            thousands((n - n_pending) as f64),
            thousands(n_pending as f64)
        ),
        format!("{}; HWM {}", mib(mem.0), mib(mem.1)),
        format!("{}; HWM {}", mib(c_mem.0), mib(c_mem.1)),
        times(mem.0 as f64, c_mem.0 as f64),
        format!(
            "{}; states after the stop: {}",
            target(mem.1),
            states
                .iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v as f64)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:8090/api/v1/generateTask/echo
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   535.71us    1.02ms  28.54ms   93.94%
    Req/Sec    47.21k     3.12k   52.10k    71.00%
  Latency Distribution
     50%  410.00us
     75%  612.00us
     90%    1.02ms
     99%    3.89ms
  939306 requests in 10.01s, 130.79MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  93861.45
Transfer/sec:     13.07MB
";

    #[test]
    fn wrk_output_is_parsed() -> Result<()> {
        let w = parse_wrk(WRK)?;
        assert!((w.rps - 93861.45).abs() < 1e-6);
        assert_eq!(w.requests, 939306);
        assert!((w.p50 - 0.41).abs() < 1e-9);
        assert!((w.p90 - 1.02).abs() < 1e-9);
        assert!((w.p99 - 3.89).abs() < 1e-9);
        assert_eq!((w.non2xx, w.socket_errors), (5, 3));
        assert!(!w.clean());
        assert!(parse_wrk("nothing").is_err());
        Ok(())
    }

    #[test]
    fn wrk_times_convert_to_ms() {
        assert_eq!(wrk_time_ms("2.00s"), Some(2000.0));
        assert_eq!(wrk_time_ms("1.50m"), Some(90_000.0));
        assert_eq!(wrk_time_ms("250.00us"), Some(0.25));
        assert_eq!(wrk_time_ms("x"), None);
    }

    #[test]
    fn numbers_are_formatted() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(-12345.0), "-12,345");
        let v = sorted(vec![5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!(
            (pct(&v, 50.0), pct(&v, 99.0), pct(&v, 0.0)),
            (3.0, 5.0, 1.0)
        );
    }
}
