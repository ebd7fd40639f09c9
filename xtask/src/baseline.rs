//! `cargo xtask bench-baseline REV`: lb-bench's per-packet section (section 1) for this tree
//! and for an older revision, built side by side and run alternately on this machine, so that
//! what a change costs the rows that were there before is a same-run comparison (issue 12:
//! IPv4's figures within 5% of what they were before IPv6). The revision is checked out as a
//! git worktree outside this checkout (see `baseline`) and built with its own target directory
//! under `target/baseline/`.
//!
//! `--section warm` compares section 1b instead (the warm method, whose figures move between
//! passes by more than a datapath change of a tenth): one pass per run, alternating, and the
//! over-the-floor figure of each row, so that a floor that moved between runs does not count.
//! A revision whose lb-bench predates `LB_BENCH_WARM_PASSES` runs its three passes, each a
//! sample.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{k8s::target_dir, run, workspace_root};

/// Builds `lb-bench` of `rev` and of this tree, runs both `runs` times alternately and writes
/// `bench/results/baseline.md` (`section` "warm": `baseline-warm.md`).
pub fn baseline(rev: &str, runs: usize, section: &str) -> Result<()> {
    let warm = match section {
        "packet" => false,
        "warm" => true,
        other => bail!("--section {other}: expected packet or warm"),
    };
    let root = workspace_root();
    let base_dir = target_dir().join("baseline");
    // Outside this checkout: cargo reads the `.cargo/config.toml` of every directory above the
    // one it runs in, so a worktree under `target/` would be built with this tree's settings
    // (a linker, flags) instead of its own, and the comparison would not be one.
    let tree = std::env::temp_dir().join("lb-bench-baseline");
    if tree.exists() {
        run(Command::new("git").current_dir(&root).args(["worktree", "remove", "--force"]).arg(&tree))
            .context("removing the previous baseline worktree")?;
    }
    // A worktree of an earlier run whose directory is gone (a reboot emptied /tmp) is still
    // registered, and `git worktree add` refuses its path.
    run(Command::new("git").current_dir(&root).args(["worktree", "prune"])).context("pruning worktrees")?;
    std::fs::create_dir_all(&base_dir).with_context(|| format!("creating {}", base_dir.display()))?;
    run(Command::new("git").current_dir(&root).args(["worktree", "add", "--detach"]).arg(&tree).arg(rev))
        .with_context(|| format!("checking out {rev}"))?;
    let commit = String::from_utf8(
        Command::new("git").current_dir(&tree).args(["rev-parse", "--short", "HEAD"]).output()?.stdout,
    )?
    .trim()
    .to_string();
    // Revisions from before the pin (lb-ebpf/nightly-toolchain; bench/build.rs took it later
    // than lb-userspace/build.rs) build their kernel programs with the undated nightly, which a
    // machine image may carry without rust-src; set-up only equips the dated one.
    let pinned = |file: &str| std::fs::read_to_string(tree.join(file)).is_ok_and(|s| s.contains("nightly-toolchain"));
    if !(pinned("lb-userspace/build.rs") && pinned("bench/build.rs")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])).with_context(
            || format!("adding rust-src to the undated nightly, which {rev} builds its eBPF with (was the Rust distribution server refused?)"),
        )?;
    }
    let build = |dir: &Path, target: &Path| {
        run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", target)
            .args(["build", "--release", "-p", "lb-bench", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))
    };
    build(&tree, &base_dir.join("target")).with_context(|| format!("building {rev}"))?;
    build(&root, &target_dir()).context("building this tree")?;

    // (hook, packet) -> ns per run, for each side.
    let mut rows: BTreeMap<(String, String), [Vec<f64>; 2]> = BTreeMap::new();
    for i in 0..runs {
        for (side, target) in [(0, base_dir.join("target")), (1, target_dir())] {
            let out = base_dir.join(format!("out-{side}-{i}"));
            let _ = std::fs::remove_dir_all(&out);
            let bin = target.join("release");
            run(Command::new(bin.join("lb-bench"))
                .current_dir(if side == 0 { &tree } else { &root })
                .env("LB_BIN", bin.join("lb"))
                .env("PODSERVER_BIN", bin.join("podserver"))
                .env("LB_BENCH_WARM_PASSES", "1")
                .args(["--only", if warm { "warm" } else { "packet" }, "--out"])
                .arg(&out))
            .with_context(|| format!("lb-bench run {i} of {}", if side == 0 { rev } else { "this tree" }))?;
            let found = if warm { section_warm(&out)? } else { section_one(&out)? };
            for (key, ns) in found {
                rows.entry(key).or_default()[side].push(ns);
            }
        }
    }

    let what_ran = if warm {
        "section 1b (per-packet cost, warm method; ns over the floor of the same pass)"
    } else {
        "section 1 (per-packet cost, BPF_PROG_TEST_RUN)"
    };
    let mut md = format!(
        "# Same-run comparison with {rev} ({commit})\n\nlb-bench {what_ran} of {rev} and of this tree, built side by side and run alternately {runs} times on this machine; medians of the runs. Rows only one side has are listed with the other side empty.\n\n| hook | packet | {rev} ns | this tree ns | change |\n|---|---|---:|---:|---:|\n"
    );
    let mut worst: f64 = 0.0;
    for ((hook, what), [base, head]) in &rows {
        let (b, h) = (median(base), median(head));
        let change = match (b, h) {
            (Some(b), Some(h)) if !what.contains("floor") => {
                let c = h / b - 1.0;
                worst = worst.max(c);
                if warm {
                    // Small over-the-floor figures make large percentages: the nanoseconds too.
                    format!("{:+.1} ns ({:+.1}%)", h - b, c * 100.0)
                } else {
                    format!("{:+.1}%", c * 100.0)
                }
            }
            _ => String::new(),
        };
        let show = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
        writeln!(md, "| {hook} | {what} | {} | {} | {change} |", show(b), show(h))?;
    }
    writeln!(md, "\nLargest increase over {rev} on a row both sides have: {:+.1}%.", worst * 100.0)?;
    let path = root.join(if warm { "bench/results/baseline-warm.md" } else { "bench/results/baseline.md" });
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench-baseline: written {}", path.display());
    run(Command::new("git").current_dir(&root).args(["worktree", "remove", "--force"]).arg(&tree))
        .context("removing the baseline worktree")?;
    Ok(())
}

/// The markdown lb-bench wrote to `out`: its path and text.
fn results(out: &Path) -> Result<(PathBuf, String)> {
    let md = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .with_context(|| format!("no results in {}", out.display()))?;
    let text = std::fs::read_to_string(&md).with_context(|| format!("reading {}", md.display()))?;
    Ok((md, text))
}

/// The rows of section 1 in the markdown lb-bench wrote to `out`: (hook, packet) -> ns/packet.
fn section_one(out: &Path) -> Result<Vec<((String, String), f64)>> {
    let (md, text) = results(out)?;
    let Some(start) = text.find("## 1.") else {
        bail!("{}: no section 1", md.display());
    };
    let mut rows = Vec::new();
    for line in text[start..].lines().skip(1).take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | hook | packet | method | ns/packet | ...
        if cells.len() > 5 && (cells[1] == "tc" || cells[1] == "xdp") {
            if let Ok(ns) = cells[4].parse::<f64>() {
                rows.push(((cells[1].to_string(), cells[2].to_string()), ns));
            }
        }
    }
    Ok(rows)
}

/// The rows of every pass of section 1b in the markdown lb-bench wrote to `out`: (hook,
/// packet and conntrack fill) -> ns over the floor, one value per pass.
fn section_warm(out: &Path) -> Result<Vec<((String, String), f64)>> {
    let (md, text) = results(out)?;
    let rows = warm_rows(&text);
    if rows.is_empty() {
        bail!("{}: no rows of section 1b", md.display());
    }
    Ok(rows)
}

/// `section_warm` on the markdown's text.
fn warm_rows(text: &str) -> Vec<((String, String), f64)> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("## ") || line.starts_with("### ") {
            inside = line.contains("1b");
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | hook | packet | wrapper | conntrack fill | ns/packet | over floor | ...
        if inside && cells.len() > 7 && (cells[1] == "tc" || cells[1] == "xdp") {
            if let Ok(over) = cells[6].trim_start_matches('+').parse::<f64>() {
                // The new-flow rows differ only in the fill the packet names; the others'
                // fill is the same in every pass.
                rows.push(((cells[1].to_string(), cells[2].to_string()), over));
            }
        }
    }
    rows
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_rows_are_read_from_every_pass_of_section_1b_only() {
        let md = "## 1. Per-packet\n\n| tc | new flow | single | 900.0 | +800.0 | 9.0x |\n\n\
                  ## 1b. Warm\n\n| hook | packet | wrapper | conntrack fill | ns/packet | over floor | x | on path |\n\
                  | tc | new flow, conntrack full | restore | LB_CT4 100% | 2000.0 | +1950.0 | 9.00x | 100.00% |\n\
                  | xdp | established flow | restore | LB_CT4 100% | 150.0 | -2.0 | 1.00x | 100.00% |\n\n\
                  ### 1b, pass 2 of 2: Warm\n\n\
                  | tc | new flow, conntrack full | restore | LB_CT4 100% | 2100.0 | +2050.0 | 9.00x | 100.00% |\n\n\
                  ## 2. Cost at scale\n\n| tc | x | y | z | 1.0 | +1.0 | 1 | 1 |\n";
        let key = |h: &str, p: &str| (h.to_string(), p.to_string());
        assert_eq!(
            warm_rows(md),
            vec![
                (key("tc", "new flow, conntrack full"), 1950.0),
                (key("xdp", "established flow"), -2.0),
                (key("tc", "new flow, conntrack full"), 2050.0),
            ]
        );
    }
}
