//! The one pure translation: Kubernetes Services and EndpointSlices -> the frontends and
//! backend sets the datapath must serve. No I/O, no maps; every source (YAML files, the API
//! server) feeds this, and the dataplane applies its output as a difference.
//!
//! Semantics follow kube-proxy: the Service gives frontends (ClusterIP, node ports,
//! LoadBalancer ingress IPs, external IPs); EndpointSlices labelled
//! `kubernetes.io/service-name` give backends, matched to service ports by port name and
//! protocol (the slice already carries the resolved target port number, so a named
//! `targetPort` is resolved through the slice's port names). Endpoint choice is kube-proxy's
//! (`pkg/proxy/topology.go`): ready endpoints (all of them under `publishNotReadyAddresses`),
//! and when there are none, the ones still serving while terminating; zone or node hints narrow
//! the cluster-wide set only when every ready endpoint carries them and some name this node.
//! Traffic policies pick which set each kind of frontend gets: `internalTrafficPolicy` for the
//! ClusterIP, `externalTrafficPolicy` for node ports, LoadBalancer IPs and external IPs.
//! Frontends that would share a datapath key conflict: the first Service by name keeps it,
//! except that a ClusterIP always beats another Service's external or LoadBalancer IP.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::MAX_BACKENDS_PER_SERVICE;

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy ignores them too.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on the slices (and by some tools on the Services) of
/// headless Services; kube-proxy's informers exclude such objects.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The Node label that names its zone, matched against endpoint zone hints.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// The label selector kube-proxy lists Services and EndpointSlices with.
pub const PROXY_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What the translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// As in EndpointSlice `nodeName` and `hints.forNodes`.
    pub name: String,
    /// The Node's `topology.kubernetes.io/zone` label, for `hints.forZones`.
    pub zone: Option<String>,
}

impl NodeInfo {
    pub fn named(name: &str) -> Self {
        Self { name: name.to_string(), zone: None }
    }

    /// From the Node object (its zone label).
    pub fn from_node(name: &str, node: Option<&k8s_openapi::api::core::v1::Node>) -> Self {
        let zone = node.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(LABEL_TOPOLOGY_ZONE)).cloned();
        Self { name: name.to_string(), zone }
    }
}

fn has_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(key))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Parses the Kubernetes `protocol` field; absent means TCP.
    fn parse(field: Option<&str>) -> Result<Self, String> {
        match field.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err("SCTP is not supported by lb yet".into()),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The ClusterIP, from pods (and the node).
    ClusterIp,
    /// A LoadBalancer ingress IP or an external IP, from outside.
    External,
    /// A node port, on every node address; `ip` is unspecified.
    NodePort,
}

/// Where clients connect: an address, port and protocol, and how it is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    pub fn cluster_ip(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self { ip, port, protocol, scope: Scope::ClusterIp }
    }

    pub fn node_port(port: u16, protocol: Protocol) -> Self {
        Self { ip: Ipv4Addr::UNSPECIFIED, port, protocol, scope: Scope::NodePort }
    }

    pub fn external(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self { ip, port, protocol, scope: Scope::External }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::NodePort => write!(f, "*:{}/{}", self.port, self.protocol),
            _ => write!(f, "{}:{}/{}", self.ip, self.port, self.protocol),
        }
    }
}

/// A backend pod address and the port it listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// An IPv4 prefix, as in `loadBalancerSourceRanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let len: u8 = l.parse().ok().filter(|&l| l <= 32).ok_or_else(|| format!("{s:?} has a bad prefix length"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask), len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What one frontend must do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name` (the port part omitted for unnamed ports).
    pub name: String,
    /// Ready backends for this frontend (sorted, unique), already narrowed by traffic policy.
    pub backends: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP` with this timeout in seconds; `None` for `None`.
    pub affinity_timeout_s: Option<u32>,
    /// Reached from outside: flows to remote backends are SNATed to the node.
    pub external: bool,
    /// Traffic policy `Local` while the Service has usable endpoints somewhere in the cluster:
    /// only local backends, and none means drop. Clear under `Local` when no endpoint is usable
    /// anywhere, so the frontend rejects like any Service without endpoints (kube-proxy's
    /// REJECT for `!hasEndpoints`); `backends` is then empty either way.
    pub local_only: bool,
    /// `loadBalancerSourceRanges` (LoadBalancer IPs only); empty admits everyone.
    pub source_ranges: Vec<Cidr>,
}

/// kube-proxy's health check for `externalTrafficPolicy: Local` LoadBalancers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `namespace/name`.
    pub service: String,
    pub local_endpoints: usize,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for that field (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The complete desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServicePort>,
    /// `healthCheckNodePort` -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// Why one object was rejected. The object is left out; everything else is still programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("Service {object}: field {field}: {reason}")]
    Service { object: String, field: String, reason: String },
    #[error("EndpointSlice {object}: field {field}: {reason}")]
    Slice { object: String, field: String, reason: String },
    #[error("Service {object}: frontend {frontend} is already served by Service {owner}")]
    Conflict { object: String, frontend: Frontend, owner: String },
}

/// Result of a translation: the state to program, and the objects that were left out.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<TranslateError>,
}

fn object_name(ns: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", ns.map_or("default", |s| s.as_str()), name.map_or("<unnamed>", |s| s.as_str()))
}

/// A Service port after validation.
struct PortSpec {
    name: String,
    port: u16,
    protocol: Protocol,
    node_port: Option<u16>,
}

/// A Service after validation: what it asks the datapath for, before endpoints are known.
struct ServiceSpec {
    object: String,
    namespace: String,
    name: String,
    cluster_ip: Ipv4Addr,
    ports: Vec<PortSpec>,
    affinity_timeout_s: Option<u32>,
    external_local: bool,
    internal_local: bool,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<Cidr>,
    health_check_node_port: Option<u16>,
    /// `publishNotReadyAddresses`: every endpoint counts as ready.
    publish_not_ready: bool,
}

fn port_number(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|&p| p != 0)
}

/// An address of a dual-stack list: `Some` for IPv4, `None` for IPv6 (another family's
/// proxier's business, as kube-proxy filters `externalIPs`, ingress IPs and source ranges by
/// family), an error for anything else.
fn ip_of_family(
    ip: &str,
    field: &str,
    err: &dyn Fn(&str, String) -> TranslateError,
) -> Result<Option<Ipv4Addr>, TranslateError> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(Some(ip)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(err(field, format!("{ip:?} is not an IP address"))),
    }
}

/// Validates one Service. `Ok(None)` means the Service is valid but programs nothing
/// (headless, ExternalName, owned by another proxy).
fn service_spec(svc: &Service) -> Result<Option<ServiceSpec>, TranslateError> {
    let object = object_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
    let err = |field: &str, reason: String| TranslateError::Service {
        object: object.clone(),
        field: field.to_string(),
        reason,
    };
    let Some(name) = svc.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return Err(err("metadata.name", "required".into()));
    };
    if has_label(&svc.metadata, LABEL_SERVICE_PROXY_NAME) || has_label(&svc.metadata, LABEL_HEADLESS) {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(err("spec", "required".into()));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ExternalName" => return Ok(None),
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => return Err(err("spec.type", format!("unknown type {other:?}"))),
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Ok(None);
    }
    // Dual stack: `clusterIPs` holds one address per family, the primary first (equal to
    // `clusterIP`). lb serves IPv4, so it takes the IPv4 one whichever is primary, and leaves a
    // Service with none to an IPv6 proxy, as kube-proxy's IPv4 proxier does.
    let (field, ips): (&str, Vec<&str>) = match spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty()) {
        Some(ips) => ("spec.clusterIPs", ips.iter().map(String::as_str).collect()),
        None => ("spec.clusterIP", spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()).into_iter().collect()),
    };
    if ips.is_empty() {
        return Err(err(
            "spec.clusterIP",
            "required: without an API server there is no allocator, so set it explicitly".into(),
        ));
    }
    let mut cluster_ip = None;
    for (i, ip) in ips.iter().enumerate() {
        let f = if field == "spec.clusterIP" { field.to_string() } else { format!("{field}[{i}]") };
        if let Some(v4) = ip_of_family(ip, &f, &err)? {
            cluster_ip = cluster_ip.or(Some(v4));
        }
    }
    let Some(cluster_ip) = cluster_ip else { return Ok(None) };
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
            match u32::try_from(t) {
                Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t),
                _ => {
                    return Err(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is not in 1..{MAX_AFFINITY_TIMEOUT_S}"),
                    ))
                }
            }
        }
        Some(other) => {
            return Err(err("spec.sessionAffinity", format!("{other:?} is not one of \"None\", \"ClientIP\"")))
        }
    };
    let policy = |field: &str, v: Option<&str>| match v {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(err(field, format!("{other:?} is not one of \"Cluster\", \"Local\""))),
    };
    let external_local = policy("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let internal_local = policy("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;
    let has_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let is_lb = svc_type == "LoadBalancer";
    let node_ports_required =
        svc_type == "NodePort" || (is_lb && spec.allocate_load_balancer_node_ports != Some(false));

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(err("spec.ports", "at least one port is required".into()));
    }
    let mut out = Vec::with_capacity(ports.len());
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port = port_number(p.port)
            .ok_or_else(|| err(&format!("spec.ports[{i}].port"), format!("{} is not in 1..65535", p.port)))?;
        let protocol = Protocol::parse(p.protocol.as_deref())
            .map_err(|reason| err(&format!("spec.ports[{i}].protocol"), reason))?;
        let pname = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && pname.is_empty() {
            return Err(err(&format!("spec.ports[{i}].name"), "required when a Service has several ports".into()));
        }
        if !seen.insert((port, protocol)) {
            return Err(err(&format!("spec.ports[{i}]"), format!("duplicate port {port}/{protocol}")));
        }
        let node_port = match (has_node_ports, p.node_port) {
            (false, _) => None,
            (true, Some(n)) => Some(
                port_number(n)
                    .ok_or_else(|| err(&format!("spec.ports[{i}].nodePort"), format!("{n} is not in 1..65535")))?,
            ),
            (true, None) if node_ports_required => {
                return Err(err(
                    &format!("spec.ports[{i}].nodePort"),
                    "required: without an API server there is no allocator, so set it explicitly".into(),
                ))
            }
            (true, None) => None,
        };
        out.push(PortSpec { name: pname, port, protocol, node_port });
    }
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.extend(ip_of_family(ip, &format!("spec.externalIPs[{i}]"), &err)?);
    }
    let mut lb_ips = Vec::new();
    let mut source_ranges = Vec::new();
    if is_lb {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // `ipMode: Proxy` means the load balancer proxies to node ports itself; kube-proxy
            // then leaves the address alone, and so do we.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                lb_ips.extend(ip_of_family(ip, &format!("status.loadBalancer.ingress[{i}].ip"), &err)?);
            }
        }
        for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            let field = format!("spec.loadBalancerSourceRanges[{i}]");
            // An IPv6 prefix restricts IPv6 clients only (kube-proxy splits the list by family).
            if let Some((addr, _)) = r.trim().split_once('/') {
                if addr.parse::<std::net::Ipv6Addr>().is_ok() {
                    continue;
                }
            }
            source_ranges.push(r.parse().map_err(|e| err(&field, e))?);
        }
        source_ranges.sort();
        source_ranges.dedup();
    }
    let health_check_node_port = if is_lb && external_local {
        let n = spec.health_check_node_port.ok_or_else(|| {
            err(
                "spec.healthCheckNodePort",
                "required for externalTrafficPolicy: Local: without an API server there is no allocator".into(),
            )
        })?;
        Some(port_number(n).ok_or_else(|| err("spec.healthCheckNodePort", format!("{n} is not in 1..65535")))?)
    } else {
        None
    };
    Ok(Some(ServiceSpec {
        object,
        namespace: svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        cluster_ip,
        ports: out,
        affinity_timeout_s,
        external_local,
        internal_local,
        external_ips,
        lb_ips,
        source_ranges,
        health_check_node_port,
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
    }))
}

/// One endpoint address of a slice, with the conditions and hints endpoint choice needs.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    ip: Ipv4Addr,
    /// `nodeName` is this node.
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// One usable slice: its ports and IPv4 endpoints, validated.
struct SliceSpec {
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// Validates one EndpointSlice. `Ok(None)`: valid but carries nothing for us (IPv6, FQDN, or
/// a headless Service's slice).
fn slice_spec(slice: &EndpointSlice, node_name: &str) -> Result<Option<SliceSpec>, TranslateError> {
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
fn categorize(eps: &[(Endpoint, &SliceEndpoint)], node: &NodeInfo) -> (Vec<Endpoint>, Vec<Endpoint>) {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::manifests;

    /// Translates as seen from a node that hosts none of the endpoints.
    fn run(yaml: &str) -> Translation {
        run_on(yaml, "some-other-node")
    }

    fn run_on(yaml: &str, node: &str) -> Translation {
        let (objects, errors) = manifests::parse(&[(PathBuf::from("t.yaml"), yaml.to_string())]);
        assert!(errors.is_empty(), "{errors:?}");
        translate(&objects.services, &objects.slices, &NodeInfo::named(node))
    }

    fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend::cluster_ip(ip.parse().unwrap(), port, protocol)
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port, local: false }
    }

    fn local_ep(ip: &str, port: u16) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port, local: true }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web-http}
  - {name: metrics, port: 9090, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: metrics, port: 9100, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.244.1.11"]
  conditions: {ready: true}
  nodeName: node-1
- addresses: ["10.244.1.12"]
  conditions: {ready: false}
- addresses: ["10.244.1.13"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: ["10.244.2.21"]
  conditions: {ready: true}
- addresses: ["10.244.1.11"]
"#;

    #[test]
    fn multi_port_service_with_named_target_port_and_udp() {
        let t = run(WEB);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let s = &t.state.services;
        assert_eq!(s.len(), 3);
        // The named targetPort "web-http" resolves through the slice's port named "http".
        let http = &s[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(http.name, "shop/web:http");
        // Slices merged, duplicates removed, the not-ready endpoint left out, nil ready = ready.
        assert_eq!(http.backends, vec![ep("10.244.1.11", 8080), ep("10.244.1.13", 8080), ep("10.244.2.21", 8080)]);
        let metrics = &s[&fe("10.96.0.10", 9090, Protocol::Tcp)];
        assert_eq!(metrics.backends, vec![ep("10.244.1.11", 9100), ep("10.244.1.13", 9100)]);
        let dns = &s[&fe("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(dns.backends, vec![ep("10.244.1.11", 5353), ep("10.244.1.13", 5353)]);
    }

    #[test]
    fn unnamed_single_port_matches_unnamed_slice_port() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: web-service}
spec:
  clusterIP: 10.104.123.59
  ports: [{protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-service-x, labels: {kubernetes.io/service-name: web-service}}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints: [{addresses: ["10.244.1.11"]}]
"#);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let s = &t.state.services[&fe("10.104.123.59", 80, Protocol::Tcp)];
        assert_eq!(s.name, "default/web-service");
        assert_eq!(s.backends, vec![ep("10.244.1.11", 80)]);
    }

    #[test]
    fn slices_of_other_services_namespaces_and_protocols_do_not_leak() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.9.9"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-udp, namespace: a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80, protocol: UDP}]
endpoints: [{addresses: ["10.244.9.8"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: a, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00::1"]}]
"#);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(t.state.services[&fe("10.96.0.1", 80, Protocol::Tcp)].backends, vec![]);
    }

    #[test]
    fn headless_external_name_and_foreign_proxy_services_program_nothing() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: google-svc}
spec: {type: ExternalName, externalName: google.com}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
"#);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert!(t.state.services.is_empty());
    }

    #[test]
    fn service_without_slices_has_no_backends() {
        let t = run("apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n");
        assert_eq!(t.state.services[&fe("10.96.0.9", 80, Protocol::Tcp)].backends, vec![]);
    }

    /// Each malformed Service is rejected alone, with the object and field named; the good one
    /// is still programmed.
    #[test]
    fn malformed_services_are_rejected_alone() {
        let cases = [
            ("no-ip", "{ports: [{port: 80}]}", "spec.clusterIP"),
            ("bad-ip", "{clusterIP: 10.96.0.300, ports: [{port: 80}]}", "spec.clusterIP"),
            ("no-ports", "{clusterIP: 10.96.0.31}", "spec.ports"),
            ("port-zero", "{clusterIP: 10.96.0.32, ports: [{port: 0}]}", "spec.ports[0].port"),
            ("port-big", "{clusterIP: 10.96.0.33, ports: [{port: 70000}]}", "spec.ports[0].port"),
            ("sctp", "{clusterIP: 10.96.0.34, ports: [{port: 80, protocol: SCTP}]}", "spec.ports[0].protocol"),
            ("proto", "{clusterIP: 10.96.0.35, ports: [{port: 80, protocol: ICMP}]}", "spec.ports[0].protocol"),
            ("unnamed", "{clusterIP: 10.96.0.36, ports: [{name: a, port: 80}, {port: 81}]}", "spec.ports[1].name"),
            ("dup", "{clusterIP: 10.96.0.37, ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1]"),
            ("type", "{type: Weird, clusterIP: 10.96.0.38, ports: [{port: 80}]}", "spec.type"),
            ("no-spec", "null", "spec"),
        ];
        let mut yaml = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n");
        for (name, spec, _) in cases {
            yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n"));
        }
        let t = run(&yaml);
        assert_eq!(t.state.services.keys().copied().collect::<Vec<_>>(), vec![fe("10.96.0.2", 80, Protocol::Tcp)]);
        assert_eq!(t.errors.len(), cases.len(), "{:#?}", t.errors);
        for (name, _, field) in cases {
            let e = t
                .errors
                .iter()
                .find(|e| e.to_string().contains(&format!("default/{name}:")))
                .unwrap_or_else(|| panic!("no error for {name}: {:#?}", t.errors));
            assert!(e.to_string().contains(&format!("field {field}:")), "{name}: {e}");
        }
    }

    #[test]
    fn malformed_slice_is_rejected_alone() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: ["10.244.1.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: ["10.244.1.2"]}, {addresses: ["not-an-ip"]}]
"#);
        assert_eq!(t.errors.len(), 1);
        assert_eq!(
            t.errors[0].to_string(),
            "EndpointSlice default/bad: field endpoints[1].addresses[0]: \"not-an-ip\" is not an IPv4 address"
        );
        assert_eq!(t.state.services[&fe("10.96.0.1", 80, Protocol::Tcp)].backends, vec![ep("10.244.1.1", 8080)]);
    }

    #[test]
    fn two_services_claiming_one_frontend_conflict_and_the_first_wins() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
"#);
        assert_eq!(t.state.services[&fe("10.96.0.1", 80, Protocol::Tcp)].name, "default/a");
        assert!(matches!(&t.errors[..], [TranslateError::Conflict { object, .. }] if object == "default/b"));
    }

    #[test]
    fn session_affinity_and_its_timeout() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: lab}
spec:
  clusterIP: 10.96.0.1
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{name: a, port: 80}, {name: b, port: 81}]
---
apiVersion: v1
kind: Service
metadata: {name: default-timeout}
spec: {clusterIP: 10.96.0.2, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: none}
spec: {clusterIP: 10.96.0.3, sessionAffinity: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: too-long}
spec:
  clusterIP: 10.96.0.4
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: zero}
spec:
  clusterIP: 10.96.0.5
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: cookie}
spec: {clusterIP: 10.96.0.6, sessionAffinity: Cookie, ports: [{port: 80}]}
"#);
        let s = &t.state.services;
        // Every port of the Service gets the Service's affinity.
        assert_eq!(s[&fe("10.96.0.1", 80, Protocol::Tcp)].affinity_timeout_s, Some(60));
        assert_eq!(s[&fe("10.96.0.1", 81, Protocol::Tcp)].affinity_timeout_s, Some(60));
        assert_eq!(s[&fe("10.96.0.2", 80, Protocol::Tcp)].affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        assert_eq!(s[&fe("10.96.0.3", 80, Protocol::Tcp)].affinity_timeout_s, None);
        assert_eq!(s.len(), 4);
        let mut errors: Vec<String> = t.errors.iter().map(|e| e.to_string()).collect();
        errors.sort();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains("default/cookie: field spec.sessionAffinity:"), "{errors:#?}");
        assert!(errors[1].contains("default/too-long: field spec.sessionAffinityConfig.clientIP.timeoutSeconds:"));
        assert!(errors[2].contains("default/zero: field spec.sessionAffinityConfig.clientIP.timeoutSeconds:"));
    }

    /// The lab's `svc-np.yml`: the ClusterIP on the service port, and the node port.
    #[test]
    fn node_port_service_serves_its_cluster_ip_and_its_node_port() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: node-port}
spec: {type: NodePort, clusterIP: 10.97.190.203, ports: [{port: 8080, protocol: TCP, targetPort: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: node-port-1, labels: {kubernetes.io/service-name: node-port}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.2.5"], nodeName: node-b}]
"#);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let s = &t.state.services;
        let cip = &s[&fe("10.97.190.203", 8080, Protocol::Tcp)];
        assert!(!cip.external && !cip.local_only);
        let np = &s[&Frontend::node_port(30080, Protocol::Tcp)];
        assert!(np.external && !np.local_only);
        assert_eq!(np.backends, vec![ep("10.244.2.5", 80)]);
        // The ClusterIP with the node port is not a frontend.
        assert!(!s.contains_key(&fe("10.97.190.203", 30080, Protocol::Tcp)));
        assert_eq!(s.len(), 2);
    }

    const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: load-bal}
spec:
  type: LoadBalancer
  clusterIP: 10.101.245.108
  externalIPs: [192.168.49.50]
  loadBalancerSourceRanges: [192.168.49.0/28, 10.0.0.7/32]
  ports: [{port: 8080, protocol: TCP, targetPort: 80, nodePort: 30088}]
status:
  loadBalancer:
    ingress:
    - {ip: 192.168.49.200}
    - {ip: 192.168.49.201, ipMode: Proxy}
    - {hostname: lb.example.com}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: load-bal-1, labels: {kubernetes.io/service-name: load-bal}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: ["10.244.1.5"], nodeName: node-a}
- {addresses: ["10.244.2.5"], nodeName: node-b}
"#;

    #[test]
    fn load_balancer_ingress_ips_external_ips_and_source_ranges() {
        let t = run_on(LB, "node-a");
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let s = &t.state.services;
        let all = vec![local_ep("10.244.1.5", 80), ep("10.244.2.5", 80)];
        let lb = &s[&Frontend::external("192.168.49.200".parse().unwrap(), 8080, Protocol::Tcp)];
        assert_eq!(lb.backends, all);
        assert!(lb.external);
        assert_eq!(
            lb.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["10.0.0.7/32", "192.168.49.0/28"]
        );
        // ipMode: Proxy and hostname-only ingress entries are not served.
        assert!(!s.contains_key(&Frontend::external("192.168.49.201".parse().unwrap(), 8080, Protocol::Tcp)));
        // External IPs: served, without the source ranges (they are for LoadBalancer IPs).
        let ext = &s[&Frontend::external("192.168.49.50".parse().unwrap(), 8080, Protocol::Tcp)];
        assert!(ext.external && ext.source_ranges.is_empty());
        // Node port: no source ranges either.
        assert!(s[&Frontend::node_port(30088, Protocol::Tcp)].source_ranges.is_empty());
        assert_eq!(s.len(), 4);
        assert!(t.state.health_checks.is_empty());
    }

    #[test]
    fn traffic_policies_narrow_backends_per_kind_of_frontend() {
        let local_ext = LB.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        );
        let t = run_on(&local_ext, "node-a");
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let s = &t.state.services;
        // External frontends: local endpoints only, and marked local-only (drop when empty).
        for f in [
            Frontend::node_port(30088, Protocol::Tcp),
            Frontend::external("192.168.49.200".parse().unwrap(), 8080, Protocol::Tcp),
        ] {
            assert_eq!(s[&f].backends, vec![local_ep("10.244.1.5", 80)], "{f}");
            assert!(s[&f].local_only);
        }
        // The ClusterIP keeps every endpoint (internalTrafficPolicy is Cluster).
        assert_eq!(s[&fe("10.101.245.108", 8080, Protocol::Tcp)].backends.len(), 2);
        assert_eq!(
            t.state.health_checks[&32000],
            HealthCheck { service: "default/load-bal".into(), local_endpoints: 1 }
        );

        // On a node without local endpoints the external frontends are empty but present.
        let t = run_on(&local_ext, "node-c");
        assert!(t.state.services[&Frontend::node_port(30088, Protocol::Tcp)].backends.is_empty());
        assert_eq!(t.state.health_checks[&32000].local_endpoints, 0);

        let local_int = LB.replace("  type: LoadBalancer\n", "  type: LoadBalancer\n  internalTrafficPolicy: Local\n");
        let t = run_on(&local_int, "node-b");
        let cip = &t.state.services[&fe("10.101.245.108", 8080, Protocol::Tcp)];
        assert_eq!(cip.backends, vec![local_ep("10.244.2.5", 80)]);
        assert!(cip.local_only && !cip.external);
        assert_eq!(t.state.services[&Frontend::node_port(30088, Protocol::Tcp)].backends.len(), 2);
    }

    #[test]
    fn malformed_external_fields_are_rejected_alone() {
        let cases = [
            ("np-missing", "{type: NodePort, clusterIP: 10.96.1.1, ports: [{port: 80}]}", "spec.ports[0].nodePort"),
            ("np-big", "{type: NodePort, clusterIP: 10.96.1.2, ports: [{port: 80, nodePort: 70000}]}", "spec.ports[0].nodePort"),
            ("etp", "{type: NodePort, externalTrafficPolicy: Nearby, clusterIP: 10.96.1.3, ports: [{port: 80, nodePort: 30003}]}", "spec.externalTrafficPolicy"),
            ("itp", "{internalTrafficPolicy: Maybe, clusterIP: 10.96.1.4, ports: [{port: 80}]}", "spec.internalTrafficPolicy"),
            ("ext-ip", "{clusterIP: 10.96.1.5, externalIPs: [not-an-ip], ports: [{port: 80}]}", "spec.externalIPs[0]"),
            ("range", "{type: LoadBalancer, clusterIP: 10.96.1.6, loadBalancerSourceRanges: [10.0.0.0/33], ports: [{port: 80, nodePort: 30006}]}", "spec.loadBalancerSourceRanges[0]"),
            ("hc", "{type: LoadBalancer, externalTrafficPolicy: Local, clusterIP: 10.96.1.7, ports: [{port: 80, nodePort: 30007}]}", "spec.healthCheckNodePort"),
        ];
        let mut yaml = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30002}]}\n");
        for (name, spec, _) in cases {
            yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n"));
        }
        let t = run(&yaml);
        assert_eq!(t.state.services.len(), 2, "only the good Service: {:#?}", t.state.services.keys());
        assert_eq!(t.errors.len(), cases.len(), "{:#?}", t.errors);
        for (name, _, field) in cases {
            let e = t.errors.iter().find(|e| e.to_string().contains(&format!("default/{name}:"))).unwrap();
            assert!(e.to_string().contains(&format!("field {field}:")), "{name}: {e}");
        }
    }

    #[test]
    fn two_services_on_one_node_port_conflict() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30080}]}
"#);
        assert!(matches!(&t.errors[..], [TranslateError::Conflict { object, .. }] if object == "default/b"));
        assert!(!t.state.services.contains_key(&fe("10.96.0.2", 80, Protocol::Tcp)), "b is rejected whole");
    }

    /// No two frontends of a translation share a datapath key (exact address frontends of
    /// either kind share one key space).
    fn keys_unique(state: &DesiredState) {
        let mut keys = BTreeSet::new();
        for f in state.services.keys() {
            let exact = f.scope != Scope::NodePort;
            assert!(keys.insert((exact, f.ip, f.port, f.protocol)), "two frontends on the key of {f}");
        }
    }

    /// An external IP equal to another Service's ClusterIP (same port and protocol): the
    /// ClusterIP wins whatever the names or the order of the objects, and the other Service
    /// is rejected (reported as a conflict naming both).
    #[test]
    fn an_external_ip_on_another_services_cluster_ip_loses_to_the_cluster_ip() {
        let svc = |name: &str, spec: &str| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
        };
        let slice = |svc: &str, ip: &str| {
            format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [\"{ip}\"]}}]\n")
        };
        let key = fe("10.96.0.50", 80, Protocol::Tcp);
        let ext = Frontend::external("10.96.0.50".parse().unwrap(), 80, Protocol::Tcp);
        // The Service owning the ClusterIP sorts first, then last.
        for (cip_name, ext_name) in [("a-cip", "z-ext"), ("z-cip", "a-ext")] {
            let cip_svc =
                svc(cip_name, "{clusterIP: 10.96.0.50, ports: [{port: 80}]}") + &slice(cip_name, "10.244.1.1");
            let ext_svc = svc(ext_name, "{clusterIP: 10.96.0.60, externalIPs: [10.96.0.50], ports: [{port: 80}]}")
                + &slice(ext_name, "10.244.1.2");
            let alone = run(&cip_svc);
            for yaml in [cip_svc.clone() + &ext_svc, ext_svc.clone() + &cip_svc] {
                let t = run(&yaml);
                keys_unique(&t.state);
                assert_eq!(t.state.services[&key].name, format!("default/{cip_name}"));
                assert_eq!(t.state.services[&key].backends, vec![ep("10.244.1.1", 80)]);
                assert!(!t.state.services.contains_key(&ext));
                assert!(
                    !t.state.services.contains_key(&fe("10.96.0.60", 80, Protocol::Tcp)),
                    "the hijacking Service is rejected whole"
                );
                match &t.errors[..] {
                    [e @ TranslateError::Conflict { object, frontend, owner }] => {
                        assert_eq!(
                            (object.as_str(), owner.as_str()),
                            (&*format!("default/{ext_name}"), &*format!("default/{cip_name}"))
                        );
                        assert_eq!(*frontend, ext);
                        assert!(e.to_string().contains("10.96.0.50:80/TCP"), "{e}");
                    }
                    other => panic!("{other:?}"),
                }
                // Deleting the loser leaves the winner exactly as it was.
                assert_eq!(alone.state, t.state);
            }
            // Deleting the winner lets the loser take the key.
            let t = run(&ext_svc);
            assert!(t.errors.is_empty(), "{:?}", t.errors);
            assert_eq!(t.state.services[&ext].name, format!("default/{ext_name}"));
            assert_eq!(t.state.services[&ext].backends, vec![ep("10.244.1.2", 80)]);
            assert!(t.state.services[&ext].external);
        }
        // Another port or protocol is another key: no conflict.
        let t = run(&(svc("cip", "{clusterIP: 10.96.0.50, ports: [{port: 80}]}")
            + &svc("ext", "{clusterIP: 10.96.0.60, externalIPs: [10.96.0.50], ports: [{name: t, port: 8080}, {name: u, port: 80, protocol: UDP}]}")));
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(t.state.services.len(), 5);
        // A LoadBalancer ingress IP on a ClusterIP is treated alike.
        let t = run(&(svc("cip", "{clusterIP: 10.96.0.50, ports: [{port: 80}]}")
            + &svc("lb", "{type: LoadBalancer, clusterIP: 10.96.0.60, ports: [{port: 80, nodePort: 30050}]}")
            + "status: {loadBalancer: {ingress: [{ip: 10.96.0.50}]}}\n"));
        assert!(
            matches!(&t.errors[..], [TranslateError::Conflict { object, owner, .. }] if object == "default/lb" && owner == "default/cip"),
            "{:?}",
            t.errors
        );
        assert_eq!(t.state.services[&key].name, "default/cip");
        // A Service's external IP equal to its own ClusterIP is served as the ClusterIP.
        let t = run(&svc("own", "{clusterIP: 10.96.0.50, externalIPs: [10.96.0.50, 192.0.2.1], ports: [{port: 80}]}"));
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        keys_unique(&t.state);
        assert!(!t.state.services[&key].external);
        assert!(t.state.services[&Frontend::external("192.0.2.1".parse().unwrap(), 80, Protocol::Tcp)].external);
        assert_eq!(t.state.services.len(), 2);
    }

    /// One endpoint row of the semantics table: address suffix, node, ready, serving,
    /// terminating (None = field absent), zone hints, node hints.
    type Row =
        (u8, &'static str, Option<bool>, Option<bool>, Option<bool>, &'static [&'static str], &'static [&'static str]);

    /// A NodePort Service (ClusterIP 10.96.7.7:80, node port 30007) with `spec_extra` lines and
    /// one slice holding `rows`; returns the ClusterIP's and the node port's backend suffixes.
    fn semantics(spec_extra: &str, rows: &[Row], node: &NodeInfo) -> (Vec<u8>, Vec<u8>) {
        let mut eps = String::new();
        for (ip, node_name, ready, serving, terminating, zones, nodes) in rows {
            eps.push_str(&format!("- addresses: [\"10.244.0.{ip}\"]\n  nodeName: {node_name}\n  conditions: {{"));
            for (k, v) in [("ready", ready), ("serving", serving), ("terminating", terminating)] {
                if let Some(v) = v {
                    eps.push_str(&format!("{k}: {v}, "));
                }
            }
            eps.push_str("}\n");
            if !zones.is_empty() || !nodes.is_empty() {
                let list = |v: &[&str]| v.iter().map(|n| format!("{{name: {n}}}")).collect::<Vec<_>>().join(", ");
                eps.push_str(&format!("  hints: {{forZones: [{}], forNodes: [{}]}}\n", list(zones), list(nodes)));
            }
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: t}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.7.7\n{spec_extra}  ports:\n  - {{port: 80, targetPort: 8080, nodePort: 30007}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  namespace: t\n  labels: {{kubernetes.io/service-name: s}}\naddressType: IPv4\nports:\n- {{port: 8080}}\nendpoints:\n{eps}"
        );
        let files = vec![(PathBuf::from("t.yaml"), yaml)];
        let (objects, errors) = manifests::parse(&files);
        assert!(errors.is_empty(), "{errors:?}");
        let t = translate(&objects.services, &objects.slices, node);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let suffixes =
            |f: Frontend| -> Vec<u8> { t.state.services[&f].backends.iter().map(|e| e.ip.octets()[3]).collect() };
        (suffixes(fe("10.96.7.7", 80, Protocol::Tcp)), suffixes(Frontend::node_port(30007, Protocol::Tcp)))
    }

    #[test]
    fn endpoint_slice_semantics_table() {
        let a = NodeInfo { name: "node-a".into(), zone: Some("zone-1".into()) };
        let (t, f, n) = (Some(true), Some(false), None);
        const NONE: &[&str] = &[];
        type Case = (&'static str, &'static str, Vec<Row>, (Vec<u8>, Vec<u8>));
        let cases: Vec<Case> = vec![
            (
                "ready endpoints are used, not-ready ones are not",
                "",
                vec![
                    (1, "node-a", t, t, f, NONE, NONE),
                    (2, "node-b", f, f, f, NONE, NONE),
                    (3, "node-b", n, n, n, NONE, NONE),
                ],
                (vec![1, 3], vec![1, 3]),
            ),
            (
                "no ready endpoint: serving+terminating ones are the fallback",
                "",
                vec![
                    (1, "node-a", f, t, t, NONE, NONE),
                    (2, "node-b", f, f, t, NONE, NONE),
                    (3, "node-b", f, f, f, NONE, NONE),
                ],
                (vec![1], vec![1]),
            ),
            (
                "a ready endpoint beats terminating ones",
                "",
                vec![(1, "node-a", f, t, t, NONE, NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![2], vec![2]),
            ),
            (
                "serving but not terminating (plain not-ready) is never a fallback",
                "",
                vec![(1, "node-a", f, t, f, NONE, NONE)],
                (vec![], vec![]),
            ),
            (
                "publishNotReadyAddresses: not-ready endpoints count as ready",
                "  publishNotReadyAddresses: true\n",
                vec![(1, "node-a", f, f, f, NONE, NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![1, 2], vec![1, 2]),
            ),
            (
                "eTP Local: only this node's ready endpoints",
                "  externalTrafficPolicy: Local\n",
                vec![(1, "node-a", t, t, f, NONE, NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![1, 2], vec![1]),
            ),
            (
                "eTP Local: local terminating fallback even when remote ready ones exist",
                "  externalTrafficPolicy: Local\n",
                vec![(1, "node-a", f, t, t, NONE, NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![2], vec![1]),
            ),
            (
                "iTP Local: the ClusterIP gets local endpoints only",
                "  internalTrafficPolicy: Local\n",
                vec![(1, "node-a", t, t, f, NONE, NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![1], vec![1, 2]),
            ),
            (
                "zone hints honoured when all ready endpoints have them",
                "  trafficDistribution: PreferClose\n",
                vec![
                    (1, "node-a", t, t, f, &["zone-1"], NONE),
                    (2, "node-b", t, t, f, &["zone-2"], NONE),
                    (3, "node-c", t, t, f, &["zone-1"], NONE),
                ],
                (vec![1, 3], vec![1, 3]),
            ),
            (
                "zone hints ignored when one ready endpoint lacks them",
                "",
                vec![(1, "node-a", t, t, f, &["zone-1"], NONE), (2, "node-b", t, t, f, NONE, NONE)],
                (vec![1, 2], vec![1, 2]),
            ),
            (
                "zone hints ignored when none is for this zone",
                "",
                vec![(1, "node-a", t, t, f, &["zone-2"], NONE), (2, "node-b", t, t, f, &["zone-3"], NONE)],
                (vec![1, 2], vec![1, 2]),
            ),
            (
                "not-ready endpoints without hints do not disable hints",
                "",
                vec![
                    (1, "node-a", t, t, f, &["zone-1"], NONE),
                    (2, "node-b", t, t, f, &["zone-2"], NONE),
                    (3, "node-b", f, f, f, NONE, NONE),
                ],
                (vec![1], vec![1]),
            ),
            (
                "node hints (PreferSameNode) beat zone hints",
                "",
                vec![
                    (1, "node-a", t, t, f, &["zone-1"], &["node-a"]),
                    (2, "node-b", t, t, f, &["zone-1"], &["node-b"]),
                ],
                (vec![1], vec![1]),
            ),
            (
                "hints do not narrow the Local set",
                "  externalTrafficPolicy: Local\n",
                vec![(1, "node-a", t, t, f, &["zone-2"], NONE), (2, "node-b", t, t, f, &["zone-1"], NONE)],
                (vec![2], vec![1]),
            ),
        ];
        for (what, extra, rows, want) in cases {
            assert_eq!(semantics(extra, &rows, &a), want, "{what}");
        }
        // A node without a zone label cannot use zone hints: every endpoint.
        let rows: Vec<Row> = vec![(1, "node-a", t, t, f, &["zone-1"], NONE), (2, "node-b", t, t, f, &["zone-2"], NONE)];
        assert_eq!(semantics("", &rows, &NodeInfo::named("node-a")), (vec![1, 2], vec![1, 2]));
    }

    /// kube-proxy drops under a Local policy only when the Service has usable endpoints
    /// elsewhere; with none anywhere it rejects (`hasEndpoints` false), as without the policy.
    #[test]
    fn local_policies_drop_only_when_endpoints_exist_elsewhere() {
        // (what, endpoint conditions on node-b or "" for no slice, local_only expected)
        let cases = [
            ("no slice at all", None, false),
            ("a slice without endpoints", Some(""), false),
            ("ready endpoint on another node", Some("{ready: true}"), true),
            ("not ready, not terminating: unusable", Some("{ready: false, serving: false, terminating: false}"), false),
            (
                "serving while terminating elsewhere counts",
                Some("{ready: false, serving: true, terminating: true}"),
                true,
            ),
            ("terminating, not serving: unusable", Some("{ready: false, serving: false, terminating: true}"), false),
        ];
        for (what, conditions, want) in cases {
            let mut yaml = String::from(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 10.96.8.8\n  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.8]\n  ports: [{port: 80, nodePort: 30008}]\n",
            );
            if let Some(c) = conditions {
                let eps = if c.is_empty() {
                    "endpoints: []\n".to_string()
                } else {
                    format!("endpoints: [{{addresses: [10.244.2.8], nodeName: node-b, conditions: {c}}}]\n")
                };
                yaml.push_str(&format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: t, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: [{{port: 80}}]\n{eps}"));
            }
            let t = run_on(&yaml, "node-a");
            assert!(t.errors.is_empty(), "{what}: {:?}", t.errors);
            for f in [
                fe("10.96.8.8", 80, Protocol::Tcp),
                Frontend::node_port(30008, Protocol::Tcp),
                Frontend::external("192.0.2.8".parse().unwrap(), 80, Protocol::Tcp),
            ] {
                let sp = &t.state.services[&f];
                assert!(sp.backends.is_empty(), "{what}: {f}");
                assert_eq!(sp.local_only, want, "{what}: {f}");
            }
        }
        // A local endpoint: Local as usual, whatever the rest of the cluster has.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {internalTrafficPolicy: Local, clusterIP: 10.96.8.9, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.1.9], nodeName: node-a}]\n";
        let sp = &run_on(yaml, "node-a").state.services[&fe("10.96.8.9", 80, Protocol::Tcp)];
        assert!(sp.local_only);
        assert_eq!(sp.backends, vec![local_ep("10.244.1.9", 80)]);
    }

    #[test]
    fn proxy_name_and_headless_labels_exclude_services_and_slices() {
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: t, labels: {LABELS}}\nspec:\n  clusterIP: 10.96.7.8\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: t, labels: {kubernetes.io/service-name: s, SLICE}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.0.9]}]\n";
        let count = |svc: &str, slice: &str| {
            let t = run(&base.replace("LABELS", svc).replace("SLICE", slice));
            assert!(t.errors.is_empty(), "{:?}", t.errors);
            t.state.services.values().map(|s| s.backends.len()).collect::<Vec<_>>()
        };
        assert_eq!(count("app: x", "app: x"), vec![1]);
        assert_eq!(count("service.kubernetes.io/service-proxy-name: other", "app: x"), Vec::<usize>::new());
        assert_eq!(count("service.kubernetes.io/headless: \"\"", "app: x"), Vec::<usize>::new());
        assert_eq!(count("app: x", "service.kubernetes.io/headless: \"\""), vec![0]);
        assert_eq!(count("app: x", "service.kubernetes.io/service-proxy-name: other"), vec![0]);
    }

    #[test]
    fn dual_stack_services_are_served_on_their_ipv4_addresses() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: fd00:10:96::a
  clusterIPs: [fd00:10:96::a, 10.96.9.9]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: PreferDualStack
  externalIPs: [2001:db8::1, 192.0.2.7]
  loadBalancerSourceRanges: [2001:db8::/32, 198.51.100.0/24]
  ports: [{port: 80, nodePort: 30090}]
status:
  loadBalancer:
    ingress: [{ip: "2001:db8::99"}, {ip: 192.0.2.99}]
---
apiVersion: v1
kind: Service
metadata: {name: v6-only, namespace: t}
spec:
  clusterIP: fd00:10:96::b
  clusterIPs: [fd00:10:96::b]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: t}
spec:
  clusterIP: 10.96.9.10
  clusterIPs: [10.96.9.10, not-an-ip]
  ports: [{port: 80}]
"#);
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert!(t.errors[0].to_string().contains("Service t/bad: field spec.clusterIPs[1]"), "{}", t.errors[0]);
        let s = &t.state.services;
        assert!(s.contains_key(&fe("10.96.9.9", 80, Protocol::Tcp)));
        assert!(s.contains_key(&Frontend::node_port(30090, Protocol::Tcp)));
        assert!(s.contains_key(&Frontend::external("192.0.2.7".parse().unwrap(), 80, Protocol::Tcp)));
        let lb = &s[&Frontend::external("192.0.2.99".parse().unwrap(), 80, Protocol::Tcp)];
        assert_eq!(lb.source_ranges, vec!["198.51.100.0/24".parse::<Cidr>().unwrap()]);
        assert_eq!(s.len(), 4, "the IPv6-only Service is left to an IPv6 proxy: {:?}", s.keys());
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "192.168.49.7/28".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.49.0/28");
        assert!(c.contains("192.168.49.15".parse().unwrap()));
        assert!(!c.contains("192.168.49.16".parse().unwrap()));
        assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().len, 32);
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/40".parse::<Cidr>().is_err());
    }
}
