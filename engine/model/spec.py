"""Layer specs: megatron's GPT layer with the shared-prefix core attention swapped in.

A reward model is a spec swap, not a fork: the linear layers, norms and MLP are megatron's (the
Transformer Engine ones where TE imports, giving FP8 on Hopper), only `core_attention` is ours.
"""
from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from engine.model.shared_prefix_attention import SharedPrefixAttention


def transformer_engine_available() -> bool:
    """TE is optional and GPU-only; on a CPU machine even importing it fails (no cuDNN)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # OSError for missing shared objects, not only ImportError
        return False
    return True


def layer_spec(use_te: bool, rotary_base: float, attention_backend: str, rope_scaling: str = "none",
               rope_scaling_factor: float = 1.0, max_position_embeddings: int = 1 << 62) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SharedPrefixAttention,
        params={"rotary_base": rotary_base, "backend": attention_backend, "rope_scaling": rope_scaling,
                "rope_scaling_factor": rope_scaling_factor, "max_position_embeddings": max_position_embeddings},
    )
    return spec
