//! The new-flow tables as conntrack uses them: lookup, insert and remove of an entry, and the
//! insert of a flow's two. Each family's (`LB_CT4_NEW`, `LB_CT6_NEW`) is a set-associative
//! array of `CtWay`s (`lb_common::ct_set_hash`, `ct_set_victim`, `ct_set_pair`).
//!
//! A key's set is chosen by its flow's client side (`lb_common::ct_set_hash`), so the two
//! entries of a flow that is not SNATed (nor from a client port in the SNAT range) share one
//! set: a new flow reads and writes one set, where a set per key cost a second miss in a table
//! no cache holds, and places both entries with one pass over it.
//!
//! Why an array: a flood of new flows inserts into a full table on every packet, and the
//! kernel LRU's eviction (`bpf_lru_pop_free`, which shrinks lists and deletes the victim under
//! its bucket lock) was about half of a new flow's cost. Here an insert is plain stores into
//! one array element, and the verifier inlines the element lookups: no helper call, lock or
//! list.
//!
//! IPv6: its conntrack moves run out of line (`addr::OUTLINE_V6_CT`), and its lookup, insert
//! and remove are global functions (`lb_ct6_find`, `lb_ct6_insert`, `lb_ct6_remove`), which
//! the verifier checks once each, on their own: inlined into the moves, which it walks again
//! at every call with the caller's state, the IPv6 stages came near its 1,000,000
//! instructions. A way's 40-byte key is compared in assembly (`key_eq`). Where a frame
//! leaves no room for one more call below it (`conntrack::store_of`, the new-flow stage's
//! `create_outlined`), the insert is inlined instead (`insert_inline`).
//!
//! Concurrency: ways are written without a lock. Two CPUs inserting into one set at the same
//! instant may pick the same free way, and one of the two flows goes untracked until its next
//! packet (which tracks it again, to the same Maglev backend); a packet reading an entry that
//! another CPU replaces at that instant may see a mix of both. The kernel LRU has the same
//! window: it reuses an evicted element at once, without waiting for readers that still hold
//! it (`htab_lru_map_delete_node`, `prealloc_lru_pop`). Assured flows live in `LB_CT4`, a hash
//! map that never evicts, though an element deleted there (a flow finished or collected) is
//! reused at once as well. A state change written through an entry reused meanwhile is
//! refused unless the entry carries its key's tag (`conntrack::swap_state`): a flow's state
//! and flags do not land in another flow's entry, unless that flow's key has the same tag (one
//! in 32,768) or its entry none (written by userspace). A whole entry written again into the
//! way that holds its key (`write`, below) is not guarded.
use lb_common::{
    ct_forward_key, ct_forward_key_into, ct_key_eq, ct_set_hash, ct_set_pair_by, ct_set_victim_by, select_slot, CtKey,
    CtKey6, CtValue, CtValue6, CtWay, CT_DIR_REPLY, CT_FLAG_SNAT, CT_WAYS,
};

use crate::{addr::Addr, conntrack::expired, mem::diff32};

/// Whether way key `w` is `k` (`ct_key_eq`). IPv6's compares in assembly (`mem::diff32`):
/// LLVM made of `ct_key_eq`'s fold a compare and a branch per word, with all twenty words
/// loaded first and spilled, and it kept `k`'s words in registers across a set's way lookups
/// (calls, which clobber r1-r5), spilling those too: past the 512 bytes an IPv6 stage shares
/// with its subprograms. This way a way costs one branch and `k` one pointer.
#[inline(always)]
fn key_eq<A: Addr>(w: &CtKey<A>, k: &CtKey<A>) -> bool {
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        return ct_key_eq(w, k);
    }
    let (pw, pk) = (w as *const CtKey<A> as usize, k as *const CtKey<A> as usize);
    let words = core::mem::size_of::<CtKey<A>>() / 4;
    let mut diff = 0;
    macro_rules! word {
        ($($i:literal)*) => {$(
            if words > $i {
                // SAFETY: word `$i` of both keys, in bounds (`words`) and 4-aligned.
                diff = unsafe { diff32::<{ $i * 4 }>(pw, pk, diff) };
            }
        )*};
    }
    word!(0 1 2 3 4 5 6 7 8 9);
    diff == 0
}

/// Sets in each family's new-flow table (the agent sizes both alike), written by the agent at
/// load time (the maps' capacity over `CT_WAYS`).
#[no_mangle]
static CT_NEW_SETS: u32 = lb_common::CONNTRACK_NEW_MAX_ENTRIES / CT_WAYS as u32;

/// The index of the first way of `k`'s set, and `k`'s `ct_set_hash`.
#[inline(always)]
fn set_of<A: Addr>(k: &CtKey<A>) -> (u32, u32) {
    // SAFETY: reading a static the loader patches; volatile so the load stays.
    let sets = unsafe { core::ptr::read_volatile(&CT_NEW_SETS) };
    let hash = ct_set_hash(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, k.dir);
    (select_slot(hash, sets) * CT_WAYS as u32, hash)
}

/// Way `i` of the array. Each way is an element of its own, so a hit in any way is the same
/// kind of pointer (offset 0 into an element): the verifier follows one path after a lookup,
/// not one per way.
#[inline(always)]
fn way<A: Addr>(i: u32) -> Option<&'static mut CtWay<A>> {
    // SAFETY: an array element, valid while the program runs.
    A::ct_ways()?.get_ptr_mut(i).map(|p| unsafe { &mut *p })
}

/// The entry of `k`, in place.
#[inline(always)]
pub fn get<A: Addr>(k: &CtKey<A>) -> Option<*mut CtValue<A>> {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        let i = lb_ct6_find(k as *const CtKey<A> as *const CtKey6);
        return way::<A>(i).map(|w| &mut w.value as *mut CtValue<A>);
    }
    let (first, _) = set_of(k);
    let mut i = 0;
    while i < CT_WAYS as u32 {
        let w = way::<A>(first + i)?;
        if key_eq(&w.key, k) {
            return Some(&mut w.value as *mut CtValue<A>);
        }
        i += 1;
    }
    None
}

/// IPv6: the index in the array of the way holding `k`, or `u32::MAX`. A global function,
/// which the verifier checks once on its own (a static subprogram is walked again at every
/// call, with the caller's state), and one that returns a number, looked up again by the
/// caller: one path after it, where an inlined search of four ways hands the caller four.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_find(k: *const CtKey6) -> u32 {
    if k.is_null() {
        return u32::MAX;
    }
    // SAFETY: checked for null; the verifier checks the caller passes a whole key.
    let k = unsafe { &*k };
    let (first, _) = set_of(k);
    let mut i = 0;
    while i < CT_WAYS as u32 {
        let Some(w) = way::<[u32; 4]>(first + i) else { return u32::MAX };
        if key_eq(&w.key, k) {
            return first + i;
        }
        i += 1;
    }
    u32::MAX
}

/// Writes `k`'s entry: over its old one, into a free or expired way, or over the less
/// recently seen of two entries of the set (`ct_set_victim`); true in that last case, a live
/// flow lost its entry (the caller counts it, `Counter::CtNewEvicted`). `v.last_seen` is taken
/// for now.
#[inline(always)]
pub fn insert<A: Addr>(k: &CtKey<A>, v: &CtValue<A>) -> bool {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        return lb_ct6_insert(k as *const CtKey<A> as *const CtKey6, v as *const CtValue<A> as *const CtValue6) != 0;
    }
    insert_of(k, v)
}

/// IPv6's insert as a global function: the verifier checks it once, on its own, where a
/// static subprogram is walked again at every call with the caller's state.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_insert(k: *const CtKey6, v: *const CtValue6) -> u32 {
    if k.is_null() || v.is_null() {
        return 0;
    }
    // SAFETY: checked for null; the verifier checks the caller passes a whole key and value.
    unsafe { insert_of::<[u32; 4]>(&*k, &*v) as u32 }
}

/// `insert`, inlined for IPv6 too (for a function whose frame, below a stage's, leaves no
/// room for `lb_ct6_insert`'s), and never over way `avoid` of the array (`u32::MAX`: none;
/// `ct_set_victim_by`): the way a flow's other entry was just written to, which this one
/// must not push out. The way written (`u32::MAX` if none), and whether a live entry of
/// another key was pushed out.
#[inline(always)]
pub fn insert_inline<A: Addr>(k: &CtKey<A>, v: &CtValue<A>, avoid: u32) -> (u32, bool) {
    insert_avoiding(k, v, avoid)
}

#[inline(always)]
fn insert_of<A: Addr>(k: &CtKey<A>, v: &CtValue<A>) -> bool {
    insert_avoiding(k, v, u32::MAX).1
}

#[inline(always)]
fn insert_avoiding<A: Addr>(k: &CtKey<A>, v: &CtValue<A>, avoid: u32) -> (u32, bool) {
    let (first, hash) = set_of(k);
    let now = v.last_seen;
    // Within the set; a way of another set comes out at `CT_WAYS` or past it, which avoids
    // none.
    let avoid = avoid.wrapping_sub(first) as usize;
    let Some((i, evicted)) =
        ct_set_victim_by(|i| way::<A>(first + i as u32).map(|w| &*w), k, hash, now, |e| expired(e, now), key_eq, avoid)
    else {
        return (u32::MAX, false);
    };
    (first + i as u32, write(first + i as u32, evicted, k, v))
}

/// Writes a flow's two entries (`k` its forward key, `pk` its reply key); how many live flows
/// lost an entry to them, as `insert` says. Entries that share a set are placed with one pass
/// over it (`ct_set_pair`), never one over the other; others (a SNATed flow's, mostly) one at
/// a time. The verifier walks the
/// choice once for every mix of own, free and live ways it can tell apart (it knows each index
/// on each path): the new-flow stages walk about 580,000 instructions where they walked
/// 150,000, which is why only they use it (a stage of their own, under the 1,000,000 limit).
#[inline(always)]
pub fn insert_pair<A: Addr>(k: &CtKey<A>, v: &CtValue<A>, pk: &CtKey<A>, pv: &CtValue<A>) -> u32 {
    let (first, hash) = set_of(k);
    // By set, not by hash: two keys of other hashes may still fall in one set (a SNATed
    // flow's, in a small table), where the second insert alone could push out the first.
    if set_of(pk).0 != first {
        // Inlined for IPv6 too (`insert_inline`): IPv6's new-flow stage calls this from
        // `conntrack::create_outlined`, whose frame leaves no room for `lb_ct6_insert`'s.
        return insert_of(k, v) as u32 + insert_of(pk, pv) as u32;
    }
    let now = v.last_seen;
    let Some([(i, evicted), (j, peer_evicted)]) =
        ct_set_pair_by(|i| way::<A>(first + i as u32).map(|w| &*w), k, pk, hash, now, |e| expired(e, now), key_eq)
    else {
        return 0;
    };
    write(first + i as u32, evicted, k, v) as u32 + write(first + j as u32, peer_evicted, pk, pv) as u32
}

/// Writes `k`'s entry into way `i` (of the array), chosen for it by `ct_set_victim` or
/// `ct_set_pair` (`evicted`: the way held a live entry then); whether a live entry of another
/// key is pushed out now.
#[inline(always)]
fn write<A: Addr>(i: u32, evicted: bool, k: &CtKey<A>, v: &CtValue<A>) -> bool {
    // Looked up again by index rather than kept from the choice: a pointer picked at a
    // variable offset of the stack is one the verifier no longer knows.
    let Some(w) = way::<A>(i) else { return false };
    if key_eq(&w.key, k) {
        // Its own way (a state change): the key stays, or another CPU could miss the flow
        // meanwhile and write it into a second way.
        w.value = *v;
        return false;
    }
    // Emptied since the choice: the pair's first write may have removed a SNATed flow's forward
    // entry from this very set.
    let evicted = evicted && w.key.proto != 0;
    if evicted && w.key.dir == CT_DIR_REPLY && w.value.flags & CT_FLAG_SNAT != 0 {
        // A SNATed flow that loses its reply entry would leave its SNAT port looking free
        // (`conntrack::free_snat_port` probes reply keys) while its client's packets, through
        // the forward entry, still take it: another client given the port would get the old
        // flow's replies. So the flow goes whole; its next packet starts it again. (A forward
        // entry pushed out alone is harmless: its next packet is a new flow that finds its
        // own reply entry and takes its port back.)
        if A::FAMILY == lb_common::FAMILY_IPV4 {
            remove_of(&ct_forward_key(&w.key, &w.value));
        } else {
            // IPv6: built in the scratch slot, not on the stack of a subprogram that other
            // subprograms call.
            let s = A::scratch();
            if !s.is_null() {
                // SAFETY: this CPU's slot; the field is used here only.
                let fk = unsafe { &mut (*s).evicted_key };
                ct_forward_key_into(&w.key, &w.value, fk);
                remove_of(fk);
            }
        }
    }
    // The key last: a reader matching it finds the value already there (stores are seen in
    // order on x86; elsewhere the window above stays). A `conntrack::swap_state` racing this
    // write reads the state word once and checks its tag: the copy must store state, flags and
    // tag together, or the swap could see the new flow's state beside the old flow's tag. They
    // fill one aligned 4-byte half of the word, and a copy of a 4-aligned value is made of
    // 4-byte stores or wider.
    w.key.proto = 0;
    w.value = *v;
    w.key = *k;
    evicted
}

/// Frees `k`'s entry.
#[inline(always)]
pub fn remove<A: Addr>(k: &CtKey<A>) {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        lb_ct6_remove(k as *const CtKey<A> as *const CtKey6);
        return;
    }
    remove_of(k)
}

/// `remove`, inlined for IPv6 too, as `insert_inline`.
#[inline(always)]
pub fn remove_inline<A: Addr>(k: &CtKey<A>) {
    remove_of(k)
}

/// IPv6's remove, a global function as `lb_ct6_insert` (which must return a number: 0).
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_ct6_remove(k: *const CtKey6) -> u32 {
    if !k.is_null() {
        // SAFETY: checked for null; the verifier checks the caller passes a whole key.
        remove_of(unsafe { &*k })
    }
    0
}

#[inline(always)]
fn remove_of<A: Addr>(k: &CtKey<A>) {
    let (first, _) = set_of(k);
    let mut i = 0;
    // Every way: should two CPUs ever have written the key twice, no copy stays behind to
    // resurface with an old state.
    while i < CT_WAYS as u32 {
        let Some(w) = way::<A>(first + i) else { return };
        if key_eq(&w.key, k) {
            w.key.proto = 0;
        }
        i += 1;
    }
}
