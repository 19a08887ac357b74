"""Load test of `polar serve` on loopback: N concurrent clients for T seconds, a mix of valid and
malformed requests to every endpoint; checks every answer.

    python benchmarks/serve_load.py --checkpoint RUN_DIR [--clients 16 --seconds 30 --bad-fraction 0.2]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...   # a server already running

With --checkpoint the server runs in this process (uvicorn in a thread) and each valid answer is
compared with its items scored alone (fp32, 1e-5): a mismatch is an answer that differs, a lost
answer a valid request that got no 200/429. With --url answers are checked for consistency
(the same item always gets the same reward). Prints throughput, p50/p99 latency and the 2xx/4xx/
429/5xx counts; exits 1 on any 5xx, mismatch or lost answer, or an unhealthy server afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="serve this engine checkpoint in-process")
    src.add_argument("--url", help="load a server already running (loopback)")
    ap.add_argument("--clients", type=at_least(1), default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--bad-fraction", type=float, default=0.2)
    ap.add_argument("--max-request", type=at_least(1), default=16, help="items per valid request, at most")
    ap.add_argument("--prompts", type=at_least(1), default=32)
    ap.add_argument("--rollouts", type=at_least(1), default=8)
    ap.add_argument("--words", type=at_least(1), default=24, help="words per prompt/reference/rollout, at most")
    ap.add_argument("--max-queue", type=at_least(1), default=512)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--row-tokens", type=at_least(1), default=4096, help="polar serve --row-tokens")
    ap.add_argument("--max-batch-tokens", type=at_least(1), default=16384, help="polar serve --max-batch-tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or not 0 <= args.bad_fraction <= 1 or args.max_wait_ms < 0:
        ap.error("--seconds must be above 0, --bad-fraction within [0, 1] and --max-wait-ms at least 0")

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
                          row_tokens=args.row_tokens, max_batch_tokens=args.max_batch_tokens, pack_rows=scorer.attention_backend == "triton", metrics=metrics,
                          max_positions=scorer.max_positions)
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
