"""Megatron's distributed-optimizer state around a checkpoint load (megatron-core 0.19 with torch's
AdamW, no Apex or Transformer Engine optimizer): the state must exist before it can be described for
loading, and the per-parameter `step` of torch's AdamW is mishandled by the load (engine/checkpoint.py
calls these three around dist_checkpointing.load)."""
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


def unshare_steps(optimizer) -> None:
    """megatron restores torch AdamW's `step` as ONE tensor shared by every parameter's state;
    AdamW increments each parameter's step in place, which would advance the shared one once per
    parameter per update and corrupt the bias correction. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
