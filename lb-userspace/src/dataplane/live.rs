//! The agent's side of `LB_CT4_LIVE`, the stamps a SYN reads before the assured table
//! (`lb-ebpf/src/ct_live.rs` says why and how they stay true): clearing a generation, moving
//! the epoch on and stamping the forward keys of a walk of `LB_CT4`.
//!
//! The map is mmapped and written through atomics only: a slot is two bits of a word whose
//! other 31 slots the datapath stamps with atomic ORs meanwhile, and a write of a whole
//! element (the syscall's unit) could undo one of those stamps.
use std::{
    ptr::NonNull,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};

use aya::maps::MapData;
use lb_common::{
    ct_cache_slot, ct_live_bits, ct_live_generation, ct_live_stamp, CtKey4, CT_DIR_FORWARD, CT_LIVE_SLOTS_PER_WORD,
    MAP_CT4_LIVE,
};

use super::{DataplaneError, Result};

/// Where the words are: the map's mapping, or (unit tests) memory of our own.
enum Words {
    Mapped(NonNull<u8>),
    #[cfg(test)]
    Owned(Box<[AtomicU64]>),
}

/// `LB_CT4_LIVE`: the epoch word (the first element), then `slots` slots of two bits.
pub struct LiveStamps {
    words: Words,
    slots: u32,
    /// Held through a pass (clear, epoch move, walk, stamps): two passes interleaved would
    /// clear a generation while a walk still had flows to stamp into the other (the
    /// collector's thread and the agent's `finish_migrations` both make passes).
    pass: Mutex<()>,
    /// A first pass has stamped the assured table. Until then every bit is set: a previous
    /// agent's programs may still be making flows assured, unstamped.
    armed: AtomicBool,
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
            let _ = unsafe { nix::sys::mman::munmap(ptr.cast(), Self::elements(self.slots) * 8) };
        }
    }
}

impl LiveStamps {
    /// The map's 8-byte elements: the epoch word and the slots' words.
    fn elements(slots: u32) -> usize {
        1 + slots.div_ceil(CT_LIVE_SLOTS_PER_WORD) as usize
    }

    /// Maps `map`, `slots` slots after its epoch word, and sets every slot's bits: a new map
    /// counts every slot until the first pass.
    pub(super) fn open(map: &MapData, slots: u32) -> Result<Self> {
        let ptr = super::sys::mmap_array(map, Self::elements(slots) * 8).map_err(|errno| DataplaneError::Io {
            what: "mapping LB_CT4_LIVE into memory",
            path: MAP_CT4_LIVE.into(),
            source: errno.into(),
        })?;
        Ok(Self::new(Words::Mapped(ptr), slots))
    }

    fn new(words: Words, slots: u32) -> Self {
        let this = Self { words, slots, pass: Mutex::new(()), armed: AtomicBool::new(false) };
        for w in this.slot_words() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        this
    }

    fn all(&self) -> &[AtomicU64] {
        match &self.words {
            // SAFETY: the page-aligned mapping of `elements` 8-byte elements, alive as long as
            // `self`; only ever accessed through atomics.
            Words::Mapped(ptr) => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU64>(), Self::elements(self.slots))
            },
            #[cfg(test)]
            Words::Owned(w) => w,
        }
    }

    fn epoch(&self) -> &AtomicU64 {
        &self.all()[0]
    }

    fn slot_words(&self) -> &[AtomicU64] {
        &self.all()[1..]
    }

    /// The word and the shift of `k`'s slot.
    fn slot(&self, k: &CtKey4) -> (&AtomicU64, u32) {
        let (w, shift) = ct_live_bits(ct_cache_slot(k.src, k.dst, k.sport, k.dport, k.proto, self.slots));
        (&self.all()[w as usize], shift)
    }

    /// Clears generation `g` in every word, leaving the other's stamps (and the datapath's
    /// ORs into it meanwhile) as they are.
    fn clear(&self, g: u64) {
        let keep = !ct_live_generation(g);
        for w in self.slot_words() {
            w.fetch_and(keep, Ordering::Relaxed);
        }
    }

    /// Whether a first pass has been made (the collector's passes wait for it).
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Begins a pass: clears the generation the next epoch names (the stamps of the epoch
    /// before the current one: every live flow has a stamp of the current, from the last
    /// walk or the datapath since), moves the epoch on to it, and returns the pass, through
    /// which the caller stamps the forward keys of a walk of `LB_CT4` it begins now.
    pub fn begin(&self) -> LivePass<'_> {
        let guard = self.pass.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = self.epoch().load(Ordering::Relaxed).wrapping_add(1);
        self.clear(next);
        // SeqCst: the clear is done before the datapath can stamp into that generation, and
        // the walk's reads come after the datapath sees the new epoch.
        self.epoch().store(next, Ordering::SeqCst);
        LivePass { stamps: self, epoch: next, first: !self.armed(), _guard: guard }
    }

    /// Whether `k`'s slot counts, as the datapath reads it.
    #[cfg(test)]
    fn present(&self, k: &CtKey4) -> bool {
        let (w, shift) = self.slot(k);
        lb_common::ct_live_present(w.load(Ordering::Relaxed), shift)
    }
}

/// A pass over the assured table (`LiveStamps::begin`).
pub struct LivePass<'a> {
    stamps: &'a LiveStamps,
    epoch: u64,
    first: bool,
    _guard: MutexGuard<'a, ()>,
}

impl LivePass<'_> {
    /// Stamps `k` into the pass's generation if it is a forward key.
    pub fn stamp(&self, k: &CtKey4) {
        if k.dir != CT_DIR_FORWARD {
            return;
        }
        let (w, shift) = self.stamps.slot(k);
        w.fetch_or(ct_live_stamp(shift, self.epoch), Ordering::Relaxed);
    }

    /// Ends the pass, its walk stamped. After a first pass the other generation, all set
    /// since the map was made, is cleared: from now on only stamps count. Every live flow
    /// holds one of this pass's generation (the walk found it, or the datapath, this agent's
    /// programs alone by now, stamped it after the epoch moved).
    pub fn finish(self) {
        if self.first {
            self.stamps.clear(self.epoch + 1);
            self.stamps.armed.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn stamps(slots: u32) -> LiveStamps {
        let words = (0..LiveStamps::elements(slots)).map(|_| AtomicU64::new(0)).collect();
        LiveStamps::new(Words::Owned(words), slots)
    }

    /// What the datapath does after writing `k` into the assured table: read the epoch, OR
    /// the bit in (`lb-ebpf/src/ct_live.rs`).
    fn datapath_stamp(s: &LiveStamps, k: &CtKey4, epoch: u64) {
        let (w, shift) = s.slot(k);
        w.fetch_or(ct_live_stamp(shift, epoch), Ordering::Relaxed);
    }

    #[test]
    fn every_live_flow_keeps_a_stamp_across_passes_and_gone_ones_stop_counting() {
        let s = stamps(1 << 16);
        let keys: Vec<_> = (0..2000).map(key).collect();
        // A new map: every slot counts until the first pass.
        assert!(keys.iter().all(|k| s.present(k)) && !s.armed());
        // Flows 0..1000 in the table when the first pass walks it.
        let table: Vec<_> = keys[..1000].to_vec();
        let pass = s.begin();
        for k in &table {
            pass.stamp(k);
        }
        pass.finish();
        assert!(s.armed());
        assert!(table.iter().all(|k| s.present(k)), "a walked flow unstamped");
        let strays = keys[1000..].iter().filter(|k| s.present(k)).count();
        assert!(strays < 100, "{strays} of 1000 unwalked keys count (slots shared by chance only)");
        // A flow the datapath makes assured during epoch 1, then the table loses flow 0..500.
        let late = key(5000);
        datapath_stamp(&s, &late, s.epoch().load(Ordering::Relaxed));
        let table: Vec<_> = keys[500..1000].iter().copied().chain([late]).collect();
        // Two passes: a flow seen by neither walk (gone) stops counting; the rest always count,
        // before, during and after each.
        for _ in 0..2 {
            let pass = s.begin();
            assert!(table.iter().all(|k| s.present(k)), "a live flow lost its stamp at the clear");
            for k in &table {
                pass.stamp(k);
            }
            pass.finish();
            assert!(table.iter().all(|k| s.present(k)));
        }
        let gone = keys[..500].iter().filter(|k| s.present(k)).count();
        assert!(gone < 50, "{gone} of 500 gone flows still count");
        // A CPU that read epoch 1 long ago ORs its stamp in only now: a bit too many, nothing
        // taken from the others.
        datapath_stamp(&s, &key(7000), 1);
        assert!(s.present(&key(7000)) && table.iter().all(|k| s.present(k)));
    }

    #[test]
    fn a_pass_clears_only_its_own_generation() {
        let s = stamps(64);
        let pass = s.begin();
        pass.finish();
        // All clear now, the first pass having walked an empty table.
        assert!(s.slot_words().iter().all(|w| w.load(Ordering::Relaxed) == 0));
        for w in s.slot_words() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        let e = s.epoch().load(Ordering::Relaxed);
        drop(s.begin());
        assert!(s.slot_words().iter().all(|w| w.load(Ordering::Relaxed) == ct_live_generation(e)));
    }
}
