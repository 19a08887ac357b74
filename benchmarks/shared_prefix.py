"""Shared-prefix packing against the duplicated-prefix layout other trainers use.

The same groups (one prefix, K candidates) are scored two ways by the same model: packed with
the prefix once (shared-prefix layout), and packed as K independent `prefix + candidate`
sequences (duplicated layout). Prints, for each layout, the work it asks for, counted exactly from
the packed layout (engine/kernels/attention_schedule.py):

- tokens: what every linear layer (QKV, output, MLP, heads) processes;
- visible (query, key) pairs and the useful attention FLOPs (fwd+bwd): what a block-sparse kernel
  that skips masked tiles (the Triton kernel) must compute;
- pairs the dense reference computes: the torch reference attention on CPU materialises the full
  L x L mask and scores per packed sequence, so its attention work is sequences x L^2 whatever
  the mask hides;

and the forward+backward time of the torch reference and its ratio (measured in the same run; on
CPU only ratios mean anything). The time ratio therefore follows the token count (linear layers)
and the packed-sequence count (dense attention), not the visible pairs: it is not what a
block-sparse GPU kernel would save on attention; the pair and FLOP ratios are.

    python benchmarks/shared_prefix.py [--k 2 8] [--prefix 400] [--cand 100] [--seq 2048] [--no-time]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.arguments import at_least  # noqa: E402


def candidate_pairs(candidates: list) -> list:
    """The duplicated layout's candidates two to a group (a group needs two); an odd K puts three in
    the last one."""
    k = len(candidates)
    last = 3 if k % 2 else 2
    return [candidates[i:i + 2] for i in range(0, k - last, 2)] + [candidates[k - last:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 8],
                    help="candidates a group, a row each (at least 2) (default %(default)s)")
    ap.add_argument("--prefix", type=at_least(1), default=400, help="mean prefix tokens")
    ap.add_argument("--cand", type=at_least(1), default=100, help="mean candidate tokens")
    ap.add_argument("--seq", type=at_least(1), default=2048, help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--groups", type=at_least(1), default=16, help="groups scored (default %(default)s)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the model (default %(default)s)")
    ap.add_argument("--layers", type=at_least(1), default=4, help="layers of the model (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed forward+backward passes of each layout, the best kept (default %(default)s)")
    ap.add_argument("--no-time", action="store_true", help="exact counts only: skip the timed forward+backward")
    args = ap.parse_args()
    if min(args.k) < 2:
        ap.error("--k: a group needs at least 2 candidates")
    if args.hidden < 16 or args.hidden % 16:
        ap.error(f"--hidden must be a positive multiple of 16 (8 heads of an even size, for RoPE), not {args.hidden}")

    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron is imported: some of its warnings come at import
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.data import PackedGroups
    from engine.kernels.attention_schedule import attention_flops, visible_pairs
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.packing import Group, collate
    from engine.parallelize import transformer_config
    from engine.runtime import init_runtime

    rt = init_runtime(ParallelConfig(), 0)
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                    ffn_hidden_size=3 * args.hidden, vocab_size=1000)
    model = RewardModel(transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), rt),
                        layer_spec(False, 10000.0, "torch"), 1000, args.seq, True, True).to(rt.device)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)

    heads, head_dim = 8, args.hidden // 8

    def run(groups):
        data = PackedGroups(groups, args.seq)
        batches = [collate(data.sequences([i]), args.seq, 0) for i in range(len(data))]
        pairs = sum(int(visible_pairs(b.layout).sum()) for b in batches)
        flops = args.layers * sum(attention_flops(b.layout, heads, head_dim) for b in batches)
        best = float("nan")
        if not args.no_time:
            model(batches[0].tokens, batches[0].layout, batches[0].reward_index).sum().backward()  # warm-up, untimed
            best = float("inf")
        for _ in range(0 if args.no_time else args.repeats):
            t = time.perf_counter()
            for b in batches:
                model(b.tokens, b.layout, b.reward_index).sum().backward()
            best = min(best, time.perf_counter() - t)
        return dict(tokens=data.num_real_tokens, seqs=len(data), pairs=pairs, dense=len(data) * args.seq ** 2,
                    flops=flops, time=best)

    print(f"| {'K':>3} | {'layout':<10} | {'tokens':>8} | {'seqs':>4} | {'visible pairs':>13} | "
          f"{'dense pairs':>12} | {'attn GFLOP':>10} | {'fwd+bwd s':>9} | ratios shared/duplicated: "
          f"tokens, visible pairs, dense pairs, time |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for k in args.k:
        rng = np.random.default_rng(k)
        shared, duplicated = [], []
        for _ in range(args.groups):
            prefix = rng.integers(1, 1000, size=max(1, int(rng.normal(args.prefix, args.prefix / 4))), dtype=np.int32)
            cands = [rng.integers(1, 1000, size=max(1, int(rng.normal(args.cand, args.cand / 4))), dtype=np.int32)
                     for _ in range(k)]
            labels = np.array([1] + [0] * (k - 1), dtype=np.int8)
            shared.append(Group(prefix, cands, labels))
            # duplicated: every candidate carries its own copy of the prefix; pairs stay in one
            # group so both layouts compute the same rewards
            duplicated.append([np.concatenate([prefix, c]) for c in cands])
        # an empty prefix makes each candidate a self-contained `prefix + candidate` sequence: the
        # duplicated layout; candidates go two to a group so groups stay small enough to pack
        dup_groups = [Group(np.zeros(0, np.int32), c, np.array([1] + [0] * (len(c) - 1), np.int8))
                      for d in duplicated for c in candidate_pairs(d)]
        longest = max(len(g) for g in shared + dup_groups)
        if longest > args.seq:
            sys.exit(f"shared_prefix.py: error: a group of {longest} tokens does not fit --seq {args.seq} "
                     "(groups are never split): raise --seq or lower --prefix/--cand")
        sh, du = run(shared), run(dup_groups)
        for name, r in (("shared", sh), ("duplicated", du)):
            ratios = ", ".join("-" if args.no_time and key == "time" else f"{r[key] / du[key]:.2f}x"
                               for key in ("tokens", "pairs", "dense", "time"))
            seconds = "-" if args.no_time else f"{r['time']:.3f}"
            print(f"| {k:>3} | {name:<10} | {r['tokens']:>8,} | {r['seqs']:>4} | {r['pairs']:>13,} | "
                  f"{r['dense']:>12,} | {r['flops'] / 1e9:>10.3f} | {seconds:>9} | {ratios} |")


if __name__ == "__main__":
    main()
