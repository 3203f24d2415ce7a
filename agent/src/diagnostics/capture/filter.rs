//! tcpdump-syntax filters, compiled by libpcap into classic BPF and run by
//! the kernel on the capture socket (packets that do not match are never
//! copied to the agent).
//!
//! One packet socket sees every interface of a network namespace, and not
//! every interface has the same link-layer header: veths, bridges and
//! loopback carry Ethernet headers, while tun devices, WireGuard and IP-in-IP
//! tunnels hand over bare IP packets. A program compiled for Ethernet would
//! read garbage on the latter. So the expression is compiled twice (for
//! Ethernet and for raw IP) and the two programs are joined behind a
//! dispatch on the receiving device's ARPHRD type (`ld #hatype`); packets of
//! any other link type are not captured.

use std::sync::Mutex;

/// ARPHRD types whose packets start with an Ethernet header on a raw
/// packet socket (loopback has an all-zero one).
pub const ETHERNET_HATYPES: [u16; 2] = [libc::ARPHRD_ETHER, libc::ARPHRD_LOOPBACK];
/// ARPHRD types whose packets start with the IP header.
pub const RAW_IP_HATYPES: [u16; 4] = [
    libc::ARPHRD_NONE,
    libc::ARPHRD_TUNNEL,
    libc::ARPHRD_TUNNEL6,
    519, // ARPHRD_RAWIP
];

/// libpcap's DLT for Ethernet and for raw IP (DLT_RAW is 12 on Linux).
const DLT_EN10MB: i32 = 1;
const DLT_RAW: i32 = 12;

/// Kernel limit on a classic BPF program (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

/// `SKF_AD_OFF + SKF_AD_HATYPE`: the ancillary load of `skb->dev->type`.
const LD_HATYPE: u32 = (-0x1000i32) as u32 + 28;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;

/// pcap_compile keeps global parser state in older libpcaps; one at a time.
static COMPILE: Mutex<()> = Mutex::new(());

/// A filter the kernel can run.
#[derive(Clone, Debug)]
pub struct KernelFilter {
    pub program: Vec<libc::sock_filter>,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter {expression:?}: {reason}")]
    Invalid { expression: String, reason: String },
    #[error(
        "filter {expression:?} compiles to {len} BPF instructions; the kernel takes at most {MAX_INSNS}"
    )]
    TooLong { expression: String, len: usize },
}

/// Compiles `expression` (tcpdump syntax; empty matches everything) for
/// every supported link type; matching packets are cut to `snaplen` bytes
/// by the kernel.
pub fn compile(expression: &str, snaplen: u32) -> Result<KernelFilter, FilterError> {
    let invalid = |reason: String| FilterError::Invalid {
        expression: expression.to_string(),
        reason,
    };
    if expression.contains('\0') {
        return Err(invalid("contains a NUL byte".into()));
    }
    let ethernet = compile_for(DLT_EN10MB, expression).map_err(invalid)?;
    // A link-layer primitive (`ether host …`) has no meaning on raw IP; such
    // a filter simply matches nothing there.
    let raw = compile_for(DLT_RAW, expression).unwrap_or_else(|_| vec![ret(0)]);
    let program = dispatch(&set_snaplen(ethernet, snaplen), &set_snaplen(raw, snaplen));
    if program.len() > MAX_INSNS {
        return Err(FilterError::TooLong {
            expression: expression.to_string(),
            len: program.len(),
        });
    }
    Ok(KernelFilter { program })
}

fn compile_for(dlt: i32, expression: &str) -> Result<Vec<libc::sock_filter>, String> {
    let _one_at_a_time = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let dead = pcap::Capture::dead(pcap::Linktype(dlt)).map_err(|e| e.to_string())?;
    let program = dead.compile(expression, true).map_err(|e| match e {
        pcap::Error::PcapError(msg) => msg,
        other => other.to_string(),
    })?;
    // The pcap crate keeps `bpf_insn` private but prints it as
    // "code jt jf k"; reading that back avoids a layout transmute.
    program
        .get_instructions()
        .iter()
        .map(|insn| parse_insn(&insn.to_string()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "libpcap produced an instruction this agent cannot read".to_string())
}

fn parse_insn(text: &str) -> Option<libc::sock_filter> {
    let mut it = text.split_whitespace();
    let insn = libc::sock_filter {
        code: it.next()?.parse().ok()?,
        jt: it.next()?.parse().ok()?,
        jf: it.next()?.parse().ok()?,
        k: it.next()?.parse().ok()?,
    };
    it.next().is_none().then_some(insn)
}

/// libpcap compiled with its own snap length (65535); every accepting
/// return gets ours instead, so the kernel copies no more than asked.
fn set_snaplen(mut program: Vec<libc::sock_filter>, snaplen: u32) -> Vec<libc::sock_filter> {
    for insn in &mut program {
        if insn.code == BPF_RET_K && insn.k != 0 {
            insn.k = snaplen;
        }
    }
    program
}

fn ret(k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

/// `ld #hatype`, one `jeq` per known type to one of two trampolines, `ret
/// #0` for every other type, then the Ethernet program and the raw one.
/// Jumps inside each program are relative, so they stay valid where the
/// program is placed.
fn dispatch(ethernet: &[libc::sock_filter], raw: &[libc::sock_filter]) -> Vec<libc::sock_filter> {
    let types: Vec<(u16, bool)> = ETHERNET_HATYPES
        .iter()
        .map(|t| (*t, true))
        .chain(RAW_IP_HATYPES.iter().map(|t| (*t, false)))
        .collect();
    let n = types.len();
    // Layout: 0 ld; 1..=n jeq; n+1 ja→ethernet; n+2 ja→raw; n+3 ret 0;
    // n+4.. ethernet; then raw.
    let to_ethernet = n + 1;
    let to_raw = n + 2;
    let reject = n + 3;
    let ethernet_start = n + 4;
    let raw_start = ethernet_start + ethernet.len();
    let mut out = Vec::with_capacity(raw_start + raw.len());
    out.push(libc::sock_filter {
        code: BPF_LD_W_ABS,
        jt: 0,
        jf: 0,
        k: LD_HATYPE,
    });
    for (i, (hatype, is_ethernet)) in types.iter().enumerate() {
        let pc = i + 1;
        let target = if *is_ethernet { to_ethernet } else { to_raw };
        let jf = if pc == n { reject - pc - 1 } else { 0 };
        out.push(libc::sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: (target - pc - 1) as u8,
            jf: jf as u8,
            k: u32::from(*hatype),
        });
    }
    out.push(libc::sock_filter {
        code: BPF_JMP_JA,
        jt: 0,
        jf: 0,
        k: (ethernet_start - to_ethernet - 1) as u32,
    });
    out.push(libc::sock_filter {
        code: BPF_JMP_JA,
        jt: 0,
        jf: 0,
        k: (raw_start - to_raw - 1) as u32,
    });
    out.push(ret(0));
    out.extend_from_slice(ethernet);
    out.extend_from_slice(raw);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny classic-BPF interpreter (the kernel's semantics for the
    /// instructions libpcap emits), with `hatype` as the ancillary value.
    fn run(program: &[libc::sock_filter], packet: &[u8], hatype: u16) -> u32 {
        let (mut a, mut x, mut pc, mut mem) = (0u32, 0u32, 0usize, [0u32; 16]);
        let load = |off: u32, size: usize| -> Option<u32> {
            let b = packet.get(off as usize..off as usize + size)?;
            Some(b.iter().fold(0u32, |acc, v| (acc << 8) | u32::from(*v)))
        };
        loop {
            let i = program[pc];
            pc += 1;
            let src = if i.code & 0x08 != 0 { x } else { i.k };
            match i.code & 0x07 {
                class @ (0x00 | 0x01) => {
                    let size = match i.code & 0x18 {
                        0x00 => 4,
                        0x08 => 2,
                        _ => 1,
                    };
                    let v = match i.code & 0xe0 {
                        0x00 => Some(i.k),
                        0x20 if i.k == LD_HATYPE => Some(u32::from(hatype)),
                        0x20 => load(i.k, size),
                        0x40 => load(x.wrapping_add(i.k), size),
                        0x60 => Some(mem[i.k as usize]),
                        0x80 => Some(packet.len() as u32),
                        0xa0 => load(i.k, 1).map(|b| (b & 0x0f) * 4),
                        m => panic!("load mode {m:#x}"),
                    };
                    let Some(v) = v else { return 0 };
                    if class == 0x00 {
                        a = v;
                    } else {
                        x = v;
                    }
                }
                0x02 => mem[i.k as usize] = a,
                0x03 => mem[i.k as usize] = x,
                0x04 => {
                    a = match i.code & 0xf0 {
                        0x00 => a.wrapping_add(src),
                        0x10 => a.wrapping_sub(src),
                        0x20 => a.wrapping_mul(src),
                        0x30 => a.checked_div(src).unwrap_or(0),
                        0x40 => a | src,
                        0x50 => a & src,
                        0x60 => a.wrapping_shl(src),
                        0x70 => a.wrapping_shr(src),
                        0x80 => a.wrapping_neg(),
                        0xa0 => a ^ src,
                        op => panic!("alu op {op:#x}"),
                    };
                }
                0x05 => {
                    let taken = match i.code & 0xf0 {
                        0x00 => {
                            pc += i.k as usize;
                            continue;
                        }
                        0x10 => a == src,
                        0x20 => a > src,
                        0x30 => a >= src,
                        0x40 => a & src != 0,
                        op => panic!("jump op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return if i.code & 0x18 == 0x10 { a } else { i.k },
                _ => {
                    if i.code & 0xf8 == 0 {
                        x = a; // tax
                    } else {
                        a = x; // txa
                    }
                }
            }
        }
    }

    /// An IPv4/TCP packet from port `sport` to `dport`, with an Ethernet
    /// header or without.
    fn tcp_packet(ethernet: bool, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = Vec::new();
        if ethernet {
            p.extend_from_slice(&[0; 12]);
            p.extend_from_slice(&[0x08, 0x00]);
        }
        p.extend_from_slice(&[
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn a_port_filter_matches_on_ethernet_and_raw_ip_devices() {
        let f = compile("tcp port 8080", 200).unwrap();
        let p = &f.program;
        assert_eq!(
            run(p, &tcp_packet(true, 40000, 8080), libc::ARPHRD_ETHER),
            200
        );
        assert_eq!(
            run(p, &tcp_packet(true, 8080, 1), libc::ARPHRD_LOOPBACK),
            200
        );
        assert_eq!(
            run(p, &tcp_packet(true, 40000, 9090), libc::ARPHRD_ETHER),
            0
        );
        assert_eq!(
            run(p, &tcp_packet(false, 40000, 8080), libc::ARPHRD_NONE),
            200
        );
        assert_eq!(
            run(p, &tcp_packet(false, 40000, 9090), libc::ARPHRD_NONE),
            0
        );
        // The same raw bytes on an Ethernet device are not read as raw IP.
        assert_eq!(
            run(p, &tcp_packet(false, 40000, 8080), libc::ARPHRD_ETHER),
            0
        );
        // Unknown link types are never captured.
        assert_eq!(run(p, &tcp_packet(true, 40000, 8080), 1_000), 0);
    }

    #[test]
    fn an_empty_filter_takes_everything_up_to_snaplen() {
        let f = compile("", 96).unwrap();
        assert_eq!(
            run(&f.program, &tcp_packet(true, 1, 2), libc::ARPHRD_ETHER),
            96
        );
        assert_eq!(
            run(&f.program, &tcp_packet(false, 1, 2), libc::ARPHRD_TUNNEL),
            96
        );
    }

    #[test]
    fn link_layer_filters_match_nothing_on_raw_ip() {
        let f = compile("ether host 02:00:00:00:00:01", 100).unwrap();
        assert_eq!(
            run(&f.program, &tcp_packet(false, 1, 2), libc::ARPHRD_NONE),
            0
        );
    }

    #[test]
    fn an_invalid_filter_says_why() {
        let e = compile("tcp prot 80", 100).unwrap_err().to_string();
        assert!(e.contains("invalid filter \"tcp prot 80\""), "{e}");
        assert!(e.contains("syntax error"), "{e}");
        assert!(compile("a\0b", 100).is_err());
    }
}
