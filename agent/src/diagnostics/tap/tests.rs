use http_body_util::BodyExt;

use super::*;
use crate::http::body::full;

fn hub() -> Arc<TapHub> {
    Arc::new(TapHub::new(&mut Registry::default()))
}

fn filter(q: &str) -> Filter {
    Filter::from_query(q, &Pods::default()).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One request through the three hooks, as forward.rs calls them.
async fn run(
    hub: &TapHub,
    pod: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    status: u16,
    body: &'static str,
) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(()).unwrap();
    let tap = hub.request(
        pod,
        addr("10.1.0.2:40000"),
        addr("10.96.0.10:80"),
        Some("web"),
        &mut req,
    );
    dispatched(
        req.extensions(),
        "web",
        addr("10.2.0.2:8080"),
        None,
        TLS_NONE,
    );
    let mut resp = http::Response::new(full(body));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    let resp = response(tap, resp);
    drop(req);
    resp.into_body().collect().await.unwrap();
}

/// Everything the stream has now, without waiting; `None` once it ended.
async fn drain(stream: &mut TapStream) -> (Vec<Event>, bool) {
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(50), stream.frame()).await;
        match next {
            Err(_) => return (out, false),
            Ok(None) => return (out, true),
            Ok(Some(frame)) => {
                let data = frame.unwrap().into_data().unwrap();
                let text = std::str::from_utf8(&data).unwrap();
                assert!(text.ends_with('\n'));
                out.push(serde_json::from_str(text).unwrap());
            }
        }
    }
}

fn kinds(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Req { path, .. } => format!("req {path}"),
            Event::Rsp { status, .. } => format!("rsp {status}"),
            Event::End { response_bytes, .. } => format!("end {response_bytes}"),
            Event::Tcp { close, .. } => format!("tcp {close}"),
            Event::Dropped { count } => format!("dropped {count}"),
        })
        .collect()
}

#[tokio::test]
async fn nothing_is_built_while_no_tap_is_open() {
    let hub = hub();
    let mut req = http::Request::new(());
    assert!(
        hub.request(
            "p",
            addr("10.1.0.2:1"),
            addr("10.96.0.1:80"),
            None,
            &mut req
        )
        .is_none()
    );
    assert!(req.extensions().get::<Arc<TapRequest>>().is_none());
    let stream = hub.open(Filter::default()).unwrap();
    assert_eq!(hub.open_taps(), 1);
    drop(stream);
    assert_eq!(hub.open_taps(), 0);
    assert_eq!(hub.streams.get(), 0);
}

#[tokio::test]
async fn a_request_is_req_rsp_end_with_its_facts() {
    let hub = hub();
    let mut stream = hub.open(filter("path=/a")).unwrap();
    run(
        &hub,
        "default/web-1",
        "GET",
        "/a?x=1",
        &[
            ("authorization", "Bearer s3cr3t"),
            ("cookie", "sid=abc"),
            ("x-app", "yes"),
        ],
        200,
        "hello",
    )
    .await;
    run(&hub, "default/web-1", "GET", "/b", &[], 200, "").await;
    let (events, ended) = drain(&mut stream).await;
    assert!(!ended);
    // Query values are redacted by default (`diagnostics.tap_redact_query`).
    assert_eq!(kinds(&events), ["req /a?x=<redacted>", "rsp 200", "end 5"]);
    let Event::Req {
        meta,
        method,
        authority,
        headers,
        ..
    } = &events[0]
    else {
        unreachable!()
    };
    assert_eq!(method, "GET");
    assert_eq!(authority.as_deref(), Some("web.test"));
    assert_eq!(meta.src.pod.as_deref(), Some("default/web-1"));
    assert_eq!(meta.dst.addr, addr("10.2.0.2:8080"));
    assert_eq!(meta.dst.dialled, addr("10.96.0.10:80"));
    assert_eq!(meta.dst.service.as_deref(), Some("web"));
    let h = |n: &str| {
        headers
            .iter()
            .find(|h| h.name == n)
            .map(|h| h.value.as_str())
    };
    assert_eq!(h("authorization"), Some("Bearer <redacted>"));
    assert_eq!(h("cookie"), Some("<redacted>"));
    assert_eq!(h("x-app"), Some("yes"));
    // Every event of the request carries the same id.
    let ids: Vec<u64> = events
        .iter()
        .map(|e| match e {
            Event::Req { meta, .. } | Event::Rsp { meta, .. } | Event::End { meta, .. } => meta.id,
            Event::Tcp { .. } | Event::Dropped { .. } => u64::MAX,
        })
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
}

#[tokio::test]
async fn status_filter_shows_only_matching_responses() {
    let hub = hub();
    let mut stream = hub.open(filter("status=5xx")).unwrap();
    for (path, status) in [
        ("/ok", 200),
        ("/bad", 503),
        ("/missing", 404),
        ("/err", 500),
    ] {
        run(&hub, "p", "GET", path, &[], status, "x").await;
    }
    let (events, _) = drain(&mut stream).await;
    assert_eq!(
        kinds(&events),
        [
            "req /bad", "rsp 503", "end 1", "req /err", "rsp 500", "end 1"
        ]
    );
}

#[tokio::test]
async fn destination_filter_is_decided_at_the_pick() {
    let hub = hub();
    let mut by_addr = hub.open(filter("to=10.2.0.2:8080")).unwrap();
    let mut other = hub.open(filter("to=10.2.0.3")).unwrap();
    run(&hub, "p", "GET", "/", &[], 200, "").await;
    assert_eq!(drain(&mut by_addr).await.0.len(), 3);
    assert_eq!(drain(&mut other).await.0.len(), 0);
}

#[tokio::test]
async fn sample_limit_ends_the_stream() {
    let hub = hub();
    let mut stream = hub.open(filter("max=2")).unwrap();
    for i in 0..5 {
        run(&hub, "p", "GET", &format!("/{i}"), &[], 200, "").await;
    }
    let (events, ended) = drain(&mut stream).await;
    assert!(ended, "the stream goes on after max: {:?}", kinds(&events));
    assert_eq!(
        kinds(&events),
        ["req /0", "rsp 200", "end 0", "req /1", "rsp 200", "end 0"]
    );
    assert_eq!(hub.open_taps(), 0);
}

#[tokio::test]
async fn duration_ends_the_stream() {
    let hub = hub();
    let mut stream = hub.open(filter("duration=50ms")).unwrap();
    let t = Instant::now();
    while stream.frame().await.is_some() {}
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(hub.open_taps(), 0);
}

#[tokio::test]
async fn a_slow_consumer_loses_events_and_is_told() {
    let hub = hub();
    let mut stream = hub.open(Filter::default()).unwrap();
    let n = 1000;
    for _ in 0..n {
        run(&hub, "p", "GET", "/", &[], 200, "").await;
    }
    let (events, _) = drain(&mut stream).await;
    let lost = (3 * n - CHANNEL_EVENTS) as u64;
    assert_eq!(events.len(), CHANNEL_EVENTS + 1);
    assert_eq!(events[0], Event::Dropped { count: lost });
    assert_eq!(hub.dropped.get(), lost);
    // Caught up: nothing more is lost.
    run(&hub, "p", "GET", "/", &[], 200, "").await;
    assert_eq!(drain(&mut stream).await.0.len(), 3);
}

#[tokio::test]
async fn a_request_dropped_midway_still_ends() {
    let hub = hub();
    let mut stream = hub.open(Filter::default()).unwrap();
    let mut req = http::Request::new(());
    let tap = hub.request(
        "p",
        addr("10.1.0.2:1"),
        addr("10.96.0.1:80"),
        None,
        &mut req,
    );
    dispatched(
        req.extensions(),
        "web",
        addr("10.2.0.2:8080"),
        None,
        TLS_NONE,
    );
    drop(tap);
    drop(req);
    let (events, _) = drain(&mut stream).await;
    assert_eq!(kinds(&events), ["req /", "end 0"]);
    let Event::End { error, .. } = &events[1] else {
        unreachable!()
    };
    assert!(error.as_deref().unwrap().contains("cancelled"));
}

#[tokio::test]
async fn proxy_errors_are_named() {
    let hub = hub();
    let mut stream = hub.open(Filter::default()).unwrap();
    let mut req = http::Request::new(());
    let tap = hub.request(
        "p",
        addr("10.1.0.2:1"),
        addr("10.96.0.1:80"),
        Some("web"),
        &mut req,
    );
    routed(req.extensions(), "web-v2");
    let resp = crate::http::errors::response(
        crate::http::errors::ProxyError::NoEndpoints,
        "node",
        "web",
        None,
        false,
    );
    response(tap, resp).into_body().collect().await.unwrap();
    let (events, _) = drain(&mut stream).await;
    let Event::Rsp {
        status,
        source,
        reason,
        ..
    } = &events[1]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (*status, source.as_deref(), reason.as_deref()),
        (503, Some("proxy"), Some("no_endpoints"))
    );
    let Event::End {
        meta,
        error,
        source,
        reason,
        ..
    } = &events[2]
    else {
        panic!("{events:?}")
    };
    assert_eq!(error.as_deref(), Some("no endpoints available"));
    assert_eq!(
        (source.as_deref(), reason.as_deref()),
        (Some("proxy"), Some("no_endpoints"))
    );
    // No endpoint was picked: the destination is what was dialled, and
    // the backend the route chose (the one without endpoints) is named.
    assert_eq!(meta.dst.addr, addr("10.96.0.1:80"));
    assert_eq!(meta.dst.backend.as_deref(), Some("web-v2"));
    assert!(
        events[1]
            .render(false)
            .contains(":status=503 source=proxy reason=no_endpoints "),
        "{events:?}"
    );
}

/// An application's 503 is the application's, even when it sends the
/// proxy's header itself: only the proxy's decision makes `source=proxy`.
#[tokio::test]
async fn an_application_status_is_the_apps_and_the_pod_is_named() {
    let hub = hub();
    let mut stream = hub.open(Filter::default()).unwrap();
    let mut req = http::Request::new(());
    let tap = hub.request(
        "p",
        addr("10.1.0.2:1"),
        addr("10.96.0.1:80"),
        Some("web"),
        &mut req,
    );
    dispatched(
        req.extensions(),
        "web",
        addr("10.2.0.2:8080"),
        Some("default/web-1"),
        TLS_NONE,
    );
    let mut resp = http::Response::new(full("down\n"));
    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        crate::http::errors::WAYMARK_HEADER,
        http::HeaderValue::from_static("no endpoints available"),
    );
    response(tap, resp).into_body().collect().await.unwrap();
    drop(req);
    let (events, _) = drain(&mut stream).await;
    assert_eq!(kinds(&events), ["req /", "rsp 503", "end 5"]);
    for e in &events[1..] {
        let (Event::Rsp {
            source,
            reason,
            meta,
            ..
        }
        | Event::End {
            source,
            reason,
            meta,
            ..
        }) = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (source.as_deref(), reason.as_deref()),
            (Some("app"), None),
            "{e:?}"
        );
        assert_eq!(meta.dst.pod.as_deref(), Some("default/web-1"));
    }
    let Event::End { error, .. } = &events[2] else {
        unreachable!()
    };
    assert_eq!(error, &None);
    assert!(events[1].render(true).contains(" dst_pod=default/web-1"));
}

#[tokio::test]
async fn too_many_taps_are_refused() {
    let hub = hub();
    let streams: Vec<_> = (0..MAX_TAPS)
        .map(|_| hub.open(Filter::default()).unwrap())
        .collect();
    assert!(hub.open(Filter::default()).is_err());
    drop(streams);
    assert!(hub.open(Filter::default()).is_ok());
}

#[tokio::test]
async fn a_redirected_source_is_shown_with_the_pods_address() {
    let hub = hub();
    hub.set_pods(Pods(vec![(
        "default/web-1".into(),
        vec!["fd00:1::2".parse().unwrap(), "10.1.0.2".parse().unwrap()],
    )]));
    let mut stream = hub.open(filter("from=10.1.0.2")).unwrap();
    let mut req = http::Request::new(());
    let tap = hub.request(
        "default/web-1",
        addr("127.0.0.1:41324"),
        addr("10.96.0.1:80"),
        None,
        &mut req,
    );
    assert!(tap.is_some());
    drop((tap, req));
    let (events, _) = drain(&mut stream).await;
    let Event::Req { meta, .. } = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(meta.src.addr, addr("10.1.0.2:41324"));
    // Another pod's connection from loopback keeps its address.
    assert_eq!(
        hub.shown_source("default/other", addr("127.0.0.1:1")),
        addr("127.0.0.1:1")
    );
}

#[tokio::test]
async fn opaque_connections_are_one_tcp_event() {
    let hub = hub();
    let mut all = hub.open(filter("max=1")).unwrap();
    let mut http_only = hub.open(filter("path=/")).unwrap();
    let mut called = false;
    hub.tcp_closed(|| {
        called = true;
        TcpClosed {
            pod: "p",
            src: addr("10.1.0.2:5000"),
            dst: addr("10.2.0.2:7000"),
            duration: Duration::from_millis(2),
            bytes_out: 10,
            bytes_in: 20,
            close: "eof",
            error: None,
            proxy: None,
        }
    });
    assert!(called);
    let (events, ended) = drain(&mut all).await;
    assert_eq!(kinds(&events), ["tcp eof"]);
    assert!(ended, "max=1 counts the connection");
    assert!(drain(&mut http_only).await.0.is_empty());
    drop(http_only);
    // With no tap open the connection is not even looked at.
    hub.tcp_closed(|| unreachable!("built while no tap is open"));
}

/// A response the retry loop marked (one retry, then the budget refused
/// the next) says so on its `rsp`.
#[tokio::test]
async fn retries_and_an_exhausted_budget_show_on_the_response() {
    let hub = hub();
    let mut stream = hub.open(Filter::default()).unwrap();
    let mut req = http::Request::new(());
    let tap = hub.request(
        "p",
        addr("10.1.0.2:1"),
        addr("10.96.0.1:80"),
        Some("web"),
        &mut req,
    );
    dispatched(
        req.extensions(),
        "web",
        addr("10.2.0.2:8080"),
        None,
        TLS_NONE,
    );
    let mut resp = http::Response::new(full("no\n"));
    *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    let resp = crate::telemetry::http_metrics::retried(resp, 1, true);
    response(tap, resp).into_body().collect().await.unwrap();
    drop(req);
    let (events, _) = drain(&mut stream).await;
    let Event::Rsp {
        retries,
        retry_budget_exhausted,
        source,
        ..
    } = &events[1]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (*retries, *retry_budget_exhausted, source.as_deref()),
        (1, true, Some("app"))
    );
    assert!(
        events[1]
            .render(false)
            .contains(":status=500 source=app retries=1 retry_budget=exhausted latency="),
        "{events:?}"
    );
}
