//! `lb`: eBPF Kubernetes Service load balancer. The command line: `lb run` starts the agent
//! (`agent.rs`); `lb list` inspects the pinned maps of a running one; `lb cleanup` removes them.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{Counter, CT_DIR_FORWARD};
use lb_userspace::{
    agent,
    dataplane::{self, decode_name, endpoint_of, frontend_of, ip_of, Config, MapSizes, Maps, Timeouts},
    model::{self, Protocol},
};
use tracing::warn;

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF Kubernetes Service load balancer (kube-proxy replacement)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: program the datapath from Kubernetes objects and keep it in sync.
    Run(Box<RunArgs>),
    /// Show the state of a running agent, read from its pinned maps.
    List {
        what: ListWhat,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach the programs and remove every pinned map and link under the pin directory.
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser, Debug)]
struct RunArgs {
    /// YAML file whose keys are these flags' long names (`node-name: n1`, `map-conntrack:
    /// 1048576`, lists as YAML lists). A flag given on the command line wins over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubernetes YAML instead of the API server: a file (multi-document allowed) or a
    /// directory of .yaml/.yml/.json files. Watched; changes are applied within about a second.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig to reach the API server. Default: as any client (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// At least one sync per period; /healthz and /livez fail when a change has waited twice
    /// as long without being applied (kube-proxy's --sync-period), seconds.
    #[arg(long, default_value_t = 30)]
    sync_period: u64,
    /// Everything is translated and compared with the maps again this often (the incremental
    /// translation is checked against it), seconds.
    #[arg(long, default_value_t = 3600)]
    full_sync_period: u64,
    /// Per-frontend packet and byte series in /metrics (two series per frontend).
    #[arg(long)]
    metrics_per_frontend: bool,
    /// Translate IPv6 Services (the IPv6 programs, tail-called by the IPv4 ones for IPv6
    /// frames at tc and XDP). `--ipv6 false` leaves IPv6 traffic untranslated.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ipv6: bool,
    /// Prometheus metrics (and /healthz) address; empty string disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// /healthz address (200 once the first state is programmed and attached); empty disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: String,
    /// Name of this node, as in EndpointSlice `nodeName`.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where maps and links are pinned. One directory per agent.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Attach the tc program only to interfaces matching these globs (`*`, `?`). Default: all
    /// but `lo`. A VLAN's traffic is served at its VLAN device, not the parent: name both.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// The node's external interfaces, where the XDP program handles node ports, LoadBalancer
    /// and external IPs ahead of the stack (globs). Default: the default route's interface.
    #[arg(long = "xdp-iface")]
    xdp_ifaces: Vec<String>,
    /// How to attach XDP: `auto` (per interface: native where the driver transmits native XDP
    /// frames, as the kernel's xdp-features say, else none and tc alone), `native` (driver mode
    /// everywhere; packets the driver cannot send go to tc), or `generic` (skb mode everywhere:
    /// works on every device, but costs an skb before XDP runs and linearizes GRO packets).
    #[arg(long, value_enum, default_value_t = dataplane::XdpAttachMode::Auto)]
    xdp_mode: dataplane::XdpAttachMode,
    /// cgroup v2 directory whose processes get socket-level translation (the node's own
    /// processes reaching ClusterIPs and node ports). Default: the cgroup2 mount.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// No socket-level translation: the node's own processes then cannot reach ClusterIPs.
    #[arg(long, conflicts_with = "cgroup")]
    no_socket_lb: bool,
    /// Attach no XDP program (tc alone then does everything).
    #[arg(long, conflicts_with = "xdp_ifaces")]
    no_xdp: bool,
    /// Conntrack lifetime of an established TCP flow, seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_established_s)]
    ct_tcp_established_timeout: u64,
    /// Conntrack lifetime of a TCP flow after a RST (CLOSE), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_close_s)]
    ct_tcp_close_timeout: u64,
    /// Conntrack lifetime of a TCP flow in its handshake (SYN_SENT, SYN_RECV), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_syn_s)]
    ct_tcp_syn_timeout: u64,
    /// Conntrack lifetime of an idle half-closed TCP flow (FIN_WAIT, CLOSE_WAIT), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_fin_wait_s)]
    ct_tcp_fin_wait_timeout: u64,
    /// Conntrack lifetime of a TCP flow closed both ways awaiting the last ACK (LAST_ACK), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_last_ack_s)]
    ct_tcp_last_ack_timeout: u64,
    /// Conntrack lifetime of a closed TCP flow (TIME_WAIT), seconds. A new SYN on its tuple
    /// starts a new flow at any time.
    #[arg(long, default_value_t = Timeouts::default().tcp_time_wait_s)]
    ct_tcp_time_wait_timeout: u64,
    /// Conntrack lifetime of an idle UDP flow, seconds.
    #[arg(long, default_value_t = Timeouts::default().udp_s)]
    ct_udp_timeout: u64,
    /// Address that external traffic to a backend on another node is SNATed to (so replies
    /// return through this node). Default: the IPv4 address of the default route's interface.
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,
    /// The same for IPv6 traffic. Default: the first global IPv6 address of the IPv6 default
    /// route's interface (else of the IPv4 default route's).
    #[arg(long)]
    node_ip6: Option<std::net::Ipv6Addr>,
    /// Node ports (and health check node ports) answer only on node addresses inside these
    /// CIDRs, IPv4 or IPv6 (comma-separated or repeated); a family none of them is of keeps
    /// every address, as kube-proxy's. Default: every address of the node but loopback and
    /// IPv6 link-local ones.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<model::Cidr>,
    /// Relax the kernel's reverse-path filter on the interfaces lb attaches to: strict
    /// filtering (`rp_filter` 1) made loose (2) where the interface has an IPv4 address, turned
    /// off where it has none, with `conf/all` taken to 0 (the other interfaces' own values
    /// raised to keep their mode). Off by default: the datapath hands the stack nothing whose
    /// source the filter refuses (replies are restored at egress, after the input route), but
    /// for a reply of a flow SNATed to the node that tc finds no route for (a policy route,
    /// encapsulation) and hands on translated, which this lets through.
    #[arg(long)]
    relax_rp_filter: bool,
    /// Leave the kernel's reverse-path filter alone: the default since 2026-12-06, so it does
    /// nothing (accepted so that configurations naming it keep working; `--relax-rp-filter`
    /// beside it still relaxes).
    #[arg(long, hide = true)]
    keep_rp_filter: bool,
    /// Where the host's `/proc/sys` is, for `--relax-rp-filter` (a container's own is
    /// read-only: mount the host's `/proc/sys/net` writable and point this at its parent).
    #[arg(long, default_value = "/proc/sys")]
    proc_sys: PathBuf,
    /// The cluster's pod CIDRs, IPv4 or IPv6 (comma-separated or repeated), as kube-proxy's `--cluster-cidr`:
    /// traffic from them (and from this node's `spec.podCIDRs`, and the node itself) to an
    /// external frontend of an `externalTrafficPolicy: Local` Service goes to cluster-wide
    /// endpoints; only traffic from outside stays on this node's. Traffic from outside them to
    /// a ClusterIP (a service CIDR routed or advertised beyond the cluster) is SNATed to the
    /// node on its way to a remote backend (kube-proxy masquerades it to local ones too).
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<model::Cidr>,
    /// Capacity of the services map (frontends).
    #[arg(long, default_value_t = MapSizes::default().services)]
    map_services: u32,
    /// Capacity of the backends array (distinct backend addresses and ports).
    #[arg(long, default_value_t = MapSizes::default().backends)]
    map_backends: u32,
    /// Capacity of the Maglev tables array (slots over all frontends: about 16 per backend
    /// of each frontend).
    #[arg(long, default_value_t = MapSizes::default().maglev)]
    map_maglev: u32,
    /// Capacity of the assured conntrack table: live connections, two entries each, never
    /// evicted (a flow that finds it full stays in the new-flow table, counted as
    /// ct_assured_full).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    map_conntrack: u32,
    /// Capacity of each family's conntrack table of new and finished flows (two entries
    /// each): an array of sets of four ways (rounded up to whole sets), where a new flow pushes
    /// out a live unassured one only when its set is full (counted as ct_new_evicted).
    #[arg(long, default_value_t = MapSizes::default().conntrack_new)]
    map_conntrack_new: u32,
    /// Capacity of the session affinity map (client, service) pins (LRU).
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    map_affinity: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = parse_cli(std::env::args_os().collect()).context("reading the configuration")?;
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting runtime")?;
            let opts = options(*args)?;
            rt.block_on(agent::run(opts)).map_err(anyhow::Error::from)
        }
        Command::List { what, pin_dir } => list(what, &pin_dir),
        Command::Cleanup { pin_dir } => {
            dataplane::cleanup(&pin_dir).with_context(|| format!("cleaning {}", pin_dir.display()))
        }
    }
}

/// Parses the command line; for `lb run --config FILE`, the file's keys become flags placed
/// before the command line's, unless the command line sets the same flag.
fn parse_cli(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    use clap::{parser::ValueSource, CommandFactory};
    // A lenient first pass finds `--config` and which flags the command line sets; required
    // flags may be in the file.
    let matches = Cli::command().ignore_errors(true).try_get_matches_from(&argv).unwrap_or_default();
    let Some(("run", run)) = matches.subcommand() else {
        return Ok(Cli::parse_from(argv));
    };
    let Some(path) = run.get_one::<PathBuf>("config") else {
        return Ok(Cli::parse_from(argv));
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let file: serde_yaml::Mapping =
        serde_yaml::from_str(&text).with_context(|| format!("config file {}: not a YAML mapping", path.display()))?;
    let cmd = RunArgs::command();
    let mut from_file: Vec<std::ffi::OsString> = Vec::new();
    for (k, v) in file {
        let key = k.as_str().map(str::to_string).unwrap_or_default();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .with_context(|| format!("config file {}: unknown key {key:?}", path.display()))?;
        let id = arg.get_id().as_str();
        if run.value_source(id) == Some(ValueSource::CommandLine) {
            continue;
        }
        let scalar = |v: &serde_yaml::Value| -> anyhow::Result<String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                _ => anyhow::bail!("config file {}: key {key:?}: expected a scalar or a list", path.display()),
            }
        };
        match &v {
            serde_yaml::Value::Bool(b) if !arg.get_action().takes_values() => {
                if *b {
                    from_file.push(format!("--{key}").into());
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in items {
                    from_file.push(format!("--{key}={}", scalar(item)?).into());
                }
            }
            other => from_file.push(format!("--{key}={}", scalar(other)?).into()),
        }
    }
    // argv is `lb [global...] run [args...]`: insert the file's flags right after `run`.
    let at = argv.iter().position(|a| a == "run").map_or(argv.len(), |i| i + 1);
    let mut merged = argv[..at].to_vec();
    merged.extend(from_file);
    merged.extend_from_slice(&argv[at..]);
    Cli::try_parse_from(merged).with_context(|| format!("config file {}", path.display()))
}

fn socket_addr(flag: &str, v: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| format!("--{flag} {v:?}: expected ADDRESS:PORT"))?))
}

/// The agent's options from the command line, defaults taken from this node where a flag is
/// absent (the default route's interface and address).
fn options(args: RunArgs) -> anyhow::Result<agent::Options> {
    let source = match args.manifests {
        Some(path) => agent::SourceOptions::Manifests(path),
        None => agent::SourceOptions::Kube { kubeconfig: args.kubeconfig },
    };
    let xdp_ifaces = if args.no_xdp {
        Vec::new()
    } else if !args.xdp_ifaces.is_empty() {
        args.xdp_ifaces
    } else {
        agent::default_route_interface().into_iter().collect()
    };
    if args.keep_rp_filter && !args.relax_rp_filter {
        tracing::info!("--keep-rp-filter: the reverse-path filter is left alone, the default since 2026-12-06");
    }
    let cgroup = if args.no_socket_lb {
        None
    } else {
        let cg = args.cgroup.or_else(dataplane::cgroup2_mount);
        if cg.is_none() {
            warn!("no cgroup v2 mount: the node's own processes cannot reach ClusterIPs");
        }
        cg
    };
    let cluster_cidr_families = dataplane::ClusterCidrFamilies::of(&args.cluster_cidr);
    Ok(agent::Options {
        metrics_addr: socket_addr("metrics-addr", &args.metrics_addr)?,
        healthz_addr: socket_addr("healthz-addr", &args.healthz_addr)?,
        node_name: args.node_name,
        pin_dir: args.pin_dir,
        source,
        ifaces: args.ifaces,
        xdp_ifaces,
        cgroup,
        nodeport_addresses: args.nodeport_addresses,
        cluster_cidrs: args.cluster_cidr,
        rp_filter: args.relax_rp_filter.then_some(args.proc_sys),
        sync_period: Duration::from_secs(args.sync_period.max(1)),
        full_sync_period: Duration::from_secs(args.full_sync_period.max(1)),
        per_frontend_metrics: args.metrics_per_frontend,
        dataplane: Config {
            timeouts: Timeouts {
                tcp_syn_s: args.ct_tcp_syn_timeout,
                tcp_established_s: args.ct_tcp_established_timeout,
                tcp_close_s: args.ct_tcp_close_timeout,
                tcp_fin_wait_s: args.ct_tcp_fin_wait_timeout,
                tcp_last_ack_s: args.ct_tcp_last_ack_timeout,
                tcp_time_wait_s: args.ct_tcp_time_wait_timeout,
                udp_s: args.ct_udp_timeout,
            },
            sizes: MapSizes {
                services: args.map_services,
                backends: args.map_backends,
                maglev: args.map_maglev,
                conntrack: args.map_conntrack,
                conntrack_new: args.map_conntrack_new,
                affinity: args.map_affinity,
            },
            node_ip: args.node_ip.or_else(agent::default_route_address),
            node_ip6: args.node_ip6.or_else(agent::default_route_address6),
            count_per_frontend: args.metrics_per_frontend,
            ipv6: args.ipv6,
            xdp_mode: args.xdp_mode,
            cluster_cidr_families,
        },
    })
}

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

fn list(what: ListWhat, pin_dir: &Path) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(pin_dir)
        .with_context(|| format!("opening the maps pinned under {} (is an agent running there?)", pin_dir.display()))?;
    let names: std::collections::BTreeMap<u32, String> =
        maps.names.iter().filter_map(Result::ok).map(|(id, n)| (id, decode_name(&n))).collect();
    let name_of = |id: u32| names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
    match what {
        ListWhat::Services => {
            let mut rows: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
            rows.sort_by_key(|(k, v)| frontend_of(k, v.flags));
            let shown = |k: &lb_common::ServiceKey, flags: u32| {
                frontend_of(k, flags).map(|f| f.to_string()).unwrap_or_else(|| "?".into())
            };
            // IPv6 frontends are wider than IPv4 ones.
            let w = rows.iter().map(|(k, v)| shown(k, v.flags).len()).max().unwrap_or(0).max(24);
            println!("{:<6} {:<w$} {:<8} {:<5} {:<16} SERVICE", "ID", "FRONTEND", "BACKENDS", "GEN", "AFFINITY");
            for (k, v) in rows {
                let f = shown(&k, v.flags);
                let affinity = if v.flags & lb_common::SVC_FLAG_AFFINITY != 0 {
                    format!("ClientIP/{}s", v.affinity_timeout_s)
                } else {
                    "None".to_string()
                };
                println!(
                    "{:<6} {:<w$} {:<8} {:<5} {:<16} {}",
                    v.id,
                    f,
                    v.backend_count,
                    v.generation,
                    affinity,
                    name_of(v.id)
                );
            }
        }
        ListWhat::Backends => {
            let services: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
            let mut rows = Vec::new();
            for (k, v) in &services {
                // Each backend and how many of the table's slots it owns.
                let mut owned: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
                for slot in v.table_off..v.table_off + v.table_size {
                    let backend = maps
                        .maglev_slot(slot)
                        .and_then(|id| maps.backends.get(&id, 0))
                        .map(|b| endpoint_of(&b).to_string())
                        .unwrap_or_else(|_| "<missing>".into());
                    *owned.entry(backend).or_default() += 1;
                }
                for (b, n) in owned {
                    rows.push((frontend_of(k, v.flags), format!("{n}/{}", v.table_size), b, name_of(v.id)));
                }
            }
            rows.sort();
            let rows: Vec<_> = rows
                .into_iter()
                .map(|(f, slots, b, n)| (f.map(|f| f.to_string()).unwrap_or_else(|| "?".into()), slots, b, n))
                .collect();
            let wf = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(24);
            let wb = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(22);
            println!("{:<wf$} {:<12} {:<wb$} SERVICE", "FRONTEND", "SLOTS", "BACKEND");
            for (f, slots, b, n) in rows {
                println!("{f:<wf$} {slots:<12} {b:<wb$} {n}");
            }
        }
        ListWhat::Conntrack => {
            let clock = dataplane::clock::Clock::new()?;
            let now = clock.jiffies()?;
            let age = |then: u32| clock.to_secs(now.wrapping_sub(then));
            let mut rows = flow_rows(&dataplane::conntrack::entries(&maps.conntrack, &maps.conntrack_new), age);
            rows.extend(flow_rows(&dataplane::conntrack::entries(&maps.conntrack6, &maps.conntrack6_new), age));
            let w = |i: usize, min: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(min);
            let (ws, wd, wn) = (w(2, 22), w(3, 22), w(4, 26));
            println!(
                "{:<7} {:<5} {:<ws$} {:<wd$} {:<wn$} {:>7} {:>7} {:<11} {:<7} SERVICE",
                "DIR", "PROTO", "SOURCE", "DESTINATION", "TRANSLATED", "AGE(s)", "IDLE(s)", "STATE", "TABLE"
            );
            for r in rows {
                println!(
                    "{:<7} {:<5} {:<ws$} {:<wd$} {:<wn$} {:>7} {:>7} {:<11} {:<7} {}",
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    r[8],
                    name_of(r[9].parse().unwrap_or(0))
                );
            }
        }
        ListWhat::Affinity => {
            let now = monotonic_ns();
            let services: std::collections::BTreeMap<u32, (String, u32)> = maps
                .services
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| {
                    (v.id, (frontend_of(&k, v.flags).map(|f| f.to_string()).unwrap_or_default(), v.affinity_timeout_s))
                })
                .collect();
            let mut rows: Vec<_> = maps.affinity.iter().filter_map(Result::ok).collect();
            rows.sort_by_key(|(k, _)| (k.service_id, ip_of(k.family, k.client)));
            let wc = rows.iter().map(|(k, _)| ip_of(k.family, k.client).to_string().len()).max().unwrap_or(0).max(16);
            let wf = services.values().map(|(f, _)| f.len()).max().unwrap_or(0).max(24);
            let wb = rows.iter().map(|(_, v)| endpoint_of(&v.backend).to_string().len()).max().unwrap_or(0).max(22);
            println!(
                "{:<wc$} {:<wf$} {:<wb$} {:>9} {:>11} SERVICE",
                "CLIENT", "FRONTEND", "BACKEND", "IDLE(s)", "EXPIRES(s)"
            );
            for (k, v) in rows {
                let (frontend, timeout) = services.get(&k.service_id).cloned().unwrap_or_default();
                let idle = now.saturating_sub(v.last_used_ns) / 1_000_000_000;
                let left = (timeout as u64).checked_sub(idle).map_or_else(|| "expired".to_string(), |l| l.to_string());
                println!(
                    "{:<wc$} {:<wf$} {:<wb$} {:>9} {:>11} {}",
                    ip_of(k.family, k.client).to_string(),
                    frontend,
                    endpoint_of(&v.backend).to_string(),
                    idle,
                    left,
                    name_of(k.service_id)
                );
            }
        }
        ListWhat::Stats => {
            println!("{:<24} {:>12} {:>12} {:>12}", "COUNTER", "TC", "XDP", "SOCK");
            for c in Counter::ALL {
                let at = |hook: u32| -> u64 {
                    maps.stats.get(&(hook * lb_common::COUNTER_MAX + c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
                };
                println!("{:<24} {:>12} {:>12} {:>12}", c.name(), at(0), at(1), at(2));
            }
        }
    }
    Ok(())
}

/// The columns of `lb list conntrack` for the flows of one family (the service id last);
/// `age` turns a jiffies stamp into seconds ago.
fn flow_rows<A: dataplane::conntrack::CtAddr>(
    flows: &[dataplane::conntrack::CtEntry<A>],
    age: impl Fn(u32) -> u64,
) -> Vec<[String; 10]> {
    flows
        .iter()
        .map(|(k, v, assured)| {
            let proto = Protocol::from_number(k.proto).map(|p| p.to_string()).unwrap_or_else(|| k.proto.to_string());
            let at = |a: A, p: u16| std::net::SocketAddr::new(a.ip(), u16::from_be(p)).to_string();
            let (src, dst, nat) = (at(k.src, k.sport), at(k.dst, k.dport), at(v.nat_addr, v.nat_port));
            let (dir, nat) = if k.dir == CT_DIR_FORWARD {
                ("forward", format!("dst {nat}"))
            } else {
                ("reply", format!("src {nat}"))
            };
            [
                dir.to_string(),
                proto,
                src,
                dst,
                nat,
                age(v.created).to_string(),
                age(v.last_seen).to_string(),
                lb_common::ct_state_name(v.state).to_string(),
                if *assured { "assured" } else { "new" }.to_string(),
                v.service_id.to_string(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(config: &str, argv: &[&str]) -> anyhow::Result<RunArgs> {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}-{}", std::process::id(), argv.len()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("config.yaml");
        std::fs::write(&path, config)?;
        let mut full = vec!["lb".into(), "run".into(), "--config".into(), path.clone().into_os_string()];
        full.extend(argv.iter().map(std::ffi::OsString::from));
        let cli = parse_cli(full);
        let _ = std::fs::remove_dir_all(&dir);
        match cli?.command {
            Command::Run(args) => Ok(*args),
            _ => anyhow::bail!("not run"),
        }
    }

    #[test]
    fn config_file_keys_are_the_flags_and_the_command_line_wins() {
        let config = "node-name: from-file\nmap-conntrack: 1048576\nmap-affinity: 1000\niface: [eth0, \"veth*\"]\nno-xdp: true\nmetrics-addr: 0.0.0.0:9999\nmanifests: /etc/lb/objects\n";
        let args = run_args(config, &["--map-conntrack", "4096"]).unwrap();
        assert_eq!(args.node_name, "from-file");
        assert_eq!(args.map_conntrack, 4096, "the command line wins");
        assert_eq!(args.map_affinity, 1000);
        assert_eq!(args.ifaces, vec!["eth0", "veth*"]);
        assert!(args.no_xdp);
        assert_eq!(args.metrics_addr, "0.0.0.0:9999");
        assert_eq!(args.manifests.as_deref(), Some(Path::new("/etc/lb/objects")));
        // Flags not in the file keep their defaults.
        assert_eq!(args.map_services, MapSizes::default().services);
    }

    /// `lb list conntrack` rows of an IPv6 flow, both entries, as `ct_peer` builds the reply.
    #[test]
    fn ipv6_flows_are_listed_with_bracketed_addresses() {
        let w = |s: &str| dataplane::addr_words(s.parse().unwrap());
        let k = lb_common::CtKey6 {
            src: w("fd00:af4:1::5"),
            dst: w("fd00:96::10"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            ..Default::default()
        };
        let v = lb_common::CtValue6 {
            nat_addr: w("fd00:af4:2::15"),
            nat_port: 8080u16.to_be(),
            state: lb_common::CT_ESTABLISHED,
            service_id: 7,
            created: 100,
            last_seen: 900,
            ..Default::default()
        };
        let (pk, pv) = lb_common::ct_peer(&k, &v);
        let rows = flow_rows(&[(k, v, true), (pk, pv, false)], |then| (1000 - then as u64) / 100);
        assert_eq!(
            rows[0],
            [
                "forward",
                "TCP",
                "[fd00:af4:1::5]:40000",
                "[fd00:96::10]:80",
                "dst [fd00:af4:2::15]:8080",
                "9",
                "1",
                "ESTABLISHED",
                "assured",
                "7"
            ]
        );
        assert_eq!(
            &rows[1][..5],
            ["reply", "TCP", "[fd00:af4:2::15]:8080", "[fd00:af4:1::5]:40000", "src [fd00:96::10]:80"]
        );
    }

    /// Prefixes of both families, as a comma list or repeated, in flags and in the file.
    #[test]
    fn cidr_flags_take_both_families() {
        let args = run_args(
            "node-name: n\ncluster-cidr: [10.244.0.0/16, \"fd00:244::/56\"]\n",
            &["--nodeport-addresses", "192.168.49.0/24,fd00:49::/64", "--node-ip6", "fd00:49::2"],
        )
        .unwrap();
        let show = |v: &[model::Cidr]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(show(&args.cluster_cidr), ["10.244.0.0/16", "fd00:244::/56"]);
        assert_eq!(show(&args.nodeport_addresses), ["192.168.49.0/24", "fd00:49::/64"]);
        assert_eq!(args.node_ip6, Some("fd00:49::2".parse().unwrap()));
        assert!(run_args("node-name: n\n", &["--cluster-cidr", "fd00:244::/129"]).is_err());
    }

    #[test]
    fn config_file_errors_name_the_key() {
        let e = run_args("node-name: n\nmap-conntrak: 5\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("unknown key \"map-conntrak\""), "{e:#}");
        let e = run_args("node-name: n\nmap-conntrack: lots\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("map-conntrack"), "{e:#}");
        let e = run_args("- just\n- a list\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("not a YAML mapping"), "{e:#}");
    }
}
