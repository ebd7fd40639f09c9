//! Stage 4: connection tracking. A forward entry pins a flow to its backend (and its SNAT
//! source, if any) even after the service's backend set changes; a reply entry maps the
//! backend's replies back to the frontend and the original client. Both entries carry the
//! flow's state, netfilter's TCP states (`lb_common::tcp_step`), and every state has its own
//! lifetime.
//!
//! Two tables, so that a flood of new flows cannot push out live connections (netfilter's
//! `early_drop` evicts only unassured entries): a flow starts in `LB_CT4_NEW`, an LRU with
//! per-CPU lists (no global lock on insert), and moves to `LB_CT4`, a preallocated hash that
//! never evicts, once it is assured (handshake done and answered; a UDP flow answered for a
//! while). When it finishes (TIME_WAIT, CLOSE) it moves back to the LRU, so the assured table
//! only ever holds live flows; the agent collects the ones that went idle.
//!
//! Time is jiffies (`bpf_jiffies64`, which the verifier inlines into a load of the kernel's
//! `jiffies`: no helper call), and an entry is rewritten only when its state changes or once
//! per refresh interval, so an established flow costs one lookup and no write per packet.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_loop};
use lb_common::{
    ct_assured, ct_peer, tcp_step, Counter, CtKey4, CtStep, CtValue4, CT_CLOSE, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_FLAG_ASSURED, CT_FLAG_PEER_ROUTE, CT_FLAG_REPLIED, CT_FLAG_ROUTE, CT_FLAG_SNAT, CT_LAST_ACK, CT_NONE, CT_STATES,
    CT_TIME_WAIT, CT_UDP, CT_ESTABLISHED, PROTO_TCP, SNAT_PORT_MAX, SNAT_PORT_MIN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    maps::{LB_CT4, LB_CT4_NEW},
    parse::Flow,
    stats::count,
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
fn expired(e: &CtValue4, now: u32) -> bool {
    let idle = now.wrapping_sub(e.last_seen);
    (idle as i32) >= 0 && idle > timeout(e.state)
}

#[inline(always)]
pub fn key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey4 {
    CtKey4 { src, dst, sport, dport, proto, dir, _pad: 0 }
}

/// Where a flow goes: the backend, and the source it is given if it is SNATed. Plain fields,
/// no `Option`: LLVM spills the uninitialised payload of a `None`, which the verifier refuses
/// ("!read_ok").
#[derive(Clone, Copy)]
pub struct Translation {
    pub backend_addr: u32,
    pub backend_port: u16,
    /// The source is rewritten too, to `snat_addr:snat_port`.
    pub snat: bool,
    pub snat_addr: u32,
    pub snat_port: u16,
    /// The translated packet's source is a node address: route it ourselves.
    pub route: bool,
    /// The frontend's id, for its traffic counters.
    pub service_id: u32,
}

/// Outcome of a forward lookup.
pub enum Forward {
    /// Tracked: apply this translation.
    Tracked(Translation),
    /// Untracked, expired, or a new connection on a finished 5-tuple: choose a backend.
    New,
}

#[inline(always)]
fn translation_of(e: &CtValue4) -> Translation {
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
fn find(k: &CtKey4) -> Option<(*mut CtValue4, bool)> {
    if let Some(e) = LB_CT4.get_ptr_mut(k) {
        return Some((e, true));
    }
    LB_CT4_NEW.get_ptr_mut(k).map(|e| (e, false))
}

/// Writes both entries of a flow into the table its state says (`CT_FLAG_ASSURED`) and out of
/// the other. When the assured table is full the flow stays in the LRU, where it works but
/// can be evicted, and `ct_assured_full` counts it.
#[inline(always)]
fn store(k: &CtKey4, e: &CtValue4, was_assured: bool, hook: u32) {
    let (pk, pv) = ct_peer(k, e);
    let assured = e.flags & CT_FLAG_ASSURED != 0;
    if assured {
        if LB_CT4.insert(k, e, 0).is_ok() && LB_CT4.insert(&pk, &pv, 0).is_ok() {
            // No copy stays behind in the LRU: once the assured entries go (a SYN-ACK of a
            // new connection on the tuple, expiry) it would resurface with a stale state.
            let _ = LB_CT4_NEW.remove(k);
            let _ = LB_CT4_NEW.remove(&pk);
            return;
        }
        // Full: keep the flow working from the LRU, where it can be evicted. The agent's
        // collection makes room; the counter says it happened.
        count(hook, Counter::CtAssuredFull);
        let _ = LB_CT4.remove(k);
        let (mut e, mut pv) = (*e, pv);
        e.flags &= !CT_FLAG_ASSURED;
        pv.flags &= !CT_FLAG_ASSURED;
        let _ = LB_CT4_NEW.insert(k, &e, 0);
        let _ = LB_CT4_NEW.insert(&pk, &pv, 0);
        return;
    }
    let _ = LB_CT4_NEW.insert(k, e, 0);
    let _ = LB_CT4_NEW.insert(&pk, &pv, 0);
    if was_assured {
        let _ = LB_CT4.remove(k);
        let _ = LB_CT4.remove(&pk);
    }
}

/// Moves a tracked entry on for a packet of its flow: state transition (mirrored into the
/// peer entry, and a move between the tables when the flow becomes assured or finishes), or
/// a refresh at most once per interval. `None`: the packet starts a new flow on this tuple.
#[inline(always)]
fn advance(k: &CtKey4, e: &mut CtValue4, assured: bool, tcp_flags: u8, now: u32, hook: u32) -> Option<()> {
    // Nearly every packet: an assured established TCP flow and a segment without SYN, FIN or
    // RST, which changes nothing but (once a second) the time.
    if k.proto == PROTO_TCP && e.state == CT_ESTABLISHED && tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 && assured {
        if now.wrapping_sub(e.last_seen) as i32 > global(&CT_REFRESH) as i32 {
            e.last_seen = now;
            refresh_peer(k, e, assured, now);
        }
        return Some(());
    }
    let (state, mut flags) = if k.proto == PROTO_TCP {
        match tcp_step(e.state, e.flags, k.dir, tcp_flags) {
            CtStep::To(s, f) => (s, f),
            CtStep::Restart => return None,
        }
    } else if k.dir == CT_DIR_REPLY {
        (e.state, e.flags | CT_FLAG_REPLIED)
    } else {
        (e.state, e.flags)
    };
    let stream = state == CT_UDP && now.wrapping_sub(e.created) as i32 >= global(&CT_UDP_STREAM) as i32;
    if ct_assured(state, flags, stream) {
        flags |= CT_FLAG_ASSURED;
    } else {
        flags &= !CT_FLAG_ASSURED;
    }
    if state == e.state && flags == e.flags {
        if now.wrapping_sub(e.last_seen) as i32 > global(&CT_REFRESH) as i32 {
            e.last_seen = now;
            refresh_peer(k, e, assured, now);
        }
        return Some(());
    }
    e.state = state;
    e.flags = flags;
    e.last_seen = now;
    if (flags & CT_FLAG_ASSURED != 0) == assured {
        // Same table: both entries change in place.
        let (pk, pv) = ct_peer(k, e);
        mirror(&pk, &pv, assured);
    } else {
        store(k, e, assured, hook);
    }
    Some(())
}

/// Writes a new state into the peer entry where it is, or re-creates it.
#[inline(always)]
fn mirror(pk: &CtKey4, pv: &CtValue4, assured: bool) {
    let found = if assured { LB_CT4.get_ptr_mut(pk) } else { LB_CT4_NEW.get_ptr_mut(pk) };
    match found {
        Some(p) => {
            // SAFETY: map values stay valid while the program runs.
            let p = unsafe { &mut *p };
            p.state = pv.state;
            p.flags = pv.flags;
            p.last_seen = pv.last_seen;
        }
        None => {
            let _ = if assured { LB_CT4.insert(pk, pv, 0) } else { LB_CT4_NEW.insert(pk, pv, 0) };
        }
    }
}

/// Forgets a flow found expired in the assured table, both entries, so that a new flow on
/// its tuple (created in the LRU) is not shadowed by it. The agent collects most of them
/// before a packet finds them.
#[inline(always)]
fn forget_assured(k: &CtKey4, e: &CtValue4) {
    let (pk, _) = ct_peer(k, e);
    let _ = LB_CT4.remove(k);
    let _ = LB_CT4.remove(&pk);
}

/// Keeps the other direction alive too while only one direction sends (a one-way UDP
/// stream); re-creates it if the LRU evicted it.
#[inline(always)]
fn refresh_peer(k: &CtKey4, e: &CtValue4, assured: bool, now: u32) {
    let (pk, pv) = ct_peer(k, e);
    let found = if assured { LB_CT4.get_ptr_mut(&pk) } else { LB_CT4_NEW.get_ptr_mut(&pk) };
    match found {
        // SAFETY: map values stay valid while the program runs; a racing CPU only writes
        // the same timestamp.
        Some(p) => unsafe { (*p).last_seen = now },
        None => {
            let _ = if assured { LB_CT4.insert(&pk, &pv, 0) } else { LB_CT4_NEW.insert(&pk, &pv, 0) };
        }
    }
}

/// Looks up a client packet's flow and moves its state on.
#[inline(always)]
pub fn forward(flow: &Flow, tcp_flags: u8, now: u32, hook: u32) -> Forward {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD);
    let Some((e, assured)) = find(&k) else {
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

/// Records a new flow, both entries, in the LRU table. `reply_route`: replies will come from
/// a node address (a node port). Fails only if the kernel refuses the insert.
#[inline(always)]
pub fn create(
    flow: &Flow,
    tcp_flags: u8,
    t: &Translation,
    service_id: u32,
    now: u32,
    reply_route: bool,
) -> Result<(), ()> {
    let (state, flags) = if flow.proto == PROTO_TCP {
        match tcp_step(CT_NONE, 0, CT_DIR_FORWARD, tcp_flags) {
            CtStep::To(s, f) => (s, f),
            CtStep::Restart => (CT_CLOSE, 0),
        }
    } else {
        (CT_UDP, 0)
    };
    let snat_flag = if t.snat { CT_FLAG_SNAT } else { 0 };
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD);
    let e = CtValue4 {
        nat_addr: t.backend_addr,
        snat_addr: if t.snat { t.snat_addr } else { 0 },
        nat_port: t.backend_port,
        snat_port: if t.snat { t.snat_port } else { 0 },
        state,
        flags: flags
            | snat_flag
            | if t.route { CT_FLAG_ROUTE } else { 0 }
            | if reply_route { CT_FLAG_PEER_ROUTE } else { 0 },
        _pad: 0,
        service_id,
        last_seen: now,
        created: now,
    };
    let (pk, pv) = ct_peer(&k, &e);
    LB_CT4_NEW.insert(&k, &e, 0).map_err(|_| ())?;
    LB_CT4_NEW.insert(&pk, &pv, 0).map_err(|_| ())
}

/// State of a SNAT port search, shared with `probe` through `bpf_loop`.
#[repr(C)]
struct PortSearch {
    flow: Flow,
    addr: u32,
    backend_addr: u32,
    backend_port: u16,
    /// A free port (network order), or 0.
    free: u16,
    /// A port whose flow finished, or 0.
    finished: u16,
    now: u32,
    seed: u32,
}

/// One probe of the SNAT port search: 1 stops the loop (a free port was found).
extern "C" fn probe(i: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` hands back the pointer `free_snat_port` gave it, to its stack.
    let s = unsafe { &mut *(ctx as *mut PortSearch) };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let h = if i == 0 { s.seed } else { lb_common::flow_hash(s.seed, i, 0, 0, 0) };
    let port = ((SNAT_PORT_MIN as u32 + h % span) as u16).to_be();
    let k = key(s.backend_addr, s.addr, s.backend_port, port, s.flow.proto, CT_DIR_REPLY);
    let Some((e, _)) = find(&k) else {
        s.free = port;
        return 1;
    };
    // SAFETY: read of a map value while the program runs.
    let e = unsafe { &*e };
    if expired(e, s.now) || (e.snat_addr == s.flow.src && e.snat_port == s.flow.sport) {
        s.free = port;
        return 1;
    }
    if s.finished == 0 && s.flow.proto == PROTO_TCP && (e.state == CT_TIME_WAIT || e.state == CT_CLOSE) {
        s.finished = port;
    }
    0
}

/// Picks a source port for SNAT of `flow` to `addr` towards `backend`: a hash of the flow
/// into the SNAT range, probing on while the resulting reply key belongs to a live flow. Each
/// probe hashes anew: consecutive ports (linear probing) form long occupied runs once the
/// range is half full. A port whose TCP flow finished (TIME_WAIT, CLOSE) is taken if no free
/// one turns up, as netfilter lets a new SYN take over such a tuple; a port this very flow
/// held before (its entries were lost) is taken back. The probes run under `bpf_loop`, so the
/// verifier checks one probe, not every path through 32 of them.
#[inline(always)]
pub fn free_snat_port(flow: &Flow, addr: u32, backend_addr: u32, backend_port: u16, now: u32) -> Option<u16> {
    let mut s = PortSearch {
        flow: *flow,
        addr,
        backend_addr,
        backend_port,
        free: 0,
        finished: 0,
        now,
        seed: lb_common::flow_hash(flow.src, flow.dst, flow.sport, flow.dport, flow.proto),
    };
    // SAFETY: helper call; `probe` is a static function and `s` outlives the loop.
    unsafe { bpf_loop(SNAT_PROBES, probe as *mut core::ffi::c_void, &mut s as *mut PortSearch as *mut _, 0) };
    match (s.free, s.finished) {
        (0, 0) => None,
        (0, f) => Some(f),
        (p, _) => Some(p),
    }
}

/// What a backend's reply must become: its source restored to the frontend, and with SNAT its
/// destination restored to the original client. No `Option`, as for `Translation`.
pub struct Reply {
    pub src_addr: u32,
    pub src_port: u16,
    /// The destination is restored too, to `dst_addr:dst_port`.
    pub dst: bool,
    pub dst_addr: u32,
    pub dst_port: u16,
    /// The restored source is a node address: route it ourselves.
    pub route: bool,
}

/// Looks up a packet that may be a backend's reply, and moves its flow's state on.
#[inline(always)]
pub fn reply(flow: &Flow, tcp_flags: u8, hook: u32) -> Option<Reply> {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_REPLY);
    let (e, assured) = find(&k)?;
    // SAFETY: as in `forward`.
    let e = unsafe { &mut *e };
    let now = now();
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
        let _ = if assured { LB_CT4.remove(&k) } else { LB_CT4_NEW.remove(&k) };
        return None;
    }
    // Read before `advance`, which may move the entry to the other table and free this one.
    let r = Reply {
        src_addr: e.nat_addr,
        src_port: e.nat_port,
        dst: e.flags & CT_FLAG_SNAT != 0,
        dst_addr: e.snat_addr,
        dst_port: e.snat_port,
        route: e.flags & CT_FLAG_ROUTE != 0,
    };
    advance(&k, e, assured, tcp_flags, now, hook)?;
    Some(r)
}

/// Reads a flow's entry for an ICMP error quoting it (no state change: an error says nothing
/// about the connection's state).
#[inline(always)]
pub fn peek(k: &CtKey4) -> Option<CtValue4> {
    let (e, _) = find(k)?;
    // SAFETY: the value is copied out at once.
    let e = unsafe { *e };
    if expired(&e, now()) {
        return None;
    }
    Some(e)
}
