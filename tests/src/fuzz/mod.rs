//! Fuzzing the datapath (issue 11): seeded random, structured, truncated and mutated frames
//! through the tc and XDP programs with `BPF_PROG_TEST_RUN`, every output judged by a model of
//! the README's semantics (`model.rs`) and the independent parser of `packet.rs`.
//!
//! This crate does not load programs: the caller implements [`Datapath`] on the real
//! `Dataplane` (the packet test and `cargo xtask bench`), programs the Services of
//! [`world::WORLD_YAML`] through the real translation, and gives the model the frontends that
//! translation produced ([`World`]). A failure names the seed and the frame; the same seed
//! replays the same frames (`LB_FUZZ_SEED`).
pub mod gen;
pub mod model;
pub mod wire;
pub mod world;

use std::time::{Duration, Instant};

use lb_common::COUNTER_MAX;

pub use model::{Budget, Hook, Model, Ran, Stats};
pub use world::{Backend, Frontend, NodeNs, World};

use gen::{Gen, Path};

/// Counter values per hook (tc, XDP), summed over CPUs.
pub type Counters = [[u64; COUNTER_MAX as usize]; 2];

pub enum RunError {
    /// The kernel refused the input (errno).
    Refused(i32),
    Failed(String),
    /// The program ran, and broke a rule the harness checks beside the model (what it says).
    Wrong(String),
}

/// The loaded programs and their maps, as the fuzzer drives them.
pub trait Datapath {
    /// Runs one program on `frame`; returns the verdict and the output's length in `out`.
    fn run(&mut self, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError>;
    /// Runs the tc egress program on `frame` (what tc ingress left to the stack, on its way
    /// out); its counters are tc's.
    fn run_egress(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError>;
    /// The datapath's verdict and drop counters (`LB_STATS`).
    fn counters(&mut self) -> Result<Counters, String>;
    /// Empties the flow maps (conntrack, fragments, affinity pins), so nothing the model relies
    /// on can be evicted.
    fn clear_flows(&mut self) -> Result<(), String>;
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub seed: u64,
    pub frames: u64,
    /// Counters are checked against the model every this many frames (1 pins a counter
    /// mismatch to its frame).
    pub check_every: u64,
    pub budget: Budget,
}

impl Options {
    /// `frames` by default; `LB_FUZZ_SEED`, `LB_FUZZ_FRAMES` and `LB_FUZZ_CHECK_EVERY` override.
    pub fn from_env(frames: u64, budget: Budget) -> Self {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seed = env("LB_FUZZ_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        });
        Self {
            seed,
            frames: env("LB_FUZZ_FRAMES").unwrap_or(frames),
            check_every: env("LB_FUZZ_CHECK_EVERY").unwrap_or(4096).max(1),
            budget,
        }
    }
}

/// How many flows, first fragments and pins an epoch may create, so that nothing is evicted:
/// a quarter of what one CPU's share of each LRU map holds (`BPF_F_NO_COMMON_LRU` splits a
/// map's entries over the possible CPUs, and every flow takes two entries); and for IPv4's
/// new-flow table, an array of sets of `CT_WAYS` ways, as long as no set holds more than
/// `CT_WAYS - 2` of the model's entries, so the next flow's two entries find room (the model
/// counts them into the sets their keys choose).
pub fn budget(conntrack_new: u32, affinity: u32) -> Budget {
    let cpus = possible_cpus().max(1);
    let lru = conntrack_new as usize / cpus / 2 / 4;
    Budget {
        flows: lru.max(64),
        first_fragments: lb_common::FRAGMENTS_MAX_ENTRIES as usize / 4,
        pins: (affinity as usize / cpus / 4).max(64),
        set_entries: lb_common::CT_WAYS - 1,
        ct_new_sets: conntrack_new.div_ceil(lb_common::CT_WAYS as u32).max(2),
    }
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. "0-1").
pub fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    s.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

pub struct Report {
    pub seed: u64,
    pub frames: u64,
    pub elapsed: Duration,
    pub stats: Stats,
}

impl Report {
    pub fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "seed {}: {} frames, {} tc and {} XDP runs in {:.1} s; 0 misroutes. Translated (tc/XDP): new flows {}/{}, \
             tracked {}/{}, replies {}/{}, node SNAT {}/{}, hairpin {}/{}, ICMP errors {}/{}, later fragments {}/{}; \
             sent out by the program {}/{}; refused with ICMP {}; left by XDP to tc {}; dropped {}/{}; passed unchanged \
             {}/{}; refused by the kernel {}/{}; rewrites of valid packets the independent parser checked {}; reply \
             keys shared by two live flows {}; replies whose routing an older flow changed {}; SNAT ports handed \
             out while a live flow held them, on a key an older flow writes (the fixed SNAT takeover bug; must be 0) {}; flow tables emptied {} times; eTP Local short-circuits (tc/XDP) {}/{}; new flows of a tuple seen before \
             that got its backend again {}",
            self.seed,
            self.frames,
            s.runs[0],
            s.runs[1],
            self.elapsed.as_secs_f64(),
            s.new_flows[0],
            s.new_flows[1],
            s.tracked[0],
            s.tracked[1],
            s.replies[0],
            s.replies[1],
            s.snat_node[0],
            s.snat_node[1],
            s.hairpin[0],
            s.hairpin[1],
            s.icmp_translated[0],
            s.icmp_translated[1],
            s.fragments_translated[0],
            s.fragments_translated[1],
            s.routed[0],
            s.routed[1],
            s.rejected,
            s.deferred,
            s.dropped[0],
            s.dropped[1],
            s.passed[0],
            s.passed[1],
            s.refused[0],
            s.refused[1],
            s.parsed_clean,
            s.reply_clashes,
            s.clobbered_replies,
            s.ports_taken_over,
            s.epochs,
            s.short_circuit[0],
            s.short_circuit[1],
            s.same_backend_again,
        )
    }

    /// Outcomes of bugs this fuzzer found and that are fixed: the model accepts them (so a run
    /// reports them instead of stopping at the first), and this makes them fail the run.
    pub fn fixed_bugs_absent(&self) -> Result<(), String> {
        match self.stats.ports_taken_over {
            0 => Ok(()),
            n => Err(format!(
                "{n} SNAT ports went to a new flow while a live flow held them, on a reply key an older flow still \
                 wrote: the SNAT takeover bug (`a_snat_port_taken_over_from_a_finished_flow_stays_the_new_flows`) is back"
            )),
        }
    }

    /// Every kind of outcome was reached, in proportion to the frames: a generator that
    /// stopped producing some kind (and so a test that stopped testing it) fails here.
    pub fn coverage(&self) -> Result<(), String> {
        let s = &self.stats;
        let min = (self.frames / 2000).max(1);
        let kinds = [
            ("new flows at tc", s.new_flows[0]),
            ("new flows at XDP", s.new_flows[1]),
            ("tracked at tc", s.tracked[0]),
            ("tracked at XDP", s.tracked[1]),
            ("replies at tc", s.replies[0]),
            ("replies at XDP", s.replies[1]),
            ("node SNAT at tc", s.snat_node[0]),
            ("node SNAT at XDP", s.snat_node[1]),
            ("hairpin", s.hairpin[0]),
            ("ICMP errors at tc", s.icmp_translated[0]),
            ("ICMP errors at XDP", s.icmp_translated[1]),
            ("later fragments at tc", s.fragments_translated[0]),
            ("later fragments at XDP", s.fragments_translated[1]),
            ("sent out by tc", s.routed[0]),
            ("sent out by XDP", s.routed[1]),
            ("refusals", s.rejected),
            ("left by XDP to tc", s.deferred),
            ("drops at tc", s.dropped[0]),
            ("drops at XDP", s.dropped[1]),
            ("valid rewrites parsed", s.parsed_clean),
            ("eTP Local short-circuits at tc", s.short_circuit[0]),
            ("eTP Local short-circuits at XDP", s.short_circuit[1]),
            ("tuples chosen again", s.same_backend_again),
        ];
        let thin: Vec<String> =
            kinds.iter().filter(|k| k.1 < min).map(|k| format!("{} ({}, want >= {min})", k.0, k.1)).collect();
        if thin.is_empty() {
            Ok(())
        } else {
            Err(format!("the generator no longer reaches: {}", thin.join(", ")))
        }
    }
}

/// One program run, for traces and failure reports.
#[derive(Clone)]
struct RunRecord {
    frame: u64,
    hook: Hook,
    input: Vec<u8>,
    verdict: Option<u32>,
    output: Vec<u8>,
}

impl std::fmt::Display for RunRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.input.is_empty() {
            return write!(f, "  #{} flow tables emptied", self.frame);
        }
        write!(
            f,
            "  #{} {:?} {} -> {:?} {}",
            self.frame,
            self.hook,
            wire::hex(&self.input),
            self.verdict,
            wire::hex(&self.output)
        )
    }
}

/// A frame the model rejected, with what is needed to replay it.
pub struct Failure {
    pub seed: u64,
    pub frame: u64,
    pub hook: Option<Hook>,
    pub input: Vec<u8>,
    pub verdict: Option<u32>,
    pub output: Vec<u8>,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "fuzz failure (replay: LB_FUZZ_SEED={} LB_FUZZ_FRAMES={}):", self.seed, self.frame + 1)?;
        writeln!(f, "  frame #{} at {:?}: {}", self.frame, self.hook, self.reason)?;
        if !self.input.is_empty() {
            writeln!(f, "  input  {}", wire::hex(&self.input))?;
            writeln!(f, "  verdict {:?}", self.verdict)?;
            write!(f, "  output {}", wire::hex(&self.output))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Whether `b` holds the (non-empty) pattern `pat`.
fn holds(b: &[u8], pat: &[u8]) -> bool {
    !pat.is_empty() && b.windows(pat.len()).any(|w| w == pat)
}

/// Keeps a run for the failure report (and in `history`, when kept), printed with `label` if
/// it carries a traced pattern.
fn keep(
    record: RunRecord,
    label: &str,
    trace: &[Vec<u8>],
    history: Option<&mut Vec<RunRecord>>,
    last: &mut Vec<RunRecord>,
) {
    if trace.iter().any(|p| holds(&record.input, p) || holds(&record.output, p)) {
        eprintln!("{label}{record}");
    }
    if let Some(h) = history {
        h.push(record.clone());
    }
    last.push(record);
}

/// Runs `opts.frames` frames through `dp` and judges every output.
pub fn run(dp: &mut dyn Datapath, world: World, opts: &Options) -> Result<Report, Failure> {
    eprintln!("fuzz: seed {} ({} frames; replay with LB_FUZZ_SEED={})", opts.seed, opts.frames, opts.seed);
    let started = Instant::now();
    let mut model = Model::new(world, opts.budget.ct_new_sets);
    let mut gen = Gen::new(opts.seed);
    let fail = |frame: u64, reason: String| Failure {
        seed: opts.seed,
        frame,
        hook: None,
        input: Vec::new(),
        verdict: None,
        output: Vec::new(),
        reason,
    };
    let mut base = dp.counters().map_err(|e| fail(0, e))?;
    let mut out = vec![0u8; 2048];
    let mut frame = 0u64;
    let mut checked_at = 0u64;
    // The runs of the last item, for a counter mismatch found after it.
    let mut last: Vec<RunRecord> = Vec::new();
    // `LB_FUZZ_TRACE=HEX,...`: print every run whose input or output holds one of these byte
    // strings (an address, a port), to follow one flow through a failing run.
    let trace: Vec<Vec<u8>> = std::env::var("LB_FUZZ_TRACE")
        .unwrap_or_default()
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| (0..h.len() / 2).filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()).collect())
        .collect();
    // `LB_FUZZ_HISTORY=1`: keep every run, and on a failure print the earlier runs that carry
    // the failing frame's destination address and port (its flow's history).
    let keep_history = std::env::var_os("LB_FUZZ_HISTORY").is_some();
    let mut history: Vec<RunRecord> = Vec::new();
    while frame < opts.frames {
        last.clear();
        for (path, f) in gen.next(&model) {
            let first = if path == Path::Wire { Hook::Xdp } else { Hook::Tc };
            let mut input = f;
            let mut hook = first;
            loop {
                let ran = dp.run(hook, &input, &mut out);
                let (verdict, n, judged) = match &ran {
                    Ok((v, n)) => (Some(*v), *n, model.judge(hook, &input, Ran::Out { verdict: *v, out: &out[..*n] })),
                    Err(RunError::Refused(errno)) => (None, 0, model.judge(hook, &input, Ran::Refused(*errno))),
                    Err(RunError::Failed(e)) => (None, 0, Err(format!("BPF_PROG_TEST_RUN failed: {e}"))),
                    Err(RunError::Wrong(e)) => (None, 0, Err(e.clone())),
                };
                let record = RunRecord { frame, hook, input: input.clone(), verdict, output: out[..n].to_vec() };
                keep(record, "", &trace, keep_history.then_some(&mut history), &mut last);
                if let Err(reason) = judged {
                    if keep_history && input.len() >= 38 {
                        let ihl = (input[14] & 0x0f) as usize * 4;
                        let addr = input[30..34].to_vec();
                        let port = input.get(14 + ihl + 2..14 + ihl + 4).unwrap_or(&[]).to_vec();
                        for r in &history {
                            let (i, o) = (&r.input, &r.output);
                            if i.is_empty()
                                || (holds(i, &addr) || holds(o, &addr)) && (holds(i, &port) || holds(o, &port))
                            {
                                eprintln!("{r}");
                            }
                        }
                    }
                    return Err(Failure {
                        seed: opts.seed,
                        frame,
                        hook: Some(hook),
                        input,
                        verdict,
                        output: out[..n].to_vec(),
                        reason,
                    });
                }
                // XDP passes to tc behind it on the same interface what it did not send or drop.
                if hook == Hook::Xdp && verdict == Some(model::verdict::XDP_PASS) {
                    input = out[..n].to_vec();
                    hook = Hook::Tc;
                    continue;
                }
                // A reply (or an ICMP error) tc ingress left to the stack leaves through tc
                // egress, which restores it.
                if hook == Hook::Tc
                    && model.take_egress_due()
                    && verdict == Some(model::verdict::TC_UNSPEC)
                    && out[..n] == input[..]
                {
                    let ran = dp.run_egress(&input, &mut out);
                    let (verdict, n, judged) = match &ran {
                        Ok((v, n)) => {
                            (Some(*v), *n, model.judge_after_stack(&input, Ran::Out { verdict: *v, out: &out[..*n] }))
                        }
                        Err(RunError::Refused(errno)) => {
                            (None, 0, Err(format!("tc egress refused the frame: errno {errno}")))
                        }
                        Err(RunError::Failed(e)) => {
                            (None, 0, Err(format!("BPF_PROG_TEST_RUN of tc egress failed: {e}")))
                        }
                        Err(RunError::Wrong(e)) => (None, 0, Err(format!("tc egress: {e}"))),
                    };
                    let record = RunRecord { frame, hook, input: input.clone(), verdict, output: out[..n].to_vec() };
                    keep(record, "(tc egress) ", &trace, keep_history.then_some(&mut history), &mut last);
                    if let Err(reason) = judged {
                        return Err(Failure {
                            seed: opts.seed,
                            frame,
                            hook: Some(hook),
                            input,
                            verdict,
                            output: out[..n].to_vec(),
                            reason: format!("at tc egress: {reason}"),
                        });
                    }
                }
                break;
            }
            frame += 1;
        }
        let used = model.used;
        let full = used.flows >= opts.budget.flows
            || used.first_fragments >= opts.budget.first_fragments
            || used.pins >= opts.budget.pins
            || used.set_entries + model.unplaced() >= opts.budget.set_entries;
        if full || frame - checked_at >= opts.check_every || frame >= opts.frames {
            let now = dp.counters().map_err(|e| fail(frame, e))?;
            let mut delta = [[0u64; COUNTER_MAX as usize]; 2];
            for h in 0..2 {
                for c in 0..COUNTER_MAX as usize {
                    delta[h][c] = now[h][c].wrapping_sub(base[h][c]);
                }
            }
            model.expect.check(&delta).map_err(|e| {
                let runs: String = if frame - checked_at <= 8 {
                    last.iter().map(|r| format!("\n{r}")).collect()
                } else {
                    String::new()
                };
                fail(frame, format!("counters of frames {checked_at}..{frame} do not match what happened: {e}{runs}"))
            })?;
            model.expect = Default::default();
            base = now;
            checked_at = frame;
        }
        if full {
            dp.clear_flows().map_err(|e| fail(frame, e))?;
            model.reset_flows();
            if !trace.is_empty() {
                eprintln!("  #{frame} flow tables emptied");
            }
            if keep_history {
                // An empty record marks it.
                history.push(RunRecord { frame, hook: Hook::Tc, input: Vec::new(), verdict: None, output: Vec::new() });
            }
        }
    }
    Ok(Report { seed: opts.seed, frames: frame, elapsed: started.elapsed(), stats: model.stats.clone() })
}
