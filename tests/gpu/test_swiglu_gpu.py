"""The engine's MLP on a CUDA GPU, where megatron's SwiGLU helpers are torch.compile'd (on the CPU they
run eagerly: tests/engine/model/test_swiglu.py): bf16 values and gradients as the unfused glu's, and two
[tokens, ffn] tensors less held for the backward, in saved-tensor bytes and in what the allocator holds.
Inductor computes the fused element-wise code in fp32 and rounds once, where eager bf16 rounds after
silu and after the product, so the forward may differ too, by a bf16 ulp: the bf16 tolerance of the
CPU test, scaled to the largest value."""
import torch

from benchmarks.swiglu_memory import build_mlp, saved_activation_bytes, with_fusion
from tests.engine.model.test_swiglu import assert_matches, engine_config, run_mlp

TOKENS, FFN = 1024, 1408  # each [tokens, ffn] bf16 tensor a multiple of the allocator's 512-byte blocks


def test_compiled_swiglu_matches_unfused_and_holds_less(runtime, report):
    from torch._dynamo.utils import counters

    _, cfg = engine_config(runtime, "bf16")
    cfg.ffn_hidden_size = FFN
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(TOKENS, 1, cfg.hidden_size, device="cuda", generator=g).bfloat16()
    grad_out = torch.randn(TOKENS, 1, cfg.hidden_size, device="cuda", generator=g).bfloat16()
    fused, ref = run_mlp(cfg, x, grad_out), run_mlp(with_fusion(cfg, False), x, grad_out)
    assert counters["stats"]["unique_graphs"] > 0  # the helpers were compiled, not run eagerly
    assert_matches(fused[0], ref[0], torch.bfloat16, "output")
    assert_matches(fused[1], ref[1], torch.bfloat16, "grad of the input")
    for name, grad in fused[2].items():
        assert_matches(grad, ref[2][name], torch.bfloat16, f"grad of {name}")

    held = {}
    for on in (False, True):
        mlp = build_mlp(with_fusion(cfg, on)).cuda()
        x.requires_grad_()
        saved = saved_activation_bytes(mlp, x, exclude=list(mlp.parameters()))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = mlp(x)[0]  # the graph stays alive while `out` does
        torch.cuda.synchronize()
        held[on] = (saved, torch.cuda.memory_allocated() - before)
        del out
    two = 2 * TOKENS * FFN * 2
    assert held[False][0] - held[True][0] == two, held
    assert held[False][1] - held[True][1] >= two, held
    report(f"swiglu on cuda: forward holds {held[False][1] / 2**20:.1f} MiB unfused, "
           f"{held[True][1] / 2**20:.1f} MiB fused ({TOKENS} tokens, ffn {FFN}, bf16)")
