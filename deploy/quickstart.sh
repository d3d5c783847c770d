#!/usr/bin/env bash
# From a fresh Debian machine (with a Rust toolchain) to a running Omega cell with an example job:
# installs what is missing, builds, starts etcd, a private containerd, a batch and a service scheduler, the
# cell controller and a node agent (omega-cell), and submits deploy/examples/hello.yaml. Ctrl-C stops
# everything.
# Containers need root; without it the cell runs simulated nodes instead and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/install-deps.sh
cargo build --release
bin="$PWD/target/release"
cat <<MSG

In another shell:
  export PATH="$bin:\$PATH" OMEGA_ETCD=http://127.0.0.1:2379
  omctl jobs; omctl job hello; omctl logs hello/0
  omctl submit deploy/examples/web.yaml --wait

MSG
exec "$bin/omega-cell" --example deploy/examples/hello.yaml "$@"
