"""Tokenizers for POLAR inputs: the interface, and a dependency-free byte tokenizer.

The byte tokenizer maps each UTF-8 byte to the id equal to its value (0..255, no offset, so a
dump of ids below 256 reads as the raw bytes) and puts the four special tokens right after:

    256 BOS    257 PAD = EOS    258 <|reward|>    259 [UNUSED_TOKEN_130]

The two reward specials are also recognised as *literal text*: serving sends the string with
"[UNUSED_TOKEN_130]" at its end and lets the server tokenize it, while training appends the id;
POLAR needs both to give identical ids (POLAR.md section 4). A consequence: a response that happens
to contain one of the literals is read as the special token.
"""
from __future__ import annotations

import abc
import re
from typing import Sequence

import numpy as np

REWARD_SEP_TEXT = "<|reward|>"
REWARD_TOKEN_TEXT = "[UNUSED_TOKEN_130]"


class Tokenizer(abc.ABC):
    """What the POLAR input builder needs from a tokenizer.

    An HF tokenizer plugs in by wrapping it in a subclass that reads these ids from its
    added tokens; `encode` must add no special tokens of its own (no BOS).
    """

    vocab_size: int
    bos_id: int
    pad_id: int
    reward_sep_id: int
    reward_token_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, the literal reward tokens mapped to their ids, nothing added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in _check_texts(texts)]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids`; the reward tokens come back as their literal strings."""


def _check_texts(texts) -> Sequence[str]:
    # A bare string is a sequence of characters: catching it here saves a confusing
    # per-character result.
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"encode_batch expects a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
    return texts


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
        self._literal_re = re.compile(
            b"(" + b"|".join(re.escape(k) for k in self._literal_to_id) + b")")
        # Control tokens are not text: they decode to nothing rather than to a made-up string
        # that would re-encode as bytes.
        self._special_text = {
            self.bos_id: b"", self.pad_id: b"",
            self.reward_sep_id: REWARD_SEP_TEXT.encode(),
            self.reward_token_id: REWARD_TOKEN_TEXT.encode(),
        }

    def _has_literal(self, data: bytes) -> bool:
        # Both literals contain these bytes: the cheap `in` tests skip the regex for most text.
        return (b"<|" in data or b"[U" in data) and self._literal_re.search(data) is not None

    def _encode_bytes(self, data: bytes) -> np.ndarray:
        if not self._has_literal(data):
            return np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        parts = []
        for k, piece in enumerate(self._literal_re.split(data)):
            # re.split with one capture group alternates text, literal, text, ...
            if k % 2:
                parts.append(np.array([self._literal_to_id[piece]], dtype=np.int32))
            elif piece:
                parts.append(np.frombuffer(piece, dtype=np.uint8).astype(np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._encode_bytes(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = _check_texts(texts)
        blobs = [t.encode("utf-8") for t in texts]
        # One conversion for the whole batch, then views split at the byte offsets.
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.int32)
        ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        out = np.split(flat, ends[:-1]) if blobs else []
        for i, b in enumerate(blobs):
            if self._has_literal(b):
                out[i] = self._encode_bytes(b)
        return out

    def decode(self, ids) -> str:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
        arr = np.asarray(ids)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"decode expects a 1-D sequence of int ids, got dtype {arr.dtype}"
                            f" with shape {arr.shape}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), "
                             f"got range [{arr.min()}, {arr.max()}]")
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
