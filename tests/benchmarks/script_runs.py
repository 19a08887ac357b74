"""Runs benchmark scripts as `python benchmarks/X.py ARGS` would, many in one process.

Tests that only look at a script's command line (its --help, its usage errors) spent most of each run
importing torch again (~1.5-2.5 s a script, about 50 runs a suite); here one child process imports it
once and runs each script's `__main__` in turn with its argv, sys.path[0] and working directory as
the command line gives them. A script's exit is its SystemExit's code; an exception escaping it is
the traceback Python would print, with code 1.

    python tests/benchmarks/script_runs.py CASES.json RESULTS.json
CASES.json: [[script path, [args], working directory], ...]; RESULTS.json: [{code, stdout, stderr}, ...].
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository's tests package
from tests.engine.entry_runs import exit_status  # noqa: E402


def run_one(script: str, args: list[str], cwd: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.path[0], os.getcwd()
    sys.argv, sys.path[0] = [script, *args], str(Path(script).parent)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_status(lambda: runpy.run_path(script, run_name="__main__") and None)
    finally:
        sys.argv, sys.path[0] = saved[0], saved[1]
        os.chdir(saved[2])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run_scripts(cases: list[tuple[str, list[str], str]], tmp: Path, env: dict | None = None,
                timeout: float = 600) -> list[dict]:
    """Each case's {code, stdout, stderr}, from one child process (env: added to os.environ)."""
    spec, results = tmp / "script_cases.json", tmp / "script_results.json"
    spec.write_text(json.dumps([[str(s), list(a), str(c)] for s, a, c in cases]))
    proc = subprocess.run([sys.executable, __file__, str(spec), str(results)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0 and results.exists(), f"the runner failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return json.loads(results.read_text())


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = [run_one(*case) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
