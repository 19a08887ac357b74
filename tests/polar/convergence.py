"""The convergence guard: a short run of the embedded default recipe compared with recorded losses.

Golden values as Megatron's and torchtitan's functional tests keep them: the same command, from
the same seeds, on the same synthetic data must reproduce the recorded loss curve within a band.
The run is the default recipe (polar/configs/tiny_cpu.yaml: model, optimizer, lr, auxiliary LM loss)
shrunk to a minute on 2 CPU cores through command-line overrides only; `engine/pretrain.py` is
driven as a user drives it and read back through its `summary.json`.

The golden file (tests/assets/losses/tiny_cpu.json) holds the values, the command that made them,
the versions, and the band with its reason; tests/assets/losses/record.py rewrites it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "assets" / "losses" / "tiny_cpu.json"

# The default recipe, shrunk: 60 steps of 8 packed 512-token sequences (about 1,000 groups, a bit
# under one pass over the 1,200 training triplets), a 10-step warm-up so the cosine schedule spends
# most of the 60 steps near the default peak lr, and small evaluation sets (the evaluation losses
# are compared, the accuracies of 64 pairs are too coarse to). time_limit_s=0: a slow machine must
# not cut the run short, or the curve would differ for a reason that is not a regression.
OVERRIDES = (
    "train.steps=60",
    "train.global_batch=8",
    "train.warmup_steps=10",
    "train.time_limit_s=0",
    "log.interval=5",
    "synthetic.train_triplets=1200",
    "synthetic.eval_triplets=64",
    "synthetic.prompts=200",
)
# Compared at every logged step: the ranking loss (POLAR's pre-training objective, paper Eq. 7) and the
# auxiliary next-token loss; after training, the evaluation losses on held-out and seen policies.
CURVE_KEYS = ("loss", "lm_loss")
FINAL_KEYS = ("held_out_loss", "seen_loss")


def command(run_dir: str | Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={run_dir}", *OVERRIDES, *extra]


def run_recipe(run_dir: str | Path, *extra: str, nproc: int = 1, timeout: float = 900) -> dict:
    """Run the shrunk default recipe (one plain process, or data parallel under torchrun); return its
    summary.json."""
    run_dir = Path(run_dir)
    cmd = command(run_dir, *extra)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # one thread per process: the values are the same bit for bit at any thread count (the golden file's
    # tolerance_why), and a second thread cost the default recipe's run a third more CPU time (33 s against
    # 25 s on 2 cores) for a tenth off its wall time, which two pytest workers on 2 cores do not have
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def load_golden(path: str | Path = GOLDEN) -> dict:
    return json.loads(Path(path).read_text())


def within(got: float, want: float, band: dict) -> bool:
    return math.isfinite(got) and abs(got - want) <= band["atol"] + band["rtol"] * abs(want)


def _band(band: dict) -> str:
    return f"+- ({band['atol']} + {band['rtol']} x |golden|)"


def compare(summary: dict, golden: dict) -> list[str]:
    """Every way `summary` (a run's summary.json) leaves the golden band; empty when it is inside.

    A logged step the golden file has and the run lacks is a problem too, so a run that stops early
    cannot pass by comparing fewer points."""
    problems = []
    rows = {row["step"]: row for row in summary.get("history", [])}
    for step, want in golden["curve"].items():
        row = rows.get(int(step))
        if row is None:
            problems.append(f"step {step}: not in the run's history (logged steps: {sorted(rows)})")
            continue
        for key, value in want.items():
            got = row.get(key)
            band = golden["tolerance"][key]
            if got is None or not within(float(got), value, band):
                problems.append(f"step {step}: {key} {got} outside {value} {_band(band)}")
    for key, value in golden["final"].items():
        got = summary.get(key)
        band = golden["tolerance"][key]
        if got is None or not within(float(got), value, band):
            problems.append(f"after training: {key} {got} outside {value} {_band(band)}")
    return problems


def curve_of(summary: dict) -> dict:
    """The golden-file form of a run: {step: {key: value}} and the final evaluation losses."""
    curve = {str(row["step"]): {k: row[k] for k in CURVE_KEYS} for row in summary["history"]}
    return {"curve": curve, "final": {k: summary[k] for k in FINAL_KEYS}}


def learned(golden: dict) -> list[str]:
    """What a recorded curve must show to be worth guarding: both losses fall well below their start.

    At initialisation the ranking loss of a K=2 pair is log 2 = 0.693 and the next-token loss is about
    log(vocab) = 5.5 for the byte vocabulary; record.py refuses to write a curve that does not leave them."""
    steps = sorted(golden["curve"], key=int)
    first, last = golden["curve"][steps[0]], golden["curve"][steps[-1]]
    lowest_rank = min(golden["curve"][s]["loss"] for s in steps)
    problems = []
    if not last["lm_loss"] < 0.6 * first["lm_loss"]:
        problems.append(f"lm_loss {first['lm_loss']:.3f} -> {last['lm_loss']:.3f}: less than a 40% drop")
    if not lowest_rank < math.log(2) - 0.02:
        problems.append(f"ranking loss never below log 2 - 0.02 (lowest {lowest_rank:.4f})")
    return problems
