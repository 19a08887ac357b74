"""What preparing the next chunk during the current chunk's forward saves in `polar score`, CPU.

    python benchmarks/score_overlap.py [--lines 1200] [--chunk-lines 200] [--threads 1 2]
                                       [--device-ktok-s 200 1000] [--tokenizers byte bpe]

polar score (engine/score.py) reads a chunk of input lines, gives them the client's strings and
ids, packs them (the host's work) and scores them (the model's); the next chunk's host work runs
on a second thread while the model scores this one. Three tables, from the real functions of
engine/score.py on a small model (engine/pretrain.py, one step; with --tokenizers bpe also one
trained with a byte-level BPE made here, the Hugging Face tokenizers library's Rust code):

1. Where a chunk's time goes, the chunks prepared and scored one after another.
2. Whether each host step leaves the interpreter free: the main thread's pure-Python throughput
   while the step runs on another thread, against alone. About 50% means the step holds the GIL
   (the two threads take turns), 100% that it releases it (and leaves a core free).
3. The chunk loop's wall time with the next chunk prepared ahead against after (the baseline, in
   the same run on the same input, at each torch thread count; the median of --repeats runs of
   each, alternated), and the rows compared byte for byte. Rows "model" run the CPU forward; rows
   "device at N ktok/s" stand a wait that holds no GIL in for the forward, of the packed tokens
   over N thousand tokens a second, as the host waits for a GPU that scores that fast (the host's
   work is then what the device would wait for; the speed-up is at most (host + device) / the
   larger of the two).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.score_chunks import MODEL, small_checkpoint, write_input  # noqa: E402


def bpe_checkpoint(tmp: str, inp: str) -> str:
    """A byte-level BPE trained on the input's texts, and a small model trained with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT

    lib = Tokenizer(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    with open(inp) as f:
        texts = [t for line in f for t in json.loads(line).values() if isinstance(t, str)]
    lib.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>", REWARD_SEP_TEXT, REWARD_TOKEN_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok_dir = os.path.join(tmp, "bpe")
    os.makedirs(tok_dir)
    lib.save(os.path.join(tok_dir, "tokenizer.json"))
    run_dir = os.path.join(tmp, "run_bpe")
    # trained on the byte tokenizer's synthetic data with the BPE's vocabulary size, then given the
    # BPE as its own: the rewards mean nothing, the speeds are the BPE's
    done = subprocess.run([sys.executable, os.path.join(ROOT, "engine", "pretrain.py"), *MODEL, f"run_dir={run_dir}",
                           f"model.vocab_size={lib.get_vocab_size()}"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    if done.returncode:
        sys.exit(f"training the BPE model failed:\n{done.stderr[-3000:]}")
    from polar.checkpoint_tokenizer import save_beside

    save_beside(os.path.join(run_dir, "checkpoints"), tok_dir)
    return os.path.join(run_dir, "checkpoints")


def load(checkpoint: str):
    from engine.score import CheckpointScorer

    scorer = CheckpointScorer(checkpoint)
    scorer.start()
    return scorer


def stand_in(scorer, ktok_s: float):
    """The model's forward replaced by a wait of the packed tokens at `ktok_s` (0: the real forward)."""
    import torch

    if not ktok_s:
        scorer.__dict__.pop("_rewards", None)
        return

    def wait(batches, progress, data_parallel):
        time.sleep(sum(b.num_real_tokens for b in batches) / (ktok_s * 1000))
        return torch.zeros(sum(int(b.reward_index.numel()) for b in batches))

    scorer._rewards = wait


def chunk_loop(scorer, inp: str, chunk_lines: int, ahead: bool, out: str) -> float:
    """polar score's loop (engine/score.py run(), one process): seconds from the first read to the
    last row written."""
    from engine.score import _prepared_share, _scored_share, prepared_ahead
    from polar.score_input import iter_score_input, output_row

    args = SimpleNamespace(seq_length=0, input=inp)
    source = iter_score_input(inp)
    limit = scorer.model_cfg.max_position_embeddings

    def prepare():
        lines = list(itertools.islice(source, chunk_lines))
        return lines, _prepared_share(scorer, lines, args, limit)

    t0 = time.perf_counter()
    with open(out, "w") as f:
        for lines, prepared in prepared_ahead(prepare, lambda c: not c[0], ahead=ahead):
            outcome, _, _ = _scored_share(scorer, prepared, None)
            f.write("".join(json.dumps(output_row(ln, outcome[ln.line])) + "\n" for ln in lines))
    return time.perf_counter() - t0


def stages(scorer, inp: str, chunk_lines: int) -> dict:
    """Seconds in each step of every chunk, one after another."""
    from polar.score_input import iter_score_input, output_row

    spent = dict.fromkeys(("read and parse", "client strings, ids, groups", "pack (plan, collate)", "forward",
                           "rows"), 0.0)
    source = iter_score_input(inp)
    while True:
        t = [time.perf_counter()]
        lines = list(itertools.islice(source, chunk_lines))
        if not lines:
            return spent
        t.append(time.perf_counter())
        groups = scorer.groups([ln.items for ln in lines])
        t.append(time.perf_counter())
        packed = scorer.pack(groups)
        t.append(time.perf_counter())
        rewards, _ = scorer.score_packed(packed, data_parallel=False)
        t.append(time.perf_counter())
        "".join(json.dumps(output_row(ln, r)) + "\n" for ln, r in zip(lines, rewards))
        t.append(time.perf_counter())
        for k, a, b in zip(spent, t, t[1:]):
            spent[k] += b - a


def spin_rate(until) -> float:
    """Pure-Python loop iterations a second in this thread until until() is true."""
    n, t0 = 0, time.perf_counter()
    while not until():
        for _ in range(1000):
            n += 1
    return n / (time.perf_counter() - t0)


def interpreter_left(scorer, inp: str, chunk_lines: int) -> dict:
    """Per host step of one chunk: this thread's Python throughput while the step runs on another,
    over its throughput alone."""
    from polar.score_input import iter_score_input

    lines = list(itertools.islice(iter_score_input(inp), chunk_lines))
    groups = scorer.groups([ln.items for ln in lines])
    steps = {"read and parse": lambda: list(itertools.islice(iter_score_input(inp), chunk_lines)),
             "client strings, ids, groups": lambda: scorer.groups([ln.items for ln in lines]),
             "pack (plan, collate)": lambda: scorer.pack(groups)}
    out = {}
    for name, step in steps.items():
        def repeat(stop):
            while not stop.is_set():
                step()

        stop = threading.Event()
        end = time.perf_counter() + 2.0
        alone = spin_rate(lambda: time.perf_counter() > end)
        worker = threading.Thread(target=repeat, args=(stop,))
        worker.start()
        end = time.perf_counter() + 2.0
        beside = spin_rate(lambda: time.perf_counter() > end)
        stop.set()
        worker.join()
        out[name] = beside / alone
    return out


def measure(checkpoint: str, name: str, inp: str, args) -> None:
    """The three tables for one checkpoint, in this process (one runtime: a process each)."""
    import torch

    scorer = load(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:  # a warm-up: the first forward of a shape is slower
        chunk_loop(scorer, inp, args.chunk_lines, False, os.path.join(tmp, "warm.jsonl"))
    print(f"\n## tokenizer: {name}\n\n1. Where a chunk's time goes (one after another, torch threads "
          f"{torch.get_num_threads()}, the model's CPU forward)\n")
    print("| step | s | share |\n|---|---:|---:|")
    spent = stages(scorer, inp, args.chunk_lines)
    total = sum(spent.values())
    for k, v in spent.items():
        print(f"| {k} | {v:.3f} | {v / total:.1%} |")
    host = total - spent["forward"]
    print(f"| host: every step but the forward | {host:.3f} | {host / total:.1%} |")

    print("\n2. The main thread's Python throughput while a host step runs on another thread, against "
          "alone (~50%: the step holds the GIL; ~100%: it releases it)\n")
    print("| step | throughput left |\n|---|---:|")
    for k, v in interpreter_left(scorer, inp, args.chunk_lines).items():
        print(f"| {k} | {v:.0%} |")

    print("\n3. The chunk loop: the next chunk prepared after the forward (the baseline) or during it\n")
    print("| forward | torch threads | after (s) | during (s) | speed-up | rows identical |")
    print("|---|---:|---:|---:|---:|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ktok_s in [0.0, *args.device_ktok_s]:
            stand_in(scorer, ktok_s)
            forward = f"device at {ktok_s:g} ktok/s" if ktok_s else "model (CPU)"
            for threads in args.threads:
                torch.set_num_threads(threads)
                paths = [os.path.join(tmp, f"{ahead}.jsonl") for ahead in (False, True)]
                times = [[], []]
                for r in range(args.repeats):  # alternated, the median of each kept
                    for ahead in ((False, True) if r % 2 == 0 else (True, False)):
                        times[ahead].append(chunk_loop(scorer, inp, args.chunk_lines, ahead, paths[ahead]))
                after, during = (sorted(t)[len(t) // 2] for t in times)
                same = open(paths[0], "rb").read() == open(paths[1], "rb").read()
                print(f"| {forward} | {threads} | {after:.2f} | {during:.2f} | {after / during:.2f}x | "
                      f"{'yes' if same else 'NO'} |", flush=True)
    from engine.runtime import shutdown_runtime

    shutdown_runtime()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=at_least(1), default=1200, help="input lines (default 1200)")
    ap.add_argument("--chunk-lines", type=at_least(1), default=200, help="lines a chunk (default 200)")
    ap.add_argument("--threads", type=at_least(1), nargs="+", default=[1, 2],
                    help="torch intra-op thread counts (default 1 2)")
    ap.add_argument("--device-ktok-s", type=at_least(1.0, float), nargs="*", default=[200.0, 1000.0],
                    help="stand-in device speeds, thousand packed tokens a second (default 200 1000)")
    ap.add_argument("--tokenizers", nargs="+", choices=("byte", "bpe"), default=["byte", "bpe"])
    ap.add_argument("--repeats", type=at_least(1), default=3, help="runs of each loop, the median shown (default 3)")
    ap.add_argument("--measure", nargs=3, metavar=("CHECKPOINT", "TOKENIZER", "INPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        return measure(*args.measure, args)

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in.jsonl")
        write_input(inp, args.lines)
        made = {"byte": lambda: small_checkpoint(tmp), "bpe": lambda: bpe_checkpoint(tmp, inp)}
        print(f"input: {args.lines:,} lines, {os.path.getsize(inp) / 2**20:.1f} MiB, chunks of {args.chunk_lines}; "
              f"{os.cpu_count()} CPUs", flush=True)
        for name in args.tokenizers:
            rest = [f"--lines={args.lines}", f"--chunk-lines={args.chunk_lines}", f"--repeats={args.repeats}",
                    "--threads", *map(str, args.threads), "--device-ktok-s", *map(str, args.device_ktok_s)]
            subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--measure", made[name](), name, inp],
                           check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


if __name__ == "__main__":
    main()
