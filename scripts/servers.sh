# Sourced by the bench scripts: start Strata or llama-server on $port in the
# background, wait for /health, stop it (also on exit). Needs $port, $model,
# $threads, and $bin (llama.cpp's bin dir) for llama-server.
server=""
stop() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; fi; }
trap stop EXIT
wait_health() {
  for _ in $(seq 1 600); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "the server on port $port did not start" >&2
  exit 1
}
start_strata() { # `strata serve` (release), fresh
  # No SSD tier: "fresh" means cold, not restored from an earlier run.
  "${CARGO_TARGET_DIR:-target}/release/strata" serve --model "$model" --threads "$threads" --ssd-cache-size 0 \
    --port "$port" >/dev/null 2>&1 &
  server=$!
  wait_health
}
start_llama() { # slots: `llama-server -c 8192 -np N`, as in shared/peers.md
  "$bin/llama-server" -m "$model" -c 8192 -np "$1" -t "$threads" \
    --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
  server=$!
  wait_health
}
