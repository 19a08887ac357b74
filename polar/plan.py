"""`polar plan`: which TP / PP / VPP / DP / micro-batch layout to launch, what it needs per GPU, how long a
step takes, before a cluster allocation is spent.

    polar plan --config polar_7b --gpu H100 --gpus 64
    polar plan --config polar_1_8b --gpu H200 --gpus 16 data.seq_length=8192 train.global_batch=512
    polar plan --measured gpu_runs.json   # predictions beside GPU runs (each names its config, GPU and count)

It enumerates every layout the engine accepts for the model, the GPU count and the batch (the engine's own
rules: engine.layout_rules, and engine.fp8's for the GPU planned; tensor parallelism inside one node, sequence
parallelism with tensor parallelism), estimates for each the memory of the fullest GPU and the time of one
optimizer step, ranks them (layouts that fit first, then by step time) and recommends the first, saying why.

The cost model (parameters, memory, step time) is polar/plan_model.py; the run settings planned for, read
as the run reads them, polar/plan_config.py; the table and the recommendation's text, polar/plan_report.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from engine.cli_types import ArgumentParser
from polar.plan_config import fine_tuning_overrides, load_plan_config
from polar.plan_model import (GB, GPU, GPUS, Assumptions, Layout, Shape, activation_bytes_by_recompute,
                              checkpoint_bytes, fp8_copy_bytes, fp8_keeps_inputs, inside_nodes, layers_in_flight,
                              memory_per_rank, params_per_rank, step_time, total_params)
from polar.plan_report import checkpoint_line, explain, format_table, in_gb, memory_lines

# re-exported: the cost model's and the config loading's names are the plan's public names too
# (tests/polar/test_plan.py)
__all__ = ["GB", "GPU", "GPUS", "Assumptions", "Layout", "Shape", "activation_bytes_by_recompute",
           "checkpoint_bytes", "inside_nodes", "layers_in_flight", "memory_per_rank", "params_per_rank", "step_time",
           "total_params", "load_plan_config", "main"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def launched(cfg, fp8: bool = False, overlap: bool = False):
    """The run a plan's launch line starts: the config with the settings the plan adds to it (--fp8's
    tensorwise recipe where the config has none, --overlap's overlaps). The engine's rules are asked of it."""
    train, par = cfg.train, cfg.parallel
    if fp8 and train.fp8 == "off":
        train = replace(train, fp8="tensorwise")
    if overlap:
        # the parameter gather only with the distributed optimizer, as the launch line adds it: with
        # parallel.distributed_optimizer=false given, the engine's refusal of the gather refused every layout
        par = replace(par, overlap_grad_reduce=True,
                      overlap_param_gather=par.overlap_param_gather or par.distributed_optimizer)
    return replace(cfg, train=train, parallel=par)


class _Rules:
    """The engine's own rules for a layout of `shape` in the run `run` (an EngineConfig: its RoPE, FP8,
    backbone and overlap settings; the defaults without one) on a GPU: engine.layout_rules.check_layout, which
    engine.runtime.validate_layout applies, and engine.fp8.check_fp8 with the GPU's compute capability and
    the backbone model.transformer_impl names (validate_layout asks those of the machine it starts on; a plan
    is for another). A copy of them here drifted: the planner recommended layouts the engine refused (RoPE
    windows, FP8 recipes and alignment were never in it)."""

    def __init__(self, shape: Shape, run=None, gpu: Optional[GPU] = None):
        from engine.config import EngineConfig

        self.run = run if run is not None else EngineConfig()
        self.model = replace(self.run.model, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                             num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
                             ffn_hidden_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size,
                             make_vocab_size_divisible_by=shape.vocab_multiple)
        self.capability = gpu.capability if gpu is not None else None
        # the settings of each parallel layout and batch, made once: making them is most of a plan's time
        self._parallel: dict = {}
        self._train: dict = {}

    def problem(self, layout: Layout, seq_length: int, global_batch: int) -> Optional[str]:
        from engine.config import ConfigError
        from engine.fp8 import check_fp8
        from engine.layout_rules import check_layout

        key = (layout.tp, layout.pp, layout.vpp, layout.sequence_parallel, layout.distributed_optimizer)
        par = self._parallel.get(key)
        if par is None:
            par = self._parallel[key] = replace(
                self.run.parallel, tp=layout.tp, pp=layout.pp, vpp=layout.vpp,
                sequence_parallel=layout.sequence_parallel, distributed_optimizer=layout.distributed_optimizer)
        key = (global_batch, layout.micro_batch, layout.recompute)
        train = self._train.get(key)
        if train is None:
            train = self._train[key] = replace(self.run.train, global_batch=global_batch,
                                               micro_batch=layout.micro_batch, recompute=layout.recompute)
        try:
            check_layout(self.model, par, train, layout.tp * layout.pp * layout.dp, seq_length)
            check_fp8(self.model, par, train, self.model.transformer_impl == "transformer_engine", self.capability)
        except ConfigError as exc:
            return str(exc)
        return None


def model_problem(shape: Shape, seq_length: int, global_batch: int, run=None, gpu: Optional[GPU] = None
                  ) -> Optional[str]:
    """Why the engine refuses this model (and run) at every layout, or None: its rules at one GPU, which only
    settings of the model, the sequence length and the run can break (a head size the engine refuses was
    planned as a fractional one: 7 heads of hidden 4096 were priced as 8.3 B parameters and recommended)."""
    return _Rules(shape, run, gpu).problem(Layout(tp=1, pp=1, dp=1), seq_length, global_batch)


def layout_problem(shape: Shape, layout: Layout, seq_length: int, global_batch: int, run=None,
                   gpu: Optional[GPU] = None) -> Optional[str]:
    """Why the engine refuses this layout for the model, batch and run (_Rules), or None: a measured run's
    layout with a typo was priced as if it could run."""
    return _Rules(shape, run, gpu).problem(layout, seq_length, global_batch)


# the layout settings a plan chooses: given on the command line, each is kept and the rest chosen around it
# (Layout's field for each)
PINNABLE = {"parallel.tp": "tp", "parallel.pp": "pp", "parallel.vpp": "vpp",
            "parallel.sequence_parallel": "sequence_parallel",
            "parallel.distributed_optimizer": "distributed_optimizer",
            "train.micro_batch": "micro_batch", "train.recompute": "recompute"}


def pinned_settings(cfg, sources: dict) -> dict:
    """{Layout field: value} of the layout settings the command line gave (`sources`, engine.config_load's record of
    the load: any override form, `parallel={tp: 4}` too), as the run reads them from cfg. A plan dropped them
    without a word: `parallel.tp=4` headed a plan that recommended TP2."""
    return {field: _value(cfg, key) for key, field in PINNABLE.items()
            if key in sources and sources[key].file is None}


def _value(cfg, key: str):
    """cfg's setting `section.name`."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def candidate_layouts(shape: Shape, gpus: int, global_batch: int, seq_length: int, gpus_per_node: int,
                      micro_batches=(1, 2, 4), recomputes=("none", "selective", "full"), run=None,
                      gpu: Optional[GPU] = None, pinned: Optional[dict] = None,
                      refusals: Optional[list] = None) -> list[Layout]:
    """Every layout the engine's rules accept (_Rules), TP within a node, SP on with TP; of them, those with
    the `pinned` settings ({Layout field: value}: a pinned TP may span nodes), whose refusals, in the
    engine's words, go to `refusals`. The vocabulary need not divide by TP: the engine pads the embedding
    table to a multiple of it (Shape.padded_vocab)."""
    return _candidates(_Rules(shape, run, gpu), shape, gpus, global_batch, seq_length, gpus_per_node, micro_batches,
                       recomputes, pinned or {}, refusals)


def _candidates(rules: _Rules, shape: Shape, gpus: int, global_batch: int, seq_length: int, gpus_per_node: int,
                micro_batches, recomputes, pinned: Optional[dict] = None, refusals: Optional[list] = None
                ) -> list[Layout]:
    pin = pinned or {}

    def choices(field: str, free) -> list:
        return [pin[field]] if field in pin else list(free)

    out = []
    recomputes = choices("recompute", recomputes)
    tps = choices("tp", (t for t in _divisors(gpus) if t <= gpus_per_node))
    if pin.get("sequence_parallel") and "tp" not in pin:
        # SP needs TP > 1, VPP PP > 1 (below): a refusal of TP1 or PP1 would be the plan's choice, not why
        # the pins fail (`parallel.vpp=3` was refused as needing PP >= 2, not as dividing no layer count)
        tps = [t for t in tps if t > 1] or tps
    for tp in tps:
        pps = choices("pp", _divisors(gpus // tp) if gpus % tp == 0 else (1,))
        if pin.get("vpp") is not None and "pp" not in pin:
            pps = [p for p in pps if p > 1] or pps
        for pp in pps:
            if gpus % (tp * pp):  # a pinned size: the engine's words for it (Layout counts whole DP ranks)
                if refusals is not None:
                    refusals.append(f"world size {gpus} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
                continue
            for mb in choices("micro_batch", micro_batches):
                for vpp in choices("vpp", [None, *_divisors(shape.num_layers)]):
                    lay = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), vpp=vpp, micro_batch=mb,
                                 recompute=recomputes[0], sequence_parallel=pin.get("sequence_parallel", tp > 1),
                                 distributed_optimizer=pin.get("distributed_optimizer", True))
                    problem = rules.problem(lay, seq_length, global_batch)
                    if problem is None:
                        out += [x for x in (replace(lay, recompute=rc) for rc in recomputes)
                                if x.recompute == lay.recompute or rules.problem(x, seq_length, global_batch) is None]
                    elif refusals is not None and pin:
                        refusals.append(problem)
    return out


@dataclass
class Estimate:
    layout: Layout
    memory: dict  # the fullest pipeline rank's components
    memory_rank: int
    time: dict
    fits: bool


def estimate(shape: Shape, layout: Layout, seq_length: int, global_batch: int, gpu: GPU, a: Assumptions,
             fp8: bool = False, attention_backend: str = "triton", fp8_bytes: float = 2.0,
             fp8_inputs: bool = False) -> Estimate:
    per_rank = [memory_per_rank(shape, layout, seq_length, global_batch, r, "bf16", fp8, attention_backend,
                                a.overhead_gb, fp8_bytes=fp8_bytes, fp8_inputs=fp8_inputs) for r in range(layout.pp)]
    worst = max(range(layout.pp), key=lambda r: per_rank[r]["total"])
    mem = per_rank[worst]
    return Estimate(layout, mem, worst, step_time(shape, layout, seq_length, global_batch, gpu, a, fp8),
                    mem["total"] <= a.usable_fraction * gpu.memory_gb * GB)


def prune_dominated(estimates: list[Estimate]) -> list[Estimate]:
    """Drops a recomputation or micro-batch choice that another choice of the same TP/PP/VPP beats on both
    step time and memory (selective recomputation with a flash-style kernel, say: slower, no smaller)."""
    groups: dict = {}
    for e in estimates:
        groups.setdefault((e.layout.tp, e.layout.pp, e.layout.vpp), []).append(e)
    kept = []
    for group in groups.values():
        for e in group:
            if not any(o is not e and o.time["total"] <= e.time["total"] and o.memory["total"] <= e.memory["total"]
                       and (o.time["total"] < e.time["total"] or o.memory["total"] < e.memory["total"])
                       for o in group):
                kept.append(e)
    return kept


def nearest_batches(shape: Shape, gpus: int, global_batch: int, seq_length: int, gpus_per_node: int, run=None,
                    gpu: Optional[GPU] = None, pinned: Optional[dict] = None) -> list[int]:
    """The global batches nearest to global_batch (one below, one above) that some layout (with the
    `pinned` settings) accepts."""
    rules = _Rules(shape, run, gpu)
    found = []
    for step in (-1, 1):
        b = global_batch + step
        while 0 < b <= 4 * global_batch and not _candidates(rules, shape, gpus, b, seq_length, gpus_per_node,
                                                            (1, 2, 4), ("none",), pinned):
            b += step
        if 0 < b <= 4 * global_batch:
            found.append(b)
    return found


def rank_layouts(estimates: list[Estimate]) -> list[Estimate]:
    """Layouts that fit first, then by step time, then by memory."""
    return sorted(estimates, key=lambda e: (not e.fits, e.time["total"], e.memory["total"]))


def recommend(ranked: list[Estimate], within: float = 0.002) -> Optional[Estimate]:
    """The fastest layout that fits; of layouts tied with it (within `within` of its step time) the one that
    needs least memory."""
    fitting = [e for e in ranked if e.fits]
    if not fitting:
        return None
    limit = fitting[0].time["total"] * (1 + within)
    return min((e for e in fitting if e.time["total"] <= limit), key=lambda e: e.memory["total"])


# ---- command line ----------------------------------------------------------------------------------------

def shape_from_config(cfg) -> Shape:
    m = cfg.model
    return Shape(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
                 m.vocab_size, lm_head=cfg.train.aux_lm_weight > 0, vocab_multiple=m.make_vocab_size_divisible_by,
                 qkv_bias=m.add_qkv_bias)


def _setting(value) -> str:
    """A setting's value as the command line writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _count(n: int) -> str:
    """A parameter count at the scale it has: a tiny CPU model is not "0.00 B"."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n}"


_LAYOUT_KEYS = ("tp", "pp", "vpp", "dp", "micro_batch", "recompute", "sequence_parallel", "distributed_optimizer")
_RECOMPUTE = ("none", "selective", "full")


def _layout_from_dict(d: dict, gpus: int) -> Layout:
    # a misspelt key or value named, not dropped or passed on: `"tpp": 2` planned TP1 silently, and
    # `"recompute": "ful"` was planned as no recomputation
    if not isinstance(d, dict):
        raise ValueError(f"layout: expected an object {{{', '.join(_LAYOUT_KEYS)}}}, got {d!r}")
    unknown = sorted(set(d) - set(_LAYOUT_KEYS))
    if unknown:
        raise ValueError(f"layout: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"the keys: {', '.join(_LAYOUT_KEYS)}")

    def whole(key: str, default) -> int:
        value = d.get(key, default)
        try:  # 2, 2.0 and "2", not 2.5, true or "two"
            n = int(value)
            ok = not isinstance(value, bool) and n >= 1 and (n == value or str(n) == value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"layout.{key}: expected a whole number >= 1, got {value!r}")
        return n

    tp, pp = whole("tp", 1), whole("pp", 1)
    dp = whole("dp", max(1, gpus // (tp * pp)))
    if tp * pp * dp != gpus:
        raise ValueError(f"layout {d}: tp x pp x dp = {tp * pp * dp}, but gpus = {gpus}")
    vpp = None if d.get("vpp") is None else whole("vpp", None)
    recompute = d.get("recompute", "none")
    if recompute not in _RECOMPUTE:
        raise ValueError(f"layout.recompute: expected one of {', '.join(_RECOMPUTE)}, got {recompute!r}")
    return Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, micro_batch=whole("micro_batch", 1),
                  recompute=recompute,
                  sequence_parallel=bool(d.get("sequence_parallel", tp > 1)),
                  distributed_optimizer=bool(d.get("distributed_optimizer", True)))


def compare_measurements(path: str, a: Assumptions) -> list[str]:
    """Prediction beside measurement for every GPU run in a JSON file: a list of objects with
    config (a preset or YAML), overrides (list of section.key=value), gpu, gpus, layout {tp, pp, vpp, dp,
    micro_batch, recompute, sequence_parallel}, fp8 (bool), and the measured peak_memory_gb (torch's
    max_memory_reserved / 1e9 on the fullest GPU), step_time_s, mfu; a measurement may be left out."""
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--measured {path}: {exc}") from None
    if not isinstance(runs, list):
        raise ValueError(f"--measured {path}: expected a JSON list of runs")
    return compare_runs(runs, a, f"--measured {path}")


def compare_runs(runs: list, a: Assumptions, source: str = "runs") -> list[str]:
    """compare_measurements for runs already read; `source` names them in errors."""
    head = (f"{'run':<28} {'gpu':<9} {'layout':<30} {'memory GB pred/meas':>20} {'step s pred/meas':>17} "
            f"{'MFU pred/meas':>14}")
    rows = [head, "-" * len(head)]
    for i, run in enumerate(runs):
        where = f"{source}: run {i}"
        try:
            cfg = load_plan_config(run.get("config"), list(run.get("overrides", [])))
            gpu = GPUS[run["gpu"]]
            gpus = int(run["gpus"])
            layout = _layout_from_dict(run.get("layout", {}), gpus)
        except KeyError as exc:
            raise ValueError(f"{where}: missing or unknown {exc}") from None
        except Exception as exc:
            raise ValueError(f"{where}: {exc}") from None
        shape = shape_from_config(cfg)
        target = launched(cfg, fp8=bool(run.get("fp8")))
        problem = model_problem(shape, cfg.data.seq_length, cfg.train.global_batch, target, gpu)
        if problem:
            raise ValueError(f"{where}: {problem}")
        problem = layout_problem(shape, layout, cfg.data.seq_length, cfg.train.global_batch, target, gpu)
        if problem:
            raise ValueError(f"{where}: layout {layout.name()}: {problem}")
        e = estimate(shape, layout, cfg.data.seq_length, cfg.train.global_batch, gpu, a,
                     bool(run.get("fp8")) or cfg.train.fp8 != "off",
                     cfg.train.attention_backend, fp8_copy_bytes(target.train.fp8, cfg.model.transformer_impl),
                     fp8_keeps_inputs(target.train.fp8, cfg.model.transformer_impl))

        def pair(pred, meas, fmt):
            if meas is None:
                return f"{fmt.format(pred)} / -"
            return f"{fmt.format(pred)} / {fmt.format(meas)} ({pred / meas - 1:+.0%})"

        rows.append(f"{str(run.get('name', i)):<28} {gpu.name + 'x' + str(gpus):<9} {layout.name():<30} "
                    f"{pair(e.memory['total'] / GB, run.get('peak_memory_gb'), '{:.1f}'):>20} "
                    f"{pair(e.time['total'], run.get('step_time_s'), '{:.2f}'):>17} "
                    f"{pair(e.time['mfu'] * 100, None if run.get('mfu') is None else run['mfu'] * 100, '{:.1f}'):>14}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="polar plan",
        description="Estimate per-GPU memory and step time of every TP/PP/VPP/DP/micro-batch layout for a "
                    "model, batch and cluster; rank them and recommend one.",
        epilog="Overrides: section.key=value over the config, e.g. model.num_layers=48 data.seq_length=8192 "
               "train.global_batch=1024. Layout settings given here (" + ", ".join(PINNABLE) + ") are kept and the "
               "plan chooses the others; a config file's are the plan's to choose. See polar/plan.py for the cost "
               "model.")
    ap.add_argument("--config", default=None,
                    help="a preset (tiny_cpu, polar_1_8b, polar_7b) or YAML file (default polar_7b; with finetune.* "
                         "settings none: polar finetune's own defaults, as the run starts from)")
    # `--gpu h100` was refused with a usage error: the names are the cards', in any case
    ap.add_argument("--gpu", default="H100", type=str.upper, choices=sorted(GPUS),
                    help="GPU type, any case (default H100)")
    ap.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    ap.add_argument("--fp8", action="store_true", help="FP8 matmuls (train.fp8): weight copies, faster GEMMs")
    ap.add_argument("--mfu", type=float, default=Assumptions.compute_efficiency,
                    help="fraction of the dense bf16 peak the kernels reach while computing (default %(default)s)")
    ap.add_argument("--overlap", action="store_true",
                    help="assume data-parallel communication overlaps compute")
    ap.add_argument("--group-length", type=int, default=None,
                    help="tokens per group (prefix + candidates) in a pack, >= 1; default: the whole pack")
    ap.add_argument("--top", type=int, default=12, help="rows of the table, >= 1 (default 12)")
    ap.add_argument("--measured", default=None,
                    help="JSON list of GPU runs: print the prediction beside each measurement")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from engine.config import ConfigError

    a = Assumptions(compute_efficiency=args.mfu, overlap_dp=args.overlap, group_length=args.group_length)
    gpu = GPUS[args.gpu]
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu}: must lie in (0, 1]")
        if args.gpus < 1:
            raise ConfigError(f"--gpus {args.gpus}: must be >= 1")
        # 0 would silently mean the whole pack and a negative length a negative attention cost
        if args.group_length is not None and args.group_length < 1:
            raise ConfigError(f"--group-length {args.group_length}: must be >= 1 (leave it out for the whole pack)")
        if args.top < 1:
            raise ConfigError(f"--top {args.top}: must be >= 1")
        config = args.config if args.config is not None or fine_tuning_overrides(args.overrides) else "polar_7b"
        sources: dict = {}
        cfg = load_plan_config(config, args.overrides, say=print, sources=sources)
        if cfg.train.precision == "fp32":  # was priced as bf16: half the weights and activations it holds
            raise ConfigError("train.precision=fp32: the plan prices bf16 training (2-byte weights and activations, "
                              "the card's bf16 peak); plan a train.precision=bf16 (or auto) run")
        # a config's own FP8 recipe runs FP8 whether or not --fp8 is given: it is priced, as --fp8 is
        fp8 = args.fp8 or cfg.train.fp8 != "off"
        if fp8 and gpu.fp8_tflops is None:
            raise ConfigError(f"{'--fp8' if args.fp8 else f'train.fp8={cfg.train.fp8}'}: the {gpu.name} has no "
                              "FP8 tensor cores")
        run = launched(cfg, fp8, args.overlap)
        problem = model_problem(shape_from_config(cfg), cfg.data.seq_length, cfg.train.global_batch, run, gpu)
        if problem and not args.measured:
            raise ConfigError(f"the engine runs no layout of this config: {problem}")
        if args.measured:
            for line in compare_measurements(args.measured, a):
                print(line)
            return 0
    except (ConfigError, ValueError) as exc:
        print(f"polar plan: {exc}", file=sys.stderr)
        return 2
    shape = shape_from_config(cfg)
    seq, gb = cfg.data.seq_length, cfg.train.global_batch
    pinned = pinned_settings(cfg, sources)
    # as typed; a pin given otherwise (`parallel={tp: 4}`) as the run reads it
    typed = [o for o in args.overrides if o.split("=", 1)[0].strip() in PINNABLE]
    given = " ".join(typed + [f"{key}={_setting(_value(cfg, key))}" for key, field in PINNABLE.items()
                              if field in pinned and not any(o.split("=", 1)[0].strip() == key for o in typed)])
    refusals: list = []
    layouts = candidate_layouts(shape, args.gpus, gb, seq, gpu.gpus_per_node, run=run, gpu=gpu, pinned=pinned,
                                refusals=refusals)
    if not layouts:
        def nearest() -> str:
            # a search over every layout at each batch up to 4x the asked one (~17 s of CPU for polar_7b on
            # 64 GPUs): only for a refusal that the batch can cure
            near = nearest_batches(shape, args.gpus, gb, seq, gpu.gpus_per_node, run, gpu, pinned)
            return f"; nearest global batches with layouts: {' and '.join(map(str, near))}" if near else ""

        if refusals and not candidate_layouts(shape, args.gpus, gb, seq, gpu.gpus_per_node, run=run, gpu=gpu):
            refusals = []  # no layout at all: the pins are not why
        if refusals:
            print(f"polar plan: no layout of {args.gpus} GPUs with {given}: {refusals[0]}"
                  + (nearest() if "global_batch" in refusals[0] or "micro-batches" in refusals[0] else ""),
                  file=sys.stderr)
            return 2
        print(f"polar plan: no layout of {args.gpus} GPUs divides the model and train.global_batch={gb} "
              f"(heads {shape.num_attention_heads}, KV groups {shape.num_query_groups}, layers {shape.num_layers}; "
              "the data-parallel size must divide the global batch)" + nearest(), file=sys.stderr)
        return 2
    copies = fp8_copy_bytes(run.train.fp8, cfg.model.transformer_impl)
    inputs = fp8_keeps_inputs(run.train.fp8, cfg.model.transformer_impl)
    ranked = rank_layouts(prune_dominated([estimate(shape, lay, seq, gb, gpu, a, fp8, cfg.train.attention_backend,
                                                    copies, inputs) for lay in layouts]))
    # the overrides named with the preset: `polar_7b` with model.num_layers=48 is not POLAR-7B
    what = " ".join([config or "(fine-tuning defaults)", *args.overrides])
    print(f"polar plan: {what} ({_count(total_params(shape))} parameters: {shape.num_layers} layers, "
          f"hidden {shape.hidden_size}, {shape.num_attention_heads} heads, {shape.num_query_groups} KV groups, FFN "
          f"{shape.ffn_hidden_size}, vocab {shape.vocab_size}) on {args.gpus} x {gpu.name}, "
          f"{gb} packed sequences x {seq} tokens per step, {'FP8' if fp8 else 'bf16'}")
    print(f"GPU: {gpu.source}")
    if pinned:
        print(f"layouts: planned only with {given} (given); the other layout settings are the plan's to choose")
    # a config file's layout settings went unsaid: `parallel.tp: 8` in it and a plan recommending TP2
    chosen = [f"{key}={_setting(_value(cfg, key))}" for key in PINNABLE
              if key in sources and sources[key].file is not None and PINNABLE[key] not in pinned]
    if chosen:
        print(f"layouts: not kept from the config: {' '.join(chosen)} (the plan chooses them, and its launch line "
              "sets them; give one on the command line to keep it)")
    for line in a.lines():
        print(f"assumed: {line}")
    print()
    best = recommend(ranked)
    shown = ranked[:args.top]
    if best is not None and best not in shown:
        shown.append(best)
    for line in format_table(shown, len(shown), best):
        print(line)
    fitting = [e for e in ranked if e.fits]
    print(f"\n{len(layouts)} layouts, {len(ranked)} after dropping recomputation / micro-batch choices that are "
          f"slower and no smaller; {len(fitting)} of them fit in {a.usable_fraction:.0%} of {gpu.memory_gb:g} GB")
    if not fitting:
        least = min(ranked, key=lambda e: e.memory["total"])
        # FP8 off frees its weight copies: advice only where FP8 is on
        print(f"none fits: the smallest, {least.layout.name()}, needs {in_gb(least.memory['total'])} GB; "
              f"more GPUs, {'FP8 off, ' if fp8 else ''}a shorter data.seq_length or a smaller model")
        return 1
    print()
    for line in explain(best, ranked, gpu, a):
        print(line)
    for line in memory_lines(shape, best, seq, gb, fp8, cfg.train.attention_backend, a, inputs):
        print(line)
    print(checkpoint_line(shape, best.layout, gpu.gpus_per_node))
    lay = best.layout
    print(f"launch with: parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.vpp={lay.vpp or 'null'} "
          f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()} train.micro_batch={lay.micro_batch} "
          f"train.recompute={lay.recompute}"
          # the cost model's full recomputation is megatron's uniform one-layer units
          + (" train.recompute_num_layers=1" if lay.recompute == "full" else "")
          # tensorwise: the FP8 recipe both backbones (local, TE) run on every FP8 card in GPUS; the cost
          # model does not tell the recipes apart. A placeholder here would be a shell redirection.
          + (" train.fp8=tensorwise" if args.fp8 and cfg.train.fp8 == "off" else "")
          # the memory and time above assume the sharded optimizer; --overlap, both overlaps it prices
          + f" parallel.distributed_optimizer={str(lay.distributed_optimizer).lower()}"
          + (" parallel.overlap_grad_reduce=true"
             + (" parallel.overlap_param_gather=true" if lay.distributed_optimizer else "") if args.overlap else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
