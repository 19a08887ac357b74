"""Kernel microbenchmark: fused reward readout, contrastive losses and shared-prefix attention.

    python benchmarks/kernels.py [--quick] [--only readout|loss|attention|cpu] [--json OUT]

On a CUDA GPU it first measures the card's peaks (bf16 matmul rate with an 8192^3 GEMM,
device-to-device copy bandwidth of a 1 GiB tensor), then times forward + backward of each
implementation (cuda = engine._C_cuda, triton, torch eager, torch.compile of the eager reference;
median of CUDA-event timings after warm-up) and prints one markdown table: ms, GB/s for the bytes the
operation must move, that as a fraction of the measured copy bandwidth, and the speed-up over torch
eager. Before timing, each implementation's results (the forward's and every input's gradient) are
compared with torch eager's on the same inputs (`max rel. diff`: the largest difference over the
largest magnitude of eager's, each result against its own); one off by more than 5% is reported,
not timed, and the script exits 1, so a broken kernel cannot show as a speed-up. Attention rows come
from benchmarks/kernels_attention.py when it exists.

Shapes (POLAR-like): one packed sequence of T tokens (512 to 16k), hidden h = 2048 / 4096, bf16,
one group of K = 2 or 8 candidates per 1024 tokens, so n = K * max(1, T // 1024) rewards; the
loss gets one positive per group and its K - 1 pairs.

Bytes counted (e = bytes per element of hidden / rewards, indices int64):
  readout  forward reads the n gathered rows (n h e); backward reads them again (n h e) and writes
           the dense grad_hidden (T h e): 2 n h e + T h e (weights and indices are negligible).
  loss     reads rewards and the pair lists, writes the fp32 gradient and the rewards' gradient:
           n e + 16 P + 4 n + n e, with P pairs. Tiny: these rows measure launch latency, not bandwidth.
Without a GPU it says so and runs the C++ CPU references against torch (benchmarks/cpu_references.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import BF16_TOLERANCE, rel_diff  # noqa: E402

GPU_SECTIONS = ("readout", "loss", "attention")


def time_ms(fn, warmup=5, reps=20) -> float:
    """Median milliseconds of fn() over reps, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_peaks() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, reps=10)
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return {"device": torch.cuda.get_device_name(), "bf16_tflops": 2 * 8192 ** 3 / ms / 1e9,
            "copy_gbps": 2 * src.numel() / copy_ms / 1e6}


def implementations(kind: str) -> dict:
    """name -> function, or name -> the reason it is unavailable (reported, never replaced)."""
    from engine.loss import infonce_sums, pairwise_sums
    from engine.model.readout import torch_reward_readout

    eager = {"readout": torch_reward_readout, "pairwise": pairwise_sums, "infonce": infonce_sums}[kind]
    impls = {}
    try:
        from engine.kernels import cuda_ops

        impls["cuda"] = {"readout": cuda_ops.reward_readout, "pairwise": cuda_ops.pairwise_loss,
                         "infonce": cuda_ops.infonce_loss}[kind]
    except ImportError as exc:
        impls["cuda"] = f"unavailable: {exc}"
    try:
        from engine.kernels import contrastive_loss, reward_readout

        impls["triton"] = {"readout": reward_readout.reward_readout, "pairwise": contrastive_loss.pairwise_loss,
                           "infonce": contrastive_loss.infonce_loss}[kind]
    except ImportError as exc:
        impls["triton"] = f"unavailable: {exc}"
    impls["torch eager"] = eager
    import torch._dynamo

    # one compiled graph per shape; past dynamo's recompile limit it would quietly run eager instead
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    impls["torch.compile"] = torch.compile(eager, dynamic=False)
    return impls


TOLERANCE = BF16_TOLERANCE


def bench_rows(kernel: str, shape: str, impls: dict, step, nbytes: int, peaks: dict, timer=time_ms) -> list[dict]:
    """A row per implementation; `step(fn)` runs fn's forward and backward on the section's inputs and
    returns the results compared with torch eager's (the output and every input's gradient)."""
    rows, base = [], None
    want = step(impls["torch eager"])
    for name, fn in impls.items():
        row = {"kernel": kernel, "shape": shape, "impl": name, "bytes": nbytes}
        if isinstance(fn, str):
            row["error"] = fn
        else:
            try:
                row["max_rel_diff"] = rel_diff(want, step(fn))
                if not row["max_rel_diff"] <= TOLERANCE:
                    row["error"] = f"not timed: results differ from torch eager's by {row['max_rel_diff']:.1e}"
                    rows.append(row)
                    continue
                row["ms"] = timer(lambda: step(fn))
                row["gbps"] = nbytes / row["ms"] / 1e6
                row["frac_peak"] = row["gbps"] / peaks["copy_gbps"]
            except Exception as exc:  # a failing implementation is a result to report
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        if name == "torch eager":
            base = row.get("ms")
        rows.append(row)
    for row in rows:
        if base and "ms" in row:
            row["ratio"] = base / row["ms"]
    return rows


def shapes(quick: bool):
    tokens = (512, 16384) if quick else (512, 2048, 4096, 16384)
    for h in (2048, 4096):
        for t in tokens:
            for k in (2, 8):
                yield h, t, k, k * max(1, t // 1024)


def readout_section(peaks: dict, quick: bool) -> list[dict]:
    impls = implementations("readout")
    rows = []
    for h, t, k, n in shapes(quick):
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(t, 1, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        w = torch.ones(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        index = torch.randperm(t, device="cuda", generator=gen)[:n]
        grad = torch.ones(n, device="cuda")

        def step(fn):
            hidden.grad = w.grad = v.grad = None
            rewards = fn(hidden, index, w, v, 1e-6)
            rewards.backward(grad)
            return [rewards, hidden.grad, w.grad, v.grad]

        nbytes = (2 * n * h + t * h) * hidden.element_size()
        rows += bench_rows("readout fwd+bwd", f"T={t} h={h} K={k} n={n} bf16", impls, step, nbytes, peaks)
    return rows


def loss_section(peaks: dict, quick: bool) -> list[dict]:
    rows = []
    for kind in ("pairwise", "infonce"):
        impls = implementations(kind)
        for t, k, n in sorted({(t, k, n) for _, t, k, n in shapes(quick)}):
            groups = n // k
            pos = torch.arange(groups, device="cuda").repeat_interleave(k - 1) * k
            neg = (torch.arange(groups, device="cuda")[:, None] * k
                   + torch.arange(1, k, device="cuda")[None, :]).reshape(-1)
            rewards = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_()

            def step(fn):
                rewards.grad = None
                loss = fn(rewards, pos, neg)[0]
                loss.backward()
                return [loss, rewards.grad]

            nbytes = 2 * n * rewards.element_size() + 16 * pos.numel() + 4 * n
            rows += bench_rows(f"{kind} loss fwd+bwd", f"T={t} K={k} n={n} pairs={pos.numel()} bf16",
                               impls, step, nbytes, peaks)
    return rows


def attention_section(peaks: dict, quick: bool) -> list[dict]:
    try:
        import kernels_attention
    except ModuleNotFoundError as exc:
        print(f"attention section unavailable: benchmarks/kernels_attention.py not importable ({exc})\n")
        return []
    try:
        return kernels_attention.run(peaks, quick)
    except Exception as exc:  # keep the readout and loss rows when the attention benchmark breaks
        print(f"attention section failed: {type(exc).__name__}: {exc}\n")
        return []


def cpu_section(quick: bool) -> tuple[list[dict], int]:
    """The C++ CPU references against torch eager (benchmarks/cpu_references.py): (JSON rows, exit code)."""
    import cpu_references

    repeat = 2 if quick else 5
    cases = cpu_references.cases(repeat)
    code = cpu_references.print_table(cases, repeat)
    rows = [{"kernel": "cpu reference", "shape": name, "max_rel_diff": diff} | (
        {"error": "not timed: results differ"} if t_torch is None else
        {"torch_eager_ms": t_torch * 1e3, "cpp_ms": t_cpp * 1e3, "ratio": t_torch / t_cpp})
        for name, t_torch, t_cpp, diff in cases]
    return rows, code


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else ""


def print_table(rows: list[dict]) -> None:
    """One markdown table; `vs` is the speed-up over torch eager (readout, loss) or, for attention,
    the shared-prefix kernel's time over flash attention on the duplicated-prefix layout."""
    print("| kernel | shape | impl | ms | GB/s | TFLOP/s | fraction of peak | vs | max rel. diff | note |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        diff = fmt(r.get("max_rel_diff"), ".1e")
        if "error" in r:
            print(f"| {r['kernel']} | {r['shape']} | {r['impl']} | | | | | | {diff} | {r['error']} |")
            continue
        dup = r.get("shared_over_duplicated")
        vs = (f"{r['ratio']:.2f}x" if isinstance(r.get("ratio"), float) else
              f"{dup:.2f} of dup." if isinstance(dup, float) else "")
        print(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {fmt(r.get('ms'), '.3f')} | "
              f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('frac_peak'), '.1%')} | "
              f"{vs} | {diff} | {r.get('note', '')} |", flush=True)


def differing(rows: list[dict]) -> list[str]:
    """The rows whose results differed from their reference's (not timed)."""
    return [f"{r['kernel']} {r['shape']} {r.get('impl', '')}".strip() for r in rows
            if (r.get("error") or r.get("note") or "").startswith("not timed: results differ")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (and best of 2 for the CPU references)")
    ap.add_argument("--only", choices=(*GPU_SECTIONS, "cpu"),
                    help="one section: readout, loss and attention need CUDA; cpu (the default without a GPU) "
                         "times the C++ CPU references against torch eager")
    ap.add_argument("--json", help="write peaks and rows here")
    args = ap.parse_args(argv)
    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # the attention section imports megatron, whose warnings come at import

    if args.only == "cpu" or not torch.cuda.is_available():
        if args.only in GPU_SECTIONS:
            print(f"--only {args.only} needs a CUDA GPU; none is available here.")
            return 1
        if args.only != "cpu":
            print("No CUDA GPU: the GPU sections (readout, loss, attention) need CUDA and are not run. "
                  "Running the C++ CPU references against torch instead.\n")
        rows, code = cpu_section(args.quick)
        if args.json:  # the CPU rows too: --json wrote nothing here before
            with open(args.json, "w") as f:
                json.dump({"peaks": None, "torch": torch.__version__, "device": "CPU", "rows": rows}, f, indent=1)
        return code

    peaks = measure_peaks()
    print(f"{peaks['device']}, torch {torch.__version__}: bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s, "
          f"device copy {peaks['copy_gbps']:.0f} GB/s; forward+backward, median of 20\n")
    sections = {"readout": readout_section, "loss": loss_section, "attention": attention_section}
    rows = []
    for name, section in sections.items():
        if args.only in (None, name):
            new_rows = section(peaks, args.quick)
            rows += new_rows
            # a table and the JSON after every section: a run stopped by a time limit keeps what it measured
            print_table(new_rows)
            print()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"peaks": peaks, "torch": torch.__version__, "rows": rows}, f, indent=1)
    differ = differing(rows)
    if differ:
        print(f"results differ beyond {TOLERANCE:g} (relative) from the reference: {'; '.join(differ)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
