"""Several runs of an entry point's main (engine/pretrain.py, engine/finetune.py) one after the other in
one process: starting python, torch and megatron is most of a tiny run's time, so the runs of a test
module that need no process of their own (no signal, kill, restart or launcher around them) share one.

Each run meets its entry as the command line does: its arguments, working directory and environment
additions, its own stdout and stderr (file descriptors 1 and 2, so what a library or a child process
writes there is the run's too) and its exit status (main's return, a SystemExit's code; an exception
out of main is 1 with its traceback on the run's stderr, as the interpreter would end). Every run sets
up and tears down its own process group and megatron state (the entry's shutdown_runtime, or
released_on_error for a run stopped by an error), as in a process of its own.

    results = entry_runs.launch(tmp, [entry_runs.run("ft", "engine.finetune", *argv, cwd=tmp), ...])
    results["ft"].returncode, results["ft"].stdout, results["ft"].stderr  # a CompletedProcess each
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, entry: str, *argv: str, cwd: str | Path, env: dict | None = None,
        patch: list | None = None) -> dict:
    """One run of a launch: `entry`'s main (a module, "engine.finetune"; "module:function" for another
    function taking the same argv) with `argv`, in `cwd`, with `env` set in the launch's environment for
    this run only (a None value: the variable unset); `patch`: ["module:factory", *arguments], a context
    manager the run goes inside (tests/engine/score_runs.py's)."""
    return {"name": name, "entry": entry, "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env or {},
            "patch": patch}


def launch(folder: Path, runs: list, label: str = "runs", timeout: float = 900, env: dict | None = None) -> dict:
    """The runs in one process, in order (their outputs in `folder`; `env` added to its environment);
    -> {name: CompletedProcess}. A launch that ends before its last run fails the test with its own output."""
    import pytest

    spec = folder / f"{label}.runs.json"
    spec.write_text(json.dumps(runs, default=str))
    # stdin /dev/null: no run reads the caller's (under pytest-xdist a worker's stdin is its channel)
    proc = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"{label}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    done = {}
    for r in runs:
        out = _outputs(spec, r["name"])
        done[r["name"]] = subprocess.CompletedProcess(
            [r["entry"], *r["argv"]], int(out["code"].read_text()), out["out"].read_text(), out["err"].read_text())
    return done


def _outputs(spec: Path, name: str) -> dict:
    return {kind: spec.with_name(f"{spec.name.removesuffix('.runs.json')}.{name}.{kind}")
            for kind in ("out", "err", "code")}


def exit_status(call) -> int:
    """call()'s result as the status of a process ending with it: a SystemExit's code (a text printed on
    stderr and 1, as the interpreter does), an exception's traceback on stderr and 1."""
    import traceback

    try:
        code = call()
    except SystemExit as x:
        if x.code is None or isinstance(x.code, int):
            return x.code or 0
        print(x.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return code or 0


def _patch(patch: list | None):
    import contextlib
    import importlib

    if not patch:
        return contextlib.nullcontext()
    module, _, factory = patch[0].partition(":")
    return getattr(importlib.import_module(module), factory)(*patch[1:])


def _one(spec: Path, r: dict) -> None:
    import importlib

    name, _, function = r["entry"].partition(":")
    module = importlib.import_module(name)
    out = _outputs(spec, r["name"])
    kept_env, kept_cwd, kept_argv = dict(os.environ), os.getcwd(), sys.argv
    sys.stdout.flush()
    sys.stderr.flush()
    kept_fds = os.dup(1), os.dup(2)
    with open(out["out"], "w") as o, open(out["err"], "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        for key, value in r["env"].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.chdir(r["cwd"])
        sys.argv = [module.__file__, *r["argv"]]
        try:
            with _patch(r.get("patch")):
                code = exit_status(lambda: getattr(module, function or "main")(r["argv"]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(kept_fds[0], 1)
            os.dup2(kept_fds[1], 2)
            for fd in kept_fds:
                os.close(fd)
            os.environ.clear()
            os.environ.update(kept_env)
            os.chdir(kept_cwd)
            sys.argv = kept_argv
    out["code"].write_text(str(code))


def main() -> None:
    spec = Path(sys.argv[1])
    for r in json.loads(spec.read_text()):
        _one(spec, r)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
