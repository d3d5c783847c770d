#!/usr/bin/env bash
# The test command: every unit and integration test (each integration test starts its own etcd on free
# loopback ports), then a compile check of the benchmarks so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
cargo check --workspace --benches --locked
