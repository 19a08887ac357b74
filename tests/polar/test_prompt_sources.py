"""polar sample's corpus reader (polar/prompt_sources.py) on inputs it must refuse or read as meant."""
import gzip
import json
import os
import re

import pytest

from polar.prompt_sources import SampleError, TextSource, token_prefix
from polar.tokenizer import ByteTokenizer


def test_auto_reads_an_upper_case_jsonl_as_jsonl(tmp_path):
    """docs.JSONL was read as text: every document a line of JSON syntax, without a word."""
    p = tmp_path / "docs.JSONL"
    p.write_text(json.dumps({"text": "a document"}) + "\n")
    src = TextSource([str(p)], "auto", "text")
    assert src.get(0) == ("a document", f"{p}:1")


def test_a_compressed_corpus_is_refused_by_name(tmp_path):
    """It was 'line 1: not valid UTF-8'."""
    p = tmp_path / "docs.txt"
    p.write_bytes(gzip.compress(b"a document\n"))
    with pytest.raises(SampleError, match=rf"{p}: gzip-compressed, not text: decompress it first \(gunzip -k {p}\)"):
        TextSource([str(p)], "auto", "text")


def test_a_piped_corpus_is_refused_before_sampling():
    """`--corpus <(zcat docs.gz)`: the pipe was scanned, then reading the first prompt by its offset
    stopped the run ("File or stream is not seekable")."""
    r, w = os.pipe()
    os.write(w, b"a document\n")
    os.close(w)
    try:
        with pytest.raises(SampleError, match=r"/dev/fd/\d+: not a regular file \(a pipe or a device\)"):
            TextSource([f"/dev/fd/{r}"], "text", "text")
    finally:
        os.close(r)


def test_a_corpus_file_given_twice_is_refused_as_data_build_refuses_one(tmp_path):
    """Documents are drawn uniformly: a file listed twice (or through a link) was drawn from twice as
    often as the others, without a word."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a document\n")
    b.write_text("another\n")
    os.link(a, tmp_path / "link.txt")
    for paths, twice, first in (([a, b, a], a, a), ([a, tmp_path / "link.txt"], tmp_path / "link.txt", a)):
        with pytest.raises(SampleError, match=rf"^{twice} is given twice \(also as {first}\), directly or as a link "
                                              "to the same file: its documents would be drawn twice as often"):
            TextSource([str(p) for p in paths], "text", "text")
    assert len(TextSource([str(a), str(b)], "text", "text")) == 2


def test_checking_the_prompt_files_reports_progress_with_rate_and_eta(tmp_path):
    """Checking a corpus of tens of GB takes minutes: the command sat silent until its first prompt."""
    line = "a document of some length, one of many\n"
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(line * ((2 << 20) // len(line) + 1))  # just over 2 MiB, then over 1 MiB: 4 MiB rounded up
    b.write_text(line * ((1 << 20) // len(line) + 1))
    shown = []
    src = TextSource([str(a), str(b)], "text", "text", shown.append, 0, "--corpus")  # every look at the clock
    assert len(src) == (2 << 20) // len(line) + (1 << 20) // len(line) + 2
    assert src.sizes == [a.stat().st_size, b.stat().st_size]
    pattern = re.compile(r"checking --corpus: (\d)/4 MiB \| \S+ MiB/s( \| eta \d+m\d\ds)?")
    done = [int(pattern.fullmatch(s).group(1)) for s in shown]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 2  # a.txt alone reached 1 MiB at its last look
    assert all(" | eta " in s for s, d in zip(shown, done) if d)


def test_a_text_file_whose_lines_end_in_a_carriage_return_alone_is_refused(tmp_path):
    """It was one document: every line of the file drawn as a single prompt's source, without a word."""
    p = tmp_path / "mac.txt"
    p.write_bytes(b"first document\rsecond document\rthird document\r")
    with pytest.raises(SampleError, match=rf"^{p}: its only line holds 3 carriage returns \(\\r\) and the file no "
                                          r"\\n: lines must end in \\n or \\r\\n, not \\r alone"):
        TextSource([str(p)], "text", "text")
    p.write_bytes(b"first document\r\nsecond one\r\n")  # \r\n and an empty file are read as ever
    (tmp_path / "empty.txt").write_bytes(b"")
    src = TextSource([str(p), str(tmp_path / "empty.txt")], "text", "text")
    assert [src.get(d)[0] for d in range(len(src))] == ["first document", "second one"]
    # one document ending in \n, a stray \r inside it, was refused, its message saying the file had no \n
    one = tmp_path / "one.txt"
    one.write_bytes(b"a single document with a stray\rcarriage return\n")
    src = TextSource([str(one)], "text", "text")
    assert [src.get(d)[0] for d in range(len(src))] == ["a single document with a stray\rcarriage return"]
    one.write_bytes(b"doc one\rdoc two")  # no line end at all: one \r, named in the singular
    with pytest.raises(SampleError, match=r"its only line holds 1 carriage return \(\\r\) and the file no \\n"):
        TextSource([str(one)], "text", "text")


def test_token_prefix_cuts_at_whole_characters():
    tok = ByteTokenizer()
    assert token_prefix(tok, "hello world", 5) == ("hello", 5)
    # byte 2 of "é" would split the character: the cut moves back to "h"
    assert token_prefix(tok, "héllo", 2) == ("h", 1)
    assert token_prefix(tok, "é", 1) == ("é", 2)
    assert token_prefix(tok, "short", 100) == ("short", 5)
    long_doc = "word " * 5000
    assert token_prefix(tok, long_doc, 1024) == (long_doc[:1024], 1024)


@pytest.mark.parametrize("name, content", [("c.txt", "first doc\nsecond \ufeff doc\n"),
                                           ("c.jsonl", '{"text": "first doc"}\n{"text": "second \ufeff doc"}\n')])
def test_a_bom_opening_a_corpus_file_is_not_text(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    src = TextSource([str(path)], "auto", "text")
    try:
        assert len(src) == 2
        assert src.get(0) == ("first doc", f"{path}:1")
        assert src.get(1)[0] == "second \ufeff doc"  # inside a text it is the text's own character
    finally:
        src.close()
