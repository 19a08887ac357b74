"""Tokenizers for POLAR inputs: the interface, a dependency-free byte tokenizer, and a wrapper of
the HF `tokenizers` library loaded from a local directory.

`load_tokenizer(spec)` picks one: "byte", or the path of a directory holding `tokenizer.json`.

The byte tokenizer maps each UTF-8 byte to the id equal to its value (0..255, no offset, so a
dump of ids below 256 reads as the raw bytes) and puts the four special tokens right after:

    256 BOS    257 PAD = EOS    258 <|reward|>    259 [UNUSED_TOKEN_130]

The two reward specials are also recognised as *literal text*: serving sends the string with
"[UNUSED_TOKEN_130]" at its end and lets the server tokenize it, while training appends the id;
both must give identical ids, or the server scores an input the model never saw in training. A
consequence: a response that happens to contain one of the literals is read as the special token.
The same holds for `HFTokenizer`, where both literals are special added tokens.

Offsets (`offsets_batch`) are *character* spans [start, end) in the str, as the HF library gives
them. A byte token is part of a character: every byte of a multi-byte character gets that
character's whole span, as the HF byte-level BPE does for a character split over several tokens.
So a text cut at a token's span never falls inside a character (polar/format.py relies on this).
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

# The released POLAR models (internlm/POLAR-1_8B, internlm/POLAR-7B) use the InternLM2 vocabulary:
# <s> = 1, pad = eos = </s> = 2. These are HFTokenizer's defaults; the ids are looked up by string,
# never assumed.
INTERNLM2_BOS_TEXT = "<s>"
INTERNLM2_PAD_TEXT = "</s>"


class Tokenizer(abc.ABC):
    """What the POLAR input builder needs from a tokenizer.

    `encode` adds no special tokens of its own (no BOS); the literal reward strings
    (`reward_sep_text`, `reward_token_text`) map to exactly one id each, wherever they appear.
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
        """int32 ids of `text`, the literal reward tokens mapped to their ids, nothing added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in _check_texts(texts)]

    @abc.abstractmethod
    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, an int64 array [n_tokens, 2]: the character span [start, end) in the text of
        each token of `encode(text)`. Tokens that share a character share its span."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids`; the reward tokens come back as their literal strings, BOS and PAD as
        nothing."""


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
    """UTF-8 bytes as ids 0..255, specials at 256..259 (see the module docstring)."""

    bos_id = 256
    pad_id = 257
    reward_sep_id = 258
    reward_token_id = 259
    vocab_size = 260

    def __init__(self) -> None:
        self._literal_to_id = {
            REWARD_SEP_TEXT.encode(): self.reward_sep_id,
            REWARD_TOKEN_TEXT.encode(): self.reward_token_id,
        }
        self._literal_re = re.compile(b"|".join(re.escape(k) for k in self._literal_to_id))
        # Control tokens are not text: they decode to nothing rather than to a made-up string
        # that would re-encode as bytes.
        self._special_text = {
            self.bos_id: b"", self.pad_id: b"",
            self.reward_sep_id: REWARD_SEP_TEXT.encode(),
            self.reward_token_id: REWARD_TOKEN_TEXT.encode(),
        }

    def _encode_flat(self, texts: Sequence[str], with_offsets: bool):
        """The whole batch in one pass: ids and (if asked) character spans, split per text."""
        blobs = [t.encode("utf-8") for t in texts]
        n_bytes = np.array([len(b) for b in blobs], dtype=np.int64)
        # NUL between the texts: no literal contains it, so no match spans two texts.
        joined = b"\0".join(blobs)
        raw = np.frombuffer(joined, dtype=np.uint8)
        ids = raw.astype(np.int32)
        keep = np.ones(len(raw), dtype=bool)
        starts = np.cumsum(n_bytes + 1) - (n_bytes + 1)
        keep[starts[1:] - 1] = False
        spans = None
        if with_offsets:
            # Character index in `joined`, made local by subtracting where each text starts
            # (its characters and separators before); every text starts on a character.
            n_chars = np.array([len(t) for t in texts], dtype=np.int64)
            base = np.cumsum(n_chars + 1) - (n_chars + 1)
            local = _utf8_char_index(raw) - np.repeat(base, n_bytes + 1)[:len(raw)]
            spans = np.stack([local, local + 1], axis=1)
        # Both literals contain "<|" or "[U": the cheap test skips the regex for most batches.
        if b"<|" in joined or b"[U" in joined:
            for m in self._literal_re.finditer(joined):
                s, e = m.span()
                ids[s] = self._literal_to_id[m.group()]
                keep[s + 1:e] = False
                if spans is not None:
                    spans[s, 1] = spans[s, 0] + (e - s)  # the literals are ASCII: bytes = chars
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        bounds = np.concatenate([[0], np.cumsum(kept_before[starts + n_bytes]
                                                - kept_before[starts])]).tolist()
        # Slicing beats np.split, which costs a few microseconds per piece.
        ids = ids[keep]
        out_ids = [ids[i:j] for i, j in zip(bounds[:-1], bounds[1:])]
        if spans is None:
            return out_ids, None
        spans = spans[keep]
        return out_ids, [spans[i:j] for i, j in zip(bounds[:-1], bounds[1:])]

    def encode(self, text: str) -> np.ndarray:
        return self._encode_flat([_check_str(text)], False)[0][0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = _check_texts(texts)
        return self._encode_flat(texts, False)[0] if texts else []

    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = _check_texts(texts, "offsets_batch")
        return self._encode_flat(texts, True)[1] if texts else []

    def decode(self, ids) -> str:
        arr = _check_ids(ids, self.vocab_size)
        special = arr >= 256
        if not special.any():
            return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
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
        return p
    raise FileNotFoundError(f"tokenizer {str(p)!r}: no such directory or file (expected 'byte' or "
                            "a local directory holding tokenizer.json)")


class HFTokenizer(Tokenizer):
    """A `tokenizers` library tokenizer read from a local `tokenizer.json` (never from a hub).

    The four special ids are looked up by their strings: by default the InternLM2 ones of the
    released POLAR models (module constants), other strings by argument. BOS and PAD must be in
    the vocabulary. The two reward strings are registered as special added tokens (keeping
    their id when the vocabulary already has them, appended to it otherwise), so that their
    literal text always maps to exactly one id; whether the serving string (literal reward token
    at the end) and the training form (id appended) agree is checked here, at load time.

    Truncation and padding stored in the file are switched off: POLAR truncates per piece
    (polar/format.py) and a silent cut here would break that.
    """

    def __init__(self, path, *, bos: str = INTERNLM2_BOS_TEXT, pad: str = INTERNLM2_PAD_TEXT,
                 reward_sep: str = REWARD_SEP_TEXT, reward_token: str = REWARD_TOKEN_TEXT) -> None:
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
        tok.encode_special_tokens = False  # True would read the literals as plain text
        self._tok = tok
        self.path = file

        def lookup(text: str, arg: str) -> int:
            tid = tok.token_to_id(text)
            if tid is None:
                raise ValueError(f"{file}: the vocabulary has no {text!r}; pass the tokenizer's "
                                 f"own token as {arg}=")
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
        self._check_literals()

    def _check_literals(self) -> None:
        probe = f"a {self.reward_sep_text}b \n"
        served = self.encode(probe + self.reward_token_text).tolist()
        trained = self.encode(probe).tolist() + [self.reward_token_id]
        if served != trained or self.reward_sep_id not in served:
            raise ValueError(f"{self.path}: the literal reward tokens do not tokenize to their ids "
                             f"({probe + self.reward_token_text!r} -> {served}, expected "
                             f"{trained}); check the added tokens' settings in the file")

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(_check_str(text), add_special_tokens=False).ids
        return np.array(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The library's batch call runs in parallel in Rust; the fast variant skips the offsets.
        encs = self._tok.encode_batch_fast(list(_check_texts(texts)), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int32) for e in encs]

    def offsets_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(_check_texts(texts, "offsets_batch")),
                                      add_special_tokens=False)
        return [np.array(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs]

    def decode(self, ids) -> str:
        arr = _check_ids(ids, self.vocab_size)
        arr = arr[(arr != self.bos_id) & (arr != self.pad_id)]
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" -> ByteTokenizer; a local directory holding tokenizer.json (or the file itself) ->
    HFTokenizer with the InternLM2 special tokens. ("./byte" names a directory called byte.)"""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer expects 'byte' or a directory path, got "
                        f"{type(spec).__name__}")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
