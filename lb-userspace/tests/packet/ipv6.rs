//! IPv6 through the real programs (tc ingress, which tail-calls its IPv6 stages): every
//! output frame is checked by `lb_tests::packet6`'s independent parser, which recomputes the
//! L4 and ICMPv6 checksums over the 40-byte pseudo-header.
use std::net::Ipv6Addr;

use lb_tests::packet6::{
    fragment6, frame6, frame6_ext, icmp6_error, ip6_frame, l4_checksum6, parse6_checked, parse_icmp6_checked,
    reassemble6, NEXT_DEST_OPTS, NEXT_HOP_BY_HOP, NEXT_ROUTING, PROTO_ICMPV6,
};

use super::*;

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaf4, 1, 0, 0, 0, 0, 5);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc0a8, 0x31, 0, 0, 0, 0, 0x99);
const BACKENDS6: [&str; 3] = ["fd00:af4:1::b", "fd00:af4:1::c", "fd00:af4:1::d"];
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// The lab's Services on IPv6 only: `web` over three pods, `empty` without endpoints.
fn yaml6() -> String {
    let eps: String =
        BACKENDS6.iter().map(|ip| format!("- {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n")).collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web6, namespace: default}}
spec:
  clusterIP: "{VIP6}"
  clusterIPs: ["{VIP6}"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty6, namespace: default}}
spec:
  clusterIP: "{EMPTY6}"
  clusterIPs: ["{EMPTY6}"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, protocol: TCP, port: 80}}
  - {{name: udp, protocol: UDP, port: 53}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web6-abc
  namespace: default
  labels: {{kubernetes.io/service-name: web6}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
{eps}"#
    )
}

fn harness6() -> Harness {
    Harness::with_config(&yaml6(), Config { ipv6: true, ..Config::default() })
}

fn backends6(port: u16) -> BTreeSet<(Ipv6Addr, u16)> {
    BACKENDS6.iter().map(|ip| (ip.parse().unwrap(), port)).collect()
}

#[test]
fn ipv6_syn_ack_and_reply_are_translated_with_valid_checksums() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse6_checked(&out);
    assert_eq!(p.src, (CLIENT6, 40000), "source untouched");
    assert!(backends6(8080).contains(&p.dst), "DNAT to a backend's target port: {:?}", p.dst);
    assert_eq!(p.hop_limit, 64, "not routed by the datapath: the stack decrements it");
    assert_eq!(out.len(), syn.len());

    let ack = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: ACK }, b"GET / HTTP/1.0\r\n\r\n");
    let (verdict, out2) = h.run(&ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(parse6_checked(&out2).dst, p.dst, "the flow stays on its backend");

    let reply = frame6(p.dst, (CLIENT6, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    let (verdict, out3) = h.reply(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let r = parse6_checked(&out3);
    assert_eq!((r.src, r.dst), ((VIP6, 80), (CLIENT6, 40000)), "the reply comes from the ClusterIP");

    assert_eq!(h.counter(Counter::FwdNewFlow), 1, "the first packet counts as a new flow once");
    assert_eq!(h.counter(Counter::FwdTracked), 1);
    assert_eq!(h.counter(Counter::ReplyTranslated), 1);

    // Both entries carry their own key's tag (IPv6: of the addresses' last words), which a
    // state change written in place checks (`lb_common::CtValue::tag`).
    let m = h.dp.maps();
    let entries: Vec<_> =
        m.conntrack6_new.iter().chain(m.conntrack6.iter()).map(|e| e.expect("reading an entry")).collect();
    assert_eq!(entries.len(), 2, "the flow's two entries");
    for (k, v) in entries {
        assert_eq!(v.tag, lb_common::ct_tag(k.src[3], k.dst[3], k.sport, k.dport), "{k:?} carries its own tag");
    }
}

#[test]
fn ipv6_udp_is_translated_both_ways() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let q = frame6((CLIENT6, 5000), (VIP6, 53), L4::Udp { zero_csum: false }, b"query");
    let (verdict, out) = h.run(&q);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse6_checked(&out);
    assert!(backends6(5353).contains(&p.dst), "{:?}", p.dst);
    let a = frame6(p.dst, (CLIENT6, 5000), L4::Udp { zero_csum: false }, b"answer");
    let (verdict, out) = h.reply(&a);
    assert_eq!(verdict, TC_ACT_OK);
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP6, 53), (CLIENT6, 5000)));
    assert_eq!(&out[out.len() - 6..], b"answer");
}

/// A Service whose port is its targetPort: the port adds nothing to the checksums (tc makes
/// no helper call for it), the addresses still do, both ways, TCP and UDP.
#[test]
fn ipv6_service_port_equal_to_its_target_port_keeps_valid_checksums() {
    if !privileged() {
        return;
    }
    let yaml = yaml6()
        .replace("port: 80, targetPort: 8080", "port: 8080, targetPort: 8080")
        .replace("port: 53, targetPort: 5353", "port: 5353, targetPort: 5353");
    let h = Harness::with_config(&yaml, Config { ipv6: true, ..Config::default() });
    for (l4, port) in [(L4::Tcp { flags: SYN }, 8080), (L4::Udp { zero_csum: false }, 5353)] {
        let (verdict, out) = h.run(&frame6((CLIENT6, 40000), (VIP6, port), l4, b"query"));
        assert_eq!(verdict, TC_ACT_OK);
        let p = parse6_checked(&out);
        assert!(backends6(port).contains(&p.dst), "{:?}", p.dst);
        let back = if port == 8080 { L4::Tcp { flags: SYN_ACK } } else { L4::Udp { zero_csum: false } };
        let (verdict, out) = h.reply(&frame6(p.dst, (CLIENT6, 40000), back, b"answer"));
        assert_eq!(verdict, TC_ACT_OK);
        let r = parse6_checked(&out);
        assert_eq!((r.src, r.dst), ((VIP6, port), (CLIENT6, 40000)));
    }
}

/// As ip6tables' REJECT: ICMPv6 port unreachable from the service address, quoting the packet.
#[test]
fn ipv6_service_without_endpoints_is_refused_with_icmp6_port_unreachable() {
    if !privileged() {
        return;
    }
    let h = harness6();
    for (l4, quote_l4) in [(L4::Tcp { flags: SYN }, 20), (L4::Udp { zero_csum: false }, 8)] {
        let port = if quote_l4 == 20 { 80 } else { 53 };
        let pkt = frame6((CLIENT6, 40000), (EMPTY6, port), l4, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let (verdict, out) = h.run(&pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the arrival interface");
        assert_eq!(&out[0..6], &pkt[6..12], "to the client's MAC");
        let (src, dst, kind, code, quote) = parse_icmp6_checked(&out);
        assert_eq!((src, dst), (EMPTY6, CLIENT6));
        assert_eq!((kind, code), (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH));
        assert_eq!(&quote[..], &pkt[14..14 + 40 + quote_l4], "quotes the IPv6 header and the L4 header");
    }
    assert_eq!(h.counter(Counter::RejectNoBackend), 2);
}

/// Packet Too Big from a router between this node and the backend, about a translated flow:
/// the quote is put back into the client's view (the ClusterIP), every checksum with it, or
/// the client's PMTU discovery never matches it to its socket.
#[test]
fn ipv6_packet_too_big_about_a_translated_flow_is_translated() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, b"data");
    let (_, sent) = h.run(&syn);
    let backend = parse6_checked(&sent).dst;
    let mtu = 1280u32.to_be_bytes();
    let ptb = icmp6_error(ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG, 0, mtu, &sent[14..]);
    let (verdict, out) = h.reply(&ptb);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, kind, code, quote) = parse_icmp6_checked(&out);
    assert_eq!((src, dst, kind, code), (ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG, 0), "outer addresses are the router's");
    assert_eq!(&out[14 + 40 + 4..14 + 40 + 8], &mtu, "the MTU is kept");
    // The quote as the client sent it: to the ClusterIP, with a valid TCP checksum.
    assert_eq!(&quote[..], &syn[14..], "the quote is the client's own packet again, byte for byte");
    assert_eq!(l4_checksum6(CLIENT6, VIP6, 6, &quote[40..]), 0, "quoted TCP checksum");
    assert_ne!(backend.0, VIP6);
    assert_eq!(h.counter(Counter::IcmpTranslated), 1);

    // Neighbour discovery and other informational ICMPv6 pass untouched.
    let ns = ip6_frame(CLIENT6, ROUTER6, &[], PROTO_ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]);
    let (verdict, o) = h.run(&ns);
    assert_eq!((verdict, &o), (TC_ACT_UNSPEC, &ns));
}

/// The same error sent by this node itself (`ip6_forward` towards a pod behind a smaller MTU)
/// leaves through tc egress, which translates it as ingress translates a router's.
#[test]
fn ipv6_packet_too_big_the_node_sends_is_translated_at_egress() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, b"data");
    let (_, sent) = h.run(&syn);
    let mtu = 1280u32.to_be_bytes();
    let ptb = icmp6_error(ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG, 0, mtu, &sent[14..]);
    let (verdict, out) = h.run_egress(&ptb);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, kind, _, quote) = parse_icmp6_checked(&out);
    assert_eq!((src, dst, kind), (ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG));
    assert_eq!(&quote[..], &syn[14..], "the quote is the client's own packet again, byte for byte");
    assert_eq!(h.counter(Counter::IcmpTranslated), 1);
}

/// A bounded walk over extension headers: within the bound the L4 header is found and
/// translated; beyond it the packet passes untouched and is counted, never misparsed.
#[test]
fn ipv6_extension_headers_are_walked_within_a_bound() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let ext = [(NEXT_HOP_BY_HOP, 8), (NEXT_DEST_OPTS, 16)];
    let syn = frame6_ext((CLIENT6, 40000), (VIP6, 80), &ext, L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse6_checked(&out);
    assert!(backends6(8080).contains(&p.dst), "{:?}", p.dst);
    assert_eq!(&out[14 + 40..14 + 40 + 24], &syn[14 + 40..14 + 40 + 24], "extension headers untouched");

    let long = [(NEXT_HOP_BY_HOP, 8), (NEXT_DEST_OPTS, 8), (NEXT_ROUTING, 8), (NEXT_DEST_OPTS, 8), (NEXT_DEST_OPTS, 8)];
    let syn = frame6_ext((CLIENT6, 40001), (VIP6, 80), &long, L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&syn);
    assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &syn));
    assert_eq!(h.counter(Counter::PassExtHeaders), 1);
}

/// A large UDP datagram in IPv6 fragments: every fragment goes to the backend its first one
/// chose, both ways.
#[test]
fn ipv6_fragments_follow_their_first_fragment_both_ways() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let payload = big_payload();
    let q = frame6((CLIENT6, 5000), (VIP6, 53), L4::Udp { zero_csum: false }, &payload);
    let frags = fragment6(&q, 1232, 0x1234_5678);
    assert!(frags.len() >= 3);
    let mut out = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (verdict, o) = h.run(f);
        assert_eq!(verdict, TC_ACT_OK, "fragment {i}");
        out.push(o);
    }
    let whole = reassemble6(&out);
    let p = parse6_checked(&whole);
    assert!(backends6(5353).contains(&p.dst), "{:?}", p.dst);
    assert_eq!(p.src, (CLIENT6, 5000));
    assert_eq!(h.counter(Counter::FragTranslated), frags.len() as u64 - 1);

    let answer = frame6(p.dst, (CLIENT6, 5000), L4::Udp { zero_csum: false }, &payload);
    let mut out = Vec::new();
    for f in fragment6(&answer, 1232, 0x0bad_cafe) {
        let (verdict, o) = h.reply(&f);
        assert_eq!(verdict, TC_ACT_OK);
        out.push(o);
    }
    let r = parse6_checked(&reassemble6(&out));
    assert_eq!((r.src, r.dst), ((VIP6, 53), (CLIENT6, 5000)));
}

/// Truncated IPv6 frames, at every length from a whole IPv6 header up to a whole SYN, pass
/// unharmed and counted. (A payload length beyond the frame is not checked: GSO packets carry
/// one that does not describe them, and the stack drops a real liar after tc.)
/// (BPF_PROG_TEST_RUN refuses frames shorter than Ethernet + the 40-byte IPv6 header, as the
/// stack would never hand them to tc.)
#[test]
fn truncated_ipv6_frames_pass_unharmed() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let cases: Vec<Vec<u8>> = (14 + 40..syn.len()).map(|len| syn[..len].to_vec()).collect();
    for f in &cases {
        let before = h.counter(Counter::PassMalformed);
        let (verdict, out) = h.run(f);
        assert_eq!((verdict, &out), (TC_ACT_UNSPEC, f), "{} bytes", f.len());
        assert_eq!(h.counter(Counter::PassMalformed), before + 1, "{} bytes: counted as malformed", f.len());
    }
    assert_eq!(h.counter(Counter::FwdNewFlow), 0);
}

const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc0a8, 0x31, 0, 0, 0, 0, 2);
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc0a8, 0x31, 0, 0, 0, 0, 0x64);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaf4, 1, 0, 0, 0, 0, 0xb);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaf4, 2, 0, 0, 0, 0, 0x15);

/// IPv6 node ports of this node (node-a): one to a local pod, one to a pod of node-b.
const EDGE6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np6-local}
spec: {type: NodePort, clusterIP: "fd00:96::1:1", clusterIPs: ["fd00:96::1:1"], ipFamilies: [IPv6], ports: [{port: 8080, targetPort: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np6-local-1, labels: {kubernetes.io/service-name: np6-local}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00:af4:1::b"], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: np6-remote}
spec: {type: NodePort, clusterIP: "fd00:96::1:2", clusterIPs: ["fd00:96::1:2"], ipFamilies: [IPv6], ports: [{port: 8080, targetPort: 80, nodePort: 30081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np6-remote-1, labels: {kubernetes.io/service-name: np6-remote}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00:af4:2::15"], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: lb6}
spec:
  type: LoadBalancer
  clusterIP: "fd00:96::1:5"
  clusterIPs: ["fd00:96::1:5"]
  ipFamilies: [IPv6]
  loadBalancerSourceRanges: ["fd00:c0a8:31::60/124"]
  ports: [{port: 8080, targetPort: 80, nodePort: 30088}]
status: {loadBalancer: {ingress: [{ip: "fd00:c0a8:31::c8"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb6-1, labels: {kubernetes.io/service-name: lb6}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00:af4:2::15"], nodeName: node-b}]
"#;

/// `edge` for IPv6: the node's datapath with its IPv6 stages, in a node-like namespace.
fn edge6() -> (Harness, NetNsGuard) {
    let ns = NetNsGuard::node();
    let config = Config { node_ip: Some(NODE_IP), node_ip6: Some(NODE_IP6), ipv6: true, ..Config::default() };
    let mut h = Harness::with_config(EDGE6, config);
    h.dp.set_node_addresses(&[std::net::IpAddr::from(NODE_IP), NODE_IP6.into()]).unwrap();
    h.allow_xdp_send("ext0");
    (h, ns)
}

/// XDP's IPv6 stages: a node port from outside to a local pod is translated ahead of the stack
/// (DNAT only, the client's address kept), and the pod's reply is restored at tc.
#[test]
fn xdp_ipv6_node_port_to_a_local_backend_is_dnat_only() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge6();
    let syn = frame6((OUTSIDE6, 40000), (NODE_IP6, 30080), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_xdp(&syn);
    assert_eq!(verdict, XDP_PASS);
    let p = parse6_checked(&out);
    assert_eq!((p.src, p.dst), ((OUTSIDE6, 40000), (LOCAL_POD6, 80)));
    assert_eq!(h.xdp_counter(Counter::FwdNewFlow), 1);
    assert_eq!(h.xdp_counter(Counter::FwdSnat), 0);
    // The next packet finds the flow at XDP.
    let (verdict, out) = h.run_xdp(&frame6((OUTSIDE6, 40000), (NODE_IP6, 30080), L4::Tcp { flags: ACK }, b"x"));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(parse6_checked(&out).dst, (LOCAL_POD6, 80));
    assert_eq!(h.xdp_counter(Counter::FwdTracked), 1);

    // The pod's reply goes through the stack as sent (tc on its veth leaves it) and leaves
    // from the node port: restored at the egress it leaves by.
    let (verdict, out) = h.reply(&frame6((LOCAL_POD6, 80), (OUTSIDE6, 40000), L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((NODE_IP6, 30080), (OUTSIDE6, 40000)));
}

/// A node port from outside to a pod of another node: SNATed to the node's IPv6 address and
/// sent on from XDP, hop limit decremented; the backend's reply is restored and sent back out
/// from XDP as well.
#[test]
fn xdp_ipv6_node_port_to_a_remote_backend_is_snated_and_replies_are_restored() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge6();
    let syn = frame6((OUTSIDE6, 40000), (NODE_IP6, 30081), L4::Tcp { flags: SYN }, b"payload");
    let (verdict, out) = h.run_xdp(&syn);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "sent straight on to the backend's node: {verdict}");
    assert_eq!(&out[..6], &REMOTE_NODE_MAC, "to the next hop's MAC");
    assert_eq!(&out[6..12], &EXT0_MAC, "from the egress interface's MAC");
    let p = parse6_checked(&out);
    assert_eq!(p.dst, (REMOTE_POD6, 80));
    assert_eq!(p.src.0, NODE_IP6, "SNAT to the node so the reply comes back here");
    assert!((lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&p.src.1), "{}", p.src.1);
    assert_eq!(p.hop_limit, 63, "routed here: the hop limit goes down by one");
    assert_eq!(h.xdp_counter(Counter::FwdSnat), 1);

    let reply = frame6(p.dst, p.src, L4::Tcp { flags: SYN_ACK }, &[]);
    let (verdict, out) = h.run_xdp(&reply);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(&out[..6], &CLIENT_MAC_ON_WIRE);
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((NODE_IP6, 30081), (OUTSIDE6, 40000)));
    assert_eq!(h.xdp_counter(Counter::ReplyTranslated), 1);
    // The same reply arriving by a tunnel: to the address flows are SNATed to, so handed to
    // tc with a header, restored and routed back to the client.
    let (verdict, out) = h.run_ingress_l3(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[..14], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x86, 0xdd], "the header pushed");
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((NODE_IP6, 30081), (OUTSIDE6, 40000)));
}

/// IPv6 routers never fragment: a packet the datapath routes itself that is too big for the
/// way out gets ICMPv6 Packet Too Big with the egress MTU, quoting the packet as the client
/// sent it, as `ip6_forward` answers.
#[test]
fn a_routed_ipv6_packet_too_big_for_the_way_out_gets_packet_too_big() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge6();
    let client = (OUTSIDE6, 40000);
    let (verdict, _) = h.run(&frame6(client, (NODE_IP6, 30081), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the flow routed to the remote backend");
    // This thread is in the node's namespace: the command runs there too.
    let st = std::process::Command::new("ip").args(["link", "set", "ext0", "mtu", "1400"]).status().unwrap();
    assert!(st.success());
    let big = frame6(client, (NODE_IP6, 30081), L4::Tcp { flags: ACK }, &[0x5a; 1440]);
    assert_eq!(big.len(), 14 + 1500);
    let (verdict, out) = h.run(&big);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the arrival interface");
    assert_eq!(h.counter(Counter::TooBig), 1);
    assert_eq!(&out[0..6], &big[6..12], "to the client's MAC");
    let (src, dst, kind, code, quote) = parse_icmp6_checked(&out);
    assert_eq!((src, dst), (NODE_IP6, OUTSIDE6));
    assert_eq!((kind, code), (2, 0), "Packet Too Big");
    assert_eq!(u32::from_be_bytes(out[58..62].try_into().unwrap()), 1400, "the next hop's MTU");
    assert_eq!(&quote[..], &big[14..14 + 40 + 20], "quotes the packet as the client sent it");
}

/// `loadBalancerSourceRanges` with an IPv6 CIDR: a client inside it reaches the LoadBalancer
/// IP, one outside is dropped, and the node port stays open to both (every bit of the IPv6
/// source takes part in the range lookup).
#[test]
fn xdp_ipv6_load_balancer_ip_admits_only_its_source_ranges() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge6();
    let lb_ip: Ipv6Addr = "fd00:c0a8:31::c8".parse().unwrap();
    let (verdict, out) = h.run_xdp(&frame6((OUTSIDE6, 40000), (lb_ip, 8080), L4::Tcp { flags: SYN }, &[]));
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(parse6_checked(&out).dst, (REMOTE_POD6, 80));

    let outsider: Ipv6Addr = "fd00:c0a8:31::96".parse().unwrap();
    let (verdict, _) = h.run_xdp(&frame6((outsider, 40000), (lb_ip, 8080), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.xdp_counter(Counter::DropSourceRange), 1);
    let (verdict, out) = h.run_xdp(&frame6((outsider, 40000), (NODE_IP6, 30088), L4::Tcp { flags: SYN }, &[]));
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "the node port ignores the ranges: {verdict}");
    assert_eq!(parse6_checked(&out).dst, (REMOTE_POD6, 80));
}

/// A pod reaching itself through an IPv6 ClusterIP is SNATed to the IPv6 hairpin address
/// (fd00:6c62::1), or its reply would never leave it.
#[test]
fn ipv6_hairpin_is_snated_so_the_pod_can_reach_itself() {
    if !privileged() {
        return;
    }
    // Routed both ways by the datapath, as IPv4's (`hairpin_is_snated...`): a node's routes.
    let _ns = NetNsGuard::node();
    let h = harness6();
    let me: Ipv6Addr = BACKENDS6[0].parse().unwrap();
    let hairpin: Ipv6Addr = "fd00:6c62::1".parse().unwrap();
    // The hash picks among three backends: a few source ports until one lands on this pod.
    let Some((port, p)) = (40000..40100).find_map(|port| {
        let (_, out) = h.run(&frame6((me, port), (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
        let p = parse6_checked(&out);
        (p.dst == (me, 8080)).then_some((port, p))
    }) else {
        panic!("no source port of 100 chose the pod itself");
    };
    assert_eq!(p.src, (hairpin, port), "the pod must see another address than its own");
    assert_eq!(p.hop_limit, 63, "routed back to the pod");
    let (verdict, out) = h.run(&frame6((me, 8080), p.src, L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the reply too");
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP6, 80), (me, port)));
}

/// `--ipv6 false` after a run with IPv6 on the same pins: the new load's stage tables are its
/// own and empty, so IPv6 frames pass its programs untranslated, as the flag says, instead of
/// running the earlier run's IPv6 stages; and the earlier run's programs keep translating IPv6
/// with their own stages. (Here the earlier load's own handles keep its tables; for an agent
/// that has exited, the links' programs keep theirs: the layout tests.)
#[test]
fn ipv6_off_after_a_run_with_it_leaves_ipv6_untranslated() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert!(backends6(8080).contains(&parse6_checked(&out).dst));

    let off = Dataplane::load(&h.pin_dir, &Config::default()).expect("loading without IPv6 on the same pins");
    let syn = frame6((CLIENT6, 40001), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let run = |p: &dyn Fn(TestRunOptions) -> aya::programs::TestRunResult| {
        let mut buf = vec![0u8; 1600];
        let res = p(TestRunOptions { data_in: Some(&syn), data_out: Some(&mut buf), ..Default::default() });
        buf.truncate(res.data_size_out as usize);
        (res.return_value, buf)
    };
    let tc = run(&|o| off.tc_program().test_run(o).expect("BPF_PROG_TEST_RUN"));
    assert_eq!(tc, (TC_ACT_UNSPEC, syn.clone()), "tc: untouched");
    let xdp = run(&|o| off.xdp_program().test_run(o).expect("BPF_PROG_TEST_RUN"));
    assert_eq!(xdp, (XDP_PASS, syn.clone()), "XDP: untouched");

    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK, "the earlier load's programs still translate IPv6");
    assert!(backends6(8080).contains(&parse6_checked(&out).dst));
}

/// The tc egress program for devices without a link-layer header (`packet/l3.rs`) on IPv6,
/// through its own IPv6 program and ICMPv6 stage: a reply leaving by a tunnel is restored, and
/// a Packet Too Big the node sends into one is translated.
#[test]
fn ipv6_replies_leaving_by_a_tunnel_are_restored() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 40000), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let (_, out) = h.run(&syn);
    let backend = parse6_checked(&out).dst;
    let reply = frame6(backend, (CLIENT6, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    assert_eq!(h.run(&reply), (TC_ACT_UNSPEC, reply.clone()), "left to the stack at the backend's veth");
    let (verdict, out) = h.run_egress_l3(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out.len(), reply.len());
    let r = parse6_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP6, 80), (CLIENT6, 40000)));
    let data = frame6(backend, (CLIENT6, 40000), L4::Tcp { flags: ACK }, &[9u8; 1380]);
    let r = parse6_checked(&h.run_egress_l3(&data).1);
    assert_eq!((r.src, r.dst), ((VIP6, 80), (CLIENT6, 40000)));
    assert_eq!(h.counter(Counter::ReplyTranslated), 2);

    let mtu = 1280u32.to_be_bytes();
    let probe = frame6((CLIENT6, 40001), (VIP6, 80), L4::Tcp { flags: SYN }, b"data");
    let (_, sent) = h.run(&probe);
    let ptb = icmp6_error(ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG, 0, mtu, &sent[14..]);
    let (verdict, out) = h.run_egress_l3(&ptb);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, kind, _, quote) = parse_icmp6_checked(&out);
    assert_eq!((src, dst, kind), (ROUTER6, CLIENT6, ICMPV6_PKT_TOOBIG));
    assert_eq!(&quote[..], &probe[14..], "the quote is the client's own packet again, byte for byte");
    assert_eq!(h.counter(Counter::IcmpTranslated), 1);
}

#[test]
fn ipv6_service_traffic_arriving_by_a_tunnel_is_translated() {
    if !privileged() {
        return;
    }
    let h = harness6();
    let syn = frame6((CLIENT6, 41000), (VIP6, 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_ingress_l3(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[..14], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x86, 0xdd], "an Ethernet header pushed: zeros, IPv6");
    let r = parse6_checked(&out);
    assert_eq!(r.src, (CLIENT6, 41000));
    assert!(backends6(8080).contains(&r.dst), "to a backend: {:?}", r.dst);
    let data = frame6((CLIENT6, 41000), (VIP6, 80), L4::Tcp { flags: ACK }, &[3u8; 1380]);
    let (_, out) = h.run_ingress_l3(&data);
    assert_eq!(parse6_checked(&out).dst, r.dst, "the same backend");
    // Not a Service's, a backend's reply to its client's own address (as a remote backend's
    // arrives: the Ethernet program would leave it to the stack), truncated TCP and UDP
    // headers: as they came, no header, counted as the Ethernet program would count them.
    let other = frame6((CLIENT6, 41000), (VIP6, 81), L4::Tcp { flags: SYN }, &[]);
    let reply = frame6(r.dst, (CLIENT6, 41000), L4::Tcp { flags: ACK }, &[]);
    let truncated = syn[..14 + 40 + 19].to_vec();
    let query = frame6((CLIENT6, 41001), (VIP6, 53), L4::Udp { zero_csum: false }, b"q");
    let truncated_udp = query[..14 + 40 + 7].to_vec();
    for (what, f, counter) in [
        ("not a Service's", other, Counter::PassNotService),
        ("a backend's reply to its client", reply, Counter::PassNotService),
        ("truncated TCP", truncated, Counter::PassMalformed),
        ("truncated UDP", truncated_udp, Counter::PassMalformed),
    ] {
        let before = h.counter(counter);
        assert_eq!(h.run_ingress_l3(&f), (TC_ACT_UNSPEC, f[14..].to_vec()), "{what}");
        assert_eq!(h.counter(counter), before + 1, "{what}: counted as {}", counter.name());
    }
}

/// The conntrack key of an IPv6 packet from `src` to `dst`, as the datapath builds it.
fn ct_key6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), proto: u8, dir: u8) -> lb_common::CtKey6 {
    use lb_userspace::dataplane::addr_words;
    lb_common::CtKey6 {
        src: addr_words(src.0.into()),
        dst: addr_words(dst.0.into()),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

/// A flow's reply entry lost (pushed out of the new-flow table, or missing from the assured
/// table; removed by hand here) is written again by its flow's next change or refresh, in
/// IPv6's scratch slot (`conntrack::insert_either`), tagged as every entry the datapath
/// creates: untagged, a state change would be admitted into it whichever flow took it over
/// meanwhile.
#[test]
fn ipv6_a_lost_reply_entry_is_written_again_with_its_own_tag() {
    if !privileged() {
        return;
    }
    use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_ASSURED, PROTO_TCP, PROTO_UDP};
    let h = harness6();
    let own_tag = |k: &lb_common::CtKey6| lb_common::ct_tag(k.src[3], k.dst[3], k.sport, k.dport);
    let mut pinned = h.pinned_maps();

    // TCP, assured: the client's FIN mirrors its state change into the reply entry, and
    // writes that entry again where it is missing.
    let c = (CLIENT6, 46000);
    let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
    let b = parse6_checked(&out).dst;
    h.reply(&frame6(b, c, L4::Tcp { flags: SYN_ACK }, &[]));
    h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, &[]));
    let reply = ct_key6(b, c, PROTO_TCP, CT_DIR_REPLY);
    let v = h.dp.maps().conntrack6.get(&reply, 0).expect("the established flow's reply entry");
    assert!(v.flags & CT_FLAG_ASSURED != 0);
    pinned.conntrack6.remove(&reply).expect("removing the reply entry");
    let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: 0x11 /* FIN, ACK */ }, &[]));
    assert_eq!(parse6_checked(&out).dst, b, "the FIN goes to the flow's backend");
    let v = h.dp.maps().conntrack6.get(&reply, 0).expect("the reply entry written again");
    assert_eq!(lb_common::ct_state_name(v.state), lb_common::ct_state_name(lb_common::CT_FIN_WAIT));
    assert_eq!(v.tag, own_tag(&reply), "the re-created entry carries its own tag");

    // UDP, not assured (never answered): the client's next datagram after the refresh
    // interval refreshes the reply entry, and writes it again where it is missing.
    let c = (CLIENT6, 46001);
    let (_, out) = h.run(&frame6(c, (VIP6, 53), L4::Udp { zero_csum: false }, b"query"));
    let b = parse6_checked(&out).dst;
    let (forward, reply) = (ct_key6(c, (VIP6, 53), PROTO_UDP, CT_DIR_FORWARD), ct_key6(b, c, PROTO_UDP, CT_DIR_REPLY));
    let m = h.dp.maps();
    assert!(m.conntrack6_new.get(&reply, 0).is_ok(), "the new flow's reply entry");
    pinned.conntrack6_new.remove(&reply).expect("removing the reply entry");
    let (clock, _) = h.dp.ct_clock();
    let mut v = m.conntrack6_new.get(&forward, 0).expect("the forward entry");
    v.last_seen = v.last_seen.wrapping_sub(clock.to_jiffies(5));
    pinned.conntrack6_new.insert(forward, v, 0).expect("ageing the forward entry");
    let counts = || (h.counter(Counter::FwdTracked), h.counter(Counter::FwdNewFlow));
    let before = counts();
    let (_, out) = h.run(&frame6(c, (VIP6, 53), L4::Udp { zero_csum: false }, b"again"));
    assert_eq!(parse6_checked(&out).dst, b, "the datagram goes to the flow's backend");
    let after = counts();
    // Through its own forward entry (a refresh), not as a new flow that writes both again.
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0), "tracked, not new");
    let v = m.conntrack6_new.get(&reply, 0).expect("the reply entry written again");
    assert_eq!(v.tag, own_tag(&reply), "the re-created entry carries its own tag");
    assert_eq!(v.flags & CT_FLAG_ASSURED, 0, "in the new-flow table, unassured as its flow");
}

/// IPv6 client `i` of a test's many: its own address and port.
fn many6(i: u32, net: u16) -> (Ipv6Addr, u16) {
    (Ipv6Addr::new(0xfd00, 0xaf5, net, 0, 0, 0, (i >> 16) as u16, i as u16), 20000 + (i % 1000) as u16)
}

/// IPv6's new-flow table is an array of ways as IPv4's: a flood of new flows fills it and
/// pushes out its own entries, counted, and never an established flow, which lives in the
/// assured table.
#[test]
fn ipv6_a_flood_of_new_flows_never_evicts_established_ones() {
    if !privileged() {
        return;
    }
    use lb_common::{CT_DIR_FORWARD, CT_ESTABLISHED, CT_FLAG_ASSURED, PROTO_TCP};
    let sizes = MapSizes { conntrack: 1_200, conntrack_new: 1_024, ..MapSizes::default() };
    let h = Harness::with_config(&yaml6(), Config { ipv6: true, sizes, ..Config::default() });
    let established: Vec<_> = (0..500)
        .map(|i| {
            let c = many6(i, 1);
            let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
            let b = parse6_checked(&out).dst;
            h.reply(&frame6(b, c, L4::Tcp { flags: SYN_ACK }, &[]));
            h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, &[]));
            (c, b)
        })
        .collect();
    // A SYN flood from other clients: enough new flows to fill the new-flow table twice over
    // (two entries each).
    let evicted = h.counter(Counter::CtNewEvicted);
    let held_before = h.dp.maps().conntrack6_new.keys().count();
    for i in 0..1_024 {
        let (verdict, _) = h.run(&frame6(many6(i, 2), (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(verdict, TC_ACT_OK);
    }
    // Every established flow still goes to its backend, both ways, from the assured table.
    let m = h.dp.maps();
    for (c, b) in &established {
        let (_, out) = h.run(&frame6(*c, (VIP6, 80), L4::Tcp { flags: ACK }, b"x"));
        assert_eq!(parse6_checked(&out).dst, *b, "{c:?}");
        let (_, out) = h.reply(&frame6(*b, *c, L4::Tcp { flags: ACK }, b"y"));
        assert_eq!(parse6_checked(&out).src, (VIP6, 80), "{c:?}");
        let v = m.conntrack6.get(&ct_key6(*c, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD), 0).expect("assured entry");
        assert_eq!((v.state, v.flags & CT_FLAG_ASSURED), (CT_ESTABLISHED, CT_FLAG_ASSURED), "{c:?}");
    }
    // The flood filled the new-flow table (sets fill unevenly: nearly every way), pushed out
    // about half of its own entries, and counted them (the LRU it replaced evicted unseen).
    let held = m.conntrack6_new.keys().count();
    assert!(held >= 900, "{held}");
    // Each of the flood's 2,048 entries took a free way or pushed one out, counted.
    let pushed_out = h.counter(Counter::CtNewEvicted) - evicted;
    assert_eq!(pushed_out, 2 * 1_024 - (held - held_before) as u64);
    assert_eq!(m.conntrack6.keys().count(), 1_000);
    // Handshakes beyond the assured table's room (100 more flows fit): counted, and they
    // still work, from the new-flow table, demoted there through IPv6's scratch slot.
    assert_eq!(h.counter(Counter::CtAssuredFull), 0);
    for i in 0..200 {
        let c = many6(i, 3);
        let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
        let b = parse6_checked(&out).dst;
        h.reply(&frame6(b, c, L4::Tcp { flags: SYN_ACK }, &[]));
        h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, &[]));
        let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, b"x"));
        assert_eq!(parse6_checked(&out).dst, b, "{c:?}");
        let (_, out) = h.reply(&frame6(b, c, L4::Tcp { flags: ACK }, b"y"));
        assert_eq!(parse6_checked(&out).src, (VIP6, 80), "{c:?}");
    }
    assert_eq!(m.conntrack6.keys().count(), 1_200);
    assert!(h.counter(Counter::CtAssuredFull) >= 100, "{}", h.counter(Counter::CtAssuredFull));
    // The last of them, past the room: established but not assured, in the new-flow table.
    let last = many6(199, 3);
    let v = m.conntrack6_new.get(&ct_key6(last, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD), 0).expect("demoted entry");
    assert_eq!((v.state, v.flags & CT_FLAG_ASSURED), (CT_ESTABLISHED, 0));
}

/// A SNATed IPv6 flow whose reply entry is pushed out of a full set goes whole, as IPv4's
/// (`conntrack::a_snated_flow_pushed_out_of_the_new_flow_table_goes_whole`): its forward key is
/// built in the scratch slot (`ct_table::write`).
#[test]
fn ipv6_a_snated_flow_pushed_out_of_the_new_flow_table_goes_whole() {
    if !privileged() {
        return;
    }
    use lb_common::{CT_DIR_FORWARD, CT_FLAG_SNAT};
    let _ns = NetNsGuard::node();
    // Two sets of four ways: every entry competes for one of them.
    let sizes = MapSizes { conntrack_new: 8, ..MapSizes::default() };
    let config = Config { node_ip: Some(NODE_IP), node_ip6: Some(NODE_IP6), ipv6: true, sizes, ..Config::default() };
    let mut h = Harness::with_config(EDGE6, config);
    h.dp.set_node_addresses(&[std::net::IpAddr::from(NODE_IP), NODE_IP6.into()]).unwrap();
    h.allow_xdp_send("ext0");
    let mut snated = 0;
    for i in 0..200u16 {
        // New connections to a node port whose backend is remote: SNATed to the node.
        let (verdict, out) = h.run_xdp(&frame6((OUTSIDE6, 1024 + i), (NODE_IP6, 30081), L4::Tcp { flags: SYN }, &[]));
        assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "SYN {i}: {verdict}");
        assert_eq!(parse6_checked(&out).src.0, NODE_IP6, "SYN {i} SNATed");
        let all: Vec<_> = h.dp.maps().conntrack6_new.iter().filter_map(Result::ok).collect();
        assert!(all.len() <= 8);
        for (k, v) in all.iter().filter(|(k, v)| k.dir == CT_DIR_FORWARD && v.flags & CT_FLAG_SNAT != 0) {
            snated += 1;
            let (pk, _) = lb_common::ct_peer(k, v);
            assert!(
                all.iter().any(|(k2, _)| *k2 == pk),
                "after SYN {i}: a SNATed forward entry without its reply: {k:?}"
            );
        }
    }
    assert!(snated >= 200, "{snated}");
    // Nearly every SYN found its sets full.
    assert!(h.xdp_counter(Counter::CtNewEvicted) >= 150, "{}", h.xdp_counter(Counter::CtNewEvicted));
}

/// IPv6's SYNs read the stamps IPv4's do (`lb-ebpf/src/ct_live.rs`, one map for both
/// families): a plain SYN looks into `LB_CT6` only if its key is stamped. A flow the datapath
/// makes assured, by a packet of either direction, is stamped by its stage
/// (`conntrack::store`), and the agent's walks stamp every flow of `LB_CT6` as of `LB_CT4`.
#[test]
fn ipv6_a_syn_looks_into_the_assured_table_only_for_stamped_keys() {
    if !privileged() {
        return;
    }
    use lb_common::{CT_DIR_FORWARD, CT_ESTABLISHED, CT_FLAG_ASSURED, PROTO_TCP};
    let h = harness6();
    h.dp.stop_ct_collector();
    let m = h.dp.maps();
    let flows: Vec<_> = (0..20)
        .map(|i| {
            let c = (CLIENT6, 47_000 + i);
            let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
            let b = parse6_checked(&out).dst;
            h.reply(&frame6(b, c, L4::Tcp { flags: SYN_ACK }, &[]));
            h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, &[]));
            let v = m.conntrack6.get(&ct_key6(c, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD), 0).expect("assured");
            assert_eq!((v.state, v.flags & CT_FLAG_ASSURED), (CT_ESTABLISHED, CT_FLAG_ASSURED));
            (c, b)
        })
        .collect();
    // Flows picked up mid-stream (their first packet an ACK) become assured on their backend's
    // answer: a reply packet makes the move, and its stage stamps the flow's forward key, which
    // it builds from the reply entry.
    let mid_stream: Vec<_> = (0..10)
        .map(|i| {
            let c = (CLIENT6, 47_100 + i);
            let (_, out) = h.run(&frame6(c, (VIP6, 80), L4::Tcp { flags: ACK }, b"x"));
            let b = parse6_checked(&out).dst;
            let (_, out) = h.reply(&frame6(b, c, L4::Tcp { flags: ACK }, b"y"));
            assert_eq!(parse6_checked(&out).src, (VIP6, 80));
            let v = m.conntrack6.get(&ct_key6(c, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD), 0).expect("assured");
            assert_eq!((v.state, v.flags & CT_FLAG_ASSURED), (CT_ESTABLISHED, CT_FLAG_ASSURED));
            (c, b)
        })
        .collect();
    let flows: Vec<_> = flows.into_iter().chain(mid_stream).collect();
    // A SYN inside each live flow (a client reusing its port) finds it, and starts nothing.
    let syn_inside_each = |when: &str| {
        let new_flows = h.counter(Counter::FwdNewFlow);
        for (c, b) in &flows {
            let (_, out) = h.run(&frame6(*c, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
            assert_eq!(parse6_checked(&out).dst, *b, "{when}: the SYN of {c:?} left its flow");
            let k = ct_key6(*c, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD);
            assert!(m.conntrack6_new.get(&k, 0).is_err(), "{when}: the SYN of {c:?} started a new flow");
        }
        assert_eq!(h.counter(Counter::FwdNewFlow), new_flows, "{when}");
    };
    syn_inside_each("stamped by the datapath");

    // A flow written into `LB_CT6` by hand, to a backend no service has, as a migration
    // copies one in: nothing stamped it yet, and its SYN takes the new connection's path.
    let (t, stray) = ((CLIENT6, 48_000), ("fd00:af4:9::9".parse::<Ipv6Addr>().unwrap(), 8080u16));
    let k = ct_key6(t, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD);
    let mut v = m.conntrack6.get(&ct_key6(flows[0].0, (VIP6, 80), PROTO_TCP, CT_DIR_FORWARD), 0).unwrap();
    v.nat_addr = lb_userspace::dataplane::addr_words(stray.0.into());
    v.nat_port = stray.1.to_be();
    v.tag = 0;
    let (pk, pv) = lb_common::ct_peer(&k, &v);
    let mut pinned = h.pinned_maps();
    pinned.conntrack6.insert(k, v, 0).expect("writing the forward entry");
    pinned.conntrack6.insert(pk, pv, 0).expect("writing the reply entry");
    let (_, out) = h.run(&frame6(t, (VIP6, 80), L4::Tcp { flags: ACK }, b"x"));
    assert_eq!(parse6_checked(&out).dst, stray, "its data packets find it (they always look)");
    let (_, out) = h.run(&frame6(t, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
    let chosen = parse6_checked(&out).dst;
    assert_ne!(chosen, stray, "the SYN looked into the assured table");
    assert!(m.conntrack6_new.get(&k, 0).is_ok(), "no new flow was started");
    for k in [k, ct_key6(chosen, t, PROTO_TCP, lb_common::CT_DIR_REPLY)] {
        pinned.conntrack6_new.remove(&k).expect("removing the new flow");
    }
    // Once the agent has walked the assured tables, the SYN finds it.
    h.dp.restamp_live_flows();
    let (_, out) = h.run(&frame6(t, (VIP6, 80), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(parse6_checked(&out).dst, stray, "the stamped flow was not found");
    assert!(m.conntrack6_new.get(&k, 0).is_err(), "a new flow was started");

    // Three walks later the datapath's stamps no longer count; the walks' keep the flows.
    for _ in 0..3 {
        h.dp.restamp_live_flows();
    }
    syn_inside_each("three walks later");
}
