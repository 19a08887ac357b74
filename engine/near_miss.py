"""The one rule of a near miss: which known name a name that matches none was most likely meant to be.

polar's record readers and `polar serve` (a misspelt field), its command line (a misspelt command)
and the engine's config (a misspelt setting or section) each suggest through it, with its knobs set
to what they differ in.
"""
from __future__ import annotations

from typing import Optional


def near_field(key: str, fields, cutoff: float, fold_case: bool = False,
               length_within: Optional[int] = None) -> Optional[str]:
    """The one of `fields` that `key` is most likely a misspelling of (difflib's ratio at least
    `cutoff`; `key` lowercased first with `fold_case`; only fields whose length is within
    `length_within` of the key's, where given), else None."""
    import difflib  # at the first near miss, not at every import of the config

    if length_within is not None:
        fields = [f for f in fields if abs(len(f) - len(key)) <= length_within]
        if not fields:  # get_close_matches indexes the whole key first: 30-40 bytes a character
            return None
    near = difflib.get_close_matches(key.lower() if fold_case else key, fields, n=1, cutoff=cutoff)
    return near[0] if near else None


def near_option(option: str, options, cutoff: float = 0.6) -> Optional[str]:
    """The one of the command-line `options` (`--config`) that `option` is most likely a misspelling of,
    compared without their leading dashes, else None: the dashes alone made '--tp' near '--output' and
    '--help'."""
    bare = {o.lstrip("-"): o for o in options}
    return bare.get(near_field(option.lstrip("-"), sorted(bare), cutoff=cutoff))


def unrecognized(words: list[str], options) -> str:
    """The error for options a parser does not know, each near miss of one it does followed by it:
    `unrecognized arguments: --confg (did you mean --config?)` (argparse named the word alone; its own
    suggestions, suggest_on_error, come with Python 3.14 and cover choices only)."""
    shown = []
    for word in words:
        near = near_option(word.split("=", 1)[0], options) if word.startswith("-") else None
        shown.append(f"{word} (did you mean {near}?)" if near else word)
    return f"unrecognized arguments: {' '.join(shown)}"
