"""The POLAR reward-model input, byte for byte as the released models were trained on.

    sft (default): [BOS] {prompt}\\n{reference}<|reward|>{prompt}\\n{candidate}[UNUSED_TOKEN_130]
    pretrain:      [BOS] {prompt}{reference}<|reward|>{prompt}{candidate}[UNUSED_TOKEN_130]

Message lists lose their roles: the contents are joined by "\\n".

Truncation (POLAR.md section 4): reference and candidate keep their first `max_response` tokens;
the prompt keeps its *last* (max_length - 4 - |reference| - |candidate|) // 2 tokens, halved because
it appears twice; 4 tokens are reserved for <|reward|>, the two "\\n" and the reward token (also
with the pretrain wrapper, which does not use the "\\n"). BOS is outside that count, so an input
can be max_length + 1 tokens long.

Pieces are tokenized one by one, so the serving string (tokenized whole by the server) gives the
same ids only for tokenizers that do not merge across piece boundaries, such as the byte tokenizer;
a BPE tokenizer can merge "\\n" with the next word.

Empty responses: we follow the training code, not the official client. In the sft wrapper the "\\n"
after a prompt is written only when the response that follows it (reference or candidate) is
non-empty after truncation; the client always writes it, so for an empty response the served
string differs from what the model saw in training.

Groups: one reference is scored against several candidates. The ids are returned as a shared
prefix plus one suffix per candidate, prefix + suffix_i being exactly the single-candidate input;
the engine attends to the prefix once. To keep one prefix for all, the prompt budget is computed
with the *longest* (truncated) candidate, so a shorter candidate may see a slightly shorter prompt
tail than it would alone; for a single candidate the result is identical to the per-input rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from polar.tokenizer import REWARD_TOKEN_TEXT, REWARD_SEP_TEXT, Tokenizer

WRAPPERS = ("sft", "pretrain")
RESERVED_TOKENS = 4

Text = Union[str, Sequence[dict]]


@dataclass
class EncodedGroup:
    """A reference with its candidates: `prefix` + `candidates[i]` is candidate i's full input."""

    prefix: np.ndarray  # int32, starts with BOS
    candidates: list  # list[np.ndarray[int32]], each ends with the reward token id

    def full(self, i: int) -> np.ndarray:
        return np.concatenate([self.prefix, self.candidates[i]])


def as_text(value: Text) -> str:
    """A string as it is; a message list as its contents joined by "\\n" (roles dropped)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        contents = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise TypeError(f"message {i} must be a dict with a str 'content', got {msg!r:.80}")
            contents.append(msg["content"])
        return "\n".join(contents)
    raise TypeError(f"expected a str or a list of messages, got {type(value).__name__}")


def _check_wrapper(wrapper: str) -> None:
    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {WRAPPERS}, got {wrapper!r}")


def _sep(wrapper: str, response: str) -> str:
    return "\n" if wrapper == "sft" and response else ""


def build_text(prompt: Text, reference: Text, candidate: Text, wrapper: str = "sft") -> str:
    """The serving string (no BOS, literal reward token at the end), without truncation."""
    _check_wrapper(wrapper)
    p, r, c = as_text(prompt), as_text(reference), as_text(candidate)
    return f"{p}{_sep(wrapper, r)}{r}{REWARD_SEP_TEXT}{p}{_sep(wrapper, c)}{c}{REWARD_TOKEN_TEXT}"


def prompt_budget(max_length: int, reference_len: int, candidate_len: int) -> int:
    """Tokens the prompt may keep (it appears twice, hence the halving); never negative."""
    return max(0, (max_length - RESERVED_TOKENS - reference_len - candidate_len) // 2)


def encode_group(tokenizer: Tokenizer, prompt: Text, reference: Text, candidates: Sequence[Text],
                 wrapper: str = "sft", max_length: int = 16384,
                 max_response: int = 4096) -> EncodedGroup:
    """Tokenize and truncate one reference with its candidates (module docstring for the rules)."""
    _check_wrapper(wrapper)
    if isinstance(candidates, (str, dict)) or not isinstance(candidates, (list, tuple)):
        raise TypeError(f"candidates must be a list, got {type(candidates).__name__}")
    if not candidates:
        raise ValueError("encode_group needs at least one candidate")
    p_text, r_text = as_text(prompt), as_text(reference)
    c_texts = [as_text(c) for c in candidates]

    def ids(text: str) -> np.ndarray:
        return tokenizer.encode(text) if text else np.zeros(0, dtype=np.int32)

    ref = ids(r_text)[:max_response]
    cands = [ids(c)[:max_response] for c in c_texts]
    keep = prompt_budget(max_length, len(ref), max(len(c) for c in cands))
    full_prompt = ids(p_text)
    prm = full_prompt[max(0, len(full_prompt) - keep):]  # the tail; `[-keep:]` breaks at keep=0
    nl = ids("\n")
    i32 = lambda *xs: np.array(xs, dtype=np.int32)  # noqa: E731

    head = [i32(tokenizer.bos_id), prm]
    if wrapper == "sft" and len(ref):
        head.append(nl)
    head += [ref, i32(tokenizer.reward_sep_id), prm]
    # The "\n" before a candidate belongs to the shared prefix unless some candidate is empty
    # (no "\n" for it); then each non-empty candidate carries its own.
    nl_in_prefix = wrapper == "sft" and all(len(c) for c in cands)
    if nl_in_prefix:
        head.append(nl)
    tails = []
    for c in cands:
        own_nl = wrapper == "sft" and not nl_in_prefix and len(c) > 0
        tails.append(np.concatenate([nl if own_nl else nl[:0], c, i32(tokenizer.reward_token_id)])
                     .astype(np.int32))
    return EncodedGroup(prefix=np.concatenate(head).astype(np.int32), candidates=tails)
