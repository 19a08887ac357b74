"""Shared-prefix scoring against each rollout alone, through the server's batcher.

    python benchmarks/serve_prefix.py                       # POLAR-like: prompt/reference/rollouts 512 tokens, n = 8
    python benchmarks/serve_prefix.py --checkpoint RUN_DIR  # a trained model instead of a random one of --hidden ...

During RL a trainer scores n rollouts per prompt against one reference: n POLAR inputs
"[BOS] prompt \\n reference <|reward|> prompt \\n rollout [REW]" that share all but the rollout.
Scored alone, each recomputes the prompt twice and the reference; with shared prefixes (the
engine's packed layout) they are computed once per group. Prints tokens computed, items/s and the
ratios, and checks that both give the same rewards. The byte tokenizer makes lengths exact (ASCII
text: one token per character).

On the CPU the torch reference attention computes a dense row_length^2 mask per row, so the
attention of a group (one long row) is not cheaper than that of its rollouts alone; only the
per-token work (projections, MLP) shrinks by the token ratio. A kernel that skips masked tiles
(engine's Triton attention, on a GPU) saves attention work as well.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.arguments import at_least  # noqa: E402


def make_items(groups: int, n: int, prompt: int, reference: int, rollout: int, seed: int) -> list:
    from polar.serve.items import StructuredItem

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    text = lambda k: "".join(rng.choice(letters, k))  # noqa: E731
    items = []
    for _ in range(groups):
        p, r = text(prompt), text(reference)
        items += [StructuredItem(p, r, text(rollout)) for _ in range(n)]
    return items


def run(scorer, ids, pad_id, share: bool, max_batch_tokens: int, row_tokens: int, repeats: int) -> dict:
    from polar.serve.batcher import Batcher

    b = Batcher(scorer.score, pad_id, max_wait_s=0, max_batch_tokens=max_batch_tokens, row_tokens=row_tokens,
                share_prefixes=share, pack_rows=scorer.attention_backend == "triton",
                max_positions=scorer.max_positions).start()
    try:
        b.score_sync(ids[: max(1, len(ids) // 4)])  # warm-up
        times, rewards = [], None
        for _ in range(repeats):
            before = (b.totals.computed, b.totals.forwards)
            t0 = time.perf_counter()
            rewards = b.score_sync(ids)
            times.append(time.perf_counter() - t0)
            computed, forwards = b.totals.computed - before[0], b.totals.forwards - before[1]
    finally:
        b.close()
    t = float(np.median(times))
    return {"rewards": rewards, "seconds": t, "computed": computed, "forwards": forwards,
            "items_per_s": len(ids) / t, "tokens": int(sum(len(a) for a in ids))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an engine checkpoint (default: a random model of the shape below)")
    ap.add_argument("--prompt", type=at_least(1), default=512, help="prompt tokens (default %(default)s)")
    ap.add_argument("--reference", type=at_least(1), default=512, help="reference tokens (default %(default)s)")
    ap.add_argument("--rollout", type=at_least(1), default=512, help="tokens a rollout (default %(default)s)")
    ap.add_argument("--n", type=at_least(1), default=8, help="rollouts per (prompt, reference)")
    ap.add_argument("--groups", type=at_least(1), default=2, help="(prompt, reference) pairs")
    ap.add_argument("--layers", type=int, default=2, help="layers of the random model (default %(default)s)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the random model (default %(default)s)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads of the random model (default %(default)s)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads of the random model (default %(default)s)")
    ap.add_argument("--ffn", type=int, default=704, help="MLP size of the random model (default %(default)s)")
    ap.add_argument("--max-batch-tokens", type=at_least(1), default=8192,
                    help="polar serve --max-batch-tokens (default %(default)s)")
    ap.add_argument("--row-tokens", type=at_least(1), default=8192,
                    help="polar serve --row-tokens (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed runs of each way, the median shown (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random text (default %(default)s)")
    args = ap.parse_args(argv)

    import torch

    from engine.config import ConfigError

    from polar.serve.items import format_structured
    from engine.inference import RewardScorer
    from polar.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    try:
        if args.checkpoint:
            scorer = RewardScorer.load(args.checkpoint)
        else:
            scorer = RewardScorer.random({"num_layers": args.layers, "hidden_size": args.hidden,
                                          "num_attention_heads": args.heads, "num_query_groups": args.kv_heads,
                                          "ffn_hidden_size": args.ffn, "vocab_size": tok.vocab_size})
    except (ConfigError, FileNotFoundError) as exc:  # a model shape or checkpoint the engine refuses
        ap.error(str(exc))
    items = make_items(args.groups, args.n, args.prompt, args.reference, args.rollout, args.seed)
    ids = [i for _, i in format_structured(tok, items, 16384, 4096)]
    alone = run(scorer, ids, tok.pad_id, False, args.max_batch_tokens, args.row_tokens, args.repeats)
    shared = run(scorer, ids, tok.pad_id, True, args.max_batch_tokens, args.row_tokens, args.repeats)
    diff = float(np.abs(alone["rewards"] - shared["rewards"]).max())

    m = scorer.model_config
    device = torch.cuda.get_device_name(0) if scorer.rt.is_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
          f"({m.num_query_groups} KV), ffn {m.ffn_hidden_size}, {scorer.dtype}, attention {scorer.attention_backend}, "
          f"{device}")
    print(f"items: {args.groups} x {args.n} rollouts; prompt {args.prompt}, reference {args.reference}, "
          f"rollout {args.rollout} tokens -> {len(ids[0])} tokens per item alone")
    print()
    print("| scoring | items | tokens computed | forward passes | seconds | items/s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("each rollout alone", alone), ("shared prefixes", shared)):
        print(f"| {name} | {len(ids)} | {r['computed']:,} | {r['forwards']} | {r['seconds']:.3f} | {r['items_per_s']:.2f} |")
    print()
    print(f"tokens computed: {alone['computed'] / shared['computed']:.2f}x fewer; throughput: "
          f"{shared['items_per_s'] / alone['items_per_s']:.2f}x; max |reward difference| {diff:.2e}")
    return 0 if diff <= 1e-5 or scorer.dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
