//! The kernel counters as Prometheus metrics, read from the maps on every
//! scrape (a handful of syscalls: one per pod slot and one per drop
//! reason seen).
//!
//! Labels are bounded by construction: `pod` is a configured pod or
//! `node`, `reason` a name from the running kernel's `enum
//! skb_drop_reason`, `direction` one of two words.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{KernelDiag, snapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabel {
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    pod: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

struct KernelCollector(Arc<KernelDiag>);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

/// Registers the kernel metrics; they read `diag` at every scrape.
pub fn register(registry: &mut Registry, diag: Arc<KernelDiag>) {
    registry.register_collector(Box::new(KernelCollector(diag)));
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (impl EncodeLabelSet, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let diag = &self.0;
        let now = match diag.read_counters() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kernel diagnostics counters for /metrics");
                return Ok(());
            }
        };
        // Counters since the programs were loaded: no base.
        let r = snapshot::report(
            &now,
            None,
            |s| diag.label(s),
            |r| diag.info.drop_reasons.name(r),
        );
        counter(
            &mut encoder,
            "waymark_kernel_drops",
            "Packets the kernel dropped, by the kernel's drop reason and the pod they belonged to",
            r.pods.iter().flat_map(|p| {
                p.drops.iter().map(|d| {
                    (
                        DropLabels {
                            reason: d.reason.clone(),
                            pod: p.pod.clone(),
                        },
                        d.count,
                    )
                })
            }),
        )?;
        let per_pod = |f: fn(&snapshot::PodReport) -> u64| {
            r.pods
                .iter()
                .map(move |p| (PodLabel { pod: p.pod.clone() }, f(p)))
        };
        counter(
            &mut encoder,
            "waymark_kernel_tcp_retransmits",
            "TCP segments the kernel retransmitted on the pod's sockets",
            per_pod(|p| p.retransmits),
        )?;
        counter(
            &mut encoder,
            "waymark_kernel_tcp_syn_retransmits",
            "Retransmitted SYNs: connection attempts from the pod left unanswered",
            per_pod(|p| p.syn_retransmits),
        )?;
        let both = |sent: fn(&snapshot::PodReport) -> u64,
                    received: fn(&snapshot::PodReport) -> u64,
                    names: [&'static str; 2]| {
            r.pods.iter().flat_map(move |p| {
                [
                    (
                        DirectionLabels {
                            pod: p.pod.clone(),
                            direction: names[0],
                        },
                        sent(p),
                    ),
                    (
                        DirectionLabels {
                            pod: p.pod.clone(),
                            direction: names[1],
                        },
                        received(p),
                    ),
                ]
            })
        };
        counter(
            &mut encoder,
            "waymark_kernel_tcp_resets",
            "TCP resets the pod's network namespace sent and received",
            both(
                |p| p.resets_sent,
                |p| p.resets_received,
                ["sent", "received"],
            ),
        )?;
        counter(
            &mut encoder,
            "waymark_kernel_bytes",
            "Bytes of the pod's own sockets: packets from the IP header on, plus payload a sockmap delivered to them without a packet",
            both(|p| p.bytes_in, |p| p.bytes_out, ["in", "out"]),
        )?;
        counter(
            &mut encoder,
            "waymark_kernel_sockmap_bytes",
            "The part of waymark_kernel_bytes that a sockmap moved socket to socket (the reply shortcut in, the request shortcut out): payload, no packets",
            both(
                |p| p.sockmap_bytes_in,
                |p| p.sockmap_bytes_out,
                ["in", "out"],
            ),
        )?;
        counter(
            &mut encoder,
            "waymark_kernel_packets",
            "Packets of the pod's own sockets (a GSO packet counts as its segments)",
            both(|p| p.packets_in, |p| p.packets_out, ["in", "out"]),
        )?;
        for (name, help, value) in [
            (
                "waymark_kernel_events_suppressed",
                "Drop/reset events the per-CPU rate limit kept out of the event stream (still counted)",
                now.suppressed,
            ),
            (
                "waymark_kernel_events_lost",
                "Drop/reset events lost because the ring buffer was full",
                now.lost,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        let programs = diag.programs();
        let mut family = encoder.encode_descriptor(
            "waymark_kernel_program_attached",
            "1 if the kernel diagnostics program runs, 0 if the kernel refused it",
            None,
            MetricType::Gauge,
        )?;
        for p in &programs {
            ConstGauge::new(i64::from(p.state == "attached")).encode(family.encode_family(
                &ProgramLabels {
                    program: p.program.clone(),
                },
            )?)?;
        }
        Ok(())
    }
}
