//! End to end: real TCP and UDP between network namespaces, through `lb` agents running the
//! real eBPF datapath. Each test builds its own lab and tears it down, also on failure.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{eventually, http_get, lab_manifests, privileged, tcp_connect, udp_request, udp_socket, Lab, Node, Pod};

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
    single_node_with(&[])
}

/// `single_node` with extra agent flags.
fn single_node_with(agent_flags: &[&str]) -> Result<SingleNode> {
    single_node_on(&["cbr0", "veth1", "veth2", "veth3", "veth4"], agent_flags)
}

/// `single_node` whose agent is waited for until it has attached `ifaces`.
fn single_node_on(ifaces: &[&str], agent_flags: &[&str]) -> Result<SingleNode> {
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
    lab.start_agent(&node, ifaces, 3, agent_flags)?;
    Ok(SingleNode { lab, node, web, client })
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
    let tc_count = |name: &str| {
        stats.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("0").to_string()
    };
    assert_eq!(tc_count("fwd_new_flow"), "90", "{stats}");
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
    let mut conn = lb_tests::EchoConn::open(&s.client.ns, vip(9000))?;
    let mut ask = |msg: &str| conn.ask(msg);
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
fn pod_created_after_the_agent_started_is_served_from_its_first_packet() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    // Programs on the pods' veths only: with the bridge attached too, the late pod's SYN,
    // bridged up to cbr0, would be translated there whether or not its own veth was attached
    // in time, and the test could not fail.
    let mut s = single_node_on(&["veth1", "veth2", "veth3", "veth4"], &["--iface", "veth*"])?;
    let late = s.lab.add_pod(&s.node, "late-client", 101)?;
    // The pod sends at once: its veth must carry translated traffic from the first packet (the
    // agent attaches on the link's rtnetlink event). A SYN that went out untranslated would be
    // retransmitted only after 1 s, so a connect given 900 ms fails then.
    let conn = tcp_connect(&late.ns, vip(80), Duration::from_millis(900))?;
    assert!(conn.is_ok(), "first connection from a new pod: {conn:?}\n{}", s.lab.agent_log(&s.node));
    assert!(s.node.pin_dir.join("links").join("tc_ingress_veth5").exists());
    assert!(POD_NAMES.contains(&http_get(&late.ns, vip(80), "/")?.as_str()));
    Ok(())
}

/// A node that filters by strict reverse path (`rp_filter` 1, the RHEL family's default), with
/// a backend pod routed as point-to-point CNIs route them (its own /32 over its veth, no
/// bridge: kindnet, Calico). The pod's reply to a pod that reached it through the ClusterIP
/// goes through the stack as the pod sent it (its own address as its source, whose route
/// leaves through its veth) and is restored at the egress of the client's interface (the pod
/// bridge here), so strict
/// filtering, which the agent leaves alone by default, passes it. (Restored at the backend's
/// veth's ingress, before the stack, as before 2026-12-06, its source was the ClusterIP, whose
/// route leaves through eth0: strict filtering dropped it, and so would loose filtering on a
/// veth without an address; that is what the agent's relaxation was for, the default then,
/// `--relax-rp-filter` now, which still works.) `--keep-rp-filter`, the old way to ask for
/// today's default, is still accepted.
#[test]
fn strict_reverse_path_filtering_passes_replies_through_a_cluster_ip() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let ul = lab.add_underlay()?;
    let node = lab.add_node("node1", 1)?;
    lab.connect_nodes(&ul, &[(&node, Ipv4Addr::new(192, 168, 49, 2))])?;
    // A default route, as every node has: loose filtering asks for some route back.
    lab.exec(&node.ns, &["ip", "route", "add", "default", "via", "192.168.49.254"])?;
    // Strict everywhere: on the node, and by default on the pods' interfaces made next.
    for conf in ["all", "default", "cbr0", "eth0"] {
        lab.exec(&node.ns, &["sysctl", "-qw", &format!("net.ipv4.conf.{conf}.rp_filter=1")])?;
    }
    let web = lab.add_pod(&node, "web", 11)?;
    // Routed, not bridged: an address of its own outside the bridge's subnet (so the client
    // goes through its gateway), alone on its veth; its gateway the node's (answered by the
    // node's ARP for its own address on any interface).
    let web = Pod { ip: Ipv4Addr::new(10, 244, 101, 11), ..web };
    let cidr = format!("{}/32", web.ip);
    lab.exec(&node.ns, &["ip", "link", "set", &web.host_if, "nomaster"])?;
    lab.exec(&node.ns, &["ip", "route", "add", &cidr, "dev", &web.host_if])?;
    lab.exec(&web.ns, &["ip", "addr", "flush", "dev", "eth0"])?;
    lab.exec(&web.ns, &["ip", "addr", "add", &cidr, "dev", "eth0"])?;
    lab.exec(&web.ns, &["ip", "route", "add", "default", "via", &node.gateway.to_string(), "dev", "eth0", "onlink"])?;
    lab.serve(&web, &[80], &[], &[])?;
    let client = lab.add_pod(&node, "busybox", 100)?;
    lab.write_manifests(&node, &lab_manifests(CLUSTER_IP, &[(&web, true)], &[]))?;
    let ifaces = ["cbr0", "eth0", web.host_if.as_str(), client.host_if.as_str()];
    let rp_filter = |lab: &Lab, conf: &str| -> Result<String> {
        Ok(lab.exec(&node.ns, &["sysctl", "-n", &format!("net.ipv4.conf.{conf}.rp_filter")])?.trim().to_string())
    };

    for flags in [&[][..], &["--keep-rp-filter"][..]] {
        lab.start_agent(&node, &ifaces, 1, flags)?;
        let served = http_get(&client.ns, vip(80), "/")
            .with_context(|| format!("strict filtering left alone ({flags:?}): {}", lab.agent_log(&node)))?;
        assert_eq!(served, "web");
        let modes: Vec<String> = ["all", "cbr0", "eth0", &web.host_if, &client.host_if]
            .into_iter()
            .map(|c| rp_filter(&lab, c))
            .collect::<Result<_>>()?;
        assert_eq!(modes, ["1", "1", "1", "1", "1"], "left alone ({flags:?})");
        lab.kill_agent(&node);
    }

    lab.start_agent(&node, &ifaces, 1, &["--relax-rp-filter"])?;
    assert_eq!(http_get(&client.ns, vip(80), "/")?, "web", "{}", lab.agent_log(&node));
    // Loose where the interface has an address; off on the pods' veths, which have none (and
    // so in `all`, the mode in force being the larger of the two).
    let modes: Vec<String> = ["all", "cbr0", "eth0", &web.host_if, &client.host_if]
        .into_iter()
        .map(|c| rp_filter(&lab, c))
        .collect::<Result<_>>()?;
    assert_eq!(modes, ["0", "2", "2", "0", "0"]);
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
    // The agent attaches to every interface it wants in the sync before it says it is ready,
    // which start_agent waits for; no interface appears later.
    lab.start_agent(&node, &["veth1"], 1, &["--iface", "veth1"])?;
    let mut links: Vec<String> = std::fs::read_dir(node.pin_dir.join("links"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("lb_sock_"))
        .collect();
    links.sort();
    assert_eq!(
        links,
        vec!["tc_egress_veth1".to_string(), "tc_ingress_veth1".to_string()],
        "interface links: only veth1 (ingress, and egress for host-network endpoints' replies)"
    );
    assert!(http_get(&client.ns, vip(80), "/").is_err(), "client veth is not attached");
    Ok(())
}

#[test]
fn agent_restart_keeps_flows_and_adopts_pinned_state() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut s = single_node()?;
    let mut conn = lb_tests::EchoConn::open(&s.client.ns, vip(9000))?;
    let mut ask = |msg: &str| conn.ask(msg);
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

/// A second `lb run` on a node whose agent runs waits for the pin directory, saying so,
/// without touching the running agent's state, and stops at once on SIGTERM (as a container's
/// PID 1, it has no default handler); `lb cleanup` refuses while the agent runs.
#[test]
fn a_second_agent_on_a_node_waits_and_cleanup_refuses_while_one_runs() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    let lb = lb_tests::lb_bin()?;
    let log_path = s.lab.dir.join("second-agent.log");
    let log = std::fs::File::create(&log_path)?;
    /// Killed (and reaped) when the test ends, also when it fails.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut second = Child(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", s.node.ns))
            .arg(&lb)
            .args(["run", "--manifests"])
            .arg(&s.node.manifests)
            .args(["--node-name", "node1", "--pin-dir"])
            .arg(&s.node.pin_dir)
            // Ports of its own: the first agent's are taken, and a clash would fail it.
            .args(["--metrics-addr", "127.0.0.1:19090", "--healthz-addr", "127.0.0.1:19256"])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let second_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(5), || second_log().contains("another agent holds this pin directory")),
        "{}",
        second_log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!second_log().contains("datapath loaded"), "{}", second_log());
    assert!(second.0.try_wait()?.is_none(), "the second agent exited: {}", second_log());
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()), "the running agent still serves");

    let out = std::process::Command::new(&lb).args(["cleanup", "--pin-dir"]).arg(&s.node.pin_dir).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("an agent is running"), "{err}");
    assert!(s.node.pin_dir.join("links").exists(), "cleanup removed a running agent's pins");

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(second.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(st) = second.0.try_wait()? {
            break st;
        }
        assert!(Instant::now() < deadline, "the waiting agent ignored SIGTERM: {}", second_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", second_log());
    assert!(second_log().contains("stopped while waiting"), "{}", second_log());
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()));
    Ok(())
}

// ---------- session affinity (issue 3): the second half of the seed lab ----------

fn set_affinity(s: &SingleNode, timeout: Option<u32>) -> Result<()> {
    let all: Vec<(&Pod, bool)> = s.web.iter().map(|p| (p, true)).collect();
    let yaml = lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS);
    let yaml = match timeout {
        Some(t) => lb_tests::with_session_affinity(&yaml, t),
        None => yaml,
    };
    // Applied within 2 s: the agent logs every change it programs. The log is counted before
    // the manifest is written, or a fast agent's line would be counted as already there.
    let want = match timeout {
        Some(t) => format!("affinity_timeout_s=Some({t})"),
        None => "affinity_timeout_s=None".to_string(),
    };
    let before = s.lab.agent_log(&s.node).matches(&want).count();
    s.lab.write_manifests(&s.node, &yaml)?;
    assert!(
        eventually(Duration::from_secs(2), || s.lab.agent_log(&s.node).matches(&want).count() > before),
        "change applied within 2 s:\n{}",
        s.lab.agent_log(&s.node)
    );
    Ok(())
}

fn backends_seen(s: &SingleNode, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(http_get(&s.client.ns, vip(80), "/")?).or_default() += 1;
    }
    Ok(seen)
}

#[test]
fn session_affinity_pins_the_busybox_loop_and_switches_like_the_conformance_tests() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    // A connection open across every switch must keep working and keep its backend.
    let mut conn = lb_tests::EchoConn::open(&s.client.ns, vip(9000))?;
    let mut ask = |msg: &str| conn.ask(msg);
    let long_lived = ask("0")?.split(' ').next().unwrap().to_string();

    let seen = backends_seen(&s, 15)?;
    assert!(seen.len() >= 2, "without affinity at least 2 backends in 15 requests: {seen:?}");

    set_affinity(&s, Some(60))?;
    assert_eq!(ask("1")?, format!("{long_lived} 1"));
    let seen = backends_seen(&s, 15)?;
    assert_eq!(seen.len(), 1, "15 of 15 requests on one backend: {seen:?}");
    let affinity = s.lab.list(&s.node, "affinity")?;
    assert!(affinity.contains("10.244.1.100") && affinity.contains("10.104.123.59:80/TCP"), "{affinity}");

    // UDP: new flows (new source ports) from the same client stick to one pod.
    let mut udp = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let sock = udp_socket(&s.client.ns, vip(53))?;
        udp.insert(udp_request(&sock, "q")?.split(' ').next().unwrap().to_string());
    }
    assert_eq!(udp.len(), 1, "{udp:?}");

    set_affinity(&s, Some(120))?;
    assert_eq!(backends_seen(&s, 5)?.len(), 1, "a timeout change keeps the pin");
    set_affinity(&s, None)?;
    let seen = backends_seen(&s, 15)?;
    assert!(seen.len() >= 2, "affinity off again: {seen:?}");
    assert_eq!(ask("2")?, format!("{long_lived} 2"), "the long-lived connection survived both switches");
    Ok(())
}

#[test]
fn session_affinity_spreads_distinct_clients() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    set_affinity(&s, Some(60))?;
    let clients: Vec<Ipv4Addr> = (101..=110).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
    lb_tests::add_addresses(&s.lab, &s.client, &clients)?;
    let mut chosen = BTreeMap::new();
    for ip in &clients {
        let mut per_client = std::collections::BTreeSet::new();
        for _ in 0..3 {
            per_client.insert(lb_tests::http_get_from(&s.client.ns, SocketAddr::from((*ip, 0)), vip(80), "/")?);
        }
        assert_eq!(per_client.len(), 1, "client {ip} stays on one backend: {per_client:?}");
        chosen.insert(*ip, per_client.into_iter().next().unwrap());
    }
    let distinct: std::collections::BTreeSet<_> = chosen.values().collect();
    assert!(distinct.len() > 1, "10 clients over more than one backend: {chosen:?}");
    Ok(())
}

#[test]
fn session_affinity_expires_after_the_idle_timeout() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    set_affinity(&s, Some(2))?;
    let ips: Vec<Ipv4Addr> = s.web.iter().map(|p| p.ip).collect();
    let name_of = |ip: Ipv4Addr| s.web.iter().find(|p| p.ip == ip).unwrap().name.clone();
    let from = |port: u16| SocketAddr::from((s.client.ip, port));
    // Source ports chosen so that hash selection alone would pick another pod than the pin.
    let first = lb_tests::http_get_from(&s.client.ns, from(45000), vip(80), "/")?;
    let pinned_ip = s.web.iter().find(|p| p.name == first).unwrap().ip;
    let other_ports: Vec<u16> =
        (45001..46000).filter(|&p| lb_tests::hash_choice(from(p), vip(80), &ips, 80) != pinned_ip).take(2).collect();
    assert_eq!(lb_tests::http_get_from(&s.client.ns, from(other_ports[0]), vip(80), "/")?, first, "pinned");

    // Time-based: the pin's 2 s idle timeout has to run out.
    std::thread::sleep(Duration::from_millis(3000));
    let expected = name_of(lb_tests::hash_choice(from(other_ports[1]), vip(80), &ips, 80));
    let after = lb_tests::http_get_from(&s.client.ns, from(other_ports[1]), vip(80), "/")?;
    assert_eq!(after, expected, "after 3 s idle the 2 s pin is gone and the hash decides");
    assert_ne!(after, first);
    Ok(())
}

// ---------- the node's own processes (issue 4) ----------

#[test]
fn node_processes_reach_cluster_ips_over_tcp_and_udp() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node()?;
    // The node namespace has no route to the ClusterIP: only socket-level translation helps.
    assert!(POD_NAMES.contains(&http_get(&s.node.ns, vip(80), "/")?.as_str()));
    // Unconnected UDP: sendto the ClusterIP, and recvfrom must show the ClusterIP again.
    let (reply, from) = lb_tests::in_ns(&s.node.ns, || -> Result<(String, SocketAddr)> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"q", vip(53))?;
        let mut buf = [0u8; 512];
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })??;
    assert!(POD_NAMES.contains(&reply.split(' ').next().unwrap()), "{reply}");
    assert_eq!(from, vip(53), "the reply shows the ClusterIP, not the pod");
    // getpeername of a connected socket shows the ClusterIP too.
    let peer = lb_tests::in_ns(&s.node.ns, || -> Result<SocketAddr> {
        Ok(std::net::TcpStream::connect_timeout(&vip(80), Duration::from_secs(2))?.peer_addr()?)
    })??;
    assert_eq!(peer, vip(80));
    // Pods are not affected by the node's socket programs: they still go through tc.
    assert!(POD_NAMES.contains(&http_get(&s.client.ns, vip(80), "/")?.as_str()));

    // No ready endpoints: refused at once, from the node too.
    let none: Vec<(&Pod, bool)> = s.web.iter().map(|p| (p, false)).collect();
    s.lab.write_manifests(&s.node, &lab_manifests(CLUSTER_IP, &none, &EXTRA_PORTS))?;
    assert!(eventually(Duration::from_secs(2), || {
        matches!(tcp_connect(&s.node.ns, vip(80), Duration::from_secs(1)), Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused)
    }));
    Ok(())
}

/// A frontend that failed to program (a full services map) is retried with back-off, not
/// left until an unrelated change touches it: once another Service frees a slot, it serves.
#[test]
fn a_frontend_that_did_not_fit_is_retried_when_room_appears() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
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
    let lab_yaml = lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS);
    let one = |name: &str, ip: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n", web[0].ip)
    };
    // Room for four frontends: the lab's three and a filler.
    lab.write_manifests(&node, &(lab_yaml.clone() + &one("filler", "10.96.9.1")))?;
    lab.start_agent(&node, &["cbr0", "veth1", "veth2", "veth3", "veth4"], 4, &["--map-services", "4"])?;
    let late: SocketAddr = "10.96.9.2:80".parse()?;
    lab.write_manifests(&node, &(lab_yaml.clone() + &one("filler", "10.96.9.1") + &one("late", "10.96.9.2")))?;
    assert!(
        eventually(Duration::from_secs(5), || lab.agent_log(&node).contains("is full")),
        "the fifth frontend does not fit:\n{}",
        lab.agent_log(&node)
    );
    // The filler goes: only its frontend is in that change, so only the retry programs `late`.
    lab.write_manifests(&node, &(lab_yaml + &one("late", "10.96.9.2")))?;
    assert!(
        eventually(Duration::from_secs(10), || http_get(&client.ns, late, "/").is_ok()),
        "the frontend that did not fit serves once there is room:\n{}",
        lab.agent_log(&node)
    );
    assert!(lab.agent_log(&node).contains("frontends that had failed are programmed now"));
    Ok(())
}

/// With a full resync every second, each change (endpoints leaving, turning not ready, session
/// affinity, a Service added, another removed with a port renamed) is followed by resyncs
/// that find the incremental translation right and nothing to rewrite in the maps, and traffic
/// follows every change.
#[test]
fn full_resyncs_agree_with_the_incremental_path_through_changes() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s = single_node_with(&["--full-sync-period", "1"])?;
    let (a, b, c) = (&s.web[0], &s.web[1], &s.web[2]);
    let second: SocketAddr = "10.104.123.60:80".parse()?;
    let second_yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: second}}\nspec: {{clusterIP: {}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: second-1, labels: {{kubernetes.io/service-name: second}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
        second.ip(),
        a.ip
    );
    let all = [(a, true), (b, true), (c, true)];
    // (what, manifests, the pods web-service's port 80 answers from, whether `second` serves).
    let steps = [
        ("a pod leaves", lab_manifests(CLUSTER_IP, &[(b, true), (c, true)], &EXTRA_PORTS), vec![b, c], false),
        ("a pod is not ready", lab_manifests(CLUSTER_IP, &[(b, false), (c, true)], &EXTRA_PORTS), vec![c], false),
        (
            "all back, with session affinity",
            lb_tests::with_session_affinity(&lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS), 60),
            vec![a, b, c],
            false,
        ),
        ("a second Service", lab_manifests(CLUSTER_IP, &all, &EXTRA_PORTS) + &second_yaml, vec![a, b, c], true),
        ("it goes, and web-service keeps one unnamed port", lab_manifests(CLUSTER_IP, &all, &[]), vec![a, b, c], false),
    ];
    let count = |what: &str| s.lab.agent_log(&s.node).matches(what).count();
    for (what, yaml, expected, second_serves) in steps {
        let applied = count("desired state applied");
        s.lab.write_manifests(&s.node, &yaml)?;
        assert!(
            eventually(Duration::from_secs(10), || count("desired state applied") > applied),
            "{what}: never applied\n{}",
            s.lab.agent_log(&s.node)
        );
        let expected: std::collections::BTreeSet<&str> = expected.iter().map(|p| p.name.as_str()).collect();
        let mut answered = std::collections::BTreeSet::new();
        for _ in 0..30 {
            answered.insert(http_get(&s.client.ns, vip(80), "/")?);
        }
        let answered: std::collections::BTreeSet<&str> = answered.iter().map(String::as_str).collect();
        if what.contains("affinity") {
            assert!(answered.len() == 1 && expected.is_superset(&answered), "{what}: {answered:?}");
        } else {
            assert_eq!(answered, expected, "{what}");
        }
        if second_serves {
            assert_eq!(http_get(&s.client.ns, second, "/")?, a.name, "{what}");
        } else {
            let conn = tcp_connect(&s.client.ns, second, Duration::from_millis(500))?;
            assert!(conn.is_err(), "{what}: the second Service answers");
        }
        // The proxier logs a change as applied before any resync that sees it starts, so a
        // resync counted from here on compared the state after this change.
        let resyncs = count("full resync done");
        assert!(
            eventually(Duration::from_secs(10), || count("full resync done") > resyncs),
            "{what}: no full resync within 10 s\n{}",
            s.lab.agent_log(&s.node)
        );
    }
    let log = s.lab.agent_log(&s.node);
    assert!(!log.contains("the incremental translation had wrong"), "{log}");
    let resyncs: Vec<&str> = log.lines().filter(|l| l.contains("full resync done")).collect();
    assert!(resyncs.len() >= 5, "{log}");
    for l in resyncs {
        assert!(
            l.contains(" added=0 ") && l.contains(" updated=0 ") && l.contains(" removed=0 "),
            "a full resync rewrote the maps the incremental path had left: {l}\n{log}"
        );
    }
    Ok(())
}
