"""`polar score`'s check, before a model is loaded, that every unscored line's outputs fit the packed
sequence length (polar/score_run.py runs it under --on-error fail): a line too long is named before a
load of minutes, not where its chunk comes.

The settled --max-length keeps every item within the model's positions (polar/client_limits.py), so
only a --seq-length below what the client's truncation can leave (--max-length + 15 with the byte
tokenizer) can be passed, and only then is the input tokenized for it. Each of the run's ranks reads
and tokenizes its own share of the lines (share()), and the ranks then agree on the first line any of
them found, so the input is tokenized once over the ranks, not once on each.

Only each output's token count is needed, not the line's groups: the scoring splits a line's outputs
into groups of at most the packed length (engine/score.py, line_groups), leaving alone only an output
longer than that, so a line fits if and only if its longest output does.
"""
from __future__ import annotations

import itertools

from engine.config import ConfigError
from polar.client_limits import overrun
from polar.score_input import iter_score_input
from polar.tokenizer import Tokenizer


def first_too_long(encode, tokenizer: Tokenizer, max_length: int, path: str, numbers, limit: int, bound: str,
                   chunk_lines: int, rank: int = 0, world: int = 1, agree=lambda found: found) -> None:
    """A ConfigError, on every rank, at the first of the lines `numbers` of `path` (the unscored
    lines' numbers, ascending) whose outputs cannot fit `limit` tokens (`bound` names that limit).
    `encode(item_lists)`: the client's ids of each item, per list (CheckpointScorer.encoded), at
    `max_length` with `tokenizer`; this process is `rank` of `world`, and `agree(found)` gives every
    rank the earliest of the ranks' finds (engine.score_ranks.earliest; alone: what it was given)."""
    if limit >= max_length + overrun(tokenizer):
        return
    span = share(numbers, rank, world)
    first = agree(first_in_share(encode, path, limit, span, chunk_lines) if span else None)
    if first is not None:
        raise ConfigError(f"{path}:{first[0]}: {too_long_message(first[1], bound)} (--on-error skip writes an "
                          "error line instead)")


def too_long_message(tokens: int, bound: str) -> str:
    """What is wrong with a line whose longest output, with the prompt and reference it is scored after, takes
    `tokens` > `bound`: that one output, since outputs that pass the bound only together are split into groups
    and scored (engine.score.line_groups); naming the line's outputs read as that case."""
    return f"an output takes {tokens} tokens with its prompt and reference, more than {bound}"


def share(numbers, rank: int, world: int):
    """Rank `rank`'s share of the lines `numbers` (ascending) among `world` ranks, as the (after,
    until) line numbers that bound it, or None when it has none: one contiguous run of lines each,
    so that a rank reads past the lines before its share without parsing them."""
    lo, hi = rank * len(numbers) // world, (rank + 1) * len(numbers) // world
    return (numbers[lo] - 1, numbers[hi - 1]) if hi > lo else None


def first_in_share(encode, path: str, limit: int, span: tuple, chunk_lines: int):
    """(line number, its longest output's token count) of the first line of `path` in `span` (after,
    until) past `limit` tokens, or None; `encode` as first_too_long's. Tokenized `chunk_lines` lines
    at a time: the host holds a chunk, not the input."""
    source = (ln for ln in iter_score_input(path, "skip", after_line=span[0], until_line=span[1])
              if ln.error is None)
    while chunk := list(itertools.islice(source, chunk_lines)):
        for ln, ids in zip(chunk, encode([ln.items for ln in chunk])):
            longest = max(len(x) for x in ids)
            if longest > limit:
                return ln.line, longest
    return None
