//! Stage 2: is the packet ours, and to which frontend?
//!
//! The pre-filter first (`LB_FILTER`): a packet whose destination is no frontend and whose
//! source is no backend goes on after two array loads. A frontend is then found by exact
//! address (ClusterIP, LoadBalancer ingress IP, external IP), or, only for packets to one of
//! the node's own addresses, as a node port; the pipeline asks only for new flows, after
//! conntrack.
use lb_common::{
    filter_bit, LocalSourceData, NodeAddrKey, ServiceKey, ServiceValue, FILTER_BACKENDS, FILTER_FRONTENDS, SCOPE_EXACT,
    SCOPE_FROM_CLUSTER, SCOPE_NODEPORT, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    addr::Addr,
    maps::{
        LocalSourceKey, SourceRangeKey, LB_FILTER, LB_LOCAL_SOURCES, LB_NODE_ADDRS, LB_SERVICES, LB_SERVICES_GEN,
        LB_SOURCE_RANGES,
    },
    parse::Flow,
};

#[inline(always)]
fn filter_hit(base: u32, addr: u32, port: u16, proto: u8) -> bool {
    let bit = filter_bit(addr, port, proto);
    match LB_FILTER.get(base + (bit >> 6)) {
        Some(word) => *word & (1u64 << (bit & 63)) != 0,
        None => false,
    }
}

/// Whether the packet's destination may be a frontend.
#[inline(always)]
pub fn maybe_frontend<A: Addr>(flow: &Flow<A>) -> bool {
    filter_hit(FILTER_FRONTENDS, flow.dst.fold(), flow.dport, flow.proto)
}

/// Whether the packet's source may be a backend (so the packet a reply to translate).
#[inline(always)]
pub fn maybe_backend<A: Addr>(flow: &Flow<A>) -> bool {
    filter_hit(FILTER_BACKENDS, flow.src.fold(), flow.sport, flow.proto)
}

#[inline(always)]
fn get<A: Addr>(addr: A, flow: &Flow<A>, scope: u8) -> Option<ServiceValue> {
    let a = addr.words();
    let port_proto_family = flow.dport as u32 | (flow.proto as u32) << 16 | (A::FAMILY as u32) << 24;
    // As whole 32-bit words, as `conntrack::key` writes its keys (the map's hash reads words).
    // SAFETY: `ServiceKey` is `repr(C)`, six words of plain integers: the address, then `port`,
    // `proto` and `family`, then `scope` and its padding (asserted in lb-common), little-endian.
    let key: ServiceKey = unsafe { core::mem::transmute([a[0], a[1], a[2], a[3], port_proto_family, scope as u32]) };
    // SAFETY: the value is copied out at once: the agent may replace the entry while we run,
    // and a copy keeps count and generation consistent with each other.
    unsafe { LB_SERVICES.get(&key).copied() }
}

/// Looks up the frontend a packet is addressed to. `from_cluster` says whether the source is
/// the cluster's own (asked only at an `externalTrafficPolicy: Local` external frontend, which
/// then gives such sources its cluster-wide companion entry, kube-proxy's short-circuit).
#[inline(always)]
pub fn lookup<A: Addr>(flow: &Flow<A>, from_cluster: impl Fn(&Flow<A>) -> bool) -> Option<ServiceValue> {
    find(flow, from_cluster).map(|(svc, _)| svc)
}

/// `lookup`, and whether what it found depends on the packet's source (an
/// `externalTrafficPolicy: Local` external frontend, which asks `from_cluster`).
#[inline(always)]
fn find<A: Addr>(flow: &Flow<A>, from_cluster: impl Fn(&Flow<A>) -> bool) -> Option<(ServiceValue, bool)> {
    let (svc, addr, scope) = match get(flow.dst, flow, SCOPE_EXACT) {
        Some(svc) => (svc, flow.dst, SCOPE_EXACT),
        None => {
            if !is_node_addr(flow.dst) {
                return None;
            }
            (get(A::default(), flow, SCOPE_NODEPORT)?, A::default(), SCOPE_NODEPORT)
        }
    };
    let local_external = SVC_FLAG_EXTERNAL | SVC_FLAG_LOCAL_ONLY;
    if svc.flags & local_external == local_external {
        if from_cluster(flow) {
            if let Some(c) = get(addr, flow, scope | SCOPE_FROM_CLUSTER) {
                return Some((c, true));
            }
        }
        return Some((svc, true));
    }
    Some((svc, false))
}

/// Whether `addr` is one of the node's addresses node ports answer on (`LB_NODE_ADDRS`).
#[inline(always)]
pub fn is_node_addr<A: Addr>(addr: A) -> bool {
    let a = addr.words();
    // SAFETY: `NodeAddrKey` is `repr(C)`, five words: the address, then `family` and its
    // padding (asserted in lb-common). Words, for the reason `get` gives; field by field the
    // padding took a call to `memset`.
    let node: NodeAddrKey = unsafe { core::mem::transmute([a[0], a[1], a[2], a[3], A::FAMILY as u32]) };
    LB_NODE_ADDRS.get_ptr(&node).is_some()
}

/// `is_node_addr` for the rare paths that ask it of a reply or an ICMP error's source: a
/// subprogram for IPv6, whose stages have no registers to spare for the key there (inlined,
/// LLVM's spills made the verifier refuse the reply stage: "invalid size of register fill").
#[inline(always)]
pub fn is_node_source<A: Addr>(addr: &A) -> bool {
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        is_node_addr(*addr)
    } else {
        is_node_addr_outlined(addr)
    }
}

#[inline(never)]
fn is_node_addr_outlined<A: Addr>(addr: &A) -> bool {
    is_node_addr(*addr)
}

/// `LB_SERVICES_GEN`, which the agent moves on after each change to the frontend maps.
#[inline(always)]
fn generation() -> u32 {
    match LB_SERVICES_GEN.get_ptr(0) {
        // SAFETY: an array element, valid while the program runs; volatile, as the agent
        // writes it meanwhile.
        Some(g) => unsafe { core::ptr::read_volatile(g) },
        None => 0,
    }
}

/// `lookup` for IPv4's tc and XDP pipelines, through a copy of the frontend this CPU found
/// last: a flood of new connections (a SYN flood, health checkers, HTTP/1.0 clients) is
/// nearly always to one frontend, and the hash lookup the copy saves was about a fifth of the
/// first stage's profile of a new flow at XDP. The copy stands only while `LB_SERVICES_GEN`
/// is what it was before the lookup that made it: the agent moves it on right after each
/// write or removal of an `LB_SERVICES` entry, before anything only the old entry used goes,
/// and after `LB_NODE_ADDRS` loses an address. A packet that reads the new generation also
/// finds the entries written before it: loads stay in order on x86, as do the agent's stores.
/// (A weakly ordered CPU could pair the new generation with the old entry, a copy that would
/// then stand until the next change; lb is built and tested on x86 only.) A packet that took
/// the copy just before the agent's move is one that would have read the entry just before
/// it: the old table's slots stay for `SLOT_GRACE` for it. Frontends whose answer depends on
/// the source (`find`) are never copied. Not for the socket programs: they run in process
/// context, where two tasks may interleave on one CPU's slot.
#[inline(always)]
pub fn lookup_cached<A: Addr>(flow: &Flow<A>) -> Option<ServiceValue> {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        return lookup(flow, from_cluster);
    }
    // Before the lookup: a change that lands after this read moves the generation past what
    // the copy is stamped with.
    let gen = generation();
    let s = <[u32; 4] as Addr>::scratch();
    if !s.is_null() {
        // SAFETY: this CPU's slot; its cache fields only.
        let (svc, [dst, tag, seen]) = unsafe { ((*s).fe, (*s).fe_for) };
        if dst == flow.dst.fold() && seen == gen && tag == found_for(flow) {
            return Some(svc);
        }
    }
    let (svc, by_source) = find(flow, from_cluster)?;
    if !by_source && !s.is_null() {
        // SAFETY: as above.
        unsafe {
            (*s).fe = svc;
            (*s).fe_for = [flow.dst.fold(), found_for(flow), gen];
        }
    }
    Some(svc)
}

/// Whether a packet's source is the cluster's own (`LB_LOCAL_SOURCES`).
#[inline(always)]
pub fn from_cluster<A: Addr>(flow: &Flow<A>) -> bool {
    // The whole key is looked up: the family word and every bit of the address (a lookup
    // with fewer bits would miss every longer prefix stored, IPv6's /64s among them).
    let key = LocalSourceKey::new(
        32 + 8 * A::ADDR_LEN as u32,
        LocalSourceData { family_be: (A::FAMILY as u32).to_be(), addr: flow.src.words() },
    );
    LB_LOCAL_SOURCES.get(&key).is_some()
}

/// `loadBalancerSourceRanges`: whether the client may use this frontend.
#[inline(always)]
pub fn source_allowed<A: Addr>(svc: &ServiceValue, flow: &Flow<A>) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    // As in `from_cluster`: the service word and every bit of the address.
    let key = SourceRangeKey::new(
        32 + 8 * A::ADDR_LEN as u32,
        lb_common::SourceRangeData { service_id_be: svc.id.to_be(), addr: flow.src.words() },
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}

/// What a frontend handed over or copied was found for, beside its destination: the
/// destination port and protocol, and a bit no empty slot has.
#[inline(always)]
fn found_for<A: Addr>(flow: &Flow<A>) -> u32 {
    flow.dport as u32 | (flow.proto as u32) << 16 | 1 << 31
}

/// Hands the frontend found for a new IPv4 flow to the new-flow stage, which the pipeline
/// tail-calls next, through this CPU's scratch slot (a tail call stays on its CPU, and nothing
/// else runs there in between): looking it up again there cost a second hash lookup per new
/// flow, about 30 ns at XDP.
#[inline(always)]
pub fn hand_over<A: Addr>(flow: &Flow<A>, svc: &ServiceValue) {
    let s = <[u32; 4] as Addr>::scratch();
    if s.is_null() {
        return;
    }
    // SAFETY: this CPU's slot; its frontend fields only.
    unsafe {
        (*s).svc = *svc;
        (*s).svc_for = [flow.dst.fold(), flow.src.fold(), found_for(flow)];
    }
}

/// The frontend handed over for this packet (same destination, source, port and protocol),
/// once: the slot is cleared as it is read. `None` sends the stage to `lookup`.
#[inline(always)]
pub fn taken_over<A: Addr>(flow: &Flow<A>) -> Option<ServiceValue> {
    let s = <[u32; 4] as Addr>::scratch();
    if s.is_null() {
        return None;
    }
    // SAFETY: as in `hand_over`.
    let (svc, [dst, src, tag]) = unsafe { ((*s).svc, (*s).svc_for) };
    // SAFETY: as above.
    unsafe { (*s).svc_for[2] = 0 };
    // The source too: the frontend found may depend on it (`from_cluster`).
    if dst != flow.dst.fold() || src != flow.src.fold() || tag != found_for(flow) {
        return None;
    }
    Some(svc)
}
