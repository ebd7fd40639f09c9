//! A Service validated: its frontends' addresses and ports, policies and affinity, before any
//! endpoint is known. Invalid fields are named in the error.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

use super::{
    has_label, object_name, Cidr, IpFamily, Protocol, TranslateError, DEFAULT_AFFINITY_TIMEOUT_S, LABEL_HEADLESS,
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

/// What a Service asks of one address family: kube-proxy's per-family proxier sees a Service
/// only if it has a ClusterIP of its family, and then only its family's external IPs,
/// LoadBalancer ingress IPs and source ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FamilySpec {
    pub(super) family: IpFamily,
    pub(super) cluster_ip: IpAddr,
    pub(super) external_ips: Vec<IpAddr>,
    pub(super) lb_ips: Vec<IpAddr>,
    pub(super) source_ranges: Vec<Cidr>,
}

/// A Service after validation: what it asks the datapath for, before endpoints are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceSpec {
    pub(super) object: String,
    pub(super) namespace: String,
    pub(super) name: String,
    /// One per family the Service has a ClusterIP of, the primary (`clusterIPs[0]`) first.
    pub(super) families: Vec<FamilySpec>,
    pub(super) ports: Vec<PortSpec>,
    pub(super) affinity_timeout_s: Option<u32>,
    pub(super) external_local: bool,
    pub(super) internal_local: bool,
    pub(super) health_check_node_port: Option<u16>,
    /// `publishNotReadyAddresses`: every endpoint counts as ready.
    pub(super) publish_not_ready: bool,
    /// Ports and addresses left out (unsupported protocol, malformed field), each named; the
    /// rest of the Service is served.
    pub(super) skipped: Vec<TranslateError>,
}

pub(super) fn port_number(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|&p| p != 0)
}

/// An address of a Service field, of either family.
fn ip_field(ip: &str, field: &str, err: &dyn Fn(&str, String) -> TranslateError) -> Result<IpAddr, TranslateError> {
    parse_ip(ip.trim()).ok_or_else(|| err(field, format!("{ip:?} is not an IP address")))
}

/// An address as the API server's validation has let it through, and kube-proxy reads it
/// (`netutils.ParseIPSloppy`): IPv4 octets may carry leading zeros, read as decimal
/// (`010.1.2.3` is 10.1.2.3). Stored objects from before the API server refused them still
/// hold such addresses, and Rust's parser refuses them, which would have left the whole
/// Service out.
pub(super) fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next().filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
        let digits = part.trim_start_matches('0');
        *o = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    }
    parts.next().is_none().then_some(IpAddr::from(octets))
}

/// The Service's ClusterIPs, one per family, the primary first: `clusterIPs` (or `clusterIP`
/// alone), checked against `ipFamilies` and `ipFamilyPolicy` as the API server would have.
/// The API server always writes them consistently; a YAML file may not, and without an
/// allocator every address must be given.
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    err: &dyn Fn(&str, String) -> TranslateError,
) -> Result<Vec<IpAddr>, TranslateError> {
    let listed = spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty());
    let single = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let mut ips = Vec::new();
    match listed {
        Some(list) => {
            for (i, ip) in list.iter().enumerate() {
                ips.push(ip_field(ip, &format!("spec.clusterIPs[{i}]"), err)?);
            }
            if let Some(primary) = single {
                if ip_field(primary, "spec.clusterIP", err)? != ips[0] {
                    return Err(err("spec.clusterIP", format!("{primary:?} is not spec.clusterIPs[0] ({})", ips[0])));
                }
            }
        }
        None => ips.extend(single.map(|ip| ip_field(ip, "spec.clusterIP", err)).transpose()?),
    }
    if ips.is_empty() {
        return Err(err(
            "spec.clusterIP",
            "required: without an API server there is no allocator, so set it explicitly".into(),
        ));
    }
    if ips.len() > 2 || (ips.len() == 2 && IpFamily::of(ips[0]) == IpFamily::of(ips[1])) {
        return Err(err("spec.clusterIPs", "at most one address of each family (IPv4, IPv6)".into()));
    }
    if let Some(families) = spec.ip_families.as_deref().filter(|f| !f.is_empty()) {
        let mut parsed = Vec::new();
        for (i, f) in families.iter().enumerate() {
            parsed.push(IpFamily::parse(f).ok_or_else(|| {
                err(&format!("spec.ipFamilies[{i}]"), format!("{f:?} is not one of \"IPv4\", \"IPv6\""))
            })?);
        }
        let of_ips: Vec<IpFamily> = ips.iter().map(|ip| IpFamily::of(*ip)).collect();
        if parsed != of_ips {
            let names = |v: &[IpFamily]| v.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
            return Err(err(
                "spec.ipFamilies",
                format!(
                    "[{}] does not match the families of the ClusterIPs ([{}]); without an API server there is no \
                     allocator, so give one address per family in spec.clusterIPs",
                    names(&parsed),
                    names(&of_ips)
                ),
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") => {}
        Some("SingleStack") if ips.len() == 1 => {}
        Some("SingleStack") => {
            return Err(err("spec.ipFamilyPolicy", "SingleStack with two ClusterIPs".into()));
        }
        Some("RequireDualStack") if ips.len() == 2 => {}
        Some("RequireDualStack") => {
            return Err(err(
                "spec.ipFamilyPolicy",
                "RequireDualStack with one ClusterIP: without an API server there is no allocator, so give both \
                 in spec.clusterIPs"
                    .into(),
            ));
        }
        Some(other) => {
            return Err(err(
                "spec.ipFamilyPolicy",
                format!("{other:?} is not one of \"SingleStack\", \"PreferDualStack\", \"RequireDualStack\""),
            ));
        }
    }
    Ok(ips)
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
    let headless = |ip: Option<&str>| ip.is_some_and(|ip| ip == "None");
    if headless(spec.cluster_ip.as_deref()) || headless(spec.cluster_ips.iter().flatten().next().map(String::as_str)) {
        return Ok(None);
    }
    let cluster_ips = cluster_ips(spec, &err)?;
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
    let mut skipped = Vec::new();
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
            Err(e) => skipped.push(e),
        }
    }
    // Every address of every family is checked; each family then gets its own.
    // A malformed address costs only itself, as kube-proxy skips it: the Service's other
    // addresses are still served.
    let addr_err = |field: &str, reason: String| TranslateError::ServiceAddress {
        object: object.clone(),
        field: field.to_string(),
        reason,
    };
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip_field(ip, &format!("spec.externalIPs[{i}]"), &addr_err) {
            Ok(ip) => external_ips.push(ip),
            Err(e) => skipped.push(e),
        }
    }
    let mut lb_ips = Vec::new();
    let mut source_ranges: Vec<Cidr> = Vec::new();
    if is_lb {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // `ipMode: Proxy` means the load balancer proxies to node ports itself; kube-proxy
            // then leaves the address alone, and so do we.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                match ip_field(ip, &format!("status.loadBalancer.ingress[{i}].ip"), &addr_err) {
                    Ok(ip) => lb_ips.push(ip),
                    Err(e) => skipped.push(e),
                }
            }
        }
        for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            let field = format!("spec.loadBalancerSourceRanges[{i}]");
            source_ranges.push(r.parse().map_err(|e| err(&field, e))?);
        }
        source_ranges.sort();
        source_ranges.dedup();
    }
    // As kube-proxy splits these lists by family: an IPv6 external IP, ingress IP or source
    // range concerns the IPv6 frontends only, and the lists of a family the Service has no
    // ClusterIP of are not served at all. A family without source ranges of its own admits
    // every client of that family, as kube-proxy's proxier of that family does.
    let families = cluster_ips
        .iter()
        .map(|&cluster_ip| {
            let family = IpFamily::of(cluster_ip);
            let mine = |v: &[IpAddr]| v.iter().copied().filter(|ip| IpFamily::of(*ip) == family).collect();
            FamilySpec {
                family,
                cluster_ip,
                external_ips: mine(&external_ips),
                lb_ips: mine(&lb_ips),
                source_ranges: source_ranges.iter().copied().filter(|c| c.family() == family).collect(),
            }
        })
        .collect();
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
        families,
        ports: out,
        affinity_timeout_s,
        external_local,
        internal_local,
        health_check_node_port,
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        skipped,
    }))
}
