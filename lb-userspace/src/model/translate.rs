//! The whole object set into the desired datapath state: frontends per Service port, backends
//! per frontend by traffic policy, conflicts between Services resolved.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::MAX_BACKENDS_PER_SERVICE;

use super::{
    endpoints::{slice_spec, SliceEndpoint, SliceSpec},
    service::{service_spec, ServiceSpec},
    topology::categorize,
    Endpoint, Frontend, HealthCheck, NodeInfo, Protocol, Scope, ServicePort, TranslateError, Translation,
    LABEL_SERVICE_NAME,
};

/// Translates the whole object set as seen by node `node_name`. Invalid objects are reported
/// and left out alone.
///
/// Objects are taken by reference (the API source hands over its reflector stores' shared
/// copies), so a large cluster is not deep-copied for every change.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
) -> Translation {
    let mut out = Translation::default();

    // Slices grouped by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<SliceSpec>> = BTreeMap::new();
    for slice in slices {
        let Some(svc_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        match slice_spec(slice, &node.name) {
            Ok(Some(spec)) => by_service
                .entry((slice.metadata.namespace.clone().unwrap_or_else(|| "default".into()), svc_name.clone()))
                .or_default()
                .push(spec),
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }

    // Deterministic order, so a conflict always rejects the same Service.
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for svc in services {
        match service_spec(svc) {
            Ok(Some(spec)) => specs.push(spec),
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }
    specs.sort_by(|a, b| a.object.cmp(&b.object));

    // An external IP (or LoadBalancer ingress IP) on another Service's ClusterIP, port and
    // protocol would share its map key (both are exact-address frontends). The ClusterIP wins
    // whatever the object order: the API server allocates it, while external IPs are set by
    // users and are a known way to hijack a Service's traffic (CVE-2020-8554). So every
    // ClusterIP claims its keys before any Service is translated.
    let mut cluster_ips: BTreeMap<(Ipv4Addr, u16, Protocol), String> = BTreeMap::new();
    for spec in &specs {
        for port in &spec.ports {
            cluster_ips.entry((spec.cluster_ip, port.port, port.protocol)).or_insert_with(|| spec.object.clone());
        }
    }

    let mut owners: BTreeMap<Frontend, String> = BTreeMap::new();
    let mut health_owners: BTreeMap<u16, String> = BTreeMap::new();
    'services: for spec in specs {
        let slices = by_service.get(&(spec.namespace.clone(), spec.name.clone()));
        let mut entries: Vec<(Frontend, ServicePort)> = Vec::new();
        for port in &spec.ports {
            // Every address once, ready copies preferred (a pod may be listed by two slices
            // while the controller moves it).
            let mut merged: BTreeMap<(Ipv4Addr, u16), (Endpoint, SliceEndpoint)> = BTreeMap::new();
            for slice in slices.into_iter().flatten() {
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
            let mut candidates: Vec<(Endpoint, &SliceEndpoint)> = merged.values().map(|(ep, e)| (*ep, e)).collect();
            // kube-proxy's `hasAnyEndpoints`: an endpoint usable anywhere in the cluster (ready,
            // or serving while terminating), counted before the cut below. A Local policy drops
            // only when such endpoints exist but none is on this node; with none anywhere the
            // port rejects, as under Cluster.
            let usable_anywhere = candidates.iter().any(|(_, e)| e.ready || (e.serving && e.terminating));
            if candidates.len() > MAX_BACKENDS_PER_SERVICE as usize {
                out.errors.push(TranslateError::Service {
                    object: spec.object.clone(),
                    field: "endpoints".into(),
                    reason: format!(
                        "{} endpoints for port {:?}; only the first {} are used",
                        candidates.len(),
                        port.name,
                        MAX_BACKENDS_PER_SERVICE
                    ),
                });
                candidates.truncate(MAX_BACKENDS_PER_SERVICE as usize);
            }
            let (all, local) = categorize(&candidates, node);
            let name =
                if port.name.is_empty() { spec.object.clone() } else { format!("{}:{}", spec.object, port.name) };
            let base = ServicePort { name, affinity_timeout_s: spec.affinity_timeout_s, ..Default::default() };
            let internal = ServicePort {
                backends: if spec.internal_local { local.clone() } else { all.clone() },
                local_only: spec.internal_local && usable_anywhere,
                ..base.clone()
            };
            let external = ServicePort {
                backends: if spec.external_local { local } else { all },
                local_only: spec.external_local && usable_anywhere,
                external: true,
                ..base
            };
            entries.push((Frontend::cluster_ip(spec.cluster_ip, port.port, port.protocol), internal));
            if let Some(np) = port.node_port {
                entries.push((Frontend::node_port(np, port.protocol), external.clone()));
            }
            for ip in &spec.lb_ips {
                let with_ranges = ServicePort { source_ranges: spec.source_ranges.clone(), ..external.clone() };
                entries.push((Frontend::external(*ip, port.port, port.protocol), with_ranges));
            }
            for ip in &spec.external_ips {
                entries.push((Frontend::external(*ip, port.port, port.protocol), external.clone()));
            }
        }
        // Its own ClusterIP already serves an external IP equal to it: that frontend is moot.
        entries.retain(|(f, _)| {
            let own = f.scope == Scope::External
                && cluster_ips.get(&(f.ip, f.port, f.protocol)) == Some(&spec.object);
            if own {
                tracing::warn!(service = %spec.object, frontend = %f, "external IP equal to the Service's own ClusterIP: served as the ClusterIP");
            }
            !own
        });
        // All of a Service or nothing: a clash on any frontend rejects it whole.
        let mut seen = BTreeSet::new();
        for (f, _) in &entries {
            if let Some(owner) = cluster_ips.get(&(f.ip, f.port, f.protocol)).filter(|_| f.scope == Scope::External) {
                tracing::warn!(
                    service = %spec.object,
                    cluster_ip_of = %owner,
                    key = %format_args!("{}:{}/{}", f.ip, f.port, f.protocol),
                    "an external IP of this Service is another Service's ClusterIP; the ClusterIP wins and this Service is not served"
                );
                out.errors.push(TranslateError::Conflict {
                    object: spec.object.clone(),
                    frontend: *f,
                    owner: owner.clone(),
                });
                continue 'services;
            }
            if let Some(owner) = owners.get(f) {
                out.errors.push(TranslateError::Conflict {
                    object: spec.object.clone(),
                    frontend: *f,
                    owner: owner.clone(),
                });
                continue 'services;
            }
            if !seen.insert(*f) {
                out.errors.push(TranslateError::Conflict {
                    object: spec.object.clone(),
                    frontend: *f,
                    owner: spec.object.clone(),
                });
                continue 'services;
            }
        }
        if let Some(hc) = spec.health_check_node_port {
            if let Some(owner) = health_owners.get(&hc) {
                out.errors.push(TranslateError::Service {
                    object: spec.object.clone(),
                    field: "spec.healthCheckNodePort".into(),
                    reason: format!("{hc} is already used by Service {owner}"),
                });
                continue 'services;
            }
            // kube-proxy reports local *ready* endpoints, so a node whose pods are all
            // terminating fails the check and the load balancer drains it.
            let local_endpoints: BTreeSet<Ipv4Addr> = slices
                .into_iter()
                .flatten()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.local && (e.ready || spec.publish_not_ready))
                .map(|e| e.ip)
                .collect();
            health_owners.insert(hc, spec.object.clone());
            out.state
                .health_checks
                .insert(hc, HealthCheck { service: spec.object.clone(), local_endpoints: local_endpoints.len() });
        }
        for (f, sp) in entries {
            owners.insert(f, spec.object.clone());
            out.state.services.insert(f, sp);
        }
    }
    out
}
