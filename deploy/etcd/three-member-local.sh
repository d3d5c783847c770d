#!/usr/bin/env bash
# three-member-local.sh: a three-member etcd cluster on this machine, on loopback only, for trying out (and
# testing) what deploy/etcd/three-member/ configures for three machines.
#
# It makes a cell's certificates with deploy/tls/make-cell-certs.sh (etcd.pem is valid for 127.0.0.1, all
# the members need), and runs etcd with the very files three-member/etcd-{1,2,3}.yaml, rewritten:
# 10.0.0.N:2379 / :2380 become 127.0.0.1 ports of their own, the loopback client URL the files add for local
# clients is dropped (three members cannot share 127.0.0.1:2379), so is the plain metrics URL (:2381; the
# metrics stay on each member's client URL, at /metrics, for a client with a certificate), /etc/omega/tls/
# becomes the certificates' directory, and each data directory goes under one temporary directory. So clients and peers speak TLS and
# need a certificate of the cell. Then it waits until `etcdctl endpoint health` (as etcd's root user) passes
# for all three, runs deploy/tls/grant-roles.sh (a user and role per identity, authentication on), prints the
# endpoints and the OMEGA_ETCD_* variables to use, and keeps running. Ctrl-C, SIGTERM, a member dying or any
# failure stops all three members and removes the temporary directory, certificates included.
#
# Usage:
#   deploy/etcd/three-member-local.sh
#   export OMEGA_ETCD=... OMEGA_ETCD_CACERT=... OMEGA_ETCD_CERT=... OMEGA_ETCD_KEY=...   # as it prints them,
#                                                                           # in another shell: omctl as admin
#
# Settings (environment):
#   BASE_PORT   first port (default 12379); member N listens for clients on BASE_PORT+2(N-1), for peers on the
#               port after it, so the default uses 12379-12384
#   WAIT_SECS   how long to wait for a healthy cluster before giving up (default 30)
#   ETCD_BIN    the etcd binary (default: $OMEGA_ETCD_BIN, else etcd); ETCDCTL_BIN likewise (default etcdctl;
#               grant-roles.sh runs the etcdctl on PATH)
#   NO_AUTH=1   leave etcd's authentication off (no grant-roles.sh): TLS and a certificate of the cell are
#               still required, but any such certificate may do anything (deploy/etcd/grpc-proxy.sh needs this)
#   KEEP_DATA=1 leave the temporary directory behind (its etcd-N.log files say what each member did)
#
# Output, one `KEY=value` line each, for scripts (tests/examples.rs reads them):
#   DATA_DIR=/tmp/omega-etcd3.XXXXXX     as soon as it exists
#   CERTS=<DATA_DIR>/certs               once the certificates are made (make-cell-certs.sh's directory:
#                                        root, omega-scheduler, omega-controller, agents-sim for
#                                        `omega-agent --simulate N`, operator-admin, viewer-ui, proxy-local)
#   PIDS=<pid1> <pid2> <pid3>            once the members are started
#   ENDPOINTS=https://127.0.0.1:12379,... once all three are healthy (and the roles granted)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
configs="$here/three-member"
tls_scripts="$here/../tls"
base_port="${BASE_PORT:-12379}"
wait_secs="${WAIT_SECS:-30}"
etcd_bin="${ETCD_BIN:-${OMEGA_ETCD_BIN:-etcd}}"
etcdctl_bin="${ETCDCTL_BIN:-etcdctl}"
export ETCDCTL_API=3

for tool in "$etcd_bin" "$etcdctl_bin" openssl; do
    command -v "$tool" >/dev/null || {
        echo "three-member-local: cannot find $tool (Debian: apt-get install etcd-server etcd-client openssl)" >&2
        exit 1
    }
done
if ! [[ "$base_port" =~ ^[0-9]+$ ]] || ((base_port < 1024 || base_port + 5 > 65535)); then
    echo "three-member-local: BASE_PORT=$base_port is not a port between 1024 and 65530" >&2
    exit 1
fi

client_port() { echo $((base_port + 2 * ($1 - 1))); }
peer_port() { echo $((base_port + 2 * ($1 - 1) + 1)); }

# Alive and not a zombie waiting to be reaped.
alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

dir=""
pids=()
# shellcheck disable=SC2317  # only called by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # From here on bash's own "Killed"/"Terminated" job notices go to /dev/null, our messages to fd 3.
    exec 3>&2 2>/dev/null
    if [[ "${KEEP_DATA:-}" == 1 ]]; then
        # A clean stop, so that the kept data directories can be started again. One member at a time, 10 s
        # each at most, then SIGKILL. (Ctrl-C reaches the members too, and stopped all at once the leader
        # spends 7 s trying to hand its leadership to members that are stopping as well.)
        for pid in "${pids[@]}"; do
            kill -TERM "$pid" 2>/dev/null || continue
            for _ in $(seq 50); do
                alive "$pid" || break
                sleep 0.2
            done
            if alive "$pid"; then
                echo "three-member-local: member pid $pid did not stop in 10 s; killing it" >&3
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
    else
        # The data is deleted next: nothing to stop cleanly for.
        for pid in "${pids[@]}"; do
            kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    wait || true
    if [[ -n "$dir" && -d "$dir" ]]; then
        if [[ "${KEEP_DATA:-}" == 1 ]]; then
            echo "three-member-local: stopped; data and logs kept in $dir" >&3
        else
            rm -rf "$dir"
            echo "three-member-local: stopped; removed $dir" >&3
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for n in 1 2 3; do
    for port in "$(client_port $n)" "$(peer_port $n)"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "three-member-local: 127.0.0.1:$port is already in use; pick other ports with BASE_PORT=..." >&2
            exit 1
        fi
    done
done

dir="$(mktemp -d "${TMPDIR:-/tmp}/omega-etcd3.XXXXXX")"
echo "DATA_DIR=$dir"

# The cell's CA and certificates: etcd.pem covers 127.0.0.1, which is every member's address here.
certs="$dir/certs"
bash "$tls_scripts/make-cell-certs.sh" "$certs" --sim-agents sim --operator admin --viewer ui --proxy local >&2
echo "CERTS=$certs"
ctl_tls=(--cacert="$certs/ca.pem" --cert="$certs/root.pem" --key="$certs/root-key.pem")

endpoints=()
for n in 1 2 3; do
    src="$configs/etcd-$n.yaml"
    [[ -r "$src" ]] || { echo "three-member-local: missing $src" >&2; exit 1; }
    rewrite=(-e 's#,https://127\.0\.0\.1:2379##g' -e '/^listen-metrics-urls:/d' -e "s#^data-dir:.*#data-dir: $dir/member-$n#")
    rewrite+=(-e "s#/etc/omega/tls/#$certs/#g")
    for m in 1 2 3; do
        rewrite+=(-e "s#https://10\.0\.0\.$m:2379#https://127.0.0.1:$(client_port $m)#g")
        rewrite+=(-e "s#https://10\.0\.0\.$m:2380#https://127.0.0.1:$(peer_port $m)#g")
    done
    sed "${rewrite[@]}" "$src" >"$dir/etcd-$n.yaml"
    # Loopback and TLS only: refuse to start if any other address, or a plain URL, survived the rewrite.
    if grep -Eo 'https?://[^,[:space:]"]+' "$dir/etcd-$n.yaml" | grep -vq '^https://127\.0\.0\.1:'; then
        echo "three-member-local: $src has URLs other than https://10.0.0.1-3:2379/2380; cannot rewrite to loopback:" >&2
        grep -Eo 'https?://[^,[:space:]"]+' "$dir/etcd-$n.yaml" | grep -v '^https://127\.0\.0\.1:' >&2
        exit 1
    fi
    if ! grep -q "cert-file: $certs/etcd.pem" "$dir/etcd-$n.yaml"; then
        echo "three-member-local: $src does not use /etc/omega/tls/etcd.pem; cannot point it at $certs" >&2
        exit 1
    fi
    endpoints+=("https://127.0.0.1:$(client_port $n)")
done
joined="$(IFS=,; echo "${endpoints[*]}")"

for n in 1 2 3; do
    "$etcd_bin" --config-file "$dir/etcd-$n.yaml" </dev/null >"$dir/etcd-$n.log" 2>&1 &
    pids+=($!)
done
echo "PIDS=${pids[*]}"

deadline=$((SECONDS + wait_secs))
until "$etcdctl_bin" --endpoints="$joined" "${ctl_tls[@]}" --dial-timeout=1s --command-timeout=2s endpoint health \
    >/dev/null 2>&1; do
    for i in 0 1 2; do
        if ! alive "${pids[$i]}"; then
            echo "three-member-local: member $((i + 1)) exited while starting; the end of its log:" >&2
            tail -n 20 "$dir/etcd-$((i + 1)).log" >&2
            exit 1
        fi
    done
    if ((SECONDS >= deadline)); then
        echo "three-member-local: not healthy after ${wait_secs}s:" >&2
        "$etcdctl_bin" --endpoints="$joined" "${ctl_tls[@]}" --dial-timeout=1s --command-timeout=2s endpoint health \
            >&2 || true
        for n in 1 2 3; do
            echo "--- etcd-$n.log" >&2
            tail -n 10 "$dir/etcd-$n.log" >&2
        done
        exit 1
    fi
    sleep 0.5
done

"$etcdctl_bin" --endpoints="$joined" "${ctl_tls[@]}" --dial-timeout=1s --command-timeout=2s member list -w table >&2
if [[ "${NO_AUTH:-}" == 1 ]]; then
    echo "three-member-local: NO_AUTH=1: etcd's authentication stays off (any certificate of $certs may do anything)" >&2
else
    bash "$tls_scripts/grant-roles.sh" "$certs" "$joined" >&2
fi
echo "ENDPOINTS=$joined"
cat >&2 <<MSG
three-member-local: healthy. In another shell, omctl as the operator admin:
  export OMEGA_ETCD=$joined OMEGA_ETCD_CACERT=$certs/ca.pem OMEGA_ETCD_CERT=$certs/operator-admin.pem OMEGA_ETCD_KEY=$certs/operator-admin-key.pem
and each component with its own certificate (flags win over those variables):
  omega-scheduler --kind batch --cert $certs/omega-scheduler.pem --key $certs/omega-scheduler-key.pem
  omega-agent --simulate 3 --cert $certs/agents-sim.pem --key $certs/agents-sim-key.pem
Ctrl-C stops all three.
MSG

# Run until a signal (the traps exit through cleanup) or until a member exits by itself.
wait -n "${pids[@]}" || true
echo "three-member-local: a member exited; stopping the others" >&2
exit 1
