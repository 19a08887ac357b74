"""SIGTERM to `polar data build` (polar/data_build.py): the build stops cleanly, as at Ctrl-C, and
exits 128 + 15."""
from __future__ import annotations

import signal

from engine.signal_handlers import may_handle
from engine.stop_signal import EXIT_SIGTERM


class Terminated(SystemExit):
    """SIGTERM stopped the build, which wrote nothing of its shard: the process exits 128 + 15, the
    status of a process SIGTERM ended (engine/stop_signal.py), which launchers retry."""

    def __init__(self):
        super().__init__(EXIT_SIGTERM)


class SigtermStops:
    """SIGTERM to the build process alone (`kill PID`, an orchestrator's terminate()) ended it where
    it stood: its worker processes, which only a signal to the whole process group reaches (Ctrl-C,
    GNU timeout), were left waiting forever, holding the shard's lock, beside a `.bin.tmp`. Inside
    this context the signal raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt,
    and the build cleans up on its way out. Once: a SIGTERM during that cleanup (hold()), such as the
    second of a signal sent to the process and to its group, only ends the build with Terminated
    after it, whatever else stopped it (workers SIGTERM killed first: WorkerDied). Installed only
    where SIGTERM has its default action and the build runs in the main thread (Python's rule for
    handlers): a program that handles SIGTERM itself keeps doing so."""

    def __init__(self):
        self.armed = self.received = False
        self.previous = None

    def _handler(self, signum, frame) -> None:
        self.received = True
        if self.armed:
            self.armed = False
            raise Terminated()

    def hold(self) -> None:
        """From here a SIGTERM is only noted: it ends the build with Terminated if something else
        stops it, else the build ends as a whole one (held for close(): a shard is all or nothing)."""
        self.armed = False

    def __enter__(self):
        if may_handle(signal.SIGTERM):
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            self.armed = True
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.armed = False
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if exc is not None and self.received and not isinstance(exc, Terminated):
            raise Terminated() from exc
