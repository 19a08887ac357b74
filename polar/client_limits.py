"""How long the official client's string can get for a max_length, and so which --max-length a
model's positions allow (polar serve, polar score, polar eval).

The client's budget (polar/client_format.py, rule 4) keeps the ids within max_length - 1 only
as long as each kept piece, decoded and tokenized again inside the string, keeps its token
count. It does not where a cut falls inside a character: the piece decodes with U+FFFD for the
orphaned bytes, and the prompt, written twice, is cut at its head. For the byte tokenizer that
costs at most 3 x 2 tokens at each copy of the prompt's head (three continuation bytes, each
becoming the three bytes of U+FFFD) and 2 at the end of the reference and of the output (a lead
byte alone), so the ids may reach max_length + 15 (reached: tests/polar/test_client_limits.py).
"""
from __future__ import annotations

import argparse
from typing import Optional

from polar.client_format import CLIENT_MAX_LENGTH, CLIENT_MAX_RESPONSE_LENGTH
from polar.serve.items import check_truncation
from polar.tokenizer import ByteTokenizer, Tokenizer

BYTE_OVERRUN = 15
# A BPE also re-tokenizes the text on both sides of the four joins ("\n" and the reward token)
# differently from the pieces alone: this many tokens are allowed for that, beyond the cuts.
JOIN_ALLOWANCE = 4


def overrun(tokenizer: Tokenizer) -> int:
    """The most tokens by which the ids of the client's string may pass its max_length: exact for
    the byte tokenizer; for another tokenizer a bound from its tokens of U+FFFD and of "\\n" (up
    to three U+FFFD at each copy of the prompt's head for one kept token, one at the end of each
    response) with JOIN_ALLOWANCE, which no test has seen exceeded but no proof holds for every
    merge table: an item that still passes the model's positions is refused alone."""
    if isinstance(tokenizer, ByteTokenizer):
        return BYTE_OVERRUN
    fffd, newline = (len(ids) for ids in tokenizer.encode_batch(["\ufffd", "\n"]))
    return 2 * (newline - 1) - 1 + 2 * 3 * fffd + 2 * fffd + JOIN_ALLOWANCE


FLAGS = ("--max-length", "--max-response-length")


def fitting_response(max_length: int) -> int:
    """The client's max_response_length, or the largest below it that leaves a max_length the client's
    prompt budget (check_truncation): what a max_response_length not given stands for."""
    return min(CLIENT_MAX_RESPONSE_LENGTH, max(0, (max_length - 6) // 2))


def usage_check(ap: argparse.ArgumentParser, max_length: Optional[int], max_response: Optional[int],
                flags: tuple = FLAGS) -> None:
    """At argument parsing (polar serve, score, eval, format): a max_length that leaves the client's
    prompt budget empty is a usage error (exit 2) before anything is loaded, since the client then
    keeps a whole prompt of any length. A max_response_length not given is lowered to what leaves
    max_length a prompt budget. A max_length not given (None: polar serve, score and eval; polar
    format always has one) is checked by settle_lengths once the model's positions are known: they
    may lower the client's default, and a budget counted here on the default would name remedies
    those positions refuse."""
    if max_length is None:
        return
    try:
        check_truncation(max_length, fitting_response(max_length) if max_response is None else max_response, flags)
    except ValueError as e:
        ap.error(str(e))


def settle_lengths(max_length: Optional[int], max_response: Optional[int], tokenizer: Tokenizer, positions: int,
                   flags: tuple = FLAGS) -> tuple[int, int, Optional[str]]:
    """The client's max_length and max_response_length for a model of `positions` positions, and a
    note to print when a default was lowered. max_length None: the client's default, or, where the
    model's positions hold no item of that length, the largest max_length that fits them.
    max_response None: the client's default, or, where max_length (given or not) is below
    2 x 4096 + 6, the largest that leaves it a prompt budget. A given max_length whose items may
    pass the positions, or lengths that leave no prompt budget (check_truncation), are a
    ValueError naming the lengths that would do."""
    extra = overrun(tokenizer)
    fits = positions - extra
    lowered, derived = [], max_length is None
    if derived:
        max_length = min(CLIENT_MAX_LENGTH, fits)
        if max_length < CLIENT_MAX_LENGTH:
            lowered.append(f"{flags[0]} {max_length} (not the client's {CLIENT_MAX_LENGTH})")
    elif max_length > fits:
        # with a response given, the largest max_length alone may still leave no prompt budget: both are named
        also = (f" (and with it {flags[1]} <= {(fits - 6) // 2}, for a prompt budget)"
                if max_response is not None and 6 <= fits < 2 * max_response + 6 else "")
        raise ValueError(f"{flags[0]} {max_length}: an item the client's truncation leaves may take up to "
                         f"{max_length + extra} tokens (a cut inside a character decodes to U+FFFD, longer), more "
                         f"than the model's {positions} positions (max_position_embeddings); the largest "
                         f"{flags[0]} whose items fit is {fits}{also}")
    if max_length < 0:
        raise ValueError(f"the model's {positions} positions (max_position_embeddings) hold no item of the "
                         f"client's format with this tokenizer: {extra} tokens may come on top of {flags[0]}")
    if max_response is None:
        max_response = fitting_response(max_length)
        if max_response < CLIENT_MAX_RESPONSE_LENGTH:
            lowered.append(f"{flags[1]} {max_response} (not {CLIENT_MAX_RESPONSE_LENGTH})")
    try:
        check_truncation(max_length, max_response, flags)
    except ValueError:
        if not derived:
            raise
        if max_length == CLIENT_MAX_LENGTH < fits:
            # the client's default, not the positions' bound: a larger max_length works up to what they fit
            need = 2 * max_response + 6
            longer = (f" or {flags[0]} >= {need} (the model's positions allow up to {fits})" if need <= fits else
                      f" (the model's positions allow {flags[0]} up to {fits}, and with it "
                      f"{flags[1]} <= {(fits - 6) // 2})")
            raise ValueError(f"{flags[0]} {max_length} (the client's default: {flags[0]} not given) leaves no prompt "
                             f"budget when the reference and output each take {flags[1]} {max_response} tokens: the "
                             f"official client then keeps the whole prompt, however long; use "
                             f"{flags[1]} <= {(max_length - 6) // 2}{longer}") from None
        # the max_length is the positions' bound: "use --max-length >= N" would send them past the positions
        way = (f"use {flags[1]} <= {(max_length - 6) // 2}" if max_length >= 6 else
               "no max_response_length leaves so short a max_length a prompt budget")
        raise ValueError(f"the model's {positions} positions (max_position_embeddings) allow {flags[0]} {max_length} "
                         f"at most (an item the client's truncation leaves may take {extra} tokens more), and with "
                         f"{flags[1]} {max_response} that leaves no prompt budget: the official client then keeps "
                         f"the whole prompt, however long; {way}") from None
    if not lowered:
        return max_length, max_response, None
    if derived:  # the response follows from the max_length the positions allow
        why = (f"the model has {positions} positions (max_position_embeddings), and an item the client's truncation "
               f"leaves may take {extra} tokens more than {flags[0]} (a cut inside a character)")
    else:
        why = (f"the largest that leaves {flags[0]} {max_length} a prompt budget (the client's truncation needs "
               "max_length >= 2 x max_response_length + 6)")
    return max_length, max_response, f"{' and '.join(lowered)}: {why}"
