//! Desired state written to the maps as a difference: only frontends that changed are touched,
//! a new backend set is flipped in with one service entry update, and replaced slot
//! generations wait out a grace period before they go.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    AffinityKey, BackendSlotKey, CtKey, CtValue, MAP_BACKEND_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK, MAP_PORTS,
    MAP_SERVICES, MAP_SOURCE_RANGES, PORT_BACKEND, PORT_FRONTEND,
};

use super::{
    maps::{backend_value, encode_name, insert_err, member_key, service_key, service_value, source_range_key},
    stale_udp::{sweep_stale_udp, StaleUdp},
    sys::error_chain,
    Dataplane, DataplaneError, Result,
};
use crate::model::{Cidr, DesiredState, Endpoint, Frontend, Protocol, ServicePort};

/// What is in the maps for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Programmed {
    pub(super) id: u32,
    pub(super) generation: u16,
    pub(super) port: ServicePort,
}

/// How long a replaced slot generation stays in the map after the service entry stopped
/// pointing at it. A packet copies the service entry and then looks its slot up; one that read
/// the entry just before the flip must still find the old generation (else `DropSlotMissing`).
/// A program run lasts microseconds (no sleeping, no preemption inside it), so this is ample;
/// kube-proxy's nftables proxier likewise removes stale chains a sync later.
pub const SLOT_GRACE: Duration = Duration::from_secs(2);

/// A slot generation retired by a flip or a frontend's removal, deleted after `SLOT_GRACE`.
#[derive(Clone, Debug)]
pub(super) struct Retired {
    id: u32,
    generation: u16,
    count: usize,
    since: Instant,
    /// The frontend was removed: its id is handed out again only once these slots are gone
    /// (a reused id starts again at generation 0, which these may be), and after its affinity
    /// pins are dropped, including any a packet in flight wrote after the removal.
    release_id: bool,
    /// The flip away from this generation wrapped the counter (65535 -> 0): pins a packet in
    /// flight still wrote with this generation would, 65,536 changes later, pass as current.
    wrapped: bool,
}

/// What one `apply` changed.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// The node's own connected UDP sockets whose backend left, aborted.
    pub stale_udp_sockets: usize,
    pub errors: Vec<DataplaneError>,
}

impl Dataplane {
    /// Removes the session-affinity pins of the service ids `doomed` selects; returns how many.
    pub(super) fn purge_affinity(&mut self, doomed: impl Fn(u32) -> bool) -> usize {
        let keys: Vec<AffinityKey> =
            self.maps.affinity.keys().filter_map(std::result::Result::ok).filter(|k| doomed(k.service_id)).collect();
        keys.iter().filter(|k| self.maps.affinity.remove(k).is_ok()).count()
    }

    /// Lowest unused id: ids of removed frontends are reused first, so ids stay dense. Its
    /// traffic counters start from zero, so a reused id does not inherit another frontend's.
    fn next_free_id(&mut self) -> u32 {
        // Ids index the per-service counters (one slot per possible frontend): rather than
        // grow past them while removed frontends' ids wait out their slots' grace, take those
        // back early.
        if self.free_ids.is_empty() && self.next_id > self.sizes.services && self.retired.iter().any(|r| r.release_id) {
            tracing::warn!("service ids up to the services map's capacity in use: releasing removed frontends' ids before their grace period");
            self.collect_retired_at(Instant::now() + SLOT_GRACE);
        }
        let id = match self.free_ids.pop_first() {
            Some(id) => id,
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        if let Ok(cpus) = aya::util::nr_cpus() {
            if let Ok(zero) = aya::maps::PerCpuValues::try_from(vec![lb_common::ServiceStats::default(); cpus]) {
                let _ = self.maps.service_stats.set(id, zero, 0);
            }
        }
        id
    }

    /// Makes the maps match `desired`, touching only frontends that changed. Per-frontend
    /// failures are reported and do not stop the others.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.collect_retired();
        // Port flags first: the datapath must not skip a frontend that is about to exist.
        self.update_ports(desired.services.iter(), false, &mut report);
        let gone: Vec<Frontend> =
            self.programmed.keys().filter(|f| !desired.services.contains_key(f)).copied().collect();
        // Service id -> backends whose UDP flows must go (`None`: every flow of the frontend).
        let mut stale_udp: StaleUdp = StdHashMap::new();
        // The same departures, by frontend, for the node's own connected sockets.
        let mut stale_socks: Vec<(Frontend, BTreeSet<Endpoint>)> = Vec::new();
        for f in gone {
            let p = self.programmed.remove(&f).expect("listed above");
            if f.protocol == Protocol::Udp {
                stale_udp.insert(p.id, None);
                stale_socks.push((f, p.port.backends.iter().copied().collect()));
            }
            // Service entry first, so no new flow can pick a slot we are about to delete. The
            // slots go after the grace, for packets that read the entry just before; the id is
            // free again (its affinity pins dropped) only then.
            let _ = self.maps.services.remove(&service_key(&f));
            self.retire(p.id, p.generation, p.port.backends.len(), true, false);
            self.remove_members(p.id, &p.port.backends, &[]);
            self.remove_ranges(p.id, &p.port.source_ranges, &[]);
            let _ = self.maps.names.remove(&p.id);
            tracing::info!(frontend = %f, service = %p.port.name, "service removed");
            report.removed += 1;
        }
        for (f, want) in &desired.services {
            let old = self.programmed.get(f).cloned();
            let next = match &old {
                Some(p) if p.port == *want => {
                    report.unchanged += 1;
                    continue;
                }
                // Same backends: keep the generation, so affinity pins stay valid without a
                // membership lookup and no slot is rewritten.
                Some(p) if p.port.backends == want.backends => {
                    Programmed { id: p.id, generation: p.generation, port: want.clone() }
                }
                Some(p) => Programmed { id: p.id, generation: p.generation.wrapping_add(1), port: want.clone() },
                None => Programmed { id: self.next_free_id(), generation: 0, port: want.clone() },
            };
            if old.as_ref().is_some_and(|p| p.generation != next.generation) {
                // A generation still in its grace that the counter came back to is rewritten
                // now: its later deletion must not hit the live slots.
                self.drop_retired(next.id, next.generation);
                if next.generation == 0 {
                    // Wrapped: a pin is trusted without a membership check while its generation
                    // equals the service's, and pins of 65,536 changes ago may hold this one.
                    let n = self.purge_affinity(|id| id == next.id);
                    tracing::info!(frontend = %f, pins = n, "slot generation wrapped; affinity pins of the frontend dropped");
                }
            }
            let mut written = self.write_service(f, &next, old.as_ref());
            if matches!(written, Err(DataplaneError::MapFull { name: MAP_BACKEND_SLOTS, .. }))
                && !self.retired.is_empty()
            {
                // Retired generations count against the capacity: under that pressure they go
                // before their grace (a packet in flight may then drop) rather than leave the
                // frontend unprogrammed.
                tracing::warn!(
                    retired_slots = self.retired_slots(),
                    "backend slots map full: deleting replaced slot generations before their grace period"
                );
                self.collect_retired_at(Instant::now() + SLOT_GRACE);
                written = self.write_service(f, &next, old.as_ref());
            }
            match written {
                Ok(()) => {
                    if let Some(old) = old.as_ref().filter(|_| f.protocol == Protocol::Udp) {
                        let left: BTreeSet<Endpoint> =
                            old.port.backends.iter().filter(|b| !next.port.backends.contains(b)).copied().collect();
                        if !left.is_empty() {
                            stale_socks.push((*f, left.clone()));
                            stale_udp.insert(next.id, Some(left));
                        }
                    }
                    tracing::info!(
                        frontend = %f,
                        service = %next.port.name,
                        backends = next.port.backends.len(),
                        affinity_timeout_s = ?next.port.affinity_timeout_s,
                        local_only = next.port.local_only,
                        source_ranges = next.port.source_ranges.len(),
                        "service {}", if old.is_some() { "updated" } else { "added" }
                    );
                    if old.is_some() {
                        report.updated += 1;
                    } else {
                        report.added += 1;
                    }
                    self.programmed.insert(*f, next);
                }
                Err(e) => {
                    if old.is_none() {
                        self.free_ids.insert(next.id);
                    }
                    report.errors.push(e)
                }
            }
        }
        let programmed: Vec<(Frontend, ServicePort)> =
            self.programmed.iter().map(|(f, p)| (*f, p.port.clone())).collect();
        self.update_ports(programmed.iter().map(|(f, sp)| (f, sp)), true, &mut report);
        // After the flips: no new flow can pick a departed backend while we sweep.
        if !stale_udp.is_empty() {
            let counter = self.stale_udp_removed.clone();
            let handle = MapData::from_pin(self.pin_dir.join(MAP_CONNTRACK))
                .and_then(Map::from_map_data)
                .and_then(HashMap::<MapData, CtKey, CtValue>::try_from);
            match handle {
                Ok(mut ct) => {
                    let spawned = std::thread::Builder::new()
                        .name("lb-udp-sweep".into())
                        .spawn(move || sweep_stale_udp(&mut ct, &stale_udp, &counter));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start the stale UDP flow sweep");
                    }
                }
                // Without a second handle, sweep here: later than never.
                Err(_) => sweep_stale_udp(&mut self.maps.conntrack, &stale_udp, &counter),
            }
        }
        if !stale_socks.is_empty() {
            match self.close_stale_udp_sockets(&stale_socks) {
                Ok(0) => {}
                Ok(n) => {
                    report.stale_udp_sockets = n;
                    tracing::info!(sockets = n, "aborted this node's connected UDP sockets to departed backends");
                }
                Err(e) => tracing::warn!(error = %e, "cannot abort connected UDP sockets to departed backends"),
            }
        }
        report
    }

    /// Sets the `LB_PORTS` flags the given frontends need. With `clear`, also clears the
    /// frontend flag of ports no longer in use. Backend flags are never cleared: a connection to
    /// a backend that left may live on for hours, and its replies must still be translated; a
    /// stale flag only costs one conntrack lookup.
    fn update_ports<'a>(
        &mut self,
        frontends: impl Iterator<Item = (&'a Frontend, &'a ServicePort)>,
        clear: bool,
        report: &mut ApplyReport,
    ) {
        let mut want = vec![0u8; 65_536];
        for (f, sp) in frontends {
            want[f.port as usize] |= PORT_FRONTEND;
            for b in &sp.backends {
                want[b.port as usize] |= PORT_BACKEND;
            }
        }
        for (port, &flags) in want.iter().enumerate() {
            let have = self.port_flags[port];
            let next = if clear { (have & PORT_BACKEND) | flags } else { have | flags };
            if next != have {
                match self.maps.ports.set(port as u32, next, 0) {
                    Ok(()) => self.port_flags[port] = next,
                    Err(e) => report.errors.push(DataplaneError::Map { name: MAP_PORTS, source: e }),
                }
            }
        }
    }

    /// Writes `next` for frontend `f` over `prev` (`None` for a new frontend).
    ///
    /// What the flipped service entry will point at is written first: a new slot generation
    /// (only if the backends changed), memberships, source ranges. Then the service entry is
    /// replaced in one update, so the datapath sees the old state or the new one, never a mix;
    /// what only the old state used is removed afterwards. On failure whatever was written for
    /// `next` is removed again and `prev` stays intact.
    fn write_service(&mut self, f: &Frontend, next: &Programmed, prev: Option<&Programmed>) -> Result<()> {
        let sizes = self.sizes;
        let what = |x: &dyn std::fmt::Display| format!("{x} of {} ({f})", next.port.name);
        let empty = ServicePort::default();
        let prev_port = prev.map_or(&empty, |p| &p.port);
        let new_generation = prev.is_none_or(|p| p.generation != next.generation);
        let mut written = Ok(());
        let mut slots_written = 0;
        if new_generation {
            for (slot, b) in next.port.backends.iter().enumerate() {
                let key = BackendSlotKey { service_id: next.id, generation: next.generation, slot: slot as u16 };
                written = self
                    .maps
                    .slots
                    .insert(key, backend_value(b), 0)
                    .map_err(insert_err(sizes, MAP_BACKEND_SLOTS, what(&format!("backend {b}"))))
                    .and_then(|()| {
                        self.maps.members.insert(member_key(next.id, b), slot as u32, 0).map_err(insert_err(
                            sizes,
                            MAP_BACKEND_MEMBERS,
                            what(&format!("backend {b}")),
                        ))
                    });
                slots_written = slot + 1;
                if written.is_err() {
                    break;
                }
            }
        }
        let mut ranges_written = 0;
        if written.is_ok() {
            for c in &next.port.source_ranges {
                written = self.maps.source_ranges.insert(&source_range_key(next.id, c), 1, 0).map_err(insert_err(
                    sizes,
                    MAP_SOURCE_RANGES,
                    what(&format!("source range {c}")),
                ));
                if written.is_err() {
                    break;
                }
                ranges_written += 1;
            }
        }
        let written = written.and_then(|()| {
            self.maps
                .services
                .insert(service_key(f), service_value(next.id, next.generation, &next.port), 0)
                .map_err(insert_err(sizes, MAP_SERVICES, what(&"frontend")))
        });
        if let Err(e) = written {
            if new_generation {
                self.remove_slots(next.id, next.generation, slots_written);
                self.remove_members(next.id, &next.port.backends[..slots_written], &prev_port.backends);
            }
            self.remove_ranges(next.id, &next.port.source_ranges[..ranges_written], &prev_port.source_ranges);
            return Err(e);
        }
        if let Some(p) = prev {
            if new_generation {
                // Packets that copied the old entry a moment ago still look these up.
                self.retire(p.id, p.generation, p.port.backends.len(), false, p.generation == u16::MAX);
                self.remove_members(p.id, &p.port.backends, &next.port.backends);
            }
            self.remove_ranges(p.id, &p.port.source_ranges, &next.port.source_ranges);
        }
        // The name only serves `lb list`: failing to store it must not fail the service.
        if let Err(e) = self.maps.names.insert(next.id, encode_name(&next.port.name), 0) {
            tracing::warn!(service = %next.port.name, error = %error_chain(&e), "could not store the service name for lb list");
        }
        Ok(())
    }

    /// Queues slot generation `generation` of `id` for deletion after `SLOT_GRACE`.
    fn retire(&mut self, id: u32, generation: u16, count: usize, release_id: bool, wrapped: bool) {
        if count == 0 && !release_id && !wrapped {
            return;
        }
        self.retired.push_back(Retired { id, generation, count, since: Instant::now(), release_id, wrapped });
    }

    /// Deletes a retired generation at once, because it is about to be written again.
    fn drop_retired(&mut self, id: u32, generation: u16) {
        let hits: Vec<usize> = (0..self.retired.len())
            .rev()
            .filter(|&i| {
                self.retired[i].id == id && self.retired[i].generation == generation && !self.retired[i].release_id
            })
            .collect();
        for i in hits {
            if let Some(r) = self.retired.remove(i) {
                self.remove_slots(r.id, r.generation, r.count);
            }
        }
    }

    /// Backend slots held by retired generations (they count against the map's capacity).
    pub fn retired_slots(&self) -> usize {
        self.retired.iter().map(|r| r.count).sum()
    }

    /// Deletes the retired slot generations whose grace has passed; returns how many slots.
    /// The agent calls it on every tick, and `apply` first thing.
    pub fn collect_retired(&mut self) -> usize {
        self.collect_retired_at(Instant::now())
    }

    /// `collect_retired` as if it were `now` (a later instant deletes more).
    pub fn collect_retired_at(&mut self, now: Instant) -> usize {
        let mut slots = 0;
        let mut released = BTreeSet::new();
        let mut wrapped = BTreeSet::new();
        while self.retired.front().is_some_and(|r| now.saturating_duration_since(r.since) >= SLOT_GRACE) {
            let r = self.retired.pop_front().expect("checked");
            self.remove_slots(r.id, r.generation, r.count);
            slots += r.count;
            if r.release_id {
                released.insert(r.id);
            }
            if r.wrapped {
                wrapped.insert((r.id, r.generation));
            }
        }
        if !released.is_empty() || !wrapped.is_empty() {
            let doomed: Vec<AffinityKey> = self
                .maps
                .affinity
                .iter()
                .filter_map(std::result::Result::ok)
                .filter(|(k, v)| released.contains(&k.service_id) || wrapped.contains(&(k.service_id, v.generation)))
                .map(|(k, _)| k)
                .collect();
            for k in &doomed {
                let _ = self.maps.affinity.remove(k);
            }
            // Only now may a new frontend get these ids (and generation 0 again).
            self.free_ids.extend(released);
        }
        slots
    }

    /// How long until every retired generation may go: the agent waits this out before it
    /// exits, then collects them, so the pinned maps hold exactly what adoption expects.
    pub fn retired_grace_left(&self) -> Duration {
        self.retired.back().map_or(Duration::ZERO, |r| SLOT_GRACE.saturating_sub(r.since.elapsed()))
    }

    fn remove_slots(&mut self, id: u32, generation: u16, count: usize) {
        for slot in 0..count {
            let _ = self.maps.slots.remove(&BackendSlotKey { service_id: id, generation, slot: slot as u16 });
        }
    }

    /// Removes the membership of `backends` in service `id`, except those also in `keep`.
    fn remove_members(&mut self, id: u32, backends: &[Endpoint], keep: &[Endpoint]) {
        for b in backends.iter().filter(|b| !keep.iter().any(|k| k.ip == b.ip && k.port == b.port)) {
            let _ = self.maps.members.remove(&member_key(id, b));
        }
    }

    fn remove_ranges(&mut self, id: u32, ranges: &[Cidr], keep: &[Cidr]) {
        for c in ranges.iter().filter(|c| !keep.contains(c)) {
            let _ = self.maps.source_ranges.remove(&source_range_key(id, c));
        }
    }
}
