"""Weights & Biases logging of a run's figures (log.wandb_project; the main rank only): the scalars
TensorBoard gets, at the same steps. wandb is optional (pip install wandb, or polar-rm[wandb]): a run that
names a project without it installed stops at start-up, on every rank alike (the setting's check). The
wandb run's id is kept in RUN_DIR/wandb_run_id, so the same command after a stop or a torchrun restart
continues the same wandb run (resume="allow") rather than starting a second one. A resume from before the
last step the stopped run logged logs those steps again; wandb keeps a run's steps increasing and ignores a log
to a step before its last, with a warning on every such call (a progress line's, an evaluation's: a resume 50
steps back at log.interval=1 printed 50 and more), so those steps are left out here, said once: each step is in
the run once, the steps up to the stopped run's last with its values (the losses a resume reproduces;
RUN_DIR/metrics.jsonl holds the resumed run's); the final evaluation of a start with nothing left to train (the
same command after the run finished) too. Offline (WANDB_MODE=offline), each start writes
RUN_DIR/wandb/offline-run-*-ID of its own steps, which `wandb sync` uploads to the one run: offline, a start
does not know the steps an earlier one logged.

A run whose process a SIGTERM ends is finished as failed (exit code 143) before it ends (SigtermWatch): torchrun
sends SIGTERM to the other workers when one fails, and SIGKILL 30 s later; a run left open is never finished
offline (no exit record, its last step's row unwritten) and left to the server's own judgement online."""
from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from engine.setting_checks import ConfigError

RUN_ID_FILE = "wandb_run_id"
# characters wandb refuses in a project's or an entity's name
_FORBIDDEN = set("/\\#?%:")


def wandb_project(where, v):
    if not v:
        return
    if _FORBIDDEN & set(v) or not v.strip():
        raise ConfigError(f"{where}={v!r}: a wandb project's name may not be blank nor hold any of / \\ # ? % :")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{where}={v}: logging to Weights & Biases needs the package wandb, which is not "
                          f"installed: pip install wandb (or pip install 'polar-rm[wandb]'), or set {where}='' "
                          f"(off; RUN_DIR/metrics.jsonl has the same figures)")


wandb_project.rule = "empty (off), or a wandb project's name (needs the package wandb)"


def wandb_entity(where, v):
    if v and (_FORBIDDEN & set(v) or not v.strip()):
        raise ConfigError(f"{where}={v!r}: a wandb entity's name may not be blank nor hold any of / \\ # ? % :")


wandb_entity.rule = "empty (wandb's default entity), or a team's or user's name"


def wandb_name(where, v):
    if any(c < " " for c in v):
        raise ConfigError(f"{where}={v!r}: a run's name is one line of text (no control characters)")


wandb_name.rule = "empty (the run directory's name), or one line of text"


def run_id(run_dir: Path) -> str:
    """RUN_DIR's wandb run id: the one an earlier start of this run wrote, else a new one, written."""
    from engine import durable_file

    path = Path(run_dir) / RUN_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        import secrets
        import string

        # wandb's own ids are 8 of [a-z0-9]; its helper that makes them has moved between releases
        new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        durable_file.write_file(path, new + "\n")
        return new


class WandbLog:
    """One run's wandb logging; on an error from wandb (no API key, no network while online) says so once
    on stderr and logs no more: metrics.jsonl and TensorBoard keep the figures, and the run goes on."""

    def __init__(self, project: str, name: str, entity: str, run_dir, config: dict | None = None,
                 sigterm_answered=None):
        """`sigterm_answered`: whether the main thread has taken up a SIGTERM (fit's handler noted it; see
        SigtermWatch), None where nothing does."""
        self.run = None
        self._lock = threading.Lock()  # the run's calls, from the main thread and SigtermWatch's
        self._main_inside = False  # the main thread is in a call of the run's (set before it takes the lock)
        self._deferred = False  # a SIGTERM came while it was: the process ends once the call is done
        self.watch = None
        # the steps below it the wandb run holds from an earlier start: a resumed run's next step, its last
        # logged one + 1 (from the server; 0 for a new run, and offline)
        self.held = 0
        self.said_held = False
        try:
            import wandb

            self.run = wandb.init(
                project=project, entity=entity or None, name=name or Path(run_dir).resolve().name,
                id=run_id(run_dir), resume="allow", dir=str(run_dir), config=config,
                # the process's stdout and stderr stay its own (a closed pipe, a redirect): no console capture
                settings=wandb.Settings(console="off"))
            self.held = int(getattr(self.run, "starting_step", 0) or 0)
        except Exception as e:  # noqa: BLE001 - wandb's own errors are of many kinds; none should end the run
            self._failed(e)
        if self.run is not None:
            self.watch = SigtermWatch.start(self, sigterm_answered)

    @contextlib.contextmanager
    def _held(self):
        """The run's calls one at a time; a SIGTERM that SigtermWatch's handler met inside one of the main
        thread's ends the process once it is done (the handler may not finish the run under the call)."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            self._main_inside = True
        try:
            with self._lock:
                yield
        finally:
            if main:
                self._main_inside = False
        if main and self._deferred:
            self._deferred = False
            self.end_for_sigterm()

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        with self._held():
            if self.run is None:  # SigtermWatch finished it
                return
            if step < self.held:
                self._say_held(step)
                return
            try:
                self.run.log(values, step=step)
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    def _say_held(self, step: int) -> None:
        if self.said_held:
            return
        self.said_held = True
        last = self.held - 1
        steps = f"step {step} is" if step == last else f"steps {step}-{last} are"
        print(f"wandb: the run {self.run.id} holds steps up to {last}, logged by an earlier start, and keeps their "
              f"figures: this start's {steps} not logged there (wandb keeps a run's steps increasing; "
              f"RUN_DIR/metrics.jsonl has this start's)", flush=True)

    def _failed(self, e: Exception) -> None:
        run, self.run = self.run, None
        print(f"wandb: {type(e).__name__}: {e}: nothing more is logged to Weights & Biases; the run goes on "
              f"(RUN_DIR/metrics.jsonl has every figure; WANDB_MODE=offline logs without a network, for a later "
              f"`wandb sync`)", file=sys.stderr, flush=True)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: not 0 marks the wandb run failed (the run ended with an error)."""
        with self._held():
            if self.run is not None:
                run, self.run = self.run, None
                try:
                    run.finish(exit_code=exit_code)
                except Exception as e:  # noqa: BLE001
                    self._failed(e)
        if self.watch is not None:
            self.watch.stop()

    def after_fit(self) -> None:
        """Fit has ended with the run still open (the final evaluation follows): SIGTERM, whose action
        fit put back (it ends the process at once), finishes the run first (SigtermWatch.after_fit)."""
        if self.watch is not None:
            self.watch.after_fit()

    def end_for_sigterm(self) -> None:
        """The run finished as failed by SIGTERM (exit code 143, the status of a process SIGTERM ended);
        then, in the main thread, the process ended by SIGTERM's own action, as it would have been."""
        from engine.stop_signal import EXIT_SIGTERM

        try:
            self.close(exit_code=EXIT_SIGTERM)
        finally:  # whatever the close met (the handler may have come inside a write to the same stream)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)


# How long a SIGTERM during fit waits for the main thread to take it up before SigtermWatch finishes the run:
# a main thread that runs Python does within milliseconds (fit's handler, engine/stop_signal.py, notes it and
# the step loop saves and stops), or once a C call it is in returns (a CUDA synchronization waiting out the
# rest of a step, a save's writes: seconds at POLAR-7B's scale); one inside a collective a failed rank never
# joins (NCCL's wait does not return to Python before its timeout, minutes) never does. A run finished here
# that then stops as asked would read as failed, so the wait is as long as it can be: torchrun's SIGKILL
# follows its SIGTERM by 30 s (its agent's wait on a worker's failure; SLURM's KillWait is 30 s by default),
# and wandb's finish needs the rest.
ANSWER_S = 25.0


class SigtermWatch:
    """Finishes the main rank's wandb run when a SIGTERM ends the process before the run's own close. A
    Python signal handler runs in the main thread only, between two of its bytecodes: a main thread
    blocked in a C++ collective (gloo, NCCL: a rank whose peer failed, torchrun's SIGTERM then its
    SIGKILL) never runs it, and dies by the SIGKILL with the run left open. Python's C-level handler
    writes the signal's number to the wakeup fd (signal.set_wakeup_fd) at once all the same: this watch's
    thread reads it and, where the main thread has not taken the signal up within ANSWER_S, finishes the
    run itself (wandb's finish needs nothing of the main thread; it leaves the process to the SIGKILL).
    During fit a SIGTERM that the main thread takes up is fit's stop, saved, whose run is finished by the
    main thread (exit code 0, as before). After fit (the final evaluation) SIGTERM ends the process:
    this watch's handler finishes the run first, then gives SIGTERM its own action again; its thread
    finishes the run at once where the handler cannot run. Only where the wakeup fd is free (asyncio's
    signal handling takes it) and from the main thread (Python's rule for both)."""

    def __init__(self, log: WandbLog, answered):
        self.log = log
        self.answered = answered or (lambda: False)
        self.immediate = False  # after fit: SIGTERM ends the process
        self.installed = False
        self.stopped = threading.Event()
        self.read, self.write = socket.socketpair()
        self.write.setblocking(False)  # the C handler's write may not block
        self.thread = threading.Thread(target=self._watch, name="wandb-sigterm-watch", daemon=True)

    @classmethod
    def start(cls, log: WandbLog, answered) -> SigtermWatch | None:
        from engine.signal_handlers import in_main_thread

        if not in_main_thread():
            return None
        watch = cls(log, answered)
        previous = signal.set_wakeup_fd(watch.write.fileno(), warn_on_full_buffer=False)
        if previous != -1:  # another's (asyncio's): it stays theirs
            signal.set_wakeup_fd(previous)
            watch.read.close()
            watch.write.close()
            return None
        watch.thread.start()
        return watch

    def _watch(self) -> None:
        while not self.stopped.is_set():
            try:
                received = self.read.recv(64)
            except OSError:
                break
            if not received or self.stopped.is_set():
                break
            if signal.SIGTERM in received and (self.immediate or not self._answered_within(ANSWER_S)):
                self.log.end_for_sigterm()
                # The read end stays open: the signals that follow (torchrun's, SLURM's) are still written to
                # the wakeup fd, and with the reader closed each write failed, Python printing a BrokenPipeError
                # for it; unread, they fill the buffer, which it is told not to warn of (warn_on_full_buffer).
                return
        self.read.close()

    def _answered_within(self, seconds: float) -> bool:
        """Whether the main thread takes the SIGTERM up, or closes the run, within `seconds`."""
        deadline = time.monotonic() + seconds
        while not (self.answered() or self.stopped.is_set()):
            if time.monotonic() >= deadline:
                return False
            self.stopped.wait(0.05)
        return True

    def after_fit(self) -> None:
        from engine.signal_handlers import may_handle

        if may_handle(signal.SIGTERM):
            signal.signal(signal.SIGTERM, self._handle)
            self.installed = self.immediate = True

    def _handle(self, signum, frame) -> None:
        if self.log._main_inside:  # the main thread is inside the run's call: ended once it is done
            self.log._deferred = True
            return
        self.log.end_for_sigterm()

    def stop(self) -> None:
        """The run is closed: the handler's and the wakeup fd's places given back (main thread only: the
        watch's own thread leaves them, the process is ending)."""
        from engine.signal_handlers import in_main_thread

        self.stopped.set()
        if not in_main_thread() or self.write is None:
            return
        if self.installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.installed = False
        current = signal.set_wakeup_fd(-1)
        if current not in (-1, self.write.fileno()):  # set after this watch's: theirs stays
            signal.set_wakeup_fd(current)
        with contextlib.suppress(OSError):
            self.write.send(b"\0")  # wakes the thread, which ends
        self.write.close()
        self.write = None
        if not self.thread.is_alive():  # it finished the run itself and left its end open (_watch)
            self.read.close()
