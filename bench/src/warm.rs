//! Section 1b of `lb-bench`: the `warm` per-packet method. lb's paths at tc and XDP, the floor of
//! each hook and minimal DNAT references, all measured the same way in one run, so the figures
//! read as ratios to the cheapest possible program of each hook. A second pair of references
//! keeps a flow table (one lookup, and one insert for a new flow: Katran's least work), so a
//! new flow's cost can be read against what any per-flow state costs on this machine, and a
//! third pair keeps the least a flow table can be (one read and one write of a slot in a
//! direct-mapped array as large as lb's new-flow table), and a fourth the same with sixteen
//! times the slots (`BIG_SLOTS`), more than this machine's caches hold: what any design that
//! keeps per-flow state pays for a new flow here, with its table in the caches and without.
//!
//! `warm`: one BPF_PROG_TEST_RUN with `repeat` = R of a wrapper (`bench-ebpf`) that restores a
//! saved 64-byte frame (Ethernet, IPv4, TCP, 10 bytes of payload) into the packet on every run
//! and then tail-calls the program under test through a program array. Every run thus sees the
//! same packet, however the previous run rewrote it, with the program's code and maps as warm
//! as a busy node keeps them. New-flow rows give every run a new 5-tuple: the wrapper adds a
//! counter to the source address and port, and keeps both checksums valid by taking the same
//! amounts from the IP identification and the TCP window. The floor of a hook is the same
//! wrapper, in the same mode, tail-calling the hook's empty program; "over the floor" is what
//! the program under test adds to it.
//!
//! Rows run one after the other, so a row's ratio to the minimal DNAT compares runs minutes
//! apart, and what the machine's other tenants do to its shared L3 meanwhile moves lb's
//! new flow (a few misses) more than the DNAT (none). The two ratio targets are therefore
//! measured again at the end of each pass, interleaved: rounds of the floors, the minimal DNAT
//! and lb's rows in turn (`Session::interleaved`), a ratio per cycle (infinite, against the
//! target, for a cycle whose DNAT came out at or under its floor), their median reported.
//!
//! Everything runs on one pinned CPU inside a node-like network namespace of its own (the
//! routed SNAT path looks up routes and neighbours there). lb's new-flow table (`LB_CT4_NEW`)
//! is one array for every CPU; the references' flow table is a per-CPU LRU, so its fill level
//! is given against this CPU's share of it.
//!
//! Only lb's program names, map names, counters (`lb_common::Counter`) and the `Dataplane` API
//! are used, so the harness keeps working while the datapath changes underneath it.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{ProgramFd, SchedClassifier, TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use lb_common::Counter;
use lb_tests::packet::{frame, parse_checked, Parsed, L4};
use lb_userspace::{
    dataplane::{conntrack::CtTables, Config, Dataplane, MapSizes, Maps},
    model::{DesiredState, Endpoint, Frontend, Protocol, ServicePort},
};

/// The bench's kernel programs (`bench-ebpf`), built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// Bytes the wrappers restore; every frame here is exactly this long.
const PREFIX: usize = 64;
const PAYLOAD: &[u8] = b"0123456789";
/// What the wrapper returns when it could not restore the frame or the tail call failed.
const NO_FRAME: u32 = 0xbad0;
const NO_TARGET: u32 = 0xbad1;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
/// A ClusterIP with five backends, as the new-flow, established and reply rows use it.
const VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
/// A ClusterIP with session affinity.
const AFF_VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 11), 80);
/// A ClusterIP with one backend, whose flows fill the conntrack tables (one backend, so the
/// replies that make them assured are known in advance).
const FILL_VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 20), 80);
const FILL_BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 9, 9), 8080);
/// A node port whose only backend is on another node: SNAT to the node, routed by lb.
const NODE_PORT: u16 = 30081;
const REMOTE_POD: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 2, 21), 80);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
/// The references' backend for `VIP`.
const REF_BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 2), 8080);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
/// Base tuples the wrappers vary: new flows, the 1024 pinned clients, the table fill.
const NEW_CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const PINNED_CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 129, 0, 0);
const FILL_CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 130, 0, 0);
const BASE_PORT: u16 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Hook {
    Tc,
    Xdp,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
        }
    }

    /// Index of the hook's first counter in `LB_STATS` (tc 0, XDP 1, as the datapath counts).
    fn stats_base(self) -> u32 {
        self as u32 * lb_common::COUNTER_MAX
    }
}

/// What the wrapper does besides restoring the frame (see `bench-ebpf/src/main.rs`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    /// The saved frame as it is.
    Keep,
    /// A new source address and port every run.
    NewSrc,
    /// A new destination address and port every run (replies to `NewSrc` flows).
    NewDst,
    /// A new source port of one of 1024 clients every run.
    NewConn,
}

impl Mode {
    fn program(self, hook: Hook) -> &'static str {
        match (hook, self) {
            (Hook::Tc, Mode::Keep) => "bench_warm_tc",
            (Hook::Tc, Mode::NewSrc) => "bench_warm_tc_new_src",
            (Hook::Tc, Mode::NewDst) => "bench_warm_tc_new_dst",
            (Hook::Tc, Mode::NewConn) => "bench_warm_tc_new_conn",
            (Hook::Xdp, Mode::Keep) => "bench_warm_xdp",
            (Hook::Xdp, Mode::NewSrc) => "bench_warm_xdp_new_src",
            (Hook::Xdp, Mode::NewDst) => "bench_warm_xdp_new_dst",
            (Hook::Xdp, Mode::NewConn) => "bench_warm_xdp_new_conn",
        }
    }

    /// Counter bits added to the address; the rest goes to the port.
    fn addr_bits(self) -> u32 {
        if self == Mode::NewConn {
            10
        } else {
            14
        }
    }

    /// Runs before the port part would overflow the port field.
    fn max_runs(self) -> u64 {
        (u64::from(u16::MAX - BASE_PORT) + 1) << self.addr_bits()
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Keep => "restore",
            Mode::NewSrc | Mode::NewDst => "restore, new 5-tuple",
            Mode::NewConn => "restore, new port of a pinned client",
        }
    }
}

/// The program a row tail-calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Lb,
    /// lb's tc egress program (a reply restored after the stack; tc only).
    LbEgress,
    Empty,
    Reference,
    /// The minimal DNAT with a flow table.
    FlowReference,
    /// The minimal DNAT with a direct-mapped slot table.
    SlotReference,
    /// The same with `BIG_SLOTS` times the slots.
    BigSlotReference,
}

/// The larger slot table's size against lb's new-flow table: 16 x 131,072 slots of 48 bytes
/// (96 MiB with the default size), three times this machine's 32 MiB L3.
const BIG_SLOTS: u32 = 16;

struct Outcome {
    verdict: u32,
    ns: f64,
    out: Vec<u8>,
}

/// The wrappers, their maps, and the counter ranges handed out so far.
struct Wrappers {
    ebpf: aya::Ebpf,
    jump_tc: ProgramArray<MapData>,
    jump_xdp: ProgramArray<MapData>,
    frame: Array<MapData, [u64; PREFIX / 8]>,
    counter: Array<MapData, [u32; 4]>,
    /// Next counter value for the 14-bit modes and for `NewConn`: no two runs of a row, or of
    /// two rows, share a 5-tuple.
    next: [u64; 2],
}

const TC_PROGRAMS: [&str; 8] = [
    "bench_warm_tc",
    "bench_warm_tc_new_src",
    "bench_warm_tc_new_dst",
    "bench_warm_tc_new_conn",
    "bench_ref_dnat_tc",
    "bench_ref_flow_dnat_tc",
    "bench_ref_slot_dnat_tc",
    "bench_ref_big_slot_dnat_tc",
];
const XDP_PROGRAMS: [&str; 8] = [
    "bench_warm_xdp",
    "bench_warm_xdp_new_src",
    "bench_warm_xdp_new_dst",
    "bench_warm_xdp_new_conn",
    "bench_ref_dnat_xdp",
    "bench_ref_flow_dnat_xdp",
    "bench_ref_slot_dnat_xdp",
    "bench_ref_big_slot_dnat_xdp",
];

impl Wrappers {
    /// `flows`: capacity of the stateful references' tables (lb's `LB_CT4_NEW`'s).
    fn load(flows: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("BENCH_REF_FLOWS", flows)
            .map_max_entries("BENCH_REF_SLOTS", flows)
            .override_global("BENCH_REF_SLOT_COUNT", &flows, true)
            .map_max_entries("BENCH_REF_SLOTS_BIG", flows * BIG_SLOTS)
            .override_global("BENCH_REF_SLOT_BIG_COUNT", &(flows * BIG_SLOTS), true)
            .load(OBJECT)
            .context("loading the bench's eBPF object")?;
        for name in TC_PROGRAMS {
            let p: &mut SchedClassifier =
                ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        for name in XDP_PROGRAMS {
            let p: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let jump_tc = ProgramArray::try_from(take("BENCH_JUMP_TC")?)?;
        let jump_xdp = ProgramArray::try_from(take("BENCH_JUMP_XDP")?)?;
        let frame = Array::try_from(take("BENCH_FRAME")?)?;
        let counter = Array::try_from(take("BENCH_COUNTER")?)?;
        let mut refs: HashMap<MapData, [u32; 2], [u32; 2]> = HashMap::try_from(take("BENCH_REF_SERVICES")?)?;
        // Kept open by the programs that use it.
        // The fill Service too, for the reference's row of established flows in turn.
        for vip in [VIP, FILL_VIP] {
            refs.insert(packet_order(vip), packet_order(REF_BACKEND), 0).context("writing BENCH_REF_SERVICES")?;
        }
        Ok(Self { ebpf, jump_tc, jump_xdp, frame, counter, next: [0, 0] })
    }

    fn fd(&self, name: &str) -> Result<ProgramFd> {
        let p = self.ebpf.program(name).with_context(|| format!("{name} missing"))?;
        Ok(p.fd()?.try_clone()?)
    }

    fn set_target(&mut self, hook: Hook, fd: &ProgramFd, name: &str) -> Result<()> {
        let jump = match hook {
            Hook::Tc => &mut self.jump_tc,
            Hook::Xdp => &mut self.jump_xdp,
        };
        jump.set(0, fd, 0).with_context(|| {
            format!(
                "inserting {name} into the {} wrapper's program array (the kernel takes only programs \
                 of the wrapper's type, expected attach type and XDP frags flag)",
                hook.name()
            )
        })
    }

    fn set_frame(&mut self, f: &[u8]) -> Result<()> {
        ensure!(f.len() == PREFIX, "bench frames are {PREFIX} bytes, this one is {}", f.len());
        let mut v = [0u64; PREFIX / 8];
        for (w, c) in v.iter_mut().zip(f.chunks_exact(8)) {
            *w = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        }
        self.frame.set(0, v, 0).context("writing BENCH_FRAME")
    }

    /// Hands out `n` counter values of `mode`'s range (fresh 5-tuples); the first is returned.
    fn reserve(&mut self, mode: Mode, n: u64) -> Result<u32> {
        let track = usize::from(mode == Mode::NewConn);
        let start = self.next[track];
        ensure!(
            start + n <= mode.max_runs(),
            "the bench ran out of fresh 5-tuples for {mode:?} ({} runs)",
            mode.max_runs()
        );
        self.next[track] += n;
        Ok(start as u32)
    }

    /// One BPF_PROG_TEST_RUN of the wrapper of `hook` and `mode` on `f`, `repeat` times, the
    /// counter starting at `start` (ignored by `Keep`). `ns` is the kernel's time per run.
    fn run(&mut self, hook: Hook, mode: Mode, f: &[u8], repeat: u32, start: u32) -> Result<Outcome> {
        self.run_cycling(hook, mode, f, repeat, start, 0)
    }

    /// `run`, the counter going back to `start` after every `cycle` runs (0: never).
    fn run_cycling(
        &mut self,
        hook: Hook,
        mode: Mode,
        f: &[u8],
        repeat: u32,
        start: u32,
        cycle: u32,
    ) -> Result<Outcome> {
        if mode != Mode::Keep {
            self.counter.set(0, [start, start, cycle, 0], 0).context("writing BENCH_COUNTER")?;
        }
        let name = mode.program(hook);
        let mut out = vec![0u8; 256];
        let opts = TestRunOptions { data_in: Some(f), data_out: Some(&mut out), repeat, ..Default::default() };
        let p = self.ebpf.program(name).with_context(|| format!("{name} missing"))?;
        let r = match hook {
            Hook::Tc => <&SchedClassifier>::try_from(p)?.test_run(opts),
            Hook::Xdp => <&Xdp>::try_from(p)?.test_run(opts),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        match r.return_value {
            NO_FRAME => bail!("{name}: the packet is shorter than {PREFIX} bytes or no frame is saved"),
            NO_TARGET => bail!("{name}: the tail call did not happen (empty program array slot)"),
            _ => {}
        }
        out.truncate(r.data_size_out as usize);
        Ok(Outcome { verdict: r.return_value, ns: r.duration.as_nanos() as f64, out })
    }
}

/// An address and port as `BENCH_REF_SERVICES` keys them: the bytes of the packet.
fn packet_order((ip, port): (Ipv4Addr, u16)) -> [u32; 2] {
    [u32::from_ne_bytes(ip.octets()), u32::from(u16::from_ne_bytes(port.to_be_bytes()))]
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    frame(src, dst, L4::Tcp { flags }, PAYLOAD)
}

/// The output frame, parsed with both checksums recomputed from scratch.
fn parsed(out: &[u8]) -> Result<Parsed> {
    std::panic::catch_unwind(|| parse_checked(out)).map_err(|e| {
        let why = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "invalid frame".into());
        anyhow::anyhow!("output frame: {why}")
    })
}

/// One measured row.
struct Row {
    hook: Hook,
    what: String,
    mode: Mode,
    tables: String,
    ns: f64,
    floor: f64,
    /// Share of the runs that moved the counter of the path the row names.
    on_path: Option<f64>,
}

/// Fill levels of the two conntrack tables for the new-flow rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Empty,
    Half,
    Full,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Empty => "empty",
            Level::Half => "half",
            Level::Full => "full",
        }
    }
}

/// How a row is repeated.
#[derive(Clone, Copy)]
enum Runs {
    /// `rounds` runs of `repeat`.
    Repeat,
    /// Small batches of new flows, the new-flow table reset to `entries` before each (empty, half full):
    /// a million new flows would fill it.
    Batches { entries: u64 },
    /// `rounds` runs of `repeat` over the same `n` 5-tuples in turn, the wrapper's counter
    /// going from `start` to `start + n - 1` and back (flows made earlier, replayed).
    Cycle { start: u32, n: u32 },
}

struct Session<'a> {
    w: Wrappers,
    dp: &'a Dataplane,
    ct: CtTables,
    /// `LB_CT4` and `LB_CT4_NEW` capacity (entries), and this CPU's share of the references'
    /// per-CPU LRU of `LB_CT4_NEW`'s size.
    assured_cap: u64,
    new_cap: u64,
    share: u64,
    repeat: u32,
    rounds: usize,
    batch: u32,
    batch_rounds: usize,
    /// Cycles of the interleaved measurement (`Session::interleaved`).
    interleaved_cycles: usize,
    floors: BTreeMap<(Hook, Mode), f64>,
    /// The first counter value and the number of the assured flows the first fill made, one
    /// after the other (`Mode::NewSrc` tuples of `FILL_CLIENTS`).
    filled: Option<(u32, u32)>,
    rows: Vec<Row>,
    /// Anything that did not go as planned, for the output.
    notes: Vec<String>,
}

/// Verdict and output check of a row; errors name what differed.
type Check<'c> = &'c dyn Fn(u32, &[u8]) -> Result<()>;

/// One program and frame of an interleaved measurement (`Session::interleaved`).
struct Part<'c> {
    what: &'static str,
    target: Target,
    mode: Mode,
    frame: &'c [u8],
    check: Check<'c>,
}

impl Session<'_> {
    fn lb_fd(&self, hook: Hook) -> Result<ProgramFd> {
        Ok(match hook {
            Hook::Tc => self.dp.tc_program().fd()?.try_clone()?,
            Hook::Xdp => self.dp.xdp_program().fd()?.try_clone()?,
        })
    }

    fn target_fd(&self, hook: Hook, target: Target) -> Result<(ProgramFd, &'static str)> {
        Ok(match (target, hook) {
            (Target::Lb, Hook::Tc) => (self.lb_fd(hook)?, lb_common::PROG_TC_INGRESS),
            (Target::Lb, Hook::Xdp) => (self.lb_fd(hook)?, lb_common::PROG_XDP),
            (Target::LbEgress, Hook::Tc) => (self.dp.tc_egress_program().fd()?.try_clone()?, lb_common::PROG_TC_EGRESS),
            (Target::LbEgress, Hook::Xdp) => bail!("lb has no XDP egress program"),
            (Target::Empty, Hook::Tc) => {
                (self.dp.floor_programs().1.fd()?.try_clone()?, lb_common::PROG_BENCH_EMPTY_TC)
            }
            (Target::Empty, Hook::Xdp) => {
                (self.dp.floor_programs().0.fd()?.try_clone()?, lb_common::PROG_BENCH_EMPTY_XDP)
            }
            (Target::Reference, Hook::Tc) => (self.w.fd("bench_ref_dnat_tc")?, "bench_ref_dnat_tc"),
            (Target::Reference, Hook::Xdp) => (self.w.fd("bench_ref_dnat_xdp")?, "bench_ref_dnat_xdp"),
            (Target::FlowReference, Hook::Tc) => (self.w.fd("bench_ref_flow_dnat_tc")?, "bench_ref_flow_dnat_tc"),
            (Target::FlowReference, Hook::Xdp) => (self.w.fd("bench_ref_flow_dnat_xdp")?, "bench_ref_flow_dnat_xdp"),
            (Target::SlotReference, Hook::Tc) => (self.w.fd("bench_ref_slot_dnat_tc")?, "bench_ref_slot_dnat_tc"),
            (Target::SlotReference, Hook::Xdp) => (self.w.fd("bench_ref_slot_dnat_xdp")?, "bench_ref_slot_dnat_xdp"),
            (Target::BigSlotReference, Hook::Tc) => {
                (self.w.fd("bench_ref_big_slot_dnat_tc")?, "bench_ref_big_slot_dnat_tc")
            }
            (Target::BigSlotReference, Hook::Xdp) => {
                (self.w.fd("bench_ref_big_slot_dnat_xdp")?, "bench_ref_big_slot_dnat_xdp")
            }
        })
    }

    fn aim(&mut self, hook: Hook, target: Target) -> Result<()> {
        let (fd, name) = self.target_fd(hook, target)?;
        self.w.set_target(hook, &fd, name)
    }

    /// lb's counters of `hook`, summed over CPUs.
    fn stats(&self, hook: Hook) -> Result<[u64; lb_common::COUNTER_MAX as usize]> {
        let mut out = [0; lb_common::COUNTER_MAX as usize];
        for (i, o) in out.iter_mut().enumerate() {
            let v = self.dp.maps().stats.get(&(hook.stats_base() + i as u32), 0).context("reading LB_STATS")?;
            *o = v.iter().sum();
        }
        Ok(out)
    }

    fn assured_entries(&self) -> u64 {
        self.ct.v4.assured.keys().filter(|k| k.is_ok()).count() as u64
    }

    fn new_entries(&self) -> u64 {
        self.ct.v4.new.keys().filter(|k| k.is_ok()).count() as u64
    }

    fn tables(&self) -> String {
        let a = self.assured_entries();
        format!("LB_CT4 {}%, LB_CT4_NEW {}%", pct(a, self.assured_cap), pct(self.new_entries(), self.new_cap))
    }

    /// Runs lb's program of `hook` once on `f`, without a wrapper (setting up flows).
    fn direct(&self, hook: Hook, f: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; 256];
        let opts = TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..Default::default() };
        let r = match hook {
            Hook::Tc => self.dp.tc_program().test_run(opts),
            Hook::Xdp => self.dp.xdp_program().test_run(opts),
        }
        .context("BPF_PROG_TEST_RUN of lb")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Runs lb's tc egress program once on `f`, without a wrapper.
    fn egress(&self, f: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; 256];
        let opts = TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..Default::default() };
        let r = self.dp.tc_egress_program().test_run(opts).context("BPF_PROG_TEST_RUN of lb's tc egress")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// A TCP handshake through lb at `hook`, so the flow is established and assured. Returns
    /// the translated forward tuple: (source as the backend sees it, backend).
    fn handshake(
        &self,
        hook: Hook,
        client: (Ipv4Addr, u16),
        frontend: (Ipv4Addr, u16),
    ) -> Result<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
        let (_, out) = self.direct(hook, &tcp(client, frontend, SYN))?;
        let p = parsed(&out).context("SYN of a handshake")?;
        ensure!(p.dst != frontend, "the SYN from {client:?} to {frontend:?} was not translated at {}", hook.name());
        let syn_ack = tcp(p.dst, p.src, SYN_ACK);
        let (v, mut out) = self.direct(hook, &syn_ack)?;
        let passed = if hook == Hook::Tc { TC_ACT_UNSPEC } else { XDP_PASS };
        if v == passed && out == syn_ack {
            // An unSNATed flow's reply: through the stack, restored at tc egress.
            out = self.egress(&syn_ack)?.1;
        }
        let r = parsed(&out).context("SYN-ACK of a handshake")?;
        ensure!((r.src, r.dst) == (frontend, client), "the SYN-ACK was not restored: {r:?}");
        self.direct(hook, &tcp(client, frontend, ACK))?;
        Ok((p.src, p.dst))
    }

    /// Fill of the stateful references' flow table, against this CPU's share of it.
    fn ref_flow_fill(&self) -> Result<String> {
        let flows: HashMap<&MapData, [u32; 4], [u32; 2]> =
            HashMap::try_from(self.w.ebpf.map("BENCH_REF_FLOWS").context("map BENCH_REF_FLOWS missing")?)?;
        let n = flows.keys().filter(|k| k.is_ok()).count() as u64;
        Ok(format!("BENCH_REF_FLOWS {}%", pct(n, self.share)))
    }

    /// Fill of a slot reference's table `name` (slots holding a flow), against its size.
    fn ref_slot_fill(&self, name: &str) -> Result<String> {
        let slots: Array<&MapData, [u32; 11]> =
            Array::try_from(self.w.ebpf.map(name).with_context(|| format!("map {name} missing"))?)?;
        let mut used = 0u64;
        for v in slots.iter() {
            used += u64::from(v.with_context(|| format!("reading {name}"))?[3] != 0);
        }
        Ok(format!("{name} {}%", pct(used, u64::from(slots.len()))))
    }

    /// Removes every entry of `LB_CT4_NEW`.
    fn clear_new(&mut self) -> Result<()> {
        self.ct.v4.new.clear().context("emptying LB_CT4_NEW")
    }

    /// Adds `flows` new flows of the fill Service (two `LB_CT4_NEW` entries each), at tc.
    fn fill_new(&mut self, flows: u64) -> Result<()> {
        if flows == 0 {
            return Ok(());
        }
        self.aim(Hook::Tc, Target::Lb)?;
        self.w.set_frame(&tcp((FILL_CLIENTS, BASE_PORT), FILL_VIP, SYN))?;
        let start = self.w.reserve(Mode::NewSrc, flows)?;
        self.w.run(Hook::Tc, Mode::NewSrc, &tcp((FILL_CLIENTS, BASE_PORT), FILL_VIP, SYN), flows as u32, start)?;
        Ok(())
    }

    /// Fills `LB_CT4` with assured flows of the fill Service up to `entries`, by handshakes
    /// through lb at tc in chunks of a 32nd of `LB_CT4_NEW`, in which a few sets overflow (a
    /// flow's two entries share a set; a flow is assured once its SYN was answered and its ACK
    /// seen): the flows pushed out are made up by the passes after the first.
    fn fill_assured(&mut self, entries: u64) -> Result<()> {
        let t = std::time::Instant::now();
        let r = self.fill_assured_inner(entries);
        crate::progress(&format!("  LB_CT4 filled to {entries} entries ({:.1} s)", t.elapsed().as_secs_f64()));
        r
    }

    fn fill_assured_inner(&mut self, entries: u64) -> Result<()> {
        let chunk = (self.new_cap / 32).max(1);
        let syn = tcp((FILL_CLIENTS, BASE_PORT), FILL_VIP, SYN);
        let syn_ack = tcp(FILL_BACKEND, (FILL_CLIENTS, BASE_PORT), SYN_ACK);
        let ack = tcp((FILL_CLIENTS, BASE_PORT), FILL_VIP, ACK);
        // Counting costs a system call per entry: count, run the handshakes that are missing,
        // count again; a further pass covers flows that did not become assured.
        for pass in 0..3 {
            let mut missing = entries.saturating_sub(self.assured_entries()) / 2;
            if missing == 0 {
                return Ok(());
            }
            if pass == 0 && self.filled.is_none() {
                // The chunks of this pass take consecutive counter values.
                self.filled = Some((self.w.next[0] as u32, missing as u32));
            }
            while missing > 0 {
                let flows = missing.min(chunk);
                let start = self.w.reserve(Mode::NewSrc, flows)?;
                // The SYN-ACK of a flow not SNATed passes lb's ingress untouched and is
                // restored by its egress program after the stack, as on a node: through
                // `lb_tc_ingress` it would leave the flow unanswered, never assured.
                for (mode, target, f) in [
                    (Mode::NewSrc, Target::Lb, &syn),
                    (Mode::NewDst, Target::LbEgress, &syn_ack),
                    (Mode::NewSrc, Target::Lb, &ack),
                ] {
                    self.aim(Hook::Tc, target)?;
                    self.w.set_frame(f)?;
                    self.w.run(Hook::Tc, mode, f, flows as u32, start)?;
                }
                missing -= flows;
            }
        }
        let have = self.assured_entries();
        // A fill far short means the handshakes no longer make assured flows: every row after
        // it would be labelled with tables it does not have, so the run stops here.
        ensure!(
            have >= entries - entries / 100,
            "LB_CT4 was to be filled to {entries} entries by handshakes through lb; it holds {have}"
        );
        if have + 1 < entries {
            self.notes.push(format!(
                "LB_CT4 was to be filled to {entries} entries by handshakes through lb; it holds {have}."
            ));
        }
        Ok(())
    }

    /// `cycles` rounds of every part in turn, the parts' order reversed every other cycle: each
    /// part's `repeat` runs (after an untimed tenth) come seconds at most from the others' of
    /// the same cycle, where a row's come minutes from the reference's and the floors'. Each
    /// part's first run is checked; its times per cycle are returned, part by part.
    fn interleaved(&mut self, hook: Hook, parts: &[Part<'_>], cycles: usize) -> Result<Vec<Vec<f64>>> {
        let mut out = vec![Vec::with_capacity(cycles); parts.len()];
        for cycle in 0..cycles {
            let order: Vec<usize> =
                if cycle % 2 == 0 { (0..parts.len()).collect() } else { (0..parts.len()).rev().collect() };
            for i in order {
                let p = &parts[i];
                let ctx = || format!("{} interleaved \"{}\"", hook.name(), p.what);
                self.aim(hook, p.target)?;
                self.w.set_frame(p.frame)?;
                let fresh = |s: &mut Self, n: u32| {
                    if p.mode == Mode::Keep || p.target == Target::Empty {
                        Ok(0)
                    } else {
                        s.w.reserve(p.mode, u64::from(n))
                    }
                };
                if cycle == 0 {
                    let start = fresh(self, 1)?;
                    let first = self.w.run(hook, p.mode, p.frame, 1, start).with_context(ctx)?;
                    (p.check)(first.verdict, &first.out).with_context(ctx)?;
                }
                let warmup = (self.repeat / 10).max(1);
                let start = fresh(self, warmup)?;
                self.w.run(hook, p.mode, p.frame, warmup, start).with_context(ctx)?;
                let start = fresh(self, self.repeat)?;
                out[i].push(self.w.run(hook, p.mode, p.frame, self.repeat, start).with_context(ctx)?.ns);
            }
        }
        Ok(out)
    }

    /// Measures one row; `check` judges the verdict and output of a first run.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        hook: Hook,
        what: &str,
        mode: Mode,
        target: Target,
        f: &[u8],
        counter: Option<Counter>,
        check: Check<'_>,
        runs: Runs,
    ) -> Result<f64> {
        let ctx = || format!("{} row \"{what}\"", hook.name());
        self.aim(hook, target)?;
        self.w.set_frame(f)?;
        let t = std::time::Instant::now();
        let start = match runs {
            Runs::Cycle { start, .. } => start,
            _ if target == Target::Empty => 0,
            _ => self.w.reserve(mode, 1)?,
        };
        let first = self.w.run(hook, mode, f, 1, start).with_context(ctx)?;
        check(first.verdict, &first.out).with_context(ctx)?;
        // Runs of the row so far, and how many of them moved the row's counter (fills between
        // batches run through lb too, so only the timed runs are counted).
        let (mut total, mut moved) = (0u64, [0u64; lb_common::COUNTER_MAX as usize]);
        // The empty program ignores the tuple, so its rows reuse counter values.
        let (cycle, cycle_len) = match runs {
            Runs::Cycle { start, n } => (Some(start), n),
            _ => (None, 0),
        };
        let fresh = |s: &mut Self, n: u32| match cycle {
            Some(start) => Ok(start),
            None if target == Target::Empty => Ok(0),
            None => s.w.reserve(mode, u64::from(n)),
        };
        let mut timed = |s: &mut Self, n: u32| -> Result<f64> {
            let before = s.stats(hook)?;
            let start = fresh(s, n)?;
            let ns = s.w.run_cycling(hook, mode, f, n, start, cycle_len)?.ns;
            for (m, (a, b)) in moved.iter_mut().zip(s.stats(hook)?.iter().zip(before)) {
                *m += a - b;
            }
            total += u64::from(n);
            Ok(ns)
        };
        // `LB_BENCH_WARM_SOAK=<text>`: a row whose hook and name ("xdp established flow ...")
        // contain the text first runs about a hundred million more untimed runs, so that a
        // profiler recording the whole run (`perf record -a`) sees mostly that row.
        let soak = std::env::var("LB_BENCH_WARM_SOAK").is_ok_and(|r| format!("{} {what}", hook.name()).contains(&r));
        if soak {
            eprintln!("soaking {} {what}", hook.name());
        }
        let mut v = Vec::new();
        let tables;
        match runs {
            Runs::Repeat => {
                tables = match target {
                    Target::FlowReference => self.ref_flow_fill()?,
                    Target::SlotReference => self.ref_slot_fill("BENCH_REF_SLOTS")?,
                    Target::BigSlotReference => self.ref_slot_fill("BENCH_REF_SLOTS_BIG")?,
                    _ => self.tables(),
                };
                // Untimed, so the first round does not pay for cold caches alone.
                let warmup = (self.repeat / 10).max(1);
                let start = fresh(self, warmup)?;
                self.w.run(hook, mode, f, warmup, start)?;
                if soak {
                    for _ in 0..100 {
                        let start = fresh(self, self.repeat)?;
                        self.w.run(hook, mode, f, self.repeat, start)?;
                    }
                }
                for _ in 0..self.rounds {
                    v.push(timed(self, self.repeat)?);
                }
            }
            Runs::Cycle { start, n } => {
                tables = match target {
                    Target::FlowReference => self.ref_flow_fill()?,
                    _ => self.tables(),
                };
                // Untimed first, as the other rows, so that the first timed round finds the
                // flows where the others do (the flow cache filled, as far as it holds them).
                let warmup = (self.repeat / 10).max(n);
                self.w.run_cycling(hook, mode, f, warmup, start, n)?;
                if soak {
                    for _ in 0..100 {
                        self.w.run_cycling(hook, mode, f, self.repeat, start, n)?;
                    }
                }
                // A million runs each, the flows over and over: in runs of one pass over
                // them (tens of microseconds), XDP's figures swung by 3x from run to run,
                // the reference's as much as lb's.
                for _ in 0..self.rounds {
                    v.push(timed(self, self.repeat)?);
                }
            }
            Runs::Batches { entries } => {
                let (mut from, mut to) = (0, 0);
                for _ in 0..self.batch_rounds {
                    self.clear_new()?;
                    self.fill_new(entries / 2)?;
                    from = self.new_entries();
                    self.aim(hook, target)?;
                    self.w.set_frame(f)?;
                    v.push(timed(self, self.batch)?);
                    to = self.new_entries();
                }
                tables = format!(
                    "LB_CT4 {}%, LB_CT4_NEW {}% to {}%",
                    pct(self.assured_entries(), self.assured_cap),
                    pct(from, self.new_cap),
                    pct(to, self.new_cap)
                );
            }
        }
        let on_path = counter.map(|c| moved[c as usize] as f64 / total as f64);
        if let Some(c) = counter.filter(|c| moved[*c as usize] < total) {
            // Say where the other runs went, by lb's counters.
            let others: Vec<String> = Counter::ALL
                .iter()
                .filter(|o| **o != c && moved[**o as usize] > 0)
                .map(|o| format!("{} {}", o.name(), moved[*o as usize]))
                .collect();
            self.notes.push(format!(
                "{} \"{what}\": {} counted {} of {total} runs; other counters that moved: {}.",
                hook.name(),
                c.name(),
                moved[c as usize],
                if others.is_empty() { "none".to_string() } else { others.join(", ") }
            ));
        }
        let ns = crate::median(v);
        let floor = if target == Target::Empty { ns } else { self.floors.get(&(hook, mode)).copied().unwrap_or(ns) };
        crate::progress(&format!("  {} {what}: {ns:.0} ns ({:.1} s)", hook.name(), t.elapsed().as_secs_f64()));
        self.rows.push(Row { hook, what: what.to_string(), mode, tables, ns, floor, on_path });
        Ok(ns)
    }
}

fn pct(n: u64, of: u64) -> String {
    if of == 0 {
        return "?".into();
    }
    format!("{:.0}", n as f64 * 100.0 / of as f64)
}

/// A reference's check: `expect`ed verdict, destination rewritten to the references' backend.
fn to_ref_backend(expect: Vec<u32>) -> impl Fn(u32, &[u8]) -> Result<()> {
    move |v: u32, out: &[u8]| {
        expect_verdict(v, &expect)?;
        let p = parsed(out)?;
        ensure!(p.dst == REF_BACKEND, "not translated: {p:?}");
        Ok(())
    }
}

/// A check that the run gave one of `expect` and sent the packet to one of `backends`.
fn to_one_of(expect: Vec<u32>, backends: Vec<(Ipv4Addr, u16)>) -> impl Fn(u32, &[u8]) -> Result<()> {
    move |v: u32, out: &[u8]| {
        expect_verdict(v, &expect)?;
        let p = parsed(out)?;
        ensure!(backends.contains(&p.dst), "not sent to a backend of the Service: {p:?}");
        Ok(())
    }
}

/// The IPv4 backends of the bench's TCP ClusterIP `vip`.
fn ipv4_backends(vip: (Ipv4Addr, u16)) -> Vec<(Ipv4Addr, u16)> {
    state().services[&Frontend::cluster_ip(vip.0, vip.1, Protocol::Tcp)]
        .backends
        .iter()
        .filter_map(|e| match e.ip {
            std::net::IpAddr::V4(ip) => Some((ip, e.port)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

fn expect_verdict(v: u32, allowed: &[u32]) -> Result<()> {
    ensure!(allowed.contains(&v), "verdict {v}, expected one of {allowed:?}");
    Ok(())
}

/// Possible CPUs: the per-CPU LRU lists split the map's entries between them.
fn possible_cpus() -> Result<u64> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").context("reading possible CPUs")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>()? - a.parse::<u64>()? + 1,
            None => 1,
        };
    }
    Ok(n)
}

/// Pins the calling thread to the CPU it runs on: per-CPU LRU lists, per-run counters and the
/// fill levels all belong to one CPU.
fn pin_to_current_cpu() -> Result<usize> {
    // SAFETY: plain system calls on this thread with a zeroed, then filled, CPU set.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        Ok(cpu as usize)
    }
}

/// A node-like network namespace, deleted on drop: `ext0` (192.168.49.2/24) towards another
/// node (192.168.49.3, which routes 10.244.2.0/24) and an outside client (192.168.49.100),
/// both with permanent neighbour entries.
struct NodeNs {
    name: String,
}

impl NodeNs {
    fn new() -> Result<Self> {
        let name = format!("lbbench-warm-{}", std::process::id());
        if std::path::Path::new("/run/netns").join(&name).exists() {
            run(&["ip", "netns", "del", &name])?;
        }
        run(&["ip", "netns", "add", &name])?;
        let ns = NodeNs { name };
        for cmd in [
            "ip link add ext0 type veth peer name ext1",
            "ip link set ext0 address 02:00:00:00:00:02",
            "ip addr add 192.168.49.2/24 dev ext0",
            "ip link set ext0 up",
            "ip link set ext1 up",
            "ip link set lo up",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "ip neigh add 192.168.49.3 lladdr 02:00:00:00:00:03 dev ext0 nud permanent",
            "ip neigh add 192.168.49.100 lladdr 02:00:00:00:01:00 dev ext0 nud permanent",
            "ip route add 10.244.2.0/24 via 192.168.49.3",
        ] {
            let mut args = vec!["ip", "netns", "exec", ns.name.as_str()];
            args.extend(cmd.split(' '));
            run(&args)?;
        }
        Ok(ns)
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status().with_context(|| format!("running {}", args[0]))?;
    ensure!(st.success(), "{} failed: {st}", args.join(" "));
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(i != 0, "no interface {name}");
    Ok(i)
}

fn state() -> DesiredState {
    let mut s = DesiredState::default();
    let backends = |base: u8, n: u8| -> Vec<Endpoint> {
        (0..n).map(|j| Endpoint { ip: Ipv4Addr::new(10, 244, base, 2 + j).into(), port: 8080, local: j == 0 }).collect()
    };
    let cluster_ip = |(ip, port): (Ipv4Addr, u16)| Frontend::cluster_ip(ip, port, Protocol::Tcp);
    s.services.insert(
        cluster_ip(VIP),
        ServicePort { name: "bench/web".into(), backends: backends(0, 5), ..Default::default() },
    );
    s.services.insert(
        cluster_ip(AFF_VIP),
        ServicePort {
            name: "bench/sticky".into(),
            backends: backends(3, 5),
            affinity_timeout_s: Some(10_800),
            ..Default::default()
        },
    );
    s.services.insert(
        cluster_ip(FILL_VIP),
        ServicePort {
            name: "bench/fill".into(),
            backends: vec![Endpoint { ip: FILL_BACKEND.0.into(), port: FILL_BACKEND.1, local: true }],
            ..Default::default()
        },
    );
    s.services.insert(
        Frontend::node_port(NODE_PORT, Protocol::Tcp),
        ServicePort {
            name: "bench/edge".into(),
            backends: vec![Endpoint { ip: REMOTE_POD.0.into(), port: REMOTE_POD.1, local: false }],
            external: true,
            ..Default::default()
        },
    );
    s
}

/// Passes of the whole section in a full run. Ratios of a few tens of nanoseconds move from
/// one pass to the next on a shared machine (a neighbour's work evicts caches between rows),
/// so a target is reported as met in k of the passes rather than from one of them.
const PASSES: usize = 3;

/// Section 1b: runs in a namespace of its own and returns its markdown: the first pass's
/// table, the targets of every pass, and the other passes' tables.
pub fn per_packet_warm(quick: bool) -> Result<String> {
    let ns = NodeNs::new()?;
    // `LB_BENCH_WARM_PASSES`: fewer (or more) passes, for `cargo xtask bench-baseline
    // --section warm`, which alternates single passes of two builds.
    let passes = if quick {
        1
    } else {
        std::env::var("LB_BENCH_WARM_PASSES").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(PASSES)
    };
    let mut done = Vec::new();
    for pass in 0..passes {
        if passes > 1 {
            crate::progress(&format!("  pass {} of {passes}", pass + 1));
        }
        done.push(lb_tests::in_ns(&ns.name, || measure(quick))??);
    }
    drop(ns);
    if passes == 1 {
        return Ok(done.pop().map(|(md, ..)| md).unwrap_or_default());
    }
    let mut md = done[0].0.clone();
    md.push_str(&passes_summary(&done.iter().map(|(_, t, ..)| t.as_slice()).collect::<Vec<_>>())?);
    md.push_str(&interleaved_summary(&done.iter().map(|(.., i)| i).collect::<Vec<_>>())?);
    md.push_str(&against_flow_reference(&done.iter().map(|(_, _, f, _)| f.as_slice()).collect::<Vec<_>>())?);
    for (i, (table, ..)) in done.iter().enumerate().skip(1) {
        md.push_str(&table.replacen("## 1b. ", &format!("### 1b, pass {} of {passes}: ", i + 1), 1));
    }
    Ok(md)
}

/// One target of one pass: lb's figure over the floor and the limit, both in ns.
struct TargetFigure {
    what: &'static str,
    hook: Hook,
    lb: f64,
    limit: f64,
}

impl TargetFigure {
    fn met(&self) -> bool {
        self.lb <= self.limit
    }
}

/// " pass 1 | pass 2 | ..." for a table with a column per pass.
fn pass_headers(passes: usize) -> String {
    (1..=passes).map(|i| format!(" pass {i} |")).collect()
}

/// A new flow with full tables, lb's and the stateful references' (ns over the floor), and
/// the new-flow target's limit, of one pass.
struct FlowRefFigure {
    hook: Hook,
    lb: f64,
    /// The reference with a flow table (a kernel LRU).
    reference: f64,
    /// The reference with a direct-mapped slot table.
    slot: f64,
    /// The same with `BIG_SLOTS` times the slots.
    big_slot: f64,
    /// 2.5x the minimal DNAT.
    limit: f64,
}

/// The ratio of lb's new flow to the reference with a flow table, and the slot references'
/// figures against the new-flow target's limit, in every pass.
fn against_flow_reference(passes: &[&[FlowRefFigure]]) -> Result<String> {
    let mut md = String::from(
        "New flow with full tables against the reference with a flow table, over the passes (lb / \
         reference, ns over the floor, and the ratio), and the least a flow table costs (the references \
         with a direct-mapped slot table, as large as lb's new-flow table and 16x larger / the new-flow \
         target's limit, 2.5x the minimal DNAT):\n\n| hook |",
    );
    md.push_str(&pass_headers(passes.len()));
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(passes.len()));
    md.push('\n');
    for (i, first) in passes[0].iter().enumerate() {
        write!(md, "| {}, lb / flow table |", first.hook.name())?;
        for p in passes {
            let f = &p[i];
            write!(md, " {:+.0} / {:+.0} = {:.2}x |", f.lb, f.reference, f.lb / f.reference)?;
        }
        write!(md, "\n| {}, slot table / limit |", first.hook.name())?;
        for p in passes {
            let f = &p[i];
            write!(md, " {:+.0} / {:+.0} = {:.2}x |", f.slot, f.limit, f.slot / f.limit)?;
        }
        write!(md, "\n| {}, slot table 16x / limit |", first.hook.name())?;
        for p in passes {
            let f = &p[i];
            write!(md, " {:+.0} / {:+.0} = {:.2}x |", f.big_slot, f.limit, f.big_slot / f.limit)?;
        }
        md.push('\n');
    }
    md.push('\n');
    Ok(md)
}

fn passes_summary(passes: &[&[TargetFigure]]) -> Result<String> {
    let mut md = format!(
        "Targets over the {} passes of this section (each pass measures every row, references \
         and floors again; lb's figure / the limit, ns over the floor):\n\n| target | hook |",
        passes.len()
    );
    md.push_str(&pass_headers(passes.len()));
    md.push_str(" met in |\n|---|---|");
    md.push_str(&"---:|".repeat(passes.len()));
    md.push_str("---|\n");
    for (i, first) in passes[0].iter().enumerate() {
        write!(md, "| {} | {} |", first.what, first.hook.name())?;
        let mut met = 0;
        for p in passes {
            let t = &p[i];
            write!(md, " {:+.0} / {:+.0} |", t.lb, t.limit)?;
            met += usize::from(t.met());
        }
        writeln!(md, " {met} of {} |", passes.len())?;
    }
    md.push('\n');
    Ok(md)
}

#[allow(clippy::type_complexity)]
fn measure(quick: bool) -> Result<(String, Vec<TargetFigure>, Vec<FlowRefFigure>, BTreeMap<Hook, Interleaved>)> {
    // Other work on this machine shares its caches and cores: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut sizes = if quick {
        MapSizes { conntrack: 16_384, conntrack_new: 8_192, ..MapSizes::default() }
    } else {
        MapSizes::default()
    };
    // `LB_BENCH_WARM_CT_NEW=<entries>`: another capacity of the new-flow table (and of the
    // references' tables, which follow it), to see what the new-flow rows owe to its size.
    if let Some(n) = std::env::var("LB_BENCH_WARM_CT_NEW").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0) {
        sizes.conntrack_new = n;
    }
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-warm", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    struct Unpin(PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unpin = Unpin(pin.clone());
    let mut dp = Dataplane::load(&pin, &Config { node_ip: Some(NODE_IP), sizes, ..Config::default() })
        .with_context(|| format!("loading the datapath under {}", pin.display()))?;
    let report = dp.apply(&state());
    ensure!(report.errors.is_empty(), "programming: {:?}", report.errors);
    dp.set_node_addresses(&[NODE_IP])?;
    Maps::open_pinned(&pin)?.xdp_targets.insert(ifindex("ext0")?, 1, 0).context("writing LB_XDP_TARGETS")?;
    // After the datapath started its threads (the conntrack collector), so they stay free to
    // run on another CPU.
    let cpu = pin_to_current_cpu()?;
    let cpus = possible_cpus()?;
    let mut s = Session {
        w: Wrappers::load(sizes.conntrack_new)?,
        dp: &dp,
        ct: CtTables::open_pinned(&pin)?,
        assured_cap: u64::from(sizes.conntrack),
        new_cap: u64::from(sizes.conntrack_new),
        share: u64::from(sizes.conntrack_new) / cpus,
        repeat: if quick { 20_000 } else { 1_000_000 },
        rounds: if quick { 3 } else { 5 },
        batch: 0,
        batch_rounds: if quick { 3 } else { 15 },
        interleaved_cycles: if quick { 3 } else { 9 },
        floors: BTreeMap::new(),
        filled: None,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    // A batch of new flows takes an eighth of the new-flow table: empty stays nearly empty,
    // half nearly half.
    s.batch = (s.new_cap / 16).max(1) as u32;
    let hooks = [Hook::Tc, Hook::Xdp];
    let fwd = |h: Hook| if h == Hook::Tc { vec![TC_ACT_OK] } else { vec![XDP_PASS] };
    let untouched = |h: Hook| if h == Hook::Tc { vec![TC_ACT_UNSPEC] } else { vec![XDP_PASS] };
    let routed = |h: Hook| if h == Hook::Tc { vec![TC_ACT_REDIRECT] } else { vec![XDP_TX, XDP_REDIRECT] };

    // Floors, per hook and wrapper mode.
    let keep_frame = tcp((CLIENT, 40_000), (OTHER_POD, 7777), ACK);
    for hook in hooks {
        for mode in [Mode::Keep, Mode::NewSrc, Mode::NewConn] {
            let base = if mode == Mode::NewConn { PINNED_CLIENTS } else { NEW_CLIENTS };
            let f = if mode == Mode::Keep { keep_frame.clone() } else { tcp((base, BASE_PORT), VIP, SYN) };
            let expect = untouched(hook);
            let f2 = f.clone();
            let check = move |v: u32, out: &[u8]| {
                expect_verdict(v, &expect)?;
                parsed(out)?;
                ensure!(mode != Mode::Keep || out == f2.as_slice(), "the frame changed");
                Ok(())
            };
            let ns = s.row(hook, "empty program (floor)", mode, Target::Empty, &f, None, &check, Runs::Repeat)?;
            s.floors.insert((hook, mode), ns);
        }
    }

    // References: the minimal DNAT of each hook.
    let to_vip = tcp((CLIENT, 40_000), VIP, ACK);
    let mut reference = BTreeMap::new();
    for hook in hooks {
        let expect = if hook == Hook::Tc { vec![TC_ACT_OK] } else { vec![XDP_PASS] };
        let check = to_ref_backend(expect);
        let ns = s.row(
            hook,
            "minimal DNAT (reference)",
            Mode::Keep,
            Target::Reference,
            &to_vip,
            None,
            &check,
            Runs::Repeat,
        )?;
        reference.insert(hook, ns - s.floors[&(hook, Mode::Keep)]);
    }

    // Flows the established, reply and SNAT rows replay, made before the tables fill (a full
    // assured table would leave them in the LRU).
    let mut est = BTreeMap::new();
    let mut snat = BTreeMap::new();
    for (i, hook) in hooks.into_iter().enumerate() {
        let client = (CLIENT, 40_000 + i as u16);
        est.insert(hook, (client, s.handshake(hook, client, VIP)?.1));
        let ext = (EXTERNAL_CLIENT, 40_000 + i as u16);
        let (seen_as, backend) = s.handshake(hook, ext, (NODE_IP, NODE_PORT))?;
        ensure!(seen_as.0 == NODE_IP && backend == REMOTE_POD, "node port flow not SNATed: {seen_as:?} -> {backend:?}");
        snat.insert(hook, (ext, seen_as));
    }
    let assured = s.assured_entries();
    if assured != 8 {
        s.notes.push(format!(
            "The four handshakes of the established, reply and SNAT rows left {assured} entries in LB_CT4, \
             not 8: those flows are not all assured, and their rows may measure the LRU instead."
        ));
    }

    // New flows at three fill levels.
    let new_flow = tcp((NEW_CLIENTS, BASE_PORT), VIP, SYN);
    let vip_backends = ipv4_backends(VIP);
    let mut new_full = BTreeMap::new();
    let mut flow_reference = BTreeMap::new();
    let mut slot_reference = BTreeMap::new();
    let mut big_slot_reference = BTreeMap::new();
    // `LB_BENCH_WARM_TRACKED_ONLY=1`: only floors, references and the tracked-flow and
    // pass-through rows, with the tables nearly empty: a quick look at a change to the tracked
    // path while developing, never a figure to quote (the full tables are part of the rows).
    let tracked_only = std::env::var("LB_BENCH_WARM_TRACKED_ONLY").is_ok_and(|v| v == "1");
    // `LB_BENCH_WARM_NEW_ONLY=1`: the other quick look, only floors, references and the
    // new-flow rows with full tables (and the stateful references beside them).
    let new_only = std::env::var("LB_BENCH_WARM_NEW_ONLY").is_ok_and(|v| v == "1");
    let levels: &[Level] = if new_only { &[Level::Full] } else { &[Level::Empty, Level::Half, Level::Full] };
    if !tracked_only {
        for &level in levels {
            let runs = match level {
                Level::Empty => Runs::Batches { entries: 0 },
                Level::Half => {
                    s.fill_assured(s.assured_cap / 2)?;
                    Runs::Batches { entries: s.new_cap / 2 }
                }
                Level::Full => {
                    s.fill_assured(s.assured_cap)?;
                    // Twice its entries: the table is full and most ways were replaced once.
                    s.fill_new(s.new_cap)?;
                    Runs::Repeat
                }
            };
            for hook in hooks {
                let check = to_one_of(fwd(hook), vip_backends.clone());
                let what = format!("new flow (SYN to a ClusterIP), conntrack {}", level.name());
                let ns =
                    s.row(hook, &what, Mode::NewSrc, Target::Lb, &new_flow, Some(Counter::FwdNewFlow), &check, runs)?;
                if level == Level::Full {
                    new_full.insert(hook, ns - s.floors[&(hook, Mode::NewSrc)]);
                }
            }
        }

        // The stateful references, their flow table full as lb's is in the row above: filled
        // with twice this CPU's share of new flows, so every insert evicts.
        for hook in hooks {
            s.aim(hook, Target::FlowReference)?;
            s.w.set_frame(&new_flow)?;
            let start = s.w.reserve(Mode::NewSrc, 2 * s.share)?;
            s.w.run(hook, Mode::NewSrc, &new_flow, 2 * s.share as u32, start)?;
            let expect = fwd(hook);
            let check = to_ref_backend(expect);
            let ns = s.row(
                hook,
                "new flow, minimal DNAT with a flow table (reference: one lookup, one insert)",
                Mode::NewSrc,
                Target::FlowReference,
                &new_flow,
                None,
                &check,
                Runs::Repeat,
            )?;
            flow_reference.insert(hook, ns - s.floors[&(hook, Mode::NewSrc)]);
        }

        // The slot references, their table as large as lb's new-flow table or `BIG_SLOTS` times
        // larger, each filled with three times its slots' worth of new flows first (about 95%
        // of the slots then hold one before the first hook's row; the second hook's finds the
        // table full, after the first's runs).
        for (target, factor, what, figures) in [
            (
                Target::SlotReference,
                1,
                "new flow, minimal DNAT with a direct-mapped slot table (reference: one read, one write)",
                &mut slot_reference,
            ),
            (
                Target::BigSlotReference,
                u64::from(BIG_SLOTS),
                "new flow, minimal DNAT with a slot table 16x larger (reference: one read, one write)",
                &mut big_slot_reference,
            ),
        ] {
            for hook in hooks {
                s.aim(hook, target)?;
                s.w.set_frame(&new_flow)?;
                let fill = 3 * s.new_cap * factor;
                let start = s.w.reserve(Mode::NewSrc, fill)?;
                s.w.run(hook, Mode::NewSrc, &new_flow, fill as u32, start)?;
                let check = to_ref_backend(fwd(hook));
                let ns = s.row(hook, what, Mode::NewSrc, target, &new_flow, None, &check, Runs::Repeat)?;
                figures.insert(hook, ns - s.floors[&(hook, Mode::NewSrc)]);
            }
        }

        // Affinity: 1024 clients pinned first, then every run a new connection of one of them.
        let aff = tcp((PINNED_CLIENTS, BASE_PORT), AFF_VIP, SYN);
        if !new_only {
            s.aim(Hook::Tc, Target::Lb)?;
            s.w.set_frame(&aff)?;
            let start = s.w.reserve(Mode::NewConn, 1024)?;
            s.w.run(Hook::Tc, Mode::NewConn, &aff, 1024, start)?;
            let pins = s.dp.maps().affinity.keys().filter(|k| k.is_ok()).count();
            ensure!(pins == 1024, "pinning 1024 clients left {pins} affinity entries");
            let aff_backends = ipv4_backends(AFF_VIP);
            for hook in hooks {
                let check = to_one_of(fwd(hook), aff_backends.clone());
                s.row(
                    hook,
                    "affinity hit (new connection of a pinned client)",
                    Mode::NewConn,
                    Target::Lb,
                    &aff,
                    Some(Counter::AffinityHit),
                    &check,
                    Runs::Repeat,
                )?;
            }
        }
    }

    // Tracked flows and pass-through, with both tables full.
    let mut established = BTreeMap::new();
    let mut pass_service_port = BTreeMap::new();
    for hook in hooks.into_iter().filter(|_| !new_only) {
        let (client, backend) = est[&hook];
        let expect = fwd(hook);
        let check = move |v: u32, out: &[u8]| {
            expect_verdict(v, &expect)?;
            let p = parsed(out)?;
            ensure!(p.dst == backend && p.src == client, "not its backend: {p:?}");
            Ok(())
        };
        let ns = s.row(
            hook,
            "established flow (ACK, conntrack hit)",
            Mode::Keep,
            Target::Lb,
            &tcp(client, VIP, ACK),
            Some(Counter::FwdTracked),
            &check,
            Runs::Repeat,
        )?;
        established.insert(hook, ns - s.floors[&(hook, Mode::Keep)]);

        // The row above replays one flow, whose entry every cache holds after its first run;
        // this one replays assured flows of the first fill, each once per round, so their
        // entries come from wherever the caches left them, as with many clients at once. As many
        // as half the references' per-CPU share, so that the reference's flow table holds them
        // all too; lb's assured table holds four times as many flows.
        if let Some((start, filled)) = s.filled {
            // A few flows of the range lost their entries to a full set before the fill's ACK
            // made them assured (later passes of the fill made others up): the row's share of
            // runs on the tracked path says how many.
            let n = filled.min((s.share / 2) as u32).min(s.repeat);
            let ack = tcp((FILL_CLIENTS, BASE_PORT), FILL_VIP, ACK);
            let expect = fwd(hook);
            let check = move |v: u32, out: &[u8]| {
                expect_verdict(v, &expect)?;
                let p = parsed(out)?;
                ensure!(p.dst == FILL_BACKEND, "not its backend: {p:?}");
                Ok(())
            };
            let what = format!("established flows in turn ({n} flows, ACK, conntrack hit)");
            let runs = Runs::Cycle { start, n };
            s.row(hook, &what, Mode::NewSrc, Target::Lb, &ack, Some(Counter::FwdTracked), &check, runs)?;
            // The reference with a flow table, on the same flows: the first round inserts them
            // (its table was full of other flows), the timed rounds find them.
            let expect = fwd(hook);
            let check = to_ref_backend(expect);
            let what = format!("established flows in turn ({n} flows), minimal DNAT with a flow table (reference)");
            s.row(hook, &what, Mode::NewSrc, Target::FlowReference, &ack, None, &check, runs)?;
        }

        let expect = fwd(hook);
        let check = move |v: u32, out: &[u8]| {
            expect_verdict(v, &expect)?;
            let p = parsed(out)?;
            ensure!(p.src == VIP && p.dst == client, "not restored: {p:?}");
            Ok(())
        };
        // An unSNATed flow's reply is restored by tc egress, after the stack (so the node's
        // netfilter sees the flow as the backend does); at the ingress hooks it is a
        // pass-through with the destination check in front.
        let reply = tcp(backend, client, ACK);
        if hook == Hook::Tc {
            s.row(
                hook,
                "reply (backend -> client, reverse NAT at tc egress)",
                Mode::Keep,
                Target::LbEgress,
                &reply,
                Some(Counter::ReplyTranslated),
                &check,
                Runs::Repeat,
            )?;
        }
        let expect = untouched(hook);
        let orig = reply.clone();
        let check = move |v: u32, out: &[u8]| {
            expect_verdict(v, &expect)?;
            ensure!(out == orig.as_slice(), "the reply changed at ingress");
            Ok(())
        };
        s.row(
            hook,
            "reply (backend -> client) at ingress: left to the stack",
            Mode::Keep,
            Target::Lb,
            &reply,
            Some(Counter::PassNotService),
            &check,
            Runs::Repeat,
        )?;

        for (what, f) in [
            ("pass-through, port no Service uses", tcp((CLIENT, 40_000), (OTHER_POD, 7777), ACK)),
            ("pass-through, a Service's port, another address", tcp((CLIENT, 40_000), (OTHER_POD, 80), ACK)),
            ("pass-through, a backend port from a non-backend", tcp((OTHER_POD, 8080), (CLIENT, 40_000), ACK)),
        ] {
            let expect = untouched(hook);
            let orig = f.clone();
            let check = move |v: u32, out: &[u8]| {
                expect_verdict(v, &expect)?;
                ensure!(out == orig.as_slice(), "the frame changed");
                Ok(())
            };
            let ns =
                s.row(hook, what, Mode::Keep, Target::Lb, &f, Some(Counter::PassNotService), &check, Runs::Repeat)?;
            if what.contains("Service's port") {
                pass_service_port.insert(hook, ns - s.floors[&(hook, Mode::Keep)]);
            }
        }

        let (ext, seen_as) = snat[&hook];
        let expect = routed(hook);
        let check = move |v: u32, out: &[u8]| {
            expect_verdict(v, &expect)?;
            let p = parsed(out)?;
            ensure!(p.dst == REMOTE_POD && p.src == seen_as, "not SNATed to its backend: {p:?}");
            Ok(())
        };
        s.row(
            hook,
            "SNAT + routed: node port to a remote backend, established",
            Mode::Keep,
            Target::Lb,
            &tcp(ext, (NODE_IP, NODE_PORT), ACK),
            Some(Counter::FwdTracked),
            &check,
            Runs::Repeat,
        )?;
        let expect = routed(hook);
        let check = move |v: u32, out: &[u8]| {
            expect_verdict(v, &expect)?;
            let p = parsed(out)?;
            ensure!(p.src == (NODE_IP, NODE_PORT) && p.dst == ext, "not restored: {p:?}");
            Ok(())
        };
        s.row(
            hook,
            "SNAT + routed: the remote backend's reply",
            Mode::Keep,
            Target::Lb,
            &tcp(REMOTE_POD, seen_as, ACK),
            Some(Counter::ReplyTranslated),
            &check,
            Runs::Repeat,
        )?;
    }

    // The targets of a new flow and of an established flow again, interleaved: lb's rows, the
    // minimal DNAT and the floors in turn, cycle after cycle (`Session::interleaved`), so that
    // a ratio compares runs seconds apart rather than minutes (the tables as the rows above
    // left them: full).
    let mut interleaved = BTreeMap::new();
    for hook in hooks.into_iter().filter(|_| !tracked_only) {
        let (client, backend) = est[&hook];
        let est_frame = tcp(client, VIP, ACK);
        let floor_check = {
            let expect = untouched(hook);
            move |v: u32, out: &[u8]| {
                expect_verdict(v, &expect)?;
                parsed(out).map(|_| ())
            }
        };
        let ref_check = to_ref_backend(fwd(hook));
        let new_check = to_one_of(fwd(hook), vip_backends.clone());
        let est_check = {
            let expect = fwd(hook);
            move |v: u32, out: &[u8]| {
                expect_verdict(v, &expect)?;
                let p = parsed(out)?;
                ensure!(p.dst == backend && p.src == client, "not its backend: {p:?}");
                Ok(())
            }
        };
        let parts = [
            Part { what: "floor", target: Target::Empty, mode: Mode::Keep, frame: &keep_frame, check: &floor_check },
            Part {
                what: "minimal DNAT",
                target: Target::Reference,
                mode: Mode::Keep,
                frame: &to_vip,
                check: &ref_check,
            },
            Part {
                what: "floor, new 5-tuple",
                target: Target::Empty,
                mode: Mode::NewSrc,
                frame: &new_flow,
                check: &floor_check,
            },
            Part {
                what: "new flow, conntrack full",
                target: Target::Lb,
                mode: Mode::NewSrc,
                frame: &new_flow,
                check: &new_check,
            },
            Part {
                what: "established flow",
                target: Target::Lb,
                mode: Mode::Keep,
                frame: &est_frame,
                check: &est_check,
            },
        ];
        let t = std::time::Instant::now();
        let v = s.interleaved(hook, &parts, s.interleaved_cycles)?;
        let fig = Interleaved::of(&v);
        crate::progress(&format!(
            "  {} interleaved, {} cycles: new flow {:.2}x, established {:.2}x the minimal DNAT (medians; {:.1} s)",
            hook.name(),
            v[0].len(),
            fig.new_ratio(),
            fig.est_ratio(),
            t.elapsed().as_secs_f64()
        ));
        interleaved.insert(hook, fig);
    }
    let tables_after = s.tables();

    let rows = std::mem::take(&mut s.rows);
    let notes = std::mem::take(&mut s.notes);
    let (repeat, rounds, batch, batch_rounds, share) = (s.repeat, s.rounds, s.batch, s.batch_rounds, s.share);
    drop(s);
    drop(dp);
    let sum = Summary {
        reference,
        flow_reference,
        slot_reference,
        big_slot_reference,
        new_full,
        established,
        pass_service_port,
        interleaved,
        tables_after,
        notes,
    };
    let md = render(
        &rows,
        &sum,
        &format!(
            "`repeat` = {repeat}, median of {rounds} rounds; the empty and half-full new-flow rows \
             run batches of {batch} new flows (the table reset to its level before each), median of \
             {batch_rounds}. One CPU (CPU {cpu}); `LB_CT4_NEW` is one array for all CPUs ({} entries), \
             the references' flow table a per-CPU LRU of that size, whose fill is given against this \
             CPU's share ({share} entries), the slot references' tables arrays of that many slots and {BIG_SLOTS} \
             times as many, whose fill is given against the whole table; `LB_CT4` holds {} entries. Load \
             average (1, 5, 15 min) when the section started: {load}.",
            sizes.conntrack_new, sizes.conntrack
        ),
    )?;
    Ok((md, targets(&sum), flow_ref_figures(&sum), sum.interleaved))
}

/// The times of one hook's interleaved cycles (ns per run, as `Session::interleaved` returns
/// them for its five parts: floor, minimal DNAT, floor with a new 5-tuple, lb's new flow, lb's
/// established flow) and the ratios each cycle gives.
struct Interleaved {
    /// lb's new flow over its floor, per cycle.
    new_flow: Vec<f64>,
    /// lb's established flow over its floor, per cycle.
    established: Vec<f64>,
    /// The minimal DNAT over its floor, per cycle.
    reference: Vec<f64>,
}

impl Interleaved {
    fn of(v: &[Vec<f64>]) -> Self {
        let over = |part: usize, floor: usize| v[part].iter().zip(&v[floor]).map(|(a, f)| a - f).collect::<Vec<_>>();
        Self { new_flow: over(3, 2), established: over(4, 0), reference: over(1, 0) }
    }

    /// The ratio of each cycle. A cycle whose minimal DNAT came out at or under its floor (at
    /// XDP the DNAT is a few tens of ns, and a floor round the machine slowed can exceed it)
    /// counts as infinite, against the target: dropping it would drop the cycles that would
    /// have given lb its worst ratios.
    fn ratios(&self, lb: &[f64]) -> Vec<f64> {
        lb.iter().zip(&self.reference).map(|(l, r)| if *r > 0.0 { l / r } else { f64::INFINITY }).collect()
    }

    /// Cycles whose minimal DNAT came out at or under its floor.
    fn without_reference(&self) -> usize {
        self.reference.iter().filter(|r| **r <= 0.0).count()
    }

    fn new_ratio(&self) -> f64 {
        crate::median(self.ratios(&self.new_flow))
    }

    fn est_ratio(&self) -> f64 {
        crate::median(self.ratios(&self.established))
    }

    /// (target, lb's figures, the limit as a ratio) for each interleaved target.
    fn targets(&self) -> [(&'static str, &[f64], f64); 2] {
        [(NEW_FLOW_TARGET, &self.new_flow, NEW_FLOW_LIMIT), (ESTABLISHED_TARGET, &self.established, ESTABLISHED_LIMIT)]
    }
}

/// The interleaved targets of one pass as a table.
fn render_interleaved(sum: &Summary) -> Result<String> {
    let mut md = String::new();
    let Some(cycles) = sum.interleaved.values().next().map(|f| f.reference.len()) else {
        return Ok(md);
    };
    writeln!(
        md,
        "\nThe same targets measured interleaved, after the rows above ({}): {cycles} cycles, each a round \
         of `repeat` runs of the floor, the minimal DNAT, the floor with a new 5-tuple, lb's new flow and \
         lb's established flow in turn (the order reversed every other cycle), so a cycle's ratio compares \
         runs a few seconds apart; lb and the minimal DNAT over their floors, medians of the cycles, and \
         the median and range of the cycles' ratios (a cycle whose minimal DNAT came out at or under its \
         floor counts as infinite, against the target; the last column but one says how many did):\n\n\
         | target | hook | lb | minimal DNAT | ratio, median (range) | cycles without a ratio | met |\n\
         |---|---|---:|---:|---|---:|---|",
        sum.tables_after
    )?;
    for (hook, f) in &sum.interleaved {
        for (what, lb, limit) in f.targets() {
            let r = f.ratios(lb);
            let (lo, hi) = r.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(*x), b.max(*x)));
            let m = crate::median(r);
            writeln!(
                md,
                "| {what} | {} | {:+.1} ns | {:+.1} ns | {m:.2}x ({lo:.2}x to {hi:.2}x) | {} | {} |",
                hook.name(),
                crate::median(lb.to_vec()),
                crate::median(f.reference.clone()),
                f.without_reference(),
                if m <= limit { "yes" } else { "**no**" }
            )?;
        }
    }
    Ok(md)
}

/// The interleaved targets over the passes: each pass's median ratio, and how many met it.
fn interleaved_summary(passes: &[&BTreeMap<Hook, Interleaved>]) -> Result<String> {
    if passes.iter().all(|p| p.is_empty()) {
        return Ok(String::new());
    }
    let mut md = String::from(
        "The same targets measured interleaved in each pass (median of the cycles' ratios to the minimal \
         DNAT / the limit; a cycle whose DNAT came out at or under its floor counts as infinite):\n\n\
         | target | hook |",
    );
    md.push_str(&pass_headers(passes.len()));
    md.push_str(" met in |\n|---|---|");
    md.push_str(&"---:|".repeat(passes.len()));
    md.push_str("---|\n");
    let Some(first) = passes.first() else { return Ok(md) };
    for hook in first.keys() {
        for t in 0..2 {
            let mut met = 0;
            let mut cells = String::new();
            let mut what = "";
            for p in passes {
                let Some(f) = p.get(hook) else { continue };
                let (w, lb, limit) = f.targets()[t];
                what = w;
                let m = crate::median(f.ratios(lb));
                write!(cells, " {m:.2}x / {limit:.1}x |")?;
                met += usize::from(m <= limit);
            }
            writeln!(md, "| {what} | {} |{cells} {met} of {} |", hook.name(), passes.len())?;
        }
    }
    md.push('\n');
    Ok(md)
}

/// lb's full-table new flow beside the reference with a flow table, for each hook that has both.
fn flow_ref_figures(sum: &Summary) -> Vec<FlowRefFigure> {
    [Hook::Tc, Hook::Xdp]
        .into_iter()
        .filter_map(|hook| {
            Some(FlowRefFigure {
                hook,
                lb: *sum.new_full.get(&hook)?,
                reference: *sum.flow_reference.get(&hook)?,
                slot: *sum.slot_reference.get(&hook)?,
                big_slot: *sum.big_slot_reference.get(&hook)?,
                limit: NEW_FLOW_LIMIT * *sum.reference.get(&hook)?,
            })
        })
        .collect()
}

/// Over-the-floor figures the targets compare.
struct Summary {
    reference: BTreeMap<Hook, f64>,
    /// The minimal DNAT with a flow table, new flows, the table full.
    flow_reference: BTreeMap<Hook, f64>,
    /// The minimal DNAT with a direct-mapped slot table, new flows, the table full.
    slot_reference: BTreeMap<Hook, f64>,
    /// The same with `BIG_SLOTS` times the slots.
    big_slot_reference: BTreeMap<Hook, f64>,
    new_full: BTreeMap<Hook, f64>,
    established: BTreeMap<Hook, f64>,
    pass_service_port: BTreeMap<Hook, f64>,
    /// The new-flow and established targets measured interleaved with their references.
    interleaved: BTreeMap<Hook, Interleaved>,
    /// The conntrack tables' fill after the last row (the interleaved measurement's).
    tables_after: String,
    /// Anything in the set-up that did not go as planned.
    notes: Vec<String>,
}

/// Issue 11's limit for a new flow with full tables: this many times the minimal DNAT of the
/// same hook (over the floor).
const NEW_FLOW_LIMIT: f64 = 2.5;
const NEW_FLOW_TARGET: &str = "new flow, full conntrack <= 2.5x minimal DNAT";
/// Issue 11's limit for an established flow, as `NEW_FLOW_LIMIT`.
const ESTABLISHED_LIMIT: f64 = 1.2;
const ESTABLISHED_TARGET: &str = "established flow <= 1.2x minimal DNAT";

/// The issue-11 targets of one pass.
fn targets(sum: &Summary) -> Vec<TargetFigure> {
    let mut out = Vec::new();
    for hook in [Hook::Tc, Hook::Xdp] {
        let reference = sum.reference.get(&hook).copied().unwrap_or(f64::NAN);
        let figure = |m: &BTreeMap<Hook, f64>| m.get(&hook).copied().unwrap_or(f64::NAN);
        out.push(TargetFigure {
            what: NEW_FLOW_TARGET,
            hook,
            lb: figure(&sum.new_full),
            limit: NEW_FLOW_LIMIT * reference,
        });
        out.push(TargetFigure {
            what: ESTABLISHED_TARGET,
            hook,
            lb: figure(&sum.established),
            limit: ESTABLISHED_LIMIT * reference,
        });
        out.push(TargetFigure {
            what: "pass-through, a Service's port <= +25 ns",
            hook,
            lb: figure(&sum.pass_service_port),
            limit: 25.0,
        });
    }
    out
}

fn render(rows: &[Row], sum: &Summary, runs: &str) -> Result<String> {
    let mut md =
        String::from("## 1b. Per-packet cost, warm (restored frame, tail call), with minimal DNAT references\n\n");
    writeln!(
        md,
        "Method `warm` (top of `bench/src/warm.rs`): a wrapper restores a saved 64-byte frame before every run \
         and tail-calls the program under test, so `repeat` works on programs that rewrite the packet. New-flow \
         rows give every run a new 5-tuple, with valid checksums. The floor is the same wrapper tail-calling the \
         hook's empty program. {runs} The last column is the share of runs that took the path the row names \
         (lb's own counter for it).\n"
    )?;
    md.push_str("| hook | packet | wrapper | conntrack fill | ns/packet | over floor | x minimal DNAT | on path |\n|---|---|---|---|---:|---:|---:|---:|\n");
    for r in rows {
        let over = r.ns - r.floor;
        let ratio = match sum.reference.get(&r.hook) {
            Some(reference) if r.floor != r.ns && *reference > 0.0 => format!("{:.2}x", over / reference),
            _ => String::new(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:+.1} | {} | {} |",
            r.hook.name(),
            r.what,
            r.mode.label(),
            r.tables,
            r.ns,
            over,
            ratio,
            // Rounded down, so that only all runs show as 100%.
            r.on_path.map_or(String::new(), |p| format!("{:.2}%", (p * 10_000.0).floor() / 100.0)),
        )?;
    }
    md.push_str("\nTargets (issue 11), over-the-floor figures of this pass:\n\n| target | hook | lb | limit | met |\n|---|---|---:|---:|---|\n");
    for t in targets(sum) {
        writeln!(
            md,
            "| {} | {} | {:+.1} ns | {:+.1} ns | {} |",
            t.what,
            t.hook.name(),
            t.lb,
            t.limit,
            if t.met() { "yes" } else { "**no**" }
        )?;
    }
    md.push_str(&render_interleaved(sum)?);
    md.push_str(
        "\nA new flow against the least any per-flow state costs here: the minimal DNAT with a flow table, \
         one lookup and one insert into an LRU like lb's, full (lb keeps both directions, so it inserts \
         twice); and with a direct-mapped slot table as large as lb's new-flow table, or 16x larger (more \
         than the caches hold), one read and one write of a slot (no victim to choose, one direction), \
         against the new-flow target's limit:\n\n\
         | hook | lb, new flow, full | reference with a flow table, full | lb / reference | reference with a slot \
         table | the same, 16x | limit (2.5x minimal DNAT) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for FlowRefFigure { hook, lb, reference, slot, big_slot, limit } in flow_ref_figures(sum) {
        writeln!(
            md,
            "| {} | {lb:+.1} ns | {reference:+.1} ns | {:.2}x | {slot:+.1} ns | {big_slot:+.1} ns | {limit:+.1} ns |",
            hook.name(),
            lb / reference,
        )?;
    }
    for n in &sum.notes {
        writeln!(md, "\nNote: {n}")?;
    }
    md.push('\n');
    Ok(md)
}
