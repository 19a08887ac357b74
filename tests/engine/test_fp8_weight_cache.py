"""The FP8 weight cache (engine/model/fp8_linear.py, weight_cache()) in the engine's real training
step: tests/engine/fp8_cache_runs_worker.py trains 3 steps of 4 micro-batches through the Trainer
(the distributed optimizer updating the weights in place between steps), with each step's
forward-backward schedule inside the cache's scope or without it, and counts weight quantizations.
The single-process runs all share one process (one start-up of torch and megatron), each from the
same seed; the TP2 runs share a torchrun.

With the scope a weight is quantized once per step and scaling (per tensor: the forward copy, which
the backward reuses; per row: the forward's dim-1 and dgrad's dim-0 copies) instead of once per
micro-batch, and the losses and gradient norms are bit-identical to the uncached run's, under TP2
too. The control: one scope held across the optimizer steps trains on stale FP8 weights (the
optimizer's update leaves the weights' version counters unchanged) and its losses part from the
uncached run's: the comparison can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fp8_cache_runs_worker.py")
ROOT = WORKER.parents[2]
SCALINGS = {"tensorwise": 1, "rowwise": 2}  # weight quantizations per linear and step with the cache
SINGLE = {f"{cache}_{r}": (cache, r) for cache in ("off", "step", "trainer") for r in SCALINGS}
SINGLE["fit_tensorwise"] = ("fit", "tensorwise")


def run(tmp: Path, runs: dict, nproc: int = 1, *layout: str) -> dict:
    """{name: (cache, recipe)} trained in one process (or one torchrun): {name: result}."""
    out = tmp / "runs.json"
    cmd = [str(WORKER), "--out", str(out), "--dir", str(tmp), *layout]
    cmd[3:3] = [f"--training={name}:{cache}:{recipe}" for name, (cache, recipe) in runs.items()]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{sorted(runs)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    got = json.loads(out.read_text())
    assert sorted(got) == sorted(runs)
    return got


def curve(result: dict) -> list[tuple[float, float]]:
    return [(row["loss"], row["grad_norm"]) for row in result["history"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("fp8_cache"), SINGLE)


@pytest.mark.parametrize("recipe", list(SCALINGS))
def test_cached_run_quantizes_once_per_step_and_trains_identically(single, recipe):
    got, ref = single[f"step_{recipe}"], single[f"off_{recipe}"]
    once = got["linears"] * SCALINGS[recipe]
    assert got["micro_batches"] == 4 and len(got["per_step"]) == 3
    assert got["per_step"] == [once] * 3
    assert ref["per_step"] == [once * 4] * 3  # what the cache saves: one per micro-batch
    assert curve(got) == curve(ref)


def test_cached_tensor_parallel_run_trains_identically(tmp_path):
    """Under TP the amax all-reduce of a cached weight is skipped on every rank alike. Per row with
    sequence parallelism: the recipe and layout whose weight scalings use the TP group in forward and
    dgrad (the per-tensor recipe is left to the single-process test)."""
    layout = ("parallel.tp=2", "parallel.sequence_parallel=true")
    got = run(tmp_path, {"off": ("off", "rowwise"), "step": ("step", "rowwise")}, 2, *layout)
    assert got["step"]["per_step"] == [got["step"]["linears"] * SCALINGS["rowwise"]] * 3
    assert got["off"]["per_step"] == [got["step"]["linears"] * SCALINGS["rowwise"] * 4] * 3
    assert curve(got["step"]) == curve(got["off"])


def test_a_scope_across_optimizer_steps_trains_on_stale_weights(single):
    stale = single["fit_tensorwise"]
    assert stale["per_step"][1:] == [0, 0]
    assert curve(stale) != curve(single["off_tensorwise"])


@pytest.mark.parametrize("recipe", list(SCALINGS))
def test_the_trainer_opens_the_scope_itself(single, recipe):
    got = single[f"trainer_{recipe}"]
    assert got["per_step"] == [got["linears"] * SCALINGS[recipe]] * 3
    assert curve(got) == curve(single[f"off_{recipe}"])
