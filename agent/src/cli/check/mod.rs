//! `waymark check [--pre]`: is this node able to run waymark, and is the
//! agent on it doing its job? Checks run in groups and print ✔ or ✖ (⚠ for
//! what works but deserves a look), each failure with a hint saying what
//! to do; the exit status is non-zero when any check fails.
//!
//! - `host` (also `--pre`, which needs no agent): kernel version, BTF,
//!   cgroup v2, bpffs, whether the kernel's verifier accepts waymark's own
//!   programs, and this process's privileges.
//! - `agent`: the admin API, readiness, the programs as the kernel lists
//!   them on the pods' cgroup (asked by the agent about its own program
//!   IDs, and by this CLI on its own), each pod's listeners, whether the
//!   config file on disk is the config in force, services' endpoints,
//!   workload certificates, the issuer and trust anchors (valid for
//!   `--expiry-days` more days) and the clock.
//! - `peers`: every other node's agent of `[[nodes]]`, reached over the
//!   mTLS tunnel port with a TLS handshake that verifies its identity.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::Output;
use super::client::AdminClient;

mod agent;
mod authorities;
mod host;
mod peers;

#[derive(clap::Args, Clone, Debug)]
pub struct CheckArgs {
    /// Only the host checks, before installing: no agent needs to run.
    #[arg(long)]
    pub pre: bool,
    /// Certificates of issuers and trust anchors must stay valid for this
    /// many more days.
    #[arg(long, default_value_t = 7)]
    pub expiry_days: u64,
    /// How long the agent waits for each peer agent's handshake.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub peer_timeout: std::time::Duration,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Works, but deserves a look; does not fail the run.
    Warn,
    Fail,
    /// Not applicable here (e.g. no identities configured).
    Skip,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Pass => "✔",
            Status::Warn => "⚠",
            Status::Fail => "✖",
            Status::Skip => "-",
        }
    }
}

/// One check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub status: Status,
    /// What was checked, and what was found.
    pub what: String,
    /// Facts behind a failure or warning.
    pub detail: Vec<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Check {
    pub fn pass(what: impl Into<String>) -> Check {
        Check {
            status: Status::Pass,
            what: what.into(),
            detail: Vec::new(),
            hint: None,
        }
    }

    pub fn fail(what: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            status: Status::Fail,
            hint: Some(hint.into()),
            ..Check::pass(what)
        }
    }

    pub fn warn(what: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            status: Status::Warn,
            ..Check::fail(what, hint)
        }
    }

    pub fn skip(what: impl Into<String>) -> Check {
        Check {
            status: Status::Skip,
            ..Check::pass(what)
        }
    }

    pub fn with_detail(mut self, detail: impl IntoIterator<Item = String>) -> Check {
        self.detail.extend(detail);
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub groups: Vec<Group>,
    /// No check failed.
    pub ok: bool,
}

/// Runs the checks and prints them; `Ok(false)` when any failed.
pub fn run(client: &AdminClient, args: &CheckArgs) -> Result<bool> {
    let mut groups = vec![Group {
        name: "host".into(),
        checks: host::checks(),
    }];
    if !args.pre {
        groups.push(Group {
            name: format!("agent ({})", client.target()),
            checks: agent::checks(client, args.expiry_days),
        });
        groups.push(Group {
            name: "peers".into(),
            checks: peers::checks(client, args.peer_timeout),
        });
    }
    let ok = groups
        .iter()
        .flat_map(|g| &g.checks)
        .all(|c| c.status != Status::Fail);
    let report = Report { groups, ok };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", render(&report)),
    }
    Ok(ok)
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    for g in &report.groups {
        out.push_str(&format!(
            "{}\n{}\n",
            g.name,
            "-".repeat(g.name.chars().count())
        ));
        for c in &g.checks {
            out.push_str(&format!("{} {}\n", c.status.mark(), c.what));
            for d in &c.detail {
                out.push_str(&format!("    {d}\n"));
            }
            if let Some(h) = &c.hint
                && c.status != Status::Pass
            {
                out.push_str(&format!("    hint: {h}\n"));
            }
        }
        out.push('\n');
    }
    let count = |s| {
        report
            .groups
            .iter()
            .flat_map(|g| &g.checks)
            .filter(|c| c.status == s)
            .count()
    };
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&match (failed, warned) {
        (0, 0) => "Status check results are ✔\n".to_string(),
        (0, w) => format!("Status check results are ✔ ({w} warning(s))\n"),
        (f, _) => format!("Status check results are ✖ ({f} failed)\n"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_their_hint_and_decide_the_verdict() {
        let report = Report {
            groups: vec![Group {
                name: "host".into(),
                checks: vec![
                    Check::pass("kernel 6.1"),
                    Check::fail("no BTF", "use a kernel with BTF")
                        .with_detail(["/sys/kernel/btf/vmlinux is missing".to_string()]),
                    Check::warn("clock not synchronized", "run an NTP daemon"),
                ],
            }],
            ok: false,
        };
        let text = render(&report);
        assert_eq!(
            text,
            "host\n----\n✔ kernel 6.1\n✖ no BTF\n    /sys/kernel/btf/vmlinux is missing\n    hint: use a kernel with BTF\n⚠ clock not synchronized\n    hint: run an NTP daemon\n\nStatus check results are ✖ (1 failed)\n"
        );
    }
}
