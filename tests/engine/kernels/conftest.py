"""The Triton-interpreter test modules run in a child pytest process of their own.

Those modules set TRITON_INTERPRET=1 at import (Triton reads it when a kernel is decorated), and an
environment variable set at import lasts for the whole process: every later test would run with the
interpreter on. So in the ordinary pytest process each of them is collected as one test that starts
`python -m pytest <module> -q` with TRITON_INTERPRET=1 (and POLAR_INTERPRETER_CHILD=1) and passes when
that child passes, printing the child's output when it fails. Inside the child the module is
collected and run as usual. `python -m pytest tests -q` therefore still runs and reports them, and
`python -m pytest tests/engine/kernels/test_reward_readout.py -q` does too, in a child of its own.
One test of such a module, by node id, runs in a process set up as the child is:
`POLAR_INTERPRETER_CHILD=1 TRITON_INTERPRET=1 python -m pytest tests/engine/kernels/test_x.py::test_y`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# The modules that switch the interpreter on at import (tests/engine/kernels/test_interpreter_isolation.py
# checks that no other test module under tests/ does).
INTERPRETED = ("test_contrastive_loss.py", "test_reward_readout.py", "test_shared_prefix_attention.py",
               "test_shared_prefix_fuzz.py")
CHILD_FLAG = "POLAR_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
# What the parent process started with, for the isolation test to compare against.
STARTED_WITH = os.environ.get("TRITON_INTERPRET")
CHILD_TIMEOUT_S = 900
# node id -> exit code of the child, for the isolation test
CHILD_RESULTS: dict[str, int] = {}


class InterpreterChildFailed(Exception):
    pass


class InterpreterModule(pytest.File):
    """An interpreter test module, seen from the parent process: one test that runs it in a child."""

    def collect(self):
        yield InterpreterRun.from_parent(self, name="in_interpreter_process")


class InterpreterRun(pytest.Item):
    def runtest(self):
        env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_FLAG: "1"})
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "pytest", str(self.path), "-q", "-rfE", "-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            sys.stdout.write(out)
            raise InterpreterChildFailed(f"{' '.join(cmd)}: no result after {CHILD_TIMEOUT_S} s") from None
        CHILD_RESULTS[self.nodeid] = proc.returncode
        # pytest prints the captured output of a failing test; the child's summary line is in it either way
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise InterpreterChildFailed(f"TRITON_INTERPRET=1 {' '.join(cmd[2:])} exited with {proc.returncode}")

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(InterpreterChildFailed):
            return f"{excinfo.value}\n(the child's output is in the captured stdout/stderr below)"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name} in a TRITON_INTERPRET=1 child process"


def pytest_pycollect_makemodule(module_path, parent):
    if not IN_CHILD and module_path.name in INTERPRETED:
        return InterpreterModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    """The isolation test runs after the children, so it sees the parent after they ran."""
    last = [it for it in items if it.path.name == "test_interpreter_isolation.py"]
    if last:
        items[:] = [it for it in items if it not in last] + last
