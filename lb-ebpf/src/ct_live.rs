//! Stamps of the IPv4 flows the assured table may hold, read by a SYN before `LB_CT4`.
//!
//! A new connection's SYN almost never has an entry in the assured table (only live flows are
//! there, and a SYN inside one is rare), but without this it pays for a lookup that misses:
//! with the table full, the kernel hash walks a bucket's chain through memory no cache holds,
//! and measured here that miss was 40% of a new flow's cost (about 300 ns of 700 at tc and at
//! XDP, the difference between lb and a program that skipped the lookup). So every forward
//! key written into `LB_CT4` stamps its slot of `LB_CT4_LIVE` (`ct_cache_slot`), and a
//! plain SYN whose slot is unstamped goes straight to the new-flow table. A stamp may stand
//! for several keys and outlive its flow (a stamped slot costs only the lookup it would have
//! cost anyway); an unstamped slot must never stand for a live flow, or a SYN inside it would
//! start a second one.
//!
//! Stamps are cleared by generations, since a slot's flows cannot be counted without atomic
//! read-modify-writes on every insert and removal too: each slot has a bit in each of two
//! generations, and a stamp sets the bit of the generation the epoch word's parity names
//! (`lb_common::ct_live_stamp`), with an atomic OR, so no stamp ever undoes another. A SYN reads
//! its slot's two bits, a stamp of either counting. The agent (`dataplane/live.rs`, one pass
//! at a time) clears the generation the next epoch names, then moves the epoch on, then
//! stamps every forward key a walk of the assured table finds. A flow in the table when the
//! epoch moved is found by the walk (the kernel's hash iteration misses only elements linked
//! in at the head of a bucket behind it: new ones, or ones rewritten, an update links a new
//! element; every datapath write into `LB_CT4` stamps its forward key after it, with the
//! epoch it reads after the write). So when a generation is cleared, every live flow holds a
//! stamp of the other: its walk's, or the datapath's since. A stamp that lands late (a CPU
//! stalled between reading the epoch and its OR) can only set a bit too many.
//!
//! A new map's bits are all set, so every slot counts until the agent's first pass, which
//! clears the other generation once its walk is stamped: at a first load the pass is made at
//! once; over a previous agent's pins, only after this agent's programs replaced the old ones
//! in every link (`Dataplane::finish_migrations`), since the old programs make flows assured
//! without stamping them here. What still does not stamp: `LB_CT4` entries written by
//! userspace (a migration's copy, tests) until the next pass, which every such writer makes;
//! and, should an interface's link fail to be taken over, flows the old programs there make
//! assured, until the collector's next pass (at most 30 s). A SYN inside such a flow is taken
//! for a new connection: it goes to the backend selection picks for its tuple (the flow's own,
//! unless the set changed), and its data packets still find the flow.
use lb_common::{ct_cache_slot, ct_live_bits, ct_live_present, ct_live_stamp, CtKey, CT_DIR_FORWARD};

use crate::addr::Addr;

/// Slots of `LB_CT4_LIVE`, written by the agent at load time (`CT_LIVE_SLOTS_PER_ENTRY` per
/// entry of `LB_CT4`).
#[no_mangle]
static CT_LIVE_SLOTS: u32 = lb_common::CONNTRACK_MAX_ENTRIES * lb_common::CT_LIVE_SLOTS_PER_ENTRY;

/// The element holding `k`'s slot and the shift of its bits there.
#[inline(always)]
fn slot<A: Addr>(k: &CtKey<A>) -> Option<(*mut u64, u32)> {
    let map = A::ct_live()?;
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let slots = unsafe { core::ptr::read_volatile(&CT_LIVE_SLOTS) };
    let i = ct_cache_slot(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, slots);
    let (word, shift) = ct_live_bits(i);
    Some((map.get_ptr_mut(word)?, shift))
}

/// Whether `k` (a forward key) may have an entry in the assured table. True for IPv6, which
/// has no stamps. One load: the epoch does not matter to a reader, a stamp of either
/// generation counts.
#[inline(always)]
pub fn maybe<A: Addr>(k: &CtKey<A>) -> bool {
    let Some((word, shift)) = slot(k) else { return true };
    // SAFETY: an array element, valid while the program runs; volatile, as the agent and
    // other CPUs write it.
    ct_live_present(unsafe { core::ptr::read_volatile(word) }, shift)
}

/// Stamps `k`, just written into the assured table, if it is a forward key.
#[inline(always)]
pub fn stamp<A: Addr>(k: &CtKey<A>) {
    if k.dir != CT_DIR_FORWARD {
        return;
    }
    let Some(map) = A::ct_live() else { return };
    let (Some((word, shift)), Some(epoch)) = (slot(k), map.get_ptr_mut(0)) else { return };
    // SAFETY: reading an array element, valid while the program runs.
    let bit = ct_live_stamp(shift, unsafe { core::ptr::read_volatile(epoch) });
    // The OR is atomic: the word holds 31 other slots, which other CPUs and the agent stamp
    // and clear at the same time, and a plain read-modify-write could undo a live flow's
    // stamp. BPF's atomic OR as inline asm: Rust's BPF target offers no read-modify-write
    // atomics (`ct_cache::claim` says the same of compare-and-exchange).
    // SAFETY: an aligned u64 of a map value, which the verifier accepts atomics on.
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) |= {bit}", p = in(reg) word, bit = in(reg) bit,
            options(nostack, preserves_flags));
    }
}
