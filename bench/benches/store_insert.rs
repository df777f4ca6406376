//! `Store::insert_task` on the SQLite store (WAL, `synchronous = FULL`, in a temporary dir), as
//! inserts/s, with 1 caller at a time and with 64 concurrent callers: the second shows what the
//! group commit buys (many rows per transaction and fsync).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use serde_json::{json, Map, Value};
use taskgate_server::domain::{new_task_id, now_ms};
use taskgate_server::store::sqlite::SqliteStore;
use taskgate_server::store::{NewTask, Store};

fn new_task(tenant_id: &str, input: &Map<String, Value>) -> NewTask {
    NewTask {
        id: new_task_id(),
        tenant_id: tenant_id.to_owned(),
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
    }
}

fn store_insert(c: &mut Criterion) {
    let rt = taskgate_bench::runtime();
    let dir = tempfile::tempdir().expect("cannot create a temporary dir");
    let (store, tenant_id) = rt.block_on(async {
        let store = SqliteStore::open(&taskgate_server::database_path(dir.path()))
            .await
            .expect("cannot open the store");
        let tenant = store
            .create_tenant("bench")
            .await
            .expect("cannot create a tenant");
        (Arc::new(store), tenant.id)
    });
    let input = match json!({"n": 1}) {
        Value::Object(m) => m,
        _ => unreachable!(),
    };

    let mut group = c.benchmark_group("store_insert");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(1));
    for callers in [1_u64, 64] {
        group.bench_function(BenchmarkId::new("sqlite_callers", callers), |b| {
            b.iter_custom(|inserts| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut handles = Vec::new();
                    for caller in 0..callers {
                        // Spread `inserts` over the callers; the first ones take the remainder.
                        let n = inserts / callers + u64::from(caller < inserts % callers);
                        let store = store.clone();
                        let tenant_id = tenant_id.clone();
                        let input = input.clone();
                        handles.push(tokio::spawn(async move {
                            for _ in 0..n {
                                store
                                    .insert_task(new_task(&tenant_id, &input))
                                    .await
                                    .expect("insert failed");
                            }
                        }));
                    }
                    for h in handles {
                        h.await.expect("caller panicked");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, store_insert);
criterion_main!(benches);
