"""RUN_DIR/metrics.jsonl (engine/metrics_file.py) and wandb logging (engine/wandb_log.py, offline): the
progress and evaluation figures, each step once after a resume from before the last logged step, the same
values as an uninterrupted run's; every line written kept by a killed process, a line cut short dropped."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from engine import checkpoint, metrics_file
from engine.config import ConfigError, EngineConfig
from engine.config_load import load_config
from tests.engine.dist_worker import random_groups
from tests.engine.test_trainer import make_trainer
from tests.engine.wandb_records import finished_runs, history

RTOL, ATOL = 2e-5, 1e-6  # the resume tests' parity tolerance (tests/engine/test_optim_fused_resume.py)
RUN = ["train.steps=4", "checkpoint.save_interval=2", "train.eval_interval=2"]
FIGURES = ("loss", "pair_acc", "lr", "grad_norm")  # what a resume reproduces (the rates are the machine's)


def _held():
    from engine.data import PackedGroups

    return {"held": PackedGroups(random_groups(5, 10, 64, 64), 64)}


def _kill_after_step_4_with_the_newest_checkpoint_at_2(run_dir):
    """What a kill after step 4's line, before its save finished, leaves: the newest checkpoint is step 2."""
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / checkpoint.LATEST).write_text("step_00000002")


def test_a_resumed_runs_file_holds_each_step_once_with_an_uninterrupted_runs_values(runtime, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    trainer = make_trainer(runtime, whole, *RUN, evals=_held())
    trainer.fit()
    rows = metrics_file.read(whole / metrics_file.NAME)
    train = [r for r in rows if r["kind"] == "train"]
    # each progress window's row whole (the history's), and each evaluation's result
    assert [{k: v for k, v in r.items() if k not in ("kind", "time")} for r in train] == \
        [r for r in trainer.history if "eval" not in r]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["set"], r["step"]) for r in evals] == [("held", 2)], rows
    assert {k: evals[0][k] for k in ("loss", "pair_accuracy", "pairs")} == \
        {k: v for k, v in trainer.history[2].items() if k in ("loss", "pair_accuracy", "pairs")}
    assert train[0]["includes_warmup"] is True and all(r["tokens_per_s"] > 0 for r in train)

    shutil.copytree(whole, cut)
    _kill_after_step_4_with_the_newest_checkpoint_at_2(cut)
    with open(cut / metrics_file.NAME, "a") as f:
        f.write('{"kind": "train", "step": 5, "loss": 0.6')  # a line the kill cut short
    capsys.readouterr()
    resumed = make_trainer(runtime, cut, *RUN, evals=_held())
    assert resumed.step == 2
    resumed.fit()
    assert "line 6 is not a whole JSON object (a write cut short by a kill): dropped" in capsys.readouterr().err
    again = metrics_file.read(cut / metrics_file.NAME)
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in rows] == \
        [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4)]
    for a, b in zip(rows, again):
        for k in (FIGURES if a["kind"] == "train" else ("loss", "pair_accuracy")):
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), (k, a, b)
    # the stopped run's lines up to the checkpoint stay as they were
    assert again[:3] == rows[:3]


def test_metrics_file_false_writes_none(runtime, tmp_path):
    make_trainer(runtime, tmp_path, "train.steps=1", "checkpoint.save_at_end=false", "log.metrics_file=false").fit()
    assert not (tmp_path / metrics_file.NAME).exists()


KILLED = """
import os, signal, sys
from engine.metrics_file import MetricsFile
m = MetricsFile(sys.argv[1], 0)
for step in range(1, 4):
    m.train({"step": step, "loss": 1.0 / step, "grad_norm": float("inf") if step == 2 else 1.0})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_keeps_every_line_and_non_finite_figures_are_null(tmp_path):
    """SIGKILL runs no exit handler and flushes no buffer: each line is out of the process as written. A
    skipped step's infinite grad norm was written as Infinity, which strict JSON readers refuse."""
    path = tmp_path / metrics_file.NAME
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    lines = path.read_text().splitlines()
    assert len(lines) == 3

    def strict(word):
        raise ValueError(word)

    rows = [json.loads(line, parse_constant=strict) for line in lines]
    assert [(r["step"], r["grad_norm"]) for r in rows] == [(1, 1.0), (2, None), (3, 1.0)]


def test_a_new_run_in_an_old_run_directory_starts_the_file_afresh_and_a_torn_line_is_dropped(tmp_path, capsys):
    path = tmp_path / metrics_file.NAME
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "set": "a", "step": 1}\n{"kind": "tr')
    m = metrics_file.MetricsFile(path, 1)  # resumed at 1: the torn line goes, the file stays whole JSON
    m.close()
    assert [r["kind"] for r in metrics_file.read(path)] == ["train", "eval"]
    assert path.read_text().endswith("}\n")
    assert "line 3 is not a whole JSON object" in capsys.readouterr().err
    metrics_file.MetricsFile(path, 0).close()  # a new run (no checkpoint) in the same directory
    assert path.read_text() == ""


def test_a_resumed_run_drops_an_earlier_starts_final_lines(tmp_path):
    """A start that resumes at the step its final lines are at (nothing left to train: the same command after
    the run finished) writes them again; one that trains on writes its own at a later step: either way the
    file holds one final line a set, summary.json's (tests/engine/test_pretrain_cli.py runs both)."""
    path = tmp_path / metrics_file.NAME
    path.write_text('{"kind": "train", "step": 2, "loss": 0.5}\n'  # a run stopped by exit_at_step=2 at an eval step
                    '{"kind": "eval", "set": "held", "step": 2, "pair_accuracy": 0.75}\n'
                    '{"kind": "eval", "set": "held", "step": 2, "final": true, "pair_accuracy": 0.75}\n')
    metrics_file.MetricsFile(path, 2).close()
    assert [(r["kind"], r["step"], r.get("final")) for r in metrics_file.read(path)] == \
        [("train", 2, None), ("eval", 2, None)]


def test_wandb_settings_are_checked_at_start_up(monkeypatch):
    with pytest.raises(ConfigError, match="log.wandb_name='mine' has no effect without log.wandb_project"):
        load_config(EngineConfig, None, ["log.wandb_name=mine"])
    with pytest.raises(ConfigError, match="log.wandb_project='a/b': a wandb project's name may not"):
        load_config(EngineConfig, None, ["log.wandb_project=a/b"])
    assert load_config(EngineConfig, None, ["log.wandb_project=polar"]).log.wandb_project == "polar"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError) as err:
        load_config(EngineConfig, None, ["log.wandb_project=polar"])
    assert "log.wandb_project=polar: logging to Weights & Biases needs the package wandb, which is not installed: " \
           "pip install wandb" in str(err.value), str(err.value)


def _wandb_train(row: dict) -> dict:
    """What wandb gets of a metrics line: TensorBoard's scalars (no rates of a window of the warm-up alone)."""
    from engine.progress import WINDOW_RATES

    left_out = ("kind", "time", "step", "includes_warmup", *(WINDOW_RATES if row.get("includes_warmup") else ()))
    return {f"train/{k}": v for k, v in row.items() if k not in left_out}


def test_wandb_offline_logs_what_the_metrics_file_holds_and_a_resume_continues_its_run(runtime, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here; the same records go to a server online
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = [*RUN, "log.wandb_project=polar-test"]
    make_trainer(runtime, tmp_path, *run, evals=_held()).fit()
    rows = metrics_file.read(tmp_path / metrics_file.NAME)
    (first,) = finished_runs(tmp_path, 1)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert first.name == f"run-{run_id}.wandb"
    logged = [{k: v for k, v in r.items() if not k.startswith("_")} | {"_step": r["_step"]} for r in history(first)]
    expected = {}  # wandb keeps one row per step: the evaluation at a step joins the step's training row
    for r in rows:
        values = _wandb_train(r) if r["kind"] == "train" else \
            {f"eval_{r['set']}/{k}": r[k] for k in ("loss", "pair_accuracy", "lm_loss") if k in r}
        expected.setdefault(r["step"], {"_step": r["step"]}).update(values)
    assert logged == list(expected.values())

    _kill_after_step_4_with_the_newest_checkpoint_at_2(tmp_path)
    time.sleep(1.1)  # an offline run's directory is named by the second it started
    make_trainer(runtime, tmp_path, *run, evals=_held()).fit()
    first_again, second = finished_runs(tmp_path, 2)
    assert first_again == first and second.name == f"run-{run_id}.wandb"  # the same wandb run, continued
    assert [r["_step"] for r in history(second)] == [3, 4]


def test_a_resumed_wandb_run_gets_none_of_the_steps_it_holds_and_is_told_once(tmp_path, monkeypatch, capsys):
    """A resume 50 steps back from the stopped run's last logged one (100): online, wandb ignores every log to a
    step before the run's, with a warning of its own each time (one per progress line and evaluation: 50 and
    more). Those steps are left out here, said once. Online, the resumed run starts at its last logged step + 1
    (wandb.init's starting_step, from the server: wandb's core/internal/runbranch/resume.go); offline no start
    knows another's steps (each start's file holds its own), so that step is given here."""
    import wandb

    from engine.wandb_log import WandbLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "starting_step", property(lambda run: 101))
    log = WandbLog("polar-test", "", "", tmp_path)
    for step in range(51, 111):
        log.log({"train/loss": 1 / step}, step)
    log.close()
    out = capsys.readouterr().out
    assert out.count("wandb:") == 1, out
    assert f"wandb: the run {(tmp_path / 'wandb_run_id').read_text().strip()} holds steps up to 100, logged by an " \
           "earlier start, and keeps their figures: this start's steps 51-100 are not logged there" in out, out
    (run,) = finished_runs(tmp_path, 1)
    assert [r["_step"] for r in history(run)] == list(range(101, 111))
