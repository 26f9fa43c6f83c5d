#!/usr/bin/env bash
# Chunk codecs side by side (issue 23): full-backup throughput and stored size of
# ferry with each codec (lz4, zstd:1, zstd:3, auto) against restic (zstd, its
# default "auto" compression) and borg (lz4 and zstd,3), on the same generated
# image, back to back in one run. Each throughput is the median of $REPEAT runs on
# a fresh repository, caches dropped then the input warmed; stored = `du -sb` of
# the repository after the backup.
#
# usage: bench/compare-codecs.sh [WORKDIR] [IMAGE_MIB]   (defaults: /var/tmp/ferry-codecs 2048)
# env:   REPEAT (3), IMAGE (an existing image to use instead of a generated one)
# needs: restic, borgbackup (apt-get install -y restic borgbackup)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-codecs}
MIB=${2:-2048}
REPEAT=${REPEAT:-3}
for t in restic borg; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y restic borgbackup" >&2; exit 2; }
done
cargo build --release -q --bin ferry --bin ferry-sim
FERRY=$PWD/target/release/ferry
SIM=$PWD/target/release/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK"
IMG=${IMAGE:-$WORK/mixed.img}
[ -n "${IMAGE:-}" ] || "$SIM" gen-disk --out "$IMG" --size-mib "$MIB" --seed 7 >/dev/null
BYTES=$(stat -c %s "$IMG")

# measure NAME REPO SETUP CMD...: REPEAT times: SETUP, drop caches, warm the
# image, time CMD; print the median MiB/s over the image size and the stored size.
measure() {
  local name=$1 repo=$2 setup=$3; shift 3
  local times=()
  for _ in $(seq "$REPEAT"); do
    eval "$setup"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    cat "$IMG" > /dev/null
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/cmd.log" 2>&1 || { echo "$name failed:"; cat "$WORK/cmd.log"; exit 1; }
    t1=$(date +%s.%N)
    times+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{printf "%.3f", z-a}')")
  done
  local stored
  stored=$(du -sb "$repo" | cut -f1)
  printf '%s\n' "${times[@]}" | sort -n | awk -v n="$name" -v b="$BYTES" -v k="$REPEAT" -v st="$stored" '
    { s[NR]=$1 } END { m=int((k+1)/2);
      printf "%-22s %8.1f MiB/s  %7.2f s (median of %d)   stored %8.1f MiB (%5.1f%% of the image)\n",
        n, b/1048576/s[m], s[m], k, st/1048576, 100*st/b }'
}

echo "image: $(basename "$IMG"), $((BYTES >> 20)) MiB, in $WORK; $(nproc) cores; $(uname -r)"
echo "versions: $("$FERRY" --version), $(restic version | cut -d' ' -f1-2), $(borg --version)"
"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic-repo
export BORG_PASSPHRASE=bench BORG_REPO=$WORK/borg-repo BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

for codec in lz4 zstd:1 zstd:3 auto:1; do
  measure "ferry $codec" "$WORK/ferry-repo" \
    "rm -rf $WORK/ferry-repo; $FERRY repo init -r $WORK/ferry-repo --tenant bench --compression $codec >/dev/null" \
    "$FERRY" --no-progress backup -r "$WORK/ferry-repo" --name img --image "$IMG"
done
"$FERRY" --no-progress restore -r "$WORK/ferry-repo" --point latest:img --target "$WORK/restored.img" >/dev/null
cmp "$IMG" "$WORK/restored.img" && echo "ferry auto:1 restore is bit-identical"
rm -f "$WORK/restored.img"
measure "restic (zstd auto)" "$RESTIC_REPOSITORY" 'rm -rf $RESTIC_REPOSITORY; restic init -q >/dev/null' \
  restic backup -q "$IMG"
measure "borg lz4" "$BORG_REPO" 'rm -rf $BORG_REPO; borg init -e repokey-blake2 >/dev/null 2>&1' \
  borg create --compression lz4 ::a "$IMG"
measure "borg zstd,3" "$BORG_REPO" 'rm -rf $BORG_REPO; borg init -e repokey-blake2 >/dev/null 2>&1' \
  borg create --compression zstd,3 ::a "$IMG"
rm -rf "$WORK"
