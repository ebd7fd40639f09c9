//! The tc egress program for devices without a link-layer header (tun, WireGuard, IPIP), which
//! the agent attaches there instead of the Ethernet one: run on packets that start with their
//! IP header, as those devices hand them to tc. The parsers check the output with the input's
//! Ethernet header put back (`run_tc_l3`), so a program that wrote at Ethernet offsets, or read
//! the IP header 14 bytes in, is caught.
use super::*;

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
