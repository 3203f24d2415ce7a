//! The L7 data path in one process (`waymark_agent::in_process`): routes,
//! retries under a budget, timeouts, the balancer's choice and the proxy's
//! own errors, with real HTTP/1.1 servers and clients on loopback. No root,
//! no eBPF: these run in seconds wherever `cargo test` runs. What needs the
//! kernel or namespaces (redirection, the tunnel, enrollment) is tested by
//! the world tests in `tests/`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use waymark_agent::config::Config;
use waymark_agent::in_process::InProcess;

/// What a test server answers a request with.
type Answer = Arc<dyn Fn(&Request<Incoming>, usize) -> (StatusCode, Duration) + Send + Sync>;

/// An HTTP/1.1 server on loopback that answers `name <path>` with the
/// status and delay `answer` gives for the n-th request it receives.
struct Backend {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str, answer: Answer) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                let counter = counter.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let (status, delay) = answer(&req, n);
                    let body = format!("{name} {}\n", req.uri().path());
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Backend { addr, seen, task }
    }

    /// Answers every request 200 at once.
    async fn ok(name: &'static str) -> Backend {
        Backend::start(name, Arc::new(|_, _| (StatusCode::OK, Duration::ZERO))).await
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One answer as the pod sees it.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    proxy_error: Option<String>,
    body: String,
}

/// `GET http://<dst><path>` from the pod, on a new connection.
async fn get(agent: &InProcess, dst: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let dst: SocketAddr = dst.parse().unwrap();
    let stream = agent.connect(dst).await.expect("connecting to the agent");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", dst.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("an answer from the agent");
    let status = resp.status();
    let proxy_error = resp
        .headers()
        .get("l5d-proxy-error")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        proxy_error,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn agent(config: &str) -> InProcess {
    let config = Config::from_toml(config, "test").expect("a valid config");
    InProcess::start(config)
        .await
        .expect("the data path starts")
}

/// The value of a metric line with all of `labels`, 0 when absent.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn routes_pick_backends_by_path_and_header() {
    let (web, api, canary) = (
        Backend::ok("web").await,
        Backend::ok("api").await,
        Backend::ok("canary").await,
    );
    let agent = agent(&format!(
        r#"
[[services]]
name = "web"
addresses = ["10.96.0.1:80"]
protocol = "http1"
endpoints = [{{ addr = "{}" }}]
[[services.routes]]
name = "api"
matches = [{{ path = {{ prefix = "/api" }} }}]
backends = [{{ service = "api" }}]
[[services.routes]]
name = "canary"
matches = [{{ headers = [{{ name = "x-canary", exact = "yes" }}] }}]
backends = [{{ service = "canary" }}]

[[services]]
name = "api"
addresses = ["10.96.0.2:80"]
endpoints = [{{ addr = "{}" }}]
[[services]]
name = "canary"
addresses = ["10.96.0.3:80"]
endpoints = [{{ addr = "{}" }}]
"#,
        web.addr, api.addr, canary.addr
    ))
    .await;
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 5] = [
        ("/", &[], "web /\n"),
        ("/api/users", &[], "api /api/users\n"),
        // Prefixes match whole path segments.
        ("/apix", &[], "web /apix\n"),
        ("/x", &[("x-canary", "yes")], "canary /x\n"),
        // A path match outranks a header-only match (Gateway API order).
        ("/api", &[("x-canary", "yes")], "api /api\n"),
    ];
    for (path, headers, want) in cases {
        let got = get(&agent, "10.96.0.1:80", path, headers).await;
        assert_eq!(got.status, StatusCode::OK, "{path} {headers:?}: {got:?}");
        assert_eq!(got.body, want, "{path} {headers:?}");
    }
}

#[tokio::test]
async fn a_retry_hides_a_failed_attempt_and_the_budget_caps_an_outage() {
    // Fails every other request: every request that fails once succeeds
    // on its retry.
    let flaky = Backend::start(
        "flaky",
        Arc::new(|_, n| {
            let status = if n % 2 == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (status, Duration::ZERO)
        }),
    )
    .await;
    let down = Backend::start(
        "down",
        Arc::new(|_, _| (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)),
    )
    .await;
    let agent = agent(&format!(
        r#"
[[services]]
name = "flaky"
addresses = ["10.96.0.10:80"]
endpoints = [{{ addr = "{}" }}]
retry_budget = {{ ratio = 1.0, min_per_second = 10, ttl = "10s" }}
[[services.routes]]
name = "all"
retry = {{ attempts = 2, on = ["5xx"], backoff_base = "1ms", backoff_max = "2ms" }}

[[services]]
name = "down"
addresses = ["10.96.0.11:80"]
endpoints = [{{ addr = "{}" }}]
retry_budget = {{ ratio = 0.2, min_per_second = 1, ttl = "10s" }}
[[services.routes]]
name = "all"
retry = {{ attempts = 2, on = ["5xx"], backoff_base = "1ms", backoff_max = "2ms" }}
"#,
        flaky.addr, down.addr
    ))
    .await;
    for i in 0..20 {
        let got = get(&agent, "10.96.0.10:80", "/", &[]).await;
        assert_eq!(got.status, StatusCode::OK, "request {i}: {got:?}");
    }
    assert_eq!(flaky.seen(), 40, "each request took exactly one retry");

    // A full outage: every answer is the application's 503 (not the
    // proxy's), and the budget lets through at most its ratio of the
    // requests plus its reserve (1/s for 10 s) in retries.
    const N: usize = 50;
    for i in 0..N {
        let got = get(&agent, "10.96.0.11:80", "/", &[]).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "request {i}");
        assert_eq!(got.proxy_error, None, "the 503 is the application's");
    }
    let retries = down.seen() - N;
    let cap = (0.2 * N as f64 + 10.0) as usize;
    assert!(
        retries > 0 && retries <= cap,
        "{retries} retries for {N} requests to a service that is down; the budget allows {cap}"
    );
}

#[tokio::test]
async fn timeouts_end_in_the_proxys_504_and_a_per_try_timeout_retries() {
    // The first attempt of each request hangs for longer than the per-try
    // timeout; the second answers at once.
    let slow_first = Backend::start(
        "slow-first",
        Arc::new(|_, n| {
            let delay = if n % 2 == 0 {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            };
            (StatusCode::OK, delay)
        }),
    )
    .await;
    let hung = Backend::start(
        "hung",
        Arc::new(|_, _| (StatusCode::OK, Duration::from_secs(30))),
    )
    .await;
    let agent = agent(&format!(
        r#"
[[services]]
name = "per-try"
addresses = ["10.96.0.20:80"]
endpoints = [{{ addr = "{}" }}]
retry_budget = {{ ratio = 1.0, min_per_second = 10, ttl = "10s" }}
[[services.routes]]
name = "all"
per_try_timeout = "150ms"
retry = {{ attempts = 2, on = ["gateway-error"], backoff_base = "1ms", backoff_max = "2ms" }}

[[services]]
name = "hung"
addresses = ["10.96.0.21:80"]
endpoints = [{{ addr = "{}" }}]
[[services.routes]]
name = "all"
timeout = "200ms"
"#,
        slow_first.addr, hung.addr
    ))
    .await;
    let got = get(&agent, "10.96.0.20:80", "/p", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body, "slow-first /p\n");
    assert_eq!(slow_first.seen(), 2, "one timed-out attempt and its retry");

    let got = get(&agent, "10.96.0.21:80", "/", &[]).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{got:?}");
    assert_eq!(got.proxy_error.as_deref(), Some("request timed out"));
    let text = agent.metrics();
    assert_eq!(
        metric(
            &text,
            "response_total",
            &["status_code=\"504\"", "service=\"hung\""]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn the_proxys_own_errors_say_so() {
    // A port nothing listens on: bound, then closed.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let agent = agent(&format!(
        r#"
[[services]]
name = "empty"
addresses = ["10.96.0.30:80"]
protocol = "http1"
endpoints = []

[[services]]
name = "refusing"
addresses = ["10.96.0.31:80"]
protocol = "http1"
endpoints = [{{ addr = "{refused}" }}]
"#
    ))
    .await;
    let got = get(&agent, "10.96.0.30:80", "/", &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    assert_eq!(
        got.proxy_error.as_deref(),
        Some("no endpoints available"),
        "{got:?}"
    );
    assert!(got.body.contains("service empty"), "{got:?}");
    // Answered by the proxy, with what it tried in the body.
    let got = get(&agent, "10.96.0.31:80", "/", &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    assert_eq!(
        got.proxy_error.as_deref(),
        Some("connection to the endpoint failed"),
        "{got:?}"
    );
    assert!(
        got.body
            .contains(&format!("connection refused by {refused}")),
        "{got:?}"
    );
}

#[tokio::test]
async fn the_balancer_spreads_requests_and_avoids_a_failing_endpoint() {
    let (a, b, c) = (
        Backend::ok("a").await,
        Backend::ok("b").await,
        Backend::start(
            "c",
            Arc::new(|_, _| (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)),
        )
        .await,
    );
    let agent = agent(&format!(
        r#"
[[services]]
name = "spread"
addresses = ["10.96.0.40:80"]
protocol = "http1"
endpoints = [{{ addr = "{}" }}, {{ addr = "{}" }}]

[[services]]
name = "one-failing"
addresses = ["10.96.0.41:80"]
protocol = "http1"
endpoints = [{{ addr = "{}" }}, {{ addr = "{}" }}]
retry_budget = {{ ratio = 1.0, min_per_second = 100, ttl = "10s" }}
[[services.routes]]
name = "all"
retry = {{ attempts = 2, on = ["5xx"], backoff_base = "1ms", backoff_max = "2ms" }}
"#,
        a.addr, b.addr, a.addr, c.addr
    ))
    .await;
    for _ in 0..100 {
        let got = get(&agent, "10.96.0.40:80", "/", &[]).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    assert!(
        a.seen() > 0 && b.seen() > 0,
        "one endpoint got every request: a {} b {}",
        a.seen(),
        b.seen()
    );
    let before = a.seen();
    for i in 0..50 {
        let got = get(&agent, "10.96.0.41:80", "/", &[]).await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "request {i}: the retry goes elsewhere"
        );
    }
    assert_eq!(a.seen() - before, 50, "every request was answered by a");
}
