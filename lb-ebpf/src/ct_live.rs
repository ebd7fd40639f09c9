//! Stamps of the IPv4 flows the assured table may hold, read by a SYN before `LB_CT4`.
//!
//! A new connection's SYN almost never has an entry in the assured table (only live flows are
//! there, and a SYN inside one is rare), but without this it pays for a lookup that misses:
//! with the table full, the kernel hash walks a bucket's chain through memory no cache holds,
//! and measured here that miss was 40% of a new flow's cost (about 300 ns of 700 at tc and at
//! XDP, the difference between lb and a program that skipped the lookup). So every forward
//! key written into `LB_CT4` stamps a byte of `LB_CT4_LIVE` (its slot, `ct_cache_slot`), and
//! a plain SYN whose slot is unstamped goes straight to the new-flow table. A stamp may stand
//! for several keys and outlive its flow (a stamped slot costs only the lookup it would have
//! cost anyway); an unstamped slot must never stand for a live flow, or a SYN inside it would
//! start a second one.
//!
//! Stamps are cleared by epochs, since a slot's flows cannot be counted without atomic
//! read-modify-writes on every insert and removal: stamps carry the current epoch (the map's
//! first word), and count in their epoch and the next two (`lb_common::ct_live_present`). The
//! agent moves the epoch on before each walk of the assured table (`dataplane/live.rs`, one
//! pass at a time), then stamps every forward key the walk finds; a flow written into the
//! table after the move is stamped by the datapath with the new epoch, after its insert, and
//! one written before it is still in the table when the walk reads it (the kernel's hash
//! iteration misses only elements linked in at the head of a bucket behind it: new ones, or
//! ones rewritten, an update links a new element; every datapath write into `LB_CT4` stamps
//! its forward key after it). So a live flow's slot always holds a stamp that counts, with an
//! epoch to spare for a datapath store that lands after the walk's (a CPU stalled between
//! reading the epoch and storing it).
//!
//! Until the agent's first pass, the epoch word makes every slot count (a new map's word is 0,
//! and the first pass sets `CT_LIVE_ALL` until its walk is stamped): at a first load the pass
//! is made at once; over a previous agent's pins, only after this agent's programs replaced
//! the old ones in every link (`Dataplane::finish_migrations`), since the old programs make
//! flows assured without stamping them. What still does not stamp: `LB_CT4` entries written by
//! userspace (a migration's copy, tests) until the next pass, which every such writer makes;
//! and, should an interface's link fail to be taken over, flows the old programs there make
//! assured, until the collector's next pass (at most 30 s). A SYN inside such a flow is taken
//! for a new connection: it goes to the backend selection picks for its tuple (the flow's own,
//! unless the set changed), and its data packets still find the flow.
use lb_common::{ct_cache_slot, ct_live_present, CtKey, CT_DIR_FORWARD};

use crate::addr::Addr;

/// Slots of `LB_CT4_LIVE`, written by the agent at load time (`CT_LIVE_SLOTS_PER_ENTRY` per
/// entry of `LB_CT4`).
#[no_mangle]
static CT_LIVE_SLOTS: u32 = lb_common::CONNTRACK_MAX_ENTRIES * lb_common::CT_LIVE_SLOTS_PER_ENTRY;

/// The map's epoch word and the byte of `k`'s slot.
#[inline(always)]
fn slot<A: Addr>(k: &CtKey<A>) -> Option<(*const u32, *mut u8)> {
    let map = A::ct_live()?;
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let slots = unsafe { core::ptr::read_volatile(&CT_LIVE_SLOTS) };
    let i = ct_cache_slot(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, slots);
    let epochs = map.get_ptr_mut(0)?;
    let word = map.get_ptr_mut(1 + (i >> 3))?;
    // SAFETY: byte `i % 8` of an 8-byte element.
    Some((epochs as *const u32, unsafe { (word as *mut u8).add((i & 7) as usize) }))
}

/// Whether `k` (a forward key) may have an entry in the assured table. True for IPv6, which
/// has no stamps.
#[inline(always)]
pub fn maybe<A: Addr>(k: &CtKey<A>) -> bool {
    let Some((epochs, stamp)) = slot(k) else { return true };
    // SAFETY: reads of array elements, valid while the program runs; volatile, as the agent
    // writes them through its mapping.
    unsafe { ct_live_present(core::ptr::read_volatile(stamp), core::ptr::read_volatile(epochs)) }
}

/// Stamps `k`, just written into the assured table, if it is a forward key.
#[inline(always)]
pub fn stamp<A: Addr>(k: &CtKey<A>) {
    if k.dir != CT_DIR_FORWARD {
        return;
    }
    if let Some((epochs, stamp)) = slot(k) {
        // SAFETY: as in `maybe`; one byte store, which no other slot's stamp can undo.
        unsafe { core::ptr::write_volatile(stamp, core::ptr::read_volatile(epochs) as u8) };
    }
}
