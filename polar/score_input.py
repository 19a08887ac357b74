"""`polar score` input and output lines.

Each input line is one of (texts are strings or message lists, as everywhere in polar):

    official record   {"prompt", "reference", "chosen", "rejected", "wrapper"?}
                      -> {"chosen_reward": r, "rejected_reward": r, "rewards": [r_chosen, r_rejected]}
    group             {"prompt", "reference", "candidates": [T or {"text": T, ...}, ...], "wrapper"?}
                      -> {"rewards": [r, ...]}  (candidate order)
    one output        {"prompt", "reference", "output", "wrapper"?}
                      -> {"reward": r, "rewards": [r]}

One output line per input line, in input order; an input line's other fields (ids, metadata) are
not copied, the line number is (`"line"`). Empty outputs are scored, not rejected: an RL policy
does produce them; an empty reference (or one of only whitespace) is a bad line, as in every other
reward path (polar serve: 400), since each output is scored against it. A line that is not one
of the three shapes stops the run with `file:line: field: reason` (or, with on_error=skip, becomes
`{"line": n, "error": "..."}`, so the output still has one line per input line).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterator, Optional

from polar.client_format import ScoringItem
from polar.format import WRAPPERS
from polar.records import FieldError as _Bad
from polar.records import RecordError, any_text, check_reference, iter_lines, misspelt, parse_jsonl_line

KINDS = ("record", "group", "output")


@dataclass
class ScoreLine:
    line: int
    kind: str  # one of KINDS; None-like "error" for a skipped bad line
    items: list  # ScoringItem per output to score, in output order
    error: Optional[str] = None


def _text(obj: dict, key: str, where: Optional[str] = None):
    if key not in obj:
        raise _Bad(where or key, "missing" + (misspelt(obj, key) if where is None else ""))
    # a lone surrogate is a legal JSON escape but no character (polar serve: 400)
    return any_text(obj[key], where or key)


def _misspelt(obj: dict) -> str:
    """records.misspelt for the output fields, and a word on polar serve's /v1/rewards shape."""
    if "outputs" in obj:  # a list of outputs is a group here
        return "; 'outputs' given: a list of outputs is given here as candidates"
    return misspelt(obj, "chosen", "rejected", "candidates", "output")


def _parse(obj) -> tuple[str, list]:
    if not isinstance(obj, dict):
        raise _Bad("(record)", f"must be a JSON object, got {type(obj).__name__}")  # as every record reader says
    wrapper = obj.get("wrapper")
    if wrapper is None:  # absent or null; "" or 0 is a mistake, not the default
        wrapper = "sft"
    elif wrapper not in WRAPPERS:
        raise _Bad("wrapper", f"must be one of {', '.join(WRAPPERS)}, got {wrapper!r:.60}")
    prompt, reference = _text(obj, "prompt"), _text(obj, "reference")
    check_reference(reference, "reference")
    shapes = [name for name, keys in (("chosen/rejected", ("chosen", "rejected")), ("candidates", ("candidates",)),
                                      ("output", ("output",))) if any(k in obj for k in keys)]
    if len(shapes) > 1:  # which one was meant is a guess; scoring one of them would drop the others' outputs
        raise _Bad(shapes[1].split("/")[0], f"a line gives one of chosen/rejected, candidates or output, not "
                                            f"{' and '.join(shapes)}")
    if "chosen" in obj or "rejected" in obj:
        outs, kind = [_text(obj, "chosen"), _text(obj, "rejected")], "record"
    elif "candidates" in obj:
        cands = obj["candidates"]
        if not isinstance(cands, list) or not cands:
            raise _Bad("candidates", "must be a non-empty list")
        outs = []
        for i, c in enumerate(cands):
            if isinstance(c, dict):
                outs.append(_text(c, "text", f"candidates[{i}].text"))
            else:
                outs.append(_text({"t": c}, "t", f"candidates[{i}]"))
        kind = "group"
    elif "output" in obj:
        outs, kind = [_text(obj, "output")], "output"
    else:
        raise _Bad("output", "missing (a line needs chosen/rejected, candidates or output)" + _misspelt(obj))
    return kind, [ScoringItem(prompt, reference, o, wrapper) for o in outs]


def iter_score_input(path: str, on_error: str = "fail", after_line: int = 0,
                     until_line: Optional[int] = None) -> Iterator[ScoreLine]:
    """The non-blank lines of a JSONL file past line `after_line` (and up to `until_line`), parsed
    one at a time (a large input is never held whole); bad lines raise RecordError
    (on_error="fail") or come back as error lines (on_error="skip")."""
    for n, raw in iter_lines(path):
        if n <= after_line:  # lines a stopped run already scored: not even parsed
            continue
        if until_line is not None and n > until_line:
            break
        try:
            parsed = parse_jsonl_line(raw, path, n, _parse)
        except RecordError as e:
            if on_error == "fail":
                raise
            yield ScoreLine(n, "error", [], str(e))
            continue
        if parsed is not None:
            kind, items = parsed
            yield ScoreLine(n, kind, items)


def survey_score_input(path: str, on_error: str = "fail") -> tuple[array, int, Optional[str]]:
    """One pass over the input before any scoring: the line numbers of its non-blank lines (what a
    partial output is checked against, and the progress total), how many are bad, and the first bad
    one's error; on_error="fail" raises RecordError at the first bad line, before a model is loaded.
    The texts are not kept."""
    numbers, bad, first = array("q"), 0, None
    for ln in iter_score_input(path, on_error):
        numbers.append(ln.line)
        if ln.error is not None:
            bad += 1
            first = first or ln.error
    return numbers, bad, first


def output_row(line: ScoreLine, rewards: list) -> dict:
    if line.error is not None:
        return {"line": line.line, "error": line.error}
    row = {"line": line.line, "rewards": rewards}
    if line.kind == "record":
        row["chosen_reward"], row["rejected_reward"] = rewards
    elif line.kind == "output":
        row["reward"] = rewards[0]
    return row
