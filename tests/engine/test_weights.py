"""The canonical weight form's fused-QKV layout and the model features real checkpoints need
(vocabulary padding for TP, RoPE scaling), checked against formulas written out here."""
from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.model.rope import check_rope_window, rope_cos_sin
from engine.parallelize import padded_vocab_size
from engine.weights import fuse_qkv, split_qkv


def test_fused_qkv_rows_are_grouped_per_key_value_group():
    heads, groups, d, h = 6, 2, 3, 5
    q = torch.arange(heads * d * h, dtype=torch.float32).reshape(heads * d, h)
    k = -torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h) - 1
    v = k - 1000
    fused = fuse_qkv(q, k, v, groups)
    r = heads // groups
    for g in range(groups):  # [q_{g*r} .. q_{g*r+r-1}, k_g, v_g], each head d rows
        block = fused[g * (r + 2) * d:(g + 1) * (r + 2) * d]
        assert torch.equal(block[: r * d], q[g * r * d:(g + 1) * r * d])
        assert torch.equal(block[r * d:(r + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(block[(r + 1) * d:], v[g * d:(g + 1) * d])
    for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], groups)  # 1-D biases follow the same rows
    assert torch.equal(bias, fused[:, 0])


@pytest.mark.parametrize("vocab,multiple,tp,padded", [
    (64, 1, 1, 64), (64, 1, 2, 64), (65, 1, 2, 66),
    (49154, 128, 1, 49280), (49154, 128, 2, 49280), (49154, 128, 8, 49280),
    (49154, 128, 3, 49536),  # lcm(128, 3) = 384
    (92544, 128, 4, 92544),
])
def test_vocabulary_is_padded_to_a_multiple_of_lcm_of_setting_and_tp(vocab, multiple, tp, padded):
    assert padded_vocab_size(ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=multiple), tp) == padded


def test_linear_rope_scaling_divides_positions_by_the_factor():
    pos = torch.tensor([[0, 1, 5, 9]])
    cos, sin = rope_cos_sin(pos, 8, 500.0, scaling="linear", factor=4.0)
    inv_freq = 1.0 / 500.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = (pos.t().float() / 4.0) * inv_freq
    assert torch.allclose(cos[:, 0, 0, :4], angles.cos()) and torch.allclose(sin[:, 0, 0, 4:], angles.sin())


def test_dynamic_rope_is_the_identity_inside_the_window_and_refused_beyond():
    pos = torch.arange(16)[None]
    plain = rope_cos_sin(pos, 8, 1e4)
    dynamic = rope_cos_sin(pos, 8, 1e4, scaling="dynamic", factor=2.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, dynamic))
    check_rope_window("dynamic", 16, 16)
    check_rope_window("linear", 17, 16)
    with pytest.raises(ValueError, match="model.rope_scaling=dynamic.*17 tokens.*max_position_embeddings=16"):
        check_rope_window("dynamic", 17, 16)
    with pytest.raises(ValueError, match="model.rope_scaling='longrope'"):
        rope_cos_sin(pos, 8, 1e4, scaling="longrope")


# (settings, factor): transformers' defaults, no truncation, DeepSeek's mscale pair, a given attention
# factor, betas of their own, a factor below 1 (no attention scaling then)
YARN_CASES = [({}, 4.0), ({"truncate": False}, 4.0), ({"mscale": 0.707, "mscale_all_dim": 1.0}, 40.0),
              ({"attention_factor": 1.3}, 4.0), ({"beta_fast": 8.0, "beta_slow": 2.0}, 8.0), ({}, 0.5)]


@pytest.mark.parametrize("settings,factor", YARN_CASES,
                         ids=["defaults", "untruncated", "mscale", "attention_factor", "betas", "factor_below_1"])
def test_yarn_rope_is_transformers_bit_for_bit(settings, factor):
    """cos and sin with the attention factor in them, against transformers' Llama rotary embedding:
    at head dim 128, base 1e6 and an original context of 4096, frequencies 0-13 are kept, 14-30
    blended and 31-63 divided by the factor, and the positions run to 5x the original context."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from engine.model.rope import Yarn

    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 4096, **settings}
    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=16384,
                                      rope_theta=1e6, rope_scaling=scaling)
    pos = torch.arange(0, 20000, 7)[None]
    want_cos, want_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), pos)
    cos, sin = rope_cos_sin(pos, 128, 1e6, scaling="yarn", factor=factor, yarn=Yarn(original=4096, **settings))
    assert torch.equal(cos[:, 0, 0], want_cos[0]) and torch.equal(sin[:, 0, 0], want_sin[0])


@pytest.mark.parametrize("backend", ["torch", "blocks"])
def test_yarn_attention_factor_scales_the_attention_logits_by_its_square(backend, monkeypatch):
    """At factor 1 yarn's frequencies are plain RoPE's, so an attention factor a only multiplies q
    and k by a: the attention module must give plain RoPE's attention at a^2 times its softmax scale,
    whichever backend attends (all of them, the Triton kernel too, take q and k rotated). Both modules
    see the same layout: their cached cos and sin must be told apart by the yarn settings."""
    import math
    from types import SimpleNamespace

    import numpy as np

    from engine.model import shared_prefix_attention as spa
    from engine.model.rope import Yarn
    from engine.packing import collate
    from tests.engine.kernels.attention_cases import random_group

    monkeypatch.setattr(spa, "DENSE_BELOW", 0)  # the blocks backend on this short pack too
    rng = np.random.default_rng(0)
    layout = collate([[random_group(rng, 7, [3, 5]), random_group(rng, 4, [6, 2])]], 32, pad_id=0).layout
    config = SimpleNamespace(kv_channels=16, context_parallel_size=1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(32, 1, heads, 16, generator=gen) for heads in (4, 2, 2))  # GQA
    outputs = {}
    for a in (1.0, 1.5):  # 1.0 first: its cos and sin are cached when 1.5 asks for its own
        yarn = spa.SharedPrefixAttention(config, 1, backend=backend, rope_scaling="yarn",
                                         rope_yarn=Yarn(original=16, attention_factor=a))
        plain = spa.SharedPrefixAttention(config, 1, backend=backend, softmax_scale=a * a / math.sqrt(16))
        outputs[a] = got, want = yarn(q, k, v, layout), plain(q, k, v, layout)
        assert (got - want).abs().max() < 1e-5 * want.abs().max(), a
    assert (outputs[1.5][1] - outputs[1.0][1]).abs().max() > 1e-2 * outputs[1.0][1].abs().max()  # it matters here
