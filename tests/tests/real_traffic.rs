//! End to end on real traffic (issue 10): two nodes and an outside client on one switch,
//! `lb run` with its defaults (tc everywhere, XDP on the default route's interface in the mode
//! the agent picks, node IP from that interface) and checksum offload on, as Linux sets it.
//! IP fragments both ways, ICMP errors of translated flows (path MTU, port unreachable), bulk
//! transfers through every path the datapath routes, and host-network endpoints.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{in_ns, privileged, Lab, Node, Pod, Tunnel};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 3);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
const FRAG_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
const BULK_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 2);
const DEAD_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 3);
const HOST_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 4);
const HOST_REMOTE_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 5);
const MB10: usize = 10 * 1024 * 1024;
const EXT_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 210);
const EXT_REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 211);
const LB_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 220);
const LB_REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 221);

struct Net {
    lab: Lab,
    /// The switch's namespace.
    ul_ns: String,
    a: Node,
    b: Node,
    outside: Pod,
    client: Pod,
    /// On node-a.
    local: Pod,
    /// On node-b.
    remote: Pod,
}

fn slice(name: &str, svc: &str, ip: Ipv4Addr, node: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: [{{addresses: [\"{ip}\"], nodeName: {node}}}]\n"
    )
}

fn manifests(local: &Pod, remote: &Pod) -> String {
    let mut y = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: frag}}
spec: {{type: NodePort, clusterIP: {FRAG_CIP}, ports: [{{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: bulk}}
spec:
  clusterIP: {BULK_CIP}
  ports: [{{name: count, port: 7000}}, {{name: source, port: 7001}}]
---
apiVersion: v1
kind: Service
metadata: {{name: bulk-local}}
spec: {{type: NodePort, clusterIP: 10.96.7.12, ports: [{{name: count, port: 7000, nodePort: 30070}}, {{name: source, port: 7001, nodePort: 30071}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: bulk-remote}}
spec: {{type: NodePort, clusterIP: 10.96.7.13, ports: [{{name: count, port: 7000, nodePort: 30072}}, {{name: source, port: 7001, nodePort: 30073}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty}}
spec: {{type: NodePort, clusterIP: 10.96.7.14, ports: [{{name: http, port: 80, nodePort: 30074}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: dead}}
spec: {{clusterIP: {DEAD_CIP}, ports: [{{protocol: UDP, port: 9, targetPort: 9999}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: host-ep}}
spec: {{clusterIP: {HOST_CIP}, ports: [{{name: http, port: 80, targetPort: 18080}}, {{name: udp, protocol: UDP, port: 53, targetPort: 18053}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: host-ep-remote}}
spec: {{clusterIP: {HOST_REMOTE_CIP}, ports: [{{name: http, port: 80, targetPort: 18080}}, {{name: udp, protocol: UDP, port: 53, targetPort: 18053}}]}}
"#
    );
    // External IPs and LoadBalancer IPs, each to a local and to a remote backend.
    for (i, (name, kind, ip)) in [
        ("ext-local", "externalIPs", EXT_LOCAL),
        ("ext-remote", "externalIPs", EXT_REMOTE),
        ("lb-local", "status", LB_LOCAL),
        ("lb-remote", "status", LB_REMOTE),
    ]
    .into_iter()
    .enumerate()
    {
        // A LoadBalancer has node ports (the API server allocates them; here they are written).
        let np = if kind == "externalIPs" { String::new() } else { format!(", nodePort: {}", 30110 + i) };
        let (ty, extra, status) = if kind == "externalIPs" {
            ("ClusterIP", format!("  externalIPs: [{ip}]\n"), String::new())
        } else {
            ("LoadBalancer", String::new(), format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n"))
        };
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: {ty}\n  clusterIP: 10.96.7.{}\n{extra}  ports: [{{name: count, port: 7000{np}}}, {{name: dns, protocol: UDP, port: 53, targetPort: 5353{np}}}]\n{status}",
            40 + i
        );
    }
    let edge_ports = "[{name: count, port: 7000}, {name: dns, protocol: UDP, port: 5353}]";
    y += &slice("ext-local-1", "ext-local", local.ip, "node-a", edge_ports);
    y += &slice("ext-remote-1", "ext-remote", remote.ip, "node-b", edge_ports);
    y += &slice("lb-local-1", "lb-local", local.ip, "node-a", edge_ports);
    y += &slice("lb-remote-1", "lb-remote", remote.ip, "node-b", edge_ports);
    let bulk_ports = "[{name: count, port: 7000}, {name: source, port: 7001}]";
    let host_ports = "[{name: http, port: 18080}, {name: udp, protocol: UDP, port: 18053}]";
    y += &slice("frag-1", "frag", remote.ip, "node-b", "[{name: dns, protocol: UDP, port: 5353}]");
    y += &slice("bulk-1", "bulk", remote.ip, "node-b", bulk_ports);
    y += &slice("bulk-local-1", "bulk-local", local.ip, "node-a", bulk_ports);
    y += &slice("bulk-remote-1", "bulk-remote", remote.ip, "node-b", bulk_ports);
    y += &slice("dead-1", "dead", remote.ip, "node-b", "[{protocol: UDP, port: 9999}]");
    y += &slice("host-ep-1", "host-ep", NODE_A, "node-a", host_ports);
    y += &slice("host-ep-remote-1", "host-ep-remote", NODE_B, "node-b", host_ports);
    y
}

/// Makes sure tx checksum offload is on for every veth of a namespace, as Linux sets it and as
/// `Lab::plug` leaves it: this file tests the case users have even if the lab's links change.
fn offloads_on(lab: &Lab, ns: &str) -> Result<()> {
    let links = lab.exec(ns, &["ip", "-o", "link", "show", "type", "veth"])?;
    for l in links.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("").to_string();
        if !name.is_empty() {
            lab.exec(ns, &["ethtool", "-K", &name, "tx", "on"])?;
        }
    }
    Ok(())
}

fn net() -> Result<Net> {
    let mut lab = Lab::new()?;
    let ul = lab.add_underlay()?;
    let a = lab.add_node("node-a", 1)?;
    let b = lab.add_node("node-b", 2)?;
    lab.connect_nodes(&ul, &[(&a, NODE_A), (&b, NODE_B)])?;
    let outside = lab.add_outside(&ul, "outside", OUTSIDE)?;
    let client = lab.add_pod(&a, "client", 5)?;
    let local = lab.add_pod(&a, "local", 11)?;
    let remote = lab.add_pod(&b, "remote", 21)?;
    for ns in [&ul.ns, &a.ns, &b.ns, &outside.ns] {
        offloads_on(&lab, ns)?;
    }
    // A default route, as every node has: the agent's defaults take their XDP interface and
    // node IP from it. (The gateway is never used: every destination here has a route.)
    for n in [&a, &b] {
        lab.exec(&n.ns, &["ip", "route", "add", "default", "via", "192.168.49.254"])?;
    }
    for p in [&local, &remote] {
        lab.serve_args(p, &[], &[], &[], &[], &["--udp-echo", "5353", "--count", "7000", "--source", "7001"])?;
    }
    // Host-network endpoints: servers in the nodes' own namespaces.
    for (n, name, ip) in [(&a, "host-a", NODE_A), (&b, "host-b", NODE_B)] {
        let host =
            Pod { ns: n.ns.clone(), name: name.into(), ip, ip6: None, node: n.name.clone(), host_if: String::new() };
        let ip = ip.to_string();
        lab.serve_args(&host, &[18080], &[], &[], &[], &["--bind", &ip, "--udp-echo", "18053"])?;
    }
    let yaml = manifests(&local, &remote);
    lab.write_manifests(&a, &yaml)?;
    lab.write_manifests(&b, &yaml)?;
    for (n, pod) in [(&a, &local), (&b, &remote)] {
        lab.start_agent(n, &["cbr0", "eth0", &pod.host_if], 12, &[])?;
    }
    // Each node drops forwarded packets its conntrack calls INVALID, as Calico's policy chains,
    // kube-proxy's KUBE-FORWARD and many host firewalls do: every flow here must look to the
    // node's netfilter like a connection it can follow (the stack forwards both ways of an
    // unSNATed flow as the backend sees it; replies restored at egress), or pass it by
    // entirely (routed by the datapath). This also loads conntrack, so the nodes reassemble
    // and refragment forwarded fragments, as most nodes do.
    for n in [&a, &b] {
        lab.exec(&n.ns, &["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])?;
    }
    // The outside reaches external and LoadBalancer IPs through node-a, as a router or an
    // announcing load balancer would send them.
    for ip in [EXT_LOCAL, EXT_REMOTE, LB_LOCAL, LB_REMOTE] {
        lab.exec(&outside.ns, &["ip", "route", "add", &format!("{ip}/32"), "via", &NODE_A.to_string()])?;
    }
    Ok(Net { lab, ul_ns: ul.ns.clone(), a, b, outside, client, local, remote })
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Sends datagrams of `size` bytes from `ns` to `addr` and checks each comes back byte for byte.
fn udp_echo(ns: &str, addr: SocketAddr, size: usize, count: usize) -> Result<()> {
    in_ns(ns, || -> Result<()> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = vec![0u8; 65_536];
        for i in 0..count {
            let msg: Vec<u8> = (0..size).map(|j| (i * 131 + j * 7) as u8).collect();
            s.send(&msg)?;
            let n = s.recv(&mut buf).with_context(|| format!("datagram {i} of {size} bytes to {addr}"))?;
            if buf[..n] != msg[..] {
                bail!("datagram {i} to {addr} came back different ({n} of {size} bytes)");
            }
        }
        Ok(())
    })?
}

fn stat(lab: &Lab, node: &Node, name: &str) -> u64 {
    let stats = lab.list(node, "stats").unwrap_or_default();
    stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().skip(1).filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0)
}

#[test]
fn fragmented_udp_through_a_cluster_ip_and_node_ports_both_ways() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    // 4 KB datagrams on 1500-byte links: three fragments each way.
    udp_echo(&n.client.ns, at(FRAG_CIP, 53), 4000, 5)?;
    udp_echo(&n.outside.ns, at(NODE_A, 30053), 4000, 5).context("node port, remote backend (SNAT)")?;
    udp_echo(&n.outside.ns, at(NODE_B, 30053), 4000, 5).context("node port, local backend")?;
    // Small ones still work, and the fragments were translated by the datapath.
    udp_echo(&n.client.ns, at(FRAG_CIP, 53), 100, 3)?;
    assert!(stat(&n.lab, &n.a, "frag_translated") >= 20, "{}", n.lab.list(&n.a, "stats")?);
    assert_eq!(stat(&n.lab, &n.a, "drop_frag_no_first"), 0);
    Ok(())
}

/// Uploads `len` bytes to a `--count` server; returns what it counted.
fn upload(ns: &str, addr: SocketAddr, len: usize) -> Result<usize> {
    in_ns(ns, || -> Result<usize> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
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
    in_ns(ns, || -> Result<()> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
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
                if *b != (off * 31 + 7) as u8 {
                    bail!("byte {} from {addr} corrupted", got + i);
                }
            }
            got += n;
        }
        if got != len {
            bail!("downloaded {got} of {len} bytes from {addr}");
        }
        Ok(())
    })?
}

#[test]
fn bulk_transfers_through_cluster_ip_and_node_ports_with_offloads_on() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    for (what, ns, ip, count, source) in [
        ("ClusterIP, remote backend", &n.client.ns, BULK_CIP, 7000, 7001),
        ("NodePort, local backend", &n.outside.ns, NODE_A, 30070, 30071),
        ("NodePort, remote backend", &n.outside.ns, NODE_A, 30072, 30073),
    ] {
        let start = Instant::now();
        assert_eq!(upload(ns, at(ip, count), MB10).with_context(|| what.to_string())?, MB10, "{what}");
        download(ns, at(ip, source), MB10).with_context(|| what.to_string())?;
        eprintln!("{what}: 2 x 10 MB in {:?}", start.elapsed());
    }
    Ok(())
}

/// Devices without a link-layer header: Calico's IPIP and WireGuard modes route other nodes'
/// pod ranges through one (`tunl0`, `wireguard.cali`), a VPN brings clients in by one; here a
/// tun device pair whose packets the test carries (`lb_tests::Tunnel`; kernel tunnels are not
/// built on these machines). First the replies leaving by one: a pod on node-a downloads from
/// node-b's node port, whose backend is local to node-b: the flow is not SNATed, so node-b's
/// stack sends the backend's replies into the tunnel as the backend sent them, and only the
/// tunnel's egress program can restore the node port (the Ethernet program there would read
/// the IP header 14 bytes off). A ClusterIP that node-a translates has its replies cross the
/// tunnel untouched and restored at the client's veth. Then Service traffic arriving by one:
/// node-a routes node-b's address through the tunnel, so the node port's packets reach node-b
/// by tun-b's ingress as the client sent them (node-a translates only its own node ports),
/// where only the tunnel's ingress program serves them; and a node port without endpoints
/// refuses the client from there. Bulk both ways, full-sized packets (the tun devices take no
/// offloads), with the INVALID-dropping rule of `net` on both nodes.
#[test]
fn service_traffic_by_a_tunnel_device_is_translated_both_ways() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    // After `n`, so dropped (its threads stopped, its devices closed) before the lab.
    let _tunnel = Tunnel::open((&n.a.ns, "tun-a"), (&n.b.ns, "tun-b"))?;
    n.lab.exec(&n.b.ns, &["ip", "route", "replace", "10.244.1.0/24", "dev", "tun-b"])?;
    // The agent attaches a new interface when it appears: both tc hooks (no XDP).
    let links = n.b.pin_dir.join("links");
    if !lb_tests::eventually(Duration::from_secs(10), || {
        links.join("tc_egress_tun-b").exists() && links.join("tc_ingress_tun-b").exists()
    }) {
        bail!("tun-b not attached; agent log:\n{}", n.lab.agent_log(&n.b));
    }
    assert!(!links.join("xdp_tun-b").exists(), "no XDP on a device without a link-layer header");
    let counted = |what: &str| -> Result<u64> {
        Ok(n.lab.exec(&n.b.ns, &["cat", &format!("/sys/class/net/tun-b/statistics/{what}")])?.trim().parse()?)
    };
    let sent = || counted("tx_packets");
    let before = sent()?;
    for (what, ip, count, source) in
        [("NodePort, backend local to node-b", NODE_B, 30072, 30073), ("ClusterIP", BULK_CIP, 7000, 7001)]
    {
        assert_eq!(upload(&n.client.ns, at(ip, count), MB10).with_context(|| what.to_string())?, MB10, "{what}");
        download(&n.client.ns, at(ip, source), MB10).with_context(|| what.to_string())?;
    }
    // The replies did take the tunnel (10 MB each way is thousands of packets), and node-b's
    // restored the node port's (fewer runs than packets: GRO hands tc super-packets, which the
    // device's transmit path segments after it).
    let through = sent()? - before;
    assert!(through > 5000, "{through} packets through tun-b");
    assert!(stat(&n.lab, &n.b, "reply_translated") > 100, "{}", n.lab.list(&n.b, "stats")?);

    n.lab.exec(&n.a.ns, &["ip", "route", "replace", &format!("{NODE_B}/32"), "dev", "tun-a"])?;
    let (received, new_flows) = (counted("rx_packets")?, stat(&n.lab, &n.b, "fwd_new_flow"));
    // The second: its backend is on node-a, so node-b SNATs the flow to itself and routes it
    // into the tunnel (`bpf_redirect_neigh`, which strips the pushed header); the backend's
    // replies to node-b's address take the tunnel too (node-a's route), reach node-b by tun-b's
    // ingress, and are routed back into the tunnel restored. The third, from outside: in by
    // node-b's Ethernet device, out by the tunnel, as a node port to a remote backend goes
    // with Calico's IPIP (the kernel weighs such a packet with its Ethernet header against the
    // tunnel's MTU: `ctx.rs`, `fib`); its replies come back by the tunnel and leave by
    // Ethernet.
    for (what, ns, count, source) in [
        ("backend local to node-b", &n.client.ns, 30072, 30073),
        ("backend on node-a, SNAT", &n.client.ns, 30070, 30071),
        ("from outside, backend on node-a, SNAT", &n.outside.ns, 30070, 30071),
    ] {
        let what = format!("NodePort of node-b, {what}");
        assert_eq!(upload(ns, at(NODE_B, count), MB10).with_context(|| what.clone())?, MB10, "{what}");
        download(ns, at(NODE_B, source), MB10).with_context(|| what.clone())?;
    }
    let through = counted("rx_packets")? - received;
    assert!(through > 15000, "{through} packets into tun-b");
    assert!(stat(&n.lab, &n.b, "fwd_new_flow") >= new_flows + 6, "{}", n.lab.list(&n.b, "stats")?);
    // Refused by the datapath (node-b's stack would answer with a reset too: the counter
    // tells them apart).
    let rejects = stat(&n.lab, &n.b, "reject_no_backend");
    let refused = lb_tests::tcp_connect(&n.client.ns, at(NODE_B, 30074), Duration::from_secs(2))?;
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a node port without endpoints, reached by the tunnel, refuses: {refused:?}"
    );
    assert!(stat(&n.lab, &n.b, "reject_no_backend") > rejects, "{}", n.lab.list(&n.b, "stats")?);
    Ok(())
}

#[test]
fn path_mtu_below_the_link_mtu_is_learnt_through_the_service() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    // The remote backend sits behind a 1400-byte hop: node-b cannot forward the client's
    // 1500-byte packets to it and answers with "fragmentation needed", which quotes the
    // packet as we translated it (client -> backend). Only a translated error reaches the
    // client's socket, which then sends smaller segments; else the upload black-holes.
    n.lab.exec(&n.b.ns, &["ip", "link", "set", &n.remote.host_if, "mtu", "1400"])?;
    assert_eq!(upload(&n.client.ns, at(BULK_CIP, 7000), MB10)?, MB10);
    assert!(stat(&n.lab, &n.a, "icmp_translated") >= 1, "{}", n.lab.list(&n.a, "stats")?);
    Ok(())
}

#[test]
fn udp_to_a_backend_without_a_socket_is_refused() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    let r = in_ns(&n.client.ns, || -> std::io::Result<()> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(at(DEAD_CIP, 9))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map(|_| ())
    })?;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the backend's port unreachable, translated, refuses the client's socket: {r:?}"
    );
    Ok(())
}

#[test]
fn host_network_endpoints_on_this_node_and_another() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    for (what, ip) in [("this node", HOST_CIP), ("another node", HOST_REMOTE_CIP)] {
        let body = lb_tests::http_get(&n.client.ns, at(ip, 80), "/").with_context(|| what.to_string())?;
        assert!(body.starts_with("host-"), "{what}: {body}");
        udp_echo(&n.client.ns, at(ip, 53), 200, 3).with_context(|| what.to_string())?;
        udp_echo(&n.client.ns, at(ip, 53), 4000, 2).with_context(|| format!("{what}, fragmented"))?;
    }
    let _ = (&n.local, &n.remote);
    Ok(())
}

/// The rolling update's Service and its slice: `(pod, ready, serving, terminating)`.
fn roll_manifests(eps: &[(&Pod, bool, bool, bool)]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: roll}\nspec: {type: NodePort, clusterIP: 10.96.7.20, ports: [{port: 80, nodePort: 30080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: roll-1, labels: {kubernetes.io/service-name: roll}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints:\n",
    );
    if eps.is_empty() {
        y.pop();
        y += " []\n";
    }
    for (p, ready, serving, terminating) in eps {
        y += &format!(
            "- {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}\n",
            p.ip, p.node
        );
    }
    y
}

#[test]
fn rolling_update_under_load_through_a_node_port_fails_no_request() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let ul = lab.add_underlay()?;
    let a = lab.add_node("node-a", 1)?;
    let b = lab.add_node("node-b", 2)?;
    lab.connect_nodes(&ul, &[(&a, NODE_A), (&b, NODE_B)])?;
    let outside = lab.add_outside(&ul, "outside", OUTSIDE)?;
    for ns in [&ul.ns, &a.ns, &b.ns, &outside.ns] {
        offloads_on(&lab, ns)?;
    }
    for n in [&a, &b] {
        lab.exec(&n.ns, &["ip", "route", "add", "default", "via", "192.168.49.254"])?;
    }
    // Old pods on node-b, new ones on node-a: requests to node-a's port move from remote
    // (SNAT, routed) to local backends, and back for node-b's.
    let v1 = lab.add_pod(&b, "roll-v1", 31)?;
    let v2 = lab.add_pod(&a, "roll-v2", 32)?;
    let v3 = lab.add_pod(&b, "roll-v3", 33)?;
    for p in [&v1, &v2, &v3] {
        lab.serve(p, &[80], &[], &[])?;
    }
    let write = |lab: &Lab, eps: &[(&Pod, bool, bool, bool)]| -> Result<()> {
        let y = roll_manifests(eps);
        lab.write_manifests(&a, &y)?;
        lab.write_manifests(&b, &y)
    };
    write(&lab, &[(&v1, true, true, false)])?;
    for (n, p) in [(&a, &v2), (&b, &v1)] {
        lab.start_agent(n, &["cbr0", "eth0", &p.host_if], 2, &[])?;
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Which step of the rollout a failed request fell in, for the failure message.
    let step_no = std::sync::atomic::AtomicU32::new(0);
    let t0 = Instant::now();
    let (ok, failed, seen) =
        std::thread::scope(|s| -> Result<(usize, Vec<String>, std::collections::BTreeSet<String>)> {
            let client = s.spawn(|| {
                let (mut ok, mut failed, mut seen) = (0usize, Vec::new(), std::collections::BTreeSet::new());
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let node = if i.is_multiple_of(2) { NODE_A } else { NODE_B };
                    i += 1;
                    match lb_tests::http_get(&outside.ns, at(node, 30080), "/") {
                        Ok(body) => {
                            ok += 1;
                            seen.insert(body);
                        }
                        Err(e) => failed.push(format!(
                            "{node} at {:?}, step {}: {e:#}",
                            t0.elapsed(),
                            step_no.load(std::sync::atomic::Ordering::Relaxed)
                        )),
                    }
                }
                (ok, failed, seen)
            });
            // Time-based: each stage of the rollout runs under load for a while.
            let step = Duration::from_millis(1500);
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // v2 comes up and is ready beside v1; v1 starts terminating (still serving), then
            // leaves the slice; its process exits a grace period later.
            write(&lab, &[(&v1, true, true, false), (&v2, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            write(&lab, &[(&v1, false, true, true), (&v2, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            write(&lab, &[(&v2, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lab.stop_server(&v1);
            // And on to v3, on the other node again.
            write(&lab, &[(&v2, true, true, false), (&v3, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            write(&lab, &[(&v2, false, true, true), (&v3, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            write(&lab, &[(&v3, true, true, false)])?;
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lab.stop_server(&v2);
            std::thread::sleep(step);
            step_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(client.join().expect("client thread"))
        })?;
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\nnode-a:\n{}\nnode-b:\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        lab.list(&a, "stats")?,
        lab.list(&b, "stats")?
    );
    assert!(ok > 100, "only {ok} requests");
    for p in ["roll-v1", "roll-v2", "roll-v3"] {
        assert!(seen.contains(p), "{p} never answered: {seen:?}");
    }
    Ok(())
}

#[test]
fn external_and_load_balancer_ips_to_local_and_remote_backends_tcp_and_udp() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let n = net()?;
    for (what, ip) in [
        ("external IP, local backend", EXT_LOCAL),
        ("external IP, remote backend", EXT_REMOTE),
        ("LoadBalancer IP, local backend", LB_LOCAL),
        ("LoadBalancer IP, remote backend", LB_REMOTE),
    ] {
        assert_eq!(upload(&n.outside.ns, at(ip, 7000), 1 << 20).with_context(|| what.to_string())?, 1 << 20, "{what}");
        udp_echo(&n.outside.ns, at(ip, 53), 100, 3).with_context(|| format!("{what}, UDP"))?;
        udp_echo(&n.outside.ns, at(ip, 53), 4000, 2).with_context(|| format!("{what}, fragmented UDP"))?;
    }
    Ok(())
}

/// A counter of one hook (`TC`, `XDP` or `SOCK` column) from `lb list stats`.
fn stat_at(lab: &Lab, node: &Node, name: &str, column: usize) -> u64 {
    let stats = lab.list(node, "stats").unwrap_or_default();
    stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(column))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Returns once `node`'s agent has synced its interfaces after this call (every sync reads the
/// devices' state afresh): a veth pair added now gets attached; it is removed again after.
fn wait_links_synced(lab: &Lab, node: &Node) -> Result<()> {
    lab.exec(&node.ns, &["ip", "link", "add", "lbsync0", "type", "veth", "peer", "name", "lbsync1"])?;
    let pin = node.pin_dir.join("links/tc_ingress_lbsync0");
    let attached = lb_tests::eventually(Duration::from_secs(10), || pin.exists());
    lab.exec(&node.ns, &["ip", "link", "del", "lbsync0"])?;
    if !attached {
        bail!("{}: the agent did not sync its interfaces within 10 s:\n{}", node.name, lab.agent_log(node));
    }
    if !lb_tests::eventually(Duration::from_secs(10), || !pin.exists()) {
        bail!("{}: the agent kept the link of a removed interface:\n{}", node.name, lab.agent_log(node));
    }
    Ok(())
}

#[test]
fn default_xdp_mode_leaves_virtual_interfaces_to_tc_and_generic_is_an_override() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut n = net()?;
    // A veth cannot be trusted with native XDP frames (its peer needs NAPI, and even then
    // replies were lost here), so the default attaches no XDP on it and says why; tc does it
    // all. Still so once the peer has GRO and the veth advertises ndo-xmit.
    let ports = n.lab.exec(&n.ul_ns, &["ip", "-o", "link", "show", "type", "veth"])?;
    for l in ports.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("").to_string();
        n.lab.exec(&n.ul_ns, &["ethtool", "-K", &name, "gro", "on"])?;
    }
    for node in [&n.a, &n.b] {
        wait_links_synced(&n.lab, node)?;
    }
    for node in [&n.a, &n.b] {
        assert!(!node.pin_dir.join("links/xdp_eth0").exists(), "{}: no XDP on a veth by default", node.name);
        assert!(n.lab.agent_log(node).contains("tc handles this interface alone"), "{}", n.lab.agent_log(node));
    }
    assert_eq!(upload(&n.outside.ns, at(NODE_A, 30072), 1 << 20)?, 1 << 20);
    // `--xdp-mode generic` attaches XDP anyway, and every path still works: packets that are
    // CHECKSUM_PARTIAL (tx offload on, as here) are left to tc, the others XDP forwards itself.
    n.lab.kill_agent(&n.a);
    n.lab.start_agent(&n.a, &["cbr0", "eth0", &n.local.host_if], 12, &["--xdp-mode", "generic"])?;
    assert!(n.a.pin_dir.join("links/xdp_eth0").exists(), "generic XDP attached");
    let deferred = stat_at(&n.lab, &n.a, "deferred_to_tc", 2);
    assert_eq!(upload(&n.outside.ns, at(NODE_A, 30072), 1 << 20)?, 1 << 20);
    udp_echo(&n.outside.ns, at(NODE_A, 30053), 4000, 3)?;
    assert!(stat_at(&n.lab, &n.a, "deferred_to_tc", 2) > deferred, "{}", n.lab.list(&n.a, "stats")?);
    // With complete checksums on the wire (offload off, as frames from a NIC), generic XDP
    // forwards node-port traffic to the remote backend itself.
    for l in ports.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("").to_string();
        n.lab.exec(&n.ul_ns, &["ethtool", "-K", &name, "tx", "off"])?;
    }
    for ns in [&n.a.ns, &n.b.ns, &n.outside.ns] {
        n.lab.exec(ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    let routed = stat_at(&n.lab, &n.a, "routed", 2);
    assert_eq!(upload(&n.outside.ns, at(NODE_A, 30072), 1 << 20)?, 1 << 20);
    udp_echo(&n.outside.ns, at(NODE_A, 30053), 4000, 3)?;
    assert!(stat_at(&n.lab, &n.a, "routed", 2) > routed, "{}", n.lab.list(&n.a, "stats")?);
    Ok(())
}
