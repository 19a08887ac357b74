"""SIGTERM during training: a request to stop after the current step, or before the next batch of a
periodic evaluation, saved (engine/trainer.py's fit installs the handler and checks it every step and
engine/evaluation.py every batch), and the status such a run exits with."""
from __future__ import annotations

import math
import os
import signal
import time

from engine.setting_checks import ConfigError
from engine.signal_handlers import may_handle

# The status of a process that saved and stopped because a rank received SIGTERM: 128 + 15, the status
# a shell reports for a process SIGTERM ended, which launchers take for a termination to retry
# (Kubeflow's ExitCode restart policy retries 128-255 and takes 1-127 for the program's own failures).
# It differs from every status the engine's errors exit with (1, 2, 3) and, in torchrun's failure
# report or subprocess's returncode, from a worker SIGTERM killed (-15).
EXIT_SIGTERM = 128 + signal.SIGTERM


class StoppedBySignal(SystemExit):
    """Raised by Trainer.fit on every rank once a rank received SIGTERM and the run saved the step it
    reached: the process exits with EXIT_SIGTERM (a SystemExit: no traceback, nothing above the
    trainer mistakes it for an error); `step` is the step the checkpoint holds. SIGTERM is ignored
    from then on where fit's handler was in place: the process is on its way out."""

    def __init__(self, step: int):
        super().__init__(EXIT_SIGTERM)
        self.step = step


# A SIGTERM this long after the first ends the process at once. One that comes sooner is the same
# request delivered twice: SLURM (scancel, the time limit) signals every process of the job step and
# torchrun, signalled too, sends its own to each worker's process group, milliseconds apart; ending
# the workers for that second one would lose what the first one asked to save. $POLAR_SIGTERM_REPEAT_S
# sets it for a run (repeat_s): where the senders' signals come seconds apart (a loaded node, a
# launcher that is slow to pass its on), a second one inside the window still asks for the save.
REPEAT_S = 5.0
REPEAT_ENV = "POLAR_SIGTERM_REPEAT_S"


def repeat_s() -> float:
    """The repeat window in seconds: $POLAR_SIGTERM_REPEAT_S (a positive number), else REPEAT_S; set empty
    is unset, as POLAR_NPROC. A bad value is a ConfigError naming the variable, raised where the
    handlers are set up (before training's first step, before an offline tool's run), not in a handler."""
    value = os.environ.get(REPEAT_ENV, "")
    if not value.strip():
        return REPEAT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{REPEAT_ENV}={value!r}: expected a positive number of seconds (default {REPEAT_S:g}), "
                          "how long after a first SIGTERM (or Ctrl-C) a second one is taken for the same request; "
                          "one after it ends the process at once, unsaved")
    return seconds


class SigtermFlag:
    """SIGTERM while fit() runs is a request to stop, like train.stop_file: the handler only notes it
    (a signal handler may interrupt anything: no I/O, no collective), the per-step stop check tells
    every rank, and the run saves and stops. A later SIGTERM (the repeat window after the first:
    REPEAT_S, or $POLAR_SIGTERM_REPEAT_S, read here at construction) has the default action: the
    process ends at once. Installed only where SIGTERM has its default action and
    fit runs in the main thread (Python's rule for handlers): a program that handles or ignores
    SIGTERM itself keeps doing so. The processes fit forks (the background checkpoint writer and its
    results server) inherit the handler: a SIGTERM to the whole process group leaves a pending write
    to finish, and they end with the trainer in any case (engine.worker_processes.die_with_parent)."""

    def __init__(self):
        self.received = False
        self.installed = False
        self._first = 0.0
        self.repeat_s = repeat_s()

    def _note(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first = True, now
        elif now - self._first > self.repeat_s:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    def install(self) -> None:
        self.received = False
        self.installed = may_handle(signal.SIGTERM)
        if self.installed:
            signal.signal(signal.SIGTERM, self._note)

    def uninstall(self) -> None:
        if self.installed and signal.getsignal(signal.SIGTERM) == self._note:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.installed = False
