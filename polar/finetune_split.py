"""Which fine-tuning records are held out, what a held-out set shares with the training set, and
which records of one side repeat another.

A held-out accuracy measures what was not trained on only if its prompts were not trained on.
Preference data often holds several pairs per prompt (a pair for each two of a prompt's rated
responses, as UltraFeedback-style sets are built), and a split by record puts pairs of most such
prompts on both sides. Records are therefore held out by prompt: every record of a held-out prompt
is held out, the others train. With one record per prompt this is the split by record.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from polar.build_repeats import SHOWN, first_of, named
from polar.format import as_text
from polar.records import record_digest


def prompt_ids(records) -> np.ndarray:
    """One int per record, equal for records whose prompts are the same text (numbered by first use)."""
    ids: dict = {}
    return np.fromiter((ids.setdefault(as_text(r.prompt), len(ids)) for r in records), dtype=np.int64,
                       count=len(records))


class Split(NamedTuple):
    held: np.ndarray  # bool per record
    prompts: int  # distinct prompts
    held_prompts: int


def held_out_count(fraction: float, records: int) -> int:
    """The number of records a split aims to hold out: `fraction` of them rounded down, as written
    (0.29 of 100 is 29, not the 28 of its floating-point product), and at least one where the
    fraction is above 0 and there are two records or more. Python's round() took a half to the even
    number: 0.05 of 10, 0.1 of 5 and 0.25 of 2 held out none though a fraction was asked for, 0.1 of
    15 held out 2 and 0.1 of 25 held out 2 too, and 0.5 of 15 held out 8, more than the half at
    most that a fraction may ask."""
    wanted = math.floor(Fraction(repr(float(fraction))) * records)
    return max(wanted, 1) if fraction > 0 and records >= 2 else wanted


def legacy_held_out_count(fraction: float, records: int) -> int:
    """Split rule 1, kept only for resuming runs started under it: round(fraction x records), Python's
    round() taking a half to the even number (what held_out_count, rule 2, corrected). A run's
    checkpoints record its rule (finetune_recipe: finetune.split_rule among their data settings);
    those that record none were written under this one, and their run resumes on the split it
    trained with (another count is another training set, which the resume refuses). No new run
    uses it."""
    return int(round(fraction * records))


# the held-out count rule of new runs, recorded with their checkpoints; rule -> its count
SPLIT_RULE = 2
HELD_OUT_COUNTS = {1: legacy_held_out_count, SPLIT_RULE: held_out_count}


def split_by_prompt(records, fraction: float, seed: int, rule: int = SPLIT_RULE) -> Split:
    """Hold out whole prompts, taken in a seeded random order, each one that brings the held-out
    records no further from held_out_count(fraction) records (a prompt of n records where n <= 2 x
    what is still wanted); at least one prompt stays to train on, and one is held out (the smallest)
    where the fraction is above 0 and a prompt can be spared. Stopping at the first prompt past the
    target instead held out a prompt of most of the records when the order met it early (10 of 11
    at 0.05, one prompt of 10 records and one of 1). Where every record has the same prompt, none is
    held out. `rule`: the count's rule (HELD_OUT_COUNTS), another only for a run resumed under it."""
    ids = prompt_ids(records)
    n_prompts = int(ids.max()) + 1 if len(ids) else 0
    target = HELD_OUT_COUNTS[rule](fraction, len(records))
    held_prompts = np.zeros(n_prompts, dtype=bool)
    if target and n_prompts >= 2:
        order = np.random.default_rng([seed, 7]).permutation(n_prompts)
        sizes = np.bincount(ids, minlength=n_prompts)[order]
        held, taken = 0, 0
        for k, n in enumerate(sizes.tolist()):
            if held >= target or taken == n_prompts - 1:
                break
            if n <= 2 * (target - held):  # a tie is taken: with prompts of one size, the closest prefix
                held_prompts[order[k]] = True
                held, taken = held + n, taken + 1
        if not taken:  # every prompt is larger than twice the target: the smallest, first in the order
            held_prompts[order[int(np.argmin(sizes))]] = True
    return Split(held_prompts[ids], n_prompts, int(held_prompts.sum()))


def _identity(r) -> tuple:
    return (as_text(r.prompt), as_text(r.reference), tuple(as_text(c) for c in r.candidates), tuple(r.labels))


class Overlap(NamedTuple):
    same_prompt: int  # held-out records whose prompt a training record has
    copies: list  # (held-out record, the training record it repeats), in held-out order


def overlap(train, held) -> Overlap:
    """What a held-out set given as its own file shares with the training records."""
    prompts = {as_text(r.prompt) for r in train}
    first = {}
    for r in train:
        first.setdefault(_identity(r), r)
    same = sum(as_text(r.prompt) in prompts for r in held)
    return Overlap(same, [(r, first[k]) for r in held if (k := _identity(r)) in first])


def repeats(records, default_wrapper: str) -> list:
    """(record, the earlier record it repeats) for each record that repeats an earlier one exactly
    (record_digest), in file order: a sampler's output appended to itself trains each record twice."""
    first: dict = {}
    out = []
    for r in records:
        d = record_digest(r.prompt, r.reference, r.candidates, r.labels, r.wrapper or default_wrapper)
        if d in first:
            out.append((r, first[d]))
        else:
            first[d] = r
    return out


def repeats_note(name: str, records, default_wrapper: str) -> str:
    """A note on the records of one side (the training or the held-out records) that repeat an earlier
    one exactly, or "" for none: kept, as a build keeps them, but each is trained (or scored) as often
    as it appears."""
    found = repeats(records, default_wrapper)
    if not found:
        return ""
    pairs = named(len(found), [(f"{r.file}:{r.line}", f"{first.file}:{first.line}") for r, first in found[:SHOWN]])
    return (f"note: {name}: {len(found)} of {len(records)} record(s) repeat an earlier record exactly (the same "
            f"prompt, reference, candidates, labels and wrapper; {pairs}): kept, each counts as often as it "
            "appears")


def unrankable(records) -> list:
    """Records holding a preferred and a rejected response of the same text: that pair gives two
    equal rewards whatever the model, so it trains nothing and its accuracy is a coin flip."""
    out = []
    for r in records:
        good = {as_text(c) for c, y in zip(r.candidates, r.labels) if y}
        if any(as_text(c) in good for c, y in zip(r.candidates, r.labels) if not y):
            out.append(r)
    return out


def where(records, limit: int = SHOWN) -> str:
    """`file:line, file:line, ...` for the first `limit` records."""
    return first_of((f"{r.file}:{r.line}" for r in records[:limit]), len(records))
