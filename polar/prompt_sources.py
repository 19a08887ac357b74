"""Where `polar sample`'s prompts come from: corpus documents read by byte offset, cut to a random
number of tokens at a token boundary, or whole instruction prompts; each a function of (seed, i)."""
from __future__ import annotations

import os
import random
import stat
from array import array
from dataclasses import dataclass

from engine.progress import RateLine
from polar.data_inputs import given_twice
from polar.format import as_text, lone_surrogate
from polar.records import NOT_REGULAR, FieldError, compressed_problem, parse_json_text, strip_bom


PROGRESS_LINES = 1024  # lines between two looks at the clock while reading a file


def byte_progress(what: str, total: int, log, interval: float) -> RateLine:
    """A progress line of reading `total` bytes: update it with the bytes done, shifted to MiB (>> 20)."""
    return RateLine(what, (total + (1 << 20) - 1) >> 20, "MiB", "MiB/s", log, interval)  # the total rounded up


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # _scan names the problem
        return 0


class SampleError(ValueError):
    """Bad input or settings; the message names the file, line and field where there is one."""


class TextSource:
    """Documents of one or more files, read by byte offset so a large corpus is not held in memory.

    `fmt` is "text" (one document per line) or "jsonl" (the document in `text_field`, a string or
    a message list). Every line is checked once at start-up, so a bad line stops the run before any
    request is sent. Blank lines / empty texts are not documents (a prefix needs one token); they are
    counted in `empty`, not dropped silently. A UTF-8 byte order mark opening a file is not text.
    "auto" reads .jsonl and .json files as JSONL, in any case (as `polar data build` reads a .JSONL
    file). Refused by name: a compressed file, one that is no regular file (a pipe), which could
    not be read again by offset, and a file given twice (as `polar data build` refuses one).
    """

    def __init__(self, paths: list[str], fmt: str, text_field: str, log=None, interval: float = 10.0,
                 name: str = "prompt files"):
        """`log`: where a progress line of the check goes, every `interval` seconds (none without)."""
        self.paths, self.fmt, self.text_field = list(paths), fmt, text_field
        self._file = array("i")
        self._line = array("q")
        self._offset = array("q")
        self.empty = 0
        self.sizes: list[int] = []  # bytes of each file as scanned
        # docs.JSONL read as text made every document a line of JSON syntax, without a word
        self._kinds = [fmt if fmt != "auto" else ("jsonl" if p.lower().endswith((".jsonl", ".json")) else "text")
                       for p in self.paths]
        # documents are drawn uniformly: a file listed twice was drawn from twice as often, without a word
        twice = given_twice([p for p in self.paths if os.path.exists(p)])
        if twice:
            raise SampleError(f"{twice}, directly or as a link to the same file: its documents would be drawn "
                              "twice as often as the others': list each file once")
        # Checking a corpus of tens of GB takes minutes (JSONL at ~40 MB/s on a core): without a line the
        # command sat silent until its first prompt.
        self._progress = None
        if log is not None:
            self._progress = byte_progress(f"checking {name}", sum(map(_size, self.paths)), log, interval)
        self._scanned = 0  # bytes of the files already checked
        for k, path in enumerate(self.paths):
            self._scan(k, path, self._kinds[k])
        self._handles: dict[int, object] = {}

    def _scan(self, k: int, path: str, kind: str) -> None:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
                # a pipe (`--corpus <(zcat docs.gz)`) was scanned, then the first prompt's read by offset
                # stopped the run: "File or stream is not seekable"
                raise SampleError(f"{path}: {NOT_REGULAR}: documents are read again by "
                                  "their byte offsets while sampling, so write it to a file first")
            f = open(path, "rb")
            packed = compressed_problem(path, "text")
        except OSError as e:
            raise SampleError(f"{path}: cannot read: {e.strerror or e}") from None
        if packed:  # it was "line 1: not valid UTF-8", which said nothing of the file
            f.close()
            raise SampleError(f"{path}: {packed}")
        with f:
            offset = 0
            for line_no, raw in enumerate(f, 1):
                text = self._parse(strip_bom(raw) if offset == 0 else raw, path, line_no, kind)
                if text.strip():
                    self._file.append(k)
                    self._line.append(line_no)
                    self._offset.append(offset)
                else:
                    self.empty += 1
                offset += len(raw)
                if self._progress is not None and not line_no % PROGRESS_LINES:
                    self._progress.update((self._scanned + offset) >> 20)
            if kind == "text" and offset and offset == len(raw) and not raw.endswith(b"\n") and "\r" in text:
                # A file whose lines end in "\r" alone (as records.py names it for JSONL) was one document.
                # Only a file without any \n: one of a single line ending in \n has a \r of its own text.
                crs = raw.count(b"\r")
                raise SampleError(f"{path}: its only line holds {crs} carriage return{'s' * (crs > 1)} (\\r) and "
                                  "the file no \\n: lines must end in \\n or \\r\\n, not \\r alone, or the whole file "
                                  "is one document (convert the file: tr '\\r' '\\n')")
        self.sizes.append(offset)
        self._scanned += offset

    def _parse(self, raw: bytes, path: str, line_no: int, kind: str) -> str:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start} of the line)") from None
        if kind == "text":
            return line.rstrip("\r\n")
        if not line.strip():
            return ""
        try:
            rec = parse_json_text(line)  # as every record reader reads a line
        except FieldError as e:
            what = e.reason if e.field == "(line)" else f"field {e.field!r} {e.reason}"
            raise SampleError(f"{path}:{line_no}: {what}") from None
        if not isinstance(rec, dict):
            raise SampleError(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
        if self.text_field not in rec:
            raise SampleError(f"{path}:{line_no}: field '{self.text_field}' is missing "
                              f"(fields: {', '.join(sorted(rec)[:10])})")
        try:
            text = as_text(rec[self.text_field])
        except TypeError as e:
            raise SampleError(f"{path}:{line_no}: field '{self.text_field}': {e}") from None
        found = lone_surrogate(text)
        if found:  # a legal JSON escape ("\ud800") that is no character: no tokenizer or record takes it
            raise SampleError(f"{path}:{line_no}: field '{self.text_field}': lone surrogate {found} "
                              f"(not valid Unicode text)")
        return text

    def __len__(self) -> int:
        return len(self._offset)

    def get(self, d: int) -> tuple[str, str]:
        """(text, "file:line") of document d."""
        k = self._file[d]
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self.paths[k], "rb")
        f.seek(self._offset[d])
        raw = f.readline()
        if self._offset[d] == 0:
            raw = strip_bom(raw)
        return self._parse(raw, self.paths[k], self._line[d], self._kinds[k]), f"{self.paths[k]}:{self._line[d]}"

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def token_prefix(tokenizer, text: str, n_tokens: int) -> tuple[str, int]:
    """The first `n_tokens` tokens of `text`, decoded, and how many tokens were kept.

    Only a head of the text is tokenized (grown until it holds more than n tokens), since a
    document can be far longer than the longest prefix. If the cut splits a character (a byte
    tokenizer inside a multi-byte character, a byte-fallback BPE), the decoded text ends in U+FFFD:
    the cut moves back to the previous whole character, or forward when there is none before.
    """
    chunk = max(64, 8 * n_tokens)
    while True:
        head = text[:chunk]
        ids = tokenizer.encode(head)
        if len(ids) > n_tokens or len(head) == len(text):
            break
        chunk *= 4
    if len(ids) <= n_tokens:
        return text, len(ids)

    def whole(k: int) -> str | None:
        s = tokenizer.decode(ids[:k])
        return s if not s.endswith("\ufffd") or text.startswith(s) else None

    for k in list(range(n_tokens, 0, -1)) + list(range(n_tokens + 1, len(ids) + 1)):
        s = whole(k)
        if s:
            return s, k
    return text, len(tokenizer.encode(text))


@dataclass
class PromptInfo:
    text: str
    source: str  # "corpus" or "instruction"
    doc: str  # "file:line"
    tokens: int


class PromptMaker:
    def __init__(self, seed: int, tokenizer, corpus: TextSource, instructions: TextSource | None,
                 instruction_share: float, min_tokens: int, max_tokens: int):
        self.seed, self.tokenizer = seed, tokenizer
        self.corpus, self.instructions, self.share = corpus, instructions, instruction_share
        self.min_tokens, self.max_tokens = min_tokens, max_tokens

    def make(self, i: int) -> PromptInfo:
        # A string seed goes through SHA-512 in `random`: the same draws on every Python and machine.
        rng = random.Random(f"polar-sample/{self.seed}/prompt/{i}")
        instruction = self.instructions is not None and rng.random() < self.share
        n_tokens = rng.randint(self.min_tokens, self.max_tokens)
        src = self.instructions if instruction else self.corpus
        text, doc = src.get(rng.randrange(len(src)))
        if instruction:
            return PromptInfo(text, "instruction", doc, len(self.tokenizer.encode(text)))
        prefix, kept = token_prefix(self.tokenizer, text, n_tokens)
        return PromptInfo(prefix, "corpus", doc, kept)
