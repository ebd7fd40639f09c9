//! Translation tables: Services and EndpointSlices in, frontends and backends out.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

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
    Frontend::cluster_ip(ip.parse::<IpAddr>().unwrap(), port, protocol)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
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
    let t = run(
        "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n",
    );
    assert_eq!(t.state.services[&fe("10.96.0.9", 80, Protocol::Tcp)].backends, vec![]);
}

/// Each malformed Service is rejected alone, with the object and field named; the good one
/// is still programmed. A malformed or unsupported port skips only that port.
#[test]
fn malformed_services_are_rejected_alone() {
    // (name, spec, field named, frontends left)
    let cases: [(&str, &str, &str, &[u16]); 11] = [
        ("no-ip", "{ports: [{port: 80}]}", "spec.clusterIP", &[]),
        ("bad-ip", "{clusterIP: 10.96.0.300, ports: [{port: 80}]}", "spec.clusterIP", &[]),
        ("no-ports", "{clusterIP: 10.96.0.31}", "spec.ports", &[]),
        (
            "port-zero",
            "{clusterIP: 10.96.0.32, ports: [{name: a, port: 0}, {name: b, port: 81}]}",
            "spec.ports[0].port",
            &[81],
        ),
        ("port-big", "{clusterIP: 10.96.0.33, ports: [{port: 70000}]}", "spec.ports[0].port", &[]),
        (
            "sctp",
            "{clusterIP: 10.96.0.34, ports: [{name: s, port: 80, protocol: SCTP}, {name: t, port: 80}]}",
            "spec.ports[0].protocol",
            &[80],
        ),
        ("proto", "{clusterIP: 10.96.0.35, ports: [{port: 80, protocol: ICMP}]}", "spec.ports[0].protocol", &[]),
        ("unnamed", "{clusterIP: 10.96.0.36, ports: [{name: a, port: 80}, {port: 81}]}", "spec.ports[1].name", &[80]),
        ("dup", "{clusterIP: 10.96.0.37, ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1]", &[80]),
        ("type", "{type: Weird, clusterIP: 10.96.0.38, ports: [{port: 80}]}", "spec.type", &[]),
        ("no-spec", "null", "spec", &[]),
    ];
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n",
    );
    for (name, spec, _, _) in cases {
        yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n"));
    }
    let t = run(&yaml);
    assert_eq!(t.errors.len(), cases.len(), "{:#?}", t.errors);
    let mut want = vec![fe("10.96.0.2", 80, Protocol::Tcp)];
    for (name, spec, field, ports) in cases {
        let e = t
            .errors
            .iter()
            .find(|e| e.to_string().contains(&format!("default/{name}:")))
            .unwrap_or_else(|| panic!("no error for {name}: {:#?}", t.errors));
        assert!(e.to_string().contains(&format!("field {field}:")), "{name}: {e}");
        assert_eq!(e.rejects_object(), !field.starts_with("spec.ports["), "{name}: {e}");
        let ip = spec.split("clusterIP: ").nth(1).map(|s| s.split(',').next().unwrap());
        for p in ports {
            want.push(fe(ip.unwrap(), *p, Protocol::Tcp));
        }
    }
    want.sort();
    assert_eq!(t.state.services.keys().copied().collect::<Vec<_>>(), want);
}

/// A bad port or endpoint of a slice skips only itself; the rest of the slice serves.
#[test]
fn malformed_slice_parts_are_skipped_alone() {
    let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.1, ports: [{name: a, port: 80}, {name: b, port: 81}, {name: c, port: 82}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints: [{addresses: ["10.244.1.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 0}, {name: c, port: 8082, protocol: SCTP}]
endpoints: [{addresses: ["10.244.1.2"]}, {addresses: ["not-an-ip"]}, {addresses: []}, {addresses: ["10.244.1.3", "10.244.1.4"]}]
"#);
    let errors: Vec<String> = t.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        vec![
            "EndpointSlice default/bad: field endpoints[1].addresses[0]: \"not-an-ip\" is not an IPv4 address; skipped",
            "EndpointSlice default/bad: field endpoints[2].addresses: empty; skipped",
            "EndpointSlice default/bad: field ports[1].port: 0 is not in 1..65535; skipped",
            "EndpointSlice default/bad: field ports[2].protocol: SCTP is not supported by lb yet; skipped",
        ]
    );
    // Only addresses[0] of an endpoint is used, as kube-proxy does.
    assert_eq!(
        t.state.services[&fe("10.96.0.1", 80, Protocol::Tcp)].backends,
        vec![ep("10.244.1.1", 8080), ep("10.244.1.2", 8080), ep("10.244.1.3", 8080)]
    );
    assert_eq!(t.state.services[&fe("10.96.0.1", 81, Protocol::Tcp)].backends, vec![]);
    assert_eq!(t.state.services[&fe("10.96.0.1", 82, Protocol::Tcp)].backends, vec![]);
}

/// A frontend listed twice in one Service is served once; the Service is not rejected.
#[test]
fn duplicate_frontends_inside_one_service_are_served_once() {
    let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: twice}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalIPs: [192.0.2.40, 192.0.2.40, 192.0.2.41]
  loadBalancerSourceRanges: [198.51.100.0/24]
  ports: [{port: 80, nodePort: 30040}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.41}]}}
"#);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let s = &t.state.services;
    assert_eq!(s.len(), 4, "{:?}", s.keys());
    // The LoadBalancer IP is listed first, with its source ranges.
    let lb = &s[&Frontend::external(ip("192.0.2.41"), 80, Protocol::Tcp)];
    assert_eq!(lb.source_ranges.len(), 1);
}

/// An absent `serving` condition reads as true (kube-proxy's reading), so a terminating
/// endpoint without it is a fallback.
#[test]
fn absent_serving_reads_as_true() {
    let t = run(r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.41, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.1.9"], conditions: {ready: false, terminating: true}}]
"#);
    assert_eq!(t.state.services[&fe("10.96.0.41", 80, Protocol::Tcp)].backends, vec![ep("10.244.1.9", 80)]);
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
    let lb = &s[&Frontend::external(ip("192.168.49.200"), 8080, Protocol::Tcp)];
    assert_eq!(lb.backends, all);
    assert!(lb.external);
    assert_eq!(lb.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>(), ["10.0.0.7/32", "192.168.49.0/28"]);
    // ipMode: Proxy and hostname-only ingress entries are not served.
    assert!(!s.contains_key(&Frontend::external(ip("192.168.49.201"), 8080, Protocol::Tcp)));
    // External IPs: served, without the source ranges (they are for LoadBalancer IPs).
    let ext = &s[&Frontend::external(ip("192.168.49.50"), 8080, Protocol::Tcp)];
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
    for f in [Frontend::node_port(30088, Protocol::Tcp), Frontend::external(ip("192.168.49.200"), 8080, Protocol::Tcp)]
    {
        assert_eq!(s[&f].backends, vec![local_ep("10.244.1.5", 80)], "{f}");
        assert!(s[&f].local_only);
    }
    // The ClusterIP keeps every endpoint (internalTrafficPolicy is Cluster).
    assert_eq!(s[&fe("10.101.245.108", 8080, Protocol::Tcp)].backends.len(), 2);
    assert_eq!(
        t.state.health_checks[&32000],
        HealthCheck { service: "default/load-bal".into(), local_endpoints: BTreeMap::from([(IpFamily::V4, 1)]) }
    );

    // On a node without local endpoints the external frontends are empty but present.
    let t = run_on(&local_ext, "node-c");
    assert!(t.state.services[&Frontend::node_port(30088, Protocol::Tcp)].backends.is_empty());
    assert_eq!(t.state.health_checks[&32000].local_endpoints_of(IpFamily::V4), 0);

    let local_int = LB.replace("  type: LoadBalancer\n", "  type: LoadBalancer\n  internalTrafficPolicy: Local\n");
    let t = run_on(&local_int, "node-b");
    let cip = &t.state.services[&fe("10.101.245.108", 8080, Protocol::Tcp)];
    assert_eq!(cip.backends, vec![local_ep("10.244.2.5", 80)]);
    assert!(cip.local_only && !cip.external);
    assert_eq!(t.state.services[&Frontend::node_port(30088, Protocol::Tcp)].backends.len(), 2);
}

/// What a UDP flow is swept against (`ServicePort::serving`): every endpoint that serves the
/// port anywhere, ready or terminating, whatever the policy leaves in `backends`; not one
/// that neither is ready nor serves.
#[test]
fn serving_endpoints_are_every_serving_one_whatever_policy_picks() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32053\n  clusterIP: 10.96.0.10\n  ports: [{port: 53, protocol: UDP, nodePort: 30053}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{port: 5353, protocol: UDP}]\nendpoints:\n- {addresses: [10.244.1.5], nodeName: node-a}\n- {addresses: [10.244.2.5], nodeName: node-b}\n- {addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}\n- {addresses: [10.244.2.8], nodeName: node-b, conditions: {ready: false, serving: false}}\n";
    let t = run_on(yaml, "node-a");
    let remote = |ip: &str| Endpoint { ip: ip.parse().unwrap(), port: 5353, local: false };
    let local = Endpoint { ip: "10.244.1.5".parse().unwrap(), port: 5353, local: true };
    let serving = vec![local, remote("10.244.2.5"), remote("10.244.2.6")];
    let cip = &t.state.services[&fe("10.96.0.10", 53, Protocol::Udp)];
    assert_eq!(cip.backends, vec![local, remote("10.244.2.5")]);
    assert_eq!(cip.serving, serving);
    // The node port keeps only the local endpoint under the Local policy; its flows to the
    // others still count as served.
    let np = &t.state.services[&Frontend::node_port(30053, Protocol::Udp)];
    assert_eq!(np.backends, vec![local]);
    assert_eq!(np.serving, serving);
}

#[test]
fn malformed_external_fields_are_rejected_alone() {
    let cases = [
            ("np-missing", "{type: NodePort, clusterIP: 10.96.1.1, ports: [{port: 80}]}", "spec.ports[0].nodePort"),
            ("np-big", "{type: NodePort, clusterIP: 10.96.1.2, ports: [{port: 80, nodePort: 70000}]}", "spec.ports[0].nodePort"),
            ("etp", "{type: NodePort, externalTrafficPolicy: Nearby, clusterIP: 10.96.1.3, ports: [{port: 80, nodePort: 30003}]}", "spec.externalTrafficPolicy"),
            ("itp", "{internalTrafficPolicy: Maybe, clusterIP: 10.96.1.4, ports: [{port: 80}]}", "spec.internalTrafficPolicy"),
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

/// A malformed external or ingress address costs only itself, as kube-proxy skips it: the
/// Service's ClusterIP and other addresses are served, with a note naming the field. An IPv4
/// address with leading zeros, which the API server once accepted and stored objects still
/// hold, is read as kube-proxy reads it (decimal), in Services and in EndpointSlices.
#[test]
fn a_malformed_address_is_skipped_alone_and_leading_zeros_are_read_as_kube_proxy_reads_them() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.1.5\n  externalIPs: [not-an-ip, 203.0.113.07]\n  ports: [{port: 80, nodePort: 30005}]\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.300}, {ip: 198.051.100.9}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [010.244.001.005]}\n- {addresses: [10.244.1.256]}\n";
    let t = run(yaml);
    let ep = Endpoint { ip: "10.244.1.5".parse().unwrap(), port: 8080, local: false };
    for f in [
        fe("10.96.1.5", 80, Protocol::Tcp),
        Frontend::node_port(30005, Protocol::Tcp),
        Frontend::external(ip("203.0.113.7"), 80, Protocol::Tcp),
        Frontend::external(ip("198.51.100.9"), 80, Protocol::Tcp),
    ] {
        assert_eq!(t.state.services.get(&f).map(|sp| sp.backends.clone()), Some(vec![ep]), "{f}");
    }
    assert_eq!(t.state.services.len(), 4, "{:#?}", t.state.services.keys());
    let notes: Vec<String> = t.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(notes.len(), 3, "{notes:#?}");
    for field in ["spec.externalIPs[0]", "status.loadBalancer.ingress[0].ip", "endpoints[1].addresses[0]"] {
        assert!(notes.iter().any(|n| n.contains(&format!("field {field}:"))), "{field}: {notes:#?}");
    }
    assert!(t.errors.iter().all(|e| !e.rejects_object()), "{notes:#?}");
    for bad in ["1.2.3", "1.2.3.4.5", "1..2.3", "1.2.3.-4", "1.2.3.0x4", "a.b.c.d", ""] {
        assert_eq!(super::service::parse_ip(bad), None, "{bad:?}");
    }
    assert_eq!(super::service::parse_ip("000.0.00.1"), Some("0.0.0.1".parse().unwrap()));
    assert_eq!(super::service::parse_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
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
    // kube-proxy programs both and the first rule wins; b keeps what nobody else holds.
    assert!(t.state.services.contains_key(&fe("10.96.0.2", 80, Protocol::Tcp)), "b's ClusterIP is served");
    let node_ports: Vec<&str> =
        t.state.services.iter().filter(|(f, _)| f.scope == Scope::NodePort).map(|(_, sp)| sp.name.as_str()).collect();
    assert!(!node_ports.is_empty() && node_ports.iter().all(|n| *n == "default/a"), "{node_ports:?}");
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
/// loses that frontend only (reported as a conflict naming both); its own ClusterIP and
/// other external IPs are still served, as kube-proxy serves them.
#[test]
fn an_external_ip_on_another_services_cluster_ip_loses_to_the_cluster_ip() {
    let svc = |name: &str, spec: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    let slice = |svc: &str, ip: &str| {
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [\"{ip}\"]}}]\n")
    };
    let key = fe("10.96.0.50", 80, Protocol::Tcp);
    let ext = Frontend::external(ip("10.96.0.50"), 80, Protocol::Tcp);
    // The Service owning the ClusterIP sorts first, then last.
    for (cip_name, ext_name) in [("a-cip", "z-ext"), ("z-cip", "a-ext")] {
        let cip_svc = svc(cip_name, "{clusterIP: 10.96.0.50, ports: [{port: 80}]}") + &slice(cip_name, "10.244.1.1");
        let ext_svc =
            svc(ext_name, "{clusterIP: 10.96.0.60, externalIPs: [10.96.0.50, 192.0.2.9], ports: [{port: 80}]}")
                + &slice(ext_name, "10.244.1.2");
        let alone = run(&cip_svc);
        let loser_alone = run(&ext_svc);
        for yaml in [cip_svc.clone() + &ext_svc, ext_svc.clone() + &cip_svc] {
            let t = run(&yaml);
            keys_unique(&t.state);
            assert_eq!(t.state.services[&key].name, format!("default/{cip_name}"));
            assert_eq!(t.state.services[&key].backends, vec![ep("10.244.1.1", 80)]);
            assert!(!t.state.services.contains_key(&ext));
            for kept in [fe("10.96.0.60", 80, Protocol::Tcp), Frontend::external(ip("192.0.2.9"), 80, Protocol::Tcp)] {
                assert_eq!(t.state.services[&kept].name, format!("default/{ext_name}"), "{kept}");
                assert_eq!(t.state.services[&kept].backends, vec![ep("10.244.1.2", 80)], "{kept}");
            }
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
            // Each Service's frontends are exactly what it has alone, less the lost one.
            let mut both = alone.state.clone();
            both.services
                .extend(loser_alone.state.services.iter().filter(|(f, _)| **f != ext).map(|(f, sp)| (*f, sp.clone())));
            assert_eq!(both, t.state);
        }
        // Deleting the winner lets the loser take the key.
        let t = loser_alone;
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
    assert!(t.state.services[&Frontend::external(ip("192.0.2.1"), 80, Protocol::Tcp)].external);
    assert_eq!(t.state.services.len(), 2);
}

fn ipv4_last(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(_) => panic!("{ip} is not IPv4"),
    }
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
    let suffixes = |f: Frontend| -> Vec<u8> { t.state.services[&f].backends.iter().map(|e| ipv4_last(e.ip)).collect() };
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
            vec![(1, "node-a", t, t, f, &["zone-1"], &["node-a"]), (2, "node-b", t, t, f, &["zone-1"], &["node-b"])],
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
        ("serving while terminating elsewhere counts", Some("{ready: false, serving: true, terminating: true}"), true),
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
            Frontend::external(ip("192.0.2.8"), 80, Protocol::Tcp),
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

/// A dual-stack LoadBalancer (IPv6 primary), an IPv6-only Service and a malformed one: every
/// family a Service has a ClusterIP of is served, each from its own family's slices, with its
/// own family's external IPs, ingress IPs and source ranges, as kube-proxy's two proxiers do.
const DUAL: &str = r#"
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
  ports: [{port: 80, targetPort: 8080, nodePort: 30090}]
status:
  loadBalancer:
    ingress: [{ip: "2001:db8::99"}, {ip: 192.0.2.99}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v4, namespace: t, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v6, namespace: t, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:244:2::5"], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-fqdn, namespace: t, labels: {kubernetes.io/service-name: dual}}
addressType: FQDN
ports: [{port: 8080}]
endpoints:
- {addresses: [web.example.com]}
---
apiVersion: v1
kind: Service
metadata: {name: v6-only, namespace: t}
spec:
  clusterIP: fd00:10:96::b
  clusterIPs: [fd00:10:96::b]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports: [{port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-only-1, namespace: t, labels: {kubernetes.io/service-name: v6-only}}
addressType: IPv6
ports: [{port: 53, protocol: UDP}]
endpoints:
- {addresses: ["fd00:244:1::53"], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6-only-v4, namespace: t, labels: {kubernetes.io/service-name: v6-only}}
addressType: IPv4
ports: [{port: 53, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.53], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: t}
spec:
  clusterIP: 10.96.9.10
  clusterIPs: [10.96.9.10, not-an-ip]
  ports: [{port: 80}]
"#;

#[test]
fn dual_stack_services_are_served_on_both_families_from_their_own_slices() {
    let t = run_on(DUAL, "node-a");
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert!(t.errors[0].to_string().contains("Service t/bad: field spec.clusterIPs[1]"), "{}", t.errors[0]);
    let s = &t.state.services;
    let v4 = vec![local_ep("10.244.1.5", 8080), ep("10.244.2.5", 8080)];
    let v6 = vec![ep("fd00:244:2::5", 8080)];
    // Each family's frontends get that family's slices only (the FQDN slice feeds none).
    assert_eq!(s[&fe("10.96.9.9", 80, Protocol::Tcp)].backends, v4);
    assert_eq!(s[&fe("fd00:10:96::a", 80, Protocol::Tcp)].backends, v6);
    assert_eq!(s[&Frontend::node_port(30090, Protocol::Tcp)].backends, v4);
    assert_eq!(s[&Frontend::node_port_v6(30090, Protocol::Tcp)].backends, v6);
    for (ext, want) in [("192.0.2.7", &v4), ("2001:db8::1", &v6), ("192.0.2.99", &v4), ("2001:db8::99", &v6)] {
        let f = Frontend::external(ip(ext), 80, Protocol::Tcp);
        assert_eq!(&s[&f].backends, want, "{f}");
        assert!(s[&f].external, "{f}");
    }
    // Source ranges apply to the LoadBalancer IP of their own family only.
    let ranges = |a: &str| s[&Frontend::external(ip(a), 80, Protocol::Tcp)].source_ranges.clone();
    assert_eq!(ranges("192.0.2.99"), vec!["198.51.100.0/24".parse::<Cidr>().unwrap()]);
    assert_eq!(ranges("2001:db8::99"), vec!["2001:db8::/32".parse::<Cidr>().unwrap()]);
    assert!(ranges("2001:db8::1").is_empty(), "external IPs have no source ranges");
    // The IPv6-only Service is served on IPv6 alone; its IPv4 slice feeds nothing.
    assert_eq!(s[&fe("fd00:10:96::b", 53, Protocol::Udp)].backends, vec![local_ep("fd00:244:1::53", 53)]);
    assert!(s.keys().filter(|f| f.port == 53).all(|f| f.family() == IpFamily::V6));
    assert_eq!(s.len(), 9, "{:?}", s.keys());
    // Frontends show IPv6 addresses in brackets.
    assert_eq!(fe("fd00:10:96::a", 80, Protocol::Tcp).to_string(), "[fd00:10:96::a]:80/TCP");
    assert_eq!(Frontend::node_port_v6(30090, Protocol::Tcp).to_string(), "[*]:30090/TCP");
    assert_eq!(ep("fd00:244:2::5", 8080).to_string(), "[fd00:244:2::5]:8080");
}

/// `clusterIPs` holds one address per family, the primary first, as `ipFamilies` orders the
/// families; whatever the order, each address is served as its family's ClusterIP. Fields
/// an API server keeps consistent are checked, since a YAML file may not be.
#[test]
fn cluster_ips_families_and_policies_are_checked() {
    let svc = |name: &str, spec: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {spec}\n")
    };
    let ok = [
        // IPv4 primary, then IPv6.
        ("v4-first", "{clusterIPs: [10.96.1.1, 'fd00::1'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}"),
        // IPv6 primary; clusterIP repeats clusterIPs[0].
        ("v6-first", "{clusterIP: 'fd00::2', clusterIPs: ['fd00::2', 10.96.1.2], ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}"),
        // clusterIP alone, of IPv6, without ipFamilies (an older API server).
        ("v6-single", "{clusterIP: 'fd00::3', ports: [{port: 80}]}"),
        // PreferDualStack on a single-stack cluster: one address.
        ("prefer", "{clusterIPs: [10.96.1.4], ipFamilies: [IPv4], ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}"),
    ];
    let bad = [
        (
            "fam-order",
            "{clusterIPs: [10.96.2.1, 'fd00::21'], ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}",
            "spec.ipFamilies",
        ),
        ("fam-name", "{clusterIPs: [10.96.2.2], ipFamilies: [IPv5], ports: [{port: 80}]}", "spec.ipFamilies[0]"),
        ("two-v4", "{clusterIPs: [10.96.2.3, 10.96.2.4], ports: [{port: 80}]}", "spec.clusterIPs"),
        (
            "single-two",
            "{clusterIPs: [10.96.2.5, 'fd00::25'], ipFamilyPolicy: SingleStack, ports: [{port: 80}]}",
            "spec.ipFamilyPolicy",
        ),
        (
            "require-one",
            "{clusterIPs: [10.96.2.6], ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}",
            "spec.ipFamilyPolicy",
        ),
        (
            "policy-name",
            "{clusterIPs: [10.96.2.7], ipFamilyPolicy: Sometimes, ports: [{port: 80}]}",
            "spec.ipFamilyPolicy",
        ),
        (
            "primary",
            "{clusterIP: 10.96.2.8, clusterIPs: [10.96.2.9, 'fd00::29'], ports: [{port: 80}]}",
            "spec.clusterIP",
        ),
    ];
    let yaml: String = ok.iter().map(|(n, s)| svc(n, s)).chain(bad.iter().map(|(n, s, _)| svc(n, s))).collect();
    let t = run(&yaml);
    let s = &t.state.services;
    for a in ["10.96.1.1", "fd00::1", "fd00::2", "10.96.1.2", "fd00::3", "10.96.1.4"] {
        assert!(s.contains_key(&fe(a, 80, Protocol::Tcp)), "{a}: {:?}", s.keys());
    }
    assert_eq!(s.len(), 6, "{:?}", s.keys());
    assert_eq!(t.errors.len(), bad.len(), "{:?}", t.errors);
    for (name, _, field) in bad {
        let e = t.errors.iter().find(|e| e.service() == Some(&format!("t/{name}"))).unwrap_or_else(|| panic!("{name}"));
        assert!(e.to_string().contains(&format!("field {field}:")), "{name}: {e}");
        assert!(e.rejects_object(), "{e}");
    }
}

/// EndpointSlices are paired with the Service's families by `addressType`; an address of the
/// other family inside a slice skips that endpoint alone, with an error naming it.
#[test]
fn slices_feed_only_their_familys_frontends() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: v4, namespace: t}
spec: {clusterIP: 10.96.3.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v4-6, namespace: t, labels: {kubernetes.io/service-name: v4}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00:244::1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v4-4, namespace: t, labels: {kubernetes.io/service-name: v4}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: ["fd00:244::2"]}]
"#;
    let t = run(yaml);
    assert_eq!(t.state.services[&fe("10.96.3.1", 80, Protocol::Tcp)].backends, vec![ep("10.244.0.1", 80)]);
    assert_eq!(t.state.services.len(), 1);
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    let e = t.errors[0].to_string();
    assert!(
        e.contains("EndpointSlice t/v4-4: field endpoints[1].addresses[0]") && e.contains("not an IPv4 address"),
        "{e}"
    );
}

/// Traffic policies on a dual-stack Service: each family chooses its own local endpoints, the
/// health check counts each family's, and the no-local-endpoint counts are per family.
#[test]
fn dual_stack_traffic_policies_choose_per_family() {
    let local = DUAL.replace(
        "  type: LoadBalancer\n  clusterIP: fd00:10:96::a\n",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  healthCheckNodePort: 32090\n  clusterIP: fd00:10:96::a\n",
    );
    let t = run_on(&local, "node-a");
    let s = &t.state.services;
    // node-a has an IPv4 endpoint of `dual` and no IPv6 one.
    assert_eq!(s[&Frontend::node_port(30090, Protocol::Tcp)].backends, vec![local_ep("10.244.1.5", 8080)]);
    let np6 = &s[&Frontend::node_port_v6(30090, Protocol::Tcp)];
    assert!(np6.backends.is_empty() && np6.local_only, "dropped, not rejected: endpoints exist elsewhere");
    // The short-circuit companions carry each family's cluster-wide endpoints.
    let np6_inside = &s[&Frontend::node_port_v6(30090, Protocol::Tcp).from_cluster().unwrap()];
    assert_eq!(np6_inside.backends, vec![ep("fd00:244:2::5", 8080)]);
    assert!(s[&fe("fd00:10:96::a", 80, Protocol::Tcp)].backends.is_empty());
    assert_eq!(s[&fe("10.96.9.9", 80, Protocol::Tcp)].backends, vec![local_ep("10.244.1.5", 8080)]);
    let hc = &t.state.health_checks[&32090];
    assert_eq!(hc.local_endpoints, BTreeMap::from([(IpFamily::V4, 1), (IpFamily::V6, 0)]));
    // One port per family: IPv6 lacks a local endpoint for both policies.
    let mut tr = Translator::new(NodeInfo::named("node-a"));
    let (objects, _) = manifests::parse(&[(PathBuf::from("t.yaml"), local.clone())]);
    tr.relist_services(objects.services.iter());
    tr.relist_slices(objects.slices.iter());
    tr.sync();
    assert_eq!(tr.no_local_endpoints(), (1, 1));
    // On node-b it is the other way round.
    let t = run_on(&local, "node-b");
    assert_eq!(t.state.health_checks[&32090].local_endpoints, BTreeMap::from([(IpFamily::V4, 1), (IpFamily::V6, 1)]));
    assert_eq!(
        t.state.services[&fe("fd00:10:96::a", 80, Protocol::Tcp)].backends,
        vec![local_ep("fd00:244:2::5", 8080)]
    );
}

#[test]
fn cidr_parsing_and_matching() {
    let v6: Cidr = "fd00:10:244:1::7/64".parse().unwrap();
    assert_eq!(v6.to_string(), "fd00:10:244:1::/64");
    assert!(v6.contains(ip("fd00:10:244:1::ffff")));
    assert!(!v6.contains(ip("fd00:10:244:2::1")));
    assert!(!v6.contains(ip("10.244.1.1")), "never an address of the other family");
    assert!(!"0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("::1")));
    assert_eq!("fd00::1".parse::<Cidr>().unwrap().len, 128);
    assert!("fd00::/129".parse::<Cidr>().is_err());
    assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001:db8::1")));
    let c: Cidr = "192.168.49.7/28".parse().unwrap();
    assert_eq!(c.to_string(), "192.168.49.0/28");
    assert!(c.contains("192.168.49.15".parse().unwrap()));
    assert!(!c.contains("192.168.49.16".parse().unwrap()));
    assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().len, 32);
    assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
    assert!("10.0.0.0/40".parse::<Cidr>().is_err());
}

/// eTP Local: outside traffic keeps to this node's endpoints, while pods and the node itself
/// get every endpoint of the cluster at the same external frontends (kube-proxy's
/// short-circuit), written as companion frontends the datapath picks for such sources.
#[test]
fn external_local_short_circuits_traffic_from_pods_and_the_node() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n  clusterIP: 10.96.8.20\n  externalIPs: [192.0.2.20]\n  ports: [{port: 80, nodePort: 30020}]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.21}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints:\n- {addresses: [10.244.1.1], nodeName: node-a}\n- {addresses: [10.244.2.1], nodeName: node-b}\n";
    let t = run_on(yaml, "node-a");
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let both = vec![local_ep("10.244.1.1", 80), ep("10.244.2.1", 80)];
    for f in [
        Frontend::node_port(30020, Protocol::Tcp),
        Frontend::external(ip("192.0.2.20"), 80, Protocol::Tcp),
        Frontend::external(ip("192.0.2.21"), 80, Protocol::Tcp),
    ] {
        let outside = &t.state.services[&f];
        assert_eq!(outside.backends, vec![local_ep("10.244.1.1", 80)], "{f}");
        assert!(outside.local_only);
        let inside = &t.state.services[&f.from_cluster().unwrap()];
        assert_eq!(inside.backends, both, "{f}");
        assert!(!inside.local_only && !inside.external, "no SNAT for the cluster's own sources");
        assert_eq!(inside.source_ranges, outside.source_ranges);
    }
    assert_eq!(t.state.services[&fe("10.96.8.20", 80, Protocol::Tcp)].backends, both);
    assert_eq!(t.state.services.len(), 7);
    // Cluster policy: no companions.
    let t = run_on(&yaml.replace("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n", ""), "node-a");
    assert!(t.state.services.keys().all(|f| !f.is_from_cluster()));
}

/// The per-frontend endpoint cut comes after endpoint choice: a Local frontend keeps its local
/// endpoints even when the cluster has more than the cut, and the health check count never
/// exceeds what is programmed.
#[test]
fn endpoint_cut_comes_after_selection_and_health_counts_agree() {
    let max = lb_common::MAX_BACKENDS_PER_SERVICE as usize;
    let mut eps = String::new();
    // max + 10 remote endpoints sorting before the local ones, and max + 5 local ones.
    for i in 0..max + 10 {
        eps.push_str(&format!("- {{addresses: [10.1.{}.{}], nodeName: node-b}}\n", i / 250, i % 250));
    }
    for i in 0..max + 5 {
        eps.push_str(&format!("- {{addresses: [10.200.{}.{}], nodeName: node-a}}\n", i / 250, i % 250));
    }
    let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: big}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n  clusterIP: 10.96.8.30\n  ports: [{{port: 80, nodePort: 30030}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-1, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{eps}");
    let t = run_on(&yaml, "node-a");
    let np = &t.state.services[&Frontend::node_port(30030, Protocol::Tcp)];
    assert_eq!(np.backends.len(), max);
    assert!(np.backends.iter().all(|e| e.local), "the local set is cut, not the candidates");
    assert_eq!(t.state.services[&fe("10.96.8.30", 80, Protocol::Tcp)].backends.len(), max);
    assert_eq!(t.state.health_checks[&32002].local_endpoints_of(IpFamily::V4), max);
    assert_eq!(t.errors.iter().filter(|e| matches!(e, TranslateError::TooManyEndpoints { .. })).count(), 2);
}

/// A small seeded generator (xorshift), so a failing sequence can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random Service from small pools of addresses and ports, so that Services often claim
/// the same frontends (ClusterIP against ClusterIP, external IP against ClusterIP, node
/// ports, health check ports) and conflicts come and go.
///
/// With `dual`, Services are of either family or both (either primary), from pools of both
/// families, and now and then inconsistent (families against addresses, policy against count).
fn random_service(r: &mut Rng, name: &str, dual: bool) -> k8s_openapi::api::core::v1::Service {
    let ips = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "10.96.0.5"];
    let ips6 = ["fd00:96::1", "fd00:96::2", "fd00:96::3", "fd00:96::4", "fd00:96::5"];
    let types = ["ClusterIP", "NodePort", "LoadBalancer"];
    let t = *r.pick(&types);
    let mut ports = Vec::new();
    for (i, pname) in ["a", "b"].iter().enumerate().take(1 + r.below(2) as usize) {
        let mut p = serde_json::json!({"name": pname, "port": 80 + r.below(2) * (i as u64 + 1),
            "protocol": if r.chance(80) { "TCP" } else if r.chance(50) { "UDP" } else { "SCTP" }});
        if t != "ClusterIP" {
            p["nodePort"] = serde_json::json!(30000 + r.below(3));
        }
        if r.chance(5) {
            p["port"] = serde_json::json!(0);
        }
        ports.push(p);
    }
    let mut spec = serde_json::json!({"type": t, "clusterIP": r.pick(&ips), "ports": ports});
    if r.chance(40) {
        let n = 1 + r.below(2) as usize;
        spec["externalIPs"] = serde_json::json!((0..n).map(|_| *r.pick(&ips)).collect::<Vec<_>>());
    }
    if t != "ClusterIP" && r.chance(50) {
        spec["externalTrafficPolicy"] = serde_json::json!("Local");
        if t == "LoadBalancer" {
            spec["healthCheckNodePort"] = serde_json::json!(32000 + r.below(2));
        }
    }
    if r.chance(30) {
        spec["internalTrafficPolicy"] = serde_json::json!("Local");
    }
    if r.chance(20) {
        spec["sessionAffinity"] = serde_json::json!("ClientIP");
    }
    if r.chance(10) {
        spec["publishNotReadyAddresses"] = serde_json::json!(true);
    }
    if r.chance(3) {
        spec["clusterIP"] = serde_json::json!("not-an-ip");
    }
    if dual {
        let (v4, v6) = (*r.pick(&ips), *r.pick(&ips6));
        let (list, families): (Vec<&str>, Vec<&str>) = match r.below(4) {
            0 => (vec![v4], vec!["IPv4"]),
            1 => (vec![v6], vec!["IPv6"]),
            2 => (vec![v4, v6], vec!["IPv4", "IPv6"]),
            _ => (vec![v6, v4], vec!["IPv6", "IPv4"]),
        };
        spec["clusterIP"] = serde_json::json!(list[0]);
        spec["clusterIPs"] = serde_json::json!(list);
        spec["ipFamilies"] = serde_json::json!(families);
        let policy = if list.len() == 2 { r.pick(&["PreferDualStack", "RequireDualStack"]) } else { &"SingleStack" };
        spec["ipFamilyPolicy"] = serde_json::json!(policy);
        if r.chance(3) {
            // The API server never writes this; a YAML file may.
            spec["ipFamilies"] = serde_json::json!(["IPv6", "IPv4"]);
        }
        if r.chance(40) {
            let pool: Vec<&str> = ips.iter().chain(ips6.iter()).copied().collect();
            spec["externalIPs"] = serde_json::json!((0..1 + r.below(3)).map(|_| *r.pick(&pool)).collect::<Vec<_>>());
        }
        if t == "LoadBalancer" && r.chance(50) {
            spec["loadBalancerSourceRanges"] =
                serde_json::json!([r.pick(&["192.0.2.0/24", "10.0.0.0/8"]), r.pick(&["fd00::/8", "2001:db8::/32"])]);
        }
    }
    let mut svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"}, "spec": spec});
    if t == "LoadBalancer" && r.chance(70) {
        let ingress = if dual {
            serde_json::json!([{"ip": r.pick(&["192.0.2.1", "10.96.0.3"])}, {"ip": r.pick(&["2001:db8::1", "fd00:96::3"])}])
        } else {
            serde_json::json!([{"ip": r.pick(&["192.0.2.1", "10.96.0.3"])}])
        };
        svc["status"] = serde_json::json!({"loadBalancer": {"ingress": ingress}});
    }
    serde_json::from_value(svc).expect("a Service")
}

/// A random slice; with `dual`, of either family (now and then FQDN, or with an address of
/// the other family).
fn random_slice(r: &mut Rng, name: &str, service: &str, dual: bool) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let family = if !dual {
        "IPv4"
    } else {
        match r.below(10) {
            0 => "FQDN",
            1..=4 => "IPv4",
            _ => "IPv6",
        }
    };
    let flag = |r: &mut Rng| -> serde_json::Value {
        match r.below(3) {
            0 => serde_json::Value::Null,
            1 => serde_json::json!(true),
            _ => serde_json::json!(false),
        }
    };
    let zones = ["z1", "z2"];
    let all_hinted = r.chance(50);
    let endpoints: Vec<serde_json::Value> = (0..r.below(5))
        .map(|_| {
            let mut conditions = serde_json::Map::new();
            for c in ["ready", "serving", "terminating"] {
                let v = flag(r);
                if !v.is_null() {
                    conditions.insert(c.into(), v);
                }
            }
            let v6 = family == "IPv6" && !r.chance(5) || family != "IPv6" && dual && r.chance(5);
            let a = if v6 {
                format!("fd00:244:{}::{}", r.below(2), 1 + r.below(6))
            } else {
                format!("10.244.{}.{}", r.below(2), 1 + r.below(6))
            };
            let mut e = serde_json::json!({"addresses": [a],
                "nodeName": r.pick(&["node-a", "node-b"]), "conditions": conditions});
            if all_hinted || r.chance(20) {
                e["hints"] = serde_json::json!({"forZones": [{"name": r.pick(&zones)}]});
            }
            e
        })
        .collect();
    let ports: Vec<serde_json::Value> = ["a", "b"]
        .iter()
        .map(|n| serde_json::json!({"name": n, "port": if r.chance(5) { 0 } else { 8080 + r.below(2) }, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "ports": ports, "endpoints": endpoints}))
    .expect("a slice")
}

/// The incremental translation equals the full one after every sync, over random sequences
/// of creates, updates, deletes, relists and Node changes (many small Services fighting over
/// few frontends, so conflicts and their resolution move all the time).
#[test]
fn incremental_translation_equals_the_full_one_on_random_changes() {
    incremental_equals_full(1..=40, false);
}

/// The same with Services of either family or both, slices of either family, and external
/// IPs, ingress IPs and source ranges of both (IPv4 and IPv6 frontends and node ports of one
/// number conflict only within their family).
#[test]
fn incremental_translation_equals_the_full_one_on_random_dual_stack_changes() {
    incremental_equals_full(1001..=1030, true);
}

fn incremental_equals_full(seeds: std::ops::RangeInclusive<u64>, dual: bool) {
    use std::collections::BTreeMap as Map;
    // Frontends of each family seen, so the dual-stack run cannot pass without IPv6 ones.
    let mut seen: Map<IpFamily, usize> = Map::new();
    for seed in seeds {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut node = NodeInfo { name: "node-a".into(), zone: Some("z1".into()) };
        let mut t = Translator::new(node.clone());
        let mut services: Map<String, k8s_openapi::api::core::v1::Service> = Map::new();
        let mut slices: Map<String, k8s_openapi::api::discovery::v1::EndpointSlice> = Map::new();
        let names = ["s0", "s1", "s2", "s3", "s4", "s5"];
        for step in 0..120 {
            // A few changes per sync, as a watch delivers them.
            for _ in 0..1 + r.below(3) {
                match r.below(20) {
                    0..=6 => {
                        let n = *r.pick(&names);
                        let s = random_service(&mut r, n, dual);
                        t.upsert_service(&s);
                        services.insert(n.into(), s);
                    }
                    7..=8 => {
                        let n = *r.pick(&names);
                        services.remove(n);
                        t.delete_service(Some(&"ns".to_string()), Some(&n.to_string()));
                    }
                    9..=14 => {
                        let n = format!("{}-{}", r.pick(&names), r.below(2));
                        // Now and then a slice moves to another Service.
                        let owner = if r.chance(10) { *r.pick(&names) } else { &n[..2] };
                        let s = random_slice(&mut r, &n, owner, dual);
                        t.upsert_slice(&s);
                        slices.insert(n, s);
                    }
                    15..=16 => {
                        let n = format!("{}-{}", r.pick(&names), r.below(2));
                        slices.remove(&n);
                        t.delete_slice(Some(&"ns".to_string()), Some(&n));
                    }
                    17 => {
                        node.zone = Some(r.pick(&["z1", "z2"]).to_string());
                        t.set_node(node.clone());
                    }
                    18 => {
                        // A relist of a random subset: what is missing was deleted.
                        services.retain(|_, _| r.chance(80));
                        t.relist_services(services.values());
                    }
                    _ => {
                        slices.retain(|_, _| r.chance(80));
                        t.relist_slices(slices.values());
                    }
                }
            }
            let before = t.state().clone();
            let changes = t.sync();
            let full = translate(services.values(), slices.values(), &node);
            assert_eq!(t.state(), &full.state, "seed {seed} step {step}: incremental differs from full");
            assert_eq!(t.errors(), full.errors, "seed {seed} step {step}: errors differ");
            for f in full.state.services.keys() {
                *seen.entry(f.family()).or_default() += 1;
            }
            // What the sync says changed is exactly what changed.
            let mut moved: BTreeSet<Frontend> = BTreeSet::new();
            for (f, sp) in &full.state.services {
                if before.services.get(f) != Some(sp) {
                    moved.insert(*f);
                }
            }
            moved.extend(before.services.keys().filter(|f| !full.state.services.contains_key(f)));
            assert_eq!(changes.frontends, moved, "seed {seed} step {step}: reported changes");
            assert_eq!(
                changes.health_checks,
                before.health_checks != full.state.health_checks,
                "seed {seed} step {step}"
            );
        }
    }
    assert!(seen.get(&IpFamily::V4).is_some_and(|n| *n > 0), "{seen:?}");
    assert_eq!(seen.get(&IpFamily::V6).is_some_and(|n| *n > 0), dual, "{seen:?}");
}

/// Cost of a first sync and of one change at `n` Services (run by hand:
/// `cargo test --release -p lb-userspace --lib translator_cost -- --ignored --nocapture`).
#[test]
#[ignore]
fn translator_cost() {
    let n: usize = std::env::var("LB_TRANSLATOR_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let svc = |i: usize| -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(serde_json::json!({"metadata": {"name": format!("svc-{i}"), "namespace": "default"},
            "spec": {"clusterIP": std::net::Ipv4Addr::from(0x0a60_0000u32 + i as u32).to_string(),
                "ports": [{"name": "http", "port": 80}, {"name": "sink", "port": 9000}]}}))
        .unwrap()
    };
    let slice = |i: usize| -> k8s_openapi::api::discovery::v1::EndpointSlice {
        serde_json::from_value(serde_json::json!({"metadata": {"name": format!("svc-{i}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80}, {"name": "sink", "port": 9000}],
            "endpoints": [{"addresses": ["10.244.0.11"]}, {"addresses": ["10.244.0.12"]}, {"addresses": ["10.244.0.13"]}]}))
        .unwrap()
    };
    let services: Vec<_> = (0..n).map(svc).collect();
    let slices: Vec<_> = (0..n).map(slice).collect();
    let mut t = Translator::new(NodeInfo::named("node-a"));
    let started = std::time::Instant::now();
    t.relist_services(services.iter());
    t.relist_slices(slices.iter());
    let recorded = started.elapsed();
    let changes = t.sync();
    println!(
        "{n} Services: recorded in {recorded:?}, first sync {:?} ({} frontends)",
        started.elapsed() - recorded,
        changes.frontends.len()
    );
    let mut each: Vec<std::time::Duration> = (0..50)
        .map(|i| {
            let (s, sl) = (svc(n + i), slice(n + i));
            let started = std::time::Instant::now();
            t.upsert_service(&s);
            t.upsert_slice(&sl);
            let changes = t.sync();
            assert_eq!(changes.frontends.len(), 2);
            started.elapsed()
        })
        .collect();
    each.sort();
    println!("one more Service, 50 times: min {:?}, median {:?}, max {:?}", each[0], each[25], each[49]);
    let started = std::time::Instant::now();
    let full = translate(services.iter(), slices.iter(), &NodeInfo::named("node-a"));
    println!("full translate: {:?} ({} frontends)", started.elapsed(), full.state.services.len());
}

/// Two Services asking for one health check node port: the first by name keeps it, the
/// other is served without a health check, and the error names the field and the owner.
#[test]
fn a_health_check_node_port_held_by_another_service_leaves_only_the_check_out() {
    let svc = |name: &str, cip: &str, np: u16| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32500, clusterIP: {cip}, ports: [{{port: 80, nodePort: {np}}}]}}\n")
    };
    let t = run(&(svc("b", "10.96.5.2", 30502) + &svc("a", "10.96.5.1", 30501)));
    assert_eq!(t.state.health_checks.len(), 1);
    assert!(t.state.services.contains_key(&fe("10.96.5.2", 80, Protocol::Tcp)), "b is served");
    assert!(t
        .state
        .services
        .iter()
        .any(|(f, sp)| f.scope == Scope::NodePort && f.port == 30502 && sp.name == "default/b"));
    match &t.errors[..] {
        [e @ TranslateError::HealthCheckConflict { object, port: 32500, owner }] => {
            assert_eq!((object.as_str(), owner.as_str()), ("default/b", "default/a"));
            assert!(e.to_string().contains("spec.healthCheckNodePort"), "{e}");
            assert!(!e.rejects_object());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn node_port_addresses_select_per_family_as_kube_proxy() {
    let cidrs: Vec<Cidr> = vec!["192.168.49.0/24".parse().unwrap()];
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(node_port_address_selected(&cidrs, ip("192.168.49.2")));
    assert!(!node_port_address_selected(&cidrs, ip("10.0.0.2")));
    // No IPv6 CIDR: every IPv6 address, as kube-proxy's `NewNodePortAddresses` adds `::/0`.
    assert!(node_port_address_selected(&cidrs, ip("fd00::2")));
    assert!(node_port_family_whole(&cidrs, IpFamily::V6));
    assert!(!node_port_family_whole(&cidrs, IpFamily::V4));
    let both: Vec<Cidr> = vec!["0.0.0.0/0".parse().unwrap(), "fd00:49::/64".parse().unwrap()];
    assert!(node_port_family_whole(&both, IpFamily::V4));
    assert!(!node_port_family_whole(&both, IpFamily::V6));
    assert!(!node_port_address_selected(&both, ip("fd00::2")));
    assert!(node_port_address_selected(&[], ip("fd00::2")));
}
