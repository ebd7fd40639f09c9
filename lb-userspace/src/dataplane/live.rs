//! The agent's side of `LB_CT4_LIVE`, the stamps a SYN reads before the assured table
//! (`lb-ebpf/src/ct_live.rs` says why and how they stay true): moving the epoch on and
//! stamping the forward keys of a walk of `LB_CT4`.
//!
//! The map is mmapped and written a byte at a time through atomics: the datapath stamps
//! single bytes too, and a write of a whole 8-byte element (the syscall's unit) could undo a
//! stamp the datapath put into its other bytes meanwhile.
use std::{
    ptr::NonNull,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
};

use aya::maps::MapData;
use lb_common::{ct_cache_slot, ct_live_next_epochs, CtKey4, CT_DIR_FORWARD, CT_LIVE_ALL, MAP_CT4_LIVE};

use super::{DataplaneError, Result};

/// The mmapped `LB_CT4_LIVE`: the epoch word (the first 8 bytes), then `slots` bytes.
pub struct LiveStamps {
    ptr: NonNull<u8>,
    slots: u32,
    /// Held through a pass (epoch move, walk, stamps): two passes interleaved would move the
    /// epoch twice while a walk still had flows to stamp (the collector's thread and the
    /// agent's `finish_migrations` both make passes).
    pass: Mutex<()>,
    /// A first pass has stamped the assured table. Until then the epoch word says every slot
    /// counts: a previous agent's programs may still be making flows assured, unstamped.
    armed: AtomicBool,
}

// SAFETY: the mapping lives as long as this value, and every access goes through atomics.
unsafe impl Send for LiveStamps {}
unsafe impl Sync for LiveStamps {}

impl Drop for LiveStamps {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped, once.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), Self::bytes(self.slots)) };
    }
}

impl LiveStamps {
    fn bytes(slots: u32) -> usize {
        8 + slots as usize
    }

    /// Maps `map`, `slots` slots after its epoch word (the map's elements are 8 bytes each). A
    /// new map's epoch word is 0: every slot counts until the first pass.
    pub(super) fn open(map: &MapData, slots: u32) -> Result<Self> {
        let ptr = super::sys::mmap_array(map, Self::bytes(slots)).map_err(|errno| DataplaneError::Io {
            what: "mapping LB_CT4_LIVE into memory",
            path: MAP_CT4_LIVE.into(),
            source: errno.into(),
        })?;
        Ok(Self { ptr, slots, pass: Mutex::new(()), armed: AtomicBool::new(false) })
    }

    fn epochs(&self) -> &AtomicU32 {
        // SAFETY: the first 4 bytes of the page-aligned mapping.
        unsafe { &*self.ptr.as_ptr().cast::<AtomicU32>() }
    }

    /// Whether a first pass has been made (the collector's passes wait for it).
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Begins a pass: moves the epoch on, so that stamps two epochs old stop counting, and
    /// returns the pass, through which the caller stamps the forward keys of a walk of
    /// `LB_CT4` it begins now. The first pass keeps every slot counting until `finish`.
    pub fn begin(&self) -> LivePass<'_> {
        let guard = self.pass.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = !self.armed();
        let e = self.epochs();
        let next = ct_live_next_epochs(e.load(Ordering::Relaxed)) | if first { CT_LIVE_ALL } else { 0 };
        // SeqCst: the walk's reads come after the datapath can see the new epoch.
        e.store(next, Ordering::SeqCst);
        LivePass { stamps: self, first, _guard: guard }
    }
}

/// A pass over the assured table (`LiveStamps::begin`).
pub struct LivePass<'a> {
    stamps: &'a LiveStamps,
    first: bool,
    _guard: MutexGuard<'a, ()>,
}

impl LivePass<'_> {
    /// Stamps `k` with the current epoch if it is a forward key.
    pub fn stamp(&self, k: &CtKey4) {
        if k.dir != CT_DIR_FORWARD {
            return;
        }
        let s = self.stamps;
        let i = ct_cache_slot(k.src, k.dst, k.sport, k.dport, k.proto, s.slots);
        let current = s.epochs().load(Ordering::Relaxed) as u8;
        // SAFETY: `i < slots`, a byte of the mapping after the epoch word.
        let byte = unsafe { &*s.ptr.as_ptr().add(8 + i as usize).cast::<AtomicU8>() };
        byte.store(current, Ordering::Relaxed);
    }

    /// Ends the pass, its walk stamped: after a first pass, only stamps count from now on.
    pub fn finish(self) {
        if self.first {
            self.stamps.epochs().fetch_and(!CT_LIVE_ALL, Ordering::SeqCst);
            self.stamps.armed.store(true, Ordering::Release);
        }
    }
}
