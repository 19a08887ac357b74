"""engine.profiling: a window of training steps traced by torch.profiler on the ranks asked for, the
same training as without it, the window cut short by train.steps or an early stop, a resumed run
behind it, and the refusals that need the machine or the world size. The CUDA-only parts (cuda mode,
memory snapshots, the snapshot at an out-of-memory error): tests/gpu/test_profiling_gpu.py."""
from __future__ import annotations

import json

import pytest
import torch

from engine.config import ConfigError
from tests.engine.parity import NO_END_SAVE, assert_same_run, run_worker
from tests.engine.test_trainer import make_trainer


def trace_files(run_dir) -> list[str]:
    root = run_dir / "profile"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def profiler_steps(path) -> list[str]:
    """The profiler's step markers in a Chrome trace, in order."""
    events = json.loads(path.read_text())["traceEvents"]
    return sorted((e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")),
                  key=lambda name: int(name.split("#")[1]))


def test_a_two_rank_run_traces_the_window_on_the_rank_asked_for_and_trains_as_without_it(reference):
    """DP2, profile_ranks=[1], the window [2, 4) after its warm-up step 1: rank 1 alone writes a trace,
    holding steps 2 and 3 exactly (the warm-up's events are dropped), and every step's loss and gradient
    norm are the single-process reference's (tests/engine/parity.py)."""
    tmp, init, ref = reference
    got = run_worker(tmp, "profiled", 2, NO_END_SAVE, "train.profile=torch", "train.profile_start=2",
                     "train.profile_end=4", "train.profile_ranks=[1]", init=init, evaluate=False)
    assert_same_run(ref, got)
    assert trace_files(tmp / "profiled") == ["rank1/steps_2-3.pt.trace.json"]
    trace = tmp / "profiled" / "profile" / "rank1" / "steps_2-3.pt.trace.json"
    assert profiler_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "cpu_op" and e["name"].startswith("aten::") for e in events)  # the step's ops


def test_a_window_cut_short_is_written_and_a_resume_profiles_only_what_lies_ahead(runtime, tmp_path):
    """The window [2, 6) of a 4-step run: the start says only steps 2-4 can be profiled; an exit at step 3
    writes the trace of steps 2-3 when the loop ends. The resumed run profiles step 4 (no warm-up: it
    trains no step before it); resumed again at the end, it says once that the window is behind it and
    writes nothing. A run that does not profile says nothing and writes nothing."""
    window = ("train.profile=torch", "train.profile_start=2", "train.profile_end=6")

    def fit(*overrides):
        lines = []
        make_trainer(runtime, tmp_path, *window, *overrides,
                     log=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
        return [x for x in lines if "profil" in x]

    first = fit("train.exit_at_step=3")
    assert first[0] == ("profiling: the window (train.profile_start=2, train.profile_end=6) reaches past "
                        "train.steps=4: only steps 2-4 can be profiled"), first
    assert first[1].startswith("profiling steps 2-4 on rank 0: torch.profiler"), first
    trace = tmp_path / "profile" / "rank0" / "steps_2-3.pt.trace.json"
    assert first[2] == f"profiling: wrote the trace of steps 2-3 on rank 0 to {trace}" and len(first) == 3, first
    assert profiler_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]

    second = fit()
    assert "reaches past the resumed step 3 and train.steps=4: only step 4 can be profiled" in second[0], second
    assert profiler_steps(tmp_path / "profile" / "rank0" / "steps_4.pt.trace.json") == ["ProfilerStep#4"]

    third = fit()
    assert third == ["profiling: the window (train.profile_start=2, train.profile_end=6) is behind the resumed "
                     "step 4: nothing is profiled"], third
    assert trace_files(tmp_path) == ["rank0/steps_2-3.pt.trace.json", "rank0/steps_4.pt.trace.json"]

    lines = []
    make_trainer(runtime, tmp_path / "plain", "checkpoint.resume=false",
                 log=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
    assert not [x for x in lines if "profil" in x] and not (tmp_path / "plain" / "profile").exists(), lines


def test_a_run_stopped_after_the_warm_up_says_that_no_trace_was_written(runtime, tmp_path):
    """The window [3, 5), its warm-up step 2, and train.exit_at_step=2: torch.profiler goes from the warm-up
    to stopped without writing (nor calling the trace hook), and the window never opened; the run says so
    once instead of ending as if profiling were off."""
    lines = []
    make_trainer(runtime, tmp_path, "train.profile=torch", "train.profile_start=3", "train.profile_end=5",
                 "train.exit_at_step=2", log=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
    assert [x for x in lines if "profil" in x] == [
        "profiling: the run stopped before step 3, the window's first: no trace written on rank 0"], lines
    assert trace_files(tmp_path) == [] and not torch.autograd._profiler_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without CUDA")
@pytest.mark.parametrize("settings,message", [
    (["train.profile=cuda"], "train.profile=cuda starts and stops the CUDA profiler (for nsys), and this run has no "
                             "CUDA GPU"),
    (["train.memory_snapshot=true"], "train.memory_snapshot=true records the CUDA caching allocator's history, "
                                     "and this run has no CUDA GPU"),
    (["train.profile=torch", "train.profile_ranks=[0, 3, 5]"], "train.profile_ranks=[0, 3, 5]: rank(s) [3, 5] do "
                                                               "not exist in a run of 1 process(es)"),
], ids=["cuda", "memory_snapshot", "ranks"])
def test_what_the_machine_or_the_world_size_cannot_do_is_refused_before_the_model_is_built(runtime, tmp_path,
                                                                                           settings, message):
    with pytest.raises(ConfigError) as err:
        make_trainer(runtime, tmp_path, "checkpoint.resume=false", *settings)
    assert message in str(err.value)
    assert not (tmp_path / "checkpoints").exists()  # refused before the trainer looked at its checkpoints


def test_ranks_beyond_the_world_size_do_not_stop_a_run_that_does_not_profile(runtime, tmp_path):
    """A config written for a larger job, profiling off: nothing to refuse."""
    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", "train.profile_ranks=[8]")
    assert trainer.step == 0


def test_a_run_stopped_by_non_finite_steps_writes_the_window_it_trained(runtime, tmp_path):
    """train.lr=1e35: step 1 trains, steps 2 and 3 are skipped as non-finite and the run stops with
    NonFiniteError after step 3 (train.max_nonfinite_steps=2). The window [2, 5) was open: its trace of
    steps 2-3 is written before the error goes on (the steps a user profiles to see the non-finite ones), as
    the loop's end writes a window an early stop cut short."""
    from engine.nonfinite_steps import NonFiniteError

    trainer = make_trainer(runtime, tmp_path, "train.profile=torch", "train.profile_start=2", "train.profile_end=5",
                           "train.lr=1e35", "train.warmup_steps=0", "train.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError):
        trainer.fit()
    assert not torch.autograd._profiler_enabled()  # the profiler stopped with the run, not left recording
    assert trainer.step == 3 and [e["step"] for e in trainer.skipped_steps] == [2, 3], trainer.skipped_steps
    assert trace_files(tmp_path) == ["rank0/steps_2-3.pt.trace.json"]
    assert profiler_steps(tmp_path / "profile" / "rank0" / "steps_2-3.pt.trace.json") == ["ProfilerStep#2",
                                                                                        "ProfilerStep#3"]


def test_a_trace_that_cannot_be_written_does_not_stop_the_run(runtime, tmp_path):
    """The window [2, 3) of a 4-step run whose profile directory cannot be made (a file stands at its
    path; a full disk or a path that is not writable fails the same way): the trace written as the
    window closes after step 2 raised there, inside the training loop, and ended the run at step 2 for a
    side concern. The run trains its 4 steps and says on the rank that the trace was not written."""
    (tmp_path / "profile").write_text("in the way")
    lines = []
    trainer = make_trainer(runtime, tmp_path, "train.profile=torch", "train.profile_start=2", "train.profile_end=3",
                           log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    trainer.fit()
    assert trainer.step == 4 and not torch.autograd._profiler_enabled()
    said = [x for x in lines if "profil" in x]
    assert said[-1].startswith("profiling: could not write the trace of step 2 on rank 0 to "
                               f"{tmp_path / 'profile' / 'rank0' / 'steps_2.pt.trace.json'} ("), said
    assert said[-1].endswith("): the run is not stopped for it"), said
