"""polar/data_inputs.py: which files a build reads, and that nothing else is skipped without a word
(the build through them: tests/polar/test_data_build.py)."""
import gzip

import pytest

from polar.data_inputs import input_files, names


def test_a_directory_is_its_jsonl_files_in_any_case_and_its_other_entries_are_named(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.jsonl", "a.JSONL", "notes.txt", ".hidden", "part-00000-of-00001.idx",
                 "part-00000-of-00001.rejects.jsonl"):
        (d / name).write_text("{}\n")
    (d / "sub").mkdir()
    assert input_files([str(d)]) == [str(d / "a.JSONL"), str(d / "b.jsonl")]
    # a dataset's shard files, its rejects list too, are named, never read as records
    assert capsys.readouterr().err == (f"note: {d}: 4 entries not read (a directory is read as its *.jsonl files, in "
                                       "any case): notes.txt, part-00000-of-00001.idx, "
                                       "part-00000-of-00001.rejects.jsonl, sub/\n")
    # built into that same directory: its own shards are neither read nor named
    assert input_files([str(d)], output=str(d)) == [str(d / "a.JSONL"), str(d / "b.jsonl")]
    assert "2 entries not read" in capsys.readouterr().err


def test_compressed_missing_and_repeated_inputs_are_refused_by_name(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("{}\n")
    (d / "r.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))
    with pytest.raises(ValueError, match=r"r.jsonl.gz: gzip-compressed, not JSONL text: decompress it first"):
        input_files([str(d)])
    (d / "r.jsonl").write_text("{}\n")  # gunzip -k keeps the compressed file beside its text
    assert input_files([str(d)]) == [str(d / "a.jsonl"), str(d / "r.jsonl")]
    with pytest.raises(ValueError, match="is given twice"):
        input_files([str(d), str(d / "a.jsonl")])
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        input_files([str(tmp_path / "nope.jsonl")])
    for name in ("a.jsonl", "r.jsonl", "r.jsonl.gz"):
        (d / name).unlink()
    (d / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no \*.jsonl file in this directory \(it holds notes.txt\)"):
        input_files([str(d)])


def test_names_shows_the_first_few_and_counts_the_rest():
    assert names(["a", "b"]) == "a, b"
    assert names(list("abcdefg"), 3) == "a, b, c and 4 more"
