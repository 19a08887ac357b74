"""Request items -> token ids: every use of POLAR's input format by the server goes through here.

Two kinds of item reach the server:
- structured (native /v1/rewards, OpenRLHF /get_reward): prompt, reference, output and wrapper,
  turned into exactly the string the official POLAR client sends and the ids a server gives it
  (polar/client_format.py: the client's truncation, BOS counting, special-token literals in the
  texts removed, the sft "\n" before an empty response);
- already formatted text (SGLang /classify, vLLM /pooling), as POLAR's reward client sends it:
  the whole string with the literal reward tokens, tokenized as the serving engines do (BOS in
  front, the literals read as their special tokens: `Tokenizer.encode_served_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from polar.client_format import Cuts, ScoringItem, client_encode_batch
from polar.tokenizer import Tokenizer

Text = Union[str, Sequence[dict]]


@dataclass
class StructuredItem:
    prompt: Text
    reference: Text
    output: Text
    wrapper: str = "sft"


def check_truncation(max_length: int, max_response: int, flags: tuple = ("max_length", "max_response")) -> None:
    """The client's prompt budget, (max_length - 4 - |reference| - |output|) // 2, is at least one
    token for every item only when max_length >= 2 * max_response + 6; below that the client's
    unguarded slice keeps a whole prompt of any length (polar/client_format.py, rule 4). `flags`:
    what the caller's user sets the two by (a command's flags, an API's arguments)."""
    if max_length < 2 * max_response + 6:
        # both ways out: a model of few positions bounds max_length, so a smaller max_response may be the only one
        shorter = f"{flags[1]} <= {(max_length - 6) // 2} or " if max_length >= 6 else ""
        raise ValueError(f"{flags[0]} {max_length} leaves no prompt budget when the reference and output each take "
                         f"{flags[1]} {max_response} tokens: the official client then keeps the whole prompt, "
                         f"however long; use {shorter}{flags[0]} >= {2 * max_response + 6}")


def format_structured(tokenizer: Tokenizer, items: Sequence[StructuredItem], max_length: int,
                      max_response: int, cuts: Optional[Cuts] = None) -> list[tuple[str, np.ndarray]]:
    """Per item: (the client's serving string, the ids the model scores: BOS first, the reward
    token last), exactly as the official client and a server would produce them; `cuts`, when
    given, is added what the truncation cut."""
    if not items:
        return []
    served = client_encode_batch(tokenizer, [ScoringItem(it.prompt, it.reference, it.output, it.wrapper)
                                             for it in items],
                                 max_length=max_length, max_response_length=max_response, cuts=cuts)
    return [(s.text, s.ids) for s in served]


class NoRewardToken(ValueError):
    """An already formatted text whose last token is not the reward token."""


def tokenize_served_text(tokenizer: Tokenizer, texts: Sequence[str],
                         names: Optional[Sequence[str]] = None) -> list[np.ndarray]:
    """Already formatted strings -> ids with BOS in front, as the serving engines tokenize them.
    The reward is read at the last token (as SGLang and vLLM read it), which POLAR's client makes
    the reward token by ending every string with its literal; a text ending otherwise (a trailing
    newline or space after it, or no reward token at all) would be scored at some other token,
    a number the model was never trained to give, so it is refused: NoRewardToken naming
    `names[i]` (default `text[i]`)."""
    ids = tokenizer.encode_served_batch(list(texts))
    for i, a in enumerate(ids):
        if len(a) == 0 or a[-1] != tokenizer.reward_token_id:
            name = names[i] if names is not None else f"text[{i}]"
            raise NoRewardToken(f"{name} does not end with the reward token {tokenizer.reward_token_text} (it ends "
                                f"{texts[i][-24:]!r}): the reward is read at a text's last token, and POLAR's format "
                                "ends every text with that token (`polar format` writes such texts)")
    return ids
