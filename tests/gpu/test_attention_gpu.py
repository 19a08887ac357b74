"""The Triton shared-prefix attention on a CUDA GPU, at POLAR-like shapes, against float64.

The interpreter tests (tests/engine/kernels/test_shared_prefix_attention.py) check the logic at small
shapes with fp32 dots; this file checks what only the GPU shows: tensor-core rounding in fp16/bf16,
the real 128 x 64 / 64 x 64 tiles, fp32 atomics, and torch.compile. Expected relative errors (max
|err| / max |ref|) in fp16/bf16: between 1e-3 and 1e-2. NaN never passes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kernels import shared_prefix_attention as spa
from engine.kernels.attention_schedule import tile_schedule
from engine.packing import collate
from tests.engine.kernels.attention_cases import (
    NAMES, poison, random_group, reference, rel_err, run, tile_aligned_case,
)







def _layout(seed, b=2, seq=2048, k_max=8):
    """Rows of ragged groups (prefix 200-700 tokens, candidates 1-250, K 2..k_max), padding at the end."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        row, used = [], 0
        while True:
            g = random_group(rng, int(rng.integers(200, 700)), [int(rng.integers(1, 250))
                                                           for _ in range(int(rng.integers(2, k_max + 1)))],
                             vocab=1000)
            if used + len(g) > seq:
                break
            row.append(g)
            used += len(g)
        rows.append(row)
    return collate(rows, seq, pad_id=0).layout.cuda()


def _inputs(seed, layout, hq, hkv, d):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s, b = layout.shape[-1], layout.shape[0]
    mk = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)  # noqa: E731
    return mk(s, b, hq, d), mk(s, b, hkv, d), mk(s, b, hkv, d), mk(s, b, hq * d)






@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (16, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype, hq, hkv, d, deterministic):
    layout = _layout(hq + d, b=2, seq=2048)
    q, k, v, grad = _inputs(hq * d, layout, hq, hkv, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    low = run(reference, q, k, v, grad, layout, dtype)  # torch's own error in this dtype
    got = run(spa.shared_prefix_attention, q, k, v, grad, layout, dtype, deterministic=deterministic)
    for name, g, t, r in zip(NAMES, got, low, ref):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        e_k, e_t = rel_err(g, r), rel_err(t, r)
        # dq: delta = do . o uses the rounded output, as FlashAttention does (see the CPU test)
        assert e_k <= max((3 if name == "dq" else 2) * e_t, 2e-3) and e_k < 2e-2, (name, e_k, e_t)


@pytest.mark.parametrize("d", [128, 256])
def test_fp32_is_exact(d):
    """d = 256 in fp32 takes smaller tiles (the 128x64 ones asked 295,680 B of shared memory, over the
    H100's 232,448 per block)."""
    layout = _layout(1, b=2, seq=1024)
    q, k, v, grad = _inputs(2, layout, 8, 2, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 1e-4, name


def test_deterministic_backward_is_bit_identical_and_atomics_close():
    layout = _layout(3, b=2, seq=4096)
    q, k, v, grad = _inputs(4, layout, 16, 4, 128)
    runs = [run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.bfloat16, deterministic=True)
            for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name
    fast = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.bfloat16, deterministic=False)
    for name, a, b in zip(NAMES, runs[0], fast):
        assert rel_err(b, a.double()) < 1e-2, name


def test_never_visited_tiles_can_hold_nan():
    """Pieces aligned to the GPU tiles (128-token query tiles, 64-token key tiles)."""
    layout, sibling, other, rows = tile_aligned_case(np.random.default_rng(5), 128)
    layout = layout.cuda()
    q, k, v, grad = _inputs(6, layout, 8, 2, 128)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    poisoned = poison(q, k, v, sibling, other)
    for deterministic in (False, True):
        got = run(spa.shared_prefix_attention, *poisoned, grad, layout, torch.bfloat16, deterministic=deterministic)
        for name, g, r in zip(NAMES, got, ref):
            idx = rows[name].cuda()
            assert rel_err(g[idx], r[idx]) < 2e-2, name


def test_schedule_skips_on_real_tiles():
    layout = _layout(7, b=1, seq=8192, k_max=8)
    blocks = spa._blocks(128, torch.device("cuda"))
    q_visits, _ = tile_schedule(layout, blocks.fwd_m, blocks.fwd_n)
    n_q, n_k = q_visits.shape[1:]
    causal = sum(min(n_k, -(-(i + 1) * blocks.fwd_m // blocks.fwd_n)) for i in range(n_q))
    assert q_visits.sum().item() < 0.5 * causal  # most causal tiles lie between groups or siblings


def test_torch_compile_fullgraph():
    layout = _layout(8, b=1, seq=1024)
    q, k, v, grad = _inputs(9, layout, 8, 2, 128)
    fn = torch.compile(spa.shared_prefix_attention, fullgraph=True)
    got = run(fn, q, k, v, grad, layout, torch.bfloat16)
    eager = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.bfloat16)
    for name, a, b in zip(NAMES, got, eager):
        assert torch.isfinite(a).all() and rel_err(a, b.double()) < 1e-2, name


def test_reward_model_triton_backend_matches_torch(runtime):
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    m = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=512, vocab_size=1000)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), runtime)
    layout_rows = _layout(10, b=2, seq=2048)
    rng = np.random.default_rng(10)
    tokens = torch.from_numpy(rng.integers(1, 1000, size=tuple(layout_rows[:, 0].shape))).cuda()
    reward_index = torch.nonzero(layout_rows[:, 2].flatten() > 0).flatten()[::37]
    results = {}
    for backend in ("torch", "blocks", "triton"):
        torch.manual_seed(0)
        model = RewardModel(cfg, layer_spec(False, 10000.0, backend), 1000, 2048, True, True).cuda()
        torch.nn.init.normal_(model.value_head.weight, std=0.5)
        rewards = model(tokens, layout_rows, reward_index)
        rewards.sum().backward()
        results[backend] = (rewards.detach(), {n: p.grad for n, p in model.named_parameters()})
    for other in ("blocks", "triton"):  # the per-group SDPA path (the CPU default) runs on the GPU too
        torch.testing.assert_close(results[other][0], results["torch"][0], rtol=1e-4, atol=1e-4, msg=other)
        for name, g in results["torch"][1].items():
            torch.testing.assert_close(results[other][1][name], g, rtol=1e-3, atol=1e-4, msg=f"{other}: {name}")
