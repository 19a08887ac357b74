"""The engine's MLP runs megatron's SwiGLU autograd Function (bias_activation_fusion): it keeps only the
fc1 output for the backward and recomputes silu there, where megatron's unfused glu also keeps silu of
the first half and a copy of the second half, two more [tokens, ffn] tensors per layer. Same values as
the unfused path: in fp32 the forward is the same operations (silu(a) * b) and the backward differs only
in how the gradient's products are rounded; in bf16 every product of the backward is rounded to 8 bits
of mantissa in a different order. Saved bytes are counted with saved-tensor hooks, not timed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.swiglu_memory import build_mlp, saved_activation_bytes, with_fusion
from engine.config import ModelConfig, ParallelConfig, TrainConfig

TOKENS, BATCH, HIDDEN, FFN = 16, 2, 64, 96


def engine_config(runtime, precision="fp32"):
    from engine.parallelize import transformer_config

    m = ModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=FFN, vocab_size=50)
    return m, transformer_config(m, ParallelConfig(), TrainConfig(precision=precision), runtime)


def unfused(cfg):
    """The same config with megatron's unfused glu (what the engine ran before)."""
    return with_fusion(cfg, False)


def saved_bytes(mlp, x) -> int:
    return saved_activation_bytes(mlp, x, exclude=list(mlp.parameters()))


def mlp_input(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, BATCH, HIDDEN, generator=g).to(dtype).requires_grad_()


def test_engine_config_runs_megatron_swiglu_function(runtime):
    _, cfg = engine_config(runtime)
    assert cfg.bias_activation_fusion and cfg.gated_linear_unit and not cfg.add_bias_linear


def test_engine_mlp_keeps_only_the_fc1_output_for_swiglu(runtime):
    """fp32: the fc1 input, the fc1 output [2 ffn] and the fc2 input [ffn], nothing else; the unfused
    glu keeps two more [tokens, ffn] tensors (silu(a), b + glu_linear_offset)."""
    _, cfg = engine_config(runtime)
    x = mlp_input(torch.float32)
    per_token = 4 * TOKENS * BATCH
    expected = per_token * (HIDDEN + 2 * FFN + FFN)
    assert saved_bytes(build_mlp(cfg), x) == expected
    assert saved_bytes(build_mlp(unfused(cfg)), x) == expected + per_token * 2 * FFN


def run_mlp(cfg, x, grad_out):
    mlp = build_mlp(cfg).to(x.device)
    x = x.detach().clone().requires_grad_()
    out, bias = mlp(x)
    assert bias is None
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


# fp32: the forward is the same eager operations, so equal; the backward's products are rounded in a
# different order: measured 1.9e-6 on fc1 gradients of size 27 (1 ulp there), 3.6e-7 on the input's.
# bf16: each product rounds to 2^-8 relative: measured 0.094 on fc1 gradients of size 27 (one bf16 ulp
# is 0.125 there). The atol scales with the largest reference value, since entries near zero come from
# cancelling sums whose relative error is unbounded.
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}


def assert_matches(got, ref, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item(), msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mlp_matches_unfused(runtime, dtype):
    _, cfg = engine_config(runtime, "fp32" if dtype == torch.float32 else "bf16")
    x = mlp_input(dtype)
    grad_out = torch.randn(TOKENS, BATCH, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, dx, grads = run_mlp(cfg, x, grad_out)
    ref_out, ref_dx, ref_grads = run_mlp(unfused(cfg), x, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert_matches(dx, ref_dx, dtype, "grad of the input")
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert_matches(g, ref_grads[name], dtype, f"grad of {name}")


def test_tiny_reward_model_matches_unfused(runtime):
    """Two layers, packed groups, rewards and the next-token loss: every parameter gradient in fp32."""
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.packing import Group, collate

    m, cfg = engine_config(runtime)

    def build(config):
        torch.manual_seed(0)
        model = RewardModel(config, layer_spec(False, 10000.0, "torch"), m.vocab_size, 512, True, True)
        torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a zero head zeroes the backbone's gradients
        return model

    rng = np.random.default_rng(3)
    groups = [Group(prefix=rng.integers(1, 50, size=9, dtype=np.int32),
                    candidates=[rng.integers(1, 50, size=n, dtype=np.int32) for n in (5, 7, 4)],
                    labels=np.array([1, 0, 0], dtype=np.int8)) for _ in range(2)]
    batch = collate([groups], 50, pad_id=0)
    results = []
    for model in (build(cfg), build(unfused(cfg))):
        out = model(batch.tokens, batch.layout, batch.reward_index)
        (out * torch.linspace(-1, 1, out.numel())).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, f"no gradient reached {name}"
        assert_matches(g, ref_grads[name], torch.float32, f"grad of {name}")
