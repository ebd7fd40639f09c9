//! Stage 5: rewrite addresses and ports, with incremental checksum updates, and decide SNAT.
//!
//! The IPv4 header checksum is always complete, so it is patched by hand (RFC 1624). The L4
//! checksum is the hook's business (`ctx::Packet::l4_csum`): at tc a locally generated packet
//! is often CHECKSUM_PARTIAL, its checksum field holding only the pseudo-header sum that the
//! device (or veth peer) finishes, and only `bpf_l4_csum_replace` with BPF_F_PSEUDO_HDR updates
//! such a field correctly; a hand-written update of the whole would corrupt every offloaded
//! packet (tc adds only the port part by hand, and only where the field shows the packet is not
//! partial). XDP sees frames from a wire, whose checksums are complete, and patches them by
//! hand.
use lb_common::{Backend, ServiceValue, BACKEND_FLAG_LOCAL, PROTO_TCP, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY};

use crate::{
    addr::{wsum_add, Addr},
    conntrack,
    ctx::Packet,
    mem,
    parse::{ptr_at, Flow, Frag, Headers},
};

/// Whether a new flow to `backend` needs its source rewritten too.
pub enum Snat<A> {
    No,
    /// To this address and port; `true`: the flow's packets are routed by the datapath both
    /// ways (the node's address, which the stack would drop as a martian; the hairpin one).
    To(A, u16, bool),
    /// It needs SNAT but no port is free.
    Exhausted,
}

/// Families whose ClusterIP traffic from outside the cluster is SNATed to the node on its
/// way to a remote backend (bit 0 IPv4, bit 1 IPv6): those `--cluster-cidr` names, written by
/// the agent at load time. Without a cluster CIDR the datapath cannot tell a pod from an
/// outside client, as kube-proxy cannot (its `ClusterCIDR` local detection).
#[no_mangle]
static SNAT_OFF_CLUSTER: u32 = 0;

/// Whether a flow to a ClusterIP comes from outside the cluster: a client beyond the nodes, to
/// which a routed or advertised service CIDR leads. A remote backend would answer it
/// directly, past this node's reverse NAT, so it is SNATed as a node port's client is.
#[inline(always)]
fn off_cluster<A: Addr>(flow: &Flow<A>) -> bool {
    let bit = if A::FAMILY == lb_common::FAMILY_IPV4 { 1 } else { 2 };
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let families = unsafe { core::ptr::read_volatile(&SNAT_OFF_CLUSTER) };
    families & bit != 0 && !crate::service::from_cluster(flow)
}

#[inline(always)]
pub fn snat_for<A: Addr>(svc: &ServiceValue, backend: &Backend, flow: &Flow<A>, now: u32) -> Snat<A> {
    let backend_addr = A::from_words(backend.addr);
    if backend_addr == flow.src {
        // Hairpin: the client's own port keeps reply keys unique, as the backend is the
        // client itself. Routed both ways by the datapath (`true`): through the stack, the
        // pod's netfilter conntrack would see the flow as hairpin -> pod one way and the
        // frontend -> pod the other, and call the SYN-ACK INVALID.
        return Snat::To(A::hairpin_ip(), flow.sport, true);
    }
    if backend.flags & BACKEND_FLAG_LOCAL != 0 {
        return Snat::No;
    }
    // A remote backend: an external frontend's clients are SNATed unless its policy is
    // Local; a ClusterIP's only if they come from outside the cluster (the source check last:
    // it is an LPM lookup).
    let snat =
        if svc.flags & SVC_FLAG_EXTERNAL != 0 { svc.flags & SVC_FLAG_LOCAL_ONLY == 0 } else { off_cluster(flow) };
    if !snat {
        return Snat::No;
    }
    let node_ip = A::node_ip();
    if node_ip.is_zero() {
        return Snat::No;
    }
    match conntrack::free_snat_port(flow, node_ip, backend_addr, backend.port, now) {
        Some(port) => Snat::To(node_ip, port, true),
        None => Snat::Exhausted,
    }
}

/// Whether a backend's packet `h` is addressed to one of the addresses flows are SNATed to
/// (the node's, the hairpin address): only such replies are translated where they arrive,
/// before the stack, which would deliver them here; the others go on to the egress program.
/// Two compares, no lookup. A node address the agent no longer SNATs to (another `--node-ip`
/// after a restart) is not one: the replies of flows SNATed to it before are left to the stack.
#[inline(always)]
pub fn to_snat_addr<A: Addr, P: Packet>(ctx: &P) -> bool {
    // The destination is read again from the packet rather than compared in the registers
    // the rest of the reply path uses: the loader's addresses are constants to the verifier,
    // so that compare taught it the address on each path that goes on, and it explored the
    // whole reply path once per constant (IPv4: past 1,000,000 instructions; IPv6: LLVM's
    // spills around it were refused). A fresh load is dead after the compare.
    let p = if A::FAMILY == lb_common::FAMILY_IPV4 {
        ptr_at::<u32>(ctx.data(), ctx.data_end(), P::L2 + A::DST_OFF)
    } else {
        ptr_at::<[u32; 4]>(ctx.data(), ctx.data_end(), P::L2 + A::DST_OFF).map(|p| p as *mut u32)
    };
    let Some(p) = p else {
        return false;
    };
    let words = if A::FAMILY == lb_common::FAMILY_IPV4 { 1 } else { 4 };
    let (node, hairpin) = (A::node_ip().words(), A::hairpin_ip().words());
    let (mut is_node, mut is_hairpin) = (true, true);
    for i in 0..words {
        // SAFETY: within the 16 bytes checked above.
        let w = unsafe { core::ptr::read_volatile(p.add(i)) };
        is_node &= w == node[i];
        is_hairpin &= w == hairpin[i];
    }
    is_node || is_hairpin
}

/// The IPv4 header checksum's offset in the IP header (IPv6 has none).
const IP_CSUM_OFF: usize = 10;
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
pub fn rewrite<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, src: (A, u16), dst: (A, u16)) -> Result<(), i64> {
    rewrite_ends::<A, P, true>(ctx, h, src, dst)
}

/// `rewrite` of the destination alone (a DNAT: most tracked flows), so that the source's
/// unchanged address and port cost no stores and no checksum arithmetic.
#[inline(always)]
pub fn rewrite_dst<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, dst: (A, u16)) -> Result<(), i64> {
    rewrite_ends::<A, P, false>(ctx, h, (h.flow.src, h.flow.sport), dst)
}

/// `rewrite`, with the source left as it is unless `SRC`.
#[inline(always)]
fn rewrite_ends<A: Addr, P: Packet, const SRC: bool>(
    ctx: &P,
    h: &Headers<A>,
    src: (A, u16),
    dst: (A, u16),
) -> Result<(), i64> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (old_src, old_dst) = (h.flow.src, h.flow.dst);
    let (Some(ip_src), Some(ip_dst)) =
        (ptr_at::<A>(data, data_end, P::L2 + A::SRC_OFF), ptr_at::<A>(data, data_end, P::L2 + A::DST_OFF))
    else {
        return Err(-1);
    };
    // Asked of the packet as it arrived, before any store: the stores are opaque to LLVM,
    // which then loads `data` from the context again, a pointer the verifier knows no bound of.
    // (IPv4's only: in IPv6's stages, whose registers are few, the value kept across the
    // rewrite changed LLVM's spills into ones the verifier refuses.)
    let by_hand = if A::FAMILY == lb_common::FAMILY_IPV4 && h.frag != Frag::Later {
        ctx.ports_by_hand(h, h.l4_off + if h.flow.proto != PROTO_TCP { UDP_CSUM_OFF } else { TCP_CSUM_OFF })
    } else {
        0
    };
    let dst_diff = A::csum_diff(old_dst, dst.0);
    let addr_diff = if SRC { wsum_add(A::csum_diff(old_src, src.0), dst_diff) } else { dst_diff };
    // SAFETY: each pointer was bounds-checked above; writes happen before any helper that
    // could move packet data.
    unsafe {
        if SRC {
            src.0.write(ip_src as *mut u8);
        }
        dst.0.write(ip_dst as *mut u8);
    }
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        let Some(ip_csum) = ptr_at::<u16>(data, data_end, P::L2 + IP_CSUM_OFF) else {
            return Err(-1);
        };
        // SAFETY: bounds-checked above.
        unsafe {
            let c = mem::load16::<0>(ip_csum as usize);
            mem::store16::<0>(ip_csum as usize, !fold(wsum_add(!c as u32, addr_diff)));
        }
    }
    if h.frag == Frag::Later {
        return Ok(());
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx.data(), ctx.data_end(), h.l4_off) else {
        return Err(-1);
    };
    // SAFETY: bounds-checked above.
    unsafe {
        if SRC {
            mem::store32::<0>(ports as usize, src.1 as u32 | (dst.1 as u32) << 16);
        } else {
            mem::store16::<2>(ports as usize, dst.1);
        }
    }
    let udp = h.flow.proto != PROTO_TCP;
    if udp && h.udp_csum_zero {
        // RFC 768: zero means "no checksum"; it must stay zero.
        return Ok(());
    }
    let dport_diff = diff16(h.flow.dport, dst.1);
    let port_diff = if SRC { diff16(h.flow.sport, src.1) + dport_diff } else { dport_diff };
    // The offset IPv4's `by_hand` was given above, chosen again here rather than once for both:
    // computed before the stores, it stayed live across them, and LLVM's spills for it in
    // IPv6's reply stage were ones the verifier refuses ("R4 !read_ok").
    let csum_off = h.l4_off + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    ctx.l4_csum::<A>(csum_off, addr_diff, port_diff, udp, by_hand)
}

/// Whether a packet may be forwarded by the datapath itself (a router's rule: TTL, or IPv6's
/// hop limit, above 1).
#[inline(always)]
pub fn ttl_ok<A: Addr, P: Packet>(ctx: &P) -> bool {
    match ptr_at::<u8>(ctx.data(), ctx.data_end(), P::L2 + A::TTL_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(ttl) => (unsafe { *ttl }) > 1,
        None => false,
    }
}

/// Decrements the TTL of a packet the datapath forwards itself, as the stack's `ip_forward`
/// would have (it never sees these packets), with the header checksum (RFC 1624).
#[inline(always)]
pub fn decrement_ttl<A: Addr, P: Packet>(ctx: &P) {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        // IPv6: the hop limit, and no header checksum.
        if let Some(hop) = ptr_at::<u8>(data, data_end, P::L2 + A::TTL_OFF) {
            // SAFETY: bounds checked by ptr_at.
            unsafe { *hop = (*hop).wrapping_sub(1) };
        }
        return;
    }
    let (Some(word), Some(ip_csum)) =
        (ptr_at::<u16>(data, data_end, P::L2 + A::TTL_OFF), ptr_at::<u16>(data, data_end, P::L2 + IP_CSUM_OFF))
    else {
        return;
    };
    // SAFETY: bounds checked above. The TTL is the first byte of the word it shares with the
    // protocol, so in memory order decrementing it subtracts 1 from that byte.
    unsafe {
        let (word, ip_csum) = (word as usize, ip_csum as usize);
        let old = mem::load16::<0>(word);
        let mut b = old.to_ne_bytes();
        b[0] = b[0].wrapping_sub(1);
        let new = u16::from_ne_bytes(b);
        mem::store16::<0>(word, new);
        mem::store16::<0>(ip_csum, csum_replace2(mem::load16::<0>(ip_csum), old, new));
    }
}
