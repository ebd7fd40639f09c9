//! The agent's side of `LB_CT4_LIVE`, the stamps a SYN reads before the assured table
//! (`lb-ebpf/src/ct_live.rs` says why and how they stay true): clearing a generation, turning
//! the generation word to it and stamping the forward keys of a walk of `LB_CT4` and `LB_CT6`
//! (one map serves both families).
//!
//! The map is mmapped and written through atomics only: a key's stamp is bits of a word whose
//! other bits the datapath stamps with atomic ORs meanwhile, and a write of a whole element
//! (the syscall's unit) could undo one of those stamps.
use std::{
    ptr::NonNull,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
};

use aya::maps::MapData;
use lb_common::{
    ct_live_generation, ct_live_place, ct_live_stamp, CtKey, CT_DIR_FORWARD, CT_LIVE_GENERATIONS, MAP_CT4_LIVE,
};

use super::{conntrack::CtAddr, DataplaneError, Result};

/// Where the words are: the map's mapping, or (unit tests) memory of our own.
enum Words {
    Mapped(NonNull<u8>),
    #[cfg(test)]
    Owned(Box<[AtomicU64]>),
}

/// `LB_CT4_LIVE`: the generation word (the first element), then `count` words of stamps.
pub struct LiveStamps {
    words: Words,
    count: u32,
    /// Held through a pass (clear, turn, walk, stamps): two passes interleaved would clear a
    /// generation while a walk still had flows to stamp into another (the collector's thread
    /// and the agent's `finish_migrations` both make passes).
    pass: Mutex<()>,
    /// The agent has said passes may begin (`allow`): no programs that do not stamp are
    /// left. Until then, and until two passes have walked the tables whole, every key counts.
    allowed: AtomicBool,
    /// Passes that walked the tables whole since the map was made, up to two.
    whole_passes: AtomicU8,
}

// SAFETY: the mapping lives as long as this value, and every access goes through atomics.
unsafe impl Send for LiveStamps {}
unsafe impl Sync for LiveStamps {}

impl Drop for LiveStamps {
    // Irrefutable outside unit tests, which own their words.
    #[allow(irrefutable_let_patterns)]
    fn drop(&mut self) {
        if let Words::Mapped(ptr) = self.words {
            // SAFETY: unmapping what `open` mapped, once.
            let _ = unsafe { nix::sys::mman::munmap(ptr.cast(), Self::elements(self.count) * 8) };
        }
    }
}

impl LiveStamps {
    /// The map's 8-byte elements: the generation word and the words of stamps.
    fn elements(count: u32) -> usize {
        1 + count as usize
    }

    /// Maps `map`, `count` words of stamps after its generation word, and sets every bit: in
    /// a new map every key counts until the first two passes (`LivePass::finish`).
    pub(super) fn open(map: &MapData, count: u32) -> Result<Self> {
        let ptr = super::sys::mmap_array(map, Self::elements(count) * 8).map_err(|errno| DataplaneError::Io {
            what: "mapping LB_CT4_LIVE into memory",
            path: MAP_CT4_LIVE.into(),
            source: errno.into(),
        })?;
        Ok(Self::new(Words::Mapped(ptr), count))
    }

    fn new(words: Words, count: u32) -> Self {
        let this = Self {
            words,
            count,
            pass: Mutex::new(()),
            allowed: AtomicBool::new(false),
            whole_passes: AtomicU8::new(0),
        };
        let every = (0..CT_LIVE_GENERATIONS).fold(0, |all, g| all | ct_live_generation(g));
        for w in this.stamp_words() {
            w.store(every, Ordering::Relaxed);
        }
        this
    }

    fn all(&self) -> &[AtomicU64] {
        match &self.words {
            // SAFETY: the page-aligned mapping of `elements` 8-byte elements, alive as long as
            // `self`; only ever accessed through atomics.
            Words::Mapped(ptr) => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU64>(), Self::elements(self.count))
            },
            #[cfg(test)]
            Words::Owned(w) => w,
        }
    }

    fn generation(&self) -> &AtomicU64 {
        &self.all()[0]
    }

    fn stamp_words(&self) -> &[AtomicU64] {
        &self.all()[1..]
    }

    /// The two words of `k`'s stamp (either family's, addresses folded as the datapath folds
    /// them) and its bits of generation 0 in each.
    fn places<A: CtAddr>(&self, k: &CtKey<A>) -> [(&AtomicU64, u64); 2] {
        ct_live_place(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, self.count)
            .map(|(w, mask)| (&self.all()[w as usize], mask))
    }

    /// Clears generation `g` in every word, leaving the others' stamps (and the datapath's
    /// ORs into them meanwhile) as they are.
    fn clear(&self, g: u64) {
        let keep = !ct_live_generation(g);
        for w in self.stamp_words() {
            w.fetch_and(keep, Ordering::Relaxed);
        }
    }

    /// Lets passes begin: every program that makes flows assured stamps them from now on
    /// (at a first load at once; over a previous agent's pins after the link swap).
    pub fn allow(&self) {
        self.allowed.store(true, Ordering::Release);
    }

    /// Whether passes may be made (the collector's wait for it).
    pub fn allowed(&self) -> bool {
        self.allowed.load(Ordering::Acquire)
    }

    /// Whether stamps alone count: two passes have walked the tables whole, so a flow one of
    /// them skipped has the other's stamp.
    pub fn armed(&self) -> bool {
        self.whole_passes.load(Ordering::Acquire) >= 2
    }

    /// Begins a pass: clears the next generation (the stamps of two passes ago: every live
    /// flow has a stamp of one of the two others, from the last two walks or the datapath
    /// since), turns the generation word to it, and returns the pass, through which the
    /// caller stamps the forward keys of a walk of `LB_CT4` and `LB_CT6` it begins now.
    pub fn begin(&self) -> LivePass<'_> {
        let guard = self.pass.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = (self.generation().load(Ordering::Relaxed) + 1) % CT_LIVE_GENERATIONS;
        self.clear(next);
        // SeqCst: the clear is done before the datapath can stamp into that generation, and
        // the walk's reads come after the datapath sees the new one.
        self.generation().store(next, Ordering::SeqCst);
        LivePass { stamps: self, generation: next, _guard: guard }
    }

    /// Whether `k`'s stamp counts, as the datapath reads it.
    #[cfg(test)]
    fn present<A: CtAddr>(&self, k: &CtKey<A>) -> bool {
        let places = ct_live_place(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, self.count);
        lb_common::ct_live_counts(places, |w| Some(self.all()[w as usize].load(Ordering::Relaxed)))
    }
}

/// A pass over the assured tables (`LiveStamps::begin`).
pub struct LivePass<'a> {
    stamps: &'a LiveStamps,
    generation: u64,
    _guard: MutexGuard<'a, ()>,
}

impl LivePass<'_> {
    /// Stamps the forward keys among `keys` (a walk of an assured table); whether the walk
    /// read every key.
    pub fn stamp_keys<A: CtAddr, E>(&self, keys: impl Iterator<Item = std::result::Result<CtKey<A>, E>>) -> bool {
        let mut whole = true;
        for k in keys {
            match k {
                Ok(k) => self.stamp(&k),
                Err(_) => whole = false,
            }
        }
        whole
    }

    /// Stamps `k` into the pass's generation if it is a forward key.
    pub fn stamp<A: CtAddr>(&self, k: &CtKey<A>) {
        if k.dir != CT_DIR_FORWARD {
            return;
        }
        for (w, mask) in self.stamps.places(k) {
            w.fetch_or(ct_live_stamp(mask, self.generation), Ordering::Relaxed);
        }
    }

    /// Ends the pass: `finish` if its walk read the whole table, else `fail`.
    pub fn end(self, whole: bool) {
        if whole {
            self.finish()
        } else {
            self.fail()
        }
    }

    /// Ends a pass whose walk could not read the whole table: every key counts in its
    /// generation (a SYN pays the assured table's lookup until the third pass after it
    /// clears it), since flows it did not read may have no other stamp left by then.
    fn fail(self) {
        tracing::warn!(
            "the walk of the assured tables failed part way: every SYN looks into the assured table until three passes later"
        );
        for w in self.stamps.stamp_words() {
            w.fetch_or(ct_live_generation(self.generation), Ordering::Relaxed);
        }
    }

    /// Ends the pass, its walk stamped. A new map's three generations are all set; the first
    /// two whole passes each clear one as they begin, and the second clears the third as it
    /// ends: from then on only stamps count. Every live flow holds one of those two passes'
    /// generations (one of their walks found it, or the datapath, this agent's programs alone
    /// by then, stamped it after a turn), even a flow one of the walks skipped or one that
    /// the last old program still running at the link swap made assured during the first.
    fn finish(self) {
        let s = self.stamps;
        let done = s.whole_passes.load(Ordering::Relaxed);
        if done == 1 {
            s.clear(self.generation + 1);
        }
        s.whole_passes.store(done.saturating_add(1).min(2), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use lb_common::CtKey4;

    use super::*;

    fn key(i: u32) -> CtKey4 {
        CtKey4 {
            src: u32::from_be_bytes([10, 0, (i >> 8) as u8, i as u8]),
            dst: u32::from_be_bytes([10, 96, 0, 10]),
            sport: (40000 + i as u16).to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            dir: CT_DIR_FORWARD,
            ..Default::default()
        }
    }

    fn stamps(count: u32) -> LiveStamps {
        let words = (0..LiveStamps::elements(count)).map(|_| AtomicU64::new(0)).collect();
        LiveStamps::new(Words::Owned(words), count)
    }

    /// What the datapath does after writing `k` into the assured table: read the generation
    /// word, OR the bits in (`lb-ebpf/src/ct_live.rs`).
    fn datapath_stamp(s: &LiveStamps, k: &CtKey4, g: u64) {
        for (w, mask) in s.places(k) {
            w.fetch_or(ct_live_stamp(mask, g), Ordering::Relaxed);
        }
    }

    /// The agent's first passes (`Dataplane::restamp_live_flows`): two, back to back.
    fn arm(s: &LiveStamps, walk: &[CtKey4]) {
        s.allow();
        pass(s, walk);
        assert!(!s.armed());
        pass(s, walk);
        assert!(s.armed());
    }

    fn pass(s: &LiveStamps, walk: &[CtKey4]) {
        let p = s.begin();
        for k in walk {
            p.stamp(k);
        }
        p.finish();
    }

    #[test]
    fn every_live_flow_keeps_a_stamp_across_passes_and_gone_ones_stop_counting() {
        let s = stamps(1 << 12);
        let keys: Vec<_> = (0..2000).map(key).collect();
        // A new map: every key counts until the first two passes.
        assert!(keys.iter().all(|k| s.present(k)) && !s.armed());
        // Flows 0..1000 in the table when the first passes walk it.
        arm(&s, &keys[..1000]);
        assert!(keys[..1000].iter().all(|k| s.present(k)), "a walked flow unstamped");
        let strays = keys[1000..].iter().filter(|k| s.present(k)).count();
        assert!(strays < 100, "{strays} of 1000 unwalked keys count (bits shared by chance only)");
        // A flow the datapath makes assured meanwhile; then the table loses flows 0..500.
        let late = key(5000);
        datapath_stamp(&s, &late, s.generation().load(Ordering::Relaxed));
        let table: Vec<_> = keys[500..1000].iter().copied().chain([late]).collect();
        // Three passes: a flow seen by none of their walks (gone) stops counting; the rest
        // always count, before, during and after each.
        for _ in 0..3 {
            let p = s.begin();
            assert!(table.iter().all(|k| s.present(k)), "a live flow lost its stamp at the clear");
            for k in &table {
                p.stamp(k);
            }
            p.finish();
            assert!(table.iter().all(|k| s.present(k)));
        }
        let gone = keys[..500].iter().filter(|k| s.present(k)).count();
        assert!(gone < 50, "{gone} of 500 gone flows still count");
        // A CPU that read an old generation long ago ORs its stamp in only now: bits too
        // many, nothing taken from the others.
        datapath_stamp(&s, &key(7000), s.generation().load(Ordering::Relaxed) + 1);
        assert!(s.present(&key(7000)) && table.iter().all(|k| s.present(k)));
    }

    #[test]
    fn a_flow_one_walk_misses_keeps_counting_until_the_next_finds_it() {
        let s = stamps(1 << 12);
        let keys: Vec<_> = (0..1000).map(key).collect();
        arm(&s, &keys);
        // The datapath's flow, stamped, then missed by the next walk (the kernel's hash
        // iteration can skip elements under concurrent deletes), as is a walked one.
        let late = key(5000);
        datapath_stamp(&s, &late, s.generation().load(Ordering::Relaxed));
        pass(&s, &keys[1..]);
        let p = s.begin();
        assert!(s.present(&late) && s.present(&keys[0]), "a flow missed once lost its stamp");
        for k in keys.iter().chain([&late]) {
            p.stamp(k);
        }
        p.finish();
        assert!(s.present(&late) && s.present(&keys[0]));
    }

    #[test]
    fn a_flow_one_of_the_first_two_walks_skips_keeps_counting() {
        let s = stamps(1 << 12);
        let keys: Vec<_> = (0..1000).map(key).collect();
        s.allow();
        for walk in [&keys[1..], &keys[..]] {
            let p = s.begin();
            assert!(keys.iter().all(|k| s.present(k)), "a flow lost its stamp");
            for k in walk {
                p.stamp(k);
            }
            p.finish();
            assert!(keys.iter().all(|k| s.present(k)), "a flow lost its stamp");
        }
        assert!(s.armed());
        // And the other way round: the second walk skips it.
        let s = stamps(1 << 12);
        s.allow();
        pass(&s, &keys);
        pass(&s, &keys[1..]);
        assert!(s.armed() && s.present(&keys[0]));
        let strays = (5000..6000).map(key).filter(|k| s.present(k)).count();
        assert!(strays < 100, "{strays} of 1000 unwalked keys count");
    }

    #[test]
    fn a_failed_walk_makes_every_key_count_until_its_generation_comes_round() {
        let s = stamps(64);
        arm(&s, &[]);
        let k = key(1);
        assert!(!s.present(&k));
        s.begin().fail();
        assert!(s.present(&k), "a failed walk left keys it did not read unstamped");
        for _ in 0..2 {
            pass(&s, &[]);
            assert!(s.present(&k));
        }
        pass(&s, &[]);
        assert!(!s.present(&k));
    }

    #[test]
    fn a_pass_clears_only_its_own_generation() {
        let s = stamps(2);
        arm(&s, &[]);
        // All clear now, the first passes having walked an empty table.
        assert!(s.stamp_words().iter().all(|w| w.load(Ordering::Relaxed) == 0));
        for w in s.stamp_words() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        let g = s.generation().load(Ordering::Relaxed);
        drop(s.begin());
        assert!(s.stamp_words().iter().all(|w| w.load(Ordering::Relaxed) == !ct_live_generation(g + 1)));
    }
}
