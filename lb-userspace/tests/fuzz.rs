//! The fuzz test of issue 11: at least 1,000,000 random, truncated and mutated frames through
//! the real tc and XDP programs (`BPF_PROG_TEST_RUN`), maps filled by the real translation of
//! `lb_tests::fuzz::world::WORLD_YAML`; every output is judged by the userspace model and the
//! independent parser (`lb_tests::fuzz`). It prints its seed; `LB_FUZZ_SEED=N` replays a run,
//! `LB_FUZZ_FRAMES` changes its length, `LB_FUZZ_CHECK_EVERY=1` pins a counter mismatch to its
//! frame.
//!
//! Needs root; under CI=true it must run.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use lb_tests::fuzz::{self, world, Counters, Datapath, Hook, NodeNs, RunError, World};

const FRAMES: u64 = 1_000_000;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "the fuzz test needs root and CI=true forbids skipping");
    eprintln!("skipping: the fuzz test needs root");
    false
}

#[path = "fuzz/harness.rs"]
mod harness;
use harness::{config, Loaded};

fn load(ns: &NodeNs) -> (Loaded, World) {
    // Tests of this file run in parallel threads of one process: a pin directory each.
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/lb-fuzz-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    harness::load(ns, pin).unwrap_or_else(|e| panic!("{e}"))
}

impl Loaded {
    /// The conntrack entries of the addresses in a failing frame's IP header, to tell a model
    /// error from a datapath one.
    fn flows_of(&self, frame: &[u8]) -> String {
        if frame.len() < 34 {
            return String::new();
        }
        let addrs = [
            u32::from_ne_bytes(frame[26..30].try_into().expect("4 bytes")),
            u32::from_ne_bytes(frame[30..34].try_into().expect("4 bytes")),
        ];
        let mut lines = Vec::new();
        let assured = self.maps.conntrack.iter().filter_map(Result::ok).map(|e| ("assured", e));
        let new = self.maps.conntrack_new.iter().filter_map(Result::ok).map(|e| ("new", e));
        for (name, (k, v)) in assured.chain(new) {
            {
                if addrs.contains(&k.src) || addrs.contains(&k.dst) {
                    let ip = |a: u32| Ipv4Addr::from(a.to_ne_bytes());
                    lines.push(format!(
                        "  {name} {}:{} -> {}:{} proto {} dir {}: nat {}:{} snat {}:{} state {} flags {:#x}",
                        ip(k.src),
                        u16::from_be(k.sport),
                        ip(k.dst),
                        u16::from_be(k.dport),
                        k.proto,
                        k.dir,
                        ip(v.nat_addr),
                        u16::from_be(v.nat_port),
                        ip(v.snat_addr),
                        u16::from_be(v.snat_port),
                        lb_common::ct_state_name(v.state),
                        v.flags
                    ));
                }
            }
        }
        format!(
            "conntrack entries ({} assured, {} new) of its addresses:\n{}",
            self.maps.conntrack.keys().count(),
            self.maps.conntrack_new.keys().count(),
            lines.join("\n")
        )
    }
}

#[test]
fn a_million_random_truncated_and_mutated_frames_through_tc_and_xdp() {
    if !privileged() {
        return;
    }
    let ns = NodeNs::enter().expect("node namespace");
    let (mut dp, world) = load(&ns);
    let config = config();
    let opts = fuzz::Options::from_env(FRAMES, fuzz::budget(config.sizes.conntrack_new, config.sizes.affinity));
    let report = fuzz::run(&mut dp, world, &opts).unwrap_or_else(|f| panic!("{f}\n{}", dp.flows_of(&f.input)));
    eprintln!("{}", report.summary());
    eprintln!(
        "tunnel programs: ingress handed {} frames to the Ethernet program ({} whole IPv4 TCP or UDP packets \
         checked against its pre-filter's bits), egress changed {}",
        dp.ingress_l3_handed, dp.ingress_l3_judged, dp.egress_l3_changed
    );
    assert!(report.frames >= opts.frames);
    // About 1 in 10,000 frames (a run of LB_FUZZ_FRAMES below that asks for none).
    let want = opts.frames / 10_000;
    assert!(dp.egress_l3_changed >= want, "the tunnels' egress program restored {} frames", dp.egress_l3_changed);
    assert!(dp.ingress_l3_handed >= want, "the tunnels' ingress program handed on {} frames", dp.ingress_l3_handed);
    assert!(
        dp.ingress_l3_judged >= want,
        "{} frames handed on were checked against the pre-filter",
        dp.ingress_l3_judged
    );
    let collected = dp.dp.ct_collected_counter().load(Ordering::Relaxed);
    assert_eq!(collected, 0, "the collector removed flows with a day left to live");
    report.coverage().unwrap_or_else(|e| panic!("seed {}: {e}", report.seed));
    report.fixed_bugs_absent().unwrap_or_else(|e| panic!("seed {}: {e}", report.seed));
}

/// What `Sabotaged` does wrong.
#[derive(Clone, Copy, Debug)]
enum Sabotage {
    /// A byte of a translated packet's payload changes.
    Payload,
    /// A translated packet goes to an address that is no backend (checksums made valid).
    Misroute,
    /// The L4 checksum is left as it was before the rewrite.
    StaleChecksum,
    /// tc leaves a packet it translated untouched.
    Untranslated,
    /// tc egress (only) leaves a reply it restored untouched.
    EgressUntranslated,
    /// A counter moves without a packet.
    Counter,
}

/// The real datapath with one thing done wrong, to show the model catches it.
struct Sabotaged<'a> {
    real: &'a mut Loaded,
    how: Sabotage,
    /// Counter reads so far (the sabotaged counter gains one per read).
    reads: u64,
}

impl Sabotaged<'_> {
    /// Spoils what the real datapath did (`verdict`, `out[..n]`) the way `how` says.
    fn spoil(
        &self,
        hook: Hook,
        frame: &[u8],
        out: &mut [u8],
        verdict: u32,
        n: usize,
    ) -> Result<(u32, usize), RunError> {
        let translated = n == frame.len() && out[..n] != *frame && frame.len() >= 54 && frame[12..14] == [8, 0];
        if !translated {
            return Ok((verdict, n));
        }
        let l4 = 14 + (out[14] & 0x0f) as usize * 4;
        match self.how {
            Sabotage::Payload if n > l4 + 20 => out[n - 1] ^= 0x5a,
            Sabotage::Misroute if frame[30..34] != out[30..34] => {
                out[30..34].copy_from_slice(&[10, 244, 1, 99]);
                fuzz::wire::fix_checksums(&mut out[..n]);
            }
            Sabotage::StaleChecksum if out[23] == 6 && n >= l4 + 18 => {
                out[l4 + 16..l4 + 18].copy_from_slice(&frame[l4 + 16..l4 + 18]);
            }
            Sabotage::Untranslated if hook == Hook::Tc && verdict == 0 => {
                out[..n].copy_from_slice(frame);
                return Ok((u32::MAX, n));
            }
            _ => {}
        }
        Ok((verdict, n))
    }
}

impl Datapath for Sabotaged<'_> {
    fn run(&mut self, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        let (verdict, n) = self.real.run(hook, frame, out)?;
        self.spoil(hook, frame, out, verdict, n)
    }

    fn run_egress(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        let (verdict, n) = self.real.run_egress(frame, out)?;
        if matches!(self.how, Sabotage::EgressUntranslated) && verdict == 0 && out[..n] != *frame {
            out[..frame.len()].copy_from_slice(frame);
            return Ok((u32::MAX, frame.len()));
        }
        self.spoil(Hook::Tc, frame, out, verdict, n)
    }

    fn counters(&mut self) -> Result<Counters, String> {
        let mut c = self.real.counters()?;
        if matches!(self.how, Sabotage::Counter) {
            self.reads += 1;
            c[0][lb_common::Counter::PassNotIp as usize] += self.reads;
        }
        Ok(c)
    }

    fn clear_flows(&mut self) -> Result<(), String> {
        self.real.clear_flows()
    }
}

/// A test that cannot fail is a defect: a datapath that rewrites the payload, sends a packet
/// to an address that is no backend, leaves a checksum stale, leaves a packet it must
/// translate alone (at tc ingress, or a reply at tc egress), or counts what did not happen, fails the fuzz run within 5,000 frames (the
/// first wrong counter at the first check, after 1,024), each for the reason it has.
#[test]
fn the_model_catches_a_datapath_that_gets_any_of_it_wrong() {
    if !privileged() {
        return;
    }
    let ns = NodeNs::enter().expect("node namespace");
    let (mut dp, world) = load(&ns);
    let config = config();
    let budget = fuzz::budget(config.sizes.conntrack_new, config.sizes.affinity);
    let opts = fuzz::Options { seed: 1, frames: 5_000, check_every: 1_024, budget };
    for (how, reason) in [
        (Sabotage::Payload, "byte"),
        (Sabotage::Misroute, "misroute"),
        (Sabotage::StaleChecksum, "checksum"),
        (Sabotage::Untranslated, "must be translated"),
        (Sabotage::EgressUntranslated, "must be translated"),
        (Sabotage::Counter, "counters"),
    ] {
        dp.clear_flows().expect("emptying the flow maps");
        let mut broken = Sabotaged { real: &mut dp, how, reads: 0 };
        match fuzz::run(&mut broken, world.clone(), &opts) {
            Ok(r) => panic!("{how:?} went unnoticed over {} frames", r.frames),
            Err(f) => {
                eprintln!("{how:?} caught at frame #{}", f.frame);
                assert!(f.reason.contains(reason), "{how:?} caught, but as: {f}")
            }
        }
    }
}

/// Found by this fuzzer (nondeterministic replies left untranslated, flows gone from the
/// assured table with lifetimes of a day). The agent's collector reads its clock, walks the
/// assured table, then deletes what it found idle, while packets keep going: (1) a flow whose
/// entries a packet rewrote after the clock was read carries a `last_seen` later than that
/// clock, which an unsigned age read as about 2^32 jiffies; (2) a flow the walk read as expired
/// may be started anew by its next packet (the datapath forgets an expired entry and creates
/// the flow again under the same keys) and be assured again before the deletion, which then
/// removed the live flow when it trusted the walk's copy. Either way the flow's next reply
/// passed untranslated. `remove_idle` reads every entry again before it deletes it.
#[test]
fn the_conntrack_collector_keeps_a_flow_refreshed_during_its_walk() {
    use lb_tests::fuzz::gen::packet;
    use lb_userspace::dataplane::conntrack::{collect, idle_flows, remove_idle, CtTables};
    if !privileged() {
        return;
    }
    let ns = NodeNs::enter().expect("node namespace");
    let (mut dp, _) = load(&ns);
    // This test walks and collects itself, step by step.
    dp.dp.stop_ct_collector();
    let (clock, timeouts) = dp.dp.ct_clock();
    let mut tables = CtTables::open_pinned(&dp.pin).expect("conntrack tables");
    let (client, vip) = ((Ipv4Addr::new(10, 244, 1, 5), 40000), (Ipv4Addr::new(10, 96, 0, 10), 80));
    type Addr = (Ipv4Addr, u16);
    type Run<'a> = dyn FnMut(&[u8]) -> (u32, Vec<u8>) + 'a;
    let mut out = vec![0u8; 2048];
    // As a node: what tc ingress leaves untouched (a backend's reply to its client) goes
    // through the stack and out through tc egress, which restores it.
    let mut run = |f: &[u8]| {
        let (verdict, n) = match dp.run(Hook::Tc, f, &mut out) {
            Ok(r) => r,
            Err(_) => panic!("BPF_PROG_TEST_RUN failed"),
        };
        if verdict != u32::MAX || out[..n] != *f {
            return (verdict, out[..n].to_vec());
        }
        use aya::programs::{TestRun, TestRunOptions};
        let opts = TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..Default::default() };
        let r = dp.dp.tc_egress_program().test_run(opts).expect("BPF_PROG_TEST_RUN at egress");
        (r.return_value, out[..r.data_size_out as usize].to_vec())
    };
    /// A handshake through the Service, which makes both entries assured; returns the backend.
    fn connect(run: &mut Run, client: Addr, vip: Addr, seq: u16) -> Addr {
        let (_, syn) = run(&packet(client, vip, 6, 0x02, &[], 64, seq, false));
        let backend = (Ipv4Addr::new(syn[30], syn[31], syn[32], syn[33]), u16::from_be_bytes([syn[36], syn[37]]));
        run(&packet(backend, client, 6, 0x12, &[], 64, seq + 1, false));
        run(&packet(client, vip, 6, 0x10, &[], 64, seq + 2, false));
        backend
    }
    fn reply_translated(run: &mut Run, backend: Addr, client: Addr, vip: Addr) -> bool {
        let (verdict, reply) = run(&packet(backend, client, 6, 0x18, b"HTTP/1.1 200 OK", 64, 99, false));
        verdict == 0 && reply[26..30] == vip.0.octets()
    }

    // (1) The collector has read its clock when the handshake happens.
    let walk_started = clock.jiffies().expect("jiffies");
    while clock.jiffies().expect("jiffies") == walk_started {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let backend = connect(&mut run, client, vip, 1);
    assert_eq!(tables.v4.assured.keys().count(), 2, "the established flow is assured");
    let (removed, _) = collect(&mut tables.v4, walk_started, &timeouts, |_, _| ());
    assert_eq!(removed, 0, "a flow active after the collector read its clock is not idle");
    assert!(reply_translated(&mut run, backend, client, vip), "the reply is still translated");

    // (2) The flow goes idle past its lifetime (both entries aged in the pinned table)...
    let keys: Vec<_> = tables.v4.assured.keys().filter_map(Result::ok).collect();
    for k in &keys {
        let mut v = tables.v4.assured.get(k, 0).expect("entry");
        v.last_seen = v.last_seen.wrapping_sub(timeouts[v.state as usize] + clock.to_jiffies(60));
        tables.v4.assured.insert(k, v, 0).expect("aging the entry");
    }
    // ...the collector's walk finds it so...
    let now = clock.jiffies().expect("jiffies");
    let (idle, _) = idle_flows(&tables.v4.assured, now, &timeouts);
    assert_eq!(idle.len(), 1, "the walk finds the idle flow: {idle:?}");
    // ...and before it deletes it, the client connects again from the same port: the datapath
    // forgets the expired entries and tracks the new connection, assured once answered.
    while clock.jiffies().expect("jiffies") == now {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let backend = connect(&mut run, client, vip, 10);
    assert_eq!(tables.v4.assured.keys().count(), 2, "the new connection is assured");
    let removed = remove_idle(&mut tables.v4, &idle, now, &timeouts);
    assert_eq!(removed, 0, "a flow started anew after the walk read it is not idle");
    assert_eq!(tables.v4.assured.keys().count(), 2, "both of its entries stay");
    assert!(reply_translated(&mut run, backend, client, vip), "the new connection's reply is translated");

    // And an idle flow still goes: the collector is not a no-op.
    let later = clock.jiffies().expect("jiffies").wrapping_add(timeouts.iter().max().copied().unwrap_or(0) + 1);
    let (removed, left) = collect(&mut tables.v4, later, &timeouts, |_, _| ());
    assert_eq!((removed, left), (1, 0), "an idle flow is collected, both entries");
}

/// Found by this fuzzer (seed 4: a node port's reply translated but not routed). A finished
/// SNATed flow whose reply entry a SYN-ACK removed (the port-reuse rule) leaves its SNAT port
/// free, and a new flow to the same backend may take it; the old flow's forward entry lives
/// on (CLOSE) and still owns that reply key: its next packet is translated onto the new
/// flow's 4-tuple at the backend, and `mirror` writes its state and flags over the new flow's
/// reply entry (dropping `CT_FLAG_ROUTE`), so the new flow's replies from a node port are no
/// longer routed (the stack drops them as martians); a SYN-ACK then finds that entry CLOSE
/// and removes it, so the live flow's port can go to a third flow. netfilter deletes the old
/// conntrack, both tuples, when its tuple is reused; so now do `reply`'s port-reuse rule and
/// `free_snat_port` when it takes a finished flow's port (lb-ebpf/src/conntrack.rs).
#[test]
fn a_snat_port_taken_over_from_a_finished_flow_stays_the_new_flows() {
    use lb_tests::fuzz::gen::packet;
    if !privileged() {
        return;
    }
    let ns = NodeNs::enter().expect("node namespace");
    let (mut dp, _) = load(&ns);
    let client = Ipv4Addr::new(192, 168, 49, 100);
    let (lb_ip, node_port) = ((Ipv4Addr::new(192, 168, 49, 200), 8080), (world::NODE_IP, 30088));
    let mut out = vec![0u8; 2048];
    let mut run = |hook: Hook, f: &[u8]| {
        let (verdict, n) = match dp.run(hook, f, &mut out) {
            Ok(r) => r,
            Err(_) => panic!("BPF_PROG_TEST_RUN failed"),
        };
        (verdict, out[..n].to_vec())
    };
    let src_of = |f: &[u8]| ((Ipv4Addr::new(f[26], f[27], f[28], f[29])), u16::from_be_bytes([f[34], f[35]]));
    // A: the client's flow to the LoadBalancer IP, SNATed to the node, reset at once (CLOSE).
    let a = (client, 40000);
    let (_, sent) = run(Hook::Tc, &packet(a, lb_ip, 6, 0x04, &[], 64, 1, false));
    let port = src_of(&sent).1;
    let backend = (Ipv4Addr::new(10, 244, 2, 21), 80);
    // The backend answers a new connection on that tuple: A's reply entry goes (port reuse).
    let (verdict, _) = run(Hook::Tc, &packet(backend, (world::NODE_IP, port), 6, 0x12, &[], 64, 2, false));
    assert_eq!(verdict, u32::MAX, "a SYN-ACK on a closed flow's tuple is not A's");
    // B: new connections to the node port of the same backend until one gets A's port.
    let b = (40001..60000u16)
        .map(|p| (client, p))
        .find(|&b| src_of(&run(Hook::Tc, &packet(b, node_port, 6, 0x02, &[], 64, 3, false)).1).1 == port)
        .expect("some new flow takes the free port");
    let (verdict, _) = run(Hook::Tc, &packet(backend, (world::NODE_IP, port), 6, 0x12, &[], 64, 4, false));
    assert_eq!(verdict, 7, "B's SYN-ACK is routed back to the client from the node port");
    // A's client sends a late FIN.
    let (_, late) = run(Hook::Tc, &packet(a, lb_ip, 6, 0x11, &[], 64, 5, false));
    assert_ne!(src_of(&late), (world::NODE_IP, port), "A's packet must not join B's connection at the backend");
    let (verdict, reply) = run(Hook::Tc, &packet(backend, (world::NODE_IP, port), 6, 0x18, b"data", 64, 6, false));
    assert_eq!(src_of(&reply), node_port, "B's reply comes from the node port");
    assert_eq!(verdict, 7, "B's reply is still routed (its source is a node address)");
    let _ = b;
}
