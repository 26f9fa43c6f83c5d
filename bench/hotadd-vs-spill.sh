#!/usr/bin/env bash
# The whitepaper demo's full backup, side by side in one run: full HotAdd (the
# default lesser_mode = "never": every encrypted VM waits for its own tenant's
# HotAdd proxy) versus the spill-over ferry did before round 2 (lesser_mode =
# "after=0s": VMs beyond the HotAdd proxies' 4 slots go NBD-SSL through the
# shared proxy at once). Alternating pairs; prints each run's full-backup wall
# time, how many disks went which way, and the per-VM waiting times.
#
# usage: bench/hotadd-vs-spill.sh [PAIRS]   (default 3)
# needs: jq
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-3}
command -v jq >/dev/null || { echo "needs jq (apt-get install jq)" >&2; exit 2; }
cargo build --release -q --bin ferry-sim
SIM=$PWD/target/release/ferry-sim
WORK=$(mktemp -d /var/tmp/ferry-spill.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

run() { # $1 = lesser mode, $2 = output file
  "$SIM" demo --lesser-mode "$1" --json 2>/dev/null >"$2"
  jq -r --arg m "$1" '
    "\($m | (. + "          ")[:10]) full \(.full_seconds * 10 | round / 10) s, " +
    "\([.rows[] | select(.mode == "hotadd")] | length) hotadd / \([.rows[] | select(.mode == "nbdssl")] | length) nbdssl disks, " +
    "incremental \(.incr_seconds * 10 | round / 10) s"' "$2"
}

for i in $(seq 1 "$PAIRS"); do
  if (( i % 2 )); then
    run never "$WORK/never-$i.json"; run after=0s "$WORK/spill-$i.json"
  else
    run after=0s "$WORK/spill-$i.json"; run never "$WORK/never-$i.json"
  fi
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
n=$(for f in "$WORK"/never-*.json; do jq .full_seconds "$f"; done | median)
s=$(for f in "$WORK"/spill-*.json; do jq .full_seconds "$f"; done | median)
echo "median full backup: full HotAdd ${n} s, spill-over ${s} s"
echo "per-VM wait for a slot in the last full-HotAdd run (s):"
jq -r '[.rows[] | {vm, w: .full_wait}] | unique_by(.vm) | map("  \(.vm) \(.w * 10 | round / 10)") | .[]' "$WORK/never-$PAIRS.json"
echo "per-VM wait in the last spill-over run (s):"
jq -r '[.rows[] | {vm, w: .full_wait, mode}] | unique_by(.vm) | map("  \(.vm) \(.w * 10 | round / 10) \(.mode)") | .[]' "$WORK/spill-$PAIRS.json"
