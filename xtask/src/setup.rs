//! Idempotent machine set-up, following shared/TOOLCHAIN.md: each step checks first and only
//! installs what is missing, and says clearly what failed when a download is refused.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "procps",
    "util-linux",
    "curl",
    "ethtool",
    "iptables",
    "nftables",
    "conntrack",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb's set-up, demo and tests load BPF programs and create network namespaces: run as root");
    }
    apt()?;
    nightly()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {missing:?} with apt-get");
    run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update (is a Debian mirror reachable?)")?;
    run(Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install {missing:?}"))
}

/// The dated nightly that builds the kernel programs (shared/TOOLCHAIN.md: the build verified
/// with LLVM 22 and bpf-linker 0.13). Pinned by name so that a machine image with a newer
/// undated nightly, whose LLVM may differ from Debian's llvm-22, cannot break the link; the
/// eBPF builds in lb-userspace/build.rs and bench/build.rs read the same file.
const NIGHTLY: &str = include_str!("../../lb-ebpf/nightly-toolchain");

fn nightly() -> Result<()> {
    let nightly = NIGHTLY.trim();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with(nightly)) {
        eprintln!("setup: installing the {nightly} toolchain with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .with_context(|| format!("installing {nightly} (was the Rust distribution server refused?)"))?;
    }
    let components = output(Command::new("rustup").args(["component", "list", "--toolchain", nightly, "--installed"]))
        .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {nightly}");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", nightly]))
            .context("adding rust-src (was the Rust distribution server refused?)")?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
            "--locked",
            "--force",
        ])
        .env("PATH", path))
    .context("cargo install bpf-linker (is crates.io reachable? are llvm-22-dev and libpolly-22-dev installed?)")
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).context("mounting bpffs at /sys/fs/bpf")
}
