//! The new-flow tables as conntrack uses them: lookup, insert and remove of an entry, and the
//! insert of a flow's two. IPv4's (`LB_CT4_NEW`) is a set-associative array of `CtWay`s
//! (`lb_common::ct_set_hash`, `ct_set_victim`, `ct_set_pair`); IPv6's (`LB_CT6_NEW`) an LRU
//! hash with per-CPU lists.
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
//! Why IPv6 keeps the LRU: its conntrack moves run as subprograms (`addr::OUTLINE_V6_CT`),
//! and a set's four lookups with a 40-byte key to compare against each take more registers
//! than BPF has across a lookup; the spills took those subprograms' frames past the 512 bytes
//! they share with a stage's (the verifier refused every IPv6 stage). IPv4's code is inlined
//! into its stage instead, where it fits.
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
    ct_forward_key, ct_key_eq, ct_set_hash, ct_set_pair, ct_set_victim, select_slot, CtKey, CtValue, CtWay,
    CT_DIR_REPLY, CT_FLAG_SNAT, CT_WAYS,
};

use crate::{addr::Addr, conntrack::expired};

/// Sets in IPv4's new-flow table, written by the agent at load time (the map's capacity over
/// `CT_WAYS`).
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
    if let Some(lru) = A::ct_lru() {
        return lru.get_ptr_mut(k);
    }
    let (first, _) = set_of(k);
    let mut i = 0;
    while i < CT_WAYS as u32 {
        let w = way::<A>(first + i)?;
        if ct_key_eq(&w.key, k) {
            return Some(&mut w.value as *mut CtValue<A>);
        }
        i += 1;
    }
    None
}

/// Writes `k`'s entry. In the array: over its old one, into a free or expired way, or over
/// the less recently seen of two entries of the set (`ct_set_victim`); true in that last case,
/// a live flow lost its entry (the caller counts it, `Counter::CtNewEvicted`; the LRU's
/// evictions are not visible to the program). `v.last_seen` is taken for now.
#[inline(always)]
pub fn insert<A: Addr>(k: &CtKey<A>, v: &CtValue<A>) -> bool {
    if let Some(lru) = A::ct_lru() {
        let _ = lru.insert(k, v, 0);
        return false;
    }
    let (first, hash) = set_of(k);
    let now = v.last_seen;
    let Some((i, evicted)) =
        ct_set_victim(|i| way::<A>(first + i as u32).map(|w| &*w), k, hash, now, |e| expired(e, now))
    else {
        return false;
    };
    write(first + i as u32, evicted, k, v)
}

/// Writes a flow's two entries (`k` its forward key, `pk` its reply key); how many live flows
/// lost an entry to them, as `insert` says. Entries that share a set are placed with one pass
/// over it (`ct_set_pair`); others (a SNATed flow's) one at a time. The verifier walks the
/// choice once for every mix of own, free and live ways it can tell apart (it knows each index
/// on each path): the new-flow stages walk about 580,000 instructions where they walked
/// 150,000, which is why only they use it (a stage of their own, under the 1,000,000 limit).
#[inline(always)]
pub fn insert_pair<A: Addr>(k: &CtKey<A>, v: &CtValue<A>, pk: &CtKey<A>, pv: &CtValue<A>) -> u32 {
    if A::ct_lru().is_some() {
        return insert(k, v) as u32 + insert(pk, pv) as u32;
    }
    let (first, hash) = set_of(k);
    if ct_set_hash(pk.src.fold(), pk.dst.fold(), pk.sport, pk.dport, pk.proto, pk.dir) != hash {
        return insert(k, v) as u32 + insert(pk, pv) as u32;
    }
    let now = v.last_seen;
    let Some([(i, evicted), (j, peer_evicted)]) =
        ct_set_pair(|i| way::<A>(first + i as u32).map(|w| &*w), k, pk, hash, now, |e| expired(e, now))
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
    if ct_key_eq(&w.key, k) {
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
        remove(&ct_forward_key(&w.key, &w.value));
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
    if let Some(lru) = A::ct_lru() {
        let _ = lru.remove(k);
        return;
    }
    let (first, _) = set_of(k);
    let mut i = 0;
    // Every way: should two CPUs ever have written the key twice, no copy stays behind to
    // resurface with an old state.
    while i < CT_WAYS as u32 {
        let Some(w) = way::<A>(first + i) else { return };
        if ct_key_eq(&w.key, k) {
            w.key.proto = 0;
        }
        i += 1;
    }
}
