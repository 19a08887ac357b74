"""Progress lines with throughput, MFU and ETA, and TensorBoard scalars (main rank only)."""
from __future__ import annotations

import sys
import time

import torch

# dense bf16 peak per GPU, for the MFU estimate (spec sheet numbers; MFU is an estimate)
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def dense_flops_per_token(num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int) -> float:
    """Forward+backward FLOPs per token of the matmuls that do not depend on the context
    (QKV, output projection, SwiGLU MLP): 3x the forward (backward = 2x forward)."""
    head_dim = hidden // heads
    qkv = 2 * hidden * (hidden + 2 * kv_heads * head_dim)
    proj = 2 * hidden * hidden
    mlp = 2 * 3 * hidden * ffn
    return 3.0 * num_layers * (qkv + proj + mlp)


def attention_flops_per_pair(num_layers: int, hidden: int) -> float:
    """Forward+backward FLOPs per visible (query, key) pair: QK^T and PV, 2 FLOPs per multiply-add
    over heads x head_dim = hidden, times 3. The pairs are counted exactly from the shared-prefix
    layout (engine.data.per_group_counts), not estimated from the sequence length."""
    return 3.0 * num_layers * 2 * 2 * hidden


def format_duration(s: float) -> str:
    """Seconds as "1h02m03s" or "2m03s": progress lines and ETAs."""
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, tb_dir: str | None,
                 peak: float | None, world_size: int):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_step = start_step
        self.peak = peak
        self.world = world_size
        self.writer = None
        if enabled and tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(tb_dir)
            except ImportError:
                print("tensorboard is not installed: logging to stdout only", file=sys.stderr)

    def log(self, step: int, loss: float, acc: float, lr: float, grad_norm: float, tokens: int, real_tokens: int,
            triplets: int, flops: float, lm_loss: float | None = None, skipped: int = 0) -> dict:
        """One progress line for the steps since the last call; `flops` = their model FLOPs."""
        now = time.perf_counter()
        dt = max(now - self.last_t, 1e-9)
        steps = max(step - self.last_step, 1)
        tok_s = real_tokens / dt
        trip_s = triplets / dt
        elapsed = now - self.t0
        eta = (self.total - step) * (elapsed / max(step - self.start_step, 1))
        mfu = None
        if self.peak:
            mfu = flops / dt / (self.peak * 1e12 * self.world)
        row = {"step": step, "loss": loss, "pair_acc": acc, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tok_s, "triplets_per_s": trip_s, "step_time_s": dt / steps,
               "packing": real_tokens / max(tokens, 1), "tflops_per_s": flops / dt / 1e12}
        if skipped:
            row["skipped_steps"] = skipped
        if mfu is not None:
            row["mfu"] = mfu
        if lm_loss is not None:
            row["lm_loss"] = lm_loss
        if self.enabled:
            mfu_s = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            lm_s = f" | lm loss {lm_loss:.3f}" if lm_loss is not None else ""
            skip_s = f" | {skipped} step(s) skipped" if skipped else ""
            print(
                f"step {step:>6}/{self.total} | loss {loss:.4f} | pair acc {acc:.3f}{lm_s} | lr {lr:.2e} | "
                f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tok/s | {trip_s:,.1f} groups/s{mfu_s} | "
                f"eta {format_duration(eta)}{skip_s}",
                flush=True,
            )
            if self.writer:
                for k, v in row.items():
                    if k != "step":
                        self.writer.add_scalar(f"train/{k}", v, step)
        self.last_t = now
        self.last_step = step
        return row

    def log_eval(self, step: int, name: str, result: dict) -> None:
        if not self.enabled:
            return
        extra = f" | lm loss {result['lm_loss']:.3f}" if "lm_loss" in result else ""
        print(f"eval {name} at step {step}: loss {result['loss']:.4f} | pair acc {result['pair_accuracy']:.3f} "
              f"over {result['pairs']:,} pairs{extra}", flush=True)
        if self.writer:
            for k in ("loss", "pair_accuracy"):
                self.writer.add_scalar(f"eval_{name}/{k}", result[k], step)

    def close(self):
        if self.writer:
            self.writer.close()
