//! `cargo xtask setup|test|demo|k8s|lab`: everything a fresh machine needs, from the README's two
//! commands. All of it needs root (BPF, network namespaces, apt).
mod baseline;
mod demo;
mod k8s;
mod kind;
mod lab;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): apt packages, the dated nightly with rust-src,
    /// bpf-linker on LLVM 22; mount bpffs.
    Setup,
    /// Set up, build, and run every test: unit, packet (BPF_PROG_TEST_RUN) and end to end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and replay the seed lab on this machine with the real eBPF datapath.
    Demo,
    /// Build the real control plane, kube-proxy, kubectl and etcd from source into target/k8s
    /// (idempotent; about 16 minutes the first time on 2 cores).
    K8s,
    /// lb as a DaemonSet on a kind cluster without kube-proxy (deploy/), then the seed lab on
    /// it. Needs docker with a running daemon, kind and kubectl.
    Kind,
    /// The seed lab. With --real: against a real control plane built from source (cargo xtask
    /// k8s), two nodes with the netns kubelet and lb as the DaemonSet runs it, the lab's YAML
    /// applied with kubectl. Without: the same as `demo`.
    Lab {
        #[arg(long)]
        real: bool,
    },
    /// Set up, build (release), and run the benchmarks; results go to bench/results/.
    Bench {
        /// Short runs and small sizes (under two minutes), for CI: keeps the bench from rotting.
        #[arg(long)]
        quick: bool,
    },
    /// The per-packet section of this tree and of an older revision, built side by side and
    /// run alternately: a same-run comparison (bench/results/baseline.md).
    BenchBaseline {
        /// The revision to compare with (a commit, tag or branch).
        rev: String,
        /// Alternating runs of each side.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The section compared: `packet` (section 1) or `warm` (section 1b, one pass per run,
        /// over-the-floor figures; bench/results/baseline-warm.md).
        #[arg(long, default_value = "packet")]
        section: String,
    },
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Builds the agent and the pod server, and tells the test lab where they are.
fn build() -> Result<()> {
    run(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))?;
    let target =
        std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("target"));
    std::env::set_var("LB_BIN", target.join("debug/lb"));
    std::env::set_var("PODSERVER_BIN", target.join("debug/podserver"));
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => {
            setup::setup()?;
            // The agent's API tests run against a real kube-apiserver.
            k8s::ensure()?;
            build()?;
            // The eBPF crates only build for the bpf target (through lb-userspace's and bench's
            // build.rs). Every test binary runs even after one fails, so a failure early on
            // hides none after it.
            run(cargo()
                .args(["test", "--workspace", "--no-fail-fast", "--exclude", "lb-ebpf", "--exclude", "bench-ebpf"])
                .args(&args))
        }
        Cmd::Kind => kind::kind(),
        Cmd::K8s => k8s::ensure().map(|dir| println!("{}", dir.display())),
        Cmd::Lab { real: true } => {
            setup::setup()?;
            k8s::ensure()?;
            build()?;
            lab::real()
        }
        Cmd::Demo | Cmd::Lab { real: false } => {
            setup::setup()?;
            build()?;
            demo::demo()
        }
        Cmd::BenchBaseline { rev, runs, section } => {
            setup::setup()?;
            baseline::baseline(&rev, runs, &section)
        }
        Cmd::Bench { quick } => {
            setup::setup()?;
            // lb beside the real kube-proxy, on a real control plane.
            k8s::ensure()?;
            // Release builds: the agent's YAML parsing and the load clients are timed too.
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "-p",
                "lb-tests",
                "-p",
                "lb-bench",
                "--bins",
            ]))?;
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| workspace_root().join("target"));
            let mut bench = Command::new(target.join("release/lb-bench"));
            bench
                .current_dir(workspace_root())
                .env("LB_BIN", target.join("release/lb"))
                .env("PODSERVER_BIN", target.join("release/podserver"));
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)
        }
    }
}
