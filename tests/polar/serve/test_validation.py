"""Request bodies: parse_json reads exactly what json.loads reads (less a key given twice in one
object, which it refuses), without holding the GIL for the whole document (the server parses in a
worker thread while its event loop answers others)."""
import json
import threading
import time

import pytest

from polar.serve.validation import RequestError, parse_json

BODIES = [
    b'{"text": ["a", "b"], "model": "m"}', b' \n{ "input" : [ ] , "x" : { "y" : [1, 2.5, null, true] } }\t',
    b'{}', b'{"a": [[1, [2]], {"b": []}], "a": "dup"}', b'{"s": "\\u00e9\\ud83d\\ude00 \\" \\\\ \\n"}',
    '{"t": ["état", "数据"]}'.encode(), b'\xef\xbb\xbf{"bom": 1}', '{"utf16": [1]}'.encode("utf-16"),
    b'{"n": [NaN, -Infinity, 1e400]}', b'[1, 2]', b'"text"', b'3',
    b'{"a": 1,}', b'{"a": [1,]}', b'{"a" 1}', b'{"a": [1 2]}', b'{a: 1}', b'{"a": 1} {}', b'{"a": [1]', b'{"a": "',
    b'{"a": [1], }', b'{"a": tru}', b'\xff\xfe\xfd', b'{"a": "\xc3"}',
    # numbers, literals and escapes that a slice boundary may cut
    b'{"a": [12345, -6.5e+10, 0, true, false, null, 1E-5, -0], "b": 123456789, "c": "\\u00e9x"}',
    b'{"a" :[ 1 , 2 ] ,"b":  {"c": [ ]} , "d" : [[], [[]], ""] }', b'{"a": 12 3}', b'{"a": [1.]}',
    b'{"a": [1]] }', b'{"a": [tr ue]}', b'{"a": [-]}', b'{"a": "\\u00"}', b'{"a": [1e5x]}', b'  ', b'',
    # errors after newlines, some of them in text already dropped: json.loads's line and column
    b'{"a": [1,\n 2,\n 3 4]}', b'{\n"a": "x",\n "b": [\n1,\n2\n]\n,\n}', b'{"a": [\n"x\ny"]}',
    b'{"a": [\n\n"xy", "z"\n]}\n\n x', b'{"a": "b"}\n[', b'\n\n{"a": [1, 2,, 3]}',
    # a key twice in one object, at the top level, in a nested object, in an array's element
    b'{"items": [{"a": 1}, {"b": {"c": 1, "c": 1}}]}', b'{"x": {"k": [1], "k": [2]}}', b'[{"a": 1, "a": 2}]',
    b'{"items": [{"a": 1, "b": {"a": 2}}], "b": {"a": 1, "c": {"a": 3}}}',
]


class _Twice(Exception):
    pass


def _refuse_twice(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Twice
    return dict(pairs)


@pytest.mark.parametrize("body", BODIES)
def test_parse_json_reads_what_json_loads_reads(body):
    try:
        expected = json.loads(body, object_pairs_hook=_refuse_twice)
    except (ValueError, _Twice):
        expected = None
    if isinstance(expected, dict):
        assert repr(parse_json(body)) == repr(expected)
    else:
        with pytest.raises(RequestError):
            parse_json(body)


def _outcome(body):
    try:
        return repr(parse_json(body))
    except RequestError as e:
        return e.message


@pytest.mark.parametrize("body", BODIES)
def test_a_body_in_chunks_reads_as_the_whole(body):
    """The server hands parse_json the chunks the body arrived in: any split, even one inside a
    multi-byte character or the byte-order mark, reads (or is refused) exactly as the whole body."""
    whole = _outcome(body)
    for cut in range(len(body) + 1):
        assert _outcome([body[:cut], body[cut:]]) == whole, cut
    assert _outcome([body[i:i + 1] for i in range(len(body))]) == whole


@pytest.mark.parametrize("slice_bytes", [1, 2, 3, 5])
def test_a_body_parsed_a_few_bytes_at_a_time_reads_as_the_whole(monkeypatch, slice_bytes):
    """The body is parsed as it is decoded, and the text before the current array element is
    dropped: a slice that ends inside a number, a literal, a string, an escape or a character
    changes nothing."""
    from polar.serve import validation

    whole = [_outcome(body) for body in BODIES]
    monkeypatch.setattr(validation, "_SLICE_BYTES", slice_bytes)
    for body, expected in zip(BODIES, whole):
        assert _outcome(body) == expected, body


def _json_error(body) -> str | None:
    try:
        json.loads(body)
    except json.JSONDecodeError as e:
        return str(e)
    except ValueError:  # an undecodable byte: named by its offset in the body (the test below)
        return None
    return None


@pytest.mark.parametrize("slice_bytes", [1 << 20, 1, 3])
@pytest.mark.parametrize("body", [b for b in BODIES if b.strip() and _json_error(b)])
def test_invalid_json_is_refused_with_json_loads_own_message(monkeypatch, body, slice_bytes):
    """Where json.loads raises a JSONDecodeError, the answer carries its message: the same error
    at the same line, column and character, also where the parser has dropped the text before the
    error (small slices) and counts it instead of reading the body again."""
    from polar.serve import validation

    monkeypatch.setattr(validation, "_SLICE_BYTES", slice_bytes)
    with pytest.raises(RequestError) as got:
        parse_json(body)
    assert got.value.message == f"the request body is not valid JSON: {_json_error(body)}"


def test_an_undecodable_byte_is_named_by_its_offset_in_the_body():
    body = '{"text": ["état", "x'.encode() + b"\xff" + b'"]}'
    at = body.index(b"\xff")
    threes = [body[i:i + 3] for i in range(0, len(body), 3)]
    for chunks in ([body], [body[:at], body[at:]], [body[:at - 1], body[at - 1:]], threes):
        with pytest.raises(RequestError, match=f"not valid utf-8: invalid start byte at byte {at}$"):
            parse_json(chunks)
    with pytest.raises(RequestError, match=r"not valid utf-8: unexpected end of data at byte 9$"):
        parse_json([b'{"a": "', b"\xc3\xa9\xc3"])  # a character cut off at the end


def test_parsing_a_large_body_lets_other_threads_run():
    """Counted, not timed: json.loads holds the GIL for the whole document, so another thread
    completes next to no step (two GIL acquisitions) inside the parse, however fast or loaded the
    machine is."""
    body = json.dumps({"model": "m", "text": ['ab"cd\n' * 2000] * 4000}).encode()  # 61 MB
    ticks, done = [], threading.Event()

    def tick():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            ticks.append((last, now))
            last = now

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.05)
    start = time.perf_counter()
    value = parse_json(body)
    end = time.perf_counter()
    done.set()
    t.join()
    assert len(value["text"]) == 4000
    inside = sum(start <= a and b <= end for a, b in ticks)
    # ~100 here (the interpreter offers the GIL every 5 ms); json.loads: 2, both while it decodes
    # the bytes to str, before its scanner holds the GIL to the end.
    assert inside >= 20, (inside, end - start)


@pytest.mark.parametrize("slice_bytes", [1 << 20, 7])
def test_a_number_too_long_to_read_is_a_bad_request_not_a_server_error(monkeypatch, slice_bytes):
    # json refuses integers of more than 4300 digits with a plain ValueError; it reached the app as
    # a 500, which POLAR's clients retry (the same body fails each time)
    from polar.serve import validation

    monkeypatch.setattr(validation, "_SLICE_BYTES", slice_bytes)
    # Python's own message ended "use sys.set_int_max_str_digits() to increase the limit", advice for
    # the server's programmer, and named no field
    for body, where in ((b'{"text": ["a"], "n": ' + b"1" * 5000 + b"}", ' in "n"'),
                        (b'{"text": [' + b"9" * 5000 + b"]}", ' in "text"[0]'),
                        (b'{"items": [{"prompt": "p"}, {"output": -' + b"9" * 5000 + b"}]}", ' in "items"[1]')):
        with pytest.raises(RequestError) as got:
            parse_json(body)
        assert got.value.status == 400 and got.value.message == (
            f"the request body holds an integer of more than 4300 digits{where}, longer than this server reads")


def test_a_long_float_cut_by_a_slice_boundary_is_read():
    """A float's digits before its '.' read as an integer where a slice ends: one of more than 4300
    digits was refused as too long, though the whole number is a float json reads."""
    number = b"1" * 5000 + b".5"
    for cut in (4406, 9416):  # in the top-level value; in an array's element
        body = b'{"a": ' + number + b', "b": [' + number + b"]}"
        assert parse_json([body[:cut], body[cut:]]) == json.loads(body)


@pytest.mark.parametrize("slice_bytes", [1 << 20, 1, 3])
@pytest.mark.parametrize("body, key, where", [
    (b'{"model": "m", "text": ["a"], "model": "n"}', '"model"', ""),
    (b'{"items": [{"prompt": "p", "output": "x"}, {"prompt": "p", "output": "y", "output": "z"}]}', '"output"',
     ' (inside "items"[1])'),
    (b'{"items": [{"prompt": [{"role": "user", "role": "system", "content": "c"}]}]}', '"role"',
     ' (inside "items"[0])'),
    (b'{"labels": {"reference": 1, "reference": 2}}', '"reference"', ' (inside "labels")'),
])
def test_a_key_given_twice_is_refused_naming_it_and_where(monkeypatch, body, key, where, slice_bytes):
    """json.loads keeps the last of two values under one key and drops the other without a word: a
    request naming "output" twice would be scored on one of them, silently."""
    from polar.serve import validation

    monkeypatch.setattr(validation, "_SLICE_BYTES", slice_bytes)
    with pytest.raises(RequestError) as got:
        parse_json(body)
    assert got.value.status == 400
    assert got.value.message.startswith(f"the request body gives the key {key} twice in one object{where}: "), \
        got.value.message


def test_a_long_unknown_field_is_no_near_miss_and_costs_no_copy_of_itself():
    """Counted in bytes allocated, not timed: check_fields skipped a key far longer than any field
    it reads (difflib's cost grows with it) until records.near_field took the rule over, whose length
    filter ran before difflib but let get_close_matches index the whole key (and lowercase a copy)
    with no field left to compare: 30-40 bytes a character, over 2 GB for a key of the 64 MiB a body
    may hold, to find no near miss of an ignored field."""
    import tracemalloc

    from polar.serve.validation import check_fields

    key = "Input" * 200_000  # 1 MB
    tracemalloc.start()
    try:
        check_fields({key: 1, "input": "x"}, "classify")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak  # 37 MB before
    with pytest.raises(RequestError, match="unknown field 'Inputs': did you mean 'input'"):
        check_fields({"Inputs": 1}, "classify")
