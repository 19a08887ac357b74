"""The shared-prefix exactness test of tests/engine/model on CUDA, in fp32 and bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.packing import collate
from tests.engine.model.test_reward_model import build_model, random_groups


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_packed_equals_unpacked_on_cuda(runtime, dtype, tol):
    rng = np.random.default_rng(0)
    model = build_model(runtime, 0).cuda().to(dtype)
    groups = random_groups(rng, 6)
    seq_len = max(sum(len(g) for g in groups[:3]), sum(len(g) for g in groups[3:])) + 5
    batch = collate([groups[:3], groups[3:]], seq_len, pad_id=0).to("cuda")
    packed = model(batch.tokens, batch.layout, batch.reward_index)
    singles = []
    for g in groups:
        for c in g.candidates:
            ids = np.concatenate([g.prefix, c])
            n = len(ids)
            layout = torch.zeros(1, 3, n, dtype=torch.int32, device="cuda")
            layout[0, 0] = torch.arange(n, device="cuda")
            singles.append(model(torch.from_numpy(ids.astype(np.int64))[None].cuda(), layout,
                                 torch.tensor([n - 1], device="cuda")))
    single = torch.cat(singles)
    assert torch.isfinite(packed).all()
    scale = single.abs().max().clamp_min(1e-3)
    assert ((packed - single).abs().max() / scale).item() < tol
