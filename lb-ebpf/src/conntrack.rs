//! Stage 4: connection tracking. A forward entry pins a flow to its backend (and its SNAT
//! source, if any) even after the service's backend set changes; a reply entry maps the
//! backend's replies back to the frontend and the original client.
//!
//! Lifetimes follow the TCP state as far as one side of the flow reveals it, the way
//! Cilium's `conntrack.h` does: short while only a SYN was seen, long once established, short
//! again after FIN or RST so a reused 5-tuple gets a fresh backend choice.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FLAG_ROUTE, CT_FLAG_SNAT,
    FAMILY_IPV4, PROTO_TCP, SNAT_PORT_MAX, SNAT_PORT_MIN,
};

use crate::{
    maps::LB_CONNTRACK,
    parse::{Flow, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
};

// Lifetimes in nanoseconds; the agent may override them at load time.
#[no_mangle]
static CT_TCP_SYN_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
#[no_mangle]
static CT_TCP_ESTABLISHED_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
#[no_mangle]
static CT_TCP_CLOSE_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
#[no_mangle]
static CT_UDP_TIMEOUT_NS: u64 = 60 * 1_000_000_000;

/// An entry is rewritten at most this often per flow while its state does not change, so an
/// established flow costs a map lookup but not a write per packet.
const REFRESH_INTERVAL_NS: u64 = 1_000_000_000;
/// Probes for a free SNAT port before giving up on a flow. The range has 4,536 ports per
/// backend, each held for the close timeout after its flow ends, so under a burst of short
/// connections to one remote backend it runs half full (found by the rolling-update test);
/// 32 independent probes then fail one flow in 10^9. Only new SNATed flows whose first probes
/// collide pay for more lookups.
const SNAT_PROBES: u32 = 32;

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    // SAFETY: reading a static; volatile so the compiler keeps the load the loader patches.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn lifetime(proto: u8, tcp_flags: u8, ct_flags: u8) -> u64 {
    if proto != PROTO_TCP {
        return global(&CT_UDP_TIMEOUT_NS);
    }
    if ct_flags & CT_FLAG_CLOSING != 0 || tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        global(&CT_TCP_CLOSE_TIMEOUT_NS)
    } else if tcp_flags & TCP_FLAG_ACK == 0 {
        global(&CT_TCP_SYN_TIMEOUT_NS)
    } else {
        global(&CT_TCP_ESTABLISHED_TIMEOUT_NS)
    }
}

#[inline(always)]
fn closing_flag(tcp_flags: u8) -> u8 {
    if tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        CT_FLAG_CLOSING
    } else {
        0
    }
}

#[inline(always)]
pub fn key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
    CtKey { src: [src, 0, 0, 0], dst: [dst, 0, 0, 0], sport, dport, proto, family: FAMILY_IPV4, dir, _pad: 0 }
}

/// Where a flow goes: the backend, and the source it is given if it is SNATed.
#[derive(Clone, Copy)]
pub struct Translation {
    pub backend_addr: u32,
    pub backend_port: u16,
    /// `Some((addr, port))` when the source is rewritten too.
    pub snat: Option<(u32, u16)>,
    /// The translated packet's source is a node address: route it ourselves.
    pub route: bool,
}

impl Translation {
    /// Key of the replies of `flow` after translation.
    #[inline(always)]
    fn reply_key(&self, flow: &Flow) -> CtKey {
        let (dst, dport) = self.snat.unwrap_or((flow.src, flow.sport));
        key(self.backend_addr, dst, self.backend_port, dport, flow.proto, CT_DIR_REPLY)
    }
}

/// Outcome of a forward lookup.
pub enum Forward {
    /// Tracked: apply this translation.
    Tracked(Translation),
    /// Untracked, expired, or a new connection on a closed 5-tuple: choose a backend.
    New,
}

#[inline(always)]
fn translation_of(entry: &CtValue) -> Translation {
    Translation {
        backend_addr: entry.nat_addr[0],
        backend_port: entry.nat_port,
        snat: if entry.flags & CT_FLAG_SNAT != 0 { Some((entry.snat_addr[0], entry.snat_port)) } else { None },
        route: entry.flags & CT_FLAG_ROUTE != 0,
    }
}

/// The reply entry for `flow` translated by `t`. `flags` carries the reply's own ROUTE bit
/// (set when the frontend is a node address).
#[inline(always)]
fn reply_value(flow: &Flow, t: &Translation, flags: u8, service_id: u32, expires: u64, created: u64) -> CtValue {
    let snat = if t.snat.is_some() { CT_FLAG_SNAT } else { 0 };
    CtValue {
        nat_addr: [flow.dst, 0, 0, 0],
        snat_addr: [flow.src, 0, 0, 0],
        nat_port: flow.dport,
        snat_port: flow.sport,
        flags: (flags & !CT_FLAG_SNAT) | snat,
        family: FAMILY_IPV4,
        _pad: 0,
        service_id,
        _pad2: 0,
        expires_ns: expires,
        created_ns: created,
    }
}

/// Looks up a client packet's flow and keeps its entries alive.
#[inline(always)]
pub fn forward(flow: &Flow, tcp_flags: u8, now: u64) -> Forward {
    let Some(entry) =
        LB_CONNTRACK.get_ptr_mut(&key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD))
    else {
        return Forward::New;
    };
    // SAFETY: LRU values stay valid for the program run; races with other CPUs only affect
    // timestamps and flags, which are advisory.
    let entry = unsafe { &mut *entry };
    if now > entry.expires_ns {
        return Forward::New;
    }
    let syn_only = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if flow.proto == PROTO_TCP && syn_only && entry.flags & CT_FLAG_CLOSING != 0 {
        // The client reuses the 5-tuple of a finished connection: a new connection deserves
        // a fresh backend choice, like the kernel's conntrack starts a new entry.
        return Forward::New;
    }
    let t = translation_of(entry);
    let flags = entry.flags | closing_flag(tcp_flags);
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    if flags != entry.flags || expires > entry.expires_ns + REFRESH_INTERVAL_NS {
        entry.flags = flags;
        entry.expires_ns = expires;
        // LRU may have evicted the reply half while the forward half stayed busy; restoring it
        // here, at most once per interval, keeps replies translated.
        // `_pad` of a forward entry remembers the reply half's ROUTE bit for this re-insert.
        let reply_flags = (flags & !CT_FLAG_ROUTE) | (entry._pad as u8 & CT_FLAG_ROUTE);
        let reply = reply_value(flow, &t, reply_flags, entry.service_id, expires, entry.created_ns);
        let _ = LB_CONNTRACK.insert(&t.reply_key(flow), &reply, 0);
    }
    Forward::Tracked(t)
}

/// Records a new flow, both halves. `reply_route`: replies will come from a node address (a
/// node port). Fails only if the kernel refuses the insert.
#[inline(always)]
pub fn create(
    flow: &Flow,
    tcp_flags: u8,
    t: &Translation,
    service_id: u32,
    now: u64,
    reply_route: bool,
) -> Result<(), i32> {
    let flags = closing_flag(tcp_flags);
    let reply_route = if reply_route { CT_FLAG_ROUTE } else { 0 };
    let fwd_route = if t.route { CT_FLAG_ROUTE } else { 0 };
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    let (snat_flag, snat_addr, snat_port) = match t.snat {
        Some((a, p)) => (CT_FLAG_SNAT, a, p),
        None => (0, 0, 0),
    };
    let fwd = CtValue {
        nat_addr: [t.backend_addr, 0, 0, 0],
        snat_addr: [snat_addr, 0, 0, 0],
        nat_port: t.backend_port,
        snat_port,
        flags: flags | snat_flag | fwd_route,
        family: FAMILY_IPV4,
        _pad: reply_route as u16,
        service_id,
        _pad2: 0,
        expires_ns: expires,
        created_ns: now,
    };
    LB_CONNTRACK.insert(&key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_FORWARD), &fwd, 0)?;
    LB_CONNTRACK.insert(&t.reply_key(flow), &reply_value(flow, t, flags | reply_route, service_id, expires, now), 0)
}

/// Picks a source port for SNAT of `flow` to `addr` towards `backend`: a hash of the flow
/// into the SNAT range, probing on while the resulting reply key belongs to a live flow. Each
/// probe hashes anew: consecutive ports (linear probing) form long occupied runs once the range
/// is half full, and a burst of connections then ran out of probes.
#[inline(always)]
pub fn free_snat_port(flow: &Flow, addr: u32, backend_addr: u32, backend_port: u16, now: u64) -> Option<u16> {
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let seed = lb_common::flow_hash(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    let mut i = 0;
    while i < SNAT_PROBES {
        let h = if i == 0 { seed } else { lb_common::flow_hash(seed, i, 0, 0, 0) };
        let port = (SNAT_PORT_MIN as u32 + h % span) as u16;
        let k = key(backend_addr, addr, backend_port, port.to_be(), flow.proto, CT_DIR_REPLY);
        match LB_CONNTRACK.get_ptr(&k) {
            // SAFETY: read of an LRU value while the program runs.
            Some(e) if unsafe { (*e).expires_ns } >= now => {}
            _ => return Some(port.to_be()),
        }
        i += 1;
    }
    None
}

/// What a backend's reply must become: its source restored to the frontend, and with SNAT its
/// destination restored to the original client.
pub struct Reply {
    pub src: (u32, u16),
    pub dst: Option<(u32, u16)>,
    /// The restored source is a node address: route it ourselves.
    pub route: bool,
}

/// Looks up a packet that may be a backend's reply.
#[inline(always)]
pub fn reply(flow: &Flow, tcp_flags: u8) -> Option<Reply> {
    let k = key(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, CT_DIR_REPLY);
    let entry = LB_CONNTRACK.get_ptr_mut(&k)?;
    // SAFETY: as in `forward`.
    let entry = unsafe { &mut *entry };
    // Only read the clock on a hit: most packets reaching here are not replies at all.
    let now = now();
    if now > entry.expires_ns {
        return None;
    }
    if entry.flags & CT_FLAG_CLOSING != 0 && tcp_flags & TCP_FLAG_SYN != 0 && flow.proto == PROTO_TCP {
        // A SYN-ACK on the tuple of a finished flow answers a new connection that reuses the
        // client's port, e.g. straight to the backend: not ours to translate. The finished
        // flow's entry goes, or it would catch the rest of the new connection.
        let _ = LB_CONNTRACK.remove(&k);
        return None;
    }
    let flags = entry.flags | closing_flag(tcp_flags) | CT_FLAG_REPLIED;
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    if flags != entry.flags || expires > entry.expires_ns + REFRESH_INTERVAL_NS {
        entry.flags = flags;
        entry.expires_ns = expires;
    }
    Some(Reply {
        src: (entry.nat_addr[0], entry.nat_port),
        dst: if entry.flags & CT_FLAG_SNAT != 0 { Some((entry.snat_addr[0], entry.snat_port)) } else { None },
        route: entry.flags & CT_FLAG_ROUTE != 0,
    })
}
