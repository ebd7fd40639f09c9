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
    parse::{ptr_at, Flow, Frag, Headers, ETH_LEN},
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
pub fn snat_for(svc: &ServiceValue, backend: &Backend, flow: &Flow, now: u32) -> Snat {
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

/// Ones' complement addition of 32-bit partial sums (the kernel's `csum_add`).
#[inline(always)]
pub fn wsum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// What replacing `old` by `new` adds to a checksum, as a 32-bit partial sum.
#[inline(always)]
fn diff32(old: u32, new: u32) -> u32 {
    wsum_add(!old, new)
}

#[inline(always)]
fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// Folds a 32-bit partial sum to 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Rewrites the packet's source to `src` and destination to `dst` (address, port; network
/// order; an end that does not change is passed as it is). Both ends change in one go, with
/// one update of each checksum: the IP header's by hand, the L4 checksum through the hook
/// (`Packet::l4_csum`), with the address part (the pseudo-header) and the port part kept
/// apart as a CHECKSUM_PARTIAL packet needs. Errors carry the helper's return code. A later
/// fragment has no L4 header: only its IP header changes (the first fragment's L4 checksum
/// covers the whole datagram and was updated with it).
#[inline(always)]
pub fn rewrite<P: Packet>(ctx: &P, h: &Headers, src: (u32, u16), dst: (u32, u16)) -> Result<(), i64> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (old_src, old_dst) = (h.flow.src, h.flow.dst);
    let (Some(ip_src), Some(ip_dst), Some(ip_csum)) = (
        ptr_at::<u32>(data, data_end, IP_SRC_OFF),
        ptr_at::<u32>(data, data_end, IP_DST_OFF),
        ptr_at::<u16>(data, data_end, IP_CSUM_OFF),
    ) else {
        return Err(-1);
    };
    let addr_diff = wsum_add(diff32(old_src, src.0), diff32(old_dst, dst.0));
    // SAFETY: each pointer was bounds-checked above; writes happen before any helper that
    // could move packet data.
    unsafe {
        ip_src.write_unaligned(src.0);
        ip_dst.write_unaligned(dst.0);
        let c = ip_csum.read_unaligned();
        ip_csum.write_unaligned(!fold(wsum_add(!c as u32, addr_diff)));
    }
    if h.frag == Frag::Later {
        return Ok(());
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx.data(), ctx.data_end(), h.l4_off) else {
        return Err(-1);
    };
    // SAFETY: bounds-checked above.
    unsafe { ports.write_unaligned([src.1, dst.1]) };
    let udp = h.flow.proto != PROTO_TCP;
    if udp && h.udp_csum_zero {
        // RFC 768: zero means "no checksum"; it must stay zero.
        return Ok(());
    }
    let port_diff = diff16(h.flow.sport, src.1) + diff16(h.flow.dport, dst.1);
    let csum_off = h.l4_off + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    ctx.l4_csum(csum_off, addr_diff, port_diff, udp)
}

const IP_TTL_OFF: usize = ETH_LEN + 8;

/// Whether a packet may be forwarded by the datapath itself (a router's rule: TTL above 1).
#[inline(always)]
pub fn ttl_ok<P: Packet>(ctx: &P) -> bool {
    match ptr_at::<u8>(ctx.data(), ctx.data_end(), IP_TTL_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(ttl) => (unsafe { *ttl }) > 1,
        None => false,
    }
}

/// Decrements the TTL of a packet the datapath forwards itself, as the stack's `ip_forward`
/// would have (it never sees these packets), with the header checksum (RFC 1624).
#[inline(always)]
pub fn decrement_ttl<P: Packet>(ctx: &P) {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(word), Some(ip_csum)) =
        (ptr_at::<u16>(data, data_end, IP_TTL_OFF), ptr_at::<u16>(data, data_end, IP_CSUM_OFF))
    else {
        return;
    };
    // SAFETY: bounds checked above. The TTL is the first byte of the word it shares with the
    // protocol, so in memory order decrementing it subtracts 1 from that byte.
    unsafe {
        let old = word.read_unaligned();
        let mut b = old.to_ne_bytes();
        b[0] = b[0].wrapping_sub(1);
        let new = u16::from_ne_bytes(b);
        word.write_unaligned(new);
        ip_csum.write_unaligned(csum_replace2(ip_csum.read_unaligned(), old, new));
    }
}
