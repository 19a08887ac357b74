"""Training records (JSONL, one per line): parsing and validation that names file, line and field.

Two record shapes are read; every value that is text may be a string or a message list
(`[{"role": ..., "content": ...}, ...]`, joined by "\\n" as in polar/format.py):

    official (the JSONL record of POLAR's released training code, for pre-training and fine-tuning):
        {"prompt": T, "reference": T, "chosen": T, "rejected": T, "wrapper": "sft"|"pretrain"}
    grouped (ours, K >= 2 candidates):
        {"prompt": T, "reference": T, "candidates": [C, ...], "reference_policy": id, "wrapper": ...}
        C = {"text": T, "label": 0|1}  or  {"text": T, "policy": id}  (label 1 iff policy == reference_policy)

`wrapper` is optional (the builder's default applies). A UTF-8 byte order mark opening a file is
skipped; a compressed file, or one of UTF-16 or UTF-32 text, is one error naming it. A candidate's
explicit `label` wins over its `policy`. Unknown fields are allowed and ignored, so sampler output
can carry its metadata. Blank lines are skipped. Rejected: bad JSON (also JSON nested too deeply or
a number too long to read), invalid UTF-8, a missing or mistyped field, an empty text (after joining
messages: an empty response carries no signal, and the format would drop its "\\n"), a reference of
only whitespace (the reward compares with it: paper Sec. 3), a text holding a lone surrogate (a
legal JSON escape such as "\\udc80" that is no character: no tokenizer can encode it), a key given
twice in one object (JSON readers keep the last silently, so one of the two texts would be lost
without a word), and a group without both a positive and a negative candidate (it gives no pair to
learn from).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import shlex
import stat
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from engine.file_lock import claim
from engine.near_miss import near_field
from polar.format import WRAPPERS, Text, as_text, lone_surrogate

ON_ERROR = ("fail", "skip")


class RecordError(ValueError):
    """One bad record: `file:line: field: reason`."""

    def __init__(self, file: str, line: int, field: str, reason: str):
        super().__init__(f"{file}:{line}: {field}: {reason}")
        self.file, self.line, self.field, self.reason = file, line, field, reason

    def __reduce__(self):  # raised in build workers, re-raised in the parent
        return (RecordError, (self.file, self.line, self.field, self.reason))


@dataclass
class Record:
    """One validated group: a prompt and reference with K >= 2 labelled candidates."""

    prompt: Text
    reference: Text
    candidates: list
    labels: list  # int 0/1 per candidate
    wrapper: Optional[str]  # None: the builder's default
    file: str = ""
    line: int = 0
    extra: dict = field(default_factory=dict, repr=False)


def record_digest(prompt, reference, candidates, labels, wrapper: str) -> bytes:
    """128 bits that two records share when they train the same: the same prompt, reference,
    candidates (in order) and labels, texts compared as the format joins them (a message list is the
    text of its contents), under the same wrapper (the default's name for a record naming none).
    Other fields (ids, metadata) do not count. One C-speed dump and hash a record: 2^-128 a pair of
    records to collide, so a count of repeats is exact for any corpus."""
    key = json.dumps([as_text(prompt), as_text(reference), [as_text(c) for c in candidates],
                      [int(y) for y in labels], wrapper], ensure_ascii=False)
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class FieldError(Exception):
    """A bad field of one JSON record; `parse_jsonl_line` turns it into a RecordError naming file:line."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


_Bad = FieldError



def no_surrogate(text: str, where: str) -> None:
    """FieldError where `text` holds a lone surrogate (polar.format.lone_surrogate)."""
    found = lone_surrogate(text)
    if found:
        raise _Bad(where, f"lone surrogate {found} (not valid Unicode text; it cannot be tokenized)")


def any_text(value, where: str) -> Text:
    """A str or a message list, possibly empty: FieldError where it is missing (None), mistyped or
    holds a lone surrogate. Every reader of texts in JSON lines checks them this way."""
    if isinstance(value, str):
        no_surrogate(value, where)
        return value
    if isinstance(value, list):
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise _Bad(f"{where}[{i}]", f"a message must be an object, got {type(msg).__name__}")
            if "content" not in msg:
                raise _Bad(f"{where}[{i}].content", "missing")
            if not isinstance(msg["content"], str):
                raise _Bad(f"{where}[{i}].content", f"must be a string, got {type(msg['content']).__name__}")
            no_surrogate(msg["content"], f"{where}[{i}].content")
        return value
    if value is None:
        raise _Bad(where, "missing (or null)")
    raise _Bad(where, f"must be a string or a list of messages, got {type(value).__name__}")


def _text(value, where: str) -> Text:
    value = any_text(value, where)
    if not as_text(value):
        raise _Bad(where, "empty text")
    return value


def check_reference(value: Text, where: str, what: str = "the reference") -> None:
    """FieldError where a reference is empty or only whitespace. POLAR's reward compares an output
    with the reference trajectory for its prompt (paper Sec. 3): against such a one it compares
    with nothing, and a reward or a training pair built on it would measure nothing, without a
    word (polar serve refuses it too, 400)."""
    text = as_text(value)
    if not text.strip():
        raise _Bad(where, f"{what} is empty{' (only whitespace)' if text else ''}: POLAR scores an output against "
                          "the reference trajectory for its prompt")


def misspelt(obj: dict, *fields: str) -> str:
    """`; 'chosn' given: is it 'chosen'?` for a key of `obj` close to one of `fields`, else "". A
    record's other keys are metadata and allowed, so a misspelt field was reported only as missing."""
    for key in obj:
        if key not in fields:
            near = near_field(str(key), fields, cutoff=0.75)
            if near:
                return f"; {key!r} given: is it {near!r}?"
    return ""


def _required(obj: dict, key: str):
    if key not in obj:
        raise _Bad(key, "missing" + misspelt(obj, key))
    return obj[key]


def _policy_id(value, where: str):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(where, f"a policy id must be a string or an integer, got {value!r:.60}")
    return value


def _candidates(obj: dict) -> tuple[list, list]:
    cands = obj["candidates"]
    if not isinstance(cands, list):
        raise _Bad("candidates", f"must be a list, got {type(cands).__name__}")
    if len(cands) < 2:
        raise _Bad("candidates", f"a group needs at least 2 candidates, got {len(cands)}")
    texts, labels = [], []
    ref_policy = obj.get("reference_policy")
    for i, c in enumerate(cands):
        where = f"candidates[{i}]"
        if not isinstance(c, dict):
            raise _Bad(where, f"must be an object with text and label or policy, got {type(c).__name__}")
        texts.append(_text(c.get("text"), f"{where}.text"))
        if "label" in c:
            lab = c["label"]
            if isinstance(lab, bool) or lab not in (0, 1):
                raise _Bad(f"{where}.label", f"must be 0 or 1, got {lab!r:.60}")
            labels.append(int(lab))
        elif "policy" in c:
            if ref_policy is None:
                raise _Bad("reference_policy", f"missing, and {where} gives a policy instead of a label")
            labels.append(int(_policy_id(c["policy"], f"{where}.policy") == _policy_id(ref_policy, "reference_policy")))
        else:
            raise _Bad(where, "needs a label (0|1) or a policy (compared with reference_policy)")
    if min(labels) == max(labels):
        kind = "positive" if labels[0] == 0 else "negative"
        raise _Bad("candidates", f"no {kind} candidate (labels {labels}): a group needs both to form a pair")
    return texts, labels


def _parse(obj) -> Record:
    if not isinstance(obj, dict):
        raise _Bad("(record)", f"must be a JSON object, got {type(obj).__name__}")
    prompt = _text(_required(obj, "prompt"), "prompt")
    if "reference" not in obj and ("chosen" in obj or "candidates" in obj) and not misspelt(obj, "reference"):
        # a preference set's pair (prompt, chosen, rejected) has none, and "missing" alone did not say
        # what is to go there
        raise _Bad("reference", "missing: POLAR scores a response against a reference response to the same "
                                "prompt (paper Sec. 3), so every record gives one (of three ranked responses "
                                "A > B > C: reference A, chosen B, rejected C)")
    reference = any_text(_required(obj, "reference"), "reference")
    check_reference(reference, "reference")
    has_pair = "chosen" in obj or "rejected" in obj
    if "candidates" in obj:
        if has_pair:
            raise _Bad("candidates", "a record gives either candidates or chosen/rejected, not both")
        texts, labels = _candidates(obj)
    else:
        if not has_pair:
            raise _Bad("candidates", "missing (or chosen and rejected)"
                       + misspelt(obj, "candidates", "chosen", "rejected"))
        for key in ("chosen", "rejected"):
            if key not in obj:  # "rejected: missing" alone did not say what the record is short of
                other = "rejected" if key == "chosen" else "chosen"
                raise _Bad(key, f"missing: a record with {other} needs {key} too (the pair), or gives "
                                "candidates instead" + misspelt(obj, key))
        texts = [_text(obj["chosen"], "chosen"), _text(obj["rejected"], "rejected")]
        labels = [1, 0]
    wrapper = obj.get("wrapper")
    if wrapper is not None and wrapper not in WRAPPERS:
        raise _Bad("wrapper", f"must be one of {', '.join(WRAPPERS)}, got {wrapper!r:.60}")
    known = {"prompt", "reference", "chosen", "rejected", "candidates", "reference_policy", "wrapper"}
    return Record(prompt, reference, texts, labels, wrapper, extra={k: v for k, v in obj.items() if k not in known})


class DuplicateKey(ValueError):
    """A key given twice in one JSON object: json.loads keeps the last value and drops the other
    without a word. `path`: where the object sits, for a reader that knows it (polar serve names
    the request's field and element)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key, self.path = key, []


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook refusing a key given twice (dict() keeps C speed where none is)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return obj


def parse_json_text(text: str):
    """json.loads(text), refusing a key given twice in one object; a FieldError for what cannot be
    read, its field the key given twice, else "(line)"."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise _Bad(f"{e.key:.60}", "given twice in one object (which one is meant? a JSON reader keeps the last "
                                   "and drops the other without a word)") from None
    except json.JSONDecodeError as e:
        raise _Bad("(line)", f"not valid JSON: {_json_problem(e, text)}") from None
    except RecursionError:
        raise _Bad("(line)", "JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise _Bad("(line)", f"JSON that cannot be read: {e}") from None


def _json_problem(e: json.JSONDecodeError, text: str) -> str:
    """What is wrong with a JSONL line, in the terms of a file's reader rather than of Python's json."""
    if e.msg.startswith("Unexpected UTF-8 BOM"):  # its advice, "decode using utf-8-sig", is for a programmer
        return ("a UTF-8 byte order mark opens this line; one is skipped only at the start of a file (files "
                "joined with cat, each opening with one?)")
    msg = e.msg[:-len(" at")] if e.msg.endswith(" at") else e.msg  # "Invalid control character at" at column 9
    if e.msg == "Extra data" and "\r" in text[:e.pos]:
        # "\r" is whitespace to JSON: a file whose lines end in "\r" alone reads as one line of many records
        return (f"{msg} at column {e.colno}, after a carriage return (\\r): lines must end in \\n or \\r\\n, not "
                "\\r alone (convert the file: tr '\\r' '\\n')")
    line = text.rstrip("\r\n")
    if e.pos >= len(line) and "\n" not in line:  # one line (a JSONL record), not a document of several
        # the parser ran past the line's last character: json counts the newline, so "at column 1" (of
        # a next line) was said of a record whose closing brace or quote is missing; the line's end
        # inside a string is the "control character" json names
        what = "Unterminated string" if msg.startswith("Invalid control character") else msg
        return f"{what} at the end of the line (column {len(line) + 1}): the record is cut short"
    return f"{msg} at column {e.colno}"


def parse_jsonl_line(raw: bytes, file: str, line: int, parse):
    """One JSONL line (bytes, newline optional) -> parse(obj), None for a blank line. Invalid UTF-8,
    bad JSON, a key given twice in one object and a FieldError raised by `parse` become RecordError
    naming file:line: field. The records here, `polar eval`'s ranked records, `polar score`'s and
    `polar format`'s lines are all read this way."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(file, line, "(line)", f"invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
        return None
    try:
        rec = parse(parse_json_text(text))
    except FieldError as e:
        raise RecordError(file, line, e.field, e.reason) from None
    return rec


def parse_line(raw: bytes, file: str, line: int) -> Optional[Record]:
    """One JSONL line (bytes, newline optional) -> Record, None for a blank line; RecordError if bad."""
    rec = parse_jsonl_line(raw, file, line, _parse)
    if rec is not None:
        rec.file, rec.line = file, line
    return rec


def reject_entry(file: str, line: int, field: str, reason: str, raw: Union[bytes, str]) -> dict:
    """A rejects-file row; keeps the raw line whole (base64 too when it is not UTF-8)."""
    row = {"file": file, "line": line, "field": field, "reason": reason}
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\r\n")
        try:
            row["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            row["raw"] = raw.decode("utf-8", errors="backslashreplace")
            row["raw_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        row["raw"] = raw
    return row


def strip_bom(data: bytes) -> bytes:
    """`data` without a leading UTF-8 byte order mark. For the bytes at the start of a file only:
    editors on Windows write one there, and it is not part of the first record; anywhere else it is
    the text's own character (U+FEFF)."""
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
               (b"BZh", "bzip2", "bunzip2 -k"), (b"\xfd7zXZ\x00", "xz", "unxz -k"))


def compressed_format(path: str) -> Optional[tuple[str, str]]:
    """(format, decompress command) when the file starts with a compressor's signature."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next(((name, cmd) for magic, name, cmd in _COMPRESSED if head.startswith(magic)), None)


def wide_encoding(head: bytes) -> Optional[str]:
    """The UTF-16 or UTF-32 encoding (iconv's name) of text opening with `head` (4 bytes or fewer at
    the start of a file), None where it is none of them. A byte order mark names it; without one, a
    text opening with an ASCII character ("{" of a record, a letter) puts NUL bytes beside it, which
    UTF-8 text holds only where it holds a NUL character (RFC 8259 Sec. 8.1 reads JSON's encoding so)."""
    for mark, name in ((b"\xff\xfe\0\0", "UTF-32"), (b"\0\0\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                       (b"\xfe\xff", "UTF-16")):
        if head.startswith(mark):
            return name
    if len(head) < 4:
        return None
    zero = tuple(b == 0 for b in head)
    return {(True, True, True, False): "UTF-32BE", (False, True, True, True): "UTF-32LE",
            (True, False, True, False): "UTF-16BE", (False, True, False, True): "UTF-16LE"}.get(zero)


def compressed_problem(path: str, what: str = "JSONL text") -> str:
    """What an input reader says of a file it cannot read as lines of UTF-8 text, "" for one it can:
    compressed ("gzip-compressed, not JSONL text: decompress it first (gunzip -k PATH)"), or UTF-16
    or UTF-32 text, which Windows tools write (PowerShell 5's `>`): read as UTF-8, every line of it
    was a reject of its own ("invalid UTF-8", "not valid JSON"), its newlines split one too many."""
    found = compressed_format(path)
    if found:
        return f"{found[0]}-compressed, not {what}: decompress it first ({found[1]} {shlex.quote(path)})"
    with open(path, "rb") as f:
        wide = wide_encoding(f.read(4))
    if wide:
        stem, dot, ext = os.path.basename(path).rpartition(".")
        copy = os.path.join(os.path.dirname(path), f"{stem}.utf8.{ext}" if dot and stem else f"{ext}.utf8")
        # quoted: a command to paste, which a path with a space or a quote in it broke
        return (f"{wide} text, not UTF-8 {what}: convert it first (iconv -f {wide} -t UTF-8 {shlex.quote(path)} > "
                f"{shlex.quote(copy)})")
    return ""


# what the input readers say of a path that exists but is no regular file: each reads a file more
# than once (a check, then the run; by offset), which a pipe such as `<(zcat r.jsonl.gz)` gives once
NOT_REGULAR = "not a regular file (a pipe or a device)"


def iter_lines(path: str, start: int = 0, end: Optional[int] = None,
               first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of the lines in bytes [start, end) of a file; bytes, not str, so
    that one bad byte rejects its line rather than the file. A compressed or UTF-16/32 file is one
    error for the file (RecordError at line 1, whatever on_error says), not a reject per line, and so
    is a directory or a pipe."""
    if start == 0:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            # a pipe (`--input <(zcat r.jsonl.gz)`) stopped every reader with "File or stream is not
            # seekable" and a traceback; the readers read a file again (a check first, a resume), or its head
            raise RecordError(path, 1, "(file)", "a directory, not a file" if stat.S_ISDIR(mode) else
                              f"{NOT_REGULAR}: write it to a file first")
        packed = compressed_problem(path)
        if packed:
            raise RecordError(path, 1, "(file)", packed)
    with open(path, "rb") as f:
        f.seek(start)
        pos, n = start, first_line
        for raw in f:
            if end is not None and pos >= end:
                break
            yield n, strip_bom(raw) if pos == 0 else raw
            pos += len(raw)
            n += 1


def read_records(path: str, on_error: str = "fail", rejects: Optional[list] = None) -> Iterator[Record]:
    """Every valid record of a JSONL file. on_error="fail" raises RecordError at the first bad one;
    "skip" appends a reject_entry per bad line to `rejects` (required: a record skipped is reported,
    never dropped without a word; ValueError at the first without it) and goes on."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    for n, raw in iter_lines(path):
        try:
            rec = parse_line(raw, path, n)
        except RecordError as e:
            if on_error == "fail":
                raise
            if rejects is None:
                raise ValueError("read_records(on_error='skip') needs a `rejects` list: the bad records it skips "
                                 "go there to be reported") from e
            rejects.append(reject_entry(e.file, e.line, e.field, e.reason, raw))
            continue
        if rec is not None:
            yield rec


class AppendedLines:
    """The complete lines of an output that a run appends to line by line (polar sample's records,
    polar score's rows): iterate for (line number, raw bytes), read one at a time (an output of a
    large run does not fit in memory twice); a last line without its newline, torn by a stop
    mid-write, is not yielded, and cut_torn() removes it from the file."""

    def __init__(self, path: str):
        self.path, self.end, self.torn = path, 0, None  # bytes of the complete lines, of the torn one

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):  # only the last line can lack its newline
                    self.torn = len(raw)
                    return
                self.end += len(raw)
                yield n, raw

    def cut_torn(self, tool: str, which: str, again: str) -> None:
        """Truncate the torn last line, if any, saying so on stderr: `which` names it ("the last
        line"), `again` says what becomes of its content."""
        if self.torn is None:
            return
        print(f"{tool}: {self.path}: {which} ({self.torn} bytes at byte {self.end}) is incomplete, cut by a stop "
              f"mid-write; removing it ({again})", file=sys.stderr, flush=True)
        with open(self.path, "r+b") as f:
            f.truncate(self.end)


class OutputBusy(Exception):
    """Another process holds the output's lock (append_locked)."""


def append_locked(path: str, tool: str) -> int:
    """A descriptor appending to `path` (created 0644), locked for this process's life
    (engine.file_lock.claim: still the file under that name once locked): OutputBusy when another
    process holds it; on a file system without locks (some network mounts) a note."""
    busy = OutputBusy(f"{path}: another {tool} is writing this output; wait for it to end or stop it")
    fd, unlocked = claim(path, busy, flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    if unlocked:
        print(f"{tool}: note: {path}: cannot lock ({unlocked}); do not start a second run on it", file=sys.stderr)
    return fd
