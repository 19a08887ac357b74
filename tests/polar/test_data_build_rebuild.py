"""`polar data build` into an output that holds shards already: another build's refused, this build's
kept, a --force rebuild that fails keeps the old shard and its rejects list, a second run of one shard
stops, and shards given one --rejects path keep every list."""
from __future__ import annotations

import json

import pytest

from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from tests.polar.test_data_build import SEQ, build, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)  # the records of test_data_build.py


def test_a_build_refuses_an_output_holding_another_builds_shards(tmp_path, records, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 10]
    assert build(*common) == 0
    capsys.readouterr()
    for force in ([], ["--force"]):  # rebuilt as 2 shards: the old one would read its records twice
        assert build(*common, "--num-shards", 2, "--shard-index", 0, *force) == 2
        assert "holds shards of another build (part-00000-of-00001)" in capsys.readouterr().err
    assert build(*common, "--force") == 0  # the same build again replaces its shard
    for i in range(2):
        assert build(src, "-o", tmp_path / "two", "--seq-length", SEQ, "--chunk-records", 10,
                     "--num-shards", 2, "--shard-index", i) == 0
    assert IndexedDataset(tmp_path / "two").num_groups == 40
    # --force replaces a shard of the same name built with other settings (and still refuses the
    # shards of another name above)
    assert build(*common, "--force", "--seed", 1) == 0
    assert IndexedDataset(tmp_path / "ds").meta["seed"] == 1
    (tmp_path / "two" / "part-00000-of-00002.json").rename(tmp_path / "meta0.json")  # metadata lost
    with pytest.raises(DatasetFormatError, match=r"lacks 1 \(part-00000-of-00002 \(its .idx is there, its .json "
                                                 r"metadata is missing\)"):
        IndexedDataset(tmp_path / "two")
    (tmp_path / "meta0.json").rename(tmp_path / "two" / "part-00000-of-00002.json")
    (tmp_path / "two" / "part-00001-of-00002.idx").unlink()  # a shard that did not arrive
    with pytest.raises(DatasetFormatError, match=r"two: build \w+ of 2 shards lacks 1 \(part-00001-of-00002;"):
        IndexedDataset(tmp_path / "two")

def test_a_failed_rebuild_keeps_the_old_shard_and_its_rejects(tmp_path, records, capsys, monkeypatch):
    from engine import shard_writer

    src = write_jsonl(tmp_path / "r.jsonl", records[:20], {3: b"{oops\n"})
    ds = tmp_path / "ds"
    assert build(src, "-o", ds, "--seq-length", SEQ, "--on-error", "skip") == 0
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    assert "part-00000-of-00001.rejects.jsonl" in before
    # a rebuild stopped by a bad record
    assert build(src, "-o", ds, "--seq-length", SEQ, "--force") == 2
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before

    def failing_close(self, with_files=()):
        raise OSError("disk full")

    # a rebuild whose index cannot be written leaves no temporary file either
    monkeypatch.setattr(shard_writer.ShardWriter, "close", failing_close)
    assert build(src, "-o", ds, "--seq-length", SEQ, "--on-error", "skip", "--force", "--seed", 3) == 2
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before


def test_a_build_of_a_shard_another_build_is_writing_stops_and_touches_nothing(tmp_path, records, capsys):
    """A second run of the same shard (a requeued job whose first copy still runs) truncated the
    first's token file under it and deleted its rejects list in the making."""
    from engine.shard_writer import ShardWriter

    src = write_jsonl(tmp_path / "r.jsonl", records[:20], {3: b"{oops\n"})
    ds = tmp_path / "ds"
    running = ShardWriter(ds / "part-00000-of-00001", SEQ, 256, 0)
    running._bin.write(b"\1\0" * 10)
    running._bin.flush()
    (ds / "part-00000-of-00001.rejects.jsonl.tmp").write_text("{}\n")
    assert build(src, "-o", ds, "--seq-length", SEQ, "--on-error", "skip") == 2
    assert "another process is writing this shard" in capsys.readouterr().err
    assert (ds / "part-00000-of-00001.bin.tmp").read_bytes() == b"\1\0" * 10
    assert (ds / "part-00000-of-00001.rejects.jsonl.tmp").read_text() == "{}\n"
    running.abort()
    assert build(src, "-o", ds, "--seq-length", SEQ, "--on-error", "skip") == 0


def test_a_rebuild_from_another_directory_replaces_its_own_rejects_list(tmp_path, records, monkeypatch):
    """The metadata kept --rejects as given (relative to where the build ran): a --force rebuild of
    the shard run elsewhere, with the same list, was refused as if the list were another shard's."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:20], {3: b"{oops\n"})
    monkeypatch.chdir(tmp_path)
    assert build("r.jsonl", "-o", "ds", "--seq-length", SEQ, "--on-error", "skip", "--rejects", "rej.jsonl") == 0
    monkeypatch.chdir(tmp_path / "ds")
    assert build(src, "-o", ".", "--seq-length", SEQ, "--on-error", "skip", "--rejects", "../rej.jsonl",
                 "--force", "--seed", 1) == 0
    assert [json.loads(x)["line"] for x in (tmp_path / "rej.jsonl").read_text().splitlines()] == [4]
    meta = json.loads((tmp_path / "ds" / "part-00000-of-00001.json").read_text())
    assert meta["seed"] == 1 and meta["rejects_file"] == str(tmp_path / "rej.jsonl")

def test_shards_given_one_rejects_path_keep_every_list(tmp_path, records, capsys):
    """Shard 0's rejects were deleted by shard 1 (no rejects) or replaced by it (some) when both were
    given one --rejects path: the second shard is refused, naming the file; a --force rebuild of the
    shard that wrote it may replace it, and one without rejects removes it."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:20], {3: b"{oops\n"})
    rejects = tmp_path / "rej.jsonl"
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip", "--chunk-records", 10,
              "--num-shards", 2, "--rejects", rejects]
    assert build(*common, "--shard-index", 0) == 0
    kept = rejects.read_bytes()
    assert b"oops" in kept
    assert build(*common, "--shard-index", 1) == 2
    assert f"--rejects {rejects} exists and is not the rejects list of the shard this build replaces" \
        in capsys.readouterr().err
    assert rejects.read_bytes() == kept
    assert build(*common, "--shard-index", 0, "--force") == 0 and rejects.read_bytes() == kept
    clean = write_jsonl(tmp_path / "r.jsonl", records[:20])
    assert build(clean, *common[1:], "--shard-index", 0, "--force") == 0 and not rejects.exists()


def test_a_rebuild_with_a_new_rejects_path_removes_the_replaced_shards_own_list(tmp_path, records, capsys):
    """A --force rebuild given another --rejects path left the replaced shard's list on disk, the
    reasons for records of a shard that is gone, which nothing pointed to any more. It goes with the
    shard now, and the build says so; a file at that path that is no longer the list that shard's
    build wrote (another build's, written once it was gone) is kept, and the build says why."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:20], {3: b"{oops\n"})
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip"]
    first, second, third = (tmp_path / f"rej{i}.jsonl" for i in range(3))
    assert build(*common, "--rejects", first) == 0 and first.exists()
    capsys.readouterr()
    assert build(*common, "--rejects", second, "--force", "--seed", 1) == 0
    assert not first.exists() and b"oops" in second.read_bytes()
    assert f"note: {first}, the rejects list of the shard replaced, was removed with it" in capsys.readouterr().err
    # the list the shard names, removed by hand and written again by another build: not the shard's
    second.unlink()
    second.write_text('{"another": "build"}\n')
    assert build(*common, "--rejects", third, "--force", "--seed", 2) == 0
    assert second.read_text() == '{"another": "build"}\n' and third.exists()
    err = capsys.readouterr().err
    assert f"note: {second}, named as the rejects list of the shard replaced, is kept: it has changed since" in err
    # nothing rejected now: the replaced shard's list goes, and no new one is written
    clean = write_jsonl(tmp_path / "clean.jsonl", records[:20])
    assert build(clean, *common[1:], "--rejects", first, "--force") == 0
    assert not third.exists() and not first.exists()
    assert json.loads((tmp_path / "ds" / "part-00000-of-00001.json").read_text())["rejects_file"] is None


def test_a_build_resumes_shard_by_shard(tmp_path, records, capsys):
    """The error of a shard stopped by a bad record says "--on-error skip sets bad records aside": run
    again so, it was refused as another build than the shards built under fail before it. Then every
    shard's command again (a job array resubmitted) keeps the shards of this build."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40], {30: b"{oops\n"})
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 10, "--num-shards", 2]
    assert build(*common, "--shard-index", 0) == 0
    assert build(*common, "--shard-index", 1) == 2
    assert "--on-error skip sets bad records aside" in capsys.readouterr().err
    assert build(*common, "--shard-index", 1, "--on-error", "skip") == 0
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_groups == 40 and [s.meta["on_error"] for s in ds.shards] == ["fail", "skip"]
    # The whole job array run again: a shard of this build is kept, where each ended 2 ("exists: remove
    # the shard or pass --force"); one of other settings is refused still.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "ds").iterdir()}
    capsys.readouterr()
    for i in range(2):
        assert build(*common, "--shard-index", i, "--on-error", "skip") == 0
        assert (f"part-0000{i}-of-00002 is already built by this build ({ds.shards[i].meta['build']['id']}: the "
                "same inputs and settings): kept, nothing done; --force builds it again") in capsys.readouterr().out
    # the array's first command, under fail: shard 1 is kept, its record set aside said, not dropped unsaid
    assert build(*common, "--shard-index", 1) == 0
    assert ("--force builds it again; it was built with --on-error skip, 1 bad record set aside, listed in "
            f"{tmp_path / 'ds' / 'part-00001-of-00002.rejects.jsonl'}") in capsys.readouterr().out
    assert build(*common, "--shard-index", 0, "--seed", 1) == 2
    assert ("part-00000-of-00002.idx exists, a shard of another build (other settings or inputs): remove the shard "
            "or pass --force") in capsys.readouterr().err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "ds").iterdir()} == before


def test_shards_cut_by_another_truncation_rule_are_another_build(tmp_path, records, capsys, monkeypatch):
    """The truncation rule is recorded with each shard (polar.format.TRUNCATION_RULE) and enters the build
    id: a shard built before the rule changed and one built after, sent to one output, would otherwise be
    read as one dataset whose truncated records were cut two ways."""
    import polar.format

    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 10, "--num-shards", 2]
    monkeypatch.setattr(polar.format, "TRUNCATION_RULE", "an earlier rule")
    assert build(*common, "--shard-index", 0) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert build(*common, "--shard-index", 1) == 2
    assert "holds shards of another build (part-00000-of-00002)" in capsys.readouterr().err


def test_shards_of_another_tokenizer_of_the_same_size_and_special_ids_are_another_build(tmp_path, records, capsys):
    """The build id knew the tokenizer by its vocabulary size and special ids only: shards tokenized by
    another tokenizer of the same ones (another version of a tokenizer, its ids moved) were one build, so a
    resumed job array kept those of the old one (nothing rebuilt, rc 0) and built the rest with the new."""
    from polar.tokenizer import load_tokenizer
    from tests.polar.test_tokenizer import train_bpe

    old = train_bpe(tmp_path / "old")
    new = tmp_path / "new"
    new.mkdir()
    spec = json.loads((tmp_path / "old" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]  # two ids swapped: same size, same special tokens
    (new / "tokenizer.json").write_text(json.dumps(spec))
    a, b = load_tokenizer(old), load_tokenizer(str(new))
    assert (a.vocab_size, a.bos_id, a.pad_id, a.reward_sep_id, a.reward_token_id) == \
        (b.vocab_size, b.bos_id, b.pad_id, b.reward_sep_id, b.reward_token_id)
    assert list(a.encode("a sea")) != list(b.encode("a sea"))
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 10, "--num-shards", 2]
    assert build(*common, "--shard-index", 0, "--tokenizer", old) == 0
    capsys.readouterr()
    assert build(*common, "--shard-index", 0, "--tokenizer", new) == 2
    assert "part-00000-of-00002.idx exists, a shard of another build" in capsys.readouterr().err
    assert build(*common, "--shard-index", 1, "--tokenizer", new) == 2
    assert "holds shards of another build (part-00000-of-00002)" in capsys.readouterr().err
    assert build(*common, "--shard-index", 0, "--tokenizer", tmp_path / ".." / tmp_path.name / "old") == 0
    assert "is already built by this build" in capsys.readouterr().out  # the same tokenizer by another path


def test_a_shard_built_from_an_input_since_rewritten_is_not_kept(tmp_path, records, capsys):
    """The build id knows the inputs by name, size and lines: an input regenerated with its lines in
    another order is the same build, and its shards, kept by a run of their command again, hold other
    records than a fresh build puts there (those of other shards, read twice by training)."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    common = [src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 10, "--num-shards", 2]
    assert build(*common, "--shard-index", 0) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    write_jsonl(tmp_path / "r.jsonl", records[:40][::-1])
    capsys.readouterr()
    assert build(*common, "--shard-index", 0) == 2
    assert ("part-00000-of-00002.idx exists, built from other bytes than its inputs' lines hold now (an input "
            "rewritten with the same name, size and line count") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert build(*common, "--shard-index", 0, "--force") == 0  # rebuilt from the bytes there now
    assert build(*common, "--shard-index", 0) == 0
    assert "is already built by this build" in capsys.readouterr().out


def test_a_shard_is_not_built_beside_shards_built_from_other_bytes_of_an_input(tmp_path, records, capsys):
    """An input rewritten with the same name, size and line count (its lines reordered: a shuffle run again)
    is the same build id, so a job array run again after shard 1 failed built it from the new lines beside
    shard 0 built from the old: one dataset, some records twice and others never. Each shard records its
    inputs' fingerprints (polar.input_fingerprint) and a shard built beside others of its build compares
    them; shards that record none (built before) are built beside with a note."""
    from polar.input_fingerprint import FIELD

    rows = records[:40]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    same = write_jsonl(tmp_path / "s.jsonl", records[40:60])  # not rewritten: not named
    ds = tmp_path / "ds"
    common = [src, same, "-o", ds, "--seq-length", SEQ, "--chunk-records", 10, "--num-shards", 2]
    for i in range(2):
        assert build(*common, "--shard-index", i) == 0
    assert build(src, same, "-o", tmp_path / "one", "--seq-length", SEQ, "--chunk-records", 10) == 0
    one = IndexedDataset(tmp_path / "one")

    def reads_as_one_machines():
        two = IndexedDataset(ds)
        assert len(two) == len(one) and two.num_groups == 60
        for i in range(len(one)):
            assert one.sources(i).tolist() == two.sources(i).tolist()

    def lose_shard_1():
        for ext in ("bin", "idx", "json"):
            (ds / f"part-00001-of-00002.{ext}").unlink()

    reads_as_one_machines()
    lose_shard_1()
    size = src.stat().st_size
    write_jsonl(src, rows[::-1])
    assert src.stat().st_size == size
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    capsys.readouterr()
    for force in ([], ["--force"]):
        assert build(*common, "--shard-index", 1, *force) == 2
        err = capsys.readouterr().err
        assert (f"{ds} holds shards of this build built from other bytes of {src} than it holds now "
                "(part-00000-of-00002): an input rewritten since with the same name, size and line count") in err
        assert "restore the input as it was and build this shard again, or remove those shards" in err
        assert str(same) not in err
        assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    write_jsonl(src, rows)  # restored
    assert build(*common, "--shard-index", 1) == 0
    assert "note" not in capsys.readouterr().err
    reads_as_one_machines()
    # shard 0 as a build before fingerprints wrote it: shard 1 is built beside it, said unchecked
    lose_shard_1()
    meta0 = ds / "part-00000-of-00002.json"
    meta = json.loads(meta0.read_text())
    assert [sorted(s) for s in meta["sources"]] == [["bytes", "first_record", "lines", "path", FIELD]] * 2
    meta["sources"] = [{k: v for k, v in s.items() if k != FIELD} for s in meta["sources"]]
    meta0.write_text(json.dumps(meta))
    assert build(*common, "--shard-index", 1) == 0
    err = capsys.readouterr().err
    assert (f"note: part-00000-of-00002 in {ds}, of this build, record no input fingerprints (built before they "
            "were recorded): whether they were built from the bytes the inputs hold now cannot be checked") in err
    assert err.count("note:") == 1
    reads_as_one_machines()
