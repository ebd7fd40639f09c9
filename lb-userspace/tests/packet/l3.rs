//! The tc programs for devices without a link-layer header (tun, WireGuard, IPIP), which the
//! agent attaches there instead of the Ethernet ones: run on packets that start with their IP
//! header, as those devices hand them to tc. At egress the parsers check the output with the
//! input's Ethernet header put back (`run_tc_l3`), so a program that wrote at Ethernet
//! offsets, or read the IP header 14 bytes in, is caught; at ingress the program itself puts
//! an Ethernet header in front of what it hands to the Ethernet program, and the tests check
//! that header, and that nothing else gets one. A refusal of a client behind a tunnel is
//! tested end to end only (`real_traffic.rs`): it makes room after the link-layer header with
//! `bpf_skb_adjust_room`, which goes by the skb's network header, and BPF_PROG_TEST_RUN puts
//! that 14 bytes into data that starts with the IP header, where a tun device puts it at the
//! IP header.
use super::*;

/// Checks that `out` starts with the header `lb_tc_ingress_l3` pushes for an IPv4 packet.
#[track_caller]
fn assert_pushed_ipv4(out: &[u8]) {
    assert_eq!(&out[..14], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00], "an Ethernet header pushed: zeros, IPv4");
}

#[test]
fn service_traffic_arriving_by_a_tunnel_is_translated() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    // A client behind the tunnel (a VPN's tun device, a node reached over WireGuard): its SYN
    // to the ClusterIP starts with its IP header. It comes out translated, with a header.
    let syn = frame((CLIENT, 41000), (VIP, 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_ingress_l3(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out.len(), syn.len(), "the IP packet behind 14 bytes of header");
    assert_pushed_ipv4(&out);
    let r = parse_checked(&out);
    assert_eq!(r.src, (CLIENT, 41000));
    assert!(BACKENDS.contains(&r.dst.0.to_string().as_str()) && r.dst.1 == 8080, "to a backend: {:?}", r.dst);
    assert_eq!(h.counter(Counter::FwdNewFlow), 1);
    // The flow's next packets, a full-sized one among them, go to the same backend: the
    // Ethernet program's conntrack has the flow, whichever device its packets come by.
    let data = frame((CLIENT, 41000), (VIP, 80), L4::Tcp { flags: ACK }, &[5u8; 1400]);
    let (verdict, out) = h.run_ingress_l3(&data);
    assert_eq!(verdict, TC_ACT_OK);
    assert_pushed_ipv4(&out);
    assert_eq!(parse_checked(&out).dst, r.dst);
    assert_eq!(&out[out.len() - 1400..], &[5u8; 1400][..], "the payload as it was");
    assert_eq!(parse_checked(&h.run(&data).1).dst, r.dst, "the same flow by an Ethernet device");
    assert_eq!(h.counter(Counter::FwdTracked), 2);
    // UDP too.
    let query = frame((CLIENT, 41001), (VIP, 53), L4::Udp { zero_csum: false }, b"query");
    let (_, out) = h.run_ingress_l3(&query);
    assert_pushed_ipv4(&out);
    let r = parse_checked(&out);
    assert!(BACKENDS.contains(&r.dst.0.to_string().as_str()), "to a backend: {:?}", r.dst);
    // The backend's reply leaves by the tunnel: restored there (`lb_tc_egress_l3`).
    let answer = frame(r.dst, (CLIENT, 41001), L4::Udp { zero_csum: false }, b"answer");
    let r = parse_checked(&h.run_egress_l3(&answer).1);
    assert_eq!((r.src, r.dst), ((VIP, 53), (CLIENT, 41001)));
}

#[test]
fn what_is_no_service_traffic_passes_the_tunnel_ingress_without_a_header() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let syn = frame((CLIENT, 42000), (VIP, 80), L4::Tcp { flags: SYN }, &[]);
    let mut not_ip = syn.clone();
    not_ip[14] = 0x05;
    let other_port = frame((CLIENT, 42000), (VIP, 81), L4::Tcp { flags: SYN }, &[]);
    let other_host = frame((CLIENT, 42000), (Ipv4Addr::new(10, 244, 9, 9), 8080), L4::Tcp { flags: ACK }, &[7u8; 1400]);
    // A backend's reply to its client's own address (the flow not SNATed), as a remote
    // backend's replies arrive by a tunnel: the Ethernet program would leave it to the stack
    // (the egress program of the way out restores it), so it gets no header either.
    let backend = h.syn_dst(CLIENT, 42001);
    let reply = frame(backend, (CLIENT, 42001), L4::Tcp { flags: SYN_ACK }, &[]);
    // This harness loads no IPv6 stages: the Ethernet program counts IPv6 as not IP.
    let v6 = lb_tests::packet6::frame6(
        ("fd00::5".parse().unwrap(), 42002),
        ("fd00:96::10".parse().unwrap(), 80),
        L4::Tcp { flags: SYN },
        &[],
    );
    for (what, f, counter) in [
        ("a backend's reply to its client", reply, Counter::PassNotService),
        ("IPv6, its stages not loaded", v6, Counter::PassNotIp),
        ("not IP", not_ip, Counter::PassNotIp),
        ("truncated IP", syn[..14 + 16].to_vec(), Counter::PassMalformed),
        ("truncated TCP", syn[..14 + 30].to_vec(), Counter::PassMalformed),
        ("a port no Service uses", other_port, Counter::PassNotService),
        ("another host", other_host, Counter::PassNotService),
    ] {
        let before = h.counter(counter);
        assert_eq!(h.run_ingress_l3(&f), (TC_ACT_UNSPEC, f[14..].to_vec()), "{what}: as it came, no header");
        assert_eq!(h.counter(counter), before + 1, "{what}: counted as {}", counter.name());
    }
    assert_eq!(h.counter(Counter::FwdNewFlow), 1, "the flow the reply is of");
    assert_eq!(h.counter(Counter::ReplyTranslated), 0);
}

#[test]
fn a_reply_leaving_by_a_tunnel_is_restored_at_its_egress() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    // A client whose node is reached through a tunnel (Calico's IPIP or WireGuard modes route
    // other nodes' pod ranges through one): its flow is translated where it arrives, and the
    // backend's reply, left to the stack at the backend's veth, leaves by the tunnel device.
    let backend = h.syn_dst(CLIENT, 40000);
    let syn_ack = frame(backend, (CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    assert_eq!(h.run(&syn_ack), (TC_ACT_UNSPEC, syn_ack.clone()), "left to the stack at the backend's veth");
    let (verdict, out) = h.run_egress_l3(&syn_ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out.len(), syn_ack.len(), "nothing added or cut");
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP, 80), (CLIENT, 40000)));
    // A full-sized data packet too, and UDP.
    let data = frame(backend, (CLIENT, 40000), L4::Tcp { flags: ACK }, &[7u8; 1400]);
    let r = parse_checked(&h.run_egress_l3(&data).1);
    assert_eq!((r.src, r.dst), ((VIP, 80), (CLIENT, 40000)));
    let query = frame((CLIENT, 40001), (VIP, 53), L4::Udp { zero_csum: false }, b"query");
    let (_, sent) = h.run(&query);
    let answer = frame(parse_checked(&sent).dst, (CLIENT, 40001), L4::Udp { zero_csum: false }, b"answer");
    let out = h.run_egress_l3(&answer).1;
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP, 53), (CLIENT, 40001)));
    assert_eq!(&out[out.len() - 6..], b"answer");
    assert_eq!(h.counter(Counter::ReplyTranslated), 3);
    // A packet that is no flow's reply stays as it is.
    let stranger = frame((Ipv4Addr::new(10, 244, 9, 9), 8080), (CLIENT, 40000), L4::Tcp { flags: ACK }, &[]);
    assert_eq!(h.run_egress_l3(&stranger), (TC_ACT_UNSPEC, stranger.clone()));
}

#[test]
fn what_is_no_ip_packet_passes_the_tunnel_program_unharmed() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let backend = h.syn_dst(CLIENT, 44000);
    let reply = frame(backend, (CLIENT, 44000), L4::Tcp { flags: SYN_ACK }, &[]);
    // Not IP (version 0), a truncated IPv4 header, a truncated TCP header: the bytes given
    // (from the IP header on) come back as they were, though the addresses are a flow's.
    let mut not_ip = reply.clone();
    not_ip[14] = 0x05;
    for (what, f) in
        [("not IP", not_ip), ("truncated IP", reply[..14 + 16].to_vec()), ("truncated TCP", reply[..14 + 30].to_vec())]
    {
        assert_eq!(h.run_egress_l3(&f), (TC_ACT_UNSPEC, f.clone()), "{what}");
    }
    assert_eq!(h.counter(Counter::ReplyTranslated), 0);
    // The same reply whole is the flow's: restored.
    assert_eq!(parse_checked(&h.run_egress_l3(&reply).1).src, (VIP, 80));
}
