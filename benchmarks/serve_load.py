"""Load test of `polar serve` on loopback: N concurrent clients for T seconds, a mix of valid and
malformed requests to every endpoint; checks every answer.

    python benchmarks/serve_load.py --checkpoint RUN_DIR [--clients 16 --seconds 30 --bad-fraction 0.2]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...   # a server already running
    python benchmarks/serve_load.py --checkpoint RUN_DIR --burst 3000 [--burst-body-bytes 2048]

With --checkpoint the server runs in this process (uvicorn in a thread) and each valid answer is
compared with its items scored alone (fp32, 1e-5): a mismatch is an answer that differs, a lost
answer a valid request that got no 200/429. With --url answers are checked for consistency
(the same item always gets the same reward). Prints throughput, p50/p99 latency and the 2xx/4xx/
429/5xx counts; exits 1 on any 5xx, mismatch or lost answer, or an unhealthy server afterwards.

--burst N measures what a burst holds in memory: the room for bodies being read (--max-reading-bytes)
is held by clients that declared the largest bodies and sent 5 bytes, then N clients send a whole
/classify request each at once (they wait for room, or are refused at once); the server's Python
heap (tracemalloc, this process) and RSS are read once the burst has settled, then the room is let
go and every answer is counted. Exits 1 if a
request got no answer, or an answer other than 200 or 429.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.arguments import at_least  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "état", "数据", "x", "reward", "policy", "\n", "42", "the"]


def make_pool(seed: int, prompts: int, rollouts: int, words: int) -> list[dict]:
    """n rollouts per (prompt, reference), as an RL trainer sends them."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))).tolist())

    pool = []
    for _ in range(prompts):
        prompt, reference = text(words // 2, words), text(words // 2, words)
        pool += [{"prompt": prompt, "reference": reference, "output": "" if k == 0 else text(1, words)}
                 for k in range(rollouts)]
    return pool


MALFORMED = [
    ("/classify", b"{not json"), ("/classify", b'{"text": [1, 2]}'), ("/classify", b'{"text": []}'),
    ("/pooling", b'{"inputs": ["a"]}'), ("/get_reward", b'{"query": ["a"], "prompts": ["b"], "labels": ["r"]}'),
    ("/v1/rewards", b'{"items": [{"prompt": "p"}]}'), ("/v1/rewards", b'[]'),
]


def _request(kind: str, items: list[dict], texts: list[str]):
    """(path, json body, answer -> rewards) for one valid request of `kind`."""
    if kind == "classify":
        return "/classify", {"model": "polar", "text": texts}, lambda a: [e["embedding"][0] for e in a]
    if kind == "pooling":
        return "/pooling", {"input": texts}, lambda a: [e["data"][-1][0] for e in a["data"]]
    if kind == "get_reward":
        return ("/get_reward", {"query": [it["prompt"] + it["output"] for it in items],
                                "prompts": [it["prompt"] for it in items],
                                "labels": [it["reference"] for it in items]}, lambda a: a["rewards"])
    return "/v1/rewards", {"items": items}, lambda a: [d["reward"] for d in a["data"]]


async def run_load(url: str, pool: list[dict], texts: list[str], expected, clients: int, seconds: float,
                   bad_fraction: float, max_request: int, seed: int, headers=None) -> dict:
    """`expected`: per pool index the reward alone, or None to check consistency between answers."""
    import httpx

    seen: dict[int, float] = {}
    stats = {"2xx": 0, "4xx": 0, "429": 0, "5xx": 0, "valid": 0, "malformed": 0, "items": 0, "mismatched": 0,
             "lost": 0, "bad_not_4xx": 0}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(c: int, http):
        rng = np.random.default_rng(seed + c)
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            if rng.random() < bad_fraction:
                path, body = MALFORMED[int(rng.integers(len(MALFORMED)))]
                stats["malformed"] += 1
                try:
                    r = await http.post(url + path, content=body, headers={"content-type": "application/json"})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                latencies.append(time.monotonic() - t0)
                _count(stats, code)
                if not 400 <= code < 500:
                    stats["bad_not_4xx"] += 1
                continue
            # n rollouts of a few prompts: consecutive pool entries share (prompt, reference).
            n = int(rng.integers(1, min(max_request, len(pool)) + 1))  # a request never runs past the pool
            start = int(rng.integers(0, len(pool) - n + 1))
            idx = list(range(start, start + n))
            kind = ["classify", "pooling", "get_reward", "native"][int(rng.integers(4))]
            path, body, read = _request(kind, [pool[i] for i in idx], [texts[i] for i in idx])
            stats["valid"] += 1
            try:
                r = await http.post(url + path, json=body)
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            latencies.append(time.monotonic() - t0)
            _count(stats, code)
            if code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if code != 200:
                stats["lost"] += 1
                continue
            got = read(r.json())
            stats["items"] += len(got)
            if len(got) != n:
                stats["mismatched"] += 1
                continue
            for i, g in zip(idx, got):
                ref = expected[i] if expected is not None else seen.setdefault(i, g)
                if abs(g - ref) > 1e-5:
                    stats["mismatched"] += 1
                    break

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120, headers=headers or {},
                                 limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        elapsed = time.monotonic() - t0
        try:
            health = (await http.get(url + "/health")).status_code
        except httpx.HTTPError:  # no answer at all: unhealthy, not a traceback
            health = 0
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    stats.update(clients=clients, seconds=round(elapsed, 1), requests=len(latencies),
                 requests_per_s=len(latencies) / elapsed, items_per_s=stats["items"] / elapsed,
                 p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
                 healthy_after=health == 200)
    return stats


def _count(stats: dict, code: int) -> None:
    if code == 429:
        stats["429"] += 1
    elif 200 <= code < 300:
        stats["2xx"] += 1
    elif 400 <= code < 500:
        stats["4xx"] += 1
    else:
        stats["5xx"] += 1  # 5xx, or no answer at all


def ok(stats: dict) -> bool:
    return (stats["5xx"] == 0 and stats["mismatched"] == 0 and stats["lost"] == 0 and stats["bad_not_4xx"] == 0
            and stats["healthy_after"])


def table(stats: dict) -> str:
    cols = ["clients", "seconds", "requests", "valid", "malformed", "requests_per_s", "items_per_s", "p50_ms",
            "p99_ms", "2xx", "4xx", "429", "5xx", "mismatched", "lost", "healthy_after"]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    return ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| "
            + " | ".join(fmt(stats[c]) for c in cols) + " |")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _settled(read, every_s: float = 0.5, polls: int = 4, limit_s: float = 120.0) -> None:
    """Returns once read() has stopped changing (within 1%) for `polls` polls in a row."""
    last, same, deadline = read(), 0, time.monotonic() + limit_s
    while same < polls and time.monotonic() < deadline:
        time.sleep(every_s)
        now = read()
        same = same + 1 if abs(now - last) <= 0.01 * max(last, 1) else 0
        last = now


def _answer(conn: socket.socket, limit_s: float) -> bytes:
    """The status line's code of the answer on `conn` (b"" if none came)."""
    conn.setblocking(True)
    conn.settimeout(limit_s)
    got = b""
    try:
        while b"\r\n" not in got:
            part = conn.recv(4096)
            if not part:
                break
            got += part
    except OSError:
        pass
    return got.split(b" ", 2)[1] if got.startswith(b"HTTP/1.1 ") else b""


def burst(url: str, service, n: int, body_bytes: int) -> dict:
    """Fills --max-reading-bytes with bodies that never arrive, sends n whole requests at once,
    reads this process's heap and RSS once they have settled, lets the room go and counts the answers."""
    import tracemalloc

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"text": ["<|reward|>a[UNUSED_TOKEN_130]"]}).encode()
    body += b" " * max(0, body_bytes - len(body))  # whitespace: the same one item, a body of body_bytes

    def request(payload: bytes, declared: int = len(body)) -> bytes:
        return (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % declared + payload)

    # the room is charged by declared length: the fewest clients that leave no room for one more body
    held, left = [], service.max_reading_bytes
    while service.charge(min(service.settings.max_body_bytes, left)) <= left:
        declared = min(service.settings.max_body_bytes, left)
        left -= service.charge(declared)
        conn = socket.create_connection((host, int(port)), timeout=30)
        conn.sendall(request(body[:5], declared))
        held.append(conn)
    deadline = time.monotonic() + 60
    while service.reading < len(held) and time.monotonic() < deadline:
        time.sleep(0.01)
    tracemalloc.start()
    heap0, rss0 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    whole, clients = request(body), []
    for k in range(n):
        conn = socket.create_connection((host, int(port)), timeout=30)
        conn.setblocking(False)
        try:
            conn.send(whole)  # what the kernel takes; a large body's rest stays unsent, as a slow network leaves it
        except BlockingIOError:
            pass
        clients.append(conn)
        if k % 100 == 99:
            time.sleep(0.02)  # lets the server accept: a full listen backlog would stall connect()
    _settled(lambda: tracemalloc.get_traced_memory()[0])
    heap, rss = tracemalloc.get_traced_memory()[0] - heap0, _rss_bytes() - rss0
    # the clients refused at once leave (as one backing off for Retry-After would free its
    # connection): what is left is what the waiting requests hold
    refused, waiting = [], []
    for conn in clients:
        try:
            answered = conn.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 429")
        except BlockingIOError:
            answered = False
        (refused if answered else waiting).append(conn)
    for conn in refused:
        conn.close()
    _settled(lambda: tracemalloc.get_traced_memory()[0])
    held_heap = tracemalloc.get_traced_memory()[0] - heap0
    tracemalloc.stop()
    clients = waiting
    for conn in held:
        conn.close()  # the room goes to the waiting requests
    codes: dict[str, int] = {}
    for conn in clients:
        code = _answer(conn, 120).decode() or "none"
        codes[code] = codes.get(code, 0) + 1
        conn.close()
    return {"requests": n, "body_bytes": len(body), "held_by": len(held), "refused_at_once": len(refused),
            "waited": len(waiting), "burst_heap_mb": heap / 2**20, "burst_rss_mb": rss / 2**20,
            "waiting_heap_mb": held_heap / 2**20, "kb_per_waiting": held_heap / 1024 / max(len(waiting), 1),
            "then_200": codes.pop("200", 0), "then_429": codes.pop("429", 0), "other_or_none": sum(codes.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="serve this engine checkpoint in-process")
    src.add_argument("--url", help="load a server already running (loopback)")
    ap.add_argument("--clients", type=at_least(1), default=16, help="concurrent clients (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the load run (default %(default)s)")
    ap.add_argument("--bad-fraction", type=float, default=0.2,
                    help="fraction of requests that are malformed on purpose (default %(default)s)")
    ap.add_argument("--max-request", type=at_least(1), default=16, help="items per valid request, at most")
    ap.add_argument("--prompts", type=at_least(1), default=32,
                    help="distinct prompts the requests draw from (default %(default)s)")
    ap.add_argument("--rollouts", type=at_least(1), default=8, help="rollouts of each prompt (default %(default)s)")
    ap.add_argument("--words", type=at_least(1), default=24, help="words per prompt/reference/rollout, at most")
    ap.add_argument("--max-queue", type=at_least(1), default=512, help="polar serve --max-queue (default %(default)s)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="polar serve --max-wait-ms (default %(default)s)")
    ap.add_argument("--row-tokens", type=at_least(1), default=4096, help="polar serve --row-tokens")
    ap.add_argument("--max-batch-tokens", type=at_least(1), default=16384, help="polar serve --max-batch-tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed of the requests (default %(default)s)")
    ap.add_argument("--burst", type=at_least(1), default=0,
                    help="measure the memory a burst of this many requests holds (with --checkpoint), no load run")
    ap.add_argument("--burst-body-bytes", type=at_least(1), default=2048, help="each burst request's body size")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or not 0 <= args.bad_fraction <= 1 or args.max_wait_ms < 0:
        ap.error("--seconds must be above 0, --bad-fraction within [0, 1] and --max-wait-ms at least 0")
    if args.burst and args.url:
        ap.error("--burst measures this process's memory: it needs --checkpoint, not --url")

    from polar.serve.items import StructuredItem, format_structured
    from polar.tokenizer import load_tokenizer

    pool = make_pool(args.seed, args.prompts, args.rollouts, args.words)
    if args.url:
        from polar.tokenizer import ByteTokenizer

        import httpx

        try:
            httpx.get(args.url.rstrip("/") + "/health", timeout=10)
        except httpx.HTTPError as exc:
            ap.error(f"--url {args.url}: no server answers there ({type(exc).__name__}: {exc})")
        tok = ByteTokenizer()
        formatted = format_structured(tok, [StructuredItem(**it) for it in pool], 16384, 4096)
        stats = asyncio.run(run_load(args.url.rstrip("/"), pool, [t for t, _ in formatted], None, args.clients,
                                     args.seconds, args.bad_fraction, args.max_request, args.seed))
    else:
        from polar.serve.app import ServeSettings, Service
        from polar.serve.batcher import Batcher, score_each_alone
        from polar.serve.metrics import Metrics
        from engine.inference import RewardScorer
        from polar.checkpoint_tokenizer import find
        from polar.serve.server import serve_in_thread

        from engine.config import ConfigError

        try:
            scorer = RewardScorer.load(args.checkpoint)
        except (ConfigError, FileNotFoundError) as exc:
            ap.error(str(exc))
        tok = load_tokenizer(find(str(scorer.info.step_dir)))
        formatted = format_structured(tok, [StructuredItem(**it) for it in pool], 16384, 4096)
        expected = score_each_alone(scorer.score, [ids for _, ids in formatted], tok.pad_id)
        metrics = Metrics()
        batcher = Batcher(scorer.score, tok.pad_id, max_wait_s=args.max_wait_ms / 1000, max_queue_items=args.max_queue,
                          row_tokens=args.row_tokens, max_batch_tokens=args.max_batch_tokens,
                          pack_rows=scorer.attention_backend == "triton", metrics=metrics,
                          max_positions=scorer.max_positions)
        if args.burst:
            # a wait long enough for the whole burst to arrive on a slow machine: what is held is measured
            service = Service(tok, batcher, ServeSettings(preparing_wait_s=120.0, timeout_s=600.0), metrics)
            with serve_in_thread(service) as url:
                stats = burst(url, service, args.burst, args.burst_body_bytes)
            cols = list(stats)
            print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| "
                  + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in stats.values()) + " |")
            return 0 if stats["other_or_none"] == 0 else 1
        service = Service(tok, batcher, ServeSettings(max_items=args.max_request), metrics)
        with serve_in_thread(service) as url:
            stats = asyncio.run(run_load(url, pool, [t for t, _ in formatted], expected, args.clients,
                                         args.seconds, args.bad_fraction, args.max_request, args.seed))
        stats["prefix_tokens_saved"] = batcher.totals.tokens - batcher.totals.computed
        stats["tokens"] = batcher.totals.tokens
    print(table(stats))
    if "tokens" in stats:
        print(f"tokens scored {stats['tokens']:,}; shared prefixes saved {stats['prefix_tokens_saved']:,} "
              f"({stats['prefix_tokens_saved'] / max(stats['tokens'], 1):.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1))
    if not ok(stats):
        print("FAILED: 5xx, mismatched or lost answers, a malformed request not answered 4xx, or an unhealthy server",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
