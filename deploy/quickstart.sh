#!/usr/bin/env bash
# From a fresh Debian machine (with a Rust toolchain) to a running Omega cell with an example job:
# installs what is missing, builds, starts etcd, a private containerd, a batch and a service scheduler, the
# cell controller and a node agent (omega-cell), and submits deploy/examples/hello.yaml. Ctrl-C stops
# everything. Arguments go to omega-cell: `--secure` runs the cell with TLS and a certificate per component.
# Containers need root; without it the cell runs simulated nodes instead and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/install-deps.sh
cargo build --release
bin="$PWD/target/release"
etcd_env="OMEGA_ETCD=http://127.0.0.1:2379"
for arg in "$@"; do
  # With --secure, etcd is https and omctl needs a certificate: omega-cell prints the line to use.
  if [ "$arg" = --secure ]; then
    etcd_env="   # and the export line omega-cell prints below (https, an operator's certificate)"
  fi
done
cat <<MSG

In another shell:
  export PATH="$bin:\$PATH" $etcd_env
  omctl jobs; omctl job hello; omctl logs hello/0
  omctl submit deploy/examples/web.yaml --wait

MSG
exec "$bin/omega-cell" --example deploy/examples/hello.yaml "$@"
