"""Runs an engine entry point on this machine: in this process for one process, else under torchrun.

`polar score --nproc 4 --tp 2 ...` becomes `torchrun --standalone --nproc_per_node 4 -m engine.score
--tp 2 ...`; with `--nproc 1` (the default of the tools that use this) the entry point runs here,
without torchrun (the engine's runtime starts a single-process group by itself)."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time

import psutil

from engine.called_as import launched_env
from engine.setting_checks import ConfigError
from engine.signal_handlers import in_main_thread, may_handle
from engine.stop_signal import repeat_s
from engine.worker_processes import parent_death_signal


# torchrun without the traceback of a stop signal passed on (polar/torchrun.py)
TORCHRUN = (sys.executable, "-m", "polar.torchrun")


def split_nproc(argv: list[str], default: int) -> tuple[int, list[str]]:
    """(--nproc value, the other arguments), accepting `--nproc N` and `--nproc=N`."""
    rest, nproc, i = [], default, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc":
            if i + 1 == len(argv):  # passed on, it was the entry point's "unrecognized arguments: --nproc"
                raise SystemExit("--nproc: expected a number of processes after it")
            nproc, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            nproc = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    try:
        nproc = int(nproc)
    except ValueError:
        raise SystemExit(f"--nproc: expected a number of processes, got {nproc!r}") from None
    if nproc < 1:
        raise SystemExit(f"--nproc: expected at least 1, got {nproc}")
    return nproc, rest


def run_entry(module: str, argv: list[str], command: str, default_nproc: int = 1) -> int:
    """`command` (`polar score`): the name the entry's usage and errors lead with, given to its main
    here, to torchrun's workers in their environment (engine.called_as)."""
    nproc, rest = split_nproc(argv, default_nproc)
    if nproc == 1:
        return importlib.import_module(module).main(rest, prog=command)
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *rest]
    print("+", " ".join(cmd), flush=True)
    return call_forwarding_signals(cmd, env=launched_env(command))


# The stop signals torchrun acts on (it passes each to its workers and waits for them) that a user or
# a scheduler sends to the command it started: a SIGTERM (kill, Kubernetes, SLURM), Ctrl-C's SIGINT,
# the SIGHUP of a closed terminal, Ctrl-\'s SIGQUIT. In a process group of its own the child gets none
# of them from the terminal: one not passed on here ends this process alone, torchrun and its workers
# running on without it.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# How long torchrun gives its workers to end after its signal before it kills them (its shutdown
# timeout, 30 s by default): the wait polar takes over where torchrun ended before its workers.
SHUTDOWN_S = 30.0


def _running(p) -> bool:
    try:  # a zombie has ended: its parent (now PID 1 or a subreaper) has only not reaped it yet
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _under(pid: int) -> dict:
    """The processes `pid` has started, by pid (none once it has ended)."""
    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _end_orphans(started: dict) -> None:
    """Waits, as torchrun would have, for the processes it started to end, and kills those still there
    SHUTDOWN_S later. torch's agent raises from its signal handler, again in the shutdown an earlier
    signal began: a third SIGTERM (SLURM's, polar's, a second scancel's) ended torchrun there, its
    workers still saving; polar then exited, and SLURM, which ends a job step when its task ends, killed
    them in the middle of the checkpoint."""
    deadline = time.monotonic() + SHUTDOWN_S
    while any(_running(p) for p in started.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in started.values():
        if _running(p):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _ends_with(parent: int):
    """The child's set-up (Popen's preexec_fn) that kills it when `parent`, this process, ends:
    killed with SIGKILL, polar could pass nothing on, and torchrun (a process group of its own) and
    its workers trained on without it. SIGKILL, not SIGTERM: torchrun would cut its workers' save
    short after its shutdown timeout (SHUTDOWN_S), where polar is no longer there to wait longer; its
    workers, which end with it (SIGTERM, engine.runtime.end_with_launcher), save in their own time.
    prctl is looked up here, in the parent (engine.worker_processes.parent_death_signal)."""
    ask = parent_death_signal()
    if ask is None:  # not Linux
        return None

    def set_up():
        ask(signal.SIGKILL)
        if os.getppid() != parent:  # this process ended before the signal was asked for
            os._exit(1)

    return set_up


def call_forwarding_signals(cmd: list[str], env=None) -> int:
    """subprocess.call, passing a stop signal this process receives on to the child and waiting for
    it. torchrun acts on one (training saves the step it reached and exits 143, engine/trainer.py;
    polar score keeps the rows written and says so, engine/score.py); unforwarded, this process died
    and torchrun worked on without it, and as a container's first process (PID 1, whose signals
    without a handler the kernel drops) it was ignored until the SIGKILL. The child runs in a process
    group of its own, so that a Ctrl-C at the terminal reaches it once, from here, not also from the
    terminal (twice, torchrun's stop was cut short). A signal this process ignores (SIG_IGN, as a
    background job's SIGINT) stays ignored. A child that then fails (torchrun, signalled, exits 1 after
    its workers' 143) ends this process with 128 + the signal, the status of a run stopped by it,
    which launchers retry. What the child had started when the signal came is waited for too
    (_end_orphans), and a signal after the child's end goes to those."""
    try:
        # The same signal again within the workers' repeat window after it was passed on is the same request
        # twice (a second Ctrl-C while the workers stop): torchrun, signalled again while it stops its workers,
        # left the stop half done. One window for polar and the workers, so a signal passed on after it is
        # one they act on too.
        window = repeat_s()
    except ConfigError as e:  # before anything starts: exit 2 and one line, as for a bad setting
        print(f"polar: {e}", file=sys.stderr, flush=True)
        return 2
    ends_with_us = _ends_with(os.getpid())
    if not in_main_thread():  # Python's rule for handlers
        return _status(cmd, subprocess.call(cmd, env=env, preexec_fn=ends_with_us))
    forwarded: list = []  # (signal, when)
    started: dict = {}  # pid: psutil.Process, the child's processes when a signal came
    proc = None

    def forward(signum, frame):
        now = time.monotonic()
        if any(s == signum and now - t < window for s, t in forwarded):
            return
        forwarded.append((signum, now))
        if proc is None:
            return
        if proc.returncode is None:
            started.update(_under(proc.pid))
            proc.send_signal(signum)
            return
        for p in started.values():  # the child has ended, what it started not yet (_end_orphans)
            if _running(p):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signum)

    previous = {s: signal.getsignal(s) for s in FORWARDED}
    for s in FORWARDED:
        if may_handle(s, unless_ignored=True):
            signal.signal(s, forward)
    try:
        proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=ends_with_us)
        if forwarded:  # a signal before the child was there to receive it
            proc.send_signal(forwarded[0][0])
        code = proc.wait()
        _end_orphans(started)
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: set outside Python, which cannot be put back from here
                signal.signal(s, handler)
    return 128 + forwarded[0][0] if forwarded and code else _status(cmd, code)


def _status(cmd: list[str], code: int) -> int:
    """The child's exit status as this process's: one killed by a signal polar did not receive (the OOM
    killer's SIGKILL, a kill of its pid) ends it with a shell's 128 + the signal, saying which: as
    sys.exit's status, -15 read 241, with nothing said."""
    if code >= 0:
        return code
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    print(f"polar: {_shown(cmd)} was killed by {name}", file=sys.stderr, flush=True)
    return 128 - code


def _shown(cmd: list[str]) -> str:
    """The command as a log names it: `python -m engine.finetune --check-config`, not the interpreter's path."""
    words = [os.path.basename(cmd[0]), *cmd[1:]] if cmd else []
    return " ".join(words[:4]) + (" ..." if len(words) > 4 else "")


def score_main(argv=None) -> int:
    return run_entry("engine.score", list(sys.argv[1:] if argv is None else argv), "polar score")


def eval_main(argv=None) -> int:
    return run_entry("engine.evaluate", list(sys.argv[1:] if argv is None else argv), "polar eval")
