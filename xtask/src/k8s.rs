//! `cargo xtask k8s`: the real control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler), kube-proxy, kubectl and etcd, built from the Go modules in `xtask/k8s/`
//! (see its README for the recipe) into `target/k8s/bin`. Idempotent: a binary whose version
//! already names the pinned release is kept, so only a fresh machine pays the build (about 16
//! minutes on 2 cores). The Go caches (module sources, build cache, the compiler's scratch
//! files: about 5 GB at their peak) live under `target/k8s` and are removed once the binaries
//! are built: CI runs on a disk shared with other machines' work, and a first CI run once ran
//! out of space in the compiler's default scratch directory `/tmp` half-way through the build.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{run, workspace_root};

/// The commands built from `k8s.io/kubernetes`, slowest first (kube-apiserver fills most of
/// the build cache the others share).
const KUBE_COMMANDS: &[&str] =
    &["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl"];

pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("target"))
}

/// Where the binaries go: `$LB_K8S_BIN_DIR` when set (another checkout's binaries of the same
/// release are reused, not rebuilt: 20 minutes and 5 GB a worktree), else `target/k8s/bin`. The
/// tests find them through the same variable.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("LB_K8S_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("k8s/bin"))
}

/// The version a `go.mod` requires `module` at.
fn required_version(go_mod: &Path, module: &str) -> Result<String> {
    let text = std::fs::read_to_string(go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("require ").unwrap_or(l).split_once(' '))
        .find(|(m, _)| *m == module)
        .map(|(_, v)| v.split_whitespace().next().unwrap_or_default().to_string())
        .with_context(|| format!("{} does not require {module}", go_mod.display()))
}

/// The first line of `bin ARGS`' output, or None when it cannot run.
fn version_of(bin: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn go_command(dir: &Path) -> Command {
    let cache = target_dir().join("k8s");
    let mut c = Command::new("go");
    c.current_dir(dir)
        .env("GOMODCACHE", cache.join("gomod"))
        .env("GOCACHE", cache.join("gocache"))
        // `go build`'s scratch files (several GB for kube-apiserver) beside the caches, removed
        // with them, instead of the machine's /tmp.
        .env("GOTMPDIR", cache.join("tmp"))
        // The toolchain on the machine builds it; never a silent toolchain download.
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false");
    c
}

/// Removes the Go caches once the binaries are built: the binaries are what later runs reuse,
/// and the caches are most of the build's disk. `go clean` because the module cache is
/// read-only by design (a plain remove fails on it).
fn remove_caches() -> Result<()> {
    let cache = target_dir().join("k8s");
    // Run outside the module: `go clean` in it would load its packages first.
    run(go_command(&cache).args(["clean", "-cache", "-modcache"]))
        .context("removing the Go build and module caches")?;
    for dir in ["gocache", "gomod", "tmp"] {
        let path = cache.join(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    eprintln!("k8s: removed the Go caches under {}", cache.display());
    Ok(())
}

/// Builds what is missing; sets `LB_K8S_BIN_DIR` for the tests and returns the directory.
pub fn ensure() -> Result<PathBuf> {
    let module = workspace_root().join("xtask/k8s");
    let kube = required_version(&module.join("go.mod"), "k8s.io/kubernetes")?;
    let etcd = required_version(&module.join("etcd/go.mod"), "go.etcd.io/etcd/server/v3")?;
    let bin = bin_dir();
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    // The tests run in their crates' directories: a relative LB_K8S_BIN_DIR would point elsewhere.
    let bin = bin.canonicalize().with_context(|| format!("resolving {}", bin.display()))?;
    let mut todo: Vec<&str> = Vec::new();
    for cmd in KUBE_COMMANDS {
        let args: &[&str] = if *cmd == "kubectl" { &["version", "--client"] } else { &["--version"] };
        if !version_of(&bin.join(cmd), args).is_some_and(|v| v.contains(&kube)) {
            todo.push(cmd);
        }
    }
    let etcd_ok = version_of(&bin.join("etcd"), &["--version"])
        .is_some_and(|v| v.contains(&format!("etcd Version: {}", etcd.trim_start_matches('v'))));
    if !todo.is_empty() || !etcd_ok {
        let go = version_of(Path::new("go"), &["version"])
            .context("building the Kubernetes control plane needs Go (1.26 or newer) on PATH; it was not found")?;
        eprintln!(
            "k8s: building {todo:?}{} from source with {} (a first build takes about 16 minutes on 2 cores; \
             later runs reuse target/k8s)",
            if etcd_ok { "" } else { " and etcd" },
            go.trim()
        );
        let (major, minor) = {
            let mut parts = kube.trim_start_matches('v').split('.');
            (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string())
        };
        let ldflags = format!(
            "-s -w -X k8s.io/component-base/version.gitVersion={kube} -X k8s.io/component-base/version.gitMajor={major} \
             -X k8s.io/component-base/version.gitMinor={minor} -X k8s.io/component-base/version.gitTreeState=clean"
        );
        let scratch = target_dir().join("k8s/tmp");
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        for cmd in &todo {
            let started = Instant::now();
            run(go_command(&module)
                .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
                .arg(bin.join(cmd))
                .arg(format!("k8s.io/kubernetes/cmd/{cmd}")))
            .with_context(|| {
                format!("building {cmd} {kube} (was the Go module proxy refused? see `go env GOPROXY`)")
            })?;
            eprintln!("k8s: {cmd} built in {:.0} s", started.elapsed().as_secs_f64());
        }
        if !etcd_ok {
            let started = Instant::now();
            run(go_command(&module.join("etcd"))
                .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
                .arg(bin.join("etcd"))
                .arg("go.etcd.io/etcd/server/v3"))
            .with_context(|| format!("building etcd {etcd} (was the Go module proxy refused?)"))?;
            eprintln!("k8s: etcd built in {:.0} s", started.elapsed().as_secs_f64());
        }
        for cmd in KUBE_COMMANDS {
            let args: &[&str] = if *cmd == "kubectl" { &["version", "--client"] } else { &["--version"] };
            if !version_of(&bin.join(cmd), args).is_some_and(|v| v.contains(&kube)) {
                bail!("{cmd} was built but does not report {kube}");
            }
        }
        remove_caches()?;
    }
    std::env::set_var("LB_K8S_BIN_DIR", &bin);
    Ok(bin)
}
