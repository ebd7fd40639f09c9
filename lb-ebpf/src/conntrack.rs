//! Stage 4: connection tracking. A forward entry pins a flow to its backend even after the
//! service's backend set changes; a reply entry maps the backend's replies back to the frontend.
//!
//! Lifetimes follow the TCP state as far as one side of the flow reveals it, the way
//! Cilium's `conntrack.h` does: short while only a SYN was seen, long once established, short
//! again after FIN or RST so a reused 5-tuple gets a fresh backend choice.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, FAMILY_IPV4, PROTO_TCP,
};

use crate::{
    maps::LB_CONNTRACK,
    parse::{Flow, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
};

// Lifetimes in nanoseconds; the agent may override them at load time (`EbpfLoader::set_global`).
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
fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        src: [flow.src, 0, 0, 0],
        dst: [flow.dst, 0, 0, 0],
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: FAMILY_IPV4,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// Key of the replies of `flow` once it is translated to `backend`.
#[inline(always)]
fn reply_key(flow: &Flow, backend_addr: u32, backend_port: u16) -> CtKey {
    CtKey {
        src: [backend_addr, 0, 0, 0],
        dst: [flow.src, 0, 0, 0],
        sport: backend_port,
        dport: flow.sport,
        proto: flow.proto,
        family: FAMILY_IPV4,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// Outcome of a forward lookup.
pub enum Forward {
    /// Tracked: translate to this backend address and port.
    Tracked { addr: u32, port: u16 },
    /// Untracked, expired, or a new connection on a closed 5-tuple: choose a backend.
    New,
}

/// Looks up a client packet's flow and keeps its entries alive.
#[inline(always)]
pub fn forward(flow: &Flow, tcp_flags: u8, now: u64) -> Forward {
    let key = forward_key(flow);
    let Some(entry) = LB_CONNTRACK.get_ptr_mut(&key) else {
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
    let flags = entry.flags | closing_flag(tcp_flags);
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    if flags != entry.flags || expires > entry.expires_ns + REFRESH_INTERVAL_NS {
        entry.flags = flags;
        entry.expires_ns = expires;
        // LRU may have evicted the reply half while the forward half stayed busy; restoring it
        // here, at most once per interval, keeps replies translated.
        let reply = CtValue {
            nat_addr: [flow.dst, 0, 0, 0],
            nat_port: flow.dport,
            flags,
            family: FAMILY_IPV4,
            service_id: entry.service_id,
            expires_ns: expires,
            created_ns: entry.created_ns,
        };
        let _ = LB_CONNTRACK.insert(&reply_key(flow, entry.nat_addr[0], entry.nat_port), &reply, 0);
    }
    Forward::Tracked { addr: entry.nat_addr[0], port: entry.nat_port }
}

/// Records a new flow to `backend`, both halves. Fails only if the kernel refuses the insert.
#[inline(always)]
pub fn create(flow: &Flow, tcp_flags: u8, backend: &Backend, service_id: u32, now: u64) -> Result<(), i32> {
    let flags = closing_flag(tcp_flags);
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    let fwd = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        family: FAMILY_IPV4,
        service_id,
        expires_ns: expires,
        created_ns: now,
    };
    LB_CONNTRACK.insert(&forward_key(flow), &fwd, 0)?;
    let rev = CtValue { nat_addr: [flow.dst, 0, 0, 0], nat_port: flow.dport, ..fwd };
    LB_CONNTRACK.insert(&reply_key(flow, backend.addr[0], backend.port), &rev, 0)
}

/// Looks up a packet that may be a backend's reply; returns the frontend address and port to
/// put in its source.
#[inline(always)]
pub fn reply(flow: &Flow, tcp_flags: u8) -> Option<(u32, u16)> {
    let key = CtKey {
        src: [flow.src, 0, 0, 0],
        dst: [flow.dst, 0, 0, 0],
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: FAMILY_IPV4,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let entry = LB_CONNTRACK.get_ptr_mut(&key)?;
    // SAFETY: as in `forward`.
    let entry = unsafe { &mut *entry };
    // Only read the clock on a hit: most packets reaching here are not replies at all.
    let now = now();
    if now > entry.expires_ns {
        return None;
    }
    let flags = entry.flags | closing_flag(tcp_flags) | CT_FLAG_REPLIED;
    let expires = now + lifetime(flow.proto, tcp_flags, flags);
    if flags != entry.flags || expires > entry.expires_ns + REFRESH_INTERVAL_NS {
        entry.flags = flags;
        entry.expires_ns = expires;
    }
    Some((entry.nat_addr[0], entry.nat_port))
}
