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
    /// `sessionAffinity: ClientIP` with this timeout in seconds; `None` for `None`.
    pub affinity_timeout_s: Option<u32>,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for that field (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

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
    affinity_timeout_s: Option<u32>,
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
        affinity_timeout_s,
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
        let frontends: Vec<Frontend> =
            spec.ports.iter().map(|p| Frontend { ip: spec.cluster_ip, port: p.port, protocol: p.protocol }).collect();
        for f in &frontends {
            if let Some(owner) = owners.get(f) {
                out.errors.push(TranslateError::Conflict {
                    object: spec.object.clone(),
                    frontend: *f,
                    owner: owner.clone(),
                });
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
            let name =
                if port.name.is_empty() { spec.object.clone() } else { format!("{}:{}", spec.object, port.name) };
            owners.insert(frontend, spec.object.clone());
            out.state
                .services
                .insert(frontend, ServicePort { name, backends, affinity_timeout_s: spec.affinity_timeout_s });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::manifests;

    fn run(yaml: &str) -> Translation {
        let (objects, errors) = manifests::parse(&[(PathBuf::from("t.yaml"), yaml.to_string())]);
        assert!(errors.is_empty(), "{errors:?}");
        translate(&objects.services, &objects.slices)
    }

    fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend { ip: ip.parse().unwrap(), port, protocol }
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port }
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
            ("v6", "{clusterIP: 'fd00::1', ports: [{port: 80}]}", "spec.clusterIP"),
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

    #[test]
    fn nodeport_and_loadbalancer_services_serve_their_cluster_ip() {
        let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: node-port}
spec: {type: NodePort, clusterIP: 10.97.190.203, ports: [{port: 8080, targetPort: 80, nodePort: 30080}]}
"#);
        assert!(t.state.services.contains_key(&fe("10.97.190.203", 8080, Protocol::Tcp)));
    }
}
