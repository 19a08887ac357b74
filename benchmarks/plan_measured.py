"""`polar plan`'s prediction beside each measured engine run of the FP8 and end-to-end benchmarks.

    python benchmarks/plan_measured.py OUT/e2e.json OUT/fp8.json [--gpu H200] [--write runs.json]

Each engine run in those files (one GPU: tp = pp = dp = 1) becomes one entry of `polar plan
--measured`'s list: its settings (the model, parallel, train and data sections), its median step
time and MFU, and the peak memory torch's allocator reserved while it trained. The table prints
the plan's memory, step time and MFU for that layout beside each. The GPU type is read from the
benchmark's device name unless --gpu gives it. Baseline rows (transformers) have no plan.

MFU: the plan predicts it against the card's datasheet dense bf16 peak, the conventional figure that
issue 10's target (>= 45% bf16 MFU) is read against, so the measurement beside it is taken against
the same peak (benchmarks/datasheet_peaks.py, from the device name). A second table gives each run's
MFU against both that and the measured peak its training line showed (engine.progress: an 8192^3
GEMM, or $POLAR_PEAK_TFLOPS), and for an FP8 run against the datasheet's dense fp8 peak. A run's
model FLOP rate is its JSON's TFLOP/s (e2e.py), else its measured-peak MFU times that peak (fp8.py):
the JSON's, else the one engine.progress has cached for the device, or $POLAR_PEAK_TFLOPS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.datasheet_peaks import (MFU_TARGET, TARGET_BASIS, datasheet_mfu, measured_basis,  # noqa: E402
                                       peaks_line)
from polar.plan import compare_runs  # noqa: E402
from polar.plan_model import GPUS, Assumptions  # noqa: E402

PLAN_SECTIONS = ("model.", "parallel.", "train.", "data.")


def gpu_type(device: str) -> str:
    """The plan's GPU key a device name holds ("NVIDIA H200" -> "H200")."""
    found = [k for k in GPUS if k.lower() in device.lower()]
    if not found:
        raise ValueError(f"device {device!r} is none of the plan's GPUs ({', '.join(GPUS)}); give --gpu")
    return max(found, key=len)


class NotMeasured(LookupError):
    pass


def measured_peak(doc: dict) -> tuple[float | None, str | None]:
    """(the peak the runs' MFU was taken against, where it came from): the JSON's, else
    $POLAR_PEAK_TFLOPS or the measurement engine.progress cached for this device name (this process
    measures nothing)."""
    if doc.get("measured_peak_tflops"):
        return float(doc["measured_peak_tflops"]), f"{doc.get('measured_peak_basis') or 'measured'}, from the JSON"
    from engine.progress import resolve_peak

    def measure():
        raise NotMeasured

    try:
        return resolve_peak(doc.get("device", ""), measure), measured_basis()
    except NotMeasured:
        return None, None


def _finite(x):
    return None if x is None or x != x else x


def measured_runs(path: str, gpu: str | None) -> list[dict]:
    """`polar plan --measured` entries for the engine rows of one benchmark JSON; "mfu" is against
    the datasheet's dense bf16 peak (the plan's), "mfu_measured_peak" against the measured one."""
    from polar.tokenizer import ByteTokenizer

    doc = json.loads(Path(path).read_text())
    kind = Path(path).stem
    gpu = gpu or gpu_type(doc["device"])
    device = doc.get("device", "")  # with --gpu a JSON may lack it: no datasheet peak then
    peak, basis = measured_peak(doc)
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
        mfu = _finite(row.get("mfu"))
        tflops = _finite(row.get("tflops_per_s"))
        if tflops is None and mfu is not None and peak:
            tflops = mfu * peak
        runs.append({"name": f"{kind}: {row.get('shape') or row.get('variant')}", "config": None,
                     "overrides": overrides, "gpu": gpu, "gpus": 1,
                     "layout": {"tp": 1, "pp": 1, "dp": 1, "micro_batch": micro}, "fp8": fp8,
                     "peak_memory_gb": row.get("peak_memory_gb"), "step_time_s": row["step_time_s"],
                     "mfu": datasheet_mfu(tflops, device), "mfu_measured_peak": mfu,
                     "mfu_datasheet_fp8": datasheet_mfu(tflops, device, fp8=True) if fp8 else None,
                     "tflops_per_s": tflops, "device": device, "measured_peak_tflops": peak,
                     "measured_peak_basis": basis})
    return runs


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def mfu_table(runs: list[dict]) -> list[str]:
    """Each run's MFU against both peaks (markdown)."""
    lines = ["| run | device | TFLOP/s | MFU vs measured peak | MFU vs datasheet bf16 | MFU vs datasheet fp8 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        tflops = "-" if r["tflops_per_s"] is None else f"{r['tflops_per_s']:.3g}"
        lines.append(f"| {r['name']} | {r['device']} | {tflops} | {_pct(r['mfu_measured_peak'])} | "
                     f"{_pct(r['mfu'])} | {_pct(r['mfu_datasheet_fp8'])} |")
    return lines


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
    print(f"\nMFU pred/meas: both against the datasheet's dense bf16 peak (the plan's basis); the target "
          f"(>= {MFU_TARGET:.0%} bf16 MFU) is read against the {TARGET_BASIS} peak.\n")
    for device, peak, basis in dict.fromkeys((r["device"], r["measured_peak_tflops"], r["measured_peak_basis"])
                                             for r in runs):
        print(peaks_line(device, peak, basis) + "\n")
    for line in mfu_table(runs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
