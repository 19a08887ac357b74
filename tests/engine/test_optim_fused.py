"""The optimizer step on torch's fused AdamW kernel and foreach clipping (engine.optim,
engine.optimizer_state) against what megatron-core's fallback without Transformer Engine or Apex runs:
the same update within floating-point reassociation, the same clipped gradients bit for bit."""
from __future__ import annotations

import pytest
import torch

from engine import optimizer_state
from engine.optim import _foreach_scale
from tests.engine.test_trainer import make_trainer

SIZES = (3000, 17, 64 * 128, 1, 4096)


class Megatron:
    """What the functions of engine.optimizer_state read of megatron's optimizer: the torch one inside."""

    def __init__(self, inner):
        self.optimizer = inner


def adamw_run(fused: bool, steps: int = 5):
    """The parameters after `steps` AdamW updates (megatron's hyper-parameters of this project's
    recipes) with gradients over five orders of magnitude, from fixed values."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in SIZES]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if fused:
        optimizer_state.use_fused_adam(Megatron(opt))
    for s in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (s - 3)
        opt.step()
    return [p.detach() for p in params], opt


def test_the_fused_adamw_update_is_the_foreach_one_within_reassociation():
    """Five updates of lr 1e-2 (each moves a parameter by about 1e-2): every parameter within 5e-7 +
    2e-6 relative of the foreach result (a few float32 ulps of values around 1)."""
    foreach, opt_a = adamw_run(False)
    fused, opt_b = adamw_run(True)
    assert not any(g["fused"] for g in opt_a.param_groups) and all(g["fused"] for g in opt_b.param_groups)
    for a, b in zip(foreach, fused):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=5e-7)


def test_after_load_picks_the_fused_kernel_and_gives_each_parameter_its_step():
    """After a load: megatron's one shared host step becomes a float32 step per parameter on the
    parameter's device, and the param groups the load put in place (a foreach checkpoint's: fused
    unset) are fused again."""
    _, opt = adamw_run(False, steps=2)
    shared = torch.tensor(2.0)
    for st in opt.state.values():
        st["step"] = shared
    optimizer_state.after_load(Megatron(opt))
    assert all(g["fused"] and g["foreach"] is False for g in opt.param_groups)
    steps = [opt.state[p]["step"] for g in opt.param_groups for p in g["params"]]
    assert len({id(s) for s in steps}) == len(steps) and shared.item() == 2.0
    assert all(s.dtype == torch.float32 and s.item() == 2.0 for s in steps)
    assert all(opt.state[p]["step"].device == p.device for p in opt.param_groups[0]["params"])
    opt.step()  # the fused kernel takes them
    assert all(s.item() == 3.0 for s in steps) and shared.item() == 2.0


@pytest.mark.parametrize("overrides", [[], ["parallel.distributed_optimizer=false"], ["train.precision=bf16"]],
                         ids=["distributed", "not_distributed", "bf16"])
def test_megatrons_optimizer_updates_on_the_fused_kernel(runtime, tmp_path, overrides):
    """build_optimizer's AdamW (megatron's distributed optimizer or not, fp32 or bf16 with fp32 main
    parameters) runs torch's fused AdamW kernel, once per param group and step, with no foreach update
    left."""
    from torch.utils._python_dispatch import TorchDispatchMode

    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", *overrides)
    ran = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(func.__name__)
            return func(*args, **(kwargs or {}))

    trainer.train_step()
    with Ops():
        trainer.train_step()
    inner = list(optimizer_state._torch_adams(trainer.optimizer))
    assert inner and all(g["fused"] and g["foreach"] is False for opt in inner for g in opt.param_groups)
    groups = sum(1 for opt in inner for g in opt.param_groups if g["params"])  # one kernel call each
    assert ran.count("_fused_adamw_.default") == groups, sorted(set(ran))
    assert "_foreach_lerp_.Scalar" not in ran and "_foreach_addcdiv_.ScalarList" not in ran


def test_foreach_clip_scale_is_megatrons_local_scale_bit_for_bit():
    """In place (clipping: source and destination the same gradients) and from one list into another
    of another dtype (a copy with a factor), for the factors clipping makes."""
    from megatron.core.utils import local_multi_tensor_scale

    g = torch.Generator().manual_seed(3)
    flag = torch.zeros(1, dtype=torch.int)
    for scale in (0.5, 1 - 1e-7, 3.3e-4, 1.0):
        grads = [torch.randn(n, generator=g) * 10.0 ** float(torch.randn(1, generator=g) * 3) for n in SIZES]
        ours, theirs = [t.clone() for t in grads], [t.clone() for t in grads]
        _foreach_scale(0, flag, [ours, ours], scale)
        local_multi_tensor_scale(0, flag, [theirs, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), scale
        into_ours = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
        into_theirs = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
        _foreach_scale(0, flag, [grads, into_ours], scale)
        local_multi_tensor_scale(0, flag, [grads, into_theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(into_ours, into_theirs)), scale


def test_megatrons_clipping_runs_the_foreach_scale_with_the_same_result(runtime, tmp_path, monkeypatch):
    """clip_grads.clip_grad_by_total_norm_fp32 (what engine.optim.step_with_norm calls) after
    build_optimizer: the same clipped main gradients as with megatron's local scale."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false")
    assert clip_grads.multi_tensor_scale_impl is _foreach_scale
    opt = trainer.optimizer.chained_optimizers[0]
    params = opt.get_parameters()
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.37 + i)
    before = [p.grad.clone() for p in params]

    def clipped():
        for p, b in zip(params, before):
            p.grad.copy_(b)
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=123.4)
        return [p.grad.clone() for p in params]

    ours = clipped()
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    theirs = clipped()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(ours[0], before[0])
