//! IP fragments (IPv4, and IPv6's fragment header). Only a datagram's first fragment carries the L4 header, so it records its
//! ports here, keyed the way RFC 791 names a datagram (source, destination, protocol, id);
//! later fragments take those ports and go through the pipeline like their first fragment,
//! with only their IP header rewritten. netfilter reassembles instead (`nf_defrag_ipv4`), and
//! Cilium keeps a fragment map like this one (`ipv4_handle_fragmentation`).
//!
//! Every first fragment is recorded, also of traffic no Service concerns: a later fragment
//! whose first fragment was never seen cannot be told apart from a Service's, and is dropped
//! and counted (the sender's retransmission sends the first fragment first again, as Linux
//! always emits fragments in order).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{FragKey, FragValue, PROTO_TCP};

use crate::{addr::Addr, maps::LB_FRAGMENTS, parse::Headers};

/// Linux's default `ipfrag_time`: a datagram not reassembled by then is dropped anyway, and an
/// older entry may belong to an earlier datagram with the same (wrapped) id.
const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

#[inline(always)]
fn key<A: Addr>(h: &Headers<A>) -> FragKey {
    FragKey {
        src: h.flow.src.words(),
        dst: h.flow.dst.words(),
        id: h.ip_id,
        proto: h.flow.proto,
        family: A::FAMILY,
        _pad: 0,
    }
}

/// Records a first fragment's ports for the rest of its datagram.
#[inline(always)]
pub fn record_first<A: Addr>(h: &Headers<A>) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let v = FragValue { sport: h.flow.sport, dport: h.flow.dport, _pad: 0, created_ns: now };
    // A failed insert loses only this datagram's later fragments, which are then counted.
    let _ = LB_FRAGMENTS.insert(&key(h), &v, 0);
}

/// Gives a later fragment the ports of its datagram; false when its first fragment was not seen.
#[inline(always)]
pub fn follow_first<A: Addr>(h: &mut Headers<A>) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(v) = (unsafe { LB_FRAGMENTS.get(&key(h)).copied() }) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(v.created_ns) > FRAG_TIMEOUT_NS {
        return false;
    }
    h.flow.sport = v.sport;
    h.flow.dport = v.dport;
    if h.flow.proto == PROTO_TCP {
        // Neutral for conntrack: neither opens nor closes a connection.
        h.tcp_flags = lb_common::TCP_ACK;
    }
    true
}
