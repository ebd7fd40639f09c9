//! Stage 2: is the destination a service frontend?
use lb_common::{ServiceKey, ServiceValue, FAMILY_IPV4, SCOPE_CLUSTER_IP};

use crate::{maps::LB_SERVICES, parse::Flow};

/// Looks up the frontend a packet is addressed to. Returns a copy: the agent may replace the
/// entry while we run, and a copy keeps count and generation consistent with each other.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: [flow.dst, 0, 0, 0],
        port: flow.dport,
        proto: flow.proto,
        family: FAMILY_IPV4,
        scope: SCOPE_CLUSTER_IP,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    unsafe { LB_SERVICES.get(&key).copied() }
}
