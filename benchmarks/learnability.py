"""Can a reward model trained from scratch tell the synthetic policies apart, and what helps it?

A small stand-alone study in plain torch (no megatron), a few minutes per run on an idle core:
a decoder of the engine's architecture (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention,
a value head reading the final reward token) is trained from
random weights on POLAR triplets from `polar/synthetic.py`, one (reference, chosen, rejected)
group per triplet scored unpacked as `prefix + candidate` sequences (polar.format.encode_groups,
`sft` wrapper, byte tokenizer). Loss: the pairwise ranking loss of the paper (Eq. 7),
optionally plus an auxiliary next-token loss on the same tokens (train.aux_lm_weight in the
engine). Evaluation: pairwise accuracy on triplets from held-out policies (never trained on) and
on fresh triplets from the training policies, next to the non-learned baselines of polar.baselines.

Variants: the default style pool and `StyleConfig.transition_only()` (policies that differ only in
the Markov structure of their word classes), each with the ranking loss alone and with the
auxiliary loss. Prints one table row per (variant, seed).

    python benchmarks/learnability.py --jobs 4               # 4 variants x 1 seed, one process each
    python benchmarks/learnability.py --seeds 1 2 --steps 700 # the budget of the first study (11.2k triplets)

Each (variant, seed) trains single-threaded in its own process (--jobs of them at once), so the
figures do not depend on --jobs; the train seconds do, when the jobs share cores.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.arguments import at_least  # noqa: E402
from polar import baselines  # noqa: E402
from polar.format import encode_groups  # noqa: E402
from polar.synthetic import StyleConfig, make_pool, make_prompts, make_triplets  # noqa: E402
from polar.tokenizer import ByteTokenizer  # noqa: E402


@dataclass
class Arch:
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 176
    vocab: int = ByteTokenizer.vocab_size
    rope_base: float = 10000.0


class Block(torch.nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a, self.hd = a, a.hidden // a.heads
        self.n1, self.n2 = torch.nn.RMSNorm(a.hidden, eps=1e-5), torch.nn.RMSNorm(a.hidden, eps=1e-5)
        self.qkv = torch.nn.Linear(a.hidden, (a.heads + 2 * a.kv_heads) * self.hd, bias=False)
        self.out = torch.nn.Linear(a.heads * self.hd, a.hidden, bias=False)
        self.up = torch.nn.Linear(a.hidden, 2 * a.ffn, bias=False)
        self.down = torch.nn.Linear(a.ffn, a.hidden, bias=False)

    def forward(self, x, cos, sin):
        b, L, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, L, -1, self.hd).split(
            [self.a.heads, self.a.kv_heads, self.a.kv_heads], dim=2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, L, -1))
        gate, up = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RewardLM(torch.nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.embed = torch.nn.Embedding(a.vocab, a.hidden)
        self.blocks = torch.nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = torch.nn.RMSNorm(a.hidden, eps=1e-5)
        self.value_head = torch.nn.Linear(a.hidden, 1, bias=False)
        self.lm_head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        L, hd = tokens.shape[1], self.a.hidden // self.a.heads
        inv = 1.0 / self.a.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None]
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x)


def encode(triplets, max_length):
    """Per triplet, the chosen and the rejected full inputs (prefix + candidate), as id arrays."""
    groups = encode_groups(ByteTokenizer(), [t.prompt for t in triplets], [t.reference for t in triplets],
                           [[t.chosen, t.rejected] for t in triplets], wrapper="sft", max_length=max_length)
    return [(g.full(0), g.full(1)) for g in groups]


def batch_tensors(pairs, pad):
    """Right-padded [2n, L] tokens (chosen rows first), last-token positions, real-token mask."""
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    lengths = np.array([len(s) for s in seqs])
    tokens = np.full((len(seqs), lengths.max()), pad, dtype=np.int64)
    for i, s in enumerate(seqs):  # one row copy per sequence, not per token
        tokens[i, : len(s)] = s
    tokens = torch.from_numpy(tokens)
    last = torch.from_numpy(lengths - 1)
    real = torch.arange(tokens.shape[1])[None] < torch.from_numpy(lengths)[:, None]
    return tokens, last, real


def losses(model, pairs, aux_weight, pad):
    tokens, last, real = batch_tensors(pairs, pad)
    h = model(tokens)
    reward = model.value_head(h[torch.arange(len(last)), last]).squeeze(-1)
    n = len(pairs)
    rank = -F.logsigmoid(reward[:n] - reward[n:]).mean()
    lm = torch.zeros(())
    if aux_weight:
        logits = model.lm_head(h[:, :-1])
        target_real = real[:, 1:]
        lm = F.cross_entropy(logits[target_real], tokens[:, 1:][target_real])
    return rank, lm, reward


@torch.no_grad()
def accuracy(model, pairs, pad, batch=64):
    hits = 0.0
    for i in range(0, len(pairs), batch):
        _, _, r = losses(model, pairs[i:i + batch], 0.0, pad)
        n = len(pairs[i:i + batch])
        d = r[:n] - r[n:]
        hits += float((d > 0).sum() + 0.5 * (d == 0).sum())
    return hits / len(pairs)


def run(variant, style, aux_weight, seed, args):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    pool = make_pool(seed, args.train_policies + args.held_out_policies, style)
    seen, held = pool[: args.train_policies], pool[args.train_policies:]
    prompts = make_prompts(seed, 2000)
    rng = np.random.default_rng([seed, 1])
    train_t = make_triplets(seen, prompts, rng, args.steps * args.batch)
    seen_t = make_triplets(seen, prompts, rng, args.eval_triplets)
    held_t = make_triplets(held, prompts, rng, args.eval_triplets)
    train, seen_p, held_p = (encode(t, args.max_length) for t in (train_t, seen_t, held_t))
    pad = ByteTokenizer.pad_id

    model = RewardLM(Arch())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, args.steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm))))))
    t0 = time.perf_counter()
    for step in range(args.steps):
        rank, lm, _ = losses(model, train[step * args.batch:(step + 1) * args.batch], aux_weight, pad)
        opt.zero_grad(set_to_none=True)
        (rank + aux_weight * lm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    secs = time.perf_counter() - t0
    base = [baselines.pairwise_accuracy(fn, held_t) for fn in
            (baselines.word_overlap, baselines.bigram_overlap, baselines.length_difference)]
    return dict(variant=variant, aux=aux_weight, seed=seed, triplets=len(train), held=accuracy(model, held_p, pad),
                seen=accuracy(model, seen_p, pad), base=base, secs=secs)


def main():
    ap = argparse.ArgumentParser(description="from-scratch learnability of the synthetic policies")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1],
                    help="training seeds, a run each (default %(default)s)")
    ap.add_argument("--steps", type=at_least(1), default=200, help="training steps a run (default %(default)s)")
    ap.add_argument("--batch", type=at_least(1), default=16, help="triplets per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    ap.add_argument("--eval-triplets", type=at_least(1), default=300,
                    help="triplets a held-out evaluation set (default %(default)s)")
    ap.add_argument("--train-policies", type=at_least(2), default=160,
                    help="synthetic policies seen in training (default %(default)s)")
    ap.add_argument("--held-out-policies", type=at_least(2), default=40,
                    help="synthetic policies kept for the held-out set (default %(default)s)")
    ap.add_argument("--max-length", type=at_least(1), default=512,
                    help="tokens a sequence at most (default %(default)s)")
    ap.add_argument("--variants", nargs="+", default=["default", "default+aux", "transition", "transition+aux"],
                    choices=["default", "default+aux", "transition", "transition+aux"],
                    help="the configurations trained (default %(default)s)")
    ap.add_argument("--jobs", type=at_least(1), default=1, help="runs at once, one process each")
    args = ap.parse_args()

    styles = {"default": StyleConfig(), "transition": StyleConfig.transition_only()}
    print(f"{args.steps} steps x {args.batch} triplets, lr {args.lr}, hidden 64, 3 layers, GQA 4/2, "
          f"{args.eval_triplets} evaluation triplets per set, 1 thread per run, {args.jobs} run(s) at once")
    print("| pool | loss | seed | triplets seen | held-out acc | seen acc | baselines word / bigram / length "
          "| train s |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run, name, styles[name.partition("+")[0]], 1.0 if "+aux" in name else 0.0, seed,
                               args) for name, seed in jobs]
        for (name, seed), fut in zip(jobs, futures):  # rows in table order, each as soon as it is ready
            r = fut.result()
            loss = "ranking + aux next-token 1.0" if r["aux"] else "ranking only"
            pool_label = "default" if name.startswith("default") else "transition-only"
            print(f"| {pool_label} | {loss} | {seed} | {r['triplets']:,} | {r['held']:.3f} | {r['seen']:.3f} | "
                  f"{' / '.join(f'{b:.3f}' for b in r['base'])} | {r['secs']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
