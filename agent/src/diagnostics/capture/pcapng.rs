//! The pcapng stream a capture writes (pcap-file does the block encoding):
//! a Section Header, an Interface Description Block per interface as it
//! first shows up (named, nanosecond timestamps), Enhanced Packet Blocks
//! with their direction, Decryption Secrets Blocks for TLS key log lines,
//! and at the end one Interface Statistics Block per interface whose
//! comment says why the capture stopped (the CLI reads it back for its
//! summary; Wireshark shows it under Capture File Properties).

use std::borrow::Cow;
use std::time::Duration;

use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::interface_statistics::{
    InterfaceStatisticsBlock, InterfaceStatisticsOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::blocks::unknown::UnknownBlock;

/// pcapng Decryption Secrets Block type.
pub const DSB_BLOCK_TYPE: u32 = 0x0000_000A;
/// DSB secrets type for NSS key log lines ("TLSK").
pub const DSB_TLS_KEY_LOG: u32 = 0x544c_534b;
/// Interface Statistics Block type.
pub const ISB_BLOCK_TYPE: u32 = 0x0000_0005;
/// Enhanced Packet Block type.
pub const EPB_BLOCK_TYPE: u32 = 0x0000_0006;
/// The start of the comment on the closing statistics blocks.
pub const STOP_COMMENT_PREFIX: &str = "waymark capture stopped: ";

/// Which way a packet went, and how it was addressed (pcapng `epb_flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One interface of the file: packets written for it (its statistics).
#[derive(Clone, Debug)]
struct Interface {
    packets: u64,
}

/// Writes pcapng into an in-memory buffer that the caller drains with
/// [`PcapNg::take`] and sends on.
pub struct PcapNg {
    writer: PcapNgWriter<Vec<u8>>,
    interfaces: Vec<Interface>,
    snaplen: u32,
    /// Bytes produced so far, drained or not.
    written: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode pcapng: {0}")]
pub struct EncodeError(String);

fn enc(e: pcap_file::PcapError) -> EncodeError {
    EncodeError(e.to_string())
}

impl PcapNg {
    /// Starts a section; `description` names what was captured (shown by
    /// `capinfos` as the section's comment).
    pub fn new(snaplen: u32, description: &str) -> Result<Self, EncodeError> {
        let section = SectionHeaderBlock {
            options: vec![
                SectionHeaderOption::UserApplication(Cow::Owned(format!(
                    "waymark {}",
                    env!("CARGO_PKG_VERSION")
                ))),
                SectionHeaderOption::OS(Cow::Borrowed("Linux")),
                SectionHeaderOption::Comment(Cow::Owned(description.to_string())),
            ],
            // Native byte order (the default would be big-endian); the DSB
            // body below is written in the same order.
            endianness: pcap_file::Endianness::native(),
            ..Default::default()
        };
        let writer = PcapNgWriter::with_section_header(Vec::with_capacity(64 * 1024), section)
            .map_err(enc)?;
        let written = writer.get_ref().len() as u64;
        Ok(PcapNg {
            writer,
            interfaces: Vec::new(),
            snaplen,
            written,
        })
    }

    /// Adds an interface; the returned id goes on its packets.
    pub fn add_interface(&mut self, name: &str, linktype: DataLink) -> Result<u32, EncodeError> {
        let before = self.writer.get_ref().len();
        let idb = InterfaceDescriptionBlock {
            linktype,
            snaplen: self.snaplen,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Owned(name.to_string())),
                // Nanoseconds: pcap-file writes EPB timestamps in ns.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        self.writer.write_pcapng_block(idb).map_err(enc)?;
        self.account(before);
        self.interfaces.push(Interface { packets: 0 });
        Ok((self.interfaces.len() - 1) as u32)
    }

    /// Writes one packet; `data` is what was captured, `original_len` what
    /// was on the wire; `since_epoch` is the capture timestamp.
    pub fn packet(
        &mut self,
        interface: u32,
        since_epoch: Duration,
        data: &[u8],
        original_len: u32,
        direction: Direction,
    ) -> Result<(), EncodeError> {
        let before = self.writer.get_ref().len();
        // epb_flags bits 0-1: 01 inbound, 10 outbound.
        let flags = match direction {
            Direction::Inbound => 0b01,
            Direction::Outbound => 0b10,
        };
        let epb = EnhancedPacketBlock {
            interface_id: interface,
            timestamp: since_epoch,
            original_len,
            data: Cow::Borrowed(data),
            options: vec![EnhancedPacketOption::Flags(flags)],
        };
        self.writer.write_pcapng_block(epb).map_err(enc)?;
        self.account(before);
        if let Some(i) = self.interfaces.get_mut(interface as usize) {
            i.packets += 1;
        }
        Ok(())
    }

    /// Writes TLS key log lines (NSS format, one per line) as a Decryption
    /// Secrets Block; Wireshark decrypts the TLS sessions after it with them.
    pub fn tls_secrets(&mut self, key_log: &str) -> Result<(), EncodeError> {
        if key_log.is_empty() {
            return Ok(());
        }
        let before = self.writer.get_ref().len();
        let body = dsb_body(DSB_TLS_KEY_LOG, key_log.as_bytes());
        let block = UnknownBlock::new(DSB_BLOCK_TYPE, 0, &body);
        self.writer.write_pcapng_block(block).map_err(enc)?;
        self.account(before);
        Ok(())
    }

    /// Closes the capture with one statistics block per interface; the
    /// first carries `comment` (why it stopped and the totals).
    pub fn finish(
        &mut self,
        now: Duration,
        kernel_drops: u64,
        comment: &str,
    ) -> Result<(), EncodeError> {
        let before = self.writer.get_ref().len();
        let ts = now.as_nanos() as u64;
        let ids = if self.interfaces.is_empty() {
            // Nothing matched: still say why it stopped. A statistics block
            // needs an interface, so describe the namespace as one.
            self.add_interface("(no packets)", DataLink::ETHERNET)?;
            vec![0]
        } else {
            (0..self.interfaces.len()).collect()
        };
        for id in ids {
            let mut options = Vec::new();
            if id == 0 {
                options.push(InterfaceStatisticsOption::Comment(Cow::Owned(
                    comment.to_string(),
                )));
                options.push(InterfaceStatisticsOption::IsbOsDrop(kernel_drops));
            }
            options.push(InterfaceStatisticsOption::IsbEndTime(ts));
            options.push(InterfaceStatisticsOption::IsbUsrDeliv(
                self.interfaces[id].packets,
            ));
            let isb = InterfaceStatisticsBlock {
                interface_id: id as u32,
                timestamp: ts,
                options,
            };
            self.writer.write_pcapng_block(isb).map_err(enc)?;
        }
        self.account(before);
        Ok(())
    }

    /// The bytes written since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.writer.get_mut())
    }

    /// Bytes buffered and not yet taken.
    pub fn pending(&self) -> usize {
        self.writer.get_ref().len()
    }

    /// Everything written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn account(&mut self, before: usize) {
        self.written += (self.writer.get_ref().len() - before) as u64;
    }
}

/// A DSB's body: secrets type, secrets length, the secrets (the block
/// writer pads them to 32 bits), no options.
fn dsb_body(secrets_type: u32, secrets: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + secrets.len());
    // Blocks are written in the section's (native) byte order.
    body.extend_from_slice(&secrets_type.to_ne_bytes());
    body.extend_from_slice(&(secrets.len() as u32).to_ne_bytes());
    body.extend_from_slice(secrets);
    body
}

/// What a pcapng byte stream contained, read block by block as it passes
/// through (the CLI counts packets and finds the stop comment with it).
#[derive(Debug, Default)]
pub struct StreamSummary {
    buf: Vec<u8>,
    big_endian: Option<bool>,
    pub packets: u64,
    pub secrets_blocks: u64,
    /// The closing statistics comment, once seen.
    pub stop_comment: Option<String>,
    pub kernel_drops: Option<u64>,
}

impl StreamSummary {
    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while self.buf.len() - at >= 12 {
            let b = &self.buf[at..];
            let big = match self.big_endian {
                Some(big) => big,
                None => {
                    // A stream starts with the Section Header: its byte-order
                    // magic follows the type and length.
                    match &b[8..12] {
                        [0x1a, 0x2b, 0x3c, 0x4d] => true,
                        [0x4d, 0x3c, 0x2b, 0x1a] => false,
                        _ => {
                            self.buf.clear();
                            return;
                        }
                    }
                }
            };
            self.big_endian = Some(big);
            let u32_at = |off: usize| {
                let a: [u8; 4] = b[off..off + 4].try_into().expect("4 bytes");
                if big {
                    u32::from_be_bytes(a)
                } else {
                    u32::from_le_bytes(a)
                }
            };
            let (kind, len) = (u32_at(0), u32_at(4) as usize);
            if len < 12 || len % 4 != 0 {
                self.buf.clear();
                return;
            }
            if b.len() < len {
                break;
            }
            match kind {
                EPB_BLOCK_TYPE => self.packets += 1,
                DSB_BLOCK_TYPE => self.secrets_blocks += 1,
                ISB_BLOCK_TYPE => {
                    let block = b[..len].to_vec();
                    self.read_isb(&block, big);
                }
                _ => {}
            }
            at += len;
        }
        self.buf.drain(..at);
    }

    fn read_isb(&mut self, block: &[u8], big: bool) {
        // type, length, interface id, timestamp (2 words), options, length.
        let mut off = 20;
        let end = block.len() - 4;
        let u16_at = |o: usize| {
            let a = [block[o], block[o + 1]];
            if big {
                u16::from_be_bytes(a)
            } else {
                u16::from_le_bytes(a)
            }
        };
        while off + 4 <= end {
            let (code, len) = (u16_at(off), usize::from(u16_at(off + 2)));
            let value = off + 4;
            if code == 0 || value + len > end {
                break;
            }
            let v = &block[value..value + len];
            match code {
                1 => {
                    let text = String::from_utf8_lossy(v);
                    if text.starts_with(STOP_COMMENT_PREFIX) {
                        self.stop_comment = Some(text.into_owned());
                    }
                }
                7 if len == 8 => {
                    let a: [u8; 8] = v.try_into().expect("8 bytes");
                    self.kernel_drops = Some(if big {
                        u64::from_be_bytes(a)
                    } else {
                        u64::from_le_bytes(a)
                    });
                }
                _ => {}
            }
            off = value + len.div_ceil(4) * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = PcapNg::new(128, "pod default/a, filter \"\"").unwrap();
        let mut out = w.take();
        let eth0 = w.add_interface("eth0", DataLink::ETHERNET).unwrap();
        let lo = w.add_interface("lo", DataLink::ETHERNET).unwrap();
        let frame = [0u8; 60];
        w.packet(
            eth0,
            Duration::from_nanos(1_700_000_000_123_456_789),
            &frame,
            60,
            Direction::Inbound,
        )
        .unwrap();
        w.tls_secrets("CLIENT_RANDOM 00 11\n").unwrap();
        w.packet(
            lo,
            Duration::from_secs(1_700_000_001),
            &frame[..54],
            1500,
            Direction::Outbound,
        )
        .unwrap();
        w.finish(
            Duration::from_secs(1_700_000_002),
            3,
            "waymark capture stopped: max_packets (2 packets)",
        )
        .unwrap();
        assert_eq!(w.pending() as u64 + out.len() as u64, w.written());
        out.extend(w.take());
        out
    }

    #[test]
    fn the_stream_summary_reads_back_what_was_written() {
        let bytes = sample();
        let mut s = StreamSummary::default();
        // Fed in awkward pieces, as a network stream arrives.
        for chunk in bytes.chunks(7) {
            s.feed(chunk);
        }
        assert_eq!(s.packets, 2);
        assert_eq!(s.secrets_blocks, 1);
        assert_eq!(
            s.stop_comment.as_deref(),
            Some("waymark capture stopped: max_packets (2 packets)")
        );
        assert_eq!(s.kernel_drops, Some(3));
    }

    #[test]
    fn pcap_file_parses_the_blocks_back() {
        let bytes = sample();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&bytes[..]).unwrap();
        let mut kinds = Vec::new();
        while let Some(block) = reader.next_block() {
            let block = block.unwrap();
            kinds.push(match block {
                pcap_file::pcapng::Block::InterfaceDescription(i) => {
                    assert!(
                        i.options
                            .contains(&InterfaceDescriptionOption::IfTsResol(9))
                    );
                    "idb"
                }
                pcap_file::pcapng::Block::EnhancedPacket(p) => {
                    assert!(p.timestamp >= Duration::from_secs(1_700_000_000));
                    "epb"
                }
                pcap_file::pcapng::Block::InterfaceStatistics(_) => "isb",
                pcap_file::pcapng::Block::Unknown(u) => {
                    assert_eq!(u.type_, DSB_BLOCK_TYPE);
                    "dsb"
                }
                _ => "other",
            });
        }
        assert_eq!(kinds, ["idb", "idb", "epb", "dsb", "epb", "isb", "isb"]);
    }

    /// tshark, where installed, reads the file: interface names, both
    /// packets, and the secrets block.
    #[test]
    fn tshark_reads_the_file() {
        let Ok(out) = std::process::Command::new("tshark")
            .arg("--version")
            .output()
        else {
            eprintln!("SKIPPED tshark_reads_the_file: no tshark");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("waymark-pcapng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sample.pcapng");
        std::fs::write(&file, sample()).unwrap();
        let out = std::process::Command::new("tshark")
            .args(["-r"])
            .arg(&file)
            .args([
                "-T",
                "fields",
                "-e",
                "frame.interface_name",
                "-e",
                "frame.len",
            ])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            ["eth0\t60", "lo\t1500"],
            "{stdout}"
        );
    }
}
