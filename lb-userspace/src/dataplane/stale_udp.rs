//! UDP has no end of connection: when a backend leaves a UDP frontend, its flows and the
//! node's own connected sockets to it are removed, as kube-proxy's conntrack cleanup does.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap, MapData};
use lb_common::{CtKey, CtValue};

use super::{maps::ipv4, Dataplane};
use crate::model::{Endpoint, Frontend, Protocol, Scope};

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
pub(super) fn sweep_stale_udp(conntrack: &mut HashMap<MapData, CtKey, CtValue>, stale: &StaleUdp, removed: &AtomicU64) {
    let proto = Protocol::Udp.number();
    let mut doomed = Vec::new();
    for (k, v) in conntrack.iter().filter_map(std::result::Result::ok) {
        if k.dir != lb_common::CT_DIR_FORWARD || k.proto != proto {
            continue;
        }
        let Some(which) = stale.get(&v.service_id) else { continue };
        let backend = (ipv4(v.nat_addr), u16::from_be(v.nat_port));
        if which.as_ref().is_some_and(|set| !set.iter().any(|e| (e.ip, e.port) == backend)) {
            continue;
        }
        let snat = v.flags & lb_common::CT_FLAG_SNAT != 0;
        let reply = CtKey {
            src: v.nat_addr,
            dst: if snat { v.snat_addr } else { k.src },
            sport: v.nat_port,
            dport: if snat { v.snat_port } else { k.sport },
            proto: k.proto,
            family: k.family,
            dir: lb_common::CT_DIR_REPLY,
            _pad: 0,
        };
        doomed.push((k, reply));
    }
    let mut n = 0;
    for (fwd, reply) in &doomed {
        let _ = conntrack.remove(reply);
        if conntrack.remove(fwd).is_ok() {
            removed.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    }
    if n > 0 {
        tracing::info!(flows = n, "removed UDP flows to departed backends");
    }
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
        let mut doomed: StdHashMap<u64, (Ipv4Addr, u16)> = StdHashMap::new();
        let mut entries = Vec::new();
        for (k, v) in self.maps.sock_revnat.iter().filter_map(std::result::Result::ok) {
            let backend = (ipv4(k.addr), u16::from_be(k.port));
            let (fe_ip, fe_port) = (ipv4(v.addr), u16::from_be(v.port));
            let hit = stale.iter().any(|(f, left)| {
                let same_frontend = fe_port == f.port && (f.scope == Scope::NodePort || fe_ip == f.ip);
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
            if doomed.get(&s.cookie).is_some_and(|b| *b == (*s.remote.ip(), s.remote.port()))
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
