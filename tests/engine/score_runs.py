"""Several `polar score` runs one after another in one process (in_one_process), each with stdout and
stderr of its own, and the changes to polar score a run can be made under (unchecked, changed, watched).
A process that imports torch and megatron spends seconds of CPU before it scores a line, where the tests'
tiny model scores in a fraction of that; `polar score` at --nproc 1 runs engine.score in the caller's
process (polar/launch.py), and runs that fail leave the process ready for the next
(tests/engine/test_score_chunks.py, the runs in one process). The runs themselves: tests/engine/entry_runs.py
(file descriptors 1 and 2 per run, exit statuses as the interpreter's)."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path


@contextlib.contextmanager
def unchecked():
    """polar score without its check of every line against --seq-length before the model loads
    (polar.score_length_check.first_too_long): a line too long is found where its chunk is scored."""
    import polar.score_length_check as check

    kept = check.first_too_long
    check.first_too_long = lambda *args: None
    try:
        yield
    finally:
        check.first_too_long = kept


@contextlib.contextmanager
def changed(change: str):
    """The input changed right after the check of every line (as by a producer still writing the
    file): `change`, Python, runs with `path` the checked file's."""
    import polar.score_input as si

    checked = si.survey_score_input

    def survey(path, on_error="fail"):
        found = checked(path, on_error)
        exec(change, {"path": path})
        return found

    si.survey_score_input = survey
    try:
        yield
    finally:
        si.survey_score_input = checked


@contextlib.contextmanager
def watched(log_path: str, chunks: int):
    """Each forward watched: does the next chunk's tokenization start while it runs? One word per
    forward in `log_path`: "overlapped", "not-overlapped", or "last" for the run's `chunks`-th."""
    import engine.scoring
    from engine.score import CheckpointScorer

    threads, seen = [], threading.Condition()
    groups, forward = CheckpointScorer.groups, engine.scoring.score
    forwards = [0]
    log = open(log_path, "w")

    def watched_groups(self, *a, **k):
        with seen:
            threads.append(threading.current_thread() is threading.main_thread())
            seen.notify_all()
        return groups(self, *a, **k)

    def watched_forward(*a, **k):
        out = forward(*a, **k)
        forwards[0] += 1
        if forwards[0] == chunks:  # no chunk after this one
            log.write("last\n")
        elif all(threads):  # every chunk tokenized in the main thread, which is here: nothing overlaps
            log.write("not-overlapped\n")
        else:
            with seen:
                ahead = seen.wait_for(lambda: len(threads) > forwards[0], timeout=30)
            log.write("overlapped\n" if ahead else "not-overlapped\n")
        log.flush()
        return out

    CheckpointScorer.groups, engine.scoring.score = watched_groups, watched_forward
    try:
        yield
    finally:
        CheckpointScorer.groups, engine.scoring.score = groups, forward
        log.close()


def in_one_process(tmp: Path, runs: list, env: dict) -> list:
    """`runs` ({"argv": polar's arguments, "cwd", "patch" (optional): [a patch of this module by name, *arguments]}) as
    `polar ARGV` in one process (tests/engine/entry_runs.py): a subprocess.CompletedProcess for each,
    with its exit status, stdout and stderr (`env`: the process's environment)."""
    from tests.engine import entry_runs

    planned = [entry_runs.run(f"run{i}", "polar.cli", *run["argv"], cwd=run["cwd"],
                              patch=[f"{__name__}:{run['patch'][0]}", *run["patch"][1:]] if run.get("patch") else None)
               for i, run in enumerate(runs)]
    done = entry_runs.launch(tmp, planned, label="score", env=env)
    return [done[p["name"]] for p in planned]
