//! `waymark trace URL --pod POD`: sends a diagnostic trace request (`TRACE`
//! with `l5d-add-context: true` unless told otherwise) as if from a pod and
//! prints the answer: the status, the headers and the body, where every
//! agent the request crossed appended its block (service, route, endpoints,
//! the address the balancer selected, retries).
//!
//! # How the request is sent, and why this way
//!
//! The request must take the path production traffic takes, so the CLI
//! *becomes* a process of the pod for the one request: it moves itself into
//! the pod's cgroup (so the redirect programs attached to the node's pods
//! cgroup see its `connect()`), enters the pod's network namespace (so the
//! socket has the pod's address and the kernel hands it to the agent's
//! listener in that namespace), and then makes an ordinary HTTP request.
//! Everything after that is production code unchanged: the eBPF redirect and
//! its original-destination record, the pod's listener, protocol detection,
//! attribution to the pod, routing, balancing, retries, metrics.
//!
//! The other way, an admin endpoint that runs the request through the
//! agent's HTTP engine on the pod's behalf, was not taken: it would skip
//! the kernel redirect, the listener and detection, which are exactly the
//! parts an operator suspects when traffic does not arrive; a green trace
//! would then prove less than it seems. The price of the chosen way: it
//! needs root on the node (as the agent does), it runs on the pod's node,
//! and the CLI process stays in the pod's cgroup for the second it lives
//! (it is counted against the pod's limits meanwhile).
//!
//! Which cgroup: the one a process of the pod is in (found by the pod's
//! network namespace under `/proc`), else the cgroup the redirect programs
//! are attached to (`redirect.cgroup`), else `--cgroup`. Host names resolve
//! with the node's resolver: give a service's address or a name the node
//! resolves.
//!
//! `--node` sends the same request from the node instead: not redirected,
//! not proxied, for comparison.

use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::client::{AdminClient, block_on};
use crate::telemetry::conns::OutboundLimits;
use crate::telemetry::trace::ADD_CONTEXT_HEADERS;

/// Most of a response body printed; the rest is counted.
const MAX_BODY: usize = 1024 * 1024;

#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("origin").required(true).args(["pod", "node"])))]
pub struct TraceArgs {
    /// `http://HOST[:PORT]/PATH`: a service address as the pod would dial it.
    url: String,
    /// Send from this pod of the node (`namespace/name`, or just `name`).
    #[arg(long)]
    pod: Option<String>,
    /// Send from the node itself: no redirect, no proxy (to compare).
    #[arg(long)]
    node: bool,
    /// The method.
    #[arg(short = 'X', long = "request", default_value = "TRACE")]
    method: String,
    /// More request headers, `-H 'name: value'`.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The pod's cgroup, when the CLI cannot find it.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How long to wait for the whole answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// The request to make, parsed from the arguments.
#[derive(Debug)]
struct Plan {
    method: Method,
    /// What the connection dials: host and port as given.
    host: String,
    port: u16,
    authority: String,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

fn plan(args: &TraceArgs) -> Result<Plan> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("{:?} is not a URL", args.url))?;
    match uri.scheme_str() {
        Some("http") | None => {}
        Some(s) => bail!(
            "only http:// URLs can be traced (the agent sees inside plaintext HTTP only), not {s}://"
        ),
    }
    let authority = uri
        .authority()
        .with_context(|| format!("{:?} has no host", args.url))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let method = Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("{:?} is not an HTTP method", args.method))?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not `name: value`"))?;
        headers.push((
            HeaderName::from_bytes(k.trim().as_bytes())
                .with_context(|| format!("bad header name in {h:?}"))?,
            HeaderValue::from_str(v.trim())
                .with_context(|| format!("bad header value in {h:?}"))?,
        ));
    }
    if !headers
        .iter()
        .any(|(k, _)| ADD_CONTEXT_HEADERS.contains(&k.as_str()))
    {
        headers.push((
            HeaderName::from_static(ADD_CONTEXT_HEADERS[0]),
            HeaderValue::from_static("true"),
        ));
    }
    Ok(Plan {
        method,
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        headers,
    })
}

/// Where the request is sent from.
struct Origin {
    description: String,
    /// The pod, and its agent's connection limits (`outbound.*`; 0: none
    /// or derived), to explain a connection the agent refused.
    pod: Option<(String, OutboundLimits)>,
}

pub fn run(client: &AdminClient, args: TraceArgs) -> Result<()> {
    let plan = plan(&args)?;
    let origin = match &args.pod {
        Some(pod) => enter_pod(client, pod, args.cgroup.as_deref())?,
        None => Origin {
            description: "the node (not redirected, not proxied)".into(),
            pod: None,
        },
    };
    let timeout = args.timeout;
    let pod = origin.pod.clone();
    let text = block_on(async move {
        tokio::time::timeout(timeout, send(&plan, &origin))
            .await
            .unwrap_or_else(|_| bail!("no complete answer within {timeout:?}"))
    });
    let text = match (text, pod) {
        (Err(e), Some((pod, limits))) => match refused_at_a_limit(client, &pod, limits) {
            Some(why) => return Err(e.context(why)),
            None => return Err(e),
        },
        (text, _) => text?,
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// Makes the request and renders what came back.
async fn send(plan: &Plan, origin: &Origin) -> Result<String> {
    let target: SocketAddr = (plan.host.as_str(), plan.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", plan.host))?
        .next()
        .with_context(|| format!("{} has no address", plan.host))?;
    let start = Instant::now();
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("cannot connect to {target} from {}", origin.description))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(plan.method.clone())
        .uri(plan.path.as_str())
        .header(HOST, plan.authority.as_str())
        .header(
            "user-agent",
            concat!("waymark-trace/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &plan.headers {
        req = req.header(k, v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .context("cannot build the request")?;
    let rsp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{} {target} failed", plan.method))?;
    let head_after = start.elapsed();
    let (parts, mut body) = rsp.into_parts();
    let mut bytes = Vec::new();
    let mut more = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the response body broke off")?;
        if let Ok(d) = frame.into_data() {
            let room = MAX_BODY.saturating_sub(bytes.len());
            bytes.extend_from_slice(&d[..d.len().min(room)]);
            more += d.len().saturating_sub(room);
        }
    }
    let mut s = format!(
        "# {} http://{}{} to {target} from {}: head after {:.1} ms, done after {:.1} ms\n",
        plan.method,
        plan.authority,
        plan.path,
        origin.description,
        head_after.as_secs_f64() * 1000.0,
        start.elapsed().as_secs_f64() * 1000.0,
    );
    s.push_str(&format!("{:?} {}\n", parts.version, parts.status));
    for (k, v) in &parts.headers {
        s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    s.push('\n');
    s.push_str(&String::from_utf8_lossy(&bytes));
    if more > 0 {
        s.push_str(&format!("\n[{more} more bytes not shown]\n"));
    }
    Ok(s)
}

/// The pod as the agent's config names it.
#[derive(Debug, PartialEq)]
struct PodEntry {
    name: String,
    netns: PathBuf,
    ips: Vec<String>,
}

/// Finds `pod` (by `namespace/name`, or by `name` when only one pod has it)
/// in the agent's `/config`, with the node's name and `redirect.cgroup`.
fn find_pod(config: &serde_json::Value, pod: &str) -> Result<(PodEntry, String, Option<PathBuf>)> {
    let pods = config["pods"].as_array().cloned().unwrap_or_default();
    let entries: Vec<PodEntry> = pods
        .iter()
        .filter_map(|p| {
            Some(PodEntry {
                name: p["name"].as_str()?.to_string(),
                netns: PathBuf::from(p["netns"].as_str()?),
                ips: p["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|ip| ip.as_str().map(str::to_string))
                    .collect(),
            })
        })
        .collect();
    let mut found: Vec<PodEntry> = Vec::new();
    for e in entries {
        if e.name == pod || e.name.rsplit('/').next() == Some(pod) {
            found.push(e);
        }
    }
    let names = || {
        pods.iter()
            .filter_map(|p| p["name"].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match found.len() {
        0 => bail!(
            "no pod {pod:?} on this node's agent; its pods: {}",
            if pods.is_empty() {
                "none".to_string()
            } else {
                names()
            }
        ),
        1 => found.remove(0),
        _ => bail!(
            "{pod:?} names more than one pod ({}); give namespace/name",
            names()
        ),
    };
    let node = config["node"]["name"].as_str().unwrap_or("?").to_string();
    let cgroup = config["redirect"]["cgroup"].as_str().map(PathBuf::from);
    Ok((entry, node, cgroup))
}

/// Puts this process in the pod's cgroup and this thread in its network
/// namespace. The admin API (on the node's loopback) is asked first: once
/// inside, it is out of reach.
fn enter_pod(client: &AdminClient, pod: &str, cgroup: Option<&Path>) -> Result<Origin> {
    let config: serde_json::Value = block_on(client.get_json("/config"))?;
    let (entry, node, attach) = find_pod(&config, pod)?;
    let mount = crate::app::cgroup2_mount()?;
    let attach = attach.map(|a| if a.is_absolute() { a } else { mount.join(a) });
    let cgroup = match cgroup {
        Some(c) => c.to_path_buf(),
        None => pod_cgroup(&entry.netns, &mount, attach.as_deref())?
            .or(attach.clone())
            .context("the agent's redirect.cgroup is not set, so its programs redirect nothing: a request from the pod would not reach the agent")?,
    };
    if let Some(a) = &attach {
        ensure!(
            cgroup.starts_with(a),
            "{} is not below {}, where the agent's redirect programs are attached: the request would not be redirected",
            cgroup.display(),
            a.display()
        );
    }
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, format!("{}\n", std::process::id())).with_context(|| {
        format!(
            "cannot join the cgroup {} (run as root on the pod's node; where a cgroup with processes below it cannot take more, give the pod's own cgroup with --cgroup)",
            cgroup.display()
        )
    })?;
    let netns = File::open(&entry.netns)
        .with_context(|| format!("cannot open the pod's netns {}", entry.netns.display()))?;
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| {
        format!(
            "cannot enter the pod's netns {} (run as root on the pod's node)",
            entry.netns.display()
        )
    })?;
    let limit = |key: &str| config["outbound"][key].as_u64().unwrap_or(0) as usize;
    let limits = OutboundLimits {
        per_pod: limit("max_connections_per_pod"),
        total: limit("max_connections"),
    };
    Ok(Origin {
        description: format!(
            "pod {} ({}) through {node}'s agent (cgroup {})",
            entry.name,
            entry.ips.join(", "),
            cgroup.display()
        ),
        pod: Some((entry.name, limits)),
    })
}

/// A connection over a pod's connection limit is refused by the kernel at
/// `connect()` (or, in a race, reset by the agent at accept), before a
/// byte of HTTP, so no hop can append a block saying why;
/// the CLI asks the agent's connection table (the admin socket is a path,
/// reachable from inside the pod's network namespace) whether the pod, or
/// the agent, is at its limit.
fn refused_at_a_limit(client: &AdminClient, pod: &str, limits: OutboundLimits) -> Option<String> {
    let report: crate::telemetry::conns::ConnsReport = block_on(client.get_json(&format!(
        "/conns?pod={}&direction=out",
        crate::http::query::encode(pod)
    )))
    .ok()?;
    // The agent's own figures: unset limits are derived at start (from the
    // open-files limit), which the config does not show.
    let limits = report.limits.unwrap_or(limits);
    // The kernel refuses at connect() by its own count of the pod's
    // sockets, which can run ahead of the agent's connections.
    let kernel = report.pod_sockets.unwrap_or_default();
    let pod_open = kernel
        .get(pod)
        .map_or(0, |n| usize::try_from(*n).unwrap_or(0))
        .max(report.connections.len());
    let agent_open = kernel
        .values()
        .map(|n| usize::try_from(*n).unwrap_or(0))
        .sum::<usize>()
        .max(report.open);
    limit_verdict(pod, limits, pod_open, agent_open)
}

/// What to say when the pod holds `pod_open` connections and the agent
/// `agent_open`, under `limits`.
fn limit_verdict(
    pod: &str,
    limits: OutboundLimits,
    pod_open: usize,
    agent_open: usize,
) -> Option<String> {
    if limits.per_pod > 0 && pod_open >= limits.per_pod {
        return Some(format!(
            "source=proxy reason=limit: pod {pod} holds {pod_open} connections through the agent and outbound.max_connections_per_pod is {}; new ones are refused at connect() (ECONNREFUSED) (`waymark conns --pod {pod}` lists them)",
            limits.per_pod
        ));
    }
    if limits.total > 0 && agent_open >= limits.total {
        return Some(format!(
            "source=proxy reason=limit: the agent holds {agent_open} connections and outbound.max_connections is {}; new ones are refused at connect() (ECONNREFUSED) (`waymark conns` lists them)",
            limits.total
        ));
    }
    None
}

/// The cgroup of a process in the pod's network namespace, below `attach`.
fn pod_cgroup(netns: &Path, mount: &Path, attach: Option<&Path>) -> Result<Option<PathBuf>> {
    let md = std::fs::metadata(netns)
        .with_context(|| format!("the pod's netns {} is not there", netns.display()))?;
    let (dev, ino) = (md.dev(), md.ino());
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Ok(None);
    };
    for e in dir.flatten() {
        let pid = e.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if ns.dev() != dev || ns.ino() != ino {
            continue;
        }
        let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(rel) = cg.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        let path = mount.join(rel.trim_start_matches('/'));
        if attach.is_none_or(|a| path.starts_with(a)) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_at_its_connection_limit_is_named() {
        let limits = OutboundLimits {
            per_pod: 2,
            total: 0,
        };
        let why = limit_verdict("default/web-1", limits, 2, 7).unwrap();
        assert!(
            why.starts_with("source=proxy reason=limit: pod default/web-1 holds 2 connections")
                && why.contains("outbound.max_connections_per_pod is 2"),
            "{why}"
        );
        assert_eq!(limit_verdict("default/web-1", limits, 1, 7), None);
        let total = OutboundLimits {
            per_pod: 0,
            total: 7,
        };
        assert!(
            limit_verdict("default/web-1", total, 1, 7)
                .unwrap()
                .contains("outbound.max_connections is 7")
        );
        // 0 is no limit (or one derived from the open-files limit, which
        // the config does not show): nothing to blame.
        let none = OutboundLimits {
            per_pod: 0,
            total: 0,
        };
        assert_eq!(limit_verdict("default/web-1", none, 100, 100), None);
    }

    fn args(argv: &[&str]) -> Result<TraceArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: TraceArgs,
        }
        let mut v = vec!["trace"];
        v.extend_from_slice(argv);
        <P as clap::Parser>::try_parse_from(v).map(|p| p.a)
    }

    #[test]
    fn trace_by_default_with_the_context_header() {
        let p = plan(&args(&["http://10.96.0.10/hello?x=1", "--pod", "web"]).unwrap()).unwrap();
        assert_eq!(p.method, Method::TRACE);
        assert_eq!((p.host.as_str(), p.port), ("10.96.0.10", 80));
        assert_eq!(p.authority, "10.96.0.10");
        assert_eq!(p.path, "/hello?x=1");
        assert_eq!(p.headers.len(), 1);
        assert_eq!(p.headers[0].0, "l5d-add-context");
    }

    #[test]
    fn method_headers_and_ports() {
        let a = args(&[
            "http://[fd00::1]:8080",
            "--node",
            "-X",
            "get",
            "-H",
            "x-a: 1",
            "-H",
            "waymark-add-context: true",
        ])
        .unwrap();
        let p = plan(&a).unwrap();
        assert_eq!(p.method, Method::GET);
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", 8080));
        assert_eq!(p.path, "/");
        // The caller's own add-context header is not doubled.
        assert_eq!(p.headers.len(), 2);
        let bad = args(&["https://x/", "--node"]).unwrap();
        assert!(plan(&bad).unwrap_err().to_string().contains("only http://"));
        let bad = args(&["http://x/", "--node", "-H", "nocolon"]).unwrap();
        assert!(plan(&bad).is_err());
    }

    #[test]
    fn pod_or_node_is_required_and_exclusive() {
        assert!(args(&["http://x/"]).is_err());
        assert!(args(&["http://x/", "--pod", "a", "--node"]).is_err());
    }

    #[test]
    fn pods_are_found_by_full_or_short_name() {
        let config = serde_json::json!({
            "node": {"name": "node0"},
            "redirect": {"cgroup": "/sys/fs/cgroup/pods"},
            "pods": [
                {"name": "default/web", "netns": "/run/netns/a", "ips": []},
                {"name": "prod/web", "netns": "/run/netns/b", "ips": []},
                {"name": "default/api", "netns": "/run/netns/c", "ips": []},
            ]
        });
        let (e, node, cg) = find_pod(&config, "default/api").unwrap();
        assert_eq!(e.netns, PathBuf::from("/run/netns/c"));
        assert_eq!(node, "node0");
        assert_eq!(cg, Some(PathBuf::from("/sys/fs/cgroup/pods")));
        assert_eq!(find_pod(&config, "api").unwrap().0.name, "default/api");
        let e = find_pod(&config, "web").unwrap_err().to_string();
        assert!(e.contains("more than one"), "{e}");
        let e = find_pod(&config, "nope").unwrap_err().to_string();
        assert!(e.contains("default/web, prod/web, default/api"), "{e}");
    }
}
