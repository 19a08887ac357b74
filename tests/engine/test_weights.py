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
    with pytest.raises(ValueError, match="model.rope_scaling='yarn'"):
        rope_cos_sin(pos, 8, 1e4, scaling="yarn")
