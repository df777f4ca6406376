//! `POST /api/v1/generateTask/{model}` with 64 requests in flight, as requests/s, against a
//! trivial axum handler driven the same way in the same run.
//!
//! - `trivial_axum`: the baseline (parses the JSON body, answers a fixed envelope).
//! - `taskgate_parked`: durable submits with dispatch kept out of the measurement: the model has
//!   concurrency 1 and its one slot is held by a task sleeping 10 minutes, so submitted tasks
//!   stay pending.
//! - `taskgate_dispatching`: durable submits to `echo` with concurrency 64, so the dispatcher
//!   claims, runs and finishes tasks on the same two cores while we submit.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use taskgate_bench::{client, drive, echo_model, runtime, submit, Server, IN_FLIGHT};

fn bench(c: &mut Criterion, name: &str, server: &Server, model: &str) {
    let rt = runtime();
    let client = client();
    let url = server.url(&format!("/api/v1/generateTask/{model}"));
    let mut group = c.benchmark_group("http_submit");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter_custom(|requests| {
            rt.block_on(drive(requests, IN_FLIGHT, |_| async {
                submit(&client, &url).await;
            }))
        })
    });
    group.finish();
}

fn http_submit(c: &mut Criterion) {
    let trivial = Server::trivial();
    bench(c, "trivial_axum", &trivial, "echo");
    trivial.stop();

    let parked = Server::taskgate(BTreeMap::from([("echo".to_owned(), echo_model(1))]));
    {
        // Hold the model's only slot so that every benchmark submit stays pending.
        let rt = runtime();
        let client = client();
        rt.block_on(async {
            let response = client
                .post(parked.url("/api/v1/generateTask/echo"))
                .bearer_auth(taskgate_bench::API_KEY)
                .body(r#"{"input":{"delay_ms":600000}}"#)
                .send()
                .await
                .expect("parking submit failed");
            assert!(response.status().is_success());
        });
    }
    bench(c, "taskgate_parked", &parked, "echo");
    parked.stop();

    let dispatching = Server::taskgate(BTreeMap::from([("echo".to_owned(), echo_model(64))]));
    bench(c, "taskgate_dispatching", &dispatching, "echo");
    dispatching.stop();
}

criterion_group!(benches, http_submit);
criterion_main!(benches);
