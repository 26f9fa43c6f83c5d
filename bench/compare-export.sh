#!/usr/bin/env bash
# Instant access vs full restore, side by side in one run on the same restore point:
#   - `ferry restore` of the point's disk to a new file (decode + write, the full
#     restore path);
#   - `ferry export` of the same disk, read by `nbdcopy` to /dev/null (null:) and to
#     a file, over TCP in clear text and with TLS, and by `ferry bench --read`.
# Throughput is the disk's size over wall time (holes are skipped by every reader:
# restore leaves them unwritten, nbdcopy and ferry use block status). Each figure is
# the median of $REPEAT runs; the repository is in the page cache for all of them.
# The target of issue 8 is export read >= 0.5x restore.
#
# usage: bench/compare-export.sh [WORKDIR] [IMAGE_MIB]   (defaults: /var/tmp/ferry-export 2048)
# env:   REPEAT (3), CONNECTIONS (4: nbdcopy --connections and ferry --readers)
# needs: libnbd-bin (nbdcopy), openssl (a throwaway CA and server certificate)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-export}
MIB=${2:-2048}
REPEAT=${REPEAT:-3}
CONN=${CONNECTIONS:-4}
command -v nbdcopy >/dev/null || { echo "missing nbdcopy: apt-get install -y libnbd-bin" >&2; exit 2; }
cargo build --release -q --bin ferry --bin ferry-sim
FERRY=$PWD/target/release/ferry
SIM=$PWD/target/release/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK/certs"
IMG=$WORK/disk.img
"$SIM" gen-disk --out "$IMG" --size-mib "$MIB" --seed 5 >/dev/null
BYTES=$(stat -c %s "$IMG")
(cd "$WORK/certs" && openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench-ca" -keyout ca-key.pem -out ca-cert.pem 2>/dev/null \
  && openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server-key.pem -out s.csr 2>/dev/null \
  && openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
       -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth") \
       -out server-cert.pem 2>/dev/null)

"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem FERRY_REPO=$WORK/repo
"$FERRY" repo init --tenant bench >/dev/null
"$FERRY" --no-progress backup --name vm --image "$IMG" >/dev/null
find "$WORK/repo" -type f -exec cat {} + > /dev/null

median() { sort -n | awk -v k="$REPEAT" '{a[NR]=$1} END {print a[int((k+1)/2)]}'; }
time_cmd() { local t0 t1; t0=$(date +%s.%N); "$@" >"$WORK/cmd.log" 2>&1 || { echo "failed: $*" >&2; cat "$WORK/cmd.log" >&2; exit 1; }; t1=$(date +%s.%N); awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}'; }
declare -A RATE
report() {
  RATE[$1]=$(awk -v b="$BYTES" -v s="$2" 'BEGIN{printf "%.1f", b/1048576/s}')
  printf "%-46s %8s MiB/s  (%.2f s, median of %d)\n" "$1" "${RATE[$1]}" "$2" "$REPEAT"
}

echo "disk: $MIB MiB mixed (20% zero, 40% compressible, 40% random), 1 MiB chunks; $(nproc) cores; $("$FERRY" --version)"
s=$(for _ in $(seq "$REPEAT"); do rm -f "$WORK/restored.img"; time_cmd "$FERRY" --no-progress restore --point latest:vm --target "$WORK/restored.img"; done | median)
report "ferry restore (to a file)" "$s"
rm -f "$WORK/restored.img"

# start_export ARGS...: run ferry export in the background, set URI.
start_export() {
  "$FERRY" --json export --point latest:vm --listen 127.0.0.1:0 "$@" > "$WORK/export.json" 2>"$WORK/export.log" &
  EXP=$!
  for _ in $(seq 200); do grep -q '"uri"' "$WORK/export.json" 2>/dev/null && break; sleep 0.05; done
  URI=$(sed -n 's/.*"uri": "\(.*\)".*/\1/p' "$WORK/export.json")
  [ -n "$URI" ] || { cat "$WORK/export.log"; exit 1; }
}
stop_export() { kill -TERM "$EXP"; wait "$EXP"; }
trap 'kill $EXP 2>/dev/null || true' EXIT

start_export
s=$(for _ in $(seq "$REPEAT"); do time_cmd nbdcopy --connections="$CONN" "$URI" null:; done | median)
report "export -> nbdcopy null: ($CONN conn, clear)" "$s"
s=$(for _ in $(seq "$REPEAT"); do rm -f "$WORK/copy.img"; time_cmd nbdcopy --connections="$CONN" "$URI" "$WORK/copy.img"; done | median)
report "export -> nbdcopy to a file ($CONN conn, clear)" "$s"
cmp "$WORK/copy.img" "$IMG" && rm -f "$WORK/copy.img"
s=$(for _ in $(seq "$REPEAT"); do time_cmd "$FERRY" bench --read "$URI" --readers "$CONN" --chunk-size 4M; done | median)
report "export -> ferry bench --read ($CONN conn, clear)" "$s"
stop_export

start_export --tls-certificates "$WORK/certs"
s=$(for _ in $(seq "$REPEAT"); do time_cmd nbdcopy --connections="$CONN" "$URI" null:; done | median)
report "export -> nbdcopy null: ($CONN conn, TLS)" "$s"
s=$(for _ in $(seq "$REPEAT"); do time_cmd "$FERRY" bench --read "$URI" --readers "$CONN" --chunk-size 4M; done | median)
report "export -> ferry bench --read ($CONN conn, TLS)" "$s"
stop_export

R=${RATE["ferry restore (to a file)"]}
for k in "${!RATE[@]}"; do
  [ "$k" = "ferry restore (to a file)" ] && continue
  awk -v n="$k" -v e="${RATE[$k]}" -v r="$R" 'BEGIN{printf "ratio %-48s %.2fx restore (target >= 0.5x)\n", n":", e/r}'
done | sort
