//! Stage 4: connection tracking. A forward entry pins a flow to its backend (and its SNAT
//! source, if any) even after the service's backend set changes; a reply entry maps the
//! backend's replies back to the frontend and the original client. Both entries carry the
//! flow's state, netfilter's TCP states (`lb_common::tcp_step`), and every state has its own
//! lifetime.
//!
//! Two tables, so that a flood of new flows cannot push out live connections (netfilter's
//! `early_drop` evicts only unassured entries): a flow starts in `LB_CT4_NEW`, a
//! set-associative array where a new entry in a full set takes the less recently seen of two
//! ways (`ct_table.rs`: no lock, no helper call; IPv6's `LB_CT6_NEW` alike), and moves to `LB_CT4`, a preallocated hash that
//! never evicts, once it is assured (handshake done and answered; a UDP flow answered for a
//! while). When it finishes (TIME_WAIT, CLOSE) it moves back to the new-flow table, so the assured table
//! only ever holds live flows; the agent collects the ones that went idle.
//!
//! A new connection's SYN looks in the assured table only if its key's stamp says a live flow
//! may be there (`ct_live.rs`): the lookup that misses is the dearest step of a new flow.
//!
//! Time is jiffies (`bpf_jiffies64`, which the verifier inlines into a load of the kernel's
//! `jiffies`: no helper call), and an entry is rewritten only when its state changes or once
//! per refresh interval, so an established flow costs one lookup and no write per packet.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_loop};
use lb_common::{
    ct_assured, ct_peer, ct_peer_into, ct_tag, tcp_step, Counter, CtKey, CtKey6, CtStateWord, CtStep, CtValue,
    CtValue6, CT_CLOSE, CT_DIR_FORWARD, CT_DIR_REPLY, CT_ESTABLISHED, CT_FLAG_ASSURED, CT_FLAG_PEER_ROUTE,
    CT_FLAG_REPLIED, CT_FLAG_ROUTE, CT_FLAG_SNAT, CT_LAST_ACK, CT_NONE, CT_STATES, CT_TIME_WAIT, CT_UDP, PROTO_TCP,
    SNAT_PORT_MAX, SNAT_PORT_MIN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    addr::Addr,
    ct_cache, ct_live, ct_table,
    parse::Flow,
    stats::{add, count},
};

/// Lifetime of each state in jiffies, indexed by state; the agent writes them at load time
/// from its flags and the kernel's HZ. Placeholders for HZ=1000 until then.
#[no_mangle]
static CT_TIMEOUTS: [u32; CT_STATES] =
    [60_000, 120_000, 60_000, 21_600_000, 120_000, 60_000, 30_000, 120_000, 10_000, 60_000];
/// An unchanged entry is rewritten at most this often (jiffies; one second).
#[no_mangle]
static CT_REFRESH: u32 = 1000;
/// A UDP flow answered and at least this old (jiffies) is a stream, and assured.
#[no_mangle]
static CT_UDP_STREAM: u32 = 2000;

/// Probes for a free SNAT port before giving up on a flow. Ports whose flow finished are
/// taken when no free one turns up, as netfilter reuses the tuple of a TIME_WAIT or CLOSE
/// connection for a new SYN; so only live flows hold ports, and 32 independent probes fail
/// one flow in 10^9 at half the range live.
const SNAT_PROBES: u32 = 32;

#[inline(always)]
fn global(v: &'static u32) -> u32 {
    // SAFETY: reading a static; volatile so the compiler keeps the load the loader patches.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn timeout(state: u8) -> u32 {
    let i = state as usize;
    if i >= CT_STATES {
        return 0;
    }
    // SAFETY: in bounds; volatile for the loader's patch.
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS[i]) }
}

/// The coarse clock, low 32 bits.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: helper without arguments (inlined by the verifier into a load).
    unsafe { bpf_jiffies64() as u32 }
}

/// Whether an entry is idle past its state's lifetime. An entry another CPU refreshed after
/// this one read the clock is fresh: wrapping, its age would read as 2^32 jiffies.
#[inline(always)]
pub fn expired<A: Addr>(e: &CtValue<A>, now: u32) -> bool {
    let idle = now.wrapping_sub(e.last_seen);
    (idle as i32) >= 0 && idle > timeout(e.state)
}

/// A conntrack key, its last eight bytes written as two 32-bit words (ports; protocol,
/// direction and padding). The map's hash and key compare read the key a word at a time, and
/// on x86 a load cannot take its data from the store buffer when it spans several narrower
/// stores (store-to-load forwarding): it waits until they reach the cache. Field by field,
/// LLVM stores those eight bytes as five.
#[inline(always)]
pub fn key<A: Addr>(src: A, dst: A, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey<A> {
    let mut k = CtKey::<A> { src, dst, sport: 0, dport: 0, proto: 0, dir: 0, _pad: 0 };
    let base = core::ptr::addr_of_mut!(k).cast::<u8>();
    // SAFETY: `sport` and `proto` each start a 4-byte-aligned run of four bytes of the
    // `repr(C)` key (`sport`, `dport`; `proto`, `dir`, `_pad`; asserted in lb-common), in
    // little-endian order.
    unsafe {
        base.add(core::mem::offset_of!(CtKey<A>, sport)).cast::<u32>().write(sport as u32 | (dport as u32) << 16);
        base.add(core::mem::offset_of!(CtKey<A>, proto)).cast::<u32>().write(proto as u32 | (dir as u32) << 8);
    }
    k
}

/// Where a flow goes: the backend, and the source it is given if it is SNATed. Plain fields,
/// no `Option`: LLVM spills the uninitialised payload of a `None`, which the verifier refuses
/// ("!read_ok").
#[derive(Clone, Copy, Default)]
pub struct Translation<A> {
    pub backend_addr: A,
    pub backend_port: u16,
    /// The source is rewritten too, to `snat_addr:snat_port`.
    pub snat: bool,
    pub snat_addr: A,
    pub snat_port: u16,
    /// The translated packet's source is a node address: route it ourselves.
    pub route: bool,
    /// The frontend's id, for its traffic counters.
    pub service_id: u32,
}

/// Outcome of a forward lookup.
pub enum Forward<A> {
    /// Tracked: apply this translation.
    Tracked(Translation<A>),
    /// Untracked, expired, or a new connection on a finished 5-tuple: choose a backend.
    New,
}

/// `k`'s tag (`lb_common::ct_tag`), which the datapath writes into every entry it creates.
/// IPv6 takes the last word of each address, not a fold of all four: the folds took the IPv6
/// new-flow stage past the 512 bytes of stack a stage and its subprograms share (528 bytes).
#[inline(always)]
fn tag<A: Addr>(k: &CtKey<A>) -> u16 {
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        ct_tag(k.src.fold(), k.dst.fold(), k.sport, k.dport)
    } else {
        ct_tag(k.src.words()[3], k.dst.words()[3], k.sport, k.dport)
    }
}

/// Changes the state and flags of `e`, the entry found for `k`, from `from` to `to`, with one
/// compare-and-exchange of the word they share with its ports and tag
/// (`lb_common::CtStateWord`), and only if that word still says the entry is `k`'s (its tag,
/// or none) and in the state the change was computed from. False: the entry changed since it
/// was read, another CPU having moved the flow on, or reused the entry for another flow (the
/// new-flow arrays rewrite their ways in place; the kernel hash reuses a freed element at
/// once, while a packet on another CPU may still hold it). Written plainly, such a change
/// would give that other flow this one's state and flags, `SNAT` and `ROUTE` among them.
#[inline(always)]
fn swap_state<A: Addr>(k: &CtKey<A>, e: &mut CtValue<A>, from: (u8, u8), to: (u8, u8)) -> bool {
    // SAFETY: the word lies inside the value, 8-aligned (asserted in lb-common; the maps'
    // values are 8-aligned), as BPF's atomics require.
    let p = unsafe { (e as *mut CtValue<A>).cast::<u8>().add(CtStateWord::offset::<A>()).cast::<u64>() };
    // SAFETY: as above; volatile, as other CPUs write it.
    let seen = unsafe { core::ptr::read_volatile(p) };
    let w = CtStateWord::from_u64(seen);
    if !w.admits(tag(k), from.0, from.1) {
        return false;
    }
    let new = CtStateWord { state: to.0, flags: to.1, ..w }.to_u64();
    // SAFETY: as above.
    unsafe { crate::mem::compare_exchange64(p, seen, new) }
}

#[inline(always)]
fn translation_of<A: Addr>(e: &CtValue<A>) -> Translation<A> {
    Translation {
        backend_addr: e.nat_addr,
        backend_port: e.nat_port,
        snat: e.flags & CT_FLAG_SNAT != 0,
        snat_addr: e.snat_addr,
        snat_port: e.snat_port,
        route: e.flags & CT_FLAG_ROUTE != 0,
        service_id: e.service_id,
    }
}

/// The entry of `k`, from the assured table first (where live flows are), and whether it
/// came from there.
#[inline(always)]
fn find<A: Addr>(k: &CtKey<A>) -> Option<(*mut CtValue<A>, bool)> {
    if let Some(e) = A::ct().get_ptr_mut(k) {
        return Some((e, true));
    }
    ct_table::get(k).map(|e| (e, false))
}

/// The peer entry of `k`'s entry `e` (`ct_peer`): built in `on_stack` for IPv4, in this
/// CPU's scratch slot for IPv6, whose 92-byte pair the stack has no room for. Returned, not
/// handed to a closure: LLVM keeps a large closure out of line, and a subprogram's frame on
/// top of IPv4's pipeline overflows the 512-byte stack. Untagged: most callers use only the
/// key, or the state and time; `insert_either` tags the value when it creates the entry.
#[inline(always)]
fn peer<'a, A: Addr>(
    k: &CtKey<A>,
    e: &CtValue<A>,
    on_stack: &'a mut (CtKey<A>, CtValue<A>),
) -> Option<(&'a CtKey<A>, &'a mut CtValue<A>)> {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        *on_stack = ct_peer(k, e);
        Some((&on_stack.0, &mut on_stack.1))
    } else {
        let (pk, pv) = scratch_peer::<A>()?;
        ct_peer_into(k, e, pk, pv);
        Some((pk, pv))
    }
}

/// The peer fields of this CPU's scratch slot (IPv6).
#[inline(always)]
fn scratch_peer<A: Addr>() -> Option<(&'static mut CtKey<A>, &'static mut CtValue<A>)> {
    let s = A::scratch();
    if s.is_null() {
        return None;
    }
    // SAFETY: this CPU's slot, valid while the program runs; only these two fields are
    // borrowed, and one packet's stages use them one after another, never nested.
    unsafe { Some((&mut (*s).peer_key, &mut (*s).peer_value)) }
}

/// Writes both entries of a flow into the table its state says (`CT_FLAG_ASSURED`) and out of
/// the other. When the assured table is full the flow stays in the new-flow table, where it works but
/// can be evicted, and `ct_assured_full` counts it.
#[inline(always)]
fn store<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, was_assured: bool, hook: u32) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        store_of(k, e, was_assured, hook)
    } else {
        // IPv6's move runs in `lb_ct6_store`, whose frame under the stage's leaves no room to
        // stamp the flow from inside it (`ct_live::lb_ct6_stamp`): the stage stamps it around
        // the move. Before, so that no SYN inside the flow finds it neither stamped nor in the
        // new-flow table, which the move leaves; after too, with the generation read after
        // the write, as every other stamp is made (`ct_live.rs` says why). A stamp for a write
        // the full table refuses stands for no flow, which costs only a lookup.
        let assured = e.flags & CT_FLAG_ASSURED != 0;
        if assured {
            ct_live::stamp_flow(k, e);
        }
        lb_ct6_store(
            k as *const CtKey<A> as *const CtKey6,
            e as *const CtValue<A> as *const CtValue6,
            was_assured as u32,
            hook,
        );
        if assured {
            // Not from `e`: the way it points into was freed by the move, and another CPU may
            // have written another flow there since. The forward key is `k`, or for a reply
            // key its peer, which the move built in the scratch slot (`store_of`).
            if k.dir == CT_DIR_FORWARD {
                ct_live::stamp(k);
            } else if let Some((pk, _)) = scratch_peer::<A>() {
                ct_live::stamp(pk);
            }
        }
    }
}

/// IPv6: a global function, to keep the map updates' code out of every stage that may need
/// them, and checked by the verifier once, on its own (a static subprogram is walked again at
/// every call, with the caller's state). It must return a number.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_store(k: *const CtKey6, e: *const CtValue6, was_assured: u32, hook: u32) -> u32 {
    if !k.is_null() && !e.is_null() {
        // SAFETY: checked for null; the verifier checks the caller passes a whole key and value.
        store_of(unsafe { &*k }, unsafe { &*e }, was_assured != 0, hook)
    }
    0
}

#[inline(always)]
fn store_of<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, was_assured: bool, hook: u32) {
    // As `peer`, spelled out, for the scratch slot's borrows; tagged, as the peer is written.
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        let (pk, mut pv) = ct_peer(k, e);
        pv.tag = tag(&pk);
        store_with(k, e, &pk, &mut pv, was_assured, hook);
        // After the moves: until then the old entries could still be found, and cached (a
        // flow demoted when the assured table is full is written there and removed again).
        ct_cache::forget(k);
        ct_cache::forget(&pk);
    } else if let Some((pk, pv)) = scratch_peer::<A>() {
        ct_peer_into(k, e, pk, pv);
        pv.tag = tag(pk);
        store_with(k, e, pk, pv, was_assured, hook);
    }
}

/// `store_of` given the peer entry.
#[inline(always)]
fn store_with<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, pk: &CtKey<A>, pv: &mut CtValue<A>, was_assured: bool, hook: u32) {
    let assured = e.flags & CT_FLAG_ASSURED != 0;
    // IPv4's demoted copy, should the assured table be full.
    let mut demoted = *e;
    let mut fwd = e;
    if assured {
        if A::ct().insert(k, e, 0).is_ok() && A::ct().insert(pk, &*pv, 0).is_ok() {
            if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
                ct_live::stamp(k);
                ct_live::stamp(pk);
            }
            // No copy stays behind in the new-flow table: once the assured entries go (a SYN-ACK of a
            // new connection on the tuple, expiry) it would resurface with a stale state.
            ct_table::remove_inline(k);
            ct_table::remove_inline(pk);
            return;
        }
        // Full: keep the flow working from the new-flow table, where it can be evicted. The agent's
        // collection makes room; the counter says it happened.
        count(hook, Counter::CtAssuredFull);
        let _ = A::ct().remove(k);
        pv.flags &= !CT_FLAG_ASSURED;
        // Both entries go in already demoted (another CPU must never see a new-flow table entry marked
        // assured): a copy on the stack for IPv4, in the scratch slot's own entry for IPv6.
        if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
            demoted.flags &= !CT_FLAG_ASSURED;
            fwd = &demoted;
        } else {
            let s = A::scratch();
            if s.is_null() {
                return;
            }
            // SAFETY: this CPU's slot; its `value` field is borrowed nowhere else here (the
            // peer fields are).
            let d = unsafe { &mut (*s).value };
            *d = *e;
            d.flags &= !CT_FLAG_ASSURED;
            fwd = d;
        }
    }
    // One entry at a time, not `ct_table::insert_pair`: a flow moves between the tables rarely,
    // and the pair's choice, inlined here too, doubled the instructions the verifier walks
    // through the main programs (298,172 to 570,303 at XDP). The two inserts are written once
    // for both ways here: each is inlined whole.
    // The peer entry never over the entry just written (`ct_table::insert_inline`'s `avoid`):
    // in one set, on a tie between its candidates, it could be.
    let first = new_insert(k, fwd, hook, u32::MAX);
    new_insert(pk, pv, hook, first);
    if was_assured && !assured {
        let _ = A::ct().remove(k);
        let _ = A::ct().remove(pk);
    }
}

/// Writes an entry into the new-flow table, never over way `avoid`, counting the live flow it
/// may push out; the way written.
#[inline(always)]
fn new_insert<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, hook: u32, avoid: u32) -> u32 {
    // Inlined for IPv6 too: `lb_ct6_store`'s frame below a stage's leaves no room for a
    // call further down.
    let (way, evicted) = ct_table::insert_inline(k, e, avoid);
    if evicted {
        count(hook, Counter::CtNewEvicted);
    }
    way
}

/// Moves a tracked entry on for a packet of its flow: state transition (mirrored into the
/// peer entry, and a move between the tables when the flow becomes assured or finishes), or
/// a refresh at most once per interval. `None`: the packet starts a new flow on this tuple.
#[inline(always)]
fn advance<A: Addr>(k: &CtKey<A>, e: &mut CtValue<A>, assured: bool, tcp_flags: u8, now: u32, hook: u32) -> Option<()> {
    // Nearly every packet: an assured established TCP flow and a segment without SYN, FIN or
    // RST, which changes nothing but (once a second) the time.
    if k.proto == PROTO_TCP && e.state == CT_ESTABLISHED && tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 && assured {
        if now.wrapping_sub(e.last_seen) as i32 > global(&CT_REFRESH) as i32 {
            e.last_seen = now;
            refresh_peer(k, e, assured, now);
        }
        // The cache missed to get here (`ct_cache::hit`): the copy was stale, or another
        // flow's.
        ct_cache::fill(k, e);
        return Some(());
    }
    // What the change is computed from, and must still be there when it is written.
    let from = (e.state, e.flags);
    let (state, mut flags) = if k.proto == PROTO_TCP {
        match tcp_step(from.0, from.1, k.dir, tcp_flags) {
            CtStep::To(s, f) => (s, f),
            CtStep::Restart => {
                ct_cache::forget(k);
                return None;
            }
        }
    } else if k.dir == CT_DIR_REPLY {
        (from.0, from.1 | CT_FLAG_REPLIED)
    } else {
        from
    };
    let stream = state == CT_UDP && now.wrapping_sub(e.created) as i32 >= global(&CT_UDP_STREAM) as i32;
    if ct_assured(state, flags, stream) {
        flags |= CT_FLAG_ASSURED;
    } else {
        flags &= !CT_FLAG_ASSURED;
    }
    if (state, flags) == from {
        if now.wrapping_sub(e.last_seen) as i32 > global(&CT_REFRESH) as i32 {
            e.last_seen = now;
            refresh_peer(k, e, assured, now);
        }
        return Some(());
    }
    if !swap_state(k, e, from, (state, flags)) {
        // Not this flow's entry any more, or moved on by another CPU: the packet goes as its
        // translation says, and the next one makes the change again from what is there.
        return Some(());
    }
    e.last_seen = now;
    // Its copy stood for the old state (the peer's goes in `mirror_into` or `store_of`).
    ct_cache::forget(k);
    if (flags & CT_FLAG_ASSURED != 0) == assured {
        // Same table: both entries change in place.
        mirror(k, e, assured);
    } else {
        store(k, e, assured, hook);
    }
    Some(())
}

/// Writes the new state of `k`'s entry `e` into its peer entry where it is, or re-creates it.
#[inline(always)]
fn mirror<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, assured: bool) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        mirror_of(k, e, assured)
    } else {
        lb_ct6_mirror(k as *const CtKey<A> as *const CtKey6, e as *const CtValue<A> as *const CtValue6, assured as u32);
    }
}

/// IPv6: a global function, as `lb_ct6_store`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_mirror(k: *const CtKey6, e: *const CtValue6, assured: u32) -> u32 {
    if !k.is_null() && !e.is_null() {
        // SAFETY: checked for null; the verifier checks the caller passes a whole key and value.
        mirror_of(unsafe { &*k }, unsafe { &*e }, assured != 0)
    }
    0
}

#[inline(always)]
fn mirror_of<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, assured: bool) {
    let mut tmp = Default::default();
    if let Some((pk, pv)) = peer(k, e, &mut tmp) {
        mirror_into(pk, pv, assured)
    }
}

#[inline(always)]
fn mirror_into<A: Addr>(pk: &CtKey<A>, pv: &mut CtValue<A>, assured: bool) {
    let found = if assured { A::ct().get_ptr_mut(pk) } else { ct_table::get(pk) };
    match found {
        Some(p) => {
            // SAFETY: map values stay valid while the program runs.
            let p = unsafe { &mut *p };
            // As `advance` writes its own entry, guarded by the peer's tag (untagged peers,
            // written by userspace, are not). The state it is checked against is the one just
            // read: a peer out of step with its entry (a mirror lost to a concurrent change)
            // still takes the next one, as it did before.
            if swap_state(pk, p, (p.state, p.flags), (pv.state, pv.flags)) {
                p.last_seen = pv.last_seen;
            }
        }
        None => insert_either(pk, pv, assured),
    }
    // After the write: a copy made meanwhile from the old state goes too.
    ct_cache::forget(pk);
}

/// Re-creates a lost peer entry in the table of its flow, tagged as every entry the datapath
/// creates. A rare path (the new-flow table pushed the entry out): whatever it pushes out in
/// turn goes uncounted, and in the new-flow table, on a tie, that may be the flow's other
/// entry, sharing its set (the insert is not told its way, as `store_with`'s second is): that
/// entry is then re-created in turn by its flow's next packet.
#[inline(always)]
fn insert_either<A: Addr>(pk: &CtKey<A>, pv: &mut CtValue<A>, assured: bool) {
    pv.tag = tag(pk);
    if assured {
        if A::ct().insert(pk, pv, 0).is_ok() {
            ct_live::stamp(pk);
        }
    } else {
        ct_table::insert(pk, pv);
    }
}

/// Forgets a flow found expired in the assured table, both entries, so that a new flow on
/// its tuple (created in the new-flow table) is not shadowed by it. The agent collects most of them
/// before a packet finds them.
#[inline(always)]
fn forget_assured<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        forget_assured_of(k, e)
    } else {
        forget_assured_outlined(k, e)
    }
}

/// IPv6: a subprogram, to keep the map updates' code out of every stage that may need them.
#[inline(never)]
fn forget_assured_outlined<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    forget_assured_of(k, e)
}

#[inline(always)]
fn forget_assured_of<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    let mut tmp = Default::default();
    if let Some((pk, _)) = peer(k, e, &mut tmp) {
        let _ = A::ct().remove(k);
        let _ = A::ct().remove(pk);
        ct_cache::forget(k);
        ct_cache::forget(pk);
    }
}

/// Removes an entry from whichever table holds it.
#[inline(always)]
fn forget<A: Addr>(k: &CtKey<A>) {
    let _ = A::ct().remove(k);
    ct_table::remove(k);
    ct_cache::forget(k);
}

/// Keeps the other direction alive too while only one direction sends (a one-way UDP
/// stream); re-creates it if the new-flow table pushed it out.
#[inline(always)]
fn refresh_peer<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, assured: bool, now: u32) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        refresh_peer_of(k, e, assured, now)
    } else {
        lb_ct6_refresh_peer(
            k as *const CtKey<A> as *const CtKey6,
            e as *const CtValue<A> as *const CtValue6,
            assured as u32,
            now,
        );
    }
}

/// IPv6: a global function, as `lb_ct6_store`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_refresh_peer(k: *const CtKey6, e: *const CtValue6, assured: u32, now: u32) -> u32 {
    if !k.is_null() && !e.is_null() {
        // SAFETY: checked for null; the verifier checks the caller passes a whole key and value.
        refresh_peer_of(unsafe { &*k }, unsafe { &*e }, assured != 0, now)
    }
    0
}

#[inline(always)]
fn refresh_peer_of<A: Addr>(k: &CtKey<A>, e: &CtValue<A>, assured: bool, now: u32) {
    let mut tmp = Default::default();
    if let Some((pk, pv)) = peer(k, e, &mut tmp) {
        refresh_into(pk, pv, assured, now)
    }
}

#[inline(always)]
fn refresh_into<A: Addr>(pk: &CtKey<A>, pv: &mut CtValue<A>, assured: bool, now: u32) {
    let found = if assured { A::ct().get_ptr_mut(pk) } else { ct_table::get(pk) };
    match found {
        // SAFETY: map values stay valid while the program runs; a racing CPU only writes
        // the same timestamp.
        Some(p) => unsafe { (*p).last_seen = now },
        None => insert_either(pk, pv, assured),
    }
}

/// Looks up a client packet's flow and moves its state on. Inlined for IPv4, the hot path; a
/// subprogram for IPv6, whose 40-byte keys would overflow the pipeline's 512-byte stack frame.
#[inline(always)]
pub fn forward<A: Addr>(flow: &Flow<A>, tcp_flags: u8, now: u32, hook: u32) -> Forward<A> {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6 {
        forward_of(flow, tcp_flags, now, hook)
    } else {
        let mut t = Translation::<A>::default();
        if forward_outlined(flow, tcp_flags, now, hook, &mut t) {
            Forward::Tracked(t)
        } else {
            Forward::New
        }
    }
}

/// Subprograms take and return plain structs: a Rust enum in a subprogram's signature puts
/// its layout (a union whose discriminant sits at an offset) into the object's BTF, which the
/// kernel refuses, and with it every program's BTF function info.
#[inline(never)]
fn forward_outlined<A: Addr>(flow: &Flow<A>, tcp_flags: u8, now: u32, hook: u32, out: &mut Translation<A>) -> bool {
    match forward_of(flow, tcp_flags, now, hook) {
        Forward::Tracked(t) => {
            *out = t;
            true
        }
        Forward::New => false,
    }
}

#[inline(always)]
fn forward_of<A: Addr>(flow: &Flow<A>, tcp_flags: u8, now: u32, hook: u32) -> Forward<A> {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD);
    if let Some(v) = ct_cache::hit(&k, tcp_flags, now) {
        return Forward::Tracked(translation_of(&v));
    }
    // A plain SYN is nearly always a new connection, whose assured-table lookup would miss:
    // it looks there only if its key may be live (`ct_live.rs`).
    let found = if k.proto == PROTO_TCP
        && tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
        && !ct_live::maybe(&k)
    {
        ct_table::get(&k).map(|e| (e, false))
    } else {
        find(&k)
    };
    let Some((e, assured)) = found else {
        return Forward::New;
    };
    // SAFETY: map values stay valid while the program runs; concurrent updates from other
    // CPUs touch only state and times, never the translation.
    let e = unsafe { &mut *e };
    if expired(e, now) {
        if assured {
            forget_assured(&k, e);
        }
        return Forward::New;
    }
    // Read before `advance`, which may move the entry to the other table and free this one.
    let t = translation_of(e);
    if advance(&k, e, assured, tcp_flags, now, hook).is_none() {
        return Forward::New;
    }
    Forward::Tracked(t)
}

/// Records a new flow, both entries, in the new-flow table (counting the live flows they push
/// out at `hook`). `reply_route`: its replies are routed by the datapath as its packets are
/// (SNATed to the node, hairpin). Fails
/// only if IPv6's scratch slot is missing.
#[inline(always)]
pub fn create<A: Addr>(
    flow: &Flow<A>,
    tcp_flags: u8,
    t: &Translation<A>,
    service_id: u32,
    now: u32,
    reply_route: bool,
    hook: u32,
) -> Result<(), ()> {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        create_of(flow, tcp_flags, t, service_id, now, reply_route, hook);
        Ok(())
    } else if create_outlined(flow, t, service_id, now, tcp_flags as u32 | (reply_route as u32) << 8 | hook << 16) {
        Ok(())
    } else {
        Err(())
    }
}

/// IPv6: a subprogram, its two keys and two values (184 bytes) built in the scratch slot; no
/// enum in its signature, and at most five arguments (BPF passes no more in registers): the
/// TCP flags, `reply_route` and the hook share one.
#[inline(never)]
fn create_outlined<A: Addr>(flow: &Flow<A>, t: &Translation<A>, service_id: u32, now: u32, packed: u32) -> bool {
    let s = A::scratch();
    if s.is_null() {
        return false;
    }
    // SAFETY: this CPU's slot; its four entry fields, borrowed apart.
    let (k, e, pk, pv) = unsafe { (&mut (*s).key, &mut (*s).value, &mut (*s).peer_key, &mut (*s).peer_value) };
    *k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD);
    new_entry(flow.proto, packed as u8, t, service_id, now, packed & 0x100 != 0, e);
    e.tag = tag(k);
    ct_peer_into(k, e, pk, pv);
    pv.tag = tag(pk);
    add(packed >> 16, Counter::CtNewEvicted, ct_table::insert_pair(k, e, pk, pv));
    true
}

#[inline(always)]
fn create_of<A: Addr>(
    flow: &Flow<A>,
    tcp_flags: u8,
    t: &Translation<A>,
    service_id: u32,
    now: u32,
    reply_route: bool,
    hook: u32,
) {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD);
    let mut e = CtValue::<A>::default();
    new_entry(flow.proto, tcp_flags, t, service_id, now, reply_route, &mut e);
    e.tag = tag(&k);
    let (pk, mut pv) = ct_peer(&k, &e);
    pv.tag = tag(&pk);
    add(hook, Counter::CtNewEvicted, ct_table::insert_pair(&k, &e, &pk, &pv));
}

/// A new flow's forward entry, written whole into `e`.
#[inline(always)]
fn new_entry<A: Addr>(
    proto: u8,
    tcp_flags: u8,
    t: &Translation<A>,
    service_id: u32,
    now: u32,
    reply_route: bool,
    e: &mut CtValue<A>,
) {
    let (state, flags) = if proto == PROTO_TCP {
        match tcp_step(CT_NONE, 0, CT_DIR_FORWARD, tcp_flags) {
            CtStep::To(s, f) => (s, f),
            CtStep::Restart => (CT_CLOSE, 0),
        }
    } else {
        (CT_UDP, 0)
    };
    let snat_flag = if t.snat { CT_FLAG_SNAT } else { 0 };
    e.nat_addr = t.backend_addr;
    e.snat_addr = if t.snat { t.snat_addr } else { A::default() };
    e.nat_port = t.backend_port;
    e.snat_port = if t.snat { t.snat_port } else { 0 };
    e.state = state;
    e.flags =
        flags | snat_flag | if t.route { CT_FLAG_ROUTE } else { 0 } | if reply_route { CT_FLAG_PEER_ROUTE } else { 0 };
    e.tag = 0;
    e.service_id = service_id;
    e.last_seen = now;
    e.created = now;
}

/// State of a SNAT port search, shared with `probe` through `bpf_loop`.
#[repr(C)]
struct PortSearch<A> {
    /// The flow's client, and its protocol: all of the flow a probe needs (kept small, as
    /// this sits on the stack beside a stage's frame).
    client: A,
    client_port: u16,
    proto: u8,
    addr: A,
    backend_addr: A,
    backend_port: u16,
    /// A free port (network order), or 0.
    free: u16,
    /// A port whose flow finished, or 0.
    finished: u16,
    now: u32,
    /// The flow's hash: where the probes start, and the tag of its claims.
    seed: u32,
}

/// One probe of the SNAT port search: 1 stops the loop (a free port was found).
extern "C" fn probe<A: Addr>(i: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` hands back the pointer `search_snat_port` gave it, to its stack.
    let s = unsafe { &mut *(ctx as *mut PortSearch<A>) };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let h = if i == 0 { s.seed } else { lb_common::flow_hash(s.seed, i, 0, 0, 0) };
    let port = ((SNAT_PORT_MIN as u32 + h % span) as u16).to_be();
    let k = key(s.backend_addr, s.addr, s.backend_port, port, s.proto, CT_DIR_REPLY);
    let Some((e, _)) = find(&k) else {
        return take(s, port);
    };
    // SAFETY: read of a map value while the program runs.
    let e = unsafe { &*e };
    if expired(e, s.now) || (e.snat_addr == s.client && e.snat_port == s.client_port) {
        return take(s, port);
    }
    if s.finished == 0
        && s.proto == PROTO_TCP
        && (e.state == CT_TIME_WAIT || e.state == CT_CLOSE)
        && claim_snat_port(s, port)
    {
        // Claimed now, though a free port may turn up yet: a claim left unused holds its port
        // for a jiffy or two, and the flow is sure of a port.
        s.finished = port;
    }
    0
}

/// Takes `port`, found free, if no other flow claimed it meanwhile: 1 stops the search.
#[inline(always)]
fn take<A: Addr>(s: &mut PortSearch<A>, port: u16) -> i64 {
    if !claim_snat_port(s, port) {
        return 0;
    }
    s.free = port;
    1
}

/// Claims `port` for the searching flow in `LB_SNAT_CLAIMS` (`lb_common::MAP_SNAT_CLAIMS`):
/// false if another flow holds a fresh claim on its slot. A port is free by its reply key's
/// absence, which stays true until the flow that takes it writes that key: without a claim,
/// two CPUs creating flows to one backend at once could both find a port free, and the second
/// reply entry would take the first's, its replies then going to the second client. The flow's
/// own claim is its own (its hash is the tag), so a flow that lost its entries moments after
/// it began takes its port back.
#[inline(always)]
fn claim_snat_port<A: Addr>(s: &PortSearch<A>, port: u16) -> bool {
    let slot = lb_common::snat_claim_slot(s.addr.fold(), s.backend_addr.fold(), s.backend_port, port, s.proto);
    let Some(p) = crate::maps::LB_SNAT_CLAIMS.get_ptr_mut(slot) else {
        return false;
    };
    let mine = (s.seed as u64) << 32 | s.now as u64;
    // SAFETY: an element of an array of u64, 8-byte aligned, valid while the program runs.
    let seen = unsafe { core::ptr::read_volatile(p) };
    if seen != 0 && (seen >> 32) as u32 != s.seed && lb_common::snat_claim_fresh(seen as u32, s.now) {
        return false;
    }
    // SAFETY: as above. Losing the swap, another CPU claimed the slot since the read.
    seen == mine || unsafe { crate::mem::compare_exchange64(p, seen, mine) }
}

/// Picks a source port for SNAT of `flow` to `addr` towards `backend`: a hash of the flow
/// into the SNAT range, probing on while the resulting reply key belongs to a live flow. Each
/// probe hashes anew: consecutive ports (linear probing) form long occupied runs once the
/// range is half full. A port whose TCP flow finished (TIME_WAIT, CLOSE) is taken if no free
/// one turns up, as netfilter lets a new SYN take over such a tuple; a port this very flow
/// held before (its entries were lost) is taken back. A port is taken only once claimed
/// (`claim_snat_port`), so two CPUs do not hand out one port at once. The probes run under `bpf_loop`,
/// so the verifier checks one probe, not every path through 32 of them.
#[inline(always)]
pub fn free_snat_port<A: Addr>(flow: &Flow<A>, addr: A, backend_addr: A, backend_port: u16, now: u32) -> Option<u16> {
    let seed = lb_common::flow_hash(flow.src.fold(), flow.dst.fold(), flow.sport, flow.dport, flow.proto);
    let found = if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        search_snat_port(flow, addr, backend_addr, backend_port, now, seed)
    } else {
        // Five arguments at most: the subprogram reads the clock itself.
        search_snat_port_outlined(flow, &addr, &backend_addr, backend_port, seed)
    };
    let port = found as u16;
    if port == 0 {
        return None;
    }
    if found & TAKEN_OVER != 0 {
        // The finished flow goes whole: its client's late packets (a last ACK, a
        // retransmitted FIN) must not be translated into the new flow's connection, nor
        // rewrite the new flow's reply entry with the old flow's state and route.
        if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
            forget_finished(&addr, &backend_addr, backend_port, port, flow.proto);
        } else {
            forget_finished_outlined(&addr, &backend_addr, backend_port, port, flow.proto);
        }
    }
    Some(port)
}

/// `search_snat_port`'s mark on a port whose finished flow must go.
const TAKEN_OVER: u32 = 1 << 16;

/// IPv6: a subprogram, and the takeover's cleanup another, each frame small enough to sit on
/// the new-flow stage's (the seed is hashed by the caller for the same reason).
#[inline(never)]
fn search_snat_port_outlined<A: Addr>(flow: &Flow<A>, addr: &A, backend_addr: &A, backend_port: u16, seed: u32) -> u32 {
    search_snat_port(flow, *addr, *backend_addr, backend_port, now(), seed)
}

#[inline(never)]
fn forget_finished_outlined<A: Addr>(addr: &A, backend_addr: &A, backend_port: u16, port: u16, proto: u8) {
    forget_finished(addr, backend_addr, backend_port, port, proto)
}

/// Forgets the finished flow whose SNAT port a new flow takes: its forward key is rebuilt
/// from its reply entry (the new flow's create overwrites that one), not kept by the search,
/// so the search's state stays small for one more lookup on the rare takeover.
#[inline(always)]
fn forget_finished<A: Addr>(addr: &A, backend_addr: &A, backend_port: u16, port: u16, proto: u8) {
    let k = key(*backend_addr, *addr, backend_port, port, proto, CT_DIR_REPLY);
    if let Some((e, _)) = find(&k) {
        // SAFETY: map values stay valid while the program runs.
        let mut tmp = Default::default();
        if let Some((pk, _)) = peer(&k, unsafe { &*e }, &mut tmp) {
            forget(pk);
        }
        ct_cache::forget(&k);
    }
}

/// The port found (network order) in the low 16 bits, 0 for none, and `TAKEN_OVER` if it
/// was a finished flow's. A plain integer: no enum in a subprogram's signature.
#[inline(always)]
fn search_snat_port<A: Addr>(flow: &Flow<A>, addr: A, backend_addr: A, backend_port: u16, now: u32, seed: u32) -> u32 {
    let mut s = PortSearch {
        client: flow.src,
        client_port: flow.sport,
        proto: flow.proto,
        addr,
        backend_addr,
        backend_port,
        free: 0,
        finished: 0,
        now,
        seed,
    };
    // SAFETY: helper call; `probe` is a static function and `s` outlives the loop.
    unsafe { bpf_loop(SNAT_PROBES, probe::<A> as *mut core::ffi::c_void, &mut s as *mut PortSearch<A> as *mut _, 0) };
    match (s.free, s.finished) {
        (0, f) if f != 0 => f as u32 | TAKEN_OVER,
        (p, _) => p as u32,
    }
}

/// What a backend's reply must become: its source restored to the frontend, and with SNAT its
/// destination restored to the original client. No `Option`, as for `Translation`.
#[derive(Clone, Copy, Default)]
pub struct Reply<A> {
    pub src_addr: A,
    pub src_port: u16,
    /// The destination is restored too, to `dst_addr:dst_port`.
    pub dst: bool,
    pub dst_addr: A,
    pub dst_port: u16,
    /// The restored source is a node address: route it ourselves.
    pub route: bool,
}

/// Looks up a packet that may be a backend's reply, and moves its flow's state on. Inlined
/// for IPv4 only, as `forward`.
#[inline(always)]
pub fn reply<A: Addr>(flow: &Flow<A>, tcp_flags: u8, hook: u32) -> Option<Reply<A>> {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6 {
        reply_of(flow, tcp_flags, hook)
    } else {
        let mut r = Reply::<A>::default();
        reply_outlined(flow, tcp_flags, hook, &mut r).then_some(r)
    }
}

/// As `forward_outlined`: no enum in the signature.
#[inline(never)]
fn reply_outlined<A: Addr>(flow: &Flow<A>, tcp_flags: u8, hook: u32, out: &mut Reply<A>) -> bool {
    match reply_of(flow, tcp_flags, hook) {
        Some(r) => {
            *out = r;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn reply_of<A: Addr>(flow: &Flow<A>, tcp_flags: u8, hook: u32) -> Option<Reply<A>> {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_REPLY);
    let now = now();
    if let Some(v) = ct_cache::hit(&k, tcp_flags, now) {
        return Some(reply_of_entry(&v));
    }
    let (e, assured) = find(&k)?;
    // SAFETY: as in `forward`.
    let e = unsafe { &mut *e };
    if expired(e, now) {
        if assured {
            forget_assured(&k, e);
        }
        return None;
    }
    if flow.proto == PROTO_TCP
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        && (e.state == CT_LAST_ACK || e.state == CT_TIME_WAIT || e.state == CT_CLOSE)
    {
        // A SYN-ACK on the tuple of a flow closed both ways answers a new connection that
        // reuses the client's port, e.g. straight to the backend: not ours to translate. The
        // finished flow's entry goes, or it would catch the rest of the new connection.
        // Both entries go: with the forward one left, the port would look free to a new SNATed
        // flow while the old client's packets still took it.
        let mut tmp = Default::default();
        if let Some((pk, _)) = peer(&k, e, &mut tmp) {
            forget(&k);
            forget(pk);
        }
        return None;
    }
    // Read before `advance`, which may move the entry to the other table and free this one.
    let r = reply_of_entry(e);
    advance(&k, e, assured, tcp_flags, now, hook)?;
    Some(r)
}

/// The translation back of a reply entry.
#[inline(always)]
fn reply_of_entry<A: Addr>(e: &CtValue<A>) -> Reply<A> {
    Reply {
        src_addr: e.nat_addr,
        src_port: e.nat_port,
        dst: e.flags & CT_FLAG_SNAT != 0,
        dst_addr: e.snat_addr,
        dst_port: e.snat_port,
        route: e.flags & CT_FLAG_ROUTE != 0,
    }
}

/// Finds a flow's entry for an ICMP error quoting it (no state change: an error says nothing
/// about the connection's state). A pointer, not a copy: the fields an error needs (the
/// translation) never change while the entry lives, and IPv6's 52 bytes would not fit on
/// the stack beside the ICMP stage.
#[inline(always)]
pub fn peek<A: Addr>(k: &CtKey<A>) -> Option<&'static CtValue<A>> {
    let (e, _) = find(k)?;
    // SAFETY: map values stay valid while the program runs.
    let e = unsafe { &*e };
    if expired(e, now()) {
        return None;
    }
    Some(e)
}
