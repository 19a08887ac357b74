"""Tokenizers for POLAR inputs: the interface, a dependency-free byte tokenizer, and a wrapper of
the HF `tokenizers` library loaded from a local directory.

`load_tokenizer(spec)` picks one: "byte", or the path of a directory holding `tokenizer.json`.

The byte tokenizer maps each UTF-8 byte to the id equal to its value (0..255, no offset, so a
dump of ids below 256 reads as the raw bytes) and puts the four special tokens right after:

    256 BOS    257 PAD = EOS    258 <|reward|>    259 [UNUSED_TOKEN_130]

Two readings of a text; text is content, never structure:

- `encode` / `encode_batch` / `offsets_batch` read a text as *content*: a special-token literal
  typed in it ("<|reward|>", "[UNUSED_TOKEN_130]", "<s>", ...) is tokenized as ordinary text, never
  as the special token. Training builds its inputs from content ids and inserts the special ids
  where the format puts them (polar/format.py), so no user text can forge structure.
- `encode_served` / `encode_served_batch` read a text as an inference server does (what
  `tokenizer(text)["input_ids"]` gives in transformers): BOS, then the ids with every special-token
  literal read as its special token. The official client's rules are built on it
  (polar/client_format.py). For the byte tokenizer the literals are those of its tokenizer.json
  export (polar/convert/byte_tokenizer.py): the two reward strings, "<|polar_bos|>" and
  "<|polar_pad|>".

For a string whose only literals are the structural ones, the two agree: serving sends
"...<|reward|>...[UNUSED_TOKEN_130]" and the server's ids equal the training form (content ids
with the special ids inserted). HFTokenizer checks that at load time (`check_structure`).

Offsets (`offsets_batch`, of the content ids) are *character* spans [start, end) in the str,
as the HF library gives them. A byte token is part of a character: every byte of a multi-byte character gets that
character's whole span, as the HF byte-level BPE does for a character split over several tokens.
So a text cut at a token's span never falls inside a character (polar/format.py relies on this).
The spans are those of the tokens' own text: an HF post-processor's offset trimming (which moves a
token's start past its leading space) is not applied. `edge_offsets_batch` gives the spans of a
text's first or last tokens only, from a slice of the text where that is exact: truncation needs
no more, and the spans of a whole long text cost tens of bytes per character.
"""
from __future__ import annotations

import abc
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

REWARD_SEP_TEXT = "<|reward|>"
REWARD_TOKEN_TEXT = "[UNUSED_TOKEN_130]"
# ByteTokenizer's BOS and PAD as text: the strings its tokenizer.json export gives them, which
# transformers, vLLM and SGLang read as those tokens wherever a text holds them.
BYTE_BOS_TEXT = "<|polar_bos|>"
BYTE_PAD_TEXT = "<|polar_pad|>"

# The released POLAR models (internlm/POLAR-1_8B, internlm/POLAR-7B) use the InternLM2 vocabulary:
# <s> = 1, pad = eos = </s> = 2. These are HFTokenizer's defaults; the ids are looked up by string,
# never assumed.
INTERNLM2_BOS_TEXT = "<s>"
INTERNLM2_PAD_TEXT = "</s>"


class Tokenizer(abc.ABC):
    """What the POLAR input builders need from a tokenizer (module docstring: content vs served).

    `encode` adds no special tokens of its own (no BOS) and reads special-token literals as text.
    """

    vocab_size: int
    bos_id: int
    pad_id: int
    reward_sep_id: int
    reward_token_id: int
    reward_sep_text: str = REWARD_SEP_TEXT
    reward_token_text: str = REWARD_TOKEN_TEXT

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text` as content (special-token literals are text), nothing added."""

    def encode_batch(self, texts: Sequence[str], after_special: bool = False) -> list[np.ndarray]:
        """`encode` of each text. `after_special`: the texts follow a special token in the input,
        which some tokenizers treat differently from a text's start (a SentencePiece-style
        "prepend the word marker to the first piece only"); the ids are then those the server
        gives the text at that place."""
        return [self.encode(t) for t in _check_texts(texts)]

    @abc.abstractmethod
    def encode_served_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, int32 [BOS] + its ids as a server tokenizes it: special-token literals map to
        their special ids (transformers' `tokenizer(text)["input_ids"]`)."""

    def encode_served(self, text: str) -> np.ndarray:
        return self.encode_served_batch([_check_str(text)])[0]

    @abc.abstractmethod
    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, an int64 array [n_tokens, 2]: the character span [start, end) in the text of
        each token of `encode(text)`. Tokens that share a character share its span."""

    def edge_offsets_batch(self, texts: Sequence[str], edges: Sequence[np.ndarray],
                           tail: bool = False) -> list[np.ndarray]:
        """Per text, the rows of `offsets_batch` for its first len(edges[i]) tokens (its last,
        with `tail`), edges[i] being those tokens' ids in `encode(texts[i])`. Truncation needs no
        more than that; a tokenizer may compute it from a slice of the text where the result is
        the same (this default reads the whole text)."""
        out = []
        for text, edge, spans in zip(texts, edges, self.offsets_batch(texts)):
            if len(spans) < len(edge):
                raise RuntimeError(f"{type(self).__name__}: offsets_batch gives {len(spans)} tokens "
                                   f"where encode gives at least {len(edge)} for {text!r:.60}")
            out.append(spans[len(spans) - len(edge):] if tail else spans[:len(edge)])
        return out

    @abc.abstractmethod
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; the reward tokens come back as their literal strings, BOS and PAD as
        nothing. `skip_special_tokens=True` drops every special token (transformers' meaning): the
        official client turns its truncated pieces back into text that way. Bytes that do not form
        whole UTF-8 characters become U+FFFD."""

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def check_structure(self) -> None:
        """The server's ids of a string whose only literals are structural must equal the
        training form: content ids of the pieces with the special ids between them."""
        first, after = "a b \n", " c d\n"  # whitespace on both sides of the literal
        served = self.encode_served(first + self.reward_sep_text + after
                                    + self.reward_token_text).tolist()
        trained = ([self.bos_id] + self.encode_batch([first])[0].tolist() + [self.reward_sep_id]
                   + self.encode_batch([after], after_special=True)[0].tolist()
                   + [self.reward_token_id])
        if served != trained:
            raise ValueError(f"{getattr(self, 'path', type(self).__name__)}: a server would "
                             f"tokenize the serving string differently from the training form "
                             f"({served} served, {trained} in training); check the reward "
                             f"tokens' added-token settings in the file")


def _check_texts(texts, what: str = "encode_batch") -> Sequence[str]:
    # A bare string is a sequence of characters: catching it here saves a confusing
    # per-character result.
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what} expects a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}: item {i} is {type(t).__name__}, expected str")
    return texts


def _check_str(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode expects str, got {type(text).__name__}")
    return text


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"decode expects a 1-D sequence of int ids, got dtype {arr.dtype}"
                        f" with shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"decode: ids must lie in [0, {vocab_size}), "
                         f"got range [{arr.min()}, {arr.max()}]")
    return arr


def _utf8_char_index(data: np.ndarray) -> np.ndarray:
    """For each byte of valid UTF-8, the index of the character it belongs to."""
    # Continuation bytes are 10xxxxxx; every other byte starts a character.
    return np.cumsum((data & 0xC0) != 0x80, dtype=np.int64) - 1


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, specials at 256..259 (see the module docstring). The served
    reading maps the literals of the tokenizer.json export: the two reward strings and
    BYTE_BOS_TEXT / BYTE_PAD_TEXT. A server of the export reads those as BOS and PAD wherever a
    text holds them: a tokenizer.json matches every added token in text, and transformers makes
    the tokens it names bos_token and pad_token added tokens even where the file does not, so
    only this side could agree with the other; "<s>" stays bytes in both readings."""

    bos_id = 256
    pad_id = 257
    reward_sep_id = 258
    reward_token_id = 259
    vocab_size = 260

    def __init__(self) -> None:
        self._literal_to_id = {
            REWARD_SEP_TEXT.encode(): self.reward_sep_id,
            REWARD_TOKEN_TEXT.encode(): self.reward_token_id,
            BYTE_BOS_TEXT.encode(): self.bos_id,
            BYTE_PAD_TEXT.encode(): self.pad_id,
        }
        self._literal_re = re.compile(b"|".join(re.escape(k) for k in self._literal_to_id))
        # Control tokens are not text: they decode to nothing rather than to a made-up string
        # that would re-encode as bytes.
        self._special_text = {
            self.bos_id: b"", self.pad_id: b"",
            self.reward_sep_id: REWARD_SEP_TEXT.encode(),
            self.reward_token_id: REWARD_TOKEN_TEXT.encode(),
        }

    def _encode_flat(self, texts: Sequence[str], with_offsets: bool, literals: bool):
        """The whole batch in one pass: ids and (if asked) character spans, split per text.
        `literals`: read the special-token literals as their ids (the served reading)."""
        blobs = [t.encode("utf-8") for t in texts]
        n_bytes = np.array([len(b) for b in blobs], dtype=np.int64)
        if not literals:
            # Content: the ids are the bytes, one per byte; a plain split, no regex.
            raw = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            ids = raw.astype(np.int32)
            bounds = np.concatenate([[0], np.cumsum(n_bytes)]).tolist()
            out_ids = [ids[i:j] for i, j in zip(bounds[:-1], bounds[1:])]
            if not with_offsets:
                return out_ids, None
            n_chars = np.array([len(t) for t in texts], dtype=np.int64)
            base = np.cumsum(n_chars) - n_chars
            local = _utf8_char_index(raw) - np.repeat(base, n_bytes)
            spans = np.stack([local, local + 1], axis=1)
            return out_ids, [spans[i:j] for i, j in zip(bounds[:-1], bounds[1:])]
        # NUL between the texts: no literal contains it, so no match spans two texts.
        joined = b"\0".join(blobs)
        raw = np.frombuffer(joined, dtype=np.uint8)
        ids = raw.astype(np.int32)
        keep = np.ones(len(raw), dtype=bool)
        starts = np.cumsum(n_bytes + 1) - (n_bytes + 1)
        keep[starts[1:] - 1] = False
        # Every literal contains "<|" or "[U": the cheap test skips the regex for most batches.
        if b"<|" in joined or b"[U" in joined:
            for m in self._literal_re.finditer(joined):
                s, e = m.span()
                ids[s] = self._literal_to_id[m.group()]
                keep[s + 1:e] = False
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        bounds = np.concatenate([[0], np.cumsum(kept_before[starts + n_bytes]
                                                - kept_before[starts])]).tolist()
        # Slicing beats np.split, which costs a few microseconds per piece.
        ids = ids[keep]
        return [ids[i:j] for i, j in zip(bounds[:-1], bounds[1:])], None

    def encode(self, text: str) -> np.ndarray:
        return self._encode_flat([_check_str(text)], False, False)[0][0]

    def encode_batch(self, texts: Sequence[str], after_special: bool = False) -> list[np.ndarray]:
        texts = _check_texts(texts)
        return self._encode_flat(texts, False, False)[0] if texts else []

    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = _check_texts(texts, "offsets_batch")
        return self._encode_flat(texts, True, False)[1] if texts else []

    def edge_offsets_batch(self, texts: Sequence[str], edges: Sequence[np.ndarray],
                           tail: bool = False) -> list[np.ndarray]:
        # A character is at least one byte, so the first (last) n tokens lie within the first
        # (last) n characters, and a byte's span depends on its own character only: the spans
        # of that slice are exact.
        texts = _check_texts(texts, "edge_offsets_batch")
        if not texts:
            return []
        n = [len(e) for e in edges]
        starts = [max(0, len(t) - k) if tail else 0 for t, k in zip(texts, n)]
        sliced = [t[s:] if tail else t[:k] for t, s, k in zip(texts, starts, n)]
        spans = self._encode_flat(sliced, True, False)[1]
        return [sp[len(sp) - k:] + s if tail else sp[:k] for sp, s, k in zip(spans, starts, n)]

    def encode_served_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = _check_texts(texts, "encode_served_batch")
        if not texts:
            return []
        bos = np.array([self.bos_id], dtype=np.int32)
        return [np.concatenate([bos, ids]) for ids in self._encode_flat(texts, False, True)[0]]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        arr = _check_ids(ids, self.vocab_size)
        special = arr >= 256
        if not special.any():
            return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        if skip_special_tokens:
            # The bytes on both sides of a dropped special join up, as in the HF library.
            return arr[~special].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        # Only the (few) special positions are handled in Python; byte runs go through numpy.
        pieces, start = [], 0
        for pos in np.flatnonzero(special):
            pieces.append(arr[start:pos].astype(np.uint8).tobytes())
            pieces.append(self._special_text[int(arr[pos])])
            start = pos + 1
        pieces.append(arr[start:].astype(np.uint8).tobytes())
        return b"".join(pieces).decode("utf-8", errors="replace")


def _tokenizer_file(path) -> Path:
    p = Path(path)
    if p.is_dir():
        f = p / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer directory {str(p)!r} has no tokenizer.json (a "
                                    "tokenizer saved by the HF `tokenizers` library is expected)")
        return f
    if p.is_file():
        if p.name != "tokenizer.json":
            # A run records and copies the tokenizer's directory (its data's metadata, the checkpoints'
            # tokenizer/), where another file's ids would be read back as tokenizer.json's.
            raise ValueError(f"tokenizer {str(p)!r}: a tokenizer file must be named tokenizer.json (runs "
                             "record its directory); put it in a directory of its own as tokenizer.json")
        return p
    raise FileNotFoundError(f"tokenizer {str(p)!r}: no such directory or file (expected 'byte' or "
                            "a local directory holding tokenizer.json)")


def _never_prepend(node) -> bool:
    """In place: every Metaspace pre-tokenizer in a tokenizer.json tree that prepends its word
    marker to the first piece only gets "never" instead; True when one was changed."""
    changed = False
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
            changed = True
        for v in node.values():
            changed |= _never_prepend(v)
    elif isinstance(node, list):
        for v in node:
            changed |= _never_prepend(v)
    return changed


class HFTokenizer(Tokenizer):
    """A `tokenizers` library tokenizer read from a local `tokenizer.json` (never from a hub).

    The four special ids are looked up by their strings: by default the InternLM2 ones of the
    released POLAR models (module constants), other strings by argument. BOS and PAD must be in
    the vocabulary. The two reward strings are registered as special added tokens (keeping
    their id when the vocabulary already has them, appended to it otherwise), so that a server
    reads their literals as one id each.

    Two library instances: the served one reads special-token literals as their ids (what a
    server does); the content one (`encode_special_tokens`) tokenizes them as text. The server
    splits a string at its special tokens and tokenizes the pieces between them on their own,
    so the training form (content ids of each piece, special ids between) equals the server's
    ids of the structural string; a SentencePiece-style Metaspace that marks only the string's
    first piece is the one place where a piece's position matters, and a third instance that
    never marks serves the pieces after a special token. The agreement is checked at load time.

    Truncation and padding stored in the file are switched off: POLAR truncates per piece
    (polar/format.py) and a silent cut here would break that.
    """

    def __init__(self, path, *, bos: str = INTERNLM2_BOS_TEXT, pad: str = INTERNLM2_PAD_TEXT,
                 reward_sep: str = REWARD_SEP_TEXT, reward_token: str = REWARD_TOKEN_TEXT) -> None:
        import json

        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Lib

        file = _tokenizer_file(path)
        try:
            tok = _Lib.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"{file}: not a tokenizer.json the `tokenizers` library can read "
                             f"({e})") from e
        tok.no_truncation()
        tok.no_padding()
        self.path = file

        def lookup(text: str, arg: str) -> int:
            tid = tok.token_to_id(text)
            if tid is None:
                # load_tokenizer's callers (the CLI, a config's tokenizer path) cannot pass arg=: they
                # name the token in polar_tokenizer.json, whose value this may be
                default = {"bos": INTERNLM2_BOS_TEXT, "pad": INTERNLM2_PAD_TEXT}.get(arg) == text
                note = " (the default: InternLM2's, which the released POLAR models use)" if default else ""
                raise ValueError(f"{file}: the vocabulary has no {text!r} for the {arg} token{note}; name the "
                                 f"tokenizer's own as {{\"{arg}\": ...}} in {file.parent / POLAR_TOKENIZER_FILE} "
                                 f"(in Python: {arg}=)")
            return tid

        self.bos_id, self.pad_id = lookup(bos, "bos"), lookup(pad, "pad")
        # normalized=False: matched on the raw text, as the server sees it; no strip options,
        # which would swallow whitespace before the literal when serving but not in training.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False,
                                           rstrip=False, single_word=False)
                                for t in (reward_sep, reward_token)])
        self.reward_sep_id = lookup(reward_sep, "reward_sep")
        self.reward_token_id = lookup(reward_token, "reward_token")
        self.reward_sep_text, self.reward_token_text = reward_sep, reward_token
        ids = {"bos": self.bos_id, "pad": self.pad_id, "reward_sep": self.reward_sep_id,
               "reward_token": self.reward_token_id}
        if self.reward_sep_id == self.reward_token_id or \
                {self.reward_sep_id, self.reward_token_id} & {self.bos_id, self.pad_id}:
            raise ValueError(f"{file}: the reward tokens must have their own ids, got {ids}")
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True),
                              max(tok.get_vocab(with_added_tokens=True).values()) + 1)

        tok.encode_special_tokens = False  # the server's reading: literals are special tokens
        self._served = tok
        state = tok.to_str()
        self._tok = _Lib.from_str(state)
        self._tok.encode_special_tokens = True  # content: a literal is text
        # Offsets without the post-processor: with no special tokens added it changes no id, but a
        # ByteLevel/Roberta one with trim_offsets moves a token's start past its leading space,
        # and a head cut there would keep that space, which re-tokenizes as one token too many.
        tree = json.loads(state)
        tree["post_processor"] = None
        self._tok_offsets = _Lib.from_str(json.dumps(tree))
        self._tok_offsets.encode_special_tokens = True
        tree = json.loads(state)
        if _never_prepend(tree):
            self._tok_after = _Lib.from_str(json.dumps(tree))
            self._tok_after.encode_special_tokens = True
        else:
            self._tok_after = self._tok
        self.check_structure()
        self._check_file_agrees(_Lib.from_file(str(file)))

    def _check_file_agrees(self, raw) -> None:
        """A server loads the file as it is: when the file already has both reward tokens, its own
        added-token settings (strip options, normalization) must read the serving string as we do."""
        added = {t.content for t in raw.get_added_tokens_decoder().values()}
        if not {self.reward_sep_text, self.reward_token_text} <= added:
            return  # registered here only: a server needs a file that has them (polar convert)
        probe = f"a b \n{self.reward_sep_text} c d\n{self.reward_token_text}"
        raw.no_truncation()
        raw.no_padding()
        theirs = raw.encode(probe, add_special_tokens=False).ids
        ours = self.encode_served(probe).tolist()[1:]
        if theirs != ours:
            raise ValueError(f"{self.path}: the file's own settings of the reward tokens make a "
                             f"server read the serving string differently from the training form "
                             f"({theirs} vs {ours}); set lstrip, rstrip and normalized to false "
                             f"for {self.reward_sep_text!r} and {self.reward_token_text!r}")

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(_check_str(text), add_special_tokens=False).ids
        return np.array(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], after_special: bool = False) -> list[np.ndarray]:
        lib = self._tok_after if after_special else self._tok
        # The library's batch call runs in parallel in Rust; the fast variant skips the offsets.
        encs = lib.encode_batch_fast(list(_check_texts(texts)), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int32) for e in encs]

    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok_offsets.encode_batch(list(_check_texts(texts, "offsets_batch")),
                                              add_special_tokens=False)
        return [np.array(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs]

    def edge_offsets_batch(self, texts: Sequence[str], edges: Sequence[np.ndarray],
                           tail: bool = False) -> list[np.ndarray]:
        # A merge or a pre-tokenizer rule near the end of a slice may tokenize it otherwise than
        # the whole text does, but only there: a slice is taken generously, used when the tokens
        # wanted lie at least _EDGE_MARGIN tokens away from where it was cut and have the ids of
        # the whole text (then they cover the same characters); the whole text is read otherwise.
        texts = list(_check_texts(texts, "edge_offsets_batch"))
        out, todo = [None] * len(texts), list(range(len(texts)))
        for whole in (False, True):
            if not todo:
                break
            starts, sliced = [], []
            for i in todo:
                size = len(texts[i]) if whole else _EDGE_CHARS_PER_TOKEN * (len(edges[i]) + _EDGE_MARGIN)
                starts.append(max(0, len(texts[i]) - size) if tail else 0)
                sliced.append(texts[i][starts[-1]:starts[-1] + size])
            redo = []
            encs = self._tok_offsets.encode_batch(sliced, add_special_tokens=False)
            for i, start, piece, enc in zip(todo, starts, sliced, encs):
                k = len(edges[i])
                got = enc.ids[len(enc.ids) - k:] if tail else enc.ids[:k]
                if not np.array_equal(got, edges[i]) or (len(enc.ids) < k + _EDGE_MARGIN
                                                         and len(piece) < len(texts[i])):
                    if len(piece) == len(texts[i]):
                        raise RuntimeError(f"HFTokenizer: the offsets' tokenization of "
                                           f"{texts[i]!r:.60} disagrees with encode")
                    redo.append(i)
                    continue
                spans = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
                out[i] = spans[len(spans) - k:] + start if tail else spans[:k]
            todo = redo
        return out

    def encode_served_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # BOS by hand rather than by the file's post-processor, which may be missing or add more.
        encs = self._served.encode_batch_fast(list(_check_texts(texts, "encode_served_batch")),
                                              add_special_tokens=False)
        return [np.array([self.bos_id] + e.ids, dtype=np.int32) for e in encs]

    def _textual(self, arr: np.ndarray) -> list:
        # BOS and PAD never have text; the library skips the other specials itself when asked.
        return arr[(arr != self.bos_id) & (arr != self.pad_id)].tolist()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        arr = _check_ids(ids, self.vocab_size)
        return self._served.decode(self._textual(arr),
                                   skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        kept = [self._textual(_check_ids(ids, self.vocab_size)) for ids in batch]
        return self._served.decode_batch(kept, skip_special_tokens=skip_special_tokens)


# HFTokenizer.edge_offsets_batch: a slice of (tokens wanted + margin) * this many characters
# holds the tokens wanted for nearly any text (about 4 characters a token in English); a text
# with longer tokens is read whole.
_EDGE_CHARS_PER_TOKEN = 8
_EDGE_MARGIN = 64

POLAR_TOKENIZER_FILE = "polar_tokenizer.json"
_SETTINGS = ("bos", "pad", "reward_sep", "reward_token")


def _settings(directory: Path) -> dict:
    """The optional polar_tokenizer.json beside tokenizer.json: the four special tokens' strings."""
    import json

    f = directory / POLAR_TOKENIZER_FILE
    if not f.is_file():
        return {}
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{f}: must be a JSON object with keys {', '.join(_SETTINGS)}")
    unknown = sorted(set(obj) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"{f}: {unknown[0]}: unknown key (expected {', '.join(_SETTINGS)})")
    for k, v in obj.items():
        if not isinstance(v, str) or not v:
            raise ValueError(f"{f}: {k}: must be a non-empty token string, got {v!r:.60}")
    return obj


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" -> ByteTokenizer; a local directory holding tokenizer.json (or that tokenizer.json
    itself; a file of another name is refused) -> HFTokenizer. The special tokens are InternLM2's
    unless the directory holds a polar_tokenizer.json = {"bos": str, "pad": str, "reward_sep": str,
    "reward_token": str} (any subset; token strings), as `polar convert` writes. ("./byte" names a directory.)"""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer expects 'byte' or a directory path, got "
                        f"{type(spec).__name__}")
    if spec == "byte":
        return ByteTokenizer()
    file = _tokenizer_file(spec)
    return HFTokenizer(file, **_settings(file.parent))
