"""The scaling law at small scale: held-out loss against reward-model size and training compute.

The paper fits its pre-training loss with power laws, L = a * N^b over five RMs of 50M-1B
parameters and L = a * C^b over their training compute (App. D.1.2: L = 0.9 N^-0.0425,
R^2 0.9886; L = 2.4 C^-0.0342, R^2 0.9912). This script repeats the measurement at CPU scale:
a ladder of tiny reward models, each trained from random weights by the engine itself
(`engine/pretrain.py`, the embedded default recipe: synthetic policies, byte tokenizer,
shared-prefix packing, ranking loss of Eq. 7 plus the auxiliary next-token loss) on the same
number of tokens, evaluated on held-out policies as it trains.

- L: the ranking loss (Eq. 7) on the held-out policies' triplets (the same 1,000 triplets for
  every size), the objective the paper's laws describe; the auxiliary next-token loss is printed
  and fitted beside it.
- N: non-embedding parameters (the token embedding and the auxiliary LM head, vocab x hidden
  each, excluded, as in Kaplan et al.'s laws: they are 42% of the smallest model here and 6% of the
  largest, a share that grows with width only and would bend the law; the total is printed too).
- C: training FLOPs as the engine counts them for its MFU (matrix products of every layer and
  head, and the exact attention work of the shared-prefix layout), summed over the steps run.
- size fit: the final held-out loss of each model against N. Compute fit: every evaluation of
  every model is a (C, L) point; the fit runs over the compute frontier (the points no cheaper
  evaluation beats), as compute-optimal laws are drawn, from the second half of each run on
  (--fit-from): before it a model sits at ln 2 and then warms up, a transient and not the law.
- fits: least squares of log L on log N (log C); R^2 of that regression.

Every size trains in its own process, single-threaded (`--jobs` at once, largest first), so the
losses do not depend on --jobs or on the machine's load; only the wall time does. Runs are kept
under --out: an interrupted study resumes, reusing each size that finished (--fresh retrains).

    python benchmarks/scaling_law.py                         # 5 sizes, 2 at a time (about 40 min, 2 cores)
    python benchmarks/scaling_law.py --sizes xs s --tokens 2e5 --eval-points 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polar.tokenizer import ByteTokenizer  # noqa: E402  (the embedded default's tokenizer: its vocabulary)


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    lr: float

    def overrides(self) -> list[str]:
        return [f"model.num_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.num_attention_heads={self.heads}", f"model.num_query_groups={self.kv_heads}",
                f"model.ffn_hidden_size={self.ffn}", f"train.lr={self.lr}"]

    def non_embedding_parameters(self, total: int, vocab: int, lm_head: bool) -> int:
        return total - vocab * self.hidden * (2 if lm_head else 1)


# Llama-shaped (head dim 16, SwiGLU ffn ~2.75 x hidden, grouped-query attention), about 2x apart
# in non-embedding parameters from 23k to 1.1M; "m" is the embedded default's shape. One peak lr
# for all (the default's): the paper's lr law barely moves with size (LR ~ N^0.011, App. D.1.2).
LADDER = (
    Size("xs", 2, 32, 2, 1, 88, 2e-3),
    Size("s", 3, 48, 3, 1, 128, 2e-3),
    Size("m", 4, 64, 4, 2, 176, 2e-3),
    Size("l", 5, 96, 6, 2, 256, 2e-3),
    Size("xl", 6, 128, 8, 4, 352, 2e-3),
)


def run_size(size: Size, args, run_dir: Path) -> dict:
    """Train one size (or reuse its finished run); return its summary.json or an error row."""
    summary = run_dir / "summary.json"
    if summary.exists() and not args.fresh:
        return json.loads(summary.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: its checkpoint may be from other settings
    steps = max(1, round(args.tokens / (args.batch * args.seq)))
    eval_interval = max(1, steps // args.eval_points) if args.eval_points > 1 else 0
    cmd = [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={run_dir}", *size.overrides(),
           f"train.steps={steps}", f"train.global_batch={args.batch}", f"train.micro_batch={args.micro_batch}",
           f"data.seq_length={args.seq}", f"train.warmup_steps={min(30, max(1, steps // 10))}",
           f"train.eval_interval={eval_interval}", "train.time_limit_s=0", f"log.interval={args.log_interval}",
           "log.tensorboard=false", "checkpoint.keep=1", f"synthetic.eval_triplets={args.eval_triplets}",
           *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        # this child's own CPU time: what the run costs whatever else shares the cores
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 or not summary.exists():
        tail = (run_dir / "train.log").read_text()[-1500:]
        return {"error": f"exit {rc}: {' '.join(cmd)}\n{tail}"}
    cpu = usage.ru_utime + usage.ru_stime
    (run_dir / "cost.json").write_text(json.dumps({"wall_s": time.time() - t0, "cpu_s": cpu}))
    print(f"  {size.name}: trained in {time.time() - t0:.0f} s ({cpu:.0f} CPU s)", file=sys.stderr, flush=True)
    return json.loads(summary.read_text())


def cost(run_dir: Path) -> dict:
    """Wall and CPU seconds of a size's run, where this script trained it."""
    path = run_dir / "cost.json"
    return json.loads(path.read_text()) if path.exists() else {}


def curve(summary: dict) -> list[dict]:
    """(tokens, FLOPs, held-out losses) at every evaluation, the final one included.

    Tokens and FLOPs are summed from the training log rows, which hold each interval's rates and
    time: rate x interval time gives back the interval's counts."""
    points, tokens, flops, last_step = [], 0.0, 0.0, 0
    for row in summary["history"]:
        if "eval" not in row:
            dt = row["step_time_s"] * (row["step"] - last_step)
            tokens += row["tokens_per_s"] * dt
            flops += row["tflops_per_s"] * 1e12 * dt
            last_step = row["step"]
        elif row["eval"] == "held_out":
            points.append({"step": row["step"], "tokens": tokens, "flops": flops, "loss": row["loss"],
                           "lm_loss": row.get("lm_loss", float("nan")), "accuracy": row["pair_accuracy"]})
    final = summary["evaluations"]["held_out"]
    points.append({"step": summary["steps"], "tokens": tokens, "flops": flops, "loss": final["loss"],
                   "lm_loss": final.get("lm_loss", float("nan")), "accuracy": final["pair_accuracy"],
                   "pairs": final["pairs"]})
    return points


def power_fit(x, y) -> tuple[float, float, float]:
    """L = a * x^b by least squares in log-log space; returns (a, b, R^2 of that regression)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    b, log_a = np.polyfit(lx, ly, 1)
    resid = ly - (log_a + b * lx)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return math.exp(log_a), float(b), r2


def compute_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (C, L) points that no point of lower or equal compute beats."""
    out, best = [], math.inf
    for c, loss in sorted(points):
        if loss < best:
            out.append((c, loss))
            best = loss
    return out


def draw(path: Path, rows: list[dict], size_fit, frontier, compute_fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = np.array([r["non_embedding"] for r in rows], float)
    ax1.loglog(n, [r["final"]["loss"] for r in rows], "o", label="final held-out loss")
    xs = np.geomspace(n.min(), n.max(), 50)
    a, b, r2 = size_fit
    ax1.loglog(xs, a * xs ** b, "-", label=f"L = {a:.3g} N^{b:.4f}  (R² {r2:.3f})")
    ax1.set_xlabel("non-embedding parameters N")
    ax1.set_ylabel("held-out ranking loss (Eq. 7)")
    ax1.legend()
    for r in rows:
        c = [p["flops"] for p in r["curve"]]
        ax2.loglog(c, [p["loss"] for p in r["curve"]], ".-", alpha=0.6, label=r["size"])
    if compute_fit:
        fc = np.array([c for c, _ in frontier])
        xs = np.geomspace(fc.min(), fc.max(), 50)
        a, b, r2 = compute_fit
        ax2.loglog(xs, a * xs ** b, "k--", label=f"frontier: L = {a:.3g} C^{b:.4f}  (R² {r2:.3f})")
    ax2.set_xlabel("training FLOPs C")
    ax2.legend(fontsize=8)
    fig.suptitle("POLAR pre-training loss against size and compute (tiny RMs, synthetic policies, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=[s.name for s in LADDER],
                    choices=[s.name for s in LADDER], help="which rungs of the ladder")
    ap.add_argument("--tokens", type=float, default=2.5e6, help="training tokens per size (packed, padding included)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="packed sequences per step")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--eval-points", type=int, default=6, help="held-out evaluations per run, the final one included")
    ap.add_argument("--eval-triplets", type=int, default=1000, help="per evaluation set")
    ap.add_argument("--fit-from", type=float, default=0.5,
                    help="compute fit: evaluations from this fraction of each run on (the warm-up and the "
                         "plateau at ln 2 before a model starts to discriminate are transients, not the law)")
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="sizes trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per size")
    ap.add_argument("--out", default=str(ROOT / "runs" / "scaling_law"), help="run directories, the PNG and the JSON")
    ap.add_argument("--fresh", action="store_true", help="retrain sizes whose runs already finished")
    ap.add_argument("overrides", nargs="*", help="extra engine settings for every size (after --)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ladder = [s for s in LADDER if s.name in args.sizes]
    if len(ladder) < 2:
        ap.error("a fit needs at least two sizes")

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:  # largest first: the longest run starts at once
        futures = {s.name: pool.submit(run_size, s, args, out / s.name) for s in reversed(ladder)}
    summaries = {name: f.result() for name, f in futures.items()}
    wall = time.time() - t0

    failed = {n: s["error"] for n, s in summaries.items() if "error" in s}
    for name, err in failed.items():
        print(f"size {name} failed: {err}", file=sys.stderr)
    rows = []
    for size in ladder:
        s = summaries[size.name]
        if "error" in s:
            continue
        lm_head = any("lm_loss" in r for r in s["history"])
        points = curve(s)
        rows.append({"size": size.name, "shape": asdict(size), "parameters": s["parameters"],
                     "non_embedding": size.non_embedding_parameters(s["parameters"], ByteTokenizer.vocab_size, lm_head),
                     "curve": points, "final": points[-1], **cost(out / size.name)})
    if len(rows) < 2:
        print("fewer than two sizes finished: nothing to fit", file=sys.stderr)
        return 1

    size_fit = power_fit([r["non_embedding"] for r in rows], [r["final"]["loss"] for r in rows])
    lm_fit = (power_fit([r["non_embedding"] for r in rows], [r["final"]["lm_loss"] for r in rows])
              if all(r["final"]["lm_loss"] > 0 for r in rows) else None)
    frontier = compute_frontier([(p["flops"], p["loss"]) for r in rows for p in r["curve"]
                                 if p["step"] >= args.fit_from * r["final"]["step"]])
    compute_fit = power_fit(*zip(*frontier)) if len(frontier) >= 3 else None

    print(f"scaling law at small scale: {len(rows)} sizes x {args.tokens:,.0f} tokens (seq {args.seq}, "
          f"{args.batch} sequences a step), held-out ranking loss over {rows[0]['final'].get('pairs', args.eval_triplets)} "
          f"triplets; {wall / 60:.1f} min wall with {args.jobs} job(s) x {args.threads} thread(s)\n")
    print("| size | layers x hidden | parameters | non-embedding N | tokens | C (FLOPs) | held-out loss | "
          "held-out acc | held-out LM loss | CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, sh = r["final"], r["shape"]
        cpu = f"{r['cpu_s']:,.0f}" if "cpu_s" in r else "-"
        print(f"| {r['size']} | {sh['layers']} x {sh['hidden']} | {r['parameters']:,} | {r['non_embedding']:,} | "
              f"{f['tokens']:,.0f} | {f['flops']:.3g} | {f['loss']:.4f} | {f['accuracy']:.3f} | {f['lm_loss']:.4f} | "
              f"{cpu} |")
    if all("cpu_s" in r for r in rows):
        print(f"\nCPU time: {sum(r['cpu_s'] for r in rows) / 60:.1f} min in all, the largest size "
              f"{max(r['cpu_s'] for r in rows) / 60:.1f} min (each size single-threaded)")
    print()
    a, b, r2 = size_fit
    print(f"size fit:    L = {a:.4g} * N^{b:.4f}   R^2 = {r2:.4f}   (final held-out ranking loss, {len(rows)} sizes)")
    if compute_fit:
        a, b, r2c = compute_fit
        print(f"compute fit: L = {a:.4g} * C^{b:.4f}   R^2 = {r2c:.4f}   ({len(frontier)} frontier points of "
              f"{sum(len(r['curve']) for r in rows)} evaluations, each run's from {args.fit_from:.0%} of its steps on)")
    else:
        print(f"compute fit: too few frontier points ({len(frontier)})")
    if lm_fit:
        a, b, r2l = lm_fit
        print(f"LM loss:     L = {a:.4g} * N^{b:.4f}   R^2 = {r2l:.4f}   (auxiliary next-token loss, for comparison)")
    print("paper (App. D.1.2, 50M-1B RMs): L = 0.9 * N^-0.0425 (R^2 0.9886), L = 2.4 * C^-0.0342 (R^2 0.9912)")

    png = out / "scaling_law.png"
    try:
        draw(png, rows, size_fit, frontier, compute_fit)
        print(f"plot: {png}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    (out / "scaling_law.json").write_text(json.dumps({
        "settings": vars(args), "wall_s": wall, "rows": rows,
        "size_fit": dict(zip(("a", "b", "r2"), size_fit)),
        "compute_fit": dict(zip(("a", "b", "r2"), compute_fit)) if compute_fit else None,
        "lm_fit": dict(zip(("a", "b", "r2"), lm_fit)) if lm_fit else None, "frontier": frontier,
        "failed": failed}, indent=1))
    print(f"json: {out / 'scaling_law.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
