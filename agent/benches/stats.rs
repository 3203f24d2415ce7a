//! What the sliding-window stats cost on the request path: finding a
//! request's edge when it starts, and recording its outcome when it ends.
//! `cargo bench -p waymark-agent --bench stats`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

use waymark_agent::telemetry::stats::{Outcome, Stats};

fn bench(c: &mut Criterion) {
    let stats = Stats::new(1024);
    // A table with some other edges, as on a busy node.
    for i in 0..200 {
        let _ = stats.request_edge(&format!("default/pod-{i}"), "web", "[DEFAULT]");
    }
    let outcome = Outcome {
        success: true,
        latency: Duration::from_micros(1234),
        retries: 0,
        budget_exhausted: false,
        tls: false,
    };
    c.bench_function("request_edge (lookup of a known edge)", |b| {
        b.iter(|| black_box(stats.request_edge("default/pod-7", "web", "[DEFAULT]")))
    });
    let edge = stats.request_edge("default/pod-7", "web", "[DEFAULT]");
    c.bench_function("record (one request's outcome)", |b| {
        b.iter(|| stats.record(&edge, black_box(outcome)))
    });
    c.bench_function("request_edge + record (per request)", |b| {
        b.iter(|| {
            let e = stats.request_edge("default/pod-7", "web", "[DEFAULT]");
            stats.record(&e, black_box(outcome));
        })
    });
    c.bench_function("connection open + close", |b| {
        b.iter(|| drop(stats.connection("default/pod-7", "web")))
    });
    c.bench_function("window (1m over 201 edges, admin side)", |b| {
        b.iter(|| black_box(stats.window(Duration::from_secs(60), std::time::Instant::now())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
