//! Stage 2: is the destination a service frontend?
//!
//! First by exact address (ClusterIP, LoadBalancer ingress IP, external IP); then, only for
//! packets to one of the node's own addresses, as a node port. `LB_PORTS` lets the pipeline
//! skip both lookups for ports no frontend uses.
use lb_common::{
    NodeAddrKey, ServiceKey, ServiceValue, FAMILY_IPV4, SCOPE_EXACT, SCOPE_NODEPORT, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    maps::{SourceRangeKey, LB_NODE_ADDRS, LB_PORTS, LB_SERVICES, LB_SOURCE_RANGES},
    parse::Flow,
};

/// `LB_PORTS` flags of a port (network byte order, as in the packet).
#[inline(always)]
pub fn port_flags(port_be: u16) -> u8 {
    LB_PORTS.get(u16::from_be(port_be) as u32).copied().unwrap_or(0)
}

#[inline(always)]
fn get(addr: u32, flow: &Flow, scope: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: [addr, 0, 0, 0],
        port: flow.dport,
        proto: flow.proto,
        family: FAMILY_IPV4,
        scope,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once: the agent may replace the entry while we run,
    // and a copy keeps count and generation consistent with each other.
    unsafe { LB_SERVICES.get(&key).copied() }
}

/// Looks up the frontend a packet is addressed to. The flag is true for a node port: the
/// frontend address is then one of this node's own.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<(ServiceValue, bool)> {
    if let Some(svc) = get(flow.dst, flow, SCOPE_EXACT) {
        return Some((svc, false));
    }
    let node = NodeAddrKey { addr: [flow.dst, 0, 0, 0], family: FAMILY_IPV4, _pad: [0; 3] };
    LB_NODE_ADDRS.get_ptr(&node)?;
    Some((get(0, flow, SCOPE_NODEPORT)?, true))
}

/// `loadBalancerSourceRanges`: whether the client may use this frontend.
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, flow: &Flow) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let key = SourceRangeKey::new(
        64,
        lb_common::SourceRangeData { service_id_be: svc.id.to_be(), addr: [flow.src, 0, 0, 0] },
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}
