"""tests/engine/dist_worker.py with torch AdamW's update kernel recorded, and with
ADAM_KERNEL=foreach (in the environment) chosen as before engine.optimizer_state.use_fused_adam
existed: megatron's torch AdamW as it builds it, whose param groups a checkpoint then carries.
Rank 0 adds `adam_fused` to the worker's JSON: per optimizer step, whether every param group ran
fused, and whether every `step` counter was a float32 tensor of its own on its parameter's device
(what the fused kernel reads) or on the host (the foreach one)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tests.engine import dist_worker  # noqa: E402


def adams(optimizer):
    from engine.optimizer_state import _torch_adams

    return list(_torch_adams(optimizer))


def steps_in_place(inner, fused: bool) -> bool:
    steps = [(p, inner.state[p]["step"]) for g in inner.param_groups for p in g["params"] if p in inner.state]
    return len({id(s) for _, s in steps}) == len(steps) and all(
        s.dtype == torch.float32 and s.device == (p.device if fused else torch.device("cpu")) for p, s in steps)


def main():
    from engine import optimizer_state, trainer

    if os.environ.get("ADAM_KERNEL") == "foreach":
        optimizer_state.use_fused_adam = lambda optimizer: None
    record = []
    step_with_norm = trainer.step_with_norm

    def recorded(optimizer, grad_norm):
        inner = adams(optimizer)
        fused = all(g.get("fused") for opt in inner for g in opt.param_groups)
        updated = step_with_norm(optimizer, grad_norm)
        record.append({"fused": fused, "steps_in_place": all(steps_in_place(opt, fused) for opt in inner)})
        return updated

    trainer.step_with_norm = recorded
    dist_worker.main()
    out = sys.argv[sys.argv.index("--out") + 1]
    if int(os.environ.get("RANK", "0")) == 0:
        result = json.loads(open(out).read())
        result["adam_fused"] = record
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
