#!/usr/bin/env bash
# three-member-local.sh: a three-member etcd cluster on this machine, on loopback only, for trying out (and
# testing) what deploy/etcd/three-member/ configures for three machines.
#
# It runs etcd with the very files three-member/etcd-{1,2,3}.yaml, rewritten: 10.0.0.N:2379 / :2380 become
# 127.0.0.1 ports of their own, the loopback client URL the files add for local clients is dropped (three
# members cannot share 127.0.0.1:2379), and each data directory goes under one temporary directory. Then it
# waits until `etcdctl endpoint health` passes for all three, prints the endpoints, and keeps running. Ctrl-C,
# SIGTERM, a member dying or any failure stops all three members and removes the temporary directory.
#
# Usage:
#   deploy/etcd/three-member-local.sh
#   export OMEGA_ETCD=http://127.0.0.1:12379,http://127.0.0.1:12381,http://127.0.0.1:12383   # in another shell
#
# Settings (environment):
#   BASE_PORT   first port (default 12379); member N listens for clients on BASE_PORT+2(N-1), for peers on the
#               port after it, so the default uses 12379-12384
#   WAIT_SECS   how long to wait for a healthy cluster before giving up (default 30)
#   ETCD_BIN    the etcd binary (default: $OMEGA_ETCD_BIN, else etcd); ETCDCTL_BIN likewise (default etcdctl)
#   KEEP_DATA=1 leave the temporary directory behind (its etcd-N.log files say what each member did)
#
# Output, one `KEY=value` line each, for scripts (tests/examples.rs reads them):
#   DATA_DIR=/tmp/omega-etcd3.XXXXXX     as soon as it exists
#   PIDS=<pid1> <pid2> <pid3>            once the members are started
#   ENDPOINTS=http://127.0.0.1:12379,... once all three are healthy
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
configs="$here/three-member"
base_port="${BASE_PORT:-12379}"
wait_secs="${WAIT_SECS:-30}"
etcd_bin="${ETCD_BIN:-${OMEGA_ETCD_BIN:-etcd}}"
etcdctl_bin="${ETCDCTL_BIN:-etcdctl}"
export ETCDCTL_API=3

for tool in "$etcd_bin" "$etcdctl_bin"; do
    command -v "$tool" >/dev/null || {
        echo "three-member-local: cannot find $tool (Debian: apt-get install etcd-server etcd-client)" >&2
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

endpoints=()
for n in 1 2 3; do
    src="$configs/etcd-$n.yaml"
    [[ -r "$src" ]] || { echo "three-member-local: missing $src" >&2; exit 1; }
    rewrite=(-e 's#,http://127\.0\.0\.1:2379##g' -e "s#^data-dir:.*#data-dir: $dir/member-$n#")
    for m in 1 2 3; do
        rewrite+=(-e "s#http://10\.0\.0\.$m:2379#http://127.0.0.1:$(client_port $m)#g")
        rewrite+=(-e "s#http://10\.0\.0\.$m:2380#http://127.0.0.1:$(peer_port $m)#g")
    done
    sed "${rewrite[@]}" "$src" >"$dir/etcd-$n.yaml"
    # Loopback only: refuse to start if any other address survived the rewrite.
    if grep -Eq 'https?://' "$dir/etcd-$n.yaml" &&
        grep -Eo 'https?://[^,[:space:]"]+' "$dir/etcd-$n.yaml" | grep -vq '^http://127\.0\.0\.1:'; then
        echo "three-member-local: $src has addresses other than 10.0.0.1-3:2379/2380; cannot rewrite to loopback:" >&2
        grep -Eo 'https?://[^,[:space:]"]+' "$dir/etcd-$n.yaml" | grep -v '^http://127\.0\.0\.1:' >&2
        exit 1
    fi
    endpoints+=("http://127.0.0.1:$(client_port $n)")
done
joined="$(IFS=,; echo "${endpoints[*]}")"

for n in 1 2 3; do
    "$etcd_bin" --config-file "$dir/etcd-$n.yaml" </dev/null >"$dir/etcd-$n.log" 2>&1 &
    pids+=($!)
done
echo "PIDS=${pids[*]}"

deadline=$((SECONDS + wait_secs))
until "$etcdctl_bin" --endpoints="$joined" --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; do
    for i in 0 1 2; do
        if ! alive "${pids[$i]}"; then
            echo "three-member-local: member $((i + 1)) exited while starting; the end of its log:" >&2
            tail -n 20 "$dir/etcd-$((i + 1)).log" >&2
            exit 1
        fi
    done
    if ((SECONDS >= deadline)); then
        echo "three-member-local: not healthy after ${wait_secs}s:" >&2
        "$etcdctl_bin" --endpoints="$joined" --dial-timeout=1s --command-timeout=2s endpoint health >&2 || true
        for n in 1 2 3; do
            echo "--- etcd-$n.log" >&2
            tail -n 10 "$dir/etcd-$n.log" >&2
        done
        exit 1
    fi
    sleep 0.5
done

"$etcdctl_bin" --endpoints="$joined" --dial-timeout=1s --command-timeout=2s member list -w table >&2
echo "ENDPOINTS=$joined"
echo "three-member-local: healthy; export OMEGA_ETCD=$joined  (Ctrl-C stops all three)" >&2

# Run until a signal (the traps exit through cleanup) or until a member exits by itself.
wait -n "${pids[@]}" || true
echo "three-member-local: a member exited; stopping the others" >&2
exit 1
