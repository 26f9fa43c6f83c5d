#!/usr/bin/env bash
# CBT incremental vs full backup of the same VM disk, side by side in one run:
#   - the mock vCenter (ferry-sim vcenter) serves one VM with one disk of MIB MiB
#     (mixed: 20% zero, 40% compressible, 40% random) and CBT on, and a proxy VM
#     on the same host; ferry backs it up with `ferry backup --vm` over HotAdd
#     (the proxy's device directory, as on a real HotAdd proxy);
#   - per round: a fresh repository, a full backup (the first point of the VM),
#     then the guest overwrites FRACTION of the disk through the admin API in
#     BLOCK-byte blocks (random data, seeded per round), then the incremental.
# Reported per kind: wall time of the whole `ferry backup --vm` process (login,
# snapshot, QueryChangedDiskAreas, HotAdd attach/detach, snapshot removal
# included), the job's own time (keys, pipeline, commit: the report's seconds),
# bytes read from the disk and bytes stored; each the median of REPEAT rounds.
# The page cache holds the disk for both kinds (the mock generates it just
# before), which is the full backup's best case. Issue 8's target: the
# incremental at <= 5% of the full backup's time.
#
# usage: bench/compare-cbt.sh [WORKDIR] [DISK_MIB]   (defaults: /var/tmp/ferry-cbt 2048)
# env:   REPEAT (3), FRACTION (0.01), BLOCK (1048576: guest write size; 65536
#        scatters 64 KiB writes, each costing a whole 1 MiB chunk read),
#        CHUNK (repository chunk size, 1M), PROFILE (release; "debug" only to try
#        the script quickly)
# needs: curl, jq
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-cbt}
MIB=${2:-2048}
REPEAT=${REPEAT:-3}
FRACTION=${FRACTION:-0.01}
BLOCK=${BLOCK:-1048576}
CHUNK=${CHUNK:-1M}
for t in curl jq; do command -v $t >/dev/null || { echo "missing $t: apt-get install -y $t" >&2; exit 2; }; done
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release -q --bin ferry --bin ferry-sim; else cargo build -q --bin ferry --bin ferry-sim; fi
FERRY=$PWD/target/$PROFILE/ferry
SIM=$PWD/target/$PROFILE/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK"

cat > "$WORK/scenario.toml" <<EOF
name = "bench-cbt"
[[cluster]]
name = "C1"
[[host]]
name = "esx-01.lab"
cluster = "C1"
datastores = ["ds-1"]
[[datastore]]
name = "ds-1"
[[vm]]
name = "bench-vm"
host = "esx-01.lab"
datastore = "ds-1"
cbt = true
[[vm.disk]]
size_mib = $MIB
content = "mixed"
seed = 5
[[proxy]]
name = "proxy-1"
host = "esx-01.lab"
datastore = "ds-1"
EOF

"$SIM" vcenter --scenario "$WORK/scenario.toml" --port 0 --dir "$WORK/vc" --json > "$WORK/vc.json" 2>"$WORK/vc.log" &
VC=$!
trap 'kill $VC 2>/dev/null || true' EXIT
for _ in $(seq 1200); do grep -q '"url"' "$WORK/vc.json" 2>/dev/null && break; kill -0 $VC 2>/dev/null || { cat "$WORK/vc.log"; exit 1; }; sleep 0.1; done
j() { jq -r "$1" "$WORK/vc.json"; }
URL=$(j .url); ADMIN=$(j .admin_url); TOKEN=$(j .admin_token); CA=$(j .ca)
DEV=$(j '.device_dirs["proxy-1"]')
j .password > "$WORK/vc.password"

"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem FERRY_REPO=$WORK/repo

backup() {  # backup OUT.json: one `ferry backup --vm`, prints its wall seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$FERRY" --json --no-progress backup --vm bench-vm \
    --vcenter-url "$URL" --vcenter-user "$(j .user)" --vcenter-password-file "$WORK/vc.password" \
    --vcenter-ca "$CA" --proxy-vm proxy-1 --hotadd-device-dir "$DEV" --mode hotadd \
    --enable-cbt > "$1" 2>"$WORK/backup.log" || { cat "$WORK/backup.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}'
}

median() { sort -n | awk -v k="$REPEAT" '{a[NR]=$1} END {print a[int((k+1)/2)]}'; }
: > "$WORK/full.tsv"; : > "$WORK/inc.tsv"
for r in $(seq "$REPEAT"); do
  rm -rf "$WORK/repo"
  "$FERRY" repo init --tenant bench --chunk-size "$CHUNK" >/dev/null
  w=$(backup "$WORK/full-$r.json")
  [ "$(jq -r '.disks[0].read' "$WORK/full-$r.json")" = full ] || { echo "round $r: the first backup was not a full read" >&2; exit 1; }
  printf "%s\t%s\t%s\t%s\n" "$w" "$(jq .report.seconds "$WORK/full-$r.json")" \
    "$(jq .disks[0].bytes_read "$WORK/full-$r.json")" "$(jq .report.disks[0].bytes_new_stored "$WORK/full-$r.json")" >> "$WORK/full.tsv"
  curl -sf --cacert "$CA" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d "{\"random\": {\"fraction\": $FRACTION, \"seed\": $r, \"block\": $BLOCK}}" \
    "${ADMIN}vms/bench-vm/disks/2000/write" > "$WORK/write-$r.json"
  w=$(backup "$WORK/inc-$r.json")
  [ "$(jq -r '.disks[0].read' "$WORK/inc-$r.json")" = cbt ] || { echo "round $r: not an incremental: $(jq -r '.disks[0].read_reason' "$WORK/inc-$r.json")" >&2; exit 1; }
  printf "%s\t%s\t%s\t%s\n" "$w" "$(jq .report.seconds "$WORK/inc-$r.json")" \
    "$(jq .disks[0].bytes_read "$WORK/inc-$r.json")" "$(jq .report.disks[0].bytes_new_stored "$WORK/inc-$r.json")" >> "$WORK/inc.tsv"
done

col() { cut -f"$2" "$WORK/$1.tsv" | median; }
echo "disk: $MIB MiB mixed (20% zero, 40% compressible, 40% random), $CHUNK chunks, HotAdd through the mock vCenter; $(nproc) cores; $("$FERRY" --version)"
echo "change: $FRACTION of the disk in $BLOCK-byte random blocks per round; medians of $REPEAT rounds"
printf "%-13s %10s %10s %12s %12s\n" "" "wall s" "job s" "read MiB" "stored MiB"
for k in full inc; do
  printf "%-13s %10.3f %10.3f %12.1f %12.1f\n" "$([ $k = full ] && echo full || echo incremental)" \
    "$(col $k 1)" "$(col $k 2)" "$(awk -v b="$(col $k 3)" 'BEGIN{print b/1048576}')" "$(awk -v b="$(col $k 4)" 'BEGIN{print b/1048576}')"
done
awk -v fw="$(col full 1)" -v iw="$(col inc 1)" -v fj="$(col full 2)" -v ij="$(col inc 2)" \
  'BEGIN{printf "incremental / full: wall %.1f%%, job %.1f%% (target <= 5%%)\n", 100*iw/fw, 100*ij/fj}'
echo "per round (wall s, job s, bytes read, bytes stored): full"; cat "$WORK/full.tsv"; echo "incremental"; cat "$WORK/inc.tsv"
