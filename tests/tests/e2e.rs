//! End to end: real TCP and UDP between network namespaces, through `lb` agents running the
//! real eBPF datapath. Each test builds its own lab and tears it down, also on failure.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_tests::{http_get, lab_manifests, privileged, tcp_connect, udp_request, udp_socket, Lab, Node, Pod};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 104, 123, 59);
const POD_NAMES: [&str; 3] =
    ["web-deploy-66fbbff65d-5lgpk", "web-deploy-66fbbff65d-d6xt6", "web-deploy-66fbbff65d-dwvk4"];

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

/// One node with the lab's three web pods (HTTP 80, echo 9000, UDP 5353) and a busybox pod.
struct SingleNode {
    lab: Lab,
    node: Node,
    web: Vec<Pod>,
    client: Pod,
}

const EXTRA_PORTS: [(&str, u16, &str, u16); 2] = [("echo", 9000, "TCP", 9000), ("dns", 53, "UDP", 5353)];

fn single_node() -> Result<SingleNode> {
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1", 1)?;
    let mut web = Vec::new();
    for (i, name) in POD_NAMES.iter().enumerate() {
        let pod = lab.add_pod(&node, name, 11 + i as u8)?;
        lab.serve(&pod, &[80], &[9000], &[5353])?;
        web.push(pod);
    }
    let client = lab.add_pod(&node, "busybox", 100)?;
    let all: Vec<(&Pod, bool)> = web.iter().map(|p| (p, true)).collect();
    lab.write_manifests(&node, &lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS))?;
    lab.start_agent(&node, &["cbr0", "veth1", "veth2", "veth3", "veth4"], 3, &[])?;
    Ok(SingleNode { lab, node, web, client })
}

/// Polls `f` until it returns true or `within` passes.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn seed_lab_cluster_ip_spreads_over_the_three_pods() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        *seen.entry(http_get(&s.client.ns, vip(80), "/")?).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "all three pods answer: {seen:?}");
    for name in POD_NAMES {
        assert!(seen.get(name).copied().unwrap_or(0) >= 10, "{name} got at least 10 of 90: {seen:?}");
    }

    // `lb list` shows the frontends, backends and live flows of the running agent.
    let services = s.lab.list(&s.node, "services")?;
    assert!(services.contains("10.104.123.59:80/TCP") && services.contains("default/web-service:http"), "{services}");
    let backends = s.lab.list(&s.node, "backends")?;
    for pod in &s.web {
        assert!(backends.contains(&format!("{}:80", pod.ip)), "{backends}");
    }
    let ct = s.lab.list(&s.node, "conntrack")?;
    assert!(ct.contains("10.244.1.100") && ct.contains("dst 10.244.1.1"), "{ct}");
    let stats = s.lab.list(&s.node, "stats")?;
    assert!(stats.lines().any(|l| l.starts_with("fwd_new_flow") && !l.ends_with(" 0")), "{stats}");
    Ok(())
}

#[test]
fn udp_service_answers_from_the_cluster_ip() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    // A connected socket drops datagrams from any other source: an answer proves reverse NAT.
    let sock = udp_socket(&s.client.ns, vip(53))?;
    let answer = udp_request(&sock, "query")?;
    let (name, peer) = answer.split_once(' ').expect("NAME PEER");
    assert!(POD_NAMES.contains(&name), "{answer}");
    assert!(peer.starts_with("10.244.1.100:"), "the pod saw the client's own address: {answer}");
    // Same flow, same backend.
    for _ in 0..5 {
        assert!(udp_request(&sock, "again")?.starts_with(name));
    }
    Ok(())
}

#[test]
fn removed_endpoint_gets_no_new_flows_while_a_long_lived_connection_keeps_working() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    let conn = tcp_connect(&s.client.ns, vip(9000), Duration::from_secs(2))??;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut ask = |msg: &str| -> Result<String> {
        writeln!(w, "{msg}")?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    };
    let first = ask("hello")?;
    let pinned = first.split(' ').next().unwrap().to_string();
    let removed = s.web.iter().find(|p| p.name == pinned).expect("answer names a pod");

    // The endpoints controller drops the pod from the slice.
    let rest: Vec<(&Pod, bool)> = s.web.iter().filter(|p| p.name != pinned).map(|p| (p, true)).collect();
    s.lab.write_manifests(&s.node, &lab_manifests(CLUSTER_IP, &rest, &EXTRA_PORTS))?;
    let gone = eventually(Duration::from_secs(2), || {
        !s.lab.list(&s.node, "backends").unwrap_or_default().contains(&format!("{}:80", removed.ip))
    });
    assert!(gone, "backend removed from the maps within 2 s");

    for _ in 0..30 {
        assert_ne!(http_get(&s.client.ns, vip(80), "/")?, pinned, "no new flow reaches the removed pod");
    }
    assert_eq!(ask("still there?")?, format!("{pinned} still there?"), "the long-lived connection keeps its backend");
    Ok(())
}

#[test]
fn service_without_endpoints_is_refused_at_once() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    // Every pod becomes not ready.
    let none: Vec<(&Pod, bool)> = s.web.iter().map(|p| (p, false)).collect();
    s.lab.write_manifests(&s.node, &lab_manifests(CLUSTER_IP, &none, &EXTRA_PORTS))?;
    let empty_frontends = || {
        let table = s.lab.list(&s.node, "services").unwrap_or_default();
        table.lines().skip(1).filter(|l| l.split_whitespace().nth(2) == Some("0")).count()
    };
    assert!(eventually(Duration::from_secs(2), || empty_frontends() == 3), "all frontends lost their backends");

    let start = Instant::now();
    let err = tcp_connect(&s.client.ns, vip(80), Duration::from_secs(5))?.expect_err("must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(start.elapsed() < Duration::from_secs(1), "refused in {:?}", start.elapsed());

    let sock = udp_socket(&s.client.ns, vip(53))?;
    let err = udp_request(&sock, "query").expect_err("must be refused");
    let io = err.downcast_ref::<std::io::Error>().expect("io error");
    assert_eq!(io.kind(), ErrorKind::ConnectionRefused, "{io}");
    Ok(())
}

#[test]
fn deleting_the_service_makes_the_cluster_ip_dead() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()));
    s.lab.write_manifests(&s.node, "")?;
    assert!(
        eventually(Duration::from_secs(2), || s.lab.list(&s.node, "services").unwrap_or_default().lines().count() == 1)
    );
    let r = tcp_connect(&s.client.ns, vip(80), Duration::from_secs(1))?;
    assert!(r.is_err(), "nothing answers on a deleted Service's ClusterIP");
    Ok(())
}

#[test]
fn malformed_service_is_rejected_alone() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    let all: Vec<(&Pod, bool)> = s.web.iter().map(|p| (p, true)).collect();
    let broken = "---\napiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec:\n  clusterIP: 10.96.7.7\n  ports:\n  - {port: 99999}\n";
    s.lab.write_manifests(&s.node, &(lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS) + broken))?;
    let logged = eventually(Duration::from_secs(3), || s.lab.agent_log(&s.node).contains("spec.ports[0].port"));
    assert!(logged, "the error names the object and the field:\n{}", s.lab.agent_log(&s.node));
    assert!(s.lab.agent_log(&s.node).contains("default/broken"));
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()), "web-service keeps working");
    Ok(())
}

#[test]
fn client_on_one_node_reaches_a_backend_on_another_through_the_underlay() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let a = lab.add_node("node-a", 1)?;
    let b = lab.add_node("node-b", 2)?;
    lab.link_nodes(&a, &b)?;
    let backend = lab.add_pod(&b, "web-deploy-remote", 11)?;
    lab.serve(&backend, &[80], &[9000], &[5353])?;
    let client = lab.add_pod(&a, "busybox", 100)?;
    let yaml = lab_manifests(CLUSTER_IP, &[(&backend, true)], &EXTRA_PORTS);
    lab.write_manifests(&a, &yaml)?;
    lab.write_manifests(&b, &yaml)?;
    lab.start_agent(&a, &["cbr0", "ul0", "veth2"], 3, &[])?;
    lab.start_agent(&b, &["cbr0", "ul0", "veth1"], 3, &[])?;

    for _ in 0..5 {
        assert_eq!(http_get(&client.ns, vip(80), "/")?, "web-deploy-remote");
    }
    assert_eq!(
        http_get(&client.ns, vip(80), "/peer")?.split(':').next(),
        Some("10.244.1.100"),
        "pod-to-pod keeps the client address"
    );
    let sock = udp_socket(&client.ns, vip(53))?;
    assert!(udp_request(&sock, "q")?.starts_with("web-deploy-remote "));
    Ok(())
}

#[test]
fn pod_created_after_the_agent_started_is_attached_and_served() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut s = single_node()?;
    let late = s.lab.add_pod(&s.node, "late-client", 101)?;
    let pin = s.node.pin_dir.join("links").join("tc_ingress_veth5");
    assert!(eventually(Duration::from_secs(3), || pin.exists()), "veth5 attached within the 1 s interface poll");
    assert!(POD_NAMES.contains(&http_get(&late.ns, vip(80), "/")?.as_str()));
    Ok(())
}

#[test]
fn iface_flag_narrows_attachment() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1", 1)?;
    let pod = lab.add_pod(&node, "web", 11)?;
    let client = lab.add_pod(&node, "busybox", 100)?;
    lab.serve(&pod, &[80], &[], &[])?;
    lab.write_manifests(&node, &lab_manifests(CLUSTER_IP, &[(&pod, true)], &[]))?;
    // Only the backend's veth: replies are translated there, but the client's veth carries no
    // program, so its packets to the ClusterIP are never translated.
    lab.start_agent(&node, &["veth1"], 1, &["--iface", "veth1"])?;
    std::thread::sleep(Duration::from_millis(1500));
    let links: Vec<String> = std::fs::read_dir(node.pin_dir.join("links"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links, vec!["tc_ingress_veth1".to_string()]);
    assert!(http_get(&client.ns, vip(80), "/").is_err(), "client veth is not attached");
    Ok(())
}

#[test]
fn agent_restart_keeps_flows_and_adopts_pinned_state() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut s = single_node()?;
    let conn = tcp_connect(&s.client.ns, vip(9000), Duration::from_secs(2))??;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut ask = |msg: &str| -> Result<String> {
        writeln!(w, "{msg}")?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    };
    let pinned = ask("one")?.split(' ').next().unwrap().to_string();
    let services_before = s.lab.list(&s.node, "services")?;

    // Agent gone (as after a crash): programs and maps stay pinned, traffic keeps flowing.
    s.lab.kill_agent(&s.node);
    assert_eq!(ask("two")?, format!("{pinned} two"));
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()));

    // A change made while no agent runs: one pod leaves.
    let leaving = s.web.iter().find(|p| p.name != pinned).unwrap().clone();
    let rest: Vec<(&Pod, bool)> = s.web.iter().filter(|p| p.name != leaving.name).map(|p| (p, true)).collect();
    s.lab.write_manifests(&s.node, &lab_manifests(CLUSTER_IP, &rest, &EXTRA_PORTS))?;

    // A new agent adopts the pins, keeps the service ids, and applies the change.
    s.lab.start_agent(&s.node, &["cbr0", "veth1", "veth2", "veth3", "veth4"], 3, &[])?;
    assert!(eventually(Duration::from_secs(3), || !s
        .lab
        .list(&s.node, "backends")
        .unwrap_or_default()
        .contains(&format!("{}:80", leaving.ip))));
    let ids =
        |t: &str| t.lines().map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(ids(&s.lab.list(&s.node, "services")?), ids(&services_before), "same ids for the same frontends");
    assert!(s.lab.agent_log(&s.node).contains("adopted service state"), "{}", s.lab.agent_log(&s.node));
    assert!(s.lab.agent_log(&s.node).contains("took over pinned link"));
    assert_eq!(ask("three")?, format!("{pinned} three"), "the long-lived connection survived the restart");
    for _ in 0..20 {
        assert_ne!(http_get(&s.client.ns, vip(80), "/")?, leaving.name);
    }
    Ok(())
}
