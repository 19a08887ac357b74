"""verl's reward loop over the in-process scorer: every response in flight batched together, against a
thread of the loop's pool per response.

    python benchmarks/reward_async.py                    # CPU: 256 responses, 8 a prompt, min(32, cpus + 4) threads
    python benchmarks/reward_async.py --device cuda [--layers 8 --hidden 1024 --heads 16 --kv-heads 8 --ffn 2816]
    python benchmarks/reward_async.py --json rows.json   # the rows written there too

verl's reward loop awaits polar.reward.compute_score_async for every response of a step at once, on
one event loop (a task per response, gathered). With scorer=InProcessScorer it awaits the scorer's
score_async: the item is tokenized in a thread of the loop's default pool and its forward, in the
scorer's batching thread, is awaited holding no thread, so every response in flight can share a
forward. A scorer with only score(items) runs each call in a thread of that pool
(asyncio.to_thread), the thread held until its forward returns: no forward scores more responses than
the pool has threads (min(32, cpus + 4) by default, --threads). Both ways score the same items with
the same InProcessScorer (its Batcher at its defaults but --max-batch-tokens, the random model of
serve_prefix.py's shape), the second through an object holding only its score, in the same run on
the same loop: a warm-up run of each, then --repeats runs of each, alternated, the median shown. Each of --responses items is
"[BOS] prompt \\n reference <|reward|> prompt \\n rollout [REW]" (byte tokenizer: one token per ASCII
character), --rollouts of them sharing their prompt and reference, as an RL step's samples of one
prompt do (the Batcher computes the shared prefix once per forward that holds them together).
The rewards of the two ways are compared.

What a larger forward saves is its fixed cost (the launches and Python of a forward) and the shared
prefix that a group split over several forwards computes again ("tokens computed"); on a CPU the
forward is mostly work per token, so short responses show the gain more than long ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.serve_prefix import make_items  # noqa: E402

# the random model's options: its engine.config.ModelConfig field and default (serve_prefix.py's)
SHAPE = {"layers": ("num_layers", 2), "hidden": ("hidden_size", 256), "heads": ("num_attention_heads", 4),
         "kv-heads": ("num_query_groups", 2), "ffn": ("ffn_hidden_size", 704)}
PATHS = ("score_async", "to_thread")  # (a) the reward loop's path since 5d78a77, (b) the one before it


class CountedModel:
    """The model's forward, keeping how many responses each forward scored; InProcessScorer reads the
    rest (max_positions, attention_backend, model_config) from the model itself."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def score(self, batch):
        out = self.model.score(batch)
        self.sizes.append(len(out))
        return out


class ScoreOnly:
    """A scorer exposing only score(items), as a user's own: compute_score_async runs it in
    asyncio.to_thread, the path every InProcessScorer took before score_async."""

    def __init__(self, scorer):
        self.score = scorer.score


def samples(responses: int, rollouts: int, prompt: int, reference: int, rollout: int, seed: int) -> list[dict]:
    """verl's keyword arguments of compute_score_async, a dict per response, `rollouts` in a row sharing
    their prompt (extra_info["prompt"]) and reference (ground_truth)."""
    groups = -(-responses // rollouts)
    items = make_items(groups, rollouts, prompt, reference, rollout, seed)[:responses]
    return [{"data_source": "bench", "solution_str": it.output, "ground_truth": it.reference,
             "extra_info": {"prompt": it.prompt, "index": k}} for k, it in enumerate(items)]


async def reward_loop(scorer, calls: list[dict]) -> tuple[list[float], float]:
    """Every response's compute_score_async awaited at once, as verl's reward loop gathers a task per
    sample: the rewards and the seconds from the first call to the last reward."""
    from polar.reward import compute_score_async

    t0 = time.perf_counter()
    rewards = await asyncio.gather(*(compute_score_async(**c, scorer=scorer) for c in calls))
    return rewards, time.perf_counter() - t0


def measure(scorer, model: CountedModel, calls: list[dict], threads: int, repeats: int) -> list[dict]:
    """Each path's rewards, median seconds, forward sizes and tokens computed (a shared prefix once a
    forward; these of the last run), on one event loop whose default executor has `threads` threads
    (what asyncio.to_thread and score_async's tokenizing use)."""
    ways = {"score_async": scorer, "to_thread": ScoreOnly(scorer)}
    seconds = {p: [] for p in PATHS}
    rewards, sizes, computed = {}, {}, {}
    with asyncio.Runner() as runner:
        runner.get_loop().set_default_executor(ThreadPoolExecutor(threads))
        for p in PATHS:  # warm-up: the pool's threads, the allocator's and the kernels' first calls
            runner.run(reward_loop(ways[p], calls))
        for _ in range(repeats):
            for p in PATHS:
                before = len(model.sizes), scorer.batcher.totals.computed
                rewards[p], s = runner.run(reward_loop(ways[p], calls))
                seconds[p].append(s)
                sizes[p], computed[p] = model.sizes[before[0]:], scorer.batcher.totals.computed - before[1]
    rows = []
    for p in PATHS:
        t = float(np.median(seconds[p]))
        rows.append({"path": p, "responses": len(calls), "threads": threads, "seconds": t,
                     "responses_per_s": len(calls) / t, "forwards": len(sizes[p]),
                     "mean_batch": float(np.mean(sizes[p])), "max_batch": int(max(sizes[p])), "batches": sizes[p],
                     "tokens_computed": computed[p],
                     "rewards": [float(r) for r in rewards[p]]})
    rows[0]["ratio"] = rows[0]["responses_per_s"] / rows[1]["responses_per_s"]
    rows[1]["ratio"] = 1.0
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_threads = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's, the loop's default pool
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model runs (default %(default)s; cpu hides the GPUs from torch)")
    ap.add_argument("--responses", type=at_least(1), default=256, help="responses a run (default %(default)s)")
    ap.add_argument("--rollouts", type=at_least(1), default=8,
                    help="responses sharing a prompt and reference (default %(default)s)")
    ap.add_argument("--threads", type=at_least(1), default=default_threads,
                    help="threads of the loop's default executor (default %(default)s: min(32, cpus + 4), asyncio's)")
    ap.add_argument("--prompt", type=at_least(1), default=128, help="prompt tokens (default %(default)s)")
    ap.add_argument("--reference", type=at_least(1), default=128, help="reference tokens (default %(default)s)")
    ap.add_argument("--rollout", type=at_least(1), default=128, help="tokens a response (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed runs of each path, the median shown (default %(default)s)")
    ap.add_argument("--max-batch-tokens", type=at_least(1),
                    help="the scorer's Batcher's tokens a forward (polar serve --max-batch-tokens; default: its own)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random text (default %(default)s)")
    ap.add_argument("--json", help="write the rows here")
    shape = ap.add_argument_group("the random model (serve_prefix.py's shape by default)")
    for option, (field, default) in SHAPE.items():
        shape.add_argument(f"--{option}", type=at_least(1), default=default, help=f"model.{field} (default {default})")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # before torch is imported: a GPU machine's CPU row times its CPU, as it says
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch

    from engine.config import ConfigError
    from engine.inference import RewardScorer
    from polar.in_process_scorer import InProcessScorer
    from polar.tokenizer import ByteTokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is false)")
    tok = ByteTokenizer()
    model_shape = {field: getattr(args, option.replace("-", "_")) for option, (field, _) in SHAPE.items()}
    try:
        model = RewardScorer.random({**model_shape, "vocab_size": tok.vocab_size})
    except ConfigError as exc:  # a model shape the engine refuses
        ap.error(str(exc))
    if model.rt.is_cuda != (args.device == "cuda"):
        ap.error(f"--device {args.device}: the engine's runtime is on {model.device}")
    counted = CountedModel(model)
    batcher_kw = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
    scorer = InProcessScorer(counted, tok, **batcher_kw)
    try:
        rows = measure(scorer, counted, samples(args.responses, args.rollouts, args.prompt, args.reference,
                                                args.rollout, args.seed), args.threads, args.repeats)
    finally:
        scorer.close()
    diff = float(np.abs(np.subtract(rows[0]["rewards"], rows[1]["rewards"])).max())

    device = torch.cuda.get_device_name(0) if model.rt.is_cuda else f"CPU ({os.cpu_count()} cores)"
    print("model: " + ", ".join(f"{k} {v}" for k, v in model_shape.items()) + f", {model.dtype}, attention "
          f"{model.attention_backend}, {device}, torch {torch.get_num_threads()} threads")
    print(f"responses: {args.responses}, {args.rollouts} a prompt; prompt {args.prompt}, reference {args.reference}, "
          f"response {args.rollout} tokens; loop's pool {args.threads} threads; forwards of at most "
          f"{scorer.batcher.max_batch_tokens} tokens; median of {args.repeats}")
    print()
    print("| path | responses/s | seconds | forwards a run | mean batch | max batch | tokens computed "
          "| responses/s vs to_thread |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['responses_per_s']:.1f} | {r['seconds']:.3f} | {r['forwards']} | "
              f"{r['mean_batch']:.1f} | {r['max_batch']} | {r['tokens_computed']:,} | {r['ratio']:.2f}x |")
    print()
    print(f"score_async: {rows[0]['ratio']:.2f}x the responses/s of a thread per response "
          f"({args.threads} threads); max |reward difference| {diff:.2e}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "settings": settings,
                                               "max_reward_difference": diff,
                                               "rows": [{k: v for k, v in r.items() if k != "rewards"}
                                                        for r in rows]}, indent=1))
    # batched with different neighbours, float32 rewards agree to rounding; bf16's do not
    return 0 if diff <= 1e-5 or model.dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
