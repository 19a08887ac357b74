"""Megatron's distributed-optimizer state around a checkpoint load (megatron-core 0.19 with torch's
AdamW, no Apex or Transformer Engine optimizer): the state must exist before it can be described for
loading, and the per-parameter `step` of torch's AdamW is mishandled by the load (engine/checkpoint.py
calls these three around dist_checkpointing.load). Also where torch's AdamW runs its fused kernel
(use_fused_adam: engine/optim.py at build, after_load again after a load)."""
from __future__ import annotations

import collections
import contextlib

import torch


def materialise(optimizer) -> None:
    """The distributed optimizer can only describe its state for loading once the state exists
    (before the first step it is empty); dummy values are created and then overwritten by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def torch_adam_step_tolerated():
    """Without Apex/TE, megatron's distributed optimizer wraps torch's AdamW, whose per-parameter
    state holds a `step` tensor, restored from the param groups before the parameter state is set
    by DistributedOptimizer._set_main_param_and_optimizer_states (0.19). That method then copies a
    `step` entry from the parameter state: the fully_reshardable state never carries one (KeyError),
    and the dp_reshardable one carries the loading optimizer's own placeholder (a non-persistent
    entry), which overwrote the restored step and so the bias correction of the next update. The
    step is left to the param groups here: absent, and dropped where present."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def tolerant(self, model_param, tensors):
        kept = {k: v for k, v in tensors.items() if k != "step"}
        return original(self, model_param, collections.defaultdict(lambda: None, kept))

    DistributedOptimizer._set_main_param_and_optimizer_states = tolerant
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _torch_adams(optimizer):
    """The torch Adam/AdamW instances megatron wraps (none where it uses TE's or Apex's FusedAdam)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW is an Adam
            yield inner


def _fused_kernel_runs(inner) -> bool:
    """Whether torch's fused Adam kernel takes every parameter: floating point (not complex) on a
    device torch has the kernel for (the CPU and CUDA among them), and no differentiable update."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(not g.get("differentiable") and all(
        p.device.type in devices and torch.is_floating_point(p) and not torch.is_complex(p) for p in g["params"])
        for g in inner.param_groups)


def use_fused_adam(optimizer) -> None:
    """Runs torch's AdamW update on its fused kernel (one call per param group) instead of
    the foreach one megatron's fallback gets: the same update, within floating-point reassociation
    (tests/engine/test_optim_fused.py). Per parameter group, as torch reads it, so a checkpoint's
    param groups (which the load puts in place of the optimizer's) are set again by after_load."""
    for inner in _torch_adams(optimizer):
        if _fused_kernel_runs(inner):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def after_load(optimizer) -> None:
    """After a load. megatron restores torch AdamW's `step` as ONE tensor shared by every
    parameter's state; AdamW increments each parameter's step in place, which would advance the
    shared one once per parameter per update and corrupt the bias correction. Each parameter gets
    its own copy, where the update kernel reads it: the fused kernel a float32 tensor on the
    parameter's device, the foreach one a host tensor. The load also put the checkpoint's param
    groups in place, whose `fused` is that of the code that saved them (unset before the fused
    kernel was used): the kernel is chosen again first."""
    use_fused_adam(optimizer)
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                st = inner.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu",
                                               copy=True)
