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
- yarn (YaRN; Qwen2/Qwen2.5/Qwen3 long-context configs), as transformers computes it: frequency i of
  d / 2 is kept where it turns more than beta_fast times within L, divided by `factor` where it turns
  fewer than beta_slow times, and blended linearly in i between (the two ends rounded outwards to
  whole indices unless `truncate` is false). cos and sin are then multiplied by the attention factor
  (so the attention logits by its square): given, or 0.1 ln(factor) + 1, or with mscale and
  mscale_all_dim both set (DeepSeek's form) (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)  # low and high frequency factors, original context: Llama 3.1's


class Yarn(NamedTuple):
    """yarn's settings besides the factor (engine.config.ModelConfig's rope_* fields); the defaults
    are transformers' but for the original context, llama3's (a model's config always names it).
    A tuple: the attention module keys its cached cos/sin by it."""

    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original: int = 8192
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """The llama3 scaling of the module docstring (high > low)."""
    wavelen = 2 * math.pi / inv_freq
    blend = (original / wavelen - low) / (high - low)  # 0 at L / low, 1 at L / high
    between = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor,
                       torch.where(wavelen < original / high, inv_freq, between))


def yarn_inv_freq(powers: torch.Tensor, base: float, factor: float, yarn: Yarn) -> torch.Tensor:
    """The yarn frequencies of the module docstring, from the base's powers (the plain wavelengths
    over 2 pi), computed in transformers' order of operations: bit for bit its values."""
    dim = 2 * powers.numel()

    def index_turning(times: float) -> float:  # the (fractional) frequency index turning `times` times within L
        return dim * math.log(yarn.original / (times * 2 * math.pi)) / (2 * math.log(base))

    low, high = index_turning(yarn.beta_fast), index_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard: a ramp of one step, not a division by zero
    ramp = ((torch.arange(dim // 2, device=powers.device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # the share of the plain frequency
    return 1.0 / (factor * powers) * (1 - kept) + 1.0 / powers * kept


def yarn_attention_factor(factor: float, yarn: Yarn) -> float:
    """The factor cos and sin are multiplied by (module docstring); transformers reads mscale and
    mscale_all_dim only when both are set and the attention factor is not."""
    if yarn.attention_factor is not None:
        return yarn.attention_factor

    def mscale(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if yarn.mscale and yarn.mscale_all_dim:
        return mscale(yarn.mscale) / mscale(yarn.mscale_all_dim)
    return mscale(1.0)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype=torch.float32,
                 scaling: str = "none", factor: float = 1.0, llama3: tuple = LLAMA3_DEFAULTS,
                 yarn: Yarn = Yarn()):
    """positions [b, s] -> cos, sin of shape [s, b, 1, dim] (angles computed in fp32); `llama3`:
    (low frequency factor, high frequency factor, original context) of that scaling, `yarn` that one's."""
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling={scaling!r}: expected one of {', '.join(ROPE_SCALINGS)}")
    powers = base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    inv_freq = 1.0 / powers
    if scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, factor, *llama3)
    if scaling == "yarn":
        inv_freq = yarn_inv_freq(powers, base, factor, yarn)
    pos = positions.t().to(torch.float32)
    if scaling == "linear":
        pos = pos / factor
    angles = pos.unsqueeze(-1) * inv_freq  # [s, b, dim/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [s, b, 1, dim]
    cos, sin = angles.cos(), angles.sin()
    if scaling == "yarn":
        # scaled before the cast, as transformers does: q and k both carry it into every attention
        # backend (the kernels take q and k rotated), so the logits scale by its square
        scale = yarn_attention_factor(factor, yarn)
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


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
