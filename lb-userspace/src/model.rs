//! The one pure translation: Kubernetes Services and EndpointSlices -> the frontends and
//! backend sets the datapath must serve. No I/O, no maps; every source (YAML files, the API
//! server) feeds this, and the dataplane applies its output as a difference.
//!
//! Semantics follow kube-proxy: the Service gives frontends; EndpointSlices labelled
//! `kubernetes.io/service-name` give backends, matched to service ports by port name and
//! protocol (the slice already carries the resolved target port number, so a named
//! `targetPort` is resolved through the slice's port names); endpoints whose `ready` condition is
//! false are left out (nil means ready, as the API documents).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::MAX_BACKENDS_PER_SERVICE;

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy ignores them too.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

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

/// Where clients connect: a ClusterIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// A backend pod address and the port it listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// What one frontend must do: its readable name and its ready backends (sorted, unique).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name` (the port part omitted for unnamed ports).
    pub name: String,
    pub backends: Vec<Endpoint>,
}

/// The complete desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServicePort>,
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
}

/// A Service after validation: what it asks the datapath for, before endpoints are known.
struct ServiceSpec {
    object: String,
    namespace: String,
    name: String,
    cluster_ip: Ipv4Addr,
    ports: Vec<PortSpec>,
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
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(err("spec", "required".into()));
    };
    match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ExternalName" => return Ok(None),
        // NodePort and LoadBalancer Services have a ClusterIP too; it is served like any other.
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => return Err(err("spec.type", format!("unknown type {other:?}"))),
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(None),
        None | Some("") => {
            return Err(err(
                "spec.clusterIP",
                "required: without an API server there is no allocator, so set it explicitly".into(),
            ))
        }
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => return Err(err("spec.clusterIP", format!("{ip}: IPv6 is not supported by lb yet"))),
            Err(_) => return Err(err("spec.clusterIP", format!("{ip:?} is not an IP address"))),
        },
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(err("spec.ports", "at least one port is required".into()));
    }
    let mut out = Vec::with_capacity(ports.len());
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&p| p != 0)
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
        out.push(PortSpec { name: pname, port, protocol });
    }
    Ok(Some(ServiceSpec {
        object,
        namespace: svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        cluster_ip,
        ports: out,
    }))
}

/// One usable slice: its ports and ready IPv4 addresses, validated.
struct SliceSpec {
    ports: Vec<(String, Protocol, u16)>,
    ready: Vec<Ipv4Addr>,
}

/// Validates one EndpointSlice. `Ok(None)`: valid but carries nothing for us (IPv6, FQDN).
fn slice_spec(slice: &EndpointSlice) -> Result<Option<SliceSpec>, TranslateError> {
    let object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
    let err = |field: String, reason: String| TranslateError::Slice { object: object.clone(), field, reason };
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A nil port means "all ports" and is only meaningful with no port names; kube-proxy
        // skips such entries, and so do we.
        let Some(port) = p.port else { continue };
        let port = u16::try_from(port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| err(format!("ports[{i}].port"), format!("{port} is not in 1..65535")))?;
        let protocol = Protocol::parse(p.protocol.as_deref()).map_err(|r| err(format!("ports[{i}].protocol"), r))?;
        ports.push((p.name.clone().unwrap_or_default(), protocol, port));
    }
    let mut ready = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let is_ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip: Ipv4Addr = a
                .parse()
                .map_err(|_| err(format!("endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IPv4 address")))?;
            if is_ready {
                ready.push(ip);
            }
        }
    }
    Ok(Some(SliceSpec { ports, ready }))
}

/// Translates the whole object set. Invalid objects are reported and left out alone.
pub fn translate(services: &[Service], slices: &[EndpointSlice]) -> Translation {
    let mut out = Translation::default();

    // Slices grouped by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<SliceSpec>> = BTreeMap::new();
    for slice in slices {
        let Some(svc_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        match slice_spec(slice) {
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

    let mut owners: BTreeMap<Frontend, String> = BTreeMap::new();
    'services: for spec in specs {
        let frontends: Vec<Frontend> = spec
            .ports
            .iter()
            .map(|p| Frontend { ip: spec.cluster_ip, port: p.port, protocol: p.protocol })
            .collect();
        for f in &frontends {
            if let Some(owner) = owners.get(f) {
                out.errors.push(TranslateError::Conflict { object: spec.object.clone(), frontend: *f, owner: owner.clone() });
                continue 'services;
            }
        }
        let slices = by_service.get(&(spec.namespace.clone(), spec.name.clone()));
        for (port, frontend) in spec.ports.iter().zip(frontends) {
            let mut backends = BTreeSet::new();
            for slice in slices.into_iter().flatten() {
                for (pname, proto, target) in &slice.ports {
                    if *pname == port.name && *proto == port.protocol {
                        backends.extend(slice.ready.iter().map(|&ip| Endpoint { ip, port: *target }));
                    }
                }
            }
            let mut backends: Vec<Endpoint> = backends.into_iter().collect();
            if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
                out.errors.push(TranslateError::Service {
                    object: spec.object.clone(),
                    field: "endpoints".into(),
                    reason: format!(
                        "{} ready endpoints for port {:?}; only the first {} are used",
                        backends.len(),
                        port.name,
                        MAX_BACKENDS_PER_SERVICE
                    ),
                });
                backends.truncate(MAX_BACKENDS_PER_SERVICE as usize);
            }
            let name = if port.name.is_empty() { spec.object.clone() } else { format!("{}:{}", spec.object, port.name) };
            owners.insert(frontend, spec.object.clone());
            out.state.services.insert(frontend, ServicePort { name, backends });
        }
    }
    out
}
