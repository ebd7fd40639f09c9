use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the kernel programs for the bpf target with the dated nightly named in
/// lb-ebpf/nightly-toolchain and bpf-linker; the object is embedded in the `lb` binary.
/// `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../lb-ebpf");
    let root_dir = root_dir.canonicalize().with_context(|| format!("locating {}", root_dir.display()))?;
    let root_dir = root_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    let pin = std::path::Path::new(root_dir).join("nightly-toolchain");
    println!("cargo:rerun-if-changed={}", pin.display());
    let nightly = std::fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    aya_build::build_ebpf(
        [Package { name: "lb-ebpf", root_dir, ..Default::default() }],
        Toolchain::Custom(nightly.trim()),
    )
}
