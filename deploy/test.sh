#!/usr/bin/env bash
# The test command: every unit and integration test (each integration test starts its own etcd on free
# loopback ports, the agent's tests their own containerd), then a build of the benchmarks so they cannot rot
# (in the test profile, sharing every dependency the tests just built: seconds, not minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
cargo test --workspace --benches --no-run --locked
