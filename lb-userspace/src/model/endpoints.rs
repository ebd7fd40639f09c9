//! An EndpointSlice validated: its ports and IPv4 endpoints, with the conditions and hints
//! endpoint choice needs (kube-proxy's `endpointslicecache.go` reads the same fields).
use std::net::Ipv4Addr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    has_label, object_name, service::port_number, Protocol, TranslateError, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
};

/// One endpoint address of a slice, with the conditions and hints endpoint choice needs.
#[derive(Clone, Debug)]
pub(super) struct SliceEndpoint {
    pub(super) ip: Ipv4Addr,
    /// `nodeName` is this node.
    pub(super) local: bool,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) zone_hints: Vec<String>,
    pub(super) node_hints: Vec<String>,
}

/// One usable slice: its ports and IPv4 endpoints, validated.
pub(super) struct SliceSpec {
    pub(super) ports: Vec<(String, Protocol, u16)>,
    pub(super) endpoints: Vec<SliceEndpoint>,
}

/// Validates one EndpointSlice. `Ok(None)`: valid but carries nothing for us (IPv6, FQDN, or
/// a headless Service's slice).
pub(super) fn slice_spec(slice: &EndpointSlice, node_name: &str) -> Result<Option<SliceSpec>, TranslateError> {
    let object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
    let err = |field: String, reason: String| TranslateError::Slice { object: object.clone(), field, reason };
    if slice.address_type != "IPv4"
        || has_label(&slice.metadata, LABEL_HEADLESS)
        || has_label(&slice.metadata, LABEL_SERVICE_PROXY_NAME)
    {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A nil port means "all ports" and is only meaningful with no port names; kube-proxy
        // skips such entries, and so do we.
        let Some(port) = p.port else { continue };
        let port =
            port_number(port).ok_or_else(|| err(format!("ports[{i}].port"), format!("{port} is not in 1..65535")))?;
        let protocol = Protocol::parse(p.protocol.as_deref()).map_err(|r| err(format!("ports[{i}].protocol"), r))?;
        ports.push((p.name.clone().unwrap_or_default(), protocol, port));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let c = ep.conditions.as_ref();
        // The API's defaults: nil ready means ready, nil serving means "as ready", nil
        // terminating means not terminating.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let zone_hints = hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone());
        let node_hints = hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone());
        let (zone_hints, node_hints): (Vec<String>, Vec<String>) = (zone_hints.collect(), node_hints.collect());
        let local = ep.node_name.as_deref() == Some(node_name);
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip: Ipv4Addr = a
                .parse()
                .map_err(|_| err(format!("endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IPv4 address")))?;
            endpoints.push(SliceEndpoint {
                ip,
                local,
                ready,
                serving,
                terminating,
                zone_hints: zone_hints.clone(),
                node_hints: node_hints.clone(),
            });
        }
    }
    Ok(Some(SliceSpec { ports, endpoints }))
}
