//! An EndpointSlice validated: its ports and endpoints of its address family, with the
//! conditions and hints endpoint choice needs (kube-proxy's `endpointslicecache.go` reads the
//! same fields).
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    has_label, object_name, service::port_number, IpFamily, Protocol, TranslateError, LABEL_HEADLESS,
    LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
};

/// One endpoint of a slice, with the conditions and hints endpoint choice needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceEndpoint {
    pub(super) ip: IpAddr,
    /// `nodeName` is this node.
    pub(super) local: bool,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) zone_hints: Vec<String>,
    pub(super) node_hints: Vec<String>,
}

/// One slice as lb uses it: the Service it belongs to, its family, its usable ports and
/// endpoints, and what was left out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceSpec {
    /// `namespace/name` of the Service (the `kubernetes.io/service-name` label).
    pub(super) service: String,
    /// `addressType`: the slice feeds only the Service's frontends of this family.
    pub(super) family: IpFamily,
    pub(super) ports: Vec<(String, Protocol, u16)>,
    pub(super) endpoints: Vec<SliceEndpoint>,
    /// Ports and endpoints skipped, each named.
    pub(super) skipped: Vec<TranslateError>,
}

/// Reads one EndpointSlice as kube-proxy's endpoint slice cache does. `None`: it carries
/// nothing for this proxier (no Service label, an FQDN slice, a headless or foreign Service's
/// slice). A bad port or endpoint skips only itself: the rest of the slice still serves.
pub(super) fn slice_spec(slice: &EndpointSlice, node_name: &str) -> Option<SliceSpec> {
    let svc_name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    let family = IpFamily::parse(&slice.address_type)?;
    if has_label(&slice.metadata, LABEL_HEADLESS) || has_label(&slice.metadata, LABEL_SERVICE_PROXY_NAME) {
        return None;
    }
    let object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
    let err = |field: String, reason: String| TranslateError::Slice { object: object.clone(), field, reason };
    let mut skipped = Vec::new();
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A nil port means "all ports", which kube-proxy does not implement; port 0 is
        // invalid. Either way only this port is skipped.
        let Some(port) = p.port else { continue };
        let Some(port) = port_number(port) else {
            skipped.push(err(format!("ports[{i}].port"), format!("{port} is not in 1..65535")));
            continue;
        };
        match Protocol::parse(p.protocol.as_deref()) {
            Ok(protocol) => ports.push((p.name.clone().unwrap_or_default(), protocol, port)),
            Err(reason) => skipped.push(err(format!("ports[{i}].protocol"), reason)),
        }
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let c = ep.conditions.as_ref();
        // The API's meaning of absent conditions, as kube-proxy reads them: ready and serving
        // unless said otherwise, not terminating.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // Only the first address is used (the API allows exactly one, and kube-proxy reads
        // `addresses[0]`).
        let Some(a) = ep.addresses.first() else {
            skipped.push(err(format!("endpoints[{i}].addresses"), "empty".into()));
            continue;
        };
        let Some(ip) = super::service::parse_ip(a.trim()).filter(|ip| IpFamily::of(*ip) == family) else {
            skipped.push(err(format!("endpoints[{i}].addresses[0]"), format!("{a:?} is not an {family} address")));
            continue;
        };
        let hints = ep.hints.as_ref();
        let zone_hints = hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone());
        let node_hints = hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone());
        endpoints.push(SliceEndpoint {
            ip,
            local: ep.node_name.as_deref() == Some(node_name),
            ready,
            serving,
            terminating,
            zone_hints: zone_hints.collect(),
            node_hints: node_hints.collect(),
        });
    }
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some(SliceSpec { service: format!("{namespace}/{svc_name}"), family, ports, endpoints, skipped })
}
