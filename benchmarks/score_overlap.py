"""What preparing the next chunk during the current chunk's forward saves in `polar score`, on CPU or a GPU.

    python benchmarks/score_overlap.py [--lines 1200] [--chunk-lines 200] [--threads 1 2]
                                       [--device-ktok-s 200 1000] [--tokenizers byte bpe]
    python benchmarks/score_overlap.py --device cuda [--layers 8 --hidden 1024 ...] [--tokenizers byte bpe]

polar score (engine/score.py) reads a chunk of input lines, gives them the client's strings and
ids, packs them (the host's work) and scores them (the model's); the next chunk's host work runs
on a second thread while the model scores this one. Three tables, from the real functions of
engine/score.py and polar/score_run.py on a small model (engine/pretrain.py, one step; with --tokenizers bpe also one
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

With --device cuda the forward is a real one on the GPU (bf16), of a random model of --layers,
--hidden, ... (no training: the times do not depend on the weights; its value head is random, so
the rewards differ between lines and the rows compare something), and the tables are 1 and:

3. The chunk loop's wall time with the next chunk prepared ahead or not, and its packed batches in
   pinned host memory (their copies to the device asynchronous) or pageable (POLAR_SCORE_PIN_MEMORY=0),
   each against neither in the same run (the median of --repeats runs of each, in rotated order),
   and the rows compared byte for byte with neither's. Table 2 measures the host's interpreter,
   the same on any device, and is left out.
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


def train_bpe(tmp: str, inp: str) -> tuple[str, int]:
    """A byte-level BPE trained on the input's texts: its directory and vocabulary size."""
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
    return tok_dir, lib.get_vocab_size()


def bpe_checkpoint(tmp: str, inp: str) -> str:
    """A small model trained with a BPE trained on the input's texts (train_bpe)."""
    tok_dir, vocab = train_bpe(tmp, inp)
    run_dir = os.path.join(tmp, "run_bpe")
    # trained on the byte tokenizer's synthetic data with the BPE's vocabulary size, then given the
    # BPE as its own: the rewards mean nothing, the speeds are the BPE's
    done = subprocess.run([sys.executable, os.path.join(ROOT, "engine", "pretrain.py"), *MODEL, f"run_dir={run_dir}",
                           f"model.vocab_size={vocab}"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    if done.returncode:
        sys.exit(f"training the BPE model failed:\n{done.stderr[-3000:]}")
    from polar.checkpoint_tokenizer import save_beside

    save_beside(os.path.join(run_dir, "checkpoints"), tok_dir)
    return os.path.join(run_dir, "checkpoints")


def random_checkpoint(run_dir: str, shape: dict, vocab: int) -> None:
    """A model of `shape` (ModelConfig settings) with random weights, saved as a training run leaves
    one (run_dir/checkpoints/step_00000000, its config.yaml beside; engine.checkpoint.save): in its own
    process, as each model's measure runs in its own. The value head, zero at initialisation, gets
    random weights."""
    import dataclasses

    import torch

    from engine import checkpoint
    from engine.config import EngineConfig
    from engine.config_load import dump_yaml
    from engine.parallelize import build_model
    from engine.runtime import init_runtime, shutdown_runtime

    cfg = EngineConfig()
    for key, value in {**shape, "vocab_size": vocab}.items():
        setattr(cfg.model, key, value)
    cfg.train.global_batch, cfg.parallel.distributed_optimizer, cfg.run_dir = 1, False, run_dir
    rt = init_runtime(cfg.parallel, seed=7)
    chunks, _ = build_model(cfg.model, cfg.parallel, cfg.train, rt)
    head = chunks[0].module.value_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(11)) * 0.2)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    checkpoint.save(os.path.join(run_dir, "checkpoints"), 0, chunks, None, {"step": 0},
                    model_settings=dataclasses.asdict(cfg.model))
    shutdown_runtime()


def gpu_checkpoint(tmp: str, name: str, inp: str, args) -> str:
    """The random model of the command line's shape for tokenizer `name` (a BPE: trained here and
    saved beside it), made in a process of its own."""
    from polar.checkpoint_tokenizer import save_beside

    tok_dir, vocab = train_bpe(tmp, inp) if name == "bpe" else ("byte", 260)
    run_dir = os.path.join(tmp, f"random_{name}")
    shape = json.dumps({"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
                        "num_query_groups": args.kv_heads, "ffn_hidden_size": args.ffn})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--random-model", run_dir, shape, str(vocab)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode:
        sys.exit(f"making the random model failed:\n{done.stderr[-3000:]}")
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


def chunk_loop(scorer, inp: str, chunk_lines: int, ahead: bool, out: str, pin: bool | None = None) -> float:
    """polar score's loop (polar/score_run.py run(), one process): seconds from the first read to the
    last row written. `pin`: the batches in pinned host memory on a CUDA device (None: as set)."""
    from engine.read_ahead import prepared_ahead
    from polar.score_run import _prepared_share, _scored_share
    from polar.score_input import iter_score_input, output_row

    if pin is not None:
        scorer.pin_memory = pin

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


def measure(checkpoint: str, name: str, inp: str, args) -> int:
    """The tables for one checkpoint, in this process (one runtime: a process each); 1 where the
    rows of two loops differ."""
    import torch

    scorer = load(checkpoint)
    cuda = scorer.rt.is_cuda
    with tempfile.TemporaryDirectory() as tmp:  # a warm-up: the first forward of a shape is slower
        chunk_loop(scorer, inp, args.chunk_lines, False, os.path.join(tmp, "warm.jsonl"))
    precision = "bf16" if scorer.precision == "auto" else scorer.precision  # auto: bf16 on a GPU
    forward = (f"the model's forward on {torch.cuda.get_device_name(scorer.rt.device)}, {precision}" if cuda
               else f"torch threads {torch.get_num_threads()}, the model's CPU forward")
    print(f"\n## tokenizer: {name}\n\n1. Where a chunk's time goes (one after another, {forward})\n")
    print("| step | s | share |\n|---|---:|---:|")
    spent = stages(scorer, inp, args.chunk_lines)
    total = sum(spent.values())
    for k, v in spent.items():
        print(f"| {k} | {v:.3f} | {v / total:.1%} |")
    host = total - spent["forward"]
    print(f"| host: every step but the forward | {host:.3f} | {host / total:.1%} |")
    same = cuda_loops(scorer, name, inp, args) if cuda else cpu_loops(scorer, inp, args)
    from engine.runtime import shutdown_runtime

    shutdown_runtime()
    return 0 if same else 1


def cpu_loops(scorer, inp: str, args) -> bool:
    """Tables 2 and 3 on CPU; whether the rows were the same in every comparison."""
    import torch

    print("\n2. The main thread's Python throughput while a host step runs on another thread, against "
          "alone (~50%: the step holds the GIL; ~100%: it releases it)\n")
    print("| step | throughput left |\n|---|---:|")
    for k, v in interpreter_left(scorer, inp, args.chunk_lines).items():
        print(f"| {k} | {v:.0%} |")

    print("\n3. The chunk loop: the next chunk prepared after the forward (the baseline) or during it\n")
    print("| forward | torch threads | after (s) | during (s) | speed-up | rows identical |")
    print("|---|---:|---:|---:|---:|---|", flush=True)
    all_same = True
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
                all_same &= same
                print(f"| {forward} | {threads} | {after:.2f} | {during:.2f} | {after / during:.2f}x | "
                      f"{'yes' if same else 'NO'} |", flush=True)
    return all_same


# (next chunk prepared during the forward, batches in pinned memory); the first is the baseline
VARIANTS = ((False, False), (True, False), (False, True), (True, True))


def cuda_loops(scorer, name: str, inp: str, args) -> bool:
    """Table 3 on the GPU: each variant's loop against neither; whether the rows were all the same."""
    print("\n3. The chunk loop on the GPU: the next chunk prepared after the forward or during it, the packed "
          "batches in pageable or pinned host memory, against neither\n")
    print("| next chunk prepared | batches | loop (s) | speed-up | rows identical |\n|---|---|---:|---:|---|",
          flush=True)
    times = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: os.path.join(tmp, f"{v[0]}_{v[1]}.jsonl") for v in VARIANTS}
        for r in range(args.repeats):  # rotated: no variant always runs first, the median of each kept
            for v in VARIANTS[r % 4:] + VARIANTS[:r % 4]:
                times[v].append(chunk_loop(scorer, inp, args.chunk_lines, v[0], paths[v], pin=v[1]))
        rows = {v: open(paths[v], "rb").read() for v in VARIANTS}
    median = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    speed = {v: median[VARIANTS[0]] / median[v] for v in VARIANTS}
    same = {v: rows[v] == rows[VARIANTS[0]] for v in VARIANTS}
    for v in VARIANTS:
        print(f"| {'during the forward' if v[0] else 'after it'} | {'pinned' if v[1] else 'pageable'} | "
              f"{median[v]:.3f} | {speed[v]:.2f}x | {'yes' if same[v] else 'NO'} |")
    print(f"\noverlap on cuda ({name}): prefetch {speed[True, False]:.2f}x, pinned {speed[False, True]:.2f}x, "
          f"both {speed[True, True]:.2f}x the chunk loop's speed with neither; rows identical: "
          f"{'yes' if all(same.values()) else 'NO'}", flush=True)
    return all(same.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default): the model's CPU forward and stand-ins for a device; cuda: a random model's "
                         "forward on the GPU, the loop with and without pinned batches")
    ap.add_argument("--lines", type=at_least(1), default=1200, help="input lines (default 1200)")
    ap.add_argument("--chunk-lines", type=at_least(1), default=200, help="lines a chunk (default 200)")
    ap.add_argument("--threads", type=at_least(1), nargs="+", default=[1, 2],
                    help="torch intra-op thread counts (default 1 2; cpu only)")
    ap.add_argument("--device-ktok-s", type=at_least(1.0, float), nargs="*", default=[200.0, 1000.0],
                    help="stand-in device speeds, thousand packed tokens a second (default 200 1000; cpu only)")
    ap.add_argument("--tokenizers", nargs="+", choices=("byte", "bpe"),
                    help="default: byte bpe on cpu, byte on cuda")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="runs of each loop, the median shown (default 3)")
    shape = ap.add_argument_group("the random model of --device cuda")
    shape.add_argument("--layers", type=at_least(1), default=8, help="default 8")
    shape.add_argument("--hidden", type=at_least(1), default=1024, help="default 1024")
    shape.add_argument("--heads", type=at_least(1), default=16, help="default 16")
    shape.add_argument("--kv-heads", type=at_least(1), default=8, help="default 8")
    shape.add_argument("--ffn", type=at_least(1), default=2816, help="default 2816")
    ap.add_argument("--measure", nargs=3, metavar=("CHECKPOINT", "TOKENIZER", "INPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--random-model", nargs=3, metavar=("RUN_DIR", "SHAPE", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.random_model:
        run_dir, model_shape, vocab = args.random_model
        return random_checkpoint(run_dir, json.loads(model_shape), int(vocab))
    if args.measure:
        return measure(*args.measure, args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is false)")
        if args.hidden % args.heads or args.heads % args.kv_heads:
            ap.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads of --kv-heads "
                     f"{args.kv_heads}")
    tokenizers = args.tokenizers or (["byte"] if args.device == "cuda" else ["byte", "bpe"])

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in.jsonl")
        write_input(inp, args.lines)
        if args.device == "cuda":
            made = {name: (lambda name=name: gpu_checkpoint(tmp, name, inp, args)) for name in tokenizers}
            print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV), ffn "
                  f"{args.ffn}, random weights", flush=True)
        else:
            made = {"byte": lambda: small_checkpoint(tmp), "bpe": lambda: bpe_checkpoint(tmp, inp)}
        print(f"input: {args.lines:,} lines, {os.path.getsize(inp) / 2**20:.1f} MiB, chunks of {args.chunk_lines}; "
              f"{os.cpu_count()} CPUs", flush=True)
        # --device cpu on a GPU machine: its "model (CPU)" rows time the CPU, as they say
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        for name in tokenizers:
            rest = [f"--lines={args.lines}", f"--chunk-lines={args.chunk_lines}", f"--repeats={args.repeats}",
                    "--threads", *map(str, args.threads), "--device-ktok-s", *map(str, args.device_ktok_s)]
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--measure", made[name](), name,
                                   inp], env=env)
            failed |= done.returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
