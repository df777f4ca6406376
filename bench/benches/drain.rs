//! Drain: K echo tasks (no delay) from `pending` to `success` with the model at concurrency 64,
//! as tasks/s.
//!
//! Each iteration seeds a fresh SQLite data dir with K pending tasks through the store (not
//! timed), then times from the call to `taskgate_server::run` until the last task reads
//! `success` through statusTask. The timed span therefore includes the server's start (opening
//! the store, recovery, binding the routes), reported on its own as `drain/startup_empty`.
//! Completion is detected by polling statusTask with a cursor over the task ids in claim order
//! (the poller moves on at once when a task is final and sleeps 1 ms otherwise), so the drain
//! shares the machine with a polling client, as it would in use.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use serde_json::{json, Value};
use taskgate_bench::{client, echo_model, get_json, runtime, Server, API_KEY};
use taskgate_server::auth::{register_bootstrap_key, DEFAULT_TENANT};
use taskgate_server::domain::{new_task_id, now_ms};
use taskgate_server::store::sqlite::SqliteStore;
use taskgate_server::store::{NewTask, Store};

/// Tasks per drain.
const K: usize = 2000;
/// The echo model's concurrency.
const CONCURRENCY: usize = 64;

/// Writes `K` pending echo tasks of the bootstrap key's tenant; returns their ids, sorted as the
/// dispatcher claims them (equal priority, then id).
fn seed(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Vec<String> {
    rt.block_on(async {
        let store = SqliteStore::open(&taskgate_server::database_path(dir))
            .await
            .expect("cannot open the store");
        register_bootstrap_key(&store, API_KEY)
            .await
            .expect("cannot register the key");
        let tenant = store
            .tenant_by_name(DEFAULT_TENANT)
            .await
            .expect("cannot read the tenant")
            .expect("the key's tenant exists");
        let input = match json!({"n": 1}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let tasks: Vec<NewTask> = (0..K)
            .map(|_| NewTask {
                id: new_task_id(),
                tenant_id: tenant.id.clone(),
                model: "echo".to_owned(),
                input: input.clone(),
                callback_url: None,
                max_attempts: 3,
                create_time: now_ms(),
                priority: 0,
                expires_at: None,
                webhook_events: taskgate_server::domain::EventMask::DEFAULT,
                trace_parent: None,
                // As every submit now writes it: the insert is measured with the column filled.
                key_id: Some("key_01jbench00000000000000000000".to_owned()),
            })
            .collect();
        let mut ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        // Many callers at once, so that the group commit writes them in a few transactions.
        futures::future::join_all(tasks.into_iter().map(|t| store.insert_task(t)))
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .expect("seeding failed");
        store.close().await;
        ids.sort();
        ids
    })
}

fn models() -> BTreeMap<String, taskgate_server::config::ModelConfig> {
    BTreeMap::from([("echo".to_owned(), echo_model(CONCURRENCY))])
}

fn drain(c: &mut Criterion) {
    let rt = runtime();
    let client = client();

    let mut group = c.benchmark_group("drain");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));

    group.bench_function("startup_empty", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("cannot create a temporary dir");
                let start = Instant::now();
                let server = Server::taskgate_in(dir.path().to_owned(), models());
                let url = server.url("/healthz");
                rt.block_on(async {
                    let r = client.get(&url).send().await.expect("healthz failed");
                    assert!(r.status().is_success());
                });
                total += start.elapsed();
                server.stop();
            }
            total
        })
    });

    group.throughput(Throughput::Elements(K as u64));
    group.bench_function(format!("echo_{K}_tasks_concurrency_{CONCURRENCY}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("cannot create a temporary dir");
                let ids = seed(&rt, dir.path());
                let start = Instant::now();
                let server = Server::taskgate_in(dir.path().to_owned(), models());
                rt.block_on(async {
                    for id in &ids {
                        let url = server.url(&format!("/api/v1/statusTask/echo?taskId={id}"));
                        loop {
                            let status = get_json(&client, &url).await;
                            match status["data"]["state"].as_str() {
                                Some("success") => break,
                                Some("failed") => panic!("task {id} failed: {status}"),
                                _ => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                    }
                });
                total += start.elapsed();
                server.stop();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, drain);
criterion_main!(benches);
