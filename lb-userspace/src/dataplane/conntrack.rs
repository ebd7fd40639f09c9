//! The conntrack tables from the agent's side: reading both tables of a family as one,
//! collecting assured flows that went idle, and carrying flows over from the conntrack map of
//! layout version 4.
//!
//! The datapath keeps live connections in `LB_CT4` (IPv6: `LB_CT6`), which never evicts, and
//! new and finished ones in `LB_CT4_NEW`, an array of ways (`LB_CT6_NEW` alike: see
//! `lb-ebpf/src/ct_table.rs` and `ct_new.rs`); the two families share the code here, generic
//! over the address type. Only the assured table needs collecting: a new flow takes a free or
//! expired entry's room in the new-flow tables, or pushes out an unassured one, by itself. An assured flow is removed when both of its
//! entries have been idle past their state's lifetime (a one-way stream refreshes only one),
//! as netfilter's garbage collection removes expired conntracks.
use std::{
    hash::Hash,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{ct_peer, CtKey, CtKey4, CtValue, CtValue4, CT_STATES, MAP_CT4, MAP_CT4_NEW, MAP_CT6, MAP_CT6_NEW};

use super::{
    clock::Clock,
    ct_new::{CtNewTable, NewFlows},
    maps::map_err,
    Result,
};

/// A conntrack address: `u32` in the IPv4 tables, `[u32; 4]` in the IPv6 ones, network order.
pub trait CtAddr: Copy + Default + Eq + Hash + Send + 'static {
    /// The family's new-flow table.
    type New: NewFlows<Self>;
    fn ip(self) -> IpAddr;
    /// 32 bits of the address for the new-flow table's set index, as the datapath folds it.
    fn fold(self) -> u32;
    /// The family's new-flow table, typed.
    fn new_table(map: Map, name: &'static str) -> Result<Self::New>;
}

impl CtAddr for u32 {
    type New = CtNewTable<MapData, u32>;
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self.to_ne_bytes()).into()
    }
    fn fold(self) -> u32 {
        self
    }
    fn new_table(map: Map, name: &'static str) -> Result<Self::New> {
        CtNewTable::from_map(map).map_err(map_err(name))
    }
}

impl CtAddr for [u32; 4] {
    type New = CtNewTable<MapData, [u32; 4]>;
    fn ip(self) -> IpAddr {
        super::maps::ip_of(lb_common::FAMILY_IPV6, self)
    }
    fn fold(self) -> u32 {
        lb_common::fold_v6(self)
    }
    fn new_table(map: Map, name: &'static str) -> Result<Self::New> {
        CtNewTable::from_map(map).map_err(map_err(name))
    }
}

/// The assured table of one family.
pub type CtTable<A> = HashMap<MapData, CtKey<A>, CtValue<A>>;

/// Both tables of one family, typed.
pub struct CtPair<A: CtAddr>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    pub assured: CtTable<A>,
    pub new: A::New,
}

/// Both tables of both families: `LB_CT4`/`LB_CT4_NEW` and `LB_CT6`/`LB_CT6_NEW`.
pub struct CtTables {
    pub v4: CtPair<u32>,
    pub v6: CtPair<[u32; 4]>,
}

/// A conntrack entry, and whether it is in the assured table.
pub type CtEntry<A = u32> = (CtKey<A>, CtValue<A>, bool);

fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn open<A>(pin_dir: &Path, name: &'static str) -> Result<CtTable<A>>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    HashMap::try_from(open_map(pin_dir, name)?).map_err(map_err(name))
}

fn open_new<A: CtAddr>(pin_dir: &Path, name: &'static str) -> Result<A::New> {
    A::new_table(open_map(pin_dir, name)?, name)
}

impl CtTables {
    /// Handles of their own on the pinned tables, for work on another thread.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            v4: CtPair { assured: open(pin_dir, MAP_CT4)?, new: open_new::<u32>(pin_dir, MAP_CT4_NEW)? },
            v6: CtPair { assured: open(pin_dir, MAP_CT6)?, new: open_new::<[u32; 4]>(pin_dir, MAP_CT6_NEW)? },
        })
    }
}

/// Every entry of both tables of a family. A flow is in one table at a time; should a key be
/// in both (a packet racing a move on another CPU), the assured entry is the one lookups find.
pub fn entries<A: CtAddr>(assured: &CtTable<A>, new: &A::New) -> Vec<CtEntry<A>>
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let mut out: Vec<CtEntry<A>> =
        assured.iter().filter_map(std::result::Result::ok).map(|(k, v)| (k, v, true)).collect();
    let live: std::collections::HashSet<CtKey<A>> = out.iter().map(|(k, _, _)| *k).collect();
    out.extend(new.all().into_iter().filter(|(k, _)| !live.contains(k)).map(|(k, v)| (k, v, false)));
    out
}

/// Removes a flow, both entries, from both tables of its family.
pub fn remove_flow<A: CtAddr>(tables: &mut CtPair<A>, k: &CtKey<A>, v: &CtValue<A>) -> bool
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let (pk, _) = ct_peer(k, v);
    let mut removed = tables.assured.remove(k).is_ok();
    let _ = tables.assured.remove(&pk);
    removed |= tables.new.delete(k).is_ok();
    let _ = tables.new.delete(&pk);
    removed
}

/// Whether an entry is idle past its state's lifetime at `now` (jiffies). An entry seen after
/// `now` is fresh: `now` is read before a walk that takes a while, and the datapath keeps
/// refreshing entries meanwhile (wrapping, it would look 2^32 jiffies old and a busy flow
/// would be collected).
pub fn expired<A>(v: &CtValue<A>, now: u32, timeouts: &[u32; CT_STATES]) -> bool {
    let idle = now.wrapping_sub(v.last_seen);
    (idle as i32) >= 0 && idle > timeouts.get(v.state as usize).copied().unwrap_or(0)
}

/// One pass over the assured table of a family: removes the flows whose entries are both
/// expired. Returns (flows removed, entries left).
/// `on_walk` sees every entry the walk read, and whether it read the whole table (IPv4's
/// restamp `LB_CT4_LIVE` with them, both families).
pub fn collect<A: CtAddr>(
    tables: &mut CtPair<A>,
    now: u32,
    timeouts: &[u32; CT_STATES],
    on_walk: impl FnOnce(&[(CtKey<A>, CtValue<A>)], bool),
) -> (usize, usize)
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let (all, whole) = walk(&tables.assured);
    on_walk(&all, whole);
    let idle = idle_of(&all, now, timeouts);
    let removed = remove_idle(tables, &idle, now, timeouts);
    (removed, all.len().saturating_sub(2 * removed))
}

/// Every entry of an assured table, and whether the walk read it whole: an entry deleted
/// under it is skipped (aya's iterator passes over a key gone by its lookup), any other error
/// ends or gaps the walk.
pub fn walk<A: CtAddr>(assured: &CtTable<A>) -> (CtEntries<A>, bool)
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let mut whole = true;
    let all = assured.iter().filter_map(|e| e.map_err(|_| whole = false).ok()).collect();
    (all, whole)
}

/// Entries of a table, read by a walk.
pub type CtEntries<A> = Vec<(CtKey<A>, CtValue<A>)>;

/// An entry of the assured table the walk found idle, with its flow's other entry (`None`
/// for a reply entry whose forward entry is gone).
pub type Idle<A> = (CtKey<A>, Option<CtKey<A>>);

/// The walk of `collect`: the flows whose entries were both expired at `now` when it read
/// them (forward keys with their peers), and reply entries expired without their forward
/// entry (a crash between two writes). Also returns how many entries it read.
pub fn idle_flows<A: CtAddr>(assured: &CtTable<A>, now: u32, timeouts: &[u32; CT_STATES]) -> (Vec<Idle<A>>, usize)
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let (all, _) = walk(assured);
    (idle_of(&all, now, timeouts), all.len())
}

fn idle_of<A: CtAddr>(all: &[(CtKey<A>, CtValue<A>)], now: u32, timeouts: &[u32; CT_STATES]) -> Vec<Idle<A>>
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let by_key: std::collections::HashMap<CtKey<A>, CtValue<A>> = all.iter().copied().collect();
    let mut idle = Vec::new();
    for (k, v) in all {
        if !expired(v, now, timeouts) {
            continue;
        }
        let (pk, _) = ct_peer(k, v);
        if k.dir == lb_common::CT_DIR_FORWARD {
            if by_key.get(&pk).is_none_or(|p| expired(p, now, timeouts)) {
                idle.push((*k, Some(pk)));
            }
        } else if !by_key.contains_key(&pk) {
            idle.push((*k, None));
        }
    }
    idle
}

/// Removes what the walk found idle, each entry only if it still is. The walk of a large
/// table takes a while, and the datapath does not stop meanwhile: a packet that finds an
/// expired entry forgets it and starts its flow anew under the same keys, and a flow that
/// completes its handshake is written back into the assured table, fresh. So every entry is
/// read again just before it is deleted: gone or still expired at `now`, it goes; re-created
/// (seen at or after `now`), the flow stays. A peer key that now holds another flow's entry
/// (its SNAT port taken by a new flow) is that flow's, and stays. Returns the flows removed.
pub fn remove_idle<A: CtAddr>(tables: &mut CtPair<A>, idle: &[Idle<A>], now: u32, timeouts: &[u32; CT_STATES]) -> usize
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let mut removed = 0;
    for (k, pk) in idle {
        // None: a read that failed for another reason than absence; nothing is deleted then.
        let read = |t: &CtTable<A>, key: &CtKey<A>| match t.get(key, 0) {
            Ok(v) => Some(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Some(None),
            Err(_) => None,
        };
        let Some(Some(v)) = read(&tables.assured, k) else { continue };
        if !expired(&v, now, timeouts) {
            continue;
        }
        let Some(pk) = pk else {
            let _ = tables.assured.remove(k);
            continue;
        };
        match read(&tables.assured, pk) {
            None => continue,
            Some(Some(pv)) if ct_peer(pk, &pv).0 == *k => {
                if !expired(&pv, now, timeouts) {
                    continue;
                }
                let _ = tables.assured.remove(pk);
            }
            // Gone, or another flow's entry now.
            Some(_) => {}
        }
        if tables.assured.remove(k).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Collection runs at least this often, and as often as `GC_MIN` while it finds much to do or
/// the table fills, as Cilium's conntrack GC adapts its interval.
const GC_MAX: Duration = Duration::from_secs(30);
const GC_MIN: Duration = Duration::from_secs(1);

/// Collects idle assured flows on a thread of its own (a walk costs a syscall per entry),
/// until `stop` is set. `collected` counts the flows removed.
pub fn spawn_collector(
    pin_dir: &Path,
    clock: Arc<Clock>,
    timeouts: [u32; CT_STATES],
    capacity: u32,
    collected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    live: Arc<super::live::LiveStamps>,
) -> Result<()> {
    let mut tables = CtTables::open_pinned(pin_dir)?;
    let spawned = std::thread::Builder::new().name("lb-ct-gc".into()).spawn(move || {
        let mut interval = GC_MAX / 4;
        while !stop.load(Ordering::Relaxed) {
            let mut slept = Duration::ZERO;
            while slept < interval && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                slept += Duration::from_millis(100);
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(now) = clock.jiffies() else { continue };
            // Each family's assured table has the capacity; the busier one sets the pace.
            // The walk begins after the generation turns (`lb-ebpf/src/ct_live.rs`); until the
            // agent allows passes (`Dataplane::restamp_live_flows`) every key counts and none
            // is turned.
            // One pass walks both families' tables: their stamps share the map.
            let pass = live.allowed().then(|| live.begin());
            let (mut whole4, mut whole6) = (true, true);
            let (r4, left4) = collect(&mut tables.v4, now, &timeouts, |all, read_whole| {
                whole4 = read_whole;
                if let Some(p) = &pass {
                    all.iter().for_each(|(k, _)| p.stamp(k));
                }
            });
            let (r6, left6) = collect(&mut tables.v6, now, &timeouts, |all, read_whole| {
                whole6 = read_whole;
                if let Some(p) = &pass {
                    all.iter().for_each(|(k, _)| p.stamp(k));
                }
            });
            if let Some(p) = pass {
                p.end(whole4 && whole6);
            }
            let removed = r4 + r6;
            collected.fetch_add(removed as u64, Ordering::Relaxed);
            if removed > 0 {
                tracing::debug!(
                    flows = removed,
                    ipv4_entries = left4,
                    ipv6_entries = left6,
                    "collected idle conntrack flows"
                );
            }
            let busy = |removed: usize, left: usize| removed * 2 * 10 > left || left as u64 * 4 > capacity as u64 * 3;
            let busy = busy(r4, left4) || busy(r6, left6);
            interval = if busy { (interval / 2).max(GC_MIN) } else { (interval * 2).min(GC_MAX) };
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the conntrack collector; idle assured flows stay until the table fills");
    }
    Ok(())
}

/// Layout version 4 and before: one LRU map of both directions with 16-byte addresses, times
/// in `bpf_ktime_get_ns`. Kept to carry a running node's flows over on upgrade.
pub mod legacy {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct CtKey {
        pub src: [u32; 4],
        pub dst: [u32; 4],
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub family: u8,
        pub dir: u8,
        pub _pad: u8,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct CtValue {
        pub nat_addr: [u32; 4],
        pub snat_addr: [u32; 4],
        pub nat_port: u16,
        pub snat_port: u16,
        pub flags: u8,
        pub family: u8,
        pub _pad: u16,
        pub service_id: u32,
        pub _pad2: u32,
        pub expires_ns: u64,
        pub created_ns: u64,
    }

    pub const FLAG_CLOSING: u8 = 1 << 0;
    pub const FLAG_REPLIED: u8 = 1 << 1;
    pub const FLAG_SNAT: u8 = 1 << 2;
    pub const FLAG_ROUTE: u8 = 1 << 3;

    // SAFETY: repr(C), Copy, integers only, explicit padding.
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    const _: () = assert!(std::mem::size_of::<CtKey>() == 40 && std::mem::size_of::<CtValue>() == 64);
}

/// CLOCK_MONOTONIC in nanoseconds: `bpf_ktime_get_ns`, the legacy entries' clock.
fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; zero (as the libc call left its timespec) if it did.
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The flow a live legacy forward entry describes, in this layout: its forward entry (the
/// reply entry follows from it). What the old flags say of the TCP state: a closing flow is
/// finished (TIME_WAIT), an answered one established, else its SYN was sent.
pub fn convert_legacy(
    k: &legacy::CtKey,
    v: &legacy::CtValue,
    clock: &Clock,
    now_j: u32,
    now_ns: u64,
) -> Option<(CtKey4, CtValue4)> {
    use lb_common::*;
    if k.dir != CT_DIR_FORWARD || k.family != FAMILY_IPV4 || v.expires_ns <= now_ns {
        return None;
    }
    let replied = v.flags & legacy::FLAG_REPLIED != 0;
    let state = match (k.proto, v.flags & legacy::FLAG_CLOSING != 0) {
        (PROTO_TCP, true) => CT_TIME_WAIT,
        (PROTO_TCP, false) if replied => CT_ESTABLISHED,
        (PROTO_TCP, false) => CT_SYN_SENT,
        _ => CT_UDP,
    };
    let mut flags = 0;
    for (old, new) in [
        (legacy::FLAG_SNAT, CT_FLAG_SNAT),
        (legacy::FLAG_ROUTE, CT_FLAG_ROUTE),
        (legacy::FLAG_REPLIED, CT_FLAG_REPLIED),
    ] {
        if v.flags & old != 0 {
            flags |= new;
        }
    }
    // A forward entry kept its reply's ROUTE bit in `_pad`.
    if v._pad as u8 & legacy::FLAG_ROUTE != 0 {
        flags |= CT_FLAG_PEER_ROUTE;
    }
    // Carried-over flows are assured when answered: they were established before the upgrade.
    if ct_assured(state, flags, true) {
        flags |= CT_FLAG_ASSURED;
    }
    let age_s = now_ns.saturating_sub(v.created_ns) / 1_000_000_000;
    let key = CtKey4 {
        src: k.src[0],
        dst: k.dst[0],
        sport: k.sport,
        dport: k.dport,
        proto: k.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let value = CtValue4 {
        nat_addr: v.nat_addr[0],
        snat_addr: v.snat_addr[0],
        nat_port: v.nat_port,
        snat_port: v.snat_port,
        state,
        flags,
        // Untagged, as every entry userspace writes: any key's state change is admitted
        // (`lb_common::CtValue::tag`).
        tag: 0,
        service_id: v.service_id,
        last_seen: now_j,
        created: now_j.wrapping_sub(clock.to_jiffies(age_s)),
    };
    Some((key, value))
}

/// Copies the live flows of a legacy conntrack map into the tables (both entries each).
/// With `only_new`, flows the tables already hold are kept (the new programs made them).
/// Returns how many flows were written.
pub fn carry_over_legacy(old: &Map, tables: &mut CtTables, clock: &Clock, only_new: bool) -> Result<usize> {
    let name = lb_common::MAP_CONNTRACK_V4;
    let src: HashMap<&MapData, legacy::CtKey, legacy::CtValue> = HashMap::try_from(old).map_err(map_err(name))?;
    let now_j = clock.jiffies().map_err(super::DataplaneError::Clock)?;
    let now_ns = monotonic_ns();
    let flags = if only_new {
        1 /* BPF_NOEXIST */
    } else {
        0
    };
    let mut n = 0;
    for (k, v) in src.iter().filter_map(std::result::Result::ok) {
        let Some((fk, fv)) = convert_legacy(&k, &v, clock, now_j, now_ns) else { continue };
        let (pk, pv) = ct_peer(&fk, &fv);
        let written = if fv.flags & lb_common::CT_FLAG_ASSURED != 0 {
            let t = &mut tables.v4.assured;
            t.insert(fk, fv, flags).is_ok() && t.insert(pk, pv, flags).is_ok()
        } else {
            let t = &mut tables.v4.new;
            t.insert(fk, fv, flags).is_ok() && t.insert(pk, pv, flags).is_ok()
        };
        if written {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::*;

    #[test]
    fn legacy_flows_keep_their_translation_and_get_a_state() {
        let k = legacy::CtKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 10,
            dport: 80,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let v = legacy::CtValue {
            nat_addr: [3, 0, 0, 0],
            snat_addr: [4, 0, 0, 0],
            nat_port: 8080,
            snat_port: 61000,
            flags: legacy::FLAG_REPLIED | legacy::FLAG_SNAT | legacy::FLAG_ROUTE,
            _pad: legacy::FLAG_ROUTE as u16,
            expires_ns: 10_000_000_000,
            created_ns: 1_000_000_000,
            ..Default::default()
        };
        // A clock whose HZ is known, without the kernel: only conversions are used.
        let now_ns = 5_000_000_000;
        let hz = 250;
        let to_j = |s: u64| (s * hz) as u32;
        let (fk, fv) = convert_with(&k, &v, hz as u32, 100_000, now_ns).unwrap();
        assert_eq!((fk.src, fk.dst, fk.sport, fk.dport), (1, 2, 10, 80));
        assert_eq!((fv.nat_addr, fv.nat_port, fv.snat_addr, fv.snat_port), (3, 8080, 4, 61000));
        assert_eq!(fv.state, CT_ESTABLISHED);
        assert_eq!(fv.flags, CT_FLAG_SNAT | CT_FLAG_ROUTE | CT_FLAG_REPLIED | CT_FLAG_PEER_ROUTE | CT_FLAG_ASSURED);
        assert_eq!(fv.created, 100_000 - to_j(4));
        let (pk, pv) = ct_peer(&fk, &fv);
        assert_eq!((pk.src, pk.dst, pk.sport, pk.dport, pk.dir), (3, 4, 8080, 61000, CT_DIR_REPLY));
        assert_eq!((pv.nat_addr, pv.nat_port, pv.snat_addr, pv.snat_port), (2, 80, 1, 10));
        assert_eq!(pv.flags & (CT_FLAG_ROUTE | CT_FLAG_PEER_ROUTE), CT_FLAG_ROUTE | CT_FLAG_PEER_ROUTE);
        // Expired, reply-direction and closing entries.
        assert!(convert_with(&k, &legacy::CtValue { expires_ns: 1, ..v }, 250, 0, now_ns).is_none());
        assert!(convert_with(&legacy::CtKey { dir: CT_DIR_REPLY, ..k }, &v, 250, 0, now_ns).is_none());
        let closing = convert_with(&k, &legacy::CtValue { flags: legacy::FLAG_CLOSING, ..v }, 250, 0, now_ns).unwrap();
        assert_eq!((closing.1.state, closing.1.flags & CT_FLAG_ASSURED), (CT_TIME_WAIT, 0));
    }

    fn convert_with(
        k: &legacy::CtKey,
        v: &legacy::CtValue,
        hz: u32,
        now_j: u32,
        now_ns: u64,
    ) -> Option<(CtKey4, CtValue4)> {
        convert_legacy(k, v, &Clock::fixed(hz), now_j, now_ns)
    }

    #[test]
    fn a_flow_is_collected_only_when_both_entries_are_idle() {
        let timeouts = [100; CT_STATES];
        let v = CtValue4 { last_seen: 0, state: CT_ESTABLISHED, ..Default::default() };
        assert!(!expired(&v, 100, &timeouts));
        assert!(expired(&v, 101, &timeouts));
        // Wrapping clock.
        let v = CtValue4 { last_seen: u32::MAX - 10, ..v };
        assert!(!expired(&v, 50, &timeouts));
        assert!(expired(&v, 90, &timeouts));
        // Refreshed by the datapath after the collector read the clock.
        let v = CtValue4 { last_seen: 1_000, ..v };
        assert!(!expired(&v, 999, &timeouts));
        assert!(!expired(&v, 990, &timeouts));
    }
}
