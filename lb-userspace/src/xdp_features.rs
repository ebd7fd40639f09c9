//! What each network device can do with XDP, as the kernel reports it: the `netdev` generic
//! netlink family (`NETDEV_CMD_DEV_GET`, include/uapi/linux/netdev.h, kernel >= 6.3).
//!
//! The agent attaches native XDP only where the driver can transmit what the program returns
//! (`XDP_TX`, and redirects to other devices): a device advertises that with `ndo-xmit`. A veth
//! has it only while its peer has an XDP program or GRO (`veth_set_xdp_features`), since
//! `veth_xdp_xmit` needs NAPI on the peer; without it native frames are silently dropped.
//!
//! The framing is netlink-packet-generic's; the `netdev` family is not modelled by any crate,
//! so its two attributes are read here.
use std::collections::HashMap;

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkMessage, NetlinkPayload, NlasIterator, ParseableParametrized, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// `NETDEV_XDP_ACT_*` bits of `xdp-features`.
pub const XDP_BASIC: u64 = 1 << 0;
pub const XDP_REDIRECT: u64 = 1 << 1;
pub const XDP_NDO_XMIT: u64 = 1 << 2;

const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

#[derive(Debug, thiserror::Error)]
pub enum XdpFeaturesError {
    #[error("generic netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink family `netdev` not found (kernel older than 6.3?)")]
    NoFamily,
    #[error("netlink: {0}")]
    Decode(String),
    #[error("netlink error reply: {0}")]
    Kernel(String),
}

type Result<T> = std::result::Result<T, XdpFeaturesError>;

/// A `netdev` request or reply: the command and its attributes we read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct NetdevMsg {
    cmd: u8,
    ifindex: Option<u32>,
    xdp_features: Option<u64>,
}

impl GenlFamily for NetdevMsg {
    fn family_name() -> &'static str {
        "netdev"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevMsg {
    // Requests carry no attributes: a dump of every device.
    fn buffer_len(&self) -> usize {
        0
    }
    fn emit(&self, _buffer: &mut [u8]) {}
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> std::result::Result<Self, DecodeError> {
        let mut m = NetdevMsg { cmd: header.cmd, ..Default::default() };
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            let v = nla.value();
            match nla.kind() {
                NETDEV_A_DEV_IFINDEX if v.len() >= 4 => {
                    m.ifindex = Some(u32::from_ne_bytes(v[..4].try_into().unwrap()))
                }
                NETDEV_A_DEV_XDP_FEATURES if v.len() >= 8 => {
                    m.xdp_features = Some(u64::from_ne_bytes(v[..8].try_into().unwrap()))
                }
                _ => {}
            }
        }
        Ok(m)
    }
}

fn socket() -> Result<Socket> {
    let mut s = Socket::new(NETLINK_GENERIC).map_err(XdpFeaturesError::Socket)?;
    s.bind_auto().map_err(XdpFeaturesError::Socket)?;
    s.connect(&SocketAddr::new(0, 0)).map_err(XdpFeaturesError::Socket)?;
    Ok(s)
}

/// Sends one request and collects the replies until the kernel says done (or, without
/// NLM_F_DUMP, the first answer).
fn exchange<F>(s: &Socket, msg: GenlMessage<F>, dump: bool) -> Result<Vec<GenlMessage<F>>>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    nl.finalize();
    let mut tx = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut tx);
    s.send(&tx, 0).map_err(XdpFeaturesError::Socket)?;
    let mut out = Vec::new();
    loop {
        let mut rx = Vec::with_capacity(64 * 1024);
        let n = s.recv(&mut rx, 0).map_err(XdpFeaturesError::Socket)?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[off..n])
                .map_err(|e| XdpFeaturesError::Decode(e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(XdpFeaturesError::Kernel(format!("{e:?}"))),
                NetlinkPayload::InnerMessage(g) => {
                    out.push(g);
                    if !dump {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

fn family_id(s: &Socket) -> Result<u16> {
    let mut req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(NetdevMsg::family_name().to_string())],
    });
    req.finalize();
    let replies = exchange(s, req, false).map_err(|e| match e {
        XdpFeaturesError::Kernel(_) => XdpFeaturesError::NoFamily,
        e => e,
    })?;
    replies
        .iter()
        .flat_map(|g| g.payload.nlas.iter())
        .find_map(|a| if let GenlCtrlAttrs::FamilyId(id) = a { Some(*id) } else { None })
        .ok_or(XdpFeaturesError::NoFamily)
}

/// `xdp-features` of every device of the caller's network namespace, by ifindex.
pub fn all() -> Result<HashMap<u32, u64>> {
    let s = socket()?;
    let id = family_id(&s)?;
    let mut req = GenlMessage::from_payload(NetdevMsg { cmd: NETDEV_CMD_DEV_GET, ..Default::default() });
    req.set_resolved_family_id(id);
    req.finalize();
    Ok(exchange(&s, req, true)?
        .into_iter()
        .filter_map(|g| Some((g.payload.ifindex?, g.payload.xdp_features?)))
        .collect())
}

/// Whether a device's driver transmits native XDP frames (`XDP_TX` on it, redirects to it).
pub fn can_transmit(features: u64) -> bool {
    features & (XDP_BASIC | XDP_NDO_XMIT) == XDP_BASIC | XDP_NDO_XMIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_attributes_it_needs_and_skips_others() {
        // ifindex 7, an attribute we do not read, xdp-features BASIC|REDIRECT|NDO_XMIT.
        let mut buf = Vec::new();
        let mut nla = |kind: u16, v: &[u8]| {
            buf.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(v);
            while buf.len() % 4 != 0 {
                buf.push(0);
            }
        };
        nla(NETDEV_A_DEV_IFINDEX, &7u32.to_ne_bytes());
        nla(9, &[1, 2, 3]);
        nla(NETDEV_A_DEV_XDP_FEATURES, &7u64.to_ne_bytes());
        let m = NetdevMsg::parse_with_param(&buf, GenlHeader { cmd: NETDEV_CMD_DEV_GET, version: 1 }).unwrap();
        assert_eq!((m.ifindex, m.xdp_features), (Some(7), Some(7)));
        assert!(can_transmit(m.xdp_features.unwrap()));
        assert!(!can_transmit(XDP_BASIC | XDP_REDIRECT), "a veth whose peer has no NAPI");
    }

    #[test]
    fn reads_this_namespace_devices() {
        // Unprivileged and on every kernel >= 6.3: at least loopback is listed.
        match all() {
            Ok(m) => assert!(m.contains_key(&1), "{m:?}"),
            Err(XdpFeaturesError::NoFamily) => eprintln!("kernel without the netdev family"),
            Err(e) => panic!("{e}"),
        }
    }
}

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut DrvInfo,
    _pad: [u8; 16],
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// The device's driver and bus address (`ethtool -i`), in the caller's network namespace. A
/// virtual device (veth, bridge, tunnel) has no bus address. One ioctl, still through libc:
/// neither nix nor rustix wraps the ethtool ioctl, and the ethtool netlink family has no
/// driver-info request.
pub fn driver_info(iface: &str) -> Option<(String, String)> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd as _;
    if iface.len() >= 16 {
        return None;
    }
    // Any socket will do: the ioctl only needs one to reach the device's driver. Closed on drop.
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).ok()?;
    // SAFETY: all-zero is a valid value of these plain structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq { name: [0; 16], data: &mut info, _pad: [0; 16] };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a drvinfo we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    drop(sock);
    if rc != 0 {
        return None;
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(&[])).into_owned();
    Some((text(&info.driver), text(&info.bus_info)))
}

#[cfg(test)]
mod driver_tests {
    #[test]
    fn loopback_has_no_bus_address() {
        // Loopback answers GDRVINFO on some kernels and not on others; either way no bus.
        if let Some((_, bus)) = super::driver_info("lo") {
            assert!(bus.is_empty());
        }
        assert!(super::driver_info("no-such-device0").is_none());
    }
}
