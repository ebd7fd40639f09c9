//! The fuzz run of issue 11 at ten times the test's length: 10,000,000 random, truncated and
//! mutated frames (100,000 with `--quick`) through the tc and XDP programs, each output judged
//! by the model of `lb_tests::fuzz` (as `lb-userspace/tests/fuzz.rs` does with 1,000,000). A
//! judgement that fails fails the bench, with the seed that replays it (`LB_FUZZ_SEED`).
use std::{fmt::Write as _, path::PathBuf};

use anyhow::{anyhow, Result};
use lb_tests::fuzz::{self, NodeNs};

#[path = "../../lb-userspace/tests/fuzz/harness.rs"]
mod harness;
use harness::{config, load};

/// Runs the fuzzer and returns its section of the results.
pub fn run(quick: bool) -> Result<String> {
    let frames = if quick { 100_000 } else { 10_000_000 };
    // On a thread of its own: it enters a network namespace, which must not leak into the
    // other measurements.
    let report = std::thread::spawn(move || -> Result<fuzz::Report> {
        let ns = NodeNs::enter().map_err(|e| anyhow!(e))?;
        let pin = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-fuzz", std::process::id()));
        let (mut dp, world) = load(&ns, pin).map_err(|e| anyhow!(e))?;
        let sizes = config().sizes;
        let opts = fuzz::Options::from_env(frames, fuzz::budget(sizes.conntrack_new, sizes.affinity));
        fuzz::run(&mut dp, world, &opts).map_err(|f| anyhow!("{f}"))
    })
    .join()
    .map_err(|_| anyhow!("the fuzz thread panicked"))??;
    report.coverage().map_err(|e| anyhow!("seed {}: {e}", report.seed))?;
    report.fixed_bugs_absent().map_err(|e| anyhow!("seed {}: {e}", report.seed))?;
    let mut md = String::from("## 6. Fuzz (issue 11)\n\n");
    writeln!(
        md,
        "{} random, truncated and mutated frames through the tc and XDP programs (`BPF_PROG_TEST_RUN`), every \
         output judged by the userspace model and the independent parser of `lb_tests::fuzz`: all passed ({:.0} \
         frames/s).\n\n{}\n",
        report.frames,
        report.frames as f64 / report.elapsed.as_secs_f64(),
        report.summary()
    )?;
    Ok(md)
}
