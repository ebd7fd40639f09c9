//! End to end over IPv6 and dual stack (issue 12): the lab's namespaces with both families
//! (`Lab::dual_stack`: every IPv4 address has its IPv6 twin, `lb_tests::twin6`), two nodes
//! and an outside client on one switch, real TCP and UDP.
//!
//! The first test is the dual-stack lab itself (IPv6 routed between pods and nodes), the agent
//! programming IPv6 and dual-stack Services beside IPv4 ones that keep working, and the health
//! check node port answering per family; the others send real IPv6 traffic through the
//! datapath with the agent's defaults, but for what the lab's nodes cannot give it: their
//! addresses of both families and the external interface (`--node-ip`, `--node-ip6`,
//! `--xdp-iface`; they have no default route to take them from) and the pod networks
//! (`--cluster-cidr`, as kube-proxy is given its own).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    dual_stack_service, eventually, http_get, http_get_from, http_status, in_ns, privileged, tcp_connect, twin6,
    udp_request, udp_socket, EchoConn, Lab, Node, Pod,
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 3);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
/// The IPv6 Service range of these tests (the API server's `--service-cluster-ip-range`).
const SVC6: u16 = 0x96;
const MB10: usize = 10 * 1024 * 1024;

/// An IPv6 ClusterIP: `fd00:96::N`.
fn cip6(n: u16) -> IpAddr {
    Ipv6Addr::new(0xfd00, SVC6, 0, 0, 0, 0, 0, n).into()
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Two dual-stack nodes on a switch with an outside client; `web-a1`, `web-a2` on node-a,
/// `web-b1` on node-b (HTTP 80, echo 9000, UDP 5353, count 7000, source 7001) and a client
/// pod on node-a. Agents are started by `start`.
struct Cluster {
    lab: Lab,
    a: Node,
    b: Node,
    outside: Pod,
    client: Pod,
    web: Vec<Pod>,
}

impl Cluster {
    fn new() -> Result<Self> {
        let mut lab = Lab::dual_stack()?;
        let ul = lab.add_underlay()?;
        let a = lab.add_node("node-a", 1)?;
        let b = lab.add_node("node-b", 2)?;
        lab.connect_nodes(&ul, &[(&a, NODE_A), (&b, NODE_B)])?;
        let outside = lab.add_outside(&ul, "outside", OUTSIDE)?;
        let client = lab.add_pod(&a, "client", 5)?;
        let mut web = Vec::new();
        for (node, name, host) in [(&a, "web-a1", 11), (&a, "web-a2", 12), (&b, "web-b1", 21)] {
            let pod = lab.add_pod(node, name, host)?;
            lab.serve_args(&pod, &[80], &[9000], &[5353], &[], &["--count", "7000", "--source", "7001"])?;
            web.push(pod);
        }
        Ok(Self { lab, a, b, outside, client, web })
    }

    fn pod(&self, name: &str) -> &Pod {
        self.web.iter().find(|p| p.name == name).expect("a web pod")
    }

    fn pods(&self, names: &[&str]) -> Vec<&Pod> {
        names.iter().map(|n| self.pod(n)).collect()
    }

    /// Writes `yaml` for both agents and starts them (node IPs of both families named, as the
    /// lab's nodes have no default route) once they serve `frontends` frontends each.
    fn start(&mut self, yaml: &str, frontends: usize) -> Result<()> {
        self.lab.write_manifests(&self.a, yaml)?;
        self.lab.write_manifests(&self.b, yaml)?;
        for (n, ip) in [(self.a.clone(), NODE_A), (self.b.clone(), NODE_B)] {
            let mut ifaces: Vec<String> = vec!["cbr0".into(), "eth0".into()];
            ifaces
                .extend(self.web.iter().chain([&self.client]).filter(|p| p.node == n.name).map(|p| p.host_if.clone()));
            let ifaces: Vec<&str> = ifaces.iter().map(String::as_str).collect();
            let (v4, v6) = (ip.to_string(), twin6(ip).to_string());
            self.lab.start_agent(
                &n,
                &ifaces,
                frontends,
                // The pod networks of both families (`twin6` maps 10.244.N.x into fd00:af4::/32),
                // as kube-proxy's --cluster-cidr: pods reaching an eTP Local node port are the
                // cluster's own traffic.
                &[
                    "--node-ip",
                    &v4,
                    "--node-ip6",
                    &v6,
                    "--xdp-iface",
                    "eth0",
                    "--cluster-cidr",
                    "10.244.0.0/16,fd00:af4::/32",
                ],
            )?;
        }
        Ok(())
    }

    fn update(&self, yaml: &str) -> Result<()> {
        self.lab.write_manifests(&self.a, yaml)?;
        self.lab.write_manifests(&self.b, yaml)
    }
}

/// The address part of a `/peer` answer (`[addr]:port` or `addr:port`).
fn peer_ip(answer: &str) -> IpAddr {
    let addr: SocketAddr = answer.trim().parse().unwrap_or_else(|_| panic!("a socket address: {answer:?}"));
    addr.ip()
}

/// Whether a connection from `ns` to `addr` times out (is dropped, neither served nor refused).
fn dropped(ns: &str, addr: SocketAddr) -> Result<bool> {
    Ok(matches!(tcp_connect(ns, addr, Duration::from_secs(1))?, Err(e) if e.kind() == std::io::ErrorKind::TimedOut))
}

/// A health check probe: status and body.
fn probe(ns: &str, node: impl Into<IpAddr>, port: u16) -> Result<(u16, String)> {
    http_status(ns, at(node, port), "/healthz")
}

/// Runs today: the dual-stack lab routes IPv6 between pods of both nodes; agents on dual-stack
/// nodes program IPv6 and dual-stack Services (frontends, node ports, backends) while their
/// IPv4 halves and IPv4 Services keep working; the health check node port of a dual-stack
/// Service answers over each family with that family's local endpoints.
#[test]
fn dual_stack_lab_agents_program_ipv6_and_ipv4_keeps_working() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let web4: IpAddr = Ipv4Addr::new(10, 96, 10, 10).into();
    let mut yaml = dual_stack_service(
        "web",
        &[web4, cip6(0x10)],
        "  type: NodePort\n",
        &[("http", 80, "TCP", 80, Some(30080))],
        &c.pods(&["web-a1", "web-a2", "web-b1"]),
    );
    // A dual-stack eTP Local LoadBalancer whose IPv4 endpoint is on node-a and whose IPv6
    // endpoint is on node-b: each node's health check is healthy on one family only.
    let (a1, b1) = (c.pod("web-a1").clone(), c.pod("web-b1").clone());
    yaml += &format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: hc}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIPs: [10.96.10.11, "{}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{port: 80, nodePort: 30081}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: hc-ipv4, labels: {{kubernetes.io/service-name: hc}}}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints: [{{addresses: ["{}"], nodeName: node-a}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: hc-ipv6, labels: {{kubernetes.io/service-name: hc}}}}
addressType: IPv6
ports: [{{port: 80}}]
endpoints: [{{addresses: ["{}"], nodeName: node-b}}]
"#,
        cip6(0x11),
        a1.ip,
        b1.ip6.expect("dual stack"),
    );
    // web: 2 ClusterIPs + 2 node ports; hc: 2 ClusterIPs, 2 node ports and their 2 companions.
    c.start(&yaml, 10)?;

    // The lab routes IPv6: a pod on node-a reaches a pod on node-b directly.
    let b6 = b1.ip6.expect("dual stack");
    assert_eq!(http_get(&c.client.ns, at(b6, 80), "/")?, "web-b1");
    assert_eq!(peer_ip(&http_get(&c.client.ns, at(b6, 80), "/peer")?), IpAddr::from(c.client.ip6.unwrap()));
    // The IPv4 half of the dual-stack Service is served by the datapath, from pods and outside.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(http_get(&c.client.ns, at(web4, 80), "/")?);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(http_get(&c.outside.ns, at(NODE_A, 30080), "/")?.starts_with("web-"));

    // The agent programmed the IPv6 half: its ClusterIP, its node port, its backends.
    let services = c.lab.list(&c.a, "services")?;
    assert!(services.contains("[fd00:96::10]:80/TCP") && services.contains("[*]:30080/TCP"), "{services}");
    assert!(services.contains("10.96.10.10:80/TCP") && services.contains("*:30080/TCP"), "{services}");
    let backends = c.lab.list(&c.a, "backends")?;
    for p in c.pods(&["web-a1", "web-a2", "web-b1"]) {
        assert!(backends.contains(&at(p.ip6.unwrap(), 80).to_string()), "{backends}");
    }

    // Health checks per family: node-a has hc's IPv4 endpoint, node-b its IPv6 one.
    let out = &c.outside.ns;
    let (code, body) = probe(out, NODE_A, 32000)?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""localEndpoints":1"#), "{body}");
    assert_eq!(probe(out, twin6(NODE_A), 32000)?.0, 503, "no local IPv6 endpoint on node-a");
    assert_eq!(probe(out, NODE_B, 32000)?.0, 503, "no local IPv4 endpoint on node-b");
    let (code, body) = probe(out, twin6(NODE_B), 32000)?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""localEndpoints":1"#) && body.contains(r#""name":"hc""#), "{body}");

    // The lab learns a path MTU over IPv6 by itself (the kernel's own Packet Too Big, nothing
    // translated): what the path MTU test through a Service builds on.
    c.lab.exec(&c.b.ns, &["ip", "link", "set", &b1.host_if, "mtu", "1400"])?;
    assert_eq!(upload(&c.client.ns, at(b6, 7000), 2 * 1024 * 1024)?, 2 * 1024 * 1024);
    Ok(())
}

/// An IPv6-only ClusterIP over the three web pods (two on this node, one on the other).
#[test]
fn ipv6_cluster_ip_spreads_over_local_and_remote_pods() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let yaml = dual_stack_service(
        "web6",
        &[cip6(0x20)],
        "",
        &[("http", 80, "TCP", 80, None), ("dns", 53, "UDP", 5353, None)],
        &c.pods(&["web-a1", "web-a2", "web-b1"]),
    );
    c.start(&yaml, 2)?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        *seen.entry(http_get(&c.client.ns, at(cip6(0x20), 80), "/")?).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "all three pods answer: {seen:?}");
    assert!(seen.values().all(|n| *n >= 10), "each at least 10 of 90: {seen:?}");
    // The backend sees the client's own address (no SNAT inside the cluster).
    let peer = http_get(&c.client.ns, at(cip6(0x20), 80), "/peer")?;
    assert_eq!(peer_ip(&peer), IpAddr::from(c.client.ip6.unwrap()));
    // UDP: a connected socket accepts only replies from the ClusterIP itself.
    let sock = udp_socket(&c.client.ns, at(cip6(0x20), 53))?;
    let answer = udp_request(&sock, "query")?;
    assert!(answer.starts_with("web-"), "{answer}");
    // `lb list` shows the IPv6 flows.
    let ct = c.lab.list(&c.a, "conntrack")?;
    assert!(ct.contains(&c.client.ip6.unwrap().to_string()) && ct.contains("[fd00:96::20]:80"), "{ct}");
    Ok(())
}

/// `sessionAffinity: ClientIP` keyed on the IPv6 client address: one client stays on one pod,
/// ten clients spread; `lb list affinity` shows the IPv6 pins.
#[test]
fn ipv6_session_affinity_pins_each_client_and_spreads_clients() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let yaml = dual_stack_service(
        "sticky6",
        &[cip6(0x30)],
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        &[("http", 80, "TCP", 80, None)],
        &c.pods(&["web-a1", "web-a2", "web-b1"]),
    );
    c.start(&yaml, 1)?;
    let vip = at(cip6(0x30), 80);
    let first = http_get(&c.client.ns, vip, "/")?;
    for _ in 0..14 {
        assert_eq!(http_get(&c.client.ns, vip, "/")?, first, "15 of 15 on one pod");
    }
    let clients: Vec<Ipv6Addr> = (101..=110).map(|i| twin6(Ipv4Addr::new(10, 244, 1, i))).collect();
    lb_tests::add_addresses6(&c.lab, &c.client, &clients)?;
    let mut chosen = BTreeMap::new();
    for ip in &clients {
        let mut per_client = BTreeSet::new();
        for _ in 0..3 {
            per_client.insert(http_get_from(&c.client.ns, at(*ip, 0), vip, "/")?);
        }
        assert_eq!(per_client.len(), 1, "client {ip} stays on one pod: {per_client:?}");
        chosen.insert(*ip, per_client.into_iter().next().unwrap());
    }
    let distinct: BTreeSet<_> = chosen.values().collect();
    assert!(distinct.len() > 1, "10 clients over more than one pod: {chosen:?}");
    let pins = c.lab.list(&c.a, "affinity")?;
    assert!(pins.contains(&clients[0].to_string()) && pins.contains("[fd00:96::30]:80/TCP"), "{pins}");
    Ok(())
}

/// A node port over IPv6 from a client outside the cluster: to a local backend the client's
/// address is kept; to a remote one (Cluster policy) the flow is SNATed to `--node-ip6`.
#[test]
fn ipv6_node_port_from_outside_to_local_and_remote_backends() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let mut yaml = dual_stack_service(
        "remote6",
        &[cip6(0x40)],
        "  type: NodePort\n",
        &[("http", 80, "TCP", 80, Some(30090)), ("dns", 53, "UDP", 5353, Some(30091))],
        &c.pods(&["web-b1"]),
    );
    yaml += &dual_stack_service(
        "local6",
        &[cip6(0x41)],
        "  type: NodePort\n",
        &[("http", 80, "TCP", 80, Some(30092))],
        &c.pods(&["web-a1"]),
    );
    c.start(&yaml, 6)?;
    let out = &c.outside;
    let (a6, b6, me) = (twin6(NODE_A), twin6(NODE_B), IpAddr::from(out.ip6.unwrap()));
    // node-a's node port, backend on node-b: SNATed to node-a, so replies come back through it.
    assert_eq!(http_get(&out.ns, at(a6, 30090), "/")?, "web-b1");
    assert_eq!(peer_ip(&http_get(&out.ns, at(a6, 30090), "/peer")?), IpAddr::from(a6));
    // node-b's own node port: a local backend, the client's address kept.
    assert_eq!(peer_ip(&http_get(&out.ns, at(b6, 30090), "/peer")?), me);
    assert_eq!(peer_ip(&http_get(&out.ns, at(a6, 30092), "/peer")?), me);
    // UDP through the SNATed path: the reply comes from the node port's address.
    let sock = udp_socket(&out.ns, at(a6, 30091))?;
    let answer = udp_request(&sock, "query")?;
    assert!(answer.starts_with("web-b1 "), "{answer}");
    // A node port on IPv6 does not answer on the node's IPv4 address, and the IPv4 node
    // ports of an IPv6-only Service do not exist.
    assert!(http_get(&out.ns, at(NODE_A, 30090), "/").is_err());
    Ok(())
}

/// Traffic policies over IPv6: `externalTrafficPolicy: Local` keeps outside traffic on the
/// node's endpoints (client address kept, dropped where there is none) while pods reaching
/// the same node port get every endpoint; `internalTrafficPolicy: Local` narrows the ClusterIP.
#[test]
fn ipv6_local_traffic_policies() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let mut yaml = dual_stack_service(
        "etp6",
        &[cip6(0x50)],
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
        &[("http", 80, "TCP", 80, Some(30100))],
        &c.pods(&["web-b1"]),
    );
    yaml += &dual_stack_service(
        "itp6",
        &[cip6(0x51)],
        "  internalTrafficPolicy: Local\n",
        &[("http", 80, "TCP", 80, None)],
        &c.pods(&["web-a1", "web-b1"]),
    );
    c.start(&yaml, 4)?;
    let out = &c.outside;
    let (a6, b6, me) = (twin6(NODE_A), twin6(NODE_B), IpAddr::from(out.ip6.unwrap()));
    let peer = http_get(&out.ns, at(b6, 30100), "/peer").context("eTP Local, node-b from outside")?;
    assert_eq!(peer_ip(&peer), me, "eTP Local: the client's own address");
    assert!(dropped(&out.ns, at(a6, 30100))?, "eTP Local without a local endpoint: dropped, not refused");
    // From a pod (the cluster's own source), node-a's node port reaches node-b's endpoint.
    assert_eq!(
        http_get(&c.client.ns, at(a6, 30100), "/").context("eTP Local, node-a's node port from a pod")?,
        "web-b1"
    );
    // iTP Local: from node-a, only node-a's endpoint.
    for _ in 0..10 {
        assert_eq!(http_get(&c.client.ns, at(cip6(0x51), 80), "/").context("iTP Local")?, "web-a1");
    }
    Ok(())
}

/// The node's own processes over IPv6 (connect6, sendmsg6, recvmsg6, getpeername6): TCP to a
/// ClusterIP and a node port, unconnected UDP whose reply shows the ClusterIP.
#[test]
fn ipv6_node_processes_reach_cluster_ips() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let yaml = dual_stack_service(
        "web6",
        &[cip6(0x60)],
        "  type: NodePort\n",
        &[("http", 80, "TCP", 80, Some(30110)), ("dns", 53, "UDP", 5353, Some(30111))],
        &c.pods(&["web-a1", "web-b1"]),
    );
    c.start(&yaml, 4)?;
    let node = &c.a.ns;
    let vip = at(cip6(0x60), 80);
    assert!(http_get(node, vip, "/")?.starts_with("web-"));
    assert!(http_get(node, at(twin6(NODE_A), 30110), "/")?.starts_with("web-"));
    let peer = in_ns(node, || -> Result<SocketAddr> {
        Ok(std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2))?.peer_addr()?)
    })??;
    assert_eq!(peer, vip, "getpeername shows the ClusterIP");
    let (reply, from) = in_ns(node, || -> Result<(String, SocketAddr)> {
        let sock = std::net::UdpSocket::bind("[::]:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"q", at(cip6(0x60), 53))?;
        let mut buf = [0u8; 512];
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })??;
    assert!(reply.starts_with("web-"), "{reply}");
    assert_eq!(from, at(cip6(0x60), 53), "recvfrom shows the ClusterIP, not the pod");
    Ok(())
}

/// A dual-stack Service answers on both its addresses at once: long-lived connections over
/// each family stay up side by side, and each family's requests reach that family's pods.
#[test]
fn dual_stack_service_answers_on_both_addresses_at_once() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let v4: IpAddr = Ipv4Addr::new(10, 96, 10, 70).into();
    // IPv6 primary, as on an IPv6-first cluster.
    let yaml = dual_stack_service(
        "dual",
        &[cip6(0x70), v4],
        "",
        &[("http", 80, "TCP", 80, None), ("echo", 9000, "TCP", 9000, None)],
        &c.pods(&["web-a1", "web-a2", "web-b1"]),
    );
    c.start(&yaml, 4)?;
    let mut conn4 = EchoConn::open(&c.client.ns, at(v4, 9000))?;
    let mut conn6 = EchoConn::open(&c.client.ns, at(cip6(0x70), 9000))?;
    let (pod4, pod6) = (conn4.pod()?, conn6.pod()?);
    let mut seen = BTreeMap::<(bool, String), usize>::new();
    for i in 0..30 {
        // Interleaved: both families' flows live at the same time.
        assert_eq!(conn4.ask(&i.to_string())?, format!("{pod4} {i}"));
        assert_eq!(conn6.ask(&i.to_string())?, format!("{pod6} {i}"));
        *seen.entry((false, http_get(&c.client.ns, at(v4, 80), "/")?)).or_default() += 1;
        *seen.entry((true, http_get(&c.client.ns, at(cip6(0x70), 80), "/")?)).or_default() += 1;
    }
    for v6 in [false, true] {
        let pods = seen.keys().filter(|(f, _)| *f == v6).count();
        assert_eq!(pods, 3, "every pod answers over {}: {seen:?}", if v6 { "IPv6" } else { "IPv4" });
    }
    // Each family's backend saw the client's address of that family.
    assert_eq!(peer_ip(&http_get(&c.client.ns, at(v4, 80), "/peer")?), IpAddr::from(c.client.ip));
    assert_eq!(peer_ip(&http_get(&c.client.ns, at(cip6(0x70), 80), "/peer")?), IpAddr::from(c.client.ip6.unwrap()));
    Ok(())
}

/// Uploads `len` bytes to a `--count` server; returns what it counted.
fn upload(ns: &str, addr: SocketAddr, len: usize) -> Result<usize> {
    use std::io::{BufRead, BufReader, Write};
    in_ns(ns, || -> Result<usize> {
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        c.set_write_timeout(Some(Duration::from_secs(30)))?;
        let block = vec![0x5au8; 256 * 1024];
        let mut sent = 0;
        while sent < len {
            let k = (len - sent).min(block.len());
            c.write_all(&block[..k]).with_context(|| format!("upload to {addr} after {sent} bytes"))?;
            sent += k;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line)?;
        Ok(line.trim().parse()?)
    })?
}

/// Downloads `len` bytes from a `--source` server and checks every byte.
fn download(ns: &str, addr: SocketAddr, len: usize) -> Result<()> {
    use std::io::{Read, Write};
    in_ns(ns, || -> Result<()> {
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(c, "{len}")?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = c.read(&mut buf).with_context(|| format!("download from {addr} after {got} bytes"))?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                let off = (got + i) % (64 * 1024);
                anyhow::ensure!(*b == (off * 31 + 7) as u8, "byte {} from {addr} corrupted", got + i);
            }
            got += n;
        }
        anyhow::ensure!(got == len, "downloaded {got} of {len} bytes from {addr}");
        Ok(())
    })?
}

/// Bulk transfers over IPv6 with the remote backend behind a 1400-byte hop: node-b cannot
/// forward the client's 1500-byte packets to it and answers with ICMPv6 Packet Too Big
/// quoting the packet as translated (client -> backend). IPv6 routers never fragment, so the
/// upload completes only if that error is translated back (quoting the ClusterIP) and reaches
/// the client's socket, which then sends smaller segments.
#[test]
fn ipv6_bulk_transfer_with_path_mtu_below_the_link_mtu() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let yaml = dual_stack_service(
        "bulk6",
        &[cip6(0x80)],
        "  type: NodePort\n",
        &[("count", 7000, "TCP", 7000, Some(30120)), ("source", 7001, "TCP", 7001, Some(30121))],
        &c.pods(&["web-b1"]),
    );
    c.start(&yaml, 4)?;
    c.lab.exec(&c.b.ns, &["ip", "link", "set", &c.pod("web-b1").host_if, "mtu", "1400"])?;
    let start = Instant::now();
    assert_eq!(upload(&c.client.ns, at(cip6(0x80), 7000), MB10)?, MB10, "ClusterIP, remote backend");
    download(&c.client.ns, at(cip6(0x80), 7001), MB10)?;
    // From outside through node-a's node port (SNATed to node-a, routed by the datapath).
    assert_eq!(upload(&c.outside.ns, at(twin6(NODE_A), 30120), MB10)?, MB10, "node port, remote backend");
    download(&c.outside.ns, at(twin6(NODE_A), 30121), MB10)?;
    eprintln!("4 x 10 MB over IPv6 behind a 1400-byte hop in {:?}", start.elapsed());
    let stats = c.lab.list(&c.a, "stats")?;
    let translated: u64 = stats
        .lines()
        .find(|l| l.starts_with("icmp_translated"))
        .map(|l| l.split_whitespace().skip(1).filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    assert!(translated >= 1, "Packet Too Big translated on node-a: {stats}");
    Ok(())
}

/// A Service without endpoints refuses IPv6 clients (TCP: an ICMPv6 error or a RST; the
/// kernel takes an ICMPv6 error answering a SYN as a soft error and reports it at the SYN
/// retransmit, about a second later), and its UDP clients get
/// `ECONNREFUSED`.
#[test]
fn ipv6_service_without_endpoints_is_refused() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    let yaml = dual_stack_service(
        "none6",
        &[cip6(0x90)],
        "",
        &[("http", 80, "TCP", 80, None), ("dns", 53, "UDP", 5353, None)],
        &[],
    );
    c.start(&yaml, 2)?;
    let start = Instant::now();
    let r = tcp_connect(&c.client.ns, at(cip6(0x90), 80), Duration::from_secs(5))?;
    assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "refused after {:?}", start.elapsed());
    let sock = udp_socket(&c.client.ns, at(cip6(0x90), 53))?;
    sock.send(b"q")?;
    let mut buf = [0u8; 64];
    let r = sock.recv(&mut buf);
    assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused), "{r:?}");
    // Once an endpoint appears, it serves.
    let yaml = dual_stack_service(
        "none6",
        &[cip6(0x90)],
        "",
        &[("http", 80, "TCP", 80, None), ("dns", 53, "UDP", 5353, None)],
        &c.pods(&["web-a1"]),
    );
    c.update(&yaml)?;
    assert!(eventually(Duration::from_secs(3), || http_get(&c.client.ns, at(cip6(0x90), 80), "/").is_ok()));
    Ok(())
}
