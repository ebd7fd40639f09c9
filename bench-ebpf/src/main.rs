//! Kernel programs of `lb-bench`'s warm method (`bench/src/warm.rs`); never attached anywhere.
//!
//! `BPF_PROG_TEST_RUN` with `repeat` = N runs a program N times on one buffer, so a program
//! that rewrites the packet would time its own output from the second run on. The wrappers
//! here restore a saved frame into the packet on every run, optionally give it a new 5-tuple,
//! and then tail-call the program under test (slot 0 of the hook's program array), which may
//! live in another object: `lb`'s programs, the empty programs that give the floor, or the
//! minimal DNAT references below (stateless, with a flow table, and with a direct-mapped slot
//! table as large as lb's new-flow table or sixteen times larger).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_UNSPEC},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, ProgramArray},
    programs::{TcContext, XdpContext},
};

/// Bytes restored on every run: Ethernet, IPv4 and TCP headers and 10 bytes of payload, which
/// covers everything the programs under test rewrite (MACs when they route, TTL, addresses,
/// ports, checksums). Frames given to the wrappers are exactly this long.
const PREFIX: usize = 64;

/// Returned when the packet is shorter than `PREFIX` or the frame map is empty.
const NO_FRAME: i32 = 0xbad0;
/// Returned when the tail call did not happen (empty slot, or a program the kernel refused).
const NO_TARGET: i32 = 0xbad1;

/// The saved frame, written by `lb-bench` before each row.
#[map(name = "BENCH_FRAME")]
static FRAME: Array<[u64; PREFIX / 8]> = Array::with_max_entries(1, 0);

/// Run counter of the modes that vary the 5-tuple; `lb-bench` sets it before each run so
/// every row uses tuples no other run used. One shared slot: the bench runs on one thread.
/// Its words: the counter, and a cycle's first value and length: with a length, the counter
/// goes back to the first value after that many runs (rows that replay the same flows over
/// and over, in runs of a million), else 0.
#[map(name = "BENCH_COUNTER")]
static COUNTER: Array<[u32; 4]> = Array::with_max_entries(1, 0);

/// Slot 0: the tc program under test.
#[map(name = "BENCH_JUMP_TC")]
static JUMP_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Slot 0: the XDP program under test.
#[map(name = "BENCH_JUMP_XDP")]
static JUMP_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The references' services: (address, port) -> (backend address, backend port), all in
/// network order as they sit in the packet (ports widened to u32).
#[map(name = "BENCH_REF_SERVICES")]
static REF_SERVICES: HashMap<[u32; 2], [u32; 2]> = HashMap::with_max_entries(1024, 0);

/// The stateful references' flow table: (source, destination, ports, protocol) -> backend,
/// as Katran keeps it: an LRU with per-CPU lists, sized by `lb-bench` at load time like lb's
/// `LB_CT4_NEW` (same key size, same per-CPU share), so that the two tables fill, evict and
/// miss in the caches alike.
#[map(name = "BENCH_REF_FLOWS")]
static REF_FLOWS: LruHashMap<[u32; 4], [u32; 2]> =
    LruHashMap::with_max_entries(1024, aya_ebpf::bindings::BPF_F_NO_COMMON_LRU);

/// The slot references' flow table: direct-mapped slots of lb's IPv4 way size (44 bytes, 48 in
/// the array as in lb's: the 5-tuple, the backend, room for the rest of an entry), as many as
/// `LB_CT4_NEW` has ways
/// (`lb-bench` sizes it at load time), so that it spans as many bytes and pages.
#[map(name = "BENCH_REF_SLOTS")]
static REF_SLOTS: Array<[u32; 11]> = Array::with_max_entries(1, 0);

/// Entries of `BENCH_REF_SLOTS`, written by `lb-bench` at load time.
#[no_mangle]
static BENCH_REF_SLOT_COUNT: u32 = 1;

/// The same as `BENCH_REF_SLOTS`, sixteen times larger: more than this machine's caches hold.
#[map(name = "BENCH_REF_SLOTS_BIG")]
static REF_SLOTS_BIG: Array<[u32; 11]> = Array::with_max_entries(1, 0);

/// Entries of `BENCH_REF_SLOTS_BIG`, written by `lb-bench` at load time.
#[no_mangle]
static BENCH_REF_SLOT_BIG_COUNT: u32 = 1;

/// Frame offsets (Ethernet + IPv4 without options + TCP).
const IP_ID: usize = 18;
const IP_CSUM: usize = 24;
const IP_SRC: usize = 26;
const IP_DST: usize = 30;
const TCP_SPORT: usize = 34;
const TCP_DPORT: usize = 36;
const TCP_WINDOW: usize = 48;
const TCP_CSUM: usize = 50;

/// Frame as saved.
const KEEP: u8 = 0;
/// A new flow every run: counter bits 0-13 added to the low half of the source address,
/// the rest to the source port.
const NEW_SRC: u8 = 1;
/// The same on the destination: replies to the flows `NEW_SRC` made.
const NEW_DST: u8 = 2;
/// A new connection of one of 1024 clients every run: counter bits 0-9 added to the source
/// address, the rest to the source port.
const NEW_CONN: u8 = 3;

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// `*p += v`, a big-endian 16-bit field, in ones' complement arithmetic when `oc`.
#[inline(always)]
fn add_be16(p: usize, v: u16, oc: bool) {
    let p = p as *mut u16;
    // SAFETY: the caller checked that the frame prefix lies inside the packet.
    unsafe {
        let x = u16::from_be(p.read_unaligned());
        let y = if oc { fold(x as u32 + v as u32) } else { x.wrapping_add(v) };
        p.write_unaligned(y.to_be());
    }
}

/// Restores the frame into the packet and applies `MODE`. Checksums stay valid in every mode:
/// what is added to the address is taken from the IP identification, and what is added to
/// the address and the port together from the TCP window, so both sums are unchanged (the
/// bench keeps the additions from overflowing the fields it varies).
#[inline(always)]
fn prepare<const MODE: u8>(data: usize, data_end: usize) -> bool {
    if data + PREFIX > data_end {
        return false;
    }
    let Some(f) = FRAME.get(0) else {
        return false;
    };
    let p = data as *mut u64;
    let mut i = 0;
    while i < PREFIX / 8 {
        // SAFETY: inside the packet (checked above) and inside the map value.
        unsafe { p.add(i).write_unaligned(f[i]) };
        i += 1;
    }
    if MODE == KEEP {
        return true;
    }
    let Some(cp) = COUNTER.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a valid map value; one thread runs the bench.
    let c = unsafe {
        let [c, first, len, _] = *cp;
        let next = c.wrapping_add(1);
        (*cp)[0] = if len != 0 && next.wrapping_sub(first) >= len { first } else { next };
        c
    };
    let (bits, addr, port) = match MODE {
        NEW_SRC => (14, IP_SRC, TCP_SPORT),
        NEW_DST => (14, IP_DST, TCP_DPORT),
        _ => (10, IP_SRC, TCP_SPORT),
    };
    let a = (c & ((1 << bits) - 1)) as u16;
    let b = (c >> bits) as u16;
    add_be16(data + addr + 2, a, false);
    add_be16(data + port, b, false);
    add_be16(data + IP_ID, !a, true);
    add_be16(data + TCP_WINDOW, !fold(a as u32 + b as u32), true);
    true
}

#[inline(always)]
fn warm_tc<const MODE: u8>(ctx: &TcContext) -> i32 {
    if !prepare::<MODE>(ctx.data(), ctx.data_end()) {
        return NO_FRAME;
    }
    // SAFETY: a tail call with this program's own context.
    unsafe { JUMP_TC.tail_call(ctx, 0) };
    NO_TARGET
}

#[inline(always)]
fn warm_xdp<const MODE: u8>(ctx: &XdpContext) -> u32 {
    if !prepare::<MODE>(ctx.data(), ctx.data_end()) {
        return NO_FRAME as u32;
    }
    // SAFETY: a tail call with this program's own context.
    unsafe { JUMP_XDP.tail_call(ctx, 0) };
    NO_TARGET as u32
}

#[classifier]
pub fn bench_warm_tc(ctx: TcContext) -> i32 {
    warm_tc::<KEEP>(&ctx)
}

#[classifier]
pub fn bench_warm_tc_new_src(ctx: TcContext) -> i32 {
    warm_tc::<NEW_SRC>(&ctx)
}

#[classifier]
pub fn bench_warm_tc_new_dst(ctx: TcContext) -> i32 {
    warm_tc::<NEW_DST>(&ctx)
}

#[classifier]
pub fn bench_warm_tc_new_conn(ctx: TcContext) -> i32 {
    warm_tc::<NEW_CONN>(&ctx)
}

#[xdp]
pub fn bench_warm_xdp(ctx: XdpContext) -> u32 {
    warm_xdp::<KEEP>(&ctx)
}

#[xdp]
pub fn bench_warm_xdp_new_src(ctx: XdpContext) -> u32 {
    warm_xdp::<NEW_SRC>(&ctx)
}

#[xdp]
pub fn bench_warm_xdp_new_dst(ctx: XdpContext) -> u32 {
    warm_xdp::<NEW_DST>(&ctx)
}

#[xdp]
pub fn bench_warm_xdp_new_conn(ctx: XdpContext) -> u32 {
    warm_xdp::<NEW_CONN>(&ctx)
}

/// The frontend a packet is addressed to, if it is a TCP packet to one of the references'
/// services: (destination address, destination port, backend).
#[inline(always)]
fn ref_lookup(data: usize, data_end: usize) -> Option<(u32, u16, [u32; 2])> {
    if data + TCP_CSUM + 2 > data_end {
        return None;
    }
    // SAFETY: every read below is inside the bounds checked above.
    unsafe {
        let at = |off: usize| data + off;
        // IPv4 without options, TCP, not a fragment; anything else is not ours.
        if (at(12) as *const u16).read_unaligned() != 0x0800u16.to_be()
            || *(at(14) as *const u8) != 0x45
            || *(at(23) as *const u8) != 6
            || (at(20) as *const u16).read_unaligned() & 0x3fffu16.to_be() != 0
        {
            return None;
        }
        let daddr = (at(IP_DST) as *const u32).read_unaligned();
        let dport = (at(TCP_DPORT) as *const u16).read_unaligned();
        let backend = REF_SERVICES.get(&[daddr, dport as u32])?;
        Some((daddr, dport, *backend))
    }
}

/// Reference: a minimal DNAT at tc. One lookup, then the rewrite (`dnat_tc`).
#[classifier]
pub fn bench_ref_dnat_tc(ctx: TcContext) -> i32 {
    let Some((daddr, dport, backend)) = ref_lookup(ctx.data(), ctx.data_end()) else {
        return TC_ACT_UNSPEC;
    };
    dnat_tc(&ctx, daddr, dport, backend)
}

/// Reference: the least a load balancer that keeps per-flow state does for a packet (Katran's
/// `process_packet` reduced to it): the service lookup, the flow's lookup in the flow table,
/// and for a new flow one insert; then the rewrite. lb must keep the reply direction too
/// (reverse NAT), which Katran, returning replies directly from the backend, does not.
#[classifier]
pub fn bench_ref_flow_dnat_tc(ctx: TcContext) -> i32 {
    let Some((daddr, dport, backend)) = ref_flow(ctx.data(), ctx.data_end()) else {
        return TC_ACT_UNSPEC;
    };
    dnat_tc(&ctx, daddr, dport, backend)
}

/// The service's backend, or the flow's if the flow table has it; a new flow is recorded.
#[inline(always)]
fn ref_flow(data: usize, data_end: usize) -> Option<(u32, u16, [u32; 2])> {
    let (daddr, dport, backend) = ref_lookup(data, data_end)?;
    // SAFETY: `ref_lookup` checked that the TCP header lies inside the packet.
    let (saddr, ports) = unsafe {
        (((data + IP_SRC) as *const u32).read_unaligned(), ((data + TCP_SPORT) as *const u32).read_unaligned())
    };
    let key = [saddr, daddr, ports, 6];
    if let Some(b) = REF_FLOWS.get_ptr(&key) {
        // SAFETY: a map value, valid while the program runs.
        return Some((daddr, dport, unsafe { *b }));
    }
    // A full table evicts; a failed insert only loses the flow's stickiness.
    let _ = REF_FLOWS.insert(&key, &backend, 0);
    Some((daddr, dport, backend))
}

/// Reference: the least any per-flow state costs with a table as large as lb's new-flow table,
/// at tc: the minimal DNAT plus one read and one write of the flow's slot in a direct-mapped
/// table (`ref_slot`). No choice of a victim, no second direction, no lock, no helper call.
#[classifier]
pub fn bench_ref_slot_dnat_tc(ctx: TcContext) -> i32 {
    slot_dnat_tc(&ctx, &REF_SLOTS, &BENCH_REF_SLOT_COUNT)
}

/// `bench_ref_slot_dnat_tc` with the table no cache holds.
#[classifier]
pub fn bench_ref_big_slot_dnat_tc(ctx: TcContext) -> i32 {
    slot_dnat_tc(&ctx, &REF_SLOTS_BIG, &BENCH_REF_SLOT_BIG_COUNT)
}

/// A slot reference at tc, on `table` of `*slots` entries.
#[inline(always)]
fn slot_dnat_tc(ctx: &TcContext, table: &Array<[u32; 11]>, slots: &u32) -> i32 {
    let Some((daddr, dport, backend)) = ref_slot(ctx.data(), ctx.data_end(), table, slots) else {
        return TC_ACT_UNSPEC;
    };
    dnat_tc(ctx, daddr, dport, backend)
}

/// The service's backend, or the one the flow's slot holds if the slot is the flow's; a new
/// flow takes the slot over, whatever it held.
#[inline(always)]
fn ref_slot(data: usize, data_end: usize, table: &Array<[u32; 11]>, slots: &u32) -> Option<(u32, u16, [u32; 2])> {
    let (daddr, dport, backend) = ref_lookup(data, data_end)?;
    // SAFETY: `ref_lookup` checked that the TCP header lies inside the packet.
    let (saddr, ports) = unsafe {
        (((data + IP_SRC) as *const u32).read_unaligned(), ((data + TCP_SPORT) as *const u32).read_unaligned())
    };
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let slots = unsafe { core::ptr::read_volatile(slots) };
    // A multiply, a fold of its high bits into the low ones (the bench varies the top of the
    // address word, which a product carries only upwards) and a second multiply; the slot is
    // the high half scaled to the table (as lb's `select_slot`).
    let x = ((saddr as u64) << 32 | ports as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let h = (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32;
    let slot = table.get_ptr_mut(((h * slots as u64) >> 32) as u32)?;
    // SAFETY: a map value, valid while the program runs; one thread runs the bench.
    let s = unsafe { &mut *slot };
    if s[0] == saddr && s[1] == daddr && s[2] == ports && s[3] == 6 {
        return Some((daddr, dport, [s[4], s[5]]));
    }
    s[0] = saddr;
    s[1] = daddr;
    s[2] = ports;
    s[3] = 6;
    s[4] = backend[0];
    s[5] = backend[1];
    Some((daddr, dport, backend))
}

/// The rewrite of a tc reference: the checksums updated the way a tc program must for
/// packets whose L4 checksum the stack completes later (CHECKSUM_PARTIAL): through the
/// helpers that know the skb's checksum state, one per kind of change (the address is in the
/// pseudo-header, the port is not); then the new address and port written directly.
#[inline(always)]
fn dnat_tc(ctx: &TcContext, daddr: u32, dport: u16, [addr, port]: [u32; 2]) -> i32 {
    let port = port as u16;
    let done = ctx
        .l4_csum_replace(TCP_CSUM, daddr as u64, addr as u64, BPF_F_PSEUDO_HDR as u64 | 4)
        .and_then(|()| ctx.l4_csum_replace(TCP_CSUM, dport as u64, port as u64, 2))
        .and_then(|()| ctx.l3_csum_replace(IP_CSUM, daddr as u64, addr as u64, 4));
    // The helpers may have moved the packet data: bounds again.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if done.is_err() || data + TCP_CSUM + 2 > data_end {
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    // SAFETY: inside the bounds checked above.
    unsafe {
        ((data + IP_DST) as *mut u32).write_unaligned(addr);
        ((data + TCP_DPORT) as *mut u16).write_unaligned(port);
    }
    TC_ACT_OK as i32
}

/// `check` updated for a 16-bit word of the summed data changing from `old` to `new`
/// (RFC 1624, eqn. 3); memory order in, memory order out.
#[inline(always)]
fn csum_update(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Reference: a minimal DNAT at XDP. One lookup, then the rewrite (`dnat_xdp`).
#[xdp]
pub fn bench_ref_dnat_xdp(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some((daddr, dport, backend)) = ref_lookup(data, data_end) else {
        return xdp_action::XDP_PASS;
    };
    dnat_xdp(data, data_end, daddr, dport, backend)
}

/// Reference: `bench_ref_flow_dnat_tc` at XDP.
#[xdp]
pub fn bench_ref_flow_dnat_xdp(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some((daddr, dport, backend)) = ref_flow(data, data_end) else {
        return xdp_action::XDP_PASS;
    };
    dnat_xdp(data, data_end, daddr, dport, backend)
}

/// Reference: `bench_ref_slot_dnat_tc` at XDP.
#[xdp]
pub fn bench_ref_slot_dnat_xdp(ctx: XdpContext) -> u32 {
    slot_dnat_xdp(&ctx, &REF_SLOTS, &BENCH_REF_SLOT_COUNT)
}

/// `bench_ref_slot_dnat_xdp` with the table no cache holds.
#[xdp]
pub fn bench_ref_big_slot_dnat_xdp(ctx: XdpContext) -> u32 {
    slot_dnat_xdp(&ctx, &REF_SLOTS_BIG, &BENCH_REF_SLOT_BIG_COUNT)
}

/// A slot reference at XDP, on `table` of `*slots` entries.
#[inline(always)]
fn slot_dnat_xdp(ctx: &XdpContext, table: &Array<[u32; 11]>, slots: &u32) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some((daddr, dport, backend)) = ref_slot(data, data_end, table, slots) else {
        return xdp_action::XDP_PASS;
    };
    dnat_xdp(data, data_end, daddr, dport, backend)
}

/// The rewrite of an XDP reference, with checksums updated by hand, as XDP must (no skb):
/// right for frames from a wire, whose checksums are complete.
#[inline(always)]
fn dnat_xdp(data: usize, data_end: usize, daddr: u32, dport: u16, [addr, port]: [u32; 2]) -> u32 {
    let port = port as u16;
    if data + TCP_CSUM + 2 > data_end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: inside the bounds checked above.
    unsafe {
        let ip_csum = (data + IP_CSUM) as *mut u16;
        let tcp_csum = (data + TCP_CSUM) as *mut u16;
        let (old_hi, old_lo, new_hi, new_lo) = (daddr as u16, (daddr >> 16) as u16, addr as u16, (addr >> 16) as u16);
        let c = csum_update(csum_update(ip_csum.read_unaligned(), old_hi, new_hi), old_lo, new_lo);
        ip_csum.write_unaligned(c);
        let mut t = csum_update(csum_update(tcp_csum.read_unaligned(), old_hi, new_hi), old_lo, new_lo);
        t = csum_update(t, dport, port);
        tcp_csum.write_unaligned(t);
        ((data + IP_DST) as *mut u32).write_unaligned(addr);
        ((data + TCP_DPORT) as *mut u16).write_unaligned(port);
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
