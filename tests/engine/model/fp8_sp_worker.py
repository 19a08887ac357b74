"""Column-parallel FP8 linears under sequence parallelism, run by torchrun (2 ranks, TP2 + SP).

For each recipe (off = megatron's own bf16 ColumnParallelLinear, tensorwise, rowwise) the engine builds
its model in bf16 and this worker takes the two column-parallel linears of its first layer (linear_qkv,
linear_fc1). Per linear, one forward and backward of a local input shard [s / tp, b, h]:
- the bytes autograd keeps for the backward (distinct storages, counted with saved-tensor hooks; the
  parameters and the weight cache's FP8 copies of them left out: those are not activation memory);
- with FP8, the same for OLD_COLUMN, the composition the engine ran before the FP8 all-gather
  (megatron's bf16 sequence-parallel all-gather, then the FP8 product of the whole input), and
  whether the layer's output, input gradient and weight gradient equal OLD_COLUMN's bit for bit,
  uncached and within weight_cache() (two micro-batches, the second served from the cache).
Each rank writes {recipe: {linear: row}} to OUT.rank<r>.json.

With --layers instead: the bytes one transformer layer keeps for its backward (the backbone's forward
with 2 layers less that with 1, each within weight_cache(), parameters and weight copies left out),
per recipe, with and without sequence parallelism: {"sp" | "no_sp": {recipe: bytes}}; --recompute sets
train.recompute, a comma-separated list of them gives {recompute: that dict} (tests/polar/
test_plan_fp8_recompute.py, where polar plan prices the same layer). The attention backend is auto (blocks on CPU),
which takes torch's dense path at SEQ tokens (engine/model/shared_prefix_attention.py, DENSE_BELOW).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)

TP, SEQ, BATCH = 2, 64, 2
MODEL = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             vocab_size=64)


def launch(out, *args: str) -> list[dict]:
    """Runs this worker under torchrun (TP ranks, gloo) from a test: each rank's result, in rank order."""
    import subprocess
    from pathlib import Path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={TP}", __file__,
           "--out", str(out), *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(TP)]


def old_column(linear, x, recipe):
    """The engine's column-parallel FP8 forward as it was: the input gathered in the training dtype by
    megatron's mapping (its backward reduce-scatters dx), then the FP8 product of all of it."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from engine.model import fp8_linear as fl

    tp = linear.tp_group
    whole = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp)
    return fl.fp8_linear(whole, linear.weight, linear.bias, recipe, x_group=None, w_group=tp, dy_group=tp)


def saved_bytes(fn, exclude_params):
    """(fn()'s result, {storage: (bytes, shape, dtype)}) of what autograd keeps for fn's backward, less
    the parameters' storages and the weight cache's copies."""
    import torch

    from engine.model import fp8_linear as fl

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), list(t.shape), str(t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {p.untyped_storage().data_ptr() for p in exclude_params}
    for _, _, (data, scale) in (fl._weight_cache or {}).values():
        skip |= {data.untyped_storage().data_ptr(), scale.untyped_storage().data_ptr()}
    return out, {k: v for k, v in seen.items() if k not in skip}


def run_linear(linear, forward, xs, gs):
    """forward(linear, x) over the micro-batches (x, g): [(y, dx)], dW (summed over them)."""
    outs = []
    linear.weight.grad = None
    for x, g in zip(xs, gs):
        x = x.detach().clone().requires_grad_()
        y = forward(linear, x)
        y.backward(g)
        outs.append((y.detach(), x.grad))
    return outs, linear.weight.grad.clone()


def backward_events(linear, forward, x, g) -> list[str]:
    """The collectives, their waits and the FP8 products of one backward, in the order the backward issues
    them (uncached): torch.distributed's functions and torch._scaled_mm wrapped to note each call and then
    run it, a returned work's wait() likewise."""
    import torch
    import torch.distributed as dist

    events, real = [], {}

    def noting(name, fn):
        def call(*args, async_op=False, **kwargs):
            events.append(f"{name} async" if async_op else name)
            work = fn(*args, async_op=async_op, **kwargs)
            if work is None:
                return None
            wait = work.wait
            work_wait = lambda *a, **k: (events.append(f"wait {name}"), wait(*a, **k))[1]  # noqa: E731
            return _Noted(work, work_wait)
        return call

    x = x.detach().clone().requires_grad_()
    y = forward(linear, x)
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real[name] = getattr(dist, name)
        setattr(dist, name, noting(name, real[name]))
    real["_scaled_mm"] = torch._scaled_mm
    torch._scaled_mm = lambda *a, **k: (events.append("product"), real["_scaled_mm"](*a, **k))[1]
    try:
        y.backward(g)
    finally:
        torch._scaled_mm = real.pop("_scaled_mm")
        for name, fn in real.items():
            setattr(dist, name, fn)
    return events


class _Noted:
    """A collective's work whose wait() is noted (backward_events)."""

    def __init__(self, work, wait):
        self._work, self.wait = work, wait

    def __getattr__(self, name):
        return getattr(self._work, name)


def kept(linear, forward, x) -> dict:
    """What one forward(linear, x) keeps for its backward, within weight_cache() (so that an FP8
    weight copy is told by the cache, not counted) and less the parameters."""
    from engine.model import fp8_linear as fl

    with fl.weight_cache():
        x = x.detach().clone().requires_grad_()
        _, storages = saved_bytes(lambda: forward(linear, x), list(linear.parameters()))
    return {"saved": sum(v[0] for v in storages.values()), "tensors": list(storages.values())}


def layer_bytes(rt, par, recipe: str, recompute: str = "none") -> int:
    """What one layer of the engine's bf16 model keeps for its backward over a [BATCH, SEQ] micro-batch."""
    import torch

    from engine.config import ModelConfig, TrainConfig
    from engine.model import fp8_linear as fl
    from engine.packing import POSITION
    from engine.parallelize import build_chunks

    total = {}
    for layers in (1, 2):
        model = ModelConfig(**dict(MODEL, num_layers=layers))
        chunk = build_chunks(model, par, TrainConfig(fp8=recipe, precision="bf16", recompute=recompute),
                             rt)[0][0]
        tokens = torch.randint(1, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
        layout = torch.zeros(BATCH, 3, SEQ, dtype=torch.int32)  # one sequence each, no padding
        layout[:, POSITION] = torch.arange(SEQ, dtype=torch.int32)
        with fl.weight_cache():
            _, storages = saved_bytes(lambda: chunk.backbone(input_ids=tokens, position_ids=None,
                                                             attention_mask=layout), list(chunk.parameters()))
        total[layers] = sum(v[0] for v in storages.values())
    return total[2] - total[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", action="store_true", help="one layer's saved bytes instead (module docstring)")
    ap.add_argument("--recompute", default="none", help="with --layers: train.recompute, or a list: a,b")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.model import fp8_linear as fl
    from engine.parallelize import build_chunks
    from engine.runtime import init_runtime, shutdown_runtime

    par = ParallelConfig(tp=TP, sequence_parallel=True)
    rt = init_runtime(par, seed=1234)
    tp = rt.groups.tp.size()
    result = {}
    try:
        if args.layers:
            modes = args.recompute.split(",")
            for recompute in modes:
                row = result.setdefault(recompute, {}) if len(modes) > 1 else result
                for name, sp in (("sp", True), ("no_sp", False)):
                    layout = ParallelConfig(tp=TP, sequence_parallel=sp)
                    row[name] = {recipe: layer_bytes(rt, layout, recipe, recompute)
                                 for recipe in ("off", "tensorwise", "rowwise")}
        for recipe in () if args.layers else ("off", "tensorwise", "rowwise"):
            chunks, _ = build_chunks(ModelConfig(**MODEL), par, TrainConfig(fp8=recipe, precision="bf16"), rt)
            modules = dict(chunks[0].named_modules())
            result[recipe] = {}
            for name in ("linear_qkv", "linear_fc1"):
                linear = next(m for key, m in modules.items() if key.endswith(name))
                gen = torch.Generator().manual_seed(17 + rt.tp_rank)
                n = linear.weight.shape[0]
                xs = [torch.randn(SEQ // tp, BATCH, MODEL["hidden_size"], generator=gen).bfloat16() for _ in range(2)]
                gs = [torch.randn(SEQ, BATCH, n, generator=gen).bfloat16() for _ in range(2)]
                layer_path = lambda m, x: m(x)[0]  # noqa: E731
                row = {"local_tokens": SEQ // tp * BATCH, "tokens": SEQ * BATCH, "in_features": linear.weight.shape[1],
                       **kept(linear, layer_path, xs[0])}
                if recipe != "off":
                    old_path = lambda m, x: old_column(m, x, recipe)  # noqa: E731
                    row["saved_old"] = kept(linear, old_path, xs[0])["saved"]
                    row["backward_events"] = backward_events(linear, layer_path, xs[0], gs[0])
                    reference = run_linear(linear, old_path, xs, gs)
                    row["equal_uncached"] = _equal(run_linear(linear, layer_path, xs, gs), reference)
                    with fl.weight_cache():
                        row["equal_cached"] = _equal(run_linear(linear, layer_path, xs, gs), reference)
                result[recipe][name] = row
    finally:
        shutdown_runtime()
    with open(f"{args.out}.rank{rt.rank}.json", "w") as f:
        json.dump(result, f)


def _equal(a, b) -> bool:
    import torch

    (outs_a, dw_a), (outs_b, dw_b) = a, b
    return torch.equal(dw_a, dw_b) and all(torch.equal(ya, yb) and torch.equal(dxa, dxb)
                                           for (ya, dxa), (yb, dxb) in zip(outs_a, outs_b))


if __name__ == "__main__":
    main()
