//! `GET /api/v1/statusTask/{model}?taskId=…` of one existing task with 64 requests in flight, as
//! requests/s, against a trivial axum GET handler driven the same way in the same run.
//!
//! - `taskgate_success`: a finished echo task (its view carries a signed result URL).
//! - `taskgate_pending`: a task that stays pending (its model's one slot is held).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use taskgate_bench::{
    client, drive, echo_model, get_json, runtime, submit, task_id, wait_final, Server, IN_FLIGHT,
};

fn bench(c: &mut Criterion, name: &str, url: &str) {
    let rt = runtime();
    let client = client();
    let mut group = c.benchmark_group("http_status");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter_custom(|requests| {
            rt.block_on(drive(requests, IN_FLIGHT, |_| async {
                get_json(&client, url).await;
            }))
        })
    });
    group.finish();
}

fn http_status(c: &mut Criterion) {
    let trivial = Server::trivial();
    let url = trivial.url("/api/v1/statusTask/echo?taskId=task_01jdbenchbenchbenchbenchbe");
    bench(c, "trivial_axum", &url);
    trivial.stop();

    let server = Server::taskgate(BTreeMap::from([
        ("echo".to_owned(), echo_model(4)),
        ("parked".to_owned(), echo_model(1)),
    ]));
    let (done, pending) = {
        let rt = runtime();
        let client = client();
        rt.block_on(async {
            let done = task_id(&submit(&client, &server.url("/api/v1/generateTask/echo")).await);
            let state = wait_final(&client, &server, "echo", &done).await;
            assert_eq!(state, "success");
            let park = client
                .post(server.url("/api/v1/generateTask/parked"))
                .bearer_auth(taskgate_bench::API_KEY)
                .body(r#"{"input":{"delay_ms":600000}}"#)
                .send()
                .await
                .expect("parking submit failed");
            assert!(park.status().is_success());
            let pending =
                task_id(&submit(&client, &server.url("/api/v1/generateTask/parked")).await);
            (done, pending)
        })
    };
    bench(
        c,
        "taskgate_success",
        &server.url(&format!("/api/v1/statusTask/echo?taskId={done}")),
    );
    bench(
        c,
        "taskgate_pending",
        &server.url(&format!("/api/v1/statusTask/parked?taskId={pending}")),
    );
    server.stop();
}

criterion_group!(benches, http_status);
criterion_main!(benches);
