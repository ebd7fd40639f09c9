//! `lb-bench` (run by `cargo xtask bench [--quick]`): per-packet cost against the floor, cost
//! at scale, real TCP through network namespaces against the direct path and kube-proxy-style
//! iptables rules, control-plane timings, and verifier statistics, all measured in one run.
//! Results go to `bench/results/` as markdown and an SVG chart.
//!
//! Methods, named in the output for every row:
//! - `repeat`: one BPF_PROG_TEST_RUN with `repeat` = R; the kernel's per-run average. Only for
//!   programs that leave the frame unchanged, since every repetition sees the previous one's
//!   output (a DNAT program would otherwise time its own output, a pass-through).
//! - `single`: R separate runs, each on a fresh frame (new flows get a new source address and
//!   port each time); the kernel-measured duration of each run is summed, the same loop around
//!   the empty program of the same hook is subtracted, and the floor is added back.
//! - `warm` (section 1b, `warm.rs`): one run with `repeat` = R of a wrapper that restores the
//!   frame before every run and tail-calls the program under test.
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod fuzz;

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_tests::{
    packet::{frame, L4},
    packet6::frame6,
    Lab, Node, Pod,
};
use lb_userspace::{
    dataplane::{Config, Dataplane, MapSizes},
    model::{DesiredState, Endpoint, Frontend, Protocol, ServicePort},
};

mod real;
mod warm;

struct Opts {
    quick: bool,
    out: PathBuf,
    /// Only these sections (`packet`, `warm`, `scale`, `real`, `e2e`, `api`, `yaml`, `verifier`);
    /// all when empty. With the Kubernetes binaries `real` (beside the real kube-proxy) takes the
    /// place of `e2e` and of `api` below 100,000 Services.
    only: Vec<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn main() -> Result<()> {
    let mut opts = Opts { quick: false, out: PathBuf::from("bench/results"), only: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            // The sections on the real control plane, e.g. after a change to them.
            "--real-only" => opts.only = vec!["real".into(), "api".into()],
            "--out" => opts.out = PathBuf::from(args.next().context("--out DIR")?),
            "--only" => opts.only = args.next().context("--only SECTION,...")?.split(',').map(String::from).collect(),
            other => bail!("unknown argument {other} (expected --quick, --real-only, --out DIR, --only SECTION,...)"),
        }
    }
    let mut md = String::new();
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    let kernel = sh("uname", &["-r"])?;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    writeln!(md, "# lb benchmark{}\n", if opts.quick { " (quick mode: short runs, small sizes)" } else { "" })?;
    writeln!(md, "- date: {date}\n- kernel: {kernel}\n- CPUs: {cpus} ({cpu_model})\n")?;
    if opts.only.iter().any(|s| s == "real" || s == "real-100k") && !real::available() {
        bail!("sections real and real-100k need the Kubernetes binaries: run `cargo xtask k8s` first");
    }
    if opts.quick && opts.only.iter().any(|s| s == "real-100k") {
        bail!("section real-100k does not run with --quick");
    }

    let mut svg = String::new();
    if let Err(e) = sections(&opts, &mut md, &mut svg) {
        // A long run's finished sections are kept, not lost with the one that failed.
        std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
        let path = opts.out.join("failed.md");
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
        return Err(e.context(format!("a section failed; the sections before it are in {}", path.display())));
    }
    if opts.runs("fuzz") {
        progress("fuzz: random, truncated and mutated frames through both programs, judged by the model");
        md.push_str(&fuzz::run(opts.quick)?);
    }

    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let name = match (opts.quick, opts.only.is_empty()) {
        (true, _) => "quick",
        (false, true) => "latest",
        // A partial run never replaces the full results.
        (false, false) => "partial",
    };
    let md_path = opts.out.join(format!("{name}.md"));
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let svg_path = opts.out.join(format!("{name}-per-packet.svg"));
    if !svg.is_empty() {
        std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    }
    println!("{md}");
    progress(&format!("written: {} and {}", md_path.display(), svg_path.display()));
    Ok(())
}

/// The sections `opts` selects, in order, appended to `md` (and the per-packet chart to `svg`).
fn sections(opts: &Opts, md: &mut String, svg: &mut String) -> Result<()> {
    if opts.runs("packet") {
        progress("1/5 per-packet cost (BPF_PROG_TEST_RUN)");
        let per_packet = per_packet(opts)?;
        md.push_str(&per_packet.markdown);
        *svg = per_packet.svg;
    }
    if opts.runs("warm") {
        progress("1b/5 per-packet cost, warm method, minimal DNAT references");
        md.push_str(&warm::per_packet_warm(opts.quick)?);
    }
    if opts.runs("scale") {
        progress("2/5 cost at scale");
        md.push_str(&scale(opts)?);
    }
    if real::available() {
        // The reference: the real kube-proxy against a real control plane (`cargo xtask k8s`).
        // `--only real-100k`: the 100,000-Service control plane row alone (the API server
        // through etcd; a few minutes instead of the whole section's half hour).
        let huge = !opts.quick && (opts.runs("real") || opts.runs("real-100k"));
        if opts.runs("real") || huge {
            progress("3-4/5 beside the real kube-proxy, through a real control plane");
            let (real, unserved) = real::run(opts.quick, opts.runs("real"), huge)?;
            md.push_str(&real);
            // Where the real kube-proxy in iptables mode never served, the reference is the
            // iptables rules it would write, restored by the bench in one go.
            if !unserved.is_empty() && opts.runs("e2e") {
                progress("3c/5 kube-proxy-style iptables rules where kube-proxy in iptables mode did not serve");
                md.push_str(&end_to_end(opts, Some(&unserved))?);
            }
        }
        if opts.runs("api") && !opts.quick {
            // The same 100,000 Services through the test API server, for comparison with the
            // real one (section 4).
            progress("4b/5 100,000 Services through the test API server");
            md.push_str(&api_control_plane(opts, &[100_000])?);
        }
    } else {
        // Without the Kubernetes binaries: kube-proxy-style iptables rules written here, and the
        // test API server.
        if opts.runs("e2e") {
            progress("3/5 real TCP through network namespaces (no Kubernetes binaries: run `cargo xtask k8s`)");
            md.push_str(&end_to_end(opts, None)?);
        }
        if opts.runs("api") {
            progress("4/5 control plane through the test API server");
            let sizes: &[usize] = if opts.quick { &[100] } else { &[1_000, 10_000, 100_000] };
            md.push_str(&api_control_plane(opts, sizes)?);
        }
    }
    if opts.runs("yaml") {
        progress("4/5 control plane from YAML files");
        md.push_str(&yaml_control_plane(opts)?);
    }
    if opts.runs("verifier") {
        progress("5/5 verifier");
        md.push_str(&verifier()?);
    }
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("[lb-bench] {msg}");
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// A datapath loaded under its own pin directory, removed on drop.
struct Loaded {
    dp: Dataplane,
    pin: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn load(tag: &str, config: Config) -> Result<Loaded> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let dp = Dataplane::load(&pin, &config).with_context(|| format!("loading the datapath under {}", pin.display()))?;
    Ok(Loaded { dp, pin })
}

/// N services 10.96.0.0/16-ish, each with 3 to 10 endpoints (deterministic), port 80 -> 8080.
fn services(n: usize, affinity: bool) -> DesiredState {
    let mut state = DesiredState::default();
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32);
        let count = 3 + (i * 7) % 8;
        let backends = (0..count)
            .map(|j| Endpoint {
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * 11 + j) as u32 % 60_000 + 2).into(),
                port: 8080,
                local: j == 0,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        state.services.insert(
            Frontend::cluster_ip(ip, 80, Protocol::Tcp),
            ServicePort {
                name: format!("bench/svc-{i}"),
                backends,
                affinity_timeout_s: affinity.then_some(10_800),
                ..Default::default()
            },
        );
    }
    state
}

const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc0a8, 0x31, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaf4, 1, 0, 0, 0, 0, 5);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaf4, 1, 0, 0, 0, 0, 6);

/// `syn` for IPv6: clients in fd00:80::/96.
fn syn6(i: u32, dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut f = frame6((Ipv6Addr::new(0xfd00, 0x80, 0, 0, 0, 0, 0, 0), 10_000), dst, L4::Tcp { flags: 0x02 }, &[]);
    set_flow6(&mut f, i);
    f
}

/// `set_flow` for IPv6: the source address's last word and the source port.
fn set_flow6(f: &mut [u8], i: u32) {
    f[14 + 8 + 12..14 + 24].copy_from_slice(&(i >> 14).to_be_bytes());
    f[54..56].copy_from_slice(&(10_000 + (i & 0x3fff) as u16).to_be_bytes());
}

/// The frame of a new flow `i` (a fresh client address and port for each i).
fn syn(i: u32, dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i >> 14));
    frame((client, 10_000 + (i & 0x3fff) as u16), dst, L4::Tcp { flags: 0x02 }, &[])
}

/// Patches the source address and port of `f` for flow `i`, the way `syn` builds them; the
/// checksum is left stale, which no program here verifies.
fn set_flow(f: &mut [u8], i: u32) {
    let client = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i >> 14);
    f[26..30].copy_from_slice(&client.to_be_bytes());
    f[34..36].copy_from_slice(&(10_000 + (i & 0x3fff) as u16).to_be_bytes());
}

trait Runnable {
    fn run(&self, data: &[u8], repeat: u32) -> Result<Duration>;
}

impl<T: TestRun<Result = aya::programs::TestRunResult> + for<'a> TestRun<Opts<'a> = TestRunOptions<'a>>> Runnable
    for T
{
    fn run(&self, data: &[u8], repeat: u32) -> Result<Duration> {
        let mut out = vec![0u8; 256];
        let r = self
            .test_run(TestRunOptions { data_in: Some(data), data_out: Some(&mut out), repeat, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        Ok(r.duration)
    }
}

/// `repeat` method: ns per run, median of `rounds`.
fn by_repeat(p: &dyn Runnable, f: &[u8], repeat: u32, rounds: usize) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..rounds {
        v.push(p.run(f, repeat)?.as_nanos() as f64);
    }
    Ok(median(v))
}

/// `single` method: ns per run (kernel-measured), median over `rounds` loops of `n` runs.
/// `fresh` (if set) gives every run a new flow.
fn by_single(p: &dyn Runnable, f: &[u8], n: u32, rounds: usize, fresh: bool, offset: &mut u32) -> Result<f64> {
    by_single_with(p, f, n, rounds, &mut |buf| {
        if fresh {
            *offset += 1;
            set_flow(buf, *offset);
        }
    })
}

/// `single` method with `mutate` applied to the frame before every run.
fn by_single_with(p: &dyn Runnable, f: &[u8], n: u32, rounds: usize, mutate: &mut dyn FnMut(&mut [u8])) -> Result<f64> {
    let mut buf = f.to_vec();
    let mut v = Vec::new();
    for _ in 0..rounds {
        let mut total = 0u128;
        for _ in 0..n {
            mutate(&mut buf);
            total += p.run(&buf, 1)?.as_nanos();
        }
        v.push(total as f64 / n as f64);
    }
    Ok(median(v))
}

struct PerPacket {
    markdown: String,
    svg: String,
}

struct Row {
    hook: &'static str,
    what: &'static str,
    method: &'static str,
    ns: f64,
    floor: f64,
}

fn per_packet(opts: &Opts) -> Result<PerPacket> {
    let (repeat, singles, rounds) = if opts.quick { (100_000, 20_000, 3) } else { (1_000_000, 1_000_000, 5) };
    let node_ip = Ipv4Addr::new(192, 168, 49, 2);
    let mut loaded =
        load("pp", Config { node_ip: Some(node_ip), node_ip6: Some(NODE_IP6), ipv6: true, ..Config::default() })?;
    let mut state = services(2, false);
    // The IPv6 twins: a ClusterIP over three backends, a node port with a local backend.
    state.services.insert(
        Frontend::cluster_ip(VIP6, 80, Protocol::Tcp),
        ServicePort {
            name: "bench/svc6".into(),
            backends: (0..3u16)
                .map(|j| Endpoint {
                    ip: Ipv6Addr::new(0xfd00, 0xaf4, 0, 0, 0, 0, 0, 2 + j).into(),
                    port: 8080,
                    local: j == 0,
                })
                .collect(),
            ..Default::default()
        },
    );
    state.services.insert(
        Frontend::node_port_v6(30080, Protocol::Tcp),
        ServicePort {
            name: "bench/np6".into(),
            backends: vec![Endpoint {
                ip: Ipv6Addr::new(0xfd00, 0xaf4, 1, 0, 0, 0, 0, 11).into(),
                port: 80,
                local: true,
            }],
            external: true,
            ..Default::default()
        },
    );
    // Service 1 with affinity; a node port whose only backend is local (no routing needed).
    let affinity_frontend = Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 11), 80, Protocol::Tcp);
    state.services.get_mut(&affinity_frontend).expect("built above").affinity_timeout_s = Some(10_800);
    state.services.insert(
        Frontend::node_port(30080, Protocol::Tcp),
        ServicePort {
            name: "bench/np".into(),
            backends: vec![Endpoint { ip: Ipv4Addr::new(10, 244, 1, 11).into(), port: 80, local: true }],
            external: true,
            ..Default::default()
        },
    );
    let report = loaded.dp.apply(&state);
    if !report.errors.is_empty() {
        bail!("programming: {:?}", report.errors);
    }
    loaded.dp.set_node_addresses(&[IpAddr::from(node_ip), IpAddr::from(NODE_IP6)])?;
    let dp = &loaded.dp;
    let (empty_xdp, empty_tc) = dp.floor_programs();
    let (tc, xdp) = (dp.tc_program(), dp.xdp_program());
    let vip = (Ipv4Addr::new(10, 96, 0, 10), 80);
    let aff_vip = (Ipv4Addr::new(10, 96, 0, 11), 80);
    let np = (node_ip, 30080);
    let other =
        frame((Ipv4Addr::new(10, 244, 1, 5), 40000), (Ipv4Addr::new(10, 244, 1, 6), 80), L4::Tcp { flags: 0x10 }, b"x");
    let mut off = 0u32;

    let floor_tc = by_repeat(empty_tc, &other, repeat, rounds)?;
    let floor_xdp = by_repeat(empty_xdp, &other, repeat, rounds)?;
    let single_empty_tc = by_single(empty_tc, &other, singles, rounds, false, &mut off)?;
    let single_empty_xdp = by_single(empty_xdp, &other, singles, rounds, false, &mut off)?;
    let mut rows = vec![
        Row { hook: "tc", what: "empty program (floor)", method: "repeat", ns: floor_tc, floor: floor_tc },
        Row { hook: "xdp", what: "empty program (floor)", method: "repeat", ns: floor_xdp, floor: floor_xdp },
    ];
    // Pass-through on a port no Service uses (the port filter answers), and on a port a
    // Service also uses (every lookup runs and misses).
    let unused = frame(
        (Ipv4Addr::new(10, 244, 1, 5), 40000),
        (Ipv4Addr::new(10, 244, 1, 6), 7777),
        L4::Tcp { flags: 0x10 },
        b"x",
    );
    rows.push(Row {
        hook: "tc",
        what: "pass-through, port used by no Service",
        method: "repeat",
        ns: by_repeat(tc, &unused, repeat, rounds)?,
        floor: floor_tc,
    });
    rows.push(Row {
        hook: "tc",
        what: "pass-through, Service port, other address",
        method: "repeat",
        ns: by_repeat(tc, &other, repeat, rounds)?,
        floor: floor_tc,
    });
    rows.push(Row {
        hook: "xdp",
        what: "pass-through, port used by no Service",
        method: "repeat",
        ns: by_repeat(xdp, &unused, repeat, rounds)?,
        floor: floor_xdp,
    });
    rows.push(Row {
        hook: "xdp",
        what: "pass-through, Service port, other address",
        method: "repeat",
        ns: by_repeat(xdp, &other, repeat, rounds)?,
        floor: floor_xdp,
    });
    let single = |p: &dyn Runnable, f: &[u8], fresh: bool, off: &mut u32, empty: f64, floor: f64| -> Result<f64> {
        Ok(floor + (by_single(p, f, singles, rounds, fresh, off)? - empty).max(0.0))
    };
    // The `single` method on a path `repeat` can also measure, as a check of the method.
    rows.push(Row {
        hook: "tc",
        what: "pass-through, Service port (single, method check)",
        method: "single",
        ns: single(tc, &other, false, &mut off, single_empty_tc, floor_tc)?,
        floor: floor_tc,
    });
    let new_flow = single(tc, &syn(0, vip), true, &mut off, single_empty_tc, floor_tc)?;
    rows.push(Row {
        hook: "tc",
        what: "new flow (SYN to a ClusterIP)",
        method: "single",
        ns: new_flow,
        floor: floor_tc,
    });
    // One established flow, replayed.
    let est = syn(u32::MAX >> 2, vip);
    tc.run(&est, 1)?;
    let mut est_ack = est.clone();
    est_ack[47] = 0x10;
    rows.push(Row {
        hook: "tc",
        what: "established flow (conntrack hit)",
        method: "single",
        ns: single(tc, &est_ack, false, &mut off, single_empty_tc, floor_tc)?,
        floor: floor_tc,
    });
    // Affinity: every run a new connection (new port) from the same pinned client.
    let aff = syn(0, aff_vip);
    tc.run(&aff, 1)?;
    let mut aff_off = 0u32;
    let pinned = by_single_with(tc, &aff, singles, rounds, &mut |buf| {
        aff_off = (aff_off + 1) & 0x3fff;
        buf[34..36].copy_from_slice(&(10_000 + aff_off as u16).to_be_bytes());
    })?;
    rows.push(Row {
        hook: "tc",
        what: "affinity hit (new connection, pinned client)",
        method: "single",
        ns: floor_tc + (pinned - single_empty_tc).max(0.0),
        floor: floor_tc,
    });
    rows.push(Row {
        hook: "xdp",
        what: "NodePort new flow (local backend)",
        method: "single",
        ns: single(xdp, &syn(0, np), true, &mut off, single_empty_xdp, floor_xdp)?,
        floor: floor_xdp,
    });
    let np_est = syn(u32::MAX >> 3, np);
    xdp.run(&np_est, 1)?;
    let mut np_ack = np_est.clone();
    np_ack[47] = 0x10;
    rows.push(Row {
        hook: "xdp",
        what: "NodePort established flow",
        method: "single",
        ns: single(xdp, &np_ack, false, &mut off, single_empty_xdp, floor_xdp)?,
        floor: floor_xdp,
    });

    // IPv6, the same packets: the IPv4 programs tail-call the IPv6 stages (a new flow passes
    // the forward stage twice, around the new-flow stage).
    let other6 = frame6((CLIENT6, 40000), (OTHER6, 80), L4::Tcp { flags: 0x10 }, b"x");
    rows.push(Row {
        hook: "tc",
        what: "IPv6 pass-through, Service port, other address",
        method: "repeat",
        ns: by_repeat(tc, &other6, repeat, rounds)?,
        floor: floor_tc,
    });
    let single6 = |p: &dyn Runnable, f: &[u8], fresh: bool, off: &mut u32, empty: f64, floor: f64| -> Result<f64> {
        let mut buf_off = *off;
        let ns = by_single_with(p, f, singles, rounds, &mut |buf| {
            if fresh {
                buf_off += 1;
                set_flow6(buf, buf_off);
            }
        })?;
        *off = buf_off;
        Ok(floor + (ns - empty).max(0.0))
    };
    rows.push(Row {
        hook: "tc",
        what: "IPv6 new flow (SYN to a ClusterIP)",
        method: "single",
        ns: single6(tc, &syn6(0, (VIP6, 80)), true, &mut off, single_empty_tc, floor_tc)?,
        floor: floor_tc,
    });
    let est6 = syn6(u32::MAX >> 2, (VIP6, 80));
    tc.run(&est6, 1)?;
    let mut est6_ack = est6.clone();
    est6_ack[14 + 40 + 13] = 0x10;
    rows.push(Row {
        hook: "tc",
        what: "IPv6 established flow (conntrack hit)",
        method: "single",
        ns: single6(tc, &est6_ack, false, &mut off, single_empty_tc, floor_tc)?,
        floor: floor_tc,
    });
    rows.push(Row {
        hook: "xdp",
        what: "IPv6 NodePort new flow (local backend)",
        method: "single",
        ns: single6(xdp, &syn6(0, (NODE_IP6, 30080)), true, &mut off, single_empty_xdp, floor_xdp)?,
        floor: floor_xdp,
    });
    let np6_est = syn6(u32::MAX >> 3, (NODE_IP6, 30080));
    xdp.run(&np6_est, 1)?;
    let mut np6_ack = np6_est.clone();
    np6_ack[14 + 40 + 13] = 0x10;
    rows.push(Row {
        hook: "xdp",
        what: "IPv6 NodePort established flow",
        method: "single",
        ns: single6(xdp, &np6_ack, false, &mut off, single_empty_xdp, floor_xdp)?,
        floor: floor_xdp,
    });

    let mut md = String::from("## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n\n");
    writeln!(md, "Runs: `repeat` = {repeat} per round, `single` = {singles} runs per round; median of {rounds} rounds. See the methods at the top of `bench/src/main.rs`.\n")?;
    md.push_str("| hook | packet | method | ns/packet | over floor | ratio to floor |\n|---|---|---|---:|---:|---:|\n");
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:+.1} | {:.2}x |",
            r.hook,
            r.what,
            r.method,
            r.ns,
            r.ns - r.floor,
            r.ns / r.floor
        )?;
    }
    md.push('\n');
    Ok(PerPacket { markdown: md, svg: svg(&rows) })
}

/// A horizontal bar chart of the per-packet rows.
fn svg(rows: &[Row]) -> String {
    let max = rows.iter().map(|r| r.ns).fold(1.0, f64::max);
    let (w, bar_h, left) = (760.0, 22.0, 330.0);
    let h = 40.0 + rows.len() as f64 * (bar_h + 8.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">lb per-packet cost, ns (BPF_PROG_TEST_RUN)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 34.0 + i as f64 * (bar_h + 8.0);
        let len = (w - left - 70.0) * r.ns / max;
        let colour = if r.what.starts_with("empty") {
            "#999"
        } else if r.hook == "xdp" {
            "#3a7"
        } else {
            "#37a"
        };
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.0}\">{} {}</text><rect x=\"{left}\" y=\"{y:.0}\" width=\"{len:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/><text x=\"{:.0}\" y=\"{:.0}\">{:.0}</text>",
            y + 15.0,
            r.hook,
            r.what,
            left + len + 5.0,
            y + 15.0,
            r.ns
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Bytes the kernel accounts to a pinned map (`memlock` in fdinfo).
fn map_memory(pin: &Path, name: &str) -> Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let map = aya::maps::MapData::from_pin(pin.join(name)).with_context(|| format!("opening {name}"))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:").map(|v| v.trim().parse::<u64>()))
        .context("no memlock in fdinfo")?
        .context("memlock is not a number")
}

fn scale(opts: &Opts) -> Result<String> {
    let sizes: &[usize] = if opts.quick { &[1, 1_000] } else { &[1, 1_000, 10_000, 100_000] };
    let (singles, rounds) = if opts.quick { (20_000, 3) } else { (200_000, 5) };
    let mut md = String::from("## 2. Cost at scale\n\nEach Service has 3 to 10 endpoints. Per-packet rows use the `single` method on the tc program (floor and empty loop measured in the same run); programming is one `apply` of the whole set into empty maps.\n\n| services | programming | new flow ns | established ns | pass-through ns (repeat) | new flow vs 1 service |\n|---:|---:|---:|---:|---:|---:|\n");
    let mut first_new = None;
    let mut mem_rows = String::new();
    for &n in sizes {
        progress(&format!("  {n} services"));
        // Room for every Service's Maglev table (about 16 slots a backend) and backend.
        let map_sizes = MapSizes { maglev: 16 << 20, backends: 1 << 20, ..MapSizes::default() };
        let mut loaded = load(&format!("scale{n}"), Config { sizes: map_sizes, ..Config::default() })?;
        let state = services(n, false);
        let t = Instant::now();
        let report = loaded.dp.apply(&state);
        let programming = t.elapsed();
        if !report.errors.is_empty() {
            bail!("programming {n} services: {:?}", &report.errors[..report.errors.len().min(3)]);
        }
        let dp = &loaded.dp;
        let (_, empty_tc) = dp.floor_programs();
        let tc = dp.tc_program();
        let target = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + (n / 2) as u32);
        let other = frame(
            (Ipv4Addr::new(10, 244, 1, 5), 40000),
            (Ipv4Addr::new(10, 244, 1, 6), 80),
            L4::Tcp { flags: 0x10 },
            b"x",
        );
        let mut off = 0u32;
        let floor = by_repeat(empty_tc, &other, 1_000_000.min(singles * 5), rounds)?;
        let empty_single = by_single(empty_tc, &other, singles, rounds, false, &mut off)?;
        let new_flow =
            floor + (by_single(tc, &syn(0, (target, 80)), singles, rounds, true, &mut off)? - empty_single).max(0.0);
        let est = syn(u32::MAX >> 2, (target, 80));
        tc.run(&est, 1)?;
        let mut ack = est.clone();
        ack[47] = 0x10;
        let established = floor + (by_single(tc, &ack, singles, rounds, false, &mut off)? - empty_single).max(0.0);
        let pass = by_repeat(tc, &other, 1_000_000.min(singles * 5), rounds)?;
        let base = *first_new.get_or_insert(new_flow);
        writeln!(
            md,
            "| {n} | {:.3} s | {new_flow:.1} | {established:.1} | {pass:.1} | {:.2}x |",
            programming.as_secs_f64(),
            new_flow / base
        )?;
        if n == *sizes.last().expect("non-empty") {
            let service_bytes: u64 =
                ["LB_SERVICES", "LB_MAGLEV", "LB_BACKENDS", "LB_BACKEND_MEMBERS", "LB_SERVICE_NAMES"]
                    .iter()
                    .map(|m| map_memory(&loaded.pin, m))
                    .sum::<Result<u64>>()?;
            let ct = map_memory(&loaded.pin, lb_common::MAP_CT4)?;
            let ct_new = map_memory(&loaded.pin, lb_common::MAP_CT4_NEW)?;
            let endpoints: usize = state.services.values().map(|s| s.backends.len()).sum();
            writeln!(
                mem_rows,
                "\nMap memory (kernel `memlock` accounting) with {n} services and {endpoints} endpoints: {:.0} bytes per service (services, Maglev tables and backends (preallocated arrays: their share at this size), memberships, names). Conntrack is preallocated: the assured table's {} entries take {:.1} MiB, the new-flow table's {} entries {:.1} MiB; {:.0} bytes per flow (two entries, key and value {} bytes each, with the kernel's element header).\n",
                service_bytes as f64 / n as f64,
                lb_common::CONNTRACK_MAX_ENTRIES,
                ct as f64 / (1 << 20) as f64,
                lb_common::CONNTRACK_NEW_MAX_ENTRIES,
                ct_new as f64 / (1 << 20) as f64,
                2.0 * ct as f64 / lb_common::CONNTRACK_MAX_ENTRIES as f64,
                std::mem::size_of::<lb_common::CtKey4>() + std::mem::size_of::<lb_common::CtValue4>()
            )?;
        }
    }
    md.push_str(&mem_rows);
    md.push('\n');
    Ok(md)
}

// ---------- 3. real TCP through namespaces ----------

const BENCH_VIP_BASE: u32 = 0x0a60_0000; // 10.96.0.0

fn vip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(BENCH_VIP_BASE + 10 + i as u32)
}

/// YAML for `n` Services with HTTP (80) and sink (9000) ports over `backends`.
fn bench_manifests(n: usize, backends: &[Pod]) -> String {
    bench_manifests_range(0..n, backends)
}

/// YAML for Services number `range`.
fn bench_manifests_range(range: std::ops::Range<usize>, backends: &[Pod]) -> String {
    let mut y = String::with_capacity(range.len() * 600);
    let eps: String =
        backends.iter().map(|p| format!("- addresses: [\"{}\"]\n  nodeName: {}\n", p.ip, p.node)).collect();
    for i in range {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  clusterIP: {}\n  ports:\n  - {{name: http, port: 80}}\n  - {{name: sink, port: 9000}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 80}}\n- {{name: sink, port: 9000}}\nendpoints:\n{eps}",
            vip_of(i)
        );
    }
    y
}

/// kube-proxy-style iptables rules for the same Services: KUBE-SERVICES -> KUBE-SVC-* (random
/// probabilities, as kube-proxy writes them) -> KUBE-SEP-* (DNAT).
fn iptables_rules(n: usize, backends: &[Pod]) -> String {
    let mut r = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for i in 0..n {
        for (port, pname) in [(80, "HTTP"), (9000, "SINK")] {
            let svc = format!("KUBE-SVC-{i:06}{pname}");
            let _ = writeln!(r, ":{svc} - [0:0]");
            let _ = writeln!(rules, "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {port} -j {svc}", vip_of(i));
            let k = backends.len();
            for (j, b) in backends.iter().enumerate() {
                let sep = format!("KUBE-SEP-{i:06}{pname}{j}");
                let _ = writeln!(r, ":{sep} - [0:0]");
                if j + 1 < k {
                    let _ = writeln!(
                        rules,
                        "-A {svc} -m statistic --mode random --probability {:.10} -j {sep}",
                        1.0 / (k - j) as f64
                    );
                } else {
                    let _ = writeln!(rules, "-A {svc} -j {sep}");
                }
                let _ = writeln!(rules, "-A {sep} -p tcp -m tcp -j DNAT --to-destination {}:{port}", b.ip);
            }
        }
    }
    r.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n");
    r.push_str(&rules);
    r.push_str("COMMIT\n");
    r
}

/// Connections per second, one HTTP request each, from `threads` threads in `ns`, spread in
/// turn over `addrs`.
fn conn_rate(ns: &str, addrs: &[SocketAddr], secs: f64, threads: usize) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ns = ns.to_string();
            let addrs = addrs.to_vec();
            std::thread::spawn(move || -> Result<u64> {
                lb_tests::in_ns(&ns, || -> Result<u64> {
                    let mut done = 0u64;
                    let mut buf = [0u8; 512];
                    while Instant::now() < deadline {
                        let addr = addrs[(done as usize + t) % addrs.len()];
                        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                        c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                        while c.read(&mut buf)? > 0 {}
                        // Close with RST once the server's FIN is in: no TIME_WAIT on either
                        // side. Otherwise a later run through another path (another NAT, other
                        // timestamp offsets) reuses client ports the server still holds in
                        // TIME_WAIT, PAWS rejects the SYN, and the client stalls a second.
                        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
                        done += 1;
                    }
                    Ok(done)
                })?
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(total as f64 / secs)
}

/// Bulk throughput of one TCP stream from `ns` to `addr`, in Gbit/s.
fn bulk(ns: &str, addr: SocketAddr, secs: f64) -> Result<f64> {
    lb_tests::in_ns(ns, || -> Result<f64> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        let chunk = vec![0x5au8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            c.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        Ok(sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    })?
}

struct E2eRow {
    size: usize,
    path: String,
    conns: f64,
    gbps: f64,
}

/// Real TCP through kube-proxy-style iptables rules written here and through lb (YAML mode), at
/// `fallback_for` sizes (with a heading saying they stand in for the real kube-proxy in
/// iptables mode, which did not serve there), or at every size when the Kubernetes binaries
/// are missing.
fn end_to_end(opts: &Opts, fallback_for: Option<&[usize]>) -> Result<String> {
    let sizes: &[usize] = match fallback_for {
        Some(sizes) => sizes,
        None if opts.quick => &[1],
        None => &[1, 1_000, 10_000],
    };
    let secs = if opts.quick { 1.0 } else { 3.0 };
    let mut lab = Lab::new()?;
    let a = lab.add_node("bench-a", 1)?;
    let b = lab.add_node("bench-b", 2)?;
    lab.link_nodes(&a, &b)?;
    let client = lab.add_pod(&a, "client", 100)?;
    let mut backends = Vec::new();
    for i in 0..3u8 {
        let p = lab.add_pod(&b, &format!("backend-{i}"), 11 + i)?;
        lab.serve_with(&p, &[80], &[], &[], &[9000])?;
        backends.push(p);
    }
    let mut rows = Vec::new();
    let measure =
        |path: String, size: usize, http: &[SocketAddr], sink: SocketAddr, rows: &mut Vec<E2eRow>| -> Result<()> {
            progress(&format!("  {size} services: {path}"));
            let conns = conn_rate(&client.ns, http, secs, 2)?;
            let gbps = bulk(&client.ns, sink, secs)?;
            rows.push(E2eRow { size, path, conns, gbps });
            Ok(())
        };
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let mut control = String::new();
    for &n in sizes {
        // The limit: the same three backends, addressed directly in turn.
        let direct: Vec<SocketAddr> = backends.iter().map(|b| at(b.ip, 80)).collect();
        measure("direct to the backends (the limit)".into(), n, &direct, at(backends[0].ip, 9000), &mut rows)?;
        // iptables, as kube-proxy: the cost depends on where the Service sits in KUBE-SERVICES.
        let rules = iptables_rules(n, &backends);
        let file = lab.dir.join("rules.txt");
        std::fs::write(&file, &rules)?;
        let t = Instant::now();
        lab.exec(&a.ns, &["iptables-restore", file.to_str().expect("utf-8")])
            .context("iptables-restore (is iptables installed?)")?;
        let restore = t.elapsed();
        let positions: Vec<(&str, usize)> =
            if n == 1 { vec![("only", 0)] } else { vec![("first", 0), ("middle", n / 2), ("last", n - 1)] };
        for (pos, i) in &positions {
            measure(
                format!("iptables, Service {pos} in KUBE-SERVICES"),
                n,
                &[at(vip_of(*i), 80)],
                at(vip_of(*i), 9000),
                &mut rows,
            )?;
        }
        lab.exec(&a.ns, &["iptables", "-t", "nat", "-F"])?;
        lab.exec(&a.ns, &["iptables", "-t", "nat", "-X"])?;
        // lb, on the same Services.
        lab.write_manifests(&a, &bench_manifests(n, &backends))?;
        let t = Instant::now();
        start_bench_agent(&mut lab, &a, &client, 2 * n)?;
        let ready = t.elapsed();
        for (pos, i) in &positions {
            measure(format!("lb, Service {pos}"), n, &[at(vip_of(*i), 80)], at(vip_of(*i), 9000), &mut rows)?;
        }
        // The limit again, after the other paths: this 2-core machine is noisy, and a baseline
        // taken at both ends of the round is less at the mercy of one moment.
        measure("direct to the backends (the limit)".into(), n, &direct, at(backends[0].ip, 9000), &mut rows)?;
        // Control plane: a new Service appended to the manifests, until it serves.
        let mut yaml = bench_manifests(n + 1, &backends);
        yaml.push('\n');
        let t = Instant::now();
        lab.write_manifests(&a, &yaml)?;
        wait_serving(&client.ns, at(vip_of(n), 80), t, Duration::from_secs(60))
            .with_context(|| format!("agent log:\n{}", lab.agent_log(&a)))?;
        let change = t.elapsed();
        lab.kill_agent(&a);
        lab.exec(&a.ns, &["true"])?;
        let _ = std::fs::remove_dir_all(&a.pin_dir);
        writeln!(
            control,
            "| {n} | {:.2} s | {:.2} s | {:.2} s |",
            restore.as_secs_f64(),
            ready.as_secs_f64(),
            change.as_secs_f64()
        )?;
    }
    let mut md = match fallback_for {
        Some(sizes) => format!("## 3c. Where kube-proxy in iptables mode did not serve: the rules it would write\n\nkube-proxy in iptables mode was not serving {} Services after {} s (section 4), so at {} the reference is the rules it writes, written and restored by this bench in one `iptables-restore`, with lb (YAML mode) on the same Services in the same round. ", sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "), real::START_LIMIT.as_secs(), if sizes.len() == 1 { "that size" } else { "those sizes" }),
        None => "## 3. Real TCP through network namespaces\n\n".to_string(),
    };
    md += &format!("A client pod on one node, three backend pods on another, joined by an underlay veth; each Service has an HTTP port (one request per connection, {secs:.0} s, 2 client threads) and a sink port (one bulk stream, {secs:.0} s). The same Services are served directly, by kube-proxy-style iptables rules on the client's node (KUBE-SERVICES -> KUBE-SVC-* with random probabilities -> KUBE-SEP-* DNAT), and by lb (tc only: no XDP program is attached in any of these runs, so GSO is the same everywhere).\n\n| services | path | connections/s | vs direct | bulk Gbit/s | vs direct |\n|---:|---|---:|---:|---:|---:|\n");
    // The two measurements of the direct path are averaged into one row per size.
    let mut shown: Vec<E2eRow> = Vec::new();
    for r in rows {
        match shown.iter_mut().find(|d| d.size == r.size && d.path.starts_with(&r.path)) {
            Some(d) => {
                d.conns = (d.conns + r.conns) / 2.0;
                d.gbps = (d.gbps + r.gbps) / 2.0;
                d.path = format!("{}, mean of runs before and after the others", r.path);
            }
            None => shown.push(r),
        }
    }
    for r in &shown {
        let direct = shown.iter().find(|d| d.size == r.size && d.path.starts_with("direct")).expect("measured first");
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.2}x | {:.2} | {:.2}x |",
            r.size,
            r.path,
            r.conns,
            r.conns / direct.conns,
            r.gbps,
            r.gbps / direct.gbps
        )?;
    }
    let heading = if fallback_for.is_some() {
        "4c. Control plane beside the rules kube-proxy in iptables mode would write"
    } else {
        "4. Control plane"
    };
    md.push_str(&format!("\n## {heading}\n\n| services | iptables-restore of the same rules | lb: start to serving every Service | lb: manifest change to new Service serving |\n|---:|---:|---:|---:|\n"));
    md.push_str(&control);
    md.push_str("\nProgramming time of the maps alone is in section 2.\n\n");
    Ok(md)
}

/// The API path at scale: the agent lists `n` Services and their slices from the test API
/// server, then one Service is created. Timed: agent start to serving every Service; the new
/// Service's creation to its first accepted connection; and the agent's own time to translate
/// and apply that one change (its log): only the changed Services are translated.
fn api_control_plane(_opts: &Opts, sizes: &[usize]) -> Result<String> {
    let mut md = String::from("## 4b. Control plane through the API server

The agent against the test API server (`tests/src/apiserver.rs`, the real list/watch protocol) on one node, with `n` Services of two ports each over three pods. `sync` is the agent's own time for the change (`took_ms`): only the changed Services are translated and only their frontends written, as kube-proxy's change trackers do.

| services | agent start to serving every Service | one new Service to serving | sync for that change |
|---:|---:|---:|---:|
");
    for &n in sizes {
        progress(&format!("  {n} services through the API server"));
        let mut lab = Lab::new()?;
        let node = lab.add_node("bench-api", 3)?;
        let client = lab.add_pod(&node, "client", 100)?;
        let mut backends = Vec::new();
        for i in 0..3u8 {
            let p = lab.add_pod(&node, &format!("backend-{i}"), 11 + i)?;
            lab.serve(&p, &[80], &[], &[])?;
            backends.push(p);
        }
        let api = lb_tests::apiserver::TestApiServer::start(&node.ns, "127.0.0.1:6443".parse()?, &lab.dir)?;
        let objects = |i: usize| {
            let eps: Vec<serde_json::Value> = backends
                .iter()
                .map(|p| serde_json::json!({"addresses": [p.ip.to_string()], "nodeName": p.node}))
                .collect();
            (
                serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
                    "spec": {"clusterIP": vip_of(i).to_string(), "ports": [{"name": "http", "port": 80}, {"name": "sink", "port": 9000}]}}),
                serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("svc-{i}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 80}, {"name": "sink", "port": 9000}], "endpoints": eps}),
            )
        };
        for i in 0..n {
            let (svc, slice) = objects(i);
            api.apply(svc)?;
            api.apply(slice)?;
        }
        api.compact();
        let t = Instant::now();
        let kc = api.kubeconfig().to_str().context("utf-8 path")?.to_string();
        lab.spawn_agent(
            &node,
            &["--kubeconfig", &kc],
            &[
                "--no-xdp",
                "--no-socket-lb",
                "--metrics-addr",
                "",
                "--map-maglev",
                "16777216",
                "--map-backends",
                "1048576",
            ],
        )?;
        while !lab.agent_log(&node).contains("agent ready") {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("agent not ready after 300 s:\n{}", lab.agent_log(&node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready = t.elapsed();
        // The test API server shares its object map with the agent's list snapshot, so its
        // first write after that list copies all 2n objects (copy on write, under its lock):
        // a cost of this test server, not of the agent. One untimed change (another Service)
        // takes that copy out of the timed one.
        let settled = lab.agent_log(&node).matches("desired state applied").count();
        // A real change (an unchanged object is not one: the agent skips it).
        let (warm_svc, warm_slice) = objects(n + 1);
        api.apply(warm_svc)?;
        api.apply(warm_slice)?;
        let waited = Instant::now();
        while lab.agent_log(&node).matches("desired state applied").count() == settled {
            if waited.elapsed() > Duration::from_secs(30) {
                bail!("no sync for the untimed write after 30 s:\n{}", lab.agent_log(&node));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = lab.agent_log(&node).matches("desired state applied").count();
        let (svc, slice) = objects(n);
        let t = Instant::now();
        api.apply(svc)?;
        api.apply(slice)?;
        wait_serving(&client.ns, SocketAddr::from((vip_of(n), 80)), t, Duration::from_secs(120))?;
        let change = t.elapsed();
        let (sync, syncs) = last_sync_us(&lab, &node, before)?;
        writeln!(
            md,
            "| {n} | {:.2} s | {:.3} s | {:.2} ms ({syncs} sync{}) |",
            ready.as_secs_f64(),
            change.as_secs_f64(),
            sync as f64 / 1000.0,
            if syncs == 1 { "" } else { "s" }
        )?;
        drop(api);
    }
    md.push('\n');
    Ok(md)
}

/// The agent's own time (µs) for the sync that applied one change: the longest `took_us` of the
/// "desired state applied" line after the first `before` ones (waiting a little for it: the
/// line follows the map writes that made the change serve).
fn last_sync_us(lab: &Lab, node: &Node, before: usize) -> Result<(u64, usize)> {
    let applied = |log: &str| log.matches("desired state applied").count();
    let waited = Instant::now();
    while applied(&lab.agent_log(node)) == before && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second sync (a slice after its Service) logs right after the one that served.
    std::thread::sleep(Duration::from_millis(300));
    let log = lab.agent_log(node);
    let took: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("desired state applied"))
        .skip(before)
        .filter_map(|l| l.split("took_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    Ok((took.iter().copied().max().context("no sync logged for the change")?, took.len()))
}

/// The YAML source at scale: `n` Services (two ports each) in files of 1,000, then one new
/// file with one Service. Timed: agent start to serving every Service; the new file written to
/// the new Service's first accepted connection; the agent's own sync time for that change
/// (only the new file is read, and only the new Service translated and written).
fn yaml_control_plane(opts: &Opts) -> Result<String> {
    let sizes: &[usize] = if opts.quick { &[100] } else { &[1_000, 10_000, 100_000] };
    let mut md = String::from("## 4c. Control plane from YAML files

The agent with `--manifests DIR`: `n` Services of two ports each over three pods, in files of 1,000 Services, then one new file holding one more Service. `sync` is the agent's own time for that change (`took_ms`: translation of the changed Services and the map writes).

| services | agent start to serving every Service | one new Service (new file) to serving | sync for that change |
|---:|---:|---:|---:|
");
    for &n in sizes {
        progress(&format!("  {n} services from YAML files"));
        let mut lab = Lab::new()?;
        let node = lab.add_node("bench-yaml", 4)?;
        let client = lab.add_pod(&node, "client", 100)?;
        let mut backends = Vec::new();
        for i in 0..3u8 {
            let p = lab.add_pod(&node, &format!("backend-{i}"), 11 + i)?;
            lab.serve(&p, &[80], &[], &[])?;
            backends.push(p);
        }
        let dir = lab.dir.join("objects");
        std::fs::create_dir_all(&dir)?;
        for (f, start) in (0..n).step_by(1_000).enumerate() {
            let yaml = bench_manifests_range(start..(start + 1_000).min(n), &backends);
            std::fs::write(dir.join(format!("svc-{f:04}.yaml")), yaml)?;
        }
        let t = Instant::now();
        let dir_arg = dir.to_str().context("utf-8 path")?.to_string();
        // Maps sized for 100,000 Services of two ports over three pods, as in section 4b.
        lab.spawn_agent(
            &node,
            &["--manifests", &dir_arg],
            &[
                "--no-xdp",
                "--no-socket-lb",
                "--metrics-addr",
                "",
                "--map-maglev",
                "16777216",
                "--map-backends",
                "1048576",
            ],
        )?;
        while !lab.agent_log(&node).contains("agent ready") {
            if t.elapsed() > Duration::from_secs(600) {
                bail!("agent not ready after 600 s:\n{}", lab.agent_log(&node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_serving(&client.ns, SocketAddr::from((vip_of(n - 1), 80)), t, Duration::from_secs(600))?;
        let ready = t.elapsed();
        let before = lab.agent_log(&node).matches("desired state applied").count();
        let t = Instant::now();
        // Written then renamed in, as any careful writer does.
        let tmp = lab.dir.join("new.yaml.tmp");
        std::fs::write(&tmp, bench_manifests_range(n..n + 1, &backends))?;
        std::fs::rename(&tmp, dir.join("new.yaml"))?;
        wait_serving(&client.ns, SocketAddr::from((vip_of(n), 80)), t, Duration::from_secs(120))?;
        let change = t.elapsed();
        let (sync, syncs) = last_sync_us(&lab, &node, before)?;
        writeln!(
            md,
            "| {n} | {:.2} s | {:.3} s | {:.2} ms ({syncs} sync{}) |",
            ready.as_secs_f64(),
            change.as_secs_f64(),
            sync as f64 / 1000.0,
            if syncs == 1 { "" } else { "s" }
        )?;
    }
    md.push('\n');
    Ok(md)
}

/// Waits until a connection from `ns` to `vip` is accepted, at most `limit` after `since`.
/// Short connect timeouts: a SYN sent before the Service exists is lost, and waiting for its
/// retransmission would measure TCP's 1 s timer, not lb; the timeout is also the figure's
/// resolution (a handshake through these veths takes well under a millisecond), so it is
/// 10 ms (it was 50 ms, which put a lost first SYN's 50 ms into a 20 ms change).
fn wait_serving(ns: &str, vip: SocketAddr, since: Instant, limit: Duration) -> Result<()> {
    let serving =
        || lb_tests::in_ns(ns, || TcpStream::connect_timeout(&vip, Duration::from_millis(10)).is_ok()).unwrap_or(false);
    while !serving() {
        if since.elapsed() > limit {
            bail!("the new Service at {vip} was not served within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn start_bench_agent(lab: &mut Lab, node: &Node, client: &Pod, frontends: usize) -> Result<()> {
    lab.start_agent(node, &["cbr0", "ul0", client.host_if.as_str()], frontends, &["--no-xdp", "--no-socket-lb"])
}

// ---------- 5. verifier ----------

/// An IPv6 address as the datapath's globals hold it: four words in packet order.
fn ip6_words(o: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

fn verifier() -> Result<String> {
    // Each program loaded (verified) on its own, timed, from a fresh copy of the object.
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-verifier", std::process::id()));
    std::fs::create_dir_all(&pin)?;
    let result = (|| -> Result<String> {
        // Non-zero globals as the agent sets them: with zeros in the frozen .rodata the verifier
        // would prune the socket programs and the SNAT path as dead code.
        let (cookie, node_ip) = (1u64, u32::from_ne_bytes([192, 168, 49, 2]));
        let node_ip6: [u32; 4] = ip6_words("fd00:c0a8:31::2".parse::<std::net::Ipv6Addr>()?.octets());
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pin)
            .override_global("NETNS_COOKIE", &cookie, true)
            .override_global("NODE_IP", &node_ip, true)
            .override_global("NODE_IP6", &node_ip6, true)
            .load(lb_userspace::EBPF_OBJECT)?;
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        let mut rows = Vec::new();
        for name in names {
            let prog = ebpf.program_mut(&name).context("program listed above")?;
            let t = Instant::now();
            let loaded = match prog {
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                _ => bail!("{name}: unexpected program type"),
            };
            loaded.with_context(|| format!("{name} refused by the verifier"))?;
            let took = t.elapsed();
            let info = prog.info().with_context(|| format!("info of {name}"))?;
            rows.push((
                name,
                info.verified_instruction_count().map_or("?".into(), |v| v.to_string()),
                info.size_translated().map_or("?".into(), |v| v.to_string()),
                info.size_jitted(),
                took,
            ));
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut md = String::from("## 5. Verifier\n\nEach program loaded on its own from a fresh copy of the object.\n\n| program | instructions verified | load and verification time | translated bytes | JIT bytes |\n|---|---:|---:|---:|---:|\n");
        for (name, insns, xlated, jited, took) in rows {
            writeln!(md, "| {name} | {insns} | {:.1} ms | {xlated} | {jited} |", took.as_secs_f64() * 1e3)?;
        }
        md.push('\n');
        Ok(md)
    })();
    let _ = std::fs::remove_dir_all(&pin);
    result
}
