"""`polar plan`'s prediction beside each measured engine run of the FP8 and end-to-end benchmarks.

    python benchmarks/plan_measured.py OUT/e2e.json OUT/fp8.json [--gpu H200] [--write runs.json]

Each engine run in those files (one GPU: tp = pp = dp = 1) becomes one entry of `polar plan
--measured`'s list: its settings (the model, parallel, train and data sections), its median step
time and MFU, and the peak memory torch's allocator reserved while it trained. The table prints
the plan's memory, step time and MFU for that layout beside each. The GPU type is read from the
benchmark's device name unless --gpu gives it. Baseline rows (transformers) have no plan.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from polar.plan import compare_runs  # noqa: E402
from polar.plan_model import GPUS, Assumptions  # noqa: E402

PLAN_SECTIONS = ("model.", "parallel.", "train.", "data.")


def gpu_type(device: str) -> str:
    """The plan's GPU key a device name holds ("NVIDIA H200" -> "H200")."""
    found = [k for k in GPUS if k.lower() in device.lower()]
    if not found:
        raise ValueError(f"device {device!r} is none of the plan's GPUs ({', '.join(GPUS)}); give --gpu")
    return max(found, key=len)


def measured_runs(path: str, gpu: str | None) -> list[dict]:
    """`polar plan --measured` entries for the engine rows of one benchmark JSON."""
    from polar.tokenizer import ByteTokenizer

    doc = json.loads(Path(path).read_text())
    kind = Path(path).stem
    gpu = gpu or gpu_type(doc["device"])
    runs = []
    for row in doc["rows"]:
        if row.get("trainer", "engine") != "engine" or "step_time_s" not in row:
            continue  # a baseline, or a run that failed (its exit code is in the benchmark's table)
        overrides = [o for o in row["overrides"] if o.startswith(PLAN_SECTIONS)]
        if not any(o.startswith("model.vocab_size=") for o in overrides):
            # both benchmarks train on the embedded synthetic data, byte-tokenized
            overrides.append(f"model.vocab_size={ByteTokenizer.vocab_size}")
        fp8 = any(o.startswith("train.fp8=") and o != "train.fp8=off" for o in overrides)
        micro = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.micro_batch=")), 1)
        mfu = row.get("mfu")
        runs.append({"name": f"{kind}: {row.get('shape') or row.get('variant')}", "config": None,
                     "overrides": overrides, "gpu": gpu, "gpus": 1,
                     "layout": {"tp": 1, "pp": 1, "dp": 1, "micro_batch": micro}, "fp8": fp8,
                     "peak_memory_gb": row.get("peak_memory_gb"), "step_time_s": row["step_time_s"],
                     "mfu": None if mfu is None or mfu != mfu else mfu})
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON files written by benchmarks/e2e.py or benchmarks/fp8.py")
    ap.add_argument("--gpu", choices=sorted(GPUS), help="the GPU type (default: read from each file's device)")
    ap.add_argument("--write", help="also write the `polar plan --measured` list here")
    args = ap.parse_args(argv)
    try:
        runs = [r for path in args.results for r in measured_runs(path, args.gpu)]
    except (OSError, KeyError, ValueError) as exc:  # a missing file or field, a device the plan does not know
        print(f"plan_measured: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (TypeError, AttributeError) as exc:  # JSON of another shape (a list, rows that are not objects)
        print(f"plan_measured: {type(exc).__name__}: {exc} (expected the JSON that benchmarks/e2e.py or "
              "benchmarks/fp8.py writes with --json)", file=sys.stderr)
        return 2
    if not runs:
        print("no engine run with a measured step time in " + ", ".join(args.results), file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).write_text(json.dumps(runs, indent=1))
    a = Assumptions()
    print(f"polar plan --measured: {len(runs)} runs{f' ({args.write})' if args.write else ''}; assumptions: "
          f"MFU {a.compute_efficiency:.0%} while computing, the rest polar/plan_model.py's defaults\n")
    for line in compare_runs(runs, a, "plan_measured"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
