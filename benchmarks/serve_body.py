"""How long a large request body holds the GIL while `polar serve` parses it.

The server parses bodies in a worker thread, but a C call holds the GIL throughout, so the event
loop (health probes, other clients' requests) waits for the longest one. A thread that ticks every
millisecond measures that wait: its longest gap while the body is parsed. Rows, for one body:

    json.loads        json.loads(body): one C call for the whole document
    whole body        the chunks joined, decoded in one call, then parsed element by element
                      (the served parser before the slice-at-a-time one)
    chunks (served)   parse_json(chunks): parsed as decoded, a slice at a time, element by element

A second table times native requests (POST /v1/rewards): an object per item, each checked for a key
given twice; its "no key check" row parses the same chunks with a plain decoder, so the ratio of the
two rows is that check's cost.

A third table times bodies the server refuses, against json.loads on the same bytes: one cut
off at its end and one with a stray character in its middle (invalid JSON, answered with
json.loads's own error, its line and column counted over the text already dropped), and a
top-level array (valid JSON, not an object).

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

from benchmarks.arguments import at_least  # noqa: E402
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
    try:
        t0 = time.perf_counter()
        parse(arg)
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        t.join()
    return elapsed, max(gaps)


def items_body(mb: float) -> bytes:
    """A native request of small objects, chat prompts among them: the most objects per MB."""
    item = {"prompt": [{"role": "user", "content": "hello there " * 5}], "reference": "ref text " * 30,
            "output": "out " * 30}
    n = max(1, int(mb * 1e6 / len(json.dumps(item))))
    return json.dumps({"items": [item] * n}).encode()


def without_key_check(chunks):
    """parse_json with a decoder that keeps json.loads's last-wins for a key given twice."""
    served = validation._DECODE
    validation._DECODE = json.JSONDecoder().raw_decode
    try:
        return validation.parse_json(chunks)
    finally:
        validation._DECODE = served


def refused_bodies(mb: float) -> dict[str, bytes]:
    body = body_of(mb, True)
    # after the string that ends nearest past the middle (inside a string it would be text)
    cut = body.find(b'", "', len(body) // 2)
    if cut < 0:
        cut = body.rindex(b'"]')
    return {"cut off": body[:-3], "stray '}' inside": body[:cut + 1] + b"}" + body[cut + 1:],
            "top-level array": json.dumps(json.loads(body)["text"]).encode()}


def refused(parse):
    """parse, for a body the server refuses: the time to the error answer (json.loads reads a
    top-level array without an error; the server then refuses what it read)."""
    def run(arg):
        try:
            value = parse(arg)
        except (validation.RequestError, ValueError):
            return
        if isinstance(value, dict):
            raise AssertionError("a refused body was accepted")
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 16, 61], help="body sizes in MB")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="runs per row; the table shows the median")
    args = ap.parse_args(argv)
    if min(args.mb) <= 0:
        ap.error("every --mb must be above 0")
    print(f"| {'body':>7} | {'encoding':<8} | {'parser':<16} | {'parse s':>8} | {'longest stall ms':>17} | "
          f"{'vs json.loads':>14} |")
    print("|---:|---|---|---:|---:|---:|")
    for mb, ascii in ((mb, ascii) for mb in args.mb for ascii in (True, False)):
        body = body_of(mb, ascii)
        chunks = chunked(body)
        print_rows(body, f"{'ascii' if ascii else 'utf-8':<8}", [
            ("json.loads", json.loads, body), ("whole body", whole, chunks),
            ("chunks (served)", validation.parse_json, chunks)], args.repeats)
    print(f"\nnative requests (an object per item)\n\n| {'body':>7} | {'parser':<16} | {'parse s':>8} | "
          f"{'longest stall ms':>17} | {'vs json.loads':>14} |")
    print("|---:|---|---:|---:|---:|")
    for mb in args.mb:
        body = items_body(mb)
        chunks = chunked(body)
        print_rows(body, None, [("json.loads", json.loads, body), ("no key check", without_key_check, chunks),
                                ("chunks (served)", validation.parse_json, chunks)], args.repeats)
    print(f"\nrefused bodies\n\n| {'body':>7} | {'case':<18} | {'parser':<16} | {'answer s':>8} | "
          f"{'longest stall ms':>17} | {'vs json.loads':>14} |")
    print("|---:|---|---|---:|---:|---:|")
    for mb in args.mb:
        for case, body in refused_bodies(mb).items():
            print_rows(body, f"{case:<18}", [("json.loads", refused(json.loads), body),
                                             ("chunks (served)", refused(validation.parse_json), chunked(body))],
                       args.repeats)


def chunked(body: bytes) -> list[bytes]:
    """The body as uvicorn hands it to the app."""
    return [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]


def print_rows(body: bytes, label: str | None, parsers: list, repeats: int) -> None:
    """One row per (name, parse, arg): the medians of `repeats` runs, the stall also against the
    first row's."""
    base = None
    for name, parse, arg in parsers:
        runs = sorted(longest_gap(parse, arg) for _ in range(repeats))
        elapsed, stall = runs[len(runs) // 2][0], sorted(r[1] for r in runs)[len(runs) // 2]
        base = base or stall
        label_cell = "" if label is None else f" {label} |"
        print(f"| {len(body) / 1e6:>5.1f}MB |{label_cell} {name:<16} | {elapsed:>8.3f} | {stall * 1e3:>17.1f} | "
              f"{stall / base:>13.2f}x |")


if __name__ == "__main__":
    main()
