"""SIGTERM during training: a request to stop after the current step, or before the next batch of a
periodic evaluation, saved (engine/trainer.py's fit installs the handler and checks it every step and
engine/evaluation.py every batch), and the status such a run exits with."""
from __future__ import annotations

import signal
import time

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
# the workers for that second one would lose what the first one asked to save.
REPEAT_S = 5.0


class SigtermFlag:
    """SIGTERM while fit() runs is a request to stop, like train.stop_file: the handler only notes it
    (a signal handler may interrupt anything: no I/O, no collective), the per-step stop check tells
    every rank, and the run saves and stops. A later SIGTERM (REPEAT_S after the first) has the
    default action: the process ends at once. Installed only where SIGTERM has its default action and
    fit runs in the main thread (Python's rule for handlers): a program that handles or ignores
    SIGTERM itself keeps doing so. The processes fit forks (the background checkpoint writer and its
    results server) inherit the handler: a SIGTERM to the whole process group leaves a pending write
    to finish, and they end with the trainer in any case (engine.worker_processes.die_with_parent)."""

    def __init__(self):
        self.received = False
        self.installed = False
        self._first = 0.0

    def _note(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first = True, now
        elif now - self._first > REPEAT_S:
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
