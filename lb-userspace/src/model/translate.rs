//! Services and EndpointSlices into the desired datapath state, in two steps kube-proxy also
//! separates: each Service alone (its frontends, and its backends by traffic policy:
//! [`service_output`]), then the Services together (frontends claimed by two Services:
//! [`resolve`]). [`translate`] runs both over a whole object set; the incremental
//! [`super::Translator`] runs the first for changed Services only and the second for the
//! Services whose claims touch theirs, and must always agree with [`translate`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::MAX_BACKENDS_PER_SERVICE;

use super::{
    endpoints::{slice_spec, SliceEndpoint, SliceSpec},
    service::{service_spec, FamilySpec, ServiceSpec},
    topology::categorize,
    Endpoint, Frontend, HealthCheck, IpFamily, NodeInfo, Protocol, Scope, ServicePort, TranslateError, Translation,
};

/// What one Service asks for, before other Services are considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServiceOutput {
    /// Frontends in the order conflicts are checked, each once.
    pub(super) entries: Vec<(Frontend, ServicePort)>,
    pub(super) health: Option<(u16, HealthCheck)>,
    /// Ports, endpoints and slices left out (the Service itself is served).
    pub(super) notes: Vec<TranslateError>,
    /// Ports with a Local policy and no endpoint on this node: (internal, external).
    pub(super) no_local: (usize, usize),
}

/// What a Service competes with others for: datapath keys (a ClusterIP and an external IP
/// with the same address, port and protocol are one key; a node port has a key per family)
/// and health check node ports (a socket port, whatever the families).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Claim {
    Exact(IpAddr, u16, Protocol),
    NodePort(IpFamily, u16, Protocol),
    HealthPort(u16),
}

impl ServiceOutput {
    pub(super) fn claims(&self) -> BTreeSet<Claim> {
        let mut out: BTreeSet<Claim> = self.entries.iter().filter_map(|(f, _)| claim_of(f)).collect();
        out.extend(self.health.as_ref().map(|(p, _)| Claim::HealthPort(*p)));
        out
    }

    /// The frontends still served once the claims in `lost` went to other Services: a lost
    /// claim takes every frontend on it (a node port on each node address, and the
    /// short-circuit companions), nothing else.
    pub(super) fn kept<'a>(&'a self, lost: Option<&'a Lost>) -> impl Iterator<Item = &'a (Frontend, ServicePort)> + 'a {
        self.entries.iter().filter(move |(f, _)| lost.is_none_or(|l| !l.claims.contains(&owning_claim(f))))
    }

    /// The health check node port, unless another Service holds it.
    pub(super) fn kept_health<'a>(&'a self, lost: Option<&'a Lost>) -> Option<&'a (u16, HealthCheck)> {
        self.health.as_ref().filter(|(p, _)| lost.is_none_or(|l| !l.claims.contains(&Claim::HealthPort(*p))))
    }
}

/// What a Service lost to others, and the errors that say so. kube-proxy programs every
/// Service's rules and lets the first match win, so a clash never takes down the rest of a
/// Service: only the frontends on a claim another Service holds are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Lost {
    pub(super) claims: BTreeSet<Claim>,
    pub(super) errors: Vec<TranslateError>,
}

fn claim_of(f: &Frontend) -> Option<Claim> {
    (!f.is_from_cluster()).then(|| owning_claim(f))
}

/// The claim a frontend lives on: its own, or for a short-circuit companion (which claims
/// nothing itself) its external frontend's.
fn owning_claim(f: &Frontend) -> Claim {
    match f.scope {
        Scope::ClusterIp | Scope::External | Scope::ExternalFromCluster => Claim::Exact(f.ip, f.port, f.protocol),
        Scope::NodePort | Scope::NodePortFromCluster => Claim::NodePort(f.family(), f.port, f.protocol),
    }
}

/// The endpoint cut: a frontend has at most `MAX_BACKENDS_PER_SERVICE` slots. Applied to the
/// endpoints already chosen (so a Local frontend keeps its local ones), first by address.
fn cut(mut v: Vec<Endpoint>, spec: &ServiceSpec, what: &str, notes: &mut Vec<TranslateError>) -> Vec<Endpoint> {
    let max = MAX_BACKENDS_PER_SERVICE as usize;
    if v.len() > max {
        notes.push(TranslateError::TooManyEndpoints {
            object: spec.object.clone(),
            what: what.to_string(),
            count: v.len(),
            max,
        });
        v.truncate(max);
    }
    v
}

/// One Service's frontends and backends, from its own slices (in slice name order): for each
/// family it has a ClusterIP of, that family's frontends from that family's slices.
pub(super) fn service_output(spec: &ServiceSpec, slices: &[&SliceSpec], node: &NodeInfo) -> ServiceOutput {
    let mut out = ServiceOutput { notes: spec.skipped.clone(), ..Default::default() };
    let mut seen = BTreeSet::new();
    let mut health = BTreeMap::new();
    for fam in &spec.families {
        let mine: Vec<&SliceSpec> = slices.iter().copied().filter(|s| s.family == fam.family).collect();
        let local = family_output(spec, fam, &mine, node, &mut seen, &mut out);
        health.insert(fam.family, local);
    }
    if let Some(hc) = spec.health_check_node_port {
        out.health = Some((hc, HealthCheck { service: spec.object.clone(), local_endpoints: health }));
    }
    out
}

/// The frontends of one family of a Service (pushed to `out`); returns the local ready
/// endpoint count its health check reports for the family.
fn family_output(
    spec: &ServiceSpec,
    fam: &FamilySpec,
    slices: &[&SliceSpec],
    node: &NodeInfo,
    seen: &mut BTreeSet<Claim>,
    out: &mut ServiceOutput,
) -> usize {
    let mut push = |entries: &mut Vec<(Frontend, ServicePort)>, f: Frontend, sp: ServicePort| {
        // A frontend listed twice in one Service (an external IP given twice, or equal to a
        // LoadBalancer IP, or to the Service's own ClusterIP) is served once, by its first
        // listing in the order ClusterIP, node port, LoadBalancer IPs, external IPs, as
        // kube-proxy serves it once; it does not reject the Service.
        if let Some(c) = claim_of(&f) {
            if !seen.insert(c) {
                return;
            }
        }
        entries.push((f, sp));
    };
    let mut local_ready_ips = BTreeSet::new();
    for slice in slices {
        for e in &slice.endpoints {
            if e.local && (e.ready || spec.publish_not_ready) {
                local_ready_ips.insert(e.ip);
            }
        }
    }
    // With two families, the notes of the second name it (the first is the primary).
    let suffix = if spec.families.len() > 1 { format!(" ({})", fam.family) } else { String::new() };
    let mut health_cut = false;
    for port in &spec.ports {
        // Every address once, ready copies preferred (a pod may be listed by two slices while
        // the controller moves it).
        let mut merged: BTreeMap<(IpAddr, u16), (Endpoint, SliceEndpoint)> = BTreeMap::new();
        for slice in slices {
            for (pname, proto, target) in &slice.ports {
                if *pname != port.name || *proto != port.protocol {
                    continue;
                }
                for e in &slice.endpoints {
                    let mut e = e.clone();
                    if spec.publish_not_ready {
                        (e.ready, e.serving) = (true, true);
                    }
                    let ep = Endpoint { ip: e.ip, port: *target, local: e.local };
                    match merged.get(&(e.ip, *target)) {
                        Some((_, old)) if old.ready || !e.ready => {}
                        _ => {
                            merged.insert((e.ip, *target), (ep, e));
                        }
                    }
                }
            }
        }
        let candidates: Vec<(Endpoint, &SliceEndpoint)> = merged.values().map(|(ep, e)| (*ep, e)).collect();
        // kube-proxy's `hasAnyEndpoints`: an endpoint usable anywhere in the cluster (ready, or
        // serving while terminating). A Local policy drops only when such endpoints exist but
        // none is on this node; with none anywhere the port rejects, as under Cluster.
        let usable_anywhere = candidates.iter().any(|(_, e)| e.ready || (e.serving && e.terminating));
        let serving: Vec<Endpoint> =
            candidates.iter().filter(|(_, e)| e.ready || e.serving).map(|(ep, _)| *ep).collect();
        let (all, local) = categorize(&candidates, node);
        let label = if port.name.is_empty() { format!("port {}", port.port) } else { format!("port {:?}", port.name) };
        let label = format!("{label}{suffix}");
        let all = cut(all, spec, &label, &mut out.notes);
        let local_len = local.len();
        let local = cut(local, spec, &format!("{label} on this node"), &mut out.notes);
        health_cut |= local_len > local.len();
        if spec.internal_local && local.is_empty() {
            out.no_local.0 += 1;
        }
        let has_external = port.node_port.is_some() || !fam.lb_ips.is_empty() || !fam.external_ips.is_empty();
        if spec.external_local && has_external && local.is_empty() {
            out.no_local.1 += 1;
        }
        let name = if port.name.is_empty() { spec.object.clone() } else { format!("{}:{}", spec.object, port.name) };
        let base = ServicePort { name, affinity_timeout_s: spec.affinity_timeout_s, serving, ..Default::default() };
        let internal = ServicePort {
            backends: if spec.internal_local { local.clone() } else { all.clone() },
            local_only: spec.internal_local && usable_anywhere,
            ..base.clone()
        };
        let external = ServicePort {
            backends: if spec.external_local { local } else { all.clone() },
            local_only: spec.external_local && usable_anywhere,
            external: true,
            ..base.clone()
        };
        // Under eTP Local, pods and the node itself still get every endpoint of the cluster
        // at the external frontends; only traffic from outside is kept local.
        // kube-proxy's short-circuit sends the cluster's own sources to the cluster chain
        // without masquerading them: pods reach pods anywhere, and replies come back through
        // this node's conntrack. So the companion is no external frontend (no SNAT).
        let from_cluster = spec.external_local.then_some(ServicePort { backends: all, external: false, ..base });
        let mut externals: Vec<(Frontend, ServicePort)> = Vec::new();
        if let Some(np) = port.node_port {
            externals.push((Frontend::node_port_of(fam.family, np, port.protocol), external.clone()));
        }
        for ip in &fam.lb_ips {
            let with_ranges = ServicePort { source_ranges: fam.source_ranges.clone(), ..external.clone() };
            externals.push((Frontend::external(*ip, port.port, port.protocol), with_ranges));
        }
        for ip in &fam.external_ips {
            externals.push((Frontend::external(*ip, port.port, port.protocol), external.clone()));
        }
        push(&mut out.entries, Frontend::cluster_ip(fam.cluster_ip, port.port, port.protocol), internal);
        for (f, sp) in externals {
            let before = out.entries.len();
            push(&mut out.entries, f, sp.clone());
            if out.entries.len() > before {
                if let (Some(companion), Some(fc)) = (f.from_cluster(), &from_cluster) {
                    let sp_fc = ServicePort { source_ranges: sp.source_ranges, ..fc.clone() };
                    out.entries.push((companion, sp_fc));
                }
            }
        }
    }
    // kube-proxy reports local *ready* endpoints (distinct addresses), so a node whose pods
    // are all terminating fails the check and the load balancer drains it; never more than
    // the datapath holds.
    let mut n = local_ready_ips.len();
    if health_cut {
        n = n.min(MAX_BACKENDS_PER_SERVICE as usize);
    }
    n
}

/// What each of `services` (in name order, all sharing claims only among themselves) loses to
/// the others: the ClusterIPs claim their keys first (CVE-2020-8554: an external IP never
/// takes a ClusterIP's traffic), then each Service in order takes every claim no earlier one
/// holds. Only Services that lost something are returned.
pub(super) fn resolve<'a>(services: &[(&'a str, &'a ServiceOutput)]) -> BTreeMap<&'a str, Lost> {
    let mut cluster_ips: BTreeMap<Claim, &str> = BTreeMap::new();
    for (name, out) in services {
        for (f, _) in &out.entries {
            if f.scope == Scope::ClusterIp {
                cluster_ips.entry(owning_claim(f)).or_insert(name);
            }
        }
    }
    let mut owners: BTreeMap<Claim, &str> = BTreeMap::new();
    let mut lost: BTreeMap<&str, Lost> = BTreeMap::new();
    for (name, out) in services {
        let mut taken: BTreeSet<Claim> = BTreeSet::new();
        let mut mine = Lost::default();
        for (f, _) in &out.entries {
            let Some(c) = claim_of(f) else { continue };
            if taken.contains(&c) || mine.claims.contains(&c) {
                continue;
            }
            let hijack = if f.scope == Scope::External { cluster_ips.get(&c).filter(|o| **o != *name) } else { None };
            if let Some(owner) = hijack {
                tracing::warn!(
                    service = %name,
                    cluster_ip_of = %owner,
                    frontend = %f,
                    "an external IP of this Service is another Service's ClusterIP; the ClusterIP wins and this frontend is not served"
                );
            }
            match hijack.or(owners.get(&c)) {
                Some(owner) => {
                    mine.claims.insert(c);
                    mine.errors.push(TranslateError::Conflict {
                        object: name.to_string(),
                        frontend: *f,
                        owner: owner.to_string(),
                    });
                }
                None => {
                    taken.insert(c);
                }
            }
        }
        if let Some((hc, _)) = &out.health {
            let c = Claim::HealthPort(*hc);
            match owners.get(&c) {
                Some(owner) => {
                    mine.claims.insert(c);
                    mine.errors.push(TranslateError::HealthCheckConflict {
                        object: name.to_string(),
                        port: *hc,
                        owner: owner.to_string(),
                    });
                }
                None => {
                    taken.insert(c);
                }
            }
        }
        for c in taken {
            owners.insert(c, name);
        }
        if !mine.claims.is_empty() {
            lost.insert(*name, mine);
        }
    }
    lost
}

/// Translates the whole object set as seen by node `node`. Invalid objects (and invalid parts
/// of objects) are reported and left out alone.
///
/// Objects are taken by reference (the API source hands over shared copies), so a large
/// cluster is not deep-copied.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
) -> Translation {
    let mut out = Translation::default();
    // Slices by Service, in slice name order, so the result does not depend on input order.
    let mut by_service: BTreeMap<String, BTreeMap<String, SliceSpec>> = BTreeMap::new();
    for slice in slices {
        if let Some(spec) = slice_spec(slice, &node.name) {
            let name = slice.metadata.name.clone().unwrap_or_default();
            by_service.entry(spec.service.clone()).or_default().insert(name, spec);
        }
    }
    let mut specs: BTreeMap<String, ServiceSpec> = BTreeMap::new();
    for svc in services {
        match service_spec(svc) {
            Ok(Some(spec)) => {
                specs.insert(spec.object.clone(), spec);
            }
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }
    for slices in by_service.values() {
        for s in slices.values() {
            out.errors.extend(s.skipped.iter().cloned());
        }
    }
    let outputs: BTreeMap<&str, ServiceOutput> = specs
        .iter()
        .map(|(name, spec)| {
            let slices: Vec<&SliceSpec> = by_service.get(name).map(|m| m.values().collect()).unwrap_or_default();
            (name.as_str(), service_output(spec, &slices, node))
        })
        .collect();
    let ordered: Vec<(&str, &ServiceOutput)> = outputs.iter().map(|(n, o)| (*n, o)).collect();
    let lost = resolve(&ordered);
    for (name, o) in &outputs {
        out.errors.extend(o.notes.iter().cloned());
        let lost = lost.get(name);
        out.errors.extend(lost.iter().flat_map(|l| l.errors.iter().cloned()));
        out.state.services.extend(o.kept(lost).cloned());
        if let Some((port, hc)) = o.kept_health(lost) {
            out.state.health_checks.insert(*port, hc.clone());
        }
    }
    out.errors.sort();
    out
}
