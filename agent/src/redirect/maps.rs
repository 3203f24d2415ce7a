//! The kernel programs' view of addresses, and the map operations aya does
//! not offer: converting std socket addresses to the shared map layout and
//! back, building the exclusion tables, and the atomic take of a flow's
//! original destination.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::{MaybeUninit, size_of},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{MapData, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net};
use waymark_common::{
    ExcludePorts, FAMILY_V4, FAMILY_V6, FlowKey, MAX_EXCLUDE_PORTS, MAX_EXCLUDES, SockAddr,
};

use super::{Exclude, RedirectError};

/// An IPv4 address as the kernel stores it (`user_ip4`): wire-order bytes
/// in a native `u32`.
fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn v6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

fn v6_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

/// The key the flow maps file a pod's connection under: the pod's netns
/// cookie (every pod dials from the same loopback address) and the
/// client's address.
pub fn flow_key(netns_cookie: u64, client: SocketAddr) -> FlowKey {
    FlowKey {
        netns_cookie,
        client: sock_addr(client),
        _pad: 0,
    }
}

/// The kernel-side form of a client address, normalised the way the
/// `sock_ops` program normalises it: a v4-mapped IPv6 address is keyed as
/// the IPv4 address it carries.
pub(super) fn sock_addr(addr: SocketAddr) -> SockAddr {
    let ip = addr.ip().to_canonical();
    match ip {
        IpAddr::V4(v4) => SockAddr {
            addr: [v4_word(v4), 0, 0, 0],
            port: addr.port(),
            family: FAMILY_V4,
        },
        IpAddr::V6(v6) => SockAddr {
            addr: v6_words(v6),
            port: addr.port(),
            family: FAMILY_V6,
        },
    }
}

/// Back to std; a v4-mapped destination (a dual-stack socket that dialled
/// an IPv4 address) comes back as plain IPv4, which is what it is on the
/// wire. `None` for a family the kernel programs never write.
pub(super) fn socket_addr(sa: &SockAddr) -> Option<SocketAddr> {
    match sa.family {
        FAMILY_V4 => {
            let ip = Ipv4Addr::from(sa.addr[0].to_ne_bytes());
            Some(SocketAddrV4::new(ip, sa.port).into())
        }
        FAMILY_V6 => {
            let ip = v6_from_words(sa.addr);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddrV4::new(v4, sa.port).into(),
                None => SocketAddrV6::new(ip, sa.port, 0, 0).into(),
            })
        }
        _ => None,
    }
}

/// The exclusion LPM tries' contents.
#[derive(Default)]
pub(super) struct ExcludeTables {
    pub v4: Vec<(Key<u32>, ExcludePorts)>,
    pub v6: Vec<(Key<[u32; 4]>, ExcludePorts)>,
}

/// Groups the configured exclusions into map entries. Entries for the same
/// network are merged (an LPM trie holds one value per prefix): "all ports"
/// wins, otherwise the port lists are united. Host bits are cleared, and a
/// v4-mapped IPv6 network becomes the IPv4 network it denotes, because the
/// kernel checks v4-mapped destinations against the IPv4 table.
pub(super) fn exclude_tables(excludes: &[Exclude]) -> Result<ExcludeTables, RedirectError> {
    // `None` means every port.
    let mut merged: BTreeMap<IpNet, Option<BTreeSet<u16>>> = BTreeMap::new();
    for exclude in excludes {
        let entry = merged
            .entry(canonical_net(exclude.net))
            .or_insert_with(|| Some(BTreeSet::new()));
        match (exclude.ports.is_empty(), entry.as_mut()) {
            (true, _) => *entry = None,
            (false, Some(ports)) => ports.extend(&exclude.ports),
            (false, None) => {}
        }
    }

    let mut tables = ExcludeTables::default();
    for (net, ports) in merged {
        let value = exclude_ports(net, ports)?;
        match lpm_key(net) {
            LpmKey::V4(key) => tables.v4.push((key, value)),
            LpmKey::V6(key) => tables.v6.push((key, value)),
        }
    }
    for (family, count) in [("IPv4", tables.v4.len()), ("IPv6", tables.v6.len())] {
        if count > MAX_EXCLUDES as usize {
            return Err(RedirectError::TooManyExcludes {
                family,
                count,
                max: MAX_EXCLUDES,
            });
        }
    }
    Ok(tables)
}

/// The key of a network in one of the programs' LPM tries (the exclusions,
/// strict inbound's allowed sources), by family.
pub(super) enum LpmKey {
    V4(Key<u32>),
    V6(Key<[u32; 4]>),
}

/// `net`'s key: host bits cleared, a v4-mapped IPv6 network as the IPv4
/// network it denotes, addresses in network byte order.
pub(super) fn lpm_key(net: IpNet) -> LpmKey {
    match canonical_net(net) {
        IpNet::V4(n) => LpmKey::V4(Key::new(n.prefix_len().into(), v4_word(n.addr()))),
        IpNet::V6(n) => LpmKey::V6(Key::new(n.prefix_len().into(), v6_words(n.addr()))),
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Some(v4) = n.addr().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, n.prefix_len() - 96)
    {
        return IpNet::V4(v4net.trunc());
    }
    net.trunc()
}

fn exclude_ports(net: IpNet, ports: Option<BTreeSet<u16>>) -> Result<ExcludePorts, RedirectError> {
    let mut value = ExcludePorts::default();
    let Some(ports) = ports else {
        return Ok(value); // len 0: every port
    };
    if ports.len() > MAX_EXCLUDE_PORTS {
        return Err(RedirectError::TooManyPorts {
            net,
            count: ports.len(),
            max: MAX_EXCLUDE_PORTS,
        });
    }
    for (slot, port) in value.ports.iter_mut().zip(&ports) {
        *slot = *port;
    }
    value.len = ports.len() as u32; // <= MAX_EXCLUDE_PORTS
    Ok(value)
}

/// A map element command (`BPF_MAP_*_ELEM`) on `map` with `key` and
/// `value` as the kernel's `union bpf_attr` takes them; the raw syscall
/// result (0 on success, the error in `errno`).
///
/// # Safety
/// `key` must point at a live key of the map's key size, and `value` at a
/// value of the map's value size that is writable if the command writes it.
unsafe fn map_elem(cmd: libc::c_long, map: &MapData, key: u64, value: u64) -> libc::c_long {
    /// The `union bpf_attr` member the map element commands use.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key,
        value,
        flags: 0,
    };
    // SAFETY: the caller vouches for `key` and `value`; the kernel reads
    // `size_of::<MapElemAttr>()` bytes of attr (a prefix of `union
    // bpf_attr` it zero-extends).
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps since Linux 5.14): reads and
/// removes an entry in one syscall, so concurrent takers cannot both get it
/// and no lock is needed on the accept path. aya 0.14 only offers it for
/// queues and stacks. `Ok(None)` when the key is absent.
///
/// The caller guarantees `K` and `V` match the map's key and value sizes
/// (the maps are wrapped in size-checked aya `HashMap`s).
pub(super) fn lookup_and_delete<K: Pod, V: Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = MaybeUninit::<V>::uninit();
    // SAFETY: a live key and writable space for exactly one value.
    let ret = unsafe {
        map_elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            map,
            key as *const K as u64,
            value.as_mut_ptr() as u64,
        )
    };
    if ret == 0 {
        // SAFETY: the kernel filled the value on success; `V: Pod` is valid
        // for any bytes.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(err),
    }
}

/// Puts `socket` into the socket map `map` under `key` (`BPF_ANY`). aya's
/// `SockHash::insert` wants the map mutably; the syscall does not, and the
/// agent calls this from every accept with the maps shared.
pub(super) fn update_socket<K: Pod>(
    map: &MapData,
    key: &K,
    socket: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    // A socket map's value is the descriptor.
    update(map, key, &(socket.as_raw_fd() as u32))
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) through a shared map, as
/// [`update_socket`]. The caller guarantees `K` and `V` match the map's
/// key and value sizes.
pub(super) fn update<K: Pod, V: Pod>(map: &MapData, key: &K, value: &V) -> io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    // SAFETY: a live key and a live value, which the kernel only reads.
    let ret = unsafe {
        map_elem(
            BPF_MAP_UPDATE_ELEM,
            map,
            key as *const K as u64,
            value as *const V as u64,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Every key of `map` (`BPF_MAP_GET_NEXT_KEY` from the start), for maps
/// aya only offers to iterate mutably or not at all. Entries added or
/// removed meanwhile may or may not be seen, as with any map walk.
pub(super) fn keys<K: Pod>(map: &MapData) -> io::Result<Vec<K>> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut keys: Vec<K> = Vec::new();
    loop {
        let mut next = MaybeUninit::<K>::uninit();
        // A null key asks for the first one.
        let current = keys.last().map_or(0, |k| k as *const K as u64);
        // SAFETY: `current` is null or a live key; `next` is writable space
        // for exactly one key.
        let ret = unsafe { map_elem(BPF_MAP_GET_NEXT_KEY, map, current, next.as_mut_ptr() as u64) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOENT) => Ok(keys),
                _ => Err(err),
            };
        }
        // SAFETY: the kernel filled the key; `K: Pod` is valid for any bytes.
        keys.push(unsafe { next.assume_init() });
    }
}

/// `BPF_MAP_DELETE_ELEM`; `Ok(false)` when the key was not there.
pub(super) fn delete<K: Pod>(map: &MapData, key: &K) -> io::Result<bool> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    // SAFETY: a live key; no value.
    let ret = unsafe { map_elem(BPF_MAP_DELETE_ELEM, map, key as *const K as u64, 0) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn exclude(net: &str, ports: &[u16]) -> Exclude {
        Exclude {
            net: net.parse().unwrap(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn v4_is_stored_in_network_order() {
        let sa = sock_addr("10.1.2.3:80".parse().unwrap());
        assert_eq!(sa.family, FAMILY_V4);
        assert_eq!(sa.port, 80, "port stays in host order");
        assert_eq!(sa.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(sa.addr[1..], [0, 0, 0]);
    }

    #[test]
    fn v6_is_stored_in_network_order() {
        let sa = sock_addr("[fd00::1:2]:8443".parse().unwrap());
        assert_eq!(sa.family, FAMILY_V6);
        assert_eq!(sa.port, 8443);
        assert_eq!(sa.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(sa.addr[3].to_ne_bytes(), [0, 1, 0, 2]);
    }

    #[test]
    fn v4_mapped_client_is_keyed_as_v4() {
        let mapped = sock_addr("[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(mapped, sock_addr("127.0.0.1:40000".parse().unwrap()));
    }

    #[test]
    fn round_trips_and_unmaps_v4_mapped_destinations() {
        for addr in ["10.99.0.1:80", "[fd00:99::1]:443", "[fe80::1]:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(&sock_addr(addr)), Some(addr));
        }
        // What connect6 records for `::ffff:10.99.0.1`.
        let recorded = SockAddr {
            addr: v6_words("::ffff:10.99.0.1".parse().unwrap()),
            port: 80,
            family: FAMILY_V6,
        };
        assert_eq!(
            socket_addr(&recorded),
            Some("10.99.0.1:80".parse().unwrap())
        );
        let unknown = SockAddr {
            family: 1,
            ..recorded
        };
        assert_eq!(socket_addr(&unknown), None);
    }

    #[test]
    fn merges_exclusions_per_network() {
        let tables = exclude_tables(&[
            exclude("10.0.0.7/8", &[443, 80]),
            exclude("10.0.0.0/8", &[80, 8080]),
            exclude("192.168.0.0/16", &[53]),
            exclude("192.168.0.0/16", &[]),
            exclude("::ffff:172.16.0.0/108", &[22]),
            exclude("fd00::/8", &[]),
        ])
        .unwrap();
        let v4: Vec<_> = tables
            .v4
            .iter()
            .map(|(k, v)| {
                let ip = Ipv4Addr::from(k.data().to_ne_bytes());
                (
                    ip,
                    k.prefix_len(),
                    v.len,
                    v.ports[..v.len as usize].to_vec(),
                )
            })
            .collect();
        assert_eq!(
            v4,
            [
                (Ipv4Addr::new(10, 0, 0, 0), 8, 3, vec![80, 443, 8080]),
                (Ipv4Addr::new(172, 16, 0, 0), 12, 1, vec![22]),
                (Ipv4Addr::new(192, 168, 0, 0), 16, 0, vec![]),
            ]
        );
        assert_eq!(tables.v6.len(), 1);
        let (key, ports) = &tables.v6[0];
        assert_eq!(key.prefix_len(), 8);
        assert_eq!(key.data(), v6_words("fd00::".parse().unwrap()));
        assert_eq!(ports.len, 0);
    }

    #[test]
    fn rejects_too_many_ports() {
        let ports: Vec<u16> = (1..=17).collect();
        let err = exclude_tables(&[exclude("10.0.0.0/8", &ports)])
            .err()
            .expect("17 ports rejected");
        assert!(
            matches!(
                err,
                RedirectError::TooManyPorts {
                    count: 17,
                    max: 16,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_too_many_exclusions() {
        let many: Vec<Exclude> = (0..=MAX_EXCLUDES)
            .map(|i| exclude(&format!("10.{}.{}.0/24", i / 256, i % 256), &[]))
            .collect();
        let err = exclude_tables(&many).err().expect("257 networks rejected");
        assert!(
            matches!(err, RedirectError::TooManyExcludes { family: "IPv4", .. }),
            "{err}"
        );
    }
}
