"""Counts, on any device, the operations that would stall the host on a GPU: a device-to-host read
(`.item()`, `bool(t)`, `int(t)`, `float(t)`, `.tolist()`, `.cpu()`), an op whose output shape
depends on values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave`
without `output_size`), and a tensor built from a Python list (`torch.tensor([...])`, a host copy per
call). On a CPU run nothing syncs, but the same calls are made: counting them there guards the GPU
step (tests/engine/test_step_syncs.py).

Not counted: torch.optim's per-parameter `step` counters, which live on the host on a GPU too
(non-capturable, non-fused Adam), and `t[mask] = scalar`, which index_put_ runs as masked_fill_.
Each event is (kind, call site): the first frames outside torch.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SHAPE_FROM_VALUES = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "repeat_interleave"}


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _site() -> str | None:
    frames = traceback.extract_stack()
    if any("/torch/optim/" in f.filename for f in frames):
        return None  # host-resident optimizer step counters
    out = []
    for f in reversed(frames):
        if "/torch/" in f.filename or f.filename == __file__:
            continue
        path = f.filename
        path = path.split("site-packages/")[-1] if "site-packages/" in path else os.path.relpath(path, _ROOT)
        out.append(f"{path}:{f.lineno}")
        if len(out) == 3:
            break
    return " <- ".join(out)


class _Mode(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _SHAPE_FROM_VALUES:
            if not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self.record(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = [i for i in (args[1] if len(args) > 1 else []) if i is not None]
            value = args[2] if len(args) > 2 else None
            accumulate = bool(args[3]) if len(args) > 3 else bool(kwargs.get("accumulate", False))
            masked_fill = (name != "index" and len(indices) == 1 and not accumulate
                           and isinstance(value, torch.Tensor) and value.dim() == 0)
            if any(i.dtype == torch.bool for i in indices) and not masked_fill:
                self.record(f"aten.{name}[bool mask]")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """with count_syncs() as events: ... -> events: list of (kind, call site)."""
    events: list[tuple[str, str]] = []
    inside = [0]  # inside a counted call: its own internals are not counted again

    def record(kind):
        if inside[0]:
            return
        site = _site()
        if site is not None:
            events.append((kind, site))

    saved = {}

    def wrap(owner, name, kind, counts=lambda *a, **k: True):
        real = getattr(owner, name)
        saved[(owner, name)] = real

        def counted(*args, **kwargs):
            if counts(*args, **kwargs):
                record(kind)
            inside[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                inside[0] -= 1

        setattr(owner, name, counted)

    wrap(torch.Tensor, "tolist", "Tensor.tolist")
    wrap(torch.Tensor, "cpu", "Tensor.cpu")
    wrap(torch, "tensor", "torch.tensor(list)", counts=lambda data=None, *a, **k: isinstance(data, (list, tuple)))
    try:
        with _Mode(record):
            yield events
    finally:
        for (owner, name), real in saved.items():
            setattr(owner, name, real)
