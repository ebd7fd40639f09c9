//! VLAN frames at tc: the kernel moves a frame's tag out of the frame into the skb before tc
//! ingress runs on the VLAN's parent interface, and gives the frame to the VLAN device only
//! after. `BPF_PROG_TEST_RUN` cannot set that tag (it accepts no VLAN fields in its context),
//! so a few hand-assembled instructions put it there with `bpf_skb_vlan_push`, as the kernel
//! would, and tail-call the program under test. Hand-assembled because it is the only BPF
//! program the tests need that the datapath's object does not hold, and a second BPF crate
//! and build for eleven instructions would cost more than it gives.
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::*;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const BPF_FUNC_SKB_VLAN_PUSH: i32 = 18;
/// What the wrapper returns if the tail call fails: no verdict tc has.
const TAIL_CALL_FAILED: u32 = 99;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<RawFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as RawFd)
}

fn put<const N: usize>(attr: &mut [u8; 128], off: usize, bytes: [u8; N]) {
    attr[off..off + N].copy_from_slice(&bytes);
}

/// One instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst | src << 4;
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

/// A tc program that tags its packet with `tci` (VLAN id, priority) in the skb, then
/// tail-calls `target`; and the program array that holds `target` (kept open as long as the
/// program).
fn vlan_wrapper(target: &aya::programs::SchedClassifier, tci: u16) -> (OwnedFd, OwnedFd) {
    let mut attr = [0u8; 128];
    put(&mut attr, 0, BPF_MAP_TYPE_PROG_ARRAY.to_ne_bytes());
    put(&mut attr, 4, 4u32.to_ne_bytes());
    put(&mut attr, 8, 4u32.to_ne_bytes());
    put(&mut attr, 12, 1u32.to_ne_bytes());
    let map = bpf(BPF_MAP_CREATE, &mut attr).expect("creating a program array");
    // SAFETY: a file descriptor the kernel just gave us.
    let map = unsafe { OwnedFd::from_raw_fd(map) };
    let code: Vec<[u8; 8]> = vec![
        insn(0xbf, 6, 1, 0, 0),                            // r6 = r1 (the skb)
        insn(0xb7, 2, 0, 0, i32::from(0x8100u16.to_be())), // r2 = ETH_P_8021Q, network order
        insn(0xb7, 3, 0, 0, i32::from(tci)),               // r3 = VLAN id and priority
        insn(0x85, 0, 0, 0, BPF_FUNC_SKB_VLAN_PUSH),       // bpf_skb_vlan_push(r1, r2, r3)
        insn(0xbf, 1, 6, 0, 0),                            // r1 = r6
        insn(0x18, 2, 1, 0, map.as_raw_fd()),              // r2 = the program array (map fd)
        insn(0, 0, 0, 0, 0),                               //      (its upper half)
        insn(0xb7, 3, 0, 0, 0),                            // r3 = slot 0
        insn(0x85, 0, 0, 0, BPF_FUNC_TAIL_CALL),           // bpf_tail_call(r1, r2, r3)
        insn(0xb7, 0, 0, 0, TAIL_CALL_FAILED as i32),      // r0 = no verdict tc has
        insn(0x95, 0, 0, 0, 0),                            // exit
    ];
    let code: Vec<u8> = code.concat();
    let license = c"GPL";
    let mut log = vec![0u8; 65_536];
    let mut attr = [0u8; 128];
    put(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    put(&mut attr, 4, ((code.len() / 8) as u32).to_ne_bytes());
    put(&mut attr, 8, (code.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, 1u32.to_ne_bytes());
    put(&mut attr, 28, (log.len() as u32).to_ne_bytes());
    put(&mut attr, 32, (log.as_mut_ptr() as u64).to_ne_bytes());
    let prog = match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a file descriptor the kernel just gave us.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(e) => panic!("loading the VLAN wrapper: {e}\n{}", String::from_utf8_lossy(&log).trim_end_matches('\0')),
    };
    let target = target.fd().expect("the program under test is loaded");
    let (key, value) = (0u32, target.as_fd().as_raw_fd() as u32);
    let mut attr = [0u8; 128];
    put(&mut attr, 0, (map.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, (&key as *const u32 as u64).to_ne_bytes());
    put(&mut attr, 16, (&value as *const u32 as u64).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("putting the program under test in the array");
    (prog, map)
}

/// `run_tc` for a program known by its descriptor.
fn run_fd(prog: &OwnedFd, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 1600];
    let mut attr = [0u8; 128];
    put(&mut attr, 0, (prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, (frame.len() as u32).to_ne_bytes());
    put(&mut attr, 12, (out.len() as u32).to_ne_bytes());
    put(&mut attr, 16, (frame.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, (out.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_TEST_RUN, &mut attr).expect("BPF_PROG_TEST_RUN");
    let verdict = u32::from_ne_bytes(attr[4..8].try_into().unwrap());
    out.truncate(u32::from_ne_bytes(attr[12..16].try_into().unwrap()) as usize);
    (verdict, out)
}

/// A VLAN's packet seen on the VLAN's parent is left alone: translated and sent on from there
/// (a node port's SYN to a remote backend, routed with `bpf_redirect_neigh`), it would keep the
/// client's tag on the way out. The VLAN device's own program serves it, untagged.
#[test]
fn a_vlans_packet_on_the_vlans_parent_is_left_to_the_vlan_device() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let (tagged, _array) = vlan_wrapper(h.dp.tc_program(), 100);
    let client = (Ipv4Addr::new(192, 168, 49, 100), 40_001);
    for (dst, what) in
        [((Ipv4Addr::new(10, 96, 1, 1), 8080), "a ClusterIP"), ((NODE_IP, 30081), "a node port to a remote backend")]
    {
        let syn = frame(client, dst, L4::Tcp { flags: SYN }, &[]);
        let (passed, new_flows) = (h.counter(Counter::PassNotIp), h.counter(Counter::FwdNewFlow));
        assert_eq!(run_fd(&tagged, &syn), (TC_ACT_UNSPEC, syn.clone()), "{what}: tagged, untouched");
        assert_eq!(h.counter(Counter::PassNotIp) - passed, 1, "{what}: counted as passed");
        assert_eq!(h.counter(Counter::FwdNewFlow), new_flows, "{what}: no flow started");
        // The same packet untagged, as the VLAN device's program sees it: served.
        let (verdict, out) = h.run(&syn);
        assert_ne!(out, syn, "{what}: untagged, translated (verdict {verdict})");
        assert_eq!(h.counter(Counter::FwdNewFlow) - new_flows, 1, "{what}");
    }
    // A priority tag (VLAN id 0, 802.1p priority 5) is no VLAN's: the kernel goes on with the
    // frame on the parent, which serves it.
    let (priority, _array) = vlan_wrapper(h.dp.tc_program(), 5 << 13);
    let syn = frame((client.0, 40_002), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    let new_flows = h.counter(Counter::FwdNewFlow);
    let (verdict, out) = run_fd(&priority, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed to the remote backend");
    assert_eq!(parse_checked(&out).dst, (REMOTE_POD.parse().unwrap(), 80));
    assert_eq!(h.counter(Counter::FwdNewFlow) - new_flows, 1);
}
