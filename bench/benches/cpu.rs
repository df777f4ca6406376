//! CPU-only work on the hot paths.
//!
//! - `webhook_sign_1kib`: Standard Webhooks signature (HMAC-SHA256 + base64) of a 1 KiB body.
//!
//! The demo-image renderer (`backends::builtin::render_png`) is not reachable from outside the
//! server crate (its module is private), so it is not measured here.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use taskgate_proto::webhook::{sign, Secret};

fn cpu(c: &mut Criterion) {
    let secret = Secret::from_bytes(vec![7_u8; 32]);
    let body = vec![b'x'; 1024];
    let mut group = c.benchmark_group("cpu");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("webhook_sign_1kib", |b| {
        b.iter(|| {
            sign(
                black_box(&secret),
                black_box("msg_01jdbenchbenchbenchbenchbe"),
                black_box(1_764_370_000),
                black_box(&body),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, cpu);
criterion_main!(benches);
