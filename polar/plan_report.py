"""What `polar plan` prints of its ranked layouts (polar/plan.py ranks them): the table, why the recommended
layout (its costs, and what makes the nearest alternatives slower), its memory by component and the cost of
its checkpoints. Sizes in GB (1e9 bytes); times in the unit of the longest shown."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from polar.plan_model import (GB, GPU, Assumptions, Layout, Shape, activation_bytes_by_recompute, checkpoint_bytes,
                              inside_nodes, params_per_rank)

if TYPE_CHECKING:  # only annotated here: polar/plan.py, which makes Estimates, imports this module
    from polar.plan import Estimate


_COMPONENT_WORDS = {"compute": "compute", "recompute": "recomputation", "bubble": "pipeline bubble",
                    "tp_comm": "tensor-parallel communication", "pp_comm": "pipeline communication",
                    "dp_comm": "data-parallel communication", "optimizer": "optimizer update"}


def explain(best: Estimate, ranked: list[Estimate], gpu: GPU, a: Assumptions) -> list[str]:
    """Why the recommended layout: its costs, and what makes the nearest alternatives slower."""
    t, lay = best.time, best.layout
    unit = _time_unit([t["total"]])
    lines = [f"recommended: {lay.name()}" + (" with sequence parallelism" if lay.sequence_parallel else "")
             + f": {_dur(t['total'], unit)} per step, MFU {t['mfu']:.1%}, {best.memory['total'] / GB:.1f} GB of "
             f"{gpu.memory_gb:g} GB on the fullest GPU (pipeline rank {best.memory_rank})."]
    why = []
    world = lay.tp * lay.pp * lay.dp
    why.append("no tensor-parallel traffic" if lay.tp == 1 else
               "tensor parallelism stays inside a node's NVLink" if inside_nodes(lay.tp, world, gpu.gpus_per_node)
               else "tensor-parallel groups straddle nodes")
    why.append("no pipeline bubble" if lay.pp == 1 else
               f"pipeline bubble {t['bubble'] / t['total']:.1%} of the step")
    why.append("no recomputation needed" if lay.recompute == "none" else
               f"{lay.recompute} recomputation is needed to fit ({_dur(t['recompute'], unit)})")
    fastest = next(e for e in ranked if e.fits)
    lead = ("It is the fastest layout that fits" if fastest is best else
            f"It ties with the fastest layout that fits ({fastest.layout.name()}, "
            f"{_dur(fastest.time['total'], unit)}) and needs less memory")
    lines.append(lead + ": " + "; ".join(w for w in why if w) + ".")
    others = [e for e in ranked if e is not best and e.fits][:3]
    for e in others:
        diff = {k: e.time[k] - t[k] for k in _COMPONENT_WORDS}
        worst = max(diff, key=diff.get)
        lines.append(f"  next: {e.layout.name()}: {e.time['total'] / t['total'] - 1:+.1%}, mostly "
                     f"{_COMPONENT_WORDS[worst]} ({_dur(diff[worst], unit, '+')})")
    return lines


def in_gb(x: float) -> str:
    """Bytes as GB, one decimal."""
    return f"{x / GB:.1f}"


def _time_unit(seconds: list[float]) -> tuple[str, float]:
    """The unit a set of times is shown in, the longest's: a tiny model's microseconds are not 0.00 s."""
    top = max(seconds, default=0.0)
    return ("s", 1.0) if top >= 1.0 else ("ms", 1e3) if top >= 1e-3 else ("us", 1e6)


def _dur(x: float, unit: tuple[str, float], sign: str = "") -> str:
    return f"{x * unit[1]:{sign}.2f} {unit[0]}"


def format_table(ranked: list[Estimate], top: int, best: Optional[Estimate] = None) -> list[str]:
    name, k = _time_unit([e.time["total"] for e in ranked[:top]])  # every time column in it
    # wide enough for the longest name shown ("TP2xPP2xVPP2xDP16 mb1 rc-selective" is 34)
    w = max([30] + [len(e.layout.name()) for e in ranked[:top]])
    head = (f"{'#':>3} {'layout (* recommended)':<{w}} {'SP':>2} {'fits':>4} {'GB/GPU':>7} {'act GB':>6} "
            f"{'step ' + name:>7} "
            f"{'compute':>7} {'recomp':>6} {'bubble':>6} {'TP comm':>7} {'PP comm':>7} {'DP comm':>7} "
            f"{'MFU':>6} {'tok/s/GPU':>9}")
    rows = [head, "-" * len(head)]
    for i, e in enumerate(ranked[:top], 1):
        lay = e.layout
        t = {key: v * k if key not in ("mfu", "tokens_per_s") else v for key, v in e.time.items()}
        world = lay.tp * lay.pp * lay.dp
        rows.append(
            f"{i:>3}{'*' if e is best else ' '}{lay.name():<{w}} {'y' if lay.sequence_parallel else '-':>2} "
            f"{'yes' if e.fits else 'no':>4} "
            f"{in_gb(e.memory['total']):>7} {in_gb(e.memory['activations']):>6} {t['total']:>7.2f} "
            f"{t['compute']:>7.2f} {t['recompute']:>6.2f} {t['bubble']:>6.2f} {t['tp_comm']:>7.2f} "
            f"{t['pp_comm']:>7.2f} {t['dp_comm']:>7.2f} {t['mfu']:>6.1%} {t['tokens_per_s'] / world:>9,.0f}")
    return rows


def memory_lines(shape: Shape, e: Estimate, seq_length: int, global_batch: int, fp8: bool,
                 attention_backend: str, a: Assumptions, fp8_inputs: bool = False) -> list[str]:
    m = e.memory
    acts = activation_bytes_by_recompute(shape, e.layout, seq_length, global_batch, e.memory_rank,
                                         precision="bf16", fp8=fp8, attention_backend=attention_backend,
                                         overhead_gb=a.overhead_gb, fp8_inputs=fp8_inputs)
    n = params_per_rank(shape, e.layout.tp, e.layout.pp, e.memory_rank)
    return [
        f"memory of pipeline rank {e.memory_rank} ({n:,} parameters): weights {in_gb(m['weights'])} GB, gradients "
        f"{in_gb(m['gradients'])} GB, optimizer {in_gb(m['optimizer'])} GB (sharded over DP{e.layout.dp}), FP8 "
        f"{in_gb(m['fp8'])} GB, activations {in_gb(m['activations'])} GB, transient {in_gb(m['transient'])} GB, "
        f"overhead {in_gb(m['overhead'])} GB = {in_gb(m['total'])} GB",
        "activations of that rank by recomputation: " + ", ".join(f"{k} {in_gb(v)} GB" for k, v in acts.items()),
    ]


def _size(x: float) -> str:
    return f"{x / 1e12:.1f} TB" if x >= 1e12 else f"{x / GB:.1f} GB"


def checkpoint_line(shape: Shape, layout: Layout, gpus_per_node: int) -> str:
    c = checkpoint_bytes(shape, layout, gpus_per_node)
    node = min(gpus_per_node, layout.tp * layout.pp * layout.dp)
    return (f"checkpoint: {in_gb(c['step'])} GB a step (bf16 weights {in_gb(c['weights'])} GB, optimizer "
            f"{in_gb(c['optimizer'])} GB). checkpoint.optimizer_format=fully_reshardable (resumes at any layout) "
            f"gathers {in_gb(c['save_host_per_gpu'])} GB of host memory per GPU at each save "
            f"({in_gb(c['save_host_per_node'])} GB per {node}-GPU node) and a resume reads "
            f"{_size(c['resume_read_fully_reshardable'])} in all; "
            f"dp_reshardable: no gather, a resume reads {_size(c['resume_read_dp_reshardable'])}, at "
            f"TP{layout.tp}xPP{layout.pp}{f'xVPP{layout.vpp}' if layout.vpp else ''} only")
