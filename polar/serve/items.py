"""Request items -> token ids: every use of POLAR's input format by the server goes through here.

Two kinds of item reach the server:
- structured (native /v1/rewards, OpenRLHF /get_reward): prompt, reference, output and wrapper,
  formatted and truncated here by POLAR's rules (paper Sec. 3: the reference trajectory and the
  candidate follow the prompt; polar.format has the byte-exact template and truncation);
- already formatted text (SGLang /classify, vLLM /pooling), as POLAR's reward client sends it:
  the whole string with the literal reward tokens, tokenized by the server with BOS in front.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union, Sequence

import numpy as np

from polar.format import build_text, encode_groups
from polar.tokenizer import Tokenizer

Text = Union[str, Sequence[dict]]


@dataclass
class StructuredItem:
    prompt: Text
    reference: Text
    output: Text
    wrapper: str = "sft"


def format_structured(tokenizer: Tokenizer, items: Sequence[StructuredItem], max_length: int,
                      max_response: int) -> list[tuple[str, np.ndarray]]:
    """Per item: (the serving string, without truncation; the ids the model scores, truncated by
    the format's rules, BOS first and the reward token last)."""
    if not items:
        return []
    groups = encode_groups(tokenizer, [it.prompt for it in items], [it.reference for it in items],
                           [[it.output] for it in items], [it.wrapper for it in items],
                           max_length=max_length, max_response=max_response)
    return [(build_text(it.prompt, it.reference, it.output, it.wrapper,
                        reward_sep=tokenizer.reward_sep_text, reward_token=tokenizer.reward_token_text),
             g.full(0)) for it, g in zip(items, groups)]


def tokenize_served_text(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Already formatted strings -> ids with BOS in front, as the serving engines tokenize them.
    The reward is read at the last token, whatever it is (as SGLang and vLLM do): POLAR's client
    ends every string with the literal reward token."""
    bos = np.array([tokenizer.bos_id], dtype=np.int32)
    return [np.concatenate([bos, ids]) for ids in tokenizer.encode_batch(list(texts))]
