"""The serving form: the string and ids the official POLAR client sends a reward-model server.

POLAR's `RewardModelClient._encode` (InternLM/POLAR, src/polar/reward_func.py) turns one
structured input {prompt, reference, output, wrapper} into one string; the server tokenizes it.
Its rules, which differ from the training code's (polar/format.py), reproduced exactly:

1. Message lists become their contents joined by "\\n" (roles dropped).
2. Each piece is tokenized as `tokenizer(text)["input_ids"]`: BOS, then its ids with special-token
   literals read as special tokens (`Tokenizer.encode_served`); the BOS counts in its length.
3. A response (reference, output) longer than `max_response_length` keeps
   `ids[:max_response_length]`: BOS included, so max_response_length - 1 text tokens.
4. The prompt budget is (max_length - 4 - |reference ids| - |output ids|) // 2 (4 reserved for
   <|reward|>, the two "\\n" and the reward token; the same BOS-inclusive counts); a longer prompt
   keeps `ids[-budget:]`. A budget <= 0 is not guarded: `ids[-0:]` keeps the whole prompt, a
   negative budget drops that many tokens from its start (Python slicing).
5. Each kept piece is decoded with `skip_special_tokens=True`: BOS and special-token literals
   typed in the text vanish, and a cut inside a multi-byte character leaves U+FFFD.
6. sft: "{p}\\n{r}<|reward|>{p}\\n{o}[UNUSED_TOKEN_130]" with the "\\n" written even for an empty
   response (the client's emptiness test never fires); pretrain: no "\\n".

Empty outputs are scored like any other. The ids are what the server gets for that string:
`Tokenizer.encode_served(text)` (BOS, then the string with its structural literals, and any that
rule 5 happened to form by joining text, read as special tokens). `max_length` is the client's
constructor argument (16384 by default), of which the client itself keeps max_length - 4. The
two reward strings are the tokenizer's (`reward_sep_text`, `reward_token_text`): the client's own
"<|reward|>" and "[UNUSED_TOKEN_130]" unless a tokenizer is set up with others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from polar.format import WRAPPERS, Text, as_text
from polar.tokenizer import Tokenizer

CLIENT_MAX_LENGTH = 16384
CLIENT_MAX_RESPONSE_LENGTH = 4096
CLIENT_RESERVED = 4  # <|reward|>, two "\n", the reward token


@dataclass
class ServedInput:
    text: str  # the string the client sends
    ids: np.ndarray  # int32: what the server tokenizes it to (BOS first, reward token last)


@dataclass
class Cuts:
    """What rules 3 and 4 cut, counted across the calls given the same Cuts: a reward read from an
    output cut to its head never saw its end, and nothing in the string says so."""

    items: int = 0  # items formatted
    outputs: int = 0  # outputs cut to their first max_response_length ids
    references: int = 0  # the same, of references (one per item: a shared reference counts each time)
    prompts: int = 0  # prompts that lost text from their start to the budget

    def add(self, other: "Cuts") -> None:
        self.items += other.items
        self.outputs += other.outputs
        self.references += other.references
        self.prompts += other.prompts

    def __str__(self) -> str:
        return (f"{self.outputs:,} output(s), {self.references:,} reference(s) and {self.prompts:,} prompt(s) "
                f"of {self.items:,} item(s)")


@dataclass
class ScoringItem:
    """One structured input of the client: a prompt, a reference and one output to score."""

    prompt: Text
    reference: Text
    output: Text
    wrapper: str = "sft"


def _check_length(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _item(x, i: int) -> ScoringItem:
    if isinstance(x, ScoringItem):
        item = x
    elif isinstance(x, dict):
        missing = [k for k in ("prompt", "reference", "output") if k not in x]
        if missing:
            raise ValueError(f"item {i}: {missing[0]}: missing")
        item = ScoringItem(x["prompt"], x["reference"], x["output"], x.get("wrapper") or "sft")
    else:
        raise TypeError(f"item {i}: expected a dict or ScoringItem, got {type(x).__name__}")
    if item.wrapper not in WRAPPERS:
        raise ValueError(f"item {i}: wrapper: must be one of {', '.join(WRAPPERS)}, "
                         f"got {item.wrapper!r:.60}")
    return item


def client_texts(tokenizer: Tokenizer, items: Sequence, *, max_length: int = CLIENT_MAX_LENGTH,
                 max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH, cuts: Optional[Cuts] = None) -> list[str]:
    """The client's string for each item (dicts with prompt, reference, output and an optional
    wrapper, or ScoringItem), in a few batched tokenizer calls; `cuts`, when given, is added what
    the truncation cut."""
    max_length = _check_length("max_length", max_length)
    mr = _check_length("max_response_length", max_response_length)
    items = [_item(x, i) for i, x in enumerate(items)]
    if not items:
        return []
    pieces = []
    for i, it in enumerate(items):
        for field in ("prompt", "reference", "output"):
            try:
                pieces.append(as_text(getattr(it, field)))
            except TypeError as e:
                raise TypeError(f"item {i}: {field}: {e}") from None
    ids = tokenizer.encode_served_batch(pieces)
    kept, references_cut, outputs_cut, prompts_cut = [], 0, 0, 0
    for k in range(len(items)):
        p, r, o = ids[3 * k:3 * k + 3]
        references_cut += len(r) > mr
        outputs_cut += len(o) > mr
        # The client's slices, Python semantics included (rule 4's unguarded budget).
        r = r[:mr] if len(r) > mr else r
        o = o[:mr] if len(o) > mr else o
        budget = (max_length - CLIENT_RESERVED - len(r) - len(o)) // 2
        whole = len(p)
        p = p[-budget:] if len(p) > budget else p
        # BOS goes first and the decode drops it anyway: text is lost from the second id on (a
        # budget of 0 keeps the whole prompt: `ids[-0:]`)
        prompts_cut += len(p) < whole - 1
        kept += [p, r, o]
    if cuts is not None:
        cuts.add(Cuts(len(items), outputs_cut, references_cut, prompts_cut))
    p_r_o = tokenizer.decode_batch(kept, skip_special_tokens=True)
    out = []
    for k, it in enumerate(items):
        p, r, o = p_r_o[3 * k:3 * k + 3]
        nl = "" if it.wrapper == "pretrain" else "\n"
        out.append(f"{p}{nl}{r}{tokenizer.reward_sep_text}{p}{nl}{o}{tokenizer.reward_token_text}")
    return out


def client_encode_batch(tokenizer: Tokenizer, items: Sequence, *,
                        max_length: int = CLIENT_MAX_LENGTH,
                        max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH,
                        cuts: Optional[Cuts] = None) -> list[ServedInput]:
    """Per item, the client's string and the ids the server gives it (`cuts` as in client_texts)."""
    texts = client_texts(tokenizer, items, max_length=max_length,
                         max_response_length=max_response_length, cuts=cuts)
    return [ServedInput(t, ids) for t, ids in zip(texts, tokenizer.encode_served_batch(texts))]


def client_encode(tokenizer: Tokenizer, prompt: Text, reference: Text, output: Text,
                  wrapper: str = "sft", *, max_length: int = CLIENT_MAX_LENGTH,
                  max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH, cuts: Optional[Cuts] = None) -> ServedInput:
    """One structured input's serving string and ids (module docstring for the rules)."""
    return client_encode_batch(tokenizer, [ScoringItem(prompt, reference, output, wrapper)],
                               max_length=max_length, max_response_length=max_response_length, cuts=cuts)[0]
