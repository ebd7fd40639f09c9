//! A Service validated: its frontends' addresses and ports, policies and affinity, before any
//! endpoint is known. Invalid fields are named in the error.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::Service;

use super::{
    has_label, object_name, Cidr, Protocol, TranslateError, DEFAULT_AFFINITY_TIMEOUT_S, LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT_S,
};

/// A Service port after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PortSpec {
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    pub(super) node_port: Option<u16>,
}

/// A Service after validation: what it asks the datapath for, before endpoints are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceSpec {
    pub(super) object: String,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) cluster_ip: Ipv4Addr,
    pub(super) ports: Vec<PortSpec>,
    pub(super) affinity_timeout_s: Option<u32>,
    pub(super) external_local: bool,
    pub(super) internal_local: bool,
    pub(super) external_ips: Vec<Ipv4Addr>,
    pub(super) lb_ips: Vec<Ipv4Addr>,
    pub(super) source_ranges: Vec<Cidr>,
    pub(super) health_check_node_port: Option<u16>,
    /// `publishNotReadyAddresses`: every endpoint counts as ready.
    pub(super) publish_not_ready: bool,
    /// Ports left out (unsupported protocol, malformed field), each named; the others serve.
    pub(super) skipped_ports: Vec<TranslateError>,
}

pub(super) fn port_number(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|&p| p != 0)
}

/// An address of a dual-stack list: `Some` for IPv4, `None` for IPv6 (another family's
/// proxier's business, as kube-proxy filters `externalIPs`, ingress IPs and source ranges by
/// family), an error for anything else.
pub(super) fn ip_of_family(
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
pub(super) fn service_spec(svc: &Service) -> Result<Option<ServiceSpec>, TranslateError> {
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
    // A bad port costs only itself (kube-proxy skips what it cannot serve, as an SCTP port on
    // a proxier without SCTP); the Service's other ports are still served.
    let port_err = |i: usize, field: &str, reason: String| TranslateError::ServicePort {
        object: object.clone(),
        field: format!("spec.ports[{i}]{field}"),
        reason,
    };
    let mut out = Vec::with_capacity(ports.len());
    let mut skipped_ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let checked = (|| {
            let port =
                port_number(p.port).ok_or_else(|| port_err(i, ".port", format!("{} is not in 1..65535", p.port)))?;
            let protocol = Protocol::parse(p.protocol.as_deref()).map_err(|reason| port_err(i, ".protocol", reason))?;
            let pname = p.name.clone().unwrap_or_default();
            if ports.len() > 1 && pname.is_empty() {
                return Err(port_err(i, ".name", "required when a Service has several ports".into()));
            }
            if !seen.insert((port, protocol)) {
                return Err(port_err(i, "", format!("duplicate port {port}/{protocol}")));
            }
            let node_port = match (has_node_ports, p.node_port) {
                (false, _) => None,
                (true, Some(n)) => {
                    Some(port_number(n).ok_or_else(|| port_err(i, ".nodePort", format!("{n} is not in 1..65535")))?)
                }
                (true, None) if node_ports_required => {
                    return Err(port_err(
                        i,
                        ".nodePort",
                        "required: without an API server there is no allocator, so set it explicitly".into(),
                    ))
                }
                (true, None) => None,
            };
            Ok(PortSpec { name: pname, port, protocol, node_port })
        })();
        match checked {
            Ok(p) => out.push(p),
            Err(e) => skipped_ports.push(e),
        }
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
        skipped_ports,
    }))
}
