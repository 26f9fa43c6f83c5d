#!/usr/bin/env bash
# NBD-SSL read path, side by side in one run: ferry's NBD client vs nbdcopy, both
# reading the same image from the same nbdkit server over TLS (x509) on a Unix
# socket; the HotAdd-style local read (ferry reading the file) vs dd bs=4M; and a
# whole ferry backup (hash, LZ4, AES-GCM, store) from the file vs over NBD-SSL,
# in alternating pairs, with the speed ratio and ferry's own CPU time per GiB
# (the ratio a proxy would see with the NBD server on another host).
# Each figure is the median of $REPEAT runs with the image in the page cache.
#
# usage: bench/compare-nbd.sh [WORKDIR] [IMAGE_MIB]   (defaults: /var/tmp/ferry-nbd 2048)
# needs: nbdkit, libnbd-bin (nbdcopy), openssl
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-nbd}
MIB=${2:-2048}
REPEAT=${REPEAT:-3}
cargo build --release -q --bin ferry --bin ferry-sim
FERRY=$PWD/target/release/ferry
SIM=$PWD/target/release/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK/certs"
IMG=$WORK/disk.img
# Fully allocated (no holes) so both tools move the same bytes.
"$SIM" gen-disk --out "$IMG" --size-mib "$MIB" --seed 3 --zero-pct 0 >/dev/null
bash ../shared/peers/gen-certs.sh "$WORK/certs" >/dev/null 2>&1 || {
  # Fallback when shared/ is not beside the checkout: same layout via openssl.
  (cd "$WORK/certs" && openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=ca" -keyout ca-key.pem -out ca-cert.pem 2>/dev/null \
   && openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server-key.pem -out s.csr 2>/dev/null \
   && openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 -extfile <(printf "subjectAltName=DNS:localhost") -out server-cert.pem 2>/dev/null)
}
SOCK=$WORK/nbd.sock
nbdkit -f -r --tls=require --tls-certificates="$WORK/certs" -U "$SOCK" --threads 16 file "$IMG" &
KIT=$!
trap 'kill $KIT 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
cat "$IMG" > /dev/null

median() { sort -n | awk -v k="$REPEAT" '{a[NR]=$1} END {print a[int((k+1)/2)]}'; }
time_cmd() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}'; }
report() { awk -v n="$1" -v s="$2" -v m="$MIB" 'BEGIN { printf "%-36s %8.1f MiB/s  (%.2f s, median of '"$REPEAT"')\n", n, m/s, s }'; }

URI_KIT="nbds+unix:///?socket=$SOCK&tls-certificates=$WORK/certs"
s=$(for _ in $(seq "$REPEAT"); do time_cmd nbdcopy --connections=4 "nbds+unix:///?socket=$SOCK&tls-certificates=$WORK/certs" null:; done | median)
report "nbdcopy over TLS (4 connections)" "$s"
s=$(for _ in $(seq "$REPEAT"); do time_cmd "$FERRY" bench --read "$URI_KIT" --readers 4 --chunk-size 4M; done | median)
report "ferry NBD-SSL read (4 connections)" "$s"
s=$(for _ in $(seq "$REPEAT"); do time_cmd dd if="$IMG" of=/dev/null bs=4M; done | median)
report "dd bs=4M of the image" "$s"
s=$(for _ in $(seq "$REPEAT"); do time_cmd "$FERRY" bench --read "$IMG" --readers 2 --chunk-size 4M; done | median)
report "ferry local read (HotAdd path)" "$s"

"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem
# Each backup writes ~800 MB of new page cache. On a VM whose free memory goes
# back to the host (virtio-balloon free page reporting), that costs 0.2 s or 8 s
# depending on whether the freed pages were reported yet; writing and deleting
# 1.5 GiB first gives both backups host-backed free memory (WARM=0 skips it).
fresh() {
  rm -rf "$WORK/repo"; "$FERRY" repo init -r "$WORK/repo" >/dev/null; sync
  if [ "${WARM:-1}" = 1 ]; then
    dd if=/dev/zero of="$WORK/warm" bs=1M count=1536 2>/dev/null; rm -f "$WORK/warm"
  fi
}
# One backup: prints wall seconds and ferry's own CPU seconds (user + system).
backup_run() {
  local TIMEFORMAT='%R %U %S' out
  out=$( { time "$@" >/dev/null 2>&1; } 2>&1 )
  awk '{ printf "%s %.2f\n", $1, $2 + $3 }' <<<"$out"
}
# File and NBD-SSL backups alternate, so both see the same state of the machine.
backup_pairs() {  # $1: command prefix (e.g. taskset); prints "wall_f cpu_f wall_n cpu_n" per pair
  local pre=$1
  for _ in $(seq "$REPEAT"); do
    fresh; f=$(backup_run $pre "$FERRY" --no-progress backup -r "$WORK/repo" --name f --image "$IMG")
    fresh; n=$(backup_run $pre "$FERRY" --no-progress backup -r "$WORK/repo" --name n --nbd "$URI_KIT" ${NBD_WORKERS:+--workers $NBD_WORKERS})
    echo "$f $n"
  done
}
col() { awk -v c="$1" '{print $c}' | median; }
# Ticks the hypervisor took from this VM's vCPUs (steal, /proc/stat), so noisy
# runs show up as such.
steal() { awk '/^cpu /{print $9}' /proc/stat; }  # in USER_HZ ticks (10 ms)
report_pairs() {  # $1: label prefix; stdin: backup_pairs output
  local rows; rows=$(cat)
  local wf cf wn cn
  wf=$(col 1 <<<"$rows"); cf=$(col 2 <<<"$rows"); wn=$(col 3 <<<"$rows"); cn=$(col 4 <<<"$rows")
  report "${1}ferry backup from the file" "$wf"
  report "${1}ferry backup over NBD-SSL" "$wn"
  awk -v wf="$wf" -v wn="$wn" -v cf="$cf" -v cn="$cn" -v m="$MIB" -v p="$1" 'BEGIN {
    printf "%sNBD-SSL / file backup speed          %5.2fx\n", p, wf / wn
    printf "%sferry CPU per GiB: file %.2f s, NBD-SSL %.2f s  (%.2fx)\n", p, cf * 1024 / m, cn * 1024 / m, cf / cn }'
  printf '%sspeed ratio of each pair:' "$1"
  awk '{ printf " %.2f", $1 / $3 }' <<<"$rows"
  echo
}
st0=$(steal)
backup_pairs "" | report_pairs ""
echo "steal during the backups: $(( $(steal) - st0 )) ticks of 10 ms"

# Pinned: ferry on CPU 0 for both, nbdkit alone on CPU 1 (as if the NBD server
# were another host).
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  kill $KIT 2>/dev/null; wait $KIT 2>/dev/null || true
  rm -f "$SOCK"
  taskset -c 1 nbdkit -f -r --tls=require --tls-certificates="$WORK/certs" -U "$SOCK" --threads 16 file "$IMG" &
  KIT=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
  st0=$(steal)
  backup_pairs "taskset -c 0" | report_pairs "pinned: "
  echo "pinned: steal during the backups: $(( $(steal) - st0 )) ticks of 10 ms"
fi
