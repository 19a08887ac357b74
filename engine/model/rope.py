"""Rotary position embedding driven by explicit position ids.

Megatron's GPTModel derives RoPE angles from the token's index in the sequence. In a shared-prefix
packed sequence a candidate's positions restart at its prefix length, so the angles must come from
the per-token position ids of the packed layout instead: the attention module applies RoPE itself.
Non-interleaved (rotate-half) convention, the one of Llama, InternLM2 and megatron's default.
"""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype=torch.float32):
    """positions [b, s] -> cos, sin of shape [s, b, 1, dim] (angles computed in fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.t().to(torch.float32).unsqueeze(-1) * inv_freq  # [s, b, dim/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [s, b, 1, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, dim] rotated by the angles in cos/sin [s, b, 1, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
