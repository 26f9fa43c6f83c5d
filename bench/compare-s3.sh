#!/usr/bin/env bash
# Object storage side by side: full backup and restore of the same generated image
# with ferry to a local directory repository, with ferry to S3 on loopback (s3s-fs
# serving a directory on the same disk), and with restic (its default compression)
# to the same s3s-fs server; then ferry's S3 backup and restore with N requests in
# flight (a backup worker checks whether its chunk exists, a ranged GET, then PUTs
# it; a restore worker GETs its chunk; synchronously, one request in flight per
# worker; on S3 ferry runs max(--workers, FERRY_S3_CONNECTIONS (default 8))
# workers, so the "ferry ... s3" rows run its default and the sweep sets both to N).
# Each figure is the median of $REPEAT runs; every backup run gets a fresh
# repository / bucket; caches are dropped before each run, then the input warmed
# (the image for a backup, the repository or bucket directory for a restore).
# stored = `du -sb` of the repository directory / of the bucket directory (s3s-fs
# keeps two small JSON files per object outside it, at its root: listed apart).
# CPU = user+sys seconds of the client command (GNU time) and of the s3s-fs
# process (/proc/PID/stat) during the run; "other" = the rest of the machine's
# busy CPU time in that run (/proc/stat: kernel writeback, anything else running);
# RSS = the client's peak RSS (GNU time %M, = "Maximum resident set size" of -v).
#
# usage: bench/compare-s3.sh [WORKDIR] [IMAGE_MIB]     (defaults: /var/tmp/ferry-s3 2048)
# env:   REPEAT (3); FERRY_BIN_DIR (directory holding ferry and ferry-sim, e.g.
#        /work/bench-target/release from a separate CARGO_TARGET_DIR; default:
#        cargo build --release here, target/release); S3S_FS
#        (.peers/s3s-fs/bin/s3s-fs); PORT (the first free one from 18014);
#        S3_WORKERS ("1 2 4 8 16": ferry S3 backup + restore with N requests in
#        flight; empty: skip); IMAGE (an existing image instead of a generated one);
#        IDLE_WAIT (0; on a shared machine: before each run wait up to that many
#        seconds for an idle second)
# needs: restic, GNU time (apt-get install -y restic time), curl, s3s-fs (.ci/run:
#        cargo install s3s-fs --version 0.14.1 --features binary --locked --root .peers/s3s-fs)
set -euo pipefail
WORK=$(realpath -m "${1:-/var/tmp/ferry-s3}")
[ -z "${IMAGE:-}" ] || IMAGE=$(realpath "$IMAGE")
cd "$(dirname "$0")/.."
MIB=${2:-2048}
REPEAT=${REPEAT:-3}
S3_WORKERS=${S3_WORKERS-1 2 4 8 16}
S3S_FS=${S3S_FS:-$PWD/.peers/s3s-fs/bin/s3s-fs}
for t in restic /usr/bin/time "$S3S_FS"; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y restic time; s3s-fs: see the header" >&2; exit 2; }
done
if [ -z "${FERRY_BIN_DIR:-}" ]; then
  cargo build --release -q --bin ferry --bin ferry-sim
  FERRY_BIN_DIR=$PWD/target/release
fi
FERRY=$FERRY_BIN_DIR/ferry
SIM=$FERRY_BIN_DIR/ferry-sim
rm -rf "$WORK" && mkdir -p "$WORK"
IMG=${IMAGE:-$WORK/mixed.img}
[ -n "${IMAGE:-}" ] || "$SIM" gen-disk --out "$IMG" --size-mib "$MIB" --seed 7 >/dev/null
BYTES=$(stat -c %s "$IMG")

# s3s-fs on loopback, its root on the same disk as the local repository.
S3ROOT=$WORK/s3root
mkdir -p "$S3ROOT"
PORT=${PORT:-18014}
while ss -Htln "sport = :$PORT" | grep -q .; do PORT=$((PORT + 1)); done
export AWS_ACCESS_KEY_ID=benchak AWS_SECRET_ACCESS_KEY=benchsecretkey AWS_REGION=us-east-1
export FERRY_S3_ENDPOINT=http://127.0.0.1:$PORT
"$S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3ROOT" > "$WORK/s3s-fs.log" 2>&1 &
S3PID=$!
trap 'kill $S3PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -s -o /dev/null "$FERRY_S3_ENDPOINT/" && break
  sleep 0.1
done
TCK=$(getconf CLK_TCK)
s3cpu() { awk -v t="$TCK" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$S3PID/stat"; }
# CPU seconds the whole machine spent busy (to see what else ran during a run).
allcpu() { awk -v t="$TCK" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / t }' /proc/stat; }
# On a shared machine: wait up to $IDLE_WAIT s for a second with < 10% of it busy.
wait_idle() {
  [ "${IDLE_WAIT:-0}" -gt 0 ] || return 0
  local end=$((SECONDS + IDLE_WAIT)) a b
  while [ "$SECONDS" -lt "$end" ]; do
    a=$(allcpu); sleep 1; b=$(allcpu)
    awk -v a="$a" -v b="$b" -v n="$(nproc)" 'BEGIN { exit !((b - a) < 0.1 * n) }' && return 0
  done
  echo "  (machine still busy after ${IDLE_WAIT:-0} s; measuring anyway)" >&2
}

# A fresh bucket B: its directory and s3s-fs's per-object files at the root.
sidecars() { printf '.bucket-%s.' "$(printf %s "$1" | base64 -w0 | tr '+/' '-_' | tr -d =)"; }
fresh_bucket() {
  rm -rf "${S3ROOT:?}/$1"
  find "$S3ROOT" -maxdepth 1 -name "$(sidecars "$1")*" -delete
  mkdir "$S3ROOT/$1"
}

# measure NAME STORED SETUP WARM CMD...: REPEAT times: SETUP (fresh state), drop
# caches, warm WARM (file or directory), time CMD; print the median run's MiB/s over
# the image size, its peak RSS and CPU, and (STORED non-empty) `du -sb STORED`.
measure() {
  local name=$1 stored=$2 setup=$3 warm=$4; shift 4
  local results=()
  for _ in $(seq "$REPEAT"); do
    eval "$setup"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    find "$warm" -type f -exec cat {} + > /dev/null
    wait_idle
    local t0 t1 c0 c1 a0 a1
    c0=$(s3cpu)
    a0=$(allcpu)
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M %U %S" -o "$WORK/rusage" "$@" > "$WORK/cmd.log" 2>&1 || { echo "$name failed:"; cat "$WORK/cmd.log"; exit 1; }
    t1=$(date +%s.%N)
    c1=$(s3cpu)
    a1=$(allcpu)
    results+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{printf "%.3f", z-a}') $(tail -n1 "$WORK/rusage") $(awk -v a="$c0" -v z="$c1" 'BEGIN{printf "%.2f", z-a}') $(awk -v a="$a0" -v z="$a1" 'BEGIN{printf "%.2f", z-a}')")
  done
  local st=-1
  [ -z "$stored" ] || st=$(du -sb "$stored" | cut -f1)
  printf '%s\n' "${results[@]}" | sort -n | awk -v n="$name" -v b="$BYTES" -v k="$REPEAT" -v st="$st" '
    { s[NR]=$1; r[NR]=$2; c[NR]=$3+$4; f[NR]=$5; o[NR]=$6-$3-$4-$5; if (o[NR] < 0) o[NR]=0 } END { m=int((k+1)/2);
      printf "%-30s %7.1f MiB/s %7.2f s (min %6.2f max %6.2f)  RSS %6.1f MiB  CPU %5.1f s  s3s-fs %5.1f s  other %5.1f s",
        n, b/1048576/s[m], s[m], s[1], s[k], r[m]/1024, c[m], f[m], o[m];
      if (st >= 0) printf "  stored %7.1f MiB (%4.1f%%)", st/1048576, 100*st/b;
      printf "\n" }'
}

echo "image: $(basename "$IMG"), $((BYTES >> 20)) MiB mixed (ferry-sim gen-disk --seed 7) in $WORK; $(nproc) cores, $(free -g | awk '/^Mem/{print $2}') GiB; $(uname -r); $(df -h --output=source "$WORK" | tail -1)"
echo "versions: $("$FERRY" --version) ($FERRY built $(date -r "$FERRY" '+%F %T %Z'); source tree here now: $(git describe --always --dirty 2>/dev/null || echo ?)), $(restic version | cut -d' ' -f1-2), $("$S3S_FS" --version); s3s-fs on $FERRY_S3_ENDPOINT"
echo "median of $REPEAT; MiB/s = image size / wall time; CPU = user+sys; idle wait ${IDLE_WAIT:-0} s"
"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=s3:$FERRY_S3_ENDPOINT/restic RESTIC_CACHE_DIR=$WORK/restic-cache
LOCAL=$WORK/ferry-repo

measure "ferry backup local" "$LOCAL" \
  'rm -rf $LOCAL; $FERRY repo init -r $LOCAL --tenant bench >/dev/null' "$IMG" \
  "$FERRY" --no-progress backup -r "$LOCAL" --name img --image "$IMG"
measure "ferry restore local" "" 'rm -f $WORK/restored.img' "$LOCAL" \
  "$FERRY" --no-progress restore -r "$LOCAL" --point latest:img --target "$WORK/restored.img"
cmp "$IMG" "$WORK/restored.img"
rm -rf "$LOCAL" "$WORK/restored.img"

measure "ferry backup s3" "$S3ROOT/ferry" \
  'fresh_bucket ferry; $FERRY repo init -r s3://ferry/repo --tenant bench >/dev/null' "$IMG" \
  "$FERRY" --no-progress backup -r s3://ferry/repo --name img --image "$IMG"
echo "  s3s-fs files outside the bucket: $(find "$S3ROOT" -maxdepth 1 -name "$(sidecars ferry)*" | wc -l), $(find "$S3ROOT" -maxdepth 1 -name "$(sidecars ferry)*" -printf '%s\n' | awk '{s+=$1} END {printf "%.1f MiB", s/1048576}'); objects in the bucket: $(find "$S3ROOT/ferry" -type f | wc -l)"
measure "ferry restore s3" "" 'rm -f $WORK/restored.img' "$S3ROOT/ferry" \
  "$FERRY" --no-progress restore -r s3://ferry/repo --point latest:img --target "$WORK/restored.img"
cmp "$IMG" "$WORK/restored.img"
rm -f "$WORK/restored.img"

measure "restic backup s3" "$S3ROOT/restic" 'fresh_bucket restic; restic init -q >/dev/null' "$IMG" \
  restic backup -q "$IMG"
echo "  s3s-fs files outside the bucket: $(find "$S3ROOT" -maxdepth 1 -name "$(sidecars restic)*" | wc -l); objects in the bucket: $(find "$S3ROOT/restic" -type f | wc -l)"
measure "restic restore s3" "" 'rm -rf $WORK/restic-out' "$S3ROOT/restic" \
  restic restore -q latest --target "$WORK/restic-out"
cmp "$IMG" "$(find "$WORK/restic-out" -type f -name "$(basename "$IMG")")"
rm -rf "$WORK/restic-out"
echo "restores are bit-identical (cmp)"

# Requests in flight = pipeline workers = max(--workers, FERRY_S3_CONNECTIONS):
# set both to N so that N is what runs.
for w in $S3_WORKERS; do
  measure "ferry backup s3, $w in flight" "$S3ROOT/ferry" \
    'fresh_bucket ferry; $FERRY repo init -r s3://ferry/repo --tenant bench >/dev/null' "$IMG" \
    env FERRY_S3_CONNECTIONS="$w" "$FERRY" --no-progress backup --workers "$w" -r s3://ferry/repo --name img --image "$IMG"
  measure "ferry restore s3, $w in flight" "" 'rm -f $WORK/restored.img' "$S3ROOT/ferry" \
    env FERRY_S3_CONNECTIONS="$w" "$FERRY" --no-progress restore --workers "$w" -r s3://ferry/repo --point latest:img --target "$WORK/restored.img"
  rm -f "$WORK/restored.img"
done
kill "$S3PID"
rm -rf "$WORK"
