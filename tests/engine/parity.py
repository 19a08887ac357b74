"""The parity harness: tests/engine/dist_worker.py runs (one process or under torchrun over gloo)
and their per-step comparison with the single-process reference run.

The reference (one process that saves its initial weights, then trains 4 steps from them) is a
session fixture (tests/engine/conftest.py): every parity module on a pytest worker compares against
the same run.

Most of a run's time is starting it (python, torch, megatron) and, by default, the checkpoint it saves
at the end: a run whose checkpoint nothing reads passes NO_END_SAVE, one whose evaluation nothing
compares `evaluate=False`; runs of one world size share one launch with run_layouts
(tests/engine/runs_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import runs_worker

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parents[2]
STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.lr=1e-2", "train.warmup_steps=1"]
RTOL, ATOL = 2e-5, 1e-6
NO_END_SAVE = "checkpoint.save_at_end=false"  # an early stop (exit step, stop file) still saves


def run_worker(tmp: Path, name: str, nproc: int, *overrides: str, init: str | None = None,
               extra_env: dict | None = None, refused: bool = False, evaluate: bool = True,
               save_init: str | None = None):
    """The run's result; with `refused`, the finished process of a run expected to fail. Without
    `evaluate` its "eval" is None; `save_init`: a directory for its initial weights, saved first."""
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(WORKER), "--out", str(out), f"run_dir={tmp / name}", *COMMON, *overrides]
    if init:
        cmd[2:2] = ["--init", init]
    if save_init:
        cmd[2:2] = ["--save-init", save_init]
    if not evaluate:
        cmd[2:2] = ["--no-eval"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if refused:
        assert proc.returncode != 0, f"{name} ran, expected to be refused:\n{proc.stdout[-3000:]}"
        return proc
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()) if out.exists() else {}


def run_layouts(tmp: Path, launch: str, nproc: int, layouts: dict, *overrides: str, init: str | None = None,
                no_eval: tuple = (), extra_env: dict | None = None) -> dict:
    """{name: [overrides]} of one world size trained one after another in ONE launch (runs_worker:
    megatron's parallel state rebuilt for each), each as run_worker would start it (run directory
    `tmp/name`, result `tmp/name.json`); -> {name: result}. `overrides` apply to all, before each run's
    own; the runs in `no_eval` skip evaluation; `extra_env` is set for the whole launch."""
    runs = [runs_worker.run(tmp, name, *overrides, *extra, init=init, evaluate=name not in no_eval)
            for name, extra in layouts.items()]
    log = runs_worker.launch(tmp, launch, nproc, runs, env=extra_env)
    return {name: runs_worker.result(tmp, name, log=log) for name in layouts}


def make_reference(tmp: Path):
    """(directory, initial checkpoint, reference run's result)."""
    init = str(tmp / "init")  # a checkpoint directory: init_from takes its newest step
    ref = run_worker(tmp, "ref", 1, NO_END_SAVE, save_init=init)
    return tmp, init, ref


def by_step(result: dict) -> dict:
    return {row["step"]: row for row in result["history"]}


def assert_same_run(ref: dict, got: dict, steps=range(1, STEPS + 1)):
    r, g = by_step(ref), by_step(got)
    for s in steps:
        assert g[s]["loss"] == pytest.approx(r[s]["loss"], rel=RTOL, abs=ATOL), f"loss at step {s}"
        assert g[s]["grad_norm"] == pytest.approx(r[s]["grad_norm"], rel=RTOL, abs=ATOL), f"grad norm at step {s}"
        assert g[s]["pair_acc"] == pytest.approx(r[s]["pair_acc"], abs=1e-9), f"pair accuracy at step {s}"


def assert_trains_and_evaluates_alike(ref: dict, got: dict):
    """A layout's run (from the reference's initial weights) trains and evaluates like the reference."""
    assert_same_run(ref, got)
    assert got["eval"]["pair_accuracy"] == pytest.approx(ref["eval"]["pair_accuracy"], abs=1e-9)
    assert got["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=RTOL)


def layouts_by_world(tmp: Path, launch: str, layouts: dict, *overrides: str, init: str | None = None,
                     no_eval: tuple = ()) -> dict:
    """{name: (nproc, [overrides])}: run_layouts once per world size; -> {name: result}."""
    got = {}
    for nproc in sorted({n for n, _ in layouts.values()}):
        group = {name: extra for name, (n, extra) in layouts.items() if n == nproc}
        got.update(run_layouts(tmp, f"{launch}_world{nproc}", nproc, group, *overrides, init=init,
                               no_eval=no_eval))
    return got
