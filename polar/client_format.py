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

The n outputs of one prompt that RL scores (n = 8-64) share the prompt and the reference, and each
string holds the prompt twice: within a call each distinct piece is tokenized and each kept slice
decoded once, and where `split_is_exact` holds a string's ids are read as those of its head
(prompt, reference, <|reward|>: once per group) and of its tail, the same ids as the whole
string's (tests/polar/test_client_format_shared.py; benchmarks/client_tokenize.py times it).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from polar.format import WRAPPERS, Text, as_text
from polar.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

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


def _pieces(items: list) -> list[str]:
    """Prompt, reference and output of each item, as the client's text (rule 1)."""
    pieces = []
    for i, it in enumerate(items):
        for field in ("prompt", "reference", "output"):
            try:
                pieces.append(as_text(getattr(it, field)))
            except TypeError as e:
                raise TypeError(f"item {i}: {field}: {e}") from None
    return pieces


def _distinct(keys: list, share: bool) -> tuple[list, list[int]]:
    """The distinct keys in first-seen order and each key's place among them (`share` False: every
    key on its own)."""
    if not share:
        return keys, list(range(len(keys)))
    index: dict = {}
    where = [index.setdefault(k, len(index)) for k in keys]
    return list(index), where


@dataclass
class _Formatted:
    """The client's strings of a call: item k's is head + reward_sep_text + tail + reward_token_text,
    head = prompt, "\\n", reference and tail = prompt, "\\n", output, of the kept pieces
    `decoded[i]` (parts[k] = (prompt, reference, output, the "\\n")); equal parts, equal strings."""

    texts: list[str]
    parts: list[tuple[int, int, int, str]]
    decoded: list[str]


def _format(tokenizer: Tokenizer, items: Sequence, max_length: int, max_response_length: int,
            cuts: Optional[Cuts], share: bool) -> _Formatted:
    """Rules 1-6 for each item. `share`: each distinct piece is tokenized, and each distinct kept
    slice decoded, once (RL scores n outputs against one prompt and reference); without it every
    item's own, as the client does. A tokenizer gives a text the same ids wherever it occurs, so
    both give the same strings."""
    max_length = _check_length("max_length", max_length)
    mr = _check_length("max_response_length", max_response_length)
    items = [_item(x, i) for i, x in enumerate(items)]
    if not items:
        return _Formatted([], [], [])
    distinct, where = _distinct(_pieces(items), share)
    ids = tokenizer.encode_served_batch(distinct)
    kept, references_cut, outputs_cut, prompts_cut = [], 0, 0, 0
    for k in range(len(items)):
        p, r, o = where[3 * k:3 * k + 3]
        lp, lr, lo = len(ids[p]), len(ids[r]), len(ids[o])
        references_cut += lr > mr
        outputs_cut += lo > mr
        lr, lo = min(lr, mr), min(lo, mr)
        budget = (max_length - CLIENT_RESERVED - lr - lo) // 2
        # The client's `ids[-budget:]`, Python semantics included (rule 4's unguarded budget): a
        # suffix of the prompt whatever the budget's sign (0 keeps it whole: `ids[-0:]`).
        keep = len(range(lp)[-budget:]) if lp > budget else lp
        # BOS goes first and the decode drops it anyway: text is lost from the second id on
        prompts_cut += keep < lp - 1
        kept += [(p, lp - keep, lp), (r, 0, lr), (o, 0, lo)]
    if cuts is not None:
        cuts.add(Cuts(len(items), outputs_cut, references_cut, prompts_cut))
    slices, at = _distinct(kept, share)
    decoded = tokenizer.decode_batch([ids[i][a:b] for i, a, b in slices], skip_special_tokens=True)
    texts, parts = [], []
    for k, it in enumerate(items):
        p, r, o = (decoded[i] for i in at[3 * k:3 * k + 3])
        nl = "" if it.wrapper == "pretrain" else "\n"
        texts.append(f"{p}{nl}{r}{tokenizer.reward_sep_text}{p}{nl}{o}{tokenizer.reward_token_text}")
        parts.append((*at[3 * k:3 * k + 3], nl))
    return _Formatted(texts, parts, decoded)


def client_texts(tokenizer: Tokenizer, items: Sequence, *, max_length: int = CLIENT_MAX_LENGTH,
                 max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH, cuts: Optional[Cuts] = None) -> list[str]:
    """The client's string for each item (dicts with prompt, reference, output and an optional
    wrapper, or ScoringItem), in a few batched tokenizer calls; `cuts`, when given, is added what
    the truncation cut."""
    return _format(tokenizer, items, max_length, max_response_length, cuts, share=True).texts


def _served_literals(tokenizer: Tokenizer) -> Optional[list]:
    """(literal, matched on the normalized text) for every string the served reading turns into one
    id, for the two tokenizers whose reading is known; None for any other."""
    if type(tokenizer) is ByteTokenizer:
        return [(t.decode(), False) for t in tokenizer._literal_to_id]
    if type(tokenizer) is HFTokenizer:
        return [(t.content, t.normalized) for t in tokenizer._served.get_added_tokens_decoder().values()]
    return None


def _reaches_across(literal: str, s: str) -> bool:
    """Whether a match of `literal` could take in part of S found after it, or all of S."""
    return literal != s and (s in literal or any(len(literal) > j and literal.endswith(s[:j])
                                                 for j in range(1, len(s))))


def split_is_exact(tokenizer: Tokenizer) -> bool:
    """Whether the server's ids of head + S + tail + K (S, K: the reward strings) are always those
    of head + S followed by those of S + tail + K less their BOS and S, whatever head and tail.

    A server finds the added-token literals in the raw text first, left to right, the longest at
    the leftmost place, each search resuming after a match, then normalizes and tokenizes each
    stretch between them on its own (the HF library; ByteTokenizer's regex likewise): S found at
    its place cuts the string into stretches that do not see each other, the one after S read in
    both as a stretch that does not start the string (Metaspace's "first" marker). S is found
    there in the whole string when it is in both halves, unless a literal could reach across it
    (_reaches_across). S must be matched in the raw text (a normalized literal is looked for
    within stretches only) and not be all whitespace (a literal's strip options eat whitespace up
    to its neighbours). A tokenizer of another type: False."""
    exact = _SPLIT_EXACT.get(tokenizer) if type(tokenizer) in (ByteTokenizer, HFTokenizer) else False
    if exact is None:
        literals, s = _served_literals(tokenizer), tokenizer.reward_sep_text
        exact = (bool(s.strip()) and (s, False) in literals
                 and not any(_reaches_across(c, s) for c, _ in literals))
        _SPLIT_EXACT[tokenizer] = exact
    return exact


# split_is_exact per tokenizer: a fact of its file, asked once per call.
_SPLIT_EXACT: "weakref.WeakKeyDictionary[Tokenizer, bool]" = weakref.WeakKeyDictionary()


def _served_ids(tokenizer: Tokenizer, formatted: _Formatted, share: bool) -> list[np.ndarray]:
    """The server's ids of each string. `share` where split_is_exact: the head of a group of items
    (head + S, shared by the n outputs of one prompt and reference) is tokenized once and each
    tail as S + tail + K; the whole string otherwise."""
    texts = formatted.texts
    if not (share and split_is_exact(tokenizer)):
        return tokenizer.encode_served_batch(texts)
    d, sep, end = formatted.decoded, tokenizer.reward_sep_text, tokenizer.reward_token_text
    heads, head_at = _distinct([(p, r, nl) for p, r, _, nl in formatted.parts], True)
    tails, tail_at = _distinct([(p, o, nl) for p, _, o, nl in formatted.parts], True)
    ids = tokenizer.encode_served_batch([f"{d[p]}{nl}{d[r]}{sep}" for p, r, nl in heads]
                                        + [f"{sep}{d[p]}{nl}{d[o]}{end}" for p, o, nl in tails])
    head_ids, tail_ids = ids[:len(heads)], ids[len(heads):]
    return [np.concatenate([head_ids[h], tail_ids[t][2:]]) for h, t in zip(head_at, tail_at)]


def client_encode_batch(tokenizer: Tokenizer, items: Sequence, *,
                        max_length: int = CLIENT_MAX_LENGTH,
                        max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH,
                        cuts: Optional[Cuts] = None) -> list[ServedInput]:
    """Per item, the client's string and the ids the server gives it (`cuts` as in client_texts)."""
    formatted = _format(tokenizer, items, max_length, max_response_length, cuts, share=True)
    return [ServedInput(t, ids) for t, ids in zip(formatted.texts, _served_ids(tokenizer, formatted, True))]


def client_encode(tokenizer: Tokenizer, prompt: Text, reference: Text, output: Text,
                  wrapper: str = "sft", *, max_length: int = CLIENT_MAX_LENGTH,
                  max_response_length: int = CLIENT_MAX_RESPONSE_LENGTH, cuts: Optional[Cuts] = None) -> ServedInput:
    """One structured input's serving string and ids (module docstring for the rules)."""
    return client_encode_batch(tokenizer, [ScoringItem(prompt, reference, output, wrapper)],
                               max_length=max_length, max_response_length=max_response_length, cuts=cuts)[0]
