"""The Triton interpreter stays inside the child processes of tests/engine/kernels/conftest.py.

Runs after the interpreter modules' children (the conftest orders it last), so it sees this pytest
process after they were collected and run: TRITON_INTERPRET is as the process started, the modules
were never imported here, and each ran in its child."""
import os
import re
import sys
from pathlib import Path

import pytest

from tests.engine.kernels import conftest

TESTS = Path(__file__).resolve().parents[2]
# the conftest's collection hook turns only its own directory's modules into child runs: a test file of the
# same name elsewhere (tests/engine/model/ had one) is an ordinary module, run in this process by design
KERNELS = Path(conftest.__file__).resolve().parent
SETS_INTERPRETER = re.compile(r"""environ\[\s*["']TRITON_INTERPRET["']\s*\]\s*=\s*["']1["']""")

pytestmark = pytest.mark.skipif(conftest.IN_CHILD, reason="checks the parent pytest process")


def test_no_interpreter_in_the_parent_process(request):
    ours = [it for it in request.session.items
            if it.path.resolve().parent == KERNELS and it.path.name in conftest.INTERPRETED]
    if not ours:
        pytest.skip("no interpreter module selected in this session (run tests/engine/kernels as a whole)")
    assert all(isinstance(it, conftest.InterpreterRun) for it in ours), [type(it) for it in ours]
    assert os.environ.get("TRITON_INTERPRET") == conftest.STARTED_WITH
    imported = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None)
                and Path(m.__file__).resolve().parent == KERNELS and Path(m.__file__).name in conftest.INTERPRETED]
    assert not imported, imported
    # their children ran before this test (the conftest orders it last); pass or fail is their own report
    assert {it.nodeid for it in ours} <= set(conftest.CHILD_RESULTS), conftest.CHILD_RESULTS


def test_every_module_that_sets_the_interpreter_is_isolated():
    """A new test module that switches the interpreter on at import must be listed in the conftest."""
    setters = sorted(p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")
                     if SETS_INTERPRETER.search(p.read_text()))
    assert setters == [f"engine/kernels/{name}" for name in sorted(conftest.INTERPRETED)]
