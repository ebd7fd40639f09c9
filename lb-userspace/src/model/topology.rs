//! Endpoint choice, as kube-proxy's `pkg/proxy/topology.go`: ready endpoints, else serving and
//! terminating ones, per set; hints narrow the cluster-wide set only when usable.
use super::{endpoints::SliceEndpoint, Endpoint, NodeInfo};

/// Which hints narrow the cluster-wide endpoint set (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Topology {
    /// No hints, or not usable: every endpoint.
    All,
    /// `hints.forNodes` (trafficDistribution PreferSameNode).
    SameNode,
    /// `hints.forZones` (trafficDistribution PreferClose, topology-aware routing).
    SameZone,
}

/// Hints are used only when every ready endpoint carries them and at least one is meant for
/// this node (or its zone); otherwise they are ignored rather than leaving the node with no
/// endpoints, as kube-proxy does.
fn topology_mode(eps: &[(Endpoint, &SliceEndpoint)], node: &NodeInfo) -> Topology {
    let ready = || eps.iter().map(|(_, e)| e).filter(|e| e.ready);
    if ready().next().is_none() {
        return Topology::All;
    }
    if ready().all(|e| !e.node_hints.is_empty()) && ready().any(|e| e.node_hints.contains(&node.name)) {
        return Topology::SameNode;
    }
    if let Some(zone) = &node.zone {
        if ready().all(|e| !e.zone_hints.is_empty()) && ready().any(|e| e.zone_hints.contains(zone)) {
            return Topology::SameZone;
        }
    }
    Topology::All
}

/// The endpoints a port uses cluster-wide and node-locally (kube-proxy's
/// `CategorizeEndpoints`): ready ones, else serving-and-terminating ones, per set.
pub(super) fn categorize(eps: &[(Endpoint, &SliceEndpoint)], node: &NodeInfo) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let topology = topology_mode(eps, node);
    let fits = |e: &SliceEndpoint| match topology {
        Topology::All => true,
        Topology::SameNode => e.node_hints.contains(&node.name),
        Topology::SameZone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    };
    let pick = |f: &dyn Fn(&SliceEndpoint) -> bool| -> Vec<Endpoint> {
        eps.iter().filter(|(_, e)| f(e)).map(|(ep, _)| *ep).collect()
    };
    let mut cluster = pick(&|e| e.ready && fits(e));
    if cluster.is_empty() {
        cluster = pick(&|e| e.serving && e.terminating && fits(e));
    }
    let mut local = pick(&|e| e.local && e.ready);
    if local.is_empty() {
        local = pick(&|e| e.local && e.serving && e.terminating);
    }
    (cluster, local)
}
