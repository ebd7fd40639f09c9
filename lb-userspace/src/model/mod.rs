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
//! except that a ClusterIP always beats another Service's external or LoadBalancer IP; the
//! losing Service keeps every other frontend it has.
//!
//! - `service`: a Service validated into what it asks of the datapath;
//! - `endpoints`: an EndpointSlice validated into endpoints with conditions and hints;
//! - `topology`: which endpoints serve, cluster-wide and node-locally;
//! - `translate`: the whole object set into frontends and backend sets.
mod endpoints;
mod incremental;
mod service;
mod topology;
mod translate;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

pub use incremental::{Changes, Translator};
pub use translate::translate;

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

pub(super) fn has_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
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
    pub(super) fn parse(field: Option<&str>) -> Result<Self, String> {
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
    /// A node port, on every node address of its family; `ip` is that family's unspecified address.
    NodePort,
    /// What pods and the node itself get at an `External` frontend of an
    /// `externalTrafficPolicy: Local` Service: cluster-wide endpoints (kube-proxy's
    /// short-circuit: only traffic from outside is kept on this node's endpoints).
    ExternalFromCluster,
    /// The same for a node port.
    NodePortFromCluster,
}

/// An address family. A Service is served on each family it has a ClusterIP of, as
/// kube-proxy runs one proxier per family: the IPv4 frontends get the IPv4 slices' endpoints,
/// the IPv6 ones the IPv6 slices', and neither knows of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// `0.0.0.0` or `::`: the address of a node port frontend of this family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            IpFamily::V4 => Ipv4Addr::UNSPECIFIED.into(),
            IpFamily::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// Address bits: a prefix of this family is at most this long.
    pub fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// `lb_common::FAMILY_IPV4` or `FAMILY_IPV6`.
    pub fn tag(self) -> u8 {
        match self {
            IpFamily::V4 => lb_common::FAMILY_IPV4,
            IpFamily::V6 => lb_common::FAMILY_IPV6,
        }
    }

    /// The Kubernetes name (`ipFamilies`, EndpointSlice `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where clients connect: an address, port and protocol, and how it is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// The unspecified address of its family for a node port.
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    pub fn cluster_ip(ip: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Self {
        Self { ip: ip.into(), port, protocol, scope: Scope::ClusterIp }
    }

    /// A node port on the node's IPv4 addresses.
    pub fn node_port(port: u16, protocol: Protocol) -> Self {
        Self::node_port_of(IpFamily::V4, port, protocol)
    }

    /// A node port on the node's IPv6 addresses.
    pub fn node_port_v6(port: u16, protocol: Protocol) -> Self {
        Self::node_port_of(IpFamily::V6, port, protocol)
    }

    /// A node port on the node's addresses of `family`: one datapath key per family, as each
    /// family's proxier of kube-proxy opens the port on its own family's addresses.
    pub fn node_port_of(family: IpFamily, port: u16, protocol: Protocol) -> Self {
        Self { ip: family.unspecified(), port, protocol, scope: Scope::NodePort }
    }

    pub fn external(ip: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Self {
        Self { ip: ip.into(), port, protocol, scope: Scope::External }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.ip)
    }

    /// The short-circuit companion of an external frontend (`None` for a ClusterIP).
    pub fn from_cluster(self) -> Option<Self> {
        let scope = match self.scope {
            Scope::External => Scope::ExternalFromCluster,
            Scope::NodePort => Scope::NodePortFromCluster,
            _ => return None,
        };
        Some(Self { scope, ..self })
    }

    /// Whether this is a short-circuit companion, which never claims a datapath key of its
    /// own: it lives and dies with its external frontend.
    pub fn is_from_cluster(&self) -> bool {
        matches!(self.scope, Scope::ExternalFromCluster | Scope::NodePortFromCluster)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A node port of IPv6 shows as `[*]:PORT`, an IPv6 address in brackets, as in a URL.
        let any = if self.family() == IpFamily::V6 { "[*]" } else { "*" };
        let at = SocketAddr::new(self.ip, self.port);
        match self.scope {
            Scope::NodePort => write!(f, "{any}:{}/{}", self.port, self.protocol),
            Scope::NodePortFromCluster => write!(f, "{any}:{}/{} (from pods and node)", self.port, self.protocol),
            Scope::ExternalFromCluster => write!(f, "{at}/{} (from pods and node)", self.protocol),
            _ => write!(f, "{at}/{}", self.protocol),
        }
    }
}

/// A backend pod address and the port it listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.ip, self.port))
    }
}

/// An IPv4 or IPv6 prefix, as in `loadBalancerSourceRanges`, `--cluster-cidr` or
/// `--nodeport-addresses`; the address is kept with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

fn masked(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ipv4Addr::from(u32::from(a) & mask).into()
        }
        IpAddr::V6(a) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            Ipv6Addr::from(u128::from(a) & mask).into()
        }
    }
}

impl Cidr {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }

    /// Whether `ip` is inside; an address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpFamily::of(ip) == self.family() && masked(ip, self.len) == self.addr
    }
}

/// Whether `--nodeport-addresses` `cidrs` select the node address `ip`: as kube-proxy's
/// `NewNodePortAddresses`, a family none of them is of is selected whole (the family's `/0`),
/// so a list of IPv4 CIDRs leaves IPv6 node ports on every IPv6 address.
pub fn node_port_address_selected(cidrs: &[Cidr], ip: IpAddr) -> bool {
    let family = IpFamily::of(ip);
    let mut of_family = cidrs.iter().filter(|c| c.family() == family).peekable();
    of_family.peek().is_none() || of_family.any(|c| c.contains(ip))
}

/// Whether `--nodeport-addresses` `cidrs` select every address of `family` (none of them is of
/// it, or one is its `/0`: kube-proxy's `MatchAll`).
pub fn node_port_family_whole(cidrs: &[Cidr], family: IpFamily) -> bool {
    let mut of_family = cidrs.iter().filter(|c| c.family() == family).peekable();
    of_family.peek().is_none() || of_family.any(|c| c.len == 0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (a, l) = match t.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an IPv4 or IPv6 CIDR"))?;
        let bits = IpFamily::of(addr).bits();
        let len = match l {
            None => bits,
            Some(l) => l.parse().ok().filter(|&l| l <= bits).ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
        };
        Ok(Cidr { addr: masked(addr, len), len })
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
    /// Every serving endpoint of the Service port in the cluster (ready, or serving while
    /// terminating; sorted, unique), whatever traffic policy, topology or the per-Service cut
    /// leave in `backends`: a UDP flow keeps its entries while its backend is one of these or
    /// of `backends`, as kube-proxy's conntrack cleanup (`CleanStaleEntries`) keeps it, so a
    /// pod that starts terminating or a policy that flips does not cut the flows it still
    /// answers. (A state made by hand may leave it empty: `backends` then stand for it.)
    pub serving: Vec<Endpoint>,
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
    /// Local ready endpoints per family the Service has. The port is opened on each of these
    /// families, and a probe is answered with its own family's count, as each of
    /// kube-proxy's per-family proxiers counts only its family's endpoints.
    pub local_endpoints: BTreeMap<IpFamily, usize>,
}

impl HealthCheck {
    /// The count a probe arriving over `family` is answered with.
    pub fn local_endpoints_of(&self, family: IpFamily) -> usize {
        self.local_endpoints.get(&family).copied().unwrap_or(0)
    }
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

/// What was left out of the translation, and why; everything else is still programmed.
/// `Service` leaves a whole Service out; the others only the part they name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum TranslateError {
    #[error("Service {object}: field {field}: {reason}")]
    Service { object: String, field: String, reason: String },
    #[error("Service {object}: field {field}: {reason}; this port is skipped, the others are served")]
    ServicePort { object: String, field: String, reason: String },
    #[error("Service {object}: field {field}: {reason}; this address is skipped, the rest of the Service is served")]
    ServiceAddress { object: String, field: String, reason: String },
    #[error("EndpointSlice {object}: field {field}: {reason}; skipped")]
    Slice { object: String, field: String, reason: String },
    #[error("Service {object}: frontend {frontend} is already served by Service {owner}; this frontend is skipped, the others are served")]
    Conflict { object: String, frontend: Frontend, owner: String },
    #[error("Service {object}: field spec.healthCheckNodePort: {port} is already used by Service {owner}; no health check is served for this Service")]
    HealthCheckConflict { object: String, port: u16, owner: String },
    #[error("Service {object}: {count} endpoints for {what}; only the first {max} are used")]
    TooManyEndpoints { object: String, what: String, count: usize, max: usize },
}

impl TranslateError {
    /// Whether the whole object is left out (not only a port or an endpoint of it).
    pub fn rejects_object(&self) -> bool {
        matches!(self, TranslateError::Service { .. })
    }

    /// The Service this is about (`namespace/name`), if any.
    pub fn service(&self) -> Option<&str> {
        match self {
            TranslateError::Service { object, .. }
            | TranslateError::ServicePort { object, .. }
            | TranslateError::ServiceAddress { object, .. }
            | TranslateError::Conflict { object, .. }
            | TranslateError::HealthCheckConflict { object, .. }
            | TranslateError::TooManyEndpoints { object, .. } => Some(object),
            TranslateError::Slice { .. } => None,
        }
    }
}

/// Result of a translation: the state to program, and the objects that were left out.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<TranslateError>,
}

pub(super) fn object_name(ns: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", ns.map_or("default", |s| s.as_str()), name.map_or("<unnamed>", |s| s.as_str()))
}

#[cfg(test)]
mod tests;
