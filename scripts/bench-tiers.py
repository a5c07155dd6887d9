#!/usr/bin/env python3
"""The tier figures of issue 7/10, on `strata serve` (release) with the
default model, one client, streamed `/v1/completions`, temperature 0:

1. TTFT of a 1,530-token prompt: cold, arena hit, host hit (the arena
   cleared, the host tier restores), and SSD hit after a restart with the
   page cache dropped for the tier's files (posix_fadvise DONTNEED).
   Medians of --runs, each run with a fresh prompt.
2. Restore bandwidth from SSD (bytes restored / restore time, from
   /metrics, over the SSD-hit runs) against this machine's sequential read
   bandwidth measured in the same run: `dd` of a file of the same size with
   its pages dropped.
3. A prefix-heavy workload whose working set is 3x the arena: distinct
   1,400-token prefixes revisited in a fixed random order: hit rate
   (cached / prompt tokens) and mean TTFT with tiers off, host only, SSD
   only, and both.

    python3 scripts/bench-tiers.py --bin target/release/strata --model PATH

Standard library only. Servers listen on 127.0.0.1 only.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import importlib.util

spec = importlib.util.spec_from_file_location(
    "serve_load", os.path.join(os.path.dirname(__file__), "serve-load.py")
)
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)

ADMIN = "bench-admin-key"


class Server:
    def __init__(self, a, port, flags):
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, STRATA_CACHE_DIR=a.cache)
        self.p = subprocess.Popen(
            [a.bin, "serve", "--model", a.model, "--threads", str(a.threads),
             "--port", str(port), "--admin-key", ADMIN, *flags],
            env=env, stdout=subprocess.DEVNULL, stderr=open(a.log, "a"),
        )
        for _ in range(1200):
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).status == 200:
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise SystemExit("the server did not start; see " + a.log)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=120)

    def ttft(self, prompt, max_tokens=1):
        out = [None]
        import threading
        start = threading.Event()
        start.set()
        serve_load.one(self.url, prompt, max_tokens, start, out, 0)
        return out[0][1]

    def usage(self, prompt):
        body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
        r = urllib.request.urlopen(urllib.request.Request(
            self.url + "/v1/completions", body, {"Content-Type": "application/json"}))
        u = json.loads(r.read())["usage"]
        return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]

    def clear_arena(self):
        r = urllib.request.Request(self.url + "/admin/clear_prefix_cache", b"",
                                   {"Authorization": "Bearer " + ADMIN}, method="POST")
        urllib.request.urlopen(r).read()

    def settle(self):
        """Waits until the tiers stop taking blocks (demotions landed)."""
        last, same = -1.0, 0
        while same < 5:
            time.sleep(0.1)
            now = self.metric("strata:tier_bytes_demoted_total")
            same = same + 1 if now == last else 0
            last = now

    def metric(self, name):
        text = urllib.request.urlopen(self.url + "/metrics").read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        return 0.0


def drop_pages(root):
    """posix_fadvise(DONTNEED) on every file under root: the next read
    comes from the device."""
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            n += 1
    return n


def dd_bandwidth(dir_, size):
    """Sequential read of a fresh file of `size` bytes with its pages
    dropped, with dd: bytes/s."""
    path = os.path.join(dir_, "dd-probe")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    drop_pages_file(path)
    t = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bw = size / (time.monotonic() - t)
    os.remove(path)
    return bw


def drop_pages_file(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def ms(x):
    return f"{x * 1000:.0f} ms"


def ttft_figures(a):
    ssd = tempfile.mkdtemp(prefix="strata-bench-ssd-", dir=a.scratch)
    tiers = ["--ssd-cache-dir", ssd, "--ssd-cache-size", "8GiB", "--kv-memory", "1GiB"]
    cases = {"cold": [], "arena hit": [], "host hit": [], "ssd hit after restart": [],
             "cold, tiers off": []}
    prompts = [serve_load.tokens(1530, 7000 + r) for r in range(a.runs)]
    # What the tiers cost a cold prompt (write-through copies and writes).
    s = Server(a, a.port, ["--ssd-cache-size", "0", "--kv-memory", "1GiB"])
    for r in range(a.runs):
        cases["cold, tiers off"].append(s.ttft(serve_load.tokens(1530, 7500 + r)))
    s.stop()
    s = Server(a, a.port, tiers + ["--host-cache-size", "2GiB"])
    for p in prompts:
        cases["cold"].append(s.ttft(p))
        cases["arena hit"].append(s.ttft(p))
        # Every block down first (write-through), then the arena cleared
        # (write-back sends whatever is left), then down again.
        s.settle()
        s.clear_arena()
        s.settle()
        cases["host hit"].append(s.ttft(p))
    s.stop()
    bytes_before = 0.0
    restore_s = 0.0
    for p in prompts:
        drop_pages(ssd)
        s = Server(a, a.port, tiers)
        b0 = s.metric("strata:tier_bytes_restored_total")
        t0 = s.metric("strata:tier_restore_seconds_sum")
        cases["ssd hit after restart"].append(s.ttft(p))
        bytes_before += s.metric("strata:tier_bytes_restored_total") - b0
        restore_s += s.metric("strata:tier_restore_seconds_sum") - t0
        s.stop()
    cold = statistics.median(cases["cold"])
    for name, v in cases.items():
        m = statistics.median(v)
        ratio = "" if name.startswith("cold") else f"  (1/{cold / m:.0f} of cold)"
        print(f"FIGURE ttft 1530 tokens, {name}: {ms(m)}{ratio}  runs {[round(x * 1000) for x in v]}")
    if restore_s > 0:
        per_run = bytes_before / a.runs
        restore_bw = bytes_before / restore_s
        dd_bw = dd_bandwidth(a.scratch, int(per_run))
        print(f"FIGURE ssd restore bandwidth: {restore_bw / 1e9:.2f} GB/s over {bytes_before / 1e6:.0f} MB; "
              f"dd of {per_run / 1e6:.0f} MB, pages dropped: {dd_bw / 1e9:.2f} GB/s; ratio {restore_bw / dd_bw:.2f}")
    shutil.rmtree(ssd, ignore_errors=True)


def working_set(a):
    """Distinct 1,400-token prefixes, 3x what the arena holds, revisited."""
    per_token = 23_040  # the default model's KV bytes per token (f16)
    prefixes = 12
    arena = prefixes // 3 * 1_460 * per_token  # a third of the working set
    order = list(range(prefixes)) * 3
    random.Random(5).shuffle(order)
    bases = [serve_load.tokens(1400, 9000 + k) for k in range(prefixes)]
    for name in ["tiers off", "host only", "ssd only", "host and ssd"]:
        ssd = tempfile.mkdtemp(prefix="strata-bench-ws-", dir=a.scratch)
        f = ["--kv-memory", str(arena)]
        f += ["--ssd-cache-dir", ssd, "--ssd-cache-size", "8GiB"] if "ssd" in name else ["--ssd-cache-size", "0"]
        f += ["--host-cache-size", "2GiB"] if "host" in name else []
        s = Server(a, a.port, f)
        ttfts, prompt_tokens, cached = [], 0, 0
        for i, k in enumerate(order):
            p = bases[k] + serve_load.tokens(24, 100 + i)
            t = s.ttft(p)
            ttfts.append(t)
        # Hit rate from the server's own counters.
        prompt_tokens = s.metric("strata:admitted_prompt_tokens_total")
        cached = s.metric("strata:cached_prompt_tokens_total")
        s.stop()
        shutil.rmtree(ssd, ignore_errors=True)
        rate = cached / prompt_tokens if prompt_tokens else 0
        print(f"FIGURE working set 3x arena ({prefixes} prefixes of 1,400 tokens, {len(order)} requests), {name}: "
              f"hit rate {rate * 100:.0f}%, mean TTFT {ms(statistics.mean(ttfts))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18141)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scratch", default=os.path.expanduser("~/.cache/strata/bench"))
    ap.add_argument("--only", choices=["ttft", "working-set"])
    a = ap.parse_args()
    os.makedirs(a.scratch, exist_ok=True)
    a.cache = tempfile.mkdtemp(prefix="strata-bench-cache-", dir=a.scratch)
    a.log = os.path.join(a.scratch, "bench-tiers.log")
    if a.only in (None, "ttft"):
        ttft_figures(a)
    if a.only in (None, "working-set"):
        working_set(a)
    shutil.rmtree(a.cache, ignore_errors=True)


if __name__ == "__main__":
    main()
