"""benchmarks/serve_body.py: its three parsers read the same value from the same body (so the
stalls it compares are of the same work), and its smallest version prints a row for each. Time is
not asserted."""
import json

from benchmarks import serve_body as bench  # the repository root is on the path: tests/ is a package


def test_the_parsers_read_the_same_value():
    from polar.serve import validation

    for ascii in (True, False):
        body = bench.body_of(0.2, ascii)
        assert (b"\\u" in body) == ascii and len(body) > 150_000
        chunks = [body[i:i + bench.CHUNK] for i in range(0, len(body), bench.CHUNK)]
        expected = json.loads(body)
        assert bench.whole(chunks) == expected and validation.parse_json(chunks) == expected


def test_smallest_run_prints_every_row(capsys):
    bench.main(["--mb", "0.05", "--repeats", "1"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 6 and sum("chunks (served)" in r for r in rows) == 2
