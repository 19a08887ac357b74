"""polar/data_chunks.py, and `polar data build` through it: every input line in exactly one chunk of
one shard, as the module's rule says, for any bytes; memory of one machine's own chunks, not of the
input's lines; an input that changes during the build is named."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from engine.indexed_dataset import IndexedDataset
from polar import data_build, data_chunks
from polar.build_workers import BuildConfig
from tests.polar.test_data_build import SEQ, build, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)  # the records of test_data_build.py


def test_the_input_scan_reports_progress(tmp_path, records, capsys):
    """Each shard's build scans every input for its lines before the first record is built: on a
    large corpus minutes that printed nothing."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    progress = data_chunks.ScanProgress(src.stat().st_size, quiet=False, interval=0)
    count = data_chunks.count_lines(str(src), progress)
    assert count.lines == 40 and progress.done == src.stat().st_size
    kb = src.stat().st_size / 1e3  # in the unit of its size, where GB said "0.00 of 0.00 GB"
    assert f"scanning inputs for lines: {kb:.2f} of {kb:.2f} kB (100%)" in capsys.readouterr().err


def test_lines_appended_to_an_input_during_the_scan_are_not_built(tmp_path, records, monkeypatch):
    """An input still being written (a sampler's output) grew during the scan: the lines after the
    size first seen were built into its last chunk but not counted in its lines, under the record
    ids of the next file's first records."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:30])
    second = write_jsonl(tmp_path / "s.jsonl", records[30:40])
    scanned = src.read_bytes()

    def appending(self, nbytes):  # the sampler appends while the scan runs
        if not self.done:
            with open(src, "ab") as f:
                f.writelines((json.dumps(r) + "\n").encode() for r in records[40:45])
        self.done += nbytes

    monkeypatch.setattr(data_chunks.ScanProgress, "__call__", appending)
    meta = data_build.build([str(src), str(second)], str(tmp_path / "ds"), BuildConfig(seq_length=SEQ),
                            quiet=True)
    assert [(s["lines"], s["bytes"]) for s in meta["sources"]] == [(30, len(scanned)), (10, second.stat().st_size)]
    assert meta["counts"]["lines"] == meta["counts"]["groups"] == 40
    ds = IndexedDataset(tmp_path / "ds")
    assert sorted(np.concatenate([ds.sources(i) for i in range(len(ds))]).tolist()) == list(range(40))



@pytest.mark.parametrize("workers", [1, 2])
def test_an_input_cut_short_after_the_scan_stops_the_build_naming_it(tmp_path, records, monkeypatch, capsys, workers):
    """Read short, the lines the scan had counted past the new end were lost without a word."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:30])
    keep = sum(len(json.dumps(r)) + 1 for r in records[:20])
    real = data_build.plan_chunks

    def then_cut(*args, **kw):  # the file is rewritten shorter once the build has planned its chunks
        planned = real(*args, **kw)
        os.truncate(src, keep)
        return planned

    monkeypatch.setattr(data_build, "plan_chunks", then_cut)
    assert build(src, "--output", tmp_path / "ds", "--seq-length", SEQ, "--workers", workers) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(src))}: {keep} bytes, fewer than the \d+ the build scanned "
                     r"\(from line \d+ on\): cut short or rewritten during the build; nothing of the shard was "
                     "written", err), err
    assert not list(tmp_path.glob("ds/*.bin"))


@pytest.mark.parametrize("regenerated", ["reordered", "longer"])
def test_an_input_rewritten_after_the_scan_stops_the_build_naming_it(tmp_path, records, monkeypatch, capsys,
                                                                     regenerated):
    """Regenerated once the chunks were planned, as long or longer: the chunks were read from the
    offsets counted in the old file, lines cut in two and rejected (--on-error skip) or built under
    the numbers of other lines, and the build ended 0."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:30])
    real = data_build.plan_chunks

    def then_rewritten(*args, **kw):
        planned = real(*args, **kw)
        write_jsonl(src, records[:30][::-1] if regenerated == "reordered" else records[10:50])
        return planned

    monkeypatch.setattr(data_build, "plan_chunks", then_rewritten)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 7, "--on-error", "skip") == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(src))}: bytes \d+-\d+ do not hold lines \d+-\d+ as the build counted "
                     "them: cut short or rewritten during the build; nothing of the shard was written", err), err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def chunks_by_rule(files: list, chunk_records: int, num_shards: int, shard_index: int) -> tuple[list, list]:
    """The module's rule on whole files in memory, as the build applied it when it kept every line's
    offset: (shard `shard_index`'s chunks as tuples, the sources entries)."""
    every, sources, base = [], [], 0
    for path in files:
        data = Path(path).read_bytes()
        starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == 10]
        starts = [s for s in starts if s < len(data)]  # "a\n" is one line, "" none
        bounds = starts + [len(data)]
        for a in range(0, len(starts), chunk_records):
            b = min(a + chunk_records, len(starts))
            every.append((len(every), str(path), bounds[a], bounds[b], a + 1, base + a))
        sources.append({"path": str(path), "bytes": len(data), "lines": len(starts), "first_record": base})
        base += len(starts)
    n = len(every)
    return every[shard_index * n // num_shards:(shard_index + 1) * n // num_shards], sources


PIECES = [b"", b"", b"x", b"{}", b"\r", b"\xc3\xa9", b"\xe2\x82\xac" * 3, b"\xf0\x9f\x98\x80", b"abcdefghij" * 4]


def random_input(rng: np.random.Generator, path: Path) -> Path:
    """Lines of 0 to ~200 bytes (empty ones, CRLF endings, 2-4 byte UTF-8 characters that small blocks
    cut through), a last line with or without its newline; an empty file, or one of newlines only."""
    kind = rng.integers(10)
    if kind == 0:
        return write_bytes(path, b"")
    if kind == 1:
        return write_bytes(path, b"\n" * int(rng.integers(1, 30)))
    lines = [b"".join(PIECES[i] for i in rng.integers(0, len(PIECES), rng.integers(0, 6)))
             for _ in range(rng.integers(1, 80))]
    ending = [b"\n", b"\r\n"][rng.integers(2)]
    return write_bytes(path, ending.join(lines) + [b"", ending][rng.integers(2)])


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("seed", range(8))
def test_every_line_is_in_exactly_one_chunk_of_one_shard_as_the_rule_says(tmp_path, monkeypatch, seed):
    """For random inputs and blocks so small that they cut lines and characters, each machine of N
    finds the chunks the rule gives it (the chunks the build made when it kept every line's offset:
    the same shards, record ids and build id as before), and over the N machines each line of each
    file is read once, in one chunk, with its own line number and record id."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", int(rng.choice([1, 2, 3, 7, 64, 1 << 22])))
    monkeypatch.setattr(data_chunks, "_FIND_PIECE", int(rng.choice([1, 2, 5, 1 << 20])))
    for trial in range(6):
        files = [str(random_input(rng, tmp_path / f"{trial}-{k}.jsonl")) for k in range(rng.integers(1, 4))]
        chunk_records = int(rng.integers(1, 12))
        for num_shards in range(1, 7):
            read = {f: [] for f in files}
            for i in range(num_shards):
                mine, sources = data_chunks.plan_chunks(files, chunk_records, True, num_shards, i)
                want, want_sources = chunks_by_rule(files, chunk_records, num_shards, i)
                got = [(c.index, c.file, c.start, c.end, c.first_line, c.first_record) for c in mine]
                assert (got, sources) == (want, want_sources), (files, chunk_records, num_shards, i)
                assert len(mine) == len(want) and mine.bytes == sum(c[3] - c[2] for c in want)
                for c in mine:
                    data = Path(c.file).read_bytes()[c.start:c.end]
                    lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
                    assert 0 < len(lines) <= chunk_records
                    read[c.file] += [(c.first_line + k, c.first_record + k, raw) for k, raw in enumerate(lines)]
            for f, src in zip(files, sources):
                data = Path(f).read_bytes()
                lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n") if data else []
                first = src["first_record"]
                assert read[f] == [(k + 1, first + k, raw) for k, raw in enumerate(lines)], (f, num_shards)


def test_a_shard_holds_offsets_for_its_own_chunks_not_for_the_inputs_lines(tmp_path, monkeypatch):
    """Every machine held the byte offset of every input line, 8 bytes a line and three copies at the
    peak: 8-16 GB of int64 on each machine for one file of 10^9 lines. A machine now holds one offset
    per chunk of its own and one number per block read: the peak of planning is a block's, under a
    byte per line here, and a shard of 4 holds a quarter of the chunks' offsets."""
    import tracemalloc

    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", 1 << 16)
    monkeypatch.setattr(data_chunks, "_FIND_PIECE", 1 << 12)
    lines = 400_000
    src = write_bytes(tmp_path / "r.jsonl", b"".join(b"x" * (i % 7) + b"\n" for i in range(lines)))
    data_chunks.plan_chunks([str(src)], 2000)  # numpy's first calls allocate caches of their own
    tracemalloc.start()
    try:
        whole, sources = data_chunks.plan_chunks([str(src)], 2000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sources[0]["lines"] == lines and len(list(whole)) == 200
    assert peak < lines, f"{peak} bytes at the peak for {lines} lines"
    assert whole.offsets_held == 201
    quarters = [data_chunks.plan_chunks([str(src)], 2000, True, 4, i)[0] for i in range(4)]
    assert [(len(q), q.offsets_held) for q in quarters] == [(50, 51)] * 4
    # a shard reaching into several inputs holds one more offset for each
    second = write_bytes(tmp_path / "s.jsonl", b"y\n" * 3000)
    mine, _ = data_chunks.plan_chunks([str(src), str(second)], 2000, True, 2, 1)
    assert (len(mine), mine.offsets_held, [s.path for s in mine.spans]) == (101, 103, [str(src), str(second)])


def test_a_machine_of_several_builds_lines_of_any_bytes_as_one_machine(tmp_path, records, monkeypatch):
    """CRLF endings, blank lines, characters of 2-4 bytes and no newline at the end, read in blocks
    that cut through them: 4 machines build every record once, as one machine does."""
    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", 37)
    monkeypatch.setattr(data_chunks, "_FIND_PIECE", 5)
    recs = [{**r, "prompt": f"\u00e9\u20ac\U0001F600 {i}"} if i % 3 == 0 else r for i, r in enumerate(records[:25])]
    lines = [json.dumps(r, ensure_ascii=False).encode() + (b"\r\n" if i % 2 else b"\n") for i, r in enumerate(recs)]
    lines[4:4] = [b"\n", b"  \r\n"]
    src = write_bytes(tmp_path / "r.jsonl", b"".join(lines).rstrip(b"\r\n"))
    common = [src, "--seq-length", SEQ, "--chunk-records", 3]
    assert build(*common, "-o", tmp_path / "one") == 0
    for i in range(4):
        assert build(*common, "-o", tmp_path / "four", "--num-shards", 4, "--shard-index", i) == 0
    one, four = IndexedDataset(tmp_path / "one"), IndexedDataset(tmp_path / "four")
    ids = np.concatenate([four.sources(i) for i in range(len(four))])
    assert sorted(ids.tolist()) == [i for i in range(27) if i not in (4, 5)]  # the blank lines are 4 and 5
    assert len(one) == len(four)
    for k in one.per_sequence:
        np.testing.assert_array_equal(one.per_sequence[k], four.per_sequence[k])


def test_an_input_rewritten_after_its_lines_were_counted_stops_the_build_naming_it(tmp_path, records, monkeypatch,
                                                                                  capsys):
    """A shard finds where its chunks start by reading again the blocks that hold them: a file whose
    lines moved since they were counted (rewritten in place, the same size) is named, not built
    from chunks that begin mid-line."""
    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", 256)
    src = write_jsonl(tmp_path / "r.jsonl", records[:30])
    real = data_chunks.count_lines

    def then_rewritten(*args, **kw):
        counted = real(*args, **kw)
        data = bytearray(src.read_bytes())
        for _ in range(3):  # three of the last lines joined, as many bytes: the lines of shard 1 moved
            data[data.rindex(b"\n", 0, len(data) - 1)] = ord(" ")
        src.write_bytes(data)
        return counted

    monkeypatch.setattr(data_chunks, "count_lines", then_rewritten)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 4, "--num-shards", 2,
                 "--shard-index", 1) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(src))}: its bytes \d+-\d+ hold \d+ line ends where the build counted "
                     r"\d+: cut short or rewritten during the build; nothing of the shard was written", err), err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_an_input_cut_short_while_its_lines_are_counted_stops_the_build_naming_it(tmp_path, records, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", 512)
    src = write_jsonl(tmp_path / "r.jsonl", records[:30])
    size = src.stat().st_size

    def cutting(self, nbytes):  # the file is cut to 1000 bytes once the first block is read
        if not self.done:
            os.truncate(src, 1000)
        self.done += nbytes

    monkeypatch.setattr(data_chunks.ScanProgress, "__call__", cutting)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ) == 2
    assert (f"error: {src}: 1000 bytes, fewer than the {size} it had when the build began counting its lines: cut "
            "short or rewritten during the build; nothing of the shard was written") in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())
