"""The POLAR reward-model input, byte for byte as the released models were trained on.

    sft (default): [BOS] {prompt}\\n{reference}<|reward|>{prompt}\\n{candidate}[UNUSED_TOKEN_130]
    pretrain:      [BOS] {prompt}{reference}<|reward|>{prompt}{candidate}[UNUSED_TOKEN_130]

Message lists lose their roles: the contents are joined by "\\n". The two reward strings are the
tokenizer's (`reward_sep_text`, `reward_token_text`), POLAR's literals above by default.

Truncation: the rule of the code that trained the released models (xtuner's `tokenize_ref`,
InternLM/xtuner xtuner/dataset/preference_dataset.py; max_length 16384, max_response 4096). It
tokenizes each piece on its own with add_special_tokens=True, so every length it counts includes
the piece's BOS (`PIECE_BOS`): reference and candidate keep ids[:max_response], their BOS and
max_response - 1 text tokens; the prompt keeps its *last* (max_length - 4 - |reference| -
|candidate|) // 2 text tokens, |.| counting a response's BOS (`response_length`, `prompt_budget`),
halved because the prompt appears twice; 4 tokens are reserved for <|reward|>, the two "\\n" and the
reward token (also with the pretrain wrapper, which does not use the "\\n"). tokenize_ref keeps
ids[-budget:] of a prompt's BOS and text longer than the budget: the BOS falls off the front, so
of n text tokens min(n, budget) are kept, as here. So an input, BOS and reward token included, is
at most max_length - 1 tokens long whenever the responses leave the prompt a budget >= 0.
A cut is made in the *text*, at the character span of the first dropped (head) or last dropped
(tail) token (`Tokenizer.offsets_batch`), so it never falls inside a character: with the byte
tokenizer a cut through a multi-byte character drops that whole character, keeping up to 3 bytes
fewer than the budget (|reference| and |candidate| above count the tokens actually kept, and
their BOS). Text
without such cuts (all ASCII, say) gets exactly tokenize_ref's ids (tests/polar/test_format_xtuner.py).

Where training here still differs from tokenize_ref, and why:
- a cut inside a character: tokenize_ref decodes the kept ids, so the partial character becomes
  U+FFFD, a character the text never held, which is tokenized again (3 byte tokens with the byte
  tokenizer, so that input can pass the rule's length); here the character is dropped, within the
  rule's counts.
- special-token literals typed in a text: tokenize_ref reads them as special tokens (one token
  each in the count) and its decode drops them, so they vanish; here they stay text (counted as
  the tokens of their text), and no user text becomes structure (below).
- a prompt budget <= 0 (responses that fill max_length - 4 on their own, only at small
  max_length): tokenize_ref does not guard it (ids[-0:] keeps the whole prompt, a negative budget
  drops that many ids from its start); here the prompt is dropped.
- groups: the budget is tokenize_ref's min over chosen and rejected taken over all K candidates,
  and a group too long for its pack keeps a shorter prompt (group capacity, below).
- ids: tokenize_ref tokenizes the decoded pieces joined into one string; here the special ids are
  placed by structure and the kept text is what is tokenized (for a tokenizer whose decode gives
  back the text it encoded, the same string).

Then the special ids are placed by structure, never read from the text: an input's ids are BOS,
the content ids of "{prompt}\\n{reference}", the <|reward|> id, the content ids of
"{prompt}\\n{candidate}" and the reward token id (`Tokenizer.encode_batch`: a special-token literal
typed in a text is tokenized as text; text is content, never structure). A server splits a string
at its special tokens and tokenizes the parts between them on their own, so for texts without
such literals these are exactly the ids of the serving string (`build_text`) tokenized whole by the
server, for any tokenizer, including a BPE that merges "\\n" with the next word (the tokenizer
checks this at load time). The cost: a side may have a few tokens more or fewer than the sum of
its pieces, so with such a tokenizer the length bound above holds for the pieces, not exactly for
the input. With the byte tokenizer (no merges) it is exact. A side's ids are those of its whole text,
spliced from a short window around the junction of prompt and response and the pieces' own ids
where checks of the ids hold (`_side_ids_windowed`). (The official client, which serving follows,
counts as tokenize_ref does, but budgets one output, writes the "\\n" before an empty response and
keeps tokenize_ref's U+FFFD, vanishing literals and unguarded budget: polar/client_format.py.)

Empty responses: we follow the training code, not the official client. In the sft wrapper the "\\n"
after a prompt is written only when the response that follows it (reference or candidate) is
non-empty after truncation; the client always writes it, so for an empty response the served
string differs from what the model saw in training.

Groups: one reference is scored against several candidates. The ids are returned as a shared
prefix plus one suffix per candidate, prefix + suffix_i being exactly candidate i's full input;
the engine attends to the prefix once. The prefix is the longest common prefix of the candidates'
ids, but leaves every candidate at least its last token (the reward token, read by the model):
two identical candidates share all but that; a single candidate's own part is its reward token
alone. The prefix may end inside the text of a piece (a common start of the candidates) or before
the piece boundary (a token merged across it): it is a split of ids, not of text. To keep one
prompt for all, the prompt budget is computed with the *longest* (truncated) candidate
(tokenize_ref's min over chosen and rejected), so a shorter candidate may see a slightly shorter
prompt tail than it would alone; for a single candidate the result is identical to the per-input
rule.

Group capacity (ours): the rule above bounds each candidate's input, but a group is stored as its
prefix once plus every candidate, so K long candidates can make a group longer than the pack it
must fit whole (`group_capacity`, the pack length; 0: no cap). Counted as stored: BOS, the prompt
twice, the reference, <|reward|>, the "\\n"s the wrapper writes (the candidates' shared one
once), every candidate and a reward token each. When that exceeds the capacity, the prompt keeps
a shorter tail (halved again: it appears twice) so that the group fits, and the tokens taken
beyond the rule are recorded (`EncodedGroup.prompt_cut_to_fit`) for the caller to report; when
the rule's prompt fits, nothing changes. If even an empty prompt does not fit, the prompt is
dropped and the group stays too long: the caller rejects it. With the byte tokenizer the count
is an upper bound (candidates with a common start share more of it), so every group that can fit
does; with a BPE, merges across the pieces make it approximate, so a caller still checks each
group's length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from polar.tokenizer import REWARD_TOKEN_TEXT, REWARD_SEP_TEXT, ByteTokenizer, Tokenizer

WRAPPERS = ("sft", "pretrain")
RESERVED_TOKENS = 4
# The training code tokenizes each piece with add_special_tokens=True, so each length it counts
# includes the BOS the tokenizer puts first. Every Tokenizer here has one (`bos_id`, put first by
# `encode_served`, as InternLM2's <s> is by the released models' tokenizer).
PIECE_BOS = 1
# recorded in a built dataset's metadata (polar data build): the rule its truncated records were cut by,
# so the shards of builds before and after a change of it are two builds, never one dataset
TRUNCATION_RULE = "piece lengths count their BOS (the released models' tokenize_ref)"
_CUT_BLOCK_TOKENS = 1 << 20  # token spans per batched offsets call of a truncation

Text = Union[str, Sequence[dict]]


@dataclass
class EncodedGroup:
    """A reference with its candidates: `prefix` + `candidates[i]` is candidate i's full input."""

    prefix: np.ndarray  # int32, starts with BOS
    candidates: list  # list[np.ndarray[int32]], each non-empty, ending with the reward token id
    # Prompt tokens taken beyond the paper's rule so that the group fits `group_capacity`.
    prompt_cut_to_fit: int = 0
    # What the paper's rule itself cut, for a caller to report: the reference and candidates cut to
    # their first max_response ids, BOS counted (a count of texts that lost text), and whether the
    # prompt lost its head.
    responses_cut: int = 0
    prompt_cut: bool = False

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


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> Optional[str]:
    """Where `text` holds a lone surrogate ("U+DC80 at character 2"), else None. JSON may escape
    one ("\\udc80") and Python holds it, but it is no character: no tokenizer can encode it."""
    if text.isascii():  # cheap, and ASCII holds none
        return None
    m = _SURROGATE.search(text)
    return f"U+{ord(m.group()):04X} at character {m.start()}" if m else None


def _check_wrapper(wrapper: str) -> None:
    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {WRAPPERS}, got {wrapper!r}")


def _sep(wrapper: str, response: str) -> str:
    return "\n" if wrapper == "sft" and response else ""


def _side(prompt: str, response: str, wrapper: str) -> str:
    """One side of the <|reward|> token: the prompt, then the response."""
    return f"{prompt}{_sep(wrapper, response)}{response}"


def _join(prompt: str, reference: str, candidate: str, wrapper: str, reward_sep: str) -> str:
    return _side(prompt, reference, wrapper) + reward_sep + _side(prompt, candidate, wrapper)


def build_text(prompt: Text, reference: Text, candidate: Text, wrapper: str = "sft", *,
               reward_sep: str = REWARD_SEP_TEXT, reward_token: str = REWARD_TOKEN_TEXT) -> str:
    """The serving string (no BOS, literal reward token at the end), without truncation."""
    _check_wrapper(wrapper)
    p, r, c = as_text(prompt), as_text(reference), as_text(candidate)
    return _join(p, r, c, wrapper, reward_sep) + reward_token


def response_length(kept: int, max_response: int) -> int:
    """A response's length as the training code counts it: its BOS and the `kept` text tokens,
    within max_response (whose ids[:max_response] is empty, BOS and all, at 0)."""
    return min(PIECE_BOS + kept, max_response)


def prompt_budget(max_length: int, reference_len: int, candidate_len: int) -> int:
    """Text tokens the prompt may keep (it appears twice, hence the halving), the lengths counted
    as `response_length` counts them; never negative (the training code's is unguarded)."""
    return max(0, (max_length - RESERVED_TOKENS - reference_len - candidate_len) // 2)


def _keep_head(text: str, spans: np.ndarray, keep: int) -> tuple[str, int]:
    """The text of (at most) the first `keep` tokens, and how many tokens it holds."""
    n = len(spans)
    if keep >= n:
        return text, n
    if keep <= 0:
        return "", 0
    # Cut where the first dropped token starts: a character it shares with a kept token goes too.
    cut = int(spans[keep, 0])
    return text[:cut], int(np.count_nonzero(spans[:keep, 1] <= cut))


def _keep_tail(text: str, spans: np.ndarray, keep: int) -> tuple[str, int]:
    """The text of (at most) the last `keep` tokens, and how many tokens it holds."""
    n = len(spans)
    if keep >= n:
        return text, n
    if keep <= 0:
        return "", 0
    cut = int(spans[n - keep - 1, 1])  # where the last dropped token ends
    return text[cut:], int(np.count_nonzero(spans[n - keep:, 0] >= cut))


def _cut(tokenizer: Tokenizer, texts: list, counts: list, ids: list, keep: list, tail: bool) -> None:
    """In place: texts[i] becomes the text of keep[i] of its counts[i] tokens (its head, or its
    tail with `tail`) and counts[i] the tokens that text holds, for the texts with more than
    keep[i]. ids[i] holds at least the keep[i] + 1 ids at that end of encode(texts[i])."""
    over = [i for i, (n, k) in enumerate(zip(counts, keep)) if n > k]
    if not over:
        return
    # Only the kept tokens and the first one dropped place a cut: spans of the whole text would
    # cost tens of bytes per character of texts that may be megabytes long. Even those spans
    # take tens of bytes a token, so a batch of long texts is cut a block at a time.
    keep_fn = _keep_tail if tail else _keep_head
    edge_tokens = np.cumsum([keep[i] + 1 for i in over])
    blocks = np.unique(np.searchsorted(edge_tokens, np.arange(0, edge_tokens[-1], _CUT_BLOCK_TOKENS),
                                       side="right")).tolist()
    for a, b in zip(blocks, [*blocks[1:], len(over)]):
        block = over[a:b]
        edges = [ids[i][len(ids[i]) - keep[i] - 1:] if tail else ids[i][:keep[i] + 1] for i in block]
        for i, spans in zip(block, tokenizer.edge_offsets_batch([texts[i] for i in block], edges, tail)):
            texts[i], counts[i] = keep_fn(texts[i], spans, keep[i])


def _shared_prefix_length(fulls: list) -> int:
    """Longest common prefix of the id arrays, leaving each at least one token of its own."""
    n = min(len(f) for f in fulls) - 1
    first = fulls[0]
    for f in fulls[1:]:
        diff = np.flatnonzero(f[:n] != first[:n])
        if diff.size:
            n = int(diff[0])
    return n


def _texts(values: Sequence[Text], where: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(as_text(v))
        except TypeError as e:
            raise TypeError(f"{where.format(i)}: {e}") from None  # says which record is bad
    return out


def _stored_without_prompt(reference: str, reference_n: int, candidates: list, candidate_n: list,
                           wrapper: str) -> int:
    """Tokens of a group as stored, less its two prompts: BOS, the reference, <|reward|>, the
    "\\n"s, every candidate and a reward token each. Candidates that all write their "\\n" share
    it in the prefix; otherwise the prefix ends at the prompt and each writes its own."""
    newlines = sum(1 for c in candidates if _sep(wrapper, c))
    if newlines == len(candidates):
        newlines = 1
    return 2 + len(_sep(wrapper, reference)) + reference_n + newlines + sum(candidate_n) + len(candidates)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _side_ids_whole(tokenizer: Tokenizer, prompts: list, responses: list, wrappers: list,
                    sides: list) -> list:
    """The content ids of each side (g, r, after): prompt g then response r, its whole text
    tokenized, `after` the special token (candidate sides); each as a list of one array."""
    out = [None] * len(sides)
    for after in (False, True):
        at = [i for i, side in enumerate(sides) if side[2] == after]
        texts = [_side(prompts[sides[i][0]], responses[sides[i][1]], wrappers[sides[i][0]]) for i in at]
        for i, ids in zip(at, tokenizer.encode_batch(texts, after_special=after) if at else []):
            out[i] = [ids]
    return out


# The windows of _side_ids_windowed. A window's ids must equal a piece's own ids for
# _SEAM_CHECK tokens beyond the _SEAM_REACH tokens next to the prompt/response junction, whose
# merges may change a few tokens on either side of it.
_SEAM_CHECK = 16
_SEAM_REACH = 16
_LONE_SPACE = re.compile(r"(?<=\S) (?=\S)")


def _cuts(tokenizer: Tokenizer, texts: list, ids: list, tail: bool) -> list:
    """Per text, where a window may cut it (None: nowhere): its last (`tail`: a prompt) or first
    (a response) 1.5 _SEAM_CHECK + _SEAM_REACH tokens are left to the window. The cut is put where
    those tokens of the text's own ids (ids[i]; None: no cut) decode to its end (start), a token
    boundary. At the end, their text is what the tokens from one before them decode to less what
    that one decodes to: a decoder may drop the leading space of a text's first token (a
    SentencePiece marker), never of a later one. Where decoding does not give back the text (a
    normalizer, a character split over tokens), the cut is put before a lone space between two
    words at about that many tokens' worth of characters, where word-level pre-tokenizers split.
    A guess either way: _side_ids_windowed checks it."""
    n = 3 * (_SEAM_CHECK + _SEAM_REACH) // 2
    at = [i for i, x in enumerate(ids) if x is not None and len(x) > n + 1]
    if tail:
        decoded = tokenizer.decode_batch([x for i in at for x in (ids[i][-n - 1:], ids[i][-n - 1:-n])]) if at else []
        edges = [(whole, len(whole) - len(first)) for whole, first in zip(decoded[::2], decoded[1::2])]
    else:
        edges = [(edge, len(edge)) for edge in (tokenizer.decode_batch([ids[i][:n] for i in at]) if at else [])]
    out = [None] * len(texts)
    for i, (edge, size) in zip(at, edges):
        text = texts[i]
        if 0 < size < len(text) and (text.endswith(edge) if tail else text.startswith(edge)):
            out[i] = len(text) - size if tail else size
            continue
        d = -(-n * len(text) // len(ids[i]))  # ceil: characters a token on average, n tokens
        lo, hi = (max(1, len(text) - 2 * d), len(text) - d) if tail else (d, min(2 * d, len(text) - 1))
        if lo <= hi:
            spaces = [m.start() for m in _LONE_SPACE.finditer(text, lo, hi + 2) if m.start() <= hi]
            out[i] = (spaces[-1] if tail else spaces[0]) if spaces else (hi if tail else lo)
    return out


def _ends_with(ids: np.ndarray, end: np.ndarray) -> bool:
    return len(end) <= len(ids) and np.array_equal(ids[len(ids) - len(end):], end)


def _side_ids_windowed(tokenizer: Tokenizer, prompts: list, prompt_n: list, prompt_known: list,
                       responses: list, response_n: list, response_known: list, wrappers: list,
                       sides: list) -> list:
    """`_side_ids_whole`'s ids, each side tokenized as a short window around the junction of its
    prompt and response, the rest taken from the pieces' own ids (each as a list of arrays).

    A side is tokenized whole because a tokenizer may merge across the junction (a BPE's "?\\n"
    + "the"), so the pieces' ids are not the side's. But what the junction changes lies near it:
    the window is the prompt's last characters from a cut c and the response's first up to a cut e,
    and the side's ids are the prompt's own ids before c, the window's, and the response's own ids
    after e. A cut is made only where it splits its piece's own ids: the ids of the prompt's
    characters from c must be the last ids of the whole prompt (`prompt_known`: the first
    encoding's ids of a prompt that kept all its text; None: tokenized here), those of the
    response's characters to e the first ids of the whole response (`response_known`; None: a
    response the rule cut, whose window reaches its end), so that what lies beyond a cut changes
    no token beside it. The window's ids must then be the pieces' own beyond the _SEAM_REACH
    tokens next to the junction, at least _SEAM_CHECK of them on each side, so that the
    junction's merges end before the cuts; a side whose window fails that is tokenized whole. A
    cut that fails is not made (a SentencePiece normalizer that marks the start of every text it
    is given fails every prompt cut: such a window starts with the prompt). The checks are of the
    ids themselves, so a cut at the wrong place fails them; that a change ends within _SEAM_REACH
    tokens of its cause is the premise (a merge joins neighbours), that of `edge_offsets_batch`
    too. tests/polar/test_format_windows.py compares the ids with the whole sides' on fuzzed
    junctions, with byte-level BPEs, SentencePiece-style tokenizers and the byte tokenizer."""
    # the prompts' ids not known yet (those the budget cut)
    lack = [g for g, known in enumerate(prompt_known) if known is None]
    plain = list(prompt_known)
    for g, ids in zip(lack, tokenizer.encode_batch([prompts[g] for g in lack]) if lack else []):
        plain[g] = ids
    c_at = _cuts(tokenizer, prompts, plain, True)
    e_at = _cuts(tokenizer, responses, response_known, False)
    # the prompts' last characters from c, the responses' first to e
    cut_p = [g for g, c in enumerate(c_at) if c is not None]
    cut_r = [r for r, e in enumerate(e_at) if e is not None]
    texts = [prompts[g][c_at[g]:] for g in cut_p] + [responses[r][:e_at[r]] for r in cut_r]
    got = tokenizer.encode_batch(texts) if texts else []
    want = _SEAM_CHECK + _SEAM_REACH  # the own ids a cut must leave to the window
    # seams[after][g] = (c, the prompt's ids before c (arrays), its own ids from c); None: the window starts at 0
    seams = ([None] * len(prompts), [None] * len(prompts))
    for g, own in zip(cut_p, got):
        if want <= len(own) < len(plain[g]) and _ends_with(plain[g], own):
            seams[False][g] = (c_at[g], [plain[g][:len(plain[g]) - len(own)]], own)
    # seam_r[r] = (e, the response's own ids to e, its ids after e); None: the window ends the side
    seam_r = [None] * len(responses)
    for r, own in zip(cut_r, got[len(cut_p):]):
        known = response_known[r]
        if want <= len(own) < len(known) and np.array_equal(known[:len(own)], own):
            seam_r[r] = (e_at[r], own, known[len(own):])
    # After the special token (candidate sides) a prompt may be tokenized otherwise, but only near
    # its start (a SentencePiece marker put on a text's first word only): its first characters, to
    # a cut c2 of the plain ids, are tokenized both ways, and the two must agree on their last
    # _SEAM_CHECK tokens; the plain ids from c2 to c follow.
    cut_a = sorted({g for g, _, after in sides if after and seams[False][g] is not None})
    c2_at = _cuts(tokenizer, [prompts[g] for g in cut_a], [plain[g] for g in cut_a], False)
    head_a = [(g, c2) for g, c2 in zip(cut_a, c2_at) if c2 is not None and c2 <= c_at[g]]
    heads = [prompts[g][:c2] for g, c2 in head_a]
    got = (tokenizer.encode_batch(heads), tokenizer.encode_batch(heads, after_special=True)) if heads else ([], [])
    for (g, _), head, head_after in zip(head_a, *got):
        c, before, own = seams[False][g]
        if _SEAM_CHECK <= min(len(head), len(head_after)) and len(head) <= len(before[0]) and \
                np.array_equal(before[0][:len(head)], head) and _ends_with(head_after, head[-_SEAM_CHECK:]):
            seams[True][g] = (c, [head_after, before[0][len(head):]], own)
    # elsewhere the whole prompt and its characters from c, tokenized after the special token
    rest = [g for g in cut_a if seams[True][g] is None]
    got = tokenizer.encode_batch([prompts[g] for g in rest] + [prompts[g][c_at[g]:] for g in rest],
                                 after_special=True) if rest else []
    for g, whole, own in zip(rest, got, got[len(rest):]):
        if want <= len(own) < len(whole) and _ends_with(whole, own):
            seams[True][g] = (c_at[g], [whole[:len(whole) - len(own)]], own)

    out, redo = [None] * len(sides), []
    for after in (False, True):
        at = [i for i, side in enumerate(sides) if side[2] == after]
        texts = []
        for i in at:
            g, r, _ = sides[i]
            s, sr = seams[after][g], seam_r[r]
            texts.append(_side(prompts[g][s[0]:] if s else prompts[g], responses[r][:sr[0]] if sr else responses[r],
                               wrappers[g]))
        for i, window in zip(at, tokenizer.encode_batch(texts, after_special=after) if at else []):
            ids = _splice(window, seams[after][sides[i][0]], seam_r[sides[i][1]])
            if ids is None:
                redo.append(i)
            else:
                out[i] = ids
    for i, ids in zip(redo, _side_ids_whole(tokenizer, prompts, responses, wrappers, [sides[i] for i in redo])):
        out[i] = ids
    return out


def _splice(window: np.ndarray, seam: Optional[tuple], seam_r: Optional[tuple]) -> Optional[list]:
    """The prompt's ids before its cut, the window's and the response's after its cut (a list of
    arrays, joined once with the special ids), where the window holds the pieces' own ids beyond
    the junction's reach on both sides; else None."""
    # the window's first ids must be the prompt's own, its last the response's
    first = len(seam[2]) - _SEAM_REACH if seam else 0
    last = len(seam_r[1]) - _SEAM_REACH if seam_r else 0
    if len(window) < first + last:  # the two overlap: the junction reached past a cut
        return None
    if seam and not np.array_equal(window[:first], seam[2][:first]):
        return None
    if seam_r and not np.array_equal(window[len(window) - last:], seam_r[1][len(seam_r[1]) - last:]):
        return None
    return [*(seam[1] if seam else []), window, *([seam_r[2]] if seam_r else [])]


def encode_groups(tokenizer: Tokenizer, prompts: Sequence[Text], references: Sequence[Text],
                  candidates: Sequence[Sequence[Text]], wrapper: Union[str, Sequence[str]] = "sft",
                  max_length: int = 16384, max_response: int = 4096,
                  group_capacity: int = 0) -> list[EncodedGroup]:
    """`encode_group` for many groups at once (group g: prompts[g], references[g], candidates[g],
    and wrapper[g] if a list is given), with a few batched tokenizer calls in all.
    `group_capacity` (tokens, 0: none): the prompt is cut further so that each group as stored
    fits it (module docstring)."""
    # The byte tokenizer's ids are the text's bytes: a side tokenized whole costs a copy, which
    # the windows' checks and splicing cost too (benchmarks/encode_groups.py).
    return _encode_groups(tokenizer, prompts, references, candidates, wrapper, max_length, max_response,
                          group_capacity, whole_sides=isinstance(tokenizer, ByteTokenizer))


def _encode_groups(tokenizer: Tokenizer, prompts: Sequence[Text], references: Sequence[Text],
                   candidates: Sequence[Sequence[Text]], wrapper: Union[str, Sequence[str]],
                   max_length: int, max_response: int, group_capacity: int,
                   whole_sides: bool) -> list[EncodedGroup]:
    """encode_groups; `whole_sides` tokenizes every side whole (`_side_ids_whole`), else in
    windows (`_side_ids_windowed`), which must give the same ids (tests/polar/test_format_windows.py)."""
    n_groups = len(prompts)
    if not (len(references) == len(candidates) == n_groups):
        raise ValueError(f"encode_groups: {n_groups} prompts, {len(references)} references and "
                         f"{len(candidates)} candidate lists; they must match")
    wrappers = [wrapper] * n_groups if isinstance(wrapper, str) else list(wrapper)
    if len(wrappers) != n_groups:
        raise ValueError(f"encode_groups: {len(wrappers)} wrappers for {n_groups} groups")
    for w in wrappers:
        _check_wrapper(w)
    max_length = _check_count("max_length", max_length)
    max_response = _check_count("max_response", max_response)
    group_capacity = _check_count("group_capacity", group_capacity)

    n_cands = []
    for g, cands in enumerate(candidates):
        if isinstance(cands, (str, dict)) or not isinstance(cands, (list, tuple)):
            raise TypeError(f"group {g}: candidates must be a list, got {type(cands).__name__}")
        if not cands:
            raise ValueError(f"group {g}: encode_group needs at least one candidate")
        n_cands.append(len(cands))
    # Every piece as text, in one flat list: prompts, then references, then all candidates.
    pieces = _texts(prompts, "prompt {}") + _texts(references, "reference {}")
    for g, cands in enumerate(candidates):
        pieces += _texts(cands, f"group {g}: candidate {{}}")
    ids = tokenizer.encode_batch(pieces)
    counts = [len(x) for x in ids]

    # Responses (references, then candidates) keep their head, ids[:max_response] of BOS + text:
    # max_response - 1 text tokens. Only the pieces over the limit need their token spans.
    responses, response_n = pieces[n_groups:], counts[n_groups:]
    text_limit = max(0, max_response - PIECE_BOS)
    over = [n > text_limit for n in response_n]
    _cut(tokenizer, responses, response_n, ids[n_groups:], [min(n, text_limit) for n in response_n],
         tail=False)
    response_len = [response_length(n, max_response) for n in response_n]
    # A prompt keeps at most prompt_budget(max_length, 0, 0) tokens, so only that many of its
    # last ids (and one more) are ever needed: the batch's ids are freed here.
    window = prompt_budget(max_length, 0, 0) + 1
    prompt_ids = [x[-window:].copy() for x in ids[:n_groups]]
    # The sides' windows reuse the ids of the responses that keep their whole text.
    response_known = [None if whole_sides or o else x for x, o in zip(ids[n_groups:], over)]
    del ids
    # Prompts keep their tail, budgeted with the tokens the responses kept.
    prompts_kept, prompt_n = pieces[:n_groups], counts[:n_groups]
    keep, cut_to_fit, responses_cut, prompt_cut, c0 = [], [], [], [], n_groups
    for g in range(n_groups):
        cand, cand_n = responses[c0:c0 + n_cands[g]], response_n[c0:c0 + n_cands[g]]
        responses_cut.append(over[g] + sum(over[c0:c0 + n_cands[g]]))
        # the training code's min over chosen and rejected, over all K: the longest candidate's
        longest = max(response_len[c0:c0 + n_cands[g]])
        rule = min(prompt_n[g], prompt_budget(max_length, response_len[g], longest))
        c0 += n_cands[g]
        prompt_cut.append(rule < prompt_n[g])
        fit = rule
        if group_capacity:
            room = group_capacity - _stored_without_prompt(responses[g], response_n[g], cand, cand_n,
                                                           wrappers[g])
            fit = min(rule, max(0, room // 2))
        keep.append(fit)
        cut_to_fit.append(rule - fit)
    # the ids of a prompt that keeps its whole text are all there (it is shorter than the window)
    prompt_known = [None if whole_sides or n > k else x for x, n, k in zip(prompt_ids, prompt_n, keep)]
    _cut(tokenizer, prompts_kept, prompt_n, prompt_ids, keep, tail=True)
    del prompt_ids

    # Training form: BOS, the reference side's content ids, <|reward|>, the candidate side's
    # content ids, the reward token: the special ids are placed here, never read from a text, so
    # a literal typed in a text stays text. For a text without literals this equals the server's
    # ids of the serving string (the tokenizer splits at specials and checks that at load).
    sides, c0 = [], n_groups
    for g in range(n_groups):
        sides += [(g, g, False)] + [(g, r, True) for r in range(c0, c0 + n_cands[g])]
        c0 += n_cands[g]
    if whole_sides:
        side_ids = _side_ids_whole(tokenizer, prompts_kept, responses, wrappers, sides)
    else:
        side_ids = _side_ids_windowed(tokenizer, prompts_kept, prompt_n, prompt_known, responses, response_n,
                                      response_known, wrappers, sides)
    del prompt_known, response_known
    # each side's ids as a list of arrays, joined below
    ref_ids = [side_ids[i] for i, (_, _, after) in enumerate(sides) if not after]
    out_ids = [side_ids[i] for i, (_, _, after) in enumerate(sides) if after]
    del side_ids
    bos = np.array([tokenizer.bos_id], dtype=np.int32)
    sep = np.array([tokenizer.reward_sep_id], dtype=np.int32)
    reward = np.array([tokenizer.reward_token_id], dtype=np.int32)
    fulls, c0 = [], 0
    for g in range(n_groups):
        fulls += [np.concatenate([bos, *ref_ids[g], sep, *parts, reward]) for parts in out_ids[c0:c0 + n_cands[g]]]
        c0 += n_cands[g]
    groups, c0 = [], 0
    for g in range(n_groups):
        own = fulls[c0:c0 + n_cands[g]]
        c0 += n_cands[g]
        n = _shared_prefix_length(own)
        # Copies, so that the full arrays are freed and a group holds its prefix once.
        groups.append(EncodedGroup(prefix=own[0][:n].copy(), candidates=[f[n:].copy() for f in own],
                                   prompt_cut_to_fit=cut_to_fit[g], responses_cut=responses_cut[g],
                                   prompt_cut=prompt_cut[g]))
    return groups


def encode_group(tokenizer: Tokenizer, prompt: Text, reference: Text, candidates: Sequence[Text],
                 wrapper: str = "sft", max_length: int = 16384, max_response: int = 4096,
                 group_capacity: int = 0) -> EncodedGroup:
    """Tokenize and truncate one reference with its candidates (module docstring for the rules)."""
    return encode_groups(tokenizer, [prompt], [reference], [candidates], wrapper,
                         max_length, max_response, group_capacity)[0]
