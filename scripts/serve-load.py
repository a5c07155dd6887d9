#!/usr/bin/env python3
"""A load client for OpenAI-compatible servers (llama-server, Strata).

It sends the same workloads as `cargo bench -p strata-engine --bench serve`
(prompts are token ids from the same formula), as streamed
`/v1/completions` requests at once from one thread each, and prints the
same FIGURE lines: aggregate output tokens/s for 4, 8 and 16 clients with
distinct 230-token prompts and 128 output tokens, and the mean time to
first token of 4 clients sharing a 1,400-token system prompt.

    python3 scripts/serve-load.py --url http://127.0.0.1:8090 --clients 4
    python3 scripts/serve-load.py --url ... --shared

Standard library only; medians of --runs (default 3), each run with fresh
prompts so no run hits what an earlier one cached.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def tokens(n, seed):
    """The Rust bench's `tokens(n, seed)`: ids in 17..49017, u32 arithmetic."""
    m = 0xFFFFFFFF
    return [
        ((((i * 2_654_435_761) & m) ^ ((seed * 40_503) & m)) % 49_000) + 17
        for i in range(n)
    ]


def one(url, prompt, max_tokens, start, out, k):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start.wait()
    t0 = time.monotonic()
    conn.request(
        "POST", "/v1/completions", body, {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first = None
    chunks = 0
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if msg.get("usage"):
            usage = msg["usage"]
        if msg.get("choices"):
            if first is None:
                first = time.monotonic() - t0
            chunks += 1
    conn.close()
    generated = usage["completion_tokens"] if usage else chunks
    out[k] = (generated, first, time.monotonic(), t0)


def run(url, prompts, max_tokens):
    """All prompts at once: (output tokens/s, mean TTFT in s)."""
    start = threading.Event()
    out = [None] * len(prompts)
    threads = [
        threading.Thread(target=one, args=(url, p, max_tokens, start, out, k))
        for k, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise SystemExit("a client failed")
    elapsed = max(o[2] for o in out) - t0
    total = sum(o[0] for o in out)
    return total / elapsed, statistics.mean(o[1] for o in out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, help="distinct 230-token prompts")
    ap.add_argument("--shared", action="store_true", help="4 clients, shared 1,400-token prefix")
    ap.add_argument(
        "--ttft",
        action="store_true",
        help="one client: a cold 1,530-token prompt, the same again, the same 1,400-token prefix with a new ending",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--label", default="server")
    a = ap.parse_args()
    if a.clients:
        n = a.clients
        rates = []
        for r in range(a.runs):
            prompts = [tokens(230, r * 100 + i + 1) for i in range(n)]
            rates.append(run(a.url, prompts, 128)[0])
        print(
            f"FIGURE {a.label}: aggregate output, {n} concurrent requests "
            f"(230-token prompts, 128 out): {statistics.median(rates):.1f} tok/s",
            flush=True,
        )
    if a.ttft:
        cases = {"cold": [], "identical": [], "new ending": []}
        decode = []
        for r in range(a.runs):
            prefix = tokens(1400, 7000 + r)
            first = prefix + tokens(130, 8000 + r)
            other = prefix + tokens(130, 9000 + r)
            for name, prompt in (("cold", first), ("identical", first), ("new ending", other)):
                out = [None]
                start = threading.Event()
                start.set()
                one(a.url, prompt, 128, start, out, 0)
                generated, ttft, end, t0 = out[0]
                cases[name].append(ttft)
                # Decode rate after the first token.
                decode.append((generated - 1) / max(end - t0 - ttft, 1e-9))
        for name, v in cases.items():
            print(
                f"FIGURE {a.label}: TTFT {name} (1,530-token prompt, one client): "
                f"{statistics.median(v) * 1000:.0f} ms",
                flush=True,
            )
        print(
            f"FIGURE {a.label}: decode after the first token, one client: "
            f"{statistics.median(decode):.1f} tok/s",
            flush=True,
        )
    if a.shared:
        ttfts = []
        for r in range(a.runs):
            system = tokens(1400, 999 + r)
            prompts = [system + tokens(30, 5000 + i) for i in range(4)]
            ttfts.append(run(a.url, prompts, 16)[1])
        print(
            f"FIGURE {a.label}: shared 1,400-token system prompt, 4 concurrent "
            f"requests (16 out): mean TTFT {statistics.median(ttfts) * 1000:.0f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
