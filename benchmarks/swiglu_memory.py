"""SwiGLU in the engine's MLP: megatron's fused autograd Function against its unfused glu, one table.

    python benchmarks/swiglu_memory.py [--shapes 512x256x704 2048x1024x2816] [--repeats 9]
                                       [--dtype fp32|bf16] [--json OUT]

Per shape (tokens x hidden x ffn, one TP rank) and variant, megatron's MLP built from the engine's
TransformerConfig with only `bias_activation_fusion` changed: the bytes autograd keeps for the
backward over one forward (distinct storages, parameters left out, counted with saved-tensor hooks),
and the median forward+backward time of the whole MLP and of the activation alone, as ratios fused /
unfused measured in the same run. The fused Function keeps the fc1 output only and recomputes silu in
the backward; the unfused glu also keeps silu(a) and a copy of b: 2 x tokens x ffn elements more.
On a GPU the fused helpers are torch.compile'd (megatron's standard; the first calls, which compile,
are warm-up and not timed) and the peak memory one forward+backward allocates is added; on the CPU
they run eagerly (engine/megatron_jit.py), where the element-wise backward costs a little more time.
Before timing, the two MLPs (the same weights) and the two activations run once on the same inputs
and their outputs and input gradients are compared (`max rel. diff`: the largest difference over the
largest magnitude of the unfused one's, each result against its own); over 1e-4 (fp32) or 5e-2
(bf16) the script exits 1, so a fused path that computes something else cannot show as cheaper.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.compare import rel_diff  # noqa: E402

CPU_SHAPES = ("512x256x704", "2048x512x1408", "2048x1024x2816")
GPU_SHAPES = ("4096x4096x3584", "16384x4096x3584")  # POLAR-7B's MLP per TP rank at TP 4 (ffn 14336 / 4)
MIB = 2 ** 20
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # of the largest magnitude: rounding stays well below


def shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, hidden, ffn = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOKENSxHIDDENxFFN, e.g. 2048x1024x2816") from None
    if min(tokens, hidden, ffn) < 1 or hidden % 64:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive and hidden a multiple of 64")
    return tokens, hidden, ffn


def with_fusion(cfg, fused: bool):
    """The engine's config with megatron's SwiGLU Function (True) or its unfused glu (False)."""
    cfg = copy.copy(cfg)
    cfg.bias_activation_fusion = fused
    return cfg


def build_mlp(cfg, seed: int = 0):
    """The MLP of the engine's local layer spec, as megatron's TransformerLayer builds it, with weights
    of unit-scale outputs (init_method_std 0.02 would make activations and gradients ~1e-3)."""
    import torch
    from megatron.core.transformer.mlp import MLP

    from engine.model.spec import layer_spec

    torch.manual_seed(seed)
    submodules = layer_spec(False, 10000.0, "torch").submodules.mlp.keywords["submodules"]
    mlp = MLP(config=cfg, submodules=submodules, ffn_hidden_size=cfg.ffn_hidden_size)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=p.shape[1] ** -0.5)
    return mlp


def saved_activation_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn(*args), leaving out those of
    the tensors in `exclude` (parameters: weights are not activation memory)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def unfused_glu(y):
    """megatron's unfused gated path for SwiGLU (transformer/mlp.py, glu_linear_offset 0)."""
    import torch
    import torch.nn.functional as F

    a, b = torch.chunk(y, 2, dim=-1)
    return F.silu(a) * (b + 0.0)


def interleaved_medians(steps: dict, repeats: int, device) -> dict:
    """Median seconds of each step, timed in turn within every repeat, so a burst of other work on a
    shared machine slows all variants alike instead of one of them."""
    import torch

    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(cfg, tokens: int, device, dtype, repeats: int, warmup: int) -> dict:
    """{False: unfused row, True: fused row} for one shape."""
    import torch
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(tokens, 1, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    y = torch.randn(tokens, 1, 2 * cfg.ffn_hidden_size, device=device, dtype=dtype, requires_grad=True)
    mlps = {fused: build_mlp(with_fusion(cfg, fused)).to(device=device, dtype=dtype) for fused in (False, True)}
    activations = {False: unfused_glu, True: lambda t: bias_swiglu_impl(t, None)}
    steps = {}
    for fused in (False, True):
        steps["mlp", fused] = lambda m=mlps[fused]: m(x)[0].sum().backward()
        steps["activation", fused] = lambda f=activations[fused]: f(y).sum().backward()
    upstream = torch.randn(tokens, 1, cfg.hidden_size, device=device, dtype=dtype)

    def results(fused: bool) -> list:  # both paths' outputs and input gradients, for one upstream gradient
        x.grad = y.grad = None
        out = mlps[fused](x)[0]
        out.backward(upstream)
        act = activations[fused](y)
        act.backward(upstream.new_ones(()).expand_as(act))
        return [out.detach(), x.grad, act.detach(), y.grad]

    diff = rel_diff(results(False), results(True))
    for _ in range(warmup):  # on a GPU the first calls compile
        for step in steps.values():
            step()
    medians = interleaved_medians(steps, repeats, device)
    rows = {}
    for fused, mlp in mlps.items():
        rows[fused] = {"max_rel_diff": diff,
                       "saved_bytes": saved_activation_bytes(mlp, x, exclude=list(mlp.parameters())),
                       "mlp_s": medians["mlp", fused], "activation_s": medians["activation", fused]}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            steps["mlp", fused]()
            torch.cuda.synchronize(device)
            rows[fused]["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=shape, default=None,
                    help=f"TOKENSxHIDDENxFFN per TP rank (default: CPU {' '.join(CPU_SHAPES)}; "
                         f"GPU {' '.join(GPU_SHAPES)})")
    ap.add_argument("--repeats", type=at_least(1), default=9,
                    help="timed forward+backward passes of each variant, taken in turn (median)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.parallelize import transformer_config
    from engine.runtime import current_or_new_runtime, shutdown_runtime

    rt = current_or_new_runtime(ParallelConfig(), seed=1234)
    cuda = rt.device.type == "cuda"
    precision = args.dtype or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    shapes = args.shapes or [shape(s) for s in (GPU_SHAPES if cuda else CPU_SHAPES)]
    rows = []
    for tokens, hidden, ffn in shapes:
        model = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=hidden // 64,
                            num_query_groups=hidden // 64, ffn_hidden_size=ffn, vocab_size=128)
        cfg = transformer_config(model, ParallelConfig(), TrainConfig(precision=precision), rt)
        got = measure(cfg, tokens, rt.device, dtype, args.repeats, 3 if cuda else 2)
        extra = got[False]["saved_bytes"] - got[True]["saved_bytes"]
        rows.append({"tokens": tokens, "hidden": hidden, "ffn": ffn, "dtype": precision, "device": str(rt.device),
                     "unfused": got[False], "fused": got[True], "saved_less_bytes": extra,
                     "two_ffn_tensors": extra == 2 * tokens * ffn * dtype.itemsize,
                     "max_rel_diff": got[True]["max_rel_diff"],
                     "same_results": got[True]["max_rel_diff"] <= TOLERANCE[precision]})
    head = "| tokens x hidden x ffn | saved unfused MiB | saved fused MiB | fused / unfused saved | " \
           "MLP fwd+bwd fused / unfused | activation fwd+bwd fused / unfused | max rel. diff |"
    if cuda:
        head += " peak unfused MiB | peak fused MiB |"
    print(f"{rt.device}, {precision}, median of {args.repeats}")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        u, f = r["unfused"], r["fused"]
        line = (f"| {r['tokens']} x {r['hidden']} x {r['ffn']} | {u['saved_bytes'] / MIB:.1f} | "
                f"{f['saved_bytes'] / MIB:.1f} | {f['saved_bytes'] / u['saved_bytes']:.3f} | "
                f"{f['mlp_s'] / u['mlp_s']:.2f} | {f['activation_s'] / u['activation_s']:.2f} | "
                f"{r['max_rel_diff']:.1e} |")
        if cuda:
            line += f" {u['peak_bytes'] / MIB:.1f} | {f['peak_bytes'] / MIB:.1f} |"
        print(line)
    print("fused keeps exactly 2 x tokens x ffn elements less at every shape: "
          f"{'yes' if all(r['two_ffn_tensors'] for r in rows) else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    differ = [f"{r['tokens']}x{r['hidden']}x{r['ffn']}" for r in rows if not r["same_results"]]
    if differ:
        print(f"fused and unfused results differ beyond {TOLERANCE[precision]:g} (relative) at {', '.join(differ)}")
    shutdown_runtime()
    return 0 if all(r["two_ffn_tensors"] for r in rows) and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
