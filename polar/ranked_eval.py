"""Preference accuracy with references on ranked data, as the POLAR paper evaluates reward models:
the metric, engine-free. A scoring function supplies the rewards.

Ranked record (JSONL, one per line; T = a string or a message list, joined by "\\n"):

    {"prompt": T, "category": str, "responses": [{"text": T, "rank": int}, ...], "wrapper": ...}
    {"prompt": T, "category": str, "responses": [T, T, ...], ...}     # best first: rank = position

Rank 1 is the reference (exactly one response has it, and it is neither empty nor only
whitespace); a smaller rank is better; ranks are integers >= 1, gaps allowed; an empty response
below the reference is scored.
`category` is optional ("uncategorized"; not "overall" or "category mean", the table's summary rows);
`wrapper` is optional (sft or pretrain, default sft);
other fields are ignored. Every ordered pair of responses below the
reference counts once: responses i, j (ranks >= 2) with rank_i < rank_j form the pair "i over j",
and equal ranks form no pair. A pair is correct when r(prompt, reference, i) > r(prompt,
reference, j), strictly: a tied reward counts as wrong (and is counted in `ties`). A record
without any pair is an error (it measures nothing).

Each response that is in some pair is scored once, as the structured input (prompt, reference =
the rank-1 text, output = the response, wrapper) that `score_fn` receives, in record order; a
response a record repeats (the same text, a message list counting as its joined contents) is one
input, whose reward every copy takes, so that its pairs are ties. `scored_inputs` counts the inputs.
Accuracy: overall = correct pairs / pairs over all records; per category the same within it;
`category_mean` = the mean of the category accuracies (each category weighs the same).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from polar.client_format import ScoringItem
from polar.format import WRAPPERS, Text, as_text
from polar.records import FieldError as _Bad
from polar.records import any_text, check_reference, iter_lines, no_surrogate, parse_jsonl_line

DEFAULT_CATEGORY = "uncategorized"
# format_table's summary rows: a category of either name would read as one, so none may have it
OVERALL_ROW, MEAN_ROW = "overall", "category mean"


@dataclass
class RankedRecord:
    prompt: Text
    category: str
    reference: Text
    responses: list  # texts ranked below the reference
    ranks: list  # their ranks (>= 2), same order
    wrapper: str = "sft"
    file: str = ""
    line: int = 0

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) indices into `responses`, each ordered pair of distinct ranks once."""
        r = self.ranks
        return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] < r[j]]

    def has_pairs(self) -> bool:
        # two different ranks put every response in some pair
        return len(set(self.ranks)) > 1

    def count(self, rewards: np.ndarray) -> tuple[int, int, int]:
        """(correct, ties, pairs) over pairs(), given each response's reward. One row of comparisons
        per response: listing the pairs took minutes and gigabytes for a record of thousands of
        responses (best-of-n samples), n^2 / 2 tuples."""
        dense = {k: i for i, k in enumerate(sorted(set(self.ranks)))}  # ranks may pass int64
        r = np.array([dense[k] for k in self.ranks], dtype=np.int64)
        correct = ties = pairs = 0
        for i in range(len(r)):
            worse = rewards[r > r[i]]
            pairs += worse.size
            correct += int(np.count_nonzero(rewards[i] > worse))
            ties += int(np.count_nonzero(rewards[i] == worse))
        return correct, ties, pairs




def _rank(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Bad(where, f"must be an integer >= 1, got {value!r:.60}")
    return value


def _parse(obj) -> RankedRecord:
    if not isinstance(obj, dict):
        raise _Bad("(record)", f"must be a JSON object, got {type(obj).__name__}")
    prompt = any_text(obj.get("prompt"), "prompt")
    category = obj.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise _Bad("category", f"must be a non-empty string, got {category!r:.60}")
    no_surrogate(category, "category")
    if category.strip().casefold() in (OVERALL_ROW, MEAN_ROW):
        # its row would read as the summary row of that name, one more "overall" above the real one
        raise _Bad("category", f"{category!r:.60} is a summary row of polar eval's table "
                               f"({OVERALL_ROW!r}, {MEAN_ROW!r}); rename the category")
    wrapper = obj.get("wrapper")
    if wrapper is None:  # absent or null; "" or 0 is a mistake, not the default
        wrapper = "sft"
    elif wrapper not in WRAPPERS:
        raise _Bad("wrapper", f"must be one of {', '.join(WRAPPERS)}, got {wrapper!r:.60}")
    resp = obj.get("responses")
    if resp is None:
        raise _Bad("responses", "missing")
    if not isinstance(resp, list):
        raise _Bad("responses", f"must be a list, got {type(resp).__name__}")
    if len({isinstance(r, dict) for r in resp}) > 1:
        raise _Bad("responses", "mixes {text, rank} objects and plain texts; use one form")
    texts, ranks = [], []
    for i, r in enumerate(resp):
        where = f"responses[{i}]"
        if isinstance(r, dict):
            texts.append(any_text(r.get("text"), f"{where}.text"))
            if "rank" not in r:
                raise _Bad(f"{where}.rank", "missing (or give the responses as a list of texts, best first)")
            ranks.append(_rank(r["rank"], f"{where}.rank"))
        else:
            texts.append(any_text(r, where))
            ranks.append(i + 1)
    first = [i for i, k in enumerate(ranks) if k == 1]
    if len(first) != 1:
        raise _Bad("responses", f"exactly one response must have rank 1 (the reference), "
                                f"got {len(first)}")
    # every reward is a comparison with it: an empty one, or one of only whitespace (a field lost
    # upstream, most likely), would give an accuracy that measures nothing, without a word
    check_reference(texts[first[0]], f"responses[{first[0]}]" + (".text" if isinstance(resp[first[0]], dict) else ""),
                    "the rank-1 response (the reference)")
    below = [i for i in range(len(ranks)) if i != first[0]]
    rec = RankedRecord(prompt, category, texts[first[0]], [texts[i] for i in below],
                       [ranks[i] for i in below], wrapper)
    if not rec.has_pairs():
        raise _Bad("responses", f"no pair to compare: below the reference the ranks are "
                                f"{sorted(rec.ranks)} (need two different ranks)")
    return rec


def parse_ranked_line(raw: bytes, file: str, line: int) -> Optional[RankedRecord]:
    """One JSONL line -> RankedRecord, None for a blank line; RecordError naming file:line: field."""
    rec = parse_jsonl_line(raw, file, line, _parse)
    if rec is not None:
        rec.file, rec.line = file, line
    return rec


def read_ranked(path: str) -> list[RankedRecord]:
    """Every record of a ranked JSONL file; RecordError at the first bad line."""
    out = []
    for n, raw in iter_lines(path):
        rec = parse_ranked_line(raw, path, n)
        if rec is not None:
            out.append(rec)
    return out


def scoring_items(records: Sequence[RankedRecord]) -> tuple[list[ScoringItem], list[list[int]]]:
    """The inputs to score and, per record, each response's index into them (-1 for a response in
    no pair). Each distinct response of a record is one input, however often the record gives it
    (its text as the format joins it: a message list and its string are one), and every copy takes
    its reward: the same text at two ranks is a tie, while two copies scored apart (two places of a
    pack, whose float sums run in another order) came 1e-7 apart and counted right or wrong."""
    items, index = [], []
    for rec in records:
        if not rec.has_pairs():
            index.append([-1] * len(rec.responses))
            continue
        first: dict = {}  # a text -> its input
        idx = []
        for text in rec.responses:
            key = as_text(text)
            if key not in first:
                first[key] = len(items)
                items.append(ScoringItem(rec.prompt, rec.reference, text, rec.wrapper))
            idx.append(first[key])
        index.append(idx)
    return items, index


def _summary(correct: int, ties: int, pairs: int, records: int) -> dict:
    return {"accuracy": correct / pairs if pairs else float("nan"), "correct": correct,
            "pairs": pairs, "ties": ties, "records": records}


def evaluate_ranked(records: Sequence[RankedRecord],
                    score_fn: Callable[[list], Sequence[float]], scored=None) -> dict:
    """Accuracy overall and per category. `score_fn(items)` returns one reward per ScoringItem;
    `scored_inputs` is how many it was given (scoring_items: each distinct response of a record).
    `scored`: scoring_items(records), where the caller made it already (to map the items to records)."""
    items, index = scoring_items(records) if scored is None else scored
    rewards = np.asarray(score_fn(items) if items else [], dtype=np.float64).reshape(-1)
    if rewards.shape[0] != len(items):
        raise ValueError(f"score_fn returned {rewards.shape[0]} rewards for {len(items)} inputs")
    if not np.isfinite(rewards).all():
        bad = int(np.flatnonzero(~np.isfinite(rewards))[0])
        raise ValueError(f"score_fn returned a non-finite reward ({rewards[bad]}) for input {bad}")
    per_cat: dict = {}
    total = [0, 0, 0, 0]  # correct, ties, pairs, records
    for rec, idx in zip(records, index):
        c = per_cat.setdefault(rec.category, [0, 0, 0, 0])
        counts = rec.count(rewards[idx]) if rec.has_pairs() else (0, 0, 0)
        for acc in (c, total):
            for k, n in enumerate(counts):
                acc[k] += n
        c[3] += 1
        total[3] += 1
    categories = {k: _summary(*v) for k, v in sorted(per_cat.items())}
    accs = [v["accuracy"] for v in categories.values()]
    return {"overall": _summary(*total),
            "category_mean": float(np.mean(accs)) if accs else float("nan"),
            "categories": categories, "scored_inputs": len(items)}


def _shown(name: str) -> str:
    """A category as one table cell: a tab, newline or other control character in the name broke
    the row into columns or lines of its own, so those are written as JSON escapes."""
    return json.dumps(name, ensure_ascii=False)[1:-1] if not name.isprintable() else name


def format_table(result: dict) -> str:
    """The result as a text table: one row per category, then the overall and mean rows."""
    shown = {k: _shown(k) for k in result["categories"]}
    width = max([len("category"), len(OVERALL_ROW), len(MEAN_ROW)] + [len(k) for k in shown.values()])

    def row(k, v):
        return (f"{k:<{width}}  {v['accuracy']:>8.2%}  {v['pairs']:>7}  {v['correct']:>7}  "
                f"{v['ties']:>5}  {v['records']:>7}")

    lines = [f"{'category':<{width}}  {'accuracy':>8}  {'pairs':>7}  {'correct':>7}  "
             f"{'ties':>5}  {'records':>7}"]
    lines += [row(shown[k], v) for k, v in result["categories"].items()]
    lines += ["-" * len(lines[0]), row(OVERALL_ROW, result["overall"]),
              f"{MEAN_ROW:<{width}}  {result['category_mean']:>8.2%}"]
    return "\n".join(lines)


def write_result(result: dict, path: str) -> None:
    """The result as JSON (NaN accuracies of empty sets written as null)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, float) and math.isnan(x):
            return None
        return x

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(result), f, indent=2, ensure_ascii=False)
        f.write("\n")


def evaluate_file(path: str, score_fn: Callable[[list], Sequence[float]],
                  json_path: Optional[str] = None, out=None) -> dict:
    """Read a ranked JSONL file, score it, print the table (to `out`, default stdout) and write
    the JSON (when `json_path` is given): what `polar eval` does once given a scoring function."""
    import sys

    result = evaluate_ranked(read_ranked(path), score_fn)
    print(format_table(result), file=out or sys.stdout)
    if json_path:
        write_result(result, json_path)
    return result
