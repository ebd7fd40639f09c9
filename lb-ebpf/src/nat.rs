//! Stage 5: rewrite addresses and ports, with incremental checksum updates, and decide SNAT.
//!
//! The IPv4 header checksum is always complete, so it is patched by hand (RFC 1624). The L4
//! checksum is the hook's business (`ctx::Packet::l4_csum`): at tc a locally generated packet
//! is often CHECKSUM_PARTIAL, its checksum field holding only the pseudo-header sum that the
//! device (or veth peer) finishes, and only `bpf_l4_csum_replace` with BPF_F_PSEUDO_HDR updates
//! such a field correctly; a hand-written update would corrupt every offloaded packet. XDP
//! sees frames from a wire, whose checksums are complete, and patches them by hand.
use lb_common::{Backend, ServiceValue, BACKEND_FLAG_LOCAL, PROTO_TCP, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY};

use crate::{
    conntrack,
    ctx::Packet,
    parse::{ptr_at, Flow, Headers, ETH_LEN},
};

/// The node's address (network order) that external flows to remote backends are SNATed to,
/// so the backend's node sends replies back through us. Set by the agent at load time; zero
/// means unknown, and such flows then keep the client's address.
#[no_mangle]
static NODE_IP: u32 = 0;
/// Source given to hairpin flows (a pod reaching itself through a Service): the pod must see
/// another address than its own, or its reply never leaves it. 169.254.42.1, as Cilium uses.
#[no_mangle]
static HAIRPIN_IP: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

#[inline(always)]
fn global(v: &'static u32) -> u32 {
    // SAFETY: reading a static; volatile so the compiler keeps the load the loader patches.
    unsafe { core::ptr::read_volatile(v) }
}

/// Whether a new flow to `backend` needs its source rewritten too.
pub enum Snat {
    No,
    /// To this address and port; `true` when that address is the node's own.
    To(u32, u16, bool),
    /// It needs SNAT but no port is free.
    Exhausted,
}

#[inline(always)]
pub fn snat_for(svc: &ServiceValue, backend: &Backend, flow: &Flow, now: u64) -> Snat {
    if backend.addr[0] == flow.src {
        // Hairpin: the client's own port keeps reply keys unique, as the backend is the
        // client itself.
        return Snat::To(global(&HAIRPIN_IP), flow.sport, false);
    }
    let external_to_remote = svc.flags & SVC_FLAG_EXTERNAL != 0
        && svc.flags & SVC_FLAG_LOCAL_ONLY == 0
        && backend.flags & BACKEND_FLAG_LOCAL == 0;
    if !external_to_remote {
        return Snat::No;
    }
    let node_ip = global(&NODE_IP);
    if node_ip == 0 {
        return Snat::No;
    }
    match conntrack::free_snat_port(flow, node_ip, backend.addr[0], backend.port, now) {
        Some(port) => Snat::To(node_ip, port, true),
        None => Snat::Exhausted,
    }
}

const IP_SRC_OFF: usize = ETH_LEN + 12;
const IP_DST_OFF: usize = ETH_LEN + 16;
const IP_CSUM_OFF: usize = ETH_LEN + 10;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination: client -> frontend becomes client -> backend.
    Dst,
    /// Source: backend -> client becomes frontend -> client.
    Src,
}

/// Ones' complement update of a 16-bit checksum for a 16-bit field change (RFC 1624 eqn. 3).
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Ones' complement update of a 16-bit checksum for a 32-bit field change (RFC 1624 eqn. 3).
/// Works on values in memory order: ones' complement sums are byte-order independent.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites one end of the packet to `addr:port` (network order). Errors carry the helper's
/// return code.
#[inline(always)]
pub fn rewrite<P: Packet>(ctx: &P, h: &Headers, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (ip_off, port_off, old_addr, old_port) = match side {
        Side::Dst => (IP_DST_OFF, h.l4_off + 2, h.flow.dst, h.flow.dport),
        Side::Src => (IP_SRC_OFF, h.l4_off, h.flow.src, h.flow.sport),
    };
    let (Some(ip_addr), Some(ip_csum), Some(l4_port)) = (
        ptr_at::<u32>(data, data_end, ip_off),
        ptr_at::<u16>(data, data_end, IP_CSUM_OFF),
        ptr_at::<u16>(data, data_end, port_off),
    ) else {
        return Err(-1);
    };
    // SAFETY: each pointer was bounds-checked above; writes happen before any helper that
    // could move packet data.
    unsafe {
        ip_addr.write_unaligned(addr);
        ip_csum.write_unaligned(csum_replace4(ip_csum.read_unaligned(), old_addr, addr));
        l4_port.write_unaligned(port);
    }
    let udp = h.flow.proto != PROTO_TCP;
    if udp && h.udp_csum_zero {
        // RFC 768: zero means "no checksum"; it must stay zero.
        return Ok(());
    }
    let csum_off = h.l4_off + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    ctx.l4_csum(csum_off, (old_addr, addr), (old_port, port), udp)
}
