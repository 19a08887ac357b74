"""Progress lines with throughput, MFU and ETA; TensorBoard scalars, RUN_DIR/metrics.jsonl lines and wandb
scalars of the same figures (main rank only)."""
from __future__ import annotations

import contextlib
import sys
import time

import torch

PEAK_ENV = "POLAR_PEAK_TFLOPS"  # a number: the peak to use, no measurement
PEAK_FILE_ENV = "POLAR_PEAK_FILE"  # the measured-peak cache (default ~/.cache/polar/peak_tflops.json)


def spec_sheet_tflops(name: str) -> float | None:
    """The card's datasheet dense bf16 peak (engine/gpu_peaks.py), shown beside the measured peak
    that MFU divides by; None for a card not in the table."""
    from engine.gpu_peaks import datasheet_peak

    sheet = datasheet_peak(name)
    return sheet[0] if sheet else None


def measure_bf16_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """The card's attainable dense bf16 rate: median of `reps` timed n^3 GEMMs (CUDA events)
    after warm-up. Cards of one model differ in clocks, power caps and cooling, so MFU is taken
    against what this card does, not what its spec sheet says."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    return 2 * n ** 3 / ms / 1e9


def resolve_peak(name: str, measure, cache_path: str | None = None) -> float:
    """$POLAR_PEAK_TFLOPS, else the cached measurement for this card name and torch version,
    else `measure()` (cached for the next run; written atomically, several ranks may race)."""
    import json
    import os
    from pathlib import Path

    from engine import durable_file

    if os.environ.get(PEAK_ENV):
        try:
            return float(os.environ[PEAK_ENV])
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r}: expected a number of TFLOP/s") from None
    path = Path(cache_path or os.environ.get(PEAK_FILE_ENV) or Path.home() / ".cache" / "polar" / "peak_tflops.json")
    key = f"{name} | torch {torch.__version__}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    value = float(measure())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable_file.write_file(path, json.dumps({**cache, key: value}, indent=1))
    except OSError:  # a read-only home: measure again next time
        pass
    return value


def peak_tflops(device: torch.device) -> float | None:
    """The peak MFU is taken against: measured on this card (see resolve_peak). CPU: None (no MFU)."""
    if device.type != "cuda":
        return None
    return resolve_peak(torch.cuda.get_device_name(device), lambda: measure_bf16_tflops(device))


def dense_flops_per_token(num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                          lm_head_vocab: int = 0) -> float:
    """Forward+backward FLOPs per token of the matmuls that do not depend on the context
    (QKV, output projection, SwiGLU MLP, and the LM head of the auxiliary next-token loss when
    `lm_head_vocab` > 0): 3x the forward (backward = 2x forward)."""
    head_dim = hidden // heads
    qkv = 2 * hidden * (hidden + 2 * kv_heads * head_dim)
    proj = 2 * hidden * hidden
    mlp = 2 * 3 * hidden * ffn
    return 3.0 * (num_layers * (qkv + proj + mlp) + 2 * hidden * lm_head_vocab)


def attention_flops_per_pair(num_layers: int, hidden: int) -> float:
    """Forward+backward FLOPs per visible (query, key) pair: QK^T and PV, 2 FLOPs per multiply-add
    over heads x head_dim = hidden, times 3. The pairs are counted exactly from the shared-prefix
    layout (engine.group.per_group_counts), not estimated from the sequence length."""
    return 3.0 * num_layers * 2 * 2 * hidden


def format_duration(s: float) -> str:
    """Seconds as "1h02m03s" or "2m03s": progress lines and ETAs."""
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class RateLine:
    """Progress of a long loop on the main rank (`log` prints there only): `WHAT: DONE/TOTAL UNIT | RATE
    RATE_UNIT | eta ETA`, at most once every `interval` seconds, the first after `interval` too, so a loop
    that ends within it prints nothing (a tiny run's log stays as it was). It reads the host clock and
    the counts it is given, nothing of the device: it adds no host-device sync to the loop."""

    def __init__(self, what: str, total: int, unit: str, rate_unit: str, log, interval: float,
                 clock=time.perf_counter):
        self.what, self.total, self.unit, self.rate_unit = what, total, unit, rate_unit
        self.log, self.interval, self.clock = log, interval, clock
        self.start = self.shown = clock()

    def update(self, done: int) -> None:
        now = self.clock()
        if now - self.shown < self.interval:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = f" | eta {format_duration((self.total - done) / rate)}" if rate > 0 else ""
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        self.log(f"{self.what}: {done:,}/{self.total:,} {self.unit} | {shown} {self.rate_unit}{eta}")


# a progress row's figures measured over its window's time (the others are the last step's or the window's mean)
WINDOW_RATES = ("tokens_per_s", "triplets_per_s", "step_time_s", "tflops_per_s", "mfu")


def _shown(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, tb_dir: str | None,
                 peak: float | None, world_size: int, metrics_path: str | None = None,
                 wandb_run: dict | None = None):
        """`metrics_path`: the metrics file's (engine/metrics_file.py), None for none; `wandb_run`: the
        arguments of engine.wandb_log.WandbLog, None for no wandb logging."""
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_step = start_step
        self.paused_s = 0.0  # within the current window
        self.first: tuple | None = None  # (end time, counts) of this fit's first step (first_step_done)
        self.peak = peak
        self.world = world_size
        # a start with nothing left to train (the same command after the run finished) evaluates its step
        # again: TensorBoard's points of that step are written again (rewrite_start_step)
        self.rewrites_start = 0 < start_step >= total_steps
        self.writer = None
        if enabled and tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run trains the steps after its checkpoint again: TensorBoard drops what
                # the stopped run logged from there on (after a kill: up to its last step), which it
                # would otherwise show twice; and the step itself where its points are written again (its
                # final evaluation's would be the step's second, which TensorBoard's Python loader shows
                # beside the first: --load_fast=false, EventAccumulator; its Rust data server keeps the later)
                self.writer = SummaryWriter(tb_dir, purge_step=start_step if self.rewrites_start else
                                            start_step + 1 if start_step else None)
                _quiet_writer_thread_errors()
            except ImportError:
                print("tensorboard is not installed: no TensorBoard scalars", file=sys.stderr)
        self.metrics = None
        if enabled and metrics_path:
            from engine.metrics_file import MetricsFile

            self.metrics = MetricsFile(metrics_path, start_step)
        self.wandb = None
        if enabled and wandb_run is not None:
            from engine.wandb_log import WandbLog

            self.wandb = WandbLog(**wandb_run)

    def first_step_done(self, tokens: int, real_tokens: int, triplets: int, flops: float) -> None:
        """The fit's first step has ended, with these counts (those `log` will be given for it). It
        carries one-off costs (lazy optimizer state, kernel compilation and autotuning, allocator
        growth, communicator set-up: minutes at scale), which would otherwise stay in the ETA's
        per-step average for hundreds of steps and in the first line's rates. A window of more steps
        leaves it out of its rates; a window of that step alone says so (row `includes_warmup`)."""
        self.first = (time.perf_counter(), tokens, real_tokens, triplets, flops)

    def log(self, step: int, loss: float | None, acc: float | None, lr: float, grad_norm: float, tokens: int,
            real_tokens: int, triplets: int, flops: float, lm_loss: float | None = None, skipped: int = 0) -> dict:
        """One progress line for the steps since the last call; `flops` = their model FLOPs. A loss or
        accuracy of None (nothing counted: every step of the window skipped as non-finite) is shown as
        n/a and left out of the row and TensorBoard: a 0 there reads as a perfect model."""
        now = time.perf_counter()
        since = self.last_t
        steps = max(step - self.last_step, 1)
        warmup = self.first is not None and self.last_step == self.start_step  # the window holds the first step
        if warmup and steps > 1:  # rates over the steps after it (the pauses all came after it)
            since, *counts = self.first
            tokens, real_tokens, triplets, flops = (a - b for a, b in zip((tokens, real_tokens, triplets, flops),
                                                                          counts))
            steps -= 1
            warmup = False
        dt = max(now - since - self.paused_s, 1e-9)
        tok_s = real_tokens / dt
        trip_s = triplets / dt
        # wall time per step, pauses included (evaluations and saves recur), the first step's one-off
        # costs not, once a step after it has ended
        done = step - self.start_step
        if self.first is not None and done > 1:
            eta = (self.total - step) * (now - self.first[0]) / (done - 1)
        else:
            eta = (self.total - step) * (now - self.t0) / max(done, 1)
        mfu = None
        if self.peak:
            mfu = flops / dt / (self.peak * 1e12 * self.world)
        row = {"step": step, "loss": loss, "pair_acc": acc, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tok_s, "triplets_per_s": trip_s, "step_time_s": dt / steps,
               "packing": real_tokens / tokens if tokens else None, "tflops_per_s": flops / dt / 1e12}
        row = {k: v for k, v in row.items() if v is not None}
        if skipped:
            row["skipped_steps"] = skipped
        if mfu is not None:
            row["mfu"] = mfu
        if lm_loss is not None:
            row["lm_loss"] = lm_loss
        if warmup:
            row["includes_warmup"] = True
        if self.enabled:
            lm_s = f" | lm loss {lm_loss:.3f}" if lm_loss is not None else ""
            skip_s = f" | {skipped} step(s) skipped" if skipped else ""
            warm_s = " | first step: rates include its warm-up" if warmup else ""
            # mfu on every line, n/a where no peak is known (CPU): a line's fields do not depend on the card
            print(
                f"step {step:>6}/{self.total} | loss {_shown(loss, '.4f')} | pair acc {_shown(acc, '.3f')}{lm_s} | "
                f"lr {lr:.2e} | "
                f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tok/s | {trip_s:,.1f} groups/s | "
                f"{flops / dt / 1e12 / self.world:.3g} TFLOP/s per rank | mfu {_shown(mfu, '.1%')} | "
                f"eta {format_duration(eta)}{skip_s}{warm_s}",
                flush=True,
            )
            if self.metrics:  # the row whole: its includes_warmup marks the rates of a warm-up window
                self.metrics.train(row)
            self._scalars(_train_scalars(row), step)
        self.last_t = now
        self.last_step = step
        self.paused_s = 0.0
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) is no training: it stays out of the
        throughput, step time and MFU, and in the ETA, which is wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def log_eval(self, step: int, name: str, result: dict, final: bool = False) -> None:
        """A set's evaluation at `step`: a periodic one's line, or (`final`) the run's final evaluation after
        fit, which the entry script reports in its summary lines: not printed, written as the metrics file's
        final line and as TensorBoard's and wandb's final_NAME/ scalars (apart from the periodic curves,
        whose last point it would double where it reuses the periodic result of its step)."""
        if not self.enabled:
            return
        if not final:
            extra = f" | lm loss {result['lm_loss']:.3f}" if "lm_loss" in result else ""
            print(f"eval {name} at step {step}: loss {result['loss']:.4f} | pair acc {result['pair_accuracy']:.3f} "
                  f"over {result['pairs']:,} pairs{extra}", flush=True)
        if self.metrics:
            self.metrics.eval(step, name, result, final)
        self._scalars(_eval_scalars(f"{'final' if final else 'eval'}_{name}", result), step)

    def rewrite_start_step(self, history) -> None:
        """TensorBoard's points of the step a start with nothing left to train resumed at, which its writer
        dropped (the earlier start's final points with them): `history`'s rows of that step (the trainer's,
        from the checkpoint) written again, before the final evaluation's. Nothing for any other start."""
        if not (self.writer and self.rewrites_start):
            return
        for row in history:
            if row["step"] == self.start_step:
                self._tensorboard(_eval_scalars(f"eval_{row['eval']}", row) if "eval" in row
                                  else _train_scalars(row), row["step"])

    def _scalars(self, values: dict, step: int) -> None:
        if self.wandb:
            self.wandb.log(values, step)
        self._tensorboard(values, step)

    def _tensorboard(self, values: dict, step: int) -> None:
        if not self.writer:
            return
        try:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        except OSError as e:
            self._writer_failed(e)

    def _writer_failed(self, e: OSError) -> None:
        # TensorBoard's writer thread keeps a failed write's error (a full disk, a file system's EIO) and raises
        # it at the next scalar or at close, in the training loop: its curves are a side concern, not worth
        # the run (close comes before the final save)
        writer, self.writer = self.writer, None
        print(f"tensorboard: could not write to {writer.log_dir} ({e!r}): no more scalars are written; the run "
              f"goes on", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            writer.close()

    def flush(self) -> None:
        """What is written so far onto disk (TensorBoard's writer holds its events up to two minutes): the
        end of the training before its final save and evaluation, which a kill may cut short."""
        if self.writer:
            try:
                self.writer.flush()
            except OSError as e:
                self._writer_failed(e)

    def after_fit(self) -> None:
        """Fit has ended and the logs stay open for the final evaluation: a SIGTERM, which ends the process
        from here on, finishes the wandb run first (engine.wandb_log.SigtermWatch)."""
        if self.wandb:
            self.wandb.after_fit()

    def close(self, failed: bool = False):
        """`failed`: the run ends with an error, which its wandb run is marked with (exit code 1; wandb's own
        exit hook records 0 where the entry script returns its error's status)."""
        if self.metrics:
            self.metrics.close()
        if self.wandb:
            self.wandb.close(exit_code=1 if failed else 0)
        if self.writer:
            try:
                self.writer.close()
            except OSError as e:
                self._writer_failed(e)


def _train_scalars(row: dict) -> dict:
    """TensorBoard's and wandb's scalars of a progress row (Progress.log's)."""
    # a window of the warm-up step alone (log.interval=1) keeps its rates out: TensorBoard and wandb have
    # no mark for them, and a first step of minutes would stand as the curves' outlier
    left_out = ("step", "includes_warmup", *(WINDOW_RATES if row.get("includes_warmup") else ()))
    return {f"train/{k}": v for k, v in row.items() if k not in left_out}


def _eval_scalars(prefix: str, result: dict) -> dict:
    """The scalars of an evaluation's result: its line's figures, under `prefix`/ (eval_SET, final_SET)."""
    return {f"{prefix}/{k}": result[k] for k in ("loss", "pair_accuracy", "lm_loss") if k in result}


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread appends each scalar to the events file itself; a write that fails there
    (a full disk) ended the thread with 'Exception in thread ...' and a traceback on stderr, read as the run
    crashing while it went on. The thread keeps the error and raises it at the next scalar or at close,
    where Progress says it once: its traceback alone is left out. Other threads' errors are untouched."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "quiet_writer_thread", False):
        return

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiet_writer_thread = True
    threading.excepthook = hook


def training_only(rows, start_step: int, world_size: int) -> dict:
    """A fit's training-only figures, summed over its progress windows: `rows` are the rows
    Progress.log returned (the history's, in order; evaluation rows and those of an earlier fit, at or
    before `start_step`, are passed over). Each window's seconds are its step_time_s times the steps its
    rates are over: its steps, less the fit's first one in the first window (log's rule), a window of
    that step alone (includes_warmup) left out. So the figures leave out the first step's warm-up, the
    evaluations and saves (paused) and the steps after the last line. -> seconds and steps measured,
    tokens and groups per second, model TFLOP/s per rank and MFU (None where nothing was measured, MFU
    also where a window had no peak: CPU)."""
    seconds = tokens = groups = flops = mfu_seconds = 0.0
    steps = 0
    last, all_mfu = start_step, True
    for r in rows:
        if "eval" in r or "step_time_s" not in r or r["step"] <= start_step:
            continue
        n = r["step"] - last - (1 if last == start_step else 0)
        last = r["step"]
        if r.get("includes_warmup") or n < 1:
            continue
        dt = r["step_time_s"] * n
        seconds += dt
        steps += n
        tokens += r["tokens_per_s"] * dt
        groups += r["triplets_per_s"] * dt
        flops += r["tflops_per_s"] * dt
        all_mfu = all_mfu and "mfu" in r
        mfu_seconds += r.get("mfu", 0.0) * dt
    measured = seconds > 0
    return {
        "train_only_seconds": seconds, "train_only_steps": steps,
        "train_tokens_per_s": tokens / seconds if measured else None,
        "train_groups_per_s": groups / seconds if measured else None,
        "tflops_per_s_per_rank": flops / seconds / world_size if measured else None,
        "mfu": mfu_seconds / seconds if measured and all_mfu else None,
    }


def scoring_progress(every_s: float, main_rank: bool, dp: int = 1, unit: str = "packed sequences"):
    """progress(done, total): a line with the rate and ETA at most every `every_s` seconds, on the
    main rank; none at the end (the summary follows). engine.scoring.score's counts packed
    sequences (this rank's share); polar score's (engine/score.py) counts input lines (`done` may be fractional:
    a chunk part-scored)."""
    # the steady clock: a wall clock set back (NTP, a VM resumed) held every line back until it caught up
    # again, and one set forward misstated the rate and ETA
    t0 = last = time.monotonic()
    share = f" (this rank's share: 1/{dp} of them)" if dp > 1 else ""
    last_done = None

    def report(done: float, total: int) -> None:
        nonlocal last, last_done
        now = time.monotonic()
        if not main_rank or done >= total or now - last < every_s or done == last_done:
            return
        last, last_done = now, done
        rate = done / max(now - t0, 1e-9)
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        print(f"scoring: {int(done):,}/{total:,} {unit}{share} | {rate:.2f} {unit.split()[-1]}/s | eta {eta}",
              flush=True)
    return report
