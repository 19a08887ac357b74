"""How long a large request body holds the GIL while `polar serve` parses it.

The server parses bodies in a worker thread, but a C call holds the GIL throughout, so the event
loop (health probes, other clients' requests) waits for the longest one. A thread that ticks every
millisecond measures that wait: its longest gap while the body is parsed. Rows, for one body:

    json.loads        json.loads(body): one C call for the whole document
    whole body        the chunks joined, decoded in one call, then parsed element by element
                      (the served parser before the slice-at-a-time one)
    chunks (served)   parse_json(chunks): parsed as decoded, a slice at a time, element by element

    python benchmarks/serve_body.py [--mb 1 16 61] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar.serve import validation  # noqa: E402

CHUNK = 64 * 1024  # what uvicorn hands the app per receive


def body_of(mb: float, ascii: bool) -> bytes:
    """`ascii`: non-ASCII characters escaped, as requests (POLAR's client) sends JSON; otherwise
    UTF-8, as httpx does."""
    text = 'ab"cd\n' * 2000 + "état 数据 "  # escapes and multi-byte characters, as real rollouts have
    n = max(1, int(mb * 1e6 / len(json.dumps(text, ensure_ascii=ascii).encode())))
    return json.dumps({"model": "m", "text": [text] * n}, ensure_ascii=ascii).encode()


def whole(chunks):
    body = b"".join(chunks)
    return validation._loads(body.decode(json.detect_encoding(body), "surrogatepass"))


def longest_gap(parse, arg) -> tuple[float, float]:
    """(parse seconds, longest gap between two ticks of another thread while it ran)."""
    gaps, done = [], threading.Event()

    def tick():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.02)
    gaps.clear()
    t0 = time.perf_counter()
    parse(arg)
    elapsed = time.perf_counter() - t0
    done.set()
    t.join()
    return elapsed, max(gaps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 16, 61], help="body sizes in MB")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the table shows the median")
    args = ap.parse_args(argv)
    print(f"{'body':>8} {'encoding':<8} {'parser':<16} {'parse s':>8} {'longest stall ms':>17} {'vs json.loads':>14}")
    for mb, ascii in ((mb, ascii) for mb in args.mb for ascii in (True, False)):
        body = body_of(mb, ascii)
        chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
        rows = [("json.loads", json.loads, body), ("whole body", whole, chunks),
                ("chunks (served)", validation.parse_json, chunks)]
        base = None
        for name, parse, arg in rows:
            runs = sorted(longest_gap(parse, arg) for _ in range(args.repeats))
            elapsed, stall = runs[len(runs) // 2][0], sorted(r[1] for r in runs)[len(runs) // 2]
            base = base or stall
            print(f"{len(body) / 1e6:>6.1f}MB {'ascii' if ascii else 'utf-8':<8} {name:<16} {elapsed:>8.3f} {stall * 1e3:>17.1f} {stall / base:>13.2f}x")


if __name__ == "__main__":
    main()
