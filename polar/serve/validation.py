"""Request bodies -> items, or a RequestError whose message says what is wrong and where.

Shapes, as the existing clients send them:
    SGLang   POST /classify   {"model": str, "text": [str, ...] | str}
    vLLM     POST /pooling    {"input": [str, ...] | str, "model": str (optional)}
    OpenRLHF POST /get_reward {"query": [str], "prompts": [str], "labels": [str | {"reference": ...}]}
    native   POST /v1/rewards {"items": [{"prompt", "reference", "output" | "outputs", "wrapper"}]}
where a text (prompt, reference, output) is a str or a list of {"role", "content"} messages.
Other top-level fields are ignored, except near misses of these and item fields beside the items
(check_fields).
"""
from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine.near_miss import near_field
from polar.format import as_text, lone_surrogate
from polar.records import DuplicateKey, unique_keys
from polar.serve.items import StructuredItem

WRAPPERS = ("sft", "pretrain")
# on an error answer: "false" where sending the request again meets the same error (POLAR's clients
# then do not retry it); read by polar/reward_client.py
NO_RETRY_HEADER = "X-Polar-Retryable"


class RequestError(Exception):
    """`retryable=False` marks a server-side failure (a 5xx) that the same request meets again, so
    POLAR's clients do not spend their retries on it."""

    def __init__(self, message: str, status: int = 400, retryable: bool = True):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable


class LongInteger(ValueError):
    """An integer of more digits than Python converts (sys.get_int_max_str_digits()). `path`:
    where it sits, as DuplicateKey's."""

    def __init__(self):
        super().__init__()
        self.path = []


# the Python call per object costs ~10% of the parse of a body of small objects (benchmarks/serve_body.py)
_DECODE = json.JSONDecoder(object_pairs_hook=unique_keys).raw_decode
_SPACE = re.compile(r"[ \t\n\r]*").match


def parse_json(body: bytes | Sequence[bytes], endpoint: str | None = None) -> dict:
    """The body (bytes, or the chunks it arrived in) as a JSON object, meant to run in a worker
    thread (with `endpoint`, a key of FIELDS, its top-level fields checked: check_fields).
    json.loads holds the GIL for the whole document (0.4 s for 60 MB), which stalls the event
    loop even from another thread. Here no step holds it for more than about one slice of
    the body or one element of a top-level array: the body is decoded a slice at a time and
    parsed as it is decoded, and the interpreter can switch threads between steps."""
    chunks = [body] if isinstance(body, (bytes, bytearray, memoryview)) else body
    text = _Text(_slices(chunks), whole=False)
    try:
        value = _parse(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {text.located(e)}") from None
    except DuplicateKey as e:
        where = f" (inside {''.join(e.path)})" if e.path else ""
        raise RequestError(f"the request body gives the key {json.dumps(e.key)[:60]} twice in one object{where}: "
                           "which one is meant? (a JSON reader keeps the last and drops the other)") from None
    except LongInteger as e:
        where = f" in {''.join(e.path)}" if e.path else ""
        raise RequestError(f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits"
                           f"{where}, longer than this server reads") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type(value)}")
    if endpoint is not None:
        check_fields(value, endpoint)
    return value


# The top-level fields each endpoint reads. Others are ignored, since the protocols' own clients
# send more than a reward needs (vLLM's "encoding_format", "user" or "truncate_prompt_tokens",
# SGLang's "rid"); OpenRLHF sends exactly "query", "prompts" and "labels".
FIELDS = {"classify": ("text", "input", "model"), "pooling": ("input", "model"),
          "get_reward": ("query", "prompts", "labels"), "v1_rewards": ("items", "model")}
# POLAR's item fields given beside the items, not in them: ignored, every item would be scored
# with the default instead (the sft wrapper where "pretrain" was meant), without a word
_PER_ITEM = {"v1_rewards": ("items", "each item (items[i].{})",
                            ("prompt", "reference", "output", "outputs", "wrapper")),
             "get_reward": ("labels", 'each label ({{"reference": ..., "{}": ...}})', ("wrapper",))}


def check_fields(body: dict, endpoint: str) -> None:
    """Refuses a top-level field that is surely a mistake: one of POLAR's item fields beside the
    items, or a near miss of a field the endpoint reads ("texts", "Input", "label"), whose value
    would be ignored while the field meant is missing. Any other unknown field is ignored."""
    known = FIELDS[endpoint]
    whole, where, per_item = _PER_ITEM.get(endpoint, ("", "", ()))
    for key in body:
        if key in known:
            continue
        if key in per_item:
            raise RequestError(f"field {key!r} belongs in {where.format(key)}: beside the {whole} it would be "
                               "ignored")
        # stricter than a record's near miss (records.misspelt, a hint on a missing field): this one is
        # refused, and a client's own extra field must not be taken for one
        close = near_field(key, known, cutoff=0.8, fold_case=True, length_within=2)
        if close:
            raise RequestError(f"unknown field {key!r}: did you mean {close!r}? (fields other than "
                               f"{', '.join(map(repr, known))} are ignored)")


_SLICE_BYTES = 1 << 20  # ~1 ms of decoding


def _slices(chunks: Sequence[bytes]) -> Iterator[str]:
    """The chunks' text, as json.loads decodes bytes (the encoding it detects from the first 4
    bytes, surrogatepass), a slice at a time; an undecodable byte is named by its offset in the body."""
    head = b"".join(bytes(c[:4]) for c in chunks[:4])  # the body's first 4 bytes (or all of a shorter one)
    encoding = json.detect_encoding(head)
    decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
    offset = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), _SLICE_BYTES):
                piece = view[i:i + _SLICE_BYTES]
                text = decoder.decode(piece)
                offset += len(piece)
                yield text
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        # e.start counts from what the failing call decoded: the bytes the decoder held back from
        # the slice before (an incomplete character), then this slice.
        at = offset - len(decoder.getstate()[0]) + e.start
        raise RequestError(f"the request body is not valid {encoding}: {e.reason} at byte {at}") from None


def _loads(s: str):
    """json.loads(s), in steps of one array element: the same value, a JSONDecodeError where
    json.loads raises one. The whole text at once: what the server did before it parsed slices as
    they are decoded (benchmarks/serve_body.py's "whole body" row)."""
    return _parse(_Text(iter([s]), whole=True))


_TOKEN_TAIL = re.compile(r"[\w.+-]*\Z").match  # what a number or a literal cut off at the end may be


class _Text:
    """The document as the parser reads it: `buf`, and more on demand. Whole, `buf` is all of it;
    streaming, `buf` holds the text from the current top-level element on, a slice or two."""

    def __init__(self, pieces: Iterator[str], whole: bool):
        self.buf, self._pieces, self.whole, self._ended = "", pieces, whole, False
        # the text dropped so far: its length, its newlines, where the line after the last one starts
        self._dropped = self._dropped_lines = self._line_start = 0

    def more(self) -> bool:
        """Appends at least as much text as `buf` holds (so a value retried from its start after
        each call is scanned O(its length) times in all); False at the end of the document."""
        got, n = [], 0
        for piece in self._pieces:
            got.append(piece)
            n += len(piece)
            if n > len(self.buf):
                break
        else:
            self._ended = True
        if n:
            self.buf += "".join(got)
        return n > 0

    def space(self, i: int) -> int:
        j = _SPACE(self.buf, i).end()
        while j == len(self.buf) and self.more():
            j = _SPACE(self.buf, j).end()
        return j

    def at(self, i: int, c: str) -> bool:
        while len(self.buf) <= i and self.more():
            pass
        return self.buf.startswith(c, i)

    def value(self, i: int):
        """The JSON value at i and where it ends; read again with more text while it may be cut
        off: an error (an unterminated string, say), or a number or literal up to the end."""
        while True:
            try:
                value, end = _DECODE(self.buf, i)
            except DuplicateKey:
                raise
            except ValueError as e:
                # json converts an integer with int(), which refuses more than
                # sys.get_int_max_str_digits() digits: the digits before a cut may be a float's
                # ("1111...1.5"), so that too is an error only once the text has no more
                if self.more():
                    continue
                if isinstance(e, json.JSONDecodeError):
                    raise
                raise LongInteger() from None
            if not self._ended and _TOKEN_TAIL(self.buf, end) and self.more():
                continue
            return value, end

    def forget(self, i: int) -> int:
        """Drops the text before i once it is a slice long (streaming); i's index after that."""
        if self.whole or i < _SLICE_BYTES:
            return i
        newlines = self.buf.count("\n", 0, i)
        if newlines:
            self._dropped_lines += newlines
            self._line_start = self._dropped + self.buf.rindex("\n", 0, i) + 1
        self._dropped += i
        self.buf = self.buf[i:]
        return 0

    def located(self, e: json.JSONDecodeError) -> str:
        """An error in `buf`, as json.loads words it for the whole document: message, line,
        column and character offset (the text before `buf` counted, not kept)."""
        pos = self._dropped + e.pos
        newlines = self.buf.count("\n", 0, e.pos)
        line = self._dropped_lines + newlines + 1
        column = e.pos - self.buf.rindex("\n", 0, e.pos) if newlines else pos - self._line_start + 1
        return f"{e.msg}: line {line} column {column} (char {pos})"


def _parse(t: _Text):
    i = t.space(0)
    if i == len(t.buf):
        raise RequestError("the request body is empty; expected a JSON object")
    # the top-level value's containers element by element, so that no step holds the GIL for
    # more than one element; an array or a scalar is refused by the caller, once it is valid JSON
    value, i = _object(t, i) if t.at(i, "{") else _array(t, i) if t.at(i, "[") else t.value(i)
    i = t.space(i)
    if i != len(t.buf):
        raise json.JSONDecodeError("Extra data", t.buf, i)
    return value


def _object(t: _Text, i: int):
    obj, i = {}, t.space(i + 1)
    if t.at(i, "}"):
        return obj, i + 1
    while True:
        if not t.at(i, '"'):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", t.buf, i)
        key, i = t.value(i)
        i = t.space(i)
        if not t.at(i, ":"):
            raise json.JSONDecodeError("Expecting ':' delimiter", t.buf, i)
        if key in obj:
            raise DuplicateKey(key)
        i = t.space(i + 1)
        try:
            obj[key], i = _array(t, i) if t.at(i, "[") else t.value(i)
        except (DuplicateKey, LongInteger) as e:
            e.path.insert(0, json.dumps(key)[:60])
            raise
        closed, i = _after_element(t, i, "}")
        if closed:
            return obj, i


def _array(t: _Text, i: int):
    out, i = [], t.space(i + 1)
    if t.at(i, "]"):
        return out, i + 1
    while True:
        try:
            value, i = t.value(i)
        except (DuplicateKey, LongInteger) as e:
            e.path.insert(0, f"[{len(out)}]")
            raise
        out.append(value)
        closed, i = _after_element(t, i, "]")
        if closed:
            return out, i


def _after_element(t: _Text, i: int, close: str) -> tuple[bool, int]:
    """After an element of an object or array: (True, past `close`) at its end, else (False, the
    next element's start) past the ',', the text before it dropped."""
    i = t.space(i)
    if t.at(i, close):
        return True, i + 1
    if not t.at(i, ","):
        raise json.JSONDecodeError("Expecting ',' delimiter", t.buf, i)
    return False, t.forget(t.space(i + 1))


def _unicode(s: str, where: str) -> str:
    """A lone surrogate is a str Python holds but cannot encode: the tokenizer, and an answer
    echoing it, would fail on it."""
    found = lone_surrogate(s)
    if found:
        raise RequestError(f"{where} holds a lone surrogate ({found}), which is not text")
    return s


def _type(v) -> str:
    """The JSON type the client sent: its own words, not the Python class json.loads made of it."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number"}.get(type(v), type(v).__name__)


def _str_list(body: dict, key: str, allow_str: bool = True, required: bool = True) -> list:
    if key not in body:
        if required:
            raise RequestError(f"missing field {key!r}")
        return None
    v = body[key]
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise RequestError(f"field {key!r} must be an array of strings{' or a string' if allow_str else ''}, "
                           f"got {_type(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise RequestError(f"{key}[{i}] must be a string, got {_type(s)}")
        _unicode(s, f"{key}[{i}]")
    return v


def _check_count(n: int, max_items: int, what: str) -> None:
    if n == 0:
        raise RequestError(f"empty batch: {what} holds no items")
    if n > max_items:
        raise RequestError(f"{n} items in one request, more than this server's limit of {max_items} "
                           "(--max-items); split the batch", status=413)


def text_field(v, where: str):
    """A str, or a message list (kept as given: polar.format joins the contents)."""
    if isinstance(v, str):
        return _unicode(v, where)
    if isinstance(v, list):
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise RequestError(f"{where}[{i}] must be an object with a string 'content', got {_type(m)}")
            if "content" not in m:
                raise RequestError(f"{where}[{i}]: missing field 'content' (a string)")
            if not isinstance(m["content"], str):
                raise RequestError(f"{where}[{i}].content must be a string, got {_type(m['content'])}")
            _unicode(m["content"], f"{where}[{i}].content")
        return v
    raise RequestError(f"{where} must be a string or an array of messages, got {_type(v)}")


def _optional_model(body: dict) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"field 'model' must be a string, got {_type(model)}")
    if model is not None:
        _unicode(model, "field 'model'")  # the answers echo it


def classify_field(body: dict) -> str:
    if "text" in body and "input" in body:
        raise RequestError("give the texts in 'text' (SGLang's field) or in 'input', not both: one of them "
                           "would be scored and the other ignored")
    return "input" if "input" in body else "text"


def classify(body: dict, max_items: int) -> list[str]:
    _optional_model(body)
    key = classify_field(body)
    texts = _str_list(body, key)
    _check_count(len(texts), max_items, f"field {key!r}")
    return texts


def pooling(body: dict, max_items: int) -> list[str]:
    _optional_model(body)
    texts = _str_list(body, "input")
    _check_count(len(texts), max_items, "field 'input'")
    return texts


def wrapper_field(v, where: str) -> str:
    """A wrapper name; null (or absent) is sft, as the official client sends it."""
    if v is None:
        return "sft"
    if v not in WRAPPERS:
        raise RequestError(f"{where} must be one of {', '.join(WRAPPERS)}, got {v!r}")
    return v


def check_reference(ref, where: str, why: str = "; POLAR scores each output against the reference trajectory "
                                                "for its prompt") -> None:
    """POLAR's reward compares an output with the reference trajectory for its prompt (paper Sec. 3):
    against an empty one (or only whitespace) it compares with nothing, and a trainer would follow
    that reward for a whole run without a word. `ref`: a checked text; `why`: what likely left it
    empty, for the message."""
    text = as_text(ref)
    if not text.strip():
        raise RequestError(f"{where}: the reference is empty{' (only whitespace)' if text else ''}{why}")


def check_label_reference(ref, i: int) -> None:
    """OpenRLHF sends "" for every label when its label key is not set: --data.label_key since its April 2026
    options, --label_key before (the message names both, since the server cannot tell which a trainer runs)."""
    check_reference(ref, f"labels[{i}]", "; OpenRLHF sends an empty label when --data.label_key (--label_key before "
                    "April 2026) is not set: set it to the dataset field holding the reference")


def get_reward(body: dict, max_items: int) -> list[StructuredItem]:
    """OpenRLHF's remote reward call: query[i] = prompts[i] + response; labels[i] carries the
    reference (a string, or an object with "reference" and optionally "wrapper")."""
    queries = _str_list(body, "query", allow_str=False)
    # OpenRLHF gives each of its --reward.remote_url servers a slice of ceil(n / servers) queries, and n
    # can be 1: the servers after the first get empty lists, which must be answered with none
    if queries:
        _check_count(len(queries), max_items, "field 'query'")
    prompts = _str_list(body, "prompts", allow_str=False, required=False)
    if prompts is None:
        raise RequestError("missing field 'prompts': POLAR scores the response against the reference "
                           "for the same prompt, so each query's prompt is needed")
    labels = body.get("labels")
    if labels is None:
        raise RequestError("missing field 'labels': each label carries the reference trajectory")
    if not isinstance(labels, list):
        raise RequestError(f"field 'labels' must be an array, got {_type(labels)}")
    if not (len(prompts) == len(labels) == len(queries)):
        raise RequestError(f"{len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; they must match")
    items = []
    for i, (q, p, lab) in enumerate(zip(queries, prompts, labels)):
        if not q.startswith(p):
            raise RequestError(f"query[{i}] does not start with prompts[{i}]: the response is the query "
                               "after its prompt")
        wrapper = "sft"
        if isinstance(lab, dict):
            if "reference" not in lab:
                raise RequestError(f"labels[{i}] is an object without a 'reference'")
            wrapper = wrapper_field(lab.get("wrapper"), f"labels[{i}].wrapper")
            ref = text_field(lab["reference"], f"labels[{i}].reference")
        else:
            ref = text_field(lab, f"labels[{i}]")
        check_label_reference(ref, i)
        items.append(StructuredItem(prompt=p, reference=ref, output=q[len(p):], wrapper=wrapper))
    return items


@dataclass
class NativeRequest:
    items: list  # StructuredItem, flattened over every entry's outputs
    counts: list  # outputs per entry
    single: list  # whether entry i gave "output" (one) rather than "outputs"
    names: list  # where each flattened item is in the request, for errors


def native(body: dict, max_items: int) -> NativeRequest:
    _optional_model(body)
    entries = body.get("items")
    if entries is None:
        raise RequestError("missing field 'items'")
    if not isinstance(entries, list):
        raise RequestError(f"field 'items' must be an array, got {_type(entries)}")
    if not entries:
        raise RequestError("empty batch: field 'items' holds no items")
    flat, counts, single, names = [], [], [], []
    for i, e in enumerate(entries):
        where = f"items[{i}]"
        if not isinstance(e, dict):
            raise RequestError(f"{where} must be an object, got {_type(e)}")
        for key in ("prompt", "reference"):
            if key not in e:
                raise RequestError(f"{where}: missing field {key!r}")
        unknown = sorted(set(e) - {"prompt", "reference", "output", "outputs", "wrapper"})
        if unknown:
            raise RequestError(f"{where}: unknown field {unknown[0]!r}")
        prompt = text_field(e["prompt"], f"{where}.prompt")
        reference = text_field(e["reference"], f"{where}.reference")
        check_reference(reference, f"{where}.reference")
        wrapper = wrapper_field(e.get("wrapper"), f"{where}.wrapper")
        if ("output" in e) == ("outputs" in e):
            raise RequestError(f"{where}: give exactly one of 'output' (one rollout) or 'outputs' (a list)")
        if "output" in e:
            outs = [text_field(e["output"], f"{where}.output")]
            # the item is the whole entry (prompt, reference and output): any of them may be the long part
            names.append(where)
        else:
            if not isinstance(e["outputs"], list) or not e["outputs"]:
                raise RequestError(f"{where}.outputs must be a non-empty array")
            outs = [text_field(o, f"{where}.outputs[{k}]") for k, o in enumerate(e["outputs"])]
            names += [f"{where} (outputs[{k}])" for k in range(len(outs))]
        flat += [StructuredItem(prompt, reference, o, wrapper) for o in outs]
        counts.append(len(outs))
        single.append("output" in e)
    _check_count(len(flat), max_items, "the request")
    return NativeRequest(flat, counts, single, names)
