"""`polar data build`: records -> shards that hold exactly the encoded groups, the same for any
worker or shard count; bad records named or set aside, never lost. The helpers here (records,
their files and expected groups, the command) serve the other test_data_build_*.py files:
_training (a built dataset read by training and `polar data stats`), _rebuild (--force, other
builds and runs of one output), _workers (worker processes) and _scan (lines -> chunks -> shards)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from polar import data_build, data_stats
from polar.format import encode_groups
from polar.input_fingerprint import fingerprint
from polar.pretrain_data import SyntheticDataConfig, make_splits
from polar.tokenizer import ByteTokenizer

ROOT = Path(__file__).parents[2]
SEQ = 512


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    splits = make_splits(SyntheticDataConfig(seed=seed, train_policies=6, held_out_policies=2, train_triplets=n,
                                             eval_triplets=2, prompts=40))
    out = []
    for i, t in enumerate(splits.train):
        if i % 5 == 4:  # some grouped records of ours, K=3, labels from policies
            out.append({"prompt": [{"role": "user", "content": t.prompt}], "reference": t.reference,
                        "reference_policy": t.policy_a, "wrapper": "pretrain", "meta": {"i": i},
                        "candidates": [{"text": t.rejected, "policy": t.policy_b},
                                       {"text": t.chosen, "policy": t.policy_a},
                                       {"text": t.rejected[::-1], "policy": t.policy_b}]})
        else:
            out.append({"prompt": t.prompt, "reference": t.reference, "chosen": t.chosen, "rejected": t.rejected})
    return out


def write_jsonl(path: Path, records: list, extra_lines: dict | None = None) -> Path:
    lines = [(json.dumps(r) + "\n").encode() for r in records]
    for at, raw in sorted((extra_lines or {}).items()):
        lines.insert(at, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def expected_group(rec: dict):
    """The group the build must store for a record, made here without the build's code path."""
    if "candidates" in rec:
        cands = [c["text"] for c in rec["candidates"]]
        labels = [int(c["policy"] == rec["reference_policy"]) for c in rec["candidates"]]
    else:
        cands, labels = [rec["chosen"], rec["rejected"]], [1, 0]
    enc = encode_groups(ByteTokenizer(), [rec["prompt"]], [rec["reference"]], [cands], rec.get("wrapper", "sft"),
                        max_length=SEQ)[0]
    return enc, labels


def build(*args: str) -> int:
    return data_build.main([*map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)


def test_every_record_becomes_its_encoded_group(tmp_path, records, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", records)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 50) == 0
    assert "packing efficiency" in capsys.readouterr().out
    ds = IndexedDataset(tmp_path / "ds")
    seen = []
    for i in range(len(ds)):
        for g, rid in zip(ds.sequences([i])[0], ds.sources(i)):
            enc, labels = expected_group(records[rid])
            np.testing.assert_array_equal(g.prefix, enc.prefix)
            assert len(g.candidates) == len(enc.candidates)
            for a, b in zip(g.candidates, enc.candidates):
                np.testing.assert_array_equal(a, b)
            assert g.labels.tolist() == labels
            seen.append(int(rid))
    assert sorted(seen) == list(range(len(records)))  # each record exactly once
    m = ds.meta
    tok = ByteTokenizer()
    assert (m["vocab_size"], m["pad_id"], m["bos_id"], m["reward_token_id"]) == (tok.vocab_size, tok.pad_id,
                                                                              tok.bos_id, tok.reward_token_id)
    assert m["tokenizer"] == "byte" and m["token_dtype"] == "uint16" and m["seq_length"] == SEQ
    assert m["sources"] == [{"path": str(src), "bytes": src.stat().st_size, "lines": 120, "first_record": 0,
                             "sample_sha256": fingerprint(str(src), src.stat().st_size)}]
    assert m["counts"]["records"] == 120 and m["counts"]["sequences"] == len(ds)


def test_output_is_the_same_for_any_workers_and_shards(tmp_path, records, capsys):
    """Records that repeat an earlier one (across chunks and files; one differing only in metadata
    or naming the default wrapper; not one naming another wrapper) are kept, counted and named,
    the same for any workers; a machine of several compares its own shard's."""
    a = write_jsonl(tmp_path / "a.jsonl", records[:70] + [records[5], records[6], {**records[1], "id": 7},
                                                          {**records[2], "wrapper": "pretrain"},
                                                          {**records[3], "wrapper": "sft"}])
    b = write_jsonl(tmp_path / "b.jsonl", records[70:] + records[:2] + [records[90]])
    common = [a, b, "--seq-length", SEQ, "--chunk-records", 16]
    assert build(*common, "-o", tmp_path / "w1") == 0
    assert build(*common, "-o", tmp_path / "w2", "--workers", "2") == 0
    out = capsys.readouterr().out
    repeats = [(f"{a}:71", f"{a}:6"), (f"{a}:72", f"{a}:7"), (f"{a}:73", f"{a}:2")]
    line = (f"  duplicates 7 records repeat an earlier record exactly (the same prompt, reference, candidates, "
            f"labels and wrapper), kept: each is trained as often as it appears: "
            f"{', '.join(f'{x} repeats {y}' for x, y in repeats)}, ...\n")
    assert out.count(line) == 2, out
    for ext in ("bin", "idx"):
        name = f"part-00000-of-00001.{ext}"
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), ext
    for w in ("w1", "w2"):
        meta = IndexedDataset(tmp_path / w).meta
        assert meta["counts"]["duplicates"] == 7 and meta["duplicates_first"] == [list(r) for r in repeats]
        assert meta["counts"]["groups"] == len(records) + 8  # every repeat kept
    for i in range(3):  # three machines, one directory
        assert build(*common, "-o", tmp_path / "sharded", "--num-shards", 3, "--shard-index", i) == 0
    # shard 2 holds b.jsonl's lines 17-53, of which line 53 repeats line 21
    assert (f"  duplicates 1 records repeat an earlier record of this shard (other shards' records are not "
            f"compared) exactly (the same prompt, reference, candidates, labels and wrapper), kept: each is trained "
            f"as often as it appears: {b}:53 repeats {b}:21\n") in capsys.readouterr().out
    one, three = IndexedDataset(tmp_path / "w1"), IndexedDataset(tmp_path / "sharded")
    assert [s.meta["counts"]["duplicates"] for s in three.shards] == [0, 0, 1]
    assert len(three.shards) == 3 and len(one) == len(three)
    for i in range(len(one)):
        np.testing.assert_array_equal(one.sources(i), three.sources(i))
    for k in one.per_sequence:
        np.testing.assert_array_equal(one.per_sequence[k], three.per_sequence[k])


BAD = {3: b"{oops\n", 9: b'{"prompt": "\xff"}\n', 12: b"\n"}


def test_fail_names_the_first_bad_record_and_writes_nothing(tmp_path, records, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", records[:20], BAD)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--workers", 2, "--chunk-records", 2) == 2
    assert f"{src}:4: (line): not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()  # nor the directory the build made
    # a directory that existed stays; new parents made for the output go with it
    (tmp_path / "kept").mkdir()
    assert build(src, "-o", tmp_path / "kept" / "a" / "ds", "--seq-length", SEQ) == 2
    assert [p.name for p in tmp_path.joinpath("kept").iterdir()] == []


def test_skip_sets_bad_records_and_too_long_groups_aside(tmp_path, records, capsys):
    recs = records[:20] + [{**records[0], "chosen": "x" * 400, "rejected": "y" * 400}]  # > SEQ even truncated
    src = write_jsonl(tmp_path / "r.jsonl", recs, BAD)
    assert data_build.main([str(src), "-o", str(tmp_path / "ds"), "--seq-length", str(SEQ),
                            "--on-error", "skip", "--chunk-records", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 rejected" not in out and "3 rejected (1 too long to pack)" in out
    rejects = [json.loads(x) for x in (tmp_path / "ds" / "part-00000-of-00001.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(4, "(line)"), (10, "(line)"), (24, "(group)")]
    assert rejects[0]["raw"] == "{oops" and "raw_base64" in rejects[1]
    assert "more than seq_length=512" in rejects[2]["reason"] and json.loads(rejects[2]["raw"])["chosen"] == "x" * 400
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_groups == 20 and ds.meta["counts"]["rejected"] == 3 and ds.meta["counts"]["too_long"] == 1
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ) == 2  # an existing shard is not replaced
    assert "exists" in capsys.readouterr().err


def test_a_group_longer_than_the_pack_keeps_a_shorter_prompt_and_is_counted(tmp_path, records, capsys):
    """POLAR's truncation bounds each candidate's input (16384 at the defaults), not the group: a
    3000-byte prompt with a 4096-byte reference and two 4096-byte candidates is 18291 tokens stored.
    It builds, with the default --on-error fail, its prompt shortened and reported."""
    long = {"prompt": "q" * 3000, "reference": "r" * 4096, "chosen": "c" * 4096, "rejected": "x" * 4096}
    src = write_jsonl(tmp_path / "r.jsonl", [records[0], long])
    assert build(src, "-o", tmp_path / "ds") == 0
    assert "1 prompts shortened to fit the pack (954 tokens beyond POLAR's rule)" in capsys.readouterr().out
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_groups == 2 and ds.meta["counts"]["prompts_shortened"] == 1
    assert ds.meta["counts"]["prompt_tokens_cut"] == 954 and ds.meta["counts"]["rejected"] == 0
    want = encode_groups(ByteTokenizer(), ["q" * 3000], ["r" * 4096], [["c" * 4096, "x" * 4096]],
                         group_capacity=16384)[0]
    got = [g for i in range(len(ds)) for g, rid in zip(ds.sequences([i])[0], ds.sources(i)) if rid == 1][0]
    assert len(got) == 16383 and want.prompt_cut_to_fit == 954
    for a, b in zip(got.candidates, want.candidates):
        np.testing.assert_array_equal(np.concatenate([got.prefix, a]), np.concatenate([want.prefix, b]))
    # four such candidates do not fit even without a prompt: set aside, with why
    four = {"prompt": "q" * 100, "reference": "r" * 4096,
            "candidates": [{"text": t * 4096, "label": int(t == "a")} for t in "abcd"]}
    src = write_jsonl(tmp_path / "four.jsonl", [records[0], four])
    assert build(src, "-o", tmp_path / "ds4", "--on-error", "skip") == 0
    rejects = (tmp_path / "ds4" / "part-00000-of-00001.rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and "more than seq_length=16384 even with its prompt cut by 100 tokens" in rejects[0]


def test_what_polars_truncation_cut_is_counted_and_reported(tmp_path, capsys):
    """The rule's own cuts are not errors, but a model never sees the end of a response cut to its head:
    the report says how many (an answer at the end of long reasoning would be lost on most)."""
    recs = [{"prompt": "q" * 50, "reference": "r" * 30, "chosen": "c" * 10, "rejected": "x" * 40},
            {"prompt": "q", "reference": "r", "chosen": "c", "rejected": "x"}]
    src = write_jsonl(tmp_path / "r.jsonl", recs)
    assert data_build.main([str(src), "-o", str(tmp_path / "ds"), "--seq-length", "256", "--max-length", "100",
                            "--max-response", "20"]) == 0
    out = capsys.readouterr().out
    # group 0: reference 30 and rejected 40 cut to 20; its prompt budget (100 - 4 - 20 - 20) // 2 = 28 < 50
    assert "truncation 2 of 6 responses (references and candidates) cut to their first 20 ids, BOS counted (19 tokens of text); 1 prompts " \
           "to their last tokens within max_length 100\n" in out, out
    counts = IndexedDataset(tmp_path / "ds").meta["counts"]
    assert (counts["responses_cut"], counts["prompts_cut"], counts["prompts_shortened"]) == (2, 1, 0)


def test_a_build_of_no_group_is_an_error_that_writes_no_shard(tmp_path, records, capsys):
    """An empty input, or --on-error skip rejecting every record, wrote a shard of 0 groups and
    exited 0, where fine-tuning and evaluation stop on the same input ("no usable record")."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    assert build(empty, "-o", tmp_path / "ds", "--seq-length", SEQ) == 2
    assert f"error: no usable record in {empty}: 0 records read and 1 blank lines; no shard was written" \
        in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, {**records[0], "chosen": "x" * 400,
                                                                  "rejected": "y" * 400}])
    ds, rejects = tmp_path / "ds", tmp_path / "ds" / "part-00000-of-00001.rejects.jsonl"
    assert build(bad, "-o", ds, "--seq-length", SEQ, "--on-error", "skip") == 2
    assert (f"error: no usable record in {bad}: 2 records read, 2 rejected, 1 of them too long to pack, the first "
            f"{bad}:1: reference: missing (listed with their reasons in {rejects}); no shard was written") \
        in capsys.readouterr().err
    assert [p.name for p in ds.iterdir()] == [rejects.name]  # why, but nothing a reader takes for a dataset
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [1, 2]
    with pytest.raises(DatasetFormatError):
        IndexedDataset(ds)
    # a --force rebuild of no group keeps the shard it would have replaced, and that shard's rejects
    good = write_jsonl(tmp_path / "good.jsonl", records[:10], {3: b"{oops\n"})
    assert build(good, "-o", ds, "--seq-length", SEQ, "--on-error", "skip", "--force") == 0
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    assert build(bad, "-o", ds, "--seq-length", SEQ, "--on-error", "skip", "--force") == 2
    assert f"(not listed: {rejects} is the kept shard's; --rejects PATH lists them); the shard was not replaced" \
        in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before


@pytest.mark.parametrize("option, value", [("--seq-length", 0), ("--seq-length", -5), ("--max-length", -1),
                                           ("--max-response", -1), ("--max-response", 0), ("--seed", -1),
                                           ("--num-shards", 0), ("--workers", 0), ("--chunk-records", 0)])
def test_bad_build_options_are_named_and_write_nothing(tmp_path, records, capsys, option, value):
    src = write_jsonl(tmp_path / "r.jsonl", records[:5])
    assert build(src, "-o", tmp_path / "ds", "--on-error", "skip", option, value) == 2
    assert f"{option} must be an integer >= " in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_output_and_rejects_paths_are_checked_before_the_build_and_made(tmp_path, records, capsys):
    """A --rejects path in a directory not there failed at the first reject, as an errno ("No such file
    or directory: ...rejects.jsonl.tmp", hours into a large build); an --output that is a file was
    "[Errno 17] File exists"; a --rejects directory was "exists and is not the rejects list of..."."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:5], {2: b"{oops\n"})
    rejects = tmp_path / "new" / "deeper" / "rejects.jsonl"
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip", "--rejects", rejects) == 0
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [3]
    # a failed build leaves none of the directories it made, the rejects list's too
    assert build(src, "-o", tmp_path / "ds2", "--seq-length", SEQ, "--rejects", tmp_path / "n2" / "r.jsonl") == 2
    assert not (tmp_path / "ds2").exists() and not (tmp_path / "n2").exists()
    capsys.readouterr()
    (tmp_path / "afile").write_text("")
    for args, said in ((["-o", tmp_path / "afile"], f"--output: {tmp_path / 'afile'} is a file, where a directory "
                                                     "is needed"),
                       (["-o", tmp_path / "afile" / "ds"], f"--output: {tmp_path / 'afile'} is a file"),
                       (["-o", tmp_path / "ds3", "--rejects", tmp_path / "afile" / "r.jsonl"],
                        f"--rejects: {tmp_path / 'afile'} is a file"),
                       (["-o", tmp_path / "ds3", "--rejects", tmp_path / "new"],
                        f"--rejects {tmp_path / 'new'} is a directory: it names the rejects list's file")):
        assert build(src, "--seq-length", SEQ, "--on-error", "skip", *args) == 2
        assert f"error: {said}" in capsys.readouterr().err
    assert not (tmp_path / "ds3").exists() and (tmp_path / "afile").read_text() == ""


def test_blank_lines_and_a_bom_are_not_records(tmp_path, records, capsys):
    lines = [(json.dumps(r) + "\n").encode() for r in records[:4]]
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + lines[1] + b"  \n" + b"{oops\n" + b"".join(lines[2:]))
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip") == 0
    out = capsys.readouterr().out
    # "(0 too long to pack)" was said of every rejects list
    assert f"records    5 (2 blank lines skipped): 4 groups, 1 rejected -> {tmp_path / 'ds'}" in out, out
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_groups == 4 and ds.meta["counts"]["blank"] == 2
    enc, _ = expected_group(records[0])  # the BOM is not part of the first record
    first = [g for i in range(len(ds)) for g, rid in zip(ds.sequences([i])[0], ds.sources(i)) if rid == 0]
    np.testing.assert_array_equal(first[0].prefix, enc.prefix)
    assert data_stats.main([str(tmp_path / "ds")]) == 0
    assert "records 5 (1 rejected) | groups 4" in capsys.readouterr().out
    # metadata written before blank lines were counted still reads (its lines are the records)
    meta_path = tmp_path / "ds" / "part-00000-of-00001.json"
    meta = json.loads(meta_path.read_text())
    del meta["counts"]["blank"]
    meta_path.write_text(json.dumps(meta))
    assert data_stats.compute(str(tmp_path / "ds"))["records"] == 7
