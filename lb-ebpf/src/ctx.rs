//! What differs between the hooks the pipeline runs at.
//!
//! tc sees skbs: the L4 checksum's address part goes through `bpf_l4_csum_replace` (right
//! for CHECKSUM_PARTIAL packets from local senders and for CHECKSUM_COMPLETE skbs), its port
//! part too unless the field shows the packet is not partial (`TcContext::l4_csum`), and a
//! refusal is built in place. XDP sees raw frames from a wire, whose checksums are complete,
//! so it patches them by hand; it leaves refusals to the tc program behind it on the same
//! interface, which builds the ICMP error with skb helpers XDP does not have.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_tail_call,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::Counter;

use crate::{
    addr::{wsum_add, Addr},
    mem,
    nat::fold,
    parse::{ptr_at, Frag, Headers},
    reject,
    stats::count,
};

/// Where a packet the datapath routes itself goes.
pub struct Route {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

impl Route {
    /// No route: a value with every byte defined, for paths that send nothing.
    pub const NONE: Route = Route { ifindex: 0, smac: [0; 6], dmac: [0; 6] };
}

/// Why a packet could not be routed: `mtu` is the egress interface's MTU when the packet was
/// too big for it (`BPF_FIB_LKUP_RET_FRAG_NEEDED`), else 0 (no route, or this hook cannot
/// send there).
pub struct NoRoute {
    pub mtu: u16,
}

/// FIB lookup for `src -> dst` (protocol `proto`), as if it arrived on `ifindex`. `fits`:
/// whether the packet's IP length fits an MTU (asked only without `tot_len`, see below).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fib<A: Addr>(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    src: A,
    dst: A,
    proto: u8,
    tot_len: u16,
    flags: u32,
    fits: impl FnOnce(u16) -> bool,
) -> Result<Route, NoRoute> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = A::AF;
    p.l4_protocol = proto;
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = tot_len;
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        p.__bindgen_anon_3.ipv4_src = src.words()[0];
        p.__bindgen_anon_4.ipv4_dst = dst.words()[0];
    } else {
        p.__bindgen_anon_3.ipv6_src = src.words();
        p.__bindgen_anon_4.ipv6_dst = dst.words();
    }
    // SAFETY: helper call with a stack buffer of the size we pass.
    let rc = unsafe { fib_lookup(ctx, &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, flags) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the union's output member on this return code (`bpf_skb_fib_lookup`).
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        // Without `tot_len` the kernel refused after a successful lookup, weighing the skb,
        // link-layer header included, against the way out's MTU plus that device's own
        // header (`is_skb_forwardable`; `params->ifindex` is the way out): a packet with an
        // Ethernet header (from an Ethernet device, or given one by `lb_tc_ingress_l3`) bound
        // for a device without one (a tunnel) is 14 bytes heavier than what that device will
        // send, as `bpf_redirect_neigh` strips the header. One whose IP length fits the MTU
        // goes; a larger one stays refused (the caller answers it).
        if tot_len == 0 && fits(mtu) {
            return Ok(Route { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac });
        }
        return Err(NoRoute { mtu });
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(NoRoute { mtu: 0 });
    }
    Ok(Route { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac })
}

/// The IP packet's length with its header (IPv4's total length, IPv6's payload length plus
/// the fixed header), for the FIB lookup's MTU check and the pseudo-header.
#[inline(always)]
fn ip_tot_len<A: Addr>(data: usize, data_end: usize, l2: usize) -> u16 {
    let Some(p) = ptr_at::<[u8; 6]>(data, data_end, l2) else {
        return 0;
    };
    let p = p as usize;
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        // SAFETY: bounds checked by ptr_at.
        u16::from_be(unsafe { mem::load16::<2>(p) })
    } else {
        // SAFETY: bounds checked by ptr_at.
        u16::from_be(unsafe { mem::load16::<4>(p) }).wrapping_add(A::IP_LEN as u16)
    }
}

/// The folded sum of `h`'s pseudo-header, which a CHECKSUM_PARTIAL skb's L4 checksum field
/// holds (what `__tcp_v4_send_check` and `udp4_hwcsum` store; the device or the GSO code sums
/// the rest). A complete checksum has that value once in 65,536 packets.
#[inline(always)]
fn pseudo_sum<A: Addr>(data: usize, data_end: usize, l2: usize, h: &Headers<A>) -> u16 {
    let l4_len = ip_tot_len::<A>(data, data_end, l2).wrapping_sub((h.l4_off - l2) as u16);
    let (src, dst) = (h.flow.src.words(), h.flow.dst.words());
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        sum += (src[i] & 0xffff) + (src[i] >> 16) + (dst[i] & 0xffff) + (dst[i] >> 16);
        i += 1;
    }
    // The pseudo-header's length and protocol: 16 bits each in IPv4's, 32 in IPv6's,
    // whose upper halves are zero here; the sum is the same.
    sum += u16::from_ne_bytes([0, h.flow.proto]) as u32 + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `Packet::ports_by_hand` at tc, for a packet whose IP header starts at `l2`. IPv4 only:
/// IPv6's stages have no room.
#[inline(always)]
fn ports_by_hand_at<A: Addr>(data: usize, data_end: usize, l2: usize, h: &Headers<A>, off: usize) -> u64 {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        return 0;
    }
    let tot_len = ip_tot_len::<A>(data, data_end, l2);
    let Some(field) = ptr_at::<u16>(data, data_end, off) else {
        return 0;
    };
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { mem::load16::<0>(field as usize) };
    mem::nonzero16(tot_len) & mem::nonzero16(old ^ pseudo_sum(data, data_end, l2, h))
}

/// Set by the agent when the XDP program is attached in generic (skb) mode, where `XDP_TX`
/// and redirects go through the stack's transmit path and work to every device.
#[no_mangle]
static XDP_SEND_ANYWHERE: u32 = 0;

/// Stats are kept per hook: index `HOOK * COUNTER_MAX + counter`.
pub const HOOK_TC: u32 = 0;
pub const HOOK_XDP: u32 = 1;
const _: () = assert!(lb_common::HOOK_SOCK == 2);

pub trait Packet {
    const HOOK: u32;
    /// Length of the link-layer header in front of the IP header: Ethernet's, or none on a
    /// device without one (`TcL3`).
    const L2: usize = crate::parse::ETH_LEN;
    /// This hook's IPv6 stages in its tail-call table.
    const TAIL_NEW6: u32;
    const TAIL_ICMP6: u32;
    const TAIL_FWD6: u32;
    const TAIL_REPLY6: u32;
    /// Verdict for a packet we leave alone.
    const UNTOUCHED: i32;
    /// Verdict for a packet we translated: on to the stack.
    const FORWARD: i32;
    const DROP: i32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;

    /// The packet's ethertype (network order); `None` when it is too short to tell.
    #[inline(always)]
    fn ethertype(&self) -> Option<u16> {
        crate::parse::ethertype(self.data(), self.data_end())
    }

    /// Updates the L4 checksum at `off` for address changes (the pseudo-header) adding
    /// `addr_diff` and port changes adding `port_diff` (32-bit ones' complement partial sums).
    /// `udp`: a zero checksum means "none" and stays zero. `ports_by_hand`: what
    /// `ports_by_hand` said of the packet before the rewrite.
    fn l4_csum<A: Addr>(
        &self,
        off: usize,
        addr_diff: u32,
        port_diff: u32,
        udp: bool,
        ports_by_hand: u64,
    ) -> Result<(), i64>;

    /// 1 if the port part of an L4 checksum update may be made by hand whatever the packet's
    /// `ip_summed`, else 0: asked before the rewrite, of the checksum field at `off`. (XDP,
    /// whose packets carry complete checksums, makes its whole update by hand anyway.)
    #[inline(always)]
    fn ports_by_hand<A: Addr>(&self, _h: &Headers<A>, _off: usize) -> u64 {
        0
    }

    /// Refuses a new connection to a frontend without backends; returns the verdict.
    fn refuse<A: Addr>(&self, h: &Headers<A>) -> i32;

    /// Looks up where a packet about to get source `src` and destination `dst` must go, for
    /// packets the stack would drop as martians. Called before any rewrite: `Err` means this
    /// hook cannot route it (`NoRoute::mtu`: it is too big for the way out).
    fn route<A: Addr>(&self, src: A, dst: A, proto: u8) -> Result<Route, NoRoute>;

    /// Sends the (rewritten) packet along `r`; returns the verdict.
    fn send(&self, r: &Route) -> i32;

    /// Verdict when `route` found nothing.
    fn unroutable(&self) -> i32;

    /// Verdict when `route` failed with `e`, for the packet `h` (not rewritten yet): one too
    /// big for the way out is answered as a router answers it where this hook can (tc), the
    /// rest as `unroutable`.
    fn unroutable_for<A: Addr>(&self, _h: &Headers<A>, _e: NoRoute) -> i32 {
        self.unroutable()
    }

    /// Length of the whole packet as received (for tc, including non-linear parts).
    fn packet_len(&self) -> u32;

    /// Reads `N` bytes at `off` with a helper: for the rare packets whose offsets vary too
    /// much for direct access (ICMP errors behind IP options); the helper checks the bounds.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;

    /// Writes `bytes` at `off` with a helper, checksums left as they are (the caller fixes
    /// them by hand). Packet pointers taken before are invalid afterwards.
    fn store<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> Option<()>;

    /// `load` and `store` of an IPv6 address, through a word-aligned buffer: a byte array
    /// read as words is copied byte by byte, as LLVM's BPF backend assumes no unaligned
    /// access (`mem.rs`).
    fn load_words(&self, off: usize) -> Option<[u32; 4]>;
    fn store_words(&self, off: usize, w: &[u32; 4]) -> Option<()>;

    /// The packet's L4 checksum may be a CHECKSUM_PARTIAL pseudo-header sum, which only an
    /// skb-aware update gets right: a hook that cannot tell leaves the packet to one that can.
    #[inline(always)]
    fn csum_unsure<A: Addr>(&self, _h: &Headers<A>) -> bool {
        false
    }

    /// The packet is a VLAN's, seen on the VLAN's parent interface: its tag is out of the
    /// frame, in the skb, and goes with it wherever it is sent. XDP cannot tell (a tag left in
    /// the frame is an ethertype it passes; one the NIC stripped is gone), so the agent attaches
    /// no XDP to a VLAN's parent by default (`auto_native`). A priority tag (VLAN id 0, 802.1p)
    /// is no VLAN's: the kernel drops it and goes on with the frame on the parent itself.
    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        false
    }

    /// Leaves the packet, untouched, to the tc program behind this hook.
    #[inline(always)]
    fn defer(&self) -> i32 {
        Self::UNTOUCHED
    }

    #[inline(always)]
    fn count(&self, c: Counter) {
        count(Self::HOOK, c);
    }

    /// Tail-calls this hook's program `index` (`lb_common::TAIL_*`); returns only if the
    /// table has no program there.
    fn tail_call(&self, index: u32);
    /// Tail-calls IPv4's new-flow stage at this hook; returns only if its table is empty.
    fn tail_call_new4(&self);
    /// A word that the IPv6 stages of one packet pass along their tail calls (at tc
    /// `skb->cb[0]`, the control block tc programs may use; tc leaves it as it finds it, so the
    /// first stage clears it).
    fn note(&self) -> u32;
    fn set_note(&self, v: u32);
}

impl Packet for TcContext {
    const HOOK: u32 = HOOK_TC;
    const TAIL_NEW6: u32 = lb_common::TAIL_TC_NEW6;
    const TAIL_ICMP6: u32 = lb_common::TAIL_TC_ICMP6;
    const TAIL_FWD6: u32 = lb_common::TAIL_TC_FWD6;
    const TAIL_REPLY6: u32 = lb_common::TAIL_TC_REPLY6;
    /// TC_ACT_UNSPEC: "no opinion", so later programs in a TCX chain still run.
    const UNTOUCHED: i32 = -1;
    const FORWARD: i32 = TC_ACT_OK as i32;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        TcContext::len(self)
    }

    /// The kernel moves a frame's VLAN tag into the skb before tc ingress runs
    /// (`skb_vlan_untag` in `__netif_receive_skb_core`, or the NIC's VLAN offload), and hands
    /// the frame to the VLAN device only after it (`vlan_do_receive`, which clears the tag).
    /// The verifier turns this field into a load of the skb's `vlan_tci`, which is 0 without
    /// a tag (`__vlan_hwaccel_clear_tag` zeroes it with the rest).
    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // SAFETY: the context of a tc program, valid while it runs.
        unsafe { (*self.skb.skb).vlan_tci & 0x0fff != 0 }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        TcContext::load::<[u8; N]>(self, off).ok()
    }

    #[inline(always)]
    fn store<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> Option<()> {
        TcContext::store(self, off, bytes, 0).ok()
    }

    #[inline(always)]
    fn load_words(&self, off: usize) -> Option<[u32; 4]> {
        TcContext::load::<[u32; 4]>(self, off).ok()
    }

    #[inline(always)]
    fn store_words(&self, off: usize, w: &[u32; 4]) -> Option<()> {
        TcContext::store(self, off, w, 0).ok()
    }

    /// The address part by `bpf_l4_csum_replace` with BPF_F_PSEUDO_HDR, given its precomputed
    /// difference (size 0): that is all a CHECKSUM_PARTIAL packet's field needs (the device
    /// sums the ports itself), and a CHECKSUM_COMPLETE skb's `csum` must follow the field
    /// (`inet_proto_csum_replace_by_diff`), which only the kernel can write. The port part
    /// changes the field alone and for every `ip_summed` but CHECKSUM_PARTIAL: an IPv4 field
    /// that is not the pseudo-header sum belongs to no partial packet, and is updated by hand
    /// (a helper call is dear: about 17 ns on this project's AMD EPYC, more than a quarter of
    /// an established flow's cost at tc); a field that may be one, or one whose total length
    /// is 0 (BIG TCP's GRO packets, whose pseudo-header sum takes the skb's length), gets the
    /// helper, which reads `ip_summed`. IPv6 takes the helper for both.
    #[inline(always)]
    fn l4_csum<A: Addr>(
        &self,
        off: usize,
        addr_diff: u32,
        port_diff: u32,
        udp: bool,
        ports_by_hand: u64,
    ) -> Result<(), i64> {
        let mangled0 = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let mut rest = port_diff;
        if A::FAMILY == lb_common::FAMILY_IPV4 {
            // Written whether or not the ports are done here (adding 0 leaves the field as it
            // is): no branch on `ports_by_hand`, for the verifier's sake (`mem::nonzero16`).
            let by_hand = port_diff.wrapping_mul(ports_by_hand as u32);
            rest = port_diff - by_hand;
            let field = ptr_at::<u16>(self.data(), self.data_end(), off).ok_or(-1i64)? as usize;
            // SAFETY: bounds checked by ptr_at; no helper has run since.
            let c = !fold(wsum_add(!unsafe { mem::load16::<0>(field) } as u32, by_hand));
            // A UDP field that came to zero is written as all ones, the same value (RFC 768
            // sends a computed zero so): the helper below, told BPF_F_MARK_MANGLED_0, takes a
            // zero field for "no checksum" and would leave it. Without a branch: `c - 1`
            // borrows into the upper half only for zero.
            let c = c | ((c as u32).wrapping_sub(1) >> 16) as u16 & (udp as u16).wrapping_neg();
            // SAFETY: as above.
            unsafe { mem::store16::<0>(field, c) };
        }
        if addr_diff != 0 {
            self.l4_csum_replace(off, 0, addr_diff as u64, BPF_F_PSEUDO_HDR as u64 | mangled0)?;
        }
        // An unchanged port adds 0xffff (`!p + p`), ones' complement zero as 0 is: no call
        // for it (port == targetPort is common). One compare: 0 and 0xffff wrap below 2.
        if fold(rest).wrapping_add(1) > 1 {
            self.l4_csum_replace(off, 0, rest as u64, mangled0)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn ports_by_hand<A: Addr>(&self, h: &Headers<A>, off: usize) -> u64 {
        ports_by_hand_at(self.data(), self.data_end(), Self::L2, h, off)
    }

    #[inline(always)]
    fn refuse<A: Addr>(&self, h: &Headers<A>) -> i32 {
        self.count(Counter::RejectNoBackend);
        reject::port_unreachable(self, h)
    }

    #[inline(always)]
    fn route<A: Addr>(&self, src: A, dst: A, proto: u8) -> Result<Route, NoRoute> {
        // SAFETY: reading the arrival interface of our own skb.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        // The neighbour is resolved by bpf_redirect_neigh, which also queues the packet while
        // the kernel resolves a missing one. tot_len 0: the kernel then checks the skb against
        // the egress MTU itself (`is_skb_forwardable`, GSO-aware); an IP total length would
        // fail GRO/TSO super-packets of up to 64 KB (`bpf_skb_fib_lookup`).
        // The IP length, as the stack weighs a packet it forwards (`ip_rcv` trims the skb to
        // it first); the skb's length less the header cost the verifier 16,000 more
        // instructions of its million in `lb_tc_ingress`.
        let fits = |mtu: u16| ip_tot_len::<A>(self.data(), self.data_end(), Self::L2) <= mtu;
        fib(self.as_ptr(), ifindex, src, dst, proto, 0, BPF_FIB_LOOKUP_SKIP_NEIGH, fits)
    }

    #[inline(always)]
    fn send(&self, r: &Route) -> i32 {
        self.count(Counter::Routed);
        // SAFETY: helper call; a null params pointer asks the kernel for the neighbour lookup.
        unsafe { bpf_redirect_neigh(r.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }

    #[inline(always)]
    fn unroutable(&self) -> i32 {
        self.count(Counter::DropNoRoute);
        Self::DROP
    }

    #[inline(always)]
    fn unroutable_for<A: Addr>(&self, h: &Headers<A>, e: NoRoute) -> i32 {
        // `is_skb_forwardable` lets a few bytes over the MTU through (VLAN room): only a
        // packet whose IP length exceeds the MTU it names is answered. (It also says "too big"
        // for an egress device that is down; `route` sends a packet that fits there, and the
        // kernel drops it at the device.)
        if e.mtu == 0 || ip_tot_len::<A>(self.data(), self.data_end(), Self::L2) <= e.mtu {
            return self.unroutable();
        }
        match reject::too_big(self, h, e.mtu) {
            Some(verdict) => {
                // Counted as answered only when the error was built.
                self.count(if verdict == Self::DROP { Counter::DropNoRoute } else { Counter::TooBig });
                verdict
            }
            None => self.unroutable(),
        }
    }

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // The helper directly: aya's `ProgramArray::tail_call` is not inlined, and a tail call
        // inside a subprogram needs BTF function info the loader does not pass.
        // SAFETY: the context is this program's own; a ProgramArray is its map definition
        // (repr(transparent)).
        unsafe {
            bpf_tail_call(self.as_ptr(), core::ptr::addr_of!(crate::maps::LB_TAILS_TC) as *mut _, index);
        }
    }
    #[inline(always)]
    fn tail_call_new4(&self) {
        // SAFETY: as in `tail_call`.
        unsafe {
            bpf_tail_call(
                self.as_ptr(),
                core::ptr::addr_of!(crate::maps::LB_TAILS4_TC) as *mut _,
                lb_common::TAIL4_TC_NEW4,
            );
        }
    }
    #[inline(always)]
    fn note(&self) -> u32 {
        // SAFETY: the context's own skb; cb[0] is readable by tc programs.
        unsafe { (*self.skb.skb).cb[0] }
    }
    #[inline(always)]
    fn set_note(&self, v: u32) {
        // SAFETY: as above, and writable.
        unsafe { (*self.skb.skb).cb[0] = v }
    }
}

impl Packet for XdpContext {
    const HOOK: u32 = HOOK_XDP;
    const TAIL_NEW6: u32 = lb_common::TAIL_XDP_NEW6;
    const TAIL_ICMP6: u32 = lb_common::TAIL_XDP_ICMP6;
    const TAIL_FWD6: u32 = lb_common::TAIL_XDP_FWD6;
    const TAIL_REPLY6: u32 = lb_common::TAIL_XDP_REPLY6;
    const UNTOUCHED: i32 = xdp_action::XDP_PASS as i32;
    const FORWARD: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        // SAFETY: helper call with a stack buffer of the size we pass.
        let rc = unsafe { bpf_xdp_load_bytes(self.as_ptr() as *mut _, off as u32, b.as_mut_ptr() as *mut _, N as u32) };
        (rc == 0).then_some(b)
    }

    #[inline(always)]
    fn store<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> Option<()> {
        // SAFETY: helper call with a stack buffer of the size we pass.
        let rc =
            unsafe { bpf_xdp_store_bytes(self.as_ptr() as *mut _, off as u32, bytes.as_ptr() as *mut _, N as u32) };
        (rc == 0).then_some(())
    }

    #[inline(always)]
    fn load_words(&self, off: usize) -> Option<[u32; 4]> {
        let mut w = [0u32; 4];
        // SAFETY: helper call with a stack buffer of the size we pass.
        let rc = unsafe { bpf_xdp_load_bytes(self.as_ptr() as *mut _, off as u32, w.as_mut_ptr() as *mut _, 16) };
        (rc == 0).then_some(w)
    }

    #[inline(always)]
    fn store_words(&self, off: usize, w: &[u32; 4]) -> Option<()> {
        // SAFETY: helper call with a buffer of the size we pass.
        let rc = unsafe { bpf_xdp_store_bytes(self.as_ptr() as *mut _, off as u32, w.as_ptr() as *mut _, 16) };
        (rc == 0).then_some(())
    }

    /// Frames from a wire carry complete checksums: one update by hand.
    #[inline(always)]
    fn l4_csum<A: Addr>(
        &self,
        off: usize,
        addr_diff: u32,
        port_diff: u32,
        udp: bool,
        _ports_by_hand: u64,
    ) -> Result<(), i64> {
        let field = ptr_at::<u16>(self.data(), self.data_end(), off).ok_or(-1i64)? as usize;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let old = mem::load16::<0>(field);
            if udp && old == 0 {
                return Ok(());
            }
            let mut c = !fold(wsum_add(wsum_add(!old as u32, addr_diff), port_diff));
            if udp && c == 0 {
                // RFC 768: a computed zero is sent as all ones.
                c = 0xffff;
            }
            mem::store16::<0>(field, c);
        }
        Ok(())
    }

    #[inline(always)]
    fn refuse<A: Addr>(&self, _h: &Headers<A>) -> i32 {
        // The tc program on this interface sees the untouched packet next and refuses it.
        Self::UNTOUCHED
    }

    /// An skb run through generic XDP, or handed to a veth's native XDP by its peer, may be
    /// CHECKSUM_PARTIAL: its checksum field then holds the folded pseudo-header sum (what
    /// `__tcp_v4_send_check` and `udp4_hwcsum` store) and the device finishes it, so the
    /// complete-checksum update below would corrupt it. XDP cannot read `ip_summed`; a field
    /// equal to the pseudo-header sum is taken as partial and left to tc, whose
    /// `bpf_l4_csum_replace` knows. A complete checksum has that value once in 65,536 packets,
    /// which then merely takes the tc path.
    #[inline(always)]
    fn csum_unsure<A: Addr>(&self, h: &Headers<A>) -> bool {
        let udp = h.flow.proto != lb_common::PROTO_TCP;
        if h.frag == Frag::Later || (udp && h.udp_csum_zero) {
            return false;
        }
        let (data, data_end) = (self.data(), self.data_end());
        let off = h.l4_off + if udp { 6 } else { 16 };
        let Some(field) = ptr_at::<u16>(data, data_end, off) else {
            return false;
        };
        let sum = pseudo_sum(data, data_end, Self::L2, h);
        // SAFETY: bounds checked by ptr_at.
        unsafe { mem::load16::<0>(field as usize) == sum }
    }

    #[inline(always)]
    fn defer(&self) -> i32 {
        self.count(Counter::DeferredToTc);
        Self::UNTOUCHED
    }

    #[inline(always)]
    fn route<A: Addr>(&self, src: A, dst: A, proto: u8) -> Result<Route, NoRoute> {
        let tot_len = ip_tot_len::<A>(self.data(), self.data_end(), Self::L2);
        // With the neighbour: XDP has no way to wait for ARP, so without one tc takes over;
        // and tc answers a packet too big for the way out (`unroutable_for`).
        let r = fib(self.as_ptr(), self.ingress_ifindex() as u32, src, dst, proto, tot_len, 0, |_| false)
            .map_err(|_| NoRoute { mtu: 0 })?;
        // A native XDP frame sent to a device without `ndo_xdp_xmit` is dropped by the kernel
        // (a veth whose peer has neither GRO nor XDP, `veth_xdp_xmit`); generic XDP transmits
        // through the stack and can send anywhere.
        // SAFETY: reading a static the loader may patch.
        let any = unsafe { core::ptr::read_volatile(&XDP_SEND_ANYWHERE) } != 0;
        if !any && crate::maps::LB_XDP_TARGETS.get_ptr(&r.ifindex).is_none() {
            return Err(NoRoute { mtu: 0 });
        }
        Ok(r)
    }

    #[inline(always)]
    fn send(&self, r: &Route) -> i32 {
        let Some(eth) = ptr_at::<[u8; 12]>(self.data(), self.data_end(), 0) else {
            return Self::DROP;
        };
        // SAFETY: bounds checked by ptr_at; the frame is ours to rewrite.
        let eth = unsafe { &mut *eth };
        eth[..6].copy_from_slice(&r.dmac);
        eth[6..].copy_from_slice(&r.smac);
        self.count(Counter::Routed);
        if r.ifindex == self.ingress_ifindex() as u32 {
            xdp_action::XDP_TX as i32
        } else {
            // SAFETY: helper call.
            unsafe { bpf_redirect(r.ifindex, 0) as i32 }
        }
    }

    #[inline(always)]
    fn unroutable(&self) -> i32 {
        // Untouched: tc sees the packet next, finds the flow tracked, and routes it with
        // bpf_redirect_neigh, which can wait for the neighbour.
        self.count(Counter::DeferredToTc);
        Self::UNTOUCHED
    }

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        // SAFETY: as for tc, with XDP's own program array.
        unsafe {
            bpf_tail_call(self.as_ptr(), core::ptr::addr_of!(crate::maps::LB_TAILS_XDP) as *mut _, index);
        }
    }
    #[inline(always)]
    fn tail_call_new4(&self) {
        // SAFETY: as in `tail_call`.
        unsafe {
            bpf_tail_call(self.as_ptr(), core::ptr::addr_of!(crate::maps::LB_TAILS4_XDP) as *mut _, 0);
        }
    }
    /// XDP has no control block: the note lives in this CPU's scratch slot, which the stages
    /// of one packet share (a tail call stays on its CPU). IPv6 stages only.
    #[inline(always)]
    fn note(&self) -> u32 {
        let s = <[u32; 4] as crate::addr::Addr>::scratch();
        // SAFETY: this CPU's slot; its `note` field only.
        if s.is_null() {
            0
        } else {
            unsafe { (*s).note }
        }
    }
    #[inline(always)]
    fn set_note(&self, v: u32) {
        let s = <[u32; 4] as crate::addr::Addr>::scratch();
        if !s.is_null() {
            // SAFETY: as in `note`.
            unsafe { (*s).note = v };
        }
    }
}

/// tc egress on a device without a link-layer header (tun, WireGuard, IPIP and GRE tunnels,
/// PPP: `ARPHRD_NONE`, the tunnel types, `ARPHRD_PPP`): the packet starts with its IP header
/// (the device has no `header_ops`, so nothing builds a header before `__dev_queue_xmit` hands
/// tc the packet at its network header; PPP adds its own in its transmit routine), which
/// tells the family as `skb->protocol` does. Everything else is tc's (`TcContext`), but for
/// the tail-call slots of this variant's own IPv6 stages, and routing: only the egress program
/// runs on it (`host_reply_of`), where a packet is on its way out already, so an ICMP error
/// that the Ethernet program would route (one about a flow whose packets the datapath routes)
/// goes on out of this device, translated. What only ingress does (refusals, new flows) is
/// left out.
#[repr(transparent)]
pub struct TcL3(pub TcContext);

/// Set by the agent when it loads the IPv6 stages (`lb run --ipv6`). The Ethernet program
/// learns it from its empty tail-call slot and counts an IPv6 packet `PassNotIp`;
/// `lb_tc_ingress_l3`, which filters before it hands a packet on, asks here so that it counts
/// the same.
#[no_mangle]
static IPV6_ON: u32 = 0;

/// Whether the IPv6 stages are loaded (`IPV6_ON`).
#[inline(always)]
pub fn ipv6_on() -> bool {
    // SAFETY: reading a static the loader patches.
    unsafe { core::ptr::read_volatile(&IPV6_ON) != 0 }
}

impl TcL3 {
    /// Puts an Ethernet header in front of the packet: addresses of zeros, `ethertype` (in
    /// network order). `bpf_skb_change_head` is the kernel's helper for exactly this, an L3
    /// packet given a link-layer header (it pushes the bytes and resets the mac header and
    /// `mac_len` to them; `skb->protocol` and the network header stay). At tc ingress the
    /// kernel pulls `mac_len` bytes again after the program (`tcx_run`, `cls_bpf_classify`),
    /// so a packet passed on reaches the stack at its IP header as before; the redirects put
    /// it right themselves (`__bpf_redirect_neigh` pulls the header and takes the family from
    /// `skb->protocol`; `__bpf_redirect_no_mac`, back out of a device without a header, pulls
    /// up to the network header). Fails if the kernel cannot make room (an skb past the
    /// helper's size limit, or no memory).
    #[inline(always)]
    pub fn push_ethernet(&self, ethertype: u16) -> Result<(), ()> {
        // SAFETY: plain helper call on our own skb; no flags.
        if unsafe { bpf_skb_change_head(self.0.skb.skb as *mut _, 14, 0) } != 0 {
            return Err(());
        }
        let Some(p) = ptr_at::<u16>(self.0.data(), self.0.data_end(), 12) else {
            return Err(());
        };
        // SAFETY: bounds checked by ptr_at; the header is ours, just pushed.
        unsafe { p.write_unaligned(ethertype) };
        Ok(())
    }

    /// Tail-calls the Ethernet tc ingress program (`lb_common::TAIL4_TC_INGRESS`); returns
    /// only if its slot is empty.
    #[inline(always)]
    pub fn tail_call_ingress(&self) {
        // SAFETY: as in `TcContext::tail_call`.
        unsafe {
            bpf_tail_call(
                self.0.as_ptr(),
                core::ptr::addr_of!(crate::maps::LB_TAILS4_TC) as *mut _,
                lb_common::TAIL4_TC_INGRESS,
            );
        }
    }
}

impl Packet for TcL3 {
    const HOOK: u32 = HOOK_TC;
    const L2: usize = 0;
    /// Ingress stages, which this variant does not have: one past the table's end, where a
    /// tail call falls through.
    const TAIL_NEW6: u32 = lb_common::TAILS_TC;
    const TAIL_FWD6: u32 = lb_common::TAILS_TC;
    const TAIL_REPLY6: u32 = lb_common::TAILS_TC;
    const TAIL_ICMP6: u32 = lb_common::TAIL_TC_ICMP6_L3;
    const UNTOUCHED: i32 = <TcContext as Packet>::UNTOUCHED;
    const FORWARD: i32 = <TcContext as Packet>::FORWARD;
    const DROP: i32 = <TcContext as Packet>::DROP;

    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }

    #[inline(always)]
    fn ethertype(&self) -> Option<u16> {
        crate::parse::ethertype_of_ip(self.data(), self.data_end())
    }

    #[inline(always)]
    fn l4_csum<A: Addr>(
        &self,
        off: usize,
        addr_diff: u32,
        port_diff: u32,
        udp: bool,
        ports_by_hand: u64,
    ) -> Result<(), i64> {
        <TcContext as Packet>::l4_csum::<A>(&self.0, off, addr_diff, port_diff, udp, ports_by_hand)
    }

    #[inline(always)]
    fn ports_by_hand<A: Addr>(&self, h: &Headers<A>, off: usize) -> u64 {
        ports_by_hand_at(self.data(), self.data_end(), Self::L2, h, off)
    }

    /// Ingress only (a new flow): never reached here.
    #[inline(always)]
    fn refuse<A: Addr>(&self, _h: &Headers<A>) -> i32 {
        Self::UNTOUCHED
    }

    /// The way out is the one the packet is taking (see the type's comment).
    #[inline(always)]
    fn route<A: Addr>(&self, _src: A, _dst: A, _proto: u8) -> Result<Route, NoRoute> {
        Ok(Route { ifindex: 0, smac: [0; 6], dmac: [0; 6] })
    }

    #[inline(always)]
    fn send(&self, _r: &Route) -> i32 {
        self.count(Counter::Routed);
        Self::FORWARD
    }

    #[inline(always)]
    fn unroutable(&self) -> i32 {
        <TcContext as Packet>::unroutable(&self.0)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        <TcContext as Packet>::load(&self.0, off)
    }

    #[inline(always)]
    fn store<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> Option<()> {
        <TcContext as Packet>::store(&self.0, off, bytes)
    }

    #[inline(always)]
    fn load_words(&self, off: usize) -> Option<[u32; 4]> {
        <TcContext as Packet>::load_words(&self.0, off)
    }

    #[inline(always)]
    fn store_words(&self, off: usize, w: &[u32; 4]) -> Option<()> {
        <TcContext as Packet>::store_words(&self.0, off, w)
    }

    #[inline(always)]
    fn tail_call(&self, index: u32) {
        <TcContext as Packet>::tail_call(&self.0, index)
    }

    /// Ingress only: never reached here.
    #[inline(always)]
    fn tail_call_new4(&self) {}

    #[inline(always)]
    fn note(&self) -> u32 {
        <TcContext as Packet>::note(&self.0)
    }

    #[inline(always)]
    fn set_note(&self, v: u32) {
        <TcContext as Packet>::set_note(&self.0, v)
    }
}
