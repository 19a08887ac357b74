"""polar/data_inputs.py: which files a build reads, and that nothing else is skipped without a word;
then the same through `polar data build`."""
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from engine.indexed_dataset import IndexedDataset
from polar.data_inputs import input_files, names
from tests.polar.test_data_build import SEQ, build, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return synthetic_records(30)


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
    with pytest.raises(FileNotFoundError, match="no such file or directory$"):
        input_files([str(tmp_path / "nope.jsonl")])
    # a shell passes a pattern that matched nothing on as it is; a pipe (`<(zcat r.jsonl.gz)`) exists, and was
    # said not to: it is refused, since every input is read twice
    with pytest.raises(FileNotFoundError, match=r"no such file or directory \(a pattern that matched no file\?\)"):
        input_files([str(tmp_path / "part-*.jsonl")])
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"pipe: not a regular file \(a pipe or a device\)"):
        input_files([str(d / "a.jsonl"), str(tmp_path / "pipe")])
    for name in ("a.jsonl", "r.jsonl", "r.jsonl.gz"):
        (d / name).unlink()
    (d / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no \*.jsonl file in this directory \(it holds notes.txt\)"):
        input_files([str(d)])


def test_names_shows_the_first_few_and_counts_the_rest():
    assert names(["a", "b"]) == "a, b"
    assert names(list("abcdefg"), 3) == "a, b, c and 4 more"


def test_inputs_given_twice_or_compressed_are_refused_by_name(tmp_path, records, capsys):
    """A file listed twice (or again through its directory) was built twice, silently; a gzip file
    was 'invalid UTF-8' at every line (and with --on-error skip, a build of nothing that exits 0)."""
    src = write_jsonl(tmp_path / "in" / "r.jsonl", records[:10])
    for inputs in ([src, src], [tmp_path / "in", src]):
        assert build(*inputs, "-o", tmp_path / "ds", "--seq-length", SEQ) == 2
        assert f"{src} is given twice" in capsys.readouterr().err
    packed = tmp_path / "r.jsonl.gz"
    packed.write_bytes(gzip.compress(src.read_bytes()))
    assert build(packed, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip") == 2
    assert f"{packed}: gzip-compressed, not JSONL text: decompress it first (gunzip -k {packed})" \
        in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())
    from polar.records import RecordError, read_records

    with pytest.raises(RecordError, match="gzip-compressed"):  # fine-tuning, scoring and eval read this way
        list(read_records(str(packed), on_error="skip"))


def test_a_hard_link_to_an_input_is_the_same_input(tmp_path, records, capsys):
    """Duplicates were found by real path: a file hard-linked into a second input directory (a
    `cp -al` snapshot) was built twice, silently."""
    src = write_jsonl(tmp_path / "a" / "r.jsonl", records[:10])
    (tmp_path / "b").mkdir()
    os.link(src, tmp_path / "b" / "r.jsonl")
    assert build(tmp_path / "a", tmp_path / "b", "-o", tmp_path / "ds", "--seq-length", SEQ) == 2
    assert f"{tmp_path / 'b' / 'r.jsonl'} is given twice (also as {src})" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_a_rebuild_whose_glob_names_its_own_rejects_list_does_not_read_it(tmp_path, records, capsys):
    """`polar data build data/*.jsonl -o data --force`: the glob names the shard's rejects list, whose
    rows were read as records and rejected into the list that replaced it (2, 4, 6 ... rejects)."""
    d = tmp_path / "data"
    write_jsonl(d / "a.jsonl", records[:20], {3: b"{oops\n"})
    common = ["-o", d, "--seq-length", SEQ, "--on-error", "skip"]
    assert build(d / "a.jsonl", *common) == 0
    rejects = d / "part-00000-of-00001.rejects.jsonl"
    first = rejects.read_bytes()
    for again in ([], ["--rejects", tmp_path / "rej.jsonl"]):
        assert build(*sorted(d.glob("*.jsonl")), *common, "--force", *again) == 0
        assert IndexedDataset(d).meta["counts"]["rejected"] == 1
        assert f"note: not read: {rejects}, the output's own shard files or rejects list" in capsys.readouterr().err
    assert (tmp_path / "rej.jsonl").read_bytes() == first
    assert build(d / "a.jsonl", tmp_path / "rej.jsonl", *common, "--force", "--rejects", tmp_path / "rej.jsonl") == 0
    assert IndexedDataset(d).meta["counts"]["rejected"] == 1 and (tmp_path / "rej.jsonl").read_bytes() == first


def test_a_directorys_other_files_are_named_and_a_compressed_one_refused(tmp_path, records, capsys):
    """A directory was read as its *.jsonl files only: b.json, c.JSONL and d.jsonl.gz beside a.jsonl
    were skipped without a word (10 of 30 records built, exit 0)."""
    d = tmp_path / "in"
    write_jsonl(d / "a.jsonl", records[:10], {3: b"{oops\n"})
    write_jsonl(d / "b.json", records[10:20])
    write_jsonl(d / "c.JSONL", records[20:25])
    (d / "d.jsonl.gz").write_bytes(gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in records[25:30])))
    (d / ".notes").write_text("not data")
    (d / "sub").mkdir()
    ds = d / "ds"  # the output inside the input: not data either
    common = ["-o", ds, "--seq-length", SEQ, "--on-error", "skip"]
    assert build(d, *common) == 2
    err = capsys.readouterr().err
    assert f"{d / 'd.jsonl.gz'}: gzip-compressed, not JSONL text: decompress it first" in err
    assert not ds.exists()
    write_jsonl(d / "d.jsonl", records[25:30])  # gunzip -k keeps the compressed file beside it
    for again in ([], ["--force"]):
        assert build(d, *common, *again) == 0
        err = capsys.readouterr().err
        assert f"note: {d}: 3 entries not read (a directory is read as its *.jsonl files, in any case): " \
               "b.json, d.jsonl.gz, sub/" in err, err
        meta = IndexedDataset(ds).meta
        assert [Path(s["path"]).name for s in meta["sources"]] == ["a.jsonl", "c.JSONL", "d.jsonl"]
        assert meta["counts"]["records"] == 20 and meta["counts"]["rejected"] == 1
    # built into the input directory itself: its shards and rejects list are not read the next time,
    # nor named; read into another build, they are named, not read
    shutil.rmtree(ds)
    for again in ([], ["--force"]):
        assert build(d, *common[2:], "-o", d, *again) == 0
        assert "3 entries not read" in capsys.readouterr().err
        assert IndexedDataset(d).meta["counts"]["records"] == 20
    assert build(d, *common[2:], "-o", tmp_path / "other") == 0
    assert "7 entries not read (a directory is read as its *.jsonl files, in any case): b.json, d.jsonl.gz, " \
           "part-00000-of-00001.bin, part-00000-of-00001.idx, part-00000-of-00001.json and 2 more" \
        in capsys.readouterr().err
    assert IndexedDataset(tmp_path / "other").meta["counts"]["records"] == 20
    for f in ("a.jsonl", "c.JSONL", "d.jsonl", "d.jsonl.gz"):
        (d / f).unlink()
    assert build(d, *common[2:], "-o", d, "--force") == 2
    assert f"{d}: no *.jsonl file in this directory (it holds b.json, sub/)" in capsys.readouterr().err
