"""Core attention over shared-prefix packed sequences (the torch reference).

A packed sequence holds groups back to back; a group is a prefix followed by K candidates. With
`segment` (group slot, -1 on padding) and `candidate` (0 on prefix tokens, k on candidate k) per
token, query i may attend to key j iff

    segment[i] == segment[j] != -1  and  j <= i  and  (candidate[j] == 0 or candidate[j] == candidate[i])

so each candidate sees its group's whole prefix and its own earlier tokens, never a sibling or
another group; together with position ids that continue from the prefix length, a candidate sees
exactly what it would see as `prefix + candidate` alone. Padding queries see only themselves so no
softmax row is empty.

The module takes megatron's core-attention slot in the layer spec. It receives the packed layout
through megatron's `attention_mask` argument as an int tensor [b, 3, s] (rows: position id,
segment, candidate; built by engine.packing.collate, whose `dense_mask` states the rule) and
applies RoPE itself (see rope.py). Fast kernels plug in by `backend`:

- `torch`: SDPA over the whole pack with the dense mask. The reference: obviously the rule, but
  it computes every (query, key) pair of the pack, O(L^2) in time and memory.
- `blocks`: SDPA once per group, on the group's own tokens; padding runs pass their values
  through. Groups never see each other, so only the diagonal blocks hold work: a pack of n
  equal groups costs 1/n of `torch`'s attention. The CPU training path (no Triton there);
  packs under DENSE_BELOW tokens, where the per-group calls cost more, take `torch`'s path.
- `triton`: engine.kernels.shared_prefix_attention, which also skips the masked tiles inside a
  group (a candidate's siblings); the GPU path.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from engine.model.rope import LLAMA3_DEFAULTS, Yarn, apply_rope, check_rope_window, rope_cos_sin
from engine.packing import POSITION, SEGMENT, LayoutCache, dense_mask

# one layout only: the dense mask it keeps is O(L^2)
_cache = LayoutCache(layouts=1)


def torch_shared_prefix_attention(q, k, v, layout, softmax_scale: float) -> torch.Tensor:
    """q [s, b, hq, d], k/v [s, b, hkv, d] (RoPE already applied) -> [s, b, hq * d]."""
    s, b, hq, d = q.shape
    mask = _cache.get(layout, "mask", lambda: dense_mask(layout).unsqueeze(1))  # [b, 1, s, s]
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        k.permute(1, 2, 0, 3),
        v.permute(1, 2, 0, 3),
        attn_mask=mask,
        scale=softmax_scale,
        enable_gqa=k.shape[2] != hq,
    )  # [b, hq, s, d]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


def group_blocks(layout: torch.Tensor) -> list[list[tuple[int, Optional[torch.Tensor]]]]:
    """Per pack row, its runs of one segment in order: (length, bool mask [n, n] of the rule within
    the run), the mask None for a run of padding. One host read of the layout per micro-batch (every
    layer reuses it through the cache); the loop is over groups, not tokens."""
    seg = layout[:, SEGMENT].cpu().numpy()  # the one device-to-host read
    b, L = seg.shape
    plan = []
    for r in range(b):
        starts = [0] + (np.flatnonzero(seg[r, 1:] != seg[r, :-1]) + 1).tolist()
        row = []
        for a, e in zip(starts, starts[1:] + [L]):
            if seg[r, a] < 0:
                row.append((e - a, None))
                continue
            row.append((e - a, dense_mask(layout[r:r + 1, :, a:e])[0]))  # the rule, on one group
        plan.append(row)
    return plan


# Packs shorter than this take the dense path: there one SDPA call per group costs more than the
# masked pairs it skips (CPU, fwd + bwd, 2 groups a pack: dense 4.8 ms against 7.2 ms at 256
# tokens, 19 ms against 12 ms at 512).
DENSE_BELOW = 384


def blocked_shared_prefix_attention(q, k, v, layout, softmax_scale: float) -> torch.Tensor:
    """`torch_shared_prefix_attention`'s result, computed one group at a time.

    split/unbind (not indexing) so that backward is one cat/stack per row instead of a full-size
    zero tensor per group."""
    s, b, hq, d = q.shape
    if s < DENSE_BELOW:
        return torch_shared_prefix_attention(q, k, v, layout, softmax_scale)
    rep = hq // k.shape[2]
    plan = _cache.get(layout, "blocks", lambda: group_blocks(layout))
    rows = []
    for r, (qr, kr, vr) in enumerate(zip(q.unbind(1), k.unbind(1), v.unbind(1))):
        sizes = [n for n, _ in plan[r]]
        pieces = []
        for (_, mask), qb, kb, vb in zip(plan[r], qr.split(sizes), kr.split(sizes), vr.split(sizes)):
            if mask is None:  # a padding query sees only itself: its own value, per query head
                pieces.append(vb.repeat_interleave(rep, dim=1) if rep > 1 else vb)
                continue
            out = F.scaled_dot_product_attention(
                qb.transpose(0, 1).unsqueeze(0), kb.transpose(0, 1).unsqueeze(0), vb.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=softmax_scale, enable_gqa=rep > 1,
            )  # [1, hq, n, d]
            pieces.append(out[0].transpose(0, 1))
        rows.append(torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows, 1).reshape(s, b, hq * d)


_BACKENDS = {"torch": torch_shared_prefix_attention, "blocks": blocked_shared_prefix_attention}
# Imported on first request only: importing a kernel module imports triton, which the default
# torch path must not pay for (or need installed).
_LAZY_BACKENDS = {"triton": "engine.kernels.shared_prefix_attention"}


def register_backend(name: str, fn) -> None:
    """Kernels register themselves here; the config's `train.attention_backend` picks one."""
    _BACKENDS[name] = fn


def _load_lazy(name: str) -> str:
    """Registers a lazy backend if it can run here; returns why not otherwise."""
    import importlib

    try:
        module = importlib.import_module(_LAZY_BACKENDS[name])
    except ImportError as exc:
        return f"importing {_LAZY_BACKENDS[name]} failed: {exc}"
    ok, why = module.available()
    if not ok:
        return why
    register_backend(name, module.triton_backend)
    return ""


def get_backend(name: str):
    reason = ""
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        reason = _load_lazy(name)
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))
        raise ValueError(
            f"train.attention_backend={name!r} is not available on this machine"
            + (f" ({reason})" if reason else "")
            + f"; known backends: {known}"
        )
    return _BACKENDS[name]


class SharedPrefixAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention in the layer spec."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        rotary_base: float = 10000.0,
        backend: str = "torch",
        rope_scaling: str = "none",
        rope_scaling_factor: float = 1.0,
        max_position_embeddings: int = 1 << 62,
        rope_llama3: tuple = LLAMA3_DEFAULTS,
        rope_yarn: Yarn = Yarn(),
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("shared-prefix attention does not support context parallelism")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.rotary_base = rotary_base
        self.rope_scaling = rope_scaling
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_llama3 = tuple(rope_llama3)
        self.rope_yarn = Yarn(*rope_yarn)
        self.max_position_embeddings = max_position_embeddings
        self.attend = get_backend(backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> torch.Tensor:
        layout = attention_mask
        if layout is None or layout.dim() != 3 or layout.shape[1] != 3:
            raise ValueError("SharedPrefixAttention expects the packed layout [b, 3, s] as attention_mask")
        check_rope_window(self.rope_scaling, layout.shape[-1], self.max_position_embeddings)
        cos, sin = _cache.get(
            layout, ("rope", self.head_dim, self.rotary_base, self.rope_scaling, self.rope_scaling_factor,
                     self.rope_llama3, self.rope_yarn, query.dtype),
            lambda: rope_cos_sin(layout[:, POSITION], self.head_dim, self.rotary_base, dtype=query.dtype,
                                 scaling=self.rope_scaling, factor=self.rope_scaling_factor, llama3=self.rope_llama3,
                                 yarn=self.rope_yarn),
        )
        query = apply_rope(query, cos, sin)
        key = apply_rope(key, cos, sin)
        return self.attend(query, key, value, layout, self.softmax_scale)
