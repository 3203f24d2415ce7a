use super::*;

fn ok(ms: u64) -> Outcome {
    Outcome {
        success: true,
        latency: Duration::from_millis(ms),
        retries: 0,
        budget_exhausted: false,
        tls: false,
    }
}

fn failed(ms: u64) -> Outcome {
    Outcome {
        success: false,
        ..ok(ms)
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The one summary of `edges` matching `pod`, `dst` and `route`.
fn summary<'a>(w: &'a Window, pod: &str, dst: &str, route: Option<&str>) -> &'a Summary {
    &w.edges
        .iter()
        .find(|(k, _)| k.pod == pod && k.dst == dst && k.route.as_deref() == route)
        .unwrap_or_else(|| panic!("no edge {pod} -> {dst} {route:?}"))
        .1
}

#[test]
fn bins_cover_every_value_without_gaps() {
    let mut prev_high = 0;
    for b in 0..bin_of(MAX_US) + 1 {
        let (low, high) = bin_range(b);
        assert_eq!(low, prev_high, "bin {b} starts where {} ends", b.max(1) - 1);
        assert!(high > low);
        assert_eq!(bin_of(low), b);
        assert_eq!(bin_of(high - 1), b);
        // 8 bins per octave: no bin wider than 1/8 of its lower bound.
        if low >= 8 {
            assert!((high - low) * 8 <= low, "bin {b} [{low}, {high}) too wide");
        }
        prev_high = high;
    }
    assert_eq!(bin_of(u64::MAX), bin_of(MAX_US));
}

#[test]
fn percentiles_are_within_a_bin_of_the_truth() {
    // 1..=1000 ms, uniform: p50 = 500 ms, p95 = 950 ms, p99 = 990 ms.
    let mut h = Histogram::default();
    for ms in 1..=1000u64 {
        h.record_us(ms * 1000);
    }
    for (q, want) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
        let got = h.quantile_us(q, 1000, 1_000_000).unwrap() / 1000.0;
        let err = (got - want).abs() / want;
        assert!(
            err < 0.07,
            "p{} = {got:.1} ms, want {want} (error {err:.3})",
            q * 100.0
        );
    }
    assert_eq!(h.quantile_us(0.5, 0, 0), Some(0.0), "clamped to max");
    assert_eq!(Histogram::default().quantile_us(0.5, 0, 0), None);
}

#[test]
fn percentiles_never_leave_the_range_seen() {
    // Every request took 50-52 ms: no estimate may say less than 50 ms,
    // although the bin holding them starts lower.
    let stats = Stats::new(8);
    let e = stats.request_edge("p", "s", "r");
    for ms in [50, 51, 52, 50, 51] {
        stats.record(&e, ok(ms));
    }
    let w = stats.window(secs(60), Instant::now());
    let s = summary(&w, "p", "s", Some("r"));
    for q in [0.0, 0.01, 0.5, 0.95, 0.99, 1.0] {
        let v = s.latency_ms(q).unwrap();
        assert!((50.0..=52.0).contains(&v), "q{q}: {v} ms");
    }
}

#[test]
fn windows_sum_whole_buckets_and_report_their_span() {
    let t0 = Instant::now();
    let stats = Stats::starting_at(8, t0);
    let e = stats.request_edge("p", "s", "r");
    // 10 requests in bucket 0, 20 in bucket 3 (30-40 s), 30 in bucket 9.
    for (at, n) in [(5, 10), (35, 20), (95, 30)] {
        for _ in 0..n {
            stats.record_at(&e, ok(1), t0 + secs(at));
        }
    }
    let now = t0 + secs(97);
    // 10 s window at 97 s: buckets 8 and 9 (80..97 s).
    let w = stats.window(secs(10), now);
    assert_eq!(w.covered, secs(17));
    assert_eq!(summary(&w, "p", "s", Some("r")).counts.requests, 30);
    // 1 min: buckets 3..=9 (30..97 s).
    let w = stats.window(secs(60), now);
    assert_eq!(w.covered, secs(67));
    assert_eq!(summary(&w, "p", "s", Some("r")).counts.requests, 50);
    // 10 min, longer than the uptime: everything since the start.
    let w = stats.window(MAX_WINDOW, now);
    assert_eq!(w.covered, secs(97));
    assert_eq!(summary(&w, "p", "s", Some("r")).counts.requests, 60);
    // A window that is not a multiple of the bucket rounds up.
    let w = stats.window(secs(15), now);
    assert_eq!(w.covered, secs(27));
}

#[test]
fn old_buckets_are_reused_and_forgotten() {
    let t0 = Instant::now();
    let stats = Stats::starting_at(8, t0);
    let e = stats.request_edge("p", "s", "r");
    stats.record_at(&e, failed(1), t0 + secs(1));
    // One ring later the same slot holds a new bucket.
    let later = t0 + secs(1) + BUCKET * SLOTS as u32;
    stats.record_at(&e, ok(1), later);
    let w = stats.window(MAX_WINDOW, later);
    let s = summary(&w, "p", "s", Some("r"));
    assert_eq!((s.counts.requests, s.counts.successes), (1, 1));
    // Nothing in the last 10 minutes: the edge is not listed.
    let w = stats.window(MAX_WINDOW, later + MAX_WINDOW + BUCKET * 2);
    assert!(w.edges.is_empty(), "{:?}", w.edges.len());
}

#[test]
fn success_rate_and_retries_add_up() {
    let stats = Stats::new(8);
    let e = stats.request_edge("p", "s", "r");
    for i in 0..10 {
        stats.record(&e, if i < 8 { ok(1) } else { failed(1) });
    }
    stats.record(
        &e,
        Outcome {
            retries: 2,
            ..ok(3)
        },
    );
    stats.record(
        &e,
        Outcome {
            retries: 1,
            budget_exhausted: true,
            ..failed(3)
        },
    );
    let w = stats.window(secs(60), Instant::now());
    let s = summary(&w, "p", "s", Some("r"));
    assert_eq!(s.counts.requests, 12);
    assert_eq!(s.counts.successes, 9);
    assert_eq!(s.counts.retries, 3);
    assert_eq!(s.counts.retried_requests, 2);
    assert_eq!(s.counts.budget_exhausted, 1);
    assert!((s.success_rate().unwrap() - 9.0 / 12.0).abs() < 1e-9);
}

#[test]
fn connections_count_open_and_opened() {
    let stats = Stats::new(8);
    let a = stats.connection("p", "web");
    let b = stats.connection("p", "web");
    drop(a);
    let w = stats.window(secs(60), Instant::now());
    let s = summary(&w, "p", "web", None);
    assert_eq!((s.counts.open, s.counts.tcp_opened), (1, 2));
    drop(b);
    let w = stats.window(secs(60), Instant::now());
    assert_eq!(summary(&w, "p", "web", None).counts.open, 0);
}

#[test]
fn edges_beyond_the_cap_fold_into_other() {
    let stats = Stats::new(2);
    let a = stats.request_edge("p", "a", "r");
    let b = stats.request_edge("p", "b", "r");
    let c = stats.request_edge("p", "c", "r");
    let d = stats.connection("p", "d");
    for e in [&a, &b, &c] {
        stats.record(e, ok(1));
    }
    // The same key finds the same edge, also when borrowed.
    assert!(Arc::ptr_eq(&a, &stats.request_edge("p", "a", "r")));
    assert_eq!(stats.overflowed(), 2);
    let w = stats.window(secs(60), Instant::now());
    assert_eq!(w.edges.len(), 4, "a, b, other requests, other connections");
    assert_eq!(
        summary(&w, OTHER, OTHER, Some(OTHER)).counts.requests,
        1,
        "c"
    );
    assert_eq!(summary(&w, OTHER, OTHER, None).counts.open, 1, "d");
    drop(d);
}

#[test]
fn idle_edges_make_room_under_the_cap() {
    let t0 = Instant::now();
    let stats = Stats::starting_at(1, t0);
    let a = stats.request_edge("p", "a", "r");
    stats.record_at(&a, ok(1), t0);
    drop(a);
    // Still within the ring: "b" has no room.
    let b = stats.edge(("p", "b", Some("r")), || t0 + secs(60));
    assert_eq!(stats.overflowed(), 1);
    drop(b);
    // Once "a" has been idle for a whole ring it is dropped for "b".
    let later = t0 + BUCKET * (SLOTS as u32 + 2);
    let b = stats.edge(("p", "b", Some("r")), || later);
    stats.record_at(&b, ok(1), later);
    assert_eq!(stats.overflowed(), 1);
    let w = stats.window(secs(60), later);
    assert_eq!(summary(&w, "p", "b", Some("r")).counts.requests, 1);
}

#[test]
fn a_cached_edge_is_revived_until_the_sweep_drops_it() {
    let t0 = Instant::now();
    let stats = Stats::starting_at(1, t0);
    let a = stats.request_edge("p", "a", "r");
    assert!(!stats.is_other(&a));
    let cached = Arc::downgrade(&a);
    drop(a);
    let revived = stats.revive(&cached).expect("still in the table");
    assert!(Arc::ptr_eq(&revived, &stats.request_edge("p", "a", "r")));
    drop(revived);
    // Idle for a whole ring, "a" makes room for "b": the cached handle is
    // dead, and a request for "a" now goes to the overflow edge.
    let later = t0 + BUCKET * (SLOTS as u32 + 2);
    let _b = stats.edge(("p", "b", Some("r")), || later);
    assert!(stats.revive(&cached).is_none());
    assert!(stats.is_other(&stats.request_edge("p", "a", "r")));
}

#[test]
fn windows_parse_within_range() {
    assert_eq!(parse_window("1m"), Ok(secs(60)));
    assert_eq!(parse_window("30s"), Ok(secs(30)));
    assert_eq!(parse_window("10m"), Ok(MAX_WINDOW));
    assert!(parse_window("11m").unwrap_err().contains("out of range"));
    assert!(parse_window("0s").is_err());
    assert!(parse_window("soon").unwrap_err().contains("not a duration"));
}

#[test]
fn backends_are_counted_apart_from_the_edges() {
    let stats = Stats::new(8);
    let e = stats.request_edge("p", "shop", "split");
    let (v1, v2) = (
        stats.backend_edge("shop", "split", "shop-v1"),
        stats.backend_edge("shop", "split", "shop-v2"),
    );
    for i in 0..4 {
        let (backend, outcome) = if i < 3 {
            (&v1, ok(1))
        } else {
            (&v2, failed(1))
        };
        stats.record(&e, outcome);
        stats.record(backend, outcome);
    }
    let now = Instant::now();
    let w = stats.window(secs(60), now);
    assert_eq!(w.edges.len(), 1, "backends stay out of the edges");
    let b = stats.backend_window(secs(60), now);
    let v1 = summary(&b, "shop", "shop-v1", Some("split"));
    let v2 = summary(&b, "shop", "shop-v2", Some("split"));
    assert_eq!((v1.counts.requests, v1.counts.successes), (3, 3));
    assert_eq!((v2.counts.requests, v2.counts.successes), (1, 0));
    // The same key again is the same edge.
    assert!(Arc::ptr_eq(
        &stats.backend_edge("shop", "split", "shop-v1"),
        &stats.backend_edge("shop", "split", "shop-v1")
    ));
}
