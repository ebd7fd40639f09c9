//! Desired state written to the maps as a difference: only frontends that changed are touched,
//! a new backend set is flipped in with one service entry update, and replaced Maglev tables
//! wait out a grace period before they go.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    time::{Duration, Instant},
};

use lb_common::{AffinityKey, Backend, MAP_BACKENDS, MAP_BACKEND_MEMBERS, MAP_MAGLEV, MAP_SERVICES, MAP_SOURCE_RANGES};

use super::{
    maps::{backend_value, encode_name, insert_err, member_key, service_key, service_value, source_range_key},
    stale_udp::StaleUdp,
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
    /// Its Maglev table: where it starts in `LB_MAGLEV`, and its slots (empty without
    /// backends), which the next change of the backend set starts from.
    pub(super) table_off: u32,
    pub(super) table: Vec<Backend>,
    /// The serving endpoints its UDP flows are swept against (`ServicePort::serving`): the
    /// port's last that was not empty, as kube-proxy sweeps nothing while a port has none.
    pub(super) serving: Vec<Endpoint>,
}

/// Asks for the sweep of frontend `f`'s UDP flows to what stopped serving in `want`, and moves
/// `p`'s serving set on. A UDP flow goes when its backend stops serving the Service port
/// anywhere in the cluster, not when policy, topology or terminating leave it out of the
/// backends new flows pick from (kube-proxy's `CleanStaleEntries` takes none of them into
/// account, so UDP flows fare as TCP ones do); nothing goes while the port has no serving
/// endpoint, and what did serve is remembered for when it has again.
fn sweep_serving(
    f: &Frontend,
    p: &mut Programmed,
    want: &ServicePort,
    stale_udp: &mut StaleUdp,
    stale_socks: &mut Vec<(Frontend, BTreeSet<Endpoint>)>,
) {
    let serving: BTreeSet<Endpoint> = want.serving.iter().chain(&want.backends).copied().collect();
    if serving.is_empty() {
        return;
    }
    if f.protocol == Protocol::Udp {
        let left: BTreeSet<Endpoint> = p.serving.iter().filter(|b| !serving.contains(b)).copied().collect();
        if !left.is_empty() {
            stale_socks.push((*f, left.clone()));
            stale_udp.insert(p.id, Some(left));
        }
    }
    p.serving = serving.into_iter().collect();
}

/// How long a replaced table stays in `LB_MAGLEV` after the service entry stopped pointing at
/// it. A packet copies the service entry and then reads a slot; one that read the entry just
/// before the flip must still find the old table (else `DropSlotMissing`).
/// A program run lasts microseconds (no sleeping, no preemption inside it), so this is ample;
/// kube-proxy's nftables proxier likewise removes stale chains a sync later.
pub const SLOT_GRACE: Duration = Duration::from_secs(2);

/// A table retired by a flip or a frontend's removal, freed after `SLOT_GRACE`.
#[derive(Clone, Debug)]
pub(super) struct Retired {
    id: u32,
    generation: u16,
    off: u32,
    size: u32,
    /// The backends it names, each released once.
    backends: Vec<Backend>,
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
    /// Frontends that could not be written (with an error each in `errors`): retried later.
    pub failed: Vec<Frontend>,
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
    /// failures are reported and do not stop the others. Compares every frontend: what a full
    /// resync does; a sync of known changes calls [`Dataplane::apply_changes`].
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let mut changed: BTreeSet<Frontend> = BTreeSet::new();
        for (f, sp) in &desired.services {
            if self.programmed.get(f).is_none_or(|p| p.port != *sp) {
                changed.insert(*f);
            }
        }
        changed.extend(self.programmed.keys().filter(|f| !desired.services.contains_key(f)));
        let mut report = self.apply_changes(desired, &changed);
        report.unchanged = desired.services.len().saturating_sub(report.added + report.updated + report.errors.len());
        // The frontend bits recounted from what is programmed (clearing those a previous agent
        // left, and any a failed write leaked).
        self.filter.rebuild(self.programmed.keys());
        self.flush_filter(&mut report);
        report
    }

    /// Makes the maps match `desired` for the frontends in `changed` (added, updated or
    /// removed); every other frontend is left as it is.
    pub fn apply_changes(&mut self, desired: &DesiredState, changed: &BTreeSet<Frontend>) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.collect_retired();
        // Filter bits first: the datapath must not skip a frontend that is about to exist, nor
        // the replies of a backend about to be used.
        for f in changed {
            if let Some(sp) = desired.services.get(f) {
                if !self.programmed.contains_key(f) {
                    self.filter.add_frontend(f);
                }
                for b in &sp.backends {
                    self.filter.add_backend(b, f.protocol);
                }
            }
        }
        self.flush_filter(&mut report);
        // Service id -> backends whose UDP flows must go (`None`: every flow of the frontend).
        let mut stale_udp: StaleUdp = StdHashMap::new();
        // The same departures, by frontend, for the node's own connected sockets.
        let mut stale_socks: Vec<(Frontend, BTreeSet<Endpoint>)> = Vec::new();
        let mut gone = Vec::new();
        for f in changed.iter().filter(|f| !desired.services.contains_key(f)) {
            let Some(p) = self.programmed.remove(f) else { continue };
            gone.push(*f);
            if f.protocol == Protocol::Udp {
                stale_udp.insert(p.id, None);
                stale_socks.push((*f, p.port.backends.iter().copied().collect()));
            }
            // Service entry first, so no new flow can pick a slot we are about to delete. The
            // slots go after the grace, for packets that read the entry just before; the id is
            // free again (its affinity pins dropped) only then.
            let _ = self.maps.services.remove(&service_key(f));
            // Before what only the entry used goes: no CPU's copy of it may stand after this.
            self.frontends_changed();
            self.retire(&p, true, false);
            self.remove_members(p.id, &p.port.backends, &[]);
            self.remove_ranges(p.id, &p.port.source_ranges, &[]);
            let _ = self.maps.names.remove(&p.id);
            tracing::info!(frontend = %f, service = %p.port.name, "service removed");
            report.removed += 1;
        }
        for f in changed {
            let Some(want) = desired.services.get(f) else { continue };
            let old = self.programmed.get(f).cloned();
            let next = match &old {
                // Nothing the maps hold changed (the serving set is the agent's alone): no
                // write, which would also make every CPU drop its copy of the frontends
                // (`frontends_changed`); only the UDP flows of what stopped serving go.
                Some(p) if ServicePort { serving: want.serving.clone(), ..p.port.clone() } == *want => {
                    let mut p = p.clone();
                    sweep_serving(f, &mut p, want, &mut stale_udp, &mut stale_socks);
                    p.port = want.clone();
                    self.programmed.insert(*f, p);
                    report.unchanged += 1;
                    continue;
                }
                // Same backends: keep the generation and the table, so affinity pins stay valid
                // without a membership lookup and no slot is rewritten.
                Some(p) if p.port.backends == want.backends => Programmed { port: want.clone(), ..p.clone() },
                // A new table is built from the old one (`maglev::update`) in `write_service`.
                Some(p) => Programmed {
                    id: p.id,
                    generation: p.generation.wrapping_add(1),
                    port: want.clone(),
                    table_off: 0,
                    table: p.table.clone(),
                    serving: p.serving.clone(),
                },
                None => Programmed {
                    id: self.next_free_id(),
                    generation: 0,
                    port: want.clone(),
                    table_off: 0,
                    table: Vec::new(),
                    serving: Vec::new(),
                },
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
            if matches!(written, Err(DataplaneError::MapFull { name: MAP_MAGLEV | MAP_BACKENDS, .. }))
                && !self.retired.is_empty()
            {
                // Retired tables count against the capacity: under that pressure they go
                // before their grace (a packet in flight may then drop) rather than leave the
                // frontend unprogrammed.
                tracing::warn!(
                    retired_slots = self.retired_slots(),
                    "Maglev tables full: freeing replaced tables before their grace period"
                );
                self.collect_retired_at(Instant::now() + SLOT_GRACE);
                written = self.write_service(f, &next, old.as_ref());
            }
            match written {
                Ok(mut next) => {
                    sweep_serving(f, &mut next, want, &mut stale_udp, &mut stale_socks);
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
                        gone.push(*f);
                    }
                    report.failed.push(*f);
                    report.errors.push(e)
                }
            }
        }
        // Their service entries are gone: the datapath may skip them again.
        for f in &gone {
            self.filter.remove_frontend(f);
        }
        self.flush_filter(&mut report);
        // After the flips: no new flow can pick a departed backend while we sweep.
        if !stale_udp.is_empty() && self.sweeper.request(stale_udp).is_err() {
            tracing::warn!("cannot open the conntrack tables to sweep stale UDP flows");
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

    fn flush_filter(&mut self, report: &mut ApplyReport) {
        if let Err(e) = self.filter.flush(&mut self.maps.filter) {
            report.errors.push(e);
        }
    }

    /// Writes `next` for frontend `f` over `prev` (`None` for a new frontend); returns what was
    /// programmed (with its table).
    ///
    /// What the flipped service entry will point at is written first: a new table (only if the
    /// backends changed), memberships, source ranges. Then the service entry is replaced in one
    /// update, so the datapath sees the old state or the new one, never a mix; what only the
    /// old state used is removed afterwards. On failure whatever was written for `next` is
    /// removed again and `prev` stays intact.
    fn write_service(&mut self, f: &Frontend, next: &Programmed, prev: Option<&Programmed>) -> Result<Programmed> {
        let sizes = self.sizes;
        let what = |x: &dyn std::fmt::Display| format!("{x} of {} ({f})", next.port.name);
        let empty = ServicePort::default();
        let prev_port = prev.map_or(&empty, |p| &p.port);
        let new_generation = prev.is_none_or(|p| p.generation != next.generation);
        let mut next = next.clone();
        let mut acquired: Vec<Backend> = Vec::new();
        let mut range: Option<(u32, u32)> = None;
        let mut members_written = 0;
        let mut written = Ok(());
        if new_generation {
            let mut set: Vec<Backend> = next.port.backends.iter().map(backend_value).collect();
            set.sort();
            next.table = if set.is_empty() { Vec::new() } else { lb_common::maglev::update(&next.table, &set) };
            let mut ids = Vec::with_capacity(next.table.len());
            let mut id_of: StdHashMap<Backend, u32> = StdHashMap::new();
            for b in &set {
                match self.tables.acquire(b, &mut self.maps.backends) {
                    Ok(id) => {
                        id_of.insert(*b, id);
                        acquired.push(*b);
                    }
                    Err(e) => {
                        written = Err(e);
                        break;
                    }
                }
            }
            if written.is_ok() && !next.table.is_empty() {
                let n = next.table.len() as u32;
                match self.tables.alloc(n) {
                    Some(off) => {
                        ids.extend(next.table.iter().map(|b| id_of[b]));
                        self.tables.write(off, &ids);
                        next.table_off = off;
                        range = Some((off, n));
                    }
                    None => {
                        written = Err(DataplaneError::MapFull {
                            name: MAP_MAGLEV,
                            capacity: self.tables.capacity(),
                            what: what(&format!("a table of {n} slots")),
                        })
                    }
                }
            }
            if written.is_ok() {
                for b in &next.port.backends {
                    written = self.maps.members.insert(member_key(next.id, b), 1, 0).map_err(insert_err(
                        sizes,
                        MAP_BACKEND_MEMBERS,
                        what(&format!("backend {b}")),
                    ));
                    if written.is_err() {
                        break;
                    }
                    members_written += 1;
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
        let value = service_value(next.id, next.generation, &next.port, next.table_off, next.table.len() as u32);
        let written = written.and_then(|()| {
            self.maps.services.insert(service_key(f), value, 0).map_err(insert_err(
                sizes,
                MAP_SERVICES,
                what(&"frontend"),
            ))
        });
        if let Err(e) = written {
            if let Some((off, n)) = range {
                self.tables.free_range(off, n);
            }
            for b in &acquired {
                self.tables.release(b);
            }
            self.remove_members(next.id, &next.port.backends[..members_written], &prev_port.backends);
            self.remove_ranges(next.id, &next.port.source_ranges[..ranges_written], &prev_port.source_ranges);
            return Err(e);
        }
        // Right after the flip, before what only the old entry used goes (its table after the
        // grace, its memberships and source ranges now): no CPU's copy of the old entry may
        // stand after this, however long the rest of the apply takes.
        self.frontends_changed();
        if let Some(p) = prev {
            if new_generation {
                // Packets that copied the old entry a moment ago still read its table.
                self.retire(p, false, p.generation == u16::MAX);
                self.remove_members(p.id, &p.port.backends, &next.port.backends);
            }
            self.remove_ranges(p.id, &p.port.source_ranges, &next.port.source_ranges);
        }
        // The name only serves `lb list`: failing to store it must not fail the service.
        if let Err(e) = self.maps.names.insert(next.id, encode_name(&next.port.name), 0) {
            tracing::warn!(service = %next.port.name, error = %error_chain(&e), "could not store the service name for lb list");
        }
        Ok(next)
    }

    /// Queues `p`'s table for freeing after `SLOT_GRACE` (with its id, for a removed frontend).
    fn retire(&mut self, p: &Programmed, release_id: bool, wrapped: bool) {
        let mut backends: Vec<Backend> = p.port.backends.iter().map(backend_value).collect();
        backends.sort();
        backends.dedup();
        if p.table.is_empty() && backends.is_empty() && !release_id && !wrapped {
            return;
        }
        self.retired.push_back(Retired {
            id: p.id,
            generation: p.generation,
            off: p.table_off,
            size: p.table.len() as u32,
            backends,
            since: Instant::now(),
            release_id,
            wrapped,
        });
    }

    /// Frees a retired generation's table at once: the generation is about to be used again,
    /// and its later freeing must not release what the new one holds.
    fn drop_retired(&mut self, id: u32, generation: u16) {
        let hits: Vec<usize> = (0..self.retired.len())
            .rev()
            .filter(|&i| {
                self.retired[i].id == id && self.retired[i].generation == generation && !self.retired[i].release_id
            })
            .collect();
        for i in hits {
            if let Some(r) = self.retired.remove(i) {
                self.free_retired(&r);
            }
        }
    }

    fn free_retired(&mut self, r: &Retired) {
        self.tables.free_range(r.off, r.size);
        for b in &r.backends {
            self.tables.release(b);
        }
    }

    /// Table slots held by retired tables (they count against `LB_MAGLEV`'s capacity).
    pub fn retired_slots(&self) -> usize {
        self.retired.iter().map(|r| r.size as usize).sum()
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
        let due = |r: &Retired| now.saturating_duration_since(r.since) >= SLOT_GRACE;
        if self.retired.front().is_some_and(due) {
            // Every entry that named these tables was replaced or removed, and the generation
            // moved on, before they were retired; once more here, so that freeing a table
            // never depends on that order being kept.
            self.frontends_changed();
        }
        while self.retired.front().is_some_and(due) {
            let r = self.retired.pop_front().expect("checked");
            self.free_retired(&r);
            slots += r.size as usize;
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
