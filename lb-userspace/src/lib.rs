//! The `lb` agent: Kubernetes objects in, BPF map state out.
pub mod agent;
pub mod dataplane;
pub mod events;
pub mod file_events;
pub mod healthcheck;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod rp_filter;
pub mod sockdiag;
pub mod xdp_features;

#[cfg(test)]
mod scratch;

/// The kernel programs, built by `build.rs` and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
