"""FP8 against the training dtype: step throughput and the loss after N steps, one table.

    python benchmarks/fp8.py [--steps 200] [--json OUT] [--cpu] [-- extra.setting=value ...]

Each variant is one run of the pre-training entry script (engine/pretrain.py, its synthetic data,
same seed, same data order) with only `train.fp8` / `model.transformer_impl` changed:
  - on a CUDA GPU: bf16 (train.fp8=off), local FP8 tensorwise and rowwise (torch._scaled_mm), and,
    where transformer_engine imports, TE bf16, TE tensorwise (current scaling) and TE delayed;
    a ~0.38B-parameter shape (8 layers of a 2048-wide Llama block) at 4096-token packs;
  - on CPU (or --cpu): a tiny functional version (fp32 against local FP8, a few steps), so the
    script keeps running where no GPU is; CPU FP8 is an emulation and its speed means nothing
    (its per-tensor products take row / column scales on CPU, engine/model/fp8_linear._mm,
    because torch's CPU kernel for scalar scales is 100x and more slower: before that, the
    tensorwise row measured that kernel alone, 423 tokens/s against rowwise's 21,475 at --steps 3;
    now 25,136 against 24,852). No CPU figure stands for a GPU one; the GPU figures are pending.
Throughput is the median tokens/s over the logged intervals after the first (compilation and
warm-up excluded; with one interval, summary.json's train_tokens_per_s, which excludes them too); the
loss is the mean training loss of the last 10 steps, and its difference is relative to the first
variant. A variant that fails is reported with its exit code, not dropped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.pretrain_runs import run_pretrain, train_rows  # noqa: E402

GPU_SHAPE = ["model.num_layers=8", "model.hidden_size=2048", "model.num_attention_heads=16",
             "model.num_query_groups=8", "model.ffn_hidden_size=5632", "data.seq_length=4096",
             # four 4096-token micro-batches a step: the GEMMs are as large as at any batch, and
             # 200 steps of three variants fit the GPU check's few minutes (tests/gpu/run_all.sh)
             "train.global_batch=4", "train.micro_batch=1", "train.precision=bf16"]
CPU_SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
             "model.num_query_groups=2", "model.ffn_hidden_size=64", "train.global_batch=4",
             "train.micro_batch=1", "train.precision=fp32",
             # a functional check: a small synthetic pool and one evaluation set keep each variant short
             "synthetic.train_triplets=2000", "synthetic.eval_triplets=100", "synthetic.eval_seen=false"]


def te_imports() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def variants(cuda: bool) -> list[tuple[str, list[str]]]:
    if not cuda:
        return [("fp32", ["train.fp8=off"]), ("local fp8 tensorwise", ["train.fp8=tensorwise"]),
                ("local fp8 rowwise", ["train.fp8=rowwise"])]
    out = [("bf16", ["train.fp8=off"]), ("local fp8 tensorwise", ["train.fp8=tensorwise"]),
           ("local fp8 rowwise", ["train.fp8=rowwise"])]
    if te_imports():
        te = ["model.transformer_impl=transformer_engine"]
        out += [("TE bf16", te + ["train.fp8=off"]), ("TE fp8 tensorwise", te + ["train.fp8=tensorwise"]),
                ("TE fp8 delayed", te + ["train.fp8=delayed"])]
    return out


def run_variant(name: str, overrides: list[str], run_dir: Path, cuda: bool, timeout: int) -> dict:
    rc, tail, wall, s = run_pretrain(overrides, run_dir, cuda, timeout)
    row = {"variant": name, "overrides": overrides, "exit": rc, "wall_s": wall}
    if s is None:
        row["error"] = tail
        return row
    train = train_rows(s)
    # one logged interval (log.interval >= the steps): the run's training-only rate, which leaves out the
    # first step's warm-up as the intervals after the first do (engine.progress.training_only);
    # tokens_per_second, over the whole fit's wall time (warm-up, saves, evaluations), only where it is null
    rates = [r["tokens_per_s"] for r in train[1:]] or [s.get("train_tokens_per_s") or s["tokens_per_second"]]
    row.update(tokens_per_s=statistics.median(rates), steps=s["steps"],
               loss_last10=statistics.fmean(r["loss"] for r in train[-10:]),
               step_time_s=statistics.median(r["step_time_s"] for r in (train[1:] or train)),
               mfu=statistics.median([r["mfu"] for r in train[1:] if "mfu" in r]
                                     or [s["mfu"] if s.get("mfu") is not None else float("nan")]),
               peak_memory_gb=s.get("peak_memory_gb"))
    return row


def write_json(path: str, device: str, steps: int, settings: list[str], rows: list[dict]) -> None:
    import torch

    Path(path).write_text(json.dumps({"device": device, "torch": torch.__version__, "steps": steps,
                                      "settings": settings, "rows": rows}, indent=1))


def print_table(title: str, rows: list[dict]) -> None:
    """The variants against the first (bf16), as they ended (tests/gpu/partial_tables.py prints a
    stage cut at its limit with it, from the JSON)."""
    base = rows[0] if rows and "tokens_per_s" in rows[0] else None
    print(f"{title}\n")
    print("| variant | exit | tokens/s | speed-up | step s | MFU | loss (last 10) | loss vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['variant']} | {r['exit']} | - | - | - | - | - | - |")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        dloss = f"{(r['loss_last10'] - base['loss_last10']) / base['loss_last10']:+.2%}" if base else "-"
        mfu = "-" if r.get("mfu") is None or r["mfu"] != r["mfu"] else f"{r['mfu']:.1%}"
        print(f"| {r['variant']} | {r['exit']} | {r['tokens_per_s']:,.0f} | {speed} | {r['step_time_s']:.3f} | "
              f"{mfu} | {r['loss_last10']:.4f} | {dloss} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: 200 on a GPU, 5 on CPU")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--cpu", action="store_true", help="the tiny CPU version even where a GPU is")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("overrides", nargs="*", help="extra settings for every variant (after --)")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 2:  # 0 read as the default; 1 timed only the warm-up
        ap.error(f"--steps must be at least 2 (the first interval is warm-up, left out of the medians), "
                 f"not {args.steps}")
    if args.timeout < 1:
        ap.error(f"--timeout must be at least 1 second, not {args.timeout}")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    steps = args.steps or (200 if cuda else 5)
    common = (GPU_SHAPE if cuda else CPU_SHAPE) + [
        f"train.steps={steps}", f"train.warmup_steps={min(10, max(1, steps // 10))}", "log.interval=1",
        "log.tensorboard=false", "checkpoint.resume=false", "checkpoint.keep=1", "checkpoint.save_at_end=false",
        "train.eval_interval=0", *args.overrides]
    device = torch.cuda.get_device_name() if cuda else "CPU (functional check only: FP8 is emulated)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="polar_fp8_") as tmp:
        for name, extra in variants(cuda):
            row = run_variant(name, common + extra, Path(tmp) / name.replace(" ", "_"), cuda, args.timeout)
            rows.append(row)
            done = (f"{row['tokens_per_s']:,.0f} tokens/s, loss (last 10) {row['loss_last10']:.4f}"
                    if "tokens_per_s" in row else row["error"][-300:])
            print(f"{name}: exit {row['exit']} in {row['wall_s']:.0f}s ({done})", file=sys.stderr, flush=True)
            if args.json:  # as each variant ends: a run cut short by an outer time limit still leaves these
                write_json(args.json, device, steps, common, rows)
    print_table(f"{device}, torch {torch.__version__}, {steps} steps; settings: {' '.join(common)}", rows)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
