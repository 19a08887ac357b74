"""Profiling a window of training steps on chosen ranks (train.profile*, train.memory_snapshot).

The window is the steps [train.profile_start, train.profile_end), counted from 1 as the log counts
them, on the global ranks train.profile_ranks; every other rank, and every rank with profiling off,
runs the loop untouched (engine.trainer holds None: no profiler object, no sync, no branch in the
step itself).

- torch: torch.profiler (CPU activity, and CUDA where the run is on a GPU; shapes recorded) starts
  one step before the window where the run trains that step (the warm-up, whose events are dropped:
  the profiler's own start-up cost stays out of the trace) and records the window's steps, each
  marked ProfilerStep#<step>. The trace, Chrome JSON, is written when the window closes to
  <run_dir>/profile/rank<R>/steps_<first>-<last>.pt.trace.json (steps_<first>.pt.trace.json for a
  one-step window).
- cuda: cudaProfilerStart before the window's first step and cudaProfilerStop after its last (a
  device sync at each edge, so the capture holds exactly the window's kernels), with NVTX ranges for
  each step and each autograd op in between: `nsys profile --capture-range=cudaProfilerApi` records
  the window alone.
- memory_snapshot: the CUDA caching allocator records its history (with stacks) over the window,
  dumped to <run_dir>/profile/memory_rank<R>.pickle when it closes. A step that raises
  torch.OutOfMemoryError on a profiled rank dumps the allocator's state at that moment
  (memory_rank<R>_oom_step<S>.pickle, with the history where the window is open) before the error
  goes on.

A window cut short (train.time_limit_s, a stop file, SIGTERM, train.exit_at_step, the end of
train.steps) is closed after the last step run, and its trace says which steps it holds; one stopped
before the window's first step (after the warm-up, say) writes nothing and says so on each profiled
rank; a resumed run profiles what of the window lies ahead of it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from engine.config import ConfigError

# entries the allocator keeps (alloc and free events, each with its stack): enough for a few steps of
# a large model; the oldest are dropped past it
MEMORY_HISTORY_ENTRIES = 100_000

_NOTHING = contextlib.nullcontext()


def profiled(train) -> bool:
    return train.profile != "off" or train.memory_snapshot


def ranks(train, world_size: int) -> list[int]:
    return list(range(world_size)) if train.profile_ranks == "all" else list(train.profile_ranks)


def check_start_up(train, world_size: int, on_cuda: bool) -> None:
    """What the config checks cannot see: the machine and the world size. Nothing when profiling is off
    (a config's profile_ranks for a larger job does not stop a small run that does not profile)."""
    if not profiled(train):
        return
    if train.profile == "cuda" and not on_cuda:
        raise ConfigError("train.profile=cuda starts and stops the CUDA profiler (for nsys), and this run has no "
                          "CUDA GPU; train.profile=torch traces the CPU")
    if train.memory_snapshot and not on_cuda:
        raise ConfigError("train.memory_snapshot=true records the CUDA caching allocator's history, and this run "
                          "has no CUDA GPU")
    if train.profile_ranks != "all":
        outside = [r for r in train.profile_ranks if r >= world_size]
        if outside:
            raise ConfigError(f"train.profile_ranks={train.profile_ranks}: rank(s) {outside} do not exist in a run of "
                              f"{world_size} process(es) (global ranks 0-{world_size - 1})")


def open_window(train, rt, run_dir, step: int, log) -> Window | None:
    """The window of a fit that starts after `step` (a resumed run's step) on this rank, or None where
    it profiles nothing: profiling off, a rank not profiled, or (without memory_snapshot, which also
    watches for running out of memory) a window that this fit does not reach. Rank 0 says once what of
    the window the run will not reach (`log`: the trainer's, which speaks on rank 0)."""
    if not profiled(train):
        return None
    first = max(train.profile_start, step + 1)
    stop = min(train.profile_end, train.steps + 1)  # exclusive
    window = f"train.profile_start={train.profile_start}, train.profile_end={train.profile_end}"
    if rt.is_main:
        if train.profile_start > train.steps:
            log(f"profiling: the window ({window}) starts after train.steps={train.steps}: nothing is profiled")
        elif first >= stop:  # what of it the run trains lies behind the step it resumed at
            log(f"profiling: the window ({window}) is behind the resumed step {step}: nothing is profiled")
        elif first > train.profile_start or stop < train.profile_end:
            behind = f"the resumed step {step}" if first > train.profile_start else ""
            past = f"train.steps={train.steps}" if stop < train.profile_end else ""
            log(f"profiling: the window ({window}) reaches past {' and '.join(w for w in (behind, past) if w)}: "
                f"only {_steps(first, stop - 1)} can be profiled")
    if rt.rank not in ranks(train, rt.world_size) or (first >= stop and not train.memory_snapshot):
        return None
    say = log if rt.is_main else (lambda line: print(f"[rank {rt.rank}] {line}", flush=True))
    return Window(train, rt.rank, rt.is_cuda, Path(run_dir) / "profile", first, stop, step + 1, say)


def around(window: Window | None, step: int):
    """The context a training step runs in: the window's, or nothing."""
    return _NOTHING if window is None else window.step(step)


def failed(window: Window | None, step: int, e: BaseException) -> None:
    """A fit raised `e` after `step`, inside a step or outside one (a non-finite streak, an evaluation or
    a save): the window is closed with what it recorded (Window.failed). Without this the trace of a run
    stopped by the error was never written, and an in-process profiler went on recording."""
    if window is not None:
        window.failed(step, e)


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


class Window:
    """One rank's window in one fit: the steps [first, stop) (the part of train.profile_start..end that
    this fit trains), entered and left through `step`, closed by its last step or by the trainer."""

    def __init__(self, train, rank: int, on_cuda: bool, directory: Path, first: int, stop: int, fit_first: int,
                 say):
        self.mode = train.profile
        self.memory = train.memory_snapshot
        self.rank = rank
        self.on_cuda = on_cuda
        self.directory = directory
        self.first, self.stop = first, stop  # the steps [first, stop) this fit profiles
        # the warm-up step: the one before the window, where this fit trains it (fit_first: its first step)
        warms = self.mode == "torch" and fit_first < first < stop
        self.warmup = first - 1 if warms else None
        self.say = say
        self.profiler = None
        self.nvtx = None
        self.open = False  # inside the window: between its first step's start and close
        self.last = 0  # the last step run inside the window
        self.error = None  # the error `failed` took (the trainer hands it on again after the step's context)
        self.closed = False

    @contextlib.contextmanager
    def step(self, step: int):
        if self.first <= step < self.stop or step == self.warmup:
            self._before(step)
        try:
            yield
        except BaseException as e:
            self.failed(step, e)
            raise
        if self.open:
            if self.mode == "cuda":
                torch.cuda.nvtx.range_pop()
            if step + 1 == self.stop:
                self.close()

    def _before(self, step: int) -> None:
        if self.mode == "torch" and self.profiler is None:
            self.profiler = self._torch_profiler(step)
        if step == self.first:
            self._open()
        if self.open:
            self.last = step
        if self.profiler is not None:
            self.profiler.step()  # this step's ProfilerStep#<step>; the schedule's action for it
        if self.mode == "cuda":
            torch.cuda.nvtx.range_push(f"step {step}")

    def _torch_profiler(self, step: int):
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        def action(n: int) -> ProfilerAction:
            if self.first <= n < self.stop:
                return ProfilerAction.RECORD  # close() stops it, which writes the trace
            return ProfilerAction.WARMUP if n == self.warmup else ProfilerAction.NONE

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        prof = profile(activities=activities, schedule=action, on_trace_ready=self._write_trace, record_shapes=True)
        # the profiler counts its steps from 0 and marks each ProfilerStep#<count>: counted from the
        # step before this one, the markers carry the training steps
        prof.step_num = step - 1
        prof.start()
        return prof

    def _open(self) -> None:
        self.open = True
        what = {"torch": f"torch.profiler (trace to {self.directory / f'rank{self.rank}'})",
                "cuda": "the CUDA profiler (cudaProfilerStart, for nsys --capture-range=cudaProfilerApi)",
                "off": ""}[self.mode]
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            what += (" and " if what else "") + "the CUDA memory history"
        self.say(f"profiling {_steps(self.first, self.stop - 1)} on rank {self.rank}: {what}")
        if self.mode == "cuda":
            torch.cuda.synchronize()  # the steps before stay out of the capture
            torch.cuda.profiler.start()
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()

    def _write_trace(self, prof) -> None:
        directory = self.directory / f"rank{self.rank}"
        span = f"{self.first}-{self.last}" if self.last > self.first else f"{self.first}"
        path = directory / f"steps_{span}.pt.trace.json"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
        except OSError as e:
            self._not_written(f"the trace of {_steps(self.first, self.last)}", path, repr(e))
            return
        if not path.exists():  # torch's trace writer logs a file it cannot open and returns
            self._not_written(f"the trace of {_steps(self.first, self.last)}", path, "see the error above")
            return
        self.say(f"profiling: wrote the trace of {_steps(self.first, self.last)} on rank {self.rank} to {path}")

    def _not_written(self, what: str, path: Path, why: str) -> None:
        # a profile is a side concern: a full disk or a bad path loses it, not the run (the window closes
        # after its last step, inside the trainer's loop, where the error ended days of training)
        self.say(f"profiling: could not write {what} on rank {self.rank} to {path} ({why}): the run is not "
                 f"stopped for it")

    def _memory_path(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / name

    def failed(self, step: int, e: BaseException) -> None:
        """Step `step` raised `e` (or the loop after it): out of device memory, the allocator's state is
        dumped first (the moment a snapshot is most wanted); the window is closed with what it recorded.
        The error goes on, with a note of any file written or failure met here. Once an error."""
        if e is self.error:
            return
        self.error = e
        oom = isinstance(e, torch.OutOfMemoryError) and self.memory
        try:
            if oom:
                path = self._memory_path(f"memory_rank{self.rank}_oom_step{step}.pickle")
                torch.cuda.memory._dump_snapshot(str(path))
                e.add_note(f"rank {self.rank}'s CUDA memory snapshot at the error: {path} (pytorch.org/memory_viz)")
                self.say(f"profiling: out of memory in step {step}: wrote the CUDA memory snapshot to {path}")
            self.close(dump_memory=not oom)
        except Exception as failure:  # the step's error is the one to report
            e.add_note(f"profiling on rank {self.rank}: the window could not be closed after the error: {failure!r}")

    def close(self, dump_memory: bool = True) -> None:
        """Ends the window after the last step run in it: writes the trace and the memory snapshot.
        Idempotent; nothing where the window never opened, which a run stopped before its first step
        is told (once)."""
        if self.profiler is not None:
            prof, self.profiler = self.profiler, None
            prof.stop()  # recording: stops and writes the trace (a warm-up alone writes nothing)
        if not self.open:
            if not (self.closed or self.last) and self.first < self.stop:
                # torch.profiler goes from the warm-up to stopped without a word, and the window's
                # opening line never came: the run would end as if profiling were off
                lost = [what for what, on in (("trace", self.mode == "torch"), ("CUDA profiler capture",
                        self.mode == "cuda"), ("CUDA memory snapshot", self.memory and dump_memory)) if on]
                if lost:  # (an out-of-memory snapshot was written and said instead)
                    self.say(f"profiling: the run stopped before step {self.first}, the window's first: no "
                             f"{' or '.join(lost)} written on rank {self.rank}")
            self.closed = True
            return
        self.open = False
        if self.mode == "cuda":
            self.nvtx.__exit__(None, None, None)
            torch.cuda.synchronize()  # the window's last kernels inside the capture
            torch.cuda.profiler.stop()
            self.say(f"profiling: stopped the CUDA profiler after step {self.last} on rank {self.rank}")
        if self.memory:
            if dump_memory:
                path = self.directory / f"memory_rank{self.rank}.pickle"
                try:
                    torch.cuda.memory._dump_snapshot(str(self._memory_path(path.name)))
                except OSError as e:
                    self._not_written(f"the CUDA memory snapshot of {_steps(self.first, self.last)}", path, repr(e))
                else:
                    self.say(f"profiling: wrote the CUDA memory snapshot of {_steps(self.first, self.last)} on "
                             f"rank {self.rank} to {path}")
            torch.cuda.memory._record_memory_history(enabled=None)
