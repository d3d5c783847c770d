#!/usr/bin/env bash
# grpc-proxy.sh: etcd's gRPC proxy on this machine's loopback, in front of an etcd cluster, for the
# schedulers running here. See README.md in this directory for why and when.
#
# Usage:
#   ENDPOINTS=https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379 PROXY_NAME=sched-1 \
#     deploy/etcd/grpc-proxy.sh
#   omega-scheduler --etcd https://127.0.0.1:23790 --kind batch ...   # then point the schedulers at the proxy,
#                                                                      # with their usual --cacert/--cert/--key
#
# TLS on both sides (the default), with one certificate, proxy-PROXY_NAME.pem (make-cell-certs.sh --proxy
# PROXY_NAME): the proxy presents it to etcd, and serves its clients with it on 127.0.0.1, taking only clients
# with a certificate the cell's CA signed.
#
# Not in a cell whose etcd has authentication on (deploy/tls/grant-roles.sh, README.md "Securing a cell"):
# etcd 3.4's grpc-proxy refuses a client certificate with a common name, so it cannot act as an etcd user, and
# etcd refuses everything it forwards ("etcdserver: permission denied"). There the schedulers connect to etcd
# directly. This script checks that first (with etcdctl, when installed) and refuses to start. What is left:
# TLS in front of an etcd that requires client certificates but has auth off (no roles), or plain text.
#
# Settings (environment):
#   ENDPOINTS     the etcd members (default: $OMEGA_ETCD, else https://127.0.0.1:2379)
#   TLS_DIR       make-cell-certs.sh's files on this machine (default /etc/omega/tls): ca.pem,
#                 proxy-PROXY_NAME.pem and proxy-PROXY_NAME-key.pem
#   PROXY_NAME    which proxy-NAME certificate (default: this host's short name)
#   PORT          the loopback port to serve on (default 23790; the proxy listens on 127.0.0.1 only)
#   METRICS_PORT  also serve the proxy's Prometheus metrics on 127.0.0.1:METRICS_PORT/metrics (default: off)
#   ETCD_BIN      the etcd binary (default: $OMEGA_ETCD_BIN, else etcd); ETCDCTL_BIN likewise (default etcdctl)
#   PLAIN=1       no TLS on either side, for a plain-text etcd (http:// ENDPOINTS)
#
# It runs in the foreground (exec) until stopped: Ctrl-C or SIGTERM.
set -euo pipefail

endpoints="${ENDPOINTS:-${OMEGA_ETCD:-https://127.0.0.1:2379}}"
port="${PORT:-23790}"
etcd_bin="${ETCD_BIN:-${OMEGA_ETCD_BIN:-etcd}}"
etcdctl_bin="${ETCDCTL_BIN:-etcdctl}"
tls_dir="${TLS_DIR:-/etc/omega/tls}"
proxy_name="${PROXY_NAME:-$(hostname -s)}"

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
if [[ "${PLAIN:-}" == 1 ]]; then
    if [[ "$endpoints" == *https://* ]]; then
        echo "grpc-proxy: PLAIN=1 but ENDPOINTS has https:// URLs ($endpoints)" >&2
        exit 1
    fi
    scheme=http
else
    if [[ "$endpoints" == *http://* ]]; then
        echo "grpc-proxy: ENDPOINTS has http:// URLs ($endpoints): give https:// ones, or PLAIN=1 for a plain etcd" >&2
        exit 1
    fi
    ca="$tls_dir/ca.pem" cert="$tls_dir/proxy-$proxy_name.pem" key="$tls_dir/proxy-$proxy_name-key.pem"
    for f in "$ca" "$cert" "$key"; do
        [[ -r "$f" ]] || {
            echo "grpc-proxy: cannot read $f (deploy/tls/make-cell-certs.sh DIR --proxy $proxy_name makes the" \
                "proxy's certificate; TLS_DIR and PROXY_NAME say where and which)" >&2
            exit 1
        }
    done
    # With etcd's authentication on, everything the proxy forwards is refused: say so now rather than in every
    # scheduler's log.
    if command -v "$etcdctl_bin" >/dev/null; then
        probe="$(ETCDCTL_API=3 "$etcdctl_bin" --endpoints="$endpoints" --cacert="$ca" --cert="$cert" --key="$key" \
            --dial-timeout=3s --command-timeout=5s get /omega-grpc-proxy-probe 2>&1)" || true
        if [[ "$probe" == *"permission denied"* || "$probe" == *"user name is empty"* ]]; then
            echo "grpc-proxy: etcd at $endpoints has authentication on (deploy/tls/grant-roles.sh) and refuses the" \
                "proxy: etcd 3.4's grpc-proxy cannot act as an etcd user (it refuses a certificate with a common" \
                "name). Connect the schedulers to etcd directly." >&2
            exit 1
        fi
    fi
    args+=(
        # Upstream, to etcd: its CA, and the proxy's certificate (which names no etcd user).
        --cacert="$ca" --cert="$cert" --key="$key"
        # Downstream, to the schedulers: the same certificate (valid for 127.0.0.1), and only clients with a
        # certificate the cell's CA signed.
        --cert-file="$cert" --key-file="$key" --trusted-ca-file="$ca"
    )
    scheme=https
fi
if [[ -n "${METRICS_PORT:-}" ]]; then
    args+=(--metrics-addr="http://127.0.0.1:$METRICS_PORT")
fi

echo "grpc-proxy: serving $scheme://127.0.0.1:$port for $endpoints" >&2
exec "$etcd_bin" "${args[@]}"
