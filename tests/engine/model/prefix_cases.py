"""Odd but legal shared-prefix packs and the duplicated layout they must reproduce, shared by the
model fuzz tests on the torch backends (tests/engine/model/test_packed_layout_fuzz.py) and on the
Triton kernel in the interpreter (tests/engine/kernels/test_shared_prefix_fuzz.py).

The oracle is the duplicated layout: every `prefix + candidate` scored alone, as its own sequence,
through the same weights, with plain causal attention (SDPA's is_causal, no layout and no mask
built by the engine) swapped in for the shared-prefix core attention. A packed candidate must
give that reward; a parameter's gradient must be the sum of the duplicated runs' gradients; and
the gradient at a prefix token's input embedding must be the sum over its group's candidates of
the gradients at that token's copies (a candidate token's, its own copy's; a padding token's, 0).

Importing this module sets nothing (the Triton module sets TRITON_INTERPRET itself)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ModelConfig, ParallelConfig, TrainConfig
from engine.packing import Group, collate

VOCAB = 50


def group(rng, p: int, cands: list[int], labelled: bool = True) -> Group:
    """Prefix of p tokens, candidates of the given lengths; the first candidate is the positive
    (labelled=False: a group to score, which may hold one candidate)."""
    labels = None
    if labelled:
        labels = np.zeros(len(cands), dtype=np.int8)
        labels[0] = 1
    return Group(rng.integers(1, VOCAB, size=p, dtype=np.int32),
                 [rng.integers(1, VOCAB, size=c, dtype=np.int32) for c in cands], labels)


def pack_cases() -> dict:
    """name -> (rows of groups, padding after the longest row, (query heads, KV heads, head dim)).
    Every GQA ratio of 1, 2, 4 and 8 and head dims 16 to 128; lengths mostly not multiples of 16
    (the interpreter's tile)."""
    rng = np.random.default_rng(0)
    return {
        # a group to score with a single candidate beside a two-candidate one
        "one_candidate": ([[group(rng, 7, [5], False), group(rng, 4, [3, 6], False)]], 3, (8, 8, 16)),
        "sixteen_one_token": ([[group(rng, 9, [1] * 16)]], 3, (8, 1, 32)),
        "ragged": ([[group(rng, 5, [1, 37, 2, 19])]], 1, (4, 1, 64)),  # padding tail of 1
        # row 0 ends exactly at seq_length (no padding), row 1 has 8 tokens of it
        "exact_fill": ([[group(rng, 6, [4, 9]), group(rng, 3, [2, 2])], [group(rng, 11, [3, 4])]], 0, (2, 1, 128)),
        "prefix_one": ([[group(rng, 1, [4, 1, 6]), group(rng, 1, [1, 1])]], 1, (8, 4, 16)),
        # five groups in one row (one without a prefix), and a second row
        "several_groups": ([[group(rng, 4, [2, 3]), group(rng, 0, [3, 1]), group(rng, 6, [1, 5, 2]),
                             group(rng, 2, [7, 1]), group(rng, 3, [2, 2])], [group(rng, 2, [1, 1])]], 2, (8, 2, 32)),
    }


def collate_case(rows, pad: int):
    return collate(rows, max(sum(len(g) for g in row) for row in rows) + pad, pad_id=0)


def build_model(runtime, hq: int, hkv: int, d: int, backend: str, seed: int = 0, **model_fields):
    """A 2-layer fp32 reward model with a random (not zero) value head, so that every gradient is live."""
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    torch.manual_seed(seed)
    m = ModelConfig(num_layers=2, hidden_size=hq * d, num_attention_heads=hq, num_query_groups=hkv,
                    ffn_hidden_size=64, vocab_size=VOCAB, **model_fields)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), runtime)
    spec = layer_spec(False, m.rotary_base, backend, m.rope_scaling, m.rope_scaling_factor,
                      m.max_position_embeddings)
    model = RewardModel(cfg, spec, VOCAB, m.max_position_embeddings, True, True)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    return model


def causal_attention(q, k, v, layout, softmax_scale: float) -> torch.Tensor:
    """Plain causal attention over each row as one sequence: what a sequence scored alone sees."""
    s, b, hq, d = q.shape
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         is_causal=True, scale=softmax_scale, enable_gqa=k.shape[2] != hq)
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


@contextlib.contextmanager
def attention(model, fn):
    """Every layer's core attention computed by fn for the duration."""
    from engine.model.shared_prefix_attention import SharedPrefixAttention

    mods = [m for m in model.modules() if isinstance(m, SharedPrefixAttention)]
    saved = [m.attend for m in mods]
    for m in mods:
        m.attend = fn
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.attend = f


@contextlib.contextmanager
def embedding_outputs(model):
    """Collects the backbone's input embeddings [s, b, h] of each forward, their .grad kept."""
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    handle = model.backbone.embedding.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def packed_run(model, batch, weights):
    """Rewards, parameter gradients and input-embedding gradient [s, b, h] of sum(weights * rewards)."""
    model.zero_grad()
    with embedding_outputs(model) as seen:
        rewards = model(batch.tokens, batch.layout, batch.reward_index)
    (rewards.double() * weights).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen[0].grad


def duplicated_run(model, rows, weights):
    """The same from the duplicated layout (module docstring): rewards, parameter gradients, and per
    candidate in the pack's order the input-embedding gradient [P + c_k, h] of its own sequence."""
    model.zero_grad()
    rewards = []
    with attention(model, causal_attention), embedding_outputs(model) as seen:
        for row in rows:
            for g in row:
                for c in g.candidates:
                    ids = np.concatenate([g.prefix, c]).astype(np.int64)
                    n = len(ids)
                    layout = torch.zeros(1, 3, n, dtype=torch.int32)
                    layout[0, 0] = torch.arange(n)
                    rewards.append(model(torch.from_numpy(ids)[None], layout, torch.tensor([n - 1])))
    rewards = torch.cat(rewards)
    (rewards.double() * weights).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, [e.grad[:, 0] for e in seen]


def expected_input_grad(rows, grads_by_cand, shape) -> torch.Tensor:
    """The packed input-embedding gradient [s, b, h] the duplicated runs imply: a prefix token's is the
    sum over its candidates' copies, a candidate token's its own copy's, padding's 0."""
    out = torch.zeros(shape, dtype=grads_by_cand[0].dtype)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for g in row:
            p, mine = len(g.prefix), grads_by_cand[k:k + len(g.candidates)]
            k += len(g.candidates)
            out[at:at + p, r] = sum(x[:p] for x in mine)
            at += p
            for c, x in zip(g.candidates, mine):
                out[at:at + len(c), r] = x[p:]
                at += len(c)
    return out


def check_against_duplicated(model, rows, batch, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    weights = torch.randn(batch.reward_index.numel(), generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    got_r, got_g, got_x = packed_run(model, batch, weights)
    want_r, want_g, by_cand = duplicated_run(model, rows, weights)
    assert want_r.abs().max() > 1e-2  # a non-trivial comparison
    torch.testing.assert_close(got_r, want_r, rtol=rtol, atol=atol)
    for name, g in want_g.items():
        assert g.abs().max() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(got_g[name], g, rtol=rtol, atol=atol * max(1.0, g.abs().max().item()),
                                   msg=lambda m: f"grad of {name}: {m}")
    want_x = expected_input_grad(rows, by_cand, got_x.shape)
    torch.testing.assert_close(got_x, want_x, rtol=rtol, atol=atol * want_x.abs().max().item())
    pad = batch.layout[:, 1].t() < 0  # [s, b]
    assert torch.equal(got_x[pad], torch.zeros_like(got_x[pad]))  # padding reaches no reward
