"""Several `polar score` runs one after another in one process, each with stdout and stderr of its own:
`python -m tests.engine.score_runs PLAN.json`. A process that imports torch and megatron spends seconds
of CPU before it scores a line, where the tests' tiny model scores in a fraction of that; `polar score`
at --nproc 1 runs engine.score in the caller's process (polar/launch.py), and runs that fail leave the
process ready for the next (tests/engine/test_score_chunks.py, the runs in one process).

PLAN.json: a list of runs, each {"argv": polar's arguments ("score", ...), "cwd", "stdout", "stderr",
"patch": null or [name, *arguments] (PATCHES)}; the exit statuses, in order, go to PLAN.json.codes.
Each run's file descriptors 1 and 2 go to its files, so that what C code or a thread writes lands there too;
an exception out of a run is printed there as the interpreter prints it and counts as status 1."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import traceback
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


PATCHES = {"unchecked": unchecked, "changed": changed, "watched": watched}


@contextlib.contextmanager
def _output_to(stdout: str, stderr: str):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, was in zip((1, 2), saved):
            os.dup2(was, fd)
            os.close(was)


def _status(run) -> int:
    try:
        return run()
    except SystemExit as e:  # as the interpreter ends on it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1


def main(plan_path: str) -> None:
    from polar.cli import main as polar

    codes = []
    for run in json.loads(open(plan_path).read()):
        os.chdir(run["cwd"])
        patch = PATCHES[run["patch"][0]](*run["patch"][1:]) if run.get("patch") else contextlib.nullcontext()
        with _output_to(run["stdout"], run["stderr"]), patch:
            codes.append(_status(lambda: polar(run["argv"])))
    with open(f"{plan_path}.codes", "w") as f:
        json.dump(codes, f)


def in_one_process(tmp: Path, runs: list, env: dict) -> list:
    """`runs` ({"argv", "cwd", "patch" (optional)}) in one process of this module: a
    subprocess.CompletedProcess for each, with its exit status, stdout and stderr."""
    plan = tmp / "plan.json"
    for i, run in enumerate(runs):
        run.update(stdout=str(tmp / f"run{i}.out"), stderr=str(tmp / f"run{i}.err"))
    plan.write_text(json.dumps(runs, default=str))
    proc = subprocess.run([sys.executable, "-m", "tests.engine.score_runs", str(plan)], env=env,
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads(Path(f"{plan}.codes").read_text())
    return [subprocess.CompletedProcess(run["argv"], code, Path(run["stdout"]).read_text(),
                                        Path(run["stderr"]).read_text()) for run, code in zip(runs, codes)]


if __name__ == "__main__":
    main(sys.argv[1])
