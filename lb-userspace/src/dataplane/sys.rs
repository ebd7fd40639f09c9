//! System calls the dataplane needs that aya does not make: bpffs, the network namespace's
//! cookie, addresses and interfaces, mappings of mmapable arrays (through nix, except
//! `SO_NETNS_COOKIE`, which it lacks).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use super::{DataplaneError, Result};

/// Maps the first `bytes` of an mmapable array's values (`BPF_F_MMAPABLE`), shared and
/// writable: the kernel lays the elements out one after another, each of the value's size
/// rounded up to 8 bytes (`array_map_alloc`). An array created without the flag is refused
/// (EINVAL), and so is an empty mapping.
pub(super) fn mmap_array(map: &aya::maps::MapData, bytes: usize) -> nix::Result<std::ptr::NonNull<u8>> {
    use nix::sys::mman::{MapFlags, ProtFlags};
    use std::os::fd::AsFd;
    let bytes = std::num::NonZeroUsize::new(bytes).ok_or(nix::errno::Errno::EINVAL)?;
    // SAFETY: a new shared mapping of the map's file descriptor, placed by the kernel; the
    // kernel checks the length against the array's size.
    let ptr = unsafe {
        nix::sys::mman::mmap(
            None,
            bytes,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            map.fd().as_fd(),
            0,
        )
    }?;
    Ok(ptr.cast())
}

/// statfs magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);

pub(super) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

pub(super) fn mount_bpffs(path: &Path) -> Result<()> {
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(|e| {
        DataplaneError::Io { what: "mounting bpffs at", path: path.to_owned(), source: std::io::Error::from(e) }
    })
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14; nix has no wrapper for it).
pub(super) fn netns_cookie() -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    let err =
        |source| DataplaneError::Io { what: "reading the cookie of", path: "this network namespace".into(), source };
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err(std::io::Error::from(e)))?;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, into a u64 of the length given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// An error and all its causes on one line: aya's errors keep the OS error in `source()`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// IPv4 addresses of the current network namespace (`getifaddrs(3)`).
pub fn local_ipv4_addresses() -> Result<Vec<Ipv4Addr>> {
    Ok(local_ipv4_by_interface()?.into_iter().map(|(_, ip)| ip).collect())
}

/// (interface, IPv4 address) pairs of the current network namespace.
pub fn local_ipv4_by_interface() -> Result<Vec<(String, Ipv4Addr)>> {
    Ok(local_addresses()?
        .into_iter()
        .filter_map(|(i, ip)| match ip {
            IpAddr::V4(a) => Some((i, a)),
            IpAddr::V6(_) => None,
        })
        .collect())
}

/// (interface, IPv6 address) pairs of the current network namespace.
pub fn local_ipv6_by_interface() -> Result<Vec<(String, Ipv6Addr)>> {
    Ok(local_addresses()?
        .into_iter()
        .filter_map(|(i, ip)| match ip {
            IpAddr::V6(a) => Some((i, a)),
            IpAddr::V4(_) => None,
        })
        .collect())
}

/// (interface, address) pairs of the current network namespace, both families.
pub fn local_addresses() -> Result<Vec<(String, IpAddr)>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| DataplaneError::Io {
        what: "listing addresses of",
        path: PathBuf::from("this network namespace"),
        source: std::io::Error::from(e),
    })?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address.as_ref()?;
            let ip: IpAddr = match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
                (Some(v4), _) => v4.ip().into(),
                (_, Some(v6)) => v6.ip().into(),
                _ => return None,
            };
            Some((a.interface_name, ip))
        })
        .collect())
}

/// Whether node ports may answer on `ip`: not loopback, and not an IPv6 link-local address
/// (scoped to one link, so the same address may be on several interfaces; kube-proxy's node
/// port addresses leave them out too).
pub fn node_port_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local() && !a.is_unspecified(),
    }
}

/// Interfaces with 802.1Q VLAN devices on top, in the caller's network namespace: the third
/// column of `/proc/net/vlan/config` (`eth0.100 | 100 | eth0`), which the kernel's 8021q
/// module keeps per namespace (`/proc/thread-self`: the calling thread's namespace). Without
/// that module there are no VLAN devices, and no file; a file that cannot be read is logged
/// and taken as none. Only a VLAN's own parent is named: a VLAN on a bond names the bond, not
/// the NICs under it.
pub fn vlan_parents() -> std::collections::BTreeSet<String> {
    match std::fs::read_to_string("/proc/thread-self/net/vlan/config") {
        Ok(text) => parse_vlan_config(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/net/vlan/config: VLAN devices not known");
            Default::default()
        }
    }
}

fn parse_vlan_config(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            // From the right: a VLAN device's name may hold a `|` (its parent's too, which no
            // reading of this table could tell apart).
            let mut cols = l.rsplitn(3, '|').map(str::trim);
            let (parent, id, _name) = (cols.next()?, cols.next()?, cols.next()?);
            (id.parse::<u16>().is_ok() && !parent.is_empty()).then(|| parent.to_string())
        })
        .collect()
}

/// Interfaces of the current network namespace, by name and index (`if_nameindex(3)`, which
/// asks netlink, so it is right inside `ip netns exec` or `nsenter --net`).
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    let list = nix::net::if_::if_nameindex().map_err(|e| DataplaneError::Io {
        what: "listing interfaces of",
        path: PathBuf::from("this network namespace"),
        source: std::io::Error::from(e),
    })?;
    Ok(list.iter().map(|i| (i.name().to_string_lossy().into_owned(), i.index())).collect())
}

/// What a device puts in front of the IP header, which decides the programs it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// An Ethernet header (`ARPHRD_ETHER`: NICs, veths, bridges, VLANs, bonds, VXLAN; and
    /// loopback, whose header is an all-zero Ethernet one).
    Ethernet,
    /// None: the packet starts with its IP header (tun, WireGuard, IPIP, GRE, SIT and IPv6
    /// tunnels, PPP, raw-IP modems), so it gets `lb_common::PROG_TC_INGRESS_L3` and
    /// `lb_common::PROG_TC_EGRESS_L3`.
    L3,
    /// Another link layer (InfiniBand, say): the programs cannot parse it.
    Other(u16),
}

impl LinkKind {
    /// From the device's hardware type (`ARPHRD_*` in include/uapi/linux/if_arp.h).
    pub fn of_arphrd(ty: u16) -> Self {
        const ETHER: u16 = 1;
        const PPP: u16 = 512;
        const RAWIP: u16 = 519;
        const TUNNEL: u16 = 768;
        const TUNNEL6: u16 = 769;
        const LOOPBACK: u16 = 772;
        const SIT: u16 = 776;
        const IPGRE: u16 = 778;
        const IP6GRE: u16 = 823;
        const NONE: u16 = 0xfffe;
        match ty {
            ETHER | LOOPBACK => LinkKind::Ethernet,
            PPP | RAWIP | TUNNEL | TUNNEL6 | SIT | IPGRE | IP6GRE | NONE => LinkKind::L3,
            other => LinkKind::Other(other),
        }
    }
}

/// The hardware types of `names` in the caller's network namespace (`SIOCGIFHWADDR`, whose
/// address family is the `ARPHRD_*` type; what `ip link` shows as `link/ether`, `link/none`,
/// `link/ipip`); a device gone since it was listed is left out. `Err` when a type cannot be
/// read otherwise: the caller then changes no link, rather than take a device it could not
/// classify for one it must leave. Ioctls through libc: nix has no wrapper for this one, and
/// the rtnetlink link dump would be a request/response exchange for one field.
pub fn link_kinds<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<HashMap<String, LinkKind>> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd as _;
    /// `struct ifreq` with `ifr_hwaddr` (a `struct sockaddr`) in its 24-byte union.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        family: u16,
        rest: [u8; 22],
    }
    const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
    let err = |source: std::io::Error| DataplaneError::Io {
        what: "reading the link types of the interfaces of",
        path: PathBuf::from("this network namespace"),
        source,
    };
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| err(std::io::Error::from(e)))?;
    let mut kinds = HashMap::new();
    for name in names {
        if name.len() >= 16 {
            continue;
        }
        let mut req = IfReq { name: [0; 16], family: 0, rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFHWADDR with a valid ifreq we own, large enough for the kernel's.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFHWADDR as _, &mut req) } == 0 {
            kinds.insert(name.clone(), LinkKind::of_arphrd(req.family));
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODEV) {
            return Err(err(e));
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod vlan_tests {
    #[test]
    fn vlan_parents_are_read_from_the_kernels_table() {
        let text = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n\
                    eth0.100       | 100  | eth0\nbond0.7        | 7  | bond0\neth0.200       | 200  | eth0\n\
                    odd|vlan       | 9  | eth1\n";
        let parents: Vec<String> = super::parse_vlan_config(text).into_iter().collect();
        assert_eq!(parents, ["bond0", "eth0", "eth1"]);
        assert!(super::parse_vlan_config("").is_empty());
    }
}

#[cfg(test)]
mod link_kind_tests {
    use super::LinkKind;

    #[test]
    fn hardware_types_map_to_the_programs_that_can_parse_them() {
        assert_eq!(LinkKind::of_arphrd(1), LinkKind::Ethernet);
        assert_eq!(LinkKind::of_arphrd(772), LinkKind::Ethernet, "loopback: a zero Ethernet header");
        // tun and WireGuard, IPIP (tunl0), GRE, SIT, ip6tnl, ip6gre, raw IP, PPP.
        for ty in [0xfffe, 768, 778, 776, 769, 823, 519, 512] {
            assert_eq!(LinkKind::of_arphrd(ty), LinkKind::L3, "{ty}");
        }
        assert_eq!(LinkKind::of_arphrd(32), LinkKind::Other(32), "InfiniBand");
    }

    #[test]
    fn reads_the_loopback_devices_type_and_leaves_out_a_device_that_is_gone() {
        let names = ["lo".to_string(), "no-such-device0".to_string()];
        let kinds = super::link_kinds(&names).expect("an ioctl on a socket of this namespace");
        assert_eq!(kinds.into_iter().collect::<Vec<_>>(), [("lo".to_string(), LinkKind::Ethernet)]);
    }
}
