"""`polar score`'s host memory and speed against its chunk size (--chunk-lines), CPU.

    python benchmarks/score_chunks.py [--lines 4000] [--chunk-lines 250 1000] [--checkpoint CKPT]

polar score reads, packs and scores its input a chunk at a time (engine/score.py) and appends each
chunk's rows to OUTPUT.partial. The baseline, run in the same invocation on the same input, is one
chunk holding every line: what polar score did before it streamed (every line's texts, ids and
packed batches in host memory at once, the output written at the end). Each row is a fresh process
(`python -m polar.cli score`); its peak resident memory is the kernel's (wait4's ru_maxrss). The
rewards of every row are compared with the baseline's.

Without --checkpoint a small model is trained for one step first (engine/pretrain.py, byte
tokenizer): what is measured is the host's share, not the model's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=128", "data.seq_length=1024", "synthetic.train_triplets=64",
         "synthetic.eval_triplets=8", "synthetic.prompts=32", "log.tensorboard=false", "train.time_limit_s=0",
         "train.global_batch=4", "train.steps=1"]


def small_checkpoint(tmp: str) -> str:
    run_dir = os.path.join(tmp, "run")
    subprocess.run([sys.executable, os.path.join(ROOT, "engine", "pretrain.py"), *MODEL, f"run_dir={run_dir}"],
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    return os.path.join(run_dir, "checkpoints")


def write_input(path: str, lines: int, seed: int = 0) -> None:
    """Lines of one prompt, one reference and 1-3 outputs, a hundred bytes or so each."""
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "gamma", "delta", "reward", "model", "policy", "token", "answer", "step"])

    def text(n: int) -> str:
        return " ".join(words[rng.integers(0, len(words), n)])

    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"prompt": text(int(rng.integers(10, 30))), "reference": text(int(rng.integers(10, 30))),
                                "candidates": [text(int(rng.integers(5, 25))) for _ in range(1 + i % 3)]}) + "\n")


def run_score(checkpoint: str, inp: str, out: str, chunk_lines: int) -> dict:
    cmd = [sys.executable, "-m", "polar.cli", "score", "--checkpoint", checkpoint, "--input", inp, "--output", out,
           "--chunk-lines", str(chunk_lines), "--progress-s", "1e9"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    # wait4, not Popen.wait: it hands back this child's own peak resident memory
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"polar score --chunk-lines {chunk_lines} failed:\n{err[-3000:]}")
    with open(out) as f:
        rewards = [r for line in f for r in json.loads(line)["rewards"]]
    return {"wall": wall, "peak_mib": usage.ru_maxrss / 1024, "rewards": np.array(rewards)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=at_least(1), default=4000, help="input lines (default 4000)")
    ap.add_argument("--chunk-lines", type=at_least(1), nargs="+", default=[250, 1000],
                    help="chunk sizes measured besides the one-chunk baseline (default 250 1000)")
    ap.add_argument("--checkpoint", default="", help="an engine checkpoint (default: a small one trained here)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or small_checkpoint(tmp)
        inp = os.path.join(tmp, "in.jsonl")
        write_input(inp, args.lines)
        print(f"input: {args.lines:,} lines, {os.path.getsize(inp) / 2**20:.1f} MiB; checkpoint {checkpoint}")
        base = run_score(checkpoint, inp, os.path.join(tmp, "base.jsonl"), args.lines)
        rows = [(f"{args.lines} (one chunk: the baseline)", base)]
        for k in sorted(set(args.chunk_lines) - {args.lines}):
            rows.append((str(k), run_score(checkpoint, inp, os.path.join(tmp, f"c{k}.jsonl"), k)))

    print("\n| --chunk-lines | wall (s) | lines/s | vs baseline | peak RSS (MiB) | vs baseline | max reward diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        diff = float(np.abs(r["rewards"] - base["rewards"]).max())
        print(f"| {name} | {r['wall']:.1f} | {args.lines / r['wall']:,.0f} | {base['wall'] / r['wall']:.2f}x | "
              f"{r['peak_mib']:,.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | {diff:.1e} |")
    print("\nwall includes each process's start (imports, model load): the same for every row")


if __name__ == "__main__":
    main()
