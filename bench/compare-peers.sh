#!/usr/bin/env bash
# Side-by-side full-backup throughput and peak RSS: ferry vs restic vs borg on the
# same generated image, back to back in one run; ferry's restore against a plain
# `dd` copy of the image (the same page-cache write path); and ferry's peak RSS on a
# large sparse image. Each figure is the median of $REPEAT runs, each on a fresh
# repository with the same cache state (caches dropped, then the input warmed).
#
# usage: bench/compare-peers.sh [WORKDIR] [IMAGE_MIB]     (defaults: /var/tmp/ferry-bench 2048)
# env:   REPEAT (3), SPARSE_GIB (64)
# needs: restic, borgbackup, GNU time (apt-get install -y restic borgbackup time)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-bench}
MIB=${2:-2048}
SPARSE_GIB=${SPARSE_GIB:-64}
REPEAT=${REPEAT:-3}
for t in restic borg /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y restic borgbackup time" >&2; exit 2; }
done
cargo build --release -q --bin ferry --bin ferry-sim
FERRY=$PWD/target/release/ferry
SIM=$PWD/target/release/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK"
IMG=$WORK/mixed.img
"$SIM" gen-disk --out "$IMG" --size-mib "$MIB" --seed 7 >/dev/null
BYTES=$(stat -c %s "$IMG")

# measure NAME SETUP WARM CMD...: run SETUP (fresh state), drop caches, warm WARM,
# time CMD; REPEAT times; print the median MiB/s over the image size and peak RSS.
measure() {
  local name=$1 setup=$2 warm=$3; shift 3
  local results=()
  for _ in $(seq "$REPEAT"); do
    eval "$setup"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    find "$warm" -type f -exec cat {} + > /dev/null
    local t0 t1
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$WORK/rss" "$@" > "$WORK/cmd.log" 2>&1 || { echo "$name failed:"; cat "$WORK/cmd.log"; exit 1; }
    t1=$(date +%s.%N)
    results+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{printf "%.3f", z-a}') $(cat "$WORK/rss")")
  done
  printf '%s\n' "${results[@]}" | sort -n | awk -v n="$name" -v b="$BYTES" -v k="$REPEAT" '
    { s[NR]=$1; r[NR]=$2 } END { m=int((k+1)/2);
      printf "%-24s %8.1f MiB/s  %7.2f s (median of %d; min %.2f max %.2f)  peak RSS %6.1f MiB\n", n, b/1048576/s[m], s[m], k, s[1], s[k], r[m]/1024 }'
}

echo "image: $MIB MiB mixed (20% zero, 40% compressible, 40% random) in $WORK; $(nproc) cores; $(uname -r)"
echo "versions: $("$FERRY" --version), $(restic version | cut -d' ' -f1-2), $(borg --version)"
"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic-repo
export BORG_PASSPHRASE=bench BORG_REPO=$WORK/borg-repo BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

measure "ferry backup" 'rm -rf $WORK/ferry-repo; $FERRY repo init -r $WORK/ferry-repo --tenant bench >/dev/null' "$IMG" \
  "$FERRY" --no-progress backup -r "$WORK/ferry-repo" --name img --image "$IMG"
measure "restic backup" 'rm -rf $RESTIC_REPOSITORY; restic init -q >/dev/null' "$IMG" \
  restic backup -q "$IMG"
measure "borg create (lz4)" 'rm -rf $BORG_REPO; borg init -e repokey-blake2 >/dev/null 2>&1' "$IMG" \
  borg create --compression lz4 ::a "$IMG"
measure "ferry restore" 'rm -f $WORK/restored.img' "$WORK/ferry-repo" \
  "$FERRY" --no-progress restore -r "$WORK/ferry-repo" --point latest:img --target "$WORK/restored.img"
cmp "$IMG" "$WORK/restored.img" && echo "ferry restore is bit-identical"
measure "dd copy of the image" 'rm -f $WORK/dd.img' "$IMG" \
  dd if="$IMG" of="$WORK/dd.img" bs=4M conv=sparse,fsync status=none
rm -f "$WORK/restored.img" "$WORK/dd.img"
echo "stored: ferry $(du -sh "$WORK/ferry-repo" | cut -f1), restic $(du -sh "$RESTIC_REPOSITORY" | cut -f1), borg $(du -sh "$BORG_REPO" | cut -f1)"

# Peak RSS does not grow with disk size: a sparse image with ~3% data.
BIG=$WORK/sparse.img
"$SIM" gen-disk --out "$BIG" --size-mib $((SPARSE_GIB * 1024)) --seed 9 --zero-pct 97 --compressible-pct 1 >/dev/null
BYTES=$(stat -c %s "$BIG") REPEAT=1 measure "ferry backup ${SPARSE_GIB}G sparse" 'true' "$BIG" \
  "$FERRY" --no-progress backup -r "$WORK/ferry-repo" --name sparse --image "$BIG"
echo "sparse image: $(du -h "$BIG" | cut -f1) allocated of ${SPARSE_GIB} GiB"
rm -rf "$WORK"
