"""`polar plan` accepts exactly the layouts the engine accepts.

The planner asks the engine's own rules (engine.layout_rules, engine.fp8) instead of a copy of them: a copy
drifted (RoPE windows and FP8 recipes, backbones and alignments were not in it, and it recommended layouts
that engine.runtime.validate_layout then refused). Here, for a grid of model shapes, run settings, GPU
counts, batches, sequence lengths and layouts (TP, PP, VPP, DP, micro-batch, sequence parallelism, the
distributed optimizer), the plan's verdict and message are validate_layout's, and candidate_layouts lists
every layout validate_layout accepts (with the plan's own choices: SP on with TP, TP within a node).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, EngineConfig
from engine.config_load import load_config
from engine.runtime import validate_layout
from polar import plan

ROOT = Path(__file__).resolve().parents[2]

SHAPES = [  # layers, hidden, heads, KV groups, FFN
    plan.Shape(4, 64, 4, 2, 176, 260),  # tiny_cpu: FFN 176 / TP2 = 88 is no multiple of 16 for FP8
    plan.Shape(6, 128, 8, 4, 256, 260),
    plan.Shape(6, 96, 6, 6, 240, 260),  # TP3 and TP6 divide the heads; FP8 takes TP3, not TP2 or TP6
    plan.Shape(3, 60, 4, 4, 120, 260),  # 15 channels a head: refused at every layout
    plan.Shape(4, 64, 6, 4, 128, 260),  # 4 KV groups do not divide 6 heads
]
RUNS = {  # overrides of the run a layout is checked in
    "defaults": [],
    "rope-dynamic": ["model.rope_scaling=dynamic", "model.max_position_embeddings=8"],
    "rope-llama3-backwards": ["model.rope_scaling=llama3", "model.rope_high_freq_factor=1.0"],
    "fp8-tensorwise": ["train.fp8=tensorwise"],
    "fp8-delayed-local": ["train.fp8=delayed"],
    "overlap-param-gather": ["parallel.overlap_param_gather=true"],
}
REFUSED_AT_EVERY_LAYOUT = {"rope-llama3-backwards", "fp8-delayed-local"}
GPU_COUNTS = (1, 2, 4, 6, 8)
BATCHES = (2, 6, 12)
SEQ_LENGTHS = (6, 8, 12)
MICRO_BATCHES = (1, 2)


def _gpu_like_this_machine() -> plan.GPU:
    """A GPU of this machine's compute capability (None on CPU), which validate_layout's FP8 check reads."""
    import torch

    from engine.fp8 import device_capability

    capability = device_capability(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    return dataclasses.replace(plan.GPUS["H100"], capability=capability)


def _engine(run: EngineConfig, shape: plan.Shape, lay: plan.Layout, seq_length: int, global_batch: int):
    """validate_layout's verdict: None, or its message."""
    model = dataclasses.replace(run.model, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                                num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
                                ffn_hidden_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size)
    par = dataclasses.replace(run.parallel, tp=lay.tp, pp=lay.pp, vpp=lay.vpp, sequence_parallel=lay.sequence_parallel,
                              distributed_optimizer=lay.distributed_optimizer)
    train = dataclasses.replace(run.train, global_batch=global_batch, micro_batch=lay.micro_batch)
    try:
        assert validate_layout(model, par, train, lay.tp * lay.pp * lay.dp, seq_length) == lay.dp
    except ConfigError as exc:
        return str(exc)
    return None


def _layouts(shape: plan.Shape, gpus: int):
    """Every layout of `gpus` GPUs, VPP from none to more chunks than layers."""
    for tp, pp in itertools.product(range(1, gpus + 1), repeat=2):
        if gpus % (tp * pp):
            continue
        for vpp, mb, sp, dist in itertools.product([None, *range(1, shape.num_layers + 2)], MICRO_BATCHES,
                                                   (False, True), (True, False)):
            yield plan.Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), vpp=vpp, micro_batch=mb, sequence_parallel=sp,
                              distributed_optimizer=dist)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_plan_accepts_exactly_the_layouts_the_engine_accepts(name):
    run = load_config(EngineConfig, None, RUNS[name])
    gpu = _gpu_like_this_machine()
    compared = accepted = 0
    for shape, gpus, batch, seq in itertools.product(SHAPES, GPU_COUNTS, BATCHES, SEQ_LENGTHS):
        engine_accepts = set()
        for lay in _layouts(shape, gpus):
            want = _engine(run, shape, lay, seq, batch)
            got = plan.layout_problem(shape, lay, seq, batch, run, gpu)
            assert got == want, (shape, gpus, batch, seq, lay)
            compared += 1
            if want is None and lay.sequence_parallel == (lay.tp > 1) and lay.distributed_optimizer:
                engine_accepts.add(lay)
        # the plan enumerates layouts with SP on exactly when TP > 1 and the distributed optimizer
        listed = plan.candidate_layouts(shape, gpus, batch, seq, gpus_per_node=gpus, micro_batches=MICRO_BATCHES,
                                        recomputes=("none",), run=run, gpu=gpu)
        assert len(listed) == len(set(listed)) and set(listed) == engine_accepts, (shape, gpus, batch, seq)
        model_refused = plan.model_problem(shape, seq, batch, run, gpu)
        assert (model_refused is not None) <= (not engine_accepts), (shape, gpus, batch, seq, model_refused)
        accepted += len(engine_accepts)
    # the grid holds both verdicts (a run the engine refuses at any layout aside): a check that refused
    # everything, or nothing, would pass unseen otherwise
    assert compared > 10000 and (accepted == 0) == (name in REFUSED_AT_EVERY_LAYOUT), (compared, accepted)


def _launch_settings(out: str) -> list[str]:
    return next(x for x in out.splitlines() if x.startswith("launch with: "))[len("launch with: "):].split()


@pytest.mark.parametrize("overrides", [
    # POLAR-7B's released config scales RoPE dynamically; the engine runs that only inside the window
    ["model.rope_scaling=dynamic", "data.seq_length=32768"],
    ["model.rope_scaling=llama3", "model.rope_high_freq_factor=1.0"],
    # delayed scaling is a Transformer Engine recipe; the presets build megatron's local layers
    ["--fp8", "train.fp8=delayed"],
])
def test_a_run_the_engine_refuses_at_every_layout_is_not_planned(overrides, capsys):
    args = ["--config", "polar_7b", "--gpus", "64", *overrides]
    cfg = plan.launched(plan.load_plan_config("polar_7b", [o for o in overrides if o != "--fp8"]),
                        fp8="--fp8" in overrides)
    with pytest.raises(ConfigError) as engine:
        validate_layout(cfg.model, dataclasses.replace(cfg.parallel, tp=1, pp=1), cfg.train, 64, cfg.data.seq_length)
    assert plan.main(args) == 2  # it recommended a layout (TP4xPP2xDP8 for the first)
    captured = capsys.readouterr()
    assert captured.err == f"polar plan: the engine runs no layout of this config: {engine.value}\n"
    assert "recommended" not in captured.out


def test_an_fp8_recipe_is_checked_against_the_planned_cards_compute_capability(capsys):
    te = ["train.fp8=mxfp8", "model.transformer_impl=transformer_engine"]
    assert plan.main(["--config", "polar_1_8b", "--gpu", "H100", "--gpus", "8", *te]) == 2
    assert capsys.readouterr().err == ("polar plan: the engine runs no layout of this config: train.fp8=mxfp8 needs "
                                       "a GPU of compute capability 10.0 or newer; this one is 9.0\n")
    assert plan.main(["--config", "polar_1_8b", "--gpu", "B200", "--gpus", "8", *te]) == 0
    assert "train.fp8" not in " ".join(_launch_settings(capsys.readouterr().out))


def test_fp8_layouts_keep_each_tensor_parallel_shard_a_multiple_of_16(capsys):
    # FFN 14000: 875 x 16 whole, 437.5 x 16 at TP2; the plan recommended TP2xPP4xDP8 mb1, which the engine
    # refuses for FP8's matrix products
    overrides = ["model.ffn_hidden_size=14000"]
    assert plan.main(["--config", "polar_7b", "--gpus", "64", "--fp8", *overrides, "--top", "1000"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*\d+[ *](TP\d+x\S+)", out, re.M)
    assert rows and all(r.startswith("TP1x") for r in rows), rows
    launch = _launch_settings(out)
    assert "parallel.tp=1" in launch
    cfg = load_config(EngineConfig, str(ROOT / "polar/configs/polar_7b.yaml"), overrides + launch)
    validate_layout(cfg.model, cfg.parallel, cfg.train, 64, cfg.data.seq_length)
    refused = dataclasses.replace(cfg.parallel, tp=2, pp=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match="model.ffn_hidden_size / parallel.tp = 7000"):
        validate_layout(cfg.model, refused, cfg.train, 64, cfg.data.seq_length)


def test_a_measured_runs_layout_is_refused_with_the_engines_message(tmp_path, capsys):
    run = {"config": "polar_7b", "overrides": ["model.ffn_hidden_size=14000"], "gpu": "H100", "gpus": 64,
           "layout": {"tp": 2, "pp": 4}, "fp8": True}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([run]))
    assert plan.main(["--measured", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"polar plan: --measured {path}: run 0: layout TP2xPP4xDP8 mb1: train.fp8=tensorwise: "
                          "FP8 matrix products need"), err


def test_planning_does_not_load_megatron():
    # the engine's rules are asked of engine.layout_rules and engine.fp8, not of the modules that build the
    # model (polar never reaches into megatron: tests/test_layering.py)
    script = ("import sys\nfrom polar import plan\n"
              "assert plan.main(['--config', 'polar_7b', '--gpus', '64', '--fp8']) == 0\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout[-2000:]
