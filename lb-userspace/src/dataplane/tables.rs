//! Where the frontends' Maglev tables live: `LB_MAGLEV`, one array of backend ids in which each
//! table has a range, and `LB_BACKENDS`, the backends by id, shared by every table naming them.
//!
//! `LB_MAGLEV` holds two u32 slots in each u64 element, low half first; mmapped
//! (`BPF_F_MMAPABLE`), it is one array of u32 slots on a little-endian host (the only kind
//! the datapath's packing assumes). A table of up to 65,537 slots is written with
//! plain stores, not a syscall per slot, and read back the same way at adoption. A new table
//! is written into a free range before the service entry flips to it, so the datapath only
//! ever sees complete tables; a replaced range is freed after the grace period (`apply.rs`).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ptr::NonNull,
};

use aya::maps::{Array, MapData};
use lb_common::{Backend, MAP_BACKENDS, MAP_MAGLEV};

use super::{DataplaneError, Result};

/// A blank slot: no backend has this id (`LB_BACKENDS` is smaller).
const NO_BACKEND: u32 = u32::MAX;

/// The mmapped `LB_MAGLEV`.
struct Slots {
    ptr: NonNull<u32>,
    len: u32,
}

// SAFETY: the mapping is owned by this value and only touched through `&mut self` or `&self`.
unsafe impl Send for Slots {}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map_slots` mapped, once. A failure could only mean a bad
        // address or length, neither of which this value lets change.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len as usize * 4) };
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("LB_MAGLEV's packing of two slots per u64 element assumes a little-endian host");

fn map_slots(map: &MapData, len: u32) -> Result<Slots> {
    // The whole array: its capacity times the 8-byte element.
    let ptr = super::sys::mmap_array(map, len as usize * 4).map_err(|errno| DataplaneError::Io {
        what: "mapping LB_MAGLEV into memory",
        path: MAP_MAGLEV.into(),
        source: errno.into(),
    })?;
    Ok(Slots { ptr: ptr.cast(), len })
}

/// Ranges of a `len`-slot array: first fit, merged when freed.
#[derive(Debug, Default)]
struct Allocator {
    /// Free ranges: offset -> length. Everything from `end` on is free too.
    free: BTreeMap<u32, u32>,
    end: u32,
    len: u32,
}

impl Allocator {
    fn alloc(&mut self, n: u32) -> Option<u32> {
        if let Some((&off, &len)) = self.free.iter().find(|(_, &len)| len >= n) {
            self.free.remove(&off);
            if len > n {
                self.free.insert(off + n, len - n);
            }
            return Some(off);
        }
        if self.len - self.end < n {
            return None;
        }
        self.end += n;
        Some(self.end - n)
    }

    fn free_range(&mut self, mut off: u32, mut n: u32) {
        if n == 0 {
            return;
        }
        if let Some((&prev, &len)) = self.free.range(..off).next_back() {
            if prev + len == off {
                self.free.remove(&prev);
                off = prev;
                n += len;
            }
        }
        if let Some(len) = self.free.remove(&(off + n)) {
            n += len;
        }
        if off + n == self.end {
            self.end = off;
            // A free range may now end where `end` is.
            if let Some((&prev, &len)) = self.free.iter().next_back() {
                if prev + len == self.end {
                    self.free.remove(&prev);
                    self.end = prev;
                }
            }
        } else {
            self.free.insert(off, n);
        }
    }
}

pub(super) struct Tables {
    slots: Slots,
    ranges: Allocator,
    /// Backend -> (id, tables naming it, live or in their grace).
    ids: HashMap<Backend, (u32, u32)>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    id_capacity: u32,
}

impl Tables {
    pub(super) fn new(maglev: &MapData, slots: u32, backends: u32) -> Result<Self> {
        Ok(Self {
            slots: map_slots(maglev, slots)?,
            ranges: Allocator { len: slots, ..Allocator::default() },
            ids: HashMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 0,
            id_capacity: backends,
        })
    }

    /// A range of `n` slots, first fit; `None` when the array is full.
    pub(super) fn alloc(&mut self, n: u32) -> Option<u32> {
        self.ranges.alloc(n)
    }

    /// Gives a range back, merging it with free neighbours. Its slots are blanked first
    /// (`NO_BACKEND`), so a packet holding a long-stale service entry drops
    /// (`drop_slot_missing`) rather than reach whatever the range holds next.
    pub(super) fn free_range(&mut self, off: u32, n: u32) {
        if n == 0 || off as u64 + n as u64 > self.slots.len as u64 {
            return;
        }
        self.write(off, &vec![NO_BACKEND; n as usize]);
        self.ranges.free_range(off, n)
    }

    pub(super) fn capacity(&self) -> u32 {
        self.slots.len
    }

    pub(super) fn write(&mut self, off: u32, ids: &[u32]) {
        assert!(off as usize + ids.len() <= self.slots.len as usize, "range inside the array");
        // SAFETY: in bounds of the mapping (checked above); the datapath reads these slots
        // only after the service entry pointing at them is written, a syscall later.
        unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), self.slots.ptr.as_ptr().add(off as usize), ids.len()) };
    }

    pub(super) fn read(&self, off: u32, n: u32) -> Vec<u32> {
        let n = n.min(self.slots.len.saturating_sub(off));
        // SAFETY: in bounds of the mapping.
        unsafe { std::slice::from_raw_parts(self.slots.ptr.as_ptr().add(off as usize), n as usize).to_vec() }
    }

    /// The id of `b` for one more table, written into `LB_BACKENDS` when new.
    pub(super) fn acquire(&mut self, b: &Backend, map: &mut Array<MapData, Backend>) -> Result<u32> {
        if let Some((id, refs)) = self.ids.get_mut(b) {
            *refs += 1;
            return Ok(*id);
        }
        let id = match self.free_ids.pop_first() {
            Some(id) => id,
            None if self.next_id < self.id_capacity => {
                self.next_id += 1;
                self.next_id - 1
            }
            None => {
                return Err(DataplaneError::MapFull {
                    name: MAP_BACKENDS,
                    capacity: self.id_capacity,
                    what: "a new backend".into(),
                })
            }
        };
        if let Err(source) = map.set(id, *b, 0) {
            self.free_ids.insert(id);
            return Err(DataplaneError::Map { name: MAP_BACKENDS, source });
        }
        self.ids.insert(*b, (id, 1));
        Ok(id)
    }

    /// One table fewer names `b`; its id comes free with the last.
    pub(super) fn release(&mut self, b: &Backend) {
        if let Some((id, refs)) = self.ids.get_mut(b) {
            *refs -= 1;
            if *refs == 0 {
                self.free_ids.insert(*id);
                self.ids.remove(b);
            }
        }
    }

    /// Adoption: the live tables a previous agent left, `(offset, size)`, become used ranges and
    /// the backends they name get their ids back; the rest of the array is free. Returns each
    /// table's backends, slot by slot.
    pub(super) fn adopt(&mut self, live: &[(u32, u32)], map: &Array<MapData, Backend>) -> Result<Vec<Vec<Backend>>> {
        let mut used: Vec<(u32, u32)> = live.iter().copied().filter(|&(_, n)| n > 0).collect();
        used.sort();
        let mut at = 0;
        for &(off, n) in &used {
            if off > at {
                self.ranges.free.insert(at, off - at);
            }
            at = at.max(off + n);
        }
        self.ranges.end = at;
        let mut by_id: HashMap<u32, Backend> = HashMap::new();
        let mut tables = Vec::new();
        for &(off, n) in live {
            let ids = self.read(off, n);
            let mut table = Vec::with_capacity(ids.len());
            let mut named = BTreeSet::new();
            for id in ids {
                let b = match by_id.get(&id) {
                    Some(b) => *b,
                    None => {
                        let b = map.get(&id, 0).map_err(|source| DataplaneError::Map { name: MAP_BACKENDS, source })?;
                        by_id.insert(id, b);
                        b
                    }
                };
                if named.insert(id) {
                    let e = self.ids.entry(b).or_insert((id, 0));
                    e.1 += 1;
                }
                table.push(b);
            }
            tables.push(table);
        }
        let taken: BTreeSet<u32> = self.ids.values().map(|(id, _)| *id).collect();
        self.next_id = taken.last().map_or(0, |m| m + 1);
        self.free_ids = (0..self.next_id).filter(|id| !taken.contains(id)).collect();
        Ok(tables)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_reused_and_merged() {
        // The allocator alone, without a mapping behind it.
        let mut t = super::Allocator { len: 100, ..Default::default() };
        let a = t.alloc(30).unwrap();
        let b = t.alloc(30).unwrap();
        let c = t.alloc(30).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert!(t.alloc(30).is_none(), "full");
        t.free_range(b, 30);
        assert_eq!(t.alloc(20), Some(30), "first fit");
        t.free_range(a, 30);
        assert_eq!(t.alloc(60), None, "0..30 and 50..60 free, not one range");
        t.free_range(30, 20);
        assert_eq!(t.alloc(60), Some(0), "0..60 merged");
        t.free_range(0, 60);
        t.free_range(c, 30);
        assert_eq!((t.end, t.free.len()), (0, 0), "all merged back");
        assert_eq!(t.alloc(100), Some(0));
    }
}
