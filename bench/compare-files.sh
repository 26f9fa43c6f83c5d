#!/usr/bin/env bash
# File-level restore (issue 23): one 10 MiB file out of a 64 GiB disk image, side
# by side in one run on the same restore point:
#   - `ferry files get` (reads the partition table, the ext4 metadata on the way
#     and the file's chunks, on demand);
#   - the alternative without file-level restore: `ferry mount` + a loop mount
#     with the kernel's ext4 driver + cp (root only; skipped otherwise);
#   - the whole-disk way: `ferry restore` of the disk, then debugfs dump.
# The disk: a GPT with one 64 GiB ext4 partition made by mke2fs -d from a tree
# holding the 10 MiB random file and a copy of /usr/share/doc (real small files).
# Reported: wall time (median of $REPEAT), chunks and bytes of chunks read
# (ferry's own counters). Repository in the page cache for every run.
# Target: <= 32 MiB of chunks read and < 1 s.
#
# usage: bench/compare-files.sh [WORKDIR]   (default /var/tmp/ferry-files)
# env:   REPEAT (3), DISK_GIB (64)
# needs: e2fsprogs, fdisk (sfdisk); root and fuse3 for the mount line
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/ferry-files}
REPEAT=${REPEAT:-3}
GIB=${DISK_GIB:-64}
cargo build --release -q --bin ferry
FERRY=$PWD/target/release/ferry
rm -rf "$WORK" && mkdir -p "$WORK/tree/data" "$WORK/out"
head -c $((10 << 20)) /dev/urandom > "$WORK/tree/data/ten-mib.bin"
cp -r /usr/share/doc "$WORK/tree/doc" 2>/dev/null || true
PART=$WORK/part.img
truncate -s "${GIB}G" "$PART"
mkfs.ext4 -q -F -d "$WORK/tree" "$PART"
DISK=$WORK/disk.img
truncate -s $(( (GIB << 30) + (2 << 20) )) "$DISK"
printf 'label: gpt\nstart=2048, type=L\n' | sfdisk -q "$DISK"
dd if="$PART" of="$DISK" bs=1M seek=1 conv=sparse,notrunc status=none
rm -f "$PART"

"$FERRY" keys generate-pem --out-dir "$WORK" --name k >/dev/null
export FERRY_PUBLIC_KEY=$WORK/k.pub.pem FERRY_PRIVATE_KEY=$WORK/k.key.pem FERRY_REPO=$WORK/repo
"$FERRY" repo init --tenant bench >/dev/null
"$FERRY" --no-progress backup --name vm --image "$DISK" >/dev/null
find "$WORK/repo" -type f -exec cat {} + > /dev/null
STORED=$(du -sb "$WORK/repo" | cut -f1)

median() { sort -n | awk -v k="$REPEAT" '{a[NR]=$1} END {print a[int((k+1)/2)]}'; }
now() { date +%s.%N; }
echo "disk: ${GIB} GiB GPT, one ext4 partition ($(find "$WORK/tree" -type f | wc -l) files); repository $((STORED >> 20)) MiB; $(nproc) cores; $("$FERRY" --version)"

times=()
for _ in $(seq "$REPEAT"); do
  rm -rf "$WORK/out" && mkdir "$WORK/out"
  t0=$(now)
  "$FERRY" --json files get latest:vm /data/ten-mib.bin --out "$WORK/out" > "$WORK/get.json"
  t1=$(now)
  times+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}')")
done
cmp "$WORK/out/ten-mib.bin" "$WORK/tree/data/ten-mib.bin"
s=$(printf '%s\n' "${times[@]}" | median)
chunks=$(sed -n 's/.*"chunks_read": \([0-9]*\).*/\1/p' "$WORK/get.json")
cbytes=$(sed -n 's/.*"chunk_bytes_read": \([0-9]*\).*/\1/p' "$WORK/get.json")
printf "%-44s %6.2f s  %5d chunks (%d MiB) read\n" "ferry files get (10 MiB file)" "$s" "$chunks" $((cbytes >> 20))

if [ "$(id -u)" = 0 ] && command -v fusermount3 >/dev/null; then
  mkdir -p "$WORK/mnt" "$WORK/loop"
  times=()
  for _ in $(seq "$REPEAT"); do
    rm -f "$WORK/copy.bin"
    t0=$(now)
    "$FERRY" mount latest:vm "$WORK/mnt" > /dev/null 2>&1 &
    M=$!
    for _ in $(seq 400); do [ -e "$WORK/mnt/disk0.img" ] && break; sleep 0.01; done
    # The partition starts at 1 MiB (no udev in containers for partscan nodes).
    mount -o ro,loop,offset=1048576 "$WORK/mnt/disk0.img" "$WORK/loop"
    cp "$WORK/loop/data/ten-mib.bin" "$WORK/copy.bin"
    umount "$WORK/loop"
    kill -TERM "$M"; wait "$M"
    t1=$(now)
    times+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}')")
  done
  cmp "$WORK/copy.bin" "$WORK/tree/data/ten-mib.bin"
  s=$(printf '%s\n' "${times[@]}" | median)
  printf "%-44s %6.2f s\n" "ferry mount + loop mount + cp" "$s"
else
  echo "ferry mount + loop mount + cp                skipped (needs root and fuse3)"
fi

times=()
for _ in $(seq "$REPEAT"); do
  rm -f "$WORK/restored.img" "$WORK/part-only.img" "$WORK/dump.bin"
  t0=$(now)
  "$FERRY" --no-progress restore --point latest:vm --target "$WORK/restored.img" > /dev/null
  debugfs -R "dump /data/ten-mib.bin $WORK/dump.bin" "$WORK/restored.img?offset=1048576" > /dev/null 2>&1 \
    || { dd if="$WORK/restored.img" of="$WORK/part-only.img" bs=1M skip=1 conv=sparse status=none; debugfs -R "dump /data/ten-mib.bin $WORK/dump.bin" "$WORK/part-only.img" > /dev/null 2>&1; }
  t1=$(now)
  times+=("$(awk -v a="$t0" -v z="$t1" 'BEGIN{print z-a}')")
done
cmp "$WORK/dump.bin" "$WORK/tree/data/ten-mib.bin"
s=$(printf '%s\n' "${times[@]}" | median)
printf "%-44s %6.2f s\n" "ferry restore (whole disk) + debugfs dump" "$s"
