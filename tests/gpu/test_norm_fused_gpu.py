"""The engine's RMSNorms in bf16 on a CUDA GPU, where torch.rms_norm has a fused kernel (on the CPU it has none:
tests/engine/model/test_reward_model.py checks there that each norm's weight has its input's dtype, the kernel's
condition). Every layer norm of a bf16 model dispatches to aten._fused_rms_norm, and one norm keeps for the
backward only what the fused kernel needs beside its input, the fp32 rstd [tokens, 1]; an fp32 weight (megatron's
WrappedTorchNorm, before 343ab60) sends torch down its decomposition, which keeps fp32 copies of the input."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

TOKENS, HIDDEN = 1024, 256


class _Ops(TorchDispatchMode):
    """Names of the aten ops a call dispatches to (after composite ops are decomposed)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _saved_bytes(module, x) -> int:
    """Bytes autograd keeps for module(x)'s backward, the input and the parameters left out."""
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(storages.values())


def test_bf16_layer_norms_take_the_fused_kernel(runtime, report):
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.model.reward_model import LayerRMSNorm
    from engine.packing import collate
    from engine.parallelize import build_chunks
    from tests.engine.model.test_reward_model import random_groups

    if not hasattr(torch.ops.aten, "_fused_rms_norm"):
        pytest.skip(f"torch {torch.__version__} has no fused rms_norm kernel")
    m = ModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=512, vocab_size=64)
    chunks, cfg = build_chunks(m, ParallelConfig(), TrainConfig(precision="bf16", attention_backend="torch"), runtime)
    batch = collate([random_groups(np.random.default_rng(0), 2)], 64, pad_id=0).to(runtime.device)
    with _Ops() as rec:
        chunks[0](batch.tokens, batch.layout, batch.reward_index).sum().backward()
    # two per layer; the final norm is the readout's own fp32 arithmetic (no LM head here)
    assert rec.ops.count("aten._fused_rms_norm.default") == 2 * m.num_layers, sorted(set(rec.ops))

    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    engine = _saved_bytes(LayerRMSNorm(cfg, HIDDEN).cuda(), x)
    fp32_weight = _saved_bytes(torch.nn.RMSNorm(HIDDEN).cuda(), x)
    assert engine <= TOKENS * 4, engine  # rstd: one fp32 per token
    assert fp32_weight >= 2 * TOKENS * HIDDEN * 4, fp32_weight
    report(f"rms_norm on cuda, bf16 [{TOKENS}, {HIDDEN}]: keeps {engine} B beside its input with a bf16 weight, "
           f"{fp32_weight} B with an fp32 one")
