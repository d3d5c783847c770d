#!/usr/bin/env bash
# Installs what Omega needs on a Debian machine, skipping what is already there, then proves it: every file
# the build and the tests use must exist and belong to the package this list names for it. A machine where
# someone installed a needed package by hand under another name, or a list that forgot one, fails here,
# loudly, before any build.
#
# A Rust toolchain (cargo) must already be installed.
set -euo pipefail

# package            a file it provides that the project uses     what for
requirements=(
  "etcd-server       /usr/bin/etcd                                 the store (etcd 3.4); every integration test starts one"
  "etcd-client       /usr/bin/etcdctl                              etcdctl: deploy/tls/grant-roles.sh (omega-cell --secure, the secure tests), operators, the README's recovery steps"
  "protobuf-compiler /usr/bin/protoc                               gRPC code generation (etcd-client, containerd-client, our log service)"
  "libprotobuf-dev   /usr/include/google/protobuf/descriptor.proto the well-known .proto files protoc imports (not installed with protoc under --no-install-recommends)"
  "containerd        /usr/bin/containerd                           the node agent's container runtime"
  "runc              /usr/sbin/runc                                the OCI runtime containerd runs containers with"
  "umoci             /usr/bin/umoci                                building the tiny local test image (no registry is reachable)"
  "busybox-static    /bin/busybox                                  the test image's one binary"
  "openssl           /usr/bin/openssl                              deploy/tls/: a cell's CA and certificates (and the secure tests' own)"
  "prometheus        /usr/bin/promtool                             promtool: checks deploy/prometheus (config, rules, rule tests) and every component's /metrics"
  "chromium          /usr/bin/chromium                             the web UI's browser test (headless)"
  "chromium-driver   /usr/bin/chromedriver                         the WebDriver server the browser test drives chromium through"
)

packages=()
for r in "${requirements[@]}"; do
  read -r package _ <<<"$r"
  packages+=("$package")
done

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

# The proof: each file is there, and it is this package's.
failed=0
for r in "${requirements[@]}"; do
  read -r package file purpose <<<"$r"
  if [ ! -e "$file" ]; then
    echo "MISSING: $file ($purpose) should come from package $package, which did not provide it" >&2
    failed=1
    continue
  fi
  owner=$(dpkg-query -S "$file" 2>/dev/null || true)
  if [[ "$owner" != "$package:"* && "$owner" != *" $package:"* && "$owner" != "$package, "* && "$owner" != *", $package:"* ]]; then
    echo "WRONG OWNER: $file ($purpose) belongs to '${owner%%:*}', not to $package as deploy/install-deps.sh says" >&2
    failed=1
  fi
done
if ((failed)); then
  echo "deploy/install-deps.sh: the machine does not have what the project needs; see above" >&2
  exit 1
fi

# Debian's package may start a system etcd on 2379; Omega's tests start their own on free ports, so it is
# left alone, but say so.
if pgrep -x etcd >/dev/null 2>&1; then
  echo "note: an etcd is already running on this machine; tests start their own on free loopback ports"
fi
# Likewise Debian's prometheus package may start a Prometheus server on 9090; the project uses only its
# promtool.
if pgrep -x prometheus >/dev/null 2>&1; then
  echo "note: a Prometheus server is running on this machine; the project's tests use only promtool"
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
# No pipe into `head` here: with pipefail, etcd dying of SIGPIPE would fail the whole script.
etcd_version=$(etcd --version)
echo "${etcd_version%%$'\n'*}"
protoc --version
promtool_version=$(promtool --version 2>&1)
echo "${promtool_version%%$'\n'*}"
echo "all ${#requirements[@]} requirements present, each from its package"
