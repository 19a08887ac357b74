"""Repetition loops at the end of sampled text (POLAR paper App. D: truncated, not removed)."""
from __future__ import annotations


def truncate_loop(text: str, min_repeats: int = 4, min_chars: int = 32) -> tuple[str, int]:
    """Cut a trailing repetition loop down to one occurrence; returns (text, characters removed).

    The rule: take the smallest period p such that the last max(min_repeats * p, min_chars)
    characters repeat with period p (the text ends in at least `min_repeats` copies of one chunk,
    spanning at least `min_chars`, so "haha" or "..." endings are left alone). Extend that periodic
    run back as far as it goes and keep only its first p characters: the chunk as it first
    appeared. A trailing partial copy (generation stopped mid-chunk by max_tokens) is part of the
    run and goes too. The kept copy can be a rotation of the chunk: where the text before the loop
    ends like the chunk does ("... done. " before "again we go. again we go. ..."), the run starts
    those characters early and the cut moves back with it. The check repeats on the result, since a
    loop can sit inside a longer loop.
    Periods and lengths are in characters, so the rule does not depend on the policy's tokenizer.
    """
    if min_repeats < 2:  # one copy of a chunk is no loop; the search below reads past the text's start
        raise ValueError(f"min_repeats must be at least 2, got {min_repeats}")
    removed = 0
    while True:
        n = len(text)
        cut = None
        for p in range(1, n // min_repeats + 1):
            need = max(min_repeats * p, min_chars)
            if need > n:
                break
            # Cheap test of the last character first: most periods fail it.
            if text[-1] != text[-1 - p] or text[n - need:n - p] != text[n - need + p:]:
                continue
            # Where the periodic run starts: the smallest s with text[s:n-p] == text[s+p:], a property
            # that holds for every s after it, so found by bisection with slice compares (C memcmp):
            # stepping back a character at a time in Python took ~1 ms a 16k-character loop, this ~0.02 ms.
            lo, hi = 0, n - need
            while lo < hi:
                mid = (lo + hi) // 2
                if text[mid:n - p] == text[mid + p:]:
                    hi = mid
                else:
                    lo = mid + 1
            cut = lo + p
            break
        if cut is None:
            return text, removed
        removed += n - cut
        text = text[:cut]
