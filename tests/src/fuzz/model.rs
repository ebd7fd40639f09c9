//! The userspace model: what the datapath may do with a frame, judged from the frame's bytes,
//! the applied frontends and what the model saw happen to earlier frames. It never reads the
//! datapath's maps and shares no code with it; where the datapath's choice cannot be predicted
//! (which backend a hash picks, which SNAT port), it checks membership and keeps the choice
//! for the rest of the flow, and a tuple's backend for every later choice of it (Maglev: the
//! same slot while the backend set stays, also after the flow's entries were lost).
//!
//! What it holds the datapath to, per program run:
//! - a frame it must leave alone comes out unchanged with the "not mine" verdict;
//! - a rewritten frame differs from its input only in addresses, ports and checksums (and, when
//!   the datapath routes it itself, the TTL and at XDP the MACs); every checksum keeps its
//!   ones' complement residue (so a valid input stays valid and a corrupt one stays corrupt),
//!   and an input with valid checksums comes out accepted by the independent parser;
//! - a client's packet goes to a backend of the frontend it addressed (for the cluster's own
//!   sources at an `externalTrafficPolicy: Local` frontend, of its cluster-wide companion), with
//!   the source the README's rules give (client, node address and a port of the SNAT range, or
//!   the hairpin address), and a flow keeps its backend and source until it is restarted;
//! - a reply goes back from the frontend to the client of a flow that has that backend;
//! - an ICMP error of a tracked flow is translated with it; a refusal quotes the input;
//! - every drop and pass is one the datapath counts, and the counters move accordingly
//!   (`Expect`, checked per batch).
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb_common::{Counter, COUNTER_MAX, SNAT_PORT_MAX, SNAT_PORT_MIN};

use super::{
    wire::{
        be16, classify, datagram_end, ip_at, ones, sum, Frag, IcmpErr, Ip, Kind, Tuple, ACK, ETH, FIN, RST, SYN, TCP,
        UDP,
    },
    world::{World, EXT0_MAC, NEIGHBOUR_MACS},
};
use crate::packet::{try_parse_checked, try_parse_icmp_checked};

/// The two programs the fuzzer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Tc,
    Xdp,
}

impl Hook {
    pub fn index(self) -> usize {
        match self {
            Hook::Tc => 0,
            Hook::Xdp => 1,
        }
    }
}

/// Return values as the kernel reports them.
pub mod verdict {
    /// TC_ACT_UNSPEC (-1): not ours.
    pub const TC_UNSPEC: u32 = u32::MAX;
    pub const TC_OK: u32 = 0;
    pub const TC_SHOT: u32 = 2;
    pub const TC_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
}
use verdict::*;

/// What one program run produced.
pub enum Ran<'a> {
    Out {
        verdict: u32,
        out: &'a [u8],
    },
    /// `BPF_PROG_TEST_RUN` refused the input (errno).
    Refused(i32),
}

type Addr = (Ipv4Addr, u16);
/// A datagram, as RFC 791 names it: source, destination, protocol, identification.
type FragKey = (Ipv4Addr, Ipv4Addr, u8, u16);
/// Counters counted before the outcome of a translation was known, and on its success.
type CounterPair = (Vec<Counter>, Vec<Counter>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Nat {
    backend: Addr,
    /// The client's new source, when it is rewritten.
    snat: Option<Addr>,
}

#[derive(Clone, Debug)]
struct Flow {
    fe: usize,
    client: Addr,
    /// The frontend address and port the client used (a node address for a node port).
    fe_addr: Addr,
    /// `None` while the datapath created the flow but no translation of it was seen yet (its
    /// first packet was dropped after the choice, or left by XDP to tc).
    nat: Option<Nat>,
    fin_fwd: bool,
    fin_rep: bool,
    rst: bool,
    /// A finished flow whose tuple a new connection took over (a SYN-ACK ended its reply
    /// entry, or a new flow took its SNAT port): the datapath forgets it, both entries (the fix
    /// of `a_snat_port_taken_over_from_a_finished_flow_stays_the_new_flows`). The model does not
    /// see every such takeover as the datapath does (at XDP, say), so its next packet may be
    /// tracked or start it anew.
    orphaned: bool,
}

impl Flow {
    /// The flow may be in TIME_WAIT or CLOSE: a SYN may start it anew, a SYN-ACK may end its
    /// reply entry. A superset of when the datapath does either, so the model only gets more
    /// lenient here, never wrong.
    fn finished(&self) -> bool {
        self.rst || (self.fin_fwd && self.fin_rep)
    }

    fn step(&mut self, flags: u8, reply: bool) {
        if flags & RST != 0 {
            self.rst = true;
        } else if flags & FIN != 0 {
            if reply {
                self.fin_rep = true;
            } else {
                self.fin_fwd = true;
            }
        }
    }
}

/// A reply key the datapath holds for a flow (it keeps one per backend a flow ever had).
#[derive(Clone, Copy, Debug)]
struct RevEntry {
    fwd: Tuple,
    /// Written by an earlier incarnation of the flow: may be gone or stale.
    stale: bool,
}

/// Counter expectations per hook: each counter's delta must lie in `lo..=hi`.
#[derive(Clone, Debug)]
pub struct Expect {
    pub lo: [[u64; COUNTER_MAX as usize]; 2],
    pub hi: [[u64; COUNTER_MAX as usize]; 2],
}

impl Default for Expect {
    fn default() -> Self {
        Self { lo: [[0; COUNTER_MAX as usize]; 2], hi: [[0; COUNTER_MAX as usize]; 2] }
    }
}

impl Expect {
    /// One of `alts` happened (each a list of counters incremented once).
    fn add(&mut self, hook: Hook, alts: &[&[Counter]]) {
        let h = hook.index();
        for c in Counter::ALL {
            let n = |alt: &&[Counter]| alt.iter().filter(|&&x| x == c).count() as u64;
            self.lo[h][c as usize] += alts.iter().map(n).min().unwrap_or(0);
            self.hi[h][c as usize] += alts.iter().map(n).max().unwrap_or(0);
        }
    }

    /// Checks counter deltas against the expectations.
    pub fn check(&self, delta: &[[u64; COUNTER_MAX as usize]; 2]) -> Result<(), String> {
        let mut wrong = Vec::new();
        for (h, name) in [(0, "tc"), (1, "xdp")] {
            for c in Counter::ALL {
                let (d, lo, hi) = (delta[h][c as usize], self.lo[h][c as usize], self.hi[h][c as usize]);
                if d < lo || d > hi {
                    wrong.push(format!("{name} {}: moved {d}, expected {lo}..={hi}", c.name()));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    }
}

/// How much of the datapath's bounded maps the model's flows may occupy, so that nothing it
/// relies on is evicted (the driver empties the flow maps when a budget is used up).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub flows: usize,
    pub first_fragments: usize,
    pub pins: usize,
    /// Entries in any one set of IPv4's new-flow table (`LB_CT4_NEW`, whose sets a key's
    /// client side chooses, `lb_common::ct_set_hash`): in `used`, the most the model's flows
    /// may have put in one set; as a limit, the most a set may hold before the next frame,
    /// which may add a flow's two entries.
    pub set_entries: usize,
    /// The table's sets (the same in `used`).
    pub ct_new_sets: u32,
}

impl Budget {
    /// Nothing used yet of a table of `ct_new_sets` sets.
    pub fn unused(ct_new_sets: u32) -> Self {
        Self { flows: 0, first_fragments: 0, pins: 0, set_entries: 0, ct_new_sets }
    }
}

/// What happened, for the report and the coverage check.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub runs: [u64; 2],
    pub passed: [u64; 2],
    pub new_flows: [u64; 2],
    pub tracked: [u64; 2],
    pub replies: [u64; 2],
    pub snat_node: [u64; 2],
    pub hairpin: [u64; 2],
    pub routed: [u64; 2],
    pub deferred: u64,
    pub rejected: u64,
    pub icmp_translated: [u64; 2],
    pub fragments_translated: [u64; 2],
    pub dropped: [u64; 2],
    pub refused: [u64; 2],
    /// Inputs with valid checksums whose rewrite the independent parser checked.
    pub parsed_clean: u64,
    /// Two live flows that share a reply key: one client port used for two frontends with a
    /// common backend (see `Model::clash`).
    pub reply_clashes: u64,
    /// Replies of a reply key two flows wrote whose routing the older flow changed (the
    /// reply-key limit of the README; the SNAT takeover bug did it too before its fix).
    pub clobbered_replies: u64,
    /// SNAT ports handed out while a live flow held them, on a reply key an older flow still
    /// writes: what the SNAT takeover bug did; `Report::fixed_bugs_absent` requires none.
    pub ports_taken_over: u64,
    pub epochs: u64,
    /// New flows of the cluster's own sources at an `externalTrafficPolicy: Local` frontend,
    /// served from its cluster-wide companion entry (the short-circuit).
    pub short_circuit: [u64; 2],
    /// New flows of a tuple chosen before (an earlier epoch or incarnation) that got the same
    /// backend again.
    pub same_backend_again: u64,
}

/// A flow the generator may build replies and ICMP errors for.
#[derive(Clone, Copy, Debug)]
pub struct KnownFlow {
    pub fwd: Tuple,
    pub backend: Addr,
    pub snat: Option<Addr>,
    pub backend_local: bool,
}

pub struct Model {
    pub world: World,
    flows: HashMap<Tuple, Flow>,
    flow_list: Vec<Tuple>,
    replies: HashMap<Tuple, Vec<RevEntry>>,
    /// Session affinity: (client, frontend) -> pinned backend (`None`: pinned, unseen).
    pins: HashMap<(Ipv4Addr, usize), Option<Addr>>,
    /// The backend each tuple's hash chose (kept across epochs: the Maglev tables never change
    /// in a run).
    chosen: HashMap<Tuple, Addr>,
    /// First fragments seen: (source, destination, protocol, id) -> ports, when.
    frags: HashMap<FragKey, (u16, u16, Instant)>,
    /// Flows created without a translation seen.
    pending: Vec<Tuple>,
    /// Map entries the model's flows, fragments and pins may occupy since the last reset.
    pub used: Budget,
    /// Entries the model's flows may have put in each set of `LB_CT4_NEW` since the last
    /// reset (counted when a flow or its reply key appears, never taken back: an over-count
    /// only ends an epoch early).
    set_load: HashMap<u32, usize>,
    pub expect: Expect,
    pub stats: Stats,
    /// Judging tc egress (`judge_after_stack`): a frame tc ingress left to the stack, on its
    /// way out.
    after_stack: bool,
    /// tc ingress just left a backend's reply or an ICMP error about an unSNATed flow to the
    /// stack: the driver runs it through tc egress next (`take_egress_due`).
    egress_due: bool,
}

/// A fragment record older than this may have expired in the datapath (30 s, Linux's
/// reassembly timeout): its later fragments may go either way.
const FRAG_SURE_FOR: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    /// Not ours (tc), or on to the stack (XDP, which does not tell the two apart).
    Pass,
    /// Translated, on to the stack (tc).
    Forward,
    Drop,
    /// Sent out by the program (tc redirect, XDP_TX or redirect).
    Sent,
}

fn act(hook: Hook, v: u32) -> Result<Act, String> {
    Ok(match (hook, v) {
        (Hook::Tc, TC_UNSPEC) | (Hook::Xdp, XDP_PASS) => Act::Pass,
        (Hook::Tc, TC_OK) => Act::Forward,
        (Hook::Tc, TC_SHOT) | (Hook::Xdp, XDP_DROP) => Act::Drop,
        (Hook::Tc, TC_REDIRECT) | (Hook::Xdp, XDP_TX) | (Hook::Xdp, XDP_REDIRECT) => Act::Sent,
        _ => return Err(format!("unexpected verdict {v}")),
    })
}

/// How the model expects a packet to be rewritten.
#[derive(Clone, Copy, Debug)]
struct Rewrite {
    src: Addr,
    dst: Addr,
    /// The datapath routes it itself (its new source is a node address).
    routed: bool,
}

/// An ICMP error's rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IcmpRewrite {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner_src: Addr,
    inner_dst: Addr,
    routed: bool,
}

impl Model {
    pub fn new(world: World, ct_new_sets: u32) -> Self {
        Self {
            world,
            flows: HashMap::new(),
            flow_list: Vec::new(),
            replies: HashMap::new(),
            pins: HashMap::new(),
            chosen: HashMap::new(),
            frags: HashMap::new(),
            pending: Vec::new(),
            used: Budget::unused(ct_new_sets),
            set_load: HashMap::new(),
            expect: Expect::default(),
            stats: Stats::default(),
            after_stack: false,
            egress_due: false,
        }
    }

    /// Whether the frame tc ingress just passed goes on through tc egress (a reply or an ICMP
    /// error the stack forwards, restored there); cleared as it is read.
    pub fn take_egress_due(&mut self) -> bool {
        std::mem::take(&mut self.egress_due)
    }

    /// `judge` for tc egress, run on a frame tc ingress left to the stack (`take_egress_due`).
    pub fn judge_after_stack(&mut self, f: &[u8], ran: Ran) -> Result<(), String> {
        self.after_stack = true;
        let r = self.judge(Hook::Tc, f, ran);
        self.after_stack = false;
        r
    }

    /// Forgets every flow, fragment and pin: the driver emptied the datapath's flow maps.
    pub fn reset_flows(&mut self) {
        self.flows.clear();
        self.flow_list.clear();
        self.replies.clear();
        self.pins.clear();
        self.frags.clear();
        self.pending.clear();
        self.used = Budget::unused(self.used.ct_new_sets);
        self.set_load.clear();
        self.stats.epochs += 1;
    }

    /// A flow whose translation is known, chosen by `pick` (an index).
    pub fn known_flow(&self, pick: usize) -> Option<KnownFlow> {
        if self.flow_list.is_empty() {
            return None;
        }
        let fwd = self.flow_list[pick % self.flow_list.len()];
        let f = self.flows.get(&fwd)?;
        let nat = f.nat?;
        let local =
            self.world.serving(f.fe, f.client.0).backends.iter().any(|b| (b.ip, b.port) == nat.backend && b.local);
        Some(KnownFlow { fwd, backend: nat.backend, snat: nat.snat, backend_local: local })
    }

    fn expect(&mut self, hook: Hook, alts: &[&[Counter]]) {
        self.expect.add(hook, alts);
    }

    /// Judges one program run on `f` and learns from it.
    pub fn judge(&mut self, hook: Hook, f: &[u8], ran: Ran) -> Result<(), String> {
        let h = hook.index();
        self.stats.runs[h] += 1;
        let (v, out) = match ran {
            Ran::Refused(errno) => {
                // The kernel refuses frames the stack could never hand a program: shorter
                // than Ethernet, or an IPv4 or IPv6 frame without a whole IP header.
                let ethertype = if f.len() >= ETH { be16(f, 12) } else { 0 };
                let short = f.len() < ETH
                    || (ethertype == 0x0800 && f.len() < ETH + 20)
                    || (ethertype == 0x86dd && f.len() < ETH + 40);
                if errno == libc::EINVAL && short {
                    self.stats.refused[h] += 1;
                    return Ok(());
                }
                return Err(format!("BPF_PROG_TEST_RUN refused the frame: errno {errno}"));
            }
            Ran::Out { verdict, out } => (verdict, out),
        };
        let a = act(hook, v)?;
        match a {
            Act::Drop => self.stats.dropped[h] += 1,
            Act::Sent => self.stats.routed[h] += 1,
            Act::Pass if out == f => self.stats.passed[h] += 1,
            _ => {}
        }
        match classify(f) {
            Kind::NotIp => self.must_pass(hook, f, a, out, Counter::PassNotIp),
            Kind::Malformed => self.must_pass(hook, f, a, out, Counter::PassMalformed),
            Kind::OtherProto => self.must_pass(hook, f, a, out, Counter::PassOtherProto),
            Kind::L4 { ip, sport, dport, flags, udp_zero } => {
                if ip.frag == Frag::First {
                    self.record_first(&ip, sport, dport);
                }
                let t = Tuple { src: ip.src, sport, dst: ip.dst, dport, proto: ip.proto };
                let l4 = L4 { off: ip.l4_off(), udp_zero };
                self.flow_packet(hook, f, a, out, &ip, t, flags, Some(l4))
            }
            Kind::Later { ip } => {
                let key = (ip.src, ip.dst, ip.proto, ip.id);
                let Some(&(sport, dport, seen)) = self.frags.get(&key) else {
                    return self.must_drop(hook, a, Counter::DropFragNoFirst);
                };
                if seen.elapsed() > FRAG_SURE_FOR && a == Act::Drop {
                    self.expect(hook, &[&[Counter::DropFragNoFirst]]);
                    return Ok(());
                }
                let t = Tuple { src: ip.src, sport, dst: ip.dst, dport, proto: ip.proto };
                // A later fragment neither opens nor closes a connection: an ACK.
                let flags = if ip.proto == TCP { ACK } else { 0 };
                self.flow_packet(hook, f, a, out, &ip, t, flags, None)
            }
            Kind::Icmp(e) => self.icmp(hook, f, a, out, &e),
        }
    }

    fn record_first(&mut self, ip: &Ip, sport: u16, dport: u16) {
        self.frags.insert((ip.src, ip.dst, ip.proto, ip.id), (sport, dport, Instant::now()));
        self.used.first_fragments += 1;
    }

    fn must_pass(&mut self, hook: Hook, f: &[u8], a: Act, out: &[u8], c: Counter) -> Result<(), String> {
        if a != Act::Pass || out != f {
            return Err(format!("must pass unchanged ({}), got {a:?}{}", c.name(), changed(f, out)));
        }
        // tc egress counts no TCP or UDP packet it leaves alone (`host_reply_of`).
        if !self.after_stack {
            self.expect(hook, &[&[c]]);
        }
        Ok(())
    }

    fn must_drop(&mut self, hook: Hook, a: Act, c: Counter) -> Result<(), String> {
        if a != Act::Drop {
            return Err(format!("must be dropped ({}), got {a:?}", c.name()));
        }
        self.expect(hook, &[&[c]]);
        Ok(())
    }

    /// A TCP or UDP packet (or later fragment, `l4` None) with tuple `t` as the datapath sees it.
    #[allow(clippy::too_many_arguments)]
    fn flow_packet(
        &mut self,
        hook: Hook,
        f: &[u8],
        a: Act,
        out: &[u8],
        ip: &Ip,
        t: Tuple,
        flags: u8,
        l4: Option<L4>,
    ) -> Result<(), String> {
        let fe = self.world.frontend(t.dst, t.dport, t.proto);
        let known = self.flows.get(&t).map(|fl| (fl.fe, fl.nat));
        // XDP leaves a packet whose checksum looks CHECKSUM_PARTIAL to tc, before conntrack
        // once the pre-filter says it may be a frontend's (a filter bit can be another
        // key's, so for other packets it may too), after the reply lookup for replies.
        let partial = hook == Hook::Xdp && l4.is_some_and(|l| csum_unsure(f, ip, l));
        if partial && (fe.is_some() || known.is_some()) {
            if a != Act::Pass || out != f {
                return Err(format!("XDP must leave a CHECKSUM_PARTIAL-looking packet to tc, got {a:?}"));
            }
            self.stats.deferred += 1;
            self.expect(hook, &[&[Counter::DeferredToTc]]);
            return Ok(());
        }
        let finished = self.maybe_finished(&t);
        let restart = t.proto == TCP && finished && flags & SYN != 0 && flags & (ACK | RST) == 0;
        let orphaned = self.flows.get(&t).is_some_and(|fl| fl.orphaned);
        match known {
            Some((fe_i, nat)) if restart || orphaned => {
                self.new_flow(hook, f, a, out, ip, t, fe_i, flags, l4, Mode::Restart(nat))
            }
            Some((fe_i, None)) => self.new_flow(hook, f, a, out, ip, t, fe_i, flags, l4, Mode::Unseen),
            Some((_, Some(nat))) => {
                let w = Rewrite {
                    src: nat.snat.unwrap_or((t.src, t.sport)),
                    dst: nat.backend,
                    // SNATed flows (to the node, or hairpin) are routed both ways.
                    routed: nat.snat.is_some(),
                };
                let ok = if l4.is_some() {
                    vec![Counter::FwdTracked]
                } else {
                    vec![Counter::FwdTracked, Counter::FragTranslated]
                };
                let alts = self.outcome(hook, f, a, out, ip, l4, w, &[(vec![], ok)])?;
                self.expect_alts(hook, &alts);
                if translated(a, f, out) {
                    self.stats.tracked[hook.index()] += 1;
                    if l4.is_none() {
                        self.stats.fragments_translated[hook.index()] += 1;
                    }
                }
                self.flows.get_mut(&t).expect("known").step(flags, false);
                Ok(())
            }
            None => match fe {
                Some(fe_i) => self.new_flow(hook, f, a, out, ip, t, fe_i, flags, l4, Mode::New),
                None => self.maybe_reply(hook, f, a, out, ip, t, flags, l4, partial),
            },
        }
    }

    fn expect_alts(&mut self, hook: Hook, alts: &[Vec<Counter>]) {
        let refs: Vec<&[Counter]> = alts.iter().map(|v| v.as_slice()).collect();
        self.expect.add(hook, &refs);
    }

    /// Checks a packet that must be translated by `w`, or dropped or deferred the ways a routed
    /// packet may be. `pairs`: the counters the datapath may have counted, each as (before it
    /// knew the outcome, on success); returns the alternatives that fit what happened.
    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &mut self,
        hook: Hook,
        f: &[u8],
        a: Act,
        out: &[u8],
        ip: &Ip,
        l4: Option<L4>,
        w: Rewrite,
        pairs: &[CounterPair],
    ) -> Result<Vec<Vec<Counter>>, String> {
        let join = |extra: &dyn Fn(&CounterPair) -> Vec<Counter>| -> Vec<Vec<Counter>> {
            pairs.iter().map(|p| [p.0.clone(), extra(p)].concat()).collect()
        };
        // A routed reply whose source is no node address goes to the stack where tc finds no
        // route (`maybe_reply_of`): translated, not routed. Not a hairpin flow's forward
        // packet (its source the hairpin address), which has no such way (`forward_of`).
        let to_stack = a == Act::Forward
            && w.routed
            && hook == Hook::Tc
            && !self.world.is_node_addr(w.src.0)
            && w.src.0 != self.world.hairpin;
        let w = if to_stack { Rewrite { routed: false, ..w } } else { w };
        let alts = match (a, w.routed, hook) {
            (Act::Forward, false, Hook::Tc) | (Act::Sent, true, _) => {
                check_nat(hook, f, out, ip, l4, w)?;
                self.note_clean(f, ip, l4);
                let routed = a == Act::Sent;
                join(&|p| if routed { [p.1.clone(), vec![Counter::Routed]].concat() } else { p.1.clone() })
            }
            (Act::Pass, false, Hook::Xdp) if out != f => {
                check_nat(hook, f, out, ip, l4, w)?;
                self.note_clean(f, ip, l4);
                join(&|p| p.1.clone())
            }
            // Routed: no route (tc), or none XDP can use (no neighbour, a device it may not
            // send to, too big): tc drops, XDP leaves it to tc. TTL 1 is dropped once routed.
            (Act::Drop, true, Hook::Tc) => {
                let mut v = join(&|_| vec![Counter::DropNoRoute]);
                if ip.ttl <= 1 {
                    v.extend(join(&|_| vec![Counter::DropTtlExpired]));
                }
                v
            }
            (Act::Pass, true, Hook::Xdp) if out == f => {
                self.stats.deferred += 1;
                join(&|_| vec![Counter::DeferredToTc])
            }
            (Act::Drop, true, Hook::Xdp) if ip.ttl <= 1 => join(&|_| vec![Counter::DropTtlExpired]),
            _ => {
                return Err(format!(
                    "must be translated to {}:{} -> {}:{}{}, got {a:?}{}",
                    w.src.0,
                    w.src.1,
                    w.dst.0,
                    w.dst.1,
                    if w.routed { " and routed" } else { "" },
                    changed(f, out)
                ))
            }
        };
        Ok(alts)
    }

    fn note_clean(&mut self, f: &[u8], ip: &Ip, l4: Option<L4>) {
        if clean(f, ip, l4) {
            self.stats.parsed_clean += 1;
        }
    }

    /// A packet to frontend `fe_i` that takes the datapath's new-flow path: untracked
    /// (`Mode::New`), a SYN that may restart a finished flow, or a flow the datapath created
    /// without the model seeing its translation (it tracks it; the model learns it now).
    #[allow(clippy::too_many_arguments)]
    fn new_flow(
        &mut self,
        hook: Hook,
        f: &[u8],
        a: Act,
        out: &[u8],
        ip: &Ip,
        t: Tuple,
        fe_i: usize,
        flags: u8,
        l4: Option<L4>,
        mode: Mode,
    ) -> Result<(), String> {
        let served = self.world.serving(fe_i, t.src);
        let short_circuit = !std::ptr::eq(served, &self.world.frontends[fe_i]);
        let fe = served.clone();
        let h = hook.index();
        if mode == Mode::New {
            if !fe.admits(t.src) {
                return self.must_drop(hook, a, Counter::DropSourceRange);
            }
            if fe.backends.is_empty() {
                if fe.local_only {
                    return self.must_drop(hook, a, Counter::DropNoLocalBackend);
                }
                let Some(l4) = l4 else {
                    // Its first fragment was refused already; nothing to quote.
                    return self.must_drop(hook, a, Counter::RejectNoBackend);
                };
                return self.refuse(hook, f, a, out, ip, l4);
            }
        }
        let chooses = mode != Mode::Unseen;
        let pinned = if fe.affinity && chooses { self.pins.get(&(t.src, fe_i)).copied() } else { None };
        // Counted by the choice itself, before the outcome: an affinity hit (certain for a
        // seen pin, unknown for a pin made unseen).
        let hits: Vec<Vec<Counter>> = match pinned {
            Some(Some(_)) => vec![vec![Counter::AffinityHit]],
            Some(None) => vec![vec![], vec![Counter::AffinityHit]],
            None => vec![vec![]],
        };
        // A remote backend of an external frontend whose policy is Cluster, or of a ClusterIP
        // reached from outside the cluster (README, "North-south").
        let off_cluster = self.world.snat_off_cluster && !self.world.is_local_source(t.src);
        let needs_node_snat = |b: &super::world::Backend| {
            b.ip != t.src && !b.local && if fe.external { !fe.local_only } else { off_cluster }
        };
        let frag: Vec<Counter> = if l4.is_none() { vec![Counter::FragTranslated] } else { vec![] };
        if !translated(a, f, out) {
            // Dropped or left to tc after the choice: only a routed choice can be (SNATed to
            // the node, or hairpin).
            if !fe.backends.iter().any(|b| needs_node_snat(b) || b.ip == t.src) {
                return Err(format!("a packet to {} must be translated, got {a:?}{}", fe.name, changed(f, out)));
            }
            let mut pairs = Vec::new();
            match mode {
                Mode::Unseen => pairs.push((vec![], vec![])),
                Mode::New => {
                    pairs.extend(hits.iter().map(|hv| ([hv.clone(), vec![Counter::FwdSnat]].concat(), vec![])))
                }
                Mode::Restart(_) => {
                    pairs.push((vec![], vec![]));
                    pairs.extend(hits.iter().map(|hv| ([hv.clone(), vec![Counter::FwdSnat]].concat(), vec![])));
                }
            }
            // Any address on the routed path will do for the verdict check.
            let w = Rewrite { src: (self.world.node_ip, 0), dst: (t.dst, t.dport), routed: true };
            let alts = self.outcome(hook, f, a, out, ip, l4, w, &pairs)?;
            self.expect_alts(hook, &alts);
            match mode {
                Mode::New => {
                    self.add_flow(t, fe_i, None)?;
                    if fe.affinity && pinned.is_none() {
                        self.pins.insert((t.src, fe_i), None);
                        self.used.pins += 1;
                    }
                }
                Mode::Restart(_) => {
                    // Restarted or not: which translation it has is not known any more.
                    self.unresolve(t);
                }
                Mode::Unseen => {}
            }
            self.flows.get_mut(&t).expect("known").step(flags, false);
            return Ok(());
        }
        if out.len() < ETH + 20 {
            return Err(format!("translated output of {} bytes", out.len()));
        }
        let b_ip = ip_at(out, ETH + 16);
        let b_port = match l4 {
            Some(l) if out.len() >= l.off + 4 => be16(out, l.off + 2),
            _ => t.dport,
        };
        let Some(backend) = fe.backends.iter().find(|b| b.ip == b_ip && (l4.is_none() || b.port == b_port)).copied()
        else {
            return Err(format!(
                "misroute: a packet to {} ({}:{}) was sent to {b_ip}:{b_port}, not to one of its backends {:?}",
                fe.name, t.dst, t.dport, fe.backends
            ));
        };
        if l4.is_none() && mode == Mode::New {
            return Err(format!("a later fragment of an untracked flow to {} was translated", fe.name));
        }
        if let Some(Some(p)) = pinned {
            if p != (backend.ip, backend.port) {
                return Err(format!(
                    "affinity: client {} is pinned to {}:{} at {}, a new connection went to {}:{}",
                    t.src, p.0, p.1, fe.name, backend.ip, backend.port
                ));
            }
        }
        // Chosen by the Maglev table, not by a pin: the tuple's slot, so the same backend as
        // every earlier choice for this tuple, also after the flow tables were emptied (a
        // flow whose entries were lost maps back to its backend; the backend sets never change
        // here).
        if chooses && pinned.is_none() {
            let b = (backend.ip, backend.port);
            match self.chosen.get(&t) {
                Some(&before) if before != b => {
                    return Err(format!(
                        "misroute: {t} went to {}:{} at {} after it had gone to {}:{} (the same Maglev slot, no backend \
                         change)",
                        b.0, b.1, fe.name, before.0, before.1
                    ));
                }
                Some(_) => self.stats.same_backend_again += 1,
                None => {
                    self.chosen.insert(t, b);
                }
            }
        }
        let hairpin = backend.ip == t.src;
        let node_snat = needs_node_snat(&backend);
        let src = if hairpin {
            (self.world.hairpin, t.sport)
        } else if node_snat {
            // A later fragment shows no ports: its SNAT port stays unknown.
            let s = (ip_at(out, ETH + 12), l4.map(|l| be16(out, l.off)).unwrap_or(SNAT_PORT_MIN));
            if s.0 != self.world.node_ip || !(SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.1) {
                return Err(format!(
                    "an external flow to the remote backend {}:{} of {} must be SNATed to {} and a port in {SNAT_PORT_MIN}..={SNAT_PORT_MAX}, got {}:{}",
                    backend.ip, backend.port, fe.name, self.world.node_ip, s.0, s.1
                ));
            }
            s
        } else {
            (t.src, t.sport)
        };
        let snat = (hairpin || node_snat).then_some(src);
        let nat = Nat { backend: (backend.ip, backend.port), snat };
        let w = Rewrite { src, dst: nat.backend, routed: node_snat || hairpin };
        let snat_c: Vec<Counter> = if snat.is_some() { vec![Counter::FwdSnat] } else { vec![] };
        let new_pairs: Vec<CounterPair> = hits
            .iter()
            .map(|hv| ([hv.clone(), snat_c.clone()].concat(), [vec![Counter::FwdNewFlow], frag.clone()].concat()))
            .collect();
        let tracked_pair = (vec![], [vec![Counter::FwdTracked], frag.clone()].concat());
        let pairs = match mode {
            Mode::Unseen => vec![tracked_pair],
            Mode::New => new_pairs,
            // A later fragment shows no SNAT port: the same backend and address may be tracking.
            Mode::Restart(old)
                if old.is_none_or(|o| {
                    o == nat || l4.is_none() && o.backend == nat.backend && o.snat.map(|s| s.0) == nat.snat.map(|s| s.0)
                }) =>
            {
                [vec![tracked_pair], new_pairs].concat()
            }
            Mode::Restart(_) => new_pairs,
        };
        let alts = self.outcome(hook, f, a, out, ip, l4, w, &pairs)?;
        self.expect_alts(hook, &alts);
        match mode {
            Mode::Unseen => {
                self.stats.tracked[h] += 1;
                // A later fragment shows no ports: the flow's translation stays unseen.
                if l4.is_some() {
                    self.resolve(t, nat)?;
                }
            }
            Mode::New => {
                self.stats.new_flows[h] += 1;
                self.add_flow(t, fe_i, Some(nat))?;
            }
            Mode::Restart(_) if l4.is_none() => {
                // A later fragment of an orphaned flow shows no ports: tracked or started anew
                // (with which SNAT port?), its translation is unknown again.
                self.unresolve(t);
            }
            Mode::Restart(old) => {
                self.stats.new_flows[h] += 1;
                // Another translation than the flow had: it did start anew. The same one, or
                // one the model never saw: it may have, or not, so it stays finished (which
                // only makes the model more lenient).
                if old.is_some_and(|o| o != nat) {
                    let fl = self.flows.get_mut(&t).expect("known");
                    (fl.fin_fwd, fl.fin_rep, fl.rst, fl.orphaned) = (false, false, false, false);
                }
                if old != Some(nat) {
                    self.used.flows += 1;
                    self.load_flow(t);
                    self.resolve(t, nat)?;
                }
            }
        }
        if hairpin {
            self.stats.hairpin[h] += 1;
        }
        if short_circuit {
            self.stats.short_circuit[h] += 1;
        }
        if node_snat {
            self.stats.snat_node[h] += 1;
        }
        if l4.is_none() {
            self.stats.fragments_translated[h] += 1;
        }
        if fe.affinity && chooses {
            if !matches!(pinned, Some(Some(_))) {
                self.used.pins += 1;
            }
            self.pins.insert((t.src, fe_i), Some(nat.backend));
        }
        self.flows.get_mut(&t).expect("known").step(flags, false);
        Ok(())
    }

    /// The flow may be finished in the datapath: it is (see `Flow::finished`), or its reply key
    /// is shared with another flow, whose packets write their state into it and through it
    /// into this flow's forward entry (the reply-key limit of the README, see `Model::clash`).
    fn maybe_finished(&self, t: &Tuple) -> bool {
        let Some(fl) = self.flows.get(t) else { return false };
        fl.finished() || fl.nat.is_some_and(|nat| self.replies.get(&reply_key(*t, nat)).is_some_and(|l| l.len() > 1))
    }

    /// The flow's translation is unknown again (it may have restarted unseen).
    fn unresolve(&mut self, t: Tuple) {
        if let Some(old) = self.flows.get(&t).and_then(|fl| fl.nat) {
            let key = reply_key(t, old);
            self.mark_stale(&key, t);
        }
        if let Some(fl) = self.flows.get_mut(&t) {
            fl.nat = None;
        }
        if !self.pending.contains(&t) {
            self.pending.push(t);
        }
    }

    /// Records a flow the datapath created; `nat` None when its translation was not seen.
    fn add_flow(&mut self, t: Tuple, fe: usize, nat: Option<Nat>) -> Result<(), String> {
        let flow = Flow {
            fe,
            client: (t.src, t.sport),
            fe_addr: (t.dst, t.dport),
            nat: None,
            fin_fwd: false,
            fin_rep: false,
            rst: false,
            orphaned: false,
        };
        if !self.flows.contains_key(&t) {
            self.flow_list.push(t);
        }
        self.flows.insert(t, flow);
        self.used.flows += 1;
        self.load_flow(t);
        match nat {
            Some(nat) => self.resolve(t, nat),
            None => {
                self.pending.push(t);
                Ok(())
            }
        }
    }

    /// Counts an entry of the new-flow table under `key` (its set, `lb_common::ct_set_hash`).
    fn load_set(&mut self, key: Tuple, dir: u8) {
        let ip = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let h = lb_common::ct_set_hash(ip(key.src), ip(key.dst), key.sport.to_be(), key.dport.to_be(), key.proto, dir);
        let set = lb_common::select_slot(h, self.used.ct_new_sets.max(1));
        let load = self.set_load.entry(set).or_default();
        *load += 1;
        self.used.set_entries = self.used.set_entries.max(*load);
    }

    /// A flow's forward entry, counted in its set; its reply entry is counted where it goes once
    /// the translation is known (`resolve`), and meanwhile stands for an entry of any set
    /// (`unplaced`).
    fn load_flow(&mut self, t: Tuple) {
        self.load_set(t, lb_common::CT_DIR_FORWARD);
    }

    /// Entries the datapath may hold in a set the model cannot name: a reply entry of each flow
    /// whose translation is unknown.
    pub fn unplaced(&self) -> usize {
        self.pending.len()
    }

    /// The flow `t` is now known to translate by `nat`: its reply key maps back to it.
    fn resolve(&mut self, t: Tuple, nat: Nat) -> Result<(), String> {
        self.load_set(reply_key(t, nat), lb_common::CT_DIR_REPLY);
        let old = self.flows.get(&t).and_then(|f| f.nat);
        self.flows.get_mut(&t).expect("known").nat = Some(nat);
        self.pending.retain(|p| *p != t);
        let key = reply_key(t, nat);
        if let Some(old) = old {
            let old_key = reply_key(t, old);
            if old_key != key {
                for e in self.replies.get_mut(&old_key).into_iter().flatten() {
                    if e.fwd == t {
                        e.stale = true;
                    }
                }
            }
        }
        let list = self.replies.entry(key).or_default();
        // Written by two flows before (one of them stale, or this flow's earlier incarnation).
        let contested = list.len() > 1;
        let mut clash = None;
        let mut taken = Vec::new();
        for e in list.iter() {
            if e.fwd == t || e.stale {
                continue;
            }
            match self.flows.get(&e.fwd) {
                Some(other) if !other.finished() => clash = Some(e.fwd),
                Some(_) => taken.push(e.fwd),
                None => {}
            }
        }
        // The SNAT port of a finished flow, taken by a new one.
        if nat.snat.is_some() && t.proto == TCP {
            for fwd in taken {
                self.flows.get_mut(&fwd).expect("known").orphaned = true;
            }
        }
        let list = self.replies.get_mut(&key).expect("just made");
        list.retain(|e| e.fwd != t);
        list.push(RevEntry { fwd: t, stale: false });
        if let Some(other) = clash {
            if contested && nat.snat.is_some() {
                // What the SNAT takeover bug did (`a_snat_port_taken_over_from_a_finished_flow_stays_the_new_flows`,
                // fixed): a flow whose reply entry a SYN-ACK removed kept its forward entry; once
                // a new flow took its port, its packets wrote their state into the new flow's
                // reply entry (a CLOSE that the next SYN-ACK removed, freeing the port while the
                // new flow lived) or re-created their own (naming their client, so a restart
                // took the port back). Counted, and `Report::fixed_bugs_absent` fails the run.
                self.stats.ports_taken_over += 1;
                return Ok(());
            }
            self.clash(t, other, key, nat)?;
        }
        Ok(())
    }

    /// Two live flows now write the same reply key, so replies of the older one come back
    /// as the newer one's. The datapath keys reply entries on (backend, client address and
    /// port): one client port used for two frontends that share a backend meets here, a
    /// limit netfilter avoids by moving the second flow's source port (`nf_nat_used_tuple`).
    /// That case is counted and both translations are accepted; a SNAT port handed out while
    /// another client's live flow holds it is a misroute.
    fn clash(&mut self, t: Tuple, other: Tuple, key: Tuple, nat: Nat) -> Result<(), String> {
        let same_client = self.flows.get(&other).is_some_and(|o| o.client == (t.src, t.sport));
        if nat.snat.is_some_and(|s| self.world.is_node_addr(s.0)) && !same_client {
            return Err(format!(
                "misroute: SNAT port {} towards {}:{} given to {t} while the live flow {other} holds it (reply key {key})",
                nat.snat.expect("snat").1,
                nat.backend.0,
                nat.backend.1
            ));
        }
        self.stats.reply_clashes += 1;
        Ok(())
    }

    /// Moves the TCP state of every flow a reply with tuple `t` may belong to.
    fn step_replies(&mut self, t: &Tuple, flags: u8) {
        let fwds: Vec<Tuple> = self.replies.get(t).into_iter().flatten().map(|e| e.fwd).collect();
        for fwd in fwds {
            if let Some(fl) = self.flows.get_mut(&fwd) {
                fl.step(flags, true);
            }
        }
    }

    /// A packet to no frontend: a backend's reply of a tracked flow, or none of ours.
    #[allow(clippy::too_many_arguments)]
    fn maybe_reply(
        &mut self,
        hook: Hook,
        f: &[u8],
        a: Act,
        out: &[u8],
        ip: &Ip,
        t: Tuple,
        flags: u8,
        l4: Option<L4>,
        partial: bool,
    ) -> Result<(), String> {
        let h = hook.index();
        let pass_c = pass_counter(ip);
        if !self.after_stack && t.dst != self.world.node_ip && t.dst != self.world.hairpin {
            // To no address flows are SNATed to: left untouched to the stack, unlooked-up, and
            // restored by tc egress after it, which the driver runs next.
            self.egress_due = hook == Hook::Tc;
            return self.must_pass(hook, f, a, out, pass_c);
        }
        let after_stack = self.after_stack;
        let entries: Vec<RevEntry> = self.replies.get(&t).cloned().unwrap_or_default();
        // What each flow with this reply key turns the reply into, and whether its entry is
        // sure to be there.
        let mut cands: Vec<(Tuple, Rewrite, bool)> = Vec::new();
        for e in &entries {
            let flow = &self.flows[&e.fwd];
            let snat = (t.dst, t.dport) != flow.client;
            // Routed: the reply of a flow SNATed (to the node, or hairpin); never at egress.
            let w = Rewrite {
                src: flow.fe_addr,
                dst: if snat { flow.client } else { (t.dst, t.dport) },
                routed: snat && !after_stack,
            };
            cands.push((e.fwd, w, !e.stale && !flow.finished() && entries.len() == 1));
        }
        // A key two flows wrote (the reply-key limit, see `Model::clash`): the older one's
        // packets still write their state and flags into it, so whether it is routed, or
        // there at all, is not known.
        let shared = entries.len() > 1;
        // Flows created unseen may own this reply key too.
        for p in &self.pending {
            let flow = &self.flows[p];
            if p.proto != t.proto || !self.world.serving(flow.fe, flow.client.0).has_backend(t.src, t.sport) {
                continue;
            }
            let (d, dp) = (t.dst, t.dport);
            let direct = (d, dp) == flow.client;
            let hairpin = d == self.world.hairpin && dp == flow.client.1 && t.src == flow.client.0;
            let node = d == self.world.node_ip && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&dp);
            if direct || hairpin || node {
                let w = Rewrite { src: flow.fe_addr, dst: flow.client, routed: !direct && !after_stack };
                cands.push((*p, w, false));
            }
        }
        if cands.is_empty() {
            // The pre-filter may still send it through the reply lookup; nothing is found.
            if partial && a == Act::Pass && out == f && !after_stack {
                self.expect(hook, &[&[pass_c]]);
                return Ok(());
            }
            return self.must_pass(hook, f, a, out, pass_c);
        }
        let must = cands.iter().any(|c| c.2);
        let routed = cands.iter().any(|c| c.1.routed);
        self.step_replies(&t, flags);
        if a == Act::Pass && out == f {
            if must && (hook == Hook::Tc || !(routed || partial || shared)) {
                let c = cands.iter().find(|c| c.2).expect("must");
                return Err(format!(
                    "a reply of the tracked flow {} must be translated to {}:{} -> {}:{}, it passed unchanged ({:?})",
                    c.0, c.1.src.0, c.1.src.1, c.1.dst.0, c.1.dst.1, self.flows[&c.0]
                ));
            }
            match hook {
                // tc egress counts nothing it leaves alone (`host_reply_of`).
                Hook::Tc if after_stack => {}
                Hook::Tc => self.expect(hook, &[&[pass_c]]),
                Hook::Xdp if must => {
                    self.stats.deferred += 1;
                    self.expect(hook, &[&[Counter::DeferredToTc]]);
                }
                Hook::Xdp => self.expect(hook, &[&[pass_c], &[Counter::DeferredToTc]]),
            }
            // A SYN-ACK of a finished flow ends it, both entries.
            for e in &entries {
                if self.flows.get(&e.fwd).is_some_and(|fl| fl.finished()) {
                    self.mark_stale(&t, e.fwd);
                    if t.proto == TCP && flags & (SYN | ACK) == SYN | ACK {
                        self.flows.get_mut(&e.fwd).expect("known").orphaned = true;
                    }
                }
            }
            return Ok(());
        }
        if a == Act::Drop {
            let ok = !after_stack && (routed || shared) && (hook == Hook::Tc || ip.ttl <= 1);
            if !ok {
                return Err(format!("a reply of {} was dropped", cands[0].0));
            }
            let mut alts = vec![vec![Counter::DropTtlExpired]];
            if hook == Hook::Tc {
                alts.push(vec![Counter::DropNoRoute]);
            }
            self.expect_alts(hook, &alts);
            return Ok(());
        }
        // Translated: it must be what one of the candidates makes of it.
        let mut ok = vec![Counter::ReplyTranslated];
        if l4.is_none() {
            ok.push(Counter::FragTranslated);
        }
        let mut errors = Vec::new();
        let variants: Vec<(Tuple, Rewrite)> = cands
            .iter()
            .flat_map(|&(fwd, w, _)| {
                let flipped = Rewrite { routed: !w.routed, ..w };
                std::iter::once((fwd, w)).chain((shared && !after_stack).then_some((fwd, flipped)))
            })
            .collect();
        for (i, (fwd, w)) in variants.iter().enumerate() {
            match self.outcome(hook, f, a, out, ip, l4, *w, &[(vec![], ok.clone())]) {
                Ok(alts) => {
                    if shared && i % 2 == 1 {
                        self.stats.clobbered_replies += 1;
                    }
                    self.expect_alts(hook, &alts);
                    if self.pending.contains(fwd) {
                        let flow = &self.flows[fwd];
                        let snat = ((t.dst, t.dport) != flow.client).then_some((t.dst, t.dport));
                        self.resolve(*fwd, Nat { backend: (t.src, t.sport), snat })?;
                    }
                    self.stats.replies[h] += 1;
                    if l4.is_none() {
                        self.stats.fragments_translated[h] += 1;
                    }
                    return Ok(());
                }
                Err(e) => errors.push(format!("as a reply of {fwd}: {e}")),
            }
        }
        let known: Vec<String> =
            entries.iter().map(|e| format!("{}{}", e.fwd, if e.stale { " (stale)" } else { "" })).collect();
        Err(format!(
            "misroute: a reply translated as no flow it may belong to (flows with its reply key: {}): {}",
            known.join(", "),
            errors.join("; ")
        ))
    }

    fn mark_stale(&mut self, key: &Tuple, fwd: Tuple) {
        for e in self.replies.get_mut(key).into_iter().flatten() {
            if e.fwd == fwd {
                e.stale = true;
            }
        }
    }

    /// tc answers a new connection to a frontend without backends with ICMP port unreachable
    /// (README, "No ready endpoints"); XDP leaves it to tc.
    fn refuse(&mut self, hook: Hook, f: &[u8], a: Act, out: &[u8], ip: &Ip, l4: L4) -> Result<(), String> {
        if hook == Hook::Xdp {
            if a != Act::Pass || out != f {
                return Err(format!("XDP must leave a refusal to tc, got {a:?}{}", changed(f, out)));
            }
            return Ok(());
        }
        let want = reject_frame(f, ip, l4);
        match (a, want) {
            (Act::Sent, Some(want)) if same_refusal(out, &want) => {
                if ip.ihl == 20 && ip.tot_len + ETH == f.len() && super::wire::ip_residue(f, 20) == 0 {
                    try_parse_icmp_checked(out).map_err(|e| format!("the refusal does not parse: {e}"))?;
                }
                self.stats.rejected += 1;
                self.expect(hook, &[&[Counter::RejectNoBackend]]);
                Ok(())
            }
            (Act::Drop, None) => {
                self.expect(hook, &[&[Counter::RejectNoBackend]]);
                Ok(())
            }
            (_, want) => Err(format!(
                "must be refused with {}, got {a:?} {}",
                want.map(|w| format!("ICMP port unreachable {}", super::wire::hex(&w))).unwrap_or("a drop".into()),
                super::wire::hex(out)
            )),
        }
    }

    /// An ICMP error: translated with the tracked flow it quotes (README, "ICMP errors").
    fn icmp(&mut self, hook: Hook, f: &[u8], a: Act, out: &[u8], e: &IcmpErr) -> Result<(), String> {
        let h = hook.index();
        let q = e.quote;
        let outer_src = e.ip.src;
        // The quote as a packet towards a backend: the error goes to the client.
        let rkey = Tuple { src: q.dst, sport: q.dport, dst: q.src, dport: q.sport, proto: q.proto };
        let mut cands: Vec<(IcmpRewrite, bool)> = Vec::new();
        let entries = self.replies.get(&rkey).cloned().unwrap_or_default();
        // A key two flows wrote may have had its routing changed (see `maybe_reply`).
        let shared = entries.len() > 1;
        // An entry of an unSNATed flow: the datapath leaves the error to the stack at
        // ingress (its destination is the client's own), unlooked-further.
        let mut left_sure = false;
        let mut left = false;
        for entry in entries {
            let flow = &self.flows[&entry.fwd];
            let snat = (q.src, q.sport) != flow.client;
            if !snat && !self.after_stack {
                left = true;
                left_sure |= !entry.stale && !flow.finished() && !shared;
                continue;
            }
            let from_backend = outer_src == q.dst;
            let new_outer_src = if from_backend { flow.fe_addr.0 } else { outer_src };
            cands.push((
                IcmpRewrite {
                    outer_src: new_outer_src,
                    outer_dst: if snat { flow.client.0 } else { e.ip.dst },
                    inner_src: if snat { flow.client } else { (q.src, q.sport) },
                    inner_dst: flow.fe_addr,
                    // As the flow's replies (`maybe_reply`), whoever sent it: SNATed, routed.
                    routed: snat,
                },
                !entry.stale && !flow.finished() && !shared,
            ));
            if shared {
                let (w, _) = *cands.last().expect("just pushed");
                cands.push((IcmpRewrite { routed: !w.routed, ..w }, false));
            }
        }
        // Flows created unseen may own the reply key (their SNAT port, their backend).
        let mut pending_cands: Vec<(Tuple, IcmpRewrite, Nat)> = Vec::new();
        for p in &self.pending {
            let flow = &self.flows[p];
            if p.proto != q.proto || !self.world.serving(flow.fe, flow.client.0).has_backend(q.dst, q.dport) {
                continue;
            }
            let direct = (q.src, q.sport) == flow.client;
            let hairpin = q.src == self.world.hairpin && q.sport == flow.client.1 && q.dst == flow.client.0;
            let node = q.src == self.world.node_ip && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&q.sport);
            if direct && !self.after_stack {
                // Left to the stack at ingress, as the datapath finds it unSNATed.
                left = true;
                continue;
            }
            if !(direct || hairpin || node) {
                continue;
            }
            let from_backend = outer_src == q.dst;
            let new_outer_src = if from_backend { flow.fe_addr.0 } else { outer_src };
            let w = IcmpRewrite {
                outer_src: new_outer_src,
                outer_dst: if direct { e.ip.dst } else { flow.client.0 },
                inner_src: flow.client,
                inner_dst: flow.fe_addr,
                routed: !direct,
            };
            let nat = Nat { backend: (q.dst, q.dport), snat: (!direct).then_some((q.src, q.sport)) };
            pending_cands.push((*p, w, nat));
        }
        // The reply-side entry may be gone: the quote may then match the forward side.
        if left {
            // Left to the stack (surely, or maybe): tc egress sees it next.
            self.egress_due = hook == Hook::Tc;
        }
        if left_sure {
            return self.must_pass(hook, f, a, out, Counter::PassNotService);
        }
        let reply_sure = cands.iter().any(|c| c.1);
        let fkey = rkey;
        let mut uncertain = !self.pending.is_empty() || left;
        if !reply_sure {
            if let Some(flow) = self.flows.get(&fkey) {
                match flow.nat {
                    Some(nat) => {
                        let from_client = outer_src == q.dst;
                        // Routed as the flow's packets are: SNATed (to the node, or hairpin).
                        let node = nat.snat.is_some();
                        let new_outer_src = match nat.snat {
                            Some(s) if from_client => s.0,
                            _ => outer_src,
                        };
                        cands.push((
                            IcmpRewrite {
                                outer_src: new_outer_src,
                                outer_dst: nat.backend.0,
                                inner_src: nat.backend,
                                inner_dst: nat.snat.unwrap_or((q.dst, q.dport)),
                                routed: node,
                            },
                            // Unless an unSNATed entry under the reply key may still be there.
                            !flow.orphaned && !left,
                        ));
                    }
                    None => uncertain = true,
                }
            }
        }
        let must = cands.iter().any(|c| c.1);
        let routed = cands.iter().any(|c| c.0.routed) || pending_cands.iter().any(|p| p.1.routed);
        if a == Act::Pass && out == f {
            if must && (hook == Hook::Tc || !routed) {
                return Err(format!(
                    "an ICMP error quoting the tracked flow {q} must be translated to {:?}, it passed unchanged",
                    cands.iter().find(|c| c.1).expect("must").0
                ));
            }
            if hook == Hook::Xdp && routed {
                self.expect(hook, &[&[Counter::PassNotService], &[Counter::DeferredToTc]]);
            } else {
                self.expect(hook, &[&[Counter::PassNotService]]);
            }
            return Ok(());
        }
        if cands.is_empty() && !uncertain {
            return Err(format!("an ICMP error quoting {q}, which no flow has, was not left alone: {a:?}"));
        }
        if a == Act::Drop {
            if !(routed || uncertain) || (hook == Hook::Xdp && e.ip.ttl > 1) {
                return Err(format!("an ICMP error quoting {q} was dropped"));
            }
            let mut alts = vec![vec![Counter::DropTtlExpired]];
            if hook == Hook::Tc {
                alts.push(vec![Counter::DropNoRoute]);
            }
            self.expect_alts(hook, &alts);
            return Ok(());
        }
        let mut errors = Vec::new();
        // As a reply's (`outcome`): a routed error whose source is no node address goes to the
        // stack where tc finds no route.
        let to_stack = |w: &IcmpRewrite| {
            if a == Act::Forward && w.routed && hook == Hook::Tc && !self.world.is_node_addr(w.outer_src) {
                IcmpRewrite { routed: false, ..*w }
            } else {
                *w
            }
        };
        for (w, _) in &cands {
            match check_icmp(hook, a, f, out, e, &to_stack(w)) {
                Ok(()) => {
                    let c: &[Counter] = if a == Act::Sent {
                        &[Counter::IcmpTranslated, Counter::Routed]
                    } else {
                        &[Counter::IcmpTranslated]
                    };
                    self.expect(hook, &[c]);
                    self.stats.icmp_translated[h] += 1;
                    return Ok(());
                }
                Err(err) => errors.push(err),
            }
        }
        for (p, w, nat) in &pending_cands {
            if check_icmp(hook, a, f, out, e, &to_stack(w)).is_ok() {
                let c: &[Counter] = if a == Act::Sent {
                    &[Counter::IcmpTranslated, Counter::Routed]
                } else {
                    &[Counter::IcmpTranslated]
                };
                self.expect(hook, &[c]);
                self.stats.icmp_translated[h] += 1;
                // Its translation is now known.
                return self.resolve(*p, *nat);
            }
        }
        if uncertain && errors.is_empty() {
            // Only flows the model saw created but not translated could match: it cannot say
            // more than that the checksums must hold.
            check_icmp_checksums(f, out, e)?;
            let c: &[Counter] =
                if a == Act::Sent { &[Counter::IcmpTranslated, Counter::Routed] } else { &[Counter::IcmpTranslated] };
            self.expect(hook, &[c]);
            return Ok(());
        }
        Err(format!("ICMP error quoting {q} translated wrongly: {}", errors.join("; ")))
    }
}

/// How a packet reaches the new-flow path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// No flow of the model's covers it.
    New,
    /// A SYN on a finished flow (with this translation, if seen): the datapath may start it
    /// anew.
    Restart(Option<Nat>),
    /// The datapath created its flow unseen and tracks it.
    Unseen,
}

fn translated(a: Act, f: &[u8], out: &[u8]) -> bool {
    matches!(a, Act::Forward | Act::Sent) || (a == Act::Pass && out != f)
}

#[derive(Clone, Copy, Debug)]
struct L4 {
    off: usize,
    udp_zero: bool,
}

/// The key the datapath finds a flow's replies by: from the backend to the client's source
/// as the backend saw it.
fn reply_key(t: Tuple, nat: Nat) -> Tuple {
    let (dst, dport) = nat.snat.unwrap_or((t.src, t.sport));
    Tuple { src: nat.backend.0, sport: nat.backend.1, dst, dport, proto: t.proto }
}

fn pass_counter(ip: &Ip) -> Counter {
    if ip.frag == Frag::Whole {
        Counter::PassNotService
    } else {
        Counter::PassFragment
    }
}

/// The L4 checksum field holds the pseudo-header sum, as a CHECKSUM_PARTIAL skb's does
/// (README, "CHECKSUM_PARTIAL at XDP").
fn csum_unsure(f: &[u8], ip: &Ip, l4: L4) -> bool {
    if ip.proto == UDP && l4.udp_zero {
        return false;
    }
    let off = l4.off + if ip.proto == TCP { 16 } else { 6 };
    let len = ip.tot_len.wrapping_sub(ip.ihl) & 0xffff;
    let p = super::wire::pseudo(ip.src, ip.dst, ip.proto, len);
    let mut s = p;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    be16(f, off) as u64 == s
}

/// The input is an ordinary packet with valid checksums: its rewrite must satisfy the
/// independent parser.
fn clean(f: &[u8], ip: &Ip, l4: Option<L4>) -> bool {
    let Some(l4) = l4 else { return false };
    if ip.ihl != 20 || ip.frag != Frag::Whole || ETH + ip.tot_len != f.len() {
        return false;
    }
    if super::wire::ip_residue(f, ip.ihl) != 0 {
        return false;
    }
    l4.udp_zero || super::wire::l4_residue(f, l4.off, f.len(), ip.src, ip.dst, ip.proto, f.len() - l4.off) == 0
}

/// Describes how `out` differs from `f`, for messages.
fn changed(f: &[u8], out: &[u8]) -> String {
    if f == out {
        " (frame unchanged)".into()
    } else {
        format!(" (frame changed: {})", super::wire::hex(out))
    }
}

/// Checks a NAT rewrite of `f` into `out` (see the module doc).
fn check_nat(hook: Hook, f: &[u8], out: &[u8], ip: &Ip, l4: Option<L4>, w: Rewrite) -> Result<(), String> {
    let e = |what: String| {
        Err(format!(
            "bad rewrite to {}:{} -> {}:{}: {what}; output {}",
            w.src.0,
            w.src.1,
            w.dst.0,
            w.dst.1,
            super::wire::hex(out)
        ))
    };
    if out.len() != f.len() {
        return e(format!("length {} became {}", f.len(), out.len()));
    }
    if w.routed && hook == Hook::Xdp {
        if !NEIGHBOUR_MACS.iter().any(|m| out[..6] == m[..]) || out[6..12] != EXT0_MAC {
            return e("MACs are not the next hop's and the egress interface's".into());
        }
    } else if out[..12] != f[..12] {
        return e("MACs changed".into());
    }
    if out[12..14] != f[12..14] {
        return e("ethertype changed".into());
    }
    let ihl_end = (ETH + ip.ihl).min(f.len());
    for i in ETH..ihl_end {
        let off = i - ETH;
        if off == 8 || off == 10 || off == 11 || (12..20).contains(&off) {
            continue;
        }
        if out[i] != f[i] {
            return e(format!("IP header byte {off} changed"));
        }
    }
    let want_ttl = if w.routed { f[ETH + 8].wrapping_sub(1) } else { f[ETH + 8] };
    if out[ETH + 8] != want_ttl {
        return e(format!("TTL {} became {} (routed: {})", f[ETH + 8], out[ETH + 8], w.routed));
    }
    if ip_at(out, ETH + 12) != w.src.0 || ip_at(out, ETH + 16) != w.dst.0 {
        return e(format!("addresses are {} -> {}", ip_at(out, ETH + 12), ip_at(out, ETH + 16)));
    }
    if ones(sum(&out[ETH..ihl_end])) != ones(sum(&f[ETH..ihl_end])) {
        return e("IP header checksum not updated with the header".into());
    }
    match l4 {
        None => {
            if out[ihl_end..] != f[ihl_end..] {
                return e("a later fragment's payload changed".into());
            }
        }
        Some(l4) => {
            let csum = l4.off + if ip.proto == TCP { 16 } else { 6 };
            if be16(out, l4.off) != w.src.1 || be16(out, l4.off + 2) != w.dst.1 {
                return e(format!("ports are {} -> {}", be16(out, l4.off), be16(out, l4.off + 2)));
            }
            for i in l4.off + 4..out.len() {
                if (csum..csum + 2).contains(&i) {
                    continue;
                }
                if out[i] != f[i] {
                    return e(format!("byte {} of the L4 header or payload changed", i - l4.off));
                }
            }
            let (old, new) = (be16(f, csum), be16(out, csum));
            if ip.proto == UDP && l4.udp_zero {
                if new != 0 {
                    return e("a zero UDP checksum (none) must stay zero".into());
                }
            } else {
                if ip.proto == UDP && new == 0 {
                    return e(format!("UDP checksum {old:#06x} became 0, which means none"));
                }
                let end = datagram_end(f, ip).max(csum + 2);
                let len = ip.tot_len.wrapping_sub(ip.ihl) & 0xffff;
                let r_in = super::wire::l4_residue(f, l4.off, end, ip.src, ip.dst, ip.proto, len);
                let r_out = super::wire::l4_residue(out, l4.off, end, w.src.0, w.dst.0, ip.proto, len);
                if r_in != r_out {
                    return e(format!("L4 checksum {old:#06x} -> {new:#06x} does not follow the rewrite"));
                }
            }
            if clean(f, ip, Some(l4)) {
                let p = try_parse_checked(out).map_err(|err| format!("independent parser: {err}"))?;
                if p.src != w.src || p.dst != w.dst {
                    return e(format!("independent parser reads {:?} -> {:?}", p.src, p.dst));
                }
            }
        }
    }
    Ok(())
}

/// The ICMP port unreachable tc must build from `f`, or `None` if it must drop it (options it
/// cannot strip). The quote is the IP header, without options (then IHL 5, its length and
/// checksum to match), and the L4 header (20 bytes of TCP, 8 of UDP).
fn reject_frame(f: &[u8], ip: &Ip, l4: L4) -> Option<Vec<u8>> {
    let opt = ip.ihl - 20;
    let mut base = f[ETH..ETH + 20].to_vec();
    if opt > 0 {
        let tot = ip.tot_len.checked_sub(opt)?;
        base[0] = 0x45;
        base[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
        base[10..12].copy_from_slice(&[0, 0]);
        let c = !ones(sum(&base));
        base[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let l4_len = if ip.proto == TCP { 20 } else { 8 };
    let mut quote = base;
    quote.extend_from_slice(&f[l4.off..l4.off + l4_len]);
    let mut out = Vec::with_capacity(ETH + 28 + quote.len());
    out.extend_from_slice(&f[6..12]);
    out.extend_from_slice(&f[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    let mut h = vec![0x45, 0xc0];
    h.extend_from_slice(&((28 + quote.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    h.extend_from_slice(&ip.dst.octets());
    h.extend_from_slice(&ip.src.octets());
    let c = !ones(sum(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&h);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quote);
    let c = !ones(sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&icmp);
    Some(out)
}

/// `out` is the refusal `want`, but for how the checksums it computes write a sum of zero
/// (0x0000 and 0xffff are the same ones' complement number).
fn same_refusal(out: &[u8], want: &[u8]) -> bool {
    // The reply's IP checksum, its ICMP checksum, the quoted header's (recomputed when
    // options were stripped).
    let computed = [ETH + 10, ETH + 22, ETH + 38];
    out.len() == want.len()
        && (0..out.len()).all(|i| {
            let field = computed.iter().find(|&&c| i == c || i == c + 1);
            match field {
                None => out[i] == want[i],
                Some(&c) => {
                    let (o, w) = (be16(out, c), be16(want, c));
                    o == w || (o | w == 0xffff && o & w == 0)
                }
            }
        })
}

/// Checks the checksums of a translated ICMP error, whatever its addresses: outer IP header,
/// quoted IP header, quoted L4 checksum, ICMP checksum each keep their residue.
fn check_icmp_checksums(f: &[u8], out: &[u8], e: &IcmpErr) -> Result<(), String> {
    if out.len() != f.len() {
        return Err(format!("ICMP error's length {} became {}", f.len(), out.len()));
    }
    let (q, ql4) = (e.inner_ip_off, e.inner_l4_off);
    let outer_end = ETH + e.ip.ihl;
    if ones(sum(&out[ETH..outer_end])) != ones(sum(&f[ETH..outer_end])) {
        return Err("outer IP checksum does not follow the rewrite".into());
    }
    if ones(sum(&out[q..ql4])) != ones(sum(&f[q..ql4])) {
        return Err("quoted IP checksum does not follow the rewrite".into());
    }
    let mut last = ql4 + 4;
    if e.quote_csum {
        let c = ql4 + if e.quote.proto == TCP { 16 } else { 6 };
        last = c + 2;
        let partial = |b: &[u8]| ones(sum(&b[q + 12..q + 20]) + sum(&b[ql4..ql4 + 4]) + be16(b, c) as u64);
        if e.quote.proto == UDP && be16(f, c) == 0 {
            if be16(out, c) != 0 {
                return Err("a quoted zero UDP checksum must stay zero".into());
            }
        } else if partial(f) != partial(out) {
            return Err(format!("quoted L4 checksum {:#06x} -> {:#06x} does not follow", be16(f, c), be16(out, c)));
        } else if e.quote.proto == UDP && be16(out, c) == 0 {
            return Err("quoted UDP checksum became 0".into());
        }
    }
    let end = datagram_end(f, &e.ip).max(last);
    if ones(sum(&out[e.icmp_off..end])) != ones(sum(&f[e.icmp_off..end])) {
        return Err("ICMP checksum does not follow the rewrite".into());
    }
    Ok(())
}

/// Checks a translated ICMP error against the rewrite `w`.
fn check_icmp(hook: Hook, a: Act, f: &[u8], out: &[u8], e: &IcmpErr, w: &IcmpRewrite) -> Result<(), String> {
    let err = |what: String| Err(format!("as {w:?}: {what}; output {}", super::wire::hex(out)));
    match (a, w.routed, hook) {
        (Act::Forward, false, Hook::Tc) | (Act::Pass, false, Hook::Xdp) | (Act::Sent, true, _) => {}
        _ => return err(format!("verdict {a:?}")),
    }
    check_icmp_checksums(f, out, e).or_else(err)?;
    if w.routed && hook == Hook::Xdp {
        if !NEIGHBOUR_MACS.iter().any(|m| out[..6] == m[..]) || out[6..12] != EXT0_MAC {
            return err("MACs are not the next hop's and the egress interface's".into());
        }
    } else if out[..12] != f[..12] {
        return err("MACs changed".into());
    }
    let (q, ql4) = (e.inner_ip_off, e.inner_l4_off);
    let csum = e.quote_csum.then(|| ql4 + if e.quote.proto == TCP { 16 } else { 6 });
    for i in 12..out.len() {
        let o = i.wrapping_sub(ETH);
        let skip = (i >= ETH && i < ETH + e.ip.ihl && (o == 8 || o == 10 || o == 11 || (12..20).contains(&o)))
            || (e.icmp_off + 2..e.icmp_off + 4).contains(&i)
            || (q + 10..q + 20).contains(&i)
            || (ql4..ql4 + 4).contains(&i)
            || csum.is_some_and(|c| (c..c + 2).contains(&i));
        if !skip && out[i] != f[i] {
            return err(format!("byte {i} changed"));
        }
    }
    let want_ttl = if w.routed { f[ETH + 8].wrapping_sub(1) } else { f[ETH + 8] };
    if out[ETH + 8] != want_ttl {
        return err(format!("TTL {} became {}", f[ETH + 8], out[ETH + 8]));
    }
    let got = IcmpRewrite {
        outer_src: ip_at(out, ETH + 12),
        outer_dst: ip_at(out, ETH + 16),
        inner_src: (ip_at(out, q + 12), be16(out, ql4)),
        inner_dst: (ip_at(out, q + 16), be16(out, ql4 + 2)),
        routed: w.routed,
    };
    if got != *w {
        return err(format!("rewritten to {got:?}"));
    }
    let clean = e.ip.ihl == 20 && ETH + e.ip.tot_len == f.len() && super::wire::ip_residue(f, 20) == 0;
    if clean && ones(sum(&f[e.icmp_off..])) == 0 && ones(sum(&f[q..ql4])) == 0 {
        let (s, d, _) = try_parse_icmp_checked(out).map_err(|x| format!("independent parser: {x}"))?;
        if (s, d) != (w.outer_src, w.outer_dst) {
            return err(format!("independent parser reads {s} -> {d}"));
        }
    }
    Ok(())
}
