"""MFU's denominator: the card's measured bf16 peak (engine.progress.resolve_peak), cached per
card and torch version; CPU runs report no MFU. The training progress line (engine.progress.Progress):
rates over training time only (no evaluation, save or first-step warm-up), the ETA, its fields, and
TensorBoard's scalars."""
from __future__ import annotations

import json
import time

import pytest
import torch

from engine.progress import PEAK_ENV, peak_tflops, resolve_peak


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cache = tmp_path / "peak.json"
    calls = []

    def measure():
        calls.append(1)
        return 812.5

    assert resolve_peak("NVIDIA H100 80GB HBM3", measure, str(cache)) == 812.5
    assert resolve_peak("NVIDIA H100 80GB HBM3", measure, str(cache)) == 812.5
    assert len(calls) == 1
    assert json.loads(cache.read_text()) == {f"NVIDIA H100 80GB HBM3 | torch {torch.__version__}": 812.5}
    assert resolve_peak("NVIDIA A100-SXM4-80GB", lambda: 290.0, str(cache)) == 290.0  # another card: measured
    assert len(json.loads(cache.read_text())) == 2


def test_environment_overrides_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "700")
    assert resolve_peak("any", lambda: pytest.fail("measured despite the override"), str(tmp_path / "p.json")) == 700.0
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ValueError, match="POLAR_PEAK_TFLOPS='fast'"):
        resolve_peak("any", lambda: 1.0, str(tmp_path / "p.json"))


def test_unreadable_cache_is_remeasured(tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    assert resolve_peak("card", lambda: 5.0, str(cache)) == 5.0
    assert json.loads(cache.read_text())[f"card | torch {torch.__version__}"] == 5.0


def test_cpu_has_no_mfu():
    assert peak_tflops(torch.device("cpu")) is None


def test_paused_time_stays_out_of_the_step_time_and_in_the_eta(monkeypatch, capsys):
    import types

    import engine.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    p = progress.Progress(4, 0, True, None, None, 1)
    clock[0] = 1.0
    first = p.log(1, 0.5, 0.5, 1e-3, 1.0, tokens=100, real_tokens=100, triplets=10, flops=1e9)
    with p.paused():  # an evaluation, a checkpoint
        clock[0] += 50.0
    clock[0] += 1.0
    second = p.log(2, 0.5, 0.5, 1e-3, 1.0, tokens=100, real_tokens=100, triplets=10, flops=1e9)
    assert first["step_time_s"] == second["step_time_s"] == 1.0
    assert second["tokens_per_s"] == 100.0 and second["tflops_per_s"] == 1e-3
    assert "eta 0m52s" in capsys.readouterr().out.splitlines()[-1]  # 2 steps left at 26 s each, wall time


def test_dense_flops_count_the_lm_head_when_there_is_one():
    from engine.progress import dense_flops_per_token

    backbone = dense_flops_per_token(2, 32, 64, 2, 1)
    assert dense_flops_per_token(2, 32, 64, 2, 1, lm_head_vocab=100) == backbone + 3 * 2 * 32 * 100


def test_the_spec_sheet_figure_beside_the_measured_peak_tells_card_variants_apart():
    """The training line's "(spec sheet N)" matched "H100" anywhere in the name: an H100 PCIe (756.5
    TFLOP/s dense bf16) or NVL (835.5) was shown the SXM's 989."""
    from engine.progress import spec_sheet_tflops

    assert spec_sheet_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert spec_sheet_tflops("NVIDIA H100 PCIe") == 756.5
    assert spec_sheet_tflops("NVIDIA H100 NVL") == 835.5
    assert spec_sheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert spec_sheet_tflops("cpu") is None


class _Clock:
    """The perf_counter engine.progress reads, moved by the test."""

    def __init__(self, monkeypatch):
        import types

        import engine.progress as progress

        self.now = 0.0
        monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


COUNTS = dict(tokens=100, real_tokens=80, triplets=10, flops=1e12)  # per step


def _step(p, clock, seconds, first=False):
    clock.now += seconds
    if first:  # as Trainer.fit tells it
        p.first_step_done(**COUNTS)


def _window(steps: int) -> dict:
    return {k: v * steps for k, v in COUNTS.items()}


@pytest.mark.parametrize("start", [0, 500], ids=["new", "resumed"])
def test_the_first_steps_warm_up_stays_out_of_the_rates_and_the_eta(monkeypatch, capsys, start):
    """A fit's first step ran 100 s (compilation, lazy state), the next three 1 s each, an evaluation of 10 s
    after the third: the window's rates are those of steps 2-4 and the ETA counts the steps left (of a
    resumed run too) at the wall time per step since the first ended (3 + 10 s over 3 steps). Before, the
    first line's step time was 28.25 s and its ETA 6 x 113 / 4 s, and the 100 s stayed in the ETA's average
    until the end."""
    from engine.progress import Progress

    clock = _Clock(monkeypatch)
    p = Progress(start + 10, start, True, None, None, 1)
    _step(p, clock, 100.0, first=True)
    _step(p, clock, 1.0)
    _step(p, clock, 1.0)
    with p.paused():
        clock.now += 10.0
    _step(p, clock, 1.0)
    row = p.log(start + 4, 0.5, 0.5, 1e-3, 1.0, **_window(4))
    assert row["step_time_s"] == 1.0 and row["tokens_per_s"] == 80.0 and row["triplets_per_s"] == 10.0
    assert row["tflops_per_s"] == 1.0 and row["packing"] == 0.8 and "includes_warmup" not in row
    assert capsys.readouterr().out.rstrip().endswith("| eta 0m26s")  # 6 steps x 13/3 s
    _step(p, clock, 1.0)
    p.log(start + 5, 0.5, 0.5, 1e-3, 1.0, **_window(1))
    assert capsys.readouterr().out.rstrip().endswith("| eta 0m17s")  # 5 steps x 14/4 s


def test_a_window_of_the_first_step_alone_says_its_rates_include_the_warm_up(monkeypatch, capsys):
    """log.interval=1: the first line is the warm-up step's; it says so, in the line and the history row
    (which TensorBoard does not get), and the next line is a training step's."""
    from engine.progress import Progress

    clock = _Clock(monkeypatch)
    p = Progress(10, 0, True, None, None, 1)
    _step(p, clock, 100.0, first=True)
    first = p.log(1, 0.5, 0.5, 1e-3, 1.0, **_window(1))
    _step(p, clock, 1.0)
    second = p.log(2, 0.5, 0.5, 1e-3, 1.0, **_window(1))
    out = capsys.readouterr().out.splitlines()
    assert first["includes_warmup"] is True and first["step_time_s"] == 100.0
    assert out[0].endswith("| first step: rates include its warm-up"), out
    assert "includes_warmup" not in second and second["step_time_s"] == 1.0 and "warm-up" not in out[1]
    assert out[1].endswith("| eta 0m08s")  # 8 steps x 1 s


def test_tensorboard_gets_no_rates_of_a_window_of_the_warm_up_alone(monkeypatch, tmp_path):
    """log.interval=1: the first row's rates (a 100 s step time, 0.8 tok/s) went to TensorBoard unmarked,
    the curves' outlier; its loss, lr and the later rows' rates still go."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.progress import WINDOW_RATES, Progress

    clock = _Clock(monkeypatch)
    p = Progress(10, 0, True, str(tmp_path), 4.0, 1)
    _step(p, clock, 100.0, first=True)
    assert p.log(1, 0.5, 0.5, 1e-3, 1.0, **_window(1))["includes_warmup"]
    _step(p, clock, 1.0)
    p.log(2, 0.4, 0.5, 1e-3, 1.0, **_window(1))
    p.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    for rate in WINDOW_RATES:
        assert [e.step for e in acc.Scalars(f"train/{rate}")] == [2], rate
    assert acc.Scalars("train/step_time_s")[0].value == 1.0
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2] and [e.step for e in acc.Scalars("train/lr")] == [1, 2]


def test_every_line_shows_tflops_per_rank_and_mfu_na_without_a_peak(monkeypatch, capsys):
    """The line showed MFU on a GPU only, and no FLOP rate at all: its fields depended on the card. Now
    both are on every line: model TFLOP/s per rank (the row's tflops_per_s is the job's), and the MFU
    against the peak, n/a where there is none (CPU)."""
    from engine.progress import Progress

    for peak, mfu in ((None, "mfu n/a"), (4.0, "mfu 12.5%")):
        clock = _Clock(monkeypatch)
        p = Progress(10, 0, True, None, peak, 2)
        clock.now = 1.0
        row = p.log(1, 0.5, 0.5, 1e-3, 1.0, tokens=100, real_tokens=80, triplets=10, flops=1e12)
        line = capsys.readouterr().out
        assert f"| 0.5 TFLOP/s per rank | {mfu} | eta" in line, line
        assert row["tflops_per_s"] == 1.0 and row.get("mfu") == (None if peak is None else 0.125)


def test_tensorboard_gets_the_eval_lm_loss_the_line_shows(tmp_path):
    """An evaluation with the auxiliary LM loss printed `lm loss` but wrote only loss and pair accuracy to
    TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.progress import Progress

    p = Progress(10, 0, True, str(tmp_path), None, 1)
    p.log_eval(5, "held_out", {"loss": 0.6, "pair_accuracy": 0.7, "pairs": 64, "lm_loss": 4.5})
    p.log_eval(5, "seen", {"loss": 0.6, "pair_accuracy": 0.7, "pairs": 64})
    p.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert sorted(tags) == ["eval_held_out/lm_loss", "eval_held_out/loss", "eval_held_out/pair_accuracy",
                            "eval_seen/loss", "eval_seen/pair_accuracy"]
    assert [(e.step, e.value) for e in acc.Scalars("eval_held_out/lm_loss")] == [(5, 4.5)]


def test_a_slow_first_step_in_training_stays_out_of_the_first_lines_step_time(runtime, tmp_path, monkeypatch):
    """Trainer.fit tells progress where its first step ended: 1000 s added to the clock in the first step,
    log.interval=2, and neither line's step time holds it (before, the first's was ~500 s). A resumed fit's
    first step is its own warm-up, likewise."""
    import types

    import engine.progress
    from tests.engine.test_trainer import make_trainer

    offset = [0.0]
    monkeypatch.setattr(engine.progress, "time",
                        types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
    for exit_at, expected in (("train.exit_at_step=2", [2]), ("train.exit_at_step=0", [4])):
        trainer = make_trainer(runtime, tmp_path, "log.interval=2", exit_at)
        real = trainer.train_step

        def slow_first(real=real, calls=[]):
            calls.append(1)
            offset[0] += 1000.0 if len(calls) == 1 else 0.0
            return real()

        trainer.train_step = slow_first
        before = len(trainer.history)  # a resumed run's history holds the first fit's rows
        rows = trainer.fit()[before:]
        assert [r["step"] for r in rows] == expected
        assert all(r["step_time_s"] < 100 and "includes_warmup" not in r for r in rows), rows


@pytest.mark.parametrize("start", [0, 500], ids=["new", "resumed"])
def test_the_runs_training_only_figures_sum_its_windows_without_the_warm_up_and_the_pauses(monkeypatch, start):
    """summary.json's training-only figures (engine.pretrain) from the rows: a first step of 100 s, then
    two windows (1 s + 1 s, then 3 s + 1 s) with a 50 s evaluation between them, on 2 ranks of a 0.5
    TFLOP/s peak; an earlier fit's row and the evaluation's row are passed over. Before, the summary had
    tokens_per_second alone, over all 157 s."""
    from engine.progress import Progress, training_only

    clock = _Clock(monkeypatch)
    p = Progress(start + 10, start, True, None, 0.5, 2)
    rows = [{"step": start, "loss": 0.7, "step_time_s": 9.0, "tokens_per_s": 1.0, "triplets_per_s": 1.0,
             "tflops_per_s": 1.0}]  # the fit that saved the step resumed from
    _step(p, clock, 100.0, first=True)
    _step(p, clock, 1.0)
    _step(p, clock, 1.0)
    rows.append(p.log(start + 3, 0.5, 0.5, 1e-3, 1.0, **_window(3)))
    with p.paused():
        clock.now += 50.0
    rows.append({"step": start + 3, "eval": "held_out", "loss": 0.6, "pair_accuracy": 0.7, "pairs": 8})
    _step(p, clock, 3.0)
    _step(p, clock, 1.0)
    rows.append(p.log(start + 5, 0.5, 0.5, 1e-3, 1.0, **_window(2)))
    got = training_only(rows, start, world_size=2)
    # 4 steps in 6 s: 80 real tokens, 10 groups and 1 TFLOP each; 4 TFLOP / 6 s / 2 ranks over 0.5
    assert got == pytest.approx({"train_only_seconds": 6.0, "train_only_steps": 4, "train_tokens_per_s": 320 / 6,
                                 "train_groups_per_s": 40 / 6, "tflops_per_s_per_rank": 4 / 6 / 2,
                                 "mfu": 4 / 6 / 2 / 0.5})
    assert training_only(rows[:1], start, 2)["train_tokens_per_s"] is None  # nothing of this fit measured


def test_a_fit_whose_only_window_is_its_warm_up_measures_no_training_alone(monkeypatch):
    from engine.progress import Progress, training_only

    clock = _Clock(monkeypatch)
    p = Progress(1, 0, True, None, None, 1)
    _step(p, clock, 100.0, first=True)
    row = p.log(1, 0.5, 0.5, 1e-3, 1.0, **_window(1))
    assert row["includes_warmup"]
    assert training_only([row], 0, 1) == {"train_only_seconds": 0.0, "train_only_steps": 0, "train_tokens_per_s": None,
                                          "train_groups_per_s": None, "tflops_per_s_per_rank": None, "mfu": None}


def test_scoring_lines_keep_coming_when_the_wall_clock_is_set_back(monkeypatch, capsys):
    """polar score's progress (engine.progress.scoring_progress) read the wall clock: set back an hour
    (NTP, a VM resumed from a snapshot) after its start, it printed no line, nor any rate or ETA, for an
    hour of scoring. It measures on the steady clock: a line every `every_s`, the rate over the seconds
    scored."""
    import types

    import engine.progress as progress

    wall, steady = [10_000.0], [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(time=lambda: wall[0], monotonic=lambda: steady[0],
                                                                perf_counter=lambda: steady[0]))
    report = progress.scoring_progress(1.0, True, unit="lines")
    wall[0] -= 3600.0
    for done in (10, 20):
        wall[0] += 2.0
        steady[0] += 2.0
        report(done, 100)
    assert capsys.readouterr().out.splitlines() == ["scoring: 10/100 lines | 5.00 lines/s | eta 0m18s",
                                                    "scoring: 20/100 lines | 5.00 lines/s | eta 0m16s"]


def test_a_tensorboard_file_that_cannot_be_written_stops_the_scalars_not_the_run(monkeypatch, tmp_path, capsys):
    """The events file fills its disk after the run started (here: it becomes /dev/full): TensorBoard's
    writer thread keeps the error and raised it at the next scalar or at close, in the training loop, and
    close comes before the run's final save. The progress lines go on, TensorBoard is said to stop once
    (on stderr), and closing raises nothing."""
    import os

    from engine.progress import Progress

    import threading

    # the interpreter's own report of a thread's error (pytest puts a hook of its own in its place)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    clock = _Clock(monkeypatch)
    p = Progress(10, 0, True, str(tmp_path), None, 1)
    _step(p, clock, 1.0, first=True)
    p.log(1, 0.5, 0.5, 1e-3, 1.0, **_window(1))
    p.writer.flush()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    events.unlink()
    os.symlink("/dev/full", events)
    for step in (2, 3):
        _step(p, clock, 1.0)
        p.log(step, 0.4, 0.5, 1e-3, 1.0, **_window(1))
        p.log_eval(step, "held_out", {"loss": 0.5, "pair_accuracy": 0.5, "pairs": 10})
    p.close()
    out, err = capsys.readouterr()
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step")] == [
        "step      1/10", "step      2/10", "step      3/10"], out
    assert err.count("tensorboard: could not write to ") == 1 and "No space left on device" in err, err
    assert err.rstrip().endswith("no more scalars are written; the run goes on"), err
    # the writer thread's own failure (it appends each scalar) printed a traceback as if the run had crashed
    assert "Traceback" not in err and "Exception in thread" not in err, err
