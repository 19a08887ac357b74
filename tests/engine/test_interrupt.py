"""engine.interrupt: a signal held back over a block that must not be cut (Interrupts.whole), and a
second signal while that block hangs; the repeat window taken from $POLAR_SIGTERM_REPEAT_S."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.interrupt import exit_status
from engine.stop_signal import REPEAT_ENV

ROOT = Path(__file__).parents[2]

# a block held whole that hangs (an append to a stalled file system): Ctrl-C in it, and again later
HELD_BLOCK = """
import os, signal, sys, time
import engine.interrupt as interrupt
# an ignored SIGINT is inherited across exec, and pytest-xdist's workers ignore it: the signal the
# tool gets from a terminal is the default one
signal.signal(signal.SIGINT, signal.default_int_handler)
with interrupt.raised_on_interrupt() as interrupts:
    try:
        with interrupts.whole():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice: held back too
            print("held", flush=True)
            time.sleep(float(sys.argv[1]))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(3)
            print("the block ran to its end", flush=True)
    except interrupt.Interrupted as e:
        print("raised after the block", e.name, flush=True)
        sys.exit(e.status)
"""


def _run(later_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HELD_BLOCK, str(later_s)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), REPEAT_ENV: "1"})


def test_a_later_signal_ends_a_held_block_that_hangs():
    """A signal in a block held whole is raised when the block ends; one that comes the repeat window
    after it ends the process at once, as a later one does outside a block. It was held back as well: a
    second Ctrl-C at a write that hangs did nothing, and only a SIGKILL ended the tool. The window is
    $POLAR_SIGTERM_REPEAT_S's, 1 s (the default 5 s would take the Ctrl-C 1.5 s later for the same one)."""
    proc = _run(1.5)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "held\n", proc.stdout


def test_signals_within_the_repeat_window_are_raised_after_the_block():
    """The same request delivered twice (within the window): the block runs to its end, then Interrupted."""
    proc = _run(0.0)
    assert proc.returncode == 130, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == ["held", "the block ran to its end", "raised after the block SIGINT"]


def test_a_bad_repeat_window_is_the_tools_config_error(monkeypatch, capsys):
    """A bad $POLAR_SIGTERM_REPEAT_S stops an offline tool (polar score, polar eval) before its run with
    the line and status of any other bad setting, not a traceback from setting up the handlers."""
    monkeypatch.setenv(REPEAT_ENV, "soon")
    ran = []
    assert exit_status(ran.append, ["nothing"], True, "polar score") == 2
    assert ran == []
    assert capsys.readouterr().err == (f"polar score: {REPEAT_ENV}='soon': expected a positive number of seconds "
                                       f"(default 5), how long after a first SIGTERM (or Ctrl-C) a second one is "
                                       f"taken for the same request; one after it ends the process at once, "
                                       f"unsaved\n")
