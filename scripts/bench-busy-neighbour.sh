#!/usr/bin/env bash
# Prefill and decode with another process keeping one core busy (a `yes`
# loop), Strata at 2 and 1 threads beside llama.cpp at 2 and 1 threads: a
# pool that spin-waits collapses here (shared/peers.md: 12 ms -> 190 ms per
# step); ours should only lose the stolen core.
#   bash scripts/bench-busy-neighbour.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/peers.sh)
model=$(cargo run --locked -q -p strata-server --profile ci -- fetch-model)
cargo bench --locked -q -p strata-model --bench forward --no-run 2>/dev/null
yes >/dev/null &
busy=$!
trap 'kill $busy' EXIT
for t in 2 1; do
  echo "== strata, $t threads, one busy neighbour"
  STRATA_THREADS=$t STRATA_BENCH_RUNS=3 cargo bench --locked -q -p strata-model --bench forward 2>/dev/null \
    | grep -E 'pp512|depth 0|16 sequences'
  echo "== llama.cpp llama-bench, $t threads, one busy neighbour"
  "$bin/llama-bench" -m "$model" -t "$t" -p 512 -n 64 -r 3 2>/dev/null | grep -E 'pp512|tg64'
done
