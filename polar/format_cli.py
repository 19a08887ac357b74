"""`polar format`: the exact string and ids a reward-model server sees, for each structured input.

    polar format --tokenizer DIR_OR_byte --input FILE.jsonl --output FILE.jsonl
                 [--max-length 16384 --max-response-length 4096]

Input: one JSON object per line, {"prompt": T, "reference": T, "output": T, "wrapper": "sft"|
"pretrain"} (T a string or a message list; an empty prompt or output is allowed: it is scored; an
empty or whitespace-only reference is a bad line, as in `polar score` and `polar serve`; wrapper
optional, default sft; other fields ignored). Output: line i answers input line i, {"text": the string the
official POLAR client sends, "ids": the server's token ids of it} (polar/client_format.py holds the
client's rules). Bad lines, blank lines included, are reported as `file:line: field: reason`, all of
them; then nothing is written and the exit status is 2 (bad input, as for every polar command).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from engine.cli_types import ArgumentParser
from engine.durable_file import Replacement
from polar.client_format import (CLIENT_MAX_LENGTH, CLIENT_MAX_RESPONSE_LENGTH, ScoringItem,
                                 client_encode_batch)
from polar.format import WRAPPERS
from polar.records import NOT_REGULAR, FieldError, RecordError, any_text, check_reference, iter_lines, parse_jsonl_line

CHUNK = 4096  # lines per batched tokenizer call
MAX_REPORTED = 50


def _text(obj: dict, key: str):
    """A str or message list, possibly empty; FieldError (without the file and line) where it is
    missing, mistyped or holds a lone surrogate (the tokenizer cannot encode one)."""
    if key not in obj:
        raise FieldError(key, "missing")
    return any_text(obj[key], key)


def parse_item(raw: bytes, file: str, line: int) -> ScoringItem:
    """One input line -> ScoringItem, or RecordError naming file, line and field."""
    # records.parse_jsonl_line reads the line the way every other command does (bad UTF-8, bad JSON,
    # over-long integers and too-deep nesting all become RecordError); only a blank line differs:
    # it returns None there, but here output line i must answer input line i, so a blank is an error
    item = parse_jsonl_line(raw, file, line, _item)
    if item is None:
        raise RecordError(file, line, "(line)", "blank line (output line i answers input line i)")
    return item


def _item(obj) -> ScoringItem:
    if not isinstance(obj, dict):
        raise FieldError("(record)", f"must be a JSON object, got {type(obj).__name__}")
    values = [_text(obj, key) for key in ("prompt", "reference", "output")]
    # the string of an item every reward path refuses would be the text of no request ever scored
    check_reference(values[1], "reference")
    wrapper = obj.get("wrapper")
    if wrapper is None:
        wrapper = "sft"
    elif wrapper not in WRAPPERS:
        raise FieldError("wrapper", f"must be one of {', '.join(WRAPPERS)}, got {wrapper!r:.60}")
    return ScoringItem(*values, wrapper=wrapper)


def _non_negative(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def run(tokenizer_spec: str, input_path: str, output_path: str, max_length: int,
        max_response_length: int, err=None) -> int:
    from polar.tokenizer import load_tokenizer

    err = err or sys.stderr

    if not os.path.isfile(input_path):
        # a pipe (`--input <(zcat in.jsonl.gz)`) exists: "no such file" sent its user looking for a typo.
        # It is refused, not read: the compressed-file check reads its head, which a pipe gives only once
        what = ("a directory, not a file" if os.path.isdir(input_path) else
                f"{NOT_REGULAR}: write it to a file first" if os.path.exists(input_path)
                else "no such file")
        print(f"polar format: --input {input_path}: {what}", file=err)
        return 2
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        print(f"polar format: --output {output_path} is the --input file: the ids would replace the texts they "
              "were computed from; name another file", file=err)
        return 2
    try:
        tok = load_tokenizer(tokenizer_spec)
    except (OSError, ValueError) as e:
        print(f"polar format: --tokenizer {tokenizer_spec}: {e}", file=err)
        return 2
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    errors, n_bad, n_done = [], 0, 0
    # written beside the output and renamed over it, once on the disk: a reader never sees half of it,
    # a crash of the machine never leaves an empty one. Its mode is any new file's (0666 less the
    # umask), as the other tools' outputs have; nothing is left when bad lines stop it
    with Replacement(output_path) as written:
        out = written.file
        chunk = []

        def flush():
            for s in client_encode_batch(tok, chunk, max_length=max_length,
                                         max_response_length=max_response_length):
                out.write(json.dumps({"text": s.text, "ids": s.ids.tolist()},
                                     ensure_ascii=False) + "\n")
            chunk.clear()

        try:
            for n, raw in iter_lines(input_path):
                try:
                    item = parse_item(raw, input_path, n)
                except RecordError as e:
                    n_bad += 1
                    if len(errors) < MAX_REPORTED:
                        errors.append(str(e))
                    continue
                if n_bad:  # the output is dropped anyway: just validate the rest
                    continue
                chunk.append(item)
                n_done += 1
                if len(chunk) >= CHUNK:
                    flush()
        except RecordError as e:  # the file, not a line (a compressed one): it ended in a traceback, exit 1
            print(f"polar format: {e}; nothing written", file=err)
            return 2
        if n_bad:
            for line in errors:
                print(line, file=err)
            more = f" ({n_bad - len(errors)} more not shown)" if n_bad > len(errors) else ""
            print(f"polar format: {n_bad} bad line(s){more}; nothing written", file=err)
            return 2
        flush()
        written.commit()
    print(f"polar format: {n_done} input(s) -> {output_path}", file=err)
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = ArgumentParser(prog="polar format", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="'byte' or a directory holding tokenizer.json")
    ap.add_argument("--input", required=True, help="JSONL: one {prompt, reference, output, wrapper} per line")
    ap.add_argument("--output", required=True, help="JSONL: one {text, ids} per input line")
    ap.add_argument("--max-length", type=_non_negative, default=CLIENT_MAX_LENGTH,
                    help=f"the client's max_length (default {CLIENT_MAX_LENGTH})")
    ap.add_argument("--max-response-length", type=_non_negative, default=None,
                    help=f"the client's max_response_length (default: min({CLIENT_MAX_RESPONSE_LENGTH}, (L - 6) // 2) "
                    "for the --max-length L in use: the largest that leaves L a prompt budget, as polar serve, "
                    "score and eval take it; said when below it)")
    a = ap.parse_args(argv)
    from polar.client_limits import fitting_response, usage_check

    usage_check(ap, a.max_length, a.max_response_length)  # as polar serve, score and eval
    response = a.max_response_length
    if response is None:
        response = fitting_response(a.max_length)
        if response < CLIENT_MAX_RESPONSE_LENGTH:
            print(f"polar format: --max-response-length {response} (the largest below {CLIENT_MAX_RESPONSE_LENGTH} "
                  f"that leaves --max-length {a.max_length} a prompt budget)", file=sys.stderr)
    return run(a.tokenizer, a.input, a.output, a.max_length, response)


if __name__ == "__main__":
    sys.exit(main())
