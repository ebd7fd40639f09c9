#![no_std]
// The programs are the `bench` binary target; this empty library exists so `lb-bench` can name
// bench-ebpf as a build-dependency and be rebuilt when the programs change.
