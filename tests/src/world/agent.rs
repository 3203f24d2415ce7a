//! The agent's config file as the world writes it, and where its binary is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use toml::{Table, Value};

use super::process::find_bin;

/// The admin address every agent listens on, inside its own node's netns.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:4191";
/// Where an agent binds its admin socket when its config does not say.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/waymark/admin.sock";
/// The agent's outbound listener port.
pub const OUTBOUND_PORT: i64 = 15001;

/// The `waymark` binary: env `WAYMARK_BIN`, else `target/<profile>/waymark`
/// next to the running executable. The latter must not be older than the
/// agent's sources (a test against a stale agent proves nothing); cargo only
/// rebuilds it for `cargo test` of the whole workspace, not for
/// `cargo test -p waymark-tests`.
pub fn waymark_bin() -> Result<PathBuf> {
    let explicit = std::env::var_os("WAYMARK_BIN").is_some();
    let bin = find_bin("waymark", "WAYMARK_BIN", "cargo build -p waymark-agent")?;
    if !explicit {
        check_fresh(&bin)?;
    }
    Ok(bin)
}

/// Fails if a source file of the agent (or its eBPF programs) is newer than
/// `bin`. Skipped when the sources are not where this crate was built from.
fn check_fresh(bin: &Path) -> Result<()> {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return Ok(());
    };
    let Ok(root) = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
    else {
        return Ok(());
    };
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = ["agent", "ebpf"].iter().map(|d| root.join(d)).collect();
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if p.file_name()
                .is_some_and(|n| n == "target" || n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = md.modified()
            && newest.as_ref().is_none_or(|(t, _)| m > *t)
        {
            newest = Some((m, p));
        }
    }
    if let Some((m, p)) = newest
        && m > built
    {
        anyhow::bail!(
            "{} is older than {}: run `cargo build -p waymark-agent` (or set WAYMARK_BIN to use it anyway)",
            bin.display(),
            p.display()
        );
    }
    Ok(())
}

/// One pod as the agent's config lists it.
pub(crate) struct PodEntry {
    pub name: String,
    pub netns: PathBuf,
    pub ips: Vec<String>,
}

fn table<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn s(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

/// The config the world writes for a node before a test's changes.
pub(crate) fn base_config(
    node_name: &str,
    admin_socket: &Path,
    pods_cgroup: &Path,
    pin_path: &Path,
    fabric_net: &str,
    pods: &[PodEntry],
) -> Table {
    let admin: SocketAddr = DEFAULT_ADMIN.parse().expect("valid default admin address");
    let mut t = Table::new();
    t.insert("node".into(), table([("name", s(node_name))]));
    t.insert(
        "admin".into(),
        table([("listen", s(admin)), ("socket", s(admin_socket.display()))]),
    );
    t.insert(
        "outbound".into(),
        table([
            ("port", Value::Integer(OUTBOUND_PORT)),
            ("connect_timeout", s("2s")),
        ]),
    );
    t.insert(
        "redirect".into(),
        table([
            ("cgroup", s(pods_cgroup.display())),
            ("pin_path", s(pin_path.display())),
            (
                "exclude",
                Value::Array(vec![table([
                    ("net", s(fabric_net)),
                    (
                        "ports",
                        Value::Array(vec![Value::Integer(admin.port().into())]),
                    ),
                ])]),
            ),
        ]),
    );
    t.insert("shutdown".into(), table([("drain_grace", s("5s"))]));
    t.insert(
        "pods".into(),
        Value::Array(
            pods.iter()
                .map(|p| {
                    table([
                        ("name", s(&p.name)),
                        ("netns", s(p.netns.display())),
                        ("ips", Value::Array(p.ips.iter().map(s).collect())),
                    ])
                })
                .collect(),
        ),
    );
    t
}

/// The trust domain of worlds with mTLS.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The agents' inbound tunnel port.
pub const TUNNEL_PORT: u16 = 15008;

/// The SPIFFE ID the world gives a pod (`default/n<i>p<j>` →
/// `spiffe://cluster.local/ns/default/sa/n<i>p<j>`).
pub fn pod_identity(pod_name: &str) -> String {
    let (ns, name) = pod_name.split_once('/').unwrap_or(("default", pod_name));
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{name}")
}

/// Runs `waymark identity init` into `dir` (a new trust anchor and issuer).
pub(crate) fn identity_init(bin: &Path, dir: &Path, extra: &[String]) -> Result<()> {
    let out = std::process::Command::new(bin)
        .args([
            "identity",
            "init",
            "--force",
            "--trust-domain",
            TRUST_DOMAIN,
            "--dir",
        ])
        .arg(dir)
        .args(extra)
        .output()
        .with_context(|| format!("running {} identity init", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} identity init --dir {} failed: {}",
        bin.display(),
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// What a world with mTLS adds to a node's config: `[identity]` from the
/// files in `ca_dir`, the inbound tunnel on the node's fabric address,
/// every node in `[[nodes]]`, and an identity for every pod.
pub(crate) fn mtls_config(
    cfg: &mut Table,
    ca_dir: &Path,
    leaf_lifetime: &str,
    node_fabric_ip: std::net::IpAddr,
    nodes: &[(String, std::net::IpAddr)],
) {
    let file = |name: &str| s(ca_dir.join(name).display());
    cfg.insert(
        "identity".into(),
        table([
            ("trust_domain", s(TRUST_DOMAIN)),
            ("trust_bundle", file("ca.crt")),
            ("issuer_cert", file("issuer.crt")),
            ("issuer_key", file("issuer.key")),
            ("leaf_lifetime", s(leaf_lifetime)),
        ]),
    );
    cfg.insert(
        "inbound".into(),
        table([(
            "listen",
            Value::Array(vec![s(SocketAddr::new(node_fabric_ip, TUNNEL_PORT))]),
        )]),
    );
    cfg.insert(
        "nodes".into(),
        Value::Array(
            nodes
                .iter()
                .map(|(name, ip)| {
                    table([
                        ("name", s(name)),
                        ("tunnel", s(SocketAddr::new(*ip, TUNNEL_PORT))),
                    ])
                })
                .collect(),
        ),
    );
    if let Some(Value::Array(pods)) = cfg.get_mut("pods") {
        for pod in pods {
            if let Value::Table(t) = pod {
                let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
                let id = pod_identity(name);
                t.insert("identity".into(), s(id));
            }
        }
    }
}

/// Merges `over` into `base`: tables merge key by key, recursively; any other
/// value (arrays included) replaces what was there.
pub fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses extra TOML a test gives and merges it into `base`.
pub(crate) fn merge_str(base: &mut Table, extra: &str) -> Result<()> {
    let over: Table = extra
        .parse()
        .with_context(|| format!("parsing extra agent config:\n{extra}"))?;
    merge(base, over);
    Ok(())
}

/// The admin address a config asks for.
pub(crate) fn admin_addr(cfg: &Table) -> Result<SocketAddr> {
    let listen = cfg
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or(DEFAULT_ADMIN);
    listen
        .parse()
        .with_context(|| format!("admin.listen {listen:?} is not an IP:port address"))
}

/// The admin socket a config asks for (the agent's default when unset).
pub(crate) fn admin_socket(cfg: &Table) -> PathBuf {
    cfg.get("admin")
        .and_then(|a| a.get("socket"))
        .and_then(|l| l.as_str())
        .unwrap_or(DEFAULT_ADMIN_SOCKET)
        .into()
}

/// Writes `cfg` to `path` atomically (write a temporary file, rename).
pub(crate) fn write_config(path: &Path, cfg: &Table) -> Result<()> {
    let text = toml::to_string(cfg).context("serializing agent config")?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_config_has_the_contract_and_merges_overrides() {
        let mut c = base_config(
            "node0",
            Path::new("/run/waymark-world/t/n0.sock"),
            Path::new("/sys/fs/cgroup/unified/waymark-t/node0"),
            Path::new("/sys/fs/bpf/waymark-world/t/node0"),
            "10.0.0.0/24",
            &[PodEntry {
                name: "default/n0p0".into(),
                netns: "/var/run/netns/wm1a2b-n0p0".into(),
                ips: vec!["10.1.0.2".into(), "fd00:1::2".into()],
            }],
        );
        let text = toml::to_string(&c).unwrap();
        let back: Table = text.parse().unwrap();
        assert_eq!(back["node"]["name"].as_str(), Some("node0"));
        assert_eq!(back["outbound"]["port"].as_integer(), Some(15001));
        assert_eq!(
            back["redirect"]["exclude"][0]["ports"][0].as_integer(),
            Some(4191)
        );
        assert_eq!(back["pods"][0]["ips"][1].as_str(), Some("fd00:1::2"));
        assert_eq!(
            admin_socket(&back),
            PathBuf::from("/run/waymark-world/t/n0.sock")
        );
        merge_str(
            &mut c,
            "[admin]\nlisten = \"127.0.0.1:9999\"\n[outbound]\nconnect_timeout = \"1s\"\n[extra]\nx = 1\n",
        )
        .unwrap();
        assert_eq!(admin_addr(&c).unwrap().port(), 9999);
        assert_eq!(c["outbound"]["port"].as_integer(), Some(15001));
        assert_eq!(c["outbound"]["connect_timeout"].as_str(), Some("1s"));
        assert_eq!(c["extra"]["x"].as_integer(), Some(1));
    }
}
