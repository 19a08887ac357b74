"""Non-learned reference-based scorers, to tell how much of a task a learned RM actually needs.

Each scorer is r(reference, candidate) -> float, higher meaning "more like the reference". If one of
these already ranks chosen above rejected, a reward model's accuracy on the same data says little.
Words are lowercase runs of letters and digits, so punctuation and casing habits are invisible to
the overlap scorers.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

_WORD = re.compile(r"\w+")

Scorer = Callable[[str, str], float]


def words(text: str) -> list:
    return _WORD.findall(text.lower())


def _jaccard(a: set, b: set) -> float:
    # Two empty sets are identical, not disjoint: an empty candidate matches an empty reference.
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def word_overlap(reference: str, candidate: str) -> float:
    """Jaccard index of the two word sets."""
    return _jaccard(set(words(reference)), set(words(candidate)))


def bigram_overlap(reference: str, candidate: str) -> float:
    """Jaccard index of the sets of adjacent word pairs."""
    def pairs(text):
        w = words(text)
        return set(zip(w, w[1:]))
    return _jaccard(pairs(reference), pairs(candidate))


def length_difference(reference: str, candidate: str) -> float:
    """Minus the difference in length, in characters."""
    return -float(abs(len(reference) - len(candidate)))


SCORERS = {"word": word_overlap, "bigram": bigram_overlap, "length": length_difference}


def pairwise_accuracy(scorer: Scorer, triplets: Iterable) -> float:
    """Share of triplets where chosen outscores rejected against the reference; ties count 0.5.

    `triplets` holds objects with `reference`, `chosen` and `rejected` attributes
    (`polar.synthetic.Triplet`).
    """
    total, n = 0.0, 0
    for t in triplets:
        good, bad = scorer(t.reference, t.chosen), scorer(t.reference, t.rejected)
        total += 1.0 if good > bad else 0.5 if good == bad else 0.0
        n += 1
    if n == 0:
        raise ValueError("pairwise_accuracy needs at least one triplet")
    return total / n
