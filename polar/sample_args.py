"""`polar sample`'s command line (polar/sample.py runs it): its arguments, the checks that refuse
what no run could use before any file is read, and the settings that decide a record's content,
which `<output>.run.json` keeps (polar/sample_output.check_settings) so that a restart with other
ones stops instead of mixing two datasets."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict

from engine.cli_types import ArgumentParser
from polar.input_fingerprint import fingerprint
from polar.prompt_sources import SampleError

DEFAULT_INSTRUCTION_SHARE = 0.1
# socket.settimeout keeps whole nanoseconds in an int64: past ~9.2e9 s every request raised OverflowError
MAX_REQUEST_TIMEOUT = 1e9


class _DefaultsHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds a default only where it says something: not None, not a flag's False, not one the help
    already states (which read "(default: OUTPUT.failures.jsonl) (default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_EPILOG = """\
example:
  polar sample --corpus corpus/*.txt --pool pool.yaml --num-prompts 100000 --output triplets.jsonl

  pool.yaml, one entry a policy (polar/policy_pool.py):
    - name: llama3-8b-base                # optional, default: model
      base_url: http://10.0.0.5:8000/v1   # {base_url}/completions or /chat/completions
      model: meta-llama/Meta-Llama-3-8B
      api_key_env: VLLM_API_KEY           # optional
      max_concurrency: 32                 # optional
      kind: completions                   # or chat

writes OUTPUT (triplet records, for polar data build), OUTPUT.run.json (the settings) and the failures file;
progress lines on stderr. exit status: 0 done; 2 bad arguments, corpus or pool; 1 prompts failed (rerun
to retry them) or failing endpoints stopped the run; 130 interrupted (Ctrl-C or SIGTERM; rerun to continue)
"""


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="polar sample",
        description="POLAR pre-training triplets (prompt, reference and chosen from policy A, rejected from\n"
                    "policy B != A; paper Sec. 2.2) from a prompt corpus and a pool of OpenAI-compatible endpoints.\n"
                    "Re-running the same command continues an interrupted run and retries failed prompts.",
        epilog=_EPILOG, formatter_class=_DefaultsHelp)
    g = ap.add_argument_group("prompts")
    g.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help="prompt corpus: text files (one document per line) or JSONL (see --corpus-format)")
    g.add_argument("--corpus-format", choices=("auto", "text", "jsonl"), default="auto",
                   help="auto: .jsonl/.json files are JSONL, others text")
    g.add_argument("--text-field", default="text", help="JSONL field holding a document (a string or a message list)")
    g.add_argument("--instruction-prompts", nargs="+", metavar="FILE",
                   help="instruction prompts, used whole (same formats as --corpus)")
    g.add_argument("--instruction-field", default="prompt", help="JSONL field of an instruction prompt")
    g.add_argument("--instruction-share", type=float, default=argparse.SUPPRESS,
                   help=f"fraction of prompts drawn from --instruction-prompts (default {DEFAULT_INSTRUCTION_SHARE} "
                        "when they are given)")
    g.add_argument("--prefix-min-tokens", type=int, default=1, help="shortest corpus prefix, in tokens")
    g.add_argument("--prefix-max-tokens", type=int, default=1024, help="longest corpus prefix, in tokens")
    g.add_argument("--tokenizer", default="byte",
                   help="tokenizer that counts prefix tokens: 'byte' or a local HF tokenizer directory")
    g.add_argument("--num-prompts", type=int, required=True,
                   help="prompt ids 0..N-1; raising N later extends a dataset without changing its first N")
    g.add_argument("--seed", type=int, default=0, help="decides prompts, policy draws and request seeds")
    g = ap.add_argument_group("policies and sampling")
    g.add_argument("--pool", required=True, metavar="YAML",
                   help="policy pool: a YAML list of {name, base_url, model, api_key_env, max_concurrency, kind}")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (POLAR: 1.0)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (POLAR: 0.9)")
    g.add_argument("--top-k", type=int, default=50, help="sent as the top_k extension field (vLLM, SGLang)")
    g.add_argument("--max-tokens", type=int, default=4096, help="longest trajectory, in the policy's tokens")
    g.add_argument("--no-request-seed", action="store_true",
                   help="do not send a per-request seed (for servers that reject the field)")
    g.add_argument("--loop-min-repeats", type=int, default=4,
                   help="a trailing chunk repeated at least this many times is a loop, cut to one copy")
    g.add_argument("--loop-min-chars", type=int, default=32,
                   help="... if the repeats span at least this many characters")
    g = ap.add_argument_group("requests")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight over all endpoints")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request attempt")
    g.add_argument("--max-retries", type=int, default=5, help="retries of one request (connection, timeout, 5xx, 429)")
    g.add_argument("--retry-base", type=float, default=1.0, help="first backoff ceiling, seconds (doubles per retry)")
    g.add_argument("--retry-cap", type=float, default=60.0, help="largest backoff, seconds")
    g.add_argument("--endpoint-max-failures", type=int, default=10,
                   help="consecutive failed attempts after which an endpoint leaves the pool for this run, once "
                        "they span --retry-cap seconds or use up a request's retries")
    g = ap.add_argument_group("output")
    g.add_argument("--output", required=True, help="JSONL records; appended to, so a rerun continues")
    g.add_argument("--failures", help="prompts that failed in this run, with reasons (default: OUTPUT.failures.jsonl)")
    g.add_argument("--max-records", type=int, help="stop after writing this many records (trial runs)")
    g.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines on stderr")
    g.add_argument("--allow-changed-settings", action="store_true",
                   help="continue an output written with other settings (OUTPUT.run.json) instead of stopping")
    return ap


def check_args(ap: argparse.ArgumentParser, a) -> None:
    """Refuses (ap.error: usage and exit status 2) what no run could use, before any file is read;
    sets --instruction-share's default where it was not given."""
    positive = {"--num-prompts": a.num_prompts, "--prefix-min-tokens": a.prefix_min_tokens,
                "--max-tokens": a.max_tokens, "--concurrency": a.concurrency,
                "--endpoint-max-failures": a.endpoint_max_failures, "--top-k": a.top_k}
    for flag, v in positive.items():
        if v < 1:
            ap.error(f"{flag} must be at least 1, got {v}")
    if a.loop_min_repeats < 2:  # one copy is no loop: 1 crashed the run at its first completion
        ap.error(f"--loop-min-repeats must be at least 2, got {a.loop_min_repeats}")
    # float() takes "nan" and "inf", which no comparison below refuses: --temperature nan was sent as
    # NaN (no JSON) in every request, --retry-cap nan retried at once, --request-timeout inf crashed
    # the run (the ranges of --top-p, --instruction-share and --progress-interval refuse nan)
    floats = {"--temperature": a.temperature, "--request-timeout": a.request_timeout, "--retry-base": a.retry_base,
              "--retry-cap": a.retry_cap}
    for flag, v in floats.items():
        if not math.isfinite(v):
            ap.error(f"{flag} must be a finite number, got {v}")
    if a.prefix_max_tokens < a.prefix_min_tokens:
        ap.error(f"--prefix-max-tokens ({a.prefix_max_tokens}) is below --prefix-min-tokens ({a.prefix_min_tokens})")
    if getattr(a, "instruction_share", None) is None:  # not given
        a.instruction_share = DEFAULT_INSTRUCTION_SHARE
    elif a.instruction_share > 0 and not a.instruction_prompts:
        # the share was silently ignored: every prompt came from the corpus
        ap.error(f"--instruction-share {a.instruction_share} needs --instruction-prompts to draw from")
    if not 0.0 <= a.instruction_share <= 1.0:
        ap.error(f"--instruction-share must lie in [0, 1], got {a.instruction_share}")
    if not 0.0 < a.top_p <= 1.0:
        ap.error(f"--top-p must lie in (0, 1], got {a.top_p}")
    # one message naming all five left the reader to find which value was wrong
    for flag, v in {"--temperature": a.temperature, "--max-retries": a.max_retries, "--retry-base": a.retry_base,
                    "--retry-cap": a.retry_cap, "--loop-min-chars": a.loop_min_chars}.items():
        if v < 0:
            ap.error(f"{flag} must be >= 0, got {v}")
    if a.request_timeout <= 0:
        ap.error(f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    if not a.progress_interval > 0:  # 0 printed a progress line on every turn of the event loop
        ap.error(f"--progress-interval must be > 0 seconds, got {a.progress_interval}")
    if a.request_timeout > MAX_REQUEST_TIMEOUT:
        ap.error(f"--request-timeout must be at most {MAX_REQUEST_TIMEOUT:g} seconds, got {a.request_timeout:g}")
    if a.max_records is not None and a.max_records < 1:
        ap.error(f"--max-records must be at least 1, got {a.max_records}")
    failures = a.failures or a.output + ".failures.jsonl"
    # The run opens its failures file for writing, emptied, at its start: naming the output (or its
    # settings record) there emptied the records of every earlier run, the summary still counting them
    for what, path in (("the output", a.output), ("the output's settings record", a.output + ".run.json")):
        if os.path.realpath(failures) == os.path.realpath(path):
            ap.error(f"--failures {failures} is {path}, {what}: a run empties its failures file at its start; "
                     "name another file (default: OUTPUT.failures.jsonl)")
    # `--corpus data/*.jsonl --output data/triplets.jsonl`: a rerun's glob takes the output in
    written = {os.path.realpath(p) for p in (a.output, failures)}
    for flag, paths in (("--corpus", a.corpus), ("--instruction-prompts", a.instruction_prompts or [])):
        read = [p for p in paths if os.path.realpath(p) in written]
        if read:
            ap.error(f"{flag} names {read[0]}, a file this run writes; keep the output out of the prompt files")


def _fingerprints(source) -> list[str]:
    """polar.input_fingerprint's fingerprint of each file of `source` (prompt_sources.TextSource) at the
    size it was checked at (polar/sample_output.check_settings compares them on a restart)."""
    try:
        return [fingerprint(p, size) for p, size in zip(source.paths, source.sizes)]
    except OSError as e:  # removed since it was checked
        raise SampleError(f"{e.filename}: cannot read: {e.strerror or e}") from None


def record_settings(a, policies, sampling, corpus, instructions) -> dict:
    """What decides a record's content (not how fast it is made); --num-prompts is absent on purpose:
    raising it extends a dataset. `a`: the checked arguments; `sampling`: their SamplingParams;
    `corpus`, `instructions`: the scanned prompt sources (prompt_sources.TextSource, None for none)."""
    return {
        "seed": a.seed, "corpus": [os.path.abspath(p) for p in a.corpus], "corpus_format": a.corpus_format,
        "text_field": a.text_field,
        # A prompt is document randrange(len(corpus)): a corpus file grown or rewritten between two runs
        # (one still being downloaded when the first started) drew other documents for every id left,
        # which the paths alone did not show. Sizes, and content fingerprints of sampled blocks (~1 MiB read
        # a file, not the whole corpus again) for a file of the same name and size with other content.
        "corpus_bytes": corpus.sizes, "instruction_bytes": instructions.sizes if instructions else [],
        "corpus_sample_sha256": _fingerprints(corpus),
        "instruction_sample_sha256": _fingerprints(instructions) if instructions else [],
        "instruction_prompts": [os.path.abspath(p) for p in a.instruction_prompts or []],
        "instruction_field": a.instruction_field,
        "instruction_share": a.instruction_share if instructions else 0.0,
        "prefix_tokens": [a.prefix_min_tokens, a.prefix_max_tokens], "tokenizer": a.tokenizer,
        # a name's model and API kind decide what it returns; its URL may move between runs
        "policies": {p.name: f"{p.model} ({p.kind})" for p in sorted(policies, key=lambda p: p.name)},
        "sampling": asdict(sampling),
        "request_seed": not a.no_request_seed, "loop": [a.loop_min_repeats, a.loop_min_chars]}
