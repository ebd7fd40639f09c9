//! UDP has no end of connection: when a backend leaves a UDP frontend, its flows and the
//! node's own connected sockets to it are removed, as kube-proxy's conntrack cleanup does.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    hash::Hash,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use lb_common::{CtKey, CtValue};

use super::{
    conntrack::{entries, remove_flow, CtAddr, CtPair, CtTables},
    maps::ip_of,
    Dataplane,
};
use crate::model::{Endpoint, Frontend, IpFamily, Protocol, Scope};

/// Service id -> the backends whose UDP flows must go (`None`: every flow of the frontend).
pub(super) type StaleUdp = StdHashMap<u32, Option<BTreeSet<Endpoint>>>;

/// Removes the conntrack entries (both directions) of UDP flows whose frontend or backend is
/// gone, so the client's next datagram on the same 5-tuple is load-balanced afresh: UDP has no
/// end of connection, and a DNS client reusing its source port would otherwise keep sending to
/// a deleted pod (kube-proxy's conntrack cleanup does the same). TCP entries are left alone: a
/// connection to a pod that still runs may finish. Counts removed flows into `removed`.
///
/// It walks the whole map (a syscall per entry), so the agent runs it on a thread of its own
/// with its own map handle: the backend sets are already flipped, so no new flow can pick a
/// departed backend meanwhile, and other updates need not wait for the walk.
pub(super) fn sweep_stale_udp(tables: &mut CtTables, stale: &StaleUdp, removed: &AtomicU64) {
    let n = sweep_family(&mut tables.v4, stale, removed) + sweep_family(&mut tables.v6, stale, removed);
    if n > 0 {
        tracing::info!(flows = n, "removed UDP flows to departed backends");
    }
}

/// The sweep over one family's tables (a service id has one family, so each request matches
/// flows in one of them); returns the flows removed.
fn sweep_family<A: CtAddr>(tables: &mut CtPair<A>, stale: &StaleUdp, removed: &AtomicU64) -> usize
where
    CtKey<A>: aya::Pod + Eq + Hash,
    CtValue<A>: aya::Pod,
{
    let proto = Protocol::Udp.number();
    let doomed: Vec<(CtKey<A>, CtValue<A>)> = entries(&tables.assured, &tables.new)
        .into_iter()
        .filter(|(k, v, _)| {
            if k.dir != lb_common::CT_DIR_FORWARD || k.proto != proto {
                return false;
            }
            let Some(which) = stale.get(&v.service_id) else { return false };
            let backend = (v.nat_addr.ip(), u16::from_be(v.nat_port));
            which.as_ref().is_none_or(|set| set.iter().any(|e| (e.ip, e.port) == backend))
        })
        .map(|(k, v, _)| (k, v))
        .collect();
    let mut n = 0;
    for (k, v) in &doomed {
        if remove_flow(tables, k, v) {
            removed.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    }
    n
}

impl Dataplane {
    /// Aborts the node's own connected UDP sockets that the socket-level programs pointed at a
    /// backend that has now left `frontend` (see `sockdiag`). A socket is identified by the
    /// cookie the programs recorded with the backend, so sockets a process connected to the
    /// pod address itself are left alone.
    pub(super) fn close_stale_udp_sockets(
        &mut self,
        stale: &[(Frontend, BTreeSet<Endpoint>)],
    ) -> std::result::Result<usize, crate::sockdiag::SockDiagError> {
        let mut doomed: StdHashMap<u64, (IpAddr, u16)> = StdHashMap::new();
        let mut entries = Vec::new();
        for (k, v) in self.maps.sock_revnat.iter().filter_map(std::result::Result::ok) {
            // The frontend has the backend's family: the socket programs translate within one.
            let backend = (ip_of(k.family, k.addr), u16::from_be(k.port));
            let (fe_ip, fe_port) = (ip_of(k.family, v.addr), u16::from_be(v.port));
            let hit = stale.iter().any(|(f, left)| {
                let same_frontend = fe_port == f.port
                    && (if f.scope == Scope::NodePort { f.family() == IpFamily::of(fe_ip) } else { fe_ip == f.ip });
                same_frontend && left.iter().any(|e| (e.ip, e.port) == backend)
            });
            if hit {
                doomed.insert(k.cookie, backend);
                entries.push(k);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut closed = 0;
        for s in crate::sockdiag::udp_sockets()? {
            if doomed.get(&s.cookie).is_some_and(|b| *b == (s.remote.ip(), s.remote.port()))
                && crate::sockdiag::destroy(&s)?
            {
                closed += 1;
            }
        }
        for k in entries {
            let _ = self.maps.sock_revnat.remove(&k);
        }
        Ok(closed)
    }
}

/// Merges `more` into `into`: `None` (every flow of a frontend) absorbs a set of backends.
fn merge(into: &mut StaleUdp, more: StaleUdp) {
    for (id, which) in more {
        match (into.get_mut(&id), which) {
            (None, w) => {
                into.insert(id, w);
            }
            (Some(slot @ Some(_)), None) => *slot = None,
            (Some(Some(set)), Some(more)) => set.extend(more),
            (Some(None), _) => {}
        }
    }
}

/// One sweep of the conntrack map at a time, on a thread of its own with its own map handle:
/// requests made while a sweep runs are merged and served by the next one, so a burst of
/// backend changes costs one more walk, not one per change.
pub(super) struct Sweeper {
    /// The pin directory, where the sweeper opens conntrack handles of its own.
    pin: std::path::PathBuf,
    removed: std::sync::Arc<AtomicU64>,
    tx: Option<std::sync::mpsc::Sender<StaleUdp>>,
}

impl Sweeper {
    pub(super) fn new(pin_dir: std::path::PathBuf, removed: std::sync::Arc<AtomicU64>) -> Self {
        Self { pin: pin_dir, removed, tx: None }
    }

    /// Queues a sweep; gives the request back if no sweeper can run (no second map handle).
    pub(super) fn request(&mut self, stale: StaleUdp) -> Result<(), StaleUdp> {
        let stale = match &self.tx {
            Some(tx) => match tx.send(stale) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(s)) => s,
            },
            None => stale,
        };
        let Ok(mut ct) = CtTables::open_pinned(&self.pin) else { return Err(stale) };
        let (tx, rx) = std::sync::mpsc::channel::<StaleUdp>();
        let removed = self.removed.clone();
        let spawned = std::thread::Builder::new().name("lb-udp-sweep".into()).spawn(move || {
            while let Ok(mut req) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    merge(&mut req, more);
                }
                sweep_stale_udp(&mut ct, &req, &removed);
            }
        });
        if spawned.is_err() {
            return Err(stale);
        }
        let _ = tx.send(stale);
        self.tx = Some(tx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_merge_with_every_flow_absorbing_backend_sets() {
        let e = |p: u16| Endpoint { ip: std::net::Ipv4Addr::new(10, 0, 0, 1).into(), port: p, local: false };
        let mut a: StaleUdp = [(1, Some(BTreeSet::from([e(1)]))), (2, None)].into();
        merge(&mut a, [(1, Some(BTreeSet::from([e(2)]))), (2, Some(BTreeSet::from([e(3)]))), (3, None)].into());
        assert_eq!(a[&1], Some(BTreeSet::from([e(1), e(2)])));
        assert_eq!(a[&2], None);
        assert_eq!(a[&3], None);
        merge(&mut a, [(1, None)].into());
        assert_eq!(a[&1], None);
    }
}
