#!/usr/bin/env bash
# Bounded load test of the agent API (issue 21, item 6): one `ferry agent` on
# loopback over TLS with a state database holding $JOBS job records, driven by
# wrk for a fixed duration per endpoint. Reports requests per second, latency
# percentiles and every non-2xx answer or socket error (there must be none).
# wrk and the agent share the machine's cores.
#
# usage: bench/api-load.sh [WORKDIR]   (default /var/tmp/ferry-api-load)
# env:   JOBS (2000 records), DURATION (10s per endpoint), CONNECTIONS (32), THREADS (2)
# needs: wrk, curl, openssl
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-api-load}
JOBS=${JOBS:-2000}
DURATION=${DURATION:-10s}
CONN=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
for t in wrk curl openssl; do command -v $t >/dev/null || { echo "missing $t (apt-get install -y wrk curl openssl)" >&2; exit 2; }; done
cargo build --release -q --bin ferry
FERRY=$PWD/target/release/ferry
rm -rf "$WORK" && mkdir -p "$WORK/pki"
(cd "$WORK/pki" && openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench-ca" -keyout ca-key.pem -out ca.pem 2>/dev/null \
  && openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout agent.key -out a.csr 2>/dev/null \
  && openssl x509 -req -in a.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
       -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth") \
       -out agent.pem 2>/dev/null)
"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
"$FERRY" repo init -r "$WORK/repo" --public-key "$WORK/k.pub.pem" --tenant tenant-a >/dev/null
TOKEN=bench-token-0123456789abcdef0123
echo "$TOKEN" > "$WORK/token"
cat > "$WORK/agent.toml" <<TOML
[agent]
id = "bench-agent"
listen = "127.0.0.1:0"
tls_cert = "pki/agent.pem"
tls_key = "pki/agent.key"
token_file = "token"
state_dir = "state"
slots = 64
modes = ["nbdssl"]
[[tenant]]
name = "tenant-a"
repository = "repo"
restore_dirs = ["restores"]
[tenant.pem]
public_key = "k.pub.pem"
private_key = "k.key.pem"
TOML
"$FERRY" agent --config "$WORK/agent.toml" > "$WORK/agent.out" 2> "$WORK/agent.log" &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true' EXIT
for _ in $(seq 200); do grep -q "serving on" "$WORK/agent.out" 2>/dev/null && break; sleep 0.05; done
URL=$(sed -n 's/^ferry agent serving on //p' "$WORK/agent.out")
[ -n "$URL" ] || { cat "$WORK/agent.log"; exit 1; }
C=(curl -sS --cacert "$WORK/pki/ca.pem" -H "Authorization: Bearer $TOKEN")

# Job history: restores of a point that does not exist (each job fails at once
# with not_found and stays in the records), submitted 50 at a time.
t0=$(date +%s.%N)
pids=()
for i in $(seq "$JOBS"); do
  "${C[@]}" -o /dev/null -H 'content-type: application/json' \
    -d "{\"tenant\":\"tenant-a\",\"point\":\"latest:vm-$i\",\"target\":{\"kind\":\"directory\",\"path\":\"$WORK/restores/none\"}}" \
    "$URL/v1/restores" &
  pids+=($!)
  # Not a bare `wait`: that would wait for the agent too.
  if (( i % 50 == 0 )); then wait "${pids[@]}"; pids=(); fi
done
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
t1=$(date +%s.%N)
RECORDS=$("${C[@]}" "$URL/v1/jobs?limit=1000" | grep -o '"id"' | wc -l)
ONE=$("${C[@]}" "$URL/v1/jobs?limit=1" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p' | head -1)
printf "agent %s; %d job records created in %.1f s (list shows %d with limit=1000); wrk %s x %d connections x %d threads; %d cores; %s\n" \
  "$URL" "$JOBS" "$(awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}')" "$RECORDS" "$DURATION" "$CONN" "$THREADS" "$(nproc)" "$("$FERRY" --version)"
printf "%-28s %10s %9s %9s %9s %9s %8s\n" endpoint "req/s" p50 p90 p99 max errors
load() {
  local name=$1 path=$2; shift 2
  wrk -t"$THREADS" -c"$CONN" -d"$DURATION" --latency "$@" "$URL$path" > "$WORK/wrk.out"
  local rps p50 p90 p99 max non2xx sock
  rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/wrk.out")
  p90=$(awk '$1=="90%" {print $2}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/wrk.out")
  max=$(awk '/^    Latency/ {print $4}' "$WORK/wrk.out")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$WORK/wrk.out"); non2xx=${non2xx:-0}
  sock=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$WORK/wrk.out"); sock=${sock:-0}
  printf "%-28s %10s %9s %9s %9s %9s %8s\n" "$name" "$rps" "$p50" "$p90" "$p99" "$max" "$((non2xx + sock))"
}
load "GET /v1/health" /v1/health
load "GET /v1/info" /v1/info -H "Authorization: Bearer $TOKEN"
load "GET /v1/jobs?limit=100" "/v1/jobs?limit=100" -H "Authorization: Bearer $TOKEN"
load "GET /v1/jobs/{id}" "/v1/jobs/$ONE" -H "Authorization: Bearer $TOKEN"
kill -TERM "$AGENT"; wait "$AGENT" || true
