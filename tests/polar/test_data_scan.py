"""`polar data scan` and `polar data build --scan`: the inputs' lines counted once for all machines of
a build, whose shards are byte for byte a build's without a scan; each machine then reads only the
blocks where its own chunks begin; a scan that is not of the inputs now is refused, naming the input."""
from __future__ import annotations

import builtins
import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from polar import build_workers, cli, data_chunks, data_scan
from tests.polar.test_data_build import SEQ, build, synthetic_records, write_jsonl
from tests.polar.test_data_chunks import chunks_by_rule, random_input

BLOCK = 512  # blocks of a few lines, so that a shard's chunks begin in a few of many


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)  # the records of test_data_build.py


@pytest.fixture
def inputs(tmp_path, records, monkeypatch):
    monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", BLOCK)
    return [write_jsonl(tmp_path / "in" / "a.jsonl", records[:70]), write_jsonl(tmp_path / "in" / "b.jsonl",
                                                                                 records[70:100])]


def scan(*args) -> int:
    return data_scan.main([*map(str, args), "--quiet"])


class Reads:
    """`open` for one module, counting the bytes read from the files it opens: what a machine reads."""

    def __init__(self, monkeypatch, module):
        self.bytes = 0
        monkeypatch.setattr(module, "open", self.open, raising=False)

    def open(self, path, mode="r", *args, **kw):
        return _Counted(builtins.open(path, mode, *args, **kw), self)


class _Counted:
    def __init__(self, f, tally: Reads):
        self.f, self.tally = f, tally

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def readinto(self, buf):
        got = self.f.readinto(buf)
        self.tally.bytes += got or 0
        return got

    def read(self, n=-1):
        data = self.f.read(n)
        self.tally.bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


def shard_files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("num_parts", [1, 3])
def test_a_build_with_a_scan_writes_the_shards_a_build_without_one_writes(tmp_path, inputs, num_parts):
    """The shards, their index and metadata (build id, sources, record ids) are the same bytes, for
    each machine of 3 and a scan made by one machine or split over three."""
    for part in range(num_parts):
        assert scan(*inputs, "-o", tmp_path / "scan", "--num-parts", num_parts, "--part", part) == 0
    common = [*inputs, "--seq-length", SEQ, "--chunk-records", 7, "--num-shards", 3]
    for i in range(3):
        assert build(*common, "--shard-index", i, "-o", tmp_path / "plain") == 0
        assert build(*common, "--shard-index", i, "-o", tmp_path / "scanned", "--scan", tmp_path / "scan") == 0
    plain = shard_files(tmp_path / "plain")
    assert len(plain) == 9 and plain == shard_files(tmp_path / "scanned")


def test_a_machine_given_a_scan_reads_only_the_blocks_where_its_chunks_begin(tmp_path, inputs, capsys):
    """Each of N machines read every input in full to count its lines: N reads of the corpus. Given a
    scan, machine i reads the blocks holding the newline before each of its chunks' first lines, and
    then its chunks; the scan itself, split over N machines, reads each input byte once."""
    total = sum(p.stat().st_size for p in inputs)
    n, chunk_records = 4, 9
    with pytest.MonkeyPatch.context() as mp:
        scanning = Reads(mp, data_chunks)
        for part in range(n):
            assert scan(*inputs, "-o", tmp_path / "scan", "--num-parts", n, "--part", part) == 0
    assert scanning.bytes == total
    for i in range(n):
        with pytest.MonkeyPatch.context() as mp:
            planning, building = Reads(mp, data_chunks), Reads(mp, build_workers)
            assert build(*inputs, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", chunk_records,
                         "--num-shards", n, "--shard-index", i, "--scan", tmp_path / "scan") == 0
        mine, _ = chunks_by_rule(inputs, chunk_records, n, i)
        # the blocks holding the newline before each chunk's first line and after its last
        ends = {(f, (at - 1) // BLOCK) for _, f, start, end, *_ in mine for at in (start, end)
                if 0 < at < os.path.getsize(f)}
        assert planning.bytes == sum(min(BLOCK, os.path.getsize(f) - j * BLOCK) for f, j in ends), i
        # each chunk, and the newline that ends the line before it (checked: polar/build_workers.py)
        assert building.bytes == sum(end - start + (start > 0) for _, _, start, end, *_ in mine)
        assert 0 < planning.bytes < total / 3
    with pytest.MonkeyPatch.context() as mp:  # the same machine without a scan: every input in full first
        planning = Reads(mp, data_chunks)
        assert build(*inputs, "-o", tmp_path / "ds2", "--seq-length", SEQ, "--chunk-records", chunk_records,
                     "--num-shards", n, "--shard-index", n - 1) == 0
    assert planning.bytes > total


@pytest.mark.parametrize("seed", range(4))
def test_the_parts_of_a_split_scan_merge_to_the_counts_of_one_scan(tmp_path, monkeypatch, seed):
    """Any number of parts, even more than the inputs' blocks (a part of none), blocks cutting lines,
    empty files and files without a last newline: the merged scan holds each input's counts as the
    build counts them itself."""
    rng = np.random.default_rng(seed)
    for trial in range(4):
        monkeypatch.setattr(data_chunks, "_SCAN_BLOCK", int(rng.choice([1, 3, 16, 64])))
        files = [str(random_input(rng, tmp_path / f"{trial}-{k}.jsonl")) for k in range(rng.integers(1, 4))]
        want = [data_chunks.count_lines(f) for f in files]
        for num_parts in (1, 2, 3, 5, 40):
            out = tmp_path / f"scan-{trial}-{num_parts}"
            for part in range(num_parts):
                data_scan.scan(files, str(out), num_parts, part, quiet=True)
            got = data_scan.load(str(out)).line_counts(files)
            for g, w in zip(got, want, strict=True):
                assert (g.path, g.size, g.lines, g.block) == (w.path, w.size, w.lines, w.block), (files, num_parts)
                np.testing.assert_array_equal(g.newlines, w.newlines)


def test_a_scan_of_inputs_that_changed_since_is_refused_naming_the_input(tmp_path, inputs, records, capsys):
    a, b = inputs
    assert scan(a, b, "-o", tmp_path / "scan") == 0
    common = ["-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", tmp_path / "scan"]
    size, before = b.stat().st_size, b.stat().st_mtime_ns
    with open(b, "a") as f:  # a sampler appended a record
        f.write(json.dumps(records[100]) + "\n")
    assert build(a, b, *common) == 2
    err = capsys.readouterr().err
    # (the time too, unless the append fell within the file system's clock tick of the write)
    assert re.search(rf"error: {re.escape(str(b))} changed since --scan \S+ counted its lines: "
                     rf"{b.stat().st_size:,} bytes now, {size:,} in the scan(; modified \S+ \S+ now, \S+ \S+ in the "
                     r"scan)?: run `polar data scan` again on the build's inputs \(nothing was built\)", err), err
    b.write_bytes(b.read_bytes()[:size])
    os.utime(b, ns=(before + 10**9, before + 10**9))  # the same bytes, written again a second later
    assert build(a, b, *common) == 2
    err = capsys.readouterr().err
    assert f"error: {b} changed since --scan" in err and "bytes now" not in err and "modified" in err
    os.utime(b, ns=(before, before))
    assert build(a, b, *common) == 0  # as scanned again
    assert build(b, a, *common, "--force") == 2  # another order, another split
    assert f"its input 1 is {a}, the build's is {b}" in capsys.readouterr().err
    assert build(a, *common, "--force") == 2
    assert f"counted 2 inputs, the build reads 1 (its {b} is not the build's)" in capsys.readouterr().err


def test_an_input_rewritten_since_the_scan_with_its_size_and_time_is_found(tmp_path, inputs, capsys):
    """Size and time alone do not prove the lines unmoved: the blocks a machine reads again are
    checked against the scan's counts, as against its own."""
    a, b = inputs
    assert scan(a, b, "-o", tmp_path / "scan") == 0
    st = b.stat()
    data = bytearray(b.read_bytes())
    for _ in range(3):  # three of the last lines joined, as many bytes
        data[data.rindex(b"\n", 0, len(data) - 1)] = ord(" ")
    b.write_bytes(data)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build(a, b, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 4, "--num-shards", 2,
                 "--shard-index", 1, "--scan", tmp_path / "scan") == 2
    assert re.search(rf"error: {re.escape(str(b))}: its bytes \d+-\d+ hold \d+ line ends where the build counted \d+: "
                     "cut short or rewritten during the build", capsys.readouterr().err)


def test_a_scan_missing_a_part_or_mixing_two_is_refused_naming_them(tmp_path, inputs, capsys):
    out = tmp_path / "scan"
    common = [*inputs, "-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", out]
    assert build(*common) == 2
    assert f"error: --scan {out}: no such directory" in capsys.readouterr().err
    for part in (0, 2):
        assert scan(*inputs, "-o", out, "--num-parts", 4, "--part", part) == 0
    assert build(*common) == 2
    assert f"error: --scan {out} lacks 2 of the 4 parts of its scan (--part 1, 3)" in capsys.readouterr().err
    assert scan(*inputs, "-o", out, "--num-parts", 2, "--part", 1) == 0
    assert build(*common) == 2
    assert (f"error: --scan {out} holds parts of two scans: scan-00000-of-00004.json and scan-00001-of-00002.json "
            "differ in their number of parts (4 and 2): remove the older parts") in capsys.readouterr().err
    (out / "scan-00001-of-00002.json").write_text("{")
    assert build(*common) == 2
    assert f"error: {out / 'scan-00001-of-00002.json'}: Expecting property name" in capsys.readouterr().err
    (out / "scan-00001-of-00002.json").unlink()
    with open(inputs[1], "a") as f:  # written to between two parts' scans
        f.write("\n")
    assert scan(*inputs, "-o", out, "--num-parts", 4, "--part", 1) == 0
    assert build(*common) == 2
    # neither part counted a block of inputs[1]: their digests of the whole list tell them apart
    assert re.search(rf"error: --scan {re.escape(str(out))} holds parts of two scans: scan-00000-of-00004.json and "
                     r"scan-00001-of-00004.json differ in their inputs \(digests [0-9a-f]{12} and [0-9a-f]{12}: "
                     r"another list or order of the same number of files, or a file written between their scans\): "
                     "remove the older parts", capsys.readouterr().err)


def test_parts_of_two_scans_name_the_input_both_counted_that_differs(tmp_path, inputs, capsys):
    """Two parts that counted blocks of the same input name it, with what each saw of it; another
    order of the same files is another scan."""
    a, b = inputs
    out = tmp_path / "scan"
    common = [a, b, "-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", out]
    assert scan(a, b, "-o", out, "--num-parts", 2, "--part", 0) == 0
    with open(a, "a") as f:  # written to between two parts' scans; both count blocks of a
        f.write("\n")
    assert scan(a, b, "-o", out, "--num-parts", 2, "--part", 1) == 0
    assert build(*common) == 2
    assert re.search(rf"error: --scan {re.escape(str(out))} holds parts of two scans: scan-00000-of-00002.json and "
                     rf"scan-00001-of-00002.json differ in their input 1: {re.escape(str(a))} of [\d,]+ bytes "
                     rf"modified [^:]+:[^:]+:\S+ and {re.escape(str(a))} of [\d,]+ bytes modified",
                     capsys.readouterr().err)
    assert scan(b, a, "-o", out, "--num-parts", 2, "--part", 1) == 0  # its part 1 counts a's last blocks
    assert build(*common) == 2
    assert ("scan-00000-of-00002.json and scan-00001-of-00002.json differ in their inputs (digests "
            in capsys.readouterr().err)


def test_two_scans_writing_the_same_part_at_once_both_succeed(tmp_path, inputs, monkeypatch, capsys):
    """Two machines scanning the same part into one directory (a job retried while the first still
    runs, two array tasks given one index) wrote the same temporary file: the first one's rename
    published the second's file while it was being written (a build reading then met half a part)
    and the second's rename found no file, failing a scan that had counted its part."""
    out = tmp_path / "scan"
    rename = os.replace

    def another_scan_meanwhile(src, dst):  # the other machine writes and renames its part first
        monkeypatch.setattr(os, "replace", rename)
        assert scan(*inputs, "-o", out) == 0
        rename(src, dst)

    monkeypatch.setattr(os, "replace", another_scan_meanwhile)
    assert scan(*inputs, "-o", out) == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["scan-00000-of-00001.json"]  # no temporary file left
    assert [c.lines for c in data_scan.load(str(out)).counts] == [70, 30]


def test_an_input_written_during_its_scan_is_named_and_no_part_written(tmp_path, inputs, records, monkeypatch,
                                                                       capsys):
    a, b = inputs

    def appending(self, nbytes):  # a sampler appends to b while it is read
        with open(b, "a") as f:
            f.write(json.dumps(records[100]) + "\n")

    monkeypatch.setattr(data_chunks.ScanProgress, "__call__", appending)
    assert scan(a, b, "-o", tmp_path / "scan") == 2
    assert (f"error: {b}: changed while it was scanned (still being written?); nothing was written"
            in capsys.readouterr().err)
    assert not list(tmp_path.glob("scan/*"))


def test_the_scan_reports_progress_and_what_it_wrote(tmp_path, inputs, monkeypatch, capsys):
    monkeypatch.setattr(data_scan, "ScanProgress", functools.partial(data_chunks.ScanProgress, interval=0))
    total = sum(p.stat().st_size for p in inputs)
    assert data_scan.main([*map(str, inputs), "-o", str(tmp_path / "scan"), "--num-parts", "2", "--part", "1"]) == 0
    out, err = capsys.readouterr()
    # in the unit of their size: a scan of a few MB said "0.00 of 0.00 GB"
    assert 1e3 < total < 1e6
    got = re.search(r"scanning inputs for lines: ([\d.]+) of \1 kB \(100%\) \| [\d,]+ MB/s \| ETA 0s", err)
    assert got and float(got[1]) > 0, err
    assert f"wrote {tmp_path / 'scan' / 'scan-00001-of-00002.json'}: part 1 of 2, {got[1]} of {total / 1e3:.2f} kB of 2 " \
           "inputs" in out
    assert f"`polar data build --scan {tmp_path / 'scan'}` reads it once all 2 parts are there" in out
    done = json.loads((tmp_path / "scan" / "scan-00001-of-00002.json").read_text())
    listed = [(c["input"], c["path"], c["bytes"]) for c in done["blocks"]]  # the last half's inputs
    assert listed and listed == [(k, str(p), p.stat().st_size) for k, p in enumerate(inputs)][-len(listed):]
    assert 0 < sum(len(data_scan._decode(c["newlines"])) for c in done["blocks"]) * BLOCK < total


@pytest.mark.parametrize("done, total, said", [(800_000, 1_600_000, "0.80 of 1.60 MB"), (999, 999, "999 of 999 bytes"),
                                               (1_000, 1_000, "1.00 of 1.00 kB"), (0, 2 * 10**9, "0.00 of 2.00 GB"),
                                               (25 * 10**9, 3 * 10**12, "0.03 of 3.00 TB")])
def test_amounts_are_said_in_the_unit_of_the_total(done, total, said):
    assert data_chunks.amount_of(done, total) == said


def parts_of(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("scan-*.json"))]


def test_a_part_holds_the_inputs_it_counted_not_every_input(tmp_path, inputs):
    """Every part listed every input's path, size and time: at 10^5 inputs and 100 parts, 10 MB a
    part and 1 GB of JSON read by every machine of the build. A part's size is now that of what it
    counted, whatever the inputs outside it."""
    more = [write_jsonl(tmp_path / "more" / f"{k:04d}.jsonl", [{"prompt": "p"}]) for k in range(400)]
    sizes = []
    for extra in (10, 400):
        files = [str(p) for p in [*inputs, *more[:extra]]]
        blocks = sum(-(-os.path.getsize(f) // BLOCK) for f in files)
        out = tmp_path / f"scan-{extra}"
        data_scan.scan(files, str(out), blocks, 0, quiet=True)  # part 0: the first block of a.jsonl
        part = out / data_scan.part_name(0, blocks)
        assert [c["input"] for c in json.loads(part.read_text())["blocks"]] == [0]
        sizes.append(len(part.read_bytes()) - len(f"{blocks}{len(files)}"))  # less the digits of its counts
    assert sizes[0] == sizes[1], sizes


def test_an_empty_input_is_listed_by_one_part_and_checked_by_the_build(tmp_path, inputs, capsys):
    """An empty input has no block to count: the part whose run holds the block after it lists it, the
    last part for one at the end, so that the build still checks it (an input no part lists, or a
    listing that is not the parts' digest's, is refused)."""
    a, b = inputs
    empty = [tmp_path / "in" / f"e{k}.jsonl" for k in range(3)]
    for e in empty:
        e.write_bytes(b"")
    files = [empty[0], a, empty[1], b, empty[2]]
    first_block = {1: 0, 3: -(-a.stat().st_size // BLOCK)}  # a's and b's first blocks over all
    total = first_block[3] + -(-b.stat().st_size // BLOCK)
    for num_parts in (1, 2, 3, total + 3):
        out = tmp_path / f"scan-{num_parts}"
        for part in range(num_parts):
            assert scan(*files, "-o", out, "--num-parts", num_parts, "--part", part) == 0
        owner = {}
        for doc in parts_of(out):
            part = doc["part"]
            first, stop = part * total // num_parts, (part + 1) * total // num_parts  # the blocks it counts
            for c in doc["blocks"]:
                if c["bytes"] == 0:
                    assert c["input"] not in owner and c["newlines"] == ""
                    owner[c["input"]] = part
                    after = first_block.get(c["input"] + 1, total)
                    assert first <= after < stop or after == total and part == num_parts - 1
        assert sorted(owner) == [0, 2, 4], (num_parts, owner)
        assert [c.lines for c in data_scan.load(str(out)).line_counts(list(map(str, files)))] == [0, 70, 0, 30, 0]
    common = [*files, "-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", out, "--force"]
    assert build(*common) == 0
    with open(empty[1], "w") as f:
        f.write("{}\n")
    assert build(*common) == 2
    assert f"error: {empty[1]} changed since --scan {out} counted its lines: 3 bytes now, 0 in the scan" in \
        capsys.readouterr().err
    empty[1].write_bytes(b"")
    part = out / data_scan.part_name(owner[2], total + 3)
    doc = json.loads(part.read_text())
    doc["blocks"] = [c for c in doc["blocks"] if c["input"] != 2]
    part.write_text(json.dumps(doc))
    assert build(*common) == 2
    assert (f"error: --scan {out}: no part lists its input 3 of 5 (1 unlisted): run `polar data scan` again"
            in capsys.readouterr().err)
    doc["blocks"].append({"input": 2, "path": str(empty[1]), "bytes": 1, "mtime_ns": 0, "first_block": 0,
                          "newlines": "", "last_byte": None})
    part.write_text(json.dumps(doc))
    assert build(*common) == 2
    assert (f"error: --scan {out}: the inputs its parts list are not those of their digest: run `polar data scan` "
            "again" in capsys.readouterr().err)


def test_parts_of_version_1_which_list_every_input_are_read(tmp_path, inputs, capsys):
    """A scan made by the polar before (every input listed in every part) serves the build as it is,
    alone or beside parts of this one; a version this polar does not know is refused, saying so."""
    files = list(map(str, inputs))
    out = tmp_path / "scan"
    for part in range(3):
        assert scan(*files, "-o", out, "--num-parts", 3, "--part", part) == 0
    want = data_scan.load(str(out)).line_counts(files)
    every = [{"path": f, "bytes": os.stat(f).st_size, "mtime_ns": os.stat(f).st_mtime_ns} for f in files]
    for p in sorted(out.glob("scan-*.json"))[:2]:  # parts 0 and 1 as version 1 wrote them
        doc = json.loads(p.read_text())
        blocks = [{k: c[k] for k in ("input", "first_block", "newlines", "last_byte")} for c in doc["blocks"]]
        p.write_text(json.dumps({"format": doc["format"], "version": 1, "num_parts": 3, "part": doc["part"],
                                 "block": doc["block"], "inputs": every, "blocks": blocks}))
    got = data_scan.load(str(out)).line_counts(files)
    assert [(g.size, g.lines, g.newlines.tolist()) for g in got] == [(w.size, w.lines, w.newlines.tolist())
                                                                      for w in want]
    last = out / data_scan.part_name(2, 3)
    last.write_text(last.read_text().replace('"version": 2', '"version": 3'))
    assert build(*files, "-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", out) == 2
    assert (f"error: {last}: version 3, where this polar reads versions 1, 2: run `polar data scan` again"
            in capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--num-parts", "0"], "--num-parts must be >= 1, got 0"),
    (["--num-parts", "2", "--part", "2"], "--part 2 is outside 0..1 (--num-parts 2)"),
])
def test_a_part_outside_the_parts_is_refused(tmp_path, inputs, capsys, args, message):
    assert scan(*inputs, "-o", tmp_path / "scan", *args) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_a_file_where_the_scan_directory_goes_is_named_before_the_inputs_are_read(tmp_path, inputs, capsys):
    """A scan whose --output was a file counted every input (hours on a large corpus), then failed
    "[Errno 17] File exists"; a build given that file as --scan was told "no such directory"."""
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        reads = Reads(mp, data_chunks)
        for out in (afile, afile / "scan"):
            assert scan(*inputs, "-o", out) == 2
            assert f"error: --output: {afile} is a file, where a directory is needed" in capsys.readouterr().err
    assert reads.bytes == 0 and afile.read_text() == ""
    assert build(*inputs, "-o", tmp_path / "ds", "--seq-length", SEQ, "--scan", afile) == 2
    assert (f"error: --scan {afile}: a file, not the directory `polar data scan INPUTS --output DIR` makes"
            in capsys.readouterr().err)


def test_the_scan_is_a_data_command_whose_options_say_what_they_do(capsys, monkeypatch):
    import argparse

    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "scan", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: polar data scan")
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for argv in (["data", "scan"], ["data", "build"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    assert len(seen) == 2 and "--scan" in seen[1]._option_string_actions
    bare = [a.option_strings[-1] for ap in seen for a in ap._actions if a.option_strings and not a.help]
    assert not bare, bare
