#!/usr/bin/env bash
# A fuzz campaign: each target in turn, coverage-guided (libFuzzer, `-s none` build), from a copy
# of its committed corpus, for RUNS executions (default 10 M). Prints one summary line per target:
# executions, exec/s, coverage, features, corpus kept, and whether it found anything.
# Usage: fuzz/campaign.sh [RUNS] [TARGET…]   (build first: cd fuzz && cargo fuzz build -s none)
# Logs and any crash inputs go to $WORK (default /tmp/bitferry-fuzz).
set -uo pipefail
cd "$(dirname "$0")"
runs=${1:-10000000}
shift || true
work=${WORK:-/tmp/bitferry-fuzz}
bin=target/x86_64-unknown-linux-gnu/release
declare -A max_len=(
  [frame]=65536 [chunk]=65539 [delta]=65536 [dest_stream]=262144 [source_stream]=65536
  [migration]=4096 [store_file]=4096 [retired_record]=4096 [rebuild_state]=16384
  [manifest]=16384 [qcow2]=65536 [control]=65536 [config]=16384 [qmp]=65536 [nbd]=65536
  [peer_cert]=16384
)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame chunk delta dest_stream source_stream migration \
  store_file retired_record rebuild_state manifest qcow2 control config qmp nbd peer_cert)
mkdir -p "$work"
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "$t: no binary at $bin/$t (cargo fuzz build -s none)"; continue; }
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  start=$(date +%s)
  "$bin/$t" "$work/$t/corpus" "corpus/$t" -runs="$runs" -max_len="${max_len[$t]}" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/$t/artifacts/" >"$work/$t/log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  execs=$(awk '/stat::number_of_executed_units/{print $NF}' "$work/$t/log")
  last=$(grep -E '^#[0-9]+' "$work/$t/log" | tail -1)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.*corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  crashes=$(ls "$work/$t/artifacts" | wc -l)
  echo "$t: rc=$rc execs=${execs:-?} secs=$secs exec/s=$(( ${execs:-0} / (secs > 0 ? secs : 1) )) cov=$cov ft=$ft corpus=$corp findings=$crashes"
done
