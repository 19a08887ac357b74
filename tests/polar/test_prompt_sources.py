"""polar sample's corpus reader (polar/prompt_sources.py) on inputs it must refuse or read as meant."""
import gzip
import json
import os

import pytest

from polar.prompt_sources import SampleError, TextSource


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
