"""Layer specs: megatron's GPT layer with the shared-prefix core attention swapped in.

A reward model is a spec swap, not a fork: the linear layers, norms and MLP are megatron's (the
Transformer Engine ones when model.transformer_impl asks for them), only `core_attention` is ours,
and with local FP8 the four linear layers are megatron's with an FP8 matrix product.
"""
from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from engine.model.rope import LLAMA3_DEFAULTS, Yarn
from engine.model.shared_prefix_attention import SharedPrefixAttention


def layer_spec(use_te: bool, rotary_base: float, attention_backend: str, rope_scaling: str = "none",
               rope_scaling_factor: float = 1.0, max_position_embeddings: int = 1 << 62,
               fp8: str = "off", rope_llama3: tuple = LLAMA3_DEFAULTS, rope_yarn: Yarn = Yarn()) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SharedPrefixAttention,
        params={"rotary_base": rotary_base, "backend": attention_backend, "rope_scaling": rope_scaling,
                "rope_scaling_factor": rope_scaling_factor, "max_position_embeddings": max_position_embeddings,
                "rope_llama3": rope_llama3, "rope_yarn": rope_yarn},
    )
    if fp8 != "off" and not use_te:  # TE runs FP8 in its own modules (engine.fp8)
        from engine.model.fp8_linear import with_fp8_linears

        spec = with_fp8_linears(spec, fp8)
    return spec
