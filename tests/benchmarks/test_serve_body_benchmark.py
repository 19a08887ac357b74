"""benchmarks/serve_body.py: its three parsers read the same value from the same body (so the
stalls it compares are of the same work), and its smallest version prints a row for each. Time is
not asserted."""
import json

import pytest

from benchmarks import serve_body as bench  # the repository root is on the path: tests/ is a package
from tests.benchmarks.benchmark_output import markdown_tables


def test_the_parsers_read_the_same_value():
    from polar.serve import validation

    for ascii in (True, False):
        body = bench.body_of(0.2, ascii)
        assert (b"\\u" in body) == ascii and len(body) > 150_000
        chunks = bench.chunked(body)
        expected = json.loads(body)
        assert bench.whole(chunks) == expected and validation.parse_json(chunks) == expected
    body = bench.items_body(0.2)
    chunks, expected = bench.chunked(body), json.loads(body)
    assert len(expected["items"]) > 300 and len(chunks) > 1
    assert bench.without_key_check(chunks) == expected and validation.parse_json(chunks) == expected


def test_the_no_key_check_row_parses_without_the_check_and_restores_it():
    """Its ratio to the served row is the check's cost only if it really skips the check."""
    from polar.serve import validation

    served = validation._DECODE
    twice = [b'{"items": [{"a": 1, "a": 2}]}']
    assert bench.without_key_check(twice) == {"items": [{"a": 2}]}
    assert validation._DECODE is served
    with pytest.raises(validation.RequestError, match="twice"):
        validation.parse_json(twice)


def test_smallest_run_prints_every_row(capsys):
    bench.main(["--mb", "0.05", "--repeats", "1"])
    out = capsys.readouterr().out
    accepted, native, refused = markdown_tables(out)
    assert "\nrefused bodies\n" in out and "\nnative requests (an object per item)\n" in out
    assert [r[1] for r in native] == ["parser", "json.loads", "no key check", "chunks (served)"]
    assert accepted[0] == ["body", "encoding", "parser", "parse s", "longest stall ms", "vs json.loads"]
    rows = accepted[1:]
    assert len(rows) == 6 and sum(r[2] == "chunks (served)" for r in rows) == 2
    assert refused[0][1:3] == ["case", "parser"]
    rows = refused[1:]  # three bodies, each by json.loads and by the served parser
    assert len(rows) == 6 and sum(r[2] == "chunks (served)" for r in rows) == 3


def test_the_refused_bodies_are_refused_by_both_parsers():
    """Each is an error answer (json.loads raises, or reads a value that is not an object), so
    its row times the way to that answer; a body either parser accepted would fail the run."""
    from polar.serve import validation

    for case, body in bench.refused_bodies(0.2).items():
        with pytest.raises(validation.RequestError):
            validation.parse_json(bench.chunked(body))
        try:
            assert not isinstance(json.loads(body), dict), case
        except ValueError:
            pass
    with pytest.raises(AssertionError, match="accepted"):
        bench.refused(validation.parse_json)(bench.body_of(0.01, True))
