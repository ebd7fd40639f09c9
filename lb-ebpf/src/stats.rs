//! Per-CPU verdict counters, per hook: no atomics and no shared cache lines on the fast path.
use lb_common::{Counter, COUNTER_MAX};

use crate::maps::{LB_SERVICE_STATS, LB_STATS};

#[inline(always)]
pub fn count(hook: u32, counter: Counter) {
    add(hook, counter, 1);
}

/// Adds `n` to a counter (nothing for 0: no lookup).
#[inline(always)]
pub fn add(hook: u32, counter: Counter, n: u32) {
    if n == 0 {
        return;
    }
    if let Some(slot) = LB_STATS.get_ptr_mut(hook * COUNTER_MAX + counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += n as u64 };
    }
}

/// Whether traffic is counted per service frontend (`lb run --metrics-per-frontend`). Set at
/// load time: the verifier knows it, so with it off the count below costs nothing.
#[no_mangle]
static COUNT_SERVICES: u32 = 1;

/// Traffic per service frontend: one per-CPU array slot, indexed by the id the service lookup
/// already returned, so no hashing.
#[inline(always)]
pub fn count_service(service_id: u32, bytes: u32) {
    // SAFETY: reading a static the loader patches.
    if unsafe { core::ptr::read_volatile(&COUNT_SERVICES) } == 0 {
        return;
    }
    if let Some(slot) = LB_SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes as u64;
        }
    }
}
