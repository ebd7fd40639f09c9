//! Stage 3: pick a backend for a new flow.
//!
//! Without affinity: the slot of the frontend's Maglev table the 5-tuple hashes to (two array
//! loads). With
//! `sessionAffinity: ClientIP`: reuse the backend pinned to (client address, service) while the
//! pin is fresher than the service's timeout and the backend still belongs to the service;
//! otherwise choose by hash and pin the choice. As in kube-proxy (`-m recent --rcheck
//! --seconds T` then `--set`), only new connections read and refresh the pin.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    select_hash, select_slot, AffinityKey, AffinityValue, Backend, BackendMemberKey, Counter, ServiceValue,
    SVC_FLAG_AFFINITY,
};

use crate::{
    addr::Addr,
    maps::{LB_AFFINITY, LB_BACKENDS, LB_BACKEND_MEMBERS, LB_MAGLEV},
    parse::Flow,
    stats::count,
};

/// `svc.backend_count` must be non-zero. `None` means the slot the service points at is gone,
/// which only happens if the agent broke its own write ordering.
#[inline(always)]
pub fn select<A: Addr>(hook: u32, svc: &ServiceValue, flow: &Flow<A>) -> Option<Backend> {
    if svc.flags & SVC_FLAG_AFFINITY == 0 {
        return by_hash(svc, flow);
    }
    // Only affinity reads the fine clock: its timeouts are in seconds, set by users.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let c = flow.src.words();
    // SAFETY: `AffinityKey` is `repr(C)`, six words: the client, the service id, then `family`
    // and its padding (asserted in lb-common). Words, as the service keys are
    // (`service::get`); field by field the padding took a call to `memset`.
    let key: AffinityKey = unsafe { core::mem::transmute([c[0], c[1], c[2], c[3], svc.id, A::FAMILY as u32]) };
    if let Some(pin) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: LRU values stay valid while the program runs; a concurrent update from
        // another CPU can only make us use a pin a few nanoseconds old.
        let pin = unsafe { &mut *pin };
        let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
        if now.saturating_sub(pin.last_used_ns) <= timeout_ns && still_member(svc, pin) {
            pin.last_used_ns = now;
            count(hook, Counter::AffinityHit);
            return Some(pin.backend);
        }
    }
    let backend = by_hash(svc, flow)?;
    let pin = AffinityValue { backend, generation: svc.generation, _pad: [0; 6], last_used_ns: now };
    // A failed insert only loses the pin: the connection itself still has its backend.
    let _ = LB_AFFINITY.insert(&key, &pin, 0);
    Some(backend)
}

/// The slot of the frontend's Maglev table the flow hashes to: a flow whose conntrack entry
/// was lost comes back to the same backend while that backend stays.
#[inline(always)]
fn by_hash<A: Addr>(svc: &ServiceValue, flow: &Flow<A>) -> Option<Backend> {
    let hash = select_hash(flow.src.fold(), flow.dst.fold(), flow.sport, flow.dport, flow.proto);
    let slot = svc.table_off.wrapping_add(select_slot(hash, svc.table_size));
    let pair = *LB_MAGLEV.get(slot >> 1)?;
    LB_BACKENDS.get((pair >> ((slot & 1) * 32)) as u32).copied()
}

/// Whether the pinned backend is still one of the service's ready backends. Free while the
/// service's backend set is unchanged; one lookup after it changed, then free again.
#[inline(always)]
fn still_member(svc: &ServiceValue, pin: &mut AffinityValue) -> bool {
    if pin.generation == svc.generation {
        return true;
    }
    let key = BackendMemberKey {
        service_id: svc.id,
        port: pin.backend.port,
        family: pin.backend.family,
        _pad: 0,
        addr: pin.backend.addr,
    };
    if LB_BACKEND_MEMBERS.get_ptr(&key).is_none() {
        return false;
    }
    pin.generation = svc.generation;
    true
}
