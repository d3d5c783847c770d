#!/usr/bin/env bash
# grpc-proxy.sh: etcd's gRPC proxy on this machine's loopback, in front of an etcd cluster, for the
# schedulers (and omctl) running here. See README.md in this directory for why and when.
#
# Usage:
#   ENDPOINTS=http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379 deploy/etcd/grpc-proxy.sh
#   omega-scheduler --etcd http://127.0.0.1:23790 --kind batch ...     # then point clients at the proxy
#
# Settings (environment):
#   ENDPOINTS     the etcd members (default: $OMEGA_ETCD, else http://127.0.0.1:2379)
#   PORT          the loopback port to serve on (default 23790; the proxy listens on 127.0.0.1 only)
#   METRICS_PORT  also serve the proxy's Prometheus metrics on 127.0.0.1:METRICS_PORT/metrics (default: off)
#   ETCD_BIN      the etcd binary (default: $OMEGA_ETCD_BIN, else etcd)
#
# It runs in the foreground (exec) until stopped: Ctrl-C or SIGTERM.
set -euo pipefail

endpoints="${ENDPOINTS:-${OMEGA_ETCD:-http://127.0.0.1:2379}}"
port="${PORT:-23790}"
etcd_bin="${ETCD_BIN:-${OMEGA_ETCD_BIN:-etcd}}"

command -v "$etcd_bin" >/dev/null || {
    echo "grpc-proxy: cannot find $etcd_bin (Debian: apt-get install etcd-server)" >&2
    exit 1
}
if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    echo "grpc-proxy: PORT=$port is not a port" >&2
    exit 1
fi

args=(grpc-proxy start
    --endpoints="$endpoints"
    --listen-addr="127.0.0.1:$port"
    --advertise-client-url="127.0.0.1:$port"
)
if [[ -n "${METRICS_PORT:-}" ]]; then
    args+=(--metrics-addr="http://127.0.0.1:$METRICS_PORT")
fi

echo "grpc-proxy: serving 127.0.0.1:$port for $endpoints" >&2
exec "$etcd_bin" "${args[@]}"
