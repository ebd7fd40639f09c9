//! Stage 3: pick a backend for a new flow by hashing its 5-tuple over the live slot generation.
use lb_common::{flow_hash, select_slot, Backend, BackendSlotKey, ServiceValue};

use crate::{maps::LB_BACKEND_SLOTS, parse::Flow};

/// `svc.backend_count` must be non-zero. `None` means the slot the service points at is gone,
/// which only happens if the agent broke its own write ordering.
#[inline(always)]
pub fn select(svc: &ServiceValue, flow: &Flow) -> Option<Backend> {
    let hash = flow_hash(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    let key =
        BackendSlotKey { service_id: svc.id, generation: svc.generation, slot: select_slot(hash, svc.backend_count) };
    // SAFETY: the value is copied out at once.
    unsafe { LB_BACKEND_SLOTS.get(&key).copied() }
}
