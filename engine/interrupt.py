"""Ctrl-C (SIGINT) and SIGTERM in the engine's offline tools (engine/score.py, engine/evaluate.py):
the signal ends the run where it is, the tool says in one line what it keeps and how to go on, and
the process exits with 128 + the signal's number (130, 143), the status a shell gives a process the
signal ended, which launchers take for a stop to retry. Unlike training (engine/stop_signal.py) the
run does not go on to a step's end first: what such a tool has written is whole already (polar score
appends whole synced rows), and what was in flight is computed again by the rerun.

Under torchrun every worker receives the signal (torchrun passes its own on to each) and every
worker exits with that status; the line is the main rank's."""
from __future__ import annotations

import contextlib
import signal
import time

from engine.signal_handlers import may_handle
from engine.stop_signal import repeat_s


class Interrupted(BaseException):
    """Raised in the main thread where the signal came. A BaseException, as KeyboardInterrupt is:
    an `except Exception` on the way out does not take it for an error."""

    def __init__(self, signum: int):
        self.name = signal.Signals(signum).name
        super().__init__(self.name)
        self.status = 128 + signum


class Interrupts:
    """The handlers `raised_on_interrupt` installs; `whole()` holds a signal back over a block that
    must not be cut (a row being appended). The repeat window is training's (engine.stop_signal.repeat_s:
    $POLAR_SIGTERM_REPEAT_S, read here), since the same senders signal an offline tool's workers."""

    def __init__(self):
        self.repeat_s = repeat_s()
        self.first: float | None = None
        self.pending: int | None = None
        self.held = 0

    def _raise(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first is not None:
            # the same request twice (torchrun's and SLURM's SIGTERM): the run is already on its
            # way out; a later one (a second Ctrl-C at a stop that hangs) ends the process at once
            if now - self.first > self.repeat_s:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        if self.held:
            # raised when the block ends; timed from now, so that a later signal still ends a block that
            # hangs (an append to a stalled file system) instead of waiting with it
            self.pending, self.first = self.pending or signum, now
            return
        self.first = now
        raise Interrupted(signum)

    @contextlib.contextmanager
    def whole(self):
        """The block runs to its end; a signal that came during it is raised after it."""
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
        if not self.held and self.pending is not None:
            signum, self.pending = self.pending, None
            self.first = time.monotonic()
            raise Interrupted(signum)


@contextlib.contextmanager
def raised_on_interrupt(interrupts: Interrupts | None = None):
    """Within the block SIGINT and SIGTERM raise Interrupted in the main thread (SIGTERM's default
    ended the process without a word, and as a container's first process, PID 1, it was dropped;
    SIGINT's KeyboardInterrupt printed a traceback on every rank). Installed only over a signal's
    default (a program that handles or ignores one keeps doing so) and in the main thread (Python's
    rule for handlers); the handlers before it are put back after the block. `interrupts`: those to
    install (made beforehand where a bad repeat window is to be told as a config error), else new ones."""
    interrupts = interrupts or Interrupts()
    installed = [s for s in (signal.SIGINT, signal.SIGTERM) if may_handle(s)]
    previous = {s: signal.getsignal(s) for s in installed}
    for s in installed:
        signal.signal(s, interrupts._raise)
    try:
        yield interrupts
    finally:
        for s in installed:
            signal.signal(s, previous[s])


def exit_status(run, leaves: list, main_rank: bool, prog: str) -> int:
    """An offline tool's run(interrupts) to its exit status: its own, 2 for a ConfigError (its line led
    by `prog`, the command as called, as every polar command's errors are; it was `error:`), 128 + the
    signal for a Ctrl-C or a SIGTERM (`interrupted by SIG...: ` and leaves[0], what the run has kept,
    which it keeps up to date); the lines are the main rank's. The process groups the run started are
    ended when it leaves early (engine.runtime.released_on_error)."""
    import sys

    from engine.config import ConfigError
    from engine.runtime import released_on_error

    def config_error(e: ConfigError) -> int:
        if main_rank:
            print(f"{prog}: {e}", file=sys.stderr)
        return 2

    try:
        interrupts = Interrupts()  # a bad $POLAR_SIGTERM_REPEAT_S: the line of any other setting's error
    except ConfigError as e:
        return config_error(e)
    with raised_on_interrupt(interrupts), released_on_error():
        try:
            return run(interrupts)
        except ConfigError as e:
            return config_error(e)
        except Interrupted as e:  # what is kept and how to go on, not a traceback on every rank
            if main_rank:
                print(f"interrupted by {e.name}: {leaves[0]}", file=sys.stderr, flush=True)
            return e.status
