//! The fault suite (issue 14): the real binary SIGKILLed at random moments under load (SQLite
//! and PostgreSQL), pull workers SIGKILLed mid-task, PostgreSQL cut away under load, and claims
//! while an idle transaction holds back the cleanup of dead rows. Every test ends with
//! [`check_invariants`] over every task it got a 200 for.
//!
//! CI runs small sizes. By hand, the issue's sizes (`--nocapture` is not needed: the figures go
//! straight to stderr):
//!
//! ```text
//! TASKGATE_FAULT_CYCLES=100 TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test -p taskgate --test it -- fault_suite::the_server_killed
//! TASKGATE_FAULT_TASKS=100000 TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test -p taskgate --test it -- fault_suite::claims_keep_their_pace
//! ```
//!
//! `TASKGATE_FAULT_IDLE=0` runs the last one without its idle transaction, as a control.
//! `TASKGATE_FAULT_SEED=N` replays a run's choices (kill moments, the mix of submits); the seed
//! of every run is printed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, RngCore, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::faults::{check_invariants, Want};
use crate::support::*;
use crate::workers::spawn_worker;

/// Interrupted attempts count, so a task can run out of them under repeated kills.
const MAX_ATTEMPTS: u32 = 5;
/// The failCode of a task whose every attempt was interrupted.
const EXHAUSTED: &str = "ATTEMPTS_EXHAUSTED";

/// Writes a line where a person running the suite sees it, past the harness's output capture.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "fault_suite: {line}");
}

/// `name` from the environment as a number, else `default`.
fn env_size(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kill moments and a mix of submits, replayable from a printed seed.
struct Rng(StdRng);

impl Rng {
    /// From `TASKGATE_FAULT_SEED`, else the clock; prints the seed.
    fn seeded(what: &str) -> Rng {
        let seed = std::env::var("TASKGATE_FAULT_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        say(&format!(
            "{what}: seed {seed} (TASKGATE_FAULT_SEED={seed} replays it)"
        ));
        Rng::from_seed(seed)
    }

    fn from_seed(seed: u64) -> Rng {
        Rng(StdRng::seed_from_u64(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.gen_range(lo..hi)
    }
}

// ---------------------------------------------------------------------------------------------
// The load: submits of several kinds, some with a callback, against whichever server is up.

/// What a submit asked for, and so how it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// crashable.sh, short: success with id.txt and ok.txt.
    Quick,
    /// crashable.sh, long enough to be caught by a kill.
    Slow,
    /// crashable.sh exiting 3: failed, GENERATION_FAILED.
    Bad,
    /// The builtin echo: success with result.json holding the input.
    Echo,
    /// The builtin echo told to fail: failed, GENERATION_FAILED.
    EchoFail,
}

impl Kind {
    fn model(self) -> &'static str {
        match self {
            Kind::Quick => "quick",
            Kind::Slow => "slow",
            Kind::Bad => "bad",
            Kind::Echo | Kind::EchoFail => "echo",
        }
    }

    /// Quick 40 %, slow 10 %, bad 10 %, echo 30 %, failing echo 10 %.
    fn pick(rng: &mut Rng) -> Kind {
        match rng.range(0, 10) {
            0..=3 => Kind::Quick,
            4 => Kind::Slow,
            5 => Kind::Bad,
            6..=8 => Kind::Echo,
            _ => Kind::EchoFail,
        }
    }

    fn input(self, n: u64) -> Value {
        match self {
            Kind::EchoFail => json!({ "n": n, "fail": "failing as asked" }),
            _ => json!({ "n": n }),
        }
    }
}

/// The models the load runs; crashable.sh leaves its runs in `marks`.
fn load_models(marks: &Path) -> String {
    let marks = marks.to_str().unwrap();
    let extra =
        |c: usize| format!("concurrency = {c}\nmax_attempts = {MAX_ATTEMPTS}\ntimeout = \"30s\"");
    format!(
        "{}{}{}\n[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\nconcurrency = 4\nmax_attempts = {MAX_ATTEMPTS}\n",
        command_model("quick", "crashable.sh", &[marks, "0.05", "0"], &extra(4)),
        command_model("slow", "crashable.sh", &[marks, "0.6", "0"], &extra(4)),
        command_model("bad", "crashable.sh", &[marks, "0", "3"], &extra(2)),
    )
}

/// A config file for the load: its models, limits no load here reaches, and callback retries
/// quick enough to finish within a test.
fn write_load_config(dir: &Path, marks: &Path) -> PathBuf {
    let path = dir.join("taskgate.toml");
    let text = format!(
        "[limits]\nrequests_per_minute = 0\nconcurrent_tasks = 0\n\n\
         [webhooks]\ntimeout = \"2s\"\nretry_delays = [\"200ms\", \"500ms\", \"1s\", \"2s\"]\n\n{}",
        load_models(marks)
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[derive(Clone, Debug)]
struct Accepted {
    id: String,
    kind: Kind,
    callback: bool,
    n: u64,
}

/// What the submitters saw.
#[derive(Default)]
struct Tally {
    accepted: Vec<Accepted>,
    /// Answered 503 in the envelope: refused, owed nothing.
    unavailable: usize,
    /// No complete answer (the server died under the request): owed nothing.
    no_answer: usize,
    /// Anything else: each is a failure of the test.
    unexpected: Vec<String>,
}

/// Submitters running against `api` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `submitters` loops, each pausing 30–120 ms between submits so that the work stays within
    /// what the models get through (a queue growing without end would only test patience).
    fn start(
        api: &Api,
        callback_url: &str,
        rng: &mut Rng,
        submitters: usize,
        tally: Arc<Mutex<Tally>>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        // A dead server must not hold a submitter for long.
        let api = Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            ..api.clone()
        };
        let handles = (0..submitters)
            .map(|_| {
                let (api, stop, tally) = (api.clone(), stop.clone(), tally.clone());
                let callback_url = callback_url.to_owned();
                let mut rng = Rng::from_seed(rng.next());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let kind = Kind::pick(&mut rng);
                        let n = rng.next() >> 12;
                        let callback = rng.range(0, 10) < 3;
                        let mut body = json!({ "input": kind.input(n) });
                        if callback {
                            body["callback_url"] = json!(callback_url);
                        }
                        let outcome = try_submit(&api, kind.model(), &body).await;
                        record(&mut tally.lock().unwrap(), outcome, kind, callback, n);
                        tokio::time::sleep(Duration::from_millis(rng.range(30, 120))).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            handles,
        }
    }

    async fn stop(self) -> Arc<Mutex<Tally>> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            h.await.unwrap();
        }
        self.tally
    }
}

/// Files what one submit got.
fn record(t: &mut Tally, outcome: Option<(StatusCode, Value)>, kind: Kind, callback: bool, n: u64) {
    match outcome {
        None => t.no_answer += 1,
        Some((StatusCode::OK, b)) => match b["data"]["taskId"].as_str() {
            Some(id) => t.accepted.push(Accepted {
                id: id.to_owned(),
                kind,
                callback,
                n,
            }),
            None => t.unexpected.push(format!("200 without a taskId: {b}")),
        },
        // Refused in the envelope, owed nothing.
        Some((StatusCode::SERVICE_UNAVAILABLE, b))
            if !error_code(&b).is_empty() && b["code"] == 503 =>
        {
            t.unavailable += 1
        }
        Some((s, b)) => t.unexpected.push(format!("{s}: {b}")),
    }
}

/// One submit; `None` when no complete answer came (connection refused or cut, timeout).
async fn try_submit(api: &Api, model: &str, body: &Value) -> Option<(StatusCode, Value)> {
    let resp = api
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/generateTask/{model}"),
        )
        .json(body)
        .send()
        .await
        .ok()?;
    let status = resp.status();
    let text = resp.text().await.ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some((status, v)),
        Err(_) => Some((status, json!({ "notJson": text }))),
    }
}

/// Counts the final-state callbacks per task id (duplicates kept: delivery is at least once).
#[derive(Clone)]
struct Callbacks {
    url: String,
    finals: Arc<Mutex<HashMap<String, usize>>>,
}

impl Callbacks {
    async fn start() -> Callbacks {
        let (url, mut rx) = callback_receiver().await;
        let finals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = finals.clone();
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let data = &v["data"];
                if matches!(data["state"].as_str(), Some("success" | "failed")) {
                    if let Some(id) = data["taskId"].as_str() {
                        *counts.lock().unwrap().entry(id.to_owned()).or_default() += 1;
                    }
                }
            }
        });
        Callbacks { url, finals }
    }

    fn count(&self, id: &str) -> usize {
        self.finals.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Waits until every task in `owed` has had a final-state callback; returns the number of
    /// deliveries beyond the first.
    async fn wait_owed(&self, owed: &[&Accepted]) -> usize {
        // A delivery cut short by a kill stays claimed for its lease (the webhook timeout plus a
        // minute) before it is sent again.
        wait_until(Duration::from_secs(120), "every owed callback", || {
            let missing = owed.iter().filter(|a| self.count(&a.id) == 0).count();
            async move { missing == 0 }
        })
        .await;
        owed.iter().map(|a| self.count(&a.id) - 1).sum()
    }
}

/// The end every accepted task must reach: all final (polled through the API), each as its kind
/// says, with its files; then the shared invariant check over all of them.
async fn check_accepted(api: &Api, accepted: &[Accepted]) {
    for a in accepted {
        api.wait_final(a.kind.model(), &a.id, Duration::from_secs(120))
            .await;
    }
    let echo: Vec<String> = accepted
        .iter()
        .map(|a| serde_json::to_string_pretty(&json!({ "n": a.n })).unwrap())
        .collect();
    let files: Vec<[(&str, &str); 2]> = accepted
        .iter()
        .map(|a| [("id.txt", a.id.as_str()), ("ok.txt", "ok")])
        .collect();
    let echo_files: Vec<[(&str, &str); 1]> =
        echo.iter().map(|e| [("result.json", e.as_str())]).collect();
    let wants: Vec<(&str, &str, Want<'_>)> = accepted
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let want = match a.kind {
                Kind::Quick | Kind::Slow => Want::SuccessOr(&files[i], EXHAUSTED),
                Kind::Echo => Want::SuccessOr(&echo_files[i], EXHAUSTED),
                Kind::Bad | Kind::EchoFail => Want::Failed("GENERATION_FAILED"),
            };
            (a.kind.model(), a.id.as_str(), want)
        })
        .collect();
    check_invariants(api, &wants).await;
}

/// Runs of crashable.sh per task, from its marks (one line per run).
fn runs(marks: &Path, id: &str) -> usize {
    std::fs::read_to_string(marks.join(id))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 1. The server SIGKILLed at random moments under load.

async fn kill_the_server_under_load(database_url: Option<&str>, what: &str) {
    let started = Instant::now();
    let cycles = env_size("TASKGATE_FAULT_CYCLES", 8);
    let mut rng = Rng::seeded(what);
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let config = write_load_config(dir.path(), &marks);
    let data = dir.path().join("data");
    let mut flags = vec!["--lease", "1s", "--allow-private-callbacks"];
    if let Some(url) = database_url {
        flags.extend(["--database-url", url]);
    }
    let callbacks = Callbacks::start().await;
    let tally: Arc<Mutex<Tally>> = Arc::default();

    for _ in 0..cycles {
        let server = ServerProcess::spawn_with(&data, Some(&config), &flags).await;
        let load = Load::start(&server.api, &callbacks.url, &mut rng, 2, tally.clone());
        // The random moment: anywhere from right after start to well into the load.
        tokio::time::sleep(Duration::from_millis(rng.range(50, 1500))).await;
        server.kill9().await;
        load.stop().await;
    }

    let server = ServerProcess::spawn_with(&data, Some(&config), &flags).await;
    let t = std::mem::take(&mut *tally.lock().unwrap());
    assert!(
        t.unexpected.is_empty(),
        "unexpected answers: {:#?}",
        t.unexpected
    );
    assert!(!t.accepted.is_empty(), "no submit was accepted");
    let drain = Instant::now();
    check_accepted(&server.api, &t.accepted).await;
    let drained = drain.elapsed();
    let owed: Vec<&Accepted> = t.accepted.iter().filter(|a| a.callback).collect();
    let duplicates = callbacks.wait_owed(&owed).await;
    let delivered = drain.elapsed();
    server.terminate().await;

    // The stored attempts, read while no server runs, and the runs the scripts recorded.
    let store = taskgate_server::open_store(&data, database_url)
        .await
        .unwrap();
    let (mut retried, mut most, mut exhausted, mut success) = (0, 0, 0, 0);
    for a in &t.accepted {
        let task = store
            .get_task(&a.id)
            .await
            .unwrap()
            .expect("an accepted task is stored");
        assert!(
            task.attempts <= MAX_ATTEMPTS,
            "task {} was attempted {} times",
            a.id,
            task.attempts
        );
        let ran = runs(&marks, &a.id);
        assert!(
            ran <= MAX_ATTEMPTS as usize,
            "task {} ran {ran} times",
            a.id
        );
        retried += usize::from(task.attempts > 1);
        most = most.max(task.attempts);
        success += usize::from(task.state == taskgate_proto::TaskState::Success);
        exhausted += usize::from(task.fail_code.as_deref() == Some(EXHAUSTED));
    }
    store.close().await;
    say(&format!(
        "{what}: {cycles} kills, {} accepted ({} callbacks owed, {duplicates} duplicate deliveries), \
         {success} success, {} failed ({exhausted} {EXHAUSTED}), {retried} attempted more than once \
         (most {most}), {} answered 503, {} without an answer; {:.1} s in all, of which \
         {:.1} s to every final state and {:.1} s to every owed callback after the last kill",
        t.accepted.len(),
        owed.len(),
        t.accepted.len() - success,
        t.unavailable,
        t.no_answer,
        started.elapsed().as_secs_f64(),
        drained.as_secs_f64(),
        delivered.as_secs_f64()
    ));
}

#[tokio::test]
async fn the_server_killed_at_random_moments_under_load_loses_no_task_on_sqlite() {
    kill_the_server_under_load(None, "SIGKILL under load, SQLite").await;
}

#[tokio::test]
async fn the_server_killed_at_random_moments_under_load_loses_no_task_on_postgresql() {
    let Some(db) = create_db("SIGKILL under load on PostgreSQL").await else {
        return;
    };
    kill_the_server_under_load(Some(&db.url), "SIGKILL under load, PostgreSQL").await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Pull workers SIGKILLed mid-task.

#[tokio::test]
async fn pull_workers_killed_mid_task_again_and_again_lose_no_task() {
    let kills = env_size("TASKGATE_FAULT_CYCLES", 5).min(50);
    let mut rng = Rng::seeded("worker kills");
    let app = TestApp::start_with(|c| {
        c.models = taskgate_server::config::FileConfig::parse(&format!(
            "[models.remote]\nbackend = \"worker\"\nconcurrency = 2\ntimeout = \"30s\"\nmax_attempts = {}\n",
            kills + 2
        ))
        .unwrap()
        .models
        .unwrap();
        c.server.lease = Duration::from_millis(900);
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let marks = app.data_dir.join("marks");
    std::fs::create_dir(&marks).unwrap();
    let script = format!(
        "echo run >> {m}/\"$TASKGATE_TASK_ID\"; sleep 0.4; printf '%s' \"$TASKGATE_TASK_ID\" > \"$TASKGATE_OUTPUT_DIR/id.txt\"",
        m = marks.display()
    );
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(app.api.submit_ok("remote", json!({ "n": i })).await);
    }
    let total_runs = |ids: &[String]| ids.iter().map(|id| runs(&marks, id)).sum::<usize>();

    for _ in 0..kills {
        let before = total_runs(&ids);
        let mut worker = spawn_worker(&app.api.base, &token, &script);
        // Kill only once this worker has a task in hand, at a random point of its run.
        wait_until(
            Duration::from_secs(20),
            "the worker to start a task",
            || {
                let now = total_runs(&ids);
                async move { now > before }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.range(0, 350))).await;
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
    let _fresh = spawn_worker(&app.api.base, &token, &script);
    for id in &ids {
        app.api
            .wait_final("remote", id, Duration::from_secs(60))
            .await;
    }
    let files: Vec<[(&str, &str); 1]> = ids.iter().map(|id| [("id.txt", id.as_str())]).collect();
    let wants: Vec<(&str, &str, Want<'_>)> = ids
        .iter()
        .zip(&files)
        .map(|(id, f)| ("remote", id.as_str(), Want::Success(f)))
        .collect();
    check_invariants(&app.api, &wants).await;
    let reruns = ids.iter().filter(|id| runs(&marks, id) > 1).count();
    for id in &ids {
        assert!(
            runs(&marks, id) <= kills as usize + 2,
            "task {id} ran {} times",
            runs(&marks, id)
        );
    }
    // The kills landed mid-task: some run was cut short and done again.
    assert!(reruns >= 1, "no kill interrupted a task");
    say(&format!(
        "worker kills: {kills} kills, 8 tasks all success, {reruns} run more than once"
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL unreachable under load.

#[tokio::test]
async fn a_postgresql_outage_under_load_answers_503_and_every_accepted_task_still_ends() {
    let Some(db) = create_db("PostgreSQL outage under load").await else {
        return;
    };
    let mut rng = Rng::seeded("PostgreSQL outage");
    let mut proxy = Proxy::start(0).await;
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let config = write_load_config(dir.path(), &marks);
    let node = ServerProcess::spawn_with(
        &dir.path().join("data"),
        Some(&config),
        &[
            "--database-url",
            via_proxy.as_str(),
            "--lease",
            "2s",
            "--allow-private-callbacks",
        ],
    )
    .await;
    let callbacks = Callbacks::start().await;
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let load = Load::start(&node.api, &callbacks.url, &mut rng, 3, tally.clone());
    let accepted = || tally.lock().unwrap().accepted.len();
    wait_until(
        Duration::from_secs(20),
        "some submits before the outage",
        || {
            let n = accepted();
            async move { n >= 10 }
        },
    )
    .await;

    proxy.cut();
    // The outage lasts at least 3 s, and until the load has met it (a loaded machine may send no
    // submit in a fixed window): the 503 asserted below is then waited for, not hoped for.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_until(
        Duration::from_secs(30),
        "a submit answered 503 during the outage",
        || {
            let n = tally.lock().unwrap().unavailable;
            async move { n >= 1 }
        },
    )
    .await;
    let during = tally.lock().unwrap().unavailable;
    let _restored = Proxy::start(proxy.port).await;
    let at_restore = accepted();
    wait_until(
        Duration::from_secs(30),
        "submits accepted again after the outage",
        || {
            let n = accepted();
            async move { n >= at_restore + 10 }
        },
    )
    .await;
    let t = std::mem::take(&mut *load.stop().await.lock().unwrap());

    assert!(
        t.unexpected.is_empty(),
        "answers other than 200 or 503: {:#?}",
        t.unexpected
    );
    assert!(during >= 1, "no submit was answered 503 during the outage");
    // Pooled connections broken by the cut fail once each on their next use: let them go by
    // before the checks, which take any 503 for a failure.
    let probe = &t.accepted[0];
    wait_until(
        Duration::from_secs(30),
        "statusTask answered again",
        || async {
            for _ in 0..20 {
                if node.api.status(probe.kind.model(), &probe.id).await.0 != StatusCode::OK {
                    return false;
                }
            }
            true
        },
    )
    .await;
    check_accepted(&node.api, &t.accepted).await;
    let owed: Vec<&Accepted> = t.accepted.iter().filter(|a| a.callback).collect();
    let duplicates = callbacks.wait_owed(&owed).await;
    for a in &t.accepted {
        assert!(
            runs(&marks, &a.id) <= MAX_ATTEMPTS as usize,
            "task {} ran too often",
            a.id
        );
    }
    say(&format!(
        "PostgreSQL outage: {} accepted, {} answered 503, {} callbacks owed, {duplicates} duplicates",
        t.accepted.len(),
        t.unavailable,
        owed.len()
    ));
    node.terminate().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Claims while an idle transaction keeps every dead row.

/// Tasks per second in each tenth of the run, from the stored completion times (ms) in order.
fn rates_per_tenth(first_start: i64, completed: &[i64]) -> Vec<f64> {
    let n = completed.len();
    let mut from = first_start;
    (1..=10)
        .map(|k| {
            let (lo, hi) = ((k - 1) * n / 10, k * n / 10);
            let to = completed[hi - 1];
            let secs = ((to - from).max(1)) as f64 / 1000.0;
            from = to;
            (hi - lo) as f64 / secs
        })
        .collect()
}

#[tokio::test]
async fn claims_keep_their_pace_while_an_idle_transaction_holds_back_dead_rows() {
    let Some(db) = create_db("claims under an idle transaction").await else {
        return;
    };
    let n = env_size("TASKGATE_FAULT_TASKS", 3000).max(10) as usize;
    let unlimited = |c: &mut taskgate_server::Config| {
        c.limits.concurrent_tasks = 0;
        c.limits.requests_per_minute = 0;
    };
    // First every task is queued, on a node where no worker will ever take them, so that the
    // run measures claims alone and not submits competing with them.
    let queue = TestApp::node_on(&db, |c| {
        c.models =
            taskgate_server::config::FileConfig::parse("[models.echo]\nbackend = \"worker\"\n")
                .unwrap()
                .models
                .unwrap();
        unlimited(c);
    })
    .await;
    let items: Vec<Value> = (0..n).map(|i| json!({ "input": { "n": i } })).collect();
    let mut ids = Vec::with_capacity(n);
    for chunk in items.chunks(taskgate_proto::MAX_BATCH_TASKS) {
        let (status, body) = queue
            .api
            .submit_batch("echo", json!({ "tasks": chunk }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.extend(
            body["data"]["taskIds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    queue.stop().await.unwrap();

    // The idle transaction: its snapshot keeps every row version made from now on. By hand,
    // TASKGATE_FAULT_IDLE=0 leaves it out, for the same run without it to compare against.
    let with_idle = std::env::var("TASKGATE_FAULT_IDLE").as_deref() != Ok("0");
    let mut idle = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let begin = if with_idle { "BEGIN" } else { "SELECT 1" };
    sqlx::query(begin).execute(&mut idle).await.unwrap();
    sqlx::query("SELECT txid_current()")
        .execute(&mut idle)
        .await
        .unwrap();

    let started = Instant::now();
    let runner = TestApp::node_on(&db, |c| {
        c.models = taskgate_server::config::FileConfig::parse(
            "[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\nconcurrency = 16\n",
        )
        .unwrap()
        .models
        .unwrap();
        unlimited(c);
    })
    .await;
    let watch = sqlx::PgPool::connect(&db.url).await.unwrap();
    // Generous: the run's own pace is what the test measures, not this bound.
    let bound = Duration::from_secs(60 + n as u64 / 20);
    wait_until(bound, "every task to finish", || {
        let watch = watch.clone();
        async move {
            let unfinished: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE state NOT IN ('success', 'failed')",
            )
            .fetch_one(&watch)
            .await
            .unwrap();
            unfinished == 0
        }
    })
    .await;
    let wall = started.elapsed();
    // The transaction really held the horizon back all along: it is still open with its
    // transaction id, older than every row version the run made, so none of them can go.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
         AND backend_xid IS NOT NULL AND datname = current_database()",
    )
    .fetch_one(&watch)
    .await
    .unwrap();
    assert_eq!(
        held,
        i64::from(with_idle),
        "the idle transaction was not holding a snapshot"
    );

    let (first_start, failed): (i64, i64) = sqlx::query_as(
        "SELECT min(start_time), count(*) FILTER (WHERE state <> 'success') FROM tasks",
    )
    .fetch_one(&watch)
    .await
    .unwrap();
    assert_eq!(failed, 0, "every task succeeds");
    let completed: Vec<i64> =
        sqlx::query_scalar("SELECT complete_time FROM tasks ORDER BY complete_time")
            .fetch_all(&watch)
            .await
            .unwrap();
    assert_eq!(completed.len(), n);
    let dead: i64 =
        sqlx::query_scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tasks'")
            .fetch_one(&watch)
            .await
            .unwrap();
    let rates = rates_per_tenth(first_start, &completed);
    say(&format!(
        "idle transaction: {n} tasks in {:.1} s, {dead} dead task rows at the end; tasks/s per tenth: {}",
        wall.as_secs_f64(),
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" ")
    ));
    // A sample of the tasks, checked to the end (all of them would take longer than the run).
    let sample: Vec<(&str, String)> = ids
        .iter()
        .enumerate()
        .step_by((n / 20).max(1))
        .map(|(i, id)| {
            let content = serde_json::to_string_pretty(&json!({ "n": i })).unwrap();
            (id.as_str(), content)
        })
        .collect();
    let files: Vec<[(&str, &str); 1]> = sample
        .iter()
        .map(|(_, c)| [("result.json", c.as_str())])
        .collect();
    let wants: Vec<(&str, &str, Want<'_>)> = sample
        .iter()
        .zip(&files)
        .map(|((id, _), f)| ("echo", *id, Want::Success(f)))
        .collect();
    check_invariants(&runner.api, &wants).await;

    // The first tenth is the baseline. Claims that walked every dead version of the rows before
    // them would slow down with the number of tasks done (three versions per task); the last
    // tenth then runs at a fraction of the first. A third leaves room for a busy machine's noise.
    //
    // Known to fail at TASKGATE_FAULT_TASKS=100000 (215 tasks/s in the first tenth, 59 in the
    // last): each claim scans the partial indexes `tasks_ready` and `tasks_running_by_model`
    // from their start, and every entry of a task that left `pending` or `processing` stays in
    // them, dead but not removable, while the transaction is open (EXPLAIN at 50,000 tasks done:
    // ~50,000 heap fetches per scan, 30-50 ms). At the CI size the walk costs a few ms and does
    // not show; the by-hand size is the one that can fail.
    //
    // At the CI size each tenth lasts a fraction of a second, so a stall of the shared machine
    // could fail the comparison without claims having slowed: it is asserted only for a size
    // asked for by hand (the rates are printed at every size).
    let (first, last) = (rates[0], rates[9]);
    let by_hand = std::env::var_os("TASKGATE_FAULT_TASKS").is_some();
    assert!(
        !by_hand || last >= first / 3.0,
        "the last tenth ran at {last:.0} tasks/s against {first:.0} at first: {rates:?}; claims \
         walk the dead index entries an open transaction keeps (see the comment above)"
    );
    if with_idle {
        sqlx::query("ROLLBACK").execute(&mut idle).await.unwrap();
    }
    idle.close().await.unwrap();
    watch.close().await;
    runner.stop().await.unwrap();
    db.drop_db().await;
}
