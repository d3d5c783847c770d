#!/usr/bin/env bash
# Installs what Omega needs on a Debian machine, skipping what is already there.
#   etcd-server, etcd-client   the store (etcd 3.4) and etcdctl
#   protobuf-compiler          protoc, for the gRPC code the etcd and containerd clients generate
#   libprotobuf-dev            the well-known .proto files (descriptor.proto, ...) protoc needs; not a
#                              "recommends" of protobuf-compiler in the sense apt honours with --no-install-recommends
#   containerd, runc           the node agent's container runtime
#   umoci, busybox-static      building the tiny local test image (no registry is needed)
# A Rust toolchain (cargo) must already be installed.
set -euo pipefail
packages=(etcd-server etcd-client protobuf-compiler libprotobuf-dev containerd runc umoci busybox-static)
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == *"install ok installed"* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's package may start a system etcd on 2379; Omega's tests start their own on free ports, so it is
# left alone, but say so.
if pgrep -x etcd >/dev/null 2>&1; then
  echo "note: an etcd is already running on this machine; tests start their own on free loopback ports"
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
# No pipe into `head` here: with pipefail, etcd dying of SIGPIPE would fail the whole script.
etcd_version=$(etcd --version)
echo "${etcd_version%%$'\n'*}"
protoc --version
