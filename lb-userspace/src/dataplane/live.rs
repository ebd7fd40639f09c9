//! The agent's side of `LB_CT4_LIVE`, the stamps a SYN reads before the assured table
//! (`lb-ebpf/src/ct_live.rs` says why and how they stay true): moving the epoch on and
//! stamping the forward keys of a walk of `LB_CT4`.
//!
//! The map is mmapped and written a byte at a time through atomics: the datapath stamps
//! single bytes too, and a write of a whole 8-byte element (the syscall's unit) could undo a
//! stamp the datapath put into its other bytes meanwhile.
use std::{
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU8, Ordering},
};

use aya::maps::MapData;
use lb_common::{ct_cache_slot, ct_live_next_epochs, CtKey4, CT_DIR_FORWARD, MAP_CT4_LIVE};

use super::{DataplaneError, Result};

/// The mmapped `LB_CT4_LIVE`: the epoch word (the first 8 bytes), then `slots` bytes.
pub struct LiveStamps {
    ptr: NonNull<u8>,
    slots: u32,
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

    /// Maps `map`, `slots` slots after its epoch word (the map's elements are 8 bytes each).
    pub(super) fn open(map: &MapData, slots: u32) -> Result<Self> {
        let ptr = super::sys::mmap_array(map, Self::bytes(slots)).map_err(|errno| DataplaneError::Io {
            what: "mapping LB_CT4_LIVE into memory",
            path: MAP_CT4_LIVE.into(),
            source: errno.into(),
        })?;
        Ok(Self { ptr, slots })
    }

    fn epochs(&self) -> &AtomicU32 {
        // SAFETY: the first 4 bytes of the page-aligned mapping.
        unsafe { &*self.ptr.as_ptr().cast::<AtomicU32>() }
    }

    /// Moves the epoch on: stamps of the epoch before the current one stop counting. Only the
    /// agent writes the word (one writer: the collector, or the load before it starts).
    pub fn next_epoch(&self) {
        let e = self.epochs();
        e.store(ct_live_next_epochs(e.load(Ordering::Relaxed)), Ordering::SeqCst);
    }

    /// Stamps `k` with the current epoch if it is a forward key.
    pub fn stamp(&self, k: &CtKey4) {
        if k.dir != CT_DIR_FORWARD {
            return;
        }
        let i = ct_cache_slot(k.src, k.dst, k.sport, k.dport, k.proto, self.slots);
        let current = self.epochs().load(Ordering::Relaxed) as u8;
        // SAFETY: `i < slots`, a byte of the mapping after the epoch word.
        let byte = unsafe { &*self.ptr.as_ptr().add(8 + i as usize).cast::<AtomicU8>() };
        byte.store(current, Ordering::Relaxed);
    }

    /// Stamps every forward key of `keys` in the current epoch: the keys of a walk of
    /// `LB_CT4` begun after `next_epoch`.
    pub fn restamp<'a>(&self, keys: impl IntoIterator<Item = &'a CtKey4>) {
        for k in keys {
            self.stamp(k);
        }
    }
}
