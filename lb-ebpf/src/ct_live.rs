//! Stamps of the flows the assured tables may hold, read by a SYN before `LB_CT4` or `LB_CT6`.
//! One map (`LB_CT4_LIVE`) for both families: a dual-stack node's flows of both share its
//! words, which only makes a stamp stand for more keys (a lookup more for some SYNs).
//!
//! A new connection's SYN almost never has an entry in the assured table (only live flows are
//! there, and a SYN inside one is rare), but without this it pays for a lookup that misses:
//! with the table full, the kernel hash walks a bucket's chain through memory no cache holds,
//! and measured here that miss was 40% of a new flow's cost (about 300 ns of 700 at tc and at
//! XDP, the difference between lb and a program that skipped the lookup). So every forward
//! key written into an assured table stamps two bits in each of two words of `LB_CT4_LIVE`
//! (`lb_common::ct_live_place`), and a plain SYN that finds either word without its bits goes
//! straight to the new-flow table (it reads the second word only when the first has them). A
//! stamp may stand for other keys too and outlive its flow (it then costs only the lookup the
//! SYN would have made anyway); a live flow must never be without its stamp, or a SYN inside
//! it would start a second one.
//!
//! Stamps are cleared by generations, since a word's flows cannot be counted without atomic
//! read-modify-writes on every insert and removal too: a key has its bits in each of three
//! generations (interleaved, three bits per position), and a stamp sets those of the generation
//! the map's first word names (`lb_common::ct_live_stamp`), with an atomic OR, so no stamp ever
//! undoes another. A SYN reads its words, a stamp of any generation counting in each (not
//! necessarily the same in both, `lb_common::ct_live_counts` says why). The agent
//! (`dataplane/live.rs`, one pass at a time) clears the next generation, then turns the word to
//! it, then stamps every forward key a walk of both assured tables finds. A flow in the table
//! when the word turned is found by the walk (the kernel's hash iteration misses elements
//! linked in at the head of a bucket behind it: new ones, or ones rewritten, an update links a
//! new element; every datapath write into an assured table stamps its forward key after it,
//! with the generation it reads after the write), or, rarely, skipped (an element deleted and reused
//! while the walk stands on it sends the walk into another bucket). So when a generation is
//! cleared, every live flow holds a stamp of one of the two others: the last two walks', or the
//! datapath's since; a flow one walk skipped keeps the one before. A stamp that lands late (a
//! CPU stalled between reading the generation word and its ORs) only sets bits too many for
//! other keys; its own flow is without a stamp from its write into its table until both ORs
//! land, as it would be with any stamp written after the entry. The datapath's read of the word
//! follows the write with no fence, so a CPU may read the generation before a turn while the
//! walk after the turn does not yet see the entry: that is one more way for a walk to skip a
//! flow, which the third generation covers as it covers the others, once. A walk that fails
//! part way sets every bit of its generation.
//!
//! A new map's bits are all set, so every key counts until the agent's first two passes: each
//! clears a generation as it begins, and the second clears the third as it ends, so a flow
//! that one of their walks skipped keeps the other's stamp. At a first load they are made at
//! once, back to back; over a previous agent's pins, only after this agent's programs replaced
//! the old ones in every link (`Dataplane::finish_migrations`), since the old programs make
//! flows assured without stamping them here (one still running its last packet at the swap is
//! covered by the second walk). What still does not stamp: assured entries written by
//! userspace (a migration's copy, tests) until the next pass, which every such writer makes;
//! and, should an interface's link fail to be taken over, flows the old programs there make
//! assured, until the collector's next pass (at most 30 s). A SYN inside such a flow is taken
//! for a new connection: it goes to the backend selection picks for its tuple (the flow's own,
//! unless the set changed), and its data packets still find the flow.
use lb_common::{
    ct_forward_key, ct_live_counts, ct_live_place, ct_live_stamp, CtKey, CtKey6, CtValue, CtValue6, CT_DIR_FORWARD,
};

use crate::{addr::Addr, maps::LB_CT4_LIVE};

/// Words of stamps in `LB_CT4_LIVE`, written by the agent at load time (`ct_live_words` of
/// `LB_CT4`'s capacity).
#[no_mangle]
static CT_LIVE_WORDS: u32 = lb_common::ct_live_words(lb_common::CONNTRACK_MAX_ENTRIES);

/// The two words holding `k`'s stamp (`lb_common::ct_live_place`) and its bits of
/// generation 0 in each.
#[inline(always)]
fn places<A: Addr>(k: &CtKey<A>) -> [(u32, u64); 2] {
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let words = unsafe { core::ptr::read_volatile(&CT_LIVE_WORDS) };
    ct_live_place(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, words)
}

/// Whether `k` (a forward key) may have an entry in the assured table. One load, two when
/// the first word holds the key's stamp (about one SYN in 9 with one assured table full, one
/// in 3 with both): the generation word does not matter to a reader, a stamp of any
/// generation counts, in each word.
#[inline(always)]
pub fn maybe<A: Addr>(k: &CtKey<A>) -> bool {
    // SAFETY: an array element, valid while the program runs; volatile, as the agent and
    // other CPUs write it.
    ct_live_counts(places(k), |i| LB_CT4_LIVE.get_ptr_mut(i).map(|w| unsafe { core::ptr::read_volatile(w) }))
}

/// Stamps `k`, just written into the assured table, if it is a forward key: both its words.
/// IPv6's through `lb_ct6_stamp`.
#[inline(always)]
pub fn stamp<A: Addr>(k: &CtKey<A>) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        stamp_of(k);
    } else {
        lb_ct6_stamp(k as *const CtKey<A> as *const CtKey6);
    }
}

/// IPv6's stamp, a global function (which must return a number: 0), verified once on its own.
/// Called from stages and from `conntrack::lb_ct6_mirror` and `lb_ct6_refresh_peer`
/// (`insert_either`), whose frames leave room for this one's (16 bytes: the array indexes the
/// lookups take by pointer), but not from `lb_ct6_store`, whose frame under a stage's does
/// not: its stage stamps around it instead (`conntrack::store`).
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_stamp(k: *const CtKey6) -> u32 {
    if !k.is_null() {
        // SAFETY: checked for null; the verifier checks the caller passes a whole key.
        stamp_of(unsafe { &*k });
    }
    0
}

/// Stamps the forward key of the flow whose entry `k`, `e` is, whichever direction `k` is:
/// for IPv6's move into the assured table, stamped by its stage before the move
/// (`conntrack::store`).
#[inline(always)]
pub fn stamp_flow<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        stamp_flow_of(k, e);
    } else {
        lb_ct6_stamp_flow(k as *const CtKey<A> as *const CtKey6, e as *const CtValue<A> as *const CtValue6);
    }
}

/// `stamp_flow` as a global function, the forward key built on its own frame.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_stamp_flow(k: *const CtKey6, e: *const CtValue6) -> u32 {
    if k.is_null() || e.is_null() {
        return 0;
    }
    // SAFETY: checked for null; the verifier checks the caller passes a whole key and value.
    stamp_flow_of(unsafe { &*k }, unsafe { &*e });
    0
}

#[inline(always)]
fn stamp_flow_of<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    if k.dir == CT_DIR_FORWARD {
        stamp_of(k);
    } else {
        stamp_of(&ct_forward_key(k, e));
    }
}

#[inline(always)]
fn stamp_of<A: Addr>(k: &CtKey<A>) {
    if k.dir != CT_DIR_FORWARD {
        return;
    }
    let map = &LB_CT4_LIVE;
    let Some(generation) = map.get_ptr_mut(0) else { return };
    // SAFETY: reading an array element, valid while the program runs.
    let g = unsafe { core::ptr::read_volatile(generation) };
    for (i, mask) in places(k) {
        let Some(word) = map.get_ptr_mut(i) else { continue };
        let bits = ct_live_stamp(mask, g);
        // The OR is atomic: the word holds other keys' stamps, which other CPUs and the agent
        // stamp and clear at the same time, and a plain read-modify-write could undo a live
        // flow's stamp. BPF's atomic OR as inline asm: Rust's BPF target offers no
        // read-modify-write atomics (`mem::compare_exchange64` says the same of compare-and-exchange).
        // SAFETY: an aligned u64 of a map value, which the verifier accepts atomics on.
        unsafe {
            core::arch::asm!("lock *(u64 *)({p} + 0) |= {bits}", p = in(reg) word, bits = in(reg) bits,
                options(nostack, preserves_flags));
        }
    }
}
