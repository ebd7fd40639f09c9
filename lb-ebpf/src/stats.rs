//! Per-CPU verdict counters, per hook: no atomics and no shared cache lines on the fast path.
use lb_common::{Counter, COUNTER_MAX};

use crate::maps::LB_STATS;

#[inline(always)]
pub fn count(hook: u32, counter: Counter) {
    if let Some(slot) = LB_STATS.get_ptr_mut(hook * COUNTER_MAX + counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}
