//! The new-flow tables from the agent's side: IPv4's (`LB_CT4_NEW`) and IPv6's
//! (`LB_CT6_NEW`), set-associative arrays of `lb_common::CtWay` that the datapath writes with
//! plain stores (`lb-ebpf/src/ct_table.rs`), read and written here as a map of conntrack keys
//! (`CtNewTable`'s `get`, `insert`, `remove`, `iter`), so the collection, listing, migration
//! and tests treat every conntrack table alike; the collection reaches either family's through
//! `NewFlows`.
//!
//! A write here reads a set and writes one way back: a datapath write into the same way in
//! between is lost (that flow's next packet tracks it again). The agent writes these tables
//! only when it carries flows over from another table, before or just after the new programs
//! take over, and when it removes flows.
use std::{
    borrow::{Borrow, BorrowMut},
    ptr::NonNull,
};

use aya::maps::{Array, MapData, MapError};
use lb_common::{ct_set_find, ct_set_hash, ct_set_victim, select_slot, CtKey, CtValue, CtWay, CT_WAYS};

use super::conntrack::CtAddr;

/// `BPF_NOEXIST`: `insert` fails on a key the table already has.
const NOEXIST: u64 = 1;

/// The table's ways mapped into memory (the array is `BPF_F_MMAPABLE`), so that a walk of all
/// of them (listing, counting, emptying) is plain loads and stores, not a system call per way:
/// hundreds of thousands of them.
struct Mapped {
    ptr: NonNull<u8>,
    bytes: usize,
    /// An array element's size: the value's, rounded up to 8 bytes (`array_map_alloc`).
    stride: usize,
    ways: usize,
}

// SAFETY: the mapping is owned by this value and only touched through `&self` or `&mut self`.
unsafe impl Send for Mapped {}

impl Mapped {
    fn new<A>(map: &MapData, ways: u32) -> Result<Self, MapError> {
        let stride = std::mem::size_of::<CtWay<A>>().next_multiple_of(8);
        let bytes = stride * ways as usize;
        let ptr = super::sys::mmap_array(map, bytes)
            .map_err(|e| MapError::SyscallError(aya::sys::SyscallError { call: "mmap", io_error: e.into() }))?;
        Ok(Self { ptr, bytes, stride, ways: ways as usize })
    }

    fn way<A>(&self, i: usize) -> *mut CtWay<A> {
        debug_assert!(i < self.ways);
        // SAFETY: in bounds of the mapping; elements are 8-byte aligned.
        unsafe { self.ptr.as_ptr().add(i * self.stride).cast() }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// An entry of a walk, or why a way could not be read.
pub type Entry<A> = Result<(CtKey<A>, CtValue<A>), MapError>;

/// One family's new-flow table.
pub struct CtNewTable<T, A>
where
    CtWay<A>: aya::Pod,
{
    ways: Array<T, CtWay<A>>,
    /// The ways in memory, when the array could be mapped.
    mapped: Option<Mapped>,
}

impl<T: Borrow<MapData>, A: CtAddr> CtNewTable<T, A>
where
    CtWay<A>: aya::Pod,
{
    /// The table, walked with a system call per way.
    pub fn new(ways: Array<T, CtWay<A>>) -> Self {
        Self { ways, mapped: None }
    }

    fn hash(k: &CtKey<A>) -> u32 {
        ct_set_hash(k.src.fold(), k.dst.fold(), k.sport, k.dport, k.proto, k.dir)
    }

    /// The index of the first way of `k`'s set, and the set's ways.
    fn set(&self, k: &CtKey<A>) -> Result<(u32, [CtWay<A>; CT_WAYS]), MapError> {
        let first = select_slot(Self::hash(k), self.ways.len() / CT_WAYS as u32) * CT_WAYS as u32;
        let mut ways = [CtWay::default(); CT_WAYS];
        for (i, w) in ways.iter_mut().enumerate() {
            *w = self.ways.get(&(first + i as u32), 0)?;
        }
        Ok((first, ways))
    }

    /// The entry of `k` (`MapError::KeyNotFound` when absent).
    pub fn get(&self, k: &CtKey<A>, _flags: u64) -> Result<CtValue<A>, MapError> {
        let (_, ways) = self.set(k)?;
        ct_set_find(|i| ways.get(i), k).map(|i| ways[i].value).ok_or(MapError::KeyNotFound)
    }

    /// Every entry; a way that cannot be read yields its error.
    pub fn iter(&self) -> Box<dyn Iterator<Item = Entry<A>> + '_> {
        if let Some(m) = &self.mapped {
            // SAFETY: a way of the mapping; volatile, as the datapath writes it meanwhile.
            let read = move |i| unsafe { m.way::<A>(i).read_volatile() };
            return Box::new((0..m.ways).map(read).filter(|w| w.key.proto != 0).map(|w| Ok((w.key, w.value))));
        }
        Box::new(self.ways.iter().filter_map(|w| match w {
            Ok(w) if w.key.proto == 0 => None,
            Ok(w) => Some(Ok((w.key, w.value))),
            Err(e) => Some(Err(e)),
        }))
    }

    /// Every key, as `iter`.
    pub fn keys(&self) -> impl Iterator<Item = Result<CtKey<A>, MapError>> + '_ {
        self.iter().map(|r| r.map(|(k, _)| k))
    }
}

impl<T: BorrowMut<MapData>, A: CtAddr> CtNewTable<T, A>
where
    CtWay<A>: aya::Pod,
{
    /// Writes `k`'s entry as the datapath would (its own way, a free one, else the less
    /// recently seen of two at `v.last_seen`; the agent has no clock here, so an expired entry
    /// counts as live). With `BPF_NOEXIST` in `flags` (the copy after a link swap, of flows the
    /// old programs made meanwhile) it writes only into a free way: never over an entry `k`
    /// already has (`EEXIST`, as a hash map's update) nor over another flow's (`ENOSPC`),
    /// which the new programs may have written since.
    pub fn insert(&mut self, k: CtKey<A>, v: CtValue<A>, flags: u64) -> Result<(), MapError> {
        let refused = |errno: nix::errno::Errno| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(errno as i32),
            })
        };
        let (first, ways) = self.set(&k)?;
        if flags & NOEXIST != 0 && ct_set_find(|i| ways.get(i), &k).is_some() {
            return Err(refused(nix::errno::Errno::EEXIST));
        }
        let (w, evicted) = ct_set_victim(|i| ways.get(i), &k, Self::hash(&k), v.last_seen, |_| false)
            .expect("every way of the set was read");
        if evicted && flags & NOEXIST != 0 {
            return Err(refused(nix::errno::Errno::ENOSPC));
        }
        self.ways.set(first + w as u32, CtWay { key: k, value: v }, 0)?;
        let pushed_out = ways[w];
        if evicted
            && pushed_out.key.proto != 0
            && pushed_out.key.dir == lb_common::CT_DIR_REPLY
            && pushed_out.value.flags & lb_common::CT_FLAG_SNAT != 0
        {
            // As the datapath's write: a SNATed flow that loses its reply entry goes whole, or
            // its SNAT port would look free to the port search while its client's packets
            // still took it (a migration into a smaller or other-shaped table pushes entries
            // out).
            let forward = lb_common::ct_forward_key(&pushed_out.key, &pushed_out.value);
            match self.remove(&forward) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Frees `k`'s way (`MapError::KeyNotFound` when absent).
    pub fn remove(&mut self, k: &CtKey<A>) -> Result<(), MapError> {
        let (first, ways) = self.set(k)?;
        ct_set_find(|i| ways.get(i), k).ok_or(MapError::KeyNotFound)?;
        // Every way holding it, as the datapath's removal.
        for (i, w) in ways.iter().enumerate().filter(|(_, w)| lb_common::ct_key_eq(&w.key, k)) {
            let mut freed = *w;
            freed.key.proto = 0;
            self.ways.set(first + i as u32, freed, 0)?;
        }
        Ok(())
    }

    /// Empties the table.
    pub fn clear(&mut self) -> Result<(), MapError> {
        if let Some(m) = &self.mapped {
            for i in 0..m.ways {
                // SAFETY: a way of the mapping, emptied as the datapath does (`proto` 0).
                unsafe { m.way::<A>(i).write_volatile(CtWay::default()) };
            }
            return Ok(());
        }
        let held: Vec<u32> =
            (0..self.ways.len()).filter(|i| self.ways.get(i, 0).is_ok_and(|w| w.key.proto != 0)).collect();
        held.into_iter().try_for_each(|i| self.ways.set(i, CtWay::default(), 0))
    }
}

/// A new-flow table of either family, as the agent's conntrack code uses it.
pub trait NewFlows<A>: Send {
    /// Removes `k`'s entry (`MapError::KeyNotFound` when absent).
    fn delete(&mut self, k: &CtKey<A>) -> Result<(), MapError>;
    /// Every entry that could be read.
    fn all(&self) -> Vec<(CtKey<A>, CtValue<A>)>;
}

impl<A: CtAddr> NewFlows<A> for CtNewTable<MapData, A>
where
    CtWay<A>: aya::Pod,
{
    fn delete(&mut self, k: &CtKey<A>) -> Result<(), MapError> {
        self.remove(k)
    }
    fn all(&self) -> Vec<(CtKey<A>, CtValue<A>)> {
        self.iter().filter_map(Result::ok).collect()
    }
}

impl<A: CtAddr> CtNewTable<MapData, A>
where
    CtWay<A>: aya::Pod,
{
    /// The table of a loaded or pinned map, walked through a mapping of it if it can be
    /// mapped, else a way at a time.
    pub fn from_map(map: aya::maps::Map) -> Result<Self, MapError> {
        let mapped = match &map {
            aya::maps::Map::Array(d) => d
                .info()
                .and_then(|info| Mapped::new::<A>(d, info.max_entries()))
                .inspect_err(|e| tracing::debug!(error = %e, "new-flow table not mapped; walked a way at a time"))
                .ok(),
            _ => None,
        };
        Ok(Self { ways: Array::try_from(map)?, mapped })
    }
}
