"""`polar data build` / `polar data stats`: records -> shards that hold exactly the encoded groups,
the same for any worker or shard count; bad records named or set aside, never lost; and a run
trained on a built dataset resumes at the exact next sample."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from polar import data_build, data_stats
from polar.format import encode_groups
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
    assert m["sources"] == [{"path": str(src), "bytes": src.stat().st_size, "lines": 120, "first_record": 0}]
    assert m["counts"]["records"] == 120 and m["counts"]["sequences"] == len(ds)


def test_output_is_the_same_for_any_workers_and_shards(tmp_path, records):
    a = write_jsonl(tmp_path / "a.jsonl", records[:70])
    b = write_jsonl(tmp_path / "b.jsonl", records[70:])
    common = [a, b, "--seq-length", SEQ, "--chunk-records", 16]
    assert build(*common, "-o", tmp_path / "w1") == 0
    assert build(*common, "-o", tmp_path / "w2", "--workers", "2") == 0
    for ext in ("bin", "idx"):
        name = f"part-00000-of-00001.{ext}"
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), ext
    for i in range(3):  # three machines, one directory
        assert build(*common, "-o", tmp_path / "sharded", "--num-shards", 3, "--shard-index", i) == 0
    one, three = IndexedDataset(tmp_path / "w1"), IndexedDataset(tmp_path / "sharded")
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
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


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
    3000-byte prompt with a 4096-byte reference and two 4096-byte candidates is 18294 tokens stored.
    It builds, with the default --on-error fail, its prompt shortened and reported."""
    long = {"prompt": "q" * 3000, "reference": "r" * 4096, "chosen": "c" * 4096, "rejected": "x" * 4096}
    src = write_jsonl(tmp_path / "r.jsonl", [records[0], long])
    assert build(src, "-o", tmp_path / "ds") == 0
    assert "1 prompts shortened to fit the pack (955 tokens beyond POLAR's rule)" in capsys.readouterr().out
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_groups == 2 and ds.meta["counts"]["prompts_shortened"] == 1
    assert ds.meta["counts"]["prompt_tokens_cut"] == 955 and ds.meta["counts"]["rejected"] == 0
    want = encode_groups(ByteTokenizer(), ["q" * 3000], ["r" * 4096], [["c" * 4096, "x" * 4096]],
                         group_capacity=16384)[0]
    got = [g for i in range(len(ds)) for g, rid in zip(ds.sequences([i])[0], ds.sources(i)) if rid == 1][0]
    assert len(got) == 16384 and want.prompt_cut_to_fit == 955
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
    assert "truncation 2 of 6 responses (references and candidates) cut to their first 20 tokens; 1 prompts to " \
           "their last tokens within max_length 100\n" in out, out
    counts = IndexedDataset(tmp_path / "ds").meta["counts"]
    assert (counts["responses_cut"], counts["prompts_cut"], counts["prompts_shortened"]) == (2, 1, 0)


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


def test_a_build_of_no_group_is_an_error_that_writes_no_shard(tmp_path, records, capsys):
    """An empty input, or --on-error skip rejecting every record, wrote a shard of 0 groups and
    exited 0, where fine-tuning and evaluation stop on the same input ("no usable record")."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    assert build(empty, "-o", tmp_path / "ds", "--seq-length", SEQ) == 2
    assert f"error: no usable record in {empty}: 0 records read and 1 blank lines; no shard was written" \
        in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())
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


def pretrain_cmd(tmp_path: Path, name: str, *overrides: str) -> list:
    return [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path / name}",
            "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
            "model.ffn_hidden_size=64", "train.steps=4", "train.global_batch=4", "train.lr=1e-2",
            "train.warmup_steps=1", "train.time_limit_s=0", "log.interval=1", "log.tensorboard=false",
            f"data.seq_length={SEQ}", *overrides]


def pretrain(tmp_path: Path, name: str, *overrides: str) -> dict:
    proc = subprocess.run(pretrain_cmd(tmp_path, name, *overrides), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def check_here(capsys, *overrides) -> tuple[int, str]:
    """`engine/pretrain.py --check-config` run by its main in this process, and what it wrote to stderr:
    the check ends before any process group starts, and a process of its own costs seconds of imports."""
    from engine import pretrain as entry

    capsys.readouterr()
    code = entry.main(["--check-config", *map(str, overrides)])
    return code, capsys.readouterr().err


def test_training_on_a_built_dataset_resumes_at_the_exact_sample(tmp_path, records):
    src = write_jsonl(tmp_path / "r.jsonl", records)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--chunk-records", 40) == 0
    data = [f"data.path={tmp_path / 'ds'}", f"data.eval_path={tmp_path / 'ds'}"]
    straight = pretrain(tmp_path, "straight", *data, "checkpoint.save_at_end=false")  # no resume from it
    pretrain(tmp_path, "resumed", *data, "train.exit_at_step=2")
    resumed = pretrain(tmp_path, "resumed", *data)
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(straight["history"], resumed["history"]):
        # the same global batches in the same order: the same losses, step by step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7), a["step"]
    assert len({round(r["loss"], 6) for r in straight["history"]}) > 1  # steps differ, so order matters
    assert straight["eval_pair_accuracy"] == pytest.approx(resumed["eval_pair_accuracy"])
    # the totals count the whole training; only the rate is the resumed process's own
    assert resumed["steps"] == straight["steps"] == 4 and resumed["tokens"] == straight["tokens"] > 0
    assert resumed["resumed_at_step"] == 2 and straight["resumed_at_step"] == 0
    assert 0 < resumed["tokens_this_run"] < resumed["tokens"] == straight["tokens_this_run"]
    assert straight["data"] == str(tmp_path / "ds") and straight["eval_pairs"] > 0


def test_training_takes_one_shard_and_refuses_an_empty_evaluation_set(tmp_path, records, capsys):
    """data.path may name one shard (as `polar data stats` takes it); an evaluation set whose every
    record was rejected reported accuracy 0.000 over 0 pairs."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    empty = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    # one build refuses to make no group; two shards (the first gets no chunk) are written all the same
    for i in range(2):
        assert build(empty, "-o", tmp_path / "ev", "--seq-length", SEQ, "--on-error", "skip", "--num-shards", 2,
                     "--shard-index", i) == 0
    assert "holds no group (0 records read, 0 rejected): shard 0 of 2 is written" in capsys.readouterr().err
    shard = tmp_path / "ds" / "part-00000-of-00001"
    base = [f"run_dir={tmp_path / 'run'}", f"data.seq_length={SEQ}", "train.global_batch=2", f"data.path={shard}"]
    code, err = check_here(capsys, *base)
    assert code == 0, err[-2000:]
    code, err = check_here(capsys, *base, f"data.eval_path={tmp_path / 'ev'}")
    assert code == 2 and f"data.eval_path={tmp_path / 'ev'} holds no packed sequences" in err, err[-2000:]


def test_training_refuses_a_dataset_packed_at_another_length(tmp_path, records):
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", 1024)
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path / 'run'}",
                           f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"data.seq_length={SEQ}, but data.path={tmp_path / 'ds'} is packed at 1024" in proc.stderr


def test_an_hf_tokenizer_dataset_holds_the_whole_string_ids_and_trains(tmp_path, records):
    """With a BPE that merges across the prompt/response boundary, every group is what
    encode_groups gives for that tokenizer (each candidate's whole input tokenized at once), the
    metadata carries its vocabulary and special ids, and pretrain.py trains on it."""
    from polar.tokenizer import load_tokenizer
    from tests.polar.test_tokenizer import train_bpe

    tok_dir = train_bpe(tmp_path / "bpe")
    tok = load_tokenizer(tok_dir)
    recs = records[:40]
    src = write_jsonl(tmp_path / "r.jsonl", recs)
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--tokenizer", tok_dir, "--workers", 2,
                 "--chunk-records", 16) == 0
    ds = IndexedDataset(tmp_path / "ds")
    m = ds.meta
    assert (m["vocab_size"], m["pad_id"], m["bos_id"], m["reward_token_id"]) == (
        tok.vocab_size, tok.pad_id, tok.bos_id, tok.reward_token_id)
    assert m["tokenizer"] == str(Path(tok_dir).resolve())  # absolute: found from any working directory
    seen = 0
    for i in range(len(ds)):
        for g, rid in zip(ds.sequences([i])[0], ds.sources(i)):
            rec = recs[rid]
            cands = [c["text"] for c in rec["candidates"]] if "candidates" in rec else [rec["chosen"], rec["rejected"]]
            enc = encode_groups(tok, [rec["prompt"]], [rec["reference"]], [cands], rec.get("wrapper", "sft"),
                                max_length=SEQ)[0]
            for k, cand in enumerate(g.candidates):
                np.testing.assert_array_equal(np.concatenate([g.prefix, cand]), enc.full(k))
            seen += 1
    assert seen == len(recs)
    summary = pretrain(tmp_path, "run", f"data.path={tmp_path / 'ds'}", "train.steps=2")
    assert summary["steps"] == 2 and all(np.isfinite(r["loss"]) for r in summary["history"])
    # the checkpoints carry the tokenizer, which scoring finds without being told
    from engine.checkpoint import resolve
    from engine.score import tokenizer_spec

    carried = tmp_path / "run" / "checkpoints" / "tokenizer"
    assert (carried / "tokenizer.json").read_bytes() == (Path(tok_dir) / "tokenizer.json").read_bytes()
    assert tokenizer_spec("", resolve(str(tmp_path / "run"))) == str(carried)


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, records, capsys):
    """A resume the engine refuses (other data, or data tokenized by another tokenizer than the one
    the checkpoints carry) is refused before anything of the run directory is written: the carried
    tokenizer and config.yaml stay those of the trained steps; --check-config refuses it too (it
    passed, and the launched run then failed under torchrun)."""
    from tests.polar.test_tokenizer import train_bpe

    tok_dir = Path(train_bpe(tmp_path / "bpe"))
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--tokenizer", tok_dir) == 0
    pretrain(tmp_path, "run", f"data.path={tmp_path / 'ds'}", "train.exit_at_step=2")
    carried = tmp_path / "run" / "checkpoints" / "tokenizer" / "tokenizer.json"
    trained = (carried.read_bytes(), (tmp_path / "run" / "config.yaml").read_bytes())

    # the same ids from a tokenizer file written otherwise (another version of the library, say)
    other_tok = tmp_path / "bpe2"
    other_tok.mkdir()
    (other_tok / "tokenizer.json").write_text(json.dumps(json.loads((tok_dir / "tokenizer.json").read_text()), indent=1))
    assert build(src, "-o", tmp_path / "ds_other_tok", "--seq-length", SEQ, "--tokenizer", other_tok) == 0
    other_src = write_jsonl(tmp_path / "r2.jsonl", records[40:80])
    assert build(other_src, "-o", tmp_path / "ds_other_data", "--seq-length", SEQ, "--tokenizer", tok_dir) == 0

    base = pretrain_cmd(tmp_path, "run")
    for ds, message in (("ds_other_tok", "holds another tokenizer (tokenizer.json differs)"),
                        ("ds_other_data", "the data order changed since the checkpoint")):
        # the run refuses after its process group started: in a process of its own
        proc = subprocess.run([*base, f"data.path={tmp_path / ds}"], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 2 and message in proc.stderr, (ds, proc.stderr[-2000:])
        assert (carried.read_bytes(), (tmp_path / "run" / "config.yaml").read_bytes()) == trained, ds
        code, err = check_here(capsys, *base[2:], f"data.path={tmp_path / ds}")
        assert code == 2 and message in err, (ds, "--check-config", err[-2000:])
        assert (carried.read_bytes(), (tmp_path / "run" / "config.yaml").read_bytes()) == trained, (ds, "check")


@pytest.mark.parametrize("option, value", [("--seq-length", 0), ("--seq-length", -5), ("--max-length", -1),
                                           ("--max-response", -1), ("--max-response", 0)])
def test_bad_build_options_are_named_and_write_nothing(tmp_path, records, capsys, option, value):
    src = write_jsonl(tmp_path / "r.jsonl", records[:5])
    assert build(src, "-o", tmp_path / "ds", "--on-error", "skip", option, value) == 2
    assert f"{option} must be an integer >= " in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


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

    def failing_close(self):
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


def build_with_wrapped_chunks(tmp_path: Path, src: Path, body: str) -> subprocess.CompletedProcess:
    """`polar data build` into tmp_path/ds in a fresh process, 2 workers and 10 records a chunk, each
    chunk processed by a wrapper whose code is `body` (`chunk` its argument, `real` the original)."""
    script = ("import os, signal, sys\n"
              "from polar import data_build\n"
              "real = data_build.process_chunk\n"
              f"def wrapped(chunk):\n{body}"
              "data_build.process_chunk = wrapped\n"
              "sys.exit(data_build.main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", script, str(src), "-o", str(tmp_path / "ds"), "--seq-length",
                           str(SEQ), "--workers", "2", "--chunk-records", "10", "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_worker_killed_mid_build_is_an_error_naming_where_not_a_hang(tmp_path, records):
    """multiprocessing.Pool waits forever for the chunk of a worker that died (the out-of-memory
    killer): the build hung with its progress line and left a temporary file."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:60])
    proc = build_with_wrapped_chunks(tmp_path, src, "    if chunk.index == 2:\n"
                                                    "        os.kill(os.getpid(), signal.SIGKILL)\n"
                                                    "    return real(chunk)\n")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a build worker died (killed: out of memory?)" in proc.stderr and "r.jsonl from line" in proc.stderr
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_build_workers_plan_without_importing_torch(tmp_path, records):
    """A worker only tokenizes and plans (engine.pack_plan); importing torch cost each of them
    ~2.5 s and ~250 MB before its first chunk."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    proc = build_with_wrapped_chunks(tmp_path, src, "    out = real(chunk)\n"
                                                    "    if 'torch' in sys.modules:\n"
                                                    "        raise RuntimeError('a build worker imported torch')\n"
                                                    "    return out\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert IndexedDataset(tmp_path / "ds").num_groups == 40


def test_a_worker_dying_between_two_answers_is_the_same_error(monkeypatch):
    """The pool can break after one chunk's answer and before the next chunk is handed out: submit
    then raised BrokenProcessPool, a traceback instead of the error naming where (seen in CI once
    the workers no longer imported torch and answered sooner)."""
    import concurrent.futures
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class BreaksOnThirdSubmit:
        def __init__(self, *args, **kwargs):
            self.submitted = 0

        def submit(self, fn, chunk):
            self.submitted += 1
            if self.submitted == 3:
                raise BrokenProcessPool("A child process terminated abruptly")
            done = Future()
            done.set_result(chunk.index)
            return done

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BreaksOnThirdSubmit)
    chunks = [data_build.Chunk(i, "in.jsonl", 0, 1, 10 * i + 1, 10 * i) for i in range(4)]
    # chunks 0 and 1 in flight; chunk 0 answers, and handing out chunk 2 finds the pool broken
    with pytest.raises(data_build.WorkerDied, match=r"reading in.jsonl from line 11 \(chunk 1\) or a chunk after"):
        list(data_build._run_pool(None, chunks, workers=1))


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


def test_blank_lines_and_a_bom_are_not_records(tmp_path, records, capsys):
    lines = [(json.dumps(r) + "\n").encode() for r in records[:4]]
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + lines[1] + b"  \n" + b"{oops\n" + b"".join(lines[2:]))
    assert build(src, "-o", tmp_path / "ds", "--seq-length", SEQ, "--on-error", "skip") == 0
    out = capsys.readouterr().out
    assert "records    5 (2 blank lines skipped): 4 groups, 1 rejected" in out
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


def test_the_input_scan_reports_progress(tmp_path, records, capsys):
    """Each shard's build scans every input for its lines before the first record is built: on a
    large corpus minutes that printed nothing."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    progress = data_build._ScanProgress(src.stat().st_size, quiet=False, interval=0)
    starts = data_build.line_starts(str(src), progress)
    assert len(starts) == 40 and progress.done == src.stat().st_size
    assert "scanning inputs for lines: 0.00 of 0.00 GB (100%)" in capsys.readouterr().err


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

    monkeypatch.setattr(data_build._ScanProgress, "__call__", appending)
    meta = data_build.build([str(src), str(second)], str(tmp_path / "ds"), data_build.BuildConfig(seq_length=SEQ),
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

def test_a_built_datasets_vocabulary_is_not_checked_against_the_byte_tokenizers(tmp_path, records):
    """The byte tokenizer's check belongs to the embedded default only: a misplaced `else` ran it
    for every built dataset without data.eval_path, refusing a vocabulary smaller than its 260."""
    from engine.config import load_config
    from polar import pretrain_recipe

    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    meta = tmp_path / "ds" / "part-00000-of-00001.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "vocab_size": 200}))
    cfg = load_config(pretrain_recipe.PretrainConfig, None,
                      [f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}", "train.global_batch=2"])
    pretrain_recipe.check(cfg)
    assert cfg.model.vocab_size == 200


def check_config(tmp_path: Path, data: Path, capsys) -> tuple[int, str]:
    """engine/pretrain.py --check-config on the built dataset `data`: (exit code, stderr)."""
    return check_here(capsys, f"run_dir={tmp_path / 'run'}", f"data.seq_length={SEQ}", "train.global_batch=2",
                      f"data.path={data}")


def test_stats_and_check_config_check_every_sequence_of_the_index(tmp_path, records, capsys):
    """A run checks a packed sequence when it reads it, and stops there naming it; `polar data
    stats` and --check-config check the whole index before, naming the shard."""
    from tests.engine.test_indexed_dataset import poke

    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    shard = tmp_path / "ds" / "part-00000-of-00001"
    poke(shard, 1, 1, 10**9)  # the second group's first piece
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / "ds")]) == 2
    assert f"{shard}.idx: group offsets do not run from 0" in capsys.readouterr().err
    code, err = check_config(tmp_path, tmp_path / "ds", capsys)
    assert code == 2 and f"config error: data.path: {shard}.idx: group offsets do not run" in err, err[-2000:]
    epoch = -(-len(IndexedDataset(tmp_path / "ds")) // 2)  # steps of 2 sequences that read every one
    run = subprocess.run(pretrain_cmd(tmp_path, "run", "train.global_batch=2", f"train.steps={epoch}",
                                      f"data.path={tmp_path / 'ds'}"),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.search(rf"data error on rank 0: {re.escape(str(shard))}\.idx: packed sequence \d+: group offsets",
                     run.stderr), run.stderr[-3000:]


def test_stats_and_check_config_name_a_shard_whose_header_names_no_token_dtype(tmp_path, records, capsys):
    """A damaged header is a named error with exit code 2, not a numpy traceback."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:20])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    shard = tmp_path / "ds" / "part-00000-of-00001"
    with open(f"{shard}.idx", "r+b") as f:
        f.seek(16)  # the token dtype's name
        f.write(b"zz".ljust(8, b"\0"))
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / "ds")]) == 2
    assert f"{shard}.idx: token dtype b'zz', expected uint16 or int32" in capsys.readouterr().err
    code, err = check_config(tmp_path, tmp_path / "ds", capsys)
    assert code == 2 and f"{shard}.idx: token dtype b'zz'" in err, err[-2000:]
