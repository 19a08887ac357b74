"""Reward readout: final RMSNorm and value head applied only at the reward positions.

Other reward-model trainers apply the value head to every token and then gather; here the rows
at the candidates' last tokens are gathered first, so the norm and the head touch n_candidates
rows instead of b*s. `reward_index` holds flat indices bi*s + t into the [b, s] token grid while
megatron's hidden states are [s, b, h].
"""
from __future__ import annotations

import torch


def torch_reward_readout(hidden, reward_index, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """hidden [s, b, h], reward_index [n] (bi*s + t) -> rewards [n] in fp32."""
    s, b, h = hidden.shape
    rows = hidden[reward_index % s, reward_index // s].float()  # [n, h]
    rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return rows @ head_weight.float().reshape(h)
