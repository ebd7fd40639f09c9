use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the bench's own kernel programs (the warm wrappers and the minimal DNAT references,
/// `bench-ebpf`) for the bpf target, the way lb-userspace's build.rs builds `lb-ebpf`, with the
/// same dated nightly (lb-ebpf/nightly-toolchain, which `cargo xtask setup` installs with
/// rust-src): the undated one a machine image carries may lack rust-src, or be another LLVM
/// than bpf-linker's. The object is embedded in `lb-bench`.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../bench-ebpf");
    let root_dir = root_dir.canonicalize().with_context(|| format!("locating {}", root_dir.display()))?;
    let root_dir = root_dir.to_str().context("bench-ebpf path is not UTF-8")?;
    let pin = std::path::Path::new(&manifest_dir).join("../lb-ebpf/nightly-toolchain");
    println!("cargo:rerun-if-changed={}", pin.display());
    let nightly = std::fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    aya_build::build_ebpf(
        [Package { name: "bench-ebpf", root_dir, ..Default::default() }],
        Toolchain::Custom(nightly.trim()),
    )
}
