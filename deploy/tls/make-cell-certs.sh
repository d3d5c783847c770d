#!/usr/bin/env bash
# Makes a cell's certificate authority and every identity's certificate, for etcd with --client-cert-auth.
#
#   deploy/tls/make-cell-certs.sh DIR [--san HOST_OR_IP]... [--agent NODE]... [--sim-agents PREFIX]...
#                                     [--operator NAME]... [--viewer NAME]... [--proxy NAME]... [--days N]
#
# DIR gets (keys mode 0600):
#   ca.pem, ca-key.pem               the cell's CA (keep ca-key.pem offline once the cell is made)
#   etcd.pem, etcd-key.pem           etcd's server and peer certificate: 127.0.0.1, localhost and each --san
#   root.pem, root-key.pem           etcd's root user: grant-roles.sh, compaction by hand, recovery
#   omega-scheduler.pem, -key.pem    every scheduler instance (batch, service; one etcd role)
#   omega-controller.pem, -key.pem   the controller replicas
#   agent-NODE.pem, -key.pem         one per --agent NODE[@ADDRESS]: that node's agent, also its log service's
#                                    server certificate (for NODE, 127.0.0.1, localhost and ADDRESS)
#   agents-PREFIX.pem, -key.pem      one per --sim-agents PREFIX: an agent hosting simulated nodes PREFIX-<i>
#   operator-NAME.pem, -key.pem      one per --operator NAME: omctl for people who run the cell
#   viewer-NAME.pem, -key.pem        one per --viewer NAME: omctl read-only
#   proxy-NAME.pem, -key.pem         one per --proxy NAME: deploy/etcd/grpc-proxy.sh on one machine, to etcd and
#                                    to its clients on 127.0.0.1; no common name (etcd 3.4's grpc-proxy refuses a
#                                    certificate with one), so no etcd user: only for an etcd with auth off
#   identities                       "kind name" per etcd identity, read by grant-roles.sh
#
# The common name of each certificate is its etcd user (etcd takes it from the certificate when it runs with
# --client-cert-auth and auth is enabled); grant-roles.sh creates those users and their roles. Running the
# script again on the same DIR keeps the CA and adds what is missing, so a node can be added later.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] && [[ "$1" != -h && "$1" != --help ]] || usage
dir=$1; shift
sans=() agents=() sims=() operators=() viewers=() proxies=() days=825
while [ $# -gt 0 ]; do
  case "$1" in
    --san) sans+=("$2"); shift 2 ;;
    --agent) agents+=("$2"); shift 2 ;;
    --sim-agents) sims+=("$2"); shift 2 ;;
    --operator) operators+=("$2"); shift 2 ;;
    --viewer) viewers+=("$2"); shift 2 ;;
    --proxy) proxies+=("$2"); shift 2 ;;
    --days) days=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "make-cell-certs.sh: unknown argument $1" >&2; usage ;;
  esac
done
command -v openssl >/dev/null || { echo "make-cell-certs.sh: openssl is not installed" >&2; exit 1; }
for name in "${agents[@]%%@*}" "${sims[@]}" "${operators[@]}" "${viewers[@]}" "${proxies[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "make-cell-certs.sh: '$name' is not a valid name" >&2; exit 2; }
done
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# P-256 keys: fast handshakes, and accepted by etcd (Go) and by rustls alike.
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f "$dir/ca.pem" ]; then
  newkey "$dir/ca-key.pem"
  openssl req -new -key "$dir/ca-key.pem" -subj "/CN=omega cell CA $(hostname -s 2>/dev/null || echo host) $(date -u +%Y%m%dT%H%M%SZ)" -out "$tmp/ca.csr"
  printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' >"$tmp/ca.ext"
  openssl x509 -req -in "$tmp/ca.csr" -signkey "$dir/ca-key.pem" -extfile "$tmp/ca.ext" -days "$days" \
    -out "$dir/ca.pem" 2>/dev/null
  chmod 644 "$dir/ca.pem"
  : >"$dir/identities"
fi

# issue NAME CN USAGE [SAN]: a certificate signed by the CA (USAGE: server = server and peer, client). An
# empty CN makes a certificate without one (its subject names the file instead).
issue() {
  local file=$1 cn=$2 usage=$3 san=${4:-} subject
  [ -f "$dir/$file.pem" ] && return 0
  newkey "$dir/$file-key.pem"
  subject="/CN=$cn"
  [ -n "$cn" ] || subject="/O=omega cell/OU=$file"
  openssl req -new -key "$dir/$file-key.pem" -subj "$subject" -out "$tmp/$file.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "authorityKeyIdentifier=keyid"
    if [ "$usage" = server ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$tmp/$file.ext"
  openssl x509 -req -in "$tmp/$file.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -CAserial "$dir/ca.srl" -extfile "$tmp/$file.ext" -days "$days" -out "$dir/$file.pem" 2>/dev/null
  chmod 644 "$dir/$file.pem"
}

# identity KIND NAME FILE: a client certificate whose CN is FILE, recorded for grant-roles.sh.
identity() {
  issue "$3" "$3" client
  grep -qx "$1 $2" "$dir/identities" 2>/dev/null || echo "$1 $2" >>"$dir/identities"
}

san="IP:127.0.0.1,DNS:localhost"
for s in "${sans[@]}"; do
  if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then san+=",IP:$s"; else san+=",DNS:$s"; fi
done
issue etcd etcd server "$san"
identity root root root
identity scheduler omega-scheduler omega-scheduler
identity controller omega-controller omega-controller
for a in "${agents[@]}"; do
  n=${a%%@*} node_san="IP:127.0.0.1,DNS:localhost"
  [[ "$n" =~ ^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$ ]] && node_san+=",DNS:$n"
  if [[ "$a" == *@* ]]; then
    addr=${a#*@}
    if [[ "$addr" =~ ^[0-9.]+$ || "$addr" == *:* ]]; then node_san+=",IP:$addr"; else node_san+=",DNS:$addr"; fi
  fi
  issue "agent-$n" "agent-$n" server "$node_san"
  identity agent "$n" "agent-$n"
done
for p in "${sims[@]}"; do identity sim-agents "$p" "agents-$p"; done
for n in "${operators[@]}"; do identity operator "$n" "operator-$n"; done
for n in "${viewers[@]}"; do identity viewer "$n" "viewer-$n"; done
for n in "${proxies[@]}"; do issue "proxy-$n" "" server "IP:127.0.0.1,DNS:localhost"; done
chmod 644 "$dir/identities"
proxy_count=$(find "$dir" -maxdepth 1 -name 'proxy-*-key.pem' | wc -l)
echo "certificates in $dir: $( (cut -d' ' -f1 "$dir/identities"; for _ in $(seq "$proxy_count"); do echo proxy; done) |
  sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}')"
