"""`polar data build` at scale: synthetic POLAR-like records -> built dataset -> stats, one table.

    python benchmarks/data_build.py [--records 100000] [--seq-length 16384] [--workers 1 2] [--keep DIR]

Records are written for the byte tokenizer (ASCII letters and spaces: one character = one token),
so lengths in tokens are what the generator draws, shaped after POLAR's pre-training data (paper
App. D: prompts of 1-1024 tokens, trajectories of up to 4096 tokens): prompts log-uniform over
1-1024 tokens, reference and candidates long-tailed (log-normal, median 600) and cut at 4096.
Reported: build throughput for each worker count
(and that the outputs are byte-identical), packing efficiency from `polar data stats`, the C++
packer against the plain-Python first-fit of benchmarks/packer.py on the built groups' lengths,
and the shared-prefix savings for K=2 (the built data) and K=8 (a sample encoded the same way).
First, the memory of planning one shard of one file of short lines (--plan-lines; --plan-only
stops there): the peak Python and numpy allocations (tracemalloc) of `plan_chunks` for one
machine and for the last of 8, against the scan that kept every line's offset (the baseline, run
on the same file), in bytes per input line. Then the bytes each of N machines reads to plan its
shard of one file (--scan-mb MB of 0.1-2 KB lines, --scan-machines N), without a scan (each counts
every line) and with `polar data scan` split over the same N machines (each counts its part, then
reads the scan and the blocks where its chunks begin), from the kernel's count of bytes read
(/proc/self/io rchar): at the build's 4 MiB blocks, and at blocks small enough (--scan-blocks) that a
chunk spans many, as a corpus's 8192-record chunks of KB records span many 4 MiB blocks. Then the
scan's JSON every building machine reads and parses (`data_scan.load`, then the check of every
input's size and time) for many small inputs split over many parts (--json-inputs, --json-parts),
against the same parts in the layout of version 1 (the baseline, made in the same run from the same
counts), where every part listed every input. --scan-json-only runs that table alone.
Temporary files go to a temporary directory removed at the end unless --keep names one.
"""
import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.packer import python_first_fit, timed  # noqa: E402
from engine import _C  # noqa: E402
from polar import data_build, data_chunks, data_scan, data_stats  # noqa: E402
from polar.build_workers import BuildConfig  # noqa: E402

ALPHABET = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz     ", dtype=np.uint8)


class TextSource:
    """Random ASCII text cut from one pre-drawn pool: no per-character Python work per record."""

    def __init__(self, rng: np.random.Generator, size: int = 1 << 22):
        self.pool = ALPHABET[rng.integers(0, len(ALPHABET), size)].tobytes().decode("ascii")
        self.rng = rng

    def take(self, n: int) -> str:
        start = int(self.rng.integers(0, len(self.pool) - n))
        return self.pool[start:start + n]


def polar_like_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    prompt = np.exp(rng.uniform(0, np.log(1024), n)).astype(np.int64).clip(1, 1024)
    trajectories = rng.lognormal(np.log(600), 0.9, (n, 9)).astype(np.int64).clip(1, 4096)
    return prompt, trajectories  # column 0 is the reference, the rest candidates


def write_records(path: str, n: int, k: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    text = TextSource(rng)
    prompt, traj = polar_like_lengths(rng, n)
    with open(path, "w") as f:
        for i in range(n):
            p, r = text.take(int(prompt[i])), text.take(int(traj[i, 0]))
            cands = [text.take(int(traj[i, 1 + j])) for j in range(k)]
            if k == 2:
                rec = {"prompt": p, "reference": r, "chosen": cands[0], "rejected": cands[1], "wrapper": "pretrain"}
            else:
                rec = {"prompt": p, "reference": r, "wrapper": "pretrain",
                       "candidates": [{"text": c, "label": int(j == 0)} for j, c in enumerate(cands)]}
            f.write(json.dumps(rec) + "\n")


def every_line_start(path: str) -> np.ndarray:
    """The baseline: the byte offset of every line, as each machine's build kept them before."""
    size, starts = os.path.getsize(path), [np.zeros(1, dtype=np.int64)]
    with open(path, "rb") as f:
        for offset in range(0, size, 1 << 26):
            block = np.frombuffer(f.read(1 << 26), dtype=np.uint8)
            starts.append(np.flatnonzero(block == 10).astype(np.int64) + offset + 1)
    out = np.concatenate(starts)
    return out[out < size]


def traced(fn):
    """(fn(), its peak traced allocation in bytes, seconds)."""
    tracemalloc.start()
    t = time.perf_counter()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1], time.perf_counter() - t
    finally:
        tracemalloc.stop()


def planning_memory(work: str, counts: list[int], chunk_records: int = 8192) -> None:
    rng = np.random.default_rng(0)
    print("\n| input lines | MB | baseline: every line's offset, MB at peak | B/line | plan, 1 machine: MB at peak "
          "| B/line | offsets held | plan, machine 8 of 8: MB at peak | offsets held | baseline / plan | "
          "plan s / baseline s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        path = os.path.join(work, f"lines_{n}.jsonl")
        lengths = rng.integers(2, 40, n)  # short lines: the per-line cost at its largest
        with open(path, "wb") as f:
            for a in range(0, n, 1 << 20):
                f.write(b"".join(b'{"' + b"x" * int(k) + b'"}\n' for k in lengths[a:a + (1 << 20)]))
        data_chunks.plan_chunks([path], chunk_records)  # numpy's first calls allocate caches of their own
        starts, base_peak, base_s = traced(lambda: every_line_start(path))
        assert len(starts) == n
        (one, sources), one_peak, one_s = traced(lambda: data_chunks.plan_chunks([path], chunk_records))
        (last, _), last_peak, _ = traced(lambda: data_chunks.plan_chunks([path], chunk_records, True, 8, 7))
        assert sources[0]["lines"] == n
        print(f"| {n:,} | {os.path.getsize(path) / 1e6:.0f} | {base_peak / 1e6:.1f} | {base_peak / n:.1f} | "
              f"{one_peak / 1e6:.1f} | {one_peak / n:.2f} | {one.offsets_held:,} | {last_peak / 1e6:.1f} | "
              f"{last.offsets_held:,} | {base_peak / one_peak:.1f}x | {one_s / base_s:.2f} |")
        os.remove(path)


def bytes_read() -> int:
    """This process's bytes read so far, as the kernel counts them (read calls, cached or not)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def measured(fn):
    """(fn(), bytes it read, seconds)."""
    before, t = bytes_read(), time.perf_counter()
    out = fn()
    return out, bytes_read() - before, time.perf_counter() - t


def scan_reads(work: str, mb: int, machines: list[int], blocks: list[int], chunk_records: int) -> None:
    rng = np.random.default_rng(0)
    path, lines = os.path.join(work, "corpus.jsonl"), 0
    with open(path, "wb") as f:
        while f.tell() < mb * 1e6:
            lengths = rng.integers(100, 2000, 1 << 12)
            f.write(b"".join(b'{"' + b"x" * int(k) + b'"}\n' for k in lengths))
            lines += len(lengths)
    size = os.path.getsize(path)
    print(f"\n{size / 1e6:.0f} MB, {lines:,} lines, chunks of {chunk_records} lines: bytes read a machine to plan "
          "its shard")
    print("| block | machines | chunks a machine | no scan: MB a machine | scan: its part, MB | then the plan, MB "
          "| no scan / scan | all machines' reads / input, no scan | with scan | plan s a machine, no scan | "
          "scan part + plan s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    build_block = data_chunks._SCAN_BLOCK
    try:
        for block in blocks:
            data_chunks._SCAN_BLOCK = block  # the scan records its block; a build given it reads in those
            for n in machines:
                scan_dir = os.path.join(work, f"scan_{block}_{n}")
                plain, part, plan = np.zeros(n), np.zeros(n), np.zeros(n)
                plain_s, scan_s, chunks = np.zeros(n), np.zeros(n), np.zeros(n)
                for i in range(n):
                    _, part[i], scan_s[i] = measured(lambda: data_scan.scan([path], scan_dir, n, i, quiet=True))
                for i in range(n):
                    def planned(counts=None):
                        return data_chunks.plan_chunks([path], chunk_records, True, n, i, counts)

                    (mine, _), plain[i], plain_s[i] = measured(planned)
                    (with_scan, _), plan[i], s_plan = measured(
                        lambda: planned(data_scan.load(scan_dir).line_counts([path])))
                    assert list(with_scan) == list(mine)  # the same chunks, read by other means
                    chunks[i], scan_s[i] = len(mine), scan_s[i] + s_plan
                shutil.rmtree(scan_dir)
                print(f"| {block:,} | {n} | {chunks.mean():,.1f} | {plain.mean() / 1e6:,.1f} | "
                      f"{part.mean() / 1e6:,.2f} | {plan.mean() / 1e6:,.2f} | "
                      f"{plain.mean() / (part + plan).mean():,.1f}x | "
                      f"{plain.sum() / size:,.2f} | {(part + plan).sum() / size:,.2f} | {plain_s.mean():.3f} | "
                      f"{scan_s.mean():.3f} |")
    finally:
        data_chunks._SCAN_BLOCK = build_block
    os.remove(path)


def version_1(out: str) -> None:
    """The scan's parts rewritten as version 1 wrote them: every input's path, size and time in
    every part, its blocks without them."""
    parts = sorted(os.path.join(out, p) for p in os.listdir(out) if p.startswith("scan-"))
    docs = [json.loads(open(p).read()) for p in parts]
    every = {c["input"]: {k: c[k] for k in ("path", "bytes", "mtime_ns")} for d in docs for c in d["blocks"]}
    every = [every[k] for k in range(docs[0]["num_inputs"])]
    for p, d in zip(parts, docs):
        blocks = [{k: c[k] for k in ("input", "first_block", "newlines", "last_byte")} for c in d["blocks"]]
        with open(p, "w") as f:
            f.write(json.dumps({"format": d["format"], "version": 1, "num_parts": d["num_parts"], "part": d["part"],
                                "block": d["block"], "inputs": every, "blocks": blocks}))


def scan_json(work: str, inputs: int, parts: int, repeat: int = 3) -> None:
    rng = np.random.default_rng(0)
    directory = os.path.join(work, "many")
    os.makedirs(directory)
    files = []
    for k in range(inputs):  # 1-8 lines of 20-200 bytes: a corpus kept as many small files
        files.append(os.path.join(directory, f"shard-{k:06d}.jsonl"))
        with open(files[-1], "wb") as f:
            f.write(b"".join(b'{"' + b"x" * int(n) + b'"}\n' for n in rng.integers(16, 196, rng.integers(1, 9))))
    out = os.path.join(work, "many_scan")
    t = time.perf_counter()
    for part in range(parts):
        data_scan.scan(files, out, parts, part, quiet=True)
    scan_s = (time.perf_counter() - t) / parts
    print(f"\n{inputs:,} inputs of {sum(map(os.path.getsize, files)) / inputs:,.0f} bytes on average, a scan of "
          f"{parts} parts ({scan_s:.2f} s a part): the scan's JSON a building machine reads, best of {repeat}")
    print("| parts' layout | largest part, KB | all parts: MB a machine reads | load s (read, parse, merge) | "
          "check of the inputs s | version 1 / this: MB | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows, want = [], None
    for layout in ("version 1: every input in every part (baseline)", "version 2: the inputs it counted"):
        if layout.startswith("version 1"):
            version_1(out)
        sizes = [os.path.getsize(os.path.join(out, p)) for p in os.listdir(out)]
        loads, checks = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            loaded = data_scan.load(out)
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            counts = loaded.line_counts(files)
            checks.append(time.perf_counter() - t)
        got = [(c.size, c.lines) for c in counts]
        assert want is None or got == want  # the same counts from either layout
        want = got
        rows.append((layout, max(sizes), sum(sizes), min(loads), min(checks)))
        if layout.startswith("version 1"):  # the same counts, written again by this polar
            shutil.rmtree(out)
            for part in range(parts):
                data_scan.scan(files, out, parts, part, quiet=True)
    base = rows[0]
    for layout, largest, total, load_s, check_s in rows:
        print(f"| {layout} | {largest / 1e3:,.1f} | {total / 1e6:,.2f} | {load_s:.3f} | {check_s:.3f} | "
              f"{base[2] / total:,.1f}x | {base[3] / load_s:,.1f}x |")
    shutil.rmtree(out)
    shutil.rmtree(directory)


def shared_prefix_savings(path: str, seq_length: int, workers: int) -> tuple[float, int]:
    out = path + ".ds"
    # truncated as in training (max_length), packed at a length no group reaches so that every group counts
    data_build.build([path], out, BuildConfig(seq_length=1 << 20, max_length=seq_length, on_error="skip"),
                     workers=workers, quiet=True)
    s = data_stats.compute(out)
    shutil.rmtree(out)
    return s["shared_prefix"]["percent_saved"], s["groups"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=at_least(1), default=100_000,
                    help="synthetic records built (default %(default)s)")
    ap.add_argument("--seq-length", type=at_least(1), default=16384,
                    help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2],
                    help="worker counts of the build, a row each (default %(default)s)")
    ap.add_argument("--k8-records", type=at_least(1), default=5000, help="records of the K=8 savings sample")
    ap.add_argument("--python-groups", type=at_least(1), default=20000, help="groups for the quadratic Python first-fit")
    ap.add_argument("--keep", default="", help="work in this directory and keep it")
    ap.add_argument("--plan-lines", type=at_least(1), nargs="+", default=[1_000_000, 2_000_000, 4_000_000],
                    help="lines of the files whose planning memory is measured")
    ap.add_argument("--scan-mb", type=at_least(1), default=128, help="MB of the file whose planning reads are measured")
    ap.add_argument("--scan-machines", type=at_least(1), nargs="+", default=[8, 100],
                    help="machines sharing its build and its scan")
    ap.add_argument("--scan-blocks", type=at_least(1), nargs="+", default=[data_chunks._SCAN_BLOCK, 1 << 15],
                    help="the scan's block sizes in bytes (default the build's 4 MiB, and 32 KiB: a chunk spans ~16)")
    ap.add_argument("--scan-chunk-records", type=at_least(1), default=512, help="lines per chunk of that build")
    ap.add_argument("--json-inputs", type=at_least(1), default=20_000,
                    help="small inputs of the scan whose JSON a building machine reads")
    ap.add_argument("--json-parts", type=at_least(1), default=50, help="parts of that scan")
    ap.add_argument("--plan-only", action="store_true", help="measure planning memory, reads and scan JSON only")
    ap.add_argument("--scan-json-only", action="store_true", help="measure the scan's JSON only")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="polar_data_build_")
    os.makedirs(work, exist_ok=True)
    try:
        if args.scan_json_only:
            scan_json(work, args.json_inputs, args.json_parts)
            return
        planning_memory(work, args.plan_lines)
        scan_reads(work, args.scan_mb, args.scan_machines, args.scan_blocks, args.scan_chunk_records)
        scan_json(work, args.json_inputs, args.json_parts)
        if args.plan_only:
            return
        t = time.perf_counter()
        records = os.path.join(work, "records.jsonl")
        write_records(records, args.records, k=2)
        print(f"wrote {args.records:,} records ({os.path.getsize(records) / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.1f}s to {records}")

        rows, first = [], None
        for w in args.workers:
            out = os.path.join(work, f"ds_w{w}")
            try:
                meta = data_build.build([records], out, BuildConfig(seq_length=args.seq_length),
                                        workers=w, quiet=True, force=True)
            except ValueError as exc:  # a group longer than --seq-length, as `polar data build` says it
                sys.exit(f"data_build.py: error: polar data build refused the records: {exc}")
            c, dt = meta["counts"], meta["elapsed_s"]
            same = "-" if first is None else str(filecmp.cmp(first + ".bin", meta["path"] + ".bin", shallow=False)
                                                  and filecmp.cmp(first + ".idx", meta["path"] + ".idx", shallow=False))
            rows.append((w, dt, c["lines"] / dt, c["tokens"] / dt, same))
            if first is None:
                first, dataset = meta["path"], out
            else:
                shutil.rmtree(out)
        stats = data_stats.compute(dataset)
        print()
        print(data_stats.format_text(stats))

        print("\n| workers | build s | records/s | records/s per worker | Mtokens/s | Mtokens/s per worker | same output |")
        print("|---:|---:|---:|---:|---:|---:|:---:|")
        for w, dt, rps, tps, same in rows:
            print(f"| {w} | {dt:.1f} | {rps:,.0f} | {rps / w:,.0f} | {tps / 1e6:.2f} | {tps / w / 1e6:.2f} | {same} |")

        from engine.indexed_dataset import IndexedDataset

        lengths = IndexedDataset(dataset).group_lengths
        n_py = min(args.python_groups, len(lengths))
        cap = args.seq_length
        print("\n| packer on the built group lengths | groups | groups/s | vs Python | sequences | efficiency |")
        print("|---|---:|---:|---:|---:|---:|")
        base = None
        for name, fn, lens, repeat in (("python first-fit (benchmarks/packer.py)", python_first_fit, lengths[:n_py].tolist(), 1),
                                       ("C++ best-fit decreasing (engine._C)", _C.pack_best_fit, lengths[:n_py], 5),
                                       ("C++ best-fit decreasing, all groups", _C.pack_best_fit, lengths, 5)):
            bins, sec = timed(fn, lens, cap, repeat=repeat)
            n_seq = int(bins.max()) + 1
            base = base or len(lens) / sec  # the Python first-fit's rate, measured in this run
            print(f"| {name} | {len(lens):,} | {len(lens) / sec:,.3g} | {len(lens) / sec / base:,.0f}x | {n_seq:,} | "
                  f"{np.sum(lens) / (n_seq * cap):.2%} |")

        k8 = os.path.join(work, "records_k8.jsonl")
        write_records(k8, args.k8_records, k=8, seed=1)
        k2_pct = stats["shared_prefix"]["percent_saved"]
        k8_pct, k8_groups = shared_prefix_savings(k8, args.seq_length, max(args.workers))
        print("\n| K | groups | tokens saved by the shared prefix |")
        print("|---:|---:|---:|")
        print(f"| 2 | {stats['groups']:,} | {k2_pct:.1f}% |")
        print(f"| 8 | {k8_groups:,} | {k8_pct:.1f}% |")
        print(f"\nacceptance: packing efficiency {stats['packing_efficiency']:.2%} at {cap} tokens "
              f"({'>=' if stats['packing_efficiency'] >= 0.97 else '<'} 97%)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
