//! A two-way cache of established IPv4 TCP flows in front of `LB_CT4`: a slot for every other
//! entry the assured table has room for, in pairs, each a copy of an entry under its key, read
//! by the established path before the assured table. A key may be in either slot of its pair
//! (`lb_common::ct_cache_pair`), one 128-byte block of two cache-line slots. A hit costs the
//! key's hash and one or two inlined array loads from that block, where the assured table's
//! lookup is a call into the kernel's hash map (hash, bucket walk, key compare): at XDP that
//! lookup was a third of an established packet's cost with one flow, and two to three times a
//! hit's with tens of thousands in turn. Exact-match caches in front of a flow table are how
//! Open vSwitch's datapath keeps its fast path cheap (its EMC).
//!
//! What a cached copy may stand for: an assured ESTABLISHED TCP entry, for a segment without
//! SYN, FIN or RST (nothing but a refresh happens to the entry then, `conntrack::advance`),
//! seen at most `CT_CACHE_FRESH` ago (the refresh interval, or the established lifetime if
//! shorter). A packet outside that window takes the assured table, which refreshes the entry
//! and the copy: the assured table stays the record (the agent's collection, listing,
//! restarts and migrations see only it), and an idle flow expires there as before.
//!
//! Coherence: whatever changes an assured entry's state or removes it, in the datapath,
//! forgets both of its flow's copies (`conntrack::advance`, `mirror_into`, `store_of`,
//! `forget_assured_of`, `forget`, `forget_finished`). The agent never needs to: it removes
//! only expired flows, which no copy can stand for (a copy is fresh, and the lifetime is at
//! least the window), and UDP flows, never cached. A copy written by one CPU just after
//! another forgot it (both directions of a flow on two CPUs at once, one of them a FIN or
//! RST) stands for the old state for at most the window: its direction's plain segments go
//! unseen by the state machine meanwhile, they are still forwarded to the same backend.
//!
//! Concurrency: a writer first claims the slot, swapping its key's last word (protocol,
//! direction, padding) for `BUSY` with an atomic compare-and-exchange (losing, it leaves the
//! slot alone: two writers interleaved could leave one flow's key on the other's value), then
//! writes the value, the key's first words, and its last word. A reader compares the key
//! (last word last), copies the value, and compares the key again, last word first, all
//! volatile: a writer that began after the first compare has changed the last word by the
//! second, and one that finished in between has changed the other words (unless it wrote the
//! same key again, whose translation is the same). Copies carry the state they were made
//! from, and only an assured ESTABLISHED one is taken: a copy made from an entry another CPU
//! was changing at that instant is refused. This relies on stores and loads each staying in
//! order, as on x86; elsewhere the window between them stays (as for `ct_table.rs`). A reader
//! stalled through two whole writes, the slot going to another key and back to its own,
//! takes a mix of both copies of its own flow for that one packet (same translation; only the
//! times could mix). One window stays everywhere: the assured table is preallocated, so an
//! entry removed and reused by another flow while a packet held it (between the packet's
//! lookup and its copy, tens of nanoseconds) is copied as this flow's, and stands for it for
//! the window above, where without the cache it would mislead that one packet.
use lb_common::{
    ct_cache_pair, CtKey, CtValue, CtWay, CT_ESTABLISHED, CT_FLAG_ASSURED, PROTO_TCP, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{addr::Addr, mem::compare_exchange64};

/// Slots of the cache, written by the agent at load time (half the assured table's room, an
/// even number: pairs).
#[no_mangle]
static CT_CACHE_SLOTS: u32 = lb_common::CONNTRACK_MAX_ENTRIES / 2;

/// How long a copy stands for its entry (jiffies): the refresh interval, or the established
/// lifetime if shorter; written by the agent at load time.
#[no_mangle]
static CT_CACHE_FRESH: u32 = 1000;

/// Words of a key: IPv4 only (`Addr::ct_cache` is `None` for IPv6).
const KEY_WORDS: usize = 4;
/// Words of a value.
const VALUE_WORDS: usize = core::mem::size_of::<CtValue<u32>>() / 4;
/// The value's word holding `state` and `flags` (bytes 12 and 13 of IPv4's).
const STATE_WORD: usize = 3;
/// The value's word holding `last_seen` (bytes 20 to 23 of IPv4's).
const SEEN_WORD: usize = 5;
/// A key's last word while a writer holds the slot: padding bits set, which no key has.
const BUSY: u32 = 0xffff_0000;

/// The first of the two slots `k` may be cached in (`lb_common::ct_cache_pair`).
#[inline(always)]
fn pair<A: Addr>(k: &CtKey<A>) -> u32 {
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let slots = unsafe { core::ptr::read_volatile(&CT_CACHE_SLOTS) };
    ct_cache_pair(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, slots)
}

/// Slot `i`, as the way at its start (`CtCacheSlot4`).
#[inline(always)]
fn slot<A: Addr>(i: u32) -> Option<*mut CtWay<A>> {
    A::ct_cache()?.get_ptr_mut(i).map(|p| p as *mut CtWay<A>)
}

/// Word `i` of slot `w`, volatile.
#[inline(always)]
fn word<A>(w: *const CtWay<A>, i: usize) -> u32 {
    // SAFETY: `w` is a slot, `KEY_WORDS + VALUE_WORDS` words of an IPv4 way, and callers stay
    // within them.
    unsafe { core::ptr::read_volatile((w as *const u32).add(i)) }
}

/// Whether the key in slot `w` is `k`, read a word at a time, volatile (so that the reads
/// stay in the order the module's note needs): the last word last, or with `last_first`
/// first.
#[inline(always)]
fn holds<A>(w: *const CtWay<A>, k: &CtKey<A>, last_first: bool) -> bool {
    let (a, b) = (w as *const u32, k as *const CtKey<A> as *const u32);
    // SAFETY: both point at a key of at least `KEY_WORDS` words (IPv4's, 16 bytes); the slot
    // is an array element, the key a stack value.
    let word = |i: usize| unsafe { core::ptr::read_volatile(a.add(i)) ^ *b.add(i) };
    let mut diff = if last_first { word(KEY_WORDS - 1) } else { 0 };
    let mut i = 0;
    while i < KEY_WORDS - 1 {
        diff |= word(i);
        i += 1;
    }
    if !last_first {
        diff |= word(KEY_WORDS - 1);
    }
    diff == 0
}

/// The cached entry of `k`, if it may stand for the assured table's for a segment with these
/// flags at `now`.
#[inline(always)]
pub fn hit<A: Addr>(k: &CtKey<A>, tcp_flags: u8, now: u32) -> Option<CtValue<A>> {
    if k.proto != PROTO_TCP || tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    let first = pair(k);
    // One slot chosen, then one copy: the two slots are the same kind of pointer (offset 0
    // into an element), so the verifier goes on along one path.
    let w0 = slot::<A>(first)?;
    let w = if holds(w0, k, false) {
        w0
    } else {
        let w1 = slot::<A>(first + 1)?;
        if !holds(w1, k, false) {
            return None;
        }
        w1
    };
    let mut words = [0u32; VALUE_WORDS];
    let mut i = 0;
    while i < VALUE_WORDS {
        words[i] = word(w, KEY_WORDS + i);
        i += 1;
    }
    if !holds(w, k, true) {
        return None;
    }
    // The state and flags, one word with the tag after them (offsets asserted in
    // lb-common): ESTABLISHED and assured in one compare. Field by field, from the value
    // built below, the check measured about 9 ns at XDP (the copy spilled to the stack and
    // read back a byte at a time).
    let mask = 0xff | (CT_FLAG_ASSURED as u32) << 8;
    if words[STATE_WORD] & mask != CT_ESTABLISHED as u32 | (CT_FLAG_ASSURED as u32) << 8 {
        return None;
    }
    // SAFETY: IPv4's value is `VALUE_WORDS` words of plain integers (asserted in lb-common).
    let v: CtValue<A> = unsafe { core::ptr::read_unaligned(words.as_ptr() as *const CtValue<A>) };
    // SAFETY: as above.
    let fresh = unsafe { core::ptr::read_volatile(&CT_CACHE_FRESH) };
    // Seen at most `fresh` before the clock read, or just after it (another CPU refreshed the
    // entry meanwhile). Unsigned both ways: a copy left alone for 2^31 jiffies (25 days at
    // HZ=1000) must not pass for one made just after the clock read.
    (now.wrapping_sub(v.last_seen) <= fresh || v.last_seen.wrapping_sub(now) <= fresh).then_some(v)
}

/// Caches `e`, the assured ESTABLISHED entry of `k` that a plain segment just found: in the
/// pair's slot that holds `k` already, else an empty one, else over the copy seen longer ago
/// (an idle flow's, rather than a busy one's).
#[inline(always)]
pub fn fill<A: Addr>(k: &CtKey<A>, e: &CtValue<A>) {
    let first = pair(k);
    let (Some(w0), Some(w1)) = (slot::<A>(first), slot::<A>(first + 1)) else { return };
    let w = if holds(w0, k, false) {
        w0
    } else if holds(w1, k, false) {
        w1
    } else if word(w0, KEY_WORDS - 1) == 0 {
        w0
    } else if word(w1, KEY_WORDS - 1) == 0 {
        w1
    } else if word(w1, KEY_WORDS + SEEN_WORD).wrapping_sub(word(w0, KEY_WORDS + SEEN_WORD)) as i32 >= 0 {
        w0
    } else {
        w1
    };
    let (dst, key, value) = (w as *mut u32, k as *const CtKey<A> as *const u32, e as *const CtValue<A> as *const u32);
    // SAFETY: the slot is an IPv4 way, `KEY_WORDS + VALUE_WORDS` words, 4-byte aligned; `k`
    // and `e` are IPv4's.
    unsafe {
        // The key's last two words as one, 8-byte aligned (slots start 64-aligned, and these
        // are bytes 8..16 of one).
        let tail = dst.add(KEY_WORDS - 2) as *mut u64;
        let seen = core::ptr::read_volatile(tail);
        if (seen >> 32) as u32 & BUSY != 0
            || !compare_exchange64(tail, seen, (seen & 0xffff_ffff) | (BUSY as u64) << 32)
        {
            // Another CPU is writing the slot.
            return;
        }
        let mut i = 0;
        while i < VALUE_WORDS {
            core::ptr::write_volatile(dst.add(KEY_WORDS + i), *value.add(i));
            i += 1;
        }
        let mut i = 0;
        while i < KEY_WORDS {
            core::ptr::write_volatile(dst.add(i), *key.add(i));
            i += 1;
        }
    }
}

/// Drops the cached copies of `k`, wherever in its pair they are (a key is written into one
/// slot, but two CPUs filling it at once may each take one). With a compare-and-exchange too:
/// a plain store of 0 landing just after a writer's claim would clear its `BUSY` and let a
/// second writer in. A writer that claimed the slot first wins; its copy is the stale one the
/// module's note bounds.
#[inline(always)]
pub fn forget<A: Addr>(k: &CtKey<A>) {
    let first = pair(k);
    let mut i = 0;
    while i < 2 {
        if let Some(w) = slot::<A>(first + i) {
            forget_in(w, k);
        }
        i += 1;
    }
}

#[inline(always)]
fn forget_in<A>(w: *mut CtWay<A>, k: &CtKey<A>) {
    let tail = (w as *mut u32).wrapping_add(KEY_WORDS - 2) as *mut u64;
    // SAFETY: bytes 8..16 of the slot, 8-byte aligned (see `fill`); `k` is IPv4's 16 bytes.
    let (seen, mine) = unsafe {
        (core::ptr::read_volatile(tail), core::ptr::read_unaligned((k as *const CtKey<A> as *const u64).add(1)))
    };
    if seen == mine && holds(w, k, false) {
        // SAFETY: as above. The key's last word becomes 0, which is no key.
        unsafe { compare_exchange64(tail, seen, seen & 0xffff_ffff) };
    }
}
