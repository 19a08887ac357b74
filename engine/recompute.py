"""Activation recomputation (`train.recompute`) as megatron TransformerConfig fields.

selective: megatron checkpoints the core attention only (recompute_modules=["core_attn"]): our
SharedPrefixAttention runs again in the backward from the saved q/k/v, so its O(L^2) mask-sized
intermediates (softmax probabilities in the torch reference) are not kept. full: whole layers are
recomputed from their inputs, in units of `train.recompute_num_layers` layers (uniform method), so
a stage keeps one input per unit. Both change memory and time, never the results (parity-tested).
"""
from __future__ import annotations

from engine.config import TrainConfig


def recompute_settings(train: TrainConfig) -> dict:
    if train.recompute == "none":
        return {}
    if train.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": train.recompute_num_layers}
