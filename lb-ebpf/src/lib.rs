#![no_std]
// The kernel programs are the `lb` binary target; this empty library exists so the agent can
// name lb-ebpf as a build-dependency and be rebuilt when the programs change.
