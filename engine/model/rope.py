"""Rotary position embedding driven by explicit position ids.

Megatron's GPTModel derives RoPE angles from the token's index in the sequence. In a shared-prefix
packed sequence a candidate's positions restart at its prefix length, so the angles must come from
the per-token position ids of the packed layout instead: the attention module applies RoPE itself.
Non-interleaved (rotate-half) convention, the one of Llama, InternLM2 and megatron's default.

Position scaling of pretrained checkpoints:
- linear: angle = (position / factor) * inv_freq (HF Llama's "linear" rope type).
- dynamic (NTK): HF Llama's "dynamic" type and InternLM2's dynamic rotary embedding raise the base
  to base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2)) only once a sequence holds
  n > max_pos positions; below that they are plain RoPE. Packed inputs here never exceed the
  window (check_rope_window refuses them), so dynamic is the identity wherever it runs.
- llama3 (Llama 3.1/3.2/3.3): each frequency is scaled by its wavelength 2 pi / inv_freq against
  the original context L (`original`) and the two wavelength bounds L / low and L / high: wavelengths
  longer than L / low are divided by `factor`, those shorter than L / high kept, and those between
  blended linearly in L / wavelength, from inv_freq / factor at L / low to inv_freq at L / high.
"""
from __future__ import annotations

import math

import torch

ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3")
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)  # low and high frequency factors, original context: Llama 3.1's


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """The llama3 scaling of the module docstring (high > low)."""
    wavelen = 2 * math.pi / inv_freq
    blend = (original / wavelen - low) / (high - low)  # 0 at L / low, 1 at L / high
    between = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor,
                       torch.where(wavelen < original / high, inv_freq, between))


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype=torch.float32,
                 scaling: str = "none", factor: float = 1.0, llama3: tuple = LLAMA3_DEFAULTS):
    """positions [b, s] -> cos, sin of shape [s, b, 1, dim] (angles computed in fp32); `llama3`:
    (low frequency factor, high frequency factor, original context) of that scaling."""
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling={scaling!r}: expected one of {', '.join(ROPE_SCALINGS)}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    if scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, factor, *llama3)
    pos = positions.t().to(torch.float32)
    if scaling == "linear":
        pos = pos / factor
    angles = pos.unsqueeze(-1) * inv_freq  # [s, b, dim/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [s, b, 1, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def check_rope_window(scaling: str, seq_length: int, max_positions: int) -> None:
    """Dynamic NTK scaling is implemented inside the original window only. A packed sequence of
    seq_length tokens holds positions < seq_length, so seq_length <= max_positions keeps every
    position inside it (a shape check: no device sync)."""
    if scaling == "dynamic" and seq_length > max_positions:
        raise ValueError(
            f"model.rope_scaling=dynamic: a packed sequence of {seq_length} tokens has positions beyond "
            f"model.max_position_embeddings={max_positions}, where dynamic NTK scaling would change the "
            f"RoPE base; this engine implements it only inside that window: use data.seq_length <= "
            f"{max_positions}"
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, dim] rotated by the angles in cos/sin [s, b, 1, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
