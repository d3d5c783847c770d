#!/usr/bin/env bash
# Creates an etcd user and role for every identity make-cell-certs.sh made, with exactly the key ranges that
# kind of component needs, then turns etcd's authentication on.
#
#   deploy/tls/grant-roles.sh DIR ENDPOINTS [PREFIX]
#
# DIR is make-cell-certs.sh's directory (its root certificate does the work); ENDPOINTS etcd's client URLs
# (https://..., comma-separated); PREFIX the cell's key prefix (default /omega/). etcd must run with
# --client-cert-auth and --trusted-ca-file DIR/ca.pem: a user is the common name of its certificate. Safe to
# run again (after adding identities with make-cell-certs.sh).
#
# The roles (P is PREFIX; "prefix" a key range, "key" one key):
#   omega-scheduler   read prefix P; write the claim's keys: P cell/tasks/, cell/alloc/, assign/; a job's
#                     state (cell/jobs/); the quota it claims against (cell/quotas/); its own bookkeeping: cell/owners/, cell/schedulers/, status/, locks/.
#                     Not nodes, drains, versions or the controller's keys.
#   omega-controller  read and write prefix P (it re-places, rolls out, drains and collects everything)
#   agent-NODE        read P cell/ and versions/; write its node's keys (cell/nodes/NODE, cell/live/NODE,
#                     cell/alloc/NODE, assign/NODE/) and task records (cell/tasks/: the states of the tasks it
#                     runs; etcd's ranges cannot name "the tasks of this node"). Not another node's ledger.
#                     Endpoints for discovery (services/: keys are services/<service>/<node>/..., and a range
#                     cannot name "any service, this node", so an agent could publish for another node).
#   agents-PREFIX     the same for the simulated nodes PREFIX-<i> of one agent process
#   operator-NAME     read and write prefix P (omctl: submit, cancel, drain, revert, ...)
#   viewer-NAME       read prefix P (omctl: jobs, nodes, job, events, audit)
# Every role reads and writes the one key P space-check: a transaction of nested writes carries it in its
# failure branch (so that etcd's quota prices the transaction; etcd checks both branches' permissions), and a
# count-only read of it is how a component learns etcd's current revision.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
dir=$1 endpoints=$2 prefix=${3:-/omega/}
[[ "$prefix" == */ ]] || prefix="$prefix/"
[ -f "$dir/identities" ] || { echo "grant-roles.sh: $dir/identities is missing: run make-cell-certs.sh first" >&2; exit 1; }

ctl() {
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --cacert "$dir/ca.pem" --cert "$dir/root.pem" \
    --key "$dir/root-key.pem" "$@"
}

# user NAME ROLE: the user (no password: its certificate is its credential) with its role, both made anew.
user() {
  local name=$1 role=$2
  ctl user get "$name" >/dev/null 2>&1 || ctl user add "$name" --no-password >/dev/null
  if ctl role get "$role" >/dev/null 2>&1; then
    [ "$role" = root ] || { ctl role delete "$role" >/dev/null; ctl role add "$role" >/dev/null; }
  else
    ctl role add "$role" >/dev/null
  fi
  ctl user grant-role "$name" "$role" >/dev/null
}
# grant ROLE read|write|readwrite prefix|key KEY
grant() {
  local role=$1 perm=$2 how=$3 key=$4
  if [ "$how" = prefix ]; then ctl role grant-permission "$role" "$perm" "$key" --prefix >/dev/null
  else ctl role grant-permission "$role" "$perm" "$key" >/dev/null; fi
}
# agent ROLE NODE_KEY_KIND NAME: an agent's role (key: one node; prefix: the simulated nodes NAME*).
agent_role() {
  local role=$1 how=$2 n=$3
  grant "$role" read prefix "${prefix}cell/"
  grant "$role" read prefix "${prefix}versions/"
  grant "$role" readwrite "$how" "${prefix}cell/nodes/$n"
  grant "$role" readwrite "$how" "${prefix}cell/live/$n"
  grant "$role" readwrite "$how" "${prefix}cell/alloc/$n"
  if [ "$how" = prefix ]; then grant "$role" readwrite prefix "${prefix}assign/$n"
  else grant "$role" readwrite prefix "${prefix}assign/$n/"; fi
  grant "$role" readwrite prefix "${prefix}cell/tasks/"
  grant "$role" readwrite prefix "${prefix}services/"
  grant "$role" readwrite key "${prefix}space-check"
}

user root root
made=()
while read -r kind name; do
  case "$kind" in
    root) continue ;;
    scheduler)
      user omega-scheduler omega-scheduler
      grant omega-scheduler read prefix "$prefix"
      for p in cell/tasks/ cell/alloc/ assign/ cell/jobs/ cell/quotas/ cell/owners/ cell/schedulers/ status/ locks/; do
        grant omega-scheduler readwrite prefix "$prefix$p"
      done
      grant omega-scheduler readwrite key "${prefix}space-check"
      ;;
    controller)
      user omega-controller omega-controller
      grant omega-controller readwrite prefix "$prefix"
      ;;
    agent)
      user "agent-$name" "agent-$name"
      agent_role "agent-$name" key "$name"
      ;;
    sim-agents)
      user "agents-$name" "agents-$name"
      agent_role "agents-$name" prefix "$name-"
      ;;
    operator)
      user "operator-$name" "operator-$name"
      grant "operator-$name" readwrite prefix "$prefix"
      ;;
    viewer)
      user "viewer-$name" "viewer-$name"
      grant "viewer-$name" read prefix "$prefix"
      ;;
    *) echo "grant-roles.sh: unknown identity kind '$kind' in $dir/identities" >&2; exit 1 ;;
  esac
  made+=("$kind:$name")
done <"$dir/identities"
ctl auth enable >/dev/null 2>&1 || ctl auth status | grep -q "Authentication Status: true"
echo "etcd at $endpoints: auth enabled; roles for ${#made[@]} identities under $prefix"
