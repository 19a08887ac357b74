"""Whether a training run stops early, agreed over the ranks: train.time_limit_s, train.stop_file and
a SIGTERM on any rank (engine/stop_signal.py notes it), told to every rank by one all-reduced scalar
per step and per batch of an evaluation inside fit (engine/trainer.py's Trainer asks; the number of
these collectives is counted by tests/engine/test_step_syncs.py and timed by benchmarks/stop_check.py)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from engine import checkpoint
from engine.config import ConfigError
from engine.stop_signal import SigtermFlag


class StopAgreement:
    """The stop check of one Trainer: `rt` the runtime, `tc` cfg.train, `log` the main rank's log. The
    time limit reads the steady clock: NTP stepping the wall clock forward stopped a run early, back
    made it overrun its job slot and be killed unsaved."""

    def __init__(self, rt, tc, log):
        self.rt, self.tc, self.log = rt, tc, log
        self.started: float | None = None  # fit's start time (train.time_limit_s); None outside fit
        self.file_found = False  # train.stop_file was seen (also when a SIGTERM came with it)
        self.ranks = 0  # how many ranks had received SIGTERM at the last stop check
        self.sigterm = SigtermFlag()
        self._signals_checked = False  # some rank's SIGTERM handler is in place (set by fit)

    def install(self) -> None:
        self.sigterm.install()

    def uninstall(self) -> None:
        self.sigterm.uninstall()
        self._signals_checked = False

    def warn_standing_file(self, step: int) -> None:
        """A stop file there before the first step stops the run after it (the last step is not
        checked: a run with one step left ends as planned)."""
        tc = self.tc
        if tc.stop_file and self.rt.is_main and os.path.exists(tc.stop_file) and step + 1 < tc.steps:
            self.log(f"train.stop_file {tc.stop_file} exists already: the run stops after its first step "
                     f"(remove the file to train on)")

    def begin(self) -> None:
        """fit's training starts: the time limit is counted from now."""
        self.started = time.monotonic()
        self.file_found = False

    def end(self) -> None:
        self.started = None

    @property
    def running(self) -> bool:
        return self.started is not None

    def at_step(self, step: int) -> str:
        """train.time_limit_s, train.stop_file and SIGTERM, checked every step (but the last: the end
        of fit looks for a SIGTERM once more), so a run sized to a job slot, told by its scheduler that
        the slot is ending, or terminated stops within one step. Rank 0 alone looks at the clock and
        the file (ranks that looked at a shared file system themselves could see it at different steps
        and part ways); any rank may have received SIGTERM (torchrun, Kubernetes, SLURM or `kill` may
        signal one worker or all). One all-reduced scalar tells every rank both (signalled_ranks).
        Called right after the gradient norm's host sync, when nothing is queued on the device: its
        round trip waits for no compute (after the optimizer step it would wait for the whole update
        to run). With no stop setting it still runs over several ranks while a rank's SIGTERM handler
        is in place (checks_signals; benchmarks/stop_check.py measures it); in one process the
        handler's flag is read directly; with neither: no check, no sync. `step`: the steps done."""
        if self.started is None or step + 1 >= self.tc.steps:
            return ""
        return self.agree(clock=self.tc.time_limit_s > 0)

    def agree(self, clock: bool) -> str:
        """The stop check, also before each batch of a periodic evaluation (there without the clock:
        train.time_limit_s leaves the evaluations their time, and only answers at a step)."""
        tc = self.tc
        files = clock or bool(tc.stop_file)
        if not (files or self.checks_signals()):
            return ""
        if not files and self.rt.world_size == 1:
            self.ranks = int(self.sigterm.received)
            return "SIGTERM" if self.sigterm.received else ""
        code = 0
        if self.rt.is_main and files:
            # the file first: only a stop made for it removes it, which is what tells a launcher that
            # the run saved for its request (engine/launch/slurm_pretrain.sbatch then requeues)
            if tc.stop_file and os.path.exists(tc.stop_file):
                code = 2
            elif clock and time.monotonic() - self.started > tc.time_limit_s:
                code = 1
        self.ranks, code = self.signalled_ranks(code)
        self.file_found = code == 2
        return "SIGTERM" if self.ranks else ("", "time_limit", "stop_file")[code]

    def announce(self, request: str, step: int) -> None:
        """The main rank's line for the stop a step's check agreed on (nothing for "")."""
        if request == "time_limit":
            self.log(f"train.time_limit_s={self.tc.time_limit_s} reached at step {step}")
        elif request == "stop_file":
            self.log(f"train.stop_file {self.tc.stop_file} found at step {step}: saving and stopping")
        elif request == "SIGTERM":
            self.log(f"SIGTERM received (by {self.ranks} of {self.rt.world_size} rank(s)) at step "
                     f"{step}: saving and stopping")

    def checks_signals(self) -> bool:
        """Whether fit looks for a SIGTERM: where this rank's handler is in place, and on every rank
        once fit found any rank's in place (agree_on_signals)."""
        return self.sigterm.installed or self._signals_checked

    def agree_on_signals(self) -> None:
        """A rank without the handler (its program handles or ignores SIGTERM itself, or runs fit in
        another thread) still takes part in the stop check of the ranks with it: the all-reduce they
        make each step and at the end of fit would otherwise wait for it for good."""
        anywhere = self.sigterm.installed
        if self.rt.world_size > 1:
            flag = torch.full((1,), float(anywhere), device=self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            anywhere = bool(flag.item())
        self._signals_checked = anywhere

    def signalled_ranks(self, code: int = 0) -> tuple[int, int]:
        """(how many ranks received SIGTERM, rank 0's `code`): one scalar summed over the ranks, to
        which rank 0 adds its code (0-2) and each rank that received SIGTERM 4."""
        flag = torch.full((1,), float(code + 4 * self.sigterm.received), device=self.rt.device)  # no host copy
        if self.rt.world_size > 1:
            dist.all_reduce(flag)
        total = int(flag.item())
        return total // 4, total % 4

    def signalled_during(self, what: str, step: int) -> bool:
        """A SIGTERM that came during this step's evaluation or save (minutes each at scale) stops the
        run now, at the step just saved or about to be, not after one more step and its save: the
        grace before SIGKILL must cover what remained of them and the final save. One all-reduce,
        at evaluation and save steps only. True where it came (logged)."""
        if not self.checks_signals():
            return False
        self.ranks = self.signalled_ranks()[0]
        if self.ranks:
            self.log(f"SIGTERM received (by {self.ranks} of {self.rt.world_size} rank(s)) during {what} at "
                     f"step {step}: saving and stopping")
        return bool(self.ranks)

    def remove_stop_file(self, step: int, ckpt_dir: str) -> None:
        """Answers train.stop_file once the checkpoint is complete (a save cut short leaves the request
        standing): the same command then resumes instead of stopping again after one step, and its
        absence tells a launcher (engine/launch/slurm_pretrain.sbatch) that the run stopped for it.
        Rank 0 removes it and tells every rank how that went: one that cannot (its directory read-only)
        stops every rank with the same error, where rank 0 alone raised and the others went on to wait
        in the next collective for it."""
        def remove():
            try:
                os.remove(self.tc.stop_file)
            except FileNotFoundError:
                pass

        error = checkpoint.on_rank0(self.rt.rank, remove)
        if error:
            raise ConfigError(
                f"train.stop_file={self.tc.stop_file}: the run stopped for it at step {step} and its "
                f"checkpoint is complete ({checkpoint.latest(ckpt_dir)}), but the file could not be removed "
                f"({error}); remove it yourself (and let the run write to its directory): until it is gone, the "
                f"same command resumes and stops again after one step, and a launcher waiting for its removal "
                f"(engine/launch/slurm_pretrain.sbatch) does not requeue the job")
